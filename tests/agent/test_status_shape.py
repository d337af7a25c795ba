"""A device's status has one shape, whether the agent publishes it or the broker publishes its
Last Will: a BMS parsing ``status/+`` never meets a payload with fewer keys
(``fedge.protocol.statuses``, ``docs/asyncapi.yaml``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedge.agent.config import load_agent_config
from fedge.agent.service import AgentService
from fedge.agent.wiring import ProvidedData, build_agent
from fedge.lab.provision import create_fleet
from fedge.protocol.statuses import DEVICE_STATUS_EMPTY, DEVICE_STATUS_SCHEMA, device_status, offline_will
from fedge.protocol.task import TaskSpec


def _agent(tmp_path: Path, model_dir: Path) -> AgentService:
    fleet = create_fleet(
        tmp_path, "shape", model_dir, "mqtt://127.0.0.1:9", {"watch-01": 1}, {"min_devices": 1}
    )

    def provider(task: TaskSpec) -> tuple[np.ndarray, np.ndarray]:
        return np.empty((0, task.input_dim), np.float32), np.empty((0,), np.int32)

    config = load_agent_config(fleet.agent_configs["watch-01"], {})
    return AgentService(build_agent(config, ProvidedData(provider)))


def test_the_last_will_carries_every_key_of_the_status_with_empty_values(
    tmp_path: Path, har_model_dir: Path
) -> None:
    agent = _agent(tmp_path, har_model_dir)
    status = agent.status()
    will = json.loads(bytes(agent.client._will_payload))  # what the broker publishes on a lost connection
    assert list(will) == list(status)
    assert will == json.loads(offline_will("watch-01"))
    assert (will["schema"], will["device_id"], will["state"]) == (DEVICE_STATUS_SCHEMA, "watch-01", "offline")
    assert all(will[k] in (None, {}) for k in DEVICE_STATUS_EMPTY)
    assert agent.client._will_topic.decode() == agent.topics.status("watch-01")
    assert (status["schema"], status["state"]) == (DEVICE_STATUS_SCHEMA, "online")


def test_a_status_key_the_template_does_not_list_is_refused() -> None:
    with pytest.raises(TypeError, match="DEVICE_STATUS_EMPTY"):
        device_status("watch-01", "idle", predictions={"x": 1})


def test_empty_values_are_not_shared_between_documents() -> None:
    one = device_status("a", "offline")
    one["messages_dropped"]["x"] = 1
    assert device_status("b", "offline")["messages_dropped"] == {}
