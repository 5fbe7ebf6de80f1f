"""One yamux stream over TLS/TCP with bounded buffers both ways."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from outrelay.transport.base import (
    BrokenResourceError,
    BusyResourceError,
    ClosedResourceError,
    SendClosedError,
)
from outrelay.transport.connection_base import WakeableStream
from outrelay.transport.receive_buffer import ReceiveBuffer, StreamStatistics
from outrelay.transport.tcp.settings import SEND_CHUNK, WRITE_BUFFER_HIGH
from outrelay.transport.yamux import YamuxError

if TYPE_CHECKING:
    from outrelay.transport.tcp.connection import TcpConn

__all__ = ["TcpStream"]


class TcpStream(WakeableStream):
    """One yamux stream with bounded buffers both ways."""

    def __init__(self, conn: TcpConn, stream_id: int) -> None:
        self.stream_id = stream_id
        self._conn = conn
        self.received = ReceiveBuffer()
        """What arrived and is not read yet (the connection feeds it)."""
        self._send_ready = asyncio.Event()
        self._writing = False
        self._eof_sent = False
        self._closed = False

    # -- events from the connection ---------------------------------------------

    def on_data(self, data: bytes) -> None:
        if not self.received.feed_data(data):
            # Closed: discard and credit at once (yamux has no STOP_SENDING).
            self._conn._core.acknowledge_received(self.stream_id, len(data))

    def on_eof(self) -> None:
        self.received.feed_eof()

    def on_reset(self, reason: str, code: int = 0) -> None:
        self.received.feed_reset(f"stream {reason}", code)
        self.wake()

    def on_window_update(self) -> None:
        self._send_ready.set()

    def wake(self) -> None:
        self.received.wake()
        self._send_ready.set()

    def statistics(self) -> StreamStatistics:
        return self.received.statistics(unsent=self.unsent_bytes, eof_sent=self._eof_sent)

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

    def _check_writable(self) -> None:
        if self._closed:
            raise ClosedResourceError("stream closed")
        if self._eof_sent:
            raise SendClosedError("stream already closed for sending")
        if self.received.reset is not None:
            message, code = self.received.reset
            raise BrokenResourceError(message, code=code)
        self._conn.raise_if_terminated()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._writing:
            raise BusyResourceError("another task is writing this stream")
        self._writing = True
        try:
            view = memoryview(data).cast("B")
            core = self._conn._core
            since_yield = 0
            while True:
                self._check_writable()
                if not view:
                    return
                if not self._conn._writable.is_set():
                    await self._conn._writable.wait()
                    continue
                if core.send_window(self.stream_id) == 0:
                    self._send_ready.clear()
                    await self._send_ready.wait()
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
        finally:
            self._writing = False

    async def send_eof(self) -> None:
        if self._eof_sent or self._closed or self.received.reset is not None:
            return
        self._eof_sent = True
        if self._conn.terminated:
            return
        with contextlib.suppress(YamuxError):
            self._conn._core.end_stream(self.stream_id)
        self._send_ready.set()
        self._conn._flush()
        self._conn._maybe_forget(self)

    def abort(self, error_code: int = 0) -> None:
        """Reset both directions (yamux RST, ``error_code`` in its length field)."""
        if self._closed:
            return
        self._closed = True
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
        if self._closed:
            return
        await self.send_eof()
        self._closed = True
        unread = self.received.close()
        self.wake()
        conn = self._conn
        if conn._core.stream_state(self.stream_id) is None or conn.terminated:
            conn._streams.pop(self.stream_id, None)
            return
        conn._consumed(self.stream_id, unread)
