"""Audit of policy decisions, written as JSON lines (spec 02 §6.2.7).

The reference relay sends one ``Audit.Record`` to the controller per policy evaluation: the
caller side always, the callee side when reached. The embedded control plane (DESIGN.md)
appends the same events to a file instead, one JSON object per line, plus one per REGISTER
that provide rules decide (``side`` ``"provide"``, ours; a name no provide rule covers is open
and its registrations are not audited).

Shape: :meth:`AuditLog.emit` is synchronous and never blocks stream opening; it puts the event
in a bounded queue (1,024, spec 02 §6.2.7) or, when the queue is full, drops it with a
rate-limited warning. One writer coroutine, :meth:`AuditLog.run`, owned by the relay's task
group, takes events off the queue and appends them to the file. :meth:`AuditLog.aclose` lets the
writer drain what is queued and return.

File handling: the file is opened in append mode, created with mode 0600 (parent directories
0750, both subject to the umask); an existing file keeps its mode. Writes happen in a worker
thread (``asyncio.to_thread``) so a slow disk never stalls the event loop; events waiting in the
queue are written as one batch and flushed once per batch, so each line reaches the OS as soon
as the writer gets to it. A failed write is logged and its batch dropped: audit is best effort,
as in the reference (RPC errors are logged and dropped). Failing to open the file at start is
not: :meth:`AuditLog.run` raises, so a misconfigured path stops the relay at startup.

With ``path=None`` the events are only logged, at debug level.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import IO, Final

__all__ = [
    "AUDIT_QUEUE_DEPTH",
    "AuditEvent",
    "AuditLog",
    "AuditStatistics",
]

AUDIT_QUEUE_DEPTH: Final = 1024
"""Events that may wait for the writer (spec 02 §6.2.7, §12 "audit queue depth"). Beyond it
events are dropped rather than stalling stream opening."""

_DROP_WARNING_INTERVAL_S: Final = 1.0
"""At most one "queue full" warning per second: a stalled writer under load would otherwise log
once per stream open."""

_FILE_MODE: Final = 0o600
"""Audit lines name callers and targets; only the relay's user reads them."""

_DIR_MODE: Final = 0o750

_monotonic = time.monotonic
"""The clock of the drop-warning rate limit (a module attribute, so tests can replace it)."""

