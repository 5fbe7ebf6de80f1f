"""The spec's hex examples, encoded and decoded byte for byte (spec 02 §0, spec 03 §3.8)."""

from __future__ import annotations

import pytest

from outrelay.orp import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    FrameDecoder,
    FrameType,
    decode_frame,
    decode_message,
    encode_frame,
    encode_message,
)

from .golden import ALL_WIRE, GOLDEN, GoldenVector

_IDS = [v.name for v in GOLDEN]


def test_every_spec_example_is_present() -> None:
    assert len(GOLDEN) == 13
    assert sum(v.source == "spec 02 §0" for v in GOLDEN) == 4
    assert sum(v.source == "spec 03 §3.8" for v in GOLDEN) == 9


def test_spec_lengths_are_consistent() -> None:
    # The header's length field matches the bytes that follow it, in every example.
    for vector in GOLDEN:
        assert int.from_bytes(vector.wire[4:8], "big") == len(vector.wire) - 8, vector.name


@pytest.mark.parametrize("vector", GOLDEN, ids=_IDS)
def test_encode_matches_spec(vector: GoldenVector) -> None:
    assert encode_message(vector.frame_type, vector.message) == vector.wire


@pytest.mark.parametrize("vector", GOLDEN, ids=_IDS)
def test_encode_frame_matches_spec(vector: GoldenVector) -> None:
    payload = vector.message.SerializeToString() if vector.message is not None else b""
    assert encode_frame(vector.frame_type, payload) == vector.wire


@pytest.mark.parametrize("vector", GOLDEN, ids=_IDS)
def test_decode_matches_spec(vector: GoldenVector) -> None:
    frame, rest = decode_frame(vector.wire)
    assert rest == b""
    assert frame.type is vector.frame_type
    assert frame.version == PROTOCOL_VERSION
    assert frame.flags == 0
    if vector.message is None:
        assert frame.payload == b""
    else:
        message = decode_message(frame)
        assert type(message) is type(vector.message)
        assert message == vector.message
    if vector.frame_type in MESSAGE_TYPES:
        # Empty payloads decode to the default message (HELLO_ACK, STREAM_ACCEPT).
        assert isinstance(decode_message(frame), MESSAGE_TYPES[vector.frame_type])


def test_first_byte_rule() -> None:
    # spec 01: 0x20 for types below 0x100, 0x21 for 0x100-0x1FF.
    for vector in GOLDEN:
        assert vector.wire[0] == (0x20 if vector.frame_type < 0x100 else 0x21), vector.name
    for frame_type in FrameType:
        first = encode_frame(frame_type)[0]
        assert first == 0x20 | (frame_type >> 8)


def test_all_examples_through_the_decoder_back_to_back() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(ALL_WIRE)
    decoder.receive_eof()
    for vector in GOLDEN:
        frame = decoder.next_frame()
        assert frame is not None
        assert encode_frame(frame.type, frame.payload) == vector.wire
    assert decoder.next_frame() is None
    assert decoder.at_eof
