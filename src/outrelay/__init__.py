"""OutRelay for Python: the agent (sidecar), a wire-compatible relay and a dev PKI.

Every agent dials *out* to a relay over mTLS QUIC (ALPN ``orp/1``); the relay
splices a consumer's stream to a provider's stream, so no workload needs an
inbound port. The Python API (:mod:`outrelay.api`, re-exported here; blocking helper
:mod:`outrelay.sync`) reaches and offers services from inside a program.
See ``README.md`` and ``../shared/spec`` for the protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from outrelay.api import (
        Agent,
        AgentClosed,
        Handler,
        Identity,
        OpenFailed,
        OpenRejected,
        OutRelayError,
        RelayUnreachable,
    )

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "AgentClosed",
    "Handler",
    "Identity",
    "OpenFailed",
    "OpenRejected",
    "OutRelayError",
    "RelayUnreachable",
    "__version__",
]


def __getattr__(name: str) -> Any:
    """The API names load :mod:`outrelay.api` on first use (PEP 562), so the relay and
    the CLIs, which never use it, do not import the agent stack for it."""
    if name in __all__ and name != "__version__":
        from outrelay import api

        return getattr(api, name)
    raise AttributeError(f"module 'outrelay' has no attribute {name!r}")
