"""The EdgeX data path end to end: simulator -> Mosquitto -> agent process -> store.

Real broker, real agent process, real core-data double over HTTP. The oracle is a
SampleBuilder fed the same readings in one go: after an outage and a backfill, the agent's
store must hold exactly the oracle's samples, none missing and none twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from fedge.agent.edgex.ingest import task_key
from fedge.agent.edgex.samples import SampleBuilder
from fedge.agent.edgex.wire import FLOAT_STYLE_BY_VERSION, event_to_dto
from fedge.agent.sample_store import SampleStore
from fedge.lab import har_watch
from fedge.lab.broker import MosquittoBroker
from fedge.lab.edgex_core_data_server import CoreDataServer
from fedge.lab.edgex_simulate import EdgeXPublisher, SimulateOptions, replay_events
from fedge.lab.provision import render_toml, write_private
from fedge.protocol.sealing import key_to_text
from fedge.protocol.signing import signing_key_to_text
from fedge.protocol.task import TaskSpec
from support.mqtt_fixtures import TrafficRecorder
from support.source_tree import PYTHONPATH as SOURCE_PYTHONPATH

pytest_plugins = ("support.mqtt_fixtures",)
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TASK = REPO / "tasks" / "har-watch.toml"
PROFILE = REPO / "edgex_profiles" / "wearable-imu.yaml"
STATUS = "fedge/v1/edgex-e2e/status/watch-01"


def _agent_config(root: Path, broker: MosquittoBroker, core_data_url: str | None) -> Path:
    key = PrivateKey.generate()
    write_private(root / "device.box", key_to_text(key))
    edgex: dict[str, object] = {"profile": str(PROFILE)}
    if core_data_url is not None:
        edgex["core_data"] = core_data_url
    tables: dict[str, dict[str, object]] = {
        "agent": {
            "device_id": "watch-01",
            "fleet": "edgex-e2e",
            "state_dir": "state",
            "key_file": "device.box",
            "aggregator_public_key": key_to_text(PrivateKey.generate().public_key),
            "aggregator_verify_keys": [signing_key_to_text(SigningKey.generate().verify_key)],
            "status_interval_s": 0.5,
        },
        "mqtt": {"broker": broker.url},
        "data": {"source": "edgex", "task": str(TASK)},
        "edgex": edgex,
    }
    path = root / "agent.toml"
    path.write_text(render_toml(tables))
    return path


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


def _data(recorder: TrafficRecorder) -> dict[str, object]:
    for m in reversed(recorder.messages):
        if m.topic == STATUS and m.payload:
            report = json.loads(m.payload).get("data")
            return report if isinstance(report, dict) else {}
    return {}


@pytest.fixture()
def recorder(mosquitto: MosquittoBroker) -> Iterator[TrafficRecorder]:
    with TrafficRecorder.for_broker(mosquitto, topic_filter="fedge/#") as rec:
        yield rec


def test_an_outage_then_backfill_loses_and_duplicates_no_sample(
    tmp_path: Path, mosquitto: MosquittoBroker, recorder: TrafficRecorder, har_task: TaskSpec
) -> None:
    options = SimulateOptions(broker_url=mosquitto.url, subjects=(1,), max_rows=2600, version="v3")
    stream, _, _ = replay_events(options)
    events = list(stream)
    half = len(events) // 2
    oracle = SampleBuilder(har_task, device="watch-01")
    expected = oracle.add(r for e in events for r in e.readings) + oracle.flush()
    assert len(expected) > 40

    with CoreDataServer() as core_data:
        config = _agent_config(tmp_path, mosquitto, core_data.url)
        log = tmp_path / "agent.log"
        agent = _start_agent(config, log)
        try:
            recorder.wait_for(lambda ms: bool(_data(recorder).get("bus_connected")), 60, "agent on the bus")
            style = FLOAT_STYLE_BY_VERSION["v3"]
            with EdgeXPublisher(options) as publisher:
                for event in events[:half]:
                    core_data.add_event(event_to_dto(event, style))  # core-data keeps every event
                    publisher.publish(event)
            recorder.wait_for(
                lambda ms: int(_data(recorder).get("stored_samples", 0)) >= 10, 30, "some samples"
            )
            agent.send_signal(signal.SIGKILL)  # the device dies mid-stream...
            agent.wait(10)
            with EdgeXPublisher(options) as publisher:  # ...while its sensor keeps publishing
                for event in events[half:]:
                    core_data.add_event(event_to_dto(event, style))
                    publisher.publish(event)
            agent = _start_agent(config, log)  # back: backfills from core-data
            recorder.wait_for(
                lambda ms: (
                    int(_data(recorder).get("stored_samples", 0)) >= len(expected)
                    and int(_data(recorder).get("backfilled_readings", 0)) > 0
                ),
                60,
                "the backfilled samples",
            )
            time.sleep(1.5)  # let a (wrong) surplus show up in the next status before we look
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(20)
    report = _data(recorder)
    with SampleStore(tmp_path / "state" / "samples.sqlite", 10**6, 10**9) as store:
        x, y = store.load(task_key(har_task))
    assert x.shape == (len(expected), har_task.input_dim), log.read_text()[-2000:]
    np.testing.assert_allclose(x, np.stack([s.features for s in expected]), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(y, np.array([s.label for s in expected]))
    assert report["stored_samples"] == len(expected)


def test_tap_prints_what_the_agent_parses_for_every_wire_format(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    rows = 3
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = SOURCE_PYTHONPATH
    variants = [("v3", "application/json"), ("v4", "application/json"), ("v4", "application/cbor")]
    per_variant = rows * (len(har_watch.RESOURCES) + 1)
    tap = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedge.cli",
            "edgex",
            "tap",
            "--broker",
            mosquitto.url,
            "--json",
            "--count",
            str(per_variant * len(variants)),
            "--timeout",
            "60",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO,
        text=True,
    )
    try:
        time.sleep(2.0)  # tap subscribes (it has no persistent session, by design)
        for version, content_type in variants:
            opts = SimulateOptions(
                broker_url=mosquitto.url,
                subjects=(2,),
                max_rows=rows,
                version=version,
                content_type=content_type,
                batch_rows=rows,
            )
            events, _, _ = replay_events(opts)
            with EdgeXPublisher(opts) as publisher:
                for event in events:
                    publisher.publish(event)
        out, err = tap.communicate(timeout=90)
    finally:
        if tap.poll() is None:
            tap.kill()
    assert tap.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == per_variant * len(variants)
    first_recording = next(r for r in har_watch.load_recordings() if r.subject == 2)
    for v in range(len(variants)):
        chunk = lines[v * per_variant : (v + 1) * per_variant]
        accel = [r["value"] for r in chunk if r["resource"] == "accel_x"]
        assert accel == pytest.approx(list(first_recording.readings[:rows, 0]), rel=1e-6)
        assert {r["valueType"] for r in chunk} == {"Float32", "String"}
        assert {r["value"] for r in chunk if r["resource"] == "activity"} == {
            har_watch.CLASSES[first_recording.label]
        }
        assert all(r["device"] == "watch-02" and isinstance(r["origin"], int) for r in chunk)
    assert '"malformed": {}' in err
