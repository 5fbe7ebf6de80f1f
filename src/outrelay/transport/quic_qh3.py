"""The agent's QUIC client on qh3 (Rust packet core), an optional backend.

Only the client side: the relay and every server-side use stay on aioquic,
whose server is the only one that requests and lets us verify client
certificates (DESIGN.md). :func:`connect_quic_qh3` returns a
:class:`Connection` with the same contract as
:func:`outrelay.transport.quic.connect_quic`: ALPN ``orp/1``, keep-alive and
silence detection, bounded send buffers, waiting opens.

How qh3 2.x differs from aioquic, and what this module does about it:

* **Receive credit.** qh3's core raises a stream's window when its
  ``stream_data`` event is *popped* from the core's one connection-wide event
  queue (measured: a connection that stops popping lets the peer send exactly
  one window). There is no per-stream hook like aioquic's
  ``_write_stream_limits``, so per-stream credit on consumption is impossible.
  The equivalent we use: while any stream holds ``STREAM_WINDOW`` or more
  unread bytes, the connection stops popping events (``_drain_core`` is
  skipped), and it pops again once the reader has taken bytes. Memory stays
  bounded (per stream at most two windows plus one read batch), but a reader
  that stops reading pauses *every* stream of that connection until it reads
  again (head-of-line coupling that aioquic does not have). QUIC ACKs, PINGs
  and loss recovery run in the core and are not held.
* **Send buffer.** ``get_send_buffer_size`` counts bytes not yet sent once;
  bytes in flight are bounded by the congestion window on top of it.
* **Stream limit.** qh3 advertises 100 concurrent peer-opened bidirectional
  streams (hard-coded, in the core and in the transport parameters), the
  reference relay's value; our relay queues the 101st open it makes to an
  agent on this backend. Our own opens wait for the peer's MAX_STREAMS.
* **Peer certificate.** qh3 parses certificates natively; the leaf and chain
  are converted to :mod:`cryptography` objects for :class:`PeerInfo`.

Errors come out as :mod:`outrelay.transport.base` errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

from cryptography import x509
from qh3.asyncio.protocol import QuicConnectionProtocol
from qh3.quic import events
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection, QuicConnectionError

from outrelay.transport.base import (
    BrokenResourceError,
    PeerInfo,
    Stream,
)
from outrelay.transport.quic import (
    ALPN,
    BUSY_SILENCE_FLOOR,
    CONNECTION_WINDOW,
    HANDSHAKE_TIMEOUT,
    IDLE_TIMEOUT,
    KEEPALIVE_INTERVAL,
    LIVENESS_CHECK,
    MAX_DATAGRAM_SIZE,
    PEER_SILENCE_TIMEOUT,
    STREAM_WINDOW,
    QuicStream,
    QuicTlsConfig,
    _fold_address,
    _QuicConnBase,
    handshake_failed,
)
from outrelay.transport.udp import BatchDatagramTransport, defer_transmit

__all__ = ["Qh3Conn", "Qh3Stream", "connect_quic_qh3"]

log = logging.getLogger("outrelay.transport.quic_qh3")

MAX_ACK_DELAY = 0.025
"""qh3's max_ack_delay (25 ms); part of our probe-timeout estimate."""
FORGOTTEN_STREAMS = 4096
"""Closed peer stream ids remembered so a late STREAM frame does not look like
a new stream (qh3, unlike aioquic, exposes no stream table to ask)."""


class Qh3Stream(QuicStream):
    """One bidirectional QUIC stream on qh3: :class:`QuicStream` with qh3's hooks."""

    _conn: Qh3Conn

    def _on_buffered(self) -> None:
        if self._buffered >= STREAM_WINDOW:
            self._conn._full.add(self.stream_id)

    def _on_consumed(self, n: int) -> None:
        if self._buffered < STREAM_WINDOW:
            self._conn._drained(self.stream_id)

    @property
    def unsent_bytes(self) -> int:
        if self._conn._terminated:
            return 0
        return int(self._conn._quic.get_send_buffer_size(self.stream_id))

    def _send_data(self, chunk: memoryview) -> None:
        try:
            self._conn._quic.send_stream_data(self.stream_id, chunk, False)
        except QuicConnectionError as exc:
            # The core closed before its ConnectionTerminated was popped.
            self._conn._on_terminated(exc.reason_phrase)
            raise BrokenResourceError(f"connection lost: {exc.reason_phrase}") from exc


class _HeldQuicConnection(QuicConnection):
    """qh3's connection whose event queue is left in the core while ``held()``.

    Popping a ``stream_data`` event is what returns credit to the peer (see
    the module docstring), so not popping is the only way to push back.
    """

    def __init__(self, *, configuration: QuicConfiguration) -> None:
        super().__init__(configuration=configuration)
        self.held: Callable[[], bool] = lambda: False

    def _drain_core(self) -> None:
        if self._handshake_complete and self.held():
            return
        super()._drain_core()

    def drain_held(self) -> None:
        """Pop what was left in the core while held."""
        if self._core is not None:
            super()._drain_core()


