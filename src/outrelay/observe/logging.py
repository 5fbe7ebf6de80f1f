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
import time
from collections.abc import Callable
from typing import Any, TextIO

__all__ = [
    "HOP_LOGGER",
    "LIBRARY_LOGGERS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "KeyValueFormatter",
    "hop",
    "hop_marks",
    "kv",
    "setup_logging",
]

LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
LOG_FORMATS = ("text", "json")
LIBRARY_LOGGERS = ("aioquic", "quic", "qh3", "asyncio", "py.warnings")
"""Loggers of the libraries we run on (aioquic logs as ``quic``). They go through
our formatter like everything else, through the root logger."""
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


HOP_LOGGER = "outrelay.hops"
_hops = logging.getLogger(HOP_LOGGER)


def hop(event: str, stream_id: int, at: float | None = None, **attrs: Any) -> None:
    """A debug timing mark on the open path: ``msg=hop ev=<event> stream_id=<id> t=<s>``.

    ``t`` is ``time.monotonic()`` (or ``at``) with microseconds: CLOCK_MONOTONIC is one clock
    for every process of a host, so ``bench/hops.py`` lines the marks of the consumer, the
    relay and the provider up per stream and reports each hop. Costs one level check unless
    ``--log-level debug``.
    """
    if _hops.isEnabledFor(logging.DEBUG):
        when = time.monotonic() if at is None else at
        _hops.debug("hop", extra=kv(ev=event, stream_id=stream_id, t=f"{when:.6f}", **attrs))


def hop_marks(stream_id: int, a_to_b: str, b_to_a: str) -> Callable[[str], None] | None:
    """A splice's first-bytes hook that marks :func:`hop` ``a_to_b`` / ``b_to_a``; None
    (no hook at all) unless the marks are logged."""
    if not _hops.isEnabledFor(logging.DEBUG):
        return None
    events = {"a_to_b": a_to_b, "b_to_a": b_to_a}
    return lambda direction: hop(events[direction], stream_id)


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
        if record.name != "outrelay" and not record.name.startswith("outrelay."):
            attrs.setdefault("logger", record.name)  # a library's line: say whose
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
    """Send every log line to stderr as slog text or JSON lines.

    The ``outrelay`` loggers log at ``level``. Everything else (aioquic, qh3,
    asyncio, ``warnings``) reaches the root logger and goes through the same
    formatter, at WARNING, or at DEBUG with ``--log-level debug``: with
    ``--log-format json`` every line on stderr is one JSON object.

    Raises:
        ValueError: ``fmt`` is not in :data:`LOG_FORMATS` or ``level`` not in
            :data:`LOG_LEVELS` (ours: the reference silently falls back to
            text and info, spec 03 §1.3); the command lines exit 2.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"--log-format must be text or json, got {fmt!r}")
    if level not in LOG_LEVELS:
        raise ValueError(f"--log-level must be debug, info, warn or error, got {level!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(KeyValueFormatter(fmt))
    ours = logging.getLogger("outrelay")
    ours.handlers[:] = [handler]
    ours.setLevel(LOG_LEVELS[level])
    ours.propagate = False
    library_level = logging.DEBUG if LOG_LEVELS[level] <= logging.DEBUG else logging.WARNING
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(library_level)
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        library.handlers.clear()
        library.setLevel(logging.NOTSET)
        library.propagate = True
    logging.captureWarnings(True)
