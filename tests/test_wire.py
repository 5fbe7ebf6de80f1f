"""wire.py: FrameReader, ControlChannel and expect_message over in-memory streams.

As STYLE.md §4 asks of every decoder, FrameReader is fed its input whole, byte by
byte and with trailing bytes; the surplus after the last frame must come back
exactly once, from ``take_leftover`` or from the stream itself.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outrelay.orp import (
    Frame,
    FrameTooLarge,
    FrameType,
    MalformedPayload,
    StreamCheckpoint,
    StreamReject,
    UnexpectedEOF,
    encode_frame,
    encode_message,
)
from outrelay.transport.base import BrokenResourceError, Stream
from outrelay.transport.memory import MemoryStream, memory_stream_pair
from outrelay.wire import ControlChannel, FrameReader, expect_message, frame_name

pytestmark = pytest.mark.timeout(20)

STEP = 5.0


class CannedStream(Stream):
    """Hands out pre-cut chunks, then EOF (httpcore ``_backends/mock.py``)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.stream_id = 0
        self._chunks = [c for c in chunks if c]
        self.reads = 0

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        self.reads += 1
        if not self._chunks:
            return b""
        chunk = self._chunks[0]
        self._chunks[0] = chunk[max_bytes:]
        if not self._chunks[0]:
            del self._chunks[0]
        return chunk[:max_bytes]

    def rest(self) -> bytes:
        return b"".join(self._chunks)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError

    async def send_eof(self) -> None:
        raise NotImplementedError

    def abort(self, error_code: int = 0) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError

    @property
    def unsent_bytes(self) -> int:
        return 0


def _sample_frames() -> list[Frame]:
    return [
        Frame(FrameType.STREAM_REJECT, StreamReject(code=404, reason="nope").SerializeToString()),
        Frame(FrameType.PING),
        Frame(0x7AB, b"unknown type, kept raw"),
        Frame(FrameType.STREAM_CHECKPOINT, b"\x08\x01" * 500),
    ]


def _encode(frames: list[Frame]) -> bytes:
    return b"".join(encode_frame(f.type, f.payload) for f in frames)


async def _drain(stream: MemoryStream) -> bytes:
    out = bytearray()
    while chunk := await stream.receive_some():
        out += chunk
    return bytes(out)


# -- FrameReader ------------------------------------------------------------------------------


async def test_frames_and_trailing_bytes_in_one_chunk() -> None:
    frames = _sample_frames()
    trailing = b"GET / HTTP/1.1\r\n\r\n"
    a, b = memory_stream_pair(limit=1 << 20)
    await a.send_all(_encode(frames) + trailing)  # one chunk, no FIN yet
    reader = FrameReader(b)
    async with asyncio.timeout(STEP):
        got = [await reader.read_frame() for _ in frames]
    assert got == frames
    assert reader.take_leftover() == trailing
    assert reader.take_leftover() == b""  # handed out exactly once
    assert not reader.at_eof


async def test_frames_and_trailing_bytes_byte_by_byte() -> None:
    frames = _sample_frames()
    trailing = b"splice bytes after the last frame"
    a, b = memory_stream_pair(limit=1)  # every receive_some sees at most one byte

    async def writer() -> None:
        await a.send_all(_encode(frames) + trailing)
        await a.send_eof()

    reader = FrameReader(b)
    async with asyncio.timeout(STEP), asyncio.TaskGroup() as tg:
        tg.create_task(writer())
        got = [await reader.read_frame() for _ in frames]
        # The reader stops at the frame boundary: whatever it buffered past it comes
        # from take_leftover, the rest is still in the stream. Together: the surplus.
        leftover = reader.take_leftover()
        rest = await _drain(b)
    assert got == frames
    assert leftover + rest == trailing


@settings(max_examples=60, deadline=None)
@given(
    frames=st.lists(
        st.builds(
            Frame,
            type=st.sampled_from([*FrameType, 0x7FF, 0x200]),
            payload=st.binary(max_size=300),
        ),
        max_size=6,
    ),
    trailing=st.binary(max_size=100),
    cuts=st.lists(st.integers(0, 2000), max_size=12),
)
def test_frames_survive_any_chunking(frames: list[Frame], trailing: bytes, cuts: list[int]) -> None:
    wire = _encode(frames) + trailing
    points = sorted({c % (len(wire) + 1) for c in cuts})
    chunks = [wire[i:j] for i, j in zip([0, *points], [*points, len(wire)], strict=True)]
    stream = CannedStream(chunks)
    reader = FrameReader(stream)

    async def run() -> list[Frame | None]:
        return [await reader.read_frame() for _ in frames]

    assert asyncio.run(run()) == frames
    assert reader.take_leftover() + stream.rest() == trailing


async def test_eof_at_a_frame_boundary_gives_none_repeatedly() -> None:
    a, b = memory_stream_pair()
    await a.send_all(encode_frame(FrameType.PING))
    await a.send_eof()
    reader = FrameReader(b)
    async with asyncio.timeout(STEP):
        frame = await reader.read_frame()
        assert frame is not None and frame.type == FrameType.PING
        assert not reader.at_eof
        assert await reader.read_frame() is None
        assert reader.at_eof
        assert await reader.read_frame() is None
    assert reader.take_leftover() == b""


async def test_eof_on_an_empty_stream_gives_none() -> None:
    stream = CannedStream([])
    reader = FrameReader(stream)
    assert await reader.read_frame() is None
    assert await reader.read_frame() is None
    assert stream.reads == 1  # EOF is remembered, the stream is not read again


