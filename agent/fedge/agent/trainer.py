"""On-device training with the LiteRT interpreter alone (no TensorFlow on the device).

The model's ``train``/``evaluate``/``infer``/``get_weights``/``set_weights`` signatures do all the
math; this module feeds them shuffled mini-batches, applies the manifest's feature
normalisation, and validates every array before it reaches the interpreter (a NaN or a
wrong-shaped batch gets a clear error, not a corrupted model).

An instance is not thread-safe: one interpreter, one caller.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedge.agent.litert_runtime import LiteRTRuntime, RuntimeName, find_runtime
from fedge.protocol.errors import FedgeError
from fedge.protocol.messages import Evaluation
from fedge.protocol.model_manifest import ModelManifest, Normalisation, manifest_from_json

#: Device models are tens of kilobytes; refuse to read anything absurd into memory.
MAX_MODEL_BYTES = 64 * 1024 * 1024
MANIFEST_FILE = "manifest.json"

ProgressCallback = Callable[[int, int], None]


class ModelFileError(FedgeError):
    """The model file is missing, too large, or does not match its manifest."""


class TrainingDataError(FedgeError):
    """Arrays handed to the trainer do not fit the model (shape, dtype, range, NaN)."""


def load_model_dir(model_dir: Path) -> tuple[bytes, ModelManifest]:
    """Reads ``manifest.json`` and the model it names, checking size and SHA-256 first."""
    manifest_path = model_dir / MANIFEST_FILE
    try:
        manifest = manifest_from_json(manifest_path.read_bytes())
    except OSError as exc:
        raise ModelFileError(f"cannot read {manifest_path}: {exc.strerror}") from None
    model_path = model_dir / manifest.model_file
    try:
        size = model_path.stat().st_size
        if size != manifest.model_bytes or size > MAX_MODEL_BYTES:
            raise ModelFileError(
                f"{model_path} is {size} bytes; the manifest says {manifest.model_bytes} "
                f"(limit {MAX_MODEL_BYTES})"
            )
        model = model_path.read_bytes()
    except OSError as exc:
        raise ModelFileError(f"cannot read {model_path}: {exc.strerror}") from None
    return model, manifest


class LiteRTTrainer:
    """Trains, evaluates and runs a fedge model inside the LiteRT interpreter."""

    def __init__(
        self,
        model: bytes,
        manifest: ModelManifest,
        runtime: LiteRTRuntime | RuntimeName = "auto",
        num_threads: int = 1,
    ) -> None:
        if len(model) > MAX_MODEL_BYTES:
            raise ModelFileError(f"model is {len(model)} bytes, over the limit {MAX_MODEL_BYTES}")
        digest = hashlib.sha256(model).hexdigest()
        if digest != manifest.model_sha256:
            raise ModelFileError(
                f"model SHA-256 {digest} does not match the manifest's {manifest.model_sha256}"
            )
        self.manifest = manifest
        self.task = manifest.task
        self.runtime = runtime if isinstance(runtime, LiteRTRuntime) else find_runtime(runtime)
        self.classification = self.task.model.kind == "classification"
        self.normalisation: Normalisation | None = manifest.normalisation
        self._interpreter = self.runtime.interpreter_class(model_content=model, num_threads=num_threads)
        self._train = self._interpreter.get_signature_runner("train")
        self._infer = self._interpreter.get_signature_runner("infer")
        self._evaluate = self._interpreter.get_signature_runner("evaluate")
        self._get_weights = self._interpreter.get_signature_runner("get_weights")
        self._set_weights = self._interpreter.get_signature_runner("set_weights")

    @classmethod
    def from_dir(cls, model_dir: Path, runtime: RuntimeName = "auto") -> LiteRTTrainer:
        model, manifest = load_model_dir(model_dir)
        return cls(model, manifest, runtime)

    @property
    def parameter_count(self) -> int:
        return self.manifest.parameter_count

    # --- weights -------------------------------------------------------------------------

    def get_weights(self) -> np.ndarray:
        """The current weights as one flat float32 vector (a copy)."""
        return np.array(self._get_weights()["weights"], dtype=np.float32, copy=True)

    def set_weights(self, weights: np.ndarray) -> None:
        """Loads a flat weight vector and resets the optimizer state (momentum, Adam moments)."""
        w = np.asarray(weights)
        if w.shape != (self.parameter_count,):
            raise TrainingDataError(f"weights must have shape ({self.parameter_count},), got {w.shape}")
        if w.dtype != np.float32:
            raise TrainingDataError(f"weights must be float32, got {w.dtype}")
        if not np.all(np.isfinite(w)):
            raise TrainingDataError("weights contain NaN or infinity")
        self._set_weights(weights=np.ascontiguousarray(w))

    # --- data ----------------------------------------------------------------------------

    def prepare_x(self, x: np.ndarray) -> np.ndarray:
        """Validates raw features and applies the normalisation; returns float32."""
        arr = np.asarray(x)
        if arr.ndim != 2 or arr.shape[1] != self.task.input_dim:
            raise TrainingDataError(f"x must have shape (n, {self.task.input_dim}), got {arr.shape}")
        if arr.shape[0] == 0:
            raise TrainingDataError("x is empty")
        if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
            raise TrainingDataError(f"x must be real numbers, got dtype {arr.dtype}")
        out = arr.astype(np.float32)
        if not np.all(np.isfinite(out)):
            raise TrainingDataError("x contains NaN or infinity")
        if self.normalisation is not None:
            mean = np.asarray(self.normalisation.mean, np.float32)
            std = np.asarray(self.normalisation.std, np.float32)
            out = (out - mean) / std
        return np.ascontiguousarray(out)

    def prepare_y(self, y: np.ndarray, n: int) -> np.ndarray:
        """Validates labels: class indices in range (classification) or finite numbers."""
        arr = np.asarray(y)
        if arr.shape != (n,):
            raise TrainingDataError(f"y must have shape ({n},), got {arr.shape}")
        if self.classification:
            if not np.issubdtype(arr.dtype, np.integer):
                raise TrainingDataError(f"y must hold integer class indices, got dtype {arr.dtype}")
            n_classes = self.task.output_dim
            if arr.min() < 0 or arr.max() >= n_classes:
                raise TrainingDataError(f"y holds a class index outside 0..{n_classes - 1}")
            return arr.astype(np.int32)
        if not np.issubdtype(arr.dtype, np.number):
            raise TrainingDataError(f"y must be numbers, got dtype {arr.dtype}")
        out = arr.astype(np.float32)
        if not np.all(np.isfinite(out)):
            raise TrainingDataError("y contains NaN or infinity")
        return out

    # --- training and evaluation -----------------------------------------------------------

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        """One optimizer step on an already prepared batch; returns the batch's mean loss."""
        return float(self._train(x=x, y=y)["loss"])

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        epochs: int | None = None,
        batch_size: int | None = None,
        rng: np.random.Generator | None = None,
        progress: ProgressCallback | None = None,
    ) -> list[float]:
        """Local epochs over shuffled mini-batches (the last, partial batch included).

        Returns each epoch's mean loss, weighted by batch size. Defaults come from the task.
        """
        epochs = self.task.training.local_epochs if epochs is None else epochs
        batch_size = self.task.training.batch_size if batch_size is None else batch_size
        if epochs < 1 or batch_size < 1:
            raise TrainingDataError("epochs and batch_size must be >= 1")
        xp = self.prepare_x(x)
        yp = self.prepare_y(y, xp.shape[0])
        rng = rng if rng is not None else np.random.default_rng()
        n = xp.shape[0]
        steps_per_epoch = math.ceil(n / batch_size)
        losses: list[float] = []
        for epoch in range(epochs):
            order = rng.permutation(n)
            total = 0.0
            for step, start in enumerate(range(0, n, batch_size)):
                idx = order[start : start + batch_size]
                total += self.train_step(xp[idx], yp[idx]) * len(idx)
                if progress is not None:
                    progress(epoch * steps_per_epoch + step + 1, epochs * steps_per_epoch)
            loss = total / n
            if not math.isfinite(loss):
                raise TrainingDataError(
                    f"training diverged in epoch {epoch + 1} (loss {loss}); lower the learning rate"
                )
            losses.append(loss)
        return losses

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 1024) -> Evaluation:
        """Loss and accuracy (or MSE) over the whole data set, in bounded-size batches."""
        xp = self.prepare_x(x)
        yp = self.prepare_y(y, xp.shape[0])
        n = xp.shape[0]
        loss_sum = 0.0
        metric_sum = 0.0
        for start in range(0, n, batch_size):
            out = self._evaluate(x=xp[start : start + batch_size], y=yp[start : start + batch_size])
            k = min(batch_size, n - start)
            loss_sum += float(out["loss"]) * k
            metric_sum += float(out["metric"])
        if self.classification:
            return Evaluation(n, loss_sum / n, metric_sum / n, None)
        return Evaluation(n, loss_sum / n, None, metric_sum / n)

    def predict(self, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Class probabilities (classification) or predicted values (regression)."""
        xp = self.prepare_x(x)
        parts = [
            np.array(self._infer(x=xp[s : s + batch_size])["outputs"], copy=True)
            for s in range(0, xp.shape[0], batch_size)
        ]
        return np.concatenate(parts)
