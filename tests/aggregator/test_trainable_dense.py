"""TrainableDense, the general form of fedge's trainable MLP (an imported Keras model's head is
one): its hand-written backward pass must be the true gradient for every activation it
allows, with and without biases, behind a frozen input path; and ``fedge model build`` keeps
building only MLPs.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tensorflow as tf

from fedge.aggregator.model_export import ModelBuildError, build_model, convert_module
from fedge.aggregator.tflite_ops import flex_ops
from fedge.aggregator.trainable_mlp import HeadActivation, TrainableDense
from fedge.protocol.model_manifest import TensorLayout
from fedge.protocol.task import TaskSpec, parse_task_spec

TASK_TOML = """
[task]
name = "dense-check"
[features]
resources = ["a", "b", "c", "d", "e"]
[label]
resource = "y"
{label}
[model]
{model}
[training]
optimizer = "sgd"
learning_rate = 1.0
momentum = 0.0
batch_size = 8
local_epochs = 1
"""
IMPORTED = 'type = "imported"\nkind = "{kind}"'


def _task(kind: str, model: str = IMPORTED) -> TaskSpec:
    label = 'classes = ["p", "q", "r"]' if kind == "classification" else ""
    return parse_task_spec(TASK_TOML.format(label=label, model=model.format(kind=kind)))


def _layout(widths: list[int], biases: list[bool]) -> tuple[TensorLayout, ...]:
    layout: list[TensorLayout] = []
    offset = 0
    for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
        layout.append(TensorLayout(f"l{i}/kernel", (n_in, n_out), offset))
        offset += n_in * n_out
        if biases[i]:
            layout.append(TensorLayout(f"l{i}/bias", (n_out,), offset))
            offset += n_out
    return tuple(layout)


def _frozen(x: tf.Tensor) -> tf.Tensor:
    """A frozen input path of constants: 5 features -> 4, tanh."""
    kernel = np.linspace(-1.0, 1.0, 20, dtype=np.float32).reshape(5, 4)
    return tf.tanh(tf.matmul(x, kernel) + 0.1)


CHAINS: dict[str, tuple[tuple[HeadActivation, ...], ...]] = {
    "relu": (("relu",), ()),
    "tanh": (("tanh",), ()),
    "sigmoid": (("sigmoid",), ()),
    "relu-then-tanh": (("relu", "tanh"), ()),
    "linear": (("linear",), ()),
}


@pytest.mark.parametrize("kind", ["classification", "regression"])
@pytest.mark.parametrize("chain", sorted(CHAINS))
@pytest.mark.parametrize("biases", [(True, True), (False, True), (True, False)])
def test_the_written_out_gradient_is_the_true_gradient(
    kind: str, chain: str, biases: tuple[bool, bool]
) -> None:
    """One SGD step at learning rate 1 moves the weights by exactly the gradient, compared here
    with TensorFlow's autodiff of the same loss through the same frozen path."""
    task = _task(kind)
    layout = _layout([4, 6, task.output_dim], list(biases))
    rng = np.random.default_rng(3)
    start = rng.normal(0, 0.5, sum(t.size for t in layout)).astype(np.float32)
    module = TrainableDense(task, layout, start, CHAINS[chain], input_path=_frozen)
    x = tf.constant(rng.normal(size=(8, 5)).astype(np.float32))
    if kind == "classification":
        y = tf.constant(rng.integers(0, 3, 8).astype(np.int32))
    else:
        y = tf.constant(rng.normal(size=8).astype(np.float32))

    params = [tf.Variable(p.read_value()) for p in module.params]
    with tf.GradientTape() as tape:
        h = _frozen(x)
        for (kernel, bias), activations in zip(module.dense_layers, module.activations, strict=True):
            h = tf.matmul(h, params[kernel]) + (params[bias] if bias is not None else 0.0)
            for a in activations:
                h = {"relu": tf.nn.relu, "tanh": tf.tanh, "sigmoid": tf.sigmoid}[a](h)
        if kind == "classification":
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, h))
        else:
            loss = tf.reduce_mean(tf.square(h[:, 0] - y))
    expected = np.concatenate([g.numpy().ravel() for g in tape.gradient(loss, params)])

    reported = float(module.train(x, y)["loss"])
    moved = start - module.get_weights()["weights"].numpy()
    assert reported == pytest.approx(float(loss), rel=1e-5)
    np.testing.assert_allclose(moved, expected, atol=1e-5)


def test_a_trainable_dense_with_a_frozen_path_converts_with_builtin_ops_only() -> None:
    task = _task("classification")
    layout = _layout([4, 6, 3], [True, False])
    weights = np.zeros(sum(t.size for t in layout), np.float32)
    module = TrainableDense(task, layout, weights, (("sigmoid", "tanh"), ()), input_path=_frozen)
    assert flex_ops(convert_module(module, module.signatures())) == []


@pytest.mark.parametrize(
    ("layout", "chains", "message"),
    [
        (
            (TensorLayout("l0/bias", (3,), 0),),
            ((),),
            "layout entry 0 'l0/bias' (3,) is not a 2-D '<layer>/kernel'",
        ),
        (
            (TensorLayout("l0/kernel", (5, 3), 0), TensorLayout("l0/bias", (4,), 15)),
            ((),),
            "l0/bias has shape (4,); its kernel needs (3,)",
        ),
        ((TensorLayout("l0/kernel", (5, 3), 0),), ((), ()), "1 layers need as many activation chains, got 2"),
    ],
)
def test_a_layout_that_is_not_dense_layers_is_refused(
    layout: tuple[TensorLayout, ...], chains: tuple[tuple[HeadActivation, ...], ...], message: str
) -> None:
    weights = np.zeros(sum(t.size for t in layout), np.float32)
    with pytest.raises(ValueError) as exc:
        TrainableDense(_task("classification"), layout, weights, chains)
    assert str(exc.value) == message


def test_fedge_model_build_refuses_an_imported_task() -> None:
    with pytest.raises(ModelBuildError) as exc:
        build_model(_task("classification"))
    assert str(exc.value) == (
        "task 'dense-check' has an imported model ([model] type = 'imported'): its model directory "
        "comes from fedge model import --keras MODEL.keras, not from its task"
    )
