"""A real agent with ``[personalisation]`` on a real Mosquitto, with a real aggregator and the real
LiteRT trainer on a subject of the smartwatch data: two federated train rounds and the final model.

The same fleet runs twice, personalisation off and on (its own fleet id each, the same data,
model and seeds): the sealed updates, opened with the aggregator's key, are byte for byte the same,
so the personal weights never reach the federated update. With it on, the insight messages are
marked personal and name both the global version and the one the personal weights came from,
the status reports the global and personal accuracy on the device's held-out part, the personal
weights are in the state dir and differ from the global ones, and an agent restarted on the
same state dir predicts with them at once, without fine-tuning again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.agent.config import load_agent_config
from fedge.agent.live import LiveWindow, LiveWindows
from fedge.agent.personal import PERSONAL_FILE, PersonalStore
from fedge.agent.service import AgentService, split_holdout
from fedge.agent.wiring import build_agent
from fedge.aggregator.config import load_aggregator_config
from fedge.aggregator.service import AggregatorService
from fedge.lab.broker import MosquittoBroker
from fedge.lab.har_watch import load_devices
from fedge.lab.provision import FleetFiles, create_fleet
from fedge.protocol.sealing import open_sealed, read_header
from fedge.protocol.task import TaskSpec
from fedge.protocol.topics import FleetTopics
from fedge.protocol.weights import weights_to_bytes
from support import agent_network
from support.agent_network import run_in_thread
from support.asyncapi import load_document
from support.mqtt_fixtures import RecordedMessage, TrafficRecorder

pytest_plugins = ("support.mqtt_fixtures",)

DEVICE = "watch-01"
SUBJECT = 1
FINAL_VERSION = 4  # moments (v1), two train rounds (v2, v3), the final model (v4)
ROUNDS = {"rounds": 2, "min_devices": 1, "wait_for_devices_s": 5.0, "round_timeout_s": 60.0}
#: Every window predicted and published: the test reads the insights, not the policy.
INSIGHT = {"FEDGE_AGENT__INSIGHT__PUBLISH": "every_window", "FEDGE_AGENT__INSIGHT__MIN_INTERVAL_S": "0"}
PERSONAL = {"FEDGE_AGENT__PERSONALISATION__ENABLED": "true", "FEDGE_AGENT__PERSONALISATION__EPOCHS": "5"}


class SubjectData:
    """A subject of the smartwatch data as the agent's source, and one live window of it (ending
    now) at every turn of the worker, so predictions go out as they would from EdgeX."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._next = 0

    def training_data(self, task: TaskSpec) -> tuple[np.ndarray, np.ndarray]:
        if task.sha256() not in self._cache:
            subject = load_devices(task, [SUBJECT])[SUBJECT]
            self._cache[task.sha256()] = (subject.x, subject.y)
        return self._cache[task.sha256()]

    def live_windows(self, task: TaskSpec | None) -> LiveWindows:
        if task is None:
            return LiveWindows()
        x, _ = self.training_data(task)
        self._next += 1
        end = time.time_ns()
        window = LiveWindow(x[self._next % x.shape[0]], end - 2 * 10**9, end, task.features, DEVICE)
        return LiveWindows((window,))

    def start(self) -> None:
        return None

    def stop(self) -> None:
        return None

    def available(self) -> int | None:
        return None

    def report(self) -> dict[str, Any] | None:
        return None


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 120.0) -> Any:
    """Its fleet trains the real model on LiteRT: waits are long, and polled less often."""
    return agent_network.wait_for(what, predicate, timeout, poll_s=0.05)


running = partial(run_in_thread, what="the service")


def payloads(messages: list[RecordedMessage], topic: str) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in messages if m.topic == topic and m.payload]


def agent(fleet: FleetFiles, env: dict[str, str]) -> AgentService:
    return AgentService(build_agent(load_agent_config(fleet.agent_configs[DEVICE], env), SubjectData()))


