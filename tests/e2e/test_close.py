"""Close semantics (issue 13): an application's close is not a link failure.

Real relay and agent processes on 127.0.0.1; the applications are plain
sockets in the test, the backends threaded servers that count their own
open connections.

* An application that aborts a download makes the provider agent close its
  backend connection within a second (it used to hold it for the 30 s resume
  window), over QUIC and over the TLS + yamux fallback.
* 200 aborts in a row never leave more than a handful of backend connections
  open, and neither agent's memory grows without bound.
* A backend that resets its connection resets the application's (RST).
* A provider agent killed and restarted as a new process: the consumer's
  application sees its reset within seconds of the restart, not 33 s.
* A provider agent stopped with SIGTERM ends its streams: the consumer's
  application sees the reset right after the shutdown grace.
* A relay restart is still a link failure: the stream resumes (test_resume.py).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from devpki import DevPki

from .harness import Agent, Backends, Cluster, RssSampler, TcpBackend, free_tcp_port, stream_forever

pytestmark = [pytest.mark.e2e]

KiB = 1 << 10
MiB = 1 << 20
CLOSE_BOUND = 1.0
"""Issue 13: the other side's connection ends within 1 s of an application's close."""


@dataclass
class Pair:
    provider: Agent
    consumer: Agent
    backend: TcpBackend
    admin_ports: tuple[int, int] | None = None
    """(provider, consumer) admin endpoints, when started with them."""

    @property
    def port(self) -> int:
        return self.consumer.port("svc")


def _start_pair(
    cluster: Cluster, pki: DevPki, backend: TcpBackend, transport: str, *, admin: bool = False
) -> Pair:
    relay_args: list[str] = []
    agent_args: list[str] = []
    admin_ports = (free_tcp_port(), free_tcp_port()) if admin else None
    if transport == "tcp":
        tcp_port = free_tcp_port()
        relay_args = ["--listen-tcp", f"127.0.0.1:{tcp_port}"]
        agent_args = ["--transport", "tcp", "--relay-tcp", f"127.0.0.1:{tcp_port}"]
    relay = cluster.start_relay(args=relay_args)

    def admin_args(i: int) -> list[str]:
        return ["--admin-listen", f"127.0.0.1:{admin_ports[i]}"] if admin_ports else []

    provider = cluster.start_agent(
        pki.agent(0), relay, expose={"svc": backend.addr}, args=agent_args + admin_args(0)
    )
    consumer = cluster.start_agent(
        pki.agent(1), relay, consume=["svc"], args=agent_args + admin_args(1)
    )
    return Pair(provider, consumer, backend, admin_ports)


def _metric_sum(port: int, name: str) -> float:
    """The sum over all label sets of ``name`` in an agent's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith((name + "{", name + " "))
    )


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST, as an application that aborts does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _wait_open(backend: TcpBackend, count: int, timeout: float) -> float:
    """Seconds until the backend has ``count`` open connections (raises on timeout)."""
    start = time.monotonic()
    while backend.open_connections != count:
        if time.monotonic() - start > timeout:
            raise AssertionError(
                f"backend still has {backend.open_connections} open connections "
                f"after {timeout:g}s (want {count})"
            )
        time.sleep(0.01)
    return time.monotonic() - start


def _download_some(port: int, size: int = 256 * KiB) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    got = 0
    while got < size:
        data = sock.recv(64 * KiB)
        assert data, "the download ended early"
        got += len(data)
    return sock


@pytest.fixture
def streamer(backends: Backends) -> Iterator[TcpBackend]:
    yield backends.tcp(stream_forever(), name="streamer")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("transport", ["quic", "tcp"])
@pytest.mark.parametrize("how", ["reset", "close"])
def test_application_abort_closes_the_backend_within_a_second(
    cluster: Cluster, pki: DevPki, streamer: TcpBackend, transport: str, how: str
) -> None:
    pair = _start_pair(cluster, pki, streamer, transport)
    sock = _download_some(pair.port)
    assert streamer.open_connections == 1
    if how == "reset":
        _reset(sock)
    else:
        sock.close()  # unread bytes in the socket: the kernel sends RST itself
    took = _wait_open(streamer, 0, timeout=10)
    print(f"\n[{transport}/{how}] backend closed {took * 1000:.0f} ms after the application")
    assert took < CLOSE_BOUND, f"the backend stayed open {took:.2f}s after the abort"
    # Nobody parked a resume half: the consumer ended the stream as the app's,
    # the provider as reset by its peer's application.
    rec = pair.consumer.wait_for("stream", outcome="reset_by_app", timeout=5)
    assert rec["resumes"] == 0, rec
    pair.provider.wait_for("stream", outcome="reset_by_peer_application_closed", timeout=5)
    assert not pair.provider.find("session: stream resumed")
    assert not pair.provider.find("resume half parked")
    assert not cluster.procs[0].find("resume half parked"), "the relay parked a half"


