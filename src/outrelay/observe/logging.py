"""Structured logs in the reference's two shapes (spec 03 §1.7, spec 02 §11.5).

Text: ``time=2026-01-02T03:04:05.678Z level=INFO msg="agent connected" uri=…``.
JSON: one object per line with ``time``, ``level``, ``msg`` and the attributes.

Attributes ride on the record: ``log.info("registered", extra=kv(name=n))``.
Message strings follow the reference so operators can grep for them.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
from typing import Any, TextIO

__all__ = ["LOG_LEVELS", "KeyValueFormatter", "kv", "setup_logging"]

LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_LEVEL_NAMES = {
    logging.DEBUG: "DEBUG",
    logging.INFO: "INFO",
    logging.WARNING: "WARN",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "ERROR",
}


def kv(**attrs: Any) -> dict[str, Any]:
    """Attributes for one log call: ``log.warning("x", extra=kv(addr=a))``."""
    return {"attrs": attrs}


def ms(seconds: float | None, unknown: str = "") -> str:
    """A duration for a log attribute: milliseconds with one decimal, or ``unknown``."""
    return f"{seconds * 1000:.1f}" if seconds is not None else unknown


def _quote(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return json.dumps(text)
    return text


class KeyValueFormatter(logging.Formatter):
    """Render records as slog text or JSON lines."""

    def __init__(self, fmt: str = "text") -> None:
        super().__init__()
        self.json = fmt == "json"

    def format(self, record: logging.LogRecord) -> str:
        ts = _dt.datetime.fromtimestamp(record.created, tz=_dt.UTC)
        time = ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"
        level = _LEVEL_NAMES.get(record.levelno, record.levelname)
        attrs: dict[str, Any] = dict(getattr(record, "attrs", {}) or {})
        if record.exc_info and record.exc_info[1] is not None:
            attrs.setdefault("err", repr(record.exc_info[1]))
        msg = record.getMessage()
        if self.json:
            obj: dict[str, Any] = {"time": time, "level": level, "msg": msg}
            for key, value in attrs.items():
                obj[key] = value if isinstance(value, int | float | bool | None) else str(value)
            return json.dumps(obj, separators=(",", ":"))
        parts = [f"time={time}", f"level={level}", f"msg={json.dumps(msg)}"]
        parts += [f"{key}={_quote(value)}" for key, value in attrs.items()]
        return " ".join(parts)


def setup_logging(fmt: str = "text", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure the root ``outrelay`` logger: text or JSON lines to stderr.

    Unknown formats fall back to text and unknown levels to info, as the
    reference does (spec 03 §1.3).
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(KeyValueFormatter("json" if fmt == "json" else "text"))
    root = logging.getLogger("outrelay")
    root.handlers[:] = [handler]
    root.setLevel(LOG_LEVELS.get(level, logging.INFO))
    root.propagate = False
