"""Issue 7 item 6, end to end: forward mode (mini-TURN) on 127.0.0.1.

    curl -TCP-> consumer =QUIC(orp/1)=> relay <=QUIC(orp/1)= provider -TCP-> backend
                    \\___ end-to-end QUIC (outrelay-fwd/1) over the relay's UDP plane ___/

A policy rule with ``relay_mode: forward`` makes the relay answer with
ALLOC_GRANTED (spec 02 §6.4); the agents run their own QUIC connection through
the plane, so the relay only ever forwards ciphertext. A tcpdump capture of
the plane's UDP port proves that the application's plaintext marker never
crosses it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from devpki import DevPki

from .harness import (
    Agent,
    Backends,
    Cluster,
    Relay,
    connect,
    free_udp_port,
    read_until_closed,
    write_policy,
)

pytestmark = pytest.mark.e2e

MARKER = b"OUTRELAY-PLAINTEXT-MARKER-7f3a9c"
BODY = b"".join(MARKER + b" line %06d\n" % i for i in range(4000))  # ~176 KiB
GREETING = b"220 " + MARKER + b" ESMTP server speaks first\r\n"

FORWARD_POLICY = [
    {
        "id": "web-forward",
        "caller": "outrelay://acme/*",
        "target": "*",
        "decision": "allow",
        "relay_mode": "forward",
    },
    {"id": "callee", "caller": "*", "target": "outrelay://acme/*", "decision": "allow"},
]


@dataclass
class ForwardStack:
    relay: Relay
    provider: Agent
    consumer: Agent
    plane_port: int
    http_port: int


@pytest.fixture
def forward_stack(
    cluster: Cluster, backends: Backends, tmp_path: Path, pki: DevPki
) -> ForwardStack:
    http = backends.http(BODY)

    def smtp_like(conn: socket.socket) -> None:
        conn.sendall(GREETING)  # before reading anything: server speaks first
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = conn.recv(4096)
            if not chunk:
                return
            data += chunk
        conn.sendall(b"250 got " + data)
        conn.shutdown(socket.SHUT_WR)

    smtp = backends.tcp(smtp_like, name="smtp")
    policy = write_policy(tmp_path / "policy.json", FORWARD_POLICY)
    plane_port = free_udp_port()
    relay = cluster.start_relay(policy=policy, args=["--listen-forward", f"127.0.0.1:{plane_port}"])
    provider = cluster.start_agent(
        pki.agent(0), relay, name="provider", expose={"web": http.addr, "smtp": smtp.addr}
    )
    consumer = cluster.start_agent(pki.agent(1), relay, name="consumer", consume=["web", "smtp"])
    http_port = int(http.addr.rpartition(":")[2])
    return ForwardStack(relay, provider, consumer, plane_port, http_port)


@contextlib.contextmanager
def capture(tmp_path: Path, name: str, bpf: list[str]) -> Iterator[Path]:
    """tcpdump on lo into ``<name>.pcap`` while the block runs."""
    tcpdump = shutil.which("tcpdump")
    if tcpdump is None or os.geteuid() != 0:
        pytest.skip("tcpdump (as root) is needed for the capture proof")
    pcap = tmp_path / f"{name}.pcap"
    err = tmp_path / f"{name}.err"
    with err.open("wb") as errf:
        proc = subprocess.Popen(
            [tcpdump, "-i", "lo", "-U", "-s", "0", "-w", str(pcap), *bpf],
            stdout=subprocess.DEVNULL,
            stderr=errf,
        )
    try:
        deadline = time.monotonic() + 10
        while b"listening on" not in err.read_bytes():
            assert proc.poll() is None, err.read_text()
            assert time.monotonic() < deadline, "tcpdump did not start"
            time.sleep(0.05)
        yield pcap
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture
def plane_capture(tmp_path: Path, forward_stack: ForwardStack) -> Iterator[Path]:
    """Every UDP datagram to or from the plane port."""
    with capture(tmp_path, "plane", ["udp", "port", str(forward_stack.plane_port)]) as pcap:
        yield pcap


@pytest.fixture
def backend_capture(tmp_path: Path, forward_stack: ForwardStack) -> Iterator[Path]:
    """Positive control: the provider-to-backend TCP leg, where plaintext is expected."""
    with capture(tmp_path, "backend", ["tcp", "port", str(forward_stack.http_port)]) as pcap:
        yield pcap


def curl(port: int) -> bytes:
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "20", f"http://127.0.0.1:{port}/"],
        capture_output=True,
        timeout=30,
        check=True,
    )
    return out.stdout


@pytest.mark.timeout(90)
def test_forward_mode_curl_and_server_first_only_ciphertext(
    forward_stack: ForwardStack, plane_capture: Path, backend_capture: Path
) -> None:
    fs = forward_stack
    started = time.monotonic()
    assert curl(fs.consumer.port("web")) == BODY
    first = time.monotonic() - started

    # Server speaks first: the greeting must arrive before we send a byte.
    with connect(fs.consumer.port("smtp"), timeout=15) as sock:
        greeting = b""
        while not greeting.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            assert chunk, "connection closed before the greeting"
            greeting += chunk
        assert greeting == GREETING
        sock.sendall(b"HELO outrelay\r\n")
        rest, how = read_until_closed(sock, 15)
    assert how == "eof", how
    assert rest == b"250 got HELO outrelay\r\n"

    for agent in (fs.consumer, fs.provider):
        recs = agent.wait_for("forward session", timeout=5)
        assert recs
    sessions = fs.consumer.find("forward session")
    assert {r["svc"] for r in sessions} == {"web", "smtp"}, sessions
    assert all(r.get("rtt_ms") not in (None, "?") for r in sessions), sessions
    assert not fs.consumer.find("bridging") and not fs.provider.find("bridging")

    # Both sessions end; each frees both of its allocations on the relay.
    deadline = time.monotonic() + 15
    while len(fs.relay.find("allocation reclaimed")) < 2:
        assert time.monotonic() < deadline, fs.relay.tail()
        time.sleep(0.1)
    reclaimed = fs.relay.find("allocation reclaimed")
    granted = fs.relay.find("forward session")
    assert len(granted) == 2, granted
    for rec in granted:
        assert rec["endpoint"] == f"127.0.0.1:{fs.plane_port}", rec
        pair = f"{rec['consumer_alloc']},{rec['provider_alloc']}"
        assert any(r["allocations"] == pair for r in reclaimed), (pair, reclaimed)

    time.sleep(0.5)  # let tcpdump write the last packets (-U)
    captured = plane_capture.read_bytes()
    # The capture saw the whole exchange (far more than the body)...
    assert len(captured) > len(BODY), len(captured)
    # ... and not one plaintext marker.
    assert MARKER not in captured
    assert MARKER[:12] not in captured
    # The same capture method does see the marker where it travels in clear.
    assert MARKER in backend_capture.read_bytes()
    print(f"forward: curl {len(BODY)} B in {first:.2f}s; plane capture {len(captured)} B")


@pytest.mark.timeout(60)
def test_forward_rule_without_plane_is_spliced(
    cluster: Cluster, backends: Backends, tmp_path: Path, pki: DevPki
) -> None:
    """No ``--listen-forward``: a forward rule falls back to splice (STREAM_READY)."""
    http = backends.http(BODY)
    policy = write_policy(tmp_path / "policy.json", FORWARD_POLICY)
    relay = cluster.start_relay(policy=policy)
    cluster.start_agent(pki.agent(0), relay, name="provider", expose={"web": http.addr})
    consumer = cluster.start_agent(pki.agent(1), relay, name="consumer", consume=["web"])
    assert curl(consumer.port("web")) == BODY
    assert not relay.find("forward session")
    assert not consumer.find("forward session")


@pytest.mark.timeout(60)
def test_app_closing_mid_stream_frees_both_allocations(
    cluster: Cluster, backends: Backends, tmp_path: Path, pki: DevPki
) -> None:
    """The application hangs up while the backend still talks: the session ends on both
    agents and the relay reclaims both allocations (spec 02 §6.4 step 6)."""
    ticker = backends.ticker(count=600, interval=0.05)
    policy = write_policy(tmp_path / "policy.json", FORWARD_POLICY)
    plane_port = free_udp_port()
    relay = cluster.start_relay(policy=policy, args=["--listen-forward", f"127.0.0.1:{plane_port}"])
    provider = cluster.start_agent(
        pki.agent(0), relay, name="provider", expose={"ticks": ticker.addr}
    )
    consumer = cluster.start_agent(pki.agent(1), relay, name="consumer", consume=["ticks"])
    with connect(consumer.port("ticks"), timeout=15) as sock:
        got = b""
        while got.count(b"\n") < 3:
            chunk = sock.recv(4096)
            assert chunk, "ticker closed early"
            got += chunk
        assert got.startswith(b"tick 0\n")
    granted = relay.wait_for("forward session", timeout=5)
    reclaimed = relay.wait_for("allocation reclaimed", timeout=15)
    assert reclaimed["allocations"] == f"{granted['consumer_alloc']},{granted['provider_alloc']}"
    assert reclaimed["stream_id"] == granted["stream_id"]
    provider.wait_for("forward session", timeout=5)
