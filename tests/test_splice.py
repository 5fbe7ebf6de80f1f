"""splice(): the two copy loops of spec 02 §6.5, over in-memory streams.

Layout of every test::

    app_a <-> side_a ==splice== side_b <-> app_b

The test plays the applications (``app_a``, ``app_b``); ``splice`` owns
``side_a`` and ``side_b``.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from outrelay.orp import StreamEndCode, is_final
from outrelay.splice import SpliceResult, splice
from outrelay.transport.base import BrokenResourceError, ClosedResourceError, TransportError
from outrelay.transport.memory import MemoryStream, memory_stream_pair

pytestmark = pytest.mark.timeout(20)

STEP = 5.0


async def _settle(rounds: int = 30) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


async def _drain(stream: MemoryStream, max_bytes: int = 65536) -> bytes:
    out = bytearray()
    while chunk := await stream.receive_some(max_bytes):
        out += chunk
    return bytes(out)


async def _write(stream: MemoryStream, data: bytes, rng: random.Random, eof: bool = True) -> None:
    view = memoryview(data)
    while view:
        n = rng.randint(1, 4096)
        await stream.send_all(view[:n])
        view = view[n:]
    if eof:
        await stream.send_eof()


def _pairs(limit: int = 65536) -> tuple[MemoryStream, MemoryStream, MemoryStream, MemoryStream]:
    app_a, side_a = memory_stream_pair(limit)
    side_b, app_b = memory_stream_pair(limit)
    return app_a, side_a, side_b, app_b


# -- exact bytes both ways ------------------------------------------------------------------


async def _exchange(
    a_bytes: bytes, b_bytes: bytes, limit: int, buffer_size: int, seed: int
) -> tuple[bytes, bytes, SpliceResult]:
    rng = random.Random(seed)
    app_a, side_a, side_b, app_b = _pairs(limit)
    async with asyncio.timeout(STEP), asyncio.TaskGroup() as tg:
        job = tg.create_task(splice(side_a, side_b, buffer_size=buffer_size))
        tg.create_task(_write(app_a, a_bytes, rng))
        tg.create_task(_write(app_b, b_bytes, random.Random(seed + 1)))
        at_b = tg.create_task(_drain(app_b, rng.randint(1, 70000)))
        at_a = tg.create_task(_drain(app_a, rng.randint(1, 70000)))
    return at_b.result(), at_a.result(), job.result()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    a_len=st.integers(0, 40_000),
    b_len=st.integers(0, 40_000),
    limit=st.sampled_from([1, 7, 512, 65536]),
    buffer_size=st.sampled_from([1, 100, 4096, 65536]),
    seed=st.integers(0, 2**16),
)
def test_bytes_cross_exactly_both_ways(
    a_len: int, b_len: int, limit: int, buffer_size: int, seed: int
) -> None:
    if limit == 1 or buffer_size == 1:  # keep the byte-at-a-time cases small
        a_len, b_len = a_len % 3000, b_len % 3000
    rng = random.Random(seed)
    a_bytes, b_bytes = rng.randbytes(a_len), rng.randbytes(b_len)
    at_b, at_a, result = asyncio.run(_exchange(a_bytes, b_bytes, limit, buffer_size, seed))
    assert at_b == a_bytes
    assert at_a == b_bytes
    assert result.a_to_b.bytes == a_len and result.a_to_b.clean
    assert result.b_to_a.bytes == b_len and result.b_to_a.clean


# -- half-close, prefixes -------------------------------------------------------------------


async def test_half_close_propagates_while_other_direction_flows() -> None:
    app_a, side_a, side_b, app_b = _pairs(limit=64)
    async with asyncio.timeout(STEP):
        job = asyncio.create_task(splice(side_a, side_b))
        await app_a.send_all(b"request")
        await app_a.send_eof()
        assert await _drain(app_b) == b"request"  # FIN crossed the splice
        await _settle()
        assert not job.done(), "the splice ends only when both directions have"
        for i in range(50):  # b -> a keeps flowing after a's FIN (with backpressure)
            await app_b.send_all(b"%03d" % i)
        reply = asyncio.create_task(_drain(app_a))
        await app_b.send_eof()
        assert await reply == b"".join(b"%03d" % i for i in range(50))
        result = await job
    assert result.a_to_b.bytes == 7 and result.b_to_a.bytes == 150


async def test_prefixes_are_delivered_first() -> None:
    app_a, side_a, side_b, app_b = _pairs()
    async with asyncio.timeout(STEP):
        await app_a.send_all(b"-from-a")
        await app_a.send_eof()
        await app_b.send_all(b"-from-b")
        await app_b.send_eof()
        result = await splice(side_a, side_b, a_to_b_prefix=b"PA", b_to_a_prefix=b"PB")
        assert await _drain(app_b) == b"PA-from-a"
        assert await _drain(app_a) == b"PB-from-b"
    assert (result.a_to_b.bytes, result.b_to_a.bytes) == (9, 9)


async def test_prefix_is_sent_even_if_source_is_already_at_eof() -> None:
    app_a, side_a, side_b, app_b = _pairs()
    async with asyncio.timeout(STEP):
        await app_a.send_eof()
        await app_b.send_eof()
        await splice(side_a, side_b, a_to_b_prefix=b"leftover")
        assert await _drain(app_b) == b"leftover"
        assert await _drain(app_a) == b""


# -- errors ---------------------------------------------------------------------------------


async def test_source_error_becomes_fin_by_default() -> None:
    """Spec 02 §6.5: a reset is not propagated as a reset; it becomes a FIN."""
    app_a, side_a, side_b, app_b = _pairs()
    async with asyncio.timeout(STEP):
        job = asyncio.create_task(splice(side_a, side_b))
        await app_a.send_all(b"partial")
        assert await app_b.receive_some() == b"partial"
        app_a.abort()
        assert await app_b.receive_some() == b""  # a FIN, not an error
        await _settle()
        assert not job.done()
        # b -> a now fails on write (a is gone): that direction ends, the source is
        # not cancelled, and the splice is over.
        await app_b.send_all(b"into the void")
        result = await job
    assert isinstance(result.a_to_b.read_error, BrokenResourceError)
    assert result.a_to_b.write_error is None
    assert result.b_to_a.read_error is None
    assert isinstance(result.b_to_a.write_error, BrokenResourceError)


async def test_source_error_aborts_destination_with_the_flag() -> None:
    app_a, side_a, side_b, app_b = _pairs()
    async with asyncio.timeout(STEP):
        job = asyncio.create_task(splice(side_a, side_b, abort_b_on_a_error=True))
        await app_a.send_all(b"partial")
        assert await app_b.receive_some() == b"partial"
        app_a.abort()
        with pytest.raises(BrokenResourceError):
            await app_b.receive_some()
        result = await job  # aborting b also ends b -> a: nothing hangs
    assert isinstance(result.a_to_b.read_error, BrokenResourceError)
    assert not result.b_to_a.clean


async def test_abort_flag_for_the_other_direction() -> None:
    app_a, side_a, side_b, app_b = _pairs()
    async with asyncio.timeout(STEP):
        job = asyncio.create_task(splice(side_a, side_b, abort_a_on_b_error=True))
        app_b.abort()
        with pytest.raises(BrokenResourceError):
            await app_a.receive_some()
        result = await job
    assert isinstance(result.b_to_a.read_error, BrokenResourceError)


async def test_a_final_code_passes_through_and_ends_both_directions() -> None:
    """Our close semantics (orp.extensions): an application's close is passed on with
    its code, and the splice ends at once in both directions."""
    app_a, side_a, side_b, app_b = _pairs()

    def passthrough(exc: TransportError) -> int:
        code = exc.code if isinstance(exc, BrokenResourceError) else None
        return code if is_final(code) else 0

    async with asyncio.timeout(STEP):
        job = asyncio.create_task(
            splice(
                side_a,
                side_b,
                abort_a_on_b_error=passthrough,
                abort_b_on_a_error=passthrough,
                abort_source_on_write_error=True,
            )
        )
        await app_b.send_all(b"download")
        assert await app_a.receive_some() == b"download"
        app_a.abort(StreamEndCode.APPLICATION_CLOSED)
        with pytest.raises(BrokenResourceError) as reset:
            await app_b.receive_some()
        assert reset.value.code == StreamEndCode.APPLICATION_CLOSED
        with pytest.raises(BrokenResourceError) as stopped:
            await app_b.send_all(b"more")
        assert stopped.value.code == StreamEndCode.APPLICATION_CLOSED
        await job


async def test_a_link_code_resets_with_zero() -> None:
    app_a, side_a, side_b, app_b = _pairs()
    async with asyncio.timeout(STEP):
        job = asyncio.create_task(
            splice(side_a, side_b, abort_b_on_a_error=lambda exc: 0, abort_a_on_b_error=True)
        )
        app_a.abort(7)
        with pytest.raises(BrokenResourceError) as reset:
            await app_b.receive_some()
        assert reset.value.code == 0
        await job


async def test_clean_eof_never_aborts_even_with_the_flags() -> None:
    app_a, side_a, side_b, app_b = _pairs()
    async with asyncio.timeout(STEP):
        job = asyncio.create_task(
            splice(side_a, side_b, abort_a_on_b_error=True, abort_b_on_a_error=True)
        )
        await app_a.send_all(b"a")
        await app_a.send_eof()
        await app_b.send_all(b"b")
        await app_b.send_eof()
        assert await _drain(app_b) == b"a"
        assert await _drain(app_a) == b"b"
        result = await job
    assert result.a_to_b.clean and result.b_to_a.clean


async def test_both_streams_are_closed_at_the_end() -> None:
    app_a, side_a, side_b, app_b = _pairs()
    async with asyncio.timeout(STEP):
        await app_a.send_eof()
        await app_b.send_eof()
        await splice(side_a, side_b)
        for side in (side_a, side_b):
            with pytest.raises(ClosedResourceError):
                await side.receive_some()
            with pytest.raises(ClosedResourceError):
                await side.send_all(b"x")
        assert await app_a.receive_some() == b""
        assert await app_b.receive_some() == b""


async def test_cancellation_aborts_both_streams() -> None:
    app_a, side_a, side_b, app_b = _pairs()
    async with asyncio.timeout(STEP):
        job = asyncio.create_task(splice(side_a, side_b))
        await app_a.send_all(b"x")
        assert await app_b.receive_some() == b"x"
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        for app in (app_a, app_b):
            with pytest.raises(BrokenResourceError):
                await app.receive_some()
            with pytest.raises(BrokenResourceError):
                await app.send_all(b"y")