@pytest.mark.timeout(240)
def test_aborts_in_a_row_leave_no_backend_connections_behind(
    cluster: Cluster, pki: DevPki, streamer: TcpBackend
) -> None:
    pair = _start_pair(cluster, pki, streamer, "quic", admin=True)
    assert pair.admin_ports is not None
    procs = [pair.provider, pair.consumer]
    start = {p.name: p.rss_kib() or 0 for p in procs}

    def abort_some(count: int) -> int:
        peak_open = 0
        for _ in range(count):
            sock = _download_some(pair.port, 64 * KiB)
            _reset(sock)
            peak_open = max(peak_open, streamer.open_connections)
        return peak_open

    # Warm up first: each aborted download has the provider buffer a few MiB for a
    # moment (its resume ring and QUIC send buffer fill while the application still
    # reads), and the allocator keeps that working set. A leak grows after it.
    peak_open = abort_some(100)
    with RssSampler(procs, interval=0.25) as rss:
        peak_open = max(peak_open, abort_some(500))
        _wait_open(streamer, 0, timeout=5)
        time.sleep(0.5)  # the last stream's buffers go
    # Transient peaks are one stream's buffers; what stays after the run would be a leak.
    growth = {name: (rss.samples[name][-1] - rss.baseline[name]) / 1024 for name in rss.peak}
    print(
        f"\n100 + 500 aborts: peak backend connections {peak_open}; "
        + ", ".join(
            f"{name} RSS {start[name] / 1024:.0f} -> {rss.baseline[name] / 1024:.0f} after "
            f"warm-up -> peak {rss.peak[name] / 1024:.0f} -> "
            f"{rss.samples[name][-1] / 1024:.0f} MiB at the end"
            for name in rss.peak
        )
    )
    assert peak_open <= 5, f"{peak_open} backend connections open at once"
    # The leak check that does not depend on the allocator: every stream is over,
    # on both agents, by their own count.
    for port in pair.admin_ports:
        assert _metric_sum(port, "outrelay_streams_opened_total") == 600
        deadline = time.monotonic() + 10
        while (active := _metric_sum(port, "outrelay_streams_active")) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.1)
        assert active == 0, f"{active:.0f} streams still active after the aborts"
    for name, mib in growth.items():
        # RSS is coarse: the allocator keeps what one stream's burst needed (±20 MiB
        # between runs), so this only catches leaks of about 128 KiB per stream.
        assert mib < 64, f"{name} kept {mib:.0f} MiB more after 500 aborts than after warm-up"
        working_set = (rss.peak[name] - start[name]) / 1024
        assert working_set < 128, f"{name} used {working_set:.0f} MiB for one stream at a time"


def _reset_after(greeting: bytes):  # type: ignore[no-untyped-def]
    def handler(conn: socket.socket) -> None:
        conn.sendall(greeting)
        time.sleep(0.3)
        _reset(conn)

    return handler


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", ["quic", "tcp"])
def test_backend_reset_resets_the_application(
    cluster: Cluster, pki: DevPki, backends: Backends, transport: str
) -> None:
    backend = backends.tcp(_reset_after(b"partial answer"), name="resetter")
    pair = _start_pair(cluster, pki, backend, transport)
    sock = socket.create_connection(("127.0.0.1", pair.port), timeout=10)
    sock.sendall(b"request")
    assert sock.recv(100) == b"partial answer"
    start = time.monotonic()
    with pytest.raises(ConnectionResetError):
        while sock.recv(100):
            pass
    took = time.monotonic() - start - 0.3
    sock.close()
    print(f"\n[{transport}] application reset {took * 1000:.0f} ms after the backend's")
    assert took < CLOSE_BOUND
    pair.provider.wait_for("stream", outcome="reset_by_backend", timeout=5)
    pair.consumer.wait_for("stream", outcome="reset_by_peer_application_closed", timeout=5)


