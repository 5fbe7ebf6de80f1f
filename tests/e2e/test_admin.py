"""Issue 17, the admin endpoint end to end: probes, Prometheus metrics, the reference's
JSON snapshot and its JSONL dump, drain order on SIGTERM, and hostile HTTP clients.

Real relay and agents on 127.0.0.1; the HTTP side is read with curl where it fits.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from outrelay.pki import create_ca

from .harness import (
    Agent,
    Backends,
    Cluster,
    Relay,
    Transfer,
    cli_agent_argv,
    cli_relay_argv,
    connect,
    free_tcp_port,
    free_udp_port,
    read_until_closed,
    run_cli,
)

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
SPEC_HISTOGRAM_BOUNDS = [1000, 10**4, 10**5, 10**6, 10**7, 10**8, 10**9, 10**10]


def _get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body) of GET ``path`` on the admin port; status 0: no answer."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: probe\r\n\r\n".encode())
            data, _ = read_until_closed(sock, timeout)
    except OSError:
        return 0, ""
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 "):
        return 0, ""
    return int(head.split()[1]), body.decode(errors="replace")


def _curl(port: int, path: str) -> tuple[int, str]:
    """(status, body) with curl; the test is skipped where curl is missing."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl not installed")
    out = subprocess.run(
        [curl, "-sS", "-m", "5", "-w", "\n%{http_code}", f"http://127.0.0.1:{port}{path}"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    body, _, code = out.stdout.rpartition("\n")
    return int(code or 0), body


def _wait_status(port: int, path: str, status: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    last: tuple[int, str] = (0, "")
    while time.monotonic() < deadline:
        last = _get(port, path)
        if last[0] == status:
            return last[1]
        time.sleep(0.05)
    raise AssertionError(f"{path}: wanted {status}, last answer {last}")


def _samples(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (no parser needed for our own output)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def _admin_agent(
    cluster: Cluster, relay: Relay | str, index: int, admin: int, **kw: object
) -> Agent:
    args = ["--admin-listen", f"127.0.0.1:{admin}", *kw.pop("args", [])]  # type: ignore[misc]
    return cluster.start_agent(cluster.pki.agent(index), relay, args=args, **kw)  # type: ignore[arg-type]


@pytest.mark.timeout(90)
def test_agent_readiness_follows_relay_and_drains_before_listeners_close(
    cluster: Cluster, backends: Backends
) -> None:
    echo = backends.echo()
    relay_port = free_udp_port()
    admin = free_tcp_port()
    agent = _admin_agent(
        cluster,
        f"127.0.0.1:{relay_port}",
        0,
        admin,
        expose={"echo": echo.addr},
        consume=["echo"],
        args=["--drain-delay", "1.5"],
        wait=False,
    )
    agent.wait_for("agent started")
    agent.read_bound_ports()
    # No relay: alive, not ready, and the body says why.
    assert _curl(admin, "/healthz") == (200, "ok\n")
    status, body = _curl(admin, "/readyz")
    assert status == 503 and "not connected to a relay" in body, body
    with connect(agent.port("echo")) as sock:  # no relay: the open fails, and is counted
        read_until_closed(sock, 20)
    failed = 'outrelay_streams_failed_total{role="consumer",service="echo"}'
    assert _samples(_get(admin, "/metrics")[1])[failed] == 1
    # The relay appears: ready once connected and the service registered.
    cluster.start_relay(port=relay_port)
    _wait_status(admin, "/readyz", 200, 30)
    assert agent.find("service registered", name="echo")
    # SIGTERM: /readyz goes 503 while the consumer listener still accepts.
    listener = agent.port("echo")
    agent.send_signal(signal.SIGTERM)
    not_ready_while_listening = False
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        status, body = _get(admin, "/readyz", timeout=1)
        try:
            with socket.create_connection(("127.0.0.1", listener), timeout=1):
                listening = True
        except OSError:
            listening = False
        if status == 503 and listening:
            assert "draining" in body, body
            not_ready_while_listening = True
        if not listening:
            break
        if status == 200:
            assert not not_ready_while_listening, "ready again after draining began"
        time.sleep(0.02)
    assert not_ready_while_listening, "never saw /readyz 503 while the listener accepted"
    assert agent.wait_exit(15) == 0


@pytest.mark.timeout(120)
def test_metrics_after_a_known_transfer(
    cluster: Cluster, backends: Backends, tmp_path: Path
) -> None:
    relay_admin = free_tcp_port()
    dump = tmp_path / "metrics" / "relay.jsonl"
    relay = cluster.start_relay(
        args=[
            "--admin-listen",
            f"127.0.0.1:{relay_admin}",
            "--metrics-dump",
            str(dump),
            "--metrics-interval",
            "500ms",
        ]
    )
    echo = backends.echo()
    provider_admin, consumer_admin = free_tcp_port(), free_tcp_port()
    _admin_agent(cluster, relay, 0, provider_admin, expose={"echo": echo.addr})
    consumer = _admin_agent(cluster, relay, 1, consumer_admin, consume=["echo", "nope"])
    _wait_status(consumer_admin, "/readyz", 200, 20)
    _wait_status(relay_admin, "/readyz", 200, 5)

    transfer = Transfer(consumer.port("echo"), MiB)
    transfer.wait(60)
    transfer.check_exact()
    # A rejected open: nobody provides "nope" (404).
    with connect(consumer.port("nope")) as sock:
        sock.sendall(b"x")
        read_until_closed(sock, 10)

    def settled() -> tuple[dict[str, float], dict[str, float]]:
        deadline = time.monotonic() + 15
        while True:
            c = _samples(_curl(consumer_admin, "/metrics")[1])
            p = _samples(_get(provider_admin, "/metrics")[1])
            done = (
                c.get('outrelay_streams_active{role="consumer",service="echo"}', 0) == 0
                and c.get(
                    'outrelay_streams_rejected_total{code="404",role="consumer",service="nope"}'
                )
                == 1
                and p.get(
                    'outrelay_stream_bytes_total{direction="sent",role="provider",service="echo"}',
                    0,
                )
                >= MiB
            )
            if done or time.monotonic() > deadline:
                return c, p
            time.sleep(0.1)

    c, p = settled()
    key = '{role="consumer",service="echo"}'
    assert c[f"outrelay_streams_opened_total{key}"] == 1, c
    assert c['outrelay_streams_rejected_total{code="404",role="consumer",service="nope"}'] == 1, c
    assert c['outrelay_stream_bytes_total{direction="sent",role="consumer",service="echo"}'] >= MiB
    assert (
        c['outrelay_stream_bytes_total{direction="received",role="consumer",service="echo"}'] >= MiB
    )
    assert p['outrelay_streams_opened_total{role="provider",service="echo"}'] == 1, p
    assert p['outrelay_stream_bytes_total{direction="sent",role="provider",service="echo"}'] >= MiB
    assert (
        p['outrelay_stream_bytes_total{direction="received",role="provider",service="echo"}'] >= MiB
    )
    assert c['outrelay_relay_connected{transport="quic"}'] == 1
    assert c['outrelay_relay_connected{transport="tcp"}'] == 0
    assert c["outrelay_ready"] == 1

    r = _samples(_curl(relay_admin, "/metrics")[1])
    assert r['outrelay_relay_opens_total{kind="open"}'] == 2, r
    assert r['outrelay_streams_rejected_total{code="404"}'] == 1, r
    assert r['outrelay_agents_connected{transport="quic"}'] == 2, r
    assert r["outrelay_relay_listening"] == 1

    # The reference's JSON snapshot (spec 02 §11.2), field for field.
    status, body = _curl(relay_admin, "/debug/metrics")
    assert status == 200
    snap = json.loads(body)
    _check_snapshot(snap)
    assert snap["counters"]["stream_rejects"] == 1
    assert snap["histograms"]["stream_open_duration"]["n"] == 2
    # And its JSONL dump: a line at once, then one every interval.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(dump.read_text().splitlines()) < 3:
        time.sleep(0.1)
    lines = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(lines) >= 3
    for line in lines:
        _check_snapshot(line)
    assert lines[-1]["ts_unix_ms"] > lines[0]["ts_unix_ms"]
    assert dump.stat().st_mode & 0o777 == 0o600


def _check_snapshot(snap: dict[str, object]) -> None:
    assert set(snap) == {"ts_unix_ms", "counters", "gauges", "histograms"}
    assert set(snap["counters"]) == {  # type: ignore[arg-type]
        "bytes_forwarded",
        "intra_relay_hops",
        "policy_cache_hits",
        "policy_cache_misses",
        "stream_rejects",
    }
    assert set(snap["gauges"]) == {"stream_active"}  # type: ignore[arg-type]
    histograms = snap["histograms"]
    assert isinstance(histograms, dict)
    assert set(histograms) == {"policy_eval_duration", "stream_open_duration"}
    for h in histograms.values():
        assert set(h) == {"bounds_ns", "counts", "sum_ns", "n"}
        assert h["bounds_ns"] == SPEC_HISTOGRAM_BOUNDS
        assert len(h["counts"]) == 9 and sum(h["counts"]) == h["n"]


@pytest.mark.timeout(90)
def test_hostile_admin_clients_get_a_clean_close(cluster: Cluster, backends: Backends) -> None:
    relay = cluster.start_relay()
    echo = backends.echo()
    admin = free_tcp_port()
    cluster.start_agent(cluster.pki.agent(0), relay, expose={"echo": echo.addr})
    consumer = _admin_agent(cluster, relay, 1, admin, consume=["echo"])
    _wait_status(admin, "/readyz", 200, 20)

    def exchange(payload: bytes, *, then_wait: float = 10.0) -> bytes:
        with socket.create_connection(("127.0.0.1", admin), timeout=then_wait) as sock:
            with contextlib.suppress(OSError):  # the server may close mid-send (huge head)
                sock.sendall(payload)
            data, how = read_until_closed(sock, then_wait)
        assert how in ("eof", "reset"), how
        return data

    assert exchange(b"\x16\x03\x01garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert exchange(b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 200_000 + b"\r\n\r\n")[:12] in (
        b"HTTP/1.1 431",
        b"",
    )
    assert exchange(b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405")
    assert exchange(b"GET /nothing HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404")
    head = exchange(b"HEAD /healthz HTTP/1.1\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
    # Slowloris: a head that never ends is cut off after the read timeout (5 s).
    slow = [socket.create_connection(("127.0.0.1", admin), timeout=10) for _ in range(20)]
    started = time.monotonic()
    for sock in slow:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
    # Meanwhile probes are still answered...
    assert _get(admin, "/healthz") == (200, "ok\n")
    for sock in slow:
        data, how = read_until_closed(sock, 10)
        assert how == "eof" and data.startswith(b"HTTP/1.1 408"), (how, data[:40])
        sock.close()
    assert time.monotonic() - started < 9
    # ...and the agent still carries traffic.
    transfer = Transfer(consumer.port("echo"), 256 * 1024)
    transfer.wait(30)
    transfer.check_exact()
    assert _get(admin, "/readyz")[0] == 200


@pytest.mark.timeout(60)
def test_relay_readiness_and_drain(cluster: Cluster) -> None:
    admin = free_tcp_port()
    relay = cluster.start_relay(
        args=["--admin-listen", f"127.0.0.1:{admin}", "--drain-delay", "1.5"]
    )
    assert _curl(admin, "/readyz") == (200, "ready\n")
    relay.send_signal(signal.SIGTERM)
    body = _wait_status(admin, "/readyz", 503, 5)
    assert "draining" in body
    assert relay.wait_exit(15) == 0


@pytest.mark.timeout(30)
def test_admin_flags_are_checked(cluster: Cluster) -> None:
    bad = run_cli(cli_agent_argv(cluster.pki, "--admin-listen", "nope"))
    assert bad.returncode == 2 and "--admin-listen" in bad.stderr, bad.stderr
    bad = run_cli([*cli_relay_argv(cluster.pki), "--admin-listen", "1.2.3.4:x"])
    assert bad.returncode == 2 and "--admin-listen" in bad.stderr, bad.stderr


@pytest.mark.timeout(180)
def test_resume_is_counted_with_its_stall(cluster: Cluster, backends: Backends) -> None:
    relay = cluster.start_relay()
    echo = backends.echo()
    cluster.start_agent(cluster.pki.agent(0), relay, expose={"echo": echo.addr})
    admin = free_tcp_port()
    consumer = _admin_agent(cluster, relay, 1, admin, consume=["echo"])
    transfer = Transfer(consumer.port("echo"), 8 * MiB, pace=0.02)
    transfer.wait_received(0.3, timeout=60)
    before = _samples(_get(admin, "/metrics")[1])
    live = before[
        'outrelay_stream_bytes_total{direction="received",role="consumer",service="echo"}'
    ]
    assert live >= 0.3 * 8 * MiB, "bytes are counted while the stream runs"
    relay.kill()
    cluster.start_relay(port=relay.port, name="relay")
    transfer.wait(timeout=120)
    transfer.check_exact()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        after = _samples(_get(admin, "/metrics")[1])
        if after.get('outrelay_stream_resumes_total{service="echo"}', 0) >= 1:
            break
        time.sleep(0.1)
    assert after["outrelay_resume_stall_seconds_count"] >= 1, after
    assert after["outrelay_resume_stall_seconds_sum"] > 0
    assert after['outrelay_stream_resumes_total{service="echo"}'] >= 1
    assert after["outrelay_relay_connects_total"] == 2
    assert after["outrelay_p2p_promotions_total"] == 0


@pytest.mark.timeout(60)
def test_relay_counts_handshake_refusals_by_reason(cluster: Cluster, tmp_path: Path) -> None:
    other_ca = create_ca("Other CA")
    foreign = cluster.pki.issue_agent("foreign", out=tmp_path / "certs", ca=other_ca)
    bundle = tmp_path / "both-cas.crt"
    bundle.write_bytes(cluster.pki.ca_cert.read_bytes() + other_ca.cert_pem())
    admin = free_tcp_port()
    relay = cluster.start_relay(args=["--admin-listen", f"127.0.0.1:{admin}"])
    agent = cluster.start_agent(
        foreign, relay, args=["--ca", str(bundle)], name="foreign", wait=False
    )
    relay.wait_for("reject conn: client certificate refused")
    assert agent.wait_exit(30) == 1
    metrics = _samples(_curl(admin, "/metrics")[1])
    assert metrics['outrelay_handshake_refusals_total{reason="untrusted_chain"}'] == 1, metrics
    assert metrics['outrelay_agents_connected{transport="quic"}'] == 0
