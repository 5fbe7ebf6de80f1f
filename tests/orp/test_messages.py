"""Payload messages: the schema of spec 01, encode_message/decode_message, round trips."""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import given, settings
from hypothesis import strategies as st

import outrelay.orp as orp
from outrelay.orp import (
    MESSAGE_TYPES,
    Candidate,
    Frame,
    FrameDecoder,
    FrameType,
    Hello,
    HelloAck,
    IncomingStream,
    LocalProtocolError,
    MalformedPayload,
    Message,
    MigrateToP2P,
    OpenStream,
    Register,
    StreamAccept,
    decode_frame,
    decode_message,
    encode_frame,
    encode_message,
)

from .strategies import cut_points, frame_items, messages, split

_F = FieldDescriptor

# spec 01, "Protobuf messages": (message, field, number, type, repeated).
SPEC_FIELDS = [
    ("Hello", "protocol_version", 1, _F.TYPE_STRING, False),
    ("Hello", "agent_uri", 2, _F.TYPE_STRING, False),
    ("Hello", "capabilities", 3, _F.TYPE_STRING, True),
    ("HelloAck", "session_id", 1, _F.TYPE_STRING, False),
    ("HelloAck", "server_time_unix_ms", 2, _F.TYPE_INT64, False),
    ("HelloAck", "accepted_features", 3, _F.TYPE_STRING, True),
    ("Register", "service_name", 1, _F.TYPE_STRING, False),
    ("Register", "local_addr", 2, _F.TYPE_STRING, False),
    ("RegisterAck", "service_id", 1, _F.TYPE_STRING, False),
    ("OpenStream", "target_service", 1, _F.TYPE_STRING, False),
    ("OpenStream", "method", 2, _F.TYPE_STRING, False),
    ("OpenStream", "stream_id", 3, _F.TYPE_UINT64, False),
    ("IncomingStream", "target_service", 1, _F.TYPE_STRING, False),
    ("IncomingStream", "method", 2, _F.TYPE_STRING, False),
    ("IncomingStream", "source_agent_uri", 3, _F.TYPE_STRING, False),
    ("IncomingStream", "stream_id", 4, _F.TYPE_UINT64, False),
    ("StreamCheckpoint", "stream_id", 1, _F.TYPE_UINT64, False),
    ("StreamCheckpoint", "my_position", 2, _F.TYPE_UINT64, False),
    ("StreamCheckpoint", "peer_ack_position", 3, _F.TYPE_UINT64, False),
    ("StreamResume", "stream_id", 1, _F.TYPE_UINT64, False),
    ("StreamResume", "my_position", 2, _F.TYPE_UINT64, False),
    ("StreamResume", "peer_ack_position", 3, _F.TYPE_UINT64, False),
    ("ObservedAddrQuery", "request_id", 1, _F.TYPE_UINT64, False),
    ("ObservedAddrResp", "request_id", 1, _F.TYPE_UINT64, False),
    ("ObservedAddrResp", "ip", 2, _F.TYPE_STRING, False),
    ("ObservedAddrResp", "port", 3, _F.TYPE_UINT32, False),
    ("Candidate", "kind", 1, _F.TYPE_STRING, False),
    ("Candidate", "ip", 2, _F.TYPE_STRING, False),
    ("Candidate", "port", 3, _F.TYPE_UINT32, False),
    ("Candidate", "priority", 4, _F.TYPE_UINT32, False),
    ("CandidateOffer", "stream_id", 1, _F.TYPE_UINT64, False),
    ("CandidateOffer", "candidates", 2, _F.TYPE_MESSAGE, True),
    ("CandidateAnswer", "stream_id", 1, _F.TYPE_UINT64, False),
    ("CandidateAnswer", "candidates", 2, _F.TYPE_MESSAGE, True),
    ("MigrateToP2P", "stream_id", 1, _F.TYPE_UINT64, False),
    ("MigrateToP2P", "my_position", 2, _F.TYPE_UINT64, False),
    ("MigrateToP2P", "peer_ack_position", 3, _F.TYPE_UINT64, False),
    ("MigrateToP2P", "selected", 4, _F.TYPE_MESSAGE, False),
    ("MigrateToRelay", "stream_id", 1, _F.TYPE_UINT64, False),
    ("MigrateToRelay", "my_position", 2, _F.TYPE_UINT64, False),
    ("MigrateToRelay", "peer_ack_position", 3, _F.TYPE_UINT64, False),
    ("MigrateToRelay", "reason", 4, _F.TYPE_STRING, False),
    ("StreamReject", "code", 1, _F.TYPE_UINT32, False),
    ("StreamReject", "reason", 2, _F.TYPE_STRING, False),
    ("AllocGranted", "stream_id", 1, _F.TYPE_UINT64, False),
    ("AllocGranted", "my_allocation", 2, _F.TYPE_UINT32, False),
    ("AllocGranted", "peer_allocation", 3, _F.TYPE_UINT32, False),
    ("AllocGranted", "forward_endpoint", 4, _F.TYPE_STRING, False),
    ("StreamReady", "stream_id", 1, _F.TYPE_UINT64, False),
]
SPEC_MESSAGES = sorted({row[0] for row in SPEC_FIELDS} | {"StreamAccept"})