@pytest.mark.timeout(60)
def test_backend_half_close_lets_the_application_finish(
    cluster: Cluster, pki: DevPki, backends: Backends
) -> None:
    """FIN is not a close: the backend answers after the application's FIN."""
    backend = backends.reply_after_eof()
    pair = _start_pair(cluster, pki, backend, "quic")
    sock = socket.create_connection(("127.0.0.1", pair.port), timeout=10)
    sock.sendall(b"x" * 100_000)
    sock.shutdown(socket.SHUT_WR)
    answer = b""
    while data := sock.recv(1000):
        answer += data
    sock.close()
    assert answer.startswith(b"100000 ")
    pair.consumer.wait_for("stream", outcome="closed", timeout=5)


def _expect_reset(sock: socket.socket, timeout: float) -> float:
    """Read until the connection is reset; returns when (monotonic)."""
    sock.settimeout(timeout)
    with contextlib.suppress(ConnectionResetError):
        while sock.recv(64 * KiB):
            pass
        raise AssertionError("the application saw a FIN, not a reset")
    return time.monotonic()


@pytest.mark.timeout(90)
def test_provider_restart_resets_the_consumers_application_at_once(
    cluster: Cluster, pki: DevPki, streamer: TcpBackend
) -> None:
    pair = _start_pair(cluster, pki, streamer, "quic")
    relay = cluster.procs[0]
    sock = _download_some(pair.port)
    pair.provider.kill()  # SIGKILL: no goodbye
    restarted_at = time.monotonic()
    provider = cluster.start_agent(
        pki.agent(0), relay.addr, expose={"svc": streamer.addr}, name="provider-restarted"
    )
    reset_at = _expect_reset(sock, timeout=30)
    sock.close()
    took = reset_at - restarted_at
    print(f"\nprovider restarted: consumer's application reset {took:.2f}s later")
    assert took < 5.0, f"the application waited {took:.1f}s"
    relay.wait_for("agent restarted; ending its old streams", timeout=5)
    pair.consumer.wait_for("stream", outcome="reset_by_peer_agent_gone", timeout=5)
    # The restarted provider serves new streams.
    sock = _download_some(pair.port)
    _reset(sock)
    assert provider.running


@pytest.mark.timeout(90)
def test_provider_sigterm_ends_its_streams(
    cluster: Cluster, pki: DevPki, streamer: TcpBackend
) -> None:
    pair = _start_pair(cluster, pki, streamer, "quic")
    sock = _download_some(pair.port)
    stopped_at = time.monotonic()
    pair.provider.send_signal(15)
    reset_at = _expect_reset(sock, timeout=30)
    sock.close()
    assert pair.provider.wait_exit(10) == 0
    took = reset_at - stopped_at
    print(f"\nprovider SIGTERM: consumer's application reset {took:.2f}s later (grace 2 s)")
    assert took < 2.0 + 3.0, f"the application waited {took:.1f}s"
    pair.provider.wait_for("shutdown: grace over; ending streams", timeout=1)
    pair.consumer.wait_for("stream", outcome="reset_by_peer_agent_gone", timeout=5)
    assert streamer.open_connections == 0


@pytest.mark.timeout(120)
def test_provider_restart_ends_a_parked_resume_half(
    cluster: Cluster, pki: DevPki, streamer: TcpBackend
) -> None:
    """The relay saw the provider die first: the consumer's half is parked, waiting
    to resume. The provider's new process ends it at once, not after 30 s."""
    pair = _start_pair(cluster, pki, streamer, "quic")
    relay = cluster.procs[0]
    sock = _download_some(pair.port)
    since = relay.count()
    pair.provider.kill()
    relay.wait_for("agent disconnected", uri=pair.provider.uri, since=since, timeout=20)
    relay.wait_for("resume half parked", since=since, timeout=10)
    restarted_at = time.monotonic()
    cluster.start_agent(
        pki.agent(0), relay.addr, expose={"svc": streamer.addr}, name="provider-restarted"
    )
    reset_at = _expect_reset(sock, timeout=40)
    sock.close()
    took = reset_at - restarted_at
    print(f"\nparked half: consumer's application reset {took:.2f}s after the restart")
    assert took < 5.0, f"the application waited {took:.1f}s"
    relay.wait_for("resume half ended: its peer agent is gone", since=since, timeout=5)
