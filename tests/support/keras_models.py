"""Small trained Keras models, and the imported-model tasks they fit, for the tests of
``fedge model import`` (docs/fine-tuning.md). Built during the test run: no model file is
shipped, and every weight that matters (BatchNormalization's statistics above all) is set far
from its identity value, so a conversion that ignored one would not match Keras.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from fedge.protocol.task import TaskSpec, parse_task_spec

#: A feature task: 6 features, 3 classes; SGD with momentum, as fedge's own MLP tasks.
FEATURES_TASK_TOML = """
[task]
name = "toy-features"
description = "an imported Keras MLP on six features"

[features]
resources = ["f0", "f1", "f2", "f3", "f4", "f5"]

[label]
resource = "label"
classes = ["low", "mid", "high"]

[model]
type = "imported"
kind = "classification"

[training]
optimizer = "sgd"
learning_rate = 0.1
momentum = 0.9
batch_size = 16
local_epochs = 1
"""

#: A raw-window task: 16 readings of 2 resources (32 inputs, channel-major), 3 classes; Adam.
RAW_TASK_TOML = """
[task]
name = "toy-raw"
description = "an imported Keras 1D CNN on raw windows"

[features]
resources = ["ax", "ay"]
sample_rate_hz = 10

[features.window]
size = 16
step = 8
statistics = ["raw"]

[label]
resource = "label"
classes = ["still", "walk", "run"]

[model]
type = "imported"
kind = "classification"

[training]
optimizer = "adam"
learning_rate = 0.02
batch_size = 16
local_epochs = 1
"""

LENGTH, CHANNELS, FEATURES, CLASSES = 16, 2, 6, 3


def features_task() -> TaskSpec:
    return parse_task_spec(FEATURES_TASK_TOML)


def raw_task() -> TaskSpec:
    return parse_task_spec(RAW_TASK_TOML)


def features_x(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, FEATURES)).astype(np.float32)


def windows_x(n: int, seed: int) -> np.ndarray:
    """Windows as Keras reads them: ``(n, length, channels)``."""
    return np.random.default_rng(seed).normal(size=(n, LENGTH, CHANNELS)).astype(np.float32)


def channel_major(windows: np.ndarray) -> np.ndarray:
    """The same windows as fedge feeds them: ``x[c * length + t]`` (task.py ``raw_shape``)."""
    return np.ascontiguousarray(np.transpose(windows, (0, 2, 1)).reshape(len(windows), -1))


def _fit_briefly(model: Any, x: np.ndarray, seed: int) -> None:
    """A user's model is trained: a few epochs on labels it can learn."""
    y = (x.reshape(len(x), -1)[:, 0] > 0).astype(np.int32) + (x.reshape(len(x), -1)[:, 1] > 0.5)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=2, batch_size=32, verbose=0, shuffle=False)


def _unusual_batch_norm(model: Any, seed: int) -> None:
    """Moving statistics, gamma and beta far from (0, 1, 1, 0): folding must use all four."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            n = layer.get_weights()[0].shape[0]
            gamma, beta = rng.uniform(0.5, 2.0, n), rng.normal(0, 0.5, n)
            mean, variance = rng.normal(0, 0.5, n), rng.uniform(0.2, 3.0, n)
            # Keras lists gamma (if scale), beta (if center), then the moving mean and variance.
            weights = [gamma] if layer.scale else []
            weights += [beta] if layer.center else []
            layer.set_weights([w.astype(np.float32) for w in (*weights, mean, variance)])


def mlp_model(seed: int = 0) -> Any:
    """Dense(relu) -> BatchNormalization -> Dropout -> Dense(tanh) -> Dropout -> Dense(softmax)."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(16, activation="relu", name="base"),
            keras.layers.BatchNormalization(name="base_bn"),
            keras.layers.Dropout(0.3, name="base_drop"),
            keras.layers.Dense(8, activation="tanh", name="hidden"),
            keras.layers.Dropout(0.2, name="head_drop"),
            keras.layers.Dense(CLASSES, activation="softmax", name="out"),
        ],
        name="vendor_mlp",
    )
    _fit_briefly(model, features_x(256, seed), seed)
    _unusual_batch_norm(model, seed)
    return model


