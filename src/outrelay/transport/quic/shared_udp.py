"""One UDP socket for every QUIC connection of an agent (spec 03 §2.3).

With ``--p2p-listen`` the agent binds a single UDP socket that carries:

* its outbound QUIC connection to the relay (and every reconnect),
* a QUIC **server** for direct dials from peer agents (mTLS, client
  certificate required and verified, ALPN ``orp/1``),
* its own connectivity-check dials to peers,
* the one-byte warm-up punches (spec 03 §7.6).

The point is NAT traversal: the address the relay observes for the session
(the srflx candidate) is the NAT mapping of *this* socket, so a peer that
dials it reaches the listener, and our checks leave through the same mapping
the peer's punch opened.

Received datagrams are routed by destination connection id ([REC] §2.3):
every connection's ids, client and server role alike, live in one table
(aioquic's :class:`QuicServer` keeps it; client connections are added with
the same issue/retire/terminate hooks), an unknown id on a full-sized
Initial starts a server connection, and anything else -- a punch byte, a
datagram without the QUIC fixed bit, garbage -- is dropped silently.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aioquic.quic.connection import QuicConnection

from outrelay.transport.addresses import bind_udp, fold_address, resolve_udp
from outrelay.transport.base import BrokenResourceError
from outrelay.transport.quic import _aioquic
from outrelay.transport.quic.client import client_handshake, configuration, server_configuration
from outrelay.transport.quic.protocol import AioquicProtocol, QuicConn
from outrelay.transport.quic.server import server_protocol_factory
from outrelay.transport.quic.settings import HANDSHAKE_TIMEOUT
from outrelay.transport.tls import QuicTlsConfig
from outrelay.transport.udp import BatchDatagramTransport

if TYPE_CHECKING:
    from cryptography import x509

__all__ = ["PUNCH", "OtherFamily", "SharedUdpEndpoint", "is_quic_datagram", "open_shared_udp"]

log = logging.getLogger("outrelay.transport.shared_udp")

PUNCH = b"\x00"
"""The warm-up datagram (spec 03 §7.6): one zero byte, never valid QUIC."""
_FIXED_BIT = 0x40
_MIN_QUIC = 21
"""A short-header packet: 1 flag byte + 8-byte connection id + ≥ 1 packet
number byte + ≥ 16-byte AEAD tag, rounded down a little; anything shorter
cannot be QUIC for us."""


class OtherFamily(BrokenResourceError):
    """The address is of a family this socket cannot send to (IPv6 from an IPv4 socket)."""


def is_quic_datagram(data: bytes) -> bool:
    """Could ``data`` be a QUIC packet? (RFC 9000 §17: the fixed bit is set.)"""
    return len(data) >= _MIN_QUIC and bool(data[0] & _FIXED_BIT)


class _Demux(_aioquic.ServerBase):
    """aioquic's server, taught to drop non-QUIC datagrams and to route to clients too."""

    dropped = 0

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        if not isinstance(data, bytes) or not is_quic_datagram(data):
            self.dropped += 1
            return
        super().datagram_received(data, addr)

    def add_client(self, protocol: AioquicProtocol) -> None:
        """Route the connection ids of client-role ``protocol`` to it, for its whole life."""
        routes = self.routes
        for cid in protocol.host_cids():
            routes[cid] = protocol

        def issued(cid: bytes) -> None:
            # aioquic may still issue ids while a connection we closed drains:
            # they must not route datagrams to it again.
            if not protocol.conn.terminated:
                routes[cid] = protocol

        def retired(cid: bytes) -> None:
            if routes.get(cid) is protocol:
                del routes[cid]

        self.route(protocol, issued, retired)
        protocol.conn.add_close_callback(lambda: self.connection_ended(protocol))


