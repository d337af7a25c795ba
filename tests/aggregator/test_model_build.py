"""`fedge model build` on the aggregator side: builtin ops only, and a truthful manifest."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from fedge.agent.litert_runtime import find_runtime
from fedge.aggregator.model_export import (
    MANIFEST_FILE,
    MODEL_FILE,
    WEIGHTS_FILE,
    ModelBuildError,
    build_model,
    convert_module,
)
from fedge.aggregator.tflite_ops import flex_ops, list_ops
from fedge.aggregator.trainable_mlp import initial_weights
from fedge.protocol.model_manifest import SIGNATURES, Normalisation, manifest_from_json
from fedge.protocol.task import TaskSpec
from fedge.protocol.weights import weights_from_bytes
from support.tasks import task_variant

VARIANTS: dict[str, dict[str, object]] = {
    "sgd-momentum": {},
    "sgd-plain": {"training.momentum": 0.0},
    "adam": {"training.optimizer": "adam", "training.momentum": None, "training.learning_rate": 0.001},
    "regression": {"model.kind": "regression", "label.classes": None, "model.hidden": [16]},
    "deep": {"model.hidden": [32, 32, 16, 8]},
    # hidden = []: logistic regression and linear regression, one dense layer.
    "linear-classification": {"model.hidden": []},
    "linear-regression": {"model.kind": "regression", "label.classes": None, "model.hidden": []},
    # FedProx: the proximal term's gradient in the train step, still builtin ops only.
    "fedprox-sgd": {"training.proximal_mu": 0.1},
    "fedprox-adam": {
        "training.optimizer": "adam",
        "training.momentum": None,
        "training.learning_rate": 0.001,
        "training.proximal_mu": 0.1,
    },
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_model_variant_uses_builtin_ops_only(
    har_task: TaskSpec, build_model_dir: Callable[[TaskSpec], Path], variant: str
) -> None:
    """TensorFlow's own analyzer lists the ops of every subgraph; none may be a Flex op."""
    task = task_variant(har_task, VARIANTS[variant])
    model = (build_model_dir(task) / MODEL_FILE).read_bytes()
    ops = list_ops(model)
    assert ops, "the analyzer listed no ops: the check would pass vacuously"
    # Training really is inside the model: variables are written and matrices multiplied.
    assert {"ASSIGN_VARIABLE", "READ_VARIABLE", "BATCH_MATMUL", "CALL_ONCE"} <= set(ops)
    assert [op for op in ops if op.startswith("Flex")] == []
    assert flex_ops(model) == []


class _AutodiffReluModule(tf.Module):
    """The naive way: tf.nn.relu + GradientTape. Its gradient needs ReluGrad, a Flex op."""

    def __init__(self) -> None:
        super().__init__()
        self.w = tf.Variable(tf.ones([4, 2]))

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    def train(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.nn.relu(tf.matmul(x, self.w)))
        self.w.assign_sub(0.1 * tape.gradient(loss, self.w))
        return {"loss": loss}


def test_build_fails_loudly_when_a_flex_op_is_needed() -> None:
    module = _AutodiffReluModule()
    with pytest.raises(ModelBuildError, match=r"outside TFLITE_BUILTINS \(Flex\).*ReluGrad"):
        convert_module(module, {"train": module.train.get_concrete_function()})


def test_flex_detector_finds_flex_ops_when_select_tf_ops_are_allowed() -> None:
    """Proves the no-Flex assertion above can fail: a Select-TF model is flagged."""
    module = _AutodiffReluModule()
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.train.get_concrete_function()], module
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    converter.experimental_enable_resource_variables = True
    model = converter.convert()
    assert flex_ops(model) == ["FlexReluGrad"]
    assert "FlexReluGrad" in list_ops(model)


def test_manifest_describes_the_written_files(har_task: TaskSpec, har_model_dir: Path) -> None:
    manifest = manifest_from_json((har_model_dir / MANIFEST_FILE).read_bytes())
    model = (har_model_dir / MODEL_FILE).read_bytes()
    weights_raw = (har_model_dir / WEIGHTS_FILE).read_bytes()
    assert manifest.task == har_task
    assert manifest.model_sha256 == hashlib.sha256(model).hexdigest()
    assert manifest.model_bytes == len(model)
    assert manifest.parameter_count == 48 * 64 + 64 + 64 * 32 + 32 + 32 * 7 + 7 == 5447
    assert len(weights_raw) == 4 * manifest.parameter_count
    assert manifest.initial_weights_sha256 == hashlib.sha256(weights_raw).hexdigest()
    weights = weights_from_bytes(weights_raw, manifest.parameter_count)
    np.testing.assert_array_equal(weights, initial_weights(har_task))
    assert manifest.normalisation is None
    assert manifest.tensorflow_version == tf.__version__