class Qh3Conn(_QuicConnBase):
    """A :class:`Connection` over one qh3 client connection."""

    def __init__(self, protocol: _Qh3Protocol) -> None:
        self._protocol = protocol
        self._quic: _HeldQuicConnection = protocol._quic
        self._streams: dict[int, QuicStream] = {}
        self._full: set[int] = set()
        """Streams holding ``STREAM_WINDOW`` or more unread bytes: while any
        does, the core's events (and so the peer's credit) are held."""
        self._accept_queue: asyncio.Queue[QuicStream | None] = asyncio.Queue()
        self._want_send: set[QuicStream] = set()
        self._open_lock = asyncio.Lock()
        self._streams_available = asyncio.Event()
        self._done: set[int] = set()
        self._done_order: deque[int] = deque()
        """Peer streams we closed (the last ``FORGOTTEN_STREAMS``): late frames are dropped."""
        self._terminated = False
        self._local_close = False
        self._close_reason = ""
        self._closed_event = asyncio.Event()
        self._peer = PeerInfo(address=("", 0))
        self._on_closed: list[Callable[[], None]] = []
        self._quic.held = lambda: bool(self._full)

    # -- Connection API -----------------------------------------------------------

    @property
    def rtt(self) -> float | None:
        """Smoothed round-trip time in seconds, once measured."""
        core = self._quic._core
        return None if core is None else core.smoothed_rtt

    async def open_stream(self) -> Stream:
        async with self._open_lock:
            while True:
                self._raise_if_terminated()
                stream_id = self._quic.get_next_available_stream_id()
                if stream_id // 4 < self._quic.max_concurrent_bidi_streams:
                    break
                self._streams_available.clear()
                await self._streams_available.wait()
            stream = Qh3Stream(self, stream_id)
            self._streams[stream_id] = stream
            # Allocates the id; the peer sees the stream with our first bytes.
            try:
                self._quic.send_stream_data(stream_id, b"", False)
            except QuicConnectionError as exc:
                self._streams.pop(stream_id, None)
                self._on_terminated(exc.reason_phrase)
                raise BrokenResourceError(f"connection lost: {exc.reason_phrase}") from exc
            return stream

    def close(self, error_code: int = 0, reason: str = "") -> None:
        if self._terminated:
            return
        self._local_close = True
        with contextlib.suppress(Exception):
            self._quic.close(error_code=error_code, reason_phrase=reason)
            self._protocol.transmit()
        self._on_terminated(f"closed locally (code {error_code}{': ' + reason if reason else ''})")

    # -- internals ------------------------------------------------------------------

    def _drained(self, stream_id: int) -> None:
        """A stream fell below the window: pop what the core held back."""
        if stream_id not in self._full:
            return
        self._full.discard(stream_id)
        if not self._full and not self._terminated:
            self._quic.drain_held()
            self._protocol._process_events()
            self._transmit_soon()

    def _forget(self, stream: QuicStream) -> None:
        self._want_send.discard(stream)
        self._streams.pop(stream.stream_id, None)
        if self._is_peer_stream(stream.stream_id) and stream.stream_id not in self._done:
            self._done.add(stream.stream_id)
            self._done_order.append(stream.stream_id)
            if len(self._done_order) > FORGOTTEN_STREAMS:
                self._done.discard(self._done_order.popleft())
        self._drained(stream.stream_id)

    _events = events

    def _is_new_peer_stream(self, stream_id: int) -> bool:
        return not self._terminated and stream_id not in self._done

    def _new_stream(self, stream_id: int) -> QuicStream:
        return Qh3Stream(self, stream_id)


def _to_x509(cert: Any) -> x509.Certificate | None:
    try:
        return x509.load_der_x509_certificate(cert.public_bytes())
    except Exception:
        return None


