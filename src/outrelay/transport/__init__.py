"""Transports: one Connection/Stream interface, a QUIC backend, local TCP sockets."""

from __future__ import annotations

from outrelay.transport.admission import RetryMode, TokenBucket
from outrelay.transport.base import (
    BrokenResourceError,
    BusyResourceError,
    CertificateError,
    ClosedResourceError,
    Connection,
    PeerInfo,
    SendClosedError,
    Stream,
    TransportError,
)
from outrelay.transport.local import SocketStream, open_tcp
from outrelay.transport.quic import (
    PUNCH,
    QUIC_BACKENDS,
    OtherFamily,
    PacketEndpoint,
    QuicBackend,
    QuicServerHandle,
    SharedUdpEndpoint,
    accept_quic_on,
    close_phrase,
    connect_quic,
    connect_quic_on,
    open_shared_udp,
    select_quic_backend,
    serve_quic,
)
from outrelay.transport.tcp import TcpServerHandle, connect_tcp, serve_tcp
from outrelay.transport.tls import ALPN, FORWARD_ALPN, QuicTlsConfig

__all__ = [
    "ALPN",
    "FORWARD_ALPN",
    "PUNCH",
    "QUIC_BACKENDS",
    "BrokenResourceError",
    "BusyResourceError",
    "CertificateError",
    "ClosedResourceError",
    "Connection",
    "OtherFamily",
    "PacketEndpoint",
    "PeerInfo",
    "QuicBackend",
    "QuicServerHandle",
    "QuicTlsConfig",
    "RetryMode",
    "SendClosedError",
    "SharedUdpEndpoint",
    "SocketStream",
    "Stream",
    "TcpServerHandle",
    "TokenBucket",
    "TransportError",
    "accept_quic_on",
    "close_phrase",
    "connect_quic",
    "connect_quic_on",
    "connect_tcp",
    "open_shared_udp",
    "open_tcp",
    "select_quic_backend",
    "serve_quic",
    "serve_tcp",
]
