"""Resilience (issue 4): streams survive relay restarts, failover and one-sided loss.

Real relay and agent processes on 127.0.0.1; the application is a pair of
threads on a plain TCP socket, the backend an echo server. "Nothing lost or
duplicated" is checked with sha256 over everything each side received.
"""

from __future__ import annotations

import signal
import socket
import time

import pytest
from quicbackends import QUIC_BACKEND_PARAMS

from .harness import Agent, Backends, Cluster, Relay, Transfer

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module", params=QUIC_BACKEND_PARAMS)
def quic_backend(request: pytest.FixtureRequest) -> str:
    """Every scenario here runs with the agents on each QUIC client backend."""
    return str(request.param)


MiB = 1 << 20


def _pair(
    cluster: Cluster, backends: Backends, relays: str | Relay, *extra: str
) -> tuple[int, Agent, Agent]:
    """An echo backend behind a provider, and a consumer; returns its port and both agents."""
    echo = backends.echo()
    provider = cluster.start_agent(
        cluster.pki.agent(0), relays, expose={"echo": echo.addr}, args=list(extra)
    )
    consumer = cluster.start_agent(cluster.pki.agent(1), relays, consume=["echo"], args=list(extra))
    return consumer.port("echo"), provider, consumer


def _resumed(*agents: Agent) -> int:
    return sum(len(agent.find("session: stream resumed")) for agent in agents)


def _restart(cluster: Cluster, relay: Relay, down: float = 2.0) -> Relay:
    relay.kill()
    time.sleep(down)
    return cluster.start_relay(port=relay.port, name="relay")


@pytest.mark.timeout(420)
def test_relay_killed_three_times_mid_transfer_loses_nothing(
    cluster: Cluster, backends: Backends
) -> None:
    relay = cluster.start_relay()
    port, *agents = _pair(cluster, backends, relay)
    transfer = Transfer(port, 100 * MiB)
    for fraction in (0.3, 0.5, 0.7):
        transfer.wait_received(fraction, timeout=120)
        relay = _restart(cluster, relay)
    transfer.wait(timeout=240)
    transfer.check_exact()
    # Both agents resumed the stream after each of the three restarts.
    assert _resumed(*agents) >= 6, cluster.log_tail(20)
    print(f"longest stall seen by the application: {transfer.longest_gap:.1f}s")


@pytest.mark.timeout(300)
def test_failover_to_the_next_relay_when_the_first_never_returns(
    cluster: Cluster, backends: Backends
) -> None:
    r1 = cluster.start_relay(name="r1")
    r2 = cluster.start_relay(name="r2")
    port, *agents = _pair(cluster, backends, f"{r1.addr},{r2.addr}")
    transfer = Transfer(port, 30 * MiB)
    transfer.wait_received(0.3, timeout=120)
    r1.kill()
    transfer.wait(timeout=240)
    transfer.check_exact()
    assert _resumed(*agents) >= 2
    assert r2.find("stream resumed"), cluster.log_tail(20)


@pytest.mark.timeout(300)
def test_one_agent_losing_its_connection_resumes_too(cluster: Cluster, backends: Backends) -> None:
    relay = cluster.start_relay()
    port, provider, consumer = _pair(cluster, backends, relay)
    transfer = Transfer(port, 20 * MiB, pace=0.01)
    transfer.wait_received(0.2, timeout=120)
    # Freeze the provider long enough for the relay to declare its connection
    # dead (silence > 6.5 s, checked every 3 s); the consumer's connection
    # stays up the whole time.
    provider.send_signal(signal.SIGSTOP)
    relay.wait_for("agent disconnected", uri=provider.uri, timeout=20)
    time.sleep(1)
    provider.send_signal(signal.SIGCONT)
    transfer.wait(timeout=240)
    transfer.check_exact()
    assert _resumed(provider, consumer) >= 2, cluster.log_tail(30)


@pytest.mark.timeout(300)
def test_relay_down_longer_than_the_window_closes_then_recovers(
    cluster: Cluster, backends: Backends
) -> None:
    relay = cluster.start_relay()
    port, _, _ = _pair(cluster, backends, relay, "--resume-window", "3")
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"hello")
    assert sock.recv(5) == b"hello"
    relay.kill()
    # Detection (~6.5 s) + the 3 s window: the application's connection is
    # closed (reset or EOF), never left hanging.
    sock.settimeout(40)
    started = time.monotonic()
    try:
        leftover = sock.recv(100)
    except ConnectionResetError:
        leftover = b""
    assert leftover == b""
    assert time.monotonic() - started < 40
    sock.close()
    # The agents keep retrying; once a relay is back, new connections work.
    cluster.start_relay(port=relay.port, name="relay")
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.settimeout(15)
                s.sendall(b"again")
                s.shutdown(socket.SHUT_WR)
                if s.recv(5) == b"again":
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, cluster.log_tail(30)
        time.sleep(1)
