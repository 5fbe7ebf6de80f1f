"""Transports: one Connection/Stream interface, a QUIC backend, local TCP sockets."""

from __future__ import annotations

from outrelay.transport.base import (
    BrokenResourceError,
    BusyResourceError,
    ClosedResourceError,
    Connection,
    PeerInfo,
    Stream,
    TransportError,
)
from outrelay.transport.local import SocketStream, open_tcp
from outrelay.transport.quic import (
    ALPN,
    QuicServerHandle,
    QuicTlsConfig,
    connect_quic,
    serve_quic,
)
from outrelay.transport.tcp import TcpServerHandle, connect_tcp, serve_tcp

__all__ = [
    "ALPN",
    "BrokenResourceError",
    "BusyResourceError",
    "ClosedResourceError",
    "Connection",
    "PeerInfo",
    "QuicServerHandle",
    "QuicTlsConfig",
    "SocketStream",
    "Stream",
    "TcpServerHandle",
    "TransportError",
    "connect_quic",
    "connect_tcp",
    "open_tcp",
    "serve_quic",
    "serve_tcp",
]
