"""The one module that reaches into aioquic's private attributes or patches its methods.

aioquic (pinned in pyproject.toml) is a sans-IO core with an asyncio shell;
both lack what we need in a few places (see :mod:`outrelay.transport.quic`).
Every private name we read, every method we replace and every private hook
we set lives here, with its reason, so that an aioquic upgrade is checked in
one place: ``tests/transport/test_quic_private_api.py`` asserts each of them
still exists with the signature we rely on, and names what is gone.

The rest of the package only sees the functions and the two base classes
below (:class:`ProtocolBase`, :class:`ServerBase`), which expose the
privates as public names.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from aioquic._buffer import Buffer
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic.connection import QuicConnection, QuicConnectionState
from aioquic.quic.packet import (
    QuicFrameType,
    QuicHeader,
    QuicStreamFrame,
    pull_quic_header,
    pull_quic_transport_parameters,
)
from aioquic.quic.packet_builder import QuicDeliveryState
from aioquic.tls import ExtensionType

from outrelay.transport.udp import RecordsSockname

if TYPE_CHECKING:
    import asyncio

    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.packet_builder import QuicPacketBuilder
    from aioquic.quic.recovery import QuicPacketSpace
    from aioquic.quic.stream import QuicStream as _AioStream
    from cryptography import x509

__all__ = [
    "ProtocolBase",
    "ServerBase",
    "announce_stream",
    "credit_due",
    "datagram_backlog",
    "datagram_size",
    "has_stream",
    "install_patches",
    "is_client",
    "loss_state",
    "parse_header",
    "peer_certificates",
    "peer_max_udp_payload",
    "peer_path_address",
    "remote_bidi_stream_limit",
    "rtt",
    "set_datagram_size",
    "still_first_flight",
    "stream_ids",
    "unsent_bytes",
    "watch_packet_fates",
]

CreditTarget = Callable[[int], "int | None"]
"""``credit_target(stream_id)``: the receive limit we want for a stream, or None."""


# -- QuicConnection: patches -------------------------------------------------------------


def install_patches(
    quic: QuicConnection,
    *,
    credit_target: CreditTarget,
    credit_step: int,
    max_incoming_streams: int,
) -> None:
    """Patch one connection before it starts.

    * ``_write_stream_limits`` (private method) is replaced so that credit
      follows consumption: aioquic doubles ``max_stream_data_local`` when
      bytes *arrive*; we set it to ``credit_target(stream_id)`` and move it
      only in steps of ``credit_step`` or more, so MAX_STREAM_DATA frames
      stay rare.
    * ``_local_max_streams_bidi`` / ``_uni`` (private) advertise quic-go's
      limits; ``sent`` must match what the transport parameters will say, or
      aioquic never raises the limit again.
    * server side, ``_initialize`` (private) is wrapped to flip
      ``tls._request_client_certificate`` (private switch, off by default):
      ask the client for a certificate, which we verify ourselves.
    """

    def write_stream_limits(
        self: QuicConnection,
        builder: QuicPacketBuilder,
        space: QuicPacketSpace,
        stream: _AioStream,
    ) -> None:
        stream_id = stream.stream_id
        assert stream_id is not None
        target = credit_target(stream_id)
        if (
            stream.max_stream_data_local
            and target is not None
            and target - stream.max_stream_data_local >= credit_step
        ):
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

    quic._write_stream_limits = types.MethodType(write_stream_limits, quic)  # type: ignore[method-assign]
    quic._local_max_streams_bidi.value = quic._local_max_streams_bidi.sent = max_incoming_streams
    quic._local_max_streams_uni.value = quic._local_max_streams_uni.sent = 0
    if not quic._is_client:
        original_initialize = quic._initialize

        def _initialize(peer_cid: bytes) -> None:
            original_initialize(peer_cid)
            quic.tls._request_client_certificate = True

        quic._initialize = _initialize  # type: ignore[method-assign]


def announce_stream(quic: QuicConnection, stream_id: int) -> None:
    """Make aioquic send an empty STREAM frame so the peer sees the stream at once.

    Spec 03 §8.3 [REC]: a server-speaks-first backend deadlocks if the
    provider only learns of the stream with the consumer's first byte.
    aioquic never sends a STREAM frame without data or FIN, so the stream's
    sender (private ``_streams``, ``_pending``, ``_pending_eof``) is taught
    one: its ``get_frame`` and ``on_data_delivery`` are wrapped so the next
    frame it builds is ``offset 0, length 0``; if that packet is lost the
    announcement is scheduled again, and once application bytes flow it is
    moot.
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


# -- QuicConnection: reads ---------------------------------------------------------------


def is_client(quic: QuicConnection) -> bool:
    return bool(quic._is_client)


