"""An imported Keras model fine-tuned by a real fleet: the aggregator and the agents use the
model directory ``fedge model import`` wrote exactly as they use a built one.

A Keras MLP (with BatchNormalization and Dropout) is trained on the HAR task's window features,
imported with its last two Dense layers trainable and the scaling it was trained on, and given
to a real Mosquitto, a real aggregator process and two real agent processes. The first global
model is the imported head; no normalisation round runs (the manifest has one); every round
manifest names the same model bytes (the frozen base never changes); the head moves.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedge.aggregator.keras_import import import_keras_model
from fedge.aggregator.model_export import write_model
from fedge.lab.broker import MosquittoBroker
from fedge.lab.har_watch import load_devices, pooled
from fedge.lab.train_local import normalisation_of
from fedge.protocol.model_manifest import INITIAL_WEIGHTS_FILE, manifest_from_json
from fedge.protocol.task import TaskSpec
from fedge.protocol.weights import weights_from_bytes
from support.fleet_harness import Fleet, latest_status
from support.keras_models import head_weights, keras
from support.mqtt_fixtures import TrafficRecorder
from support.tasks import task_variant

pytest_plugins = ("support.mqtt_fixtures",)
pytestmark = pytest.mark.slow


@pytest.fixture()
def recorder(mosquitto: MosquittoBroker) -> Iterator[TrafficRecorder]:
    with TrafficRecorder.for_broker(mosquitto, topic_filter="fedge/#") as rec:
        yield rec


def _imported_model_dir(task: TaskSpec, tmp: Path) -> tuple[Path, np.ndarray]:
    """A vendor's Keras MLP, trained on subjects 1-7 scaled as the vendor scaled them, imported."""
    x, y = pooled(load_devices(task, range(1, 8)).values())
    normalisation = normalisation_of(x)
    scaled = (x - np.asarray(normalisation.mean, np.float32)) / np.asarray(normalisation.std, np.float32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((task.input_dim,)),
            keras.layers.Dense(32, activation="relu", name="base"),
            keras.layers.BatchNormalization(name="base_bn"),
            keras.layers.Dropout(0.2, name="base_drop"),
            keras.layers.Dense(16, activation="relu", name="hidden"),
            keras.layers.Dense(task.output_dim, activation="softmax", name="out"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(scaled, y, epochs=2, batch_size=32, verbose=0)
    model.save(tmp / "vendor.keras")
    out = tmp / "model"
    write_model(import_keras_model(tmp / "vendor.keras", task, 2, normalisation), out)
    return out, head_weights(model, ("hidden", "out"))


def test_a_fleet_fine_tunes_an_imported_model(
    tmp_path: Path, mosquitto: MosquittoBroker, recorder: TrafficRecorder, har_task: TaskSpec
) -> None:
    task = task_variant(har_task, {"model.type": "imported", "model.hidden": None, "model.seed": None})
    model_dir, keras_head = _imported_model_dir(task, tmp_path)
    fleet = Fleet(tmp_path / "fleet", mosquitto.url, model_dir, 2, {"rounds": 2, "min_devices": 2})
    try:
        for device in fleet.files.agent_configs:
            fleet.start_agent(device)
        fleet.start_aggregator()
        assert fleet.wait_exit("aggregator", 180) == 0, fleet.log("aggregator")
        for device in fleet.files.agent_configs:
            topic = fleet.topics.status(device)
            recorder.wait_for(
                lambda ms, t=topic: latest_status(ms, t).get("model_version") == 3,
                60,
                f"{device} on the final model",
            )
    finally:
        fleet.stop_all()

    status = latest_status(recorder.messages, fleet.topics.aggregator_status)
    assert status["state"] == "done" and status["completed_rounds"] == 2, status
    assert status["rejected_total"] == {}
    for device in fleet.files.agent_configs:
        assert "Traceback" not in fleet.log(device), fleet.log(device)[-3000:]

    manifest = manifest_from_json((model_dir / "manifest.json").read_bytes())
    manifests = fleet.manifests(recorder)
    # The manifest's normalisation is the vendor's: no moments round, training from round 1.
    assert [m.phase for m in manifests] == ["train", "train", "final"]
    assert all(m.model_sha256 == manifest.model_sha256 for m in manifests)  # the frozen base
    assert all(m.model_manifest == manifest for m in manifests)
    initial = (model_dir / INITIAL_WEIGHTS_FILE).read_bytes()
    np.testing.assert_array_equal(weights_from_bytes(initial, manifest.parameter_count), keras_head)
    assert manifests[0].weights_sha256 == hashlib.sha256(initial).hexdigest()  # starts from Keras' head
    [final_blob, *_] = [
        m.payload for m in recorder.matching(fleet.topics.blob(manifests[-1].weights_sha256)) if m.payload
    ]
    final = weights_from_bytes(final_blob, manifest.parameter_count)
    assert manifest.parameter_count == 32 * 16 + 16 + 16 * 7 + 7
    assert np.all(np.isfinite(final)) and np.abs(final - keras_head).max() > 1e-3
    assert json.loads((model_dir / "manifest.json").read_text())["imported"]["trainable_layers"] == [
        {"name": "hidden", "class": "Dense"},
        {"name": "out", "class": "Dense"},
    ]