@pytest.mark.parametrize("cut", [1, 7, 8, 11])
async def test_eof_inside_a_frame_is_a_protocol_error(cut: int) -> None:
    wire = encode_frame(FrameType.STREAM_CHECKPOINT, b"\x08\x05\x10\x06")
    reader = FrameReader(CannedStream([wire[:cut]]))
    with pytest.raises(UnexpectedEOF):
        await reader.read_frame()


async def test_oversize_header_is_rejected_before_the_payload() -> None:
    header = bytes([0x20, 0x01]) + b"\x00\x00" + (1 << 24 | 1).to_bytes(4, "big")
    reader = FrameReader(CannedStream([header]))
    with pytest.raises(FrameTooLarge):
        await reader.read_frame()


async def test_broken_stream_propagates_from_read_frame() -> None:
    a, b = memory_stream_pair()
    await a.send_all(encode_frame(FrameType.PING)[:3])
    reader = FrameReader(b)
    async with asyncio.timeout(STEP):
        pending = asyncio.create_task(reader.read_frame())
        for _ in range(10):
            await asyncio.sleep(0)
        assert not pending.done()
        a.abort()
        with pytest.raises(BrokenResourceError):
            await pending


# -- expect_message / frame_name ----------------------------------------------------------------


def test_expect_message_decodes_the_expected_type() -> None:
    frame = Frame(FrameType.STREAM_REJECT, StreamReject(code=403, reason="x").SerializeToString())
    message = expect_message(frame, FrameType.STREAM_REJECT, StreamReject)
    assert (message.code, message.reason) == (403, "x")


def test_expect_message_rejects_another_type() -> None:
    frame = Frame(FrameType.PING)
    with pytest.raises(MalformedPayload, match="expected STREAM_REJECT, got PING"):
        expect_message(frame, FrameType.STREAM_REJECT, StreamReject)


def test_expect_message_rejects_an_undecodable_payload() -> None:
    frame = Frame(FrameType.STREAM_REJECT, b"\xff\xff\xff")
    with pytest.raises(MalformedPayload):
        expect_message(frame, FrameType.STREAM_REJECT, StreamReject)


def test_frame_name() -> None:
    assert frame_name(FrameType.HELLO) == "HELLO"
    assert frame_name(0x7AB) == "0x7ab"


# -- ControlChannel ---------------------------------------------------------------------------


async def test_control_channel_never_interleaves_frames() -> None:
    """Many concurrent large frames through a 1 KiB pipe: each arrives whole."""
    rng = random.Random(3)
    a, b = memory_stream_pair(limit=1024)
    channel = ControlChannel(a, write_timeout=STEP)
    sizes = [rng.randint(2_000, 40_000) for _ in range(40)]

    async def sender(i: int) -> None:
        if i % 2:
            await asyncio.sleep(0)  # vary the order the senders reach the lock
        if i % 3 == 0:  # the typed path too
            await channel.send(
                FrameType.STREAM_CHECKPOINT,
                StreamCheckpoint(stream_id=i + 1, my_position=sizes[i], peer_ack_position=i),
            )
        else:
            await channel.send_raw(encode_frame(0x7AB, bytes([i]) * sizes[i]))

    received: list[Frame] = []

    async def receiver() -> None:
        reader = FrameReader(b)
        while (frame := await reader.read_frame()) is not None:
            received.append(frame)

    async with asyncio.timeout(STEP), asyncio.TaskGroup() as tg:
        tg.create_task(receiver())
        async with asyncio.TaskGroup() as senders:
            for i in range(len(sizes)):
                senders.create_task(sender(i))
        await a.send_eof()

    assert len(received) == len(sizes)
    seen: set[int] = set()
    for frame in received:
        if frame.type == FrameType.STREAM_CHECKPOINT:
            msg = expect_message(frame, FrameType.STREAM_CHECKPOINT, StreamCheckpoint)
            i = msg.stream_id - 1
            assert (msg.my_position, msg.peer_ack_position) == (sizes[i], i)
        else:
            assert frame.type == 0x7AB
            i = frame.payload[0]
            assert frame.payload == bytes([i]) * sizes[i], "frame bytes interleaved"
        seen.add(i)
    assert seen == set(range(len(sizes)))


async def test_control_channel_write_stall_becomes_broken() -> None:
    a, _b = memory_stream_pair(limit=16)  # nobody reads the other end
    channel = ControlChannel(a, write_timeout=0.05)
    async with asyncio.timeout(STEP):
        first = asyncio.create_task(channel.send_raw(b"x" * 100))
        queued = asyncio.create_task(channel.send(FrameType.PING))
        with pytest.raises(BrokenResourceError, match="stalled"):
            await first
        with pytest.raises(BrokenResourceError, match="stalled"):
            await queued  # waiting for the lock counts against the timeout too


async def test_control_channel_send_encodes_one_frame() -> None:
    a, b = memory_stream_pair()
    channel = ControlChannel(a)
    await channel.send(FrameType.STREAM_REJECT, StreamReject(code=404, reason="service not found"))
    await channel.send(FrameType.PONG)
    await a.send_eof()
    async with asyncio.timeout(STEP):
        data = await _drain(b)
    assert data == (
        encode_message(FrameType.STREAM_REJECT, StreamReject(code=404, reason="service not found"))
        + encode_frame(FrameType.PONG)
    )
