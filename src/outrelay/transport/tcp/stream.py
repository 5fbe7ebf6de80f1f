"""One yamux stream over TLS/TCP with bounded buffers both ways."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from outrelay.transport.base import (
    BrokenResourceError,
)
from outrelay.transport.connection_base import BufferedStream
from outrelay.transport.tcp.settings import SEND_CHUNK, WRITE_BUFFER_HIGH
from outrelay.transport.yamux import YamuxError

if TYPE_CHECKING:
    from outrelay.transport.tcp.connection import TcpConn

__all__ = ["TcpStream"]


class TcpStream(BufferedStream):
    """One yamux stream with bounded buffers both ways."""

    def __init__(self, conn: TcpConn, stream_id: int) -> None:
        super().__init__(stream_id)
        self._conn = conn

    # -- events from the connection ---------------------------------------------

    def on_data(self, data: bytes) -> None:
        if not self.received.feed_data(data):
            # Closed: discard and credit at once (yamux has no STOP_SENDING).
            self._conn._core.acknowledge_received(self.stream_id, len(data))

    def on_eof(self) -> None:
        self.received.feed_eof()

    def on_reset(self, reason: str, code: int = 0) -> None:
        self.received.feed_reset(f"stream {reason}", code)
        self.sending.break_(f"stream {reason}", code)

    def on_window_update(self) -> None:
        self.sending.ready.set()

    # -- reading ------------------------------------------------------------------

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        chunk = await self.received.receive_some(max_bytes, self._conn.raise_if_terminated)
        if chunk:
            self._conn._consumed(self.stream_id, len(chunk))
        return chunk

    # -- writing ------------------------------------------------------------------

    @property
    def unsent_bytes(self) -> int:
        """Bytes sent that the peer has not credited back (read) yet."""
        return self._conn._core.unacknowledged_bytes(self.stream_id)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        gate = self.sending
        with gate.writing():
            view = memoryview(data).cast("B")
            core = self._conn._core
            since_yield = 0
            try:
                while True:
                    gate.check(self._conn.raise_if_terminated)
                    if not view:
                        return
                    if not self._conn._writable.is_set():
                        await self._conn._writable.wait()
                        continue
                    if core.send_window(self.stream_id) == 0:
                        gate.ready.clear()
                        await gate.ready.wait()
                        continue
                    n = core.send_data(self.stream_id, view[:SEND_CHUNK])
                    self._conn._flush()
                    view = view[n:]
                    since_yield += n
                    if since_yield >= WRITE_BUFFER_HIGH and view:
                        # A fast socket never pauses us; let other tasks run.
                        since_yield = 0
                        await asyncio.sleep(0)
            except YamuxError as exc:  # the stream vanished between checks
                raise BrokenResourceError(f"stream {self.stream_id} is gone: {exc}") from exc

    async def send_eof(self) -> None:
        gate = self.sending
        if gate.eof_sent or gate.closed or gate.broken is not None:
            return
        gate.eof_sent = True
        if self._conn.terminated:
            return
        with contextlib.suppress(YamuxError):
            self._conn._core.end_stream(self.stream_id)
        gate.ready.set()
        self._conn._flush()
        self._conn._maybe_forget(self)

    def abort(self, error_code: int = 0) -> None:
        """Reset both directions (yamux RST, ``error_code`` in its length field)."""
        if self.sending.closed:
            return
        self.sending.closed = True
        conn = self._conn
        if not conn.terminated:
            conn._core.reset_stream(self.stream_id, error_code)
            conn._flush()
        self.received.close()
        self.wake()
        conn._forget(self)

    async def aclose(self) -> None:
        """FIN if not yet sent; then stop reading.

        yamux has no STOP_SENDING: if the peer is still sending, what it sends
        is discarded and credited back at once, so its writer finishes
        instead of hanging, until its FIN ends the stream.
        """
        if self.sending.closed:
            return
        await self.send_eof()
        self.sending.closed = True
        unread = self.received.close()
        self.wake()
        conn = self._conn
        if conn._core.stream_state(self.stream_id) is None or conn.terminated:
            conn._streams.pop(self.stream_id, None)
            return
        conn._consumed(self.stream_id, unread)
