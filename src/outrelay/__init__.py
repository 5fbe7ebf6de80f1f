"""OutRelay for Python: the agent (sidecar), a wire-compatible relay and a dev PKI.

Every agent dials *out* to a relay over mTLS QUIC (ALPN ``orp/1``); the relay
splices a consumer's stream to a provider's stream, so no workload needs an
inbound port. See ``README.md`` and ``../shared/spec`` for the protocol.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