_DECISIONS: Final = frozenset({"DECISION_ALLOW", "DECISION_DENY"})
_SIDES: Final = frozenset({"caller", "callee", "provide"})


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One policy evaluation (the proto ``AuditEvent``, spec 02 §6.2.7, plus ``side``)."""

    ts_unix_ms: int
    """When the decision was made, Unix ms."""
    tenant: str
    """The tenant parsed from ``caller`` (the provider's for callee-side and provide events)."""
    caller: str
    """The evaluated caller: the consumer URI, or the provider URI on the callee side and for a
    provide check."""
    target: str
    """The evaluated target: the service name, or the consumer URI on the callee side."""
    method: str
    """``OPEN_STREAM.method``."""
    decision: str
    """``"DECISION_ALLOW"`` or ``"DECISION_DENY"`` (``Decision.proto_name`` of the result)."""
    reason: str
    """The matching rule's id, or ``"no matching rule"``."""
    stream_id: str = ""
    """Always empty, as in the reference (it never sets it); kept for the record's shape."""
    side: str = "caller"
    """``"caller"`` or ``"callee"``: which evaluation of spec 02 §6.1 (step 2 or 4) this is. Our
    extension: the reference's events do not say, so a callee-side event reads like a
    caller-side one. ``"provide"``: a REGISTER checked against the provide rules (ours; the
    reference has none), with ``caller`` the registering agent, ``target`` the service name,
    ``method`` empty."""

    def __post_init__(self) -> None:
        if self.decision not in _DECISIONS:
            raise ValueError(f"decision must be one of {sorted(_DECISIONS)}, got {self.decision!r}")
        if self.side not in _SIDES:
            raise ValueError(f"side must be one of {sorted(_SIDES)}, got {self.side!r}")

    def to_json(self) -> str:
        """The event as one line of JSON (no newline), keys in field order."""
        return json.dumps(
            {
                "ts_unix_ms": self.ts_unix_ms,
                "tenant": self.tenant,
                "caller": self.caller,
                "target": self.target,
                "method": self.method,
                "decision": self.decision,
                "reason": self.reason,
                "stream_id": self.stream_id,
                "side": self.side,
            },
            ensure_ascii=False,
            separators=(",", ":"),
        )


@dataclass(frozen=True, slots=True)
class AuditStatistics:
    """A snapshot of an :class:`AuditLog` (STYLE §5)."""

    queued: int
    """Events waiting for the writer."""
    written: int
    """Events written to the file (or logged, without a file)."""
    dropped: int
    """Events dropped because the queue was full or the log was closed."""
    write_errors: int
    """Events lost to failed writes."""


class AuditLog:
    """A bounded queue of :class:`AuditEvent` and the coroutine that writes it out.

    Args:
        path: The JSON-lines file to append to, or ``None`` to log events at debug level only.
        queue_size: Events that may wait for the writer.
        logger: Where warnings (drops, write errors) and, without a file, the events go.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        *,
        queue_size: int = AUDIT_QUEUE_DEPTH,
        logger: logging.Logger,
    ) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        self._path = None if path is None else os.fspath(path)
        self._queue_size = queue_size
        self._logger = logger
        # Unbounded underneath: emit() enforces queue_size itself, so that aclose() can always
        # add its end marker (None) without waiting.
        self._queue: asyncio.Queue[AuditEvent | None] = asyncio.Queue()
        self._closing = False
        self._marker_pending = False
        self._running = False
        self._finished = asyncio.Event()
        self._written = 0
        self._dropped = 0
        self._write_errors = 0
        self._drops_unreported = 0
        self._last_drop_warning = -_DROP_WARNING_INTERVAL_S

    def emit(self, event: AuditEvent) -> None:
        """Queue ``event`` for the writer; never blocks, never raises.

        When ``queue_size`` events are already waiting, or after :meth:`aclose`, the event is
        dropped and counted, with a warning at most once per second.
        """
        if self._closing:
            self._drop(event, "audit log closed; event dropped")
        elif self._queue.qsize() >= self._queue_size:
            self._drop(event, "audit queue full; event dropped")
        else:
            self._queue.put_nowait(event)

    async def run(self) -> None:
        """Write queued events until :meth:`aclose`; the relay runs it in its task group.

        There is one writer at a time: a ``run()`` called while another is running (for
        example the relay's task, started just as :meth:`aclose` began draining by itself)
        waits for that one to return. After the log was closed and drained, ``run()`` returns
        at once.

        Raises:
            OSError: The audit file or its directory cannot be created or opened.
        """
        if self._running:
            await self._finished.wait()
            return
        if self._drained():
            return
        self._running = True
        self._finished.clear()
        file: _AuditFile | None = None
        try:
            if self._path is not None:
                file = await asyncio.to_thread(_AuditFile.open, self._path)
            while not self._drained():
                batch, stop = await self._next_batch()
                if batch:
                    await self._write(file, batch)
                if stop:
                    return
        finally:
            if file is not None:
                # If we were cancelled during a write, the worker thread may still be writing:
                # close() waits for it (one batch at most) rather than closing under it.
                file.close()
            self._running = False
            self._finished.set()

    async def aclose(self) -> None:
        """Stop accepting events, let the writer drain the queue, and wait for it to return.

        If :meth:`run` is not running (never started, or cancelled), the queue is drained here.
        Idempotent.
        """
        if not self._closing:
            self._closing = True
            self._marker_pending = True
            self._queue.put_nowait(None)
        if self._running:
            await self._finished.wait()
        elif not self._queue.empty():
            await self.run()

    def statistics(self) -> AuditStatistics:
        """A snapshot of the counters."""
        queued = self._queue.qsize() - (1 if self._marker_pending else 0)
        return AuditStatistics(queued, self._written, self._dropped, self._write_errors)

    def _drained(self) -> bool:
        """Closed, and the end marker taken: nothing more can arrive."""
        return self._closing and not self._marker_pending and self._queue.empty()

    async def _next_batch(self) -> tuple[list[AuditEvent], bool]:
        """Wait for at least one item, then take everything queued. ``stop`` is True once the
        end marker was taken (everything before it is in the batch)."""
        item = await self._queue.get()
        batch: list[AuditEvent] = []
        while item is not None:
            batch.append(item)
            if self._queue.empty():
                return batch, False
            item = self._queue.get_nowait()
        self._marker_pending = False
        return batch, True

    async def _write(self, file: _AuditFile | None, batch: list[AuditEvent]) -> None:
        lines = [event.to_json() for event in batch]
        if file is None:
            for line in lines:
                self._logger.debug("audit %s", line)
            self._written += len(lines)
            return
        try:
            await asyncio.to_thread(file.append, lines)
        except OSError as exc:
            self._write_errors += len(lines)
            self._logger.error(
                "audit write to %s failed; %d event(s) lost: %s", self._path, len(lines), exc
            )
        else:
            self._written += len(lines)

    def _drop(self, event: AuditEvent, message: str) -> None:
        self._dropped += 1
        self._drops_unreported += 1
        now = _monotonic()
        if now - self._last_drop_warning >= _DROP_WARNING_INTERVAL_S:
            self._logger.warning(
                "%s (caller=%s target=%s; %d dropped since the last warning, %d in total)",
                message,
                event.caller,
                event.target,
                self._drops_unreported,
                self._dropped,
            )
            self._last_drop_warning = now
            self._drops_unreported = 0


class _AuditFile:
    """The open audit file. Its methods run in worker threads; a lock keeps :meth:`close` from
    closing the file under a write still running in another thread."""

    def __init__(self, file: IO[str]) -> None:
        self._file = file
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str) -> _AuditFile:
        """Open ``path`` for appending, creating it 0600 and its parents 0750."""
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, mode=_DIR_MODE, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
        try:
            return cls(os.fdopen(fd, "a", encoding="utf-8", newline="\n"))
        except BaseException:
            os.close(fd)
            raise

    def append(self, lines: list[str]) -> None:
        """Append ``lines``, one per line, and flush."""
        with self._lock:
            self._file.write("".join(line + "\n" for line in lines))
            self._file.flush()

    def close(self) -> None:
        """Close the file, after any write in progress."""
        with self._lock:
            self._file.close()
