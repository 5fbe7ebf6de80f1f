"""The agent's QUIC client on qh3 (Rust packet core), an optional backend.

Only the client side: the relay and every server-side use stay on aioquic,
whose server is the only one that requests and lets us verify client
certificates (DESIGN.md). :func:`connect_quic_qh3` returns a
:class:`Connection` with the same contract as
``outrelay.transport.quic.connect_quic``: ALPN ``orp/1``, keep-alive and
silence detection, bounded send buffers, waiting opens.

How qh3 2.x differs from aioquic, and what this module does about it:

* **Receive credit.** qh3's core raises a stream's window when its
  ``stream_data`` event is *popped* from the core's one connection-wide event
  queue (measured: a connection that stops popping lets the peer send exactly
  one window). There is no per-stream hook like aioquic's
  ``_write_stream_limits``, so per-stream credit on consumption is impossible.
  The equivalent we use: while any stream holds ``STREAM_WINDOW`` or more
  unread bytes, the connection stops popping events (the core is held), and
  it pops again once the reader has taken bytes. Memory stays
  bounded (per stream at most two windows plus one read batch), but a reader
  that stops reading pauses *every* stream of that connection until it reads
  again (head-of-line coupling that aioquic does not have). QUIC ACKs, PINGs
  and loss recovery run in the core and are not held.
* **Send buffer.** ``get_send_buffer_size`` counts bytes not yet sent once;
  bytes in flight are bounded by the congestion window on top of it.
* **Stream limit.** qh3 hard-codes 100 concurrent peer-opened bidirectional
  streams, in the core and in the transport parameters; we raise both to
  ``settings.MAX_INCOMING_STREAMS`` as on aioquic (``_qh3``: the core then
  accepts and replenishes them, measured with 1,024 at once, twice over).
  Our own opens wait for the peer's MAX_STREAMS.
* **Peer certificate.** qh3 parses certificates natively; the leaf and chain
  are converted to :mod:`cryptography` objects for :class:`PeerInfo`.

Errors come out as :mod:`outrelay.transport.base` errors; qh3's privates are
reached only through :mod:`outrelay.transport.quic._qh3`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

from cryptography import x509
from qh3.quic import events
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnectionError

from outrelay.transport.addresses import fold_address, resolve_udp
from outrelay.transport.base import BrokenResourceError, PeerInfo, Stream
from outrelay.transport.quic import _qh3, settings
from outrelay.transport.quic.connection import QuicConnBase, handshake_failed
from outrelay.transport.quic.keepalive import KeepAlive
from outrelay.transport.quic.stream import QuicStream
from outrelay.transport.tls import ALPN, QuicTlsConfig
from outrelay.transport.udp import BatchDatagramTransport, defer_transmit

__all__ = ["Qh3Conn", "connect_quic_qh3"]

MAX_ACK_DELAY = 0.025
"""qh3's max_ack_delay (25 ms); part of our probe-timeout estimate."""


class Qh3Conn(QuicConnBase):
    """A :class:`Connection` over one qh3 client connection."""

    _events = events

    def __init__(self, protocol: _Qh3Protocol) -> None:
        super().__init__(protocol)
        self._quic: _qh3.HeldQuicConnection = protocol.quic
        self._full: set[int] = set()
        """Streams holding ``STREAM_WINDOW`` or more unread bytes: while any
        does, the core's events (and so the peer's credit) are held."""
        self._quic.held = lambda: bool(self._full)

    # -- Connection API ------------------------------------------------------------------

    @property
    def rtt(self) -> float | None:
        """Smoothed round-trip time in seconds, once measured."""
        return _qh3.rtt(self._quic)

    @property
    def datagram_size(self) -> int:
        """The size of the datagrams this end sends (qh3 keeps its configured size)."""
        return settings.MAX_DATAGRAM_SIZE

    async def open_stream(self) -> Stream:
        async with self._open_lock:
            stream = await self._new_stream()
            stream_id = stream.stream_id
            # Allocates the id; the peer sees the stream with our first bytes.
            try:
                self._quic.send_stream_data(stream_id, b"", False)
            except QuicConnectionError as exc:
                self._streams.pop(stream_id, None)
                self._terminate(exc.reason_phrase)
                raise BrokenResourceError(f"connection lost: {exc.reason_phrase}") from exc
            return stream

    def close(self, error_code: int = 0, reason: str = "") -> None:
        if self._terminated:
            return
        why = self._closed_locally(error_code, reason)
        with contextlib.suppress(Exception):
            self._quic.close(error_code=error_code, reason_phrase=reason)
            self._protocol.transmit()
        self._terminate(why)

    # -- StreamOwner: qh3's part ---------------------------------------------------------

    def unsent_bytes(self, stream_id: int) -> int:
        if self._terminated:
            return 0
        return int(self._quic.get_send_buffer_size(stream_id))

    def send_data(self, stream_id: int, data: memoryview) -> None:
        try:
            self._quic.send_stream_data(stream_id, data, False)
        except QuicConnectionError as exc:
            # The core closed before its ConnectionTerminated was popped.
            self._terminate(exc.reason_phrase)
            raise BrokenResourceError(f"connection lost: {exc.reason_phrase}") from exc

    def send_fin(self, stream_id: int) -> None:
        self._quic.send_stream_data(stream_id, b"", True)

    def reset_stream(self, stream_id: int, code: int) -> None:
        self._quic.reset_stream(stream_id, code)

    def stop_stream(self, stream_id: int, code: int) -> None:
        self._quic.stop_stream(stream_id, code)

    def on_buffered(self, stream: QuicStream) -> None:
        if stream.received.buffered >= settings.STREAM_WINDOW:
            self._full.add(stream.stream_id)

    def on_consumed(self, stream: QuicStream) -> None:
        if stream.received.buffered < settings.STREAM_WINDOW:
            self._drained(stream.stream_id)

    def forget(self, stream: QuicStream) -> None:
        super().forget(stream)
        self._drained(stream.stream_id)

    # -- internals -------------------------------------------------------------------

    def _drained(self, stream_id: int) -> None:
        """A stream fell below the window: pop what the core held back."""
        if stream_id not in self._full:
            return
        self._full.discard(stream_id)
        if not self._full and not self._terminated:
            self._quic.drain_held()
            self._protocol.process_events()
            self.transmit_soon()

    def _is_client(self) -> bool:
        return True

    def _remote_bidi_limit(self) -> int:
        return int(self._quic.max_concurrent_bidi_streams)

    def _is_new_peer_stream(self, stream_id: int) -> bool:
        return not self._terminated


