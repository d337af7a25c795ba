"""The rollout gate end to end (issue 19, part 3): a worse global model reaches training but not
predictions; an operator's rollback with ``fedge model rollback`` is accepted; an old promotion
replayed is refused and counted.

Real Mosquitto, a real ``fedge agent run`` process (the har-watch lab source, whose live windows
it predicts on), the aggregator's real round engine and real :class:`Rollout` with the fleet's
real keys, publishing what the aggregator service publishes, in its order: a round's blobs and
manifest (never clearing the promoted weights' blob), then the gate's decision. The gate's inputs
are the federated evaluations a round would report; the worse candidate is a poisoned model (its
weights pushed far off), judged worse as a fleet's evaluation of it would be. The rollback goes
through the real CLI, which the test's aggregator loop answers as the service's loop does.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fedge.aggregator.config import load_aggregator_config
from fedge.aggregator.rollout import Candidate, RolloutPublication
from fedge.aggregator.round_engine import Publication
from fedge.aggregator.service import AggregatorService
from fedge.lab import har_watch
from fedge.lab.broker import MosquittoBroker
from fedge.lab.provision import create_fleet
from fedge.protocol.model_manifest import Normalisation
from fedge.protocol.rollout import verify_decision
from fedge.protocol.signing import key_id
from fedge.protocol.task import TaskSpec
from fedge.protocol.topics import FleetTopics
from support.asyncapi import load_document
from support.fleet_harness import Fleet, latest_status
from support.mqtt_fixtures import TrafficRecorder
from support.source_tree import PYTHONPATH as SOURCE_PYTHONPATH

pytest_plugins = ("support.mqtt_fixtures",)
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
FLEET = "rollout-e2e"
DEVICE = "watch-01"
T = FleetTopics(FLEET)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = SOURCE_PYTHONPATH
    return env


def _status(recorder: TrafficRecorder) -> dict[str, Any]:
    for m in reversed(recorder.messages):
        if m.topic == T.status(DEVICE) and m.payload:
            status = json.loads(m.payload)
            return status if isinstance(status, dict) else {}
    return {}


def _rollout(recorder: TrafficRecorder) -> dict[str, Any]:
    return _status(recorder).get("rollout") or {}


class Publisher:
    """The aggregator's publications, retained, QoS 1, acknowledged before the next."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-aggregator")
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def send(self, messages: list[tuple[str, bytes]] | tuple[tuple[str, bytes], ...]) -> None:
        for topic, payload in messages:
            self.client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture()
def recorder(mosquitto: MosquittoBroker) -> Iterator[TrafficRecorder]:
    with TrafficRecorder.for_broker(mosquitto, topic_filter="fedge/#") as rec:
        yield rec


