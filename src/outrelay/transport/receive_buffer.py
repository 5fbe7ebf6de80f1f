"""The receive half of a QUIC or yamux stream: chunks, counts, EOF/reset and the wait.

Modelled on aioquic's ``QuicStreamReceiver`` (``quic/stream.py``): one small
object owns what arrived and not yet read, and the state that ends reading.
:class:`~outrelay.transport.quic.QuicStream` and
:class:`~outrelay.transport.tcp.TcpStream` each hold one; their connections
feed it (``feed_data``, ``feed_eof``, ``feed_reset``) and the application
drains it through :meth:`ReceiveBuffer.receive_some`. Credit (QUIC
MAX_STREAM_DATA, yamux WINDOW_UPDATE) is the caller's business: it returns
credit for what ``receive_some`` handed out (see :attr:`consumed`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from outrelay.transport.base import BrokenResourceError, BusyResourceError, ClosedResourceError

__all__ = ["ReceiveBuffer", "StreamStatistics", "take_chunks"]


def take_chunks(chunks: deque[bytes], max_bytes: int) -> bytes:
    """Remove and return up to ``max_bytes`` from the front of a non-empty ``chunks``.

    A chunk larger than ``max_bytes`` is split; otherwise every further whole
    chunk that fits is joined on, so one read moves up to ``max_bytes``
    instead of one ~1.3 kB QUIC frame (bench: with batched reads, ~2.2x
    throughput on the relay path).
    """
    chunk = chunks.popleft()
    if len(chunk) > max_bytes:
        chunks.appendleft(chunk[max_bytes:])
        return chunk[:max_bytes]
    if not chunks or len(chunk) + len(chunks[0]) > max_bytes:
        return chunk
    parts = [chunk]
    size = len(chunk)
    while chunks and size + len(chunks[0]) <= max_bytes:
        part = chunks.popleft()
        parts.append(part)
        size += len(part)
    return b"".join(parts)


@dataclass(frozen=True)
class StreamStatistics:
    """A snapshot of one QUIC or yamux stream (trio-style ``statistics()``)."""

    buffered: int
    """Bytes received and not read yet."""
    consumed: int
    """Bytes the application has read so far."""
    unsent: int
    """Bytes written and not yet taken by the peer (``Stream.unsent_bytes``)."""
    eof_received: bool
    eof_sent: bool
    reset_code: int | None
    """The peer's reset code, once it reset the stream."""
    closed: bool
    """We stopped reading (``abort``/``aclose``)."""


class ReceiveBuffer:
    """Received bytes of one stream and the reasons reading may end.

    Reading order once the buffer is empty: closed by us
    (:class:`ClosedResourceError`), reset by the peer
    (:class:`BrokenResourceError` with its code), clean EOF (``b""``), then
    the connection's own state (``raise_if_terminated``); otherwise wait.
    """

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self.buffered = 0
        """Bytes received and not read yet."""
        self.consumed = 0
        """Bytes handed to the application so far."""
        self.eof = False
        """The peer finished sending (FIN)."""
        self.reset: tuple[str, int | None] | None = None
        """``(message, code)`` once the peer reset the stream."""
        self.closed = False
        """We stopped reading; later data is refused by :meth:`feed_data`."""
        self._ready = asyncio.Event()
        self._reading = False

    # -- fed by the connection -------------------------------------------------------

    def feed_data(self, data: bytes) -> bool:
        """Buffer ``data``; False (nothing buffered) once :meth:`close` was called."""
        if self.closed:
            return False
        self._chunks.append(data)
        self.buffered += len(data)
        self._ready.set()
        return True

    def feed_eof(self) -> None:
        self.eof = True
        self._ready.set()

    def feed_reset(self, message: str, code: int | None) -> None:
        """The peer reset the stream: reads raise ``BrokenResourceError(message, code)``."""
        self.reset = (message, code)
        self._ready.set()

    def wake(self) -> None:
        """Let a waiting reader look again (the connection ended)."""
        self._ready.set()

    def close(self) -> int:
        """Stop reading: drop what is buffered and return how many bytes that was."""
        dropped = self.buffered
        self.closed = True
        self._chunks.clear()
        self.buffered = 0
        self._ready.set()
        return dropped

    def statistics(self, *, unsent: int, eof_sent: bool) -> StreamStatistics:
        """This buffer's counts, with the stream's send side added."""
        return StreamStatistics(
            buffered=self.buffered,
            consumed=self.consumed,
            unsent=unsent,
            eof_received=self.eof,
            eof_sent=eof_sent,
            reset_code=None if self.reset is None else self.reset[1],
            closed=self.closed,
        )

    # -- drained by the application ------------------------------------------------

    async def receive_some(self, max_bytes: int, raise_if_terminated: Callable[[], None]) -> bytes:
        """Up to ``max_bytes`` buffered bytes, waiting for some; ``b""`` at EOF.

        The caller returns credit for the ``len(result)`` bytes.

        Raises:
            ValueError: ``max_bytes`` is below 1.
            BusyResourceError: another task is reading.
            ClosedResourceError: we closed the stream.
            BrokenResourceError: the peer reset it (with its code), or
                ``raise_if_terminated`` raised it for the connection.
        """
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        if self._reading:
            raise BusyResourceError("another task is reading this stream")
        self._reading = True
        try:
            while not self._chunks:
                if self.closed:
                    raise ClosedResourceError("stream closed")
                if self.reset is not None:
                    message, code = self.reset
                    raise BrokenResourceError(message, code=code)
                if self.eof:
                    return b""
                raise_if_terminated()
                self._ready.clear()
                await self._ready.wait()
            chunk = take_chunks(self._chunks, max_bytes)
            self.buffered -= len(chunk)
            self.consumed += len(chunk)
            return chunk
        finally:
            self._reading = False
