"""The admin endpoint's request parser, answers and the stats behind /metrics (no network
except one in-process server on 127.0.0.1)."""

from __future__ import annotations

import asyncio

import pytest

from outrelay.agent.metrics import readiness
from outrelay.agent.stats import StreamStats
from outrelay.observe.admin import AdminServer, BadRequest, Response, parse_request_head, render
from outrelay.relay.counters import NsHistogram, RelayCounters, refusal_reason
from outrelay.splice import DirectionResult, SpliceResult


def test_request_line_is_parsed_and_query_dropped() -> None:
    assert parse_request_head(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n") == (
        "GET",
        "/metrics",
    )


@pytest.mark.parametrize(
    "head",
    [
        b"\x16\x03\x01\r\n\r\n",
        b"GET /\r\n\r\n",
        b"GET metrics HTTP/1.1\r\n\r\n",
        b"G\xffT / HTTP/1.1\r\n\r\n",
    ],
)
def test_garbage_is_a_400(head: bytes) -> None:
    with pytest.raises(BadRequest) as info:
        parse_request_head(head)
    assert info.value.status == 400


def test_methods_and_paths() -> None:
    server = AdminServer({"/healthz": lambda: Response(200, b"ok\n")})
    assert server.answer("GET", "/healthz").status == 200
    assert server.answer("HEAD", "/healthz").status == 200
    assert server.answer("POST", "/healthz").status == 405
    assert server.answer("GET", "/other").status == 404
    assert b"Allow: GET, HEAD" in render(Response(405), head_only=False)
    head = render(Response(200, b"body"), head_only=True)
    assert head.endswith(b"\r\n\r\n") and b"Content-Length: 4" in head


def test_a_failing_route_is_a_500() -> None:
    def broken() -> Response:
        raise RuntimeError("boom")

    assert AdminServer({"/x": broken}).answer("GET", "/x").status == 500


@pytest.mark.timeout(10)
def test_server_answers_and_closes() -> None:
    async def main() -> bytes:
        server = AdminServer({"/healthz": lambda: Response(200, b"ok\n")})
        host, port = await server.start("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
            data = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            return data
        finally:
            await server.close()

    data = asyncio.run(main())
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"\r\n\r\nok\n")


def test_readiness_names_what_is_missing() -> None:
    ok = dict(draining=False, connected=True, services=1, listeners_wanted=2, listeners_bound=2)
    assert readiness(**ok) == []  # type: ignore[arg-type]
    assert readiness(**{**ok, "connected": False}) == [  # type: ignore[arg-type]
        "not connected to a relay with 1 service(s) registered"
    ]
    assert readiness(**{**ok, "listeners_bound": 1}) == ["listeners bound: 1 of 2"]  # type: ignore[arg-type]
    assert readiness(**{**ok, "draining": True})[0].startswith("draining")  # type: ignore[arg-type]


def test_stream_stats_count_live_bytes() -> None:
    stats = StreamStats()
    result = SpliceResult(DirectionResult(), DirectionResult())
    stats.bridge_started("web", "consumer", result, pipelined=10)
    result.a_to_b.bytes += 100  # what the copy loops do while the bridge runs
    result.b_to_a.bytes += 7
    assert stats.active() == {("web", "consumer"): 1}
    assert stats.bytes()[("web", "consumer", "sent")] == 110
    assert stats.bytes()[("web", "consumer", "received")] == 7
    stats.bridge_ended(result, resumes=2)
    stats.bridge_ended(result)  # twice is harmless
    assert stats.active() == {}
    assert stats.bytes()[("web", "consumer", "sent")] == 110
    assert stats.resumes["web"] == 2
    assert stats.opened[("web", "consumer")] == 1
    stats.reject("web", "consumer", 403)
    assert stats.rejected[("web", "consumer", 403)] == 1


def test_histogram_uses_the_spec_buckets() -> None:
    h = NsHistogram()
    for ns in (1, 1000, 1001, 10**10, 10**10 + 1):
        h.observe(ns)
    assert h.counts == [2, 1, 0, 0, 0, 0, 0, 1, 1]
    assert h.snapshot()["n"] == 5 and len(h.snapshot()["bounds_ns"]) == 8


def test_snapshot_has_the_reference_fields() -> None:
    counters = RelayCounters()
    counters.handler_started("open")
    counters.rejected(404)
    snap = counters.snapshot(123, 4, 5)
    assert snap["ts_unix_ms"] == 123
    assert snap["counters"] == {
        "bytes_forwarded": 0,
        "intra_relay_hops": 0,
        "policy_cache_hits": 4,
        "policy_cache_misses": 5,
        "stream_rejects": 1,
    }
    assert snap["gauges"] == {"stream_active": 1}
    assert set(snap["histograms"]) == {"policy_eval_duration", "stream_open_duration"}


def test_refusal_reasons_are_bounded_labels() -> None:
    assert refusal_reason("certificate expired (notAfter 2020-01-01)") == "expired"
    assert refusal_reason("chain does not verify against CA: x") == "untrusted_chain"
    assert refusal_reason("no client certificate") == "no_certificate"
    assert refusal_reason("something new") == "other"


def test_resume_stalls_fill_cumulative_buckets() -> None:
    stats = StreamStats()
    stats.resumed(0.3)
    stats.resumed(2.0, demoted=True)
    assert stats.resume_stall_buckets == [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
    assert stats.resume_stall_count == 2 and stats.demotions == 1