EXTENSION_FIELD_MIN = 100
"""Our own fields start here, far from the reference's numbers; peers skip them."""
OUR_EXTENSIONS = [
    ("StreamReady", "outrelay_p2p_mode", 100, FieldDescriptor.TYPE_UINT32, False),
    ("Hello", "outrelay_instance", 100, FieldDescriptor.TYPE_STRING, False),
    ("StreamResume", "outrelay_peer_uri", 100, FieldDescriptor.TYPE_STRING, False),
    ("StreamReady", "outrelay_peer_uri", 101, FieldDescriptor.TYPE_STRING, False),
    ("IncomingStream", "outrelay_spliced", 100, FieldDescriptor.TYPE_BOOL, False),
    # FORWARD_STREAM between two of our relays (issue 18).
    ("IncomingStream", "outrelay_p2p_mode", 101, FieldDescriptor.TYPE_UINT32, False),
    ("IncomingStream", "outrelay_provider_uri", 102, FieldDescriptor.TYPE_STRING, False),
]


def test_schema_matches_spec_01() -> None:
    actual = []
    for name in SPEC_MESSAGES:
        cls: type[Message] = getattr(orp, name)
        descriptor = cls.DESCRIPTOR
        assert descriptor.full_name == f"outrelay.orp.v1.{name}"
        for field in descriptor.fields:
            entry = (name, field.name, field.number, field.type, field.is_repeated)
            if field.number >= EXTENSION_FIELD_MIN:
                assert entry in OUR_EXTENSIONS
                continue
            actual.append(entry)
    assert sorted(actual) == sorted(SPEC_FIELDS)
    assert not StreamAccept.DESCRIPTOR.fields
    selected = MigrateToP2P.DESCRIPTOR.fields_by_name["selected"]
    assert selected.message_type is not None
    assert selected.message_type.full_name == "outrelay.orp.v1.Candidate"


def test_message_types_table() -> None:
    assert MESSAGE_TYPES[FrameType.FORWARD_STREAM] is IncomingStream
    assert MESSAGE_TYPES[FrameType.INCOMING_STREAM] is IncomingStream
    for absent in (FrameType.PING, FrameType.PONG, FrameType.GOAWAY, FrameType.STREAM_DATA):
        assert absent not in MESSAGE_TYPES
    # Every message of spec 01 except Candidate is some frame's payload; PeerResume is ours.
    carried = {cls.__name__ for cls in MESSAGE_TYPES.values()}
    assert carried == set(SPEC_MESSAGES) - {"Candidate"} | {"PeerResume"}
    with pytest.raises(TypeError):
        MESSAGE_TYPES[FrameType.PING] = Hello  # type: ignore[index]


@pytest.mark.parametrize("frame_type", [FrameType.PING, FrameType.PONG, FrameType.HELLO_ACK])
def test_encode_message_none_is_empty_payload(frame_type: FrameType) -> None:
    assert encode_message(frame_type) == encode_frame(frame_type, b"")
    assert encode_message(frame_type, None) == encode_frame(frame_type)


def test_encode_message_default_message_is_empty_payload() -> None:
    assert encode_message(FrameType.STREAM_ACCEPT, StreamAccept()) == encode_message(
        FrameType.STREAM_ACCEPT
    )
    assert encode_message(FrameType.HELLO_ACK, HelloAck()) == encode_message(FrameType.HELLO_ACK)