def run_fleet(
    root: Path, name: str, broker: MosquittoBroker, model_dir: Path, env: dict[str, str]
) -> tuple[FleetFiles, AgentService, list[RecordedMessage]]:
    """One fleet to its final model; the agent (stopped) and every message of the fleet."""
    fleet = create_fleet(root / name, name, model_dir, broker.url, {DEVICE: SUBJECT}, ROUNDS)
    device = agent(fleet, env)
    topics = FleetTopics(name)
    with TrafficRecorder.for_broker(broker, topic_filter=f"{topics.base}/#") as recorder:
        with running(device.run, device.request_stop):
            aggregator = AggregatorService(load_aggregator_config(fleet.aggregator_config, {}))
            with running(aggregator.run, aggregator.request_stop):
                wait_for(
                    "the final model", lambda: device.current and device.current.version == FINAL_VERSION
                )
                if device.personal is not None:
                    wait_for(
                        "a personal prediction of the final model",
                        lambda: any(
                            p["personal_version"] == FINAL_VERSION
                            for p in payloads(recorder.messages, topics.insight(DEVICE))
                        ),
                    )
                wait_for("an empty outbox", lambda: device.outbox.stats().pending == 0)
        return fleet, device, recorder.messages


def opened_updates(
    fleet: FleetFiles, messages: list[RecordedMessage]
) -> list[tuple[str, dict[str, Any], bytes]]:
    """The device's sealed updates as the aggregator opens them: (round, payload header, body)."""
    topic = FleetTopics(fleet.root.name).update(DEVICE)
    opened = []
    for m in messages:
        if m.topic != topic:
            continue
        header, ciphertext = read_header(m.payload)
        if header.kind != "update":
            continue
        payload_header, body = open_sealed(
            header, ciphertext, fleet.box_key, fleet.device_keys[DEVICE].public_key
        )
        opened.append((header.round_id, payload_header, body))
    return opened


@pytest.fixture
def fleets(
    tmp_path: Path, mosquitto: MosquittoBroker, har_model_dir: Path
) -> dict[str, tuple[FleetFiles, AgentService, list[RecordedMessage]]]:
    return {
        "off": run_fleet(tmp_path, "pers-off", mosquitto, har_model_dir, INSIGHT),
        "on": run_fleet(tmp_path, "pers-on", mosquitto, har_model_dir, {**INSIGHT, **PERSONAL}),
    }


