"""The consumer's reading of its data stream before any mode signal (spec 03 §3.5 [REC]).

After OPEN_STREAM the consumer may see, on the data stream, either the relay's
STREAM_REJECT frame followed by EOF (the open was refused), or the first bytes of an
inter-relay splice (which gets no STREAM_READY): application data that must reach the
application untouched. :func:`classify_open_answer` tells the two apart from the bytes
read so far, with the :class:`~outrelay.orp.FrameDecoder`; only a *complete* STREAM_REJECT
frame *followed by EOF* is a rejection, a prefix of one is undecided.

:func:`encode_reject` is the frame both roles write to refuse a stream (the provider
agent, spec 03 §3.6, and the relay, spec 02 §13).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .codec import FrameDecoder, could_start_frame
from .errors import OrpError
from .frame_types import FrameType
from .messages import StreamReject, decode_message, encode_message

__all__ = ["OpenAnswer", "StreamRejected", "classify_open_answer", "encode_reject"]


class OpenAnswer(Enum):
    """A verdict of :func:`classify_open_answer` other than a rejection."""

    APPLICATION_DATA = "application-data"
    """The bytes are not (the start of) a lone STREAM_REJECT: hand them to the application."""


@dataclass(frozen=True)
class StreamRejected:
    """The relay refused the open with STREAM_REJECT{code, reason} and ended the stream."""

    code: int
    reason: str


def encode_reject(code: int, reason: str) -> bytes:
    """The STREAM_REJECT frame refusing a stream (spec 02 §13); the writer FINs after it."""
    return encode_message(FrameType.STREAM_REJECT, StreamReject(code=int(code), reason=reason))


def classify_open_answer(data: bytes, eof: bool) -> StreamRejected | OpenAnswer | None:
    """Is ``data`` (followed by EOF when ``eof``) a rejection, application data, or undecided?

    Args:
        data: every byte read from the data stream so far.
        eof: the stream ended after ``data``.

    Returns:
        :class:`StreamRejected` for a complete STREAM_REJECT frame followed by EOF;
        ``OpenAnswer.APPLICATION_DATA`` when ``data`` cannot be that; ``None`` when more
        bytes (or the EOF) are needed to tell. Never raises.
    """
    if not data:
        return None
    if not could_start_frame(data, FrameType.STREAM_REJECT):
        return OpenAnswer.APPLICATION_DATA
    decoder = FrameDecoder()
    decoder.receive_data(data)
    try:
        frame = decoder.next_frame()
    except OrpError:
        return OpenAnswer.APPLICATION_DATA
    if frame is None:
        return OpenAnswer.APPLICATION_DATA if eof else None
    if decoder.buffered:
        return OpenAnswer.APPLICATION_DATA
    if not eof:
        return None  # a whole frame: a reject is followed by EOF; wait for it
    try:
        reject = decode_message(frame)
    except OrpError:
        return OpenAnswer.APPLICATION_DATA
    if not isinstance(reject, StreamReject):
        return OpenAnswer.APPLICATION_DATA
    return StreamRejected(reject.code, reject.reason)