def remote_bidi_stream_limit(quic: QuicConnection) -> int:
    """The peer's MAX_STREAMS (bidi): stream ids ``// 4`` below it may be opened."""
    return int(quic._remote_max_streams_bidi)


def has_stream(quic: QuicConnection, stream_id: int) -> bool:
    return stream_id in quic._streams


def stream_ids(quic: QuicConnection) -> list[int]:
    """Every stream aioquic knows (ours and the peer's, data or not)."""
    return list(quic._streams)


def unsent_bytes(quic: QuicConnection, stream_id: int) -> int:
    """Bytes of a stream's send buffer not yet acknowledged (private sender offsets)."""
    aio = quic._streams.get(stream_id)
    if aio is None:
        return 0
    sender = aio.sender
    return int(sender._buffer_stop - sender._buffer_start)


def credit_due(quic: QuicConnection, stream_id: int, target: int, step: int) -> bool:
    """Would the receive limit move to ``target`` (by ``step`` or more)? Then transmit."""
    aio = quic._streams.get(stream_id)
    if aio is None or not aio.max_stream_data_local:
        return False
    return target - aio.max_stream_data_local >= step


def rtt(quic: QuicConnection) -> float | None:
    """Smoothed round-trip time (private loss recovery state), once measured."""
    loss = quic._loss
    return float(loss._rtt_smoothed) if loss._rtt_initialized else None


def loss_state(quic: QuicConnection) -> tuple[int, float]:
    """``(ack-eliciting packets awaiting an ACK, probe timeout)`` from the private loss recovery.

    Counted per packet space (``spaces[].ack_eliciting_in_flight``), not with
    the congestion controller's ``bytes_in_flight``: aioquic 1.7 leaves the
    first Initial's bytes in that counter when a server answers with Retry,
    so after a Retry the connection looked busy forever and the keep-alive's
    busy-silence rule closed it at a keep-alive tick (measured: 518 bytes
    "in flight" on an idle connection; agents joining during a flood dropped
    with "peer silent for 3.0s").
    """
    loss = quic._loss
    in_flight = sum(space.ack_eliciting_in_flight for space in loss.spaces)
    return int(in_flight), float(loss.get_probe_timeout())


def peer_path_address(quic: QuicConnection) -> Any:
    """The peer's address on the first network path (private ``_network_paths``)."""
    return quic._network_paths[0].addr if quic._network_paths else ("", 0)


def peer_certificates(
    quic: QuicConnection,
) -> tuple[x509.Certificate | None, tuple[x509.Certificate, ...]]:
    """The peer's leaf and chain as the TLS context (private fields) stored them."""
    tls = quic.tls
    leaf: x509.Certificate | None = getattr(tls, "_peer_certificate", None)
    chain = tuple(getattr(tls, "_peer_certificate_chain", ()) or ())
    return leaf, chain


def set_datagram_size(quic: QuicConnection, size: int) -> None:
    """Send datagrams of up to ``size`` bytes from now on (private fields).

    aioquic fixes the size at construction (``configuration.max_datagram_size``)
    and copies it into the packet builder's argument, the pacer and the
    congestion controller (its window grows in units of it).
    """
    quic._max_datagram_size = size
    loss = quic._loss
    loss._pacer._max_datagram_size = size
    cc: Any = loss._cc  # reno and cubic keep it; the base class does not declare it
    cc._max_datagram_size = size


def watch_packet_fates(
    quic: QuicConnection, on_acked: Callable[[int], None], on_lost: Callable[[int], None]
) -> None:
    """Call ``on_acked(size)`` / ``on_lost(size)`` for every in-flight packet's fate.

    Wraps this connection's congestion controller (private ``_loss._cc``),
    which loss recovery tells of every acknowledged packet, every packet
    declared lost, and every packet a probe timeout gave up on (expired).
    """
    cc: Any = quic._loss._cc
    acked, lost, expired = cc.on_packet_acked, cc.on_packets_lost, cc.on_packets_expired

    def packet_acked(*, now: float, packet: Any) -> None:
        on_acked(packet.sent_bytes)
        acked(now=now, packet=packet)

    def packets_lost(*, now: float, packets: Any) -> None:
        packets = list(packets)
        for packet in packets:
            on_lost(packet.sent_bytes)
        lost(now=now, packets=packets)

    def packets_expired(*, packets: Any) -> None:
        packets = list(packets)
        for packet in packets:
            on_lost(packet.sent_bytes)
        expired(packets=packets)

    cc.on_packet_acked = packet_acked
    cc.on_packets_lost = packets_lost
    cc.on_packets_expired = packets_expired


def datagram_backlog(quic: QuicConnection) -> int | None:
    """DATAGRAM frames queued to send (private ``_datagrams_pending``; aioquic does not bound
    it), or None when the peer accepts none (its private ``_remote_max_datagram_frame_size``,
    RFC 9221 §3)."""
    if quic._remote_max_datagram_frame_size is None:
        return None
    return len(quic._datagrams_pending)


