"""Frame codec: encoder refusals, the incremental decoder, limits and EOF (spec 01)."""

from __future__ import annotations

import itertools
import random
import struct
import sys
import time

import pytest

from outrelay.orp import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    Frame,
    FrameDecoder,
    FrameTooLarge,
    FrameType,
    LocalProtocolError,
    OrpError,
    RemoteProtocolError,
    UnexpectedEOF,
    decode_frame,
    encode_frame,
)

from .golden import ALL_WIRE, GOLDEN

SPLICE_BYTES = b"\x00first bytes of the splice\xff" * 3


def header(word: int, flags: int, length: int) -> bytes:
    return struct.pack(">HHI", word, flags, length)


def drain(decoder: FrameDecoder) -> list[Frame]:
    frames: list[Frame] = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    return frames


def feed_in_chunks(
    data: bytes, cuts: list[int], want: int | None = None
) -> tuple[list[Frame], FrameDecoder]:
    """Feed ``data`` cut at ``cuts``, taking frames after every chunk.

    Stops asking for frames once ``want`` frames arrived: what follows is splice data,
    which the caller must not try to parse.
    """
    decoder = FrameDecoder()
    frames: list[Frame] = []
    bounds = [0, *sorted(cuts), len(data)]
    for start, end in itertools.pairwise(bounds):
        decoder.receive_data(data[start:end])
        while want is None or len(frames) < want:
            frame = decoder.next_frame()
            if frame is None:
                break
            frames.append(frame)
    return frames, decoder


EXPECTED = [decode_frame(v.wire)[0] for v in GOLDEN]


# --- encoder ------------------------------------------------------------------------------


def test_encode_header_layout() -> None:
    wire = encode_frame(0x7AB, b"xyz", version=5, flags=0xBEEF)
    assert wire == header((5 << 13) | 0x7AB, 0xBEEF, 3) + b"xyz"


def test_encode_accepts_bytes_like_payloads() -> None:
    expected = encode_frame(FrameType.PING, b"abc")
    assert encode_frame(FrameType.PING, bytearray(b"abc")) == expected
    assert encode_frame(FrameType.PING, memoryview(b"abc")) == expected


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"frame_type": 1, "version": 8}, "version"),
        ({"frame_type": 1, "version": -1}, "version"),
        ({"frame_type": 0x800}, "type"),
        ({"frame_type": -1}, "type"),
        ({"frame_type": 1, "flags": 0x10000}, "flags"),
        ({"frame_type": 1, "flags": -1}, "flags"),
    ],
)
def test_encode_refuses_out_of_range_header_fields(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match) as info:
        encode_frame(**kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, OrpError)


def test_encode_limits_inclusive() -> None:
    assert len(encode_frame(0x7FF, version=7, flags=0xFFFF)) == HEADER_SIZE
    big = bytes(MAX_PAYLOAD)
    assert len(encode_frame(FrameType.STREAM_DATA, big)) == HEADER_SIZE + MAX_PAYLOAD
    with pytest.raises(LocalProtocolError, match="MAX_PAYLOAD"):
        encode_frame(FrameType.STREAM_DATA, big + b"\x00")


def test_max_payload_value() -> None:
    assert MAX_PAYLOAD == 1 << 24 == 16_777_216


# --- decode_frame ---------------------------------------------------------------------------


def test_decode_frame_returns_rest_untouched() -> None:
    frame, rest = decode_frame(GOLDEN[2].wire + SPLICE_BYTES)
    assert frame == EXPECTED[2]
    assert rest == SPLICE_BYTES


@pytest.mark.parametrize("cut", [0, 1, 7, 8, 9, len(GOLDEN[2].wire) - 1])
def test_decode_frame_incomplete(cut: int) -> None:
    with pytest.raises(UnexpectedEOF):
        decode_frame(GOLDEN[2].wire[:cut])


def test_decode_frame_too_large() -> None:
    with pytest.raises(FrameTooLarge):
        decode_frame(header(0x2001, 0, MAX_PAYLOAD + 1))


# --- FrameDecoder: feeding patterns ----------------------------------------------------------


def test_decoder_whole() -> None:
    frames, decoder = feed_in_chunks(ALL_WIRE, [])
    assert frames == EXPECTED
    assert decoder.buffered == 0


