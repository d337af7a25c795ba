"""The agent's ``[metrics]`` endpoint: Prometheus metrics, ``/healthz`` and ``/readyz``.

Every value is read at scrape time from what the service already keeps (docs/metrics.md lists
them all): its status (``AgentService.status_now``: under the lock the worker and paho's
thread take for it), with the EdgeX source's report in ``data`` (sample store, quality
counters) and the predictions in ``insights`` when the agent publishes them, read defensively
(a source without a report, an older status: those metrics are simply absent); plus the few
numbers the status lacks, which the service records as they happen (``traffic``,
``training_durations``: :mod:`fedge.shell.meters`).

Health, for Docker healthchecks (and Kubernetes, should an agent run there):

- ``/healthz`` (liveness): the worker turns, i.e. its last turn is younger than
  :data:`LIVE_MAX_AGE_S` (a long training or blob wait counts as turns: both ping it);
- ``/readyz`` (readiness): the worker turns, the agent is connected to the fleet's broker and
  its trust store holds at least one aggregator key (so a manifest can be verified). Whether
  it already holds a verified model (``model_version``) and enough local samples
  (``enough_data``) is said in the body, not required: a new device is ready to receive its
  first model.

Imported only when ``[metrics] enabled`` (it needs prometheus-client).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fedge.protocol.statuses import status_counts, status_number
from fedge.shell.http_endpoint import HttpEndpoint, Response, health_response, start_endpoint
from fedge.shell.prometheus import (
    counter,
    gauge,
    histogram,
    labelled_counter,
    metrics_route,
    registry_with,
    traffic_families,
)

if TYPE_CHECKING:
    from fedge.agent.service import AgentService

log = logging.getLogger("fedge.agent")
PREFIX = "fedge_agent"
#: ``/healthz`` fails when the worker has not turned for this long (the image's
#: FEDGE_HEALTH_MAX_AGE_S default for the heartbeat file).
LIVE_MAX_AGE_S = 120.0
#: Readings the EdgeX sample builder drops, by reason (``QualityReport``, data-quality.md).
READING_DROPS = ("duplicate", "late", "not_numeric", "not_finite", "out_of_range")
#: Aligned rows it drops, by reason.
ROW_DROPS = ("incomplete", "unknown_label")


def _worker_age(service: AgentService) -> float | None:
    alive_at = service.alive_at
    return None if alive_at is None else time.monotonic() - alive_at


def liveness(service: AgentService) -> Response:
    age = _worker_age(service)
    ok = age is not None and age < LIVE_MAX_AGE_S
    body: dict[str, Any] = {
        "worker_age_s": None if age is None else round(age, 3),
        "max_age_s": LIVE_MAX_AGE_S,
    }
    if age is None:
        body["reason"] = "the worker has not started"
    return health_response(ok, body)


def readiness(service: AgentService) -> Response:
    age = _worker_age(service)
    alive = age is not None and age < LIVE_MAX_AGE_S
    connected = service.connected.is_set()
    trusted = len(service.trust.trusted_keys())
    body: dict[str, Any] = {
        "connected": connected,
        "trusted_keys": trusted,
        "model_version": service.state.load().manifest_version,
        "state": service.phase_state,
        "enough_data": service._ready(),
    }
    if not alive:
        body["reason"] = "the worker does not turn"
    elif not connected:
        body["reason"] = "not connected to the broker"
    elif not trusted:
        body["reason"] = "no trusted aggregator key"
    return health_response(alive and connected and trusted > 0, body)


class AgentCollector(Collector):
    """Metric families derived, at each scrape, from the service (see the module docstring)."""

    def __init__(self, service: AgentService) -> None:
        self.service = service

    def collect(self) -> Iterable[Metric]:
        s, p = self.service, PREFIX
        status = s.status_now()
        yield from gauge(
            f"{p}_broker_connected", "1 while connected to the fleet's broker, else 0.", s.connected.is_set()
        )
        yield from gauge(f"{p}_worker_age_seconds", "Seconds since the worker last turned.", _worker_age(s))
        yield from gauge(
            f"{p}_ready",
            "1 while the device can take part (enough local samples), else 0.",
            status.get("ready") is True,
        )
        state = status.get("state")
        if isinstance(state, str):
            family = GaugeMetricFamily(
                f"{p}_state", "The agent's state (1 for the current one).", labels=["state"]
            )
            family.add_metric([state], 1.0)
            yield family
        yield from gauge(
            f"{p}_model_version",
            "Version of the newest verified manifest.",
            status_number(status.get("model_version")),
        )
        yield from gauge(
            f"{p}_training_samples",
            "Local samples the last round trained on.",
            status_number(status.get("samples")),
        )
        yield histogram(
            f"{p}_training_seconds",
            "Seconds per local training (fit, without evaluation).",
            s.training_durations,
        )
        yield from traffic_families(p, s.traffic)
        yield from gauge(
            f"{p}_outbox_pending",
            "Sealed messages waiting for the broker's PUBACK.",
            status_number(status.get("outbox_pending")),
        )
        yield from counter(
            f"{p}_outbox_dropped",
            "Sealed messages dropped from the outbox (their round closed, or the outbox was full).",
            status_number(status.get("outbox_dropped_total")),
        )
        yield labelled_counter(
            f"{p}_manifests_rejected",
            "Round manifests (and key rotations: rotation_*) refused, by reason.",
            "reason",
            status_counts(status.get("rejected_manifests")),
        )
        yield labelled_counter(
            f"{p}_messages_dropped",
            "MQTT messages not handled, by reason (blob_*, rotation_*, handler_error:*).",
            "reason",
            status_counts(status.get("messages_dropped")),
        )
        insights = status.get("insights")
        if isinstance(insights, Mapping):
            yield from counter(
                f"{p}_predictions_published",
                "Predictions published on insight/DEVICE.",
                status_number(insights.get("published")),
            )
        data = status.get("data")
        if isinstance(data, Mapping):
            yield from _source_families(data)


def _source_families(data: Mapping[str, Any]) -> Iterable[Metric]:
    """From the EdgeX source's report (``status()["data"]``); absent keys, absent metrics."""
    p = PREFIX
    yield from gauge(
        f"{p}_edgex_connected",
        "1 while connected to EdgeX's message bus, else 0.",
        _flag(data.get("bus_connected")),
    )
    yield from gauge(
        f"{p}_samples_in_store",
        "Samples of this device's task in the sample store.",
        status_number(data.get("stored_samples")),
    )
    yield from counter(
        f"{p}_samples_stored", "Samples stored by this run.", status_number(data.get("stored_this_run"))
    )
    store = data.get("store")
    if isinstance(store, Mapping):
        yield labelled_counter(
            f"{p}_samples_dropped",
            "Samples the store did not keep or evicted, by reason (duplicate, expired, evicted_age, "
            "evicted_count, store_error).",
            "reason",
            status_counts(store),
        )
    quality = data.get("quality")
    if isinstance(quality, Mapping):
        counts = status_counts(quality)
        yield from counter(
            f"{p}_readings", "EdgeX readings seen by the sample builder.", counts.get("readings")
        )
        yield from counter(
            f"{p}_samples_built", "Samples (feature windows) the builder emitted.", counts.get("samples")
        )
        yield labelled_counter(
            f"{p}_readings_dropped",
            "EdgeX readings dropped by the quality policy, by reason (data-quality.md).",
            "reason",
            {r: counts.get(r, 0) for r in READING_DROPS},
        )
        yield labelled_counter(
            f"{p}_rows_dropped",
            "Aligned rows dropped, by reason (incomplete, unknown_label).",
            "reason",
            {r: counts.get(r, 0) for r in ROW_DROPS},
        )


def _flag(value: object) -> float | None:
    return float(value) if isinstance(value, bool) else None


def serve_metrics(service: AgentService) -> HttpEndpoint:
    """Binds ``[metrics]`` and serves ``/metrics``, ``/healthz`` and ``/readyz``."""
    registry = registry_with(AgentCollector(service))
    routes = {
        "/metrics": metrics_route(registry),
        "/healthz": lambda: liveness(service),
        "/readyz": lambda: readiness(service),
    }
    return start_endpoint(service.config.metrics, routes, log)
