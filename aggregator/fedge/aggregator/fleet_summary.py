"""The fleet summary (``fedge/v1/{fleet}/aggregator/fleet``, schema ``fedge.fleet/1``): one
retained document a building-management system (BMS) reads for the state of the whole fleet.

Pure: it is built from the aggregator's status and the device statuses the aggregator tracks,
with the time as an argument; the service publishes it with its status (same rate limit).

A device is in exactly one of four conditions:

- ``online``: its last status says a state other than ``offline`` and arrived within
  ``stale_after_s`` (by the aggregator's clock, when the aggregator received it);
- ``stale``: the same, but its status has not been refreshed for longer than ``stale_after_s``.
  An agent republishes its status every ``status_interval_s`` (30 s by default), and its Last
  Will marks it offline when its connection is lost, so a stale device is one whose agent is
  connected but no longer working (a hung worker), or whose offline status was lost.
  :data:`STALE_AFTER_S` is 3 x the agent's default interval: a missed status or two is no alarm;
- ``offline``: its last status (or its Last Will) says ``offline``, or it was cleared (an empty
  retained status);
- ``never_seen``: enrolled, but no status of it has arrived since the aggregator started.

``not_ready`` counts the online and stale devices whose status says ``"ready": false`` (too
few local samples to train). Device ids are listed for every condition but ``online``: those
lists are what someone has to look at, and they stay short in a healthy fleet.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fedge.protocol.statuses import FLEET_SUMMARY_SCHEMA

#: The agent's default ``status_interval_s`` (``agent/config.py``).
AGENT_STATUS_INTERVAL_S = 30.0
#: A device whose status is older than this is ``stale`` (3 x the agent's default interval).
STALE_AFTER_S = 3 * AGENT_STATUS_INTERVAL_S


@dataclass(frozen=True)
class DeviceSeen:
    """What the aggregator last heard from a device: its state, whether it said it is ready,
    and when (the aggregator's clock) its status arrived."""

    state: str
    ready: bool
    at: float


def device_condition(seen: DeviceSeen | None, now: float, stale_after_s: float = STALE_AFTER_S) -> str:
    """``online``, ``stale``, ``offline`` or ``never_seen`` (see the module docstring)."""
    if seen is None:
        return "never_seen"
    if seen.state == "offline":
        return "offline"
    if now - seen.at > stale_after_s:
        return "stale"
    return "online"


def build_fleet_summary(
    aggregator_status: Mapping[str, Any],
    devices: Mapping[str, DeviceSeen],
    enrolled: Iterable[str],
    now: float,
    stale_after_s: float = STALE_AFTER_S,
) -> dict[str, Any]:
    """The ``fedge.fleet/1`` document. ``aggregator_status`` is the service's retained status
    (``fleet``, ``state``, ``phase``, ``version``, ``generation``, ``round_id``,
    ``completed_rounds``, ``rounds``, ``rejected_total``, ``history``, ``eval_metric``);
    ``devices`` the last status of each device heard from; ``enrolled`` the registry's ids."""
    ids = sorted(set(enrolled) | set(devices))
    by_condition: dict[str, list[str]] = {"online": [], "stale": [], "offline": [], "never_seen": []}
    not_ready: list[str] = []
    for device in ids:
        seen = devices.get(device)
        condition = device_condition(seen, now, stale_after_s)
        by_condition[condition].append(device)
        if seen is not None and condition in ("online", "stale") and not seen.ready:
            not_ready.append(device)
    history = aggregator_status.get("history") or []
    return {
        "schema": FLEET_SUMMARY_SCHEMA,
        "fleet": aggregator_status.get("fleet"),
        "time": now,
        "aggregator": {
            "state": aggregator_status.get("state"),
            "phase": aggregator_status.get("phase"),
            "round_id": aggregator_status.get("round_id"),
            "completed_rounds": aggregator_status.get("completed_rounds"),
            "rounds": aggregator_status.get("rounds"),
        },
        "model": {
            "version": aggregator_status.get("version"),
            "generation": aggregator_status.get("generation"),
        },
        "devices": {
            "enrolled": len(set(enrolled)),
            "online": len(by_condition["online"]),
            "stale": len(by_condition["stale"]),
            "offline": len(by_condition["offline"]),
            "never_seen": len(by_condition["never_seen"]),
            "not_ready": len(not_ready),
            "stale_after_s": stale_after_s,
            "stale_ids": by_condition["stale"],
            "offline_ids": by_condition["offline"],
            "never_seen_ids": by_condition["never_seen"],
            "not_ready_ids": not_ready,
        },
        "last_round": last_round(history[-1], aggregator_status.get("eval_metric")) if history else None,
        "rejected_total": dict(aggregator_status.get("rejected_total") or {}),
    }


def last_round(record: Mapping[str, Any], eval_metric: object = None) -> dict[str, Any]:
    """A round record (``RoundRecord.to_dict``, possibly from an older checkpoint) in the
    summary's terms: the federated evaluation in the task's metric (``accuracy`` or ``mse``;
    ``None`` for a moments round or when no device evaluated) and how many devices took part."""
    metric = record.get("fed_eval_metric") or eval_metric or "accuracy"
    value = record.get("fed_eval_mse") if metric == "mse" else record.get("fed_eval_accuracy")
    return {
        "round_id": record.get("round_id"),
        "round_number": record.get("round_number"),
        "phase": record.get("phase"),
        "outcome": record.get("outcome"),
        "version": record.get("version"),
        "selected": record.get("selected"),
        "participants": record.get("reported"),
        "examples": record.get("examples"),
        "metric": metric,
        "value": value,
        "fed_eval_loss": record.get("fed_eval_loss"),
        "train_loss": record.get("train_loss"),
        "rejected": dict(record.get("rejected") or {}),
    }