def test_a_worse_model_is_refused_for_predictions_a_rollback_is_taken_and_a_replay_refused(
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    recorder: TrafficRecorder,
    har_model_dir: Path,
    har_task: TaskSpec,
) -> None:
    files = create_fleet(
        tmp_path / "fleet",
        FLEET,
        har_model_dir,
        mosquitto.url,
        {DEVICE: 1},
        {"rounds": 50, "min_devices": 1},
        agent_overrides={"status_interval_s": 0.5},
    )
    config_path = files.agent_configs[DEVICE]
    with config_path.open("a") as f:  # every live window predicted and published
        f.write('\n[insight]\npublish = "every_window"\nmin_interval_s = 0\nstale_after_s = 0\n')
    service = AggregatorService(load_aggregator_config(files.aggregator_config, {}))
    assert service.rollout.enabled  # the deployment default: no [rollout] table in the config
    engine = service.engine
    x = har_watch.load_devices(har_task, [1])[1].x.astype(np.float64)
    normalisation = Normalisation(tuple(x.mean(axis=0)), tuple(np.maximum(x.std(axis=0), 1e-6)))
    engine.state = replace(engine.state, normalisation=normalisation)
    publisher = Publisher(mosquitto)
    asyncapi = load_document()

    def announce(pub: Publication) -> None:
        """As AggregatorService._announce: blobs, manifest, then clears (not the promoted blob)."""
        publisher.send([*pub.blobs.items(), (T.manifest, pub.manifest_frame)])
        publisher.send([(t, b"") for t in pub.clear_blobs if t != service.rollout.kept_blob_topic()])

    def judge(pub: Publication, value: float) -> RolloutPublication:
        m = pub.manifest
        weights = pub.blobs[T.blob(m.weights_sha256)]
        candidate = Candidate(
            m.version, m.round_id, m.weights_sha256, m.weights_bytes, 1, m.model_sha256, value
        )
        decided = service.rollout.judge(
            candidate, weights, engine.state.published_weights_sha256, time.time()
        )
        assert decided is not None
        publisher.send(decided.items)
        return decided

    def predicting(version: int, what: str, **rollout: Any) -> None:
        recorder.wait_for(
            lambda ms: (
                _rollout(recorder).get("predicting_version") == version
                and all(_rollout(recorder).get(k) == v for k, v in rollout.items())
            ),
            60,
            what,
        )

    agent = subprocess.Popen(
        [sys.executable, "-m", "fedge.cli", "agent", "run", "--config", str(config_path)],
        stdout=(tmp_path / "agent.log").open("ab"),
        stderr=subprocess.STDOUT,
        env=_env(),
        cwd=REPO,
    )
    try:
        # v1: the first trained model. Before any decision, predictions use it as they always did.
        pub1 = engine.open_round(time.time())
        announce(pub1)
        predicting(1, "predictions with v1 before any promotion", sequence=0)
        # Its evaluation (a round's reports on it) promotes it: the first of its generation.
        promote1 = judge(pub1, 0.62)
        predicting(1, "v1 promoted", sequence=1, action="promote", promoted_version=1)

        # v2: a poisoned round's model, far off. Devices install it and train on it ...
        rng = np.random.default_rng(7)
        engine.state.weights = (engine.state.weights + rng.normal(0, 5.0, engine.state.weights.shape)).astype(
            np.float32
        )
        pub2 = engine.open_round(time.time())
        announce(pub2)
        recorder.wait_for(lambda ms: _status(recorder).get("model_version") == 2, 60, "v2 installed")
        # ... but its evaluation is worse beyond the margin: refused, predictions stay on v1.
        refused = judge(pub2, 0.15)
        assert [t for t, _ in refused.items] == [T.rollout_decision]
        time.sleep(2.0)  # several statuses and predictions with v2 installed
        assert _rollout(recorder)["predicting_version"] == 1 and _status(recorder)["model_version"] == 2
        with_v2 = [
            json.loads(m.payload)
            for m in recorder.matching(T.insight(DEVICE))
            if json.loads(m.payload)["model"]["version"] == 2
        ]
        assert with_v2 and all(p["rollout"] == {"version": 1, "sequence": 1} for p in with_v2)
        status = service.status()
        assert (status["rollout"]["promoted_version"], status["rollout"]["refused"]) == (1, 1)
        assert status["rollout"]["last_decision"]["action"] == "refuse"
        asyncapi.channels["aggregatorStatus"].validate(T.aggregator_status, json.dumps(status).encode())

        # v3: a good model again (v1's weights nudged), evaluated better: promoted, fetched, used.
        engine.state.weights = (
            np.frombuffer(pub1.blobs[T.blob(pub1.manifest.weights_sha256)], "<f4") + 0.001
        ).astype(np.float32)
        pub3 = engine.open_round(time.time())
        announce(pub3)
        promote3 = judge(pub3, 0.66)
        assert (T.blob(pub1.manifest.weights_sha256), b"") in promote3.items  # v1's blob cleared
        predicting(3, "v3 promoted", sequence=3, action="promote", promoted_version=3)

        # The operator rolls back to v1 with one command; the running aggregator carries it out.
        cli = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedge.cli",
                "model",
                "rollback",
                "--config",
                str(files.aggregator_config),
                "--to",
                "1",
                "--wait-s",
                "60",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=_env(),
            cwd=REPO,
        )
        deadline = time.monotonic() + 60
        rollback = None
        while rollback is None and time.monotonic() < deadline and cli.poll() is None:
            state = engine.state
            rollback = service.rollout.take_request(
                state.generation, engine.model_sha256, state.published_weights_sha256, time.time()
            )
            time.sleep(0.1)
        assert rollback is not None, cli.communicate()[0]
        publisher.send(rollback.items)  # v1's weights again (from the kept copy), then the decision
        out, _ = cli.communicate(timeout=60)
        assert cli.returncode == 0, out
        assert "rolled back to v1 (signed decision 4, was v3)" in out.decode()
        predicting(1, "the rollback to v1 taken", sequence=4, action="rollback", promoted_version=1)

        # Someone replays the old promotion of v3 (a recorded, validly signed frame): refused, counted.
        publisher.send([(T.rollout, dict(promote3.items)[T.rollout])])
        recorder.wait_for(
            lambda ms: _rollout(recorder).get("refused", {}).get("replayed") == 1, 60, "the replay counted"
        )
        time.sleep(1.0)
        assert _rollout(recorder)["predicting_version"] == 1 and _rollout(recorder)["sequence"] == 4
        # Fetched weights are unsubscribed: republished blobs are nothing the device did not want.
        assert "blob_unwanted" not in _status(recorder)["messages_dropped"]
        assert promote1.items  # (v1's first promotion stays in the record: decision 1)
    finally:
        agent.terminate()
        agent.wait(20)
        publisher.close()
    log = (tmp_path / "agent.log").read_text()
    assert agent.returncode == 0, log[-3000:]
    assert "rollout: decision 3 (promote v3) refused: this device accepted decision 4 already" in log
    for m in recorder.matching(T.status(DEVICE)):
        asyncapi.channels["deviceStatus"].validate(m.topic, m.payload)
    for m in recorder.matching(T.insight(DEVICE)):
        asyncapi.channels["insight"].validate(m.topic, m.payload)