class _Qh3Protocol(QuicConnectionProtocol):
    """qh3 protocol that feeds one :class:`Qh3Conn`; keep-alive and liveness as in quic.py."""

    _quic: _HeldQuicConnection

    def __init__(self, quic: _HeldQuicConnection) -> None:
        super().__init__(quic)
        self.conn = Qh3Conn(self)
        self._keepalive: asyncio.TimerHandle | None = None
        self._liveness: asyncio.TimerHandle | None = None
        self._last_rx = self._loop.time()
        self.handshake: asyncio.Future[None] = self._loop.create_future()
        """Resolved when the handshake completes; fails if the connection ends first."""

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.HandshakeCompleted):
            self._connected = True
            if not self.handshake.done():
                self.handshake.set_result(None)
            self._keepalive = self._loop.call_later(KEEPALIVE_INTERVAL, self._send_keepalive)
            quic = self._quic
            addr = quic._remote_addr or ("", 0)
            leaf = quic.get_peercert()
            chain = tuple(c for c in map(_to_x509, quic.get_issuercerts()) if c is not None)
            self.conn._peer = PeerInfo(
                address=_fold_address(addr),
                certificate=_to_x509(leaf) if leaf is not None else None,
                chain=chain,
            )
        self.conn._on_event(event)

    def transmit(self) -> None:
        if defer_transmit(self):
            return  # once, at the end of the current read batch
        super().transmit()
        self.conn._on_progress()

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        self._last_rx = self._loop.time()
        super().datagram_received(data, addr)

    def _send_keepalive(self) -> None:
        self._keepalive = None
        if self.conn._terminated or self._peer_gone():
            return
        self._quic.send_ping(0)
        self.transmit()
        self._keepalive = self._loop.call_later(KEEPALIVE_INTERVAL, self._send_keepalive)
        if self._liveness is None:
            self._liveness = self._loop.call_later(LIVENESS_CHECK, self._check_liveness)

    def _check_liveness(self) -> None:
        self._liveness = None
        if self.conn._terminated or self._peer_gone():
            return
        self._liveness = self._loop.call_later(LIVENESS_CHECK, self._check_liveness)

    def _peer_gone(self) -> bool:
        """Close if the peer has been silent too long (see quic.py); True if we did."""
        silent = self._loop.time() - self._last_rx
        core = self._quic._core
        limit = PEER_SILENCE_TIMEOUT
        if self._connected and core is not None and core.bytes_in_flight > 0:
            # qh3 exposes no PTO; srtt x 3 + max_ack_delay approximates it.
            pto = 3 * (core.smoothed_rtt or 0.0) + MAX_ACK_DELAY
            limit = min(limit, max(BUSY_SILENCE_FLOOR, 4 * pto))
        if silent <= limit:
            return False
        log.debug("QUIC peer silent; closing", extra={"attrs": {"silent": f"{silent:.1f}s"}})
        self.conn._on_terminated(f"peer silent for {silent:.1f}s")
        with contextlib.suppress(Exception):
            self._quic.close(error_code=0, reason_phrase="")
            self.transmit()
        return True

    def _stop_keepalive(self) -> None:
        for handle in (self._keepalive, self._liveness):
            if handle is not None:
                handle.cancel()
        self._keepalive = self._liveness = None


def _configuration(tls: QuicTlsConfig) -> QuicConfiguration:
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=[ALPN],
        idle_timeout=IDLE_TIMEOUT,
        max_stream_data=STREAM_WINDOW,
        max_data=CONNECTION_WINDOW,
        max_datagram_size=MAX_DATAGRAM_SIZE,
        probe_datagram_size=False,
        server_name=tls.server_name,
    )
    config.load_cert_chain(tls.cert_file, tls.key_file)
    config.load_verify_locations(cafile=tls.ca_file)
    return config


async def connect_quic_qh3(
    host: str,
    port: int,
    tls: QuicTlsConfig,
    *,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> Qh3Conn:
    """Dial a relay with qh3 and complete the QUIC/TLS handshake.

    Same contract as :func:`outrelay.transport.quic.connect_quic`.

    Raises:
        BrokenResourceError: resolution, the handshake or the server's
            certificate check failed, or the handshake timed out.
    """
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise BrokenResourceError(f"cannot resolve {host}:{port}: {exc}") from exc
    family, _, _, _, addr = infos[0]
    try:
        config = _configuration(tls)
    except Exception as exc:
        raise BrokenResourceError(f"cannot load the QUIC client identity: {exc}") from exc
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind(("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0))
        protocol = _Qh3Protocol(_HeldQuicConnection(configuration=config))
        transport = BatchDatagramTransport(loop, sock, protocol)
    except OSError as exc:
        sock.close()
        raise BrokenResourceError(f"cannot open a UDP socket: {exc}") from exc
    conn = protocol.conn

    def _close_socket() -> None:
        loop.call_later(0.1, transport.close)

    conn._on_closed.append(_close_socket)
    try:
        protocol.connect((str(addr[0]), int(addr[1])))
        async with asyncio.timeout(handshake_timeout):
            await protocol.handshake
    except TimeoutError as exc:
        conn.close(0, "")
        raise BrokenResourceError(
            f"QUIC handshake with {host}:{port} timed out after {handshake_timeout:g}s"
        ) from exc
    except Exception as exc:  # ConnectionError, TLS alerts, errors from qh3
        conn.close(0, "")
        raise handshake_failed(conn, f"{host}:{port}", exc) from exc
    return conn
