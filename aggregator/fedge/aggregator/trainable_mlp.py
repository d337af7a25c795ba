"""A trainable MLP written so that it converts to TFLite with builtin ops only.

Why it looks hand-rolled: on-device training needs the backward pass inside the ``.tflite``.
Letting TensorFlow differentiate pulls in ops TFLite lacks (``ReluGrad``; with an open batch
dimension ``BroadcastGradientArgs``), which would force the Flex delegate and a TensorFlow-sized
runtime onto the device. Writing the backward pass out by hand with ``MatMul``, ``Mul`` and
reductions keeps every op a TFLite builtin. Keras is avoided for the same reason (Keras 3
models need Flex to train).

Weights live in raw ``tf.Variable`` s and are read and written only through the ``get_weights``
and ``set_weights`` signatures (LiteRT cannot address resource variables by tensor index).

:class:`TrainableDense` is the general form: trainable dense layers, each with a chain of
activations, after an optional frozen input path of constants. The task's MLP
(:class:`TrainableMLP`) and an imported Keras model's head (:mod:`fedge.aggregator.keras_import`)
are both one, so both train with the same hand-written backward pass and optimizers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import tensorflow as tf

from fedge.protocol.model_manifest import TensorLayout, mlp_tensor_layout
from fedge.protocol.task import TaskSpec

#: The activations a trainable layer may apply, each with a derivative written from its output.
#: Softmax is not among them: a classifier's last layer gives logits, and the loss applies
#: ``log_softmax`` (its gradient is ``(softmax - onehot) / n``, no Jacobian needed).
HeadActivation = Literal["relu", "tanh", "sigmoid", "linear"]
HEAD_ACTIVATIONS: tuple[HeadActivation, ...] = ("relu", "tanh", "sigmoid", "linear")
#: The frozen path before the trainable layers: a function of TensorFlow ops on constants only.
InputPath = Callable[[tf.Tensor], tf.Tensor]


def initial_weights(task: TaskSpec) -> np.ndarray:
    """Glorot-uniform kernels and zero biases, as one flat float32 vector (seeded by the task)."""
    rng = np.random.default_rng(task.model.seed)
    parts: list[np.ndarray] = []
    for tensor in mlp_tensor_layout(task.layer_sizes):
        if tensor.name.endswith("/kernel"):
            fan_in, fan_out = tensor.shape
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            parts.append(rng.uniform(-limit, limit, tensor.shape).astype(np.float32).ravel())
        else:
            parts.append(np.zeros(tensor.size, np.float32))
    return np.concatenate(parts)


class TrainableDense(tf.Module):  # type: ignore[misc]  # TensorFlow ships no type stubs
    """Trainable dense layers and their optimizer as a ``tf.Module`` with the five fedge signatures.

    ``layout`` names each layer's tensors in order: ``<layer>/kernel`` ``[n_in, n_out]``, then
    ``<layer>/bias`` ``[n_out]`` unless the layer has none. ``activations`` holds, per layer, the
    activations applied to its output in order (``()`` for a linear layer; the last layer's
    output is the logits of a classification or the value of a regression). ``input_path``
    maps the model's input ``x`` to the first layer's input with constants only: nothing before
    the first trainable layer trains, and the backward pass stops there.
    """

    def __init__(
        self,
        task: TaskSpec,
        layout: Sequence[TensorLayout],
        weights: np.ndarray,
        activations: Sequence[Sequence[HeadActivation]],
        input_path: InputPath | None = None,
        name: str = "fedge_dense",
    ) -> None:
        super().__init__(name=name)
        self.task = task
        self.layout = tuple(layout)
        flat = np.asarray(weights, np.float32)
        self.parameter_count = sum(t.size for t in self.layout)
        if flat.shape != (self.parameter_count,):
            raise ValueError(f"weights must have shape ({self.parameter_count},), got {flat.shape}")
        self.dense_layers = _dense_layers(self.layout)
        if len(activations) != len(self.dense_layers):
            raise ValueError(
                f"{len(self.dense_layers)} layers need as many activation chains, got {len(activations)}"
            )
        # "linear" is the identity: nothing to compute forward, a factor of 1 backward.
        self.activations = [tuple(a for a in chain if a != "linear") for chain in activations]
        self.input_path = input_path
        self.params = [
            tf.Variable(flat[t.offset : t.offset + t.size].reshape(t.shape), name=_variable_name(t.name))
            for t in self.layout
        ]
        train = task.training
        self.classification = task.model.kind == "classification"
        self.n_out = task.output_dim
        self.lr = float(train.learning_rate)
        self.optimizer = train.optimizer
        self.momentum = float(train.momentum)
        self.beta1, self.beta2, self.epsilon = float(train.beta1), float(train.beta2), float(train.epsilon)
        # Optimizer state: one slot per parameter for SGD-with-momentum, two (and a step) for Adam.
        self.slot_m = [tf.Variable(tf.zeros(t.shape), name=f"m_{i}") for i, t in enumerate(self.layout)]
        self.slot_v = [tf.Variable(tf.zeros(t.shape), name=f"v_{i}") for i, t in enumerate(self.layout)]
        self.step = tf.Variable(0.0, name="adam_step")
        # FedProx: the weights the round started from (what set_weights loaded), the anchor of
        # the proximal term. Only in models whose task asks for it: others stay as they were.
        self.mu = float(train.proximal_mu)
        self.anchor = (
            [tf.Variable(p.read_value(), name=f"anchor_{i}") for i, p in enumerate(self.params)]
            if self.mu > 0.0
            else []
        )
        d_in = task.input_dim
        y_spec = tf.TensorSpec([None], tf.int32 if self.classification else tf.float32, name="y")
        x_spec = tf.TensorSpec([None, d_in], tf.float32, name="x")
        self.train = tf.function(self._train, input_signature=[x_spec, y_spec])
        self.infer = tf.function(self._infer, input_signature=[x_spec])
        self.evaluate = tf.function(self._evaluate, input_signature=[x_spec, y_spec])
        self.get_weights = tf.function(self._get_weights, input_signature=[])
        self.set_weights = tf.function(
            self._set_weights,
            input_signature=[tf.TensorSpec([self.parameter_count], tf.float32, name="weights")],
        )

    def signatures(self) -> dict[str, Any]:
        return {
            "train": self.train.get_concrete_function(),
            "infer": self.infer.get_concrete_function(),
            "evaluate": self.evaluate.get_concrete_function(),
            "get_weights": self.get_weights.get_concrete_function(),
            "set_weights": self.set_weights.get_concrete_function(),
        }

    # --- forward and loss ----------------------------------------------------------------

    def _forward(self, x: tf.Tensor) -> tuple[list[tf.Tensor], list[list[tf.Tensor]], tf.Tensor]:
        """Returns every layer's input and the output of each of its activations (for
        backprop), and the last layer's output (logits or values)."""
        h = x if self.input_path is None else self.input_path(x)
        inputs: list[tf.Tensor] = []
        outputs: list[list[tf.Tensor]] = []
        for (kernel, bias), chain in zip(self.dense_layers, self.activations, strict=True):
            inputs.append(h)
            h = tf.matmul(h, self.params[kernel])
            if bias is not None:
                h = h + self.params[bias]
            stages: list[tf.Tensor] = []
            for activation in chain:
                h = _activate(activation, h)
                stages.append(h)
            outputs.append(stages)
        return inputs, outputs, h

    def _loss_and_delta(self, out: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Mean loss over the batch and d(loss)/d(out), written out (no autodiff)."""
        n = tf.cast(tf.shape(out)[0], tf.float32)
        if self.classification:
            log_p = tf.nn.log_softmax(out)
            onehot = tf.one_hot(y, self.n_out, dtype=tf.float32)
            loss = -tf.reduce_sum(onehot * log_p) / n
            delta = (tf.exp(log_p) - onehot) / n
        else:
            err = out - tf.reshape(y, [-1, 1])
            loss = tf.reduce_sum(err * err) / n
            delta = 2.0 * err / n
        return loss, delta

    def _metric(self, out: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """Correct predictions (classification) or summed squared error (regression)."""
        if self.classification:
            pred = tf.cast(tf.argmax(out, axis=1), tf.int32)
            return tf.reduce_sum(tf.cast(tf.equal(pred, y), tf.float32))
        err = out - tf.reshape(y, [-1, 1])
        return tf.reduce_sum(err * err)

    # --- signatures ------------------------------------------------------------------------

    def _train(self, x: tf.Tensor, y: tf.Tensor) -> dict[str, tf.Tensor]:
        inputs, outputs, out = self._forward(x)
        loss, delta = self._loss_and_delta(out, y)
        grads: list[tf.Tensor] = [tf.zeros(())] * len(self.params)
        for i in reversed(range(len(self.dense_layers))):
            kernel, bias = self.dense_layers[i]
            grads[kernel] = tf.matmul(inputs[i], delta, transpose_a=True)
            if bias is not None:
                grads[bias] = tf.reduce_sum(delta, axis=0)
            if i > 0:
                # Through the previous layer's activations, each derivative written from its
                # output: ReLU's as a mask (avoids the ReluGrad op, Flex-only).
                factors = [
                    _derivative(a, h) for a, h in zip(self.activations[i - 1], outputs[i - 1], strict=True)
                ]
                delta = tf.matmul(delta, self.params[kernel], transpose_b=True)
                for factor in reversed(factors):
                    delta = delta * factor
        if self.anchor:
            # FedProx: the gradient of mu / 2 * ||w - w_round_start||**2, written out like the rest
            # (Sub, Mul, Add: builtin ops). ``loss`` stays the data loss the task measures.
            grads = [g + self.mu * (p - a) for g, p, a in zip(grads, self.params, self.anchor, strict=True)]
        self._apply(grads)
        return {"loss": loss}

    def _apply(self, grads: list[tf.Tensor]) -> None:
        if self.optimizer == "sgd":
            for p, m, g in zip(self.params, self.slot_m, grads, strict=True):
                if self.momentum > 0.0:
                    m.assign(self.momentum * m + g)
                    p.assign_sub(self.lr * m)
                else:
                    p.assign_sub(self.lr * g)
            return
        t = self.step + 1.0
        self.step.assign(t)
        b1, b2 = self.beta1, self.beta2
        lr_t = self.lr * tf.sqrt(1.0 - tf.pow(b2, t)) / (1.0 - tf.pow(b1, t))
        for p, m, v, g in zip(self.params, self.slot_m, self.slot_v, grads, strict=True):
            m.assign(b1 * m + (1.0 - b1) * g)
            v.assign(b2 * v + (1.0 - b2) * g * g)
            p.assign_sub(lr_t * m / (tf.sqrt(v) + self.epsilon))

    def _infer(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        *_, out = self._forward(x)
        return {"outputs": tf.nn.softmax(out) if self.classification else out}

    def _evaluate(self, x: tf.Tensor, y: tf.Tensor) -> dict[str, tf.Tensor]:
        *_, out = self._forward(x)
        loss, _ = self._loss_and_delta(out, y)
        return {"loss": loss, "metric": self._metric(out, y)}

    def _get_weights(self) -> dict[str, tf.Tensor]:
        return {"weights": tf.concat([tf.reshape(p, [-1]) for p in self.params], axis=0)}

    def _set_weights(self, weights: tf.Tensor) -> dict[str, tf.Tensor]:
        """Loads a flat weight vector and resets the optimizer state (a new round starts fresh)."""
        for p, t in zip(self.params, self.layout, strict=True):
            p.assign(tf.reshape(weights[t.offset : t.offset + t.size], t.shape))
        for a, t in zip(self.anchor, self.layout, strict=False):  # FedProx: the round's start
            a.assign(tf.reshape(weights[t.offset : t.offset + t.size], t.shape))
        for m, v in zip(self.slot_m, self.slot_v, strict=True):
            m.assign(tf.zeros_like(m))
            v.assign(tf.zeros_like(v))
        self.step.assign(0.0)
        return {"parameter_count": tf.constant(self.parameter_count, tf.int32)}


class TrainableMLP(TrainableDense):
    """The task's MLP: ReLU hidden layers and a linear output layer, Glorot-initialised."""

    def __init__(self, task: TaskSpec, weights: np.ndarray | None = None) -> None:
        layout = mlp_tensor_layout(task.layer_sizes)
        flat = initial_weights(task) if weights is None else np.asarray(weights, np.float32)
        n_layers = len(layout) // 2
        hidden: tuple[HeadActivation, ...] = ("relu",)
        chains = [hidden] * (n_layers - 1) + [()]
        super().__init__(task, layout, flat, chains, name="fedge_mlp")


def _dense_layers(layout: Sequence[TensorLayout]) -> list[tuple[int, int | None]]:
    """Each layer's kernel and bias (or None) as indices into ``layout``: a ``<layer>/kernel``
    ``[n_in, n_out]`` may be followed by its ``<layer>/bias`` ``[n_out]``; nothing else."""
    layers: list[tuple[int, int | None]] = []
    i = 0
    while i < len(layout):
        kernel = layout[i]
        layer, _, part = kernel.name.rpartition("/")
        if part != "kernel" or len(kernel.shape) != 2:
            raise ValueError(f"layout entry {i} {kernel.name!r} {kernel.shape} is not a 2-D '<layer>/kernel'")
        nxt = layout[i + 1] if i + 1 < len(layout) else None
        if nxt is not None and nxt.name == f"{layer}/bias":
            if nxt.shape != (kernel.shape[1],):
                raise ValueError(f"{nxt.name} has shape {nxt.shape}; its kernel needs ({kernel.shape[1]},)")
            layers.append((i, i + 1))
            i += 2
        else:
            layers.append((i, None))
            i += 1
    return layers


def _variable_name(tensor: str) -> str:
    """A TensorFlow variable name for a layout entry: ``dense0/kernel`` -> ``dense0_kernel``."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", tensor)


def _activate(activation: HeadActivation, z: tf.Tensor) -> tf.Tensor:
    if activation == "relu":
        return tf.maximum(z, 0.0)  # MAXIMUM, as the MLP has always been built
    if activation == "tanh":
        return tf.tanh(z)
    if activation == "sigmoid":
        return tf.sigmoid(z)
    raise ValueError(f"activation {activation!r} cannot train; trainable: {', '.join(HEAD_ACTIVATIONS)}")


def _derivative(activation: HeadActivation, out: tf.Tensor) -> tf.Tensor:
    """d(out)/d(in) from the activation's output alone: the forward pass keeps nothing else."""
    if activation == "relu":
        return tf.cast(out > 0.0, tf.float32)
    if activation == "tanh":
        return 1.0 - out * out
    if activation == "sigmoid":
        return out * (1.0 - out)
    raise ValueError(f"activation {activation!r} cannot train; trainable: {', '.join(HEAD_ACTIVATIONS)}")
