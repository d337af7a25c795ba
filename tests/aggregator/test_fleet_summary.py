"""The fleet summary (``aggregator/fleet``, ``fedge.fleet/1``): a pure function of the
aggregator's status and the device statuses it tracks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedge.aggregator.config import load_aggregator_config
from fedge.aggregator.fleet_summary import (
    STALE_AFTER_S,
    DeviceSeen,
    build_fleet_summary,
    device_condition,
    last_round,
)
from fedge.aggregator.service import AggregatorService
from fedge.lab.provision import create_fleet
from fedge.protocol.statuses import offline_will
from fedge.protocol.topics import FleetTopics

NOW = 10_000.0

STATUS: dict[str, Any] = {
    "schema": "fedge.aggregator-status/1",
    "fleet": "f1",
    "state": "running",
    "phase": "train",
    "version": 7,
    "generation": 2,
    "completed_rounds": 3,
    "rounds": 20,
    "round_id": "r-0004",
    "rejected_total": {"decrypt_failed": 2, "late": 1},
    "eval_metric": "accuracy",
    "history": [
        {"round_id": "r-0002", "phase": "train", "fed_eval_accuracy": 0.5},
        {
            "round_number": 3,
            "round_id": "r-0003",
            "phase": "train",
            "outcome": "aggregated",
            "version": 6,
            "selected": 3,
            "reported": 2,
            "examples": 812,
            "train_loss": 0.61,
            "fed_eval_loss": 0.7,
            "fed_eval_accuracy": 0.81,
            "fed_eval_mse": None,
            "fed_eval_metric": "accuracy",
            "rejected": {"late": 1},
        },
    ],
}


def test_the_summary_counts_devices_by_condition_and_carries_model_round_and_rejections() -> None:
    seen = {
        "d-online": DeviceSeen("idle", True, NOW - 5),
        "d-not-ready": DeviceSeen("not_ready", False, NOW - 5),
        "d-stale": DeviceSeen("training", False, NOW - STALE_AFTER_S - 1),
        "d-offline": DeviceSeen("offline", True, NOW - 1),
        "d-unenrolled": DeviceSeen("idle", True, NOW),
    }
    enrolled = ["d-online", "d-not-ready", "d-stale", "d-offline", "d-never"]
    summary = build_fleet_summary(STATUS, seen, enrolled, NOW)
    assert summary == {
        "schema": "fedge.fleet/1",
        "fleet": "f1",
        "time": NOW,
        "aggregator": {
            "state": "running",
            "phase": "train",
            "round_id": "r-0004",
            "completed_rounds": 3,
            "rounds": 20,
        },
        "model": {"version": 7, "generation": 2},
        "devices": {
            "enrolled": 5,
            "online": 3,
            "stale": 1,
            "offline": 1,
            "never_seen": 1,
            "not_ready": 2,
            "stale_after_s": 90.0,
            "stale_ids": ["d-stale"],
            "offline_ids": ["d-offline"],
            "never_seen_ids": ["d-never"],
            "not_ready_ids": ["d-not-ready", "d-stale"],
        },
        "last_round": {
            "round_id": "r-0003",
            "round_number": 3,
            "phase": "train",
            "outcome": "aggregated",
            "version": 6,
            "selected": 3,
            "participants": 2,
            "examples": 812,
            "metric": "accuracy",
            "value": 0.81,
            "fed_eval_loss": 0.7,
            "train_loss": 0.61,
            "rejected": {"late": 1},
        },
        "rejected_total": {"decrypt_failed": 2, "late": 1},
    }


def test_stale_is_three_times_the_agents_default_status_interval_and_offline_is_never_stale() -> None:
    assert STALE_AFTER_S == 3 * 30.0
    assert device_condition(DeviceSeen("idle", True, NOW - STALE_AFTER_S), NOW) == "online"
    assert device_condition(DeviceSeen("idle", True, NOW - STALE_AFTER_S - 0.1), NOW) == "stale"
    assert device_condition(DeviceSeen("offline", True, 0.0), NOW) == "offline"
    assert device_condition(None, NOW) == "never_seen"
    assert device_condition(DeviceSeen("idle", True, NOW - 11), NOW, stale_after_s=10) == "stale"


def test_a_regression_round_reports_mse_and_no_history_means_no_last_round() -> None:
    record = {"round_id": "r1", "fed_eval_metric": "mse", "fed_eval_mse": 0.04, "fed_eval_accuracy": None}
    assert (last_round(record)["metric"], last_round(record)["value"]) == ("mse", 0.04)
    # An older checkpoint's record has no fed_eval_metric: the aggregator's eval_metric decides.
    assert last_round({"fed_eval_mse": 0.5}, "mse")["value"] == 0.5
    empty = build_fleet_summary({"fleet": "f1"}, {}, [], NOW)
    assert empty["last_round"] is None and empty["rejected_total"] == {}
    assert empty["devices"]["enrolled"] == 0


def test_the_service_publishes_the_summary_with_its_status_and_again_when_a_device_turns_stale(
    tmp_path: Path, har_model_dir: Path
) -> None:
    fleet = create_fleet(
        tmp_path,
        "f1",
        har_model_dir,
        "mqtt://127.0.0.1:9",
        {"watch-01": 1, "watch-02": 2},
        {"min_devices": 1},
    )
    now = [1_000.0]
    service = AggregatorService(load_aggregator_config(fleet.aggregator_config, {}), clock=lambda: now[0])
    sent: list[tuple[str, dict[str, Any]]] = []
    service.client.publish = lambda topic, payload, qos, retain: sent.append((topic, json.loads(payload)))  # type: ignore[method-assign,assignment]
    T = FleetTopics("f1")
    service._handle(T.status("watch-01"), json.dumps({"state": "idle", "ready": True}).encode())
    service._publish_status(force=False)
    assert sent == []  # offline: nothing queued (paho would send it after a fresher one)
    service.connected.set()  # as after a CONNACK
    service._status_sent_at = float("-inf")
    service._publish_status(force=False)  # still due: the offline attempt left it dirty
    assert [t for t, _ in sent] == [T.aggregator_status, T.fleet_summary]
    assert sent[0][1]["schema"] == "fedge.aggregator-status/1"
    devices = sent[1][1]["devices"]
    assert (devices["online"], devices["never_seen_ids"]) == (1, ["watch-02"])
    sent.clear()
    service._status_sent_at = float("-inf")  # past the rate limit; nothing changed
    service._publish_status(force=False)
    assert sent == []
    now[0] += STALE_AFTER_S + 1  # no status from watch-01 for longer than stale_after_s
    service._publish_status(force=False)
    assert [t for t, _ in sent] == [T.aggregator_status, T.fleet_summary]
    assert sent[1][1]["devices"]["stale_ids"] == ["watch-01"]


def test_a_device_gone_offline_is_left_out_of_the_next_rounds_while_enough_others_remain(
    tmp_path: Path, har_model_dir: Path
) -> None:
    fleet = create_fleet(
        tmp_path,
        "f1",
        har_model_dir,
        "mqtt://127.0.0.1:9",
        {"watch-01": 1, "watch-02": 2, "watch-03": 3},
        {"min_devices": 2},
    )
    service = AggregatorService(load_aggregator_config(fleet.aggregator_config, {}))
    T = FleetTopics("f1")
    for device in ("watch-01", "watch-02"):
        service._handle(T.status(device), json.dumps({"state": "idle", "ready": True}).encode())
    service._handle(T.status("watch-02"), offline_will("watch-02"))  # its Last Will: the agent died
    # watch-03 was never heard from: still asked; watch-02 is known to be gone: left out.
    assert service._unavailable() == frozenset({"watch-02"})
    manifest = service.engine.open_round(1_000.0, service._unavailable()).manifest
    assert manifest.selected_devices == ("watch-01", "watch-03")
    service._handle(T.status("watch-02"), json.dumps({"state": "idle", "ready": True}).encode())
    assert service._unavailable() == frozenset()  # back: selected again
