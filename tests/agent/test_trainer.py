"""The device-side trainer: LiteRT alone trains, evaluates, and gets and sets weights."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedge.agent.trainer import LiteRTTrainer, ModelFileError, TrainingDataError, load_model_dir
from fedge.aggregator.model_export import MODEL_FILE, WEIGHTS_FILE
from fedge.protocol.model_manifest import Normalisation
from fedge.protocol.task import TaskSpec
from fedge.protocol.weights import weights_from_bytes
from support.tasks import task_variant


class RecordingTrainer(LiteRTTrainer):
    """Records every batch fed to the interpreter, to check batching and shuffling."""

    batches: list[np.ndarray]

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        self.batches.append(x.copy())
        return super().train_step(x, y)


def _data(n: int, seed: int = 0, classes: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 48)).astype(np.float32)
    # Learnable labels: the class is determined by which of the first 7 features is largest.
    y = np.argmax(x[:, :classes], axis=1).astype(np.int32)
    return x, y


@pytest.fixture()
def trainer(har_model_dir: Path) -> LiteRTTrainer:
    return LiteRTTrainer.from_dir(har_model_dir)


def test_initial_weights_come_from_the_model(trainer: LiteRTTrainer, har_model_dir: Path) -> None:
    expected = weights_from_bytes((har_model_dir / WEIGHTS_FILE).read_bytes(), trainer.parameter_count)
    np.testing.assert_array_equal(trainer.get_weights(), expected)


def test_set_then_get_weights_round_trips(trainer: LiteRTTrainer) -> None:
    w = np.random.default_rng(3).normal(size=trainer.parameter_count).astype(np.float32)
    trainer.set_weights(w)
    np.testing.assert_array_equal(trainer.get_weights(), w)


def test_get_weights_returns_a_copy(trainer: LiteRTTrainer) -> None:
    w = trainer.get_weights()
    w[:] = 0.0
    assert np.any(trainer.get_weights() != 0.0)


def test_every_sample_is_used_once_per_epoch_including_the_partial_batch(har_model_dir: Path) -> None:
    t = RecordingTrainer.from_dir(har_model_dir)
    t.batches = []
    x, y = _data(70)
    t.fit(x, y, epochs=2, batch_size=32, rng=np.random.default_rng(0))
    assert [len(b) for b in t.batches] == [32, 32, 6, 32, 32, 6]
    for epoch in (t.batches[:3], t.batches[3:]):
        seen = np.concatenate(epoch)
        # Same multiset of rows as the input (x has no normalisation in this model).
        np.testing.assert_array_equal(np.sort(seen, axis=0), np.sort(x, axis=0))
    # Shuffled: the two epochs present the samples in different orders, and not in input order.
    assert not np.array_equal(np.concatenate(t.batches[:3]), np.concatenate(t.batches[3:]))
    assert not np.array_equal(np.concatenate(t.batches[:3]), x)


def test_fit_uses_the_task_defaults(har_model_dir: Path, har_task: TaskSpec) -> None:
    t = RecordingTrainer.from_dir(har_model_dir)
    t.batches = []
    x, y = _data(100)
    losses = t.fit(x, y, rng=np.random.default_rng(0))
    assert len(losses) == har_task.training.local_epochs
    assert max(len(b) for b in t.batches) == har_task.training.batch_size


def test_training_learns(trainer: LiteRTTrainer) -> None:
    x, y = _data(600)
    before = trainer.evaluate(x, y)
    losses = trainer.fit(x, y, epochs=15, batch_size=32, rng=np.random.default_rng(1))
    after = trainer.evaluate(x, y)
    assert losses[-1] < losses[0]
    assert after.loss < before.loss
    assert after.accuracy is not None and before.accuracy is not None
    assert after.accuracy > 0.9 > before.accuracy
    assert after.examples == 600 and after.mse is None


def test_same_weights_and_batches_give_the_same_result(trainer: LiteRTTrainer) -> None:
    """set_weights resets optimizer state, so a round always starts from the same point."""
    x, y = _data(64)
    w0 = trainer.get_weights()
    trainer.fit(x, y, epochs=2, rng=np.random.default_rng(5))
    first = trainer.get_weights()
    trainer.set_weights(w0)
    trainer.fit(x, y, epochs=2, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(trainer.get_weights(), first)
    assert not np.array_equal(first, w0)


def test_evaluate_counts_correct_predictions_exactly(trainer: LiteRTTrainer) -> None:
    x, y = _data(2500)  # more than one evaluation batch of 1024
    probs = trainer.predict(x)
    assert probs.shape == (2500, 7)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    expected = float(np.mean(np.argmax(probs, axis=1) == y))
    ev = trainer.evaluate(x, y)
    assert ev.accuracy == pytest.approx(expected, abs=1e-9)
    assert ev.loss == pytest.approx(float(-np.mean(np.log(probs[np.arange(2500), y]))), rel=1e-4)


def test_normalisation_is_applied_to_inputs(trainer: LiteRTTrainer) -> None:
    x, _ = _data(10)
    mean = tuple(float(v) for v in np.linspace(-1, 1, 48))
    std = tuple(float(v) for v in np.linspace(0.5, 2, 48))
    plain = trainer.predict((x - np.array(mean, np.float32)) / np.array(std, np.float32))
    trainer.normalisation = Normalisation(mean, std)
    np.testing.assert_allclose(trainer.predict(x), plain, rtol=1e-5, atol=1e-7)


def test_regression_model_trains(build_model_dir: Callable[[TaskSpec], Path], har_task: TaskSpec) -> None:
    task = task_variant(
        har_task,
        {
            "model.kind": "regression",
            "label.classes": None,
            "model.hidden": [16],
            "training.learning_rate": 0.01,
        },
    )
    t = LiteRTTrainer.from_dir(build_model_dir(task))
    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 48)).astype(np.float32)
    y = (x[:, 0] * 2.0 - x[:, 1] + 0.5).astype(np.float32)
    before = t.evaluate(x, y)
    t.fit(x, y, epochs=30, batch_size=16, rng=rng)
    after = t.evaluate(x, y)
    assert before.accuracy is None and before.mse is not None and after.mse is not None
    assert after.mse < 0.1 * before.mse
    assert t.predict(x).shape == (400, 1)


def test_linear_regression_learns_the_true_coefficients(
    build_model_dir: Callable[[TaskSpec], Path], har_task: TaskSpec
) -> None:
    """``hidden = []``: one dense layer, trained on the device, recovers ``y = 2 x0 - x1 + 0.5``."""
    task = task_variant(
        har_task,
        {
            "model.kind": "regression",
            "label.classes": None,
            "model.hidden": [],
            "training.learning_rate": 0.01,
        },
    )
    t = LiteRTTrainer.from_dir(build_model_dir(task))
    assert t.parameter_count == 49
    rng = np.random.default_rng(4)
    x = rng.normal(size=(400, 48)).astype(np.float32)
    y = (x[:, 0] * 2.0 - x[:, 1] + 0.5).astype(np.float32)
    before = t.evaluate(x, y)
    t.fit(x, y, epochs=30, batch_size=16, rng=rng)
    after = t.evaluate(x, y)
    assert before.mse is not None and after.mse is not None and after.accuracy is None
    assert after.mse < 1e-4 < before.mse
    kernel, bias = t.get_weights()[:48], t.get_weights()[48]
    np.testing.assert_allclose(kernel[:2], [2.0, -1.0], atol=0.01)
    assert np.abs(kernel[2:]).max() < 0.01 and bias == pytest.approx(0.5, abs=0.01)


def test_logistic_regression_learns(build_model_dir: Callable[[TaskSpec], Path], har_task: TaskSpec) -> None:
    """``hidden = []`` for classification: softmax regression on a linearly separable task."""
    t = LiteRTTrainer.from_dir(build_model_dir(task_variant(har_task, {"model.hidden": []})))
    assert t.parameter_count == 48 * 7 + 7
    x, y = _data(600, seed=5)
    before = t.evaluate(x, y)
    t.fit(x, y, epochs=20, rng=np.random.default_rng(5))
    after = t.evaluate(x, y)
    assert before.accuracy is not None and after.accuracy is not None and after.mse is None
    assert after.accuracy >= 0.9 > before.accuracy
    assert after.loss < 0.5 * before.loss
    np.testing.assert_allclose(t.predict(x[:5]).sum(axis=1), 1.0, rtol=1e-6)


# --- bad input: a clear error, and the model is untouched ------------------------------------

BAD_INPUTS: list[tuple[str, Callable[[], tuple[np.ndarray, np.ndarray]], str]] = [
    (
        "wrong width",
        lambda: (np.zeros((4, 47), np.float32), np.zeros(4, np.int32)),
        r"x must have shape \(n, 48\), got \(4, 47\)",
    ),
    ("1-d x", lambda: (np.zeros(48, np.float32), np.zeros(1, np.int32)), r"x must have shape"),
    ("empty", lambda: (np.zeros((0, 48), np.float32), np.zeros(0, np.int32)), "x is empty"),
    ("nan", lambda: (np.full((4, 48), np.nan, np.float32), np.zeros(4, np.int32)), "x contains NaN"),
    ("inf", lambda: (np.full((4, 48), np.inf, np.float32), np.zeros(4, np.int32)), "x contains NaN"),
    ("strings", lambda: (np.full((4, 48), "a"), np.zeros(4, np.int32)), "x must be real numbers"),
    (
        "label too big",
        lambda: (np.zeros((4, 48), np.float32), np.array([0, 1, 7, 2])),
        r"class index outside 0\.\.6",
    ),
    (
        "negative label",
        lambda: (np.zeros((4, 48), np.float32), np.array([0, -1, 2, 2])),
        r"class index outside 0\.\.6",
    ),
    (
        "float labels",
        lambda: (np.zeros((4, 48), np.float32), np.zeros(4, np.float32)),
        "integer class indices",
    ),
    (
        "label count",
        lambda: (np.zeros((4, 48), np.float32), np.zeros(3, np.int32)),
        r"y must have shape \(4,\), got \(3,\)",
    ),
]


@pytest.mark.parametrize(("case", "make", "message"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_training_data_is_refused_and_changes_nothing(
    trainer: LiteRTTrainer, case: str, make: Callable[[], tuple[np.ndarray, np.ndarray]], message: str
) -> None:
    before = trainer.get_weights()
    x, y = make()
    with pytest.raises(TrainingDataError, match=message):
        trainer.fit(x, y, epochs=1)
    with pytest.raises(TrainingDataError, match=message):
        trainer.evaluate(x, y)
    np.testing.assert_array_equal(trainer.get_weights(), before)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (np.zeros(5446, np.float32), r"weights must have shape \(5447,\), got \(5446,\)"),
        (np.zeros((5447, 1), np.float32), r"weights must have shape \(5447,\)"),
        (np.zeros(5447, np.float64), "weights must be float32, got float64"),
        (np.full(5447, np.nan, np.float32), "weights contain NaN or infinity"),
    ],
)
def test_bad_weights_are_refused_and_change_nothing(
    trainer: LiteRTTrainer, weights: np.ndarray, message: str
) -> None:
    before = trainer.get_weights()
    with pytest.raises(TrainingDataError, match=message):
        trainer.set_weights(weights)
    np.testing.assert_array_equal(trainer.get_weights(), before)


def test_diverging_training_is_reported(trainer: LiteRTTrainer) -> None:
    x, y = _data(64)
    with pytest.raises(TrainingDataError, match="training diverged in epoch 1"):
        trainer.fit(x * np.float32(1e30), y, epochs=1)


def test_invalid_epochs_or_batch_size(trainer: LiteRTTrainer) -> None:
    x, y = _data(8)
    with pytest.raises(TrainingDataError, match="epochs and batch_size must be >= 1"):
        trainer.fit(x, y, epochs=0)
    with pytest.raises(TrainingDataError, match="epochs and batch_size must be >= 1"):
        trainer.fit(x, y, batch_size=0)


# --- the model file is checked against its manifest before the interpreter sees it ------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_tampered_model_is_refused(har_model_dir: Path, tmp_path: Path) -> None:
    d = _copy(har_model_dir, tmp_path / "m")
    model = bytearray((d / MODEL_FILE).read_bytes())
    model[len(model) // 2] ^= 0x01
    (d / MODEL_FILE).write_bytes(bytes(model))
    with pytest.raises(ModelFileError, match=r"model SHA-256 .* does not match the manifest's"):
        LiteRTTrainer.from_dir(d)


def test_truncated_model_is_refused_before_reading(har_model_dir: Path, tmp_path: Path) -> None:
    d = _copy(har_model_dir, tmp_path / "m")
    model = (d / MODEL_FILE).read_bytes()
    (d / MODEL_FILE).write_bytes(model[:100])
    with pytest.raises(ModelFileError, match=f"is 100 bytes; the manifest says {len(model)}"):
        load_model_dir(d)


def test_missing_files_are_reported(har_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"cannot read .*manifest\.json: No such file"):
        load_model_dir(tmp_path)
    d = _copy(har_model_dir, tmp_path / "m")
    (d / MODEL_FILE).unlink()
    with pytest.raises(ModelFileError, match=r"cannot read .*model\.tflite: No such file"):
        load_model_dir(d)


def test_model_bytes_and_manifest_agree(har_model_dir: Path) -> None:
    model, manifest = load_model_dir(har_model_dir)
    assert hashlib.sha256(model).hexdigest() == manifest.model_sha256
