"""QUIC backend of the transport interface, on aioquic.

Spec 01 "QUIC transport" and spec 02 §2.1: ALPN ``orp/1``, TLS 1.3, client
certificate required by the relay, max idle 10 s, keep-alive every 3 s,
handshake 5 s, 100 concurrent peer-initiated bidirectional streams.

What aioquic does not do for us, and this module adds (DESIGN.md):

* **Client certificates.** aioquic's TLS context has a private switch to send
  a CertificateRequest and never verifies a client chain (it even accepts an
  empty Certificate). The server side flips the switch and verifies the
  chain itself with :class:`outrelay.pki.ClientVerifier` once the handshake
  completes; a refused client gets CONNECTION_CLOSE with application code 0
  and the reason as its reason phrase (``bad client certificate: ...``). With
  TLS 1.3 the client has finished its handshake by then, so this close, not
  a handshake failure, is what tells it; a reference relay sends an empty
  reason.
* **Receive backpressure.** aioquic raises a stream's receive window when
  bytes *arrive* (doubling without bound). We return credit when the
  application *consumes* bytes: the window is always ``consumed +
  STREAM_WINDOW``, so a slow reader caps what the peer can push.
* **Send backpressure.** ``send_all`` waits while the stream's unacknowledged
  bytes exceed ``SEND_BUFFER``.
* **Stream limit.** ``open_stream`` waits while the peer's MAX_STREAMS is
  reached, instead of queueing data on a blocked stream.
* **Keep-alive.** A PING every 3 s keeps NATs and the relay's idle timer warm.
* **Bounded pre-authentication work** (:class:`_GuardedServer`). aioquic's
  server builds a connection for every Initial-shaped datagram of 1200+
  bytes, never validates addresses unless told to, and keeps a connection
  whose handshake never completes for its idle timeout plus a closing
  period. Ours routes datagrams of known connections first (a short header
  costs one slice and one dict lookup), drops what cannot start a handshake
  before parsing it further (short, wrong version, not an Initial), asks
  :class:`outrelay.transport.admission.QuicAdmission` before it allocates
  anything (caps, per-source rate, stateless Retry under pressure or
  always), forgets a connection at once when its first Initial does not
  decrypt, and at the handshake deadline (:data:`HANDSHAKE_TIMEOUT`) frees
  the connection without a closing period.

This is the only module that touches aioquic; its errors come out as
:mod:`outrelay.transport.base` errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import types
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from aioquic._buffer import Buffer
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic import events
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import QuicConnection, QuicConnectionState
from aioquic.quic.packet import (
    QuicFrameType,
    QuicPacketType,
    QuicStreamFrame,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.packet_builder import QuicDeliveryState
from aioquic.quic.retry import QuicRetryTokenHandler

from outrelay.transport._chunks import take_chunks
from outrelay.transport.admission import QuicAdmission, RetryMode, Verdict
from outrelay.transport.base import (
    BrokenResourceError,
    BusyResourceError,
    CertificateError,
    ClosedResourceError,
    Connection,
    PeerInfo,
    SendClosedError,
    Stream,
)
from outrelay.transport.udp import BatchDatagramTransport, defer_transmit

if TYPE_CHECKING:
    from aioquic.quic.packet_builder import QuicPacketBuilder
    from aioquic.quic.recovery import QuicPacketSpace
    from aioquic.quic.stream import QuicStream as _AioStream
    from cryptography import x509

__all__ = [
    "ALPN",
    "FORWARD_ALPN",
    "HANDSHAKE_TIMEOUT",
    "IDLE_TIMEOUT",
    "KEEPALIVE_INTERVAL",
    "MAX_INCOMING_STREAMS",
    "PacketEndpoint",
    "QuicServerHandle",
    "QuicTlsConfig",
    "RetryMode",
    "accept_quic_on",
    "connect_quic",
    "connect_quic_on",
    "serve_quic",
]

log = logging.getLogger("outrelay.transport.quic")

ALPN = "orp/1"
FORWARD_ALPN = "outrelay-fwd/1"  # spec 03 §8.3
IDLE_TIMEOUT = 10.0  # spec 01: max idle timeout 10 s
KEEPALIVE_INTERVAL = 3.0  # spec 01: keep-alive every 3 s
HANDSHAKE_TIMEOUT = 5.0  # spec 01: quic-go's handshake idle timeout
LIVENESS_CHECK = 0.5
BUSY_SILENCE_FLOOR = 3.0
"""With bytes in flight, silence longer than max(this, 4 x PTO) means the peer
is gone (bench: resume stall 9 s -> ~3 s)."""
PEER_SILENCE_TIMEOUT = 6.5
"""Ours: two keep-alives (3 s) without a single packet back means the peer is
gone; close at once instead of waiting out the 10 s idle timeout. Local
only, so wire-compatible; it shortens the stall when a relay dies."""
MAX_INCOMING_STREAMS = 1024
"""Peer-opened bidirectional streams allowed at once. The reference (quic-go's
default) allows 100, so a reference relay makes our agent queue its 101st
open; between our relay and agents 1,000 application connections fit on one
connection (bench: concurrency). Each stream's buffers are bounded by
``STREAM_WINDOW``."""
STREAM_WINDOW = 1 << 20
"""Receive credit per stream beyond what the application consumed. One MiB
keeps a loopback path busy; 100 streams x 1 MiB bounds what a peer can make
us buffer on one connection."""
SEND_BUFFER = 1 << 20
"""Unacknowledged bytes per stream before ``send_all`` waits."""
CLOSE_REASON_MAX = 200
"""Bytes of a CONNECTION_CLOSE reason phrase we send; it must fit one packet."""
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
MAX_DATAGRAM_SIZE = 1350
"""aioquic does no path-MTU discovery; 1350 B fits every common IPv4/IPv6
path and is ~20 % faster than the 1200 B minimum (DESIGN.md)."""
CONNECTION_WINDOW = 16 << 20


@dataclass(frozen=True)
class QuicTlsConfig:
    """Certificates for one end of a QUIC connection (PEM file paths)."""

    cert_file: str
    """Our certificate (may include the chain)."""
    key_file: str
    """Our private key."""
    ca_file: str
    """CA bundle that verifies the peer."""
    server_name: str = "localhost"
    """Client side: SNI and the name the server certificate must carry."""


def _fold_address(addr: Any) -> tuple[str, int]:
    host, port = str(addr[0]), int(addr[1])
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(host.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            host = str(ip.ipv4_mapped)
    return host, port


class _StreamOwner(Protocol):
    """What a :class:`QuicStream` needs from its connection (aioquic's or qh3's)."""

    _quic: Any
    _terminated: bool
    _want_send: set[Any]

    def _transmit_soon(self) -> None: ...

    def _raise_if_terminated(self) -> None: ...

    def _forget(self, stream: Any) -> None: ...


class QuicStream(Stream):
    """One bidirectional QUIC stream with bounded buffers both ways.

    The buffering, half-close and error rules live here; a QUIC library's
    specifics are the four hooks :meth:`_on_buffered`, :meth:`_on_consumed`,
    :attr:`unsent_bytes` and :meth:`_send_data` (aioquic's here; qh3's in
    :mod:`outrelay.transport.quic_qh3`).
    """

    def __init__(self, conn: _StreamOwner, stream_id: int) -> None:
        self.stream_id = stream_id
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._consumed = 0
        self._eof_received = False
        self._reset_code: int | None = None
        self._data_ready = asyncio.Event()
        self._reading = False
        self._writing = False
        self._eof_sent = False
        self._stop_sending_code: int | None = None
        self._closed = False
        self._send_ready = asyncio.Event()

    # -- events from the protocol -------------------------------------------------

    def _on_data(self, data: bytes, end_stream: bool) -> None:
        if data and not self._closed:
            self._chunks.append(data)
            self._buffered += len(data)
            self._on_buffered()
        if end_stream:
            self._eof_received = True
        self._data_ready.set()

    def _on_reset(self, code: int) -> None:
        self._reset_code = code
        self._data_ready.set()

    def _on_stop_sending(self, code: int) -> None:
        self._stop_sending_code = code
        self._send_ready.set()

    def _wake_all(self) -> None:
        self._data_ready.set()
        self._send_ready.set()

    # -- reading ------------------------------------------------------------------

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        if self._reading:
            raise BusyResourceError("another task is reading this stream")
        self._reading = True
        try:
            while not self._chunks:
                if self._closed:
                    raise ClosedResourceError("stream closed")
                if self._reset_code is not None:
                    raise BrokenResourceError(
                        f"stream reset by peer (code {self._reset_code})", code=self._reset_code
                    )
                if self._eof_received:
                    return b""
                self._conn._raise_if_terminated()
                self._data_ready.clear()
                await self._data_ready.wait()
            chunk = take_chunks(self._chunks, max_bytes)
            self._buffered -= len(chunk)
            self._on_consumed(len(chunk))
            return chunk
        finally:
            self._reading = False

    # -- the QUIC library's part (aioquic) ----------------------------------------

    def _on_buffered(self) -> None:
        """Bytes were added to the receive buffer."""

    def _on_consumed(self, n: int) -> None:
        """The application took ``n`` bytes: return credit (see ``_write_stream_limits``)."""
        self._consumed += n
        self._conn._credit_consumed(self)  # type: ignore[attr-defined]

    @property
    def unsent_bytes(self) -> int:
        aio = self._conn._quic._streams.get(self.stream_id)
        if aio is None:
            return 0
        sender = aio.sender
        return int(sender._buffer_stop - sender._buffer_start)

    def _send_data(self, chunk: memoryview) -> None:
        self._conn._quic.send_stream_data(self.stream_id, bytes(chunk), False)

    # -- writing ------------------------------------------------------------------

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
        self._conn._raise_if_terminated()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._writing:
            raise BusyResourceError("another task is writing this stream")
        self._writing = True
        try:
            view = memoryview(data).cast("B")
            while True:
                self._check_writable()
                room = SEND_BUFFER - self.unsent_bytes
                if room <= 0:
                    self._send_ready.clear()
                    self._conn._want_send.add(self)
                    await self._send_ready.wait()
                    continue
                chunk = view[:room]
                self._send_data(chunk)
                self._conn._transmit_soon()
                view = view[len(chunk) :]
                if not view:
                    return
        finally:
            self._writing = False

    async def send_eof(self) -> None:
        if self._eof_sent or self._closed or self._stop_sending_code is not None:
            return
        if self._conn._terminated:
            return
        self._eof_sent = True
        with contextlib.suppress(Exception):
            self._conn._quic.send_stream_data(self.stream_id, b"", True)
            self._conn._transmit_soon()

    def abort(self, error_code: int = 0) -> None:
        if self._closed:
            return
        self._closed = True
        quic = self._conn._quic
        if not self._conn._terminated:
            if not self._eof_sent and self._stop_sending_code is None:
                with contextlib.suppress(Exception):
                    quic.reset_stream(self.stream_id, error_code)
            if not self._eof_received and self._reset_code is None:
                with contextlib.suppress(Exception):
                    quic.stop_stream(self.stream_id, error_code)
            self._conn._transmit_soon()
        self._release()

    async def aclose(self) -> None:
        if self._closed:
            return
        await self.send_eof()
        self._closed = True
        if not self._conn._terminated and not self._eof_received and self._reset_code is None:
            with contextlib.suppress(Exception):
                self._conn._quic.stop_stream(self.stream_id, 0)
                self._conn._transmit_soon()
        self._release()

    def _release(self) -> None:
        self._chunks.clear()
        self._buffered = 0
        self._wake_all()
        self._conn._forget(self)


def _write_stream_limits(
    self: QuicConnection,
    builder: QuicPacketBuilder,
    space: QuicPacketSpace,
    stream: _AioStream,
) -> None:
    """Replacement for aioquic's method: credit follows consumption.

    aioquic doubles ``max_stream_data_local`` when bytes arrive; we set it to
    what the application consumed plus ``STREAM_WINDOW``, and only move it
    in steps of half a window so MAX_STREAM_DATA frames stay rare.
    """
    owner: QuicConn | None = getattr(self, "_outrelay_owner", None)
    stream_id = stream.stream_id
    assert stream_id is not None
    ours = owner._streams.get(stream_id) if owner is not None else None
    if stream.max_stream_data_local and ours is not None:
        target = ours._consumed + STREAM_WINDOW
        if target - stream.max_stream_data_local >= STREAM_WINDOW // 2:
            stream.max_stream_data_local = target
    if stream.max_stream_data_local_sent != stream.max_stream_data_local:
        buf = builder.start_frame(
            QuicFrameType.MAX_STREAM_DATA,
            capacity=1 + 16,
            handler=self._on_max_stream_data_delivery,
            handler_args=(stream,),
        )
        buf.push_uint_var(stream_id)
        buf.push_uint_var(stream.max_stream_data_local)
        stream.max_stream_data_local_sent = stream.max_stream_data_local


class _QuicConnBase(Connection):
    """What :class:`QuicConn` (aioquic) and the qh3 connection share: state,
    termination, accepting, waking writers and openers."""

    _protocol: Any
    _quic: Any
    _streams: dict[int, QuicStream]
    _accept_queue: asyncio.Queue[QuicStream | None]
    _want_send: set[QuicStream]
    _open_lock: asyncio.Lock
    _streams_available: asyncio.Event
    _terminated: bool
    _local_close: bool
    _close_reason: str
    _peer_close_code: int | None = None
    _close_code: int | None = None
    """The error code of the CONNECTION_CLOSE that ended the connection, if any."""
    _closed_event: asyncio.Event
    _peer: PeerInfo
    _on_closed: list[Callable[[], None]]

    _events: Any = events
    """The QUIC library's event classes (aioquic's and qh3's share names and fields)."""

    def _is_new_peer_stream(self, stream_id: int) -> bool:
        """Data arrived on a peer stream we do not know: is it a new one to accept?"""
        raise NotImplementedError

    def _forget(self, stream: QuicStream) -> None:
        """``stream`` is done: stop tracking it."""
        raise NotImplementedError

    def _new_stream(self, stream_id: int) -> QuicStream:
        return QuicStream(self, stream_id)

    def _on_event(self, event: Any) -> None:
        ev = self._events
        if isinstance(event, ev.StreamDataReceived):
            stream = self._streams.get(event.stream_id)
            if stream is None:
                if event.stream_id & 2 or not self._is_peer_stream(event.stream_id):
                    return  # unidirectional (never used by ORP) or already forgotten
                if not self._is_new_peer_stream(event.stream_id):
                    return  # a late frame for a stream we already closed
                stream = self._new_stream(event.stream_id)
                self._streams[event.stream_id] = stream
                self._accept_queue.put_nowait(stream)
            stream._on_data(event.data, event.end_stream)
        elif isinstance(event, ev.StreamReset):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._on_reset(event.error_code)
        elif isinstance(event, ev.StopSendingReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._on_stop_sending(event.error_code)
        elif isinstance(event, ev.ConnectionTerminated):
            if not self._terminated:
                self._close_code = event.error_code
                if event.frame_type is None:
                    # An application CONNECTION_CLOSE from the peer (transport
                    # errors and idle timeouts carry a frame type).
                    self._peer_close_code = event.error_code
            self._on_terminated(describe_close(event.error_code, event.reason_phrase or ""))

    @property
    def peer(self) -> PeerInfo:
        return self._peer

    @property
    def is_closed(self) -> bool:
        return self._terminated

    @property
    def close_reason(self) -> str:
        return self._close_reason

    @property
    def peer_close_code(self) -> int | None:
        return self._peer_close_code

    async def accept_stream(self) -> Stream:
        stream = await self._accept_queue.get()
        if stream is None:
            self._accept_queue.put_nowait(None)  # wake the next waiter too
            self._raise_if_terminated()
            raise BrokenResourceError("connection closed")
        return stream

    async def wait_closed(self) -> None:
        await self._closed_event.wait()

    def _raise_if_terminated(self) -> None:
        if self._terminated:
            if self._local_close:
                raise ClosedResourceError(self._close_reason)
            raise BrokenResourceError(f"connection lost: {self._close_reason}")

    def _transmit_soon(self) -> None:
        self._protocol._transmit_soon()

    def _is_peer_stream(self, stream_id: int) -> bool:
        client_initiated = stream_id % 2 == 0
        return client_initiated != bool(self._quic._is_client)

    def _on_progress(self) -> None:
        """After every transmit: wake writers whose buffer drained, and openers."""
        if self._want_send:
            for stream in list(self._want_send):
                if stream.unsent_bytes < SEND_BUFFER or stream._stop_sending_code is not None:
                    self._want_send.discard(stream)
                    stream._send_ready.set()
        if self._open_lock.locked():
            self._streams_available.set()

    def _on_terminated(self, reason: str) -> None:
        if self._terminated:
            return
        self._terminated = True
        self._close_reason = reason
        for stream in list(self._streams.values()):
            stream._wake_all()
        self._streams_available.set()
        self._accept_queue.put_nowait(None)
        self._closed_event.set()
        self._protocol._stop_keepalive()
        handshake = self._protocol.handshake
        if not handshake.done():
            handshake.set_exception(BrokenResourceError(reason))
            handshake.exception()  # retrieved: nobody may be waiting any more
        callbacks, self._on_closed = self._on_closed, []
        for callback in callbacks:
            callback()


class QuicConn(_QuicConnBase):
    """A :class:`Connection` over one aioquic connection."""

    def __init__(self, protocol: _Protocol) -> None:
        self._protocol = protocol
        self._quic: QuicConnection = protocol._quic
        self._streams: dict[int, QuicStream] = {}
        self._accept_queue: asyncio.Queue[QuicStream | None] = asyncio.Queue()
        self._want_send: set[QuicStream] = set()
        self._open_lock = asyncio.Lock()
        self._streams_available = asyncio.Event()
        self._terminated = False
        self._local_close = False
        self._close_reason = ""
        self._closed_event = asyncio.Event()
        self._peer = PeerInfo(address=("", 0))
        self._on_closed: list[Callable[[], None]] = []
        self.identity: str | None = None
        """Server side: the verified client identity (first URI SAN)."""
        self._announce = False
        """Forward mode: streams are announced before their first byte (see
        :func:`_announce_stream`), and the peer's silent streams are accepted."""
        self._announced: set[int] = set()

    # -- Connection API -----------------------------------------------------------

    @property
    def rtt(self) -> float | None:
        """Smoothed round-trip time in seconds, once measured."""
        loss = self._quic._loss
        return float(loss._rtt_smoothed) if loss._rtt_initialized else None

    async def open_stream(self) -> Stream:
        async with self._open_lock:
            while True:
                self._raise_if_terminated()
                stream_id = self._quic.get_next_available_stream_id()
                if stream_id // 4 < self._quic._remote_max_streams_bidi:
                    break
                self._streams_available.clear()
                await self._streams_available.wait()
            stream = QuicStream(self, stream_id)
            self._streams[stream_id] = stream
            # Sending nothing allocates the stream id in aioquic; the peer sees
            # the stream with our first bytes.
            self._quic.send_stream_data(stream_id, b"", False)
            if self._announce:
                _announce_stream(self._quic, stream_id)
                self._transmit_soon()
            return stream

    def close(self, error_code: int = 0, reason: str = "") -> None:
        if self._terminated:
            return
        self._local_close = True
        self._protocol.close(error_code=error_code, reason_phrase=reason)
        # aioquic waits for the closing period before reporting termination;
        # our users are done with it now.
        self._on_terminated(f"closed locally (code {error_code}{': ' + reason if reason else ''})")

    # -- internals ------------------------------------------------------------------

    def _credit_consumed(self, stream: QuicStream) -> None:
        aio = self._quic._streams.get(stream.stream_id)
        if aio is None or not aio.max_stream_data_local:
            return
        if stream._consumed + STREAM_WINDOW - aio.max_stream_data_local >= STREAM_WINDOW // 2:
            self._transmit_soon()

    def _forget(self, stream: QuicStream) -> None:
        self._want_send.discard(stream)
        self._streams.pop(stream.stream_id, None)

    def _is_new_peer_stream(self, stream_id: int) -> bool:
        if stream_id in self._quic._streams and self._terminated:
            return False
        return stream_id not in self._announced  # accepted silently before, and forgotten since

    def _accept_silent_streams(self) -> None:
        """Queue peer streams that exist but carried no byte yet (an empty STREAM frame)."""
        for stream_id in list(self._quic._streams):
            if (
                stream_id in self._announced
                or stream_id in self._streams
                or stream_id & 2
                or not self._is_peer_stream(stream_id)
            ):
                continue
            self._announced.add(stream_id)
            stream = QuicStream(self, stream_id)
            self._streams[stream_id] = stream
            self._accept_queue.put_nowait(stream)


class _Protocol(QuicConnectionProtocol):
    """aioquic protocol that feeds one :class:`QuicConn`."""

    def __init__(
        self,
        quic: QuicConnection,
        stream_handler: Any = None,
        *,
        on_handshake: Callable[[_Protocol], None] | None = None,
        keepalive_interval: float = KEEPALIVE_INTERVAL,
        silence_timeout: float = PEER_SILENCE_TIMEOUT,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        super().__init__(quic, stream_handler)
        self.conn = QuicConn(self)
        self._keepalive_interval = keepalive_interval
        self._silence_timeout = silence_timeout
        self._handshake_timeout = handshake_timeout
        self._on_handshake = on_handshake
        self._keepalive: asyncio.TimerHandle | None = None
        self._liveness: asyncio.TimerHandle | None = None
        self._last_rx = self._loop.time()
        self.handshake: asyncio.Future[None] = self._loop.create_future()
        """Resolved when the handshake completes; fails if the connection ends first."""
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._discarded = False
        """Server side: forgotten before its handshake completed (see :meth:`discard`)."""
        quic._outrelay_owner = self.conn  # type: ignore[attr-defined]
        quic._write_stream_limits = types.MethodType(_write_stream_limits, quic)  # type: ignore[method-assign]
        # Advertise quic-go's limits; ``sent`` must match what the transport
        # parameters will say, or aioquic never raises the limit again.
        quic._local_max_streams_bidi.value = quic._local_max_streams_bidi.sent = (
            MAX_INCOMING_STREAMS
        )
        quic._local_max_streams_uni.value = quic._local_max_streams_uni.sent = 0
        if not quic._is_client:
            original_initialize = quic._initialize

            def _initialize(peer_cid: bytes) -> None:
                original_initialize(peer_cid)
                # aioquic's private switch: ask the client for a certificate.
                quic.tls._request_client_certificate = True

            quic._initialize = _initialize  # type: ignore[method-assign]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self._quic._is_client:
            self._handshake_timer = self._loop.call_later(
                self._handshake_timeout, self._handshake_expired
            )

    def _handshake_expired(self) -> None:
        if not self._connected:
            log.debug("QUIC handshake timed out")
            self.conn.close(0, "")  # one CONNECTION_CLOSE, if we have keys to send it with
            self.discard("handshake timed out")

    def discard(self, reason: str) -> None:
        """Forget this server connection now, without aioquic's closing period.

        For a handshake that never completed (the deadline passed, or the
        first Initial did not even decrypt): its client has nothing to lose,
        and under a flood the closing period (3 x PTO, ~3 s before any RTT
        sample) would keep every such connection's memory alive.
        """
        if self._discarded:
            return
        self._discarded = True
        # aioquic's protocol keeps its timer handle in the private ``_timer``;
        # the handle's callback references this protocol, so an armed timer
        # would keep the connection alive until the idle timeout.
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # The server's callback (set by QuicServer) that forgets our CIDs.
        self._connection_terminated_handler()
        self.conn._on_terminated(reason)

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.HandshakeCompleted):
            self._connected = True
            if not self.handshake.done():
                self.handshake.set_result(None)
            if self._handshake_timer is not None:
                self._handshake_timer.cancel()
            self._keepalive = self._loop.call_later(self._keepalive_interval, self._send_keepalive)
            addr = self._quic._network_paths[0].addr if self._quic._network_paths else ("", 0)
            tls = self._quic.tls
            leaf: x509.Certificate | None = getattr(tls, "_peer_certificate", None)
            chain = tuple(getattr(tls, "_peer_certificate_chain", ()) or ())
            self.conn._peer = PeerInfo(address=_fold_address(addr), certificate=leaf, chain=chain)
            if self._on_handshake is not None:
                self._on_handshake(self)
        self.conn._on_event(event)

    def transmit(self) -> None:
        if self._discarded:
            return
        if defer_transmit(self):
            return  # once, at the end of the current read batch
        super().transmit()
        self.conn._on_progress()

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        if self._discarded:
            return
        self._last_rx = self._loop.time()
        super().datagram_received(data, addr)
        if self.conn._announce and not self.conn._terminated:
            self.conn._accept_silent_streams()

    def _send_keepalive(self) -> None:
        self._keepalive = None
        if self.conn._terminated:
            return
        if self._peer_gone():
            return
        self._quic.send_ping(0)
        self.transmit()
        self._keepalive = self._loop.call_later(self._keepalive_interval, self._send_keepalive)
        if self._liveness is None:
            self._liveness = self._loop.call_later(LIVENESS_CHECK, self._check_liveness)

    def _check_liveness(self) -> None:
        self._liveness = None
        if self.conn._terminated or self._peer_gone():
            return
        self._liveness = self._loop.call_later(LIVENESS_CHECK, self._check_liveness)

    def _peer_gone(self) -> bool:
        """Close if the peer has been silent too long; True if we did.

        Idle, a live peer answers every keep-alive, so ``silence_timeout``
        without a packet means it is gone. With bytes in flight a live peer
        acknowledges within a few PTOs, so we give up sooner: a relay that was
        killed shows no sign at all (aioquic sends no stateless reset), and
        every second here is a second the application's stream stalls.
        """
        silent = self._loop.time() - self._last_rx
        loss = self._quic._loss
        limit = self._silence_timeout
        if self._connected and loss.bytes_in_flight > 0:
            limit = min(limit, max(BUSY_SILENCE_FLOOR, 4 * loss.get_probe_timeout()))
        if silent <= limit:
            return False
        log.debug("QUIC peer silent; closing", extra={"attrs": {"silent": f"{silent:.1f}s"}})
        self.conn._on_terminated(f"peer silent for {silent:.1f}s")
        self._quic.close(error_code=0, reason_phrase="")
        self.transmit()
        return True

    def _stop_keepalive(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        if self._liveness is not None:
            self._liveness.cancel()
            self._liveness = None


def _configuration(
    tls: QuicTlsConfig, *, is_client: bool, alpn: str = ALPN, idle_timeout: float = IDLE_TIMEOUT
) -> QuicConfiguration:
    config = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[alpn],
        idle_timeout=idle_timeout,
        max_stream_data=STREAM_WINDOW,
        max_data=CONNECTION_WINDOW,
        max_datagram_size=MAX_DATAGRAM_SIZE,
        server_name=tls.server_name if is_client else None,
    )
    config.load_cert_chain(tls.cert_file, tls.key_file)
    if is_client:
        config.load_verify_locations(cafile=tls.ca_file)
    return config


async def connect_quic(
    host: str,
    port: int,
    tls: QuicTlsConfig,
    *,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> QuicConn:
    """Dial a relay (or peer agent) and complete the QUIC/TLS handshake.

    Each connection gets its own UDP socket, closed when the connection ends
    (:class:`~outrelay.transport.shared_udp.SharedUdpEndpoint` dials from one
    shared socket instead).

    Raises:
        BrokenResourceError: resolution, the handshake or the server's
            certificate check failed, or the handshake timed out.
    """
    loop = asyncio.get_running_loop()
    family, addr = await resolve_udp(host, port)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind(("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0))
        protocol = _Protocol(QuicConnection(configuration=_configuration(tls, is_client=True)))
        transport = BatchDatagramTransport(loop, sock, protocol)
    except OSError as exc:
        sock.close()
        raise BrokenResourceError(f"cannot open a UDP socket: {exc}") from exc

    def _close_socket() -> None:
        loop.call_later(0.1, transport.close)

    protocol.conn._on_closed.append(_close_socket)
    return await client_handshake(protocol, addr, f"{host}:{port}", handshake_timeout)


def describe_close(code: int, reason: str) -> str:
    """A CONNECTION_CLOSE for a log line: ``code 0: reason``, or with the TLS alert named."""
    detail = f"code {code}"
    if CRYPTO_ERROR <= code < CRYPTO_ERROR + 0x100:
        alert = code - CRYPTO_ERROR
        detail += f" (TLS alert {alert} {TLS_ALERTS.get(alert, 'unknown')})"
    return detail + (f": {reason}" if reason else "")


def handshake_failed(conn: _QuicConnBase, name: str, exc: BaseException) -> BrokenResourceError:
    """The error for a client handshake that failed (aioquic's or qh3's).

    A certificate alert during our handshake means that *we* rejected the
    server's certificate (in TLS 1.3 the server judges ours after our
    handshake is complete): :class:`CertificateError` with the library's reason,
    e.g. ``unable to get local issuer certificate``.
    """
    code = conn._close_code
    detail = conn._close_reason or repr(exc)
    if code is not None and code - CRYPTO_ERROR in CERTIFICATE_ALERTS:
        return CertificateError(
            f"QUIC handshake with {name} failed: the server's certificate does not verify: {detail}"
        )
    return BrokenResourceError(f"QUIC handshake with {name} failed: {detail}")


def close_phrase(reason: str) -> str:
    """``reason`` cut to :data:`CLOSE_REASON_MAX` UTF-8 bytes, for a CONNECTION_CLOSE."""
    data = reason.encode()
    if len(data) <= CLOSE_REASON_MAX:
        return reason
    return data[: CLOSE_REASON_MAX - 3].decode(errors="ignore") + "..."


async def resolve_udp(host: str, port: int, family: int = 0) -> tuple[int, Any]:
    """``(family, sockaddr)`` of ``host:port`` for a UDP socket.

    Raises:
        BrokenResourceError: the name does not resolve (in ``family``, if given).
    """
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise BrokenResourceError(f"cannot resolve {host}:{port}: {exc}") from exc
    family, _, _, _, addr = infos[0]
    return family, addr


async def client_handshake(
    protocol: _Protocol, addr: Any, name: str, handshake_timeout: float
) -> QuicConn:
    """Start the client handshake of ``protocol`` (already attached) towards ``addr``."""
    conn = protocol.conn
    try:
        protocol.connect(addr)
        async with asyncio.timeout(handshake_timeout):
            await protocol.handshake
    except TimeoutError as exc:
        conn.close(0, "")
        raise BrokenResourceError(
            f"QUIC handshake with {name} timed out after {handshake_timeout:g}s"
        ) from exc
    except Exception as exc:  # ConnectionError, TLS alerts, ValueError from aioquic
        conn.close(0, "")
        raise handshake_failed(conn, name, exc) from exc
    except BaseException:
        # Cancelled (a losing connectivity check): the handshake must not
        # finish later into a live connection that nobody owns.
        conn.close(0, "")
        raise
    return conn


class QuicServerHandle:
    """A bound QUIC listener; :meth:`close` stops it and every connection."""

    def __init__(self, server: _GuardedServer, protocols: set[_Protocol]) -> None:
        self._server = server
        self._protocols = protocols

    @property
    def admission(self) -> QuicAdmission:
        """Half-open handshakes, Retry state and verdict counts (for logs and tests)."""
        return self._server.admission

    @property
    def address(self) -> tuple[str, int]:
        sock = self._server._transport.get_extra_info("sockname")  # type: ignore[union-attr]
        return _fold_address(sock)

    def close(self) -> None:
        for protocol in list(self._protocols):
            protocol.conn.close(0, "")
        self._server.close()


def server_configuration(tls: QuicTlsConfig, alpn: str = ALPN) -> QuicConfiguration:
    """Server side: our certificate; the client's chain is verified by us, not aioquic."""
    config = _configuration(tls, is_client=False, alpn=alpn)
    config.verify_mode = 0
    return config


def server_protocol_factory(
    verify_client: Callable[[x509.Certificate | None, tuple[x509.Certificate, ...]], str],
    on_connection: Callable[[QuicConn], None],
    on_refused: Callable[[tuple[str, int], str], None] | None,
    protocols: set[_Protocol],
) -> Callable[..., _Protocol]:
    """``create_protocol`` for a :class:`QuicServer`: verify the client, then hand it over.

    Every live protocol is kept in ``protocols`` until its connection ends.
    """

    def handshake_done(protocol: _Protocol) -> None:
        conn = protocol.conn
        try:
            conn.identity = verify_client(conn.peer.certificate, conn.peer.chain)
        except Exception as exc:
            reason = str(getattr(exc, "reason", "") or exc)
            if on_refused is not None:
                on_refused(conn.peer.address, reason)
            conn.close(0, close_phrase(f"bad client certificate: {reason}"))
            return
        on_connection(conn)

    def create_protocol(quic: QuicConnection, stream_handler: Any = None) -> _Protocol:
        protocol = _Protocol(quic, stream_handler, on_handshake=handshake_done)
        protocols.add(protocol)
        protocol.conn._on_closed.append(lambda: protocols.discard(protocol))
        return protocol

    return create_protocol


RETRY_CID_LENGTH = 8
"""Bytes of the connection ID a Retry packet hands the client (aioquic's own
choice, and our ``connection_id_length``)."""


class _GuardedServer(QuicServer):
    """aioquic's :class:`QuicServer` with admission in front of every new connection.

    Replaces ``datagram_received`` entirely (see the module docstring); the
    rest (CID bookkeeping callbacks, ``close``) is aioquic's. Reaches into
    ``QuicServer`` privates, each for a reason given where it is used:
    ``_protocols`` (aioquic's CID -> protocol map: we route through it and
    register new connections in it, as aioquic does), ``_configuration``,
    ``_create_protocol``, ``_stream_handler``, ``_transport`` and
    ``_connection_id_*``/``_connection_terminated`` (what aioquic's own
    connection set-up uses; we repeat that set-up after our checks).
    """

    def __init__(
        self,
        *,
        configuration: QuicConfiguration,
        create_protocol: Callable[..., _Protocol],
        admission: QuicAdmission,
    ) -> None:
        # retry=False: aioquic's own Retry path would validate a token only
        # while its switch is on; ours validates every token, always.
        super().__init__(configuration=configuration, create_protocol=create_protocol)
        self.admission = admission
        self._tokens = QuicRetryTokenHandler()
        """One key for the listener's lifetime: a client that got a Retry under
        pressure is validated with it even after the pressure has ended."""
        self._cid_length = configuration.connection_id_length
        self._versions = frozenset(configuration.supported_versions)
        self._retrying = False

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        if not isinstance(data, bytes) or not data:
            return
        # aioquic's private CID -> protocol map (QuicServer._protocols).
        protocols = self._protocols
        if not data[0] & 0x80:
            # Short header (1-RTT): established connections, the hot path.
            # Our CIDs all have ``connection_id_length`` bytes.
            protocol = protocols.get(data[1 : 1 + self._cid_length])
            if protocol is not None:
                protocol.datagram_received(data, addr)
            return
        if len(data) < 7:
            return
        protocol = protocols.get(data[6 : 6 + data[5]])
        if protocol is not None:  # a long header of a connection we know
            protocol.datagram_received(data, addr)
            return
        if len(data) < SMALLEST_MAX_DATAGRAM_SIZE:
            return  # cannot start a handshake (RFC 9000 §14.1)
        version = int.from_bytes(data[1:5], "big")
        now = self._loop.time()
        source = _fold_address(addr)[0]
        if version not in self._versions:
            if version != 0:  # never answer a Version Negotiation packet
                self._version_negotiation(data, addr, source, now)
            return
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=self._cid_length)
        except ValueError:
            return
        if header.packet_type != QuicPacketType.INITIAL:
            return
        if header.token:
            self._validated_initial(header, data, addr, source, now)
            return
        verdict = self.admission.check_new(source, now)
        if verdict is Verdict.ADMIT:
            self._start(header.destination_cid, data, addr, source, validated=False)
        elif verdict is Verdict.RETRY:
            self._send_retry(header, addr, now)
        self._note_pressure(now)

    def _note_pressure(self, now: float) -> None:
        retrying = self.admission.retry_active(now)
        if retrying != self._retrying:
            self._retrying = retrying
            half_open = self.admission.half_open
            log.info(
                "QUIC address validation (Retry) %s",
                "on" if retrying else "off",
                extra={
                    "attrs": {
                        "mode": self.admission.mode.value,
                        "half_open": half_open.total,
                        "unvalidated": self.admission.unvalidated.total,
                        **self.admission.stats,
                    }
                },
            )

    def _validated_initial(
        self, header: Any, data: bytes, addr: Any, source: str, now: float
    ) -> None:
        # Every token is ours (aioquic never sends NEW_TOKEN), so every token
        # is checked, whatever the mode and the pressure right now.
        try:
            original_dcid = self._tokens.validate_token(
                address=addr, destination_cid=header.destination_cid, token=header.token, now=now
            )
        except ValueError:
            # RFC 9000 §8.1.3 says SHOULD close with INVALID_TOKEN; building
            # that close costs Initial key derivation and AEAD for a packet a
            # flood would send by the thousand. Dropping is allowed (SHOULD).
            return
        if self.admission.check_validated(source) is Verdict.ADMIT:
            self._start(
                header.destination_cid,
                data,
                addr,
                source,
                validated=True,
                original_dcid=original_dcid,
            )

    def _send_retry(self, header: Any, addr: Any, now: float) -> None:
        retry_cid = os.urandom(RETRY_CID_LENGTH)
        try:
            token = self._tokens.create_token(
                address=addr,
                original_destination_connection_id=header.destination_cid,
                retry_source_connection_id=retry_cid,
                now=now,
            )
        except ValueError:
            return  # an address the token cannot encode (e.g. a scoped IPv6 literal)
        packet = encode_quic_retry(
            version=header.version,
            source_cid=retry_cid,
            destination_cid=header.source_cid,
            original_destination_cid=header.destination_cid,
            retry_token=token,
        )
        self._transport.sendto(packet, addr)  # type: ignore[union-attr]

    def _version_negotiation(self, data: bytes, addr: Any, source: str, now: float) -> None:
        if not self.admission.allow_reply(source, now):
            return
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=self._cid_length)
        except ValueError:
            return
        packet = encode_quic_version_negotiation(
            source_cid=header.destination_cid,
            destination_cid=header.source_cid,
            supported_versions=list(self._versions),
        )
        self._transport.sendto(packet, addr)  # type: ignore[union-attr]

    def _start(
        self,
        dcid: bytes,
        data: bytes,
        addr: Any,
        source: str,
        *,
        validated: bool,
        original_dcid: bytes | None = None,
    ) -> None:
        """aioquic's connection set-up (``QuicServer.datagram_received``), after our checks."""
        connection = QuicConnection(
            configuration=self._configuration,
            original_destination_connection_id=original_dcid if validated else dcid,
            retry_source_connection_id=dcid if validated else None,
        )
        protocol: _Protocol = self._create_protocol(connection, stream_handler=self._stream_handler)
        protocol.connection_made(self._transport)  # type: ignore[arg-type]
        protocol._connection_id_issued_handler = partial(
            self._connection_id_issued, protocol=protocol
        )
        protocol._connection_id_retired_handler = partial(
            self._connection_id_retired, protocol=protocol
        )
        protocol._connection_terminated_handler = partial(
            self._connection_terminated, protocol=protocol
        )
        self._protocols[dcid] = protocol
        self._protocols[connection.host_cid] = protocol

        admission = self.admission
        admission.opened(source, validated=validated)
        released = False

        def release(_: object = None) -> None:
            nonlocal released
            if not released:
                released = True
                admission.closed(source, validated=validated)

        # Done when the handshake completes, or fails/expires/is discarded.
        protocol.handshake.add_done_callback(release)
        protocol.datagram_received(data, addr)
        # aioquic moves a server connection out of FIRSTFLIGHT (private
        # ``_state``) once a packet decrypted; still there, the Initial was
        # garbage with a plausible header: nothing will ever come of it.
        if connection._state == QuicConnectionState.FIRSTFLIGHT:
            protocol.discard("first Initial did not decrypt")


async def bind_udp(host: str, port: int) -> socket.socket:
    """A UDP socket bound to ``host:port`` (an IPv6 wildcard is dual-stack).

    Raises:
        OSError: the address does not resolve or could not be bound.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        host or None, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE
    )
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # dual stack
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock


async def serve_quic(
    host: str,
    port: int,
    tls: QuicTlsConfig,
    *,
    verify_client: Callable[[x509.Certificate | None, tuple[x509.Certificate, ...]], str],
    on_connection: Callable[[QuicConn], None],
    on_refused: Callable[[tuple[str, int], str], None] | None = None,
    retry: RetryMode = RetryMode.AUTO,
    admission: QuicAdmission | None = None,
) -> QuicServerHandle:
    """Listen for QUIC connections; hand each verified one to ``on_connection``.

    Args:
        verify_client: called with the client's leaf (None if it sent none) and
            chain; returns the identity (first URI SAN) or raises an exception
            whose ``reason`` (or str) is logged. Refused connections are closed
            with application code 0 (spec 02 §2.2) and, ours, the reason as
            the reason phrase: ``bad client certificate: <reason>``.
        on_connection: called synchronously with every accepted connection;
            ``conn.identity`` is set.
        on_refused: called with (peer address, reason) for refused clients.
        retry: when clients must prove their address with a Retry round trip
            first (:class:`RetryMode`; the relay's ``--quic-retry``).
        admission: the admission state (default: a fresh
            :class:`~outrelay.transport.admission.QuicAdmission` with ``retry``
            and the module's caps); tests pass smaller caps.

    Raises:
        OSError: the address could not be bound.
    """
    config = server_configuration(tls)
    protocols: set[_Protocol] = set()
    create_protocol = server_protocol_factory(verify_client, on_connection, on_refused, protocols)
    sock = await bind_udp(host, port)
    try:
        server = _GuardedServer(
            configuration=config,
            create_protocol=create_protocol,
            admission=admission if admission is not None else QuicAdmission(retry),
        )
        BatchDatagramTransport(asyncio.get_running_loop(), sock, server)
    except OSError:
        sock.close()
        raise
    return QuicServerHandle(server, protocols)


# -- QUIC over a packet endpoint (forward mode, spec 03 §8.3) ----------------------------


def _announce_stream(quic: QuicConnection, stream_id: int) -> None:
    """Make aioquic send an empty STREAM frame so the peer sees the stream at once.

    Spec 03 §8.3 [REC]: a server-speaks-first backend deadlocks if the
    provider only learns of the stream with the consumer's first byte.
    aioquic never sends a STREAM frame without data or FIN, so the stream's
    sender is taught one: the next frame it builds is ``offset 0, length 0``;
    if that packet is lost the announcement is scheduled again, and once
    application bytes flow it is moot.
    """
    sender = quic._streams[stream_id].sender
    original_get_frame = sender.get_frame
    original_delivery = sender.on_data_delivery
    pending = [True]

    def get_frame(max_size: int, max_offset: int | None = None) -> QuicStreamFrame | None:
        if (
            pending[0]
            and max_size >= 0
            and sender.highest_offset == 0
            and len(sender._pending) == 0
        ):
            pending[0] = False
            if not sender._pending_eof:
                sender.buffer_is_empty = True
            return QuicStreamFrame(data=b"", offset=0)
        return original_get_frame(max_size, max_offset)

    def on_data_delivery(delivery: QuicDeliveryState, start: int, stop: int, fin: bool) -> None:
        if delivery != QuicDeliveryState.ACKED and start == stop == 0 and not fin:
            if sender.highest_offset == 0:
                pending[0] = True
                sender.buffer_is_empty = False
            return
        original_delivery(delivery, start, stop, fin)

    sender.get_frame = get_frame  # type: ignore[method-assign]
    sender.on_data_delivery = on_data_delivery  # type: ignore[method-assign]
    sender.buffer_is_empty = False


class PacketEndpoint(Protocol):
    """A datagram socket a QUIC connection can run over (the forward wrapper).

    ``attach(protocol)`` makes ``protocol`` the receiver of every inbound
    datagram (``protocol.datagram_received(data, remote)``) and returns the
    transport it sends through; ``remote`` is the one stable peer address
    the QUIC layer sees.
    """

    @property
    def remote(self) -> tuple[str, int]: ...

    def attach(self, protocol: asyncio.DatagramProtocol) -> asyncio.DatagramTransport: ...


async def connect_quic_on(
    endpoint: PacketEndpoint,
    tls: QuicTlsConfig,
    *,
    alpn: str = FORWARD_ALPN,
    handshake_timeout: float,
    idle_timeout: float,
    keepalive_interval: float,
    silence_timeout: float,
) -> QuicConn:
    """Dial over ``endpoint`` (QUIC client); streams are announced before their first byte.

    Raises:
        BrokenResourceError: the handshake failed or timed out.
    """
    config = _configuration(tls, is_client=True, alpn=alpn, idle_timeout=idle_timeout)
    protocol = _Protocol(
        QuicConnection(configuration=config),
        keepalive_interval=keepalive_interval,
        silence_timeout=silence_timeout,
        handshake_timeout=handshake_timeout,
    )
    protocol.conn._announce = True
    protocol.connection_made(endpoint.attach(protocol))
    conn = protocol.conn
    try:
        protocol.connect(endpoint.remote)
        async with asyncio.timeout(handshake_timeout):
            await protocol.handshake
    except TimeoutError as exc:
        conn.close(0, "")
        raise BrokenResourceError(
            f"QUIC handshake over the forward plane timed out after {handshake_timeout:g}s"
        ) from exc
    except Exception as exc:
        conn.close(0, "")
        detail = conn._close_reason or repr(exc)
        raise BrokenResourceError(
            f"QUIC handshake over the forward plane failed: {detail}"
        ) from exc
    return conn


async def accept_quic_on(
    endpoint: PacketEndpoint,
    tls: QuicTlsConfig,
    *,
    alpn: str = FORWARD_ALPN,
    verify_client: Callable[[x509.Certificate | None, tuple[x509.Certificate, ...]], str],
    accept_timeout: float,
    idle_timeout: float,
    keepalive_interval: float,
    silence_timeout: float,
) -> QuicConn:
    """Accept one QUIC connection over ``endpoint`` (QUIC server, client cert required).

    Later connection attempts on the endpoint are refused (closed at once).

    Raises:
        BrokenResourceError: no verified connection within ``accept_timeout``.
    """
    config = _configuration(tls, is_client=False, alpn=alpn, idle_timeout=idle_timeout)
    config.verify_mode = 0  # the chain is verified by ``verify_client``
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[QuicConn] = loop.create_future()
    refusals: list[str] = []

    def handshake_done(protocol: _Protocol) -> None:
        conn = protocol.conn
        try:
            conn.identity = verify_client(conn.peer.certificate, conn.peer.chain)
        except Exception as exc:
            refusals.append(str(getattr(exc, "reason", "") or exc))
            conn.close(0, "")
            return
        if accepted.done():
            conn.close(0, "")
            return
        accepted.set_result(conn)

    def create_protocol(quic: QuicConnection, stream_handler: Any = None) -> _Protocol:
        protocol = _Protocol(
            quic,
            stream_handler,
            on_handshake=handshake_done,
            keepalive_interval=keepalive_interval,
            silence_timeout=silence_timeout,
            handshake_timeout=accept_timeout,
        )
        protocol.conn._announce = True
        return protocol

    server = QuicServer(configuration=config, create_protocol=create_protocol)
    server.connection_made(endpoint.attach(server))
    try:
        async with asyncio.timeout(accept_timeout):
            return await asyncio.shield(accepted)
    except TimeoutError as exc:
        for protocol in set(server._protocols.values()):
            if isinstance(protocol, _Protocol):
                protocol.conn.close(0, "")
        why = f" (refused: {refusals[-1]})" if refusals else ""
        raise BrokenResourceError(
            f"no QUIC connection over the forward plane within {accept_timeout:g}s{why}"
        ) from exc
    finally:
        if not accepted.done():
            accepted.cancel()
