"""``fedge model import``: a user's trained Keras model -> fedge's model directory.

A vendor's model (a Keras MLP, or a 1D CNN on raw sensor windows) becomes the same directory
``fedge model build`` writes, so agents and the aggregator train it unchanged. Its layers are
split in two:

- the **frozen base**, every layer before the last N Dense layers, becomes constants of the
  inference path: convolutions, pooling and reshapes as TFLite builtins, BatchNormalization
  folded into the preceding convolution or Dense layer (or a constant scale and offset),
  Dropout removed;
- the **trainable head**, the last N Dense layers (Dropout and Activation/ReLU layers between
  them allowed), is a :class:`~fedge.aggregator.trainable_mlp.TrainableDense`: raw variables
  and the same hand-written backward pass and optimizers as fedge's own MLP. Keras itself is
  not converted: a Keras 3 model needs Flex ops to train, and TensorFlow's autodiff pulls in
  more (``ReluGrad``, ``BroadcastGradientArgs``).

Only the head's weights are the model's flat weight vector: what devices train, what updates
carry and what the aggregator averages. The conversion goes through
:func:`~fedge.aggregator.model_export.convert_module`, which refuses any Flex op.

Every problem with the input is a one-line :class:`ModelImportError`: the first unsupported
layer with its index in ``model.layers``, its name and its class; a head that would reach a
layer other than Dense; shapes that do not fit the task. Nothing is written before the whole
model has converted.
"""

from __future__ import annotations

import hashlib
import importlib
import re
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import tensorflow as tf

from fedge.aggregator.model_export import MODEL_FILE, BuiltModel, convert_module
from fedge.aggregator.trainable_mlp import HEAD_ACTIVATIONS, HeadActivation, TrainableDense
from fedge.protocol.errors import FedgeError
from fedge.protocol.model_manifest import (
    MAX_IMPORTED_PARAMETERS,
    MAX_IMPORTED_TRAINABLE_LAYERS,
    ImportedLayer,
    ImportedModel,
    ModelManifest,
    Normalisation,
    TensorLayout,
)
from fedge.protocol.task import TaskSpec
from fedge.protocol.weights import weights_to_bytes


class ModelImportError(FedgeError):
    """The Keras model cannot become a fedge model; the one-line message says which layer or
    shape and why."""


#: The Keras layer classes an imported model may hold, in the order the docs list them.
SUPPORTED_LAYERS: tuple[str, ...] = (
    "InputLayer",
    "Dense",
    "Conv1D",
    "MaxPooling1D",
    "AveragePooling1D",
    "GlobalAveragePooling1D",
    "GlobalMaxPooling1D",
    "Flatten",
    "Reshape",
    "BatchNormalization",
    "Dropout",
    "Activation",
    "ReLU",
    "Softmax",
)
#: Activations a layer may apply (``Dense``, ``Conv1D``, ``Activation``); in the trainable head
#: softmax only ends the last layer (its logits go to the loss, its probabilities to ``infer``).
ACTIVATIONS: tuple[str, ...] = ("relu", "tanh", "sigmoid", "softmax", "linear")
#: Layers that may sit between the trainable Dense layers: removed, or an activation.
_BETWEEN_DENSE = ("Dropout", "Activation", "ReLU", "Softmax")
_TRAINABLE_RE = re.compile(r"last:([0-9]{1,3})")
#: The HDF5 signature: a legacy ``.h5`` Keras file starts with it.
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"

Tensor = Any  # tf.Tensor: TensorFlow ships no type stubs
Step = Callable[[Tensor], Tensor]


def _keras() -> ModuleType:
    """Keras, imported only when an import runs (it comes with TensorFlow). Through importlib:
    Keras ships no type stubs, and a module's attributes are ``Any`` to mypy either way."""
    return importlib.import_module("keras")


def parse_trainable(text: str) -> int:
    """``last:N`` -> N, the number of Dense layers at the model's end that train on devices."""
    match = _TRAINABLE_RE.fullmatch(text)
    n = int(match.group(1)) if match else 0
    if not 1 <= n <= MAX_IMPORTED_TRAINABLE_LAYERS:
        raise ModelImportError(
            f"--trainable must be last:N, N the number of Dense layers at the model's end that train "
            f"(1..{MAX_IMPORTED_TRAINABLE_LAYERS}), got {text!r}"
        )
    return n


