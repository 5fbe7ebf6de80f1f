"""The agent's admin routes: ``/healthz``, ``/readyz`` and ``/metrics`` (``--admin-listen``).

Readiness is decided by :func:`readiness` (pure: state in, missing items out). The
Prometheus collector reads the agent's live state at scrape time (the session's
link, :class:`~outrelay.agent.stats.StreamStats`) instead of keeping counters on
the data path; it is registered in a registry of its own, not the library's
global one.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from outrelay.agent.agent import Agent
from outrelay.agent.stats import RESUME_STALL_BUCKETS
from outrelay.observe import Response, Route

__all__ = ["AgentCollector", "admin_routes", "readiness"]


def readiness(
    *,
    draining: bool,
    connected: bool,
    services: int,
    listeners_wanted: int,
    listeners_bound: int,
) -> list[str]:
    """What keeps the agent from being ready ([] when ready)."""
    missing = []
    if draining:
        missing.append("draining: shutting down")
    if not connected:
        what = f" with {services} service(s) registered" if services else ""
        missing.append(f"not connected to a relay{what}")
    if listeners_bound < listeners_wanted:
        missing.append(f"listeners bound: {listeners_bound} of {listeners_wanted}")
    return missing


class AgentCollector(Collector):
    """Prometheus metrics of one agent, read from its live state at each scrape."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        agent = self.agent
        session = agent.session
        stats = session.stats
        link = session.current_link
        up = GaugeMetricFamily(
            "outrelay_relay_connected",
            "1 while a relay link is up and every exposed service is registered",
            labels=["transport"],
        )
        for transport in ("quic", "tcp"):
            live = link is not None and session.connected.is_set() and link.kind == transport
            up.add_metric([transport], 1.0 if live else 0.0)
        yield up
        yield CounterMetricFamily(
            "outrelay_relay_connects",
            "Relay links established (the first connection and every reconnect)",
            value=session.connections,
        )
        ready = GaugeMetricFamily("outrelay_ready", "1 when /readyz answers 200")
        ready.add_metric([], 0.0 if readiness_of(agent) else 1.0)
        yield ready
        active = GaugeMetricFamily(
            "outrelay_streams_active", "Streams being bridged now", labels=["service", "role"]
        )
        for (service, role), n in sorted(stats.active().items()):
            active.add_metric([service, role], n)
        yield active
        opened = CounterMetricFamily(
            "outrelay_streams_opened",
            "Streams that reached the bridge (accepted opens)",
            labels=["service", "role"],
        )
        for (service, role), n in sorted(stats.opened.items()):
            opened.add_metric([service, role], n)
        yield opened
        rejected = CounterMetricFamily(
            "outrelay_streams_rejected",
            "Opens refused, by the relay, the provider agent or us, by reject code",
            labels=["service", "role", "code"],
        )
        for (service, role, code), n in sorted(stats.rejected.items()):
            rejected.add_metric([service, role, str(code)], n)
        yield rejected
        failed = CounterMetricFamily(
            "outrelay_streams_failed",
            "Opens that never reached the bridge: no relay connected, or lost during the open",
            labels=["service", "role"],
        )
        for (service, role), n in sorted(stats.failed.items()):
            failed.add_metric([service, role], n)
        yield failed
        moved = CounterMetricFamily(
            "outrelay_stream_bytes",
            "Application bytes bridged, counted live; sent = toward the peer agent",
            labels=["service", "role", "direction"],
        )
        for (service, role, direction), n in sorted(stats.bytes().items()):
            moved.add_metric([service, role, direction], n)
        yield moved
        resumes = CounterMetricFamily(
            "outrelay_stream_resumes",
            "Resumes of relay streams after a lost relay link, by service (finished streams)",
            labels=["service"],
        )
        for service, n in sorted(stats.resumes.items()):
            resumes.add_metric([service], n)
        yield resumes
        stall = HistogramMetricFamily(
            "outrelay_resume_stall_seconds",
            "Time a broken relay stream waited until it was resumed",
        )
        stall.add_metric(
            [],
            [
                (_bound(bound), float(n))
                for bound, n in zip(RESUME_STALL_BUCKETS, stats.resume_stall_buckets, strict=True)
            ],
            stats.resume_stall_sum,
        )
        yield stall
        reloads = CounterMetricFamily(
            "outrelay_identity_reloads",
            "Certificate and key reloads by result (ok: the new identity is in use)",
            labels=["result"],
        )
        for result in ("ok", "failed"):
            reloads.add_metric([result], stats.identity_reloads[result])
        yield reloads
        yield CounterMetricFamily(
            "outrelay_p2p_promotions", "Streams moved to a direct path", value=stats.promotions
        )
        yield CounterMetricFamily(
            "outrelay_p2p_demotions",
            "Streams moved back from a direct path to the relay",
            value=stats.demotions,
        )


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


def readiness_of(agent: Agent) -> list[str]:
    wanted = len(agent.config.consumes) + (1 if agent.config.tproxy is not None else 0)
    bound = len(agent.bound) + (1 if agent.capture is not None else 0)
    return readiness(
        draining=agent.draining,
        connected=agent.session.connected.is_set(),
        services=len(agent.config.session.services),
        listeners_wanted=wanted,
        listeners_bound=bound,
    )


def admin_routes(agent: Agent) -> dict[str, Route]:
    """``/healthz``, ``/readyz`` and ``/metrics`` for ``agent``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))

    def healthz() -> Response:
        return Response(200, b"ok\n")

    def readyz() -> Response:
        missing = readiness_of(agent)
        if missing:
            return Response(503, ("not ready: " + "; ".join(missing) + "\n").encode())
        return Response(200, b"ready\n")

    def metrics() -> Response:
        return Response(200, generate_latest(registry), CONTENT_TYPE_LATEST)

    return {"/healthz": healthz, "/readyz": readyz, "/metrics": metrics}
