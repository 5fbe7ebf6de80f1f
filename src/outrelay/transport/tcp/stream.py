"""One yamux stream over TLS/TCP with bounded buffers both ways.

The buffering, half-close and error rules live here; the yamux session, the
socket and the connection's bookkeeping are the connection's
(:class:`~outrelay.transport.tcp.connection.TcpConn`), reached only through the
:class:`StreamOwner` interface.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from outrelay.transport.base import BrokenResourceError
from outrelay.transport.connection_base import BufferedStream
from outrelay.transport.tcp.settings import SEND_CHUNK, WRITE_BUFFER_HIGH
from outrelay.transport.yamux import YamuxError

__all__ = ["StreamOwner", "TcpStream"]


class StreamOwner(Protocol):
    """What a :class:`TcpStream` needs from its connection."""

    @property
    def terminated(self) -> bool: ...

    @property
    def writable(self) -> asyncio.Event:
        """Set while the socket takes more bytes (its write buffer is below the high mark)."""
        ...

    def raise_if_terminated(self) -> None:
        """Raise the connection's error once it ended."""

    def send_window(self, stream_id: int) -> int:
        """Bytes the peer lets us send on the stream now."""
        ...

    def send_data(self, stream_id: int, data: memoryview) -> int:
        """Queue what the window allows of ``data`` and write it out; the bytes taken.

        Raises:
            YamuxError: the stream is gone.
        """
        ...

    def send_fin(self, stream_id: int) -> None:
        """Queue FIN (nothing if the stream is gone) and write it out."""

    def reset_stream(self, stream_id: int, code: int) -> None:
        """Queue RST with ``code`` and write it out (the connection is still up)."""

    def unsent_bytes(self, stream_id: int) -> int:
        """Bytes sent on the stream that the peer has not credited back yet."""
        ...

    def on_consumed(self, stream_id: int, n: int) -> None:
        """The application took ``n`` bytes: give the peer that credit now."""

    def on_discarded(self, stream_id: int, n: int) -> None:
        """``n`` bytes arrived for a closed stream and were dropped: credit them with the
        connection's next write (called while it handles incoming frames)."""

    def forget(self, stream: TcpStream) -> None:
        """``stream`` is done: stop tracking it."""

    def forget_if_ended(self, stream: TcpStream) -> bool:
        """Forget ``stream`` if yamux has closed both its directions; whether it did."""
        ...


class TcpStream(BufferedStream):
    """One yamux stream with bounded buffers both ways."""

    def __init__(self, conn: StreamOwner, stream_id: int) -> None:
        super().__init__(stream_id)
        self._conn = conn

    # -- events from the connection ---------------------------------------------

    def on_data(self, data: bytes) -> None:
        if not self.received.feed_data(data):
            # Closed: discard and credit at once (yamux has no STOP_SENDING).
            self._conn.on_discarded(self.stream_id, len(data))

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
            self._conn.on_consumed(self.stream_id, len(chunk))
        return chunk

    # -- writing ------------------------------------------------------------------

    @property
    def unsent_bytes(self) -> int:
        """Bytes sent that the peer has not credited back (read) yet."""
        return self._conn.unsent_bytes(self.stream_id)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        gate = self.sending
        with gate.writing():
            view = memoryview(data).cast("B")
            conn = self._conn
            writable = conn.writable
            since_yield = 0
            try:
                while True:
                    gate.check(conn.raise_if_terminated)
                    if not view:
                        return
                    if not writable.is_set():
                        await writable.wait()
                        continue
                    if conn.send_window(self.stream_id) == 0:
                        gate.ready.clear()
                        await gate.ready.wait()
                        continue
                    n = conn.send_data(self.stream_id, view[:SEND_CHUNK])
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
        gate.ready.set()
        self._conn.send_fin(self.stream_id)
        self._conn.forget_if_ended(self)

    def abort(self, error_code: int = 0) -> None:
        """Reset both directions (yamux RST, ``error_code`` in its length field)."""
        if self.sending.closed:
            return
        self.sending.closed = True
        conn = self._conn
        if not conn.terminated:
            conn.reset_stream(self.stream_id, error_code)
        self.received.close()
        self.wake()
        conn.forget(self)

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
        if conn.terminated:
            conn.forget(self)
        elif not conn.forget_if_ended(self):
            conn.on_consumed(self.stream_id, unread)
