"""TLS settings shared by every backend: certificates and ALPN names.

Both the QUIC backend (:mod:`outrelay.transport.quic`) and the TLS-over-TCP
fallback (:mod:`outrelay.transport.tcp`) take a :class:`QuicTlsConfig` and
offer :data:`ALPN`; neither imports the other for it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ALPN", "FORWARD_ALPN", "QuicTlsConfig"]

ALPN = "orp/1"
"""Spec 01 and spec 02 §2.1: the relay session, over QUIC and over TLS on TCP."""
FORWARD_ALPN = "outrelay-fwd/1"
"""Spec 03 §8.3: QUIC over the forward plane."""


@dataclass(frozen=True)
class QuicTlsConfig:
    """Certificates for one end of a QUIC (or TLS-over-TCP) connection (PEM file paths)."""

    cert_file: str
    """Our certificate (may include the chain)."""
    key_file: str
    """Our private key."""
    ca_file: str
    """CA bundle that verifies the peer."""
    server_name: str = "localhost"
    """Client side: SNI and the name the server certificate must carry."""
