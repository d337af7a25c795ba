"""Live predictions end to end: EdgeX readings -> a real agent process -> ``insight/{device}``.

Real Mosquitto, a real ``fedge agent run`` reading EdgeX events from the bus, the session's real
model (built with TensorFlow) run by the agent in its LiteRT interpreter. The aggregator's side
is the real round engine with the fleet's real keys, publishing a signed train-phase manifest and
its blobs as the aggregator service does. The agent's ``[insight]`` settings are the deployment
defaults (no ``[insight]`` table). The readings carry no label: predictions do not need one.

The oracle is the same global model, run offline in a LiteRT interpreter of the test's own on the
features a (labelled) sample builder computes from the same readings.
"""

from __future__ import annotations

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

from fedge.agent.edgex.readings import Event
from fedge.agent.edgex.samples import SampleBuilder
from fedge.agent.trainer import LiteRTTrainer, load_model_dir
from fedge.aggregator.config import load_aggregator_config
from fedge.aggregator.service import AggregatorService
from fedge.lab import har_watch
from fedge.lab.broker import MosquittoBroker
from fedge.lab.edgex_simulate import EdgeXPublisher, SimulateOptions, replay_events
from fedge.lab.provision import create_fleet
from fedge.protocol.model_manifest import Normalisation
from fedge.protocol.round_manifest import RoundManifest
from fedge.protocol.task import TaskSpec
from fedge.protocol.topics import FleetTopics
from fedge.protocol.weights import weights_from_bytes
from support.mqtt_fixtures import TrafficRecorder
from support.source_tree import PYTHONPATH as SOURCE_PYTHONPATH

pytest_plugins = ("support.mqtt_fixtures",)
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TASK = REPO / "tasks" / "har-watch.toml"
PROFILE = REPO / "edgex_profiles" / "wearable-imu.yaml"
FLEET = "insight-e2e"
DEVICE = "watch-01"
T = FleetTopics(FLEET)
HOUR_NS = 3600 * 10**9