def cnn_model(seed: int = 0) -> Any:
    """Conv1D -> BatchNormalization -> ReLU -> MaxPooling1D -> Conv1D(relu) ->
    GlobalAveragePooling1D -> Dense(relu) -> Dropout -> Dense(softmax), Sequential."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((LENGTH, CHANNELS)),
            keras.layers.Conv1D(8, 3, padding="same", name="conv1"),
            keras.layers.BatchNormalization(name="bn1"),
            keras.layers.ReLU(name="relu1"),
            keras.layers.MaxPooling1D(2, name="pool1"),
            keras.layers.Conv1D(8, 3, activation="relu", name="conv2"),
            keras.layers.GlobalAveragePooling1D(name="gap"),
            keras.layers.Dense(12, activation="relu", name="fc"),
            keras.layers.Dropout(0.25, name="fc_drop"),
            keras.layers.Dense(CLASSES, activation="softmax", name="out"),
        ],
        name="vendor_cnn",
    )
    _fit_briefly(model, windows_x(256, seed), seed)
    _unusual_batch_norm(model, seed)
    return model


def cnn_flatten_model(seed: int = 0) -> Any:
    """A functional 1D CNN: Conv1D(linear) -> BatchNormalization (folded into the convolution)
    -> Activation(relu) -> MaxPooling1D -> Flatten -> Dense(sigmoid) -> Dense(softmax)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((LENGTH, CHANNELS), name="window")
    h = keras.layers.Conv1D(6, 5, strides=1, name="conv")(inputs)
    h = keras.layers.BatchNormalization(name="conv_bn")(h)
    h = keras.layers.Activation("relu", name="act")(h)
    h = keras.layers.MaxPooling1D(2, padding="same", name="pool")(h)
    h = keras.layers.Flatten(name="flat")(h)
    h = keras.layers.Dense(10, activation="sigmoid", name="fc")(h)
    outputs = keras.layers.Dense(CLASSES, activation="softmax", name="out")(h)
    model = keras.Model(inputs, outputs, name="vendor_cnn_flatten")
    _fit_briefly(model, windows_x(256, seed), seed)
    _unusual_batch_norm(model, seed)
    return model


def every_layer_model(seed: int = 0) -> Any:
    """Every supported layer and option not in the models above, on raw windows: a strided
    tanh Conv1D, AveragePooling1D, a BatchNormalization after a non-linearity (a constant scale
    and offset), a Dense on a sequence, a Conv1D without bias and a BatchNormalization without
    beta folded into it, GlobalMaxPooling1D, Reshape, a ReLU and a Softmax layer in the head."""
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((LENGTH, CHANNELS)),
            layers.Conv1D(6, 3, strides=2, padding="same", activation="tanh", name="conv_tanh"),
            layers.AveragePooling1D(2, name="avg"),
            layers.BatchNormalization(name="bn_affine"),
            layers.Dense(5, activation="sigmoid", name="per_step"),
            layers.Conv1D(4, 2, use_bias=False, name="conv_nobias"),
            layers.BatchNormalization(center=False, name="bn_nobeta"),
            layers.GlobalMaxPooling1D(name="gmp"),
            layers.Reshape((2, 2), name="grid"),
            layers.Flatten(name="flat"),
            layers.Dense(6, name="fc"),
            layers.ReLU(name="fc_relu"),
            layers.Dropout(0.1, name="fc_drop"),
            layers.Dense(CLASSES, name="out"),
            layers.Softmax(name="probs"),
        ],
        name="vendor_every_layer",
    )
    _fit_briefly(model, windows_x(256, seed), seed)
    _unusual_batch_norm(model, seed)
    return model


def head_weights(model: Any, names: Sequence[str]) -> np.ndarray:
    """The named layers' weights (kernel, bias) as fedge's flat vector: what an import trains."""
    return np.concatenate(
        [np.asarray(w, np.float32).ravel() for name in names for w in model.get_layer(name).get_weights()]
    )


def set_head_weights(model: Any, names: Sequence[str], flat: np.ndarray) -> None:
    """Loads a fedge flat weight vector into the named Keras layers (the inverse of head_weights)."""
    offset = 0
    for name in names:
        layer = model.get_layer(name)
        parts = []
        for w in layer.get_weights():
            parts.append(flat[offset : offset + w.size].reshape(w.shape))
            offset += w.size
        layer.set_weights(parts)
    assert offset == flat.size


def all_weights_sha256(model: Any) -> str:
    """SHA-256 of every weight, layer by layer, little-endian float32: the manifest's
    ``imported.weights_sha256`` computed independently of the import."""
    raw = b"".join(np.asarray(w, "<f4").tobytes() for layer in model.layers for w in layer.get_weights())
    return hashlib.sha256(raw).hexdigest()


def write_task(path: Path, toml: str) -> Path:
    path.write_text(toml)
    return path


__all__ = [
    "CHANNELS",
    "CLASSES",
    "FEATURES",
    "FEATURES_TASK_TOML",
    "LENGTH",
    "RAW_TASK_TOML",
    "all_weights_sha256",
    "channel_major",
    "cnn_flatten_model",
    "cnn_model",
    "every_layer_model",
    "features_task",
    "features_x",
    "head_weights",
    "keras",
    "mlp_model",
    "raw_task",
    "set_head_weights",
    "windows_x",
    "write_task",
]
