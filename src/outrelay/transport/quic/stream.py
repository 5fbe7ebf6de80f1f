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

from outrelay.transport.connection_base import BufferedStream
from outrelay.transport.quic import settings

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


class QuicStream(BufferedStream):
    """One bidirectional QUIC stream (see the module docstring)."""

    def __init__(self, conn: StreamOwner, stream_id: int) -> None:
        super().__init__(stream_id)
        self._conn = conn
        self._drained = asyncio.Event()
        self._want_drained = False

    # -- events from the connection ---------------------------------------------------

    def on_data(self, data: bytes, end_stream: bool) -> None:
        if data and self.received.feed_data(data):
            self._conn.on_buffered(self)
        if end_stream:
            self.received.feed_eof()

    def on_reset(self, code: int) -> None:
        self.received.feed_reset(f"stream reset by peer (code {code})", code)

    def on_stop_sending(self, code: int) -> None:
        self.sending.break_(f"peer stopped reading (code {code})", code)

    def poll_send_ready(self) -> bool:
        """After a transmit: wake the writer if there is room again (or it must fail), and
        :meth:`wait_send_buffer_empty` once everything is acknowledged.

        Returns:
            True when nobody needs to be called again.
        """
        unsent, broken = self.unsent_bytes, self.sending.broken is not None
        room = unsent < settings.SEND_BUFFER or broken
        if room:
            self.sending.ready.set()
        if self._want_drained and (unsent == 0 or broken):
            self._want_drained = False
            self._drained.set()
        return room and not self._want_drained

    def wake(self) -> None:
        super().wake()
        self._drained.set()

    async def wait_send_buffer_empty(self) -> None:
        """Wait until the peer has acknowledged every byte sent (woken by transmits,
        not by polling); returns early if the stream or connection breaks."""
        while self.unsent_bytes and self.sending.broken is None and not self._conn.terminated:
            self._drained.clear()
            self._want_drained = True
            self._conn.want_send(self)
            await self._drained.wait()

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

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        gate = self.sending
        with gate.writing():
            view = memoryview(data).cast("B")
            while True:
                gate.check(self._conn.raise_if_terminated)
                room = settings.SEND_BUFFER - self.unsent_bytes
                if room <= 0:
                    gate.ready.clear()
                    self._conn.want_send(self)
                    await gate.ready.wait()
                    continue
                chunk = view[:room]
                self._conn.send_data(self.stream_id, chunk)
                self._conn.transmit_soon()
                view = view[len(chunk) :]
                if not view:
                    return

    async def send_eof(self) -> None:
        gate = self.sending
        if gate.eof_sent or gate.closed or gate.broken is not None or self._conn.terminated:
            return
        gate.eof_sent = True
        with contextlib.suppress(Exception):
            self._conn.send_fin(self.stream_id)
            self._conn.transmit_soon()

    def abort(self, error_code: int = 0) -> None:
        gate = self.sending
        if gate.closed:
            return
        gate.closed = True
        conn = self._conn
        if not conn.terminated:
            if not gate.eof_sent and gate.broken is None:
                with contextlib.suppress(Exception):
                    conn.reset_stream(self.stream_id, error_code)
            if not self.received.eof and self.received.reset is None:
                with contextlib.suppress(Exception):
                    conn.stop_stream(self.stream_id, error_code)
            conn.transmit_soon()
        self._release()

    async def aclose(self) -> None:
        if self.sending.closed:
            return
        await self.send_eof()
        self.sending.closed = True
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
