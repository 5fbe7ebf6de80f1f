"""The TCP fallback listener under half-open TLS handshakes: timeout and caps.

Attackers connect from other loopback addresses (127.0.0.2, ...), so "one
source" is one IP address, and the legitimate client dials from 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from clienthello import client_hello

from outrelay.transport import BrokenResourceError
from outrelay.transport.tcp import TcpConn, connect_tcp

from .listeners import Listener, listen_tcp
from .tlspki import Pki

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 1.5
"""The server's handshake timeout in these tests."""


class Half:
    """One attacker socket: connected from ``source``, says nothing or part of a ClientHello."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.opened = time.monotonic()

    @classmethod
    async def open(cls, port: int, source: str, partial: bool = False) -> Half:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        if partial:
            hello = client_hello()
            writer.write(hello[: len(hello) // 2])
            await writer.drain()
        return cls(reader, writer)

    async def closed_after(self, limit: float) -> float | None:
        """Seconds from connect until the server closed us; None if still open after ``limit``."""
        try:
            async with asyncio.timeout(limit):
                data = await self.reader.read(65536)
        except TimeoutError:
            return None
        except ConnectionResetError:
            data = b""
        assert data == b"", data  # the server never answered with anything
        return time.monotonic() - self.opened

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def halves() -> AsyncIterator[list[Half]]:
    opened: list[Half] = []
    yield opened
    for half in opened:
        half.close()


async def _legit(pki: Pki, server: Listener[TcpConn]) -> None:
    client = await connect_tcp("127.0.0.1", server.port, pki.agent, handshake_timeout=5)
    peer = await server.accepted()
    assert peer.identity == pki.agent_uri
    client.close()


async def test_per_source_cap_closes_extra_sockets_at_once(pki: Pki, halves: list[Half]) -> None:
    server = await listen_tcp(pki, handshake_timeout=TIMEOUT, max_handshakes_per_source=4)
    port = server.port
    try:
        for i in range(4):
            halves.append(await Half.open(port, "127.0.0.2", partial=bool(i % 2)))
        extra = [await Half.open(port, "127.0.0.2") for _ in range(3)]
        halves.extend(extra)
        for half in extra:
            closed = await half.closed_after(1.0)
            assert closed is not None and closed < 1.0, "over the cap: closed at once"
        # Another source is not affected while 127.0.0.2 is at its cap.
        await _legit(pki, server)
        # The four in progress are closed at the handshake timeout...
        for half in halves[:4]:
            closed = await half.closed_after(TIMEOUT + 2)
            assert closed is not None and closed >= TIMEOUT - 0.2, closed
        # ...and then 127.0.0.2 may start handshakes again.
        again = await Half.open(port, "127.0.0.2")
        halves.append(again)
        assert await again.closed_after(0.5) is None
    finally:
        await server.close()


async def test_total_cap_across_sources(pki: Pki, halves: list[Half]) -> None:
    server = await listen_tcp(pki, handshake_timeout=TIMEOUT, max_handshakes=3)
    port = server.port
    try:
        for i in range(3):
            halves.append(await Half.open(port, f"127.0.0.{i + 2}"))
        extra = await Half.open(port, "127.0.0.9")
        halves.append(extra)
        closed = await extra.closed_after(1.0)
        assert closed is not None and closed < 1.0
        # Nothing else gets in until a slot frees: the legitimate client too
        # is closed at once (its reconnect loop would try again).
        with pytest.raises(BrokenResourceError):
            await _legit(pki, server)
        for half in halves[:3]:
            assert await half.closed_after(TIMEOUT + 2) is not None
        await _legit(pki, server)
    finally:
        await server.close()