def test_a_personalised_agent_sends_the_same_updates_predicts_with_its_own_weights_and_keeps_them(
    fleets: dict[str, tuple[FleetFiles, AgentService, list[RecordedMessage]]],
    mosquitto: MosquittoBroker,
    har_task: TaskSpec,
    caplog: pytest.LogCaptureFixture,
) -> None:
    doc = load_document()
    off_fleet, off_agent, off_messages = fleets["off"]
    fleet, device, messages = fleets["on"]
    topics = FleetTopics(fleet.root.name)

    # The federated update: the same with personalisation on and off, in both train rounds.
    on_updates, off_updates = opened_updates(fleet, messages), opened_updates(off_fleet, off_messages)
    assert [u[0] for u in on_updates] == ["r0001-v2", "r0002-v3"]
    assert [(u[0], u[1]) for u in on_updates] == [(u[0], u[1]) for u in off_updates]  # examples, loss, eval
    assert [u[2] for u in on_updates] == [u[2] for u in off_updates]  # the encoded deltas, byte for byte
    assert off_agent.personal is None and not (off_agent.config.state_dir / PERSONAL_FILE).exists()

    # Predictions: marked personal, with the global version and the personal weights' version.
    insights = payloads(messages, topics.insight(DEVICE))
    for p in insights:
        doc.channels["insight"].validate(topics.insight(DEVICE), json.dumps(p).encode())
    personal = [p for p in insights if p["personal"]]
    assert personal and all(p["personal_version"] <= p["model"]["version"] for p in personal)
    assert {p["model"]["version"] for p in personal} >= {FINAL_VERSION}
    off_insights = payloads(off_messages, FleetTopics("pers-off").insight(DEVICE))
    assert off_insights and all("personal" not in p for p in off_insights)  # as before personalisation
    assert all(isinstance(p["personal"], bool) for p in insights)  # on: every prediction says which
    last = personal[-1]
    assert (last["personal"], last["model"]["version"], last["personal_version"]) == (True, 4, 4)

    # The status: global vs personal accuracy on the held-out part, and the sample counts.
    statuses = payloads(messages, topics.status(DEVICE))
    for s in statuses:
        doc.channels["deviceStatus"].validate(topics.status(DEVICE), json.dumps(s).encode())
    status = [s for s in statuses if (s["personalisation"] or {}).get("personal_version") == FINAL_VERSION][
        -1
    ]
    report = status["personalisation"]
    assert report == device.personal.report() if device.personal is not None else False
    x, y = SubjectData().training_data(har_task)
    data = split_holdout(x, y, device.config.data.holdout_fraction, device.config.data.seed)
    assert report["personal_version"] == FINAL_VERSION and report["epochs"] == 5
    assert report["holdout_samples"] == status["holdout_samples"] == data.x_holdout.shape[0] > 0
    assert report["trained_examples"] == status["samples"] == data.x_train.shape[0]
    assert report["metric"] == "accuracy" and 0 <= report["global"] <= 1 and 0 <= report["personal"] <= 1
    assert 0 < report["seconds"] < 60
    assert all(
        s["personalisation"] is None for s in payloads(off_messages, FleetTopics("pers-off").status(DEVICE))
    )
    print(
        f"\nsubject {SUBJECT}, v{FINAL_VERSION}: {report['trained_examples']} trained, "
        f"{report['holdout_samples']} held out (random split); accuracy global {report['global']:.3f}, "
        f"personal {report['personal']:.3f}; fine-tune {report['epochs']} epochs "
        f"{report['seconds'] * 1000:.1f} ms"
    )

    # The personal weights: in the state dir, tied to the final model, not the global weights,
    # which the trainer holds (the next round would start from them).
    stored = PersonalStore(device.config.state_dir / PERSONAL_FILE).load()
    assert stored is not None and device.personal is not None and stored == device.personal.weights
    assert device.trainer is not None and device.current is not None
    global_weights = device.trainer.get_weights()
    assert stored.global_weights_sha256 == device.current.weights_sha256
    assert hashlib.sha256(weights_to_bytes(global_weights)).hexdigest() == device.current.weights_sha256
    assert not np.array_equal(stored.values, global_weights)
    assert (stored.model_sha256, stored.global_version) == (device.current.model_sha256, FINAL_VERSION)

    # Restarted on the same state dir (the final manifest is retained): it predicts with the
    # stored personal weights at once and does not fine-tune the final model again.
    with (
        caplog.at_level(logging.INFO, "fedge.agent"),
        TrafficRecorder.for_broker(mosquitto, topic_filter=topics.insight(DEVICE)) as recorder,
    ):
        restarted = agent(fleet, {**INSIGHT, **PERSONAL})
        assert restarted.personal is not None and restarted.personal.weights == stored
        started = time.time()
        with running(restarted.run, restarted.request_stop):
            fresh = wait_for(
                "a prediction after the restart",
                lambda: [
                    p
                    for p in payloads(recorder.messages, topics.insight(DEVICE))
                    if p["published_at"] > started
                ],
                60,
            )
        assert (fresh[0]["personal"], fresh[0]["personal_version"]) == (True, FINAL_VERSION)  # the first one
        assert restarted.personal.weights is not None
        assert restarted.personal.weights.values.tobytes() == stored.values.tobytes()
    assert "personal weights fine-tuned" not in caplog.text
    assert restarted.personal.report() == report
