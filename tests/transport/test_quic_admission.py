"""The QUIC listener in front of aioquic: Retry, caps, garbage and abandoned handshakes.

A real server (``serve_quic``) on 127.0.0.1; the attacker is a plain UDP
socket sending what aioquic's client would send first (or random bytes shaped
like an Initial) and never answering.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator, Callable

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from quicbackends import QUIC_BACKEND_PARAMS

from outrelay.transport import RetryMode
from outrelay.transport.admission import QuicAdmission
from outrelay.transport.quic import HANDSHAKE_TIMEOUT, QuicConn

from .listeners import Listener, dial_quic, listen_quic
from .tlspki import Pki

pytestmark = pytest.mark.timeout(60)


def client_initial(port: int, token: bytes = b"") -> bytes:
    """The first datagram of a real aioquic client (a padded Initial with a ClientHello)."""
    config = QuicConfiguration(is_client=True, alpn_protocols=["orp/1"], server_name="localhost")
    if token:
        config.token = token
    conn = QuicConnection(configuration=config)
    now = time.monotonic()
    conn.connect(("127.0.0.1", port), now=now)
    return conn.datagrams_to_send(now=now)[0][0]


def garbage_initial(size: int = 1200) -> bytes:
    """Random bytes behind a plausible QUIC v1 Initial header (DCID/SCID 8, no token)."""
    header = bytes([0xC3]) + (1).to_bytes(4, "big") + b"\x08" + os.urandom(8) + b"\x08"
    header += os.urandom(8) + b"\x00"  # token length 0
    rest = size - len(header) - 2
    return header + (0x4000 | rest).to_bytes(2, "big") + os.urandom(rest)


Server = Listener[QuicConn]


def live_cids(server: Server) -> int:
    """Connection IDs the listener routes: what it still holds."""
    return int(server.handle.statistics().routed_ids)


async def _serve(pki: Pki, admission: QuicAdmission) -> Server:
    return await listen_quic(pki, admission=admission)


@pytest.fixture
async def udp() -> AsyncIterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield sock
    sock.close()


async def _until(condition: Callable[[], bool], limit: float) -> None:
    """Poll ``condition`` (server state has no event to wait on) for ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"condition not met within {limit:g}s"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("backend", QUIC_BACKEND_PARAMS)
async def test_always_retry_clients_connect_after_proving_their_address(
    pki: Pki, backend: str
) -> None:
    server = await _serve(pki, QuicAdmission(RetryMode.ALWAYS))
    try:
        client = await dial_quic(backend, server.port, pki.agent)
        async with asyncio.timeout(5):
            conn = await server.conns.get()
        assert conn.identity == pki.agent_uri
        stats = server.handle.admission.stats
        assert stats["retry"] >= 1 and stats["admit"] == 1, stats
        await _until(lambda: server.handle.admission.half_open.total == 0, 2)
        # Idle after the handshake, nothing waits for an ACK: aioquic keeps the
        # Initial that the Retry answered in its bytes-in-flight counter, which
        # made keep-alive close such connections as silent.
        await _until(lambda: not client.awaiting_ack, 2)
        client.close()
    finally:
        server.handle.close()


async def test_garbage_initials_leave_no_state(pki: Pki, udp: socket.socket) -> None:
    server = await _serve(pki, QuicAdmission(RetryMode.NEVER))
    try:
        for _ in range(30):
            udp.sendto(garbage_initial(), ("127.0.0.1", server.port))
        await _until(lambda: sum(server.handle.admission.stats.values()) >= 30, 5)
        await asyncio.sleep(0.1)
        # Each was admitted (below the caps), failed to decrypt and was forgotten at once.
        assert server.handle.admission.stats["admit"] >= 1
        assert live_cids(server) == 0
        assert server.handle.admission.half_open.total == 0
    finally:
        server.handle.close()


