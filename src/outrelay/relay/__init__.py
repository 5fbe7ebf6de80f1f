"""The relay: accept agents over mTLS QUIC, run their control streams, splice."""

from __future__ import annotations

from outrelay.relay.server import Relay, RelayConfig

__all__ = ["Relay", "RelayConfig"]
