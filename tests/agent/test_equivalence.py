"""LiteRT on the device computes what TensorFlow on the gateway computes.

From the same initial weights and the same batches, the interpreter's weights after training
steps must match TensorFlow's own execution of the same ``tf.Module`` within 1e-6.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from fedge.agent.trainer import LiteRTTrainer
from fedge.aggregator.trainable_mlp import TrainableMLP
from fedge.protocol.task import TaskSpec
from support.tasks import task_variant

STEPS = 10


def _batches(task: TaskSpec, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(STEPS):
        n = 32 if i < STEPS - 1 else 11  # the last batch is partial, as in real epochs
        x = rng.normal(size=(n, task.input_dim)).astype(np.float32)
        if task.model.kind == "classification":
            y = rng.integers(0, task.output_dim, n).astype(np.int32)
        else:
            y = rng.normal(size=n).astype(np.float32)
        out.append((x, y))
    return out


def _run_both(
    task: TaskSpec, model_dir: Path, seed: int
) -> tuple[np.ndarray, np.ndarray, LiteRTTrainer, TrainableMLP]:
    lite = LiteRTTrainer.from_dir(model_dir)
    start = np.random.default_rng(seed + 100).normal(0, 0.2, lite.parameter_count).astype(np.float32)
    lite.set_weights(start)
    ref = TrainableMLP(task, start)
    for x, y in _batches(task, seed):
        lite_loss = lite.train_step(x, y)
        tf_loss = float(ref.train(tf.constant(x), tf.constant(y))["loss"])
        assert lite_loss == pytest.approx(tf_loss, rel=1e-5, abs=1e-6)
    return lite.get_weights(), ref.get_weights()["weights"].numpy(), lite, ref


@pytest.mark.parametrize(
    ("name", "changes"),
    [
        ("sgd", {"training.momentum": 0.0}),
        ("sgd-momentum", {}),
        (
            "regression-sgd",
            {"model.kind": "regression", "label.classes": None, "training.learning_rate": 0.01},
        ),
        # hidden = []: logistic regression and linear regression (one dense layer, no ReLU)
        ("logistic-sgd", {"model.hidden": []}),
        ("logistic-sgd-plain", {"model.hidden": [], "training.momentum": 0.0}),
        (
            "linear-regression-sgd",
            {
                "model.kind": "regression",
                "label.classes": None,
                "model.hidden": [],
                "training.learning_rate": 0.01,
            },
        ),
    ],
)
def test_sgd_weights_match_tensorflow_within_1e6(
    har_task: TaskSpec,
    build_model_dir: Callable[[TaskSpec], Path],
    name: str,
    changes: dict[str, object],
) -> None:
    task = task_variant(har_task, changes)
    lite_w, tf_w, _, _ = _run_both(task, build_model_dir(task), seed=7)
    moved = np.abs(lite_w - TrainableMLP(task).get_weights()["weights"].numpy()).max()
    assert moved > 1e-3, "training did not move the weights: the comparison would be vacuous"
    assert np.abs(lite_w - tf_w).max() <= 1e-6


@pytest.mark.parametrize(
    "model",
    [{}, {"model.hidden": []}, {"model.hidden": [], "model.kind": "regression", "label.classes": None}],
    ids=["mlp", "logistic", "linear-regression"],
)
def test_adam_weights_match_tensorflow(
    har_task: TaskSpec, build_model_dir: Callable[[TaskSpec], Path], model: dict[str, object]
) -> None:
    task = task_variant(
        har_task,
        {"training.optimizer": "adam", "training.momentum": None, "training.learning_rate": 0.001, **model},
    )
    lite_w, tf_w, _, _ = _run_both(task, build_model_dir(task), seed=8)
    # Adam divides by sqrt(v): float32 rounding of tiny v amplifies differences a little.
    assert np.abs(lite_w - tf_w).max() <= 1e-5


def test_inference_and_evaluation_match_tensorflow(har_task: TaskSpec, har_model_dir: Path) -> None:
    _, _, lite, ref = _run_both(har_task, har_model_dir, seed=9)
    x, y = _batches(har_task, 99)[0]
    np.testing.assert_allclose(lite.predict(x), ref.infer(tf.constant(x))["outputs"].numpy(), atol=1e-6)
    ev = ref.evaluate(tf.constant(x), tf.constant(y))
    mine = lite.evaluate(x, y)
    assert mine.loss == pytest.approx(float(ev["loss"]), rel=1e-5)
    assert mine.accuracy == pytest.approx(float(ev["metric"]) / len(y))


@pytest.mark.parametrize(
    "changes",
    [{"model.hidden": []}, {"model.hidden": [], "model.kind": "regression", "label.classes": None}],
    ids=["logistic", "linear-regression"],
)
def test_linear_model_inference_and_evaluation_match_tensorflow(
    har_task: TaskSpec, build_model_dir: Callable[[TaskSpec], Path], changes: dict[str, object]
) -> None:
    task = task_variant(har_task, {**changes, "training.learning_rate": 0.01})
    _, _, lite, ref = _run_both(task, build_model_dir(task), seed=10)
    x, y = _batches(task, 98)[0]
    np.testing.assert_allclose(lite.predict(x), ref.infer(tf.constant(x))["outputs"].numpy(), atol=1e-6)
    ev = ref.evaluate(tf.constant(x), tf.constant(y))
    mine = lite.evaluate(x, y)
    assert mine.loss == pytest.approx(float(ev["loss"]), rel=1e-5)
    if task.model.kind == "classification":
        assert mine.mse is None and mine.accuracy == pytest.approx(float(ev["metric"]) / len(y))
    else:  # the model's metric is the summed squared error; the trainer reports its mean
        assert mine.accuracy is None and mine.mse == pytest.approx(float(ev["metric"]) / len(y), rel=1e-5)