async def test_small_and_unsupported_datagrams_cost_nothing(pki: Pki, udp: socket.socket) -> None:
    server = await _serve(pki, QuicAdmission(RetryMode.NEVER))
    try:
        addr = ("127.0.0.1", server.port)
        initial = client_initial(server.port)
        udp.sendto(initial[:1199], addr)  # too short to start a handshake
        udp.sendto(b"\x40" + os.urandom(1300), addr)  # short header, unknown CID
        udp.sendto(b"\xc0\x00\x00\x00\x00" + os.urandom(1300), addr)  # version 0
        await asyncio.sleep(0.3)
        assert sum(server.handle.admission.stats.values()) == 0
        assert live_cids(server) == 0
        udp.sendto(initial, addr)  # the same Initial, whole: admitted
        await _until(lambda: server.handle.admission.half_open.total == 1, 5)
    finally:
        server.handle.close()


async def test_unsupported_version_gets_a_rate_limited_version_negotiation(
    pki: Pki, udp: socket.socket
) -> None:
    server = await _serve(pki, QuicAdmission(RetryMode.NEVER, rate=1.0, burst=2.0))
    try:
        packet = bytearray(client_initial(server.port))
        packet[1:5] = (0x1A2A3A4A).to_bytes(4, "big")
        for _ in range(10):
            udp.sendto(bytes(packet), ("127.0.0.1", server.port))
        udp.settimeout(1.0)
        replies = 0
        await asyncio.sleep(0.3)
        udp.setblocking(False)
        while True:
            try:
                data = udp.recv(2048)
            except BlockingIOError:
                break
            assert data[1:5] == b"\x00\x00\x00\x00"  # Version Negotiation
            replies += 1
        assert replies == 2
        assert live_cids(server) == 0
    finally:
        server.handle.close()


async def test_a_token_is_always_checked_even_without_pressure(
    pki: Pki, udp: socket.socket
) -> None:
    server = await _serve(pki, QuicAdmission(RetryMode.AUTO))
    try:
        udp.sendto(client_initial(server.port, token=os.urandom(40)), ("127.0.0.1", server.port))
        await asyncio.sleep(0.3)
        assert not server.handle.admission.retry_active(time.monotonic())
        assert sum(server.handle.admission.stats.values()) == 0  # dropped at the token check
        assert live_cids(server) == 0
    finally:
        server.handle.close()


async def test_per_source_cap_then_retry_and_a_real_client_still_connects(
    pki: Pki, udp: socket.socket
) -> None:
    admission = QuicAdmission(RetryMode.AUTO, unvalidated_per_source=4)
    server = await _serve(pki, admission)
    try:
        for _ in range(20):
            udp.sendto(client_initial(server.port), ("127.0.0.1", server.port))
        await _until(lambda: sum(admission.stats.values()) >= 20, 5)
        assert admission.stats["admit"] == 4 and admission.stats["retry"] == 16
        assert admission.half_open.total == 4
        # Same host, under pressure: the client answers the Retry and gets in.
        client = await dial_quic("aioquic", server.port, pki.agent)
        async with asyncio.timeout(5):
            await server.conns.get()
        client.close()
    finally:
        server.handle.close()


async def test_abandoned_handshakes_are_freed_at_the_deadline(pki: Pki, udp: socket.socket) -> None:
    admission = QuicAdmission(RetryMode.NEVER, max_half_open_per_source=5)
    server = await _serve(pki, admission)
    try:
        for _ in range(12):
            udp.sendto(client_initial(server.port), ("127.0.0.1", server.port))
        await _until(lambda: sum(admission.stats.values()) >= 12, 5)
        assert admission.stats == {"admit": 5, "retry": 0, "drop": 7}
        assert admission.half_open.total == 5 and live_cids(server) > 0
        started = time.monotonic()
        await _until(lambda: admission.half_open.total == 0, HANDSHAKE_TIMEOUT + 2)
        await _until(lambda: live_cids(server) == 0, 1)
        elapsed = time.monotonic() - started
        print(f"\nabandoned handshakes freed after {elapsed:.1f}s (deadline {HANDSHAKE_TIMEOUT}s)")
    finally:
        server.handle.close()
