"""The relay: accept agents over mTLS QUIC (and TLS + yamux), run their control streams, splice."""

from __future__ import annotations

from outrelay.relay.edge import Relay, RelayConfig
from outrelay.relay.state import RelayStatistics

__all__ = ["Relay", "RelayConfig", "RelayStatistics"]
