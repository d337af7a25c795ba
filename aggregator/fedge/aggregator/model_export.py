"""``fedge model build``: task spec -> trainable ``.tflite`` + manifest + initial weights.

Conversion uses ``TFLITE_BUILTINS`` only, with resource variables, and the result is checked
again with TensorFlow's analyzer: if a Flex op ever slips in (a TensorFlow upgrade, a new layer
type) the build fails here, loudly, instead of on every device.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from fedge.aggregator.tflite_ops import flex_ops
from fedge.aggregator.trainable_mlp import TrainableMLP, initial_weights
from fedge.protocol.errors import FedgeError
from fedge.protocol.model_manifest import INITIAL_WEIGHTS_FILE, ModelManifest, Normalisation
from fedge.protocol.task import TaskSpec
from fedge.protocol.weights import weights_to_bytes
from fedge.shell.files import atomic_write

MODEL_FILE = "model.tflite"
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = INITIAL_WEIGHTS_FILE
#: Models and manifests are not secret; readers may be other users.
PUBLIC_FILE_MODE = 0o644


class ModelBuildError(FedgeError):
    """The model could not be converted to a builtins-only TFLite model."""


@dataclass(frozen=True)
class BuiltModel:
    """What a build produced: the model bytes, its manifest and initial weights."""

    tflite: bytes
    manifest: ModelManifest
    weights: np.ndarray


def convert_to_tflite(task: TaskSpec, weights: np.ndarray | None = None) -> bytes:
    """Converts the task's trainable MLP with builtin ops only; raises on any Flex op."""
    module = TrainableMLP(task, weights)
    return convert_module(module, module.signatures())


def convert_module(module: tf.Module, signatures: dict[str, Any]) -> bytes:
    """Converts any ``tf.Module`` with builtin ops and resource variables; refuses Flex ops."""
    with tempfile.TemporaryDirectory(prefix="fedge-savedmodel-") as tmp:
        tf.saved_model.save(module, tmp, signatures=signatures)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.experimental_enable_resource_variables = True
        try:
            model = converter.convert()
        except Exception as exc:  # the converter raises several private error types
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelBuildError(
                "TFLite conversion with builtin ops only failed; the model needs ops outside "
                f"TFLITE_BUILTINS (Flex): {first_line}"
            ) from None
    found = flex_ops(model)
    if found:
        raise ModelBuildError(f"converted model contains Flex ops: {', '.join(found)}")
    return bytes(model)


def build_model(task: TaskSpec, normalisation: Normalisation | None = None) -> BuiltModel:
    """Builds, converts and describes the task's model; nothing is written."""
    if task.model.type != "mlp":
        raise ModelBuildError(
            f"task {task.name!r} has an imported model ([model] type = {task.model.type!r}): its model "
            "directory comes from fedge model import --keras MODEL.keras, not from its task"
        )
    if normalisation is not None and len(normalisation.mean) != task.input_dim:
        raise ModelBuildError(
            f"normalisation has {len(normalisation.mean)} features, the task has {task.input_dim}"
        )
    weights = initial_weights(task)
    model = convert_to_tflite(task, weights)
    manifest = ModelManifest(
        task=task,
        model_file=MODEL_FILE,
        model_sha256=hashlib.sha256(model).hexdigest(),
        model_bytes=len(model),
        initial_weights_sha256=hashlib.sha256(weights_to_bytes(weights)).hexdigest(),
        normalisation=normalisation,
        tensorflow_version=tf.__version__,
    )
    return BuiltModel(model, manifest, weights)


def write_model(built: BuiltModel, out_dir: Path) -> Path:
    """Writes model, initial weights and manifest atomically; the manifest goes last.

    A reader that sees the manifest therefore always finds the files it names complete.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / MODEL_FILE, built.tflite, PUBLIC_FILE_MODE)
    atomic_write(out_dir / WEIGHTS_FILE, weights_to_bytes(built.weights), PUBLIC_FILE_MODE)
    manifest_path = out_dir / MANIFEST_FILE
    atomic_write(manifest_path, built.manifest.to_json().encode(), PUBLIC_FILE_MODE)
    return manifest_path
