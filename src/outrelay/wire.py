"""ORP frames over a transport stream: the thin shell around :mod:`outrelay.orp`.

:class:`FrameReader` pulls bytes from a :class:`~outrelay.transport.base.Stream`
into a :class:`~outrelay.orp.FrameDecoder` until one frame is complete
(httpcore's ``_receive_event`` loop). Whatever arrived after that frame stays
in the decoder: the next ``read_frame`` uses it, or :meth:`take_leftover`
hands it to the splice (spec 02 §0 [REC]: never drop the surplus).

:class:`ControlChannel` serialises every write on a control stream with one
lock (spec 02 §15 item 4, spec 03 §3.7 [REC]).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TypeVar

from outrelay.orp import (
    Frame,
    FrameDecoder,
    FrameTooLarge,
    FrameType,
    MalformedPayload,
    Message,
    decode_message,
    encode_message,
)
from outrelay.transport import BrokenResourceError, Stream, TransportError

__all__ = ["ControlChannel", "FrameReader", "discard", "expect_message", "frame_name"]

READ_CHUNK = 64 * 1024
MAX_CONTROL_FRAME = 1 << 20
"""Ours: control and first frames are tiny (a HELLO, a few candidates); the
codec's 16 MiB cap would let one stream make us buffer 16 MiB."""

M = TypeVar("M", bound=Message)


class FrameReader:
    """Reads whole ORP frames from one stream."""

    def __init__(self, stream: Stream, *, max_frame: int = MAX_CONTROL_FRAME) -> None:
        self.stream = stream
        self._decoder = FrameDecoder()
        self._eof = False
        self._max_frame = max_frame

    async def read_frame(self) -> Frame | None:
        """Return the next frame, or None at a clean end of stream.

        Raises:
            outrelay.orp.RemoteProtocolError: a malformed header, an oversize
                length, or EOF inside a frame.
            outrelay.transport.base.TransportError: the stream broke.
        """
        while True:
            frame = self._decoder.next_frame()
            if frame is not None or self._eof:
                return frame
            data = await self.stream.receive_some(READ_CHUNK)
            if data:
                self._decoder.receive_data(data)
                if self._decoder.buffered > self._max_frame + READ_CHUNK:
                    # Every frame read through here is small; a peer declaring
                    # megabytes is not going to make us buffer them.
                    raise FrameTooLarge(
                        f"frame larger than {self._max_frame} bytes on a control path"
                    )
            else:
                self._eof = True
                self._decoder.receive_eof()

    def take_leftover(self) -> bytes:
        """Bytes received after the last frame returned; the caller now owns them."""
        return self._decoder.trailing_data()

    @property
    def at_eof(self) -> bool:
        return self._eof and self._decoder.buffered == 0


def frame_name(frame_type: int) -> str:
    """``HELLO`` for known types, ``0x7ab`` for unknown ones (for logs)."""
    return frame_type.name if isinstance(frame_type, FrameType) else f"0x{frame_type:03x}"


def expect_message(frame: Frame, frame_type: FrameType, cls: type[M]) -> M:
    """Decode ``frame`` as ``cls`` if it has type ``frame_type``.

    Raises:
        MalformedPayload: wrong frame type or undecodable payload.
    """
    if frame.type != frame_type:
        raise MalformedPayload(f"expected {frame_type.name}, got {frame_name(frame.type)}")
    message = decode_message(frame)
    if not isinstance(message, cls):  # pragma: no cover - MESSAGE_TYPES guarantees it
        raise MalformedPayload(f"{frame_type.name} payload is not {cls.__name__}")
    return message


class ControlChannel:
    """Serialised writes on a control stream, each bounded by a timeout."""

    def __init__(self, stream: Stream, *, write_timeout: float = 10.0) -> None:
        self.stream = stream
        self._lock = asyncio.Lock()
        self._write_timeout = write_timeout
        self._dead: str | None = None

    async def send(self, frame_type: FrameType, message: Message | None = None) -> None:
        """Write one frame; whole frames never interleave.

        Raises:
            outrelay.transport.base.TransportError: the stream broke, or the
                peer did not drain its control stream within the timeout.
        """
        await self.send_raw(encode_message(frame_type, message))

    async def send_raw(self, data: bytes) -> None:
        """Write pre-encoded frame bytes under the lock.

        A write that times out may have left part of a frame on the stream, so
        the channel is dead from then on: the stream is aborted and every later
        send fails at once.
        """
        if self._dead is not None:
            raise BrokenResourceError(self._dead)
        try:
            async with asyncio.timeout(self._write_timeout):
                async with self._lock:
                    await self.stream.send_all(data)
        except TimeoutError as exc:
            self._dead = f"control stream write stalled for {self._write_timeout:g}s"
            self.stream.abort()
            raise BrokenResourceError(self._dead) from exc


async def discard(stream: Stream) -> None:
    """Read and drop until EOF or an error: a stream kept only for its liveness, or the
    consumer's bytes after a STREAM_REJECT (spec 02 §6.4 step 5)."""
    with contextlib.suppress(TransportError):
        while await stream.receive_some():
            pass
