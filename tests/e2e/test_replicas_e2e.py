"""Aggregator replicas on a real broker: a leader and two workers share one fleet's updates.

Real agents train on the HAR data, a real Mosquitto hands each update to one member of the
shared subscription, workers send sealed partials and the leader aggregates. The checks are on
what crossed the broker and the leader's own records: every update of every round counted
exactly once, the workers did take their share, and a worker killed with ``kill -9`` while it
held updates unacknowledged loses none of them once it is back.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fedge.lab.broker import MosquittoBroker
from support.asyncapi import load_document
from support.fleet_harness import Fleet, latest_status, wait_device_online
from support.mqtt_fixtures import TrafficRecorder

pytest_plugins = ("support.mqtt_fixtures",)
pytestmark = pytest.mark.slow

DEVICES = 4
REPLICAS = {"FEDGE_AGGREGATOR__REPLICAS__ENABLED": "true"}


@pytest.fixture()
def recorder(mosquitto: MosquittoBroker) -> Iterator[TrafficRecorder]:
    with TrafficRecorder.for_broker(mosquitto) as rec:
        yield rec


def start_leader(fleet: Fleet) -> None:
    fleet.spawn("aggregator", ["aggregator", "run", "--config", str(fleet.files.aggregator_config)], REPLICAS)


def start_worker(fleet: Fleet, name: str) -> None:
    env = {
        **REPLICAS,
        "FEDGE_AGGREGATOR__REPLICAS__ROLE": "worker",
        "FEDGE_AGGREGATOR__REPLICAS__WORKER_ID": name,
    }
    fleet.spawn(name, ["aggregator", "run", "--config", str(fleet.files.aggregator_config)], env)


def aggregator_status(fleet: Fleet, recorder: TrafficRecorder) -> dict[str, Any]:
    return latest_status(recorder.messages, fleet.topics.aggregator_status)


def wait_for(what: str, check: Any, timeout: float, fleet: Fleet) -> None:
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        if check():
            return
        time.sleep(0.2)
    logs = "\n".join(f"--- {n}\n{fleet.log(n)[-2500:]}" for n in fleet.procs)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


def updates_by_round(fleet: Fleet, recorder: TrafficRecorder) -> dict[str, set[str]]:
    """The devices whose update of each round crossed the broker (read from the sealed header,
    which the broker can see; the payload it cannot)."""
    from fedge.protocol.sealing import read_header

    out: dict[str, set[str]] = {}
    prefix = fleet.topics.base + "/update/"
    for m in recorder.messages:
        if m.topic.startswith(prefix) and m.payload:
            header, _ = read_header(m.payload)
            out.setdefault(header.round_id, set()).add(header.device_id)
    return out


def start_replicated(fleet: Fleet, recorder: TrafficRecorder) -> None:
    """Two workers, the agents (each online before the next starts), then the leader."""
    start_worker(fleet, "worker-1")
    start_worker(fleet, "worker-2")
    for device in sorted(fleet.files.agent_configs):
        fleet.start_agent(device)
        wait_device_online(recorder, fleet, device)
    start_leader(fleet)


def completed(fleet: Fleet, recorder: TrafficRecorder, rounds: int) -> Callable[[], bool]:
    return lambda: aggregator_status(fleet, recorder).get("completed_rounds") == rounds


def train_records(status: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in status["history"] if r["phase"] == "train"]


def test_a_leader_and_two_workers_count_every_update_once(
    tmp_path: Path, mosquitto: MosquittoBroker, recorder: TrafficRecorder, har_model_dir: Path
) -> None:
    fleet = Fleet(
        tmp_path / "fleet",
        mosquitto.url,
        har_model_dir,
        DEVICES,
        {"rounds": 3, "min_devices": DEVICES, "round_timeout_s": 30.0},
    )
    try:
        start_replicated(fleet, recorder)
        wait_for("3 rounds", completed(fleet, recorder, 3), 180, fleet)
        status = aggregator_status(fleet, recorder)
    finally:
        fleet.stop_all()
    sent = updates_by_round(fleet, recorder)
    records = train_records(status)
    assert len(records) == 3
    for record in records:
        assert record["outcome"] == "aggregated"
        assert record["reported"] == DEVICES == len(sent[record["round_id"]])
    workers = status["replicas"]["workers"]
    assert set(workers) == {"worker-1", "worker-2"}, workers
    # The broker hands the 16 updates (a moments round and 3 train rounds of 4 devices) round
    # robin over the three members: each worker folded some, and no more than were sent.
    assert all(w["updates"] >= 1 for w in workers.values()), workers
    assert sum(w["updates"] for w in workers.values()) <= 4 * DEVICES
    assert all(set(w["verdicts"]) <= {"accepted", "conflict"} for w in workers.values()), workers
    assert status["replicas"]["refused"] == {}
    for name in ("aggregator", "worker-1", "worker-2"):
        assert "Traceback" not in fleet.log(name), fleet.log(name)[-3000:]
    # Every message of the replicated fleet, work orders, partials and verdicts included, is on a
    # channel of docs/asyncapi.yaml and matches it.
    doc = load_document()
    channels = set()
    for message in recorder.messages:
        channel = doc.channel_for(message.topic)
        assert channel is not None, message.topic
        channel.validate(message.topic, message.payload)
        channels.add(channel.key)
    assert {"aggregatorWork", "aggregatorPartial", "partialVerdict"} <= channels


def test_a_worker_killed_holding_updates_loses_none_of_them(
    tmp_path: Path, mosquitto: MosquittoBroker, recorder: TrafficRecorder, har_model_dir: Path
) -> None:
    """The worker is frozen (SIGSTOP) while the round's updates arrive, so the broker hands it
    its share and it acknowledges none; then it is killed with -9 and started again under the
    same id. Its broker session gives the updates back, and the round counts all of them."""
    fleet = Fleet(
        tmp_path / "fleet",
        mosquitto.url,
        har_model_dir,
        DEVICES,
        {"rounds": 2, "min_devices": DEVICES, "round_timeout_s": 40.0},
    )
    try:
        start_replicated(fleet, recorder)
        wait_for("round 1", completed(fleet, recorder, 1), 120, fleet)
        fleet.signal("worker-1", signal.SIGSTOP)
        round_2 = aggregator_status(fleet, recorder)["round_id"]
        wait_for(
            "round 2's updates",
            lambda: len(updates_by_round(fleet, recorder).get(round_2, ())) == DEVICES,
            60,
            fleet,
        )
        time.sleep(0.5)  # the broker routes them to the members
        fleet.kill("worker-1")
        killed_at = time.monotonic()
        start_worker(fleet, "worker-1")
        wait_for("round 2", completed(fleet, recorder, 2), 60, fleet)
        recovered_s = time.monotonic() - killed_at
        status = aggregator_status(fleet, recorder)
    finally:
        fleet.stop_all()
    records = train_records(status)
    record = next(r for r in records if r["round_id"] == round_2)
    assert record["outcome"] == "aggregated"
    assert record["reported"] == DEVICES, json.dumps(record)
    # The round closed because every device was counted, not at its deadline (40 s).
    assert recovered_s < 30
    # The restarted worker (its partials numbered from 1 again) brought its share of round 2.
    restarted = fleet.log("worker-1").split("aggregator worker worker-1 of fleet")[-1]
    assert f"following round {round_2}" in restarted
    brought = re.findall(
        rf"partial 1 of worker-1: (\d+) accepted, 0 refused in round {round_2}", fleet.log("aggregator")
    )
    assert brought and int(brought[-1]) >= 1, fleet.log("aggregator")[-3000:]


def test_a_worker_stopped_with_sigterm_leaves_the_group_and_no_round_waits_for_it(
    tmp_path: Path, mosquitto: MosquittoBroker, recorder: TrafficRecorder, har_model_dir: Path
) -> None:
    """A scale-down: the worker leaves the shared subscription, hands over what it holds and ends
    its broker session, so the broker stops queueing a share of the updates for a member that is
    gone; the next rounds count every device well before their deadline."""
    fleet = Fleet(
        tmp_path / "fleet",
        mosquitto.url,
        har_model_dir,
        DEVICES,
        {"rounds": 3, "min_devices": DEVICES, "round_timeout_s": 60.0},
    )
    try:
        start_replicated(fleet, recorder)
        wait_for("round 1", completed(fleet, recorder, 1), 120, fleet)
        fleet.signal("worker-1", signal.SIGTERM)
        assert fleet.wait_exit("worker-1", 20) == 0
        stopped_at = time.monotonic()
        wait_for("round 3", completed(fleet, recorder, 3), 50, fleet)
        took_s = time.monotonic() - stopped_at
        status = aggregator_status(fleet, recorder)
    finally:
        fleet.stop_all()
    assert "left the share group holding nothing; session ended" in fleet.log("worker-1")
    assert [r["reported"] for r in train_records(status)] == [DEVICES] * 3
    assert took_s < 30  # no round waited for its 60 s deadline
