"""In-memory streams: two connected :class:`Stream` ends, for tests without sockets.

Like trio's ``memory_stream_pair``: each direction is a bounded byte buffer,
so ``send_all`` waits while the peer has not read (backpressure), FIN and
abort behave as on QUIC, and :meth:`MemoryStream.break_` simulates a lost
connection.
"""

from __future__ import annotations

import asyncio

from outrelay.transport.base import (
    BrokenResourceError,
    BusyResourceError,
    ClosedResourceError,
    SendClosedError,
    Stream,
)

__all__ = ["MemoryStream", "memory_stream_pair"]


class _Pipe:
    """One direction: bytes, a FIN flag, a reset flag, a bound."""

    def __init__(self, limit: int) -> None:
        self.buffer = bytearray()
        self.limit = limit
        self.eof = False
        self.broken: str | None = None
        self.code: int | None = None
        """The reset's error code (``abort``); None for a simulated connection loss."""
        self.changed = asyncio.Event()

    def wake(self) -> None:
        self.changed.set()


class MemoryStream(Stream):
    def __init__(self, stream_id: int, incoming: _Pipe, outgoing: _Pipe) -> None:
        self.stream_id = stream_id
        self._in = incoming
        self._out = outgoing
        self._closed = False
        self._eof_sent = False
        self._reading = False
        self._writing = False

    @property
    def unsent_bytes(self) -> int:
        return len(self._out.buffer)

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        if self._reading:
            raise BusyResourceError("another task is reading")
        self._reading = True
        try:
            while True:
                if self._closed:
                    raise ClosedResourceError("stream closed")
                if self._in.buffer:
                    data = bytes(self._in.buffer[:max_bytes])
                    del self._in.buffer[:max_bytes]
                    self._in.wake()
                    return data
                if self._in.broken is not None:
                    raise BrokenResourceError(self._in.broken, code=self._in.code)
                if self._in.eof:
                    return b""
                self._in.changed.clear()
                await self._in.changed.wait()
        finally:
            self._reading = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._writing:
            raise BusyResourceError("another task is writing")
        self._writing = True
        try:
            view = memoryview(data).cast("B")
            while view:
                if self._closed:
                    raise ClosedResourceError("stream closed")
                if self._eof_sent:
                    raise SendClosedError("stream closed for sending")
                if self._out.broken is not None:
                    raise BrokenResourceError(self._out.broken, code=self._out.code)
                room = self._out.limit - len(self._out.buffer)
                if room <= 0:
                    self._out.changed.clear()
                    await self._out.changed.wait()
                    continue
                self._out.buffer += view[:room]
                view = view[room:]
                self._out.wake()
        finally:
            self._writing = False

    async def send_eof(self) -> None:
        if self._eof_sent or self._closed:
            return
        self._eof_sent = True
        self._out.eof = True
        self._out.wake()

    def abort(self, error_code: int = 0) -> None:
        if self._closed:
            return
        self._closed = True
        reason = f"stream reset by peer (code {error_code})"
        for pipe in (self._in, self._out):
            if pipe.broken is None:
                pipe.broken = reason
                pipe.code = error_code
            pipe.buffer.clear()
            pipe.wake()

    async def aclose(self) -> None:
        """FIN, and stop reading: the peer's further writes fail (STOP_SENDING)."""
        await self.send_eof()
        self._closed = True
        if not self._in.eof and self._in.broken is None:
            self._in.broken = "peer stopped reading"
            self._in.buffer.clear()
        self._in.wake()

    def break_(self, reason: str = "connection lost") -> None:
        """Simulate the network dying under both ends."""
        for pipe in (self._in, self._out):
            pipe.broken = reason
            pipe.wake()


def memory_stream_pair(limit: int = 65536, stream_id: int = 0) -> tuple[MemoryStream, MemoryStream]:
    """Two connected streams; each direction buffers at most ``limit`` bytes."""
    a_to_b, b_to_a = _Pipe(limit), _Pipe(limit)
    return MemoryStream(stream_id, b_to_a, a_to_b), MemoryStream(stream_id, a_to_b, b_to_a)
