"""Protobuf payload messages and their mapping to frame types (spec 01).

The message classes are generated from ``proto/orp.proto`` into the private
``outrelay.orp._proto`` package and re-exported here; other layers import them from
:mod:`outrelay.orp` only.

Serialisation is plain proto3: zero values are omitted and fields are written in field
number order, which matches the reference's Go encoder byte for byte for these messages
(spec 03 §3.8).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from google.protobuf.message import DecodeError, Message

from ._proto.orp_pb2 import (
    AllocGranted,
    Candidate,
    CandidateAnswer,
    CandidateOffer,
    Hello,
    HelloAck,
    IncomingStream,
    MigrateToP2P,
    MigrateToRelay,
    ObservedAddrQuery,
    ObservedAddrResp,
    OpenStream,
    PeerResume,
    Register,
    RegisterAck,
    StreamAccept,
    StreamCheckpoint,
    StreamReady,
    StreamReject,
    StreamResume,
)
from .codec import Frame, encode_frame
from .errors import LocalProtocolError, MalformedPayload
from .frame_types import FrameType

__all__ = [
    "MESSAGE_TYPES",
    "AllocGranted",
    "Candidate",
    "CandidateAnswer",
    "CandidateOffer",
    "Hello",
    "HelloAck",
    "IncomingStream",
    "Message",
    "MigrateToP2P",
    "MigrateToRelay",
    "ObservedAddrQuery",
    "ObservedAddrResp",
    "OpenStream",
    "PeerResume",
    "Register",
    "RegisterAck",
    "StreamAccept",
    "StreamCheckpoint",
    "StreamReady",
    "StreamReject",
    "StreamResume",
    "decode_message",
    "encode_message",
]

MESSAGE_TYPES: Final[Mapping[FrameType, type[Message]]] = MappingProxyType(
    {
        FrameType.HELLO: Hello,
        FrameType.HELLO_ACK: HelloAck,
        FrameType.REGISTER: Register,
        FrameType.REGISTER_ACK: RegisterAck,
        FrameType.OPEN_STREAM: OpenStream,
        FrameType.INCOMING_STREAM: IncomingStream,
        FrameType.STREAM_ACCEPT: StreamAccept,
        FrameType.STREAM_REJECT: StreamReject,
        FrameType.STREAM_CHECKPOINT: StreamCheckpoint,
        FrameType.STREAM_RESUME: StreamResume,
        FrameType.OBSERVED_ADDR_QUERY: ObservedAddrQuery,
        FrameType.OBSERVED_ADDR_RESP: ObservedAddrResp,
        FrameType.CANDIDATE_OFFER: CandidateOffer,
        FrameType.CANDIDATE_ANSWER: CandidateAnswer,
        FrameType.MIGRATE_TO_P2P: MigrateToP2P,
        FrameType.MIGRATE_TO_RELAY: MigrateToRelay,
        FrameType.FORWARD_STREAM: IncomingStream,  # relay to relay (spec 02 §10)
        FrameType.ALLOC_GRANTED: AllocGranted,
        FrameType.STREAM_READY: StreamReady,
        FrameType.PEER_RESUME: PeerResume,  # ours, relay to relay
    }
)
"""Payload message class of each frame type that carries one (spec 01, "Frame types").

PING and PONG carry an empty payload and are absent, as are the types the reference never
uses (RESOLVE, RESOLVE_RESP, POLICY_UPDATE, METRIC_REPORT, GOAWAY, STREAM_INIT..RESET).
"""

# The same table keyed by plain int, for frames whose type is not a known FrameType.
_MESSAGE_BY_CODE: Final[dict[int, type[Message]]] = {
    int(code): cls for code, cls in MESSAGE_TYPES.items()
}


def encode_message(frame_type: FrameType, message: Message | None = None) -> bytes:
    """Serialise ``message`` and frame it as ``frame_type`` (version 1, flags 0).

    Args:
        frame_type: the frame type.
        message: the payload; must be an instance of ``MESSAGE_TYPES[frame_type]``.
            ``None`` gives an empty payload, which is how the reference sends PING, PONG,
            HELLO_ACK and STREAM_ACCEPT.

    Returns:
        The complete frame.

    Raises:
        LocalProtocolError: ``message`` is not of the class the frame type carries (or
            the type carries none), or the encoded payload exceeds ``MAX_PAYLOAD``.
    """
    if message is None:
        return encode_frame(frame_type)
    expected = _MESSAGE_BY_CODE.get(frame_type)
    if expected is None or type(message) is not expected:
        wanted = expected.__name__ if expected is not None else "no message"
        raise LocalProtocolError(
            f"{_type_name(frame_type)} carries {wanted}, not {type(message).__name__}"
        )
    return encode_frame(frame_type, message.SerializeToString())


def decode_message(frame: Frame) -> Message:
    """Parse the payload of ``frame`` into the message class of its type.

    Narrow the result with ``isinstance`` (or look at ``frame.type`` first). Unknown
    fields are kept, as proto3 requires, and re-serialised if the message is re-encoded.

    Args:
        frame: a decoded frame.

    Returns:
        A new instance of ``MESSAGE_TYPES[frame.type]``.

    Raises:
        MalformedPayload: the payload does not parse (bad wire format, invalid UTF-8 in a
            string field, ...), or the frame type carries no message (PING, PONG, unused
            or unknown types). Never any other exception.
    """
    cls = _MESSAGE_BY_CODE.get(frame.type)
    if cls is None:
        raise MalformedPayload(f"frame type {_type_name(frame.type)} carries no message")
    try:
        return cls.FromString(frame.payload)
    # DecodeError is what the upb and C++ backends raise; the pure-Python backend can
    # also raise UnicodeDecodeError (a ValueError) or hit the recursion limit.
    except (DecodeError, ValueError, RecursionError) as exc:
        raise MalformedPayload(
            f"{_type_name(frame.type)} payload is not a valid {cls.__name__}: {exc}"
        ) from exc


def _type_name(frame_type: int) -> str:
    """``"HELLO (0x001)"`` for a known type, ``"0x7ab"`` otherwise."""
    if isinstance(frame_type, FrameType):
        return f"{frame_type.name} ({frame_type.value:#05x})"
    return f"{frame_type:#05x}"