def test_the_aggregator_service_gates_its_rounds_and_devices_predict_with_the_promoted_model(
    tmp_path: Path, mosquitto: MosquittoBroker, recorder: TrafficRecorder, har_model_dir: Path
) -> None:
    """The real ``fedge aggregator run`` and three real agents, the deployment defaults: every
    train round's evaluation judges the model its manifest carried, and what it promoted is what
    the devices predict with, its weights retained on the broker for devices that come later."""
    fleet = Fleet(tmp_path / "fleet", mosquitto.url, har_model_dir, 3, {"rounds": 3, "min_devices": 3})
    try:
        for device in fleet.files.agent_configs:
            fleet.start_agent(device)
        fleet.start_aggregator()
        assert fleet.wait_exit("aggregator", 180) == 0, fleet.log("aggregator")
        status = latest_status(recorder.messages, fleet.topics.aggregator_status)
        rollout = status["rollout"]
        # Versions: 1 moments, 2..4 train (judged: the weights each carried), 5 final (not judged).
        assert rollout["sequence"] == 3 and rollout["promoted"] + rollout["refused"] == 3, rollout
        promoted = rollout["promoted_version"]
        assert promoted in (2, 3, 4) and rollout["kept_versions"][-1] == promoted
        for device in fleet.files.agent_configs:
            topic = fleet.topics.status(device)
            recorder.wait_for(
                lambda ms, t=topic: (
                    (latest_status(ms, t).get("rollout") or {}).get("predicting_version") == promoted
                ),
                60,
                f"{device} predicting with v{promoted}",
            )
    finally:
        fleet.stop_all()
    frames = [m for m in recorder.matching(fleet.topics.rollout) if m.payload]
    trusted = {key_id(fleet.files.signing_key.verify_key): fleet.files.signing_key.verify_key}
    decision = verify_decision(frames[-1].payload, trusted, fleet.topics.fleet)
    assert (decision.promoted_version, decision.action) == (promoted, "promote")
    kept = recorder.matching(fleet.topics.blob(str(decision.weights_sha256)))
    assert kept and hashlib.sha256(kept[-1].payload).hexdigest() == decision.weights_sha256  # never cleared
    assert "rollout: promoted v2 (the first evaluated model of its generation)" in fleet.log("aggregator")