# --- loading -------------------------------------------------------------------------------------


def load_keras_model(path: Path) -> tuple[Any, str]:
    """The Keras model in a ``.keras`` (or legacy ``.h5``) file and the file's SHA-256.

    The file is checked before Keras sees it: Keras reports a corrupt archive as "file not
    found". Keras loads it with ``safe_mode`` (no arbitrary code from ``Lambda`` layers) and
    without its training configuration, which fedge does not use.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ModelImportError(f"cannot read Keras model {path}: {exc.strerror}") from None
    if path.suffix == ".h5":
        if not raw.startswith(_HDF5_MAGIC):
            raise ModelImportError(f"{path} is not a Keras .h5 file (no HDF5 signature)")
    elif path.suffix == ".keras":
        if not zipfile.is_zipfile(path):
            raise ModelImportError(f"{path} is not a .keras file (not a zip archive)")
    else:
        raise ModelImportError(f"{path}: --keras takes a .keras file (or a legacy .h5 file)")
    keras = _keras()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises many types for a damaged or foreign file
        raise ModelImportError(f"cannot load Keras model {path}: {_first_line(exc)}") from None
    return model, hashlib.sha256(raw).hexdigest()


def refuse_saved_model(path: Path) -> None:
    """``--saved-model DIR``: always an error, saying why and what to do instead.

    A SavedModel keeps TensorFlow graphs, not Keras layers; Keras 3's ``load_model`` does not
    read it and ``keras.layers.TFSMLayer`` gives one opaque layer, so there is nothing to freeze
    layer by layer or to train."""
    if not (path / "saved_model.pb").is_file():
        raise ModelImportError(f"{path}: no SavedModel here (no saved_model.pb)")
    raise ModelImportError(
        f"{path}: a SavedModel holds graphs, not the Keras layers an import freezes and trains "
        f"(Keras {_keras().__version__} cannot load it as layers); save the model as .keras "
        "(model.save('model.keras')) and pass --keras"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


# --- the model's layers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layer:
    """A Keras layer with its index in ``model.layers`` (what error messages name) and the
    shapes it reads and gives, without the batch dimension."""

    index: int
    layer: Any
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]

    @property
    def name(self) -> str:
        return str(self.layer.name)

    @property
    def cls(self) -> str:
        return type(self.layer).__name__

    def where(self) -> str:
        return f"layer {self.index} {self.name!r} ({self.cls})"

    def config(self) -> dict[str, Any]:
        return dict(self.layer.get_config())

    def error(self, problem: str) -> ModelImportError:
        return ModelImportError(f"{self.where()}: {problem}")

    def weights(self) -> list[np.ndarray]:
        return [np.asarray(w) for w in self.layer.get_weights()]


def model_layers(model: Any) -> list[_Layer]:
    """The model's layers in order (``InputLayer`` left out), each checked to be supported and
    fed by the one before it, with the shapes Keras computes for them.

    Sequential models and functional models that are a single chain (one input, one output,
    every layer reading the previous one's output, as the saved config records it) qualify; the
    first layer that is not supported, or breaks the chain, is the error.
    """
    kind = type(model).__name__
    if kind not in ("Sequential", "Functional"):
        raise ModelImportError(f"a {kind} model is not supported; only Sequential and functional models")
    if not getattr(model, "built", False) or not getattr(model, "inputs", None):
        raise ModelImportError(
            "the Keras model has no input shape; build it with keras.Input(shape=...) before saving it"
        )
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelImportError(
            f"the Keras model has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
            "only models with one input and one output can be imported"
        )
    sources = _functional_sources(model) if kind == "Functional" else {}
    shape: tuple[Any, ...] = tuple(model.inputs[0].shape)
    previous: _Layer | None = None
    layers: list[_Layer] = []
    for index, layer in enumerate(model.layers):
        cls = type(layer).__name__
        if cls not in SUPPORTED_LAYERS:
            supported = ", ".join(SUPPORTED_LAYERS)
            raise ModelImportError(
                f"layer {index} {layer.name!r} ({cls}) is not supported; supported: {supported}"
            )
        if cls == "InputLayer":
            continue
        out = tuple(layer.compute_output_shape(shape))
        entry = _Layer(index, layer, _dims(shape), _dims(out))
        wanted = previous.name if previous is not None else sources.get("")
        if kind == "Functional" and sources.get(entry.name) != wanted:
            after = previous.where() if previous is not None else "the model's input"
            raise entry.error(
                f"does not read the output of {after} alone; only a single chain of layers can be imported"
            )
        _check_config(entry)
        layers.append(entry)
        previous, shape = entry, out
    if previous is None:
        raise ModelImportError("the Keras model has no layers")
    if kind == "Functional" and sources.get("<output>") != previous.name:
        raise ModelImportError(
            f"the Keras model's output is not that of its last layer {previous.where()}; only a single "
            "chain of layers can be imported"
        )
    return layers


def _functional_sources(model: Any) -> dict[str, str]:
    """From a functional model's saved config: the one layer each layer reads (``""`` for a
    layer that reads more than one tensor, or is called more than once), the model's input
    layer under ``""`` and its output layer under ``"<output>"``."""
    config = model.get_config()
    sources: dict[str, str] = {}
    for layer in config.get("layers", []):
        nodes = layer.get("inbound_nodes", [])
        if layer.get("class_name") == "InputLayer":
            sources[""] = layer.get("name", "")
            continue
        histories = [
            arg.get("config", {}).get("keras_history", [None])[0]
            for node in nodes
            for arg in [*node.get("args", []), *node.get("kwargs", {}).values()]
            if isinstance(arg, dict) and arg.get("class_name") == "__keras_tensor__"
        ]
        sources[layer.get("name", "")] = histories[0] if len(nodes) == 1 and len(histories) == 1 else "<many>"
    outputs = config.get("output_layers", [])
    single = outputs[0] if outputs and isinstance(outputs[0], list) and len(outputs) == 1 else outputs
    sources["<output>"] = single[0] if single and isinstance(single[0], str) else ""
    return sources


def _dims(shape: Sequence[Any]) -> tuple[int, ...]:
    """A Keras shape without its batch dimension; an open dimension (None) is 0, refused later."""
    return tuple(int(d) if d is not None else 0 for d in shape[1:])


def _check_config(entry: _Layer) -> None:
    """Options of a supported layer that the conversion does not reproduce are errors too."""
    cfg = entry.config()
    policy = getattr(getattr(entry.layer, "dtype_policy", None), "name", "float32")
    if policy != "float32":
        raise entry.error(f"dtype policy {policy!r} is not supported; float32 only")
    for w in entry.weights():
        if w.dtype != np.float32:
            raise entry.error(f"weights of dtype {w.dtype} are not supported; float32 only")
    if "activation" in cfg and entry.cls != "InputLayer":
        activation = cfg["activation"]
        if activation not in ACTIVATIONS:
            raise entry.error(
                f"activation {activation!r} is not supported; supported: {', '.join(ACTIVATIONS)}"
            )
    if cfg.get("data_format", "channels_last") != "channels_last":
        raise entry.error(f"data_format {cfg['data_format']!r} is not supported; channels_last only")
    cls = entry.cls
    problem = ""
    if cls in ("Conv1D", "MaxPooling1D", "AveragePooling1D") and cfg["padding"] not in ("valid", "same"):
        problem = f"padding {cfg['padding']!r} is not supported; supported: valid, same"
    elif cls == "Conv1D" and (tuple(cfg["dilation_rate"]) != (1,) or cfg["groups"] != 1):
        problem = "dilation_rate and groups other than 1 are not supported"
    elif cls == "Dense" and (
        cfg.get("quantization_config") is not None or getattr(entry.layer, "lora_enabled", False)
    ):
        problem = "a quantized or LoRA Dense layer is not supported"
    elif cls == "ReLU" and (
        cfg["max_value"] is not None or cfg["negative_slope"] != 0 or cfg["threshold"] != 0
    ):
        problem = "only a plain ReLU is supported (no max_value, negative_slope or threshold)"
    elif cls == "Softmax" and cfg.get("axis", -1) != -1:
        problem = "only a softmax over the last axis is supported"
    elif cls == "BatchNormalization" and (
        cfg.get("renorm") or cfg["axis"] not in (-1, len(entry.input_shape))
    ):
        problem = "only a BatchNormalization over the last axis, without renorm, is supported"
    if problem:
        raise entry.error(problem)


def _activation(entry: _Layer) -> str:
    """The activation a layer applies (linear for layers that apply none)."""
    if entry.cls == "ReLU":
        return "relu"
    if entry.cls == "Softmax":
        return "softmax"
    return str(entry.config().get("activation", "linear"))


# --- the split: frozen base and trainable head --------------------------------------------------------


@dataclass(frozen=True)
class ImportPlan:
    """What becomes what: the frozen layers, the trainable Dense layers with their activation
    chains, and the head's initial weights in their layout."""

    input_shape: tuple[int, ...]
    frozen: tuple[_Layer, ...]
    head: tuple[_Layer, ...]
    chains: tuple[tuple[HeadActivation, ...], ...]
    layout: tuple[TensorLayout, ...]
    weights: np.ndarray


