"""Raw windows end to end from EdgeX: tasks/har-watch-raw.toml on a real fleet.

Real Mosquitto, a real aggregator process and two real agent processes (``fedge ... run``) whose
data source is EdgeX: the simulator publishes two subjects' recordings as EdgeX events on the
broker, each agent builds raw-window samples (600 readings each) into its sample store, and the
fleet runs a moments round and two training rounds of the task's MLP (built with TensorFlow by
the session's ``build_model_dir``), trained on the devices in LiteRT. Then fresh readings give a
prediction on ``insight/{device}`` from a raw window.

The oracle for the stored samples is a SampleBuilder fed the same events in one go.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedge.agent.edgex.readings import Event
from fedge.agent.edgex.samples import SampleBuilder
from fedge.lab.broker import MosquittoBroker
from fedge.lab.edgex_simulate import EdgeXPublisher, SimulateOptions, replay_events
from fedge.lab.provision import create_fleet
from fedge.protocol.model_manifest import INITIAL_WEIGHTS_FILE
from fedge.protocol.task import TaskSpec, parse_task_spec
from fedge.protocol.topics import FleetTopics
from fedge.protocol.weights import weights_from_bytes
from support.fleet_harness import FLEET, Fleet, device_subjects, latest_status
from support.mqtt_fixtures import TrafficRecorder

pytest_plugins = ("support.mqtt_fixtures",)
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RAW_TASK = REPO / "tasks" / "har-watch-raw.toml"
PROFILE = REPO / "edgex_profiles" / "wearable-imu.yaml"
ROWS = 3000  # per device: the first two recordings, 57 raw windows (30 + 27 and 47 + 10)
HOUR_NS = 3600 * 10**9


class EdgeXFleet(Fleet):
    """The harness's fleet, provisioned to read EdgeX from the fleet's broker for ``task_file``
    (what ``fedge demo`` does) instead of reading the data set directly."""

    def __init__(
        self,
        root: Path,
        broker_url: str,
        model_dir: Path,
        devices: int,
        rounds: dict[str, object],
        task_file: Path = RAW_TASK,
    ):
        self.files = create_fleet(
            root,
            FLEET,
            model_dir,
            broker_url,
            device_subjects(devices),
            {"wait_for_devices_s": 20.0, **rounds},
            agent_overrides={"status_interval_s": 0.5},
            edgex={"prefix": "edgex", "profile": str(PROFILE)},
            task_file=task_file,
        )
        self.root = root
        self.topics = FleetTopics(FLEET)
        self.procs = {}
        self.aggregator_env = {}


@pytest.fixture(scope="module")
def raw_task() -> TaskSpec:
    return parse_task_spec(RAW_TASK.read_text())


@pytest.fixture()
def recorder(mosquitto: MosquittoBroker) -> Iterator[TrafficRecorder]:
    with TrafficRecorder.for_broker(mosquitto, topic_filter="fedge/#") as rec:
        yield rec


def _events(broker: MosquittoBroker, subjects: tuple[int, ...], rows: int, start_ns: int) -> list[Event]:
    options = SimulateOptions(broker_url=broker.url, subjects=subjects, max_rows=rows, start_ns=start_ns)
    events, _, _ = replay_events(options)
    return list(events)


def _publish(broker: MosquittoBroker, events: list[Event]) -> None:
    with EdgeXPublisher(SimulateOptions(broker_url=broker.url)) as publisher:
        for event in events:
            publisher.publish(event)


def _device(recorder: TrafficRecorder, fleet: Fleet, device: str) -> Callable[[], dict[str, object]]:
    return lambda: latest_status(recorder.messages, fleet.topics.status(device))


def test_two_edgex_agents_train_two_rounds_on_raw_windows_and_predict_from_one(
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    recorder: TrafficRecorder,
    build_model_dir: Callable[[TaskSpec], Path],
    raw_task: TaskSpec,
) -> None:
    model_dir = build_model_dir(raw_task)
    fleet = EdgeXFleet(tmp_path / "fleet", mosquitto.url, model_dir, 2, {"rounds": 2, "min_devices": 2})
    devices = list(fleet.files.agent_configs)
    assert devices == ["watch-01", "watch-02"]
    events = _events(mosquitto, (1, 2), ROWS, time.time_ns() - HOUR_NS)
    expected: dict[str, int] = {}
    for device in devices:
        oracle = SampleBuilder(raw_task, device=device)
        samples = oracle.add(r for e in events if e.device == device for r in e.readings) + oracle.flush()
        assert all(s.features.shape == (600,) for s in samples)
        expected[device] = len(samples)
    assert expected == {"watch-01": 57, "watch-02": 57}

    try:
        for device in devices:
            fleet.start_agent(device)
        for device in devices:
            data = lambda d=device: _device(recorder, fleet, d)().get("data") or {}  # noqa: E731
            recorder.wait_for(
                lambda ms, data=data: bool(data().get("bus_connected")), 60, f"{device} on EdgeX"
            )
        _publish(mosquitto, events)
        for device in devices:
            data = lambda d=device: _device(recorder, fleet, d)().get("data") or {}  # noqa: E731
            recorder.wait_for(
                lambda ms, data=data, n=expected[device]: int(data().get("stored_samples", 0)) >= n,
                60,
                f"{device}'s raw windows stored",
            )

        fleet.start_aggregator()
        assert fleet.wait_exit("aggregator", 180) == 0, fleet.log("aggregator")
        for device in devices:  # version 4: the moments round, two rounds, the final model
            recorder.wait_for(
                lambda ms, d=device: _device(recorder, fleet, d)().get("model_version") == 4,
                60,
                f"{device} on the final model",
            )

        # Fresh readings (no label) after the model: a prediction from a raw window.
        fresh = _events(mosquitto, (1,), 400, time.time_ns() - 10 * 10**9)
        _publish(
            mosquitto,
            [replace(e, readings=tuple(r for r in e.readings if r.resource != "activity")) for e in fresh],
        )
        [insight] = recorder.wait_for_count(fleet.topics.insight_filter, 1, 60)[-1:]
    finally:
        fleet.stop_all()

    status = latest_status(recorder.messages, fleet.topics.aggregator_status)
    assert status["state"] == "done" and status["completed_rounds"] == 2, status
    assert status["rejected_total"] == {}
    for device in devices:
        data = _device(recorder, fleet, device)().get("data") or {}
        assert isinstance(data, dict)
        assert data["stored_samples"] == expected[device]  # none missing, none twice
        log = fleet.log(device)
        assert "Traceback" not in log, log[-3000:]

    # The manifests: a 600-input normalisation from the moments round, and weights that moved.
    manifests = fleet.manifests(recorder)
    assert [m.version for m in manifests] == [1, 2, 3, 4]
    trained = [m for m in manifests if m.normalisation is not None]
    assert trained and all(len(m.normalisation.mean) == 600 for m in trained if m.normalisation is not None)
    assert manifests[-1].model_manifest.task.sha256() == raw_task.sha256()
    [final_blob, *_] = [
        m.payload for m in recorder.matching(fleet.topics.blob(manifests[-1].weights_sha256)) if m.payload
    ]
    parameters = manifests[-1].model_manifest.parameter_count
    assert parameters == 600 * 64 + 64 + 64 * 32 + 32 + 32 * 7 + 7
    initial = np.fromfile(model_dir / INITIAL_WEIGHTS_FILE, dtype="<f4")
    final = weights_from_bytes(final_blob, parameters)
    assert np.all(np.isfinite(final)) and not np.allclose(final, initial)

    payload = json.loads(insight.payload)
    assert insight.topic == fleet.topics.insight("watch-01")
    assert payload["task"] == {"name": "har-watch-raw", "kind": "classification"}
    assert payload["model"]["version"] == 4
    assert payload["prediction"]["label"] in (raw_task.label.classes or ())
    assert payload["window"]["end"] - payload["window"]["start"] == pytest.approx(99 / 50, abs=1e-3)
