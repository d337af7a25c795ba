"""An imported Keras model on the device: the agent's own trainer (LiteRT, and tflite-runtime in
the fallback environment) trains its head and leaves its frozen base as Keras made it.

The models come from real Keras models imported by ``fedge model import`` (tests/support/
keras_models.py); the agent side is unchanged: ``LiteRTTrainer`` and the agent probe know
nothing of imports, only the manifest's layout and the model's five signatures.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

from fedge.agent.trainer import LiteRTTrainer
from fedge.aggregator import keras_import
from fedge.aggregator.trainable_mlp import TrainableDense
from fedge.protocol.task import TaskSpec
from support.keras_models import (
    channel_major,
    cnn_model,
    features_task,
    features_x,
    head_weights,
    keras,
    mlp_model,
    raw_task,
    set_head_weights,
    windows_x,
)
from support.training_probe import STEPS, run_probe

FALLBACK_PYTHON = os.environ.get("FEDGE_TFLITE_PYTHON")


@dataclass(frozen=True)
class Device:
    """An imported model directory and what it was made from."""

    keras_file: Path
    out: Path
    task: TaskSpec
    head: tuple[str, ...]


@pytest.fixture(scope="module")
def devices(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Device]:
    from fedge.aggregator.model_export import write_model

    tmp = tmp_path_factory.mktemp("imported-device")
    result = {}
    for name, model, task in [("cnn", cnn_model(1), raw_task()), ("mlp", mlp_model(1), features_task())]:
        keras_file = tmp / f"{name}.keras"
        model.save(keras_file)
        out = tmp / name
        write_model(keras_import.import_keras_model(keras_file, task, 2), out)
        head = ("fc", "out") if name == "cnn" else ("hidden", "out")
        result[name] = Device(keras_file, out, task, head)
    return result


def _load(path: Path) -> Any:
    return keras.saving.load_model(path, compile=False)


def test_the_head_learns_and_the_frozen_base_stays_as_keras_made_it(devices: dict[str, Device]) -> None:
    """A learnable toy problem (each class shifts the window's channels its own way), the head
    restarted from random weights. Training in LiteRT brings the loss down; afterwards the
    device model with the trained head infers what Keras infers with that head, and with the
    initial head what it inferred before: only the head moved, the base is the Keras base to
    the last digit."""
    device = devices["cnn"]
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 300).astype(np.int32)
    windows = rng.normal(0.0, 0.5, (300, 16, 2)).astype(np.float32)
    windows[y == 0, :, 0] += 1.5
    windows[y == 1, :, 1] += 1.5
    windows[y == 2] -= 1.0
    x = channel_major(windows)
    keras_model = _load(device.keras_file)

    trainer = LiteRTTrainer.from_dir(device.out)
    initial = trainer.get_weights()
    before_training = trainer.predict(x)
    restart = rng.normal(0.0, 0.3, initial.size).astype(np.float32)
    trainer.set_weights(restart)
    start = trainer.evaluate(x, y)
    losses = trainer.fit(x, y, epochs=15, rng=np.random.default_rng(0))
    end = trainer.evaluate(x, y)
    assert end.loss < 0.5 * start.loss and losses[-1] < losses[0]
    assert end.accuracy is not None and start.accuracy is not None and end.accuracy > start.accuracy
    assert end.accuracy >= 0.8

    trained = trainer.get_weights()
    assert not np.allclose(trained, restart)
    set_head_weights(keras_model, device.head, trained)
    np.testing.assert_allclose(trainer.predict(x), keras_model.predict(windows, verbose=0), atol=1e-5, rtol=0)
    trainer.set_weights(initial)
    np.testing.assert_allclose(trainer.predict(x), before_training, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_weights_round_trip_through_get_and_set(devices: dict[str, Device], name: str) -> None:
    """set_weights then get_weights gives the vector back bit for bit, and the model infers with
    it what Keras infers with the same head weights."""
    device = devices[name]
    trainer = LiteRTTrainer.from_dir(device.out)
    keras_model = _load(device.keras_file)
    np.testing.assert_array_equal(trainer.get_weights(), head_weights(keras_model, device.head))
    weights = np.random.default_rng(8).normal(0.0, 0.5, trainer.parameter_count).astype(np.float32)
    trainer.set_weights(weights)
    np.testing.assert_array_equal(trainer.get_weights(), weights)
    set_head_weights(keras_model, device.head, weights)
    if name == "cnn":
        keras_x = windows_x(32, seed=9)
        fedge_x = channel_major(keras_x)
    else:
        keras_x = fedge_x = features_x(32, seed=9)
    np.testing.assert_allclose(
        trainer.predict(fedge_x), keras_model.predict(keras_x, verbose=0), atol=1e-5, rtol=0
    )


def _batches(device: Device, path: Path) -> dict[str, np.ndarray]:
    """The probe's fixed batches for this model: a start vector of its size, STEPS batches."""
    rng = np.random.default_rng(17)
    count = LiteRTTrainer.from_dir(device.out).parameter_count
    arrays: dict[str, np.ndarray] = {
        "start": rng.normal(0, 0.2, count).astype(np.float32),
        "steps": np.array(STEPS),
    }
    for i in range(STEPS):
        arrays[f"x{i}"] = rng.normal(size=(32, device.task.input_dim)).astype(np.float32)
        arrays[f"y{i}"] = rng.integers(0, device.task.output_dim, 32).astype(np.int32)
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return arrays


def _tensorflow_weights(device: Device, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The same steps in TensorFlow: the import's own head module on the import's frozen path."""
    model, _ = keras_import.load_keras_model(device.keras_file)
    plan = keras_import.plan_import(model, device.task, 2)
    ref = TrainableDense(
        device.task, plan.layout, arrays["start"], plan.chains, input_path=keras_import.input_path(plan)
    )
    for i in range(STEPS):
        ref.train(tf.constant(arrays[f"x{i}"]), tf.constant(arrays[f"y{i}"]))
    weights: np.ndarray = ref.get_weights()["weights"].numpy()
    return weights


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_the_agent_trains_an_imported_model_with_litert_alone(
    devices: dict[str, Device], tmp_path: Path, name: str
) -> None:
    """In a fresh process, as the agent runs: no TensorFlow or Keras imported, and the weights
    after the probe's steps are TensorFlow's (Adam for the CNN, SGD with momentum for the MLP)."""
    device = devices[name]
    arrays = _batches(device, tmp_path / "batches.npz")
    report = run_probe(sys.executable, device.out, tmp_path / "batches.npz", tmp_path / "w.npy")
    assert report["runtime"] == "ai_edge_litert"
    assert report["heavy_modules"] == []
    np.testing.assert_allclose(np.load(tmp_path / "w.npy"), _tensorflow_weights(device, arrays), atol=1e-5)


@pytest.fixture(scope="module")
def fallback_python() -> str:
    if not FALLBACK_PYTHON:
        if os.environ.get("CI"):
            pytest.fail("CI must run the fallback test: FEDGE_TFLITE_PYTHON is not set (use make test)")
        pytest.skip("FEDGE_TFLITE_PYTHON not set; run `make tflite-env` and `make pytest`")
    return FALLBACK_PYTHON


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_an_imported_model_trains_with_tflite_runtime_like_tensorflow(
    fallback_python: str, devices: dict[str, Device], tmp_path: Path, name: str
) -> None:
    """The fallback runtime (tflite-runtime 2.14, numpy 1) loads the imported model's ops
    (CONV_2D, MAX_POOL_2D, TRANSPOSE, MEAN, ...) and trains it to TensorFlow's weights."""
    device = devices[name]
    arrays = _batches(device, tmp_path / "batches.npz")
    report = run_probe(fallback_python, device.out, tmp_path / "batches.npz", tmp_path / "w.npy")
    assert report["runtime"] == "tflite_runtime"
    assert str(report["numpy"]).startswith("1.")
    assert report["heavy_modules"] == []
    np.testing.assert_allclose(np.load(tmp_path / "w.npy"), _tensorflow_weights(device, arrays), atol=1e-5)
