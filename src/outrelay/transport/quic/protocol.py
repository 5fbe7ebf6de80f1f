"""The aioquic side of a connection: :class:`QuicConn` and its asyncio protocol.

What aioquic does not do for us, and this module adds (DESIGN.md):

* **Receive backpressure.** aioquic raises a stream's receive window when
  bytes *arrive* (doubling without bound). We return credit when the
  application *consumes* bytes: the window is always ``consumed +
  STREAM_WINDOW``, so a slow reader caps what the peer can push.
* **Send backpressure.** ``send_all`` waits while the stream's unacknowledged
  bytes exceed ``SEND_BUFFER``.
* **Stream limit.** ``open_stream`` waits while the peer's MAX_STREAMS is
  reached, instead of queueing data on a blocked stream.
* **Keep-alive** (:mod:`outrelay.transport.quic.keepalive`).

Everything that touches aioquic's privates goes through
:mod:`outrelay.transport.quic._aioquic`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aioquic.quic import events
from aioquic.quic.connection import QuicConnection

from outrelay.transport.addresses import fold_address
from outrelay.transport.base import PeerInfo, Stream
from outrelay.transport.quic import _aioquic, path_mtu, settings
from outrelay.transport.quic.connection import QuicConnBase
from outrelay.transport.quic.keepalive import KeepAlive
from outrelay.transport.quic.stream import QuicStream
from outrelay.transport.udp import defer_transmit

__all__ = ["AioquicProtocol", "QuicConn"]

log = logging.getLogger("outrelay.transport.quic")


class QuicConn(QuicConnBase):
    """A :class:`Connection` over one aioquic connection."""

    def __init__(self, protocol: AioquicProtocol) -> None:
        super().__init__(protocol)
        self._quic: QuicConnection = protocol.quic
        self._announce = False
        """Forward mode: streams are announced before their first byte (see
        :func:`_aioquic.announce_stream`), and the peer's silent streams are accepted."""
        self._announced: set[int] = set()

    # -- Connection API ------------------------------------------------------------------

    @property
    def rtt(self) -> float | None:
        """Smoothed round-trip time in seconds, once measured."""
        return _aioquic.rtt(self._quic)

    @property
    def datagram_size(self) -> int:
        """The size of the datagrams this end sends now (:mod:`.path_mtu`)."""
        return _aioquic.datagram_size(self._quic)

    async def open_stream(self) -> Stream:
        async with self._open_lock:
            stream = await self._new_stream()
            stream_id = stream.stream_id
            # Sending nothing allocates the stream id in aioquic; the peer sees
            # the stream with our first bytes.
            self._quic.send_stream_data(stream_id, b"", False)
            if self._announce:
                _aioquic.announce_stream(self._quic, stream_id)
                self.transmit_soon()
            return stream

    def close(self, error_code: int = 0, reason: str = "") -> None:
        if self._terminated:
            return
        why = self._closed_locally(error_code, reason)
        self._protocol.close(error_code=error_code, reason_phrase=reason)
        # aioquic waits for the closing period before reporting termination;
        # our users are done with it now.
        self._terminate(why)

    def announce_streams(self) -> None:
        """Forward mode: announce our streams at once and accept the peer's silent ones."""
        self._announce = True

    # -- StreamOwner: aioquic's part -----------------------------------------------------

    def unsent_bytes(self, stream_id: int) -> int:
        return _aioquic.unsent_bytes(self._quic, stream_id)

    def send_data(self, stream_id: int, data: memoryview) -> None:
        self._quic.send_stream_data(stream_id, bytes(data), False)

    def send_fin(self, stream_id: int) -> None:
        self._quic.send_stream_data(stream_id, b"", True)

    def reset_stream(self, stream_id: int, code: int) -> None:
        self._quic.reset_stream(stream_id, code)

    def stop_stream(self, stream_id: int, code: int) -> None:
        self._quic.stop_stream(stream_id, code)

    def on_buffered(self, stream: QuicStream) -> None:
        pass  # credit follows consumption (see credit_target)

    def on_consumed(self, stream: QuicStream) -> None:
        """Transmit when the consumed bytes move the window by half of it or more."""
        target = stream.received.consumed + settings.STREAM_WINDOW
        if _aioquic.credit_due(self._quic, stream.stream_id, target, settings.STREAM_WINDOW // 2):
            self.transmit_soon()

    def credit_target(self, stream_id: int) -> int | None:
        """The receive limit a stream should have: what was consumed plus a window."""
        stream = self._streams.get(stream_id)
        return None if stream is None else stream.received.consumed + settings.STREAM_WINDOW

    # -- internals -------------------------------------------------------------------

    def _is_client(self) -> bool:
        return _aioquic.is_client(self._quic)

    def _remote_bidi_limit(self) -> int:
        return _aioquic.remote_bidi_stream_limit(self._quic)

    def _is_new_peer_stream(self, stream_id: int) -> bool:
        if _aioquic.has_stream(self._quic, stream_id) and self._terminated:
            return False
        return stream_id not in self._announced  # accepted silently before, and forgotten since

    def accept_silent_streams(self) -> None:
        """Queue peer streams that exist but carried no byte yet (an empty STREAM frame)."""
        if not self._announce or self._terminated:
            return
        for stream_id in _aioquic.stream_ids(self._quic):
            if (
                stream_id in self._announced
                or stream_id in self._streams
                or stream_id & 2
                or not self._is_peer_stream(stream_id)
            ):
                continue
            self._announced.add(stream_id)
            self._queue_accepted(stream_id, QuicStream(self, stream_id))


class AioquicProtocol(_aioquic.ProtocolBase):
    """aioquic protocol that feeds one :class:`QuicConn`."""

    def __init__(
        self,
        quic: QuicConnection,
        stream_handler: Any = None,
        *,
        on_handshake: Callable[[AioquicProtocol], None] | None = None,
        keepalive_interval: float = settings.KEEPALIVE_INTERVAL,
        silence_timeout: float = settings.PEER_SILENCE_TIMEOUT,
        handshake_timeout: float = settings.HANDSHAKE_TIMEOUT,
    ) -> None:
        super().__init__(quic, stream_handler)
        self.conn = QuicConn(self)
        self.keepalive = KeepAlive(
            self.loop, self, interval=keepalive_interval, silence_timeout=silence_timeout
        )
        self._handshake_timeout = handshake_timeout
        self._on_handshake = on_handshake
        self.handshake: asyncio.Future[None] = self.loop.create_future()
        """Resolved when the handshake completes; fails if the connection ends first."""
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._discarded = False
        """Server side: forgotten before its handshake completed (see :meth:`discard`)."""
        self._path_timer: asyncio.TimerHandle | None = None
        self._black_holes: path_mtu.BlackHoleDetector | None = None
        """Watches large packets once the connection sent any (:mod:`.path_mtu`)."""
        _aioquic.install_patches(
            quic,
            credit_target=self.conn.credit_target,
            credit_step=settings.STREAM_WINDOW // 2,
            max_incoming_streams=settings.MAX_INCOMING_STREAMS,
        )

    # -- Pinger (for KeepAlive) ------------------------------------------------------

    @property
    def terminated(self) -> bool:
        return self.conn.terminated

    def send_ping(self) -> None:
        self.quic.send_ping(0)
        self.transmit()

    def datagram_backlog(self) -> int | None:
        return _aioquic.datagram_backlog(self.quic)

    def probe_timeout_in_flight(self) -> float | None:
        in_flight, pto = _aioquic.loss_state(self.quic)
        return pto if in_flight > 0 else None

    def close_silent(self, reason: str) -> None:
        if self.connected and _aioquic.datagram_size(self.quic) > settings.MAX_DATAGRAM_SIZE:
            path_mtu.note_black_hole(self.conn.peer.address[0], self.loop.time())
        self.conn._terminate(reason)
        self.quic.close(error_code=0, reason_phrase="")
        self.transmit()

    # -- asyncio and aioquic callbacks -----------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not _aioquic.is_client(self.quic):
            self._handshake_timer = self.loop.call_later(
                self._handshake_timeout, self._handshake_expired
            )

    def _handshake_expired(self) -> None:
        if not self.connected:
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
        # An armed timer's callback references this protocol: it would keep
        # the connection alive until the idle timeout.
        self.cancel_timer()
        self.forget_ids()
        self.conn._terminate(reason)

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.HandshakeCompleted):
            self.connected = True
            if not self.handshake.done():
                self.handshake.set_result(None)
            if self._handshake_timer is not None:
                self._handshake_timer.cancel()
            self.keepalive.start()
            leaf, chain = _aioquic.peer_certificates(self.quic)
            address = fold_address(_aioquic.peer_path_address(self.quic))
            self.conn._peer = PeerInfo(address=address, certificate=leaf, chain=chain)
            self.fit_datagrams()
            if self._on_handshake is not None:
                self._on_handshake(self)
        self.conn.on_event(event)

    def transmit(self) -> None:
        if self._discarded:
            return
        if defer_transmit(self):
            return  # once, at the end of the current read batch
        super().transmit()
        self.conn.on_progress()

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        if self._discarded:
            return
        self.keepalive.received()
        super().datagram_received(data, addr)
        self.conn.accept_silent_streams()

    def fit_datagrams(self) -> None:
        """Send datagrams as large as the path and the peer allow (:mod:`.path_mtu`).

        Looked at again every ``RECHECK_INTERVAL`` while above the start size,
        so that a smaller path MTU the kernel learns brings it down.
        """
        self._path_timer = None
        if self.conn.terminated:
            return
        quic = self.quic
        address = self.conn.peer.address
        path = None
        if not path_mtu.suspected(address[0], self.loop.time()):
            path = path_mtu.kernel_path_payload(address)
        size = path_mtu.choose_datagram_size(path, _aioquic.peer_max_udp_payload(quic))
        self._set_datagram_size(size)
        if size > settings.MAX_DATAGRAM_SIZE:
            if self._black_holes is None:
                self._black_holes = detector = path_mtu.BlackHoleDetector(
                    settings.MAX_DATAGRAM_SIZE
                )
                _aioquic.watch_packet_fates(quic, detector.acked, self._large_packet_lost)
            self._path_timer = self.loop.call_later(path_mtu.RECHECK_INTERVAL, self.fit_datagrams)

    def _set_datagram_size(self, size: int) -> None:
        before = _aioquic.datagram_size(self.quic)
        if size != before:
            _aioquic.set_datagram_size(self.quic, size)
            log.debug(
                "QUIC datagram size",
                extra={"attrs": {"peer": self.conn.peer.address, "from": before, "to": size}},
            )

    def _large_packet_lost(self, size: int) -> None:
        detector = self._black_holes
        if detector is None or not detector.lost(size, self.loop.time()):
            return
        if _aioquic.datagram_size(self.quic) <= settings.MAX_DATAGRAM_SIZE:
            return  # already back
        host = self.conn.peer.address[0]
        path_mtu.note_black_hole(host, self.loop.time())
        log.warning(
            "QUIC path drops large datagrams; back to the start size",
            extra={
                "attrs": {
                    "peer": host,
                    "size": _aioquic.datagram_size(self.quic),
                    "to": settings.MAX_DATAGRAM_SIZE,
                    "for_s": path_mtu.SUSPECT_FOR,
                }
            },
        )
        self._set_datagram_size(settings.MAX_DATAGRAM_SIZE)
        if self._path_timer is not None:
            self._path_timer.cancel()
            self._path_timer = None

    def stop_timers(self) -> None:
        self.keepalive.stop()
        if self._path_timer is not None:
            self._path_timer.cancel()
            self._path_timer = None
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
