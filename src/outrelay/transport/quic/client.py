"""Dialling QUIC with aioquic: to a relay, from a shared socket, over a packet endpoint."""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Protocol

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from outrelay.transport.addresses import resolve_udp
from outrelay.transport.base import BrokenResourceError
from outrelay.transport.quic import settings
from outrelay.transport.quic.connection import handshake_failed
from outrelay.transport.quic.protocol import AioquicProtocol, QuicConn
from outrelay.transport.tls import ALPN, FORWARD_ALPN, QuicTlsConfig
from outrelay.transport.udp import BatchDatagramTransport

__all__ = [
    "PacketEndpoint",
    "client_handshake",
    "configuration",
    "connect_quic",
    "connect_quic_on",
    "server_configuration",
]


def configuration(
    tls: QuicTlsConfig,
    *,
    is_client: bool,
    alpn: str = ALPN,
    idle_timeout: float = settings.IDLE_TIMEOUT,
) -> QuicConfiguration:
    """aioquic's configuration for one end: our limits, certificates and ALPN."""
    config = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[alpn],
        idle_timeout=idle_timeout,
        max_stream_data=settings.STREAM_WINDOW,
        max_data=settings.CONNECTION_WINDOW,
        max_datagram_size=settings.MAX_DATAGRAM_SIZE,
        max_datagram_frame_size=settings.DATAGRAM_FRAME_MAX,
        server_name=tls.server_name if is_client else None,
    )
    config.load_cert_chain(tls.cert_file, tls.key_file)
    if is_client:
        config.load_verify_locations(cafile=tls.ca_file)
    return config


def server_configuration(
    tls: QuicTlsConfig, alpn: str = ALPN, idle_timeout: float = settings.IDLE_TIMEOUT
) -> QuicConfiguration:
    """Server side: our certificate; the client's chain is verified by us, not aioquic."""
    config = configuration(tls, is_client=False, alpn=alpn, idle_timeout=idle_timeout)
    config.verify_mode = 0
    return config


async def connect_quic(
    host: str,
    port: int,
    tls: QuicTlsConfig,
    *,
    handshake_timeout: float = settings.HANDSHAKE_TIMEOUT,
) -> QuicConn:
    """Dial a relay (or peer agent) and complete the QUIC/TLS handshake.

    Each connection gets its own UDP socket, closed when the connection ends
    (:class:`~outrelay.transport.quic.shared_udp.SharedUdpEndpoint` dials from
    one shared socket instead).

    Raises:
        BrokenResourceError: resolution, the handshake or the server's
            certificate check failed, or the handshake timed out.
    """
    loop = asyncio.get_running_loop()
    family, addr = await resolve_udp(host, port)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind(("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0))
        protocol = AioquicProtocol(QuicConnection(configuration=configuration(tls, is_client=True)))
        transport = BatchDatagramTransport(loop, sock, protocol)
    except OSError as exc:
        sock.close()
        raise BrokenResourceError(f"cannot open a UDP socket: {exc}") from exc

    def _close_socket() -> None:
        loop.call_later(0.1, transport.close)

    protocol.conn.add_close_callback(_close_socket)
    return await client_handshake(protocol, addr, f"{host}:{port}", handshake_timeout)


async def client_handshake(
    protocol: AioquicProtocol, addr: Any, name: str, handshake_timeout: float
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


# -- QUIC over a packet endpoint (forward mode, spec 03 §8.3) ----------------------------


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
    config = configuration(tls, is_client=True, alpn=alpn, idle_timeout=idle_timeout)
    protocol = AioquicProtocol(
        QuicConnection(configuration=config),
        keepalive_interval=keepalive_interval,
        silence_timeout=silence_timeout,
        handshake_timeout=handshake_timeout,
    )
    protocol.conn.announce_streams()
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
        detail = conn.close_reason or repr(exc)
        raise BrokenResourceError(
            f"QUIC handshake over the forward plane failed: {detail}"
        ) from exc
    return conn
