"""The agent's admin routes: ``/healthz``, ``/readyz`` and ``/metrics`` (``--admin-listen``).

Readiness is decided by :func:`readiness` (pure: state in, missing items out). The
Prometheus collector reads the agent's live state at scrape time (the session's
link, :class:`~outrelay.agent.stats.StreamStats`) instead of keeping counters on
the data path; it is registered in a registry of its own, not the library's
global one.
"""

from __future__ import annotations

from collections.abc import Iterator

from outrelay.agent.agent import Agent
from outrelay.agent.stats import RESUME_STALL_BUCKETS
from outrelay.observe import Route
from outrelay.observe.prometheus import (
    Collector,
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    histogram,
    labelled,
    probe_routes,
)

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
        connected = link is not None and session.connected.is_set()
        yield labelled(
            GaugeMetricFamily,
            "outrelay_relay_connected",
            "1 while a relay link is up and every exposed service is registered",
            ["transport"],
            (
                ([t], 1.0 if connected and link is not None and link.kind == t else 0.0)
                for t in ("quic", "tcp")
            ),
        )
        yield CounterMetricFamily(
            "outrelay_relay_connects",
            "Relay links established (the first connection and every reconnect)",
            value=session.connections,
        )
        ready = GaugeMetricFamily("outrelay_ready", "1 when /readyz answers 200")
        ready.add_metric([], 0.0 if readiness_of(agent) else 1.0)
        yield ready
        yield labelled(
            GaugeMetricFamily,
            "outrelay_streams_active",
            "Streams being bridged now",
            ["service", "role"],
            sorted(stats.active().items()),
        )
        yield labelled(
            CounterMetricFamily,
            "outrelay_streams_opened",
            "Streams that reached the bridge (accepted opens)",
            ["service", "role"],
            sorted(stats.opened.items()),
        )
        yield labelled(
            CounterMetricFamily,
            "outrelay_streams_rejected",
            "Opens refused, by the relay, the provider agent or us, by reject code",
            ["service", "role", "code"],
            sorted(stats.rejected.items()),
        )
        yield labelled(
            CounterMetricFamily,
            "outrelay_streams_failed",
            "Opens that never reached the bridge: no relay connected, or lost during the open",
            ["service", "role"],
            sorted(stats.failed.items()),
        )
        yield labelled(
            CounterMetricFamily,
            "outrelay_stream_bytes",
            "Application bytes bridged, counted live; sent = toward the peer agent",
            ["service", "role", "direction"],
            sorted(stats.bytes().items()),
        )
        yield labelled(
            CounterMetricFamily,
            "outrelay_stream_resumes",
            "Resumes of relay streams after a lost relay link, by service (finished streams)",
            ["service"],
            (([service], n) for service, n in sorted(stats.resumes.items())),
        )
        yield histogram(
            "outrelay_resume_stall_seconds",
            "Time a broken relay stream waited until it was resumed",
            RESUME_STALL_BUCKETS,
            stats.resume_stall_buckets,
            stats.resume_stall_sum,
        )
        yield labelled(
            CounterMetricFamily,
            "outrelay_identity_reloads",
            "Certificate and key reloads by result (ok: the new identity is in use)",
            ["result"],
            (([r], stats.identity_reloads[r]) for r in ("ok", "failed")),
        )
        yield CounterMetricFamily(
            "outrelay_p2p_promotions", "Streams moved to a direct path", value=stats.promotions
        )
        yield CounterMetricFamily(
            "outrelay_p2p_demotions",
            "Streams moved back from a direct path to the relay",
            value=stats.demotions,
        )
        yield from _udp_metrics(agent)


def _udp_metrics(agent: Agent) -> Iterator[Metric]:
    """UDP services (issue 19): flows per ``--consume-udp`` socket, datagrams dropped."""
    consumers = agent.udp_consumers
    yield labelled(
        GaugeMetricFamily,
        "outrelay_udp_flows",
        "UDP flows (client addresses) open per --consume-udp service",
        ["service"],
        (([c.service], float(len(c.flows))) for c in consumers),
    )
    yield labelled(
        CounterMetricFamily,
        "outrelay_udp_flows_opened",
        "UDP flows started (one relay stream each) per --consume-udp service",
        ["service"],
        (([c.service], c.opened) for c in consumers),
    )
    yield labelled(
        CounterMetricFamily,
        "outrelay_udp_flows_expired",
        "UDP flows closed after --udp-idle without a datagram",
        ["service"],
        (([c.service], c.expired) for c in consumers),
    )
    yield labelled(
        CounterMetricFamily,
        "outrelay_udp_datagrams_dropped",
        "Datagrams dropped (queue_full: a flood; too_many_flows; send_buffer_full; closed)",
        ["reason"],
        (([r], n) for r, n in sorted(agent.udp_drops.by_reason.items())),
    )
    router = agent.udp_router
    yield labelled(
        CounterMetricFamily,
        "outrelay_udp_quic_datagrams",
        "UDP payloads carried as QUIC DATAGRAM frames through the relay (RFC 9221)",
        ["direction"],
        [(["sent"], router.sent), (["received"], router.received)],
    )


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
    return probe_routes(AgentCollector(agent), lambda: readiness_of(agent))