class SharedUdpEndpoint:
    """The agent's one UDP socket; :meth:`close` ends it and every connection on it."""

    def __init__(
        self,
        sock: socket.socket,
        demux: _Demux,
        tls: QuicTlsConfig,
        protocols: set[AioquicProtocol],
    ) -> None:
        self._sock = sock
        self._demux = demux
        self._tls = tls
        self._server_protocols = protocols
        self._closed = False
        loop = asyncio.get_running_loop()
        self._transport = BatchDatagramTransport(loop, sock, demux)
        self.address: tuple[str, int] = fold_address(sock.getsockname())
        """The bound address (port resolved when 0 was asked)."""

    @property
    def family(self) -> int:
        return self._sock.family

    @property
    def dropped(self) -> int:
        """Datagrams dropped as not QUIC (punches, garbage)."""
        return self._demux.dropped

    @property
    def routed_ids(self) -> int:
        """Connection IDs the socket routes: what it still holds for its connections."""
        return len(self._demux.routes)

    def _sockaddr(self, host: str, port: int) -> Any:
        """``host:port`` as this socket's family wants it (IPv4 mapped on a dual-stack one)."""
        if self.family == socket.AF_INET6 and ":" not in host:
            return (f"::ffff:{host}", port, 0, 0)
        return (host, port)

    async def connect(
        self, host: str, port: int, tls: QuicTlsConfig | None = None, *,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> QuicConn:  # fmt: skip
        """Dial ``host:port`` as a QUIC client from the shared socket.

        Raises:
            OtherFamily: the address is of a family this socket cannot reach.
            BrokenResourceError: resolution or the handshake failed, or it timed out.
        """
        if self._closed:
            raise BrokenResourceError("the shared UDP socket is closed")
        if self.family == socket.AF_INET:
            try:
                _, addr = await resolve_udp(host, port, socket.AF_INET)
            except BrokenResourceError:
                await resolve_udp(host, port)  # the name's own error, if it has no address
                raise OtherFamily(f"{host}:{port} is not reachable from an IPv4 socket") from None
        else:
            resolved_family, addr = await resolve_udp(host, port)
            if resolved_family == socket.AF_INET:
                addr = self._sockaddr(addr[0], addr[1])
        config = configuration(tls or self._tls, is_client=True)
        protocol = AioquicProtocol(QuicConnection(configuration=config))
        protocol.connection_made(self._transport)
        self._demux.add_client(protocol)
        return await client_handshake(protocol, addr, f"{host}:{port}", handshake_timeout)

    def send_raw(self, data: bytes, host: str, port: int) -> None:
        """Send one datagram that is not QUIC (the warm-up punch).

        Raises:
            OSError: the address is unusable from this socket.
        """
        if self._closed:
            raise OSError("the shared UDP socket is closed")
        self._sock.sendto(data, self._sockaddr(host, port))

    def reload_tls(self, tls: QuicTlsConfig) -> None:
        """Inbound handshakes use ``tls`` from now on (certificate reload)."""
        self._demux.quic_configuration = server_configuration(tls)
        self._tls = tls

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for protocol in list(self._server_protocols):
            protocol.conn.close(0, "")
        for any_protocol in set(self._demux.routes.values()):
            if isinstance(any_protocol, AioquicProtocol):
                any_protocol.conn.close(0, "")
        # Let the CONNECTION_CLOSE packets leave before the socket goes.
        asyncio.get_running_loop().call_later(0.1, self._transport.close)


async def open_shared_udp(
    host: str,
    port: int,
    tls: QuicTlsConfig,
    *,
    verify_client: Callable[[x509.Certificate | None, tuple[x509.Certificate, ...]], str],
    on_connection: Callable[[QuicConn], None],
    on_refused: Callable[[tuple[str, int], str], None] | None = None,
) -> SharedUdpEndpoint:
    """Bind the shared socket; verified inbound connections go to ``on_connection``.

    Raises:
        OSError: the address could not be bound.
    """
    sock = await bind_udp(host, port)
    protocols: set[AioquicProtocol] = set()
    try:
        demux = _Demux(
            configuration=server_configuration(tls),
            create_protocol=server_protocol_factory(
                verify_client, on_connection, on_refused, protocols
            ),
        )
        return SharedUdpEndpoint(sock, demux, tls, protocols)
    except OSError:
        sock.close()
        raise
