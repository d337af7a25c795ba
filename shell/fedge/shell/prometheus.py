"""What both services' Prometheus collectors share: the ``/metrics`` route over a registry of
their own (the process metrics and the service's collector, nothing global), and builders of
metric families from plain numbers and :mod:`fedge.shell.meters`.

Imported only when ``[metrics] enabled`` (it needs ``prometheus-client``, which the ``agent``
extra installs); nothing here keeps state of its own: every value is read at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from fedge.shell.http_endpoint import Response, Route
from fedge.shell.meters import Durations, Traffic


def registry_with(collector: Collector) -> CollectorRegistry:
    """A registry of ``collector`` plus the process's own metrics (``process_resident_memory_bytes``,
    CPU seconds, open file descriptors: Linux only)."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    registry.register(collector)
    return registry


def metrics_route(registry: CollectorRegistry) -> Route:
    """``GET /metrics``: the registry in Prometheus' text format."""

    def serve() -> Response:
        return Response(200, generate_latest(registry), CONTENT_TYPE_LATEST)

    return serve


def gauge(name: str, documentation: str, value: float | None) -> Iterable[Metric]:
    """One unlabelled gauge, or nothing when ``value`` is unknown (None)."""
    if value is not None:
        yield GaugeMetricFamily(name, documentation, value=float(value))


def counter(name: str, documentation: str, value: float | None) -> Iterable[Metric]:
    """One unlabelled counter (``name`` without ``_total``), or nothing when unknown."""
    if value is not None:
        yield CounterMetricFamily(name, documentation, value=float(value))


def labelled_counter(
    name: str, documentation: str, label: str, values: Mapping[str, int | float], always: Iterable[str] = ()
) -> Metric:
    """A counter with one label; ``always`` lists label values shown (as 0) before they happen,
    so that a dashboard's rate() has a series from the start."""
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key in sorted(set(values) | set(always)):
        family.add_metric([key], float(values.get(key, 0)))
    return family


def labelled_gauge(name: str, documentation: str, label: str, values: Mapping[str, int | float]) -> Metric:
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for key in sorted(values):
        family.add_metric([key], float(values[key]))
    return family


def traffic_families(prefix: str, traffic: Traffic) -> Iterable[Metric]:
    """``{prefix}_mqtt_received_bytes_total`` and ``..._sent_bytes_total``, by topic kind."""
    yield labelled_counter(
        f"{prefix}_mqtt_received_bytes",
        "MQTT payload bytes received, by topic kind (the first level under fedge/v1/FLEET/).",
        "topic",
        traffic.received.snapshot(),
    )
    yield labelled_counter(
        f"{prefix}_mqtt_sent_bytes",
        "MQTT payload bytes published, by topic kind (the first level under fedge/v1/FLEET/).",
        "topic",
        traffic.sent.snapshot(),
    )


def histogram(name: str, documentation: str, durations: Durations) -> Metric:
    snap = durations.snapshot()
    return HistogramMetricFamily(
        name,
        documentation,
        buckets=[(_bound_text(bound), float(count)) for bound, count in snap.buckets],
        sum_value=snap.sum,
    )


def _bound_text(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))
