"""Arbitrary bytes give frames or a RemoteProtocolError, nothing else (STYLE §4; h11 fuzz).

Every exception other than RemoteProtocolError escaping the decoder or decode_message is a
bug. The buffer never holds more than what was fed and not yet returned as a frame.
"""

from __future__ import annotations

import contextlib
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from outrelay.orp import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    MESSAGE_TYPES,
    Frame,
    FrameDecoder,
    FrameType,
    MalformedPayload,
    Message,
    RemoteProtocolError,
    UnexpectedEOF,
    decode_frame,
    decode_message,
)

from .golden import GOLDEN
from .strategies import cut_points, split

_small_frame = st.builds(
    lambda word, flags, length, body: struct.pack(">HHI", word, flags, length) + body,
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.integers(0, 40),
    st.binary(max_size=48),
)
_huge_header = st.builds(
    lambda word, length: struct.pack(">HHI", word, 0, length),
    st.integers(0, 0xFFFF),
    st.integers(MAX_PAYLOAD - 2, 2**32 - 1),
)
soup_chunks = st.one_of(
    st.binary(max_size=24),
    _small_frame,
    _small_frame,
    st.sampled_from([v.wire for v in GOLDEN]),
    _huge_header,
)


def _check_frame(frame: Frame) -> None:
    assert 0 <= frame.type <= 0x7FF
    assert 0 <= frame.version <= 7
    assert 0 <= frame.flags <= 0xFFFF
    assert len(frame.payload) <= MAX_PAYLOAD
    if frame.type in MESSAGE_TYPES:
        with contextlib.suppress(MalformedPayload):
            assert isinstance(decode_message(frame), Message)


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(soup_chunks, max_size=10), data=st.data(), eof=st.booleans())
def test_byte_soup(chunks: list[bytes], data: st.DataObject, eof: bool) -> None:
    soup = b"".join(chunks)
    decoder = FrameDecoder()
    fed = consumed = 0
    failed = False
    for piece in split(soup, data.draw(cut_points(len(soup)))):
        decoder.receive_data(piece)
        fed += len(piece)
        try:
            while (frame := decoder.next_frame()) is not None:
                _check_frame(frame)
                consumed += HEADER_SIZE + len(frame.payload)
        except RemoteProtocolError:
            failed = True
            break
        # Nothing is held beyond what was fed and not returned; the bytearray (including
        # the already-returned prefix awaiting compaction) is at most twice that.
        assert decoder.buffered == fed - consumed
        assert len(decoder._buf) <= 2 * decoder.buffered
    if failed:
        assert decoder.buffered == 0
        try:
            decoder.next_frame()
        except RemoteProtocolError:
            pass
        else:
            raise AssertionError("a failed decoder must stay failed")
        return
    if eof:
        decoder.receive_eof()
        try:
            while (frame := decoder.next_frame()) is not None:
                _check_frame(frame)
                consumed += HEADER_SIZE + len(frame.payload)
        except UnexpectedEOF:
            assert fed > consumed
        else:
            assert decoder.at_eof
            assert fed == consumed
    else:
        assert decoder.trailing_data() == soup[consumed:]


@settings(max_examples=200, deadline=None)
@given(data=st.one_of(st.binary(max_size=64), soup_chunks))
def test_decode_frame_soup(data: bytes) -> None:
    try:
        frame, rest = decode_frame(data)
    except RemoteProtocolError:
        return
    _check_frame(frame)
    assert HEADER_SIZE + len(frame.payload) + len(rest) == len(data)
    assert data.endswith(rest)


@settings(max_examples=300, deadline=None)
@given(
    frame_type=st.one_of(st.sampled_from(list(FrameType)), st.integers(0, 0x7FF)),
    payload=st.binary(max_size=64),
)
def test_decode_message_soup(frame_type: int, payload: bytes) -> None:
    try:
        message = decode_message(Frame(frame_type, payload))
    except MalformedPayload:
        return
    assert type(message) is MESSAGE_TYPES[frame_type]  # type: ignore[index]
