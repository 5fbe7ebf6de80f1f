"""The yamux connection: a :class:`~outrelay.transport.yamux.YamuxSession` driven by asyncio.

:class:`TcpConn` feeds the sans-IO session the bytes its protocol
(:mod:`outrelay.transport.tcp.tls_shell`) decrypted, turns the session's
events into stream wake-ups, and writes what the session queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from outrelay.transport.base import BrokenResourceError
from outrelay.transport.connection_base import ConnectionBase
from outrelay.transport.tcp.settings import WRITE_BUFFER_MAX
from outrelay.transport.tcp.stream import TcpStream
from outrelay.transport.yamux import (
    ConnectionEnded,
    DataReceived,
    GoAwayCode,
    GoAwayReceived,
    PingAcknowledged,
    StreamEnded,
    StreamOpened,
    StreamReset,
    StreamState,
    WindowUpdated,
    YamuxConfig,
    YamuxError,
    YamuxSession,
    YamuxStatistics,
)

if TYPE_CHECKING:
    from outrelay.transport.tcp.tls_shell import YamuxProtocol

__all__ = ["TcpConn"]

log = logging.getLogger("outrelay.transport.tcp")


class TcpConn(ConnectionBase[TcpStream]):
    """A :class:`Connection` over one TLS (or plaintext) yamux session."""

    def __init__(self, protocol: YamuxProtocol, *, client: bool, config: YamuxConfig | None):
        super().__init__()
        self._protocol = protocol
        self._core = YamuxSession(client=client, config=config)
        self._open_lock = asyncio.Lock()
        self._open_ready = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._pings: dict[int, asyncio.Future[None]] = {}
        self._ping_seq = 0

    # -- Connection API -----------------------------------------------------------

    async def open_stream(self) -> TcpStream:
        """Open a stream (SYN). Waits while 256 of our SYNs await the peer's ACK.

        Raises:
            BrokenResourceError: the connection died, or the peer sent GO_AWAY.
            ClosedResourceError: we closed the connection.
        """
        async with self._open_lock:
            core = self._core
            while True:
                self.raise_if_terminated()
                if core.remote_go_away is not None:
                    raise BrokenResourceError("peer sent GO_AWAY: it accepts no new streams")
                if core.can_open_stream:
                    break
                self._open_ready.clear()
                await self._open_ready.wait()
            try:
                stream_id = core.open_stream()
            except YamuxError as exc:
                raise BrokenResourceError(str(exc)) from exc
            stream = TcpStream(self, stream_id)
            self._streams[stream_id] = stream
            self._flush()
            return stream

    def close(self, error_code: int = 0, reason: str = "") -> None:
        """Send GO_AWAY (normal), TLS close_notify, and close the socket.

        yamux has no application close code; ``error_code`` and ``reason`` only
        go into :attr:`close_reason`.
        """
        if self._terminated:
            return
        if not self._core.terminated:
            self._core.go_away(GoAwayCode.NORMAL)
        self._flush()
        detail = f"code {error_code}" + (f": {reason}" if reason else "")
        self._local_close = True
        self._terminate(f"closed locally ({detail})")
        self._protocol.close_transport()

    # -- beyond the interface ------------------------------------------------------

    async def ping(self) -> float:
        """Send a yamux PING and return the round-trip time in seconds.

        Waits for the reply as long as the connection lives; bound it with
        ``asyncio.timeout``.

        Raises:
            BrokenResourceError / ClosedResourceError: the connection ended.
        """
        self.raise_if_terminated()
        loop = asyncio.get_running_loop()
        self._ping_seq = (self._ping_seq + 1) & 0xFFFF_FFFF
        opaque = self._ping_seq
        waiter: asyncio.Future[None] = loop.create_future()
        self._pings[opaque] = waiter
        start = loop.time()
        try:
            self._core.ping(opaque)
            self._flush()
            await waiter
        finally:
            self._pings.pop(opaque, None)
        self.raise_if_terminated()
        return loop.time() - start

    def go_away(self) -> None:
        """Tell the peer to open no more streams (GO_AWAY normal); ours go on."""
        if not self._terminated:
            self._core.go_away(GoAwayCode.NORMAL)
            self._flush()

    def statistics(self) -> YamuxStatistics:
        return self._core.statistics()

    def stream_state(self, stream_id: int) -> StreamState | None:
        """The yamux state of the stream, or ``None`` once it is closed, reset or unknown."""
        return self._core.stream_state(stream_id)

    def receive_window(self, stream_id: int) -> int:
        """The stream's receive window now (grows with auto-tuning).

        Raises:
            YamuxError: the stream is closed, reset or unknown.
        """
        return self._core.receive_window(stream_id)

    @property
    def write_buffer_size(self) -> int:
        """Bytes written to the socket that the kernel has not taken yet (TLS records)."""
        return self._protocol.write_buffer_size()

    # -- StreamOwner: what TcpStream calls ------------------------------------------

    @property
    def writable(self) -> asyncio.Event:
        """Set while the socket takes more bytes (cleared by the protocol's pause_writing)."""
        return self._writable

    def send_window(self, stream_id: int) -> int:
        return self._core.send_window(stream_id)

    def send_data(self, stream_id: int, data: memoryview) -> int:
        n = self._core.send_data(stream_id, data)
        self._flush()
        return n

    def send_fin(self, stream_id: int) -> None:
        with contextlib.suppress(YamuxError):
            self._core.end_stream(stream_id)
        self._flush()

    def reset_stream(self, stream_id: int, code: int) -> None:
        self._core.reset_stream(stream_id, code)
        self._flush()

    def unsent_bytes(self, stream_id: int) -> int:
        return self._core.unacknowledged_bytes(stream_id)

    def on_consumed(self, stream_id: int, n: int) -> None:
        if n and not self._terminated:
            self._core.acknowledge_received(stream_id, n)
            self._flush()

    def on_discarded(self, stream_id: int, n: int) -> None:
        self._core.acknowledge_received(stream_id, n)  # _pump flushes after its events

    def forget(self, stream: TcpStream) -> None:
        self._streams.pop(stream.stream_id, None)
        self._open_ready.set()

    def forget_if_ended(self, stream: TcpStream) -> bool:
        if self._core.stream_state(stream.stream_id) is not None:
            return False
        self.forget(stream)
        return True

    # -- internals ----------------------------------------------------------------

    def _flush(self) -> None:
        data = self._core.data_to_send()
        if data:
            self._protocol.write(data)
            if self._protocol.write_buffer_size() > WRITE_BUFFER_MAX:
                self._fail(f"peer is not reading: over {WRITE_BUFFER_MAX} bytes unsent")

    def _feed(self, data: bytes) -> None:
        if self._terminated:
            return
        try:
            self._core.receive_data(data)
        except YamuxError as exc:
            self._pump()
            self._fail(f"yamux protocol error: {exc}")
            return
        self._pump()

    def _pump(self) -> None:
        core = self._core
        streams = self._streams
        while (event := core.next_event()) is not None:
            if isinstance(event, DataReceived):
                stream = streams.get(event.stream_id)
                if stream is None:
                    core.acknowledge_received(event.stream_id, len(event.data))
                else:
                    stream.on_data(event.data)
            elif isinstance(event, WindowUpdated):
                if (stream := streams.get(event.stream_id)) is not None:
                    stream.on_window_update()
            elif isinstance(event, StreamOpened):
                self._queue_accepted(event.stream_id, TcpStream(self, event.stream_id))
            elif isinstance(event, StreamEnded):
                if (stream := streams.get(event.stream_id)) is not None:
                    stream.on_eof()
                    self.forget_if_ended(stream)
            elif isinstance(event, StreamReset):
                if (stream := streams.pop(event.stream_id, None)) is not None:
                    stream.on_reset(event.reason, event.code)
            elif isinstance(event, PingAcknowledged):
                waiter = self._pings.get(event.opaque)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            elif isinstance(event, GoAwayReceived):
                if event.error_code != GoAwayCode.NORMAL:
                    self._fail(f"peer sent GO_AWAY ({_go_away_name(event.error_code)})")
            elif isinstance(event, ConnectionEnded):
                detail = self._protocol.eof_detail
                if not event.clean:
                    detail += " in the middle of a yamux frame"
                self._fail(f"peer closed the connection ({detail})")
            # StreamAcknowledged, PingReceived: nothing to do beyond waking openers.
        self._open_ready.set()
        self._flush()

    def _fail(self, reason: str) -> None:
        if self._terminated:
            return
        log.debug("yamux connection failed: %s", reason)
        self._terminate(reason)
        self._protocol.close_transport()

    def _on_connection_lost(self, exc: BaseException | None) -> None:
        if not self._terminated:
            self._terminate(f"connection lost ({exc or 'socket closed'})")

    def _release_waiters(self) -> None:
        self._open_ready.set()
        self._writable.set()
        for waiter in self._pings.values():
            if not waiter.done():
                waiter.set_result(None)


def _go_away_name(code: int) -> str:
    try:
        return f"{code}, {GoAwayCode(code).name.lower().replace('_', ' ')}"
    except ValueError:
        return str(code)