def plan_import(model: Any, task: TaskSpec, trainable: int) -> ImportPlan:
    """Checks the Keras model against the task and splits it; no TensorFlow graph yet."""
    layers = model_layers(model)
    source = model.inputs[0]
    dims = tuple(source.shape[1:])
    if None in dims or str(source.dtype) != "float32":
        shown = "(" + ", ".join("None" if d is None else str(d) for d in dims) + ")"
        raise ModelImportError(
            f"the Keras model's input is {source.dtype} of shape {shown}; fedge feeds float32 "
            "inputs of a fixed shape"
        )
    input_shape = tuple(int(d) for d in dims)
    _check_input(input_shape, task)
    start = _head_start(layers, trainable)
    frozen, head_layers = tuple(layers[:start]), layers[start:]
    dense = [entry for entry in head_layers if entry.cls == "Dense"]
    if len(dense[0].input_shape) != 1:
        raise dense[0].error(
            f"reads a tensor of shape {dense[0].input_shape}; a trainable Dense layer must read a "
            "flat vector (put Flatten or a global pooling layer before the trainable layers)"
        )
    chains: list[list[str]] = []
    for entry in head_layers:
        if entry.cls == "Dense":
            chains.append([])
        activation = _activation(entry)
        if activation != "linear":
            chains[-1].append(activation)
    _check_output(layers[-1], dense[-1], chains[-1], task)
    if chains[-1] == ["softmax"]:
        chains[-1] = []  # logits: the loss applies log_softmax, infer applies softmax
    layout, weights = _head_weights(dense)
    return ImportPlan(
        input_shape=input_shape,
        frozen=frozen,
        head=tuple(dense),
        chains=tuple(_trainable_chain(entry, chain) for entry, chain in zip(dense, chains, strict=True)),
        layout=layout,
        weights=weights,
    )


