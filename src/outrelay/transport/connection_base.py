"""What the QUIC and TCP+yamux connections share: termination, accepting, peer info.

A backend's connection subclasses :class:`ConnectionBase`, keeps its streams
in ``_streams`` and queues peer-opened ones with :meth:`_queue_accepted`;
when the connection ends (locally or not) it calls :meth:`_terminate` once,
which wakes every stream, fails ``accept_stream`` and runs the close
callbacks. :meth:`_release_waiters` is the backend's hook for its own
waiters (openers, writers, pings) in between.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

from outrelay.transport.base import (
    BrokenResourceError,
    ClosedResourceError,
    Connection,
    PeerInfo,
    Stream,
)
from outrelay.transport.receive_buffer import ReceiveBuffer, StreamStatistics
from outrelay.transport.send_gate import SendGate

__all__ = ["BufferedStream", "ConnectionBase"]


class BufferedStream(Stream):
    """A QUIC or yamux stream: a :class:`ReceiveBuffer` and a :class:`SendGate`.

    The connection feeds ``received`` and wakes the stream when it ends; the
    backend subclass moves the bytes.
    """

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        self.received = ReceiveBuffer()
        """What arrived and is not read yet (the connection feeds it)."""
        self.sending = SendGate()
        """Writer state; ``sending.ready`` wakes a waiting writer."""

    def wake(self) -> None:
        """Let waiting readers and writers look again (the connection ended)."""
        self.received.wake()
        self.sending.ready.set()

    def statistics(self) -> StreamStatistics:
        return self.received.statistics(unsent=self.unsent_bytes, eof_sent=self.sending.eof_sent)


S = TypeVar("S", bound=BufferedStream)


class ConnectionBase(Connection, Generic[S]):
    """Connection state common to the backends (see the module docstring)."""

    def __init__(self) -> None:
        self._streams: dict[int, S] = {}
        self._accept_queue: asyncio.Queue[S | None] = asyncio.Queue()
        self._terminated = False
        self._local_close = False
        self._close_reason = ""
        self._closed_event = asyncio.Event()
        self._peer = PeerInfo(address=("", 0))
        self._on_closed: list[Callable[[], None]] = []
        self.identity: str | None = None
        """Server side: the verified client identity (first URI SAN)."""

    # -- Connection API ----------------------------------------------------------------

    @property
    def peer(self) -> PeerInfo:
        return self._peer

    @property
    def is_closed(self) -> bool:
        return self._terminated

    @property
    def terminated(self) -> bool:
        """True once the connection ended, however it ended."""
        return self._terminated

    @property
    def close_reason(self) -> str:
        return self._close_reason

    async def accept_stream(self) -> S:
        stream = await self._accept_queue.get()
        if stream is None:
            self._accept_queue.put_nowait(None)  # wake the next waiter too
            self.raise_if_terminated()
            raise BrokenResourceError("connection closed")
        return stream

    async def wait_closed(self) -> None:
        await self._closed_event.wait()

    def add_close_callback(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once, when the connection ends."""
        self._on_closed.append(callback)

    def has_stream(self, stream_id: int) -> bool:
        """Whether the connection still tracks the stream (hands it what arrives for it);
        False once the stream is done and forgotten."""
        return stream_id in self._streams

    # -- for streams and the backend ---------------------------------------------------

    def raise_if_terminated(self) -> None:
        """Raises ClosedResourceError (we closed) or BrokenResourceError once ended."""
        if self._terminated:
            if self._local_close:
                raise ClosedResourceError(self._close_reason)
            raise BrokenResourceError(f"connection lost: {self._close_reason}")

    def _queue_accepted(self, stream_id: int, stream: S) -> None:
        self._streams[stream_id] = stream
        self._accept_queue.put_nowait(stream)

    def _release_waiters(self) -> None:
        """The backend's waiters beyond streams and acceptors (called by ``_terminate``)."""

    def _terminate(self, reason: str) -> None:
        """End the connection: wake everyone, then run the close callbacks (once)."""
        if self._terminated:
            return
        self._terminated = True
        self._close_reason = reason
        for stream in list(self._streams.values()):
            stream.wake()
        self._accept_queue.put_nowait(None)
        self._closed_event.set()
        self._release_waiters()
        callbacks, self._on_closed = self._on_closed, []
        for callback in callbacks:
            callback()
