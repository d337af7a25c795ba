"""A vendor's 1D CNN on raw windows, end to end from EdgeX (issue 17): the whole path at once.

A Keras 1D CNN for the smartwatch's raw windows (100 readings x 6 resources) is trained briefly
on subject 3's recordings, imported with ``import_keras_model`` (its convolutions frozen, its two
Dense layers trainable) and given to a real Mosquitto, a real aggregator process and two real
agent processes whose data come from EdgeX events on the broker (``tasks/har-watch-raw.toml``'s
features, ``[model] type = "imported"``). The agents store raw windows, train the head in LiteRT
for two rounds, and predict from a fresh raw window. Every manifest names the imported model's
bytes (the frozen base never changes); the head moves; nothing is refused.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_raw_windows_e2e import HOUR_NS, RAW_TASK, ROWS, EdgeXFleet, _device, _events, _publish

from fedge.agent.edgex.samples import SampleBuilder
from fedge.aggregator.keras_import import import_keras_model
from fedge.aggregator.model_export import write_model
from fedge.lab.broker import MosquittoBroker
from fedge.protocol.model_manifest import INITIAL_WEIGHTS_FILE
from fedge.protocol.task import TaskSpec, parse_task_spec
from fedge.protocol.weights import weights_from_bytes
from support.fleet_harness import latest_status
from support.keras_models import keras
from support.mqtt_fixtures import TrafficRecorder

pytest_plugins = ("support.mqtt_fixtures",)
pytestmark = pytest.mark.slow

IMPORTED_MODEL = '[model]\ntype = "imported"\nkind = "classification"\n'


@pytest.fixture()
def recorder(mosquitto: MosquittoBroker) -> Iterator[TrafficRecorder]:
    with TrafficRecorder.for_broker(mosquitto, topic_filter="fedge/#") as rec:
        yield rec


def imported_task_file(tmp_path: Path) -> Path:
    """tasks/har-watch-raw.toml with ``[model] type = "imported"``: the same features and label."""
    text = RAW_TASK.read_text()
    start = text.index("\n[model]\n") + 1
    end = text.index("\n[training]\n") + 1
    assert 'type = "mlp"' in text[start:end]
    path = tmp_path / "har-watch-cnn.toml"
    path.write_text(text[:start] + IMPORTED_MODEL + "\n" + text[end:])
    return path


def vendor_cnn(task: TaskSpec, x: np.ndarray, y: np.ndarray) -> Any:
    """A small 1D CNN a vendor trained on its own data: here a few epochs on subject 3."""
    channels, length = task.features.raw_shape or (0, 0)
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((length, channels)),
            keras.layers.Conv1D(8, 5, activation="relu", name="conv1"),
            keras.layers.BatchNormalization(name="bn1"),
            keras.layers.MaxPooling1D(4, name="pool1"),
            keras.layers.Conv1D(8, 5, activation="relu", name="conv2"),
            keras.layers.GlobalAveragePooling1D(name="gap"),
            keras.layers.Dense(16, activation="relu", name="fc"),
            keras.layers.Dropout(0.2, name="fc_drop"),
            keras.layers.Dense(len(task.label.classes or ()), activation="softmax", name="out"),
        ],
        name="vendor_cnn",
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    windows = np.transpose(x.reshape(len(x), channels, length), (0, 2, 1))  # to (n, length, channels)
    model.fit(windows, y, epochs=3, batch_size=32, verbose=0)
    return model


def test_a_vendor_cnn_fine_tuned_by_two_edgex_agents_on_raw_windows(
    tmp_path: Path, mosquitto: MosquittoBroker, recorder: TrafficRecorder
) -> None:
    task_file = imported_task_file(tmp_path)
    task = parse_task_spec(task_file.read_text())
    assert task.features == parse_task_spec(RAW_TASK.read_text()).features

    # The vendor's data: subject 3's raw windows, built as an agent builds them.
    vendor = SampleBuilder(task, device="watch-03")
    rows = _events(mosquitto, (3,), ROWS, time.time_ns() - 3 * HOUR_NS)
    samples = vendor.add(r for e in rows for r in e.readings) + vendor.flush()
    x = np.stack([s.features for s in samples])
    y = np.asarray([int(s.label) for s in samples])
    keras_file = tmp_path / "vendor.keras"
    vendor_cnn(task, x, y).save(keras_file)
    model_dir = tmp_path / "model"
    built = import_keras_model(keras_file, task, trainable=2)
    write_model(built, model_dir)
    imported = built.manifest.imported
    assert imported is not None
    assert [layer.name for layer in imported.trainable_layers] == ["fc", "out"]
    head = built.manifest.parameter_count
    assert head == 8 * 16 + 16 + 16 * 7 + 7

    fleet = EdgeXFleet(
        tmp_path / "fleet", mosquitto.url, model_dir, 2, {"rounds": 2, "min_devices": 2}, task_file=task_file
    )
    devices = list(fleet.files.agent_configs)
    events = _events(mosquitto, (1, 2), ROWS, time.time_ns() - HOUR_NS)
    try:
        for device in devices:
            fleet.start_agent(device)
        for device in devices:
            recorder.wait_for(
                lambda ms, d=device: bool(
                    (_device(recorder, fleet, d)().get("data") or {}).get("bus_connected")
                ),
                60,
                f"{device} on EdgeX",
            )
        _publish(mosquitto, events)
        for device in devices:
            recorder.wait_for(
                lambda ms, d=device: (
                    int((_device(recorder, fleet, d)().get("data") or {}).get("stored_samples", 0)) >= 57
                ),
                60,
                f"{device}'s raw windows stored",
            )
        fleet.start_aggregator()
        assert fleet.wait_exit("aggregator", 180) == 0, fleet.log("aggregator")
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
        assert "Traceback" not in fleet.log(device), fleet.log(device)[-3000:]
    manifests = fleet.manifests(recorder)
    assert manifests and {m.model_sha256 for m in manifests} == {built.manifest.model_sha256}
    assert all(m.phase != "moments" for m in manifests)  # the manifest's own (identity) scaling
    [final_blob, *_] = [
        m.payload for m in recorder.matching(fleet.topics.blob(manifests[-1].weights_sha256)) if m.payload
    ]
    initial = np.fromfile(model_dir / INITIAL_WEIGHTS_FILE, dtype="<f4")
    final = weights_from_bytes(final_blob, head)
    assert np.all(np.isfinite(final)) and not np.allclose(final, initial)  # the head moved
    payload = json.loads(insight.payload)
    assert payload["task"] == {"name": "har-watch-raw", "kind": "classification"}
    assert payload["prediction"]["label"] in (task.label.classes or ())