def _trainable_chain(entry: _Layer, chain: Sequence[str]) -> tuple[HeadActivation, ...]:
    """A trainable layer's activations, each one the hand-written backward pass differentiates."""
    trainable: list[HeadActivation] = []
    for name in chain:
        activation = next((a for a in HEAD_ACTIVATIONS if a == name), None)
        if activation is None:
            raise entry.error(f"a {name} can only end the last layer; it cannot train inside the head")
        trainable.append(activation)
    return tuple(trainable)


def _check_input(shape: tuple[int, ...], task: TaskSpec) -> None:
    """fedge feeds ``x`` of shape ``[n, input_dim]``: a Keras input ``(d,)`` must have d =
    input_dim; ``(length, channels)`` needs a raw-window task of that many readings of that many
    resources, whose channel-major vector the model reshapes and transposes itself."""
    if len(shape) == 1 and shape[0] == task.input_dim:
        return
    if len(shape) == 2:
        length, channels = shape
        raw = task.features.raw_shape
        if raw == (channels, length):
            return
        if raw is not None:
            raise ModelImportError(
                f"the Keras model reads windows of shape ({length}, {channels}) (readings, channels); "
                f"task {task.name!r} feeds windows of {raw[1]} readings of {raw[0]} resources, "
                f"shape ({raw[1]}, {raw[0]})"
            )
        raise ModelImportError(
            f"the Keras model reads windows of shape ({length}, {channels}) (readings, channels); task "
            f"{task.name!r} feeds {task.input_dim} features, shape ({task.input_dim},): a window model "
            f'needs [features.window] size = {length}, statistics = ["raw"] over {channels} resources'
        )
    if len(shape) == 1:
        raise ModelImportError(
            f"the Keras model's input has shape {shape}; task {task.name!r} feeds shape ({task.input_dim},): "
            f"its [features] must give the {shape[0]} inputs the model was trained on, in that order"
        )
    raise ModelImportError(
        f"the Keras model's input has shape {shape}; only (features,) or (readings, channels) inputs "
        "can be imported"
    )