def test_decoder_one_byte_at_a_time() -> None:
    frames, decoder = feed_in_chunks(ALL_WIRE, list(range(1, len(ALL_WIRE))))
    assert frames == EXPECTED
    assert decoder.buffered == 0


@pytest.mark.parametrize("seed", range(20))
def test_decoder_random_splits(seed: int) -> None:
    rng = random.Random(seed)
    data = ALL_WIRE + SPLICE_BYTES
    cuts = rng.sample(range(1, len(data)), rng.randint(1, 40))
    frames, decoder = feed_in_chunks(data, cuts, want=len(EXPECTED))
    assert frames == EXPECTED
    assert decoder.buffered == len(SPLICE_BYTES)
    assert decoder.trailing_data() == SPLICE_BYTES


def test_decoder_never_reads_past_the_frame() -> None:
    # spec 02 §0: the bytes after OPEN_STREAM belong to the splice.
    open_stream = GOLDEN[7].wire
    decoder = FrameDecoder()
    decoder.receive_data(open_stream + SPLICE_BYTES)
    assert decoder.next_frame() == EXPECTED[7]
    assert decoder.buffered == len(SPLICE_BYTES)
    assert decoder.trailing_data() == SPLICE_BYTES
    assert decoder.buffered == 0
    assert decoder.trailing_data() == b""
    assert decoder.next_frame() is None


def test_trailing_data_includes_a_partial_next_frame() -> None:
    decoder = FrameDecoder()
    partial = GOLDEN[4].wire[:11]
    decoder.receive_data(GOLDEN[0].wire + partial)
    assert decoder.next_frame() == EXPECTED[0]
    assert decoder.next_frame() is None
    assert decoder.trailing_data() == partial


def test_trailing_data_before_any_frame() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"abc")
    assert decoder.trailing_data() == b"abc"


def test_empty_receive_data_is_not_eof() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"")
    assert decoder.next_frame() is None
    assert not decoder.at_eof


def test_decoder_accepts_bytes_like() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(bytearray(GOLDEN[0].wire))
    decoder.receive_data(memoryview(GOLDEN[1].wire))
    assert drain(decoder) == EXPECTED[:2]


def test_many_small_frames_linear_time() -> None:
    # 200k empty PINGs in one chunk: a decoder that re-slices its buffer per frame
    # would copy ~160 GB here; ours copies each byte at most a few times.
    count = 200_000
    data = encode_frame(FrameType.PING) * count + b"tail"
    decoder = FrameDecoder()
    started = time.perf_counter()
    decoder.receive_data(data)
    frames = drain(decoder)
    elapsed = time.perf_counter() - started
    assert len(frames) == count
    assert decoder.trailing_data() == b"tail"
    assert elapsed < 10, f"decoding {count} frames took {elapsed:.1f}s"


# --- unknown types, reserved bits, version and flags -------------------------------------------


def test_unknown_type_decodes_as_int() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(0x7AB, b"xyz", version=5, flags=0xBEEF))
    frame = decoder.next_frame()
    assert frame == Frame(0x7AB, b"xyz", 5, 0xBEEF)
    assert frame is not None
    assert not isinstance(frame.type, FrameType)
    assert "0x7ab" in repr(frame)


def test_known_type_decodes_as_enum() -> None:
    frame, _ = decode_frame(encode_frame(0x152))
    assert frame.type is FrameType.STREAM_READY


def test_reserved_bits_ignored_on_decode_and_cleared_on_encode() -> None:
    word = (1 << 13) | (0b11 << 11) | FrameType.OPEN_STREAM
    frame, _ = decode_frame(header(word, 0, 2) + b"\x18\x01")
    assert frame == Frame(FrameType.OPEN_STREAM, b"\x18\x01", 1, 0)
    # Re-serialising forces the reserved bits to 0 (spec 02 §0).
    reencoded = encode_frame(frame.type, frame.payload, version=frame.version, flags=frame.flags)
    assert reencoded[:2] == b"\x20\x10"


def test_version_and_flags_are_not_validated_on_decode() -> None:
    frame, _ = decode_frame(header((7 << 13) | 0x020, 0xFFFF, 0))
    assert frame == Frame(FrameType.PING, b"", 7, 0xFFFF)
    frame, _ = decode_frame(header(0x020, 0, 0))
    assert frame.version == 0


