"""What the aioquic and qh3 connections share: events in, streams out, termination.

:class:`QuicConnBase` maps the QUIC library's events (aioquic's and qh3's
share names and fields) onto :class:`~outrelay.transport.quic.stream.QuicStream`
objects, and implements the part of the :class:`StreamOwner` interface that
does not depend on the library. The library's part is in
:mod:`outrelay.transport.quic.protocol` (aioquic) and
:mod:`outrelay.transport.quic.qh3`.
"""

from __future__ import annotations

import abc
import asyncio
from collections import deque
from typing import Any

from aioquic.quic import events

from outrelay.transport.addresses import fold_address
from outrelay.transport.base import BrokenResourceError, CertificateError
from outrelay.transport.connection_base import ConnectionBase
from outrelay.transport.quic import settings
from outrelay.transport.quic.stream import QuicStream

__all__ = [
    "CRYPTO_ERROR",
    "QuicConnBase",
    "close_phrase",
    "describe_close",
    "handshake_failed",
]

CRYPTO_ERROR = 0x100
"""QUIC transport error codes 0x100-0x1ff carry a TLS alert (RFC 9001 §4.8)."""
TLS_ALERTS = {
    40: "handshake_failure",
    42: "bad_certificate",
    43: "unsupported_certificate",
    44: "certificate_revoked",
    45: "certificate_expired",
    46: "certificate_unknown",
    48: "unknown_ca",
    80: "internal_error",
    116: "certificate_required",
    120: "no_application_protocol",
}
CERTIFICATE_ALERTS = frozenset({42, 43, 44, 45, 46, 48})
FORGOTTEN_STREAMS = 4096
"""Peer stream ids we closed and still recognise (the most recent ones): a
frame that arrives for one after we closed it (a FIN or bytes the peer sent
before our STOP_SENDING reached it) is dropped instead of looking like a
new incoming stream. aioquic keeps such a stream in its table until both
directions are acknowledged and qh3 exposes no table at all, so neither
library can tell us."""