def _head_start(layers: Sequence[_Layer], trainable: int) -> int:
    """Index in ``layers`` of the first trainable Dense layer: the ``trainable``-th Dense from
    the end, with only Dropout and Activation/ReLU/Softmax layers between them."""
    seen = 0
    for position in range(len(layers) - 1, -1, -1):
        entry = layers[position]
        if entry.cls == "Dense":
            seen += 1
            if seen == trainable:
                return position
        elif entry.cls not in _BETWEEN_DENSE:
            if seen == 0:
                raise entry.error(
                    "comes after the model's last Dense layer, and only Dense layers train on devices "
                    f"(only {', '.join(_BETWEEN_DENSE)} may follow them): end the model with a Dense layer"
                )
            raise entry.error(
                f"--trainable last:{trainable} would train it, and only Dense layers train on devices "
                f"({', '.join(_BETWEEN_DENSE)} may sit between them): use --trainable last:{seen} or fewer"
            )
    raise ModelImportError(
        f"--trainable last:{trainable} asks for {trainable} Dense layers, the model has {seen}: "
        f"use --trainable last:{seen} or fewer"
    )


def _check_output(last: _Layer, dense: _Layer, chain: Sequence[str], task: TaskSpec) -> None:
    """The model must give what the task's loss expects: ``output_dim`` logits or probabilities
    (classification), or one linear value (regression)."""
    shape = last.output_shape
    if shape != (task.output_dim,):
        wanted = f"{task.output_dim} classes" if task.model.kind == "classification" else "one value"
        raise ModelImportError(
            f"the Keras model's output has shape {shape}; task {task.name!r} ({task.model.kind}) needs "
            f"({task.output_dim},): {wanted}"
        )
    if task.model.kind == "classification" and list(chain) not in ([], ["softmax"]):
        raise dense.error(
            f"ends the model with {' then '.join(chain)}; a classification needs a softmax or "
            "logits (a linear activation) at the end"
        )
    if task.model.kind == "regression" and chain:
        raise dense.error(f"ends the model with {' then '.join(chain)}; a regression needs a linear output")


def _head_weights(dense: Sequence[_Layer]) -> tuple[tuple[TensorLayout, ...], np.ndarray]:
    """The trainable layers' kernels and biases: their layout and one flat float32 vector."""
    layout: list[TensorLayout] = []
    parts: list[np.ndarray] = []
    offset = 0
    for entry in dense:
        if "/" in entry.name:
            raise entry.error("a trainable layer's name must not contain '/'")
        weights = entry.weights()
        for part, array in zip(("kernel", "bias"), weights, strict=False):
            layout.append(TensorLayout(f"{entry.name}/{part}", tuple(array.shape), offset))
            offset += array.size
            parts.append(array.astype(np.float32).ravel())
    if offset > MAX_IMPORTED_PARAMETERS:
        raise ModelImportError(
            f"the trainable layers have {offset} parameters, over the limit {MAX_IMPORTED_PARAMETERS}; "
            "train fewer layers"
        )
    return tuple(layout), np.concatenate(parts)


# --- the frozen base as TensorFlow ops on constants --------------------------------------------------