def datagram_size(quic: QuicConnection) -> int:
    """The size datagrams are built with now (private ``_max_datagram_size``)."""
    return int(quic._max_datagram_size)


def peer_max_udp_payload(quic: QuicConnection) -> int | None:
    """The peer's ``max_udp_payload_size`` transport parameter, None if it sent none.

    aioquic validates the parameter but keeps no copy, so it is read again
    from the TLS extension the peer sent (``tls.received_extensions`` is
    public; its parser lives in aioquic's private ``_buffer`` module).
    """
    for ext_type, ext_data in quic.tls.received_extensions or ():
        if ext_type == ExtensionType.QUIC_TRANSPORT_PARAMETERS:
            try:
                params = pull_quic_transport_parameters(Buffer(data=ext_data))
            except Exception:
                return None
            value = params.max_udp_payload_size
            return None if value is None else int(value)
    return None


def parse_header(data: bytes, cid_length: int) -> QuicHeader:
    """A packet's header, read with aioquic's buffer (private module ``aioquic._buffer``).

    Raises:
        ValueError: not a QUIC header.
    """
    return pull_quic_header(Buffer(data=data), host_cid_length=cid_length)


def still_first_flight(quic: QuicConnection) -> bool:
    """A server connection not a single packet of which decrypted (private ``_state``)."""
    return bool(quic._state == QuicConnectionState.FIRSTFLIGHT)


# -- the asyncio protocol ----------------------------------------------------------------


class ProtocolBase(RecordsSockname, QuicConnectionProtocol):
    """aioquic's protocol with its private fields under public names."""

    @property
    def quic(self) -> QuicConnection:
        return self._quic

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    @property
    def connected(self) -> bool:
        return self._connected

    @connected.setter
    def connected(self, value: bool) -> None:
        self._connected = value

    def transmit_soon(self) -> None:
        """Coalesce writes: one ``transmit()`` at the next loop iteration (private)."""
        self._transmit_soon()

    def cancel_timer(self) -> None:
        """Cancel aioquic's one timer (private ``_timer``), whose callback keeps us alive."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def forget_ids(self) -> None:
        """Call the hook (set by the server) that forgets our connection ids."""
        self._connection_terminated_handler()

    def set_id_hooks(
        self,
        issued: Callable[[bytes], None],
        retired: Callable[[bytes], None],
        terminated: Callable[[], None],
    ) -> None:
        """Set the private hooks aioquic calls as connection ids come and go."""
        self._connection_id_issued_handler = issued
        self._connection_id_retired_handler = retired
        self._connection_terminated_handler = terminated

    def host_cids(self) -> list[bytes]:
        """The connection ids we issued so far (private ``_host_cids``)."""
        return [cid.cid for cid in self._quic._host_cids]


class ServerBase(QuicServer):
    """aioquic's server with its private fields under public names.

    ``routes`` is aioquic's CID -> protocol map (``_protocols``): we route
    through it and register connections in it, as aioquic does.
    """

    @property
    def routes(self) -> dict[bytes, QuicConnectionProtocol]:
        return self._protocols

    @property
    def transport(self) -> asyncio.DatagramTransport | None:
        return self._transport

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    @property
    def quic_configuration(self) -> QuicConfiguration:
        return self._configuration

    @quic_configuration.setter
    def quic_configuration(self, configuration: QuicConfiguration) -> None:
        # aioquic copies nothing from it at bind time: each new connection reads
        # ``self._configuration``, so a certificate reload just swaps it.
        self._configuration = configuration

    def start_connection(self, connection: QuicConnection, dcid: bytes) -> Any:
        """aioquic's own connection set-up (``QuicServer.datagram_received``) for ``connection``.

        Returns the protocol ``create_protocol`` made, routed by ``dcid`` and its host CID.
        """
        protocol = self._create_protocol(connection, stream_handler=self._stream_handler)
        protocol.connection_made(self._transport)
        self.route(protocol)
        self._protocols[dcid] = protocol
        self._protocols[connection.host_cid] = protocol
        return protocol

    def route(
        self,
        protocol: ProtocolBase,
        issued: Callable[[bytes], None] | None = None,
        retired: Callable[[bytes], None] | None = None,
    ) -> None:
        """Keep ``protocol``'s connection ids routed to it (aioquic's private hooks by default)."""
        protocol.set_id_hooks(
            issued or partial(self._connection_id_issued, protocol=protocol),
            retired or partial(self._connection_id_retired, protocol=protocol),
            partial(self.connection_ended, protocol=protocol),
        )

    def connection_ended(self, protocol: QuicConnectionProtocol) -> None:
        """Forget every connection id of ``protocol``."""
        self._connection_terminated(protocol=protocol)
