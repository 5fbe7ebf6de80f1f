"""The agent's stream statistics, read live by the metrics collector (``/metrics``).

Counting on the data path would cost per chunk; instead a bridged stream's
:class:`~outrelay.splice.SpliceResult` is registered here while it runs. The
copy loops already update its byte counts in place, so a scrape sums the live
results plus the totals of finished ones: bytes are counted live at no extra
cost per chunk. Everything else changes once per stream (open, reject, end).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from outrelay.splice import SpliceResult

__all__ = ["RESUME_STALL_BUCKETS", "StreamStats"]

RESUME_STALL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, float("inf"))
"""Upper bounds (seconds) of the resume stall histogram: a reconnect takes from tens of
milliseconds (a new QUIC handshake) to the 30 s resume window."""


@dataclass
class StreamStats:
    """Per-service stream counters of one agent (sans-IO: no clock, no I/O)."""

    opened: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(service, role) -> streams bridged."""
    rejected: Counter[tuple[str, str, int]] = field(default_factory=Counter)
    """(service, role, reject code) -> opens refused (by the relay, the provider or us)."""
    failed: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(service, role) -> opens that never reached the bridge (no relay, lost meanwhile)."""
    resumes: Counter[str] = field(default_factory=Counter)
    """service -> resumes of finished streams."""
    promotions: int = 0
    """Streams moved to a direct path (P2P)."""
    demotions: int = 0
    """Streams moved back from a direct path to the relay."""
    resume_stall_buckets: list[int] = field(default_factory=lambda: [0] * len(RESUME_STALL_BUCKETS))
    """Cumulative counts per :data:`RESUME_STALL_BUCKETS` upper bound (Prometheus style)."""
    identity_reloads: Counter[str] = field(default_factory=Counter)
    """Certificate reloads by result (``ok``, ``failed``): the reload code calls
    :meth:`reloaded`."""
    resume_stall_sum: float = 0.0
    resume_stall_count: int = 0
    _closed_bytes: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    _live: dict[int, tuple[str, str, SpliceResult]] = field(default_factory=dict)

    def bridge_started(
        self, service: str, role: str, result: SpliceResult, pipelined: int = 0
    ) -> None:
        """A bridge began copying into ``result`` (whose counts the copy loops update).

        ``pipelined``: bytes the consumer sent behind OPEN_STREAM, before the bridge.
        """
        self.opened[(service, role)] += 1
        self._closed_bytes[(service, role, "sent")] += pipelined
        self._live[id(result)] = (service, role, result)

    def bridge_ended(self, result: SpliceResult, resumes: int = 0) -> None:
        entry = self._live.pop(id(result), None)
        if entry is None:
            return
        service, role, _ = entry
        sent, received = _directions(role, result)
        self._closed_bytes[(service, role, "sent")] += sent
        self._closed_bytes[(service, role, "received")] += received
        if resumes:
            self.resumes[service] += resumes

    def resumed(self, stall: float, *, demoted: bool = False) -> None:
        """A broken stream was resumed on the relay after ``stall`` seconds without a path."""
        for i, bound in enumerate(RESUME_STALL_BUCKETS):
            if stall <= bound:
                self.resume_stall_buckets[i] += 1
        self.resume_stall_sum += stall
        self.resume_stall_count += 1
        if demoted:
            self.demotions += 1

    def reloaded(self, ok: bool) -> None:
        """A certificate and key reload was tried (SIGHUP or file watch)."""
        self.identity_reloads["ok" if ok else "failed"] += 1

    def reject(self, service: str, role: str, code: int) -> None:
        self.rejected[(service, role, code)] += 1

    def active(self) -> Counter[tuple[str, str]]:
        """(service, role) -> streams being bridged now."""
        return Counter((service, role) for service, role, _ in self._live.values())

    def bytes(self) -> Counter[tuple[str, str, str]]:
        """(service, role, ``sent``/``received``) -> bytes so far, live streams included.

        ``sent`` is toward the peer agent (from our app or backend), ``received`` from it.
        """
        total = Counter(self._closed_bytes)
        for service, role, result in self._live.values():
            sent, received = _directions(role, result)
            total[(service, role, "sent")] += sent
            total[(service, role, "received")] += received
        return total


def _directions(role: str, result: SpliceResult) -> tuple[int, int]:
    """(sent, received): the bridge's ``a`` is always the local socket, ``b`` the relay."""
    del role
    return result.a_to_b.bytes, result.b_to_a.bytes
