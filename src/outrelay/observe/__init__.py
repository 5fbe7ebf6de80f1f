"""Observability: structured logs and the admin endpoint (probes, metrics)."""

from __future__ import annotations

from outrelay.observe.admin import AdminServer, Response, Route
from outrelay.observe.logging import (
    HOP_LOGGER,
    LOG_FORMATS,
    LOG_LEVELS,
    KeyValueFormatter,
    hop,
    hop_marks,
    kv,
    ms,
    setup_logging,
)

__all__ = [
    "HOP_LOGGER",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "AdminServer",
    "KeyValueFormatter",
    "Response",
    "Route",
    "hop",
    "hop_marks",
    "kv",
    "ms",
    "setup_logging",
]
