"""The in-memory backend: the Stream contract of transport/base.py, without sockets.

What is particular to the in-memory pair: exact chunking, ``unsent_bytes``,
``break_`` as a lost connection, wake-ups of parked readers and writers. The
checks every backend shares (round trips, half-close, abort with its code, a
"clogged" stream whose sends block, Busy/Closed errors) are in
``test_stream_conformance.py``, after trio's ``check_two_way_stream``.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from outrelay.transport.base import (
    BrokenResourceError,
    BusyResourceError,
    ClosedResourceError,
)
from outrelay.transport.memory import MemoryStream, memory_stream_pair

pytestmark = pytest.mark.timeout(10)

STEP = 5.0  # generous asyncio bound for any one test body


async def _settle(rounds: int = 20) -> None:
    """Let every runnable task run a few times (no wall clock involved)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def _drain(stream: MemoryStream, max_bytes: int = 65536) -> bytes:
    """Read until EOF."""
    out = bytearray()
    while chunk := await stream.receive_some(max_bytes):
        out += chunk
    return bytes(out)


# -- round trip and FIN ------------------------------------------------------------------


async def test_round_trip_both_ways() -> None:
    a, b = memory_stream_pair(limit=64, stream_id=9)
    assert (a.stream_id, b.stream_id) == (9, 9)
    async with asyncio.timeout(STEP):
        await a.send_all(b"ping")
        assert await b.receive_some() == b"ping"
        await b.send_all(bytearray(b"pong"))
        assert await a.receive_some() == b"pong"
        await a.send_all(memoryview(b"view"))
        assert await b.receive_some() == b"view"


async def test_receive_some_respects_max_bytes() -> None:
    a, b = memory_stream_pair(limit=64)
    async with asyncio.timeout(STEP):
        await a.send_all(b"abcdefgh")
        assert await b.receive_some(3) == b"abc"
        assert await b.receive_some(3) == b"def"
        assert await b.receive_some(3) == b"gh"


async def test_large_transfer_through_small_limit_is_exact() -> None:
    rng = random.Random(1)
    payload = rng.randbytes(50_000)
    a, b = memory_stream_pair(limit=97)

    async def writer() -> None:
        view = memoryview(payload)
        while view:
            n = rng.randint(1, 3000)
            await a.send_all(view[:n])
            view = view[n:]
        await a.send_eof()

    async with asyncio.timeout(STEP), asyncio.TaskGroup() as tg:
        tg.create_task(writer())
        got = tg.create_task(_drain(b, 211))
    assert got.result() == payload


async def test_aclose_wakes_a_parked_local_reader() -> None:
    a, _b = memory_stream_pair()
    async with asyncio.timeout(STEP):
        reader = asyncio.create_task(a.receive_some())
        await _settle()
        assert not reader.done()
        await a.aclose()
        with pytest.raises(ClosedResourceError):
            await reader


async def test_peer_send_after_aclose_is_refused_like_stop_sending() -> None:
    a, b = memory_stream_pair(limit=16)
    await a.aclose()
    async with asyncio.timeout(0.3):
        with pytest.raises(BrokenResourceError):
            await b.send_all(b"x" * 100)


# -- backpressure ("clogged" stream) ------------------------------------------------------


async def test_send_all_blocks_until_peer_reads() -> None:
    a, b = memory_stream_pair(limit=10)
    async with asyncio.timeout(STEP):
        await a.send_all(b"0123456789")  # exactly the bound: does not wait
        assert a.unsent_bytes == 10
        sender = asyncio.create_task(a.send_all(b"abc"))
        await _settle()
        assert not sender.done(), "send_all must wait while the peer has not read"
        assert a.unsent_bytes == 10
        assert await b.receive_some(4) == b"0123"
        await sender  # room was made: it finishes
        assert await b.receive_some() == b"456789abc"


async def test_concurrent_writers_raise_busy() -> None:
    a, b = memory_stream_pair(limit=2)
    async with asyncio.timeout(STEP):
        first = asyncio.create_task(a.send_all(b"1234"))
        await _settle()
        with pytest.raises(BusyResourceError):
            await a.send_all(b"5")
        assert await b.receive_some() == b"12"
        await first
        assert await b.receive_some() == b"34"


# -- abort and break_ ---------------------------------------------------------------------


async def test_abort_is_broken_for_the_peer_and_closed_locally() -> None:
    a, b = memory_stream_pair()
    async with asyncio.timeout(STEP):
        await a.send_all(b"lost in flight")
        a.abort(7)
        a.abort()  # idempotent
        with pytest.raises(BrokenResourceError, match="code 7"):
            await b.receive_some()
        with pytest.raises(BrokenResourceError):
            await b.send_all(b"x")
        with pytest.raises(ClosedResourceError):
            await a.receive_some()
        with pytest.raises(ClosedResourceError):
            await a.send_all(b"x")
        await a.send_eof()  # raises nothing once closed


async def test_abort_wakes_parked_peer_reader_and_writer() -> None:
    a, b = memory_stream_pair(limit=3)
    async with asyncio.timeout(STEP):
        reader = asyncio.create_task(b.receive_some())
        writer = asyncio.create_task(b.send_all(b"too much"))
        await _settle()
        assert not reader.done() and not writer.done()
        a.abort()
        with pytest.raises(BrokenResourceError):
            await reader
        with pytest.raises(BrokenResourceError):
            await writer


async def test_break_fails_both_ends_in_both_directions() -> None:
    a, b = memory_stream_pair()
    async with asyncio.timeout(STEP):
        parked = asyncio.create_task(a.receive_some())
        await _settle()
        b.break_("relay died")
        with pytest.raises(BrokenResourceError, match="relay died"):
            await parked
        for end in (a, b):
            with pytest.raises(BrokenResourceError):
                await end.receive_some()
            with pytest.raises(BrokenResourceError):
                await end.send_all(b"x")
            await end.send_eof()  # raises nothing on a broken stream
            end.abort()  # local clean-up still works


async def test_break_still_hands_out_bytes_already_delivered() -> None:
    """Bytes that reached the receive buffer before the break stay readable."""
    a, b = memory_stream_pair()
    async with asyncio.timeout(STEP):
        await a.send_all(b"arrived")
        a.break_()
        assert await b.receive_some() == b"arrived"
        with pytest.raises(BrokenResourceError):
            await b.receive_some()