def _start_agent(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = SOURCE_PYTHONPATH
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fedge.cli", "agent", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )


def _status(recorder: TrafficRecorder) -> dict[str, Any]:
    for m in reversed(recorder.messages):
        if m.topic == T.status(DEVICE) and m.payload:
            status = json.loads(m.payload)
            return status if isinstance(status, dict) else {}
    return {}


def _skipped(recorder: TrafficRecorder, reason: str) -> int:
    insights = _status(recorder).get("insights") or {}
    return int(insights.get("skipped", {}).get(reason, 0))


def _events(broker: MosquittoBroker, rows: int, start_ns: int) -> list[Event]:
    """Subject 1's first ``rows`` rows as EdgeX events from ``start_ns`` on (with labels)."""
    options = SimulateOptions(broker_url=broker.url, subjects=(1,), max_rows=rows, start_ns=start_ns)
    events, _, _ = replay_events(options)
    return list(events)


def _unlabelled(events: list[Event]) -> list[Event]:
    return [replace(e, readings=tuple(r for r in e.readings if r.resource != "activity")) for e in events]


def _publish_events(broker: MosquittoBroker, events: list[Event]) -> None:
    with EdgeXPublisher(SimulateOptions(broker_url=broker.url)) as publisher:
        for event in events:
            publisher.publish(event)


def _publish_retained(broker: MosquittoBroker, messages: list[tuple[str, bytes]]) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-aggregator")
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        for topic, payload in messages:
            client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def _bms_reads_retained(
    broker: MosquittoBroker, topic_filter: str, timeout: float = 10.0
) -> mqtt.MQTTMessage:
    """A plain paho subscriber, connecting after the fact: the retained insight is there."""
    got: list[mqtt.MQTTMessage] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bms-1")
    client.on_connect = lambda c, *_: c.subscribe(topic_filter, qos=1)
    client.on_message = lambda c, u, msg: got.append(msg)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        deadline = time.monotonic() + timeout
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        client.disconnect()
        client.loop_stop()
    assert got, f"no retained message on {topic_filter}"
    return got[0]


@pytest.fixture()
def recorder(mosquitto: MosquittoBroker) -> Iterator[TrafficRecorder]:
    with TrafficRecorder.for_broker(mosquitto, topic_filter="fedge/#") as rec:
        yield rec


def _train_manifest(fleet_config: Path, task: TaskSpec) -> tuple[AggregatorService, Any]:
    """The aggregator's round engine (real keys, real model) past its moments round: a
    normalisation from subject 1's features, then a signed train-phase manifest."""
    aggregator = AggregatorService(load_aggregator_config(fleet_config, {}))
    x = har_watch.load_devices(task, [1])[1].x.astype(np.float64)
    normalisation = Normalisation(tuple(x.mean(axis=0)), tuple(np.maximum(x.std(axis=0), 1e-6)))
    aggregator.engine.state = replace(aggregator.engine.state, normalisation=normalisation)
    pub = aggregator.engine.open_round(time.time())
    assert pub.manifest.phase == "train"
    return aggregator, pub


def _oracle(model_dir: Path, manifest: RoundManifest, weights: bytes) -> LiteRTTrainer:
    model, model_manifest = load_model_dir(model_dir)
    oracle = LiteRTTrainer(model, model_manifest)
    oracle.normalisation = manifest.normalisation
    oracle.set_weights(weights_from_bytes(weights, model_manifest.parameter_count))
    return oracle


def test_an_edgex_agent_publishes_the_verified_models_prediction_retained_and_nothing_before_or_stale(
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
        {"rounds": 1, "min_devices": 1},
        agent_overrides={"status_interval_s": 0.5},
        edgex={"prefix": "edgex", "profile": str(PROFILE)},
        task_file=TASK,
    )
    _, pub = _train_manifest(files.aggregator_config, har_task)
    manifest = pub.manifest
    now_ns = time.time_ns()
    before = _events(mosquitto, 400, now_ns - 3 * HOUR_NS)  # no model yet
    stale = _events(mosquitto, 400, now_ns - 2 * HOUR_NS)  # a model, but 2 h old: stale
    fresh = _events(mosquitto, 600, now_ns - 14 * 10**9)  # the last 14 s: published

    log = tmp_path / "agent.log"
    agent = _start_agent(files.agent_configs[DEVICE], log)
    try:
        data = lambda: _status(recorder).get("data") or {}  # noqa: E731
        recorder.wait_for(lambda ms: bool(data().get("bus_connected")), 60, "the agent on the EdgeX bus")

        # 1. Readings, no verified model: every window is counted as no_model, nothing published.
        _publish_events(mosquitto, _unlabelled(before))
        recorder.wait_for(lambda ms: _skipped(recorder, "no_model") >= 5, 30, "windows counted as no_model")
        assert recorder.matching(T.insight_filter) == []

        # 2. The aggregator's signed manifest and blobs; the agent verifies and loads them.
        _publish_retained(mosquitto, [*pub.blobs.items(), (T.manifest, pub.manifest_frame)])
        recorder.wait_for(
            lambda ms: _status(recorder).get("model_version") == manifest.version, 60, "the manifest verified"
        )

        # 3. Old readings: a verified model, but the windows are stale.
        _publish_events(mosquitto, _unlabelled(stale))
        recorder.wait_for(lambda ms: _skipped(recorder, "stale") >= 5, 30, "windows counted as stale")
        assert recorder.matching(T.insight_filter) == []

        # 4. Fresh readings: the prediction is published, retained.
        _publish_events(mosquitto, _unlabelled(fresh))
        recorder.wait_for_count(T.insight_filter, 1, 30)
        recorder.wait_for(
            lambda ms: _skipped(recorder, "rate_limited") >= 1, 30, "later windows rate-limited (60 s)"
        )
        time.sleep(1.0)  # a second (wrong) publication would show up by now
    finally:
        agent.terminate()
        agent.wait(20)
    assert agent.returncode == 0, log.read_text()[-3000:]

    published = recorder.matching(T.insight_filter)
    assert len(published) == 1, [m.payload for m in published]  # on_change, at most one a minute
    message = published[0]
    assert message.topic == T.insight(DEVICE) and message.qos == 1 and message.retain
    payload = json.loads(message.payload.decode("utf-8"))

    # A BMS connecting now gets the same prediction, retained.
    retained = _bms_reads_retained(mosquitto, T.insight_filter)
    assert retained.retain and json.loads(retained.payload) == payload

    assert set(payload) == {
        "schema",
        "device_id",
        "fleet",
        "window",
        "published_at",
        "model",
        "task",
        "prediction",
        "source",
    }
    assert (payload["schema"], payload["device_id"], payload["fleet"]) == ("fedge.insight/1", DEVICE, FLEET)
    assert payload["model"] == {
        "version": manifest.version,
        "generation": 1,  # the first generation: absent from the signed manifest, 1
        "round_id": manifest.round_id,
        "sha256": manifest.model_sha256,
    }
    assert payload["task"] == {"name": "har-watch", "kind": "classification"}
    assert payload["source"] == {"edgex_device": DEVICE, "resources": list(har_task.features.resources)}
    start, end = payload["window"]["start"], payload["window"]["end"]
    assert end - start == pytest.approx(99 / 50, abs=1e-3)
    assert fresh[0].origin_ns / 1e9 <= start and end <= time.time()
    assert 0 <= payload["published_at"] - end < 60

    # The oracle: the same window of the same readings, the same global model, offline.
    builder = SampleBuilder(har_task, device=DEVICE)
    samples = builder.add(r for e in fresh for r in e.readings) + builder.flush()
    sample = min(samples, key=lambda s: abs(s.start_ns / 1e9 - start))
    assert abs(sample.start_ns / 1e9 - start) < 1e-3 and abs(sample.end_ns / 1e9 - end) < 1e-3
    weights = pub.blobs[T.blob(manifest.weights_sha256)]
    probabilities = _oracle(har_model_dir, manifest, weights).predict(sample.features.reshape(1, -1))[0]
    classes = list(har_task.label.classes or ())
    prediction = payload["prediction"]
    assert prediction["class_index"] == int(np.argmax(probabilities))
    assert prediction["label"] == classes[prediction["class_index"]]
    assert list(prediction["probabilities"]) == classes
    np.testing.assert_allclose(
        list(prediction["probabilities"].values()), probabilities, rtol=1e-5, atol=1e-6
    )

    # The status counted every window: none published before the model or from stale data.
    insights = _status(recorder)["insights"]
    assert insights["published"] == 1
    assert insights["last"]["label"] == prediction["label"]
    assert insights["last"]["model_version"] == manifest.version
    assert insights["skipped"]["no_model"] >= 5 and insights["skipped"]["stale"] >= 5
    assert insights["skipped"]["error"] == 0 and insights["skipped"]["offline"] == 0
    assert "insight: a prediction was not published (no_model)" in log.read_text()
    assert "[insight] stale_after_s" in log.read_text()
