"""The one module that speaks ``prometheus_client``: metric families and the probe routes.

The agent's and the relay's collectors read live state at scrape time and hand it
here as plain tuples; :func:`probe_routes` gives both the same ``/healthz``,
``/readyz`` and ``/metrics`` (a registry of their own, not the library's global one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from outrelay.observe.admin import Response, Route

__all__ = [
    "Collector",
    "CounterMetricFamily",
    "GaugeMetricFamily",
    "Metric",
    "histogram",
    "labelled",
    "probe_routes",
]

Sample = tuple[Sequence[object], float]
"""Label values (turned into strings) and the value of one sample."""


def labelled(
    kind: type[CounterMetricFamily] | type[GaugeMetricFamily],
    name: str,
    documentation: str,
    labels: Sequence[str],
    samples: Iterable[Sample],
) -> Metric:
    """A counter or gauge family with one sample per label set."""
    family = kind(name, documentation, labels=list(labels))
    for values, value in samples:
        family.add_metric([str(v) for v in values], value)
    return family


def histogram(
    name: str,
    documentation: str,
    bounds: Sequence[float],
    cumulative: Sequence[int],
    total: float,
) -> Metric:
    """A histogram without labels from cumulative bucket counts and the sum of values."""
    family = HistogramMetricFamily(name, documentation)
    family.add_metric(
        [],
        [(_bound(b), float(n)) for b, n in zip(bounds, cumulative, strict=True)],
        total,
    )
    return family


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


def probe_routes(collector: Collector, not_ready: Callable[[], list[str]]) -> dict[str, Route]:
    """``/healthz`` (always 200), ``/readyz`` (503 naming what ``not_ready`` lists) and
    ``/metrics`` (``collector`` in a registry of its own)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)

    def healthz() -> Response:
        return Response(200, b"ok\n")

    def readyz() -> Response:
        missing = not_ready()
        if missing:
            return Response(503, ("not ready: " + "; ".join(missing) + "\n").encode())
        return Response(200, b"ready\n")

    def metrics() -> Response:
        return Response(200, generate_latest(registry), CONTENT_TYPE_LATEST)

    return {"/healthz": healthz, "/readyz": readyz, "/metrics": metrics}
