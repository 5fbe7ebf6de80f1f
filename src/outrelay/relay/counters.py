"""The relay's counters and histograms (sans-IO: numbers in, snapshots out).

Two views read them: the reference's JSON snapshot (spec 02 §11.1–§11.2, served as
``/debug/metrics`` and written by ``--metrics-dump``), whose names, kinds and
nanosecond histogram bounds are copied exactly, and our Prometheus ``/metrics``
(:mod:`.metrics`). Everything changes once per stream, handshake or policy
evaluation, never per byte.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["HISTOGRAM_BOUNDS_NS", "NsHistogram", "RelayCounters", "refusal_reason"]

HISTOGRAM_BOUNDS_NS = (
    1_000,
    10_000,
    100_000,
    1_000_000,
    10_000_000,
    100_000_000,
    1_000_000_000,
    10_000_000_000,
)
"""Spec 02 §11.1: 1 µs to 10 s; a sample goes to the first bucket whose bound is >= it."""


@dataclass
class NsHistogram:
    """The reference's histogram: 8 bounds, 9 counts (the last is overflow), sum and n."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(HISTOGRAM_BOUNDS_NS) + 1))
    sum_ns: int = 0
    n: int = 0

    def observe(self, ns: int) -> None:
        index = len(HISTOGRAM_BOUNDS_NS)
        for i, bound in enumerate(HISTOGRAM_BOUNDS_NS):
            if ns <= bound:
                index = i
                break
        self.counts[index] += 1
        self.sum_ns += ns
        self.n += 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "bounds_ns": list(HISTOGRAM_BOUNDS_NS),
            "counts": list(self.counts),
            "sum_ns": self.sum_ns,
            "n": self.n,
        }


def refusal_reason(message: str) -> str:
    """A short, bounded label for a refused handshake (metrics must not grow per message).

    The verifier's messages start with a fixed phrase and may carry details
    (URIs, dates) after it; the label is that phrase.
    """
    lowered = message.lower()
    for key, label in (
        ("no client certificate", "no_certificate"),
        ("expired", "expired"),
        ("not yet valid", "not_yet_valid"),
        ("does not verify", "untrusted_chain"),
        ("no uri san", "no_uri_san"),
        ("not an outrelay identity", "bad_identity_uri"),
        ("bad identity uri", "bad_identity_uri"),
        ("peer relay", "peer_relay"),
        ("hello", "hello"),
    ):
        if key in lowered:
            return label
    return "other"


@dataclass
class RelayCounters:
    """Every counter the relay keeps for observability."""

    stream_active: int = 0
    """Spec 02 §11.1: agent-opened data-stream handlers running (open, resume, migrate)."""
    stream_open_duration: NsHistogram = field(default_factory=NsHistogram)
    """Spec 02 §11.1: each handler's whole lifetime, recorded when it ends."""
    policy_eval_duration: NsHistogram = field(default_factory=NsHistogram)
    stream_rejects: int = 0
    intra_relay_hops: int = 0
    """Streams forwarded to a peer relay (spec 02 §10.2 step 1)."""
    """Opens answered with STREAM_REJECT (the reference never increments its counter)."""
    opens: Counter[str] = field(default_factory=Counter)
    """First frame kind of data streams: ``open``, ``resume``, ``migrate``."""
    rejects_by_code: Counter[int] = field(default_factory=Counter)
    refusals: Counter[str] = field(default_factory=Counter)
    """Refused connections by :func:`refusal_reason` label."""
    identity_reloads: Counter[str] = field(default_factory=Counter)
    """Certificate reloads by result (``ok``, ``failed``): the reload code calls
    :meth:`reloaded`."""

    def reloaded(self, ok: bool) -> None:
        """A certificate and key reload was tried (SIGHUP or file watch)."""
        self.identity_reloads["ok" if ok else "failed"] += 1

    def handler_started(self, kind: str) -> None:
        self.stream_active += 1
        self.opens[kind] += 1

    def handler_ended(self, duration_ns: int) -> None:
        self.stream_active -= 1
        self.stream_open_duration.observe(duration_ns)

    def intra_relay_hop(self) -> None:
        """A stream was forwarded to a peer relay (spec 02 §10.2 step 1)."""
        self.intra_relay_hops += 1

    def rejected(self, code: int) -> None:
        self.stream_rejects += 1
        self.rejects_by_code[code] += 1

    def refused(self, message: str) -> None:
        self.refusals[refusal_reason(message)] += 1

    def snapshot(
        self, ts_unix_ms: int, policy_cache_hits: int, policy_cache_misses: int
    ) -> dict[str, Any]:
        """The spec 02 §11.2 snapshot, field for field.

        ``bytes_forwarded`` stays 0: the reference never increments it either.
        ``intra_relay_hops`` counts streams forwarded to a peer relay (§10.2).
        """
        return {
            "ts_unix_ms": ts_unix_ms,
            "counters": {
                "bytes_forwarded": 0,
                "intra_relay_hops": self.intra_relay_hops,
                "policy_cache_hits": policy_cache_hits,
                "policy_cache_misses": policy_cache_misses,
                "stream_rejects": self.stream_rejects,
            },
            "gauges": {"stream_active": self.stream_active},
            "histograms": {
                "policy_eval_duration": self.policy_eval_duration.snapshot(),
                "stream_open_duration": self.stream_open_duration.snapshot(),
            },
        }
