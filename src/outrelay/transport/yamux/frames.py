"""yamux frames: the 12-byte header, frame types and flags, errors and events (sans-IO)."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

__all__ = [
    "ACCEPT_BACKLOG",
    "AUTOTUNE_BUDGET",
    "HEADER_SIZE",
    "INITIAL_STREAM_WINDOW",
    "MAX_INCOMING_STREAMS",
    "MAX_INFLIGHT_OPENS",
    "MAX_STREAM_ID",
    "MAX_STREAM_WINDOW",
    "PROTOCOL_VERSION",
    "ConnectionEnded",
    "DataReceived",
    "Event",
    "Flag",
    "FrameType",
    "GoAwayCode",
    "GoAwayReceived",
    "Header",
    "PingAcknowledged",
    "PingReceived",
    "StreamAcknowledged",
    "StreamEnded",
    "StreamOpened",
    "StreamReset",
    "WindowUpdated",
    "YamuxError",
    "YamuxLocalError",
    "YamuxProtocolError",
    "YamuxRemoteError",
    "encode_frame",
]

PROTOCOL_VERSION = 0
HEADER_SIZE = 12
_HEADER_STRUCT = struct.Struct(">BBHII")
INITIAL_STREAM_WINDOW = 256 * 1024
"""Spec 01: every stream starts with 256 KiB of credit each way (protocol constant)."""
MAX_STREAM_WINDOW = 16 << 20
"""Auto-tuning stops here: 16 MiB fills ~2.6 Gbit/s at 50 ms RTT."""
AUTOTUNE_BUDGET = 32 << 20
"""Window growth one session may grant in total, beyond the initial windows.
Bounds what a peer can make us buffer even if every stream was tuned up."""
MAX_INCOMING_STREAMS = 100
"""Peer-opened streams open at once; spec 02 §2.1 (quic-go's default)."""
ACCEPT_BACKLOG = 256
"""hashicorp ``AcceptBacklog`` default: SYNs waiting beyond the limit above."""
MAX_INFLIGHT_OPENS = 256
"""Our own un-ACKed SYNs; hashicorp's semaphore of the same size."""
MAX_STREAM_ID = 0xFFFF_FFFF


class FrameType(enum.IntEnum):
    """Header ``type`` byte."""

    DATA = 0
    WINDOW_UPDATE = 1
    PING = 2
    GO_AWAY = 3


class Flag(enum.IntFlag):
    """Header ``flags`` bits; unknown bits are ignored, as hashicorp does."""

    SYN = 1
    ACK = 2
    FIN = 4
    RST = 8


class GoAwayCode(enum.IntEnum):
    """GO_AWAY error codes (the header's length field). Unknown codes pass as ints."""

    NORMAL = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2


# --------------------------------------------------------------------------- errors


class YamuxError(Exception):
    """Base of every error this module raises."""


class YamuxLocalError(YamuxError):
    """The caller misused the API (unknown stream, send after FIN, ...)."""


class YamuxRemoteError(YamuxError):
    """The peer broke the protocol; GO_AWAY(``error_code``) is already queued."""

    error_code: int = GoAwayCode.INTERNAL_ERROR


class YamuxProtocolError(YamuxRemoteError):
    """Malformed frame, window overrun, duplicate SYN, ..."""

    error_code = GoAwayCode.PROTOCOL_ERROR


# --------------------------------------------------------------------------- codec


@dataclass(frozen=True, slots=True)
class Header:
    """One 12-byte frame header."""

    type: int
    """A :class:`FrameType` value."""
    flags: int
    """:class:`Flag` bits."""
    stream_id: int
    length: int
    """Payload length (DATA), window delta, ping value or go-away code."""
    version: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        return _HEADER_STRUCT.pack(self.version, self.type, self.flags, self.stream_id, self.length)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview, offset: int = 0) -> Header:
        """Parse 12 bytes at ``offset``.

        Raises:
            YamuxProtocolError: wrong version or unknown frame type.
        """
        version, type_, flags, stream_id, length = _HEADER_STRUCT.unpack_from(data, offset)
        if version != PROTOCOL_VERSION:
            raise YamuxProtocolError(f"unsupported yamux version {version}")
        if type_ > FrameType.GO_AWAY:
            raise YamuxProtocolError(f"unknown frame type {type_}")
        return cls(type_, flags, stream_id, length, version)


def encode_frame(type_: FrameType, flags: int, stream_id: int, length: int) -> bytes:
    return _HEADER_STRUCT.pack(PROTOCOL_VERSION, type_, flags, stream_id, length)


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer opened ``stream_id`` (already ACKed); hand it to an acceptor."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Bytes for a stream. Call ``acknowledge_received`` once they are consumed."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed (FIN): no more data on ``stream_id``."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream is gone: the peer sent RST, or we reset it for ``reason``."""

    stream_id: int
    reason: str = "reset by peer"
    code: int = 0
    """The peer's error code: the length of its WINDOW_UPDATE|RST frame (ours, see
    ``outrelay.orp.extensions``; hashicorp always sends 0)."""


@dataclass(frozen=True, slots=True)
class StreamAcknowledged:
    """The peer ACKed a stream we opened; one more open may proceed."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class WindowUpdated:
    """The peer granted ``delta`` more bytes of credit on ``stream_id``."""

    stream_id: int
    delta: int


@dataclass(frozen=True, slots=True)
class PingReceived:
    """The peer pinged; the reply is already queued."""

    opaque: int


@dataclass(frozen=True, slots=True)
class PingAcknowledged:
    """Reply to our :meth:`YamuxSession.ping` with the same ``opaque`` value."""

    opaque: int


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer accepts no new streams. A non-zero code ends the session
    (hashicorp exits on 1, 2 and unknown codes); close the connection."""

    error_code: int


@dataclass(frozen=True, slots=True)
class ConnectionEnded:
    """EOF. ``clean`` is false when it cut a frame in half."""

    clean: bool


Event = (
    StreamOpened
    | DataReceived
    | StreamEnded
    | StreamReset
    | StreamAcknowledged
    | WindowUpdated
    | PingReceived
    | PingAcknowledged
    | GoAwayReceived
    | ConnectionEnded
)