def input_path(plan: ImportPlan) -> Callable[[Tensor], Tensor]:
    """The function from fedge's flat ``x`` to the first trainable layer's input.

    Every weight is a numpy constant captured by the traced function, so the converted model
    holds it as a constant, not a variable. BatchNormalization right after a convolution or a
    Dense layer (no activation between) is folded into its kernel and bias; elsewhere it is a
    constant scale and offset.
    """
    steps: list[Step] = []
    if len(plan.input_shape) == 2:
        length, channels = plan.input_shape
        steps.append(_windows_step(channels, length))
    linear: tuple[np.ndarray, np.ndarray] | None = None  # a kernel and bias BatchNormalization may fold into
    pending: _Layer | None = None  # the Conv1D or Dense layer that kernel and bias belong to
    for entry in plan.frozen:
        if entry.cls == "BatchNormalization":
            scale, offset = _batch_norm(entry)
            if linear is not None:
                linear = (linear[0] * scale, linear[1] * scale + offset)
                continue
            steps.append(_affine_step(scale, offset))
            continue
        if linear is not None and pending is not None:
            steps.append(_linear_step(pending, *linear))
            linear = pending = None
        if entry.cls in ("Conv1D", "Dense"):
            weights = entry.weights()
            kernel = weights[0]
            bias = weights[1] if len(weights) > 1 else np.zeros(kernel.shape[-1], np.float32)
            if _activation(entry) == "linear":
                linear, pending = (kernel, bias), entry
            else:
                steps.append(_linear_step(entry, kernel, bias))
                steps.append(_activation_step(_activation(entry)))
            continue
        steps.extend(_shape_steps(entry))
    if linear is not None and pending is not None:
        steps.append(_linear_step(pending, *linear))

    def path(x: Tensor) -> Tensor:
        for step in steps:
            x = step(x)
        return x

    return path


def _batch_norm(entry: _Layer) -> tuple[np.ndarray, np.ndarray]:
    """Inference-time BatchNormalization as ``x * scale + offset`` per channel."""
    layer = entry.layer
    epsilon = float(entry.config()["epsilon"])
    mean = np.asarray(layer.moving_mean, np.float64)
    variance = np.asarray(layer.moving_variance, np.float64)
    gamma = np.asarray(layer.gamma, np.float64) if layer.gamma is not None else np.ones_like(mean)
    beta = np.asarray(layer.beta, np.float64) if layer.beta is not None else np.zeros_like(mean)
    scale = gamma / np.sqrt(variance + epsilon)
    return scale.astype(np.float32), (beta - mean * scale).astype(np.float32)


def _linear_step(entry: _Layer, kernel: np.ndarray, bias: np.ndarray) -> Step:
    """A Conv1D or Dense layer's kernel and bias as TFLite builtins (CONV_2D, FULLY_CONNECTED)."""
    kernel, bias = kernel.astype(np.float32), bias.astype(np.float32)
    if entry.cls == "Conv1D":
        cfg = entry.config()
        stride, padding = int(cfg["strides"][0]), str(cfg["padding"]).upper()
        return lambda h: tf.nn.conv1d(h, kernel, stride=stride, padding=padding) + bias
    if len(entry.input_shape) == 1:
        return lambda h: tf.matmul(h, kernel) + bias
    # Dense on a sequence applies to its last axis: fold the other axes into the batch.
    inner = entry.input_shape[:-1]
    return lambda h: tf.reshape(
        tf.matmul(tf.reshape(h, [-1, kernel.shape[0]]), kernel) + bias, [-1, *inner, kernel.shape[1]]
    )


def _windows_step(channels: int, length: int) -> Step:
    """fedge's raw windows are channel-major (``x[c * length + t]``); Conv1D reads
    ``(length, channels)``: a reshape and a transpose, both builtins."""

    def windows(x: Tensor) -> Tensor:
        return tf.transpose(tf.reshape(x, [-1, channels, length]), [0, 2, 1])

    return windows


def _affine_step(scale: np.ndarray, offset: np.ndarray) -> Step:
    """A BatchNormalization with nothing to fold into: a constant scale and offset per channel."""

    def affine(h: Tensor) -> Tensor:
        return h * scale + offset

    return affine


def _activation_step(activation: str) -> Step:
    """One of :data:`ACTIVATIONS` as a builtin op (RELU, TANH, LOGISTIC, SOFTMAX)."""

    def activate(h: Tensor) -> Tensor:
        if activation == "relu":
            return tf.nn.relu(h)
        if activation == "tanh":
            return tf.tanh(h)
        if activation == "sigmoid":
            return tf.sigmoid(h)
        if activation == "softmax":
            return tf.nn.softmax(h, axis=-1)
        return h

    return activate


