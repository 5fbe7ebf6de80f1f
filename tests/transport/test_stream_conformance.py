"""One conformance suite for every Stream backend, after trio's ``check_two_way_stream``.

trio's ``src/trio/testing/_check_streams.py`` runs the same checks over every
stream type, with a "clogged" variant that proves sends block (STYLE.md §4).
Here the same checks run over the in-memory pair, QUIC (aioquic, and qh3
when installed) and TLS + yamux over TCP: round trips, half-close, abort with
its error code, backpressure, Busy/Closed errors and many streams at once.
Backend-specific behaviour (limits, statistics) stays in ``test_memory.py``,
``test_quic.py`` and ``test_tcp.py``; certificates are ``test_mtls.py``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from quicbackends import QUIC_BACKEND_PARAMS

from outrelay.transport import (
    BrokenResourceError,
    BusyResourceError,
    ClosedResourceError,
    Connection,
    SendClosedError,
    Stream,
    connect_tcp,
)
from outrelay.transport.memory import memory_stream_pair

from .listeners import Listener, dial_quic, listen_quic, listen_tcp, read_all
from .tlspki import Pki

pytestmark = pytest.mark.timeout(60)

MakePair = Callable[[], Awaitable[tuple[Stream, Stream]]]

CLOG = 8 << 20
"""More than any backend buffers for one unread stream (memory 64 KiB, QUIC
window + send buffer 2 MiB, qh3 up to two windows more, yamux 256 KiB plus
socket buffers): a send this large must block until the peer reads."""


@contextlib.asynccontextmanager
async def _connected(pki: Pki, backend: str) -> AsyncIterator[tuple[Connection, Connection]]:
    if backend == "tcp":
        listener: Listener[Any] = await listen_tcp(pki)
        client: Connection = await connect_tcp("127.0.0.1", listener.port, pki.agent)
    else:
        listener = await listen_quic(pki)
        client = await dial_quic(backend, listener.port, pki.agent)
    try:
        yield client, await listener.accepted()
    finally:
        client.close()
        listener.handle.close()


@pytest.fixture(
    params=[
        "memory",
        *QUIC_BACKEND_PARAMS,
        "tcp",
    ]
)
async def make_pair(request: pytest.FixtureRequest, pki: Pki) -> AsyncIterator[MakePair]:
    """``await make_pair()`` -> two connected streams (client end, server end)."""
    backend: str = request.param
    if backend == "memory":

        async def memory() -> tuple[Stream, Stream]:
            return memory_stream_pair(limit=65536)

        yield memory
        return
    async with _connected(pki, backend) as (client, peer):

        async def over_connection() -> tuple[Stream, Stream]:
            a = await client.open_stream()
            await a.send_all(b"!")  # QUIC peers see a stream with its first byte
            b = await peer.accept_stream()
            assert await b.receive_some(1) == b"!"
            return a, b

        yield over_connection


async def _read_exactly(stream: Stream, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = await stream.receive_some(65536)
        assert chunk, "EOF before all bytes arrived"
        got += chunk
    return bytes(got)


async def test_round_trip_both_ways_and_max_bytes(make_pair: MakePair) -> None:
    a, b = await make_pair()
    async with asyncio.timeout(10):
        await a.send_all(b"ping")
        assert await b.receive_some() == b"ping"
        await b.send_all(bytearray(b"pong"))
        assert await a.receive_some() == b"pong"
        await a.send_all(memoryview(b"view"))
        got = b""
        while len(got) < 4:
            chunk = await b.receive_some(2)
            assert 1 <= len(chunk) <= 2
            got += chunk
        assert got == b"view"


async def test_half_close_keeps_the_other_direction(make_pair: MakePair) -> None:
    a, b = await make_pair()
    async with asyncio.timeout(10):
        await a.send_all(b"request")
        await a.send_eof()
        await a.send_eof()  # idempotent
        with pytest.raises(SendClosedError):
            await a.send_all(b"more")
        assert await read_all(b) == b"request"
        assert await b.receive_some() == b""  # EOF stays EOF
        await b.send_all(b"response")
        await b.send_eof()
        assert await read_all(a) == b"response"


async def test_large_transfer_both_ways_is_exact(make_pair: MakePair) -> None:
    a, b = await make_pair()
    up, down = os.urandom(3 << 20), os.urandom(3 << 20)

    async def write(stream: Stream, data: bytes) -> None:
        await stream.send_all(data)
        await stream.send_eof()

    async with asyncio.timeout(30), asyncio.TaskGroup() as tg:
        tg.create_task(write(a, up))
        tg.create_task(write(b, down))
        got_up = tg.create_task(read_all(b))
        got_down = tg.create_task(read_all(a, 1000))
    assert got_up.result() == up
    assert got_down.result() == down


async def test_abort_is_broken_for_the_peer_with_its_code(make_pair: MakePair) -> None:
    a, b = await make_pair()
    async with asyncio.timeout(10):
        await a.send_all(b"data")
        assert await b.receive_some() == b"data"
        a.abort(7)
        a.abort(7)  # idempotent
        with pytest.raises(BrokenResourceError) as info:
            await b.receive_some()
        assert info.value.code == 7
        with pytest.raises(ClosedResourceError):
            await a.send_all(b"more")
        with pytest.raises(ClosedResourceError):
            await a.receive_some()
        # The peer's writes fail too, once it has heard (QUIC: STOP_SENDING).
        with pytest.raises(BrokenResourceError):
            while True:
                await b.send_all(b"late")
                await asyncio.sleep(0.01)


async def test_aclose_sends_eof_and_closes_locally(make_pair: MakePair) -> None:
    a, b = await make_pair()
    async with asyncio.timeout(10):
        await a.send_all(b"last")
        await a.aclose()
        await a.aclose()  # idempotent
        with pytest.raises(ClosedResourceError):
            await a.receive_some()
        with pytest.raises(ClosedResourceError):
            await a.send_all(b"x")
        assert await read_all(b) == b"last"


async def test_clogged_send_blocks_until_the_peer_reads(make_pair: MakePair) -> None:
    a, b = await make_pair()
    data = os.urandom(CLOG)
    writer = asyncio.create_task(a.send_all(data))
    try:
        await asyncio.sleep(0.5)
        assert not writer.done(), "send_all finished although nobody read"
        # A second writer on the same stream is a bug: Busy, not a second queue.
        with pytest.raises(BusyResourceError):
            await a.send_all(b"x")
        # The other direction is independent of the clogged one.
        async with asyncio.timeout(10):
            await b.send_all(b"reverse")
            assert await a.receive_some() == b"reverse"
        got = bytearray()
        async with asyncio.timeout(30):
            while len(got) < len(data):
                got += await b.receive_some()
            await writer
        assert bytes(got) == data
    finally:
        writer.cancel()
        with contextlib.suppress(BaseException):
            await writer


async def test_wait_send_buffer_empty_returns_once_the_peer_has_everything(
    make_pair: MakePair,
) -> None:
    a, b = await make_pair()
    data = os.urandom(512 << 10)
    async with asyncio.timeout(20):
        reader = asyncio.create_task(_read_exactly(b, len(data)))
        await a.send_all(data)
        await a.wait_send_buffer_empty()
        assert a.unsent_bytes == 0
        assert await reader == data
        await a.wait_send_buffer_empty()  # nothing pending: returns at once


async def test_concurrent_readers_raise_busy(make_pair: MakePair) -> None:
    a, b = await make_pair()
    reader = asyncio.create_task(b.receive_some())
    await asyncio.sleep(0.05)
    with pytest.raises(BusyResourceError):
        await b.receive_some()
    async with asyncio.timeout(10):
        await a.send_all(b"wake")
        assert await reader == b"wake"


async def test_many_streams_at_once(make_pair: MakePair) -> None:
    async def echo(stream: Stream) -> None:
        while chunk := await stream.receive_some():
            await stream.send_all(chunk)
        await stream.send_eof()

    async def one(i: int) -> None:
        a, b = await make_pair()
        data = bytes([i]) * (100_000 + i)

        async def write() -> None:
            await a.send_all(data)
            await a.send_eof()

        async with asyncio.TaskGroup() as tg:
            tg.create_task(echo(b))
            tg.create_task(write())
            result = tg.create_task(read_all(a))
        assert result.result() == data

    async with asyncio.timeout(30), asyncio.TaskGroup() as tg:
        for i in range(40):
            tg.create_task(one(i))
