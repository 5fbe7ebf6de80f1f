"""Transports: one Connection/Stream interface, a QUIC backend, local TCP sockets."""

from __future__ import annotations

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
    ALPN,
    FORWARD_ALPN,
    PacketEndpoint,
    QuicServerHandle,
    QuicTlsConfig,
    RetryMode,
    accept_quic_on,
    connect_quic,
    connect_quic_on,
    serve_quic,
)
from outrelay.transport.quic_backend import QUIC_BACKENDS, QuicBackend, select_quic_backend
from outrelay.transport.tcp import TcpServerHandle, connect_tcp, serve_tcp

__all__ = [
    "ALPN",
    "FORWARD_ALPN",
    "QUIC_BACKENDS",
    "BrokenResourceError",
    "BusyResourceError",
    "CertificateError",
    "ClosedResourceError",
    "Connection",
    "PacketEndpoint",
    "PeerInfo",
    "QuicBackend",
    "QuicServerHandle",
    "QuicTlsConfig",
    "RetryMode",
    "SendClosedError",
    "SocketStream",
    "Stream",
    "TcpServerHandle",
    "TransportError",
    "accept_quic_on",
    "connect_quic",
    "connect_quic_on",
    "connect_tcp",
    "open_tcp",
    "select_quic_backend",
    "serve_quic",
    "serve_tcp",
]
