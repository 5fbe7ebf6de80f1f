"""ORP error hierarchy and the STREAM_REJECT codes.

Every exception raised by :mod:`outrelay.orp` derives from :class:`OrpError`, split the way
h11 and wsproto split theirs (STYLE §1, "Errors"):

* :class:`LocalProtocolError`: *we* misused the API (a frame that cannot be encoded, an
  data fed after EOF). It is also a :class:`ValueError`. It is a
  bug in the caller, never something a peer can provoke.
* :class:`RemoteProtocolError`: the *peer* sent bytes that break spec 01. The usual reaction
  is to close the stream or the session; the subclasses say why.

The promise, held by a fuzz test: decoding arbitrary bytes with
:class:`~outrelay.orp.codec.FrameDecoder` and :func:`~outrelay.orp.messages.decode_message`
raises nothing but :class:`RemoteProtocolError` subclasses. Anything else is a bug.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "FrameTooLarge",
    "LocalProtocolError",
    "MalformedPayload",
    "OrpError",
    "RejectCode",
    "RemoteProtocolError",
    "UnexpectedEOF",
]


class OrpError(Exception):
    """Base class of every error raised by :mod:`outrelay.orp`."""


class LocalProtocolError(OrpError, ValueError):
    """We tried to do something the protocol does not allow.

    Examples: encoding a frame with ``version > 7``, ``type > 0x7FF`` or a payload above
    ``MAX_PAYLOAD``; pairing a message with the wrong frame type; feeding data after EOF.
    """


class RemoteProtocolError(OrpError):
    """The peer sent bytes that violate spec 01."""


class FrameTooLarge(RemoteProtocolError):
    """A frame header declared a payload longer than ``MAX_PAYLOAD`` (1<<24 bytes).

    Raised from the header alone, before any of the payload is buffered (spec 01).

    Attributes:
        length: the declared payload length, or ``None`` if unknown.
    """

    def __init__(self, message: str, *, length: int | None = None) -> None:
        super().__init__(message)
        self.length = length


class UnexpectedEOF(RemoteProtocolError):
    """The stream ended inside a frame header or payload (spec 01, "unexpected EOF").

    A clean EOF at a frame boundary is not an error; see ``FrameDecoder.at_eof``.
    """


class MalformedPayload(RemoteProtocolError):
    """A frame payload is not a valid protobuf message for its frame type.

    Also raised when asked to decode a frame type that carries no message (PING, PONG, the
    unused types, unknown types). The reference relay closes the stream silently with FIN
    in this case (spec 02 §13).
    """


class RejectCode(IntEnum):
    """``StreamReject.code`` values (spec 02 §13, HTTP-like).

    Peers may send other codes; keep them as plain ``int`` (``RejectCode(x)`` raises
    ``ValueError`` for an unknown value).
    """

    FORBIDDEN = 403
    """Policy denied the stream (caller side or callee side)."""
    NOT_FOUND = 404
    """No provider for the service, or the provider is not connected."""
    STREAM_ID_COLLISION = 409
    """The stream id is already mapped to a different consumer/provider pair."""
    BAD_GATEWAY = 502
    """The relay could not open or forward the stream to the provider or a peer relay."""
    UNAVAILABLE = 503
    """The provider (or the provider-side relay) rejected the stream."""