@pytest.mark.parametrize(("variant", "outputs"), [("linear-classification", 7), ("linear-regression", 1)])
def test_a_linear_model_builds_as_one_dense_layer(
    har_task: TaskSpec, build_model_dir: Callable[[TaskSpec], Path], variant: str, outputs: int
) -> None:
    """``hidden = []``: a real build writes one kernel and one bias, and LiteRT runs it."""
    task = task_variant(har_task, VARIANTS[variant])
    model_dir = build_model_dir(task)
    manifest = manifest_from_json((model_dir / MANIFEST_FILE).read_bytes())
    model = (model_dir / MODEL_FILE).read_bytes()
    assert manifest.task == task and task.layer_sizes == (48, outputs)
    assert [(t.name, t.shape, t.offset) for t in manifest.layout] == [
        ("dense0/kernel", (48, outputs), 0),
        ("dense0/bias", (outputs,), 48 * outputs),
    ]
    assert manifest.parameter_count == 48 * outputs + outputs
    assert manifest.model_bytes == len(model) < len((build_model_dir(har_task) / MODEL_FILE).read_bytes())
    weights = weights_from_bytes((model_dir / WEIGHTS_FILE).read_bytes(), manifest.parameter_count)
    np.testing.assert_array_equal(weights, initial_weights(task))
    limit = np.sqrt(6.0 / (48 + outputs))  # Glorot uniform kernel, zero bias
    assert 0 < np.abs(weights[: 48 * outputs]).max() <= limit
    assert not weights[48 * outputs :].any()
    interpreter = find_runtime().interpreter_class(model_content=model)
    assert sorted(interpreter.get_signature_list()) == sorted(SIGNATURES)
    out = interpreter.get_signature_runner("infer")(x=np.ones((5, 48), np.float32))["outputs"]
    assert out.shape == (5, outputs)
    if outputs > 1:  # class probabilities
        np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-6)
    else:  # x @ kernel + bias, with the bias still zero
        np.testing.assert_allclose(out[:, 0], weights[:48].sum(), rtol=1e-5)


def test_signatures_in_the_model_match_the_protocol(har_model_dir: Path) -> None:
    """The signature names and their input/output names are the contract with devices."""
    interpreter = find_runtime().interpreter_class(model_path=str(har_model_dir / MODEL_FILE))
    listed = interpreter.get_signature_list()
    assert sorted(listed) == sorted(SIGNATURES)
    for name, io in SIGNATURES.items():
        assert sorted(listed[name]["inputs"]) == sorted(io["inputs"]), name
        assert sorted(listed[name]["outputs"]) == sorted(io["outputs"]), name


def test_open_batch_dimension(har_model_dir: Path) -> None:
    interpreter = find_runtime().interpreter_class(model_path=str(har_model_dir / MODEL_FILE))
    infer = interpreter.get_signature_runner("infer")
    for batch in (1, 7, 300):
        out = infer(x=np.zeros((batch, 48), np.float32))["outputs"]
        assert out.shape == (batch, 7)


def test_builds_are_reproducible(har_task: TaskSpec, har_model_dir: Path) -> None:
    """The same task gives the same bytes: a model's hash identifies its task and weights."""
    again = build_model(har_task)
    assert again.tflite == (har_model_dir / MODEL_FILE).read_bytes()


def test_normalisation_goes_into_the_manifest(har_task: TaskSpec) -> None:
    norm = Normalisation(tuple(float(i) for i in range(48)), tuple(1.0 + i for i in range(48)))
    assert build_model(har_task, norm).manifest.normalisation == norm


def test_normalisation_of_wrong_length_is_refused(har_task: TaskSpec) -> None:
    with pytest.raises(ModelBuildError, match="normalisation has 2 features, the task has 48"):
        build_model(har_task, Normalisation((0.0, 0.0), (1.0, 1.0)))
