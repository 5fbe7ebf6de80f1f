"""A slow consumer must not make the relay or the agents buffer the backend's output.

The backend writes 200 MiB as fast as the socket takes it; the application
behind the consumer agent reads about 1 MiB/s for ~9 s and then closes. Flow
control has to push back all the way to the backend: per stream the design
allows about 1 MiB of send buffer plus 1 MiB of receive window per hop, so the
RSS of the relay and of both agents stays flat, and the backend can only have
written a little more than the application read.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest
from devpki import DevPki

from .harness import Backends, Cluster, RssSampler, connect

pytestmark = pytest.mark.e2e

MiB = 1 << 20
BACKEND_TOTAL = 200 * MiB
READ_RATE = 1 * MiB  # bytes per second
READ_SECONDS = 9.0
RSS_GROWTH_LIMIT_KIB = 200 * 1000 * 1000 // 1024  # "200 MB above the starting RSS"
IN_FLIGHT_LIMIT = 64 * MiB
"""Backend bytes written but not yet read by the app: kernel socket buffers on
both TCP legs (a few MiB each, autotuned) plus ~1 MiB windows per QUIC hop."""


def read_slowly(sock: socket.socket, rate: int, seconds: float) -> int:
    """Read at about ``rate`` bytes/s for ``seconds``; returns the bytes read."""
    tick = 0.05
    per_tick = int(rate * tick)
    received = 0
    t0 = time.monotonic()
    next_tick = t0
    sock.settimeout(5.0)
    while time.monotonic() - t0 < seconds:
        budget = per_tick
        while budget > 0:
            chunk = sock.recv(min(budget, 64 * 1024))
            if not chunk:
                return received
            received += len(chunk)
            budget -= len(chunk)
        next_tick += tick
        delay = next_tick - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    return received


@pytest.mark.timeout(60)
def test_slow_consumer_keeps_relay_and_agent_rss_bounded(
    cluster: Cluster, backends: Backends, pki: DevPki, record_property: Callable
) -> None:
    backend, blaster = backends.blaster(BACKEND_TOTAL)
    relay = cluster.start_relay()
    provider = cluster.start_agent(
        pki.agent(0), relay, name="provider", expose={"firehose": backend.addr}
    )
    consumer = cluster.start_agent(pki.agent(1), relay, name="consumer", consume=["firehose"])
    procs = [relay, provider, consumer]

    with RssSampler(procs, interval=0.5) as rss:
        t0 = time.monotonic()
        with connect(consumer.port("firehose"), timeout=10) as sock:
            received = read_slowly(sock, READ_RATE, READ_SECONDS)
            elapsed = time.monotonic() - t0
            sent_at_close = blaster.sent
        time.sleep(1.0)  # keep sampling while the stream is torn down

    in_flight = sent_at_close - received
    lines = [
        f"app read {received / MiB:.1f} MiB in {elapsed:.1f}s; "
        f"backend had written {sent_at_close / MiB:.1f} MiB (in flight {in_flight / MiB:.1f} MiB)"
    ]
    for proc in procs:
        base, peak = rss.baseline[proc.name], rss.peak[proc.name]
        growth = rss.growth_kib(proc.name)
        lines.append(
            f"{proc.name}: RSS start {base / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB "
            f"(+{growth / 1024:.1f} MiB, {len(rss.samples[proc.name])} samples)"
        )
        record_property(f"rss_peak_mib_{proc.name}", round(peak / 1024, 1))
        record_property(f"rss_growth_mib_{proc.name}", round(growth / 1024, 1))
    record_property("slow_consumer_read_mib", round(received / MiB, 1))
    record_property("slow_consumer_backend_written_mib", round(sent_at_close / MiB, 1))
    report = "\n".join(lines)
    print("\n" + report)

    for proc in procs:
        assert proc.running, f"{proc.name} died during the slow-consumer run\n{proc.tail()}"
    assert received >= 5 * MiB, f"the app read only {received} bytes\n{report}"
    assert received <= (READ_SECONDS + 1) * READ_RATE, report
    for proc in procs:
        assert rss.growth_kib(proc.name) < RSS_GROWTH_LIMIT_KIB, report
    assert in_flight < IN_FLIGHT_LIMIT, f"backpressure did not reach the backend\n{report}"
