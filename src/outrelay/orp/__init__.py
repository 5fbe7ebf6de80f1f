"""ORP, the OutRelay agent/relay protocol: the sans-IO core (spec 01).

No I/O, no clock, no tasks. This package provides:

* the frame codec: :class:`Frame`, :func:`encode_frame`, :func:`decode_frame` and the
  incremental :class:`FrameDecoder` (8-byte header, payload up to ``MAX_PAYLOAD``);
* :class:`FrameType`, the 11-bit frame type codes with the spec's names;
* the protobuf payload messages (``Hello``, ``OpenStream``, ...), ``MESSAGE_TYPES`` and
  :func:`encode_message` / :func:`decode_message`;
* the consumer's reading of an open's answer (:func:`classify_open_answer`) and the
  STREAM_REJECT both roles write (:func:`encode_reject`);
* the error hierarchy rooted at :class:`OrpError`, and the STREAM_REJECT codes
  (:class:`RejectCode`);
* our negotiated extensions: HELLO capabilities and the stream end codes
  (:class:`StreamEndCode`), and the p2p mode in STREAM_READY (:class:`P2PMode`,
  :func:`encode_p2p_mode` / :func:`decode_p2p_mode`).

Only the names in ``__all__`` are public; the modules and ``_proto`` are implementation.
"""

from __future__ import annotations

from .answer import OpenAnswer, StreamRejected, classify_open_answer, encode_reject
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
    LocalProtocolError,
    MalformedPayload,
    OrpError,
    RejectCode,
    RemoteProtocolError,
    UnexpectedEOF,
)
from .extensions import (
    CAP_CLOSE_ACK,
    CAP_INSTANCE,
    CAP_P2P_MODE,
    CAP_P2P_RESUME_V2,
    CAP_PIPELINE,
    CAP_RESUME_PEER,
    FINAL_CODES,
    RELAY_CAPABILITIES,
    P2PMode,
    StreamEndCode,
    decode_p2p_mode,
    encode_p2p_mode,
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
    PeerResume,
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

__all__ = [
    "CAP_CLOSE_ACK",
    "CAP_INSTANCE",
    "CAP_P2P_MODE",
    "CAP_P2P_RESUME_V2",
    "CAP_PIPELINE",
    "CAP_RESUME_PEER",
    "FINAL_CODES",
    "HEADER_SIZE",
    "MAX_PAYLOAD",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "RELAY_CAPABILITIES",
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
    "LocalProtocolError",
    "MalformedPayload",
    "Message",
    "MigrateToP2P",
    "MigrateToRelay",
    "ObservedAddrQuery",
    "ObservedAddrResp",
    "OpenAnswer",
    "OpenStream",
    "OrpError",
    "P2PMode",
    "PeerResume",
    "Register",
    "RegisterAck",
    "RejectCode",
    "RemoteProtocolError",
    "StreamAccept",
    "StreamCheckpoint",
    "StreamEndCode",
    "StreamReady",
    "StreamReject",
    "StreamRejected",
    "StreamResume",
    "UnexpectedEOF",
    "classify_open_answer",
    "decode_frame",
    "decode_message",
    "decode_p2p_mode",
    "encode_frame",
    "encode_message",
    "encode_p2p_mode",
    "encode_reject",
    "end_code_name",
    "is_final",
]
