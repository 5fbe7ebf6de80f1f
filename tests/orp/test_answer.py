"""orp.classify_open_answer: a STREAM_REJECT + EOF, application data, or undecided.

Spec 03 §3.5 [REC], the consumer's reading of its data stream.

Bytes read from the consumer's data stream before any mode signal are either the
relay's STREAM_REJECT frame followed by EOF, or the first bytes of an inter-relay
splice. Only a *complete* reject frame *followed by EOF* is a rejection; a prefix
of one is undecided until more bytes or EOF arrive.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outrelay.orp import (
    FrameType,
    OpenAnswer,
    P2PMode,
    StreamReady,
    StreamReject,
    decode_frame,
    decode_p2p_mode,
    encode_frame,
    encode_message,
    encode_p2p_mode,
    encode_reject,
)
from outrelay.orp import StreamRejected as Rejected
from outrelay.orp import classify_open_answer as classify

pytestmark = pytest.mark.timeout(20)

SPLICE = OpenAnswer.APPLICATION_DATA
REJECT_404 = encode_message(
    FrameType.STREAM_REJECT, StreamReject(code=404, reason="service not found")
)


def test_golden_bytes_of_spec_02_section_0() -> None:
    """Spec 02 §0: STREAM_REJECT{404,"service not found"} on the wire."""
    golden = bytes.fromhex("20130000000000160894031211") + b"service not found"
    reject = StreamReject(code=404, reason="service not found")
    assert encode_message(FrameType.STREAM_REJECT, reject) == golden


def test_complete_reject_and_eof_is_rejected() -> None:
    assert classify(REJECT_404, eof=True) == Rejected(404, "service not found")


def test_complete_reject_without_eof_is_undecided() -> None:
    assert classify(REJECT_404, eof=False) is None


@pytest.mark.parametrize("cut", range(1, len(REJECT_404)))
def test_partial_reject_is_undecided_until_eof(cut: int) -> None:
    assert classify(REJECT_404[:cut], eof=False) is None
    assert classify(REJECT_404[:cut], eof=True) == SPLICE


@pytest.mark.parametrize("extra", [b"x", b"\x00", REJECT_404])
@pytest.mark.parametrize("eof", [False, True])
def test_reject_followed_by_more_bytes_is_splice(extra: bytes, eof: bool) -> None:
    assert classify(REJECT_404 + extra, eof=eof) == SPLICE


@pytest.mark.parametrize("eof", [False, True])
@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.0 200 OK\r\n",
        b"HTTP/1.0 200",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"\x16\x03\x01\x02\x00",  # a TLS ClientHello
        b"\x20\x12",  # a STREAM_ACCEPT header: another frame type
        b"\x21\x13\x00\x00",  # type 0x113, not 0x013
    ],
)
def test_bytes_not_starting_like_a_reject_header_are_splice(data: bytes, eof: bool) -> None:
    assert classify(data, eof=eof) == SPLICE


@pytest.mark.parametrize(
    ("byte", "eof", "expected"),
    [
        (b"\x20", False, None),  # could still become a reject header
        (b"\x20", True, SPLICE),
        (b"\x00", False, SPLICE),  # version 0: not an ORP v1 header
        (b"\x00", True, SPLICE),
        (b"\x28", False, None),  # version 1, reserved bits set: the decoder ignores them
        (b"H", False, SPLICE),  # 0x48: version 2
        (b"H", True, SPLICE),
        (b"\x07", False, SPLICE),
        (b"\xff", False, SPLICE),
    ],
)
def test_one_byte_inputs(byte: bytes, eof: bool, expected: OpenAnswer | None) -> None:
    assert classify(byte, eof=eof) == expected


def test_nothing_yet_is_undecided() -> None:
    assert classify(b"", eof=False) is None


def test_empty_reject_payload_is_a_reject_with_zero_values() -> None:
    assert classify(encode_frame(FrameType.STREAM_REJECT), eof=True) == Rejected(0, "")


def test_reject_header_with_undecodable_payload_is_splice() -> None:
    bogus = encode_frame(FrameType.STREAM_REJECT, b"\xff\xff\xff\xff")
    assert classify(bogus, eof=False) is None
    assert classify(bogus, eof=True) == SPLICE


def test_reject_header_declaring_an_oversize_payload_is_splice() -> None:
    header = bytes([0x20, 0x13]) + b"\x00\x00" + (1 << 24 | 1).to_bytes(4, "big")
    assert classify(header, eof=False) == SPLICE


def test_another_complete_frame_type_is_splice() -> None:
    ready = encode_message(FrameType.STREAM_READY, StreamReady(stream_id=1))
    assert classify(ready, eof=True) == SPLICE


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=40), eof=st.booleans())
def test_arbitrary_bytes_rejected_only_for_one_whole_reject_frame(data: bytes, eof: bool) -> None:
    answer = classify(data, eof)
    assert answer is None or answer == SPLICE or isinstance(answer, Rejected)
    if isinstance(answer, Rejected):
        assert eof
        frame, rest = decode_frame(data)
        assert frame.type == FrameType.STREAM_REJECT and rest == b""
    if eof and data and answer is None:
        pytest.fail("with EOF there is nothing more to wait for")


@settings(max_examples=100, deadline=None)
@given(code=st.integers(0, 2**32 - 1), reason=st.text(max_size=60), cut=st.integers(0, 200))
def test_any_reject_decides_only_when_whole(code: int, reason: str, cut: int) -> None:
    wire = encode_message(FrameType.STREAM_REJECT, StreamReject(code=code, reason=reason))
    cut = cut % (len(wire) + 1)
    if cut == len(wire):
        assert classify(wire, eof=True) == Rejected(code, reason)
        assert classify(wire, eof=False) is None
    elif cut:
        assert classify(wire[:cut], eof=False) is None
        assert classify(wire[:cut], eof=True) == SPLICE


def test_encode_reject_is_the_stream_reject_frame() -> None:
    assert encode_reject(404, "service not found") == REJECT_404


def test_p2p_mode_extension_field_is_the_policy_number_plus_one() -> None:
    """StreamReady.outrelay_p2p_mode: 0 is "not told" (a reference relay), else P2PMode + 1."""
    assert [encode_p2p_mode(m) for m in P2PMode] == [1, 2, 3]
    assert decode_p2p_mode(0) is None
    assert decode_p2p_mode(99) is None
    for mode in P2PMode:
        assert decode_p2p_mode(encode_p2p_mode(mode)) is mode