def test_encode_message_forward_stream_carries_incoming_stream() -> None:
    message = IncomingStream(target_service="svc", stream_id=7)
    frame, _ = decode_frame(encode_message(FrameType.FORWARD_STREAM, message))
    assert frame.type is FrameType.FORWARD_STREAM
    assert decode_message(frame) == message


@pytest.mark.parametrize(
    ("frame_type", "message"),
    [
        (FrameType.HELLO, Register(service_name="x")),
        (FrameType.OPEN_STREAM, IncomingStream()),
        (FrameType.PING, Hello()),
        (FrameType.GOAWAY, Hello()),
        (FrameType.CANDIDATE_OFFER, Candidate()),
    ],
)
def test_encode_message_refuses_the_wrong_class(frame_type: FrameType, message: Message) -> None:
    with pytest.raises(LocalProtocolError, match=type(message).__name__):
        encode_message(frame_type, message)


def test_decode_message_of_a_type_without_message() -> None:
    for frame_type in (FrameType.PING, FrameType.PONG, FrameType.RESOLVE, 0x7AB, 0):
        with pytest.raises(MalformedPayload, match="carries no message"):
            decode_message(Frame(frame_type))


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff",  # truncated varint key
        b"\x0a\x05ab",  # length-delimited field longer than the payload
        b"\x12\x02\xff\xfe",  # invalid UTF-8 in agent_uri (proto3 strings must be UTF-8)
        b"\x0b",  # start-group with no end
        b"\x0c",  # end-group without start
    ],
)
def test_decode_message_malformed(payload: bytes) -> None:
    with pytest.raises(MalformedPayload) as info:
        decode_message(Frame(FrameType.HELLO, payload))
    assert "Hello" in str(info.value)


def test_decode_message_keeps_unknown_fields() -> None:
    # Field 15 (varint) is unknown to Register; it survives decode and re-encode.
    payload = Register(service_name="svc").SerializeToString() + b"\x78\x01"
    message = decode_message(Frame(FrameType.REGISTER, payload))
    assert isinstance(message, Register)
    assert message.service_name == "svc"
    assert message.SerializeToString() == payload


# --- property: round trips -------------------------------------------------------------------


@pytest.mark.parametrize("frame_type", sorted(MESSAGE_TYPES), ids=lambda t: t.name)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_round_trip_every_message_type(frame_type: FrameType, data: st.DataObject) -> None:
    message = data.draw(messages(MESSAGE_TYPES[frame_type]))
    wire = encode_message(frame_type, message)
    frame, rest = decode_frame(wire)
    assert rest == b""
    assert frame == Frame(frame_type, message.SerializeToString())
    decoded = decode_message(frame)
    assert type(decoded) is MESSAGE_TYPES[frame_type]
    assert decoded == message
    # Re-encoding the decoded message gives the same bytes (the relay re-serialises).
    assert encode_message(frame_type, decoded) == wire


@settings(max_examples=150, deadline=None)
@given(items=st.lists(frame_items, max_size=8), data=st.data())
def test_round_trip_split_stream(
    items: list[tuple[FrameType, Message | None]], data: st.DataObject
) -> None:
    wire = b"".join(encode_message(t, m) for t, m in items)
    cuts = data.draw(cut_points(len(wire)))
    decoder = FrameDecoder()
    frames: list[Frame] = []
    for chunk in split(wire, cuts):
        decoder.receive_data(chunk)
        while (frame := decoder.next_frame()) is not None:
            frames.append(frame)
    decoder.receive_eof()
    assert decoder.next_frame() is None
    assert decoder.at_eof
    assert len(frames) == len(items)
    for frame, (frame_type, message) in zip(frames, items, strict=True):
        assert frame.type is frame_type
        assert (frame.version, frame.flags) == (1, 0)
        if message is None:
            assert frame.payload == b""
        else:
            assert decode_message(frame) == message


def test_open_stream_zero_values_are_omitted() -> None:
    # spec 03 §3.8: proto3 zero values are omitted (empty method, zero positions).
    assert OpenStream(target_service="a").SerializeToString() == b"\x0a\x01a"