class QuicConnBase(ConnectionBase[QuicStream]):
    """State, termination, accepting, waking writers and openers (both libraries)."""

    _events: Any = events
    """The QUIC library's event classes."""
    _quic: Any
    """The library's connection core (aioquic's or qh3's), set by the subclass."""

    def __init__(self, protocol: Any) -> None:
        super().__init__()
        self._protocol = protocol
        self._want_send: set[QuicStream] = set()
        self._open_lock = asyncio.Lock()
        self._streams_available = asyncio.Event()
        self._peer_close_code: int | None = None
        self._close_code: int | None = None
        """The error code of the CONNECTION_CLOSE that ended the connection, if any."""
        self._forgotten: set[int] = set()
        self._forgotten_order: deque[int] = deque()
        """Peer streams we closed, the last ``FORGOTTEN_STREAMS`` of them."""

    @property
    def peer_close_code(self) -> int | None:
        return self._peer_close_code

    @property
    def awaiting_ack(self) -> bool:
        """Packets the peer must acknowledge are in flight (what keep-alive's busy rule sees)."""
        return self._protocol.probe_timeout_in_flight() is not None

    @property
    def close_code(self) -> int | None:
        """The code of the CONNECTION_CLOSE that ended the connection (either side), if any."""
        return self._close_code

    @property
    def local_address(self) -> tuple[str, int] | None:
        """Our (ip, port): where the connection's UDP socket is bound (None if unknown)."""
        sockname = self._protocol.sockname
        return fold_address(sockname) if sockname else None

    # -- the library's part (see StreamOwner for the stream hooks) -----------------------

    @abc.abstractmethod
    def _is_client(self) -> bool: ...

    @abc.abstractmethod
    def _is_new_peer_stream(self, stream_id: int) -> bool:
        """Data arrived on a peer stream we do not know: is it a new one to accept?"""

    @abc.abstractmethod
    def _remote_bidi_limit(self) -> int:
        """How many bidirectional streams the peer lets us open (its MAX_STREAMS)."""

    async def _new_stream(self) -> QuicStream:
        """Take the next stream id, waiting while the peer's stream limit is reached.

        The caller holds ``_open_lock`` and makes the library allocate the id.
        """
        while True:
            self.raise_if_terminated()
            stream_id = int(self._quic.get_next_available_stream_id())
            if stream_id // 4 < self._remote_bidi_limit():
                break
            self._streams_available.clear()
            await self._streams_available.wait()
        stream = QuicStream(self, stream_id)
        self._streams[stream_id] = stream
        return stream

    @abc.abstractmethod
    def unsent_bytes(self, stream_id: int) -> int: ...

    @abc.abstractmethod
    def send_data(self, stream_id: int, data: memoryview) -> None: ...

    @abc.abstractmethod
    def send_fin(self, stream_id: int) -> None: ...

    @abc.abstractmethod
    def reset_stream(self, stream_id: int, code: int) -> None: ...

    @abc.abstractmethod
    def stop_stream(self, stream_id: int, code: int) -> None: ...

    @abc.abstractmethod
    def on_buffered(self, stream: QuicStream) -> None: ...

    @abc.abstractmethod
    def on_consumed(self, stream: QuicStream) -> None: ...

    # -- StreamOwner (the library-neutral part) -----------------------------------------

    def transmit_soon(self) -> None:
        self._protocol.transmit_soon()

    def send_datagram(self, data: bytes) -> bool:
        """A QUIC DATAGRAM frame (RFC 9221), when the peer allows one of this size."""
        backlog = self._protocol.datagram_backlog()
        if self._terminated or backlog is None or len(data) > settings.DATAGRAM_PAYLOAD_MAX:
            return False
        if backlog >= settings.DATAGRAM_QUEUE_MAX:
            self.datagrams_dropped += 1  # a flood: drop, never queue more
            return True
        self._protocol.quic.send_datagram_frame(data)
        self.transmit_soon()
        return True

    datagrams_dropped = 0
    """DATAGRAM frames dropped because the library's queue was full."""

    def want_send(self, stream: QuicStream) -> None:
        self._want_send.add(stream)

    def forget(self, stream: QuicStream) -> None:
        self._want_send.discard(stream)
        stream_id = stream.stream_id
        self._streams.pop(stream_id, None)
        if self._is_peer_stream(stream_id) and stream_id not in self._forgotten:
            self._forgotten.add(stream_id)
            self._forgotten_order.append(stream_id)
            if len(self._forgotten_order) > FORGOTTEN_STREAMS:
                self._forgotten.discard(self._forgotten_order.popleft())

    # -- events from the protocol --------------------------------------------------------

    def on_event(self, event: Any) -> None:
        ev = self._events
        if isinstance(event, ev.StreamDataReceived):
            stream = self._streams.get(event.stream_id)
            if stream is None:
                if event.stream_id & 2 or not self._is_peer_stream(event.stream_id):
                    return  # unidirectional (never used by ORP) or our own, forgotten
                if event.stream_id in self._forgotten or not self._is_new_peer_stream(
                    event.stream_id
                ):
                    return  # a late frame for a stream we already closed
                stream = QuicStream(self, event.stream_id)
                self._queue_accepted(event.stream_id, stream)
            stream.on_data(event.data, event.end_stream)
        elif isinstance(event, ev.StreamReset):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.on_reset(event.error_code)
        elif isinstance(event, ev.StopSendingReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.on_stop_sending(event.error_code)
        elif isinstance(event, ev.DatagramFrameReceived):
            handler = self.on_datagram
            if handler is not None:
                handler(event.data)
        elif isinstance(event, ev.ConnectionTerminated):
            if not self._terminated:
                self._close_code = event.error_code
                if event.frame_type is None:
                    # An application CONNECTION_CLOSE from the peer (transport
                    # errors and idle timeouts carry a frame type).
                    self._peer_close_code = event.error_code
            self._terminate(describe_close(event.error_code, event.reason_phrase or ""))

    def on_progress(self) -> None:
        """After every transmit: wake writers whose buffer drained, and openers."""
        if self._want_send:
            for stream in list(self._want_send):
                if stream.poll_send_ready():
                    self._want_send.discard(stream)
        if self._open_lock.locked():
            self._streams_available.set()

    def _is_peer_stream(self, stream_id: int) -> bool:
        client_initiated = stream_id % 2 == 0
        return client_initiated != self._is_client()

    def _closed_locally(self, error_code: int, reason: str) -> str:
        self._local_close = True
        return f"closed locally (code {error_code}{': ' + reason if reason else ''})"

    def _release_waiters(self) -> None:
        self._streams_available.set()
        self._protocol.stop_timers()
        handshake = self._protocol.handshake
        if not handshake.done():
            handshake.set_exception(BrokenResourceError(self._close_reason))
            handshake.exception()  # retrieved: nobody may be waiting any more


def describe_close(code: int, reason: str) -> str:
    """A CONNECTION_CLOSE for a log line: ``code 0: reason``, or with the TLS alert named."""
    detail = f"code {code}"
    if CRYPTO_ERROR <= code < CRYPTO_ERROR + 0x100:
        alert = code - CRYPTO_ERROR
        detail += f" (TLS alert {alert} {TLS_ALERTS.get(alert, 'unknown')})"
    return detail + (f": {reason}" if reason else "")


def handshake_failed(conn: QuicConnBase, name: str, exc: BaseException) -> BrokenResourceError:
    """The error for a client handshake that failed (aioquic's or qh3's).

    A certificate alert during our handshake means that *we* rejected the
    server's certificate (in TLS 1.3 the server judges ours after our
    handshake is complete): :class:`CertificateError` with the library's reason,
    e.g. ``unable to get local issuer certificate``.
    """
    code = conn.close_code
    detail = conn.close_reason or repr(exc)
    if code is not None and code - CRYPTO_ERROR in CERTIFICATE_ALERTS:
        return CertificateError(
            f"QUIC handshake with {name} failed: the server's certificate does not verify: {detail}"
        )
    return BrokenResourceError(f"QUIC handshake with {name} failed: {detail}")


def close_phrase(reason: str) -> str:
    """``reason`` cut to ``CLOSE_REASON_MAX`` UTF-8 bytes, for a CONNECTION_CLOSE."""
    data = reason.encode()
    if len(data) <= settings.CLOSE_REASON_MAX:
        return reason
    return data[: settings.CLOSE_REASON_MAX - 3].decode(errors="ignore") + "..."
