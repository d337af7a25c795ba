"""Order does not matter: a device selected before it holds data says "not ready", keeps the
round and trains once data arrives; the aggregator waits for and selects ready devices.

The parts are real (``create_fleet`` keys and files, the session's real model, the real
LiteRT trainer, the real aggregator service and round engine); the MQTT messages are handed to
the services' callbacks directly, as paho would.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from fedge.agent.config import load_agent_config
from fedge.agent.core import Phase
from fedge.agent.service import AgentService
from fedge.agent.wiring import ProvidedData, build_agent
from fedge.aggregator.config import load_aggregator_config
from fedge.aggregator.service import AggregatorService
from fedge.lab.har_watch import load_devices
from fedge.lab.provision import FleetFiles, create_fleet
from fedge.protocol.task import TaskSpec
from fedge.protocol.topics import FleetTopics

FLEET = "ready"
T = FleetTopics(FLEET)
DEVICES = {"watch-01": 1, "watch-02": 2, "watch-03": 3}


@pytest.fixture()
def fleet(tmp_path: Path, har_model_dir: Path) -> FleetFiles:
    return create_fleet(
        tmp_path,
        FLEET,
        har_model_dir,
        "mqtt://127.0.0.1:9",
        DEVICES,
        {"rounds": 3, "min_devices": 2, "wait_for_devices_s": 0.0},
        agent_overrides={"blob_timeout_s": 30.0},
    )


def message(topic: str, payload: bytes) -> mqtt.MQTTMessage:
    msg = mqtt.MQTTMessage(topic=topic.encode())
    msg.payload = payload
    return msg


def test_a_device_without_data_is_not_ready_keeps_the_round_and_answers_once_data_arrives(
    fleet: FleetFiles,
) -> None:
    aggregator = AggregatorService(load_aggregator_config(fleet.aggregator_config, {}))
    pub = aggregator.engine.open_round(time.time())
    data: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def provider(task: TaskSpec) -> tuple[np.ndarray, np.ndarray]:
        empty = (np.empty((0, task.input_dim), np.float32), np.empty((0,), np.int32))
        return data.get(task.sha256(), empty)

    agent = AgentService(
        build_agent(load_agent_config(fleet.agent_configs["watch-02"], {}), ProvidedData(provider))
    )
    agent._on_message(agent.client, None, message(T.manifest, pub.manifest_frame))
    worker = threading.Thread(target=agent._work_once)
    worker.start()
    deadline = time.monotonic() + 30
    while not agent._wanted_blobs and time.monotonic() < deadline:
        time.sleep(0.01)
    for topic, blob in pub.blobs.items():
        agent._on_message(agent.client, None, message(topic, blob))
    worker.join(60)
    assert not worker.is_alive()

    status = agent.status()
    assert (status["state"], status["ready"]) == ("not_ready", False)
    assert agent.core.phase is Phase.WAITING_FOR_DATA
    assert agent.last_error is not None and "0 local sample(s), 2 needed" in agent.last_error
    assert agent.outbox.stats().pending == 0 and agent.state.load().update_counter == 0
    assert status["messages_dropped"] == {} and agent.rejected_manifests == {}

    # Data arrives (an EdgeX replay started late); the worker's next look trains the same round.
    task = pub.manifest.model_manifest.task
    subject = load_devices(task, [2])[2]
    data[task.sha256()] = (subject.x, subject.y)
    agent._data_retry_at = 0.0
    agent._work_once()
    status = agent.status()
    assert (status["state"], status["ready"]) == ("idle", True)
    pending = agent.outbox.pending()
    assert [m.round_id for m in pending] == [pub.manifest.round_id]
    outcome = aggregator.engine.handle(pending[0].topic, pending[0].payload, time.time())
    assert outcome.accepted, outcome


def test_a_round_that_closes_while_the_device_waits_for_data_is_given_up_without_sending(
    fleet: FleetFiles,
) -> None:
    aggregator = AggregatorService(load_aggregator_config(fleet.aggregator_config, {}))
    pub = aggregator.engine.open_round(time.time())
    clock = [time.time()]

    def no_data(task: TaskSpec) -> tuple[np.ndarray, np.ndarray]:
        return np.empty((1, task.input_dim), np.float32), np.zeros((1,), np.int32)  # 1 < 2

    stages = build_agent(load_agent_config(fleet.agent_configs["watch-03"], {}), ProvidedData(no_data))
    agent = AgentService(stages, clock=lambda: clock[0])
    agent._on_message(agent.client, None, message(T.manifest, pub.manifest_frame))
    for topic, blob in pub.blobs.items():  # already retained when the device subscribes
        agent._on_message(agent.client, None, message(topic, blob))
    agent._wanted_blobs = frozenset()  # (the blobs above were queued before the fetch asked)
    agent._blobs = {topic.rsplit("/", 1)[-1]: blob for topic, blob in pub.blobs.items()}
    agent._work_once()
    assert agent.core.phase is Phase.WAITING_FOR_DATA
    assert "1 local sample(s), 2 needed" in str(agent.last_error)
    clock[0] = pub.manifest.deadline + 1
    agent._data_retry_at = 0.0
    agent._work_once()
    assert agent.core.phase is Phase.WAITING
    assert agent.status()["state"] == "idle"
    assert agent.outbox.stats().pending == 0 and agent.state.load().update_counter == 0


def test_the_aggregator_tracks_not_ready_devices_and_selects_the_ready_ones(fleet: FleetFiles) -> None:
    aggregator = AggregatorService(load_aggregator_config(fleet.aggregator_config, {}))
    say = aggregator._track_status
    say(T.status("watch-01"), json.dumps({"state": "idle", "ready": True}).encode())
    say(T.status("watch-02"), json.dumps({"state": "not_ready", "ready": False}).encode())
    say(T.status("watch-03"), json.dumps({"state": "online"}).encode())  # an older agent: ready
    assert aggregator.online == {"watch-01", "watch-02", "watch-03"}
    assert aggregator.not_ready == {"watch-02"}
    pub = aggregator.engine.open_round(time.time(), frozenset(aggregator.not_ready))
    assert pub.manifest.selected_devices == ("watch-01", "watch-03")
    # It becomes ready (data arrived): selected again from the next round.
    say(T.status("watch-02"), json.dumps({"state": "idle", "ready": True}).encode())
    assert aggregator.not_ready == set()
    # A cleared (empty) retained status is an offline device, not a not-ready one.
    say(T.status("watch-03"), b"")
    assert aggregator.online == {"watch-01", "watch-02"} and aggregator.not_ready == set()
