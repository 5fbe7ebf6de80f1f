"""Observability: structured logs (and later metrics and the admin endpoint)."""

from __future__ import annotations

from outrelay.observe.logging import (
    LOG_FORMATS,
    LOG_LEVELS,
    KeyValueFormatter,
    kv,
    ms,
    setup_logging,
)

__all__ = ["LOG_FORMATS", "LOG_LEVELS", "KeyValueFormatter", "kv", "ms", "setup_logging"]
