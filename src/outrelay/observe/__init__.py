"""Observability: structured logs (and later metrics and the admin endpoint)."""

from __future__ import annotations

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
    "KeyValueFormatter",
    "hop",
    "hop_marks",
    "kv",
    "ms",
    "setup_logging",
]
