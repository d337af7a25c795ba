"""``[rollout] validation_file``: the operator's own labelled set, judged on the aggregator.

The fleet's federated evaluation measures a candidate on the devices' held-out data; an operator
who has labelled data of their own (a commissioning run, an audit) can add it: every candidate is
then also evaluated on it, with the model's own ``evaluate`` signature in a LiteRT interpreter on
the aggregator, and promoted only if it is not worse there either (``fedge.aggregator.rollout``).

The file is a NumPy ``.npz`` (loaded without pickle) holding ``x``, float features of shape
``(n, input_dim)`` as a device computes them (``fedge.agent.features``: the raw window features,
before normalisation, which the candidate's manifest applies), and ``y``, shape ``(n,)``: class
indices (classification) or target values (regression). Everything is checked at start; a bad
file stops the aggregator with one line naming what to fix.
"""

from __future__ import annotations

import importlib
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from fedge.protocol.config_source import ConfigError
from fedge.protocol.model_manifest import ModelManifest, Normalisation
from fedge.protocol.weights import weights_from_bytes

#: A validation set is a few thousand windows; this bounds what start-up reads.
MAX_VALIDATION_BYTES = 256 * 1024 * 1024
_BATCH = 1024


def _interpreter_class() -> Any:
    """LiteRT's interpreter where it is installed, else TensorFlow's (the aggregator has it)."""
    try:
        return importlib.import_module("ai_edge_litert.interpreter").Interpreter
    except ImportError:
        return importlib.import_module("tensorflow").lite.Interpreter


class ValidationSet:
    """The operator's labelled set and an interpreter of the fleet's model to score it."""

    def __init__(self, path: Path, model: bytes, manifest: ModelManifest) -> None:
        self.path = path
        self.manifest = manifest
        self.classification = manifest.task.model.kind == "classification"
        self.x, self.y = self._load(path, manifest)
        interpreter = _interpreter_class()(model_content=model, num_threads=1)
        self._evaluate = interpreter.get_signature_runner("evaluate")
        self._set_weights = interpreter.get_signature_runner("set_weights")

    @property
    def size(self) -> int:
        return int(self.x.shape[0])

    @staticmethod
    def _load(path: Path, manifest: ModelManifest) -> tuple[np.ndarray, np.ndarray]:
        where = f"[rollout] validation_file {path}"
        try:
            if path.stat().st_size > MAX_VALIDATION_BYTES:
                raise ConfigError(f"{where} is over {MAX_VALIDATION_BYTES} bytes; use a smaller sample")
            with np.load(path, allow_pickle=False) as data:
                if set(data.files) != {"x", "y"}:
                    raise ConfigError(
                        f"{where}: must hold exactly the arrays x and y, not {sorted(data.files)}"
                    )
                x, y = np.asarray(data["x"]), np.asarray(data["y"])
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise ConfigError(f"{where} cannot be read as a .npz of x and y: {exc}") from None
        task = manifest.task
        if x.ndim != 2 or x.shape[1] != task.input_dim or x.shape[0] == 0:
            raise ConfigError(f"{where}: x must have shape (n >= 1, {task.input_dim}), not {x.shape}")
        if not np.issubdtype(x.dtype, np.number) or not np.all(np.isfinite(x)):
            raise ConfigError(f"{where}: x must hold finite numbers")
        if y.shape != (x.shape[0],):
            raise ConfigError(f"{where}: y must have shape ({x.shape[0]},), not {y.shape}")
        if task.model.kind == "classification":
            if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= task.output_dim:
                raise ConfigError(f"{where}: y must hold class indices 0..{task.output_dim - 1}")
            return x.astype(np.float32), y.astype(np.int32)
        if not np.issubdtype(y.dtype, np.number) or not np.all(np.isfinite(y)):
            raise ConfigError(f"{where}: y must hold finite numbers")
        return x.astype(np.float32), y.astype(np.float32)

    def evaluate(self, weights: bytes, normalisation: Normalisation | None) -> float:
        """The candidate's accuracy (classification) or MSE (regression) on the set."""
        w = weights_from_bytes(weights, self.manifest.parameter_count)
        self._set_weights(weights=np.ascontiguousarray(w, dtype=np.float32))
        x = self.x
        if normalisation is not None:
            x = (x - np.asarray(normalisation.mean, np.float32)) / np.asarray(normalisation.std, np.float32)
        x = np.ascontiguousarray(x, dtype=np.float32)
        total = 0.0
        for start in range(0, x.shape[0], _BATCH):
            out = self._evaluate(x=x[start : start + _BATCH], y=self.y[start : start + _BATCH])
            total += float(out["metric"])  # a batch's sum: correct predictions, or squared errors
        return float(total / x.shape[0])
