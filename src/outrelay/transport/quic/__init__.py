"""QUIC backend of the transport interface (spec 01 "QUIC transport", spec 02 §2.1).

ALPN ``orp/1``, TLS 1.3, client certificate required by the relay, max idle
10 s, keep-alive every 3 s, handshake 5 s. Modules:

* :mod:`~.settings`: limits and timeouts;
* :mod:`~.stream`: :class:`QuicStream`, bounded both ways, and the
  ``StreamOwner`` interface it uses to reach its connection;
* :mod:`~.connection`: what the aioquic and qh3 connections share (events
  to streams, termination, close reasons);
* :mod:`~.keepalive`: keep-alive PINGs and peer-silence detection;
* :mod:`~.protocol`: :class:`QuicConn` and its aioquic protocol;
* :mod:`~.client` and :mod:`~.server`: dialling and listening (admission,
  Retry, client-certificate checks), also over a packet endpoint;
* :mod:`~.shared_udp`: one UDP socket for every connection of an agent;
* :mod:`~.qh3` and :mod:`~.backend`: the optional qh3 client and the choice;
* :mod:`~._aioquic` and :mod:`~._qh3`: the only modules that touch the
  libraries' private attributes.

Errors come out as :mod:`outrelay.transport.base` errors.
"""

from __future__ import annotations

from outrelay.transport.quic.backend import QUIC_BACKENDS, QuicBackend, select_quic_backend
from outrelay.transport.quic.client import PacketEndpoint, connect_quic, connect_quic_on
from outrelay.transport.quic.connection import close_phrase, describe_close
from outrelay.transport.quic.protocol import QuicConn
from outrelay.transport.quic.server import (
    QuicServerHandle,
    QuicServerStatistics,
    accept_quic_on,
    serve_quic,
)
from outrelay.transport.quic.settings import (
    HANDSHAKE_TIMEOUT,
    IDLE_TIMEOUT,
    KEEPALIVE_INTERVAL,
    MAX_DATAGRAM_SIZE,
    MAX_INCOMING_STREAMS,
    SEND_BUFFER,
    STREAM_WINDOW,
)
from outrelay.transport.quic.shared_udp import (
    PUNCH,
    OtherFamily,
    SharedUdpEndpoint,
    is_quic_datagram,
    open_shared_udp,
)
from outrelay.transport.quic.stream import QuicStream

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "IDLE_TIMEOUT",
    "KEEPALIVE_INTERVAL",
    "MAX_DATAGRAM_SIZE",
    "MAX_INCOMING_STREAMS",
    "PUNCH",
    "QUIC_BACKENDS",
    "SEND_BUFFER",
    "STREAM_WINDOW",
    "OtherFamily",
    "PacketEndpoint",
    "QuicBackend",
    "QuicConn",
    "QuicServerHandle",
    "QuicServerStatistics",
    "QuicStream",
    "SharedUdpEndpoint",
    "accept_quic_on",
    "close_phrase",
    "connect_quic",
    "connect_quic_on",
    "describe_close",
    "is_quic_datagram",
    "open_shared_udp",
    "select_quic_backend",
    "serve_quic",
]
