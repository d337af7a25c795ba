"""The aggregator's ``[metrics]`` endpoint: Prometheus metrics, ``/healthz`` and ``/readyz``.

Every value is read at scrape time from what the service already keeps (docs/metrics.md lists
them all): the engine's status as last published (``AggregatorService.last_status``: the loop
thread owns the engine, so a scrape never reads it mid-change; it is at most
``STATUS_INTERVAL_S`` old), the inbox's bounds, the connection and the Lease, plus the few
numbers the status lacks, which the service records as they happen (``traffic``,
``accepted``, ``round_outcomes``, ``round_durations``: :mod:`fedge.shell.meters`).

Health, for Kubernetes probes and Docker healthchecks:

- ``/healthz`` (liveness): the round loop turns, i.e. its heartbeat is younger than
  :data:`LIVE_MAX_AGE_S`; also while a follower waits for the Lease and while the broker is away.
- ``/readyz`` (readiness): the loop turns (heartbeat younger than :data:`READY_MAX_AGE_S`) and
  this replica either leads and is connected to the broker (``"role": "leader"``), or is a
  follower standing by (``"role": "follower"``: ready, not leading). A leader that lost the
  broker is not ready until it reconnects.

Imported only when ``[metrics] enabled`` (it needs prometheus-client).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fedge.aggregator.dashboard import dashboard_routes
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
    from fedge.aggregator.service import AggregatorService

log = logging.getLogger("fedge.aggregator")
PREFIX = "fedge_aggregator"
#: ``/healthz`` fails when the loop has not turned for this long (the former exec probe's 60 s).
LIVE_MAX_AGE_S = 60.0
#: ``/readyz`` fails sooner (the former readiness probe's 30 s).
READY_MAX_AGE_S = 30.0
#: Round outcomes (``RoundRecord.outcome``), shown as 0 before the first round closes.
ROUND_OUTCOMES = ("aggregated", "aborted")
ACCEPTED_KINDS = ("update", "moments")


def role(service: AggregatorService) -> str:
    """``leader`` (also without leader election: the only replica) or ``follower``."""
    leadership = service.leadership
    return "leader" if leadership is None or leadership.is_leader else "follower"


def liveness(service: AggregatorService) -> Response:
    age = service.heartbeat.age_s()
    ok = age < LIVE_MAX_AGE_S
    return health_response(ok, {"loop_age_s": _seconds(age), "max_age_s": LIVE_MAX_AGE_S})


def readiness(service: AggregatorService) -> Response:
    age = service.heartbeat.age_s()
    who, connected = role(service), service.connected.is_set()
    body: dict[str, Any] = {
        "role": who,
        "leading": who == "leader",
        "connected": connected,
        "loop_age_s": _seconds(age),
    }
    if age >= READY_MAX_AGE_S:
        body["reason"] = "the round loop does not turn"
    elif who == "leader" and not connected:
        body["reason"] = "not connected to the broker"
    elif who == "follower":
        body["reason"] = "standing by: another replica leads"
    return health_response(age < READY_MAX_AGE_S and (who == "follower" or connected), body)


def _seconds(age: float) -> float | None:
    return None if age == float("inf") else round(age, 3)


class AggregatorCollector(Collector):
    """Metric families derived, at each scrape, from the service (see the module docstring)."""

    def __init__(self, service: AggregatorService) -> None:
        self.service = service

    def collect(self) -> Iterable[Metric]:
        s = self.service
        p = PREFIX
        leading = role(s) == "leader"
        yield from gauge(
            f"{p}_leader", "1 while this replica leads (or runs without election), else 0.", leading
        )
        yield from gauge(
            f"{p}_broker_connected", "1 while connected to the fleet's broker, else 0.", s.connected.is_set()
        )
        yield from gauge(
            f"{p}_loop_age_seconds", "Seconds since the round loop last turned.", _finite(s.heartbeat.age_s())
        )
        yield labelled_counter(
            f"{p}_rounds",
            "Rounds closed by this process, by outcome (aggregated, aborted: too few updates).",
            "outcome",
            s.round_outcomes.snapshot(),
            ROUND_OUTCOMES,
        )
        yield histogram(
            f"{p}_round_duration_seconds",
            "Seconds from a round's manifest to its close (all selected reported, or the deadline).",
            s.round_durations,
        )
        yield labelled_counter(
            f"{p}_updates_accepted",
            "Messages on update/+ accepted by this process, by kind (update, moments).",
            "kind",
            s.accepted.snapshot(),
            ACCEPTED_KINDS,
        )
        yield from traffic_families(p, s.traffic)
        inbox = s.inbox_status()
        yield from gauge(f"{p}_inbox_messages", "Messages queued for the round loop.", inbox["messages"])
        yield from gauge(f"{p}_inbox_bytes", "Payload bytes queued for the round loop.", inbox["bytes"])
        yield labelled_counter(
            f"{p}_messages_dropped",
            "Messages not handled, by reason (inbox_full, status_*, handler_error:*).",
            "reason",
            s.messages_dropped,
        )
        yield labelled_counter(
            f"{p}_state_dir_failed_writes",
            "Checkpoint writes [aggregator] state_dir refused, by fault (full, read_only); no round is "
            "published until its checkpoint is written.",
            "fault",
            s.state_dir_watch.report()["failed_writes"],
            ("full", "read_only"),
        )
        status = s.last_status
        if status is not None:  # a follower, or a leader before its first status, has none
            yield from self._from_status(status)

    def _from_status(self, status: Mapping[str, Any]) -> Iterable[Metric]:
        p = PREFIX
        rejected = status.get("rejected_total")
        yield labelled_counter(
            f"{p}_updates_rejected",
            "Messages on update/+ rejected, by reason (docs/protocol.md, reject reasons); "
            "kept in the checkpoint, so it counts over the fleet's life, not this process's.",
            "reason",
            status_counts(rejected),
        )
        yield from gauge(
            f"{p}_model_version", "Version of the newest manifest.", status_number(status.get("version"))
        )
        yield from gauge(
            f"{p}_model_generation",
            "The model generation ([aggregator] model_generation).",
            status_number(status.get("generation")),
        )
        yield from counter(
            f"{p}_completed_rounds",
            "Training rounds completed over the fleet's life (from the checkpoint).",
            status_number(status.get("completed_rounds")),
        )
        yield from gauge(
            f"{p}_rounds_planned",
            "[rounds] rounds: rounds before the final model.",
            status_number(status.get("rounds")),
        )
        yield from gauge(
            f"{p}_round_selected_devices",
            "Devices selected for the open round.",
            status_number(status.get("selected")),
        )
        reported = status.get("reported")
        yield from gauge(
            f"{p}_round_reported_devices",
            "Devices whose message the open round accepted.",
            len(reported) if isinstance(reported, list) else None,
        )
        online = status.get("online_devices")
        not_ready = status.get("not_ready_devices")
        if isinstance(online, list) and isinstance(not_ready, list):
            devices = GaugeMetricFamily(
                f"{p}_devices",
                "Devices by their retained status: online, and ready (online, enough local samples).",
                labels=["state"],
            )
            devices.add_metric(["online"], len(online))
            devices.add_metric(["ready"], len(set(online) - set(not_ready)))
            yield devices
        state = status.get("state")
        yield from gauge(f"{p}_done", "1 once the final model is published, else 0.", state == "done")
        privacy = status.get("privacy")
        if isinstance(privacy, Mapping):  # [privacy] enabled
            yield from gauge(
                f"{p}_dp_epsilon_spent",
                "Differential privacy: epsilon spent so far, per device, at [privacy] target_delta.",
                status_number(privacy.get("epsilon_spent")),
            )
            yield from gauge(
                f"{p}_dp_epsilon_budget",
                "Differential privacy: [privacy] epsilon_budget; training stops before it is exceeded.",
                status_number(privacy.get("epsilon_budget")),
            )


def _finite(value: float) -> float | None:
    return None if value == float("inf") else value


def serve_metrics(service: AggregatorService) -> HttpEndpoint:
    """Binds ``[metrics]`` and serves ``/metrics``, ``/healthz`` and ``/readyz``."""
    registry = registry_with(AggregatorCollector(service))
    routes = {
        "/metrics": metrics_route(registry),
        "/healthz": lambda: liveness(service),
        "/readyz": lambda: readiness(service),
        **dashboard_routes(lambda: service.dashboard_json),  # /, /dashboard.js, /api/fleet
    }
    return start_endpoint(service.config.metrics, routes, log)
