"""``fedge train-local``: centralised training with LiteRT, the yardstick for federated runs.

All training subjects' windows are pooled, normalised with their own mean and standard
deviation, and trained for some epochs in the LiteRT interpreter -- the same engine and model a
device uses. Accuracy on the held-out subjects is what federated rounds are compared against.

With a building's own data (:func:`train_local_csv`, ``--train``/``--test``) the samples come
from the CSVs through the device's sample builder, exactly as ``fedge evaluate`` builds them
(:func:`fedge.tools.evaluate.csv_samples`), the model from the task (``fedge model build``, or
``--model-dir``), and the test metrics from the same scoring as ``fedge evaluate``
(:func:`fedge.tools.evaluate.score`). The same task, files and seed give the same numbers: the
initial weights come from the task's ``[model] seed``, the shuffling from ``seed``.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedge.agent.trainer import LiteRTTrainer
from fedge.lab import har_watch
from fedge.protocol.model_manifest import Normalisation, normalisation_from_moments
from fedge.protocol.task import TaskSpec

if TYPE_CHECKING:
    from fedge.agent.edgex.profile import DeviceProfile


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    train_loss: float
    test_loss: float
    test_accuracy: float | None
    test_mse: float | None


@dataclass(frozen=True)
class TrainLocalResult:
    task: str
    runtime: str
    epochs: int
    train_subjects: list[int]
    test_subjects: list[int]
    train_examples: int
    test_examples: int
    test_loss: float
    test_accuracy: float | None
    test_mse: float | None
    seconds: float
    model_sha256: str
    history: list[EpochRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def normalisation_of(x: np.ndarray) -> Normalisation:
    """Per-feature mean and std of a data set, via the same moments devices would send."""
    x64 = x.astype(np.float64)
    return normalisation_from_moments(
        x64.shape[0], x64.sum(axis=0).tolist(), (x64 * x64).sum(axis=0).tolist()
    )


def build_model_files(task: TaskSpec, out_dir: Path) -> None:
    """Builds the task's model with TensorFlow (aggregator side) into ``out_dir``."""
    from fedge.aggregator.model_export import build_model, write_model  # noqa: PLC0415 - needs TF

    write_model(build_model(task), out_dir)


def train_local(
    task: TaskSpec,
    epochs: int,
    seed: int = 0,
    model_dir: Path | None = None,
    runtime: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> TrainLocalResult:
    """Trains on the pooled training subjects and evaluates on the held-out ones each epoch."""
    devices = har_watch.load_devices(task)
    train = [devices[s] for s in har_watch.TRAIN_SUBJECTS]
    test = [devices[s] for s in har_watch.TEST_SUBJECTS]
    x_train, y_train = har_watch.pooled(train)
    x_test, y_test = har_watch.pooled(test)
    with tempfile.TemporaryDirectory(prefix="fedge-model-") as tmp:
        if model_dir is None:
            model_dir = Path(tmp)
            build_model_files(task, model_dir)
        trainer = LiteRTTrainer.from_dir(model_dir, runtime=runtime)  # type: ignore[arg-type]
    trainer.normalisation = normalisation_of(x_train)
    rng = np.random.default_rng(seed)
    history: list[EpochRecord] = []
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        (train_loss,) = trainer.fit(x_train, y_train, epochs=1, rng=rng)
        ev = trainer.evaluate(x_test, y_test)
        history.append(EpochRecord(epoch, train_loss, ev.loss, ev.accuracy, ev.mse))
        if progress is not None:
            progress(epoch, epochs)
    seconds = time.perf_counter() - start
    last = history[-1]
    return TrainLocalResult(
        task=task.name,
        runtime=trainer.runtime.name,
        epochs=epochs,
        train_subjects=list(har_watch.TRAIN_SUBJECTS),
        test_subjects=list(har_watch.TEST_SUBJECTS),
        train_examples=int(x_train.shape[0]),
        test_examples=int(x_test.shape[0]),
        test_loss=last.test_loss,
        test_accuracy=last.test_accuracy,
        test_mse=last.test_mse,
        seconds=seconds,
        model_sha256=trainer.manifest.model_sha256,
        history=history,
    )


@dataclass(frozen=True)
class CsvTrainLocalResult:
    """The centralized reference on a building's CSVs: the test CSV's metrics after training on
    the train CSV (no timings: two runs with the same seed give the same result)."""

    task: str
    kind: str
    runtime: str
    epochs: int
    seed: int
    train_csv: str
    test_csv: str
    train_rows: int
    test_rows: int
    train_examples: int
    test_examples: int
    loss: float
    accuracy: float | None
    classes: list[str] | None
    confusion_matrix: list[list[int]] | None
    mse: float | None
    mae: float | None
    rmse: float | None
    model_sha256: str
    history: list[EpochRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_local_csv(
    task: TaskSpec,
    train_csv: Path,
    test_csv: Path,
    epochs: int,
    seed: int = 0,
    profile: DeviceProfile | None = None,
    model_dir: Path | None = None,
    runtime: str = "auto",
    time_column: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CsvTrainLocalResult:
    """Trains on ``train_csv``'s samples and scores on ``test_csv``'s, both built as a device
    builds them; the normalisation is the training samples' own."""
    from fedge.tools.evaluate import check_model_task, csv_samples, score  # noqa: PLC0415

    train = csv_samples(train_csv, task, profile, time_column)
    test = csv_samples(test_csv, task, profile, time_column)
    with tempfile.TemporaryDirectory(prefix="fedge-model-") as tmp:
        if model_dir is None:
            model_dir = Path(tmp)
            build_model_files(task, model_dir)
        trainer = LiteRTTrainer.from_dir(model_dir, runtime=runtime)  # type: ignore[arg-type]
        check_model_task(task, trainer.manifest, model_dir)
    trainer.normalisation = normalisation_of(train.x)
    rng = np.random.default_rng(seed)
    history: list[EpochRecord] = []
    for epoch in range(1, epochs + 1):
        (train_loss,) = trainer.fit(train.x, train.y, epochs=1, rng=rng)
        ev = trainer.evaluate(test.x, test.y)
        history.append(EpochRecord(epoch, train_loss, ev.loss, ev.accuracy, ev.mse))
        if progress is not None:
            progress(epoch, epochs)
    scores = score(trainer, test.x, test.y)
    return CsvTrainLocalResult(
        task=task.name,
        kind=task.model.kind,
        runtime=trainer.runtime.name,
        epochs=epochs,
        seed=seed,
        train_csv=str(train_csv),
        test_csv=str(test_csv),
        train_rows=train.rows,
        test_rows=test.rows,
        train_examples=int(train.x.shape[0]),
        test_examples=scores.pop("examples"),
        classes=list(task.label.classes) if task.label.classes is not None else None,
        model_sha256=trainer.manifest.model_sha256,
        history=history,
        **scores,
    )