# --- length limit ------------------------------------------------------------------------------


def test_length_exactly_max_payload_is_accepted() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(header(0x2101, 0, MAX_PAYLOAD))
    assert decoder.next_frame() is None
    # The declared length is not pre-allocated: only what arrived is held.
    assert decoder.buffered == HEADER_SIZE
    assert sys.getsizeof(decoder._buf) < 1024
    chunk = b"\xab" * (1 << 20)
    for _ in range(16):
        assert decoder.next_frame() is None
        decoder.receive_data(chunk)
    decoder.receive_data(b"next")
    frame = decoder.next_frame()
    assert frame is not None
    assert frame.type is FrameType.STREAM_DATA
    assert len(frame.payload) == MAX_PAYLOAD
    assert frame.payload[:4] == b"\xab" * 4
    assert decoder.trailing_data() == b"next"


def test_length_above_max_payload_rejected_from_header_alone() -> None:
    too_large = header(0x2001, 0, MAX_PAYLOAD + 1)
    decoder = FrameDecoder()
    decoder.receive_data(too_large[:7])
    assert decoder.next_frame() is None
    decoder.receive_data(too_large[7:])  # the header completes; no payload byte was sent
    with pytest.raises(FrameTooLarge) as info:
        decoder.next_frame()
    assert info.value.length == MAX_PAYLOAD + 1
    assert isinstance(info.value, RemoteProtocolError)


def test_length_above_max_after_a_good_frame() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(GOLDEN[0].wire + header(0x2001, 0, 0xFFFFFFFF))
    assert decoder.next_frame() == EXPECTED[0]
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()


def test_failed_decoder_stays_failed() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(header(0x2001, 0, MAX_PAYLOAD + 1))
    with pytest.raises(FrameTooLarge) as first:
        decoder.next_frame()
    decoder.receive_data(GOLDEN[0].wire)  # dropped
    assert decoder.buffered == 0
    with pytest.raises(FrameTooLarge) as second:
        decoder.next_frame()
    assert second.value is first.value
    assert not decoder.at_eof
    decoder.receive_eof()
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()
    assert not decoder.at_eof


# --- EOF ----------------------------------------------------------------------------------------


def test_eof_before_anything_is_clean() -> None:
    decoder = FrameDecoder()
    assert not decoder.at_eof
    decoder.receive_eof()
    assert decoder.next_frame() is None
    assert decoder.at_eof


def test_eof_at_frame_boundary_is_clean() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(GOLDEN[0].wire + GOLDEN[1].wire)
    decoder.receive_eof()
    assert not decoder.at_eof  # frames still buffered
    assert drain(decoder) == EXPECTED[:2]
    assert decoder.at_eof
    assert decoder.next_frame() is None
    decoder.receive_eof()  # idempotent
    assert decoder.at_eof


@pytest.mark.parametrize("cut", [1, 4, 7])
def test_eof_inside_header(cut: int) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(GOLDEN[0].wire + GOLDEN[2].wire[:cut])
    decoder.receive_eof()
    assert decoder.next_frame() == EXPECTED[0]
    with pytest.raises(UnexpectedEOF, match="header"):
        decoder.next_frame()
    with pytest.raises(UnexpectedEOF):
        decoder.next_frame()
    assert not decoder.at_eof


@pytest.mark.parametrize("cut", [8, 9, 13])
def test_eof_inside_payload(cut: int) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(GOLDEN[2].wire[:cut])
    assert decoder.next_frame() is None
    decoder.receive_eof()
    with pytest.raises(UnexpectedEOF, match="payload"):
        decoder.next_frame()
    assert not decoder.at_eof


def test_receive_data_after_eof_is_a_local_error() -> None:
    decoder = FrameDecoder()
    decoder.receive_eof()
    with pytest.raises(LocalProtocolError):
        decoder.receive_data(b"x")


def test_frame_repr_truncates_large_payloads() -> None:
    text = repr(Frame(FrameType.STREAM_DATA, bytes(1000)))
    assert "1000 bytes" in text
    assert len(text) < 300