def _shape_steps(entry: _Layer) -> list[Step]:
    """Layers without weights: pooling, reshapes, activations; Dropout is removed."""
    cfg = entry.config()
    cls = entry.cls
    if cls == "Dropout":
        return []
    if cls in ("Activation", "ReLU", "Softmax"):
        return [_activation_step(_activation(entry))]
    if cls in ("MaxPooling1D", "AveragePooling1D"):
        size = int(cfg["pool_size"][0])
        stride = int(cfg["strides"][0]) if cfg.get("strides") else size
        padding = str(cfg["padding"]).upper()
        pool = tf.nn.max_pool1d if cls == "MaxPooling1D" else tf.nn.avg_pool1d
        return [lambda h: pool(h, ksize=size, strides=stride, padding=padding)]
    if cls in ("GlobalAveragePooling1D", "GlobalMaxPooling1D"):
        reduce = tf.reduce_mean if cls == "GlobalAveragePooling1D" else tf.reduce_max
        keepdims = bool(cfg.get("keepdims", False))
        return [lambda h: reduce(h, axis=1, keepdims=keepdims)]
    # Flatten and Reshape: the layer's own output shape, the batch left open.
    shape = list(entry.output_shape)
    return [lambda h: tf.reshape(h, [-1, *shape])]


# --- the import as a whole ---------------------------------------------------------------------------


def _weights_sha256(model: Any) -> str:
    """SHA-256 of every weight of the Keras model, layer by layer as Keras lists them, as
    little-endian float32: names the imported weights whatever file they came in."""
    digest = hashlib.sha256()
    for layer in model.layers:
        for w in layer.get_weights():
            digest.update(np.asarray(w, dtype="<f4").tobytes())
    return digest.hexdigest()


def import_keras_model(
    path: Path, task: TaskSpec, trainable: int, normalisation: Normalisation | None = None
) -> BuiltModel:
    """Loads, checks, splits and converts a Keras model for ``task``; nothing is written.

    The task's model must be ``type = "imported"``. Without ``normalisation`` the manifest
    carries the identity (mean 0, std 1): the Keras model was trained on its own scaling, so
    devices feed it their features as they are and no moments round changes them.
    """
    if task.model.type != "imported":
        raise ModelImportError(
            f'task {task.name!r} has [model] type = {task.model.type!r}; an import needs type = "imported" '
            "(with kind, without hidden and seed: the layers come from the Keras model)"
        )
    if normalisation is not None and len(normalisation.mean) != task.input_dim:
        raise ModelImportError(
            f"normalisation has {len(normalisation.mean)} features, the task has {task.input_dim}"
        )
    model, keras_sha256 = load_keras_model(path)
    plan = plan_import(model, task, trainable)
    module = TrainableDense(
        task, plan.layout, plan.weights, plan.chains, input_path=input_path(plan), name="fedge_imported"
    )
    tflite = convert_module(module, module.signatures())
    imported = ImportedModel(
        keras_file=path.name,
        keras_sha256=keras_sha256,
        keras_version=str(_keras().__version__),
        weights_sha256=_weights_sha256(model),
        input_shape=plan.input_shape,
        trainable_layers=tuple(ImportedLayer(e.name, e.cls) for e in plan.head),
        frozen_layers=tuple(ImportedLayer(e.name, e.cls) for e in plan.frozen),
        layout=plan.layout,
    )
    identity = Normalisation((0.0,) * task.input_dim, (1.0,) * task.input_dim)
    manifest = ModelManifest(
        task=task,
        model_file=MODEL_FILE,
        model_sha256=hashlib.sha256(tflite).hexdigest(),
        model_bytes=len(tflite),
        initial_weights_sha256=hashlib.sha256(weights_to_bytes(plan.weights)).hexdigest(),
        normalisation=normalisation if normalisation is not None else identity,
        tensorflow_version=tf.__version__,
        imported=imported,
    )
    return BuiltModel(tflite, manifest, plan.weights)
