"""Hostile peers and floods cannot hurt anyone else (part 1), with real processes.

* QUIC: a separate process (``flood.py``) sends abandoned aioquic client
  Initials and random Initial-shaped garbage from 127.0.0.1 (the agents'
  own address) at a real relay for 12 s, while a provider/consumer pair
  echoes through it. Every echo succeeds, no agent disconnects, new agents
  connect during the flood (through Retry), the relay's RSS grows by less
  than :data:`RSS_GROWTH_MAX` and comes back to within
  :data:`RSS_RETURN_MAX` of its baseline.
* TCP fallback: hundreds of half-open TLS handshakes (silent sockets and
  half a ClientHello) from 127.0.0.2: those within the per-source cap are
  closed at the 10 s handshake timeout, the rest at once, and an agent on
  ``--transport tcp`` from 127.0.0.1 connects meanwhile.

Figures are printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from clienthello import client_hello

from outrelay.transport.tcp import HANDSHAKE_TIMEOUT, MAX_TLS_HANDSHAKES_PER_SOURCE

from .harness import Agent, Backends, Cluster, Relay, RssSampler, connect, free_tcp_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

FLOOD = Path(__file__).with_name("flood.py")
FLOOD_SECONDS = 12.0
MiB_KiB = 1024
RSS_GROWTH_MAX = 60 * MiB_KiB
"""KiB the relay may grow during the flood."""
RSS_RETURN_MAX = 20 * MiB_KiB
"""KiB above its baseline the relay must come back to after the flood."""
RSS_SETTLE = 20.0
"""Seconds after the flood within which the relay must come back."""
ECHO_INTERVAL = 0.05
ECHO_TIMEOUT = 10.0
"""One application echo may take this long (QUIC retransmits lost packets)."""
NEW_AGENTS = 4
DISCONNECT_LINES = ("session: lost; reconnecting", "session: no PONG from the relay; reconnecting")


@dataclass
class EchoLoop:
    """Echo numbered 64-byte messages over one connection through the agents, in a thread."""

    port: int
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    worst: float = 0.0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="echo-loop", daemon=True)

    def _run(self) -> None:
        try:
            sock = connect(self.port, ECHO_TIMEOUT)
        except OSError as exc:
            self.failures.append(f"connect: {exc}")
            return
        with sock:
            n = 0
            while not self._stop.is_set():
                message = b"%063d\n" % n
                started = time.monotonic()
                try:
                    sock.sendall(message)
                    got = b""
                    while len(got) < len(message):
                        chunk = sock.recv(len(message) - len(got))
                        if not chunk:
                            raise ConnectionError("EOF")
                        got += chunk
                except OSError as exc:
                    self.failures.append(f"echo {n}: {exc!r}")
                    return
                if got != message:
                    self.failures.append(f"echo {n}: got {got!r}")
                    return
                self.worst = max(self.worst, time.monotonic() - started)
                self.ok += 1
                n += 1
                self._stop.wait(ECHO_INTERVAL)

    def __enter__(self) -> EchoLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=ECHO_TIMEOUT + 2)


def _one_echo(port: int) -> None:
    with connect(port, ECHO_TIMEOUT) as sock:
        sock.sendall(b"hello through a new agent\n")
        got = b""
        while len(got) < 26:
            chunk = sock.recv(64)
            assert chunk, "EOF before the echo"
            got += chunk
        assert got == b"hello through a new agent\n"


def _disconnects(relay: Relay, agents: list[Agent], since: int) -> list[str]:
    found = [f"relay: {r}" for r in relay.find("agent disconnected", since=since)]
    for agent in agents:
        for line in DISCONNECT_LINES:
            found += [f"{agent.name}: {r}" for r in agent.find(line)]
    return found


@pytest.fixture
def flood_procs() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)


def test_quic_flood_hurts_nobody(
    cluster: Cluster, backends: Backends, flood_procs: list[subprocess.Popen[str]]
) -> None:
    relay = cluster.start_relay()
    echo = backends.echo()
    provider = cluster.start_agent(cluster.pki.agent(0), relay, expose={"echo": echo.addr})
    consumer = cluster.start_agent(cluster.pki.agent(1), relay, consume=["echo"])
    port = consumer.port("echo")
    _one_echo(port)  # warm: the first stream, HELLOs, imports all done
    time.sleep(1.0)
    since = relay.count()
    newcomers = [cluster.pki.issue_agent(f"new{i}", out=cluster.workdir) for i in range(NEW_AGENTS)]

    with RssSampler([relay], interval=0.25) as rss, EchoLoop(port) as loop:
        baseline = rss.baseline[relay.name]
        flood = subprocess.Popen(
            [
                sys.executable,
                str(FLOOD),
                "--port",
                str(relay.port),
                "--duration",
                str(FLOOD_SECONDS),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        flood_procs.append(flood)
        flood_started = time.monotonic()
        time.sleep(2.0)  # well into the flood
        joined: list[tuple[str, float]] = []
        agents = [provider, consumer]
        for ident in newcomers:
            started = time.monotonic()
            agent = cluster.start_agent(ident, relay, consume=["echo"], name=ident.name)
            joined.append((ident.name, time.monotonic() - started))
            _one_echo(agent.port("echo"))
            agents.append(agent)
        flood_out, _ = flood.communicate(timeout=FLOOD_SECONDS + 30)
        during_flood = time.monotonic() - flood_started
        peak = rss.peak[relay.name]
    # After: wait for the relay to come back near its baseline.
    settle_deadline = time.monotonic() + RSS_SETTLE
    after = relay.rss_kib() or 0
    while after - baseline > RSS_RETURN_MAX and time.monotonic() < settle_deadline:
        time.sleep(0.5)
        after = relay.rss_kib() or 0
    summary = json.loads(flood_out.strip().splitlines()[-1])
    retry_lines = relay.find("QUIC address validation (Retry) on", since=since)
    print(
        f"\n[quic flood] flood: {summary}"
        f"\n[quic flood] relay RSS: baseline {baseline / 1024:.1f} MiB, peak during "
        f"{peak / 1024:.1f} MiB (+{(peak - baseline) / 1024:.1f}), after "
        f"{after / 1024:.1f} MiB (+{(after - baseline) / 1024:.1f})"
        f"\n[quic flood] echoes: {loop.ok} ok, {len(loop.failures)} failed, worst "
        f"{loop.worst * 1000:.0f} ms over {during_flood:.1f} s"
        f"\n[quic flood] new agents during the flood: "
        + ", ".join(f"{name} in {secs:.2f}s" for name, secs in joined)
        + f"\n[quic flood] relay Retry switched on {len(retry_lines)}x: "
        + "; ".join(
            json.dumps({k: r.get(k) for k in r if k not in ("time", "level")})
            for r in retry_lines[:2]
        )
    )
    assert summary["sent"]["initial"] > 1000 and summary["sent"]["garbage"] > 10000, summary
    assert summary["replies"].get("retry", 0) > 0, "the relay never answered with Retry"
    assert not loop.failures, loop.failures
    assert loop.ok >= 20, loop.ok  # echoes flowed all along (each waits for the last)
    assert len(joined) == NEW_AGENTS
    assert not _disconnects(relay, agents, since), _disconnects(relay, agents, since)
    assert peak - baseline < RSS_GROWTH_MAX, f"relay grew {(peak - baseline) / 1024:.1f} MiB"
    assert after - baseline < RSS_RETURN_MAX, f"relay stayed +{(after - baseline) / 1024:.1f} MiB"


def _half_open(port: int, partial: bytes | None) -> socket.socket | None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.2", 0))
    try:
        sock.connect(("127.0.0.1", port))
        if partial is not None:
            sock.sendall(partial)
    except OSError:
        sock.close()
        return None
    return sock


def _closed_within(sock: socket.socket, limit: float) -> bool:
    sock.settimeout(limit)
    try:
        return sock.recv(4096) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_tcp_half_open_handshakes_are_bounded(cluster: Cluster, backends: Backends) -> None:
    tcp_port = free_tcp_port()
    relay = cluster.start_relay(args=["--listen-tcp", f"127.0.0.1:{tcp_port}"])
    echo = backends.echo()
    cluster.start_agent(cluster.pki.agent(0), relay, expose={"echo": echo.addr})
    count = 200
    hello = client_hello()
    partial = hello[: len(hello) // 2]
    socks: list[socket.socket] = []
    try:
        started = time.monotonic()
        for i in range(count):
            sock = _half_open(tcp_port, partial if i % 2 else None)
            if sock is not None:
                socks.append(sock)
        opened = time.monotonic()
        # Beyond the per-source cap: closed at once.
        closed_at_once = sum(_closed_within(s, 0.05) for s in socks)
        # A legitimate agent over TCP from 127.0.0.1 meanwhile.
        t0 = time.monotonic()
        consumer = cluster.start_agent(
            cluster.pki.agent(1),
            relay,
            consume=["echo"],
            args=["--transport", "tcp", "--relay-tcp", f"127.0.0.1:{tcp_port}"],
        )
        agent_secs = time.monotonic() - t0
        _one_echo(consumer.port("echo"))
        # The ones within the cap: closed at the handshake timeout.
        remaining = [s for s in socks if not _closed_within(s, 0.01)]
        closed_by_timeout = sum(
            _closed_within(s, max(0.1, HANDSHAKE_TIMEOUT + 3 - (time.monotonic() - opened)))
            for s in remaining
        )
        all_closed_after = time.monotonic() - started
        print(
            f"\n[tcp half-open] {len(socks)} sockets from 127.0.0.2 (half silent, half a partial "
            f"ClientHello): {closed_at_once} closed at once, {closed_by_timeout} of "
            f"{len(remaining)} closed by the {HANDSHAKE_TIMEOUT:g}s timeout, all within "
            f"{all_closed_after:.1f}s; TCP agent from 127.0.0.1 connected in {agent_secs:.2f}s"
        )
        assert len(remaining) <= MAX_TLS_HANDSHAKES_PER_SOURCE, len(remaining)
        assert closed_at_once >= len(socks) - MAX_TLS_HANDSHAKES_PER_SOURCE
        assert closed_by_timeout == len(remaining)
        assert consumer.find("session: connected"), consumer.tail()
    finally:
        for sock in socks:
            sock.close()
