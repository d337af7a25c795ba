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
        # FedProx: the proximal term pulls towards the weights set_weights loaded.
        ("fedprox-sgd-momentum", {"training.proximal_mu": 0.5}),
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


def test_the_proximal_term_is_fedprox_s_gradient_computed_by_hand(
    har_task: TaskSpec, build_model_dir: Callable[[TaskSpec], Path]
) -> None:
    """Logistic regression, plain SGD, mu = 0.5: LiteRT's steps equal numpy's
    ``w -= lr * (grad_data + mu * (w - w_start))`` (the FedProx objective's gradient), and the
    weights end closer to the start than without the term."""
    mu, lr = 0.5, 0.05
    task = task_variant(
        har_task,
        {
            "model.hidden": [],
            "training.momentum": 0.0,
            "training.proximal_mu": mu,
            "training.learning_rate": lr,
        },
    )
    lite = LiteRTTrainer.from_dir(build_model_dir(task))
    start = np.random.default_rng(3).normal(0, 0.2, lite.parameter_count).astype(np.float32)
    lite.set_weights(start)
    d, k = task.input_dim, task.output_dim
    w, b = start[: d * k].reshape(d, k).astype(np.float64), start[d * k :].astype(np.float64)
    w0, b0 = w.copy(), b.copy()
    for x, y in _batches(task, 11):
        lite.train_step(x, y)
        logits = x.astype(np.float64) @ w + b
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        delta = (p - np.eye(k)[y]) / len(y)
        w, b = w - lr * (x.T @ delta + mu * (w - w0)), b - lr * (delta.sum(axis=0) + mu * (b - b0))
    np.testing.assert_allclose(lite.get_weights(), np.concatenate([w.ravel(), b]), atol=1e-5)
    plain = LiteRTTrainer.from_dir(build_model_dir(task_variant(task, {"training.proximal_mu": 0.0})))
    plain.set_weights(start)
    for x, y in _batches(task, 11):
        plain.train_step(x, y)
    assert np.linalg.norm(lite.get_weights() - start) < np.linalg.norm(plain.get_weights() - start)
