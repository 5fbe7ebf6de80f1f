"""One bidirectional QUIC stream with bounded buffers both ways.

The buffering, half-close and error rules live here, the same for every
QUIC library; what differs (how bytes are handed to the library, how credit
goes back, how much is unsent) is the connection's, reached only through
the :class:`StreamOwner` interface.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

from outrelay.transport.base import (
    BrokenResourceError,
    BusyResourceError,
    ClosedResourceError,
    SendClosedError,
)
from outrelay.transport.connection_base import WakeableStream
from outrelay.transport.quic import settings
from outrelay.transport.receive_buffer import ReceiveBuffer, StreamStatistics

__all__ = ["QuicStream", "StreamOwner"]


class StreamOwner(Protocol):
    """What a :class:`QuicStream` needs from its connection (aioquic's or qh3's)."""

    @property
    def terminated(self) -> bool: ...

    def raise_if_terminated(self) -> None:
        """Raise the connection's error once it ended."""

    def transmit_soon(self) -> None:
        """Send what the library has queued, soon."""

    def want_send(self, stream: QuicStream) -> None:
        """Call ``stream.poll_send_ready()`` after each transmit until it returns True."""

    def forget(self, stream: QuicStream) -> None:
        """``stream`` is done: stop tracking it."""

    def unsent_bytes(self, stream_id: int) -> int:
        """Bytes of the stream's send buffer the library still holds."""

    def send_data(self, stream_id: int, data: memoryview) -> None:
        """Queue ``data``. Raises BrokenResourceError if the connection is gone."""

    def send_fin(self, stream_id: int) -> None:
        """Queue the end of the stream (may raise the library's errors)."""

    def reset_stream(self, stream_id: int, code: int) -> None:
        """RESET_STREAM (may raise the library's errors)."""

    def stop_stream(self, stream_id: int, code: int) -> None:
        """STOP_SENDING (may raise the library's errors)."""

    def on_buffered(self, stream: QuicStream) -> None:
        """Bytes were added to ``stream``'s receive buffer."""

    def on_consumed(self, stream: QuicStream) -> None:
        """The application took bytes from ``stream``: return credit."""


class QuicStream(WakeableStream):
    """One bidirectional QUIC stream (see the module docstring)."""

    def __init__(self, conn: StreamOwner, stream_id: int) -> None:
        self.stream_id = stream_id
        self._conn = conn
        self.received = ReceiveBuffer()
        """What arrived and is not read yet (the connection feeds it)."""
        self._writing = False
        self._eof_sent = False
        self._stop_sending_code: int | None = None
        self._closed = False
        self._send_ready = asyncio.Event()

    # -- events from the connection ---------------------------------------------------

    def on_data(self, data: bytes, end_stream: bool) -> None:
        if data and self.received.feed_data(data):
            self._conn.on_buffered(self)
        if end_stream:
            self.received.feed_eof()

    def on_reset(self, code: int) -> None:
        self.received.feed_reset(f"stream reset by peer (code {code})", code)

    def on_stop_sending(self, code: int) -> None:
        self._stop_sending_code = code
        self._send_ready.set()

    def wake(self) -> None:
        self.received.wake()
        self._send_ready.set()

    def poll_send_ready(self) -> bool:
        """After a transmit: wake the writer if there is room again (or it must fail)."""
        if self.unsent_bytes < settings.SEND_BUFFER or self._stop_sending_code is not None:
            self._send_ready.set()
            return True
        return False

    def statistics(self) -> StreamStatistics:
        return self.received.statistics(unsent=self.unsent_bytes, eof_sent=self._eof_sent)

    # -- reading ----------------------------------------------------------------------

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        chunk = await self.received.receive_some(max_bytes, self._conn.raise_if_terminated)
        if chunk:
            self._conn.on_consumed(self)
        return chunk

    # -- writing ----------------------------------------------------------------------

    @property
    def unsent_bytes(self) -> int:
        return self._conn.unsent_bytes(self.stream_id)

    def _check_writable(self) -> None:
        if self._closed:
            raise ClosedResourceError("stream closed")
        if self._eof_sent:
            raise SendClosedError("stream already closed for sending")
        if self._stop_sending_code is not None:
            raise BrokenResourceError(
                f"peer stopped reading (code {self._stop_sending_code})",
                code=self._stop_sending_code,
            )
        self._conn.raise_if_terminated()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._writing:
            raise BusyResourceError("another task is writing this stream")
        self._writing = True
        try:
            view = memoryview(data).cast("B")
            while True:
                self._check_writable()
                room = settings.SEND_BUFFER - self.unsent_bytes
                if room <= 0:
                    self._send_ready.clear()
                    self._conn.want_send(self)
                    await self._send_ready.wait()
                    continue
                chunk = view[:room]
                self._conn.send_data(self.stream_id, chunk)
                self._conn.transmit_soon()
                view = view[len(chunk) :]
                if not view:
                    return
        finally:
            self._writing = False

    async def send_eof(self) -> None:
        if self._eof_sent or self._closed or self._stop_sending_code is not None:
            return
        if self._conn.terminated:
            return
        self._eof_sent = True
        with contextlib.suppress(Exception):
            self._conn.send_fin(self.stream_id)
            self._conn.transmit_soon()

    def abort(self, error_code: int = 0) -> None:
        if self._closed:
            return
        self._closed = True
        conn = self._conn
        if not conn.terminated:
            if not self._eof_sent and self._stop_sending_code is None:
                with contextlib.suppress(Exception):
                    conn.reset_stream(self.stream_id, error_code)
            if not self.received.eof and self.received.reset is None:
                with contextlib.suppress(Exception):
                    conn.stop_stream(self.stream_id, error_code)
            conn.transmit_soon()
        self._release()

    async def aclose(self) -> None:
        if self._closed:
            return
        await self.send_eof()
        self._closed = True
        conn = self._conn
        if not conn.terminated and not self.received.eof and self.received.reset is None:
            with contextlib.suppress(Exception):
                conn.stop_stream(self.stream_id, 0)
                conn.transmit_soon()
        self._release()

    def _release(self) -> None:
        self.received.close()
        self.wake()
        self._conn.forget(self)
