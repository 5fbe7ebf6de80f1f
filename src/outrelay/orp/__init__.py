"""ORP, the OutRelay agent/relay protocol: the sans-IO core (spec 01).

No I/O, no clock, no tasks. This package provides:

* the frame codec: :class:`Frame`, :func:`encode_frame`, :func:`decode_frame` and the
  incremental :class:`FrameDecoder` (8-byte header, payload up to ``MAX_PAYLOAD``);
* :class:`FrameType`, the 11-bit frame type codes with the spec's names;
* the protobuf payload messages (``Hello``, ``OpenStream``, ...), ``MESSAGE_TYPES`` and
  :func:`encode_message` / :func:`decode_message`;
* the per-stream state machine (:class:`StreamStateMachine`);
* the error hierarchy rooted at :class:`OrpError`, and the STREAM_REJECT codes
  (:class:`RejectCode`);
* our negotiated extensions: HELLO capabilities and the stream end codes
  (:class:`StreamEndCode`).

Only the names in ``__all__`` are public; the modules and ``_proto`` are implementation.
"""

from __future__ import annotations

from .codec import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    Frame,
    FrameDecoder,
    decode_frame,
    encode_frame,
)
from .errors import (
    FrameTooLarge,
    InvalidTransition,
    LocalProtocolError,
    MalformedPayload,
    OrpError,
    RejectCode,
    RemoteProtocolError,
    UnexpectedEOF,
)
from .extensions import (
    CAP_INSTANCE,
    CAP_P2P_MODE,
    CAP_P2P_RESUME_V2,
    CAP_RESUME_PEER,
    FINAL_CODES,
    RELAY_CAPABILITIES,
    StreamEndCode,
    end_code_name,
    is_final,
)
from .frame_types import FrameType
from .messages import (
    MESSAGE_TYPES,
    AllocGranted,
    Candidate,
    CandidateAnswer,
    CandidateOffer,
    Hello,
    HelloAck,
    IncomingStream,
    Message,
    MigrateToP2P,
    MigrateToRelay,
    ObservedAddrQuery,
    ObservedAddrResp,
    OpenStream,
    Register,
    RegisterAck,
    StreamAccept,
    StreamCheckpoint,
    StreamReady,
    StreamReject,
    StreamResume,
    decode_message,
    encode_message,
)
from .state import STREAM_TRANSITIONS, StreamInput, StreamState, StreamStateMachine

__all__ = [
    "CAP_INSTANCE",
    "CAP_P2P_MODE",
    "CAP_P2P_RESUME_V2",
    "CAP_RESUME_PEER",
    "FINAL_CODES",
    "HEADER_SIZE",
    "MAX_PAYLOAD",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "RELAY_CAPABILITIES",
    "STREAM_TRANSITIONS",
    "AllocGranted",
    "Candidate",
    "CandidateAnswer",
    "CandidateOffer",
    "Frame",
    "FrameDecoder",
    "FrameTooLarge",
    "FrameType",
    "Hello",
    "HelloAck",
    "IncomingStream",
    "InvalidTransition",
    "LocalProtocolError",
    "MalformedPayload",
    "Message",
    "MigrateToP2P",
    "MigrateToRelay",
    "ObservedAddrQuery",
    "ObservedAddrResp",
    "OpenStream",
    "OrpError",
    "Register",
    "RegisterAck",
    "RejectCode",
    "RemoteProtocolError",
    "StreamAccept",
    "StreamCheckpoint",
    "StreamEndCode",
    "StreamInput",
    "StreamReady",
    "StreamReject",
    "StreamResume",
    "StreamState",
    "StreamStateMachine",
    "UnexpectedEOF",
    "decode_frame",
    "decode_message",
    "encode_frame",
    "encode_message",
    "end_code_name",
    "is_final",
]
