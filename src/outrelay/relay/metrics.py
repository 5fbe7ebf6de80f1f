"""The relay's admin routes and metrics dump (``--admin-listen``, ``--metrics-dump``).

``/healthz`` and ``/readyz`` are the probes; ``/metrics`` is Prometheus text from a
collector that reads the relay's tables and :class:`~.counters.RelayCounters` at
scrape time (a registry of its own, not the library's global one);
``/debug/metrics`` is the reference's JSON snapshot (spec 02 §11.2), and
:func:`dump_metrics` writes the same snapshot as JSON lines (§11.4), so the
reference's tooling keeps working.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from outrelay.observe import Response, Route, kv
from outrelay.observe.prometheus import (
    Collector,
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    labelled,
    probe_routes,
)
from outrelay.relay.edge import Relay

__all__ = ["RelayCollector", "admin_routes", "dump_metrics", "snapshot"]

log = logging.getLogger("outrelay.relay")


def snapshot(relay: Relay) -> dict[str, Any]:
    """The spec 02 §11.2 snapshot of ``relay`` now."""
    policy = relay.state.policy
    cache = policy.statistics().cache if policy is not None else None
    return relay.state.counters.snapshot(
        int(time.time() * 1000),
        cache.hits if cache is not None else 0,
        cache.misses if cache is not None else 0,
    )


class RelayCollector(Collector):
    """Prometheus metrics of one relay, read from its live state at each scrape."""

    def __init__(self, relay: Relay, draining: list[bool]) -> None:
        self.relay = relay
        self._draining = draining

    def collect(self) -> Iterator[Metric]:
        relay = self.relay
        stats = relay.statistics()
        counters = relay.state.counters
        yield GaugeMetricFamily(
            "outrelay_relay_listening",
            "1 while the relay listens and is not draining",
            value=1.0 if relay.listening and not self._draining[0] else 0.0,
        )
        by_transport = {"quic": 0, "tcp": 0}
        for session in relay.state.agents.values():
            by_transport[_transport(session.conn)] += 1
        yield labelled(
            GaugeMetricFamily,
            "outrelay_agents_connected",
            "Connected agents, by transport",
            ["transport"],
            (([transport], n) for transport, n in by_transport.items()),
        )
        yield GaugeMetricFamily(
            "outrelay_services_registered",
            "Registered (tenant, service, provider) bindings",
            value=stats.services,
        )
        yield GaugeMetricFamily(
            "outrelay_streams_spliced",
            "Live relay-mediated streams (the pair table)",
            value=stats.pairs,
        )
        yield GaugeMetricFamily(
            "outrelay_streams_active",
            "Agent-opened data-stream handlers running (open, resume, migrate)",
            value=counters.stream_active,
        )
        yield GaugeMetricFamily(
            "outrelay_resume_halves_parked",
            "Resume halves waiting for their peer",
            value=stats.parked_halves,
        )
        yield GaugeMetricFamily(
            "outrelay_p2p_migrated",
            "Streams in the migrated cache (moved to a direct path)",
            value=stats.migrated,
        )
        yield labelled(
            CounterMetricFamily,
            "outrelay_relay_opens",
            "Data streams by first frame: open (OPEN_STREAM), resume, migrate (to relay)",
            ["kind"],
            (([kind], counters.opens[kind]) for kind in ("open", "resume", "migrate")),
        )
        yield labelled(
            CounterMetricFamily,
            "outrelay_streams_rejected",
            "Opens answered with STREAM_REJECT, by code",
            ["code"],
            (([code], n) for code, n in sorted(counters.rejects_by_code.items())),
        )
        yield labelled(
            CounterMetricFamily,
            "outrelay_handshake_refusals",
            "Refused agent connections (mTLS, identity), by reason",
            ["reason"],
            (([reason], n) for reason, n in sorted(counters.refusals.items())),
        )
        yield labelled(
            CounterMetricFamily,
            "outrelay_identity_reloads",
            "Certificate and key reloads by result (ok: new connections use it)",
            ["result"],
            (([r], counters.identity_reloads[r]) for r in ("ok", "failed")),
        )
        yield CounterMetricFamily(
            "outrelay_refused_not_owner",
            "Frames refused because they named another agent's stream",
            value=stats.refused_not_owner,
        )


def _transport(conn: object) -> str:
    kind = type(conn).__module__
    return "tcp" if ".tcp" in kind or ".yamux" in kind else "quic"


def admin_routes(relay: Relay, draining: list[bool]) -> dict[str, Route]:
    """``/healthz``, ``/readyz``, ``/metrics`` and ``/debug/metrics`` for ``relay``.

    ``draining``: a one-item list the CLI sets on SIGTERM (readiness off first).
    """

    def not_ready() -> list[str]:
        if draining[0]:
            return ["draining: shutting down"]
        reasons = [] if relay.listening else ["not listening"]
        return reasons + relay.mesh_ready_reasons

    def debug_metrics() -> Response:
        body = json.dumps(snapshot(relay), separators=(",", ":")).encode()
        return Response(200, body, "application/json")

    routes = probe_routes(RelayCollector(relay, draining), not_ready)
    routes["/debug/metrics"] = debug_metrics
    return routes


def _open_dump(path: str) -> int:
    """Spec 02 §11.4: parents 0750, the file appended to and created 0600."""
    Path(path).parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)


async def dump_metrics(relay: Relay, path: str, interval: float) -> None:
    """One snapshot line at once, then one every ``interval`` seconds, until cancelled.

    Raises:
        OSError: the file cannot be opened (the caller logs it and carries on).
    """
    fd = _open_dump(path)
    try:
        while True:
            line = json.dumps(snapshot(relay), separators=(",", ":")) + "\n"
            try:
                os.write(fd, line.encode())
            except OSError as exc:
                log.warning("metrics dump write failed", extra=kv(path=path, err=str(exc)))
            await asyncio.sleep(interval)
    finally:
        os.close(fd)