def _to_x509(cert: Any) -> x509.Certificate | None:
    try:
        return x509.load_der_x509_certificate(cert.public_bytes())
    except Exception:
        return None


class _Qh3Protocol(_qh3.ProtocolBase):
    """qh3 protocol that feeds one :class:`Qh3Conn`; keep-alive as on aioquic."""

    def __init__(self, quic: _qh3.HeldQuicConnection) -> None:
        super().__init__(quic)
        self.conn = Qh3Conn(self)
        self.keepalive = KeepAlive(
            self.loop,
            self,
            interval=settings.KEEPALIVE_INTERVAL,
            silence_timeout=settings.PEER_SILENCE_TIMEOUT,
        )
        self.handshake: asyncio.Future[None] = self.loop.create_future()
        """Resolved when the handshake completes; fails if the connection ends first."""

    # -- Pinger (for KeepAlive) ------------------------------------------------------

    @property
    def terminated(self) -> bool:
        return self.conn.terminated

    def send_ping(self) -> None:
        try:
            self.quic.send_ping(0)
        except QuicConnectionError as exc:  # the core closed; its event not popped yet
            self.conn._terminate(exc.reason_phrase)
            return
        self.transmit()

    def datagram_backlog(self) -> int | None:
        return _qh3.datagram_backlog(self.quic)

    def probe_timeout_in_flight(self) -> float | None:
        in_flight, srtt = _qh3.bytes_in_flight(self.quic)
        # qh3 exposes no PTO; srtt x 3 + max_ack_delay approximates it.
        return 3 * srtt + MAX_ACK_DELAY if in_flight > 0 else None

    def close_silent(self, reason: str) -> None:
        self.conn._terminate(reason)
        with contextlib.suppress(Exception):
            self.quic.close(error_code=0, reason_phrase="")
            self.transmit()

    # -- asyncio and qh3 callbacks ---------------------------------------------------

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.HandshakeCompleted):
            self.connected = True
            if not self.handshake.done():
                self.handshake.set_result(None)
            self.keepalive.start()
            quic = self.quic
            leaf = quic.get_peercert()
            chain = tuple(c for c in map(_to_x509, quic.get_issuercerts()) if c is not None)
            self.conn._peer = PeerInfo(
                address=fold_address(_qh3.remote_address(quic)),
                certificate=_to_x509(leaf) if leaf is not None else None,
                chain=chain,
            )
        self.conn.on_event(event)

    def transmit(self) -> None:
        if defer_transmit(self):
            return  # once, at the end of the current read batch
        super().transmit()
        self.conn.on_progress()

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        self.keepalive.received()
        super().datagram_received(data, addr)

    def stop_timers(self) -> None:
        self.keepalive.stop()


def _configuration(tls: QuicTlsConfig) -> QuicConfiguration:
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=[ALPN],
        idle_timeout=settings.IDLE_TIMEOUT,
        max_stream_data=settings.STREAM_WINDOW,
        max_data=settings.CONNECTION_WINDOW,
        max_datagram_size=settings.MAX_DATAGRAM_SIZE,
        max_datagram_frame_size=settings.DATAGRAM_FRAME_MAX,
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
    handshake_timeout: float = settings.HANDSHAKE_TIMEOUT,
) -> Qh3Conn:
    """Dial a relay with qh3 and complete the QUIC/TLS handshake.

    Same contract as ``outrelay.transport.quic.connect_quic``.

    Raises:
        BrokenResourceError: resolution, the handshake or the server's
            certificate check failed, or the handshake timed out.
    """
    loop = asyncio.get_running_loop()
    family, addr = await resolve_udp(host, port)
    try:
        config = _configuration(tls)
    except Exception as exc:
        raise BrokenResourceError(f"cannot load the QUIC client identity: {exc}") from exc
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind(("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0))
        quic = _qh3.HeldQuicConnection(
            configuration=config, max_streams_bidi=settings.MAX_INCOMING_STREAMS
        )
        protocol = _Qh3Protocol(quic)
        transport = BatchDatagramTransport(loop, sock, protocol)
    except OSError as exc:
        sock.close()
        raise BrokenResourceError(f"cannot open a UDP socket: {exc}") from exc
    conn = protocol.conn

    def _close_socket() -> None:
        loop.call_later(0.1, transport.close)

    conn.add_close_callback(_close_socket)
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
