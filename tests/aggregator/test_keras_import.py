"""``fedge model import``: a user's trained Keras model becomes a fedge model directory.

Real Keras models are built and trained here (an MLP with BatchNormalization and Dropout, a 1D
CNN on raw windows, a functional CNN whose BatchNormalization folds into its convolution),
saved as ``.keras`` and imported through the CLI's own function. The converted model runs in
LiteRT and must infer what Keras predicts, with builtin ops only; every refusal is one line
naming the layer or the shape, and writes nothing (docs/fine-tuning.md).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

from fedge.agent.trainer import LiteRTTrainer
from fedge.aggregator.keras_import import SUPPORTED_LAYERS, ModelImportError, import_keras_model
from fedge.aggregator.model_export import MANIFEST_FILE, MODEL_FILE, WEIGHTS_FILE
from fedge.aggregator.tflite_ops import flex_ops, list_ops
from fedge.cli import main as fedge_main
from fedge.protocol.errors import ManifestError
from fedge.protocol.model_manifest import ImportedLayer, manifest_from_json
from fedge.protocol.task import parse_task_spec
from fedge.protocol.weights import weights_from_bytes
from support.cli import fedge
from support.keras_models import (
    FEATURES_TASK_TOML,
    RAW_TASK_TOML,
    all_weights_sha256,
    channel_major,
    cnn_flatten_model,
    cnn_model,
    every_layer_model,
    features_task,
    features_x,
    head_weights,
    keras,
    mlp_model,
    raw_task,
    windows_x,
    write_task,
)

SUPPORTED = ", ".join(SUPPORTED_LAYERS)


@dataclass(frozen=True)
class Imported:
    """A Keras model, the file it was saved to, and the model directory the import wrote."""

    model: Any
    keras_file: Path
    task_file: Path
    out: Path
    head: tuple[str, ...]
    frozen: tuple[tuple[str, str], ...]
    x_keras: np.ndarray  # inputs as Keras reads them
    x_fedge: np.ndarray  # the same inputs as fedge feeds them


def _import(tmp: Path, name: str, model: Any, task_toml: str, trainable: int, *extra: str) -> Path:
    keras_file = tmp / f"{name}.keras"
    model.save(keras_file)
    out = tmp / f"{name}-model"
    argv = [
        "model",
        "import",
        "--keras",
        str(keras_file),
        "--task",
        str(write_task(tmp / f"{name}.toml", task_toml)),
    ]
    assert fedge_main([*argv, "--trainable", f"last:{trainable}", "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Imported]:
    """The three models, each imported once with its last two Dense layers trainable."""
    tmp = tmp_path_factory.mktemp("keras-import")
    windows = windows_x(64, seed=5)
    cases = {
        "mlp": (mlp_model(), FEATURES_TASK_TOML, ("hidden", "out"), features_x(64, seed=5), None),
        "cnn": (cnn_model(), RAW_TASK_TOML, ("fc", "out"), windows, channel_major(windows)),
        "cnn_flatten": (cnn_flatten_model(), RAW_TASK_TOML, ("fc", "out"), windows, channel_major(windows)),
        "every_layer": (every_layer_model(), RAW_TASK_TOML, ("fc", "out"), windows, channel_major(windows)),
    }
    frozen = {
        "mlp": (("base", "Dense"), ("base_bn", "BatchNormalization"), ("base_drop", "Dropout")),
        "cnn": (
            ("conv1", "Conv1D"),
            ("bn1", "BatchNormalization"),
            ("relu1", "ReLU"),
            ("pool1", "MaxPooling1D"),
            ("conv2", "Conv1D"),
            ("gap", "GlobalAveragePooling1D"),
        ),
        "cnn_flatten": (
            ("conv", "Conv1D"),
            ("conv_bn", "BatchNormalization"),
            ("act", "Activation"),
            ("pool", "MaxPooling1D"),
            ("flat", "Flatten"),
        ),
        "every_layer": (
            ("conv_tanh", "Conv1D"),
            ("avg", "AveragePooling1D"),
            ("bn_affine", "BatchNormalization"),
            ("per_step", "Dense"),
            ("conv_nobias", "Conv1D"),
            ("bn_nobeta", "BatchNormalization"),
            ("gmp", "GlobalMaxPooling1D"),
            ("grid", "Reshape"),
            ("flat", "Flatten"),
        ),
    }
    result = {}
    for name, (model, toml, head, x_keras, x_fedge) in cases.items():
        out = _import(tmp, name, model, toml, 2)
        result[name] = Imported(
            model,
            tmp / f"{name}.keras",
            tmp / f"{name}.toml",
            out,
            head,
            frozen[name],
            x_keras,
            x_keras if x_fedge is None else x_fedge,
        )
    return result


MODELS = ["mlp", "cnn", "cnn_flatten", "every_layer"]


@pytest.mark.parametrize("name", MODELS)
def test_the_imported_model_infers_what_keras_predicts(imported: dict[str, Imported], name: str) -> None:
    """Same inputs (channel-major for fedge, (length, channels) for Keras), same outputs within
    1e-5: BatchNormalization folded, Dropout removed, the raw window transposed as Conv1D reads it."""
    case = imported[name]
    expected = case.model.predict(case.x_keras, verbose=0)
    got = LiteRTTrainer.from_dir(case.out).predict(case.x_fedge)
    assert got.shape == expected.shape == (64, 3)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert np.ptp(expected, axis=0).min() > 0.01, "the model's outputs barely vary: a vacuous comparison"


@pytest.mark.parametrize("name", MODELS)
def test_the_imported_model_has_builtin_ops_only(imported: dict[str, Imported], name: str) -> None:
    """TensorFlow's analyzer, as for every built model: no Flex op in any signature."""
    model = (imported[name].out / MODEL_FILE).read_bytes()
    ops = set(list_ops(model))
    assert flex_ops(model) == [] and not any(op.startswith("Flex") for op in ops)
    assert {"ASSIGN_VARIABLE", "READ_VARIABLE", "BATCH_MATMUL"} <= ops  # the head trains in the model
    if name in ("cnn", "cnn_flatten"):
        assert {"CONV_2D", "MAX_POOL_2D", "TRANSPOSE"} <= ops  # the frozen convolutions are in it too
    if name == "every_layer":
        assert {"CONV_2D", "AVERAGE_POOL_2D", "REDUCE_MAX", "TANH", "LOGISTIC"} <= ops


@pytest.mark.parametrize("name", MODELS)
def test_the_manifest_records_what_trains_and_the_imported_hashes(
    imported: dict[str, Imported], name: str
) -> None:
    case = imported[name]
    raw = (case.out / MANIFEST_FILE).read_bytes()
    manifest = manifest_from_json(raw)
    section = manifest.imported
    assert section is not None
    assert section.trainable_layers == tuple(ImportedLayer(n, "Dense") for n in case.head)
    assert section.frozen_layers == tuple(ImportedLayer(n, c) for n, c in case.frozen)
    assert section.keras_file == case.keras_file.name
    assert section.keras_sha256 == hashlib.sha256(case.keras_file.read_bytes()).hexdigest()
    assert section.weights_sha256 == all_weights_sha256(case.model)
    assert section.keras_version == keras.__version__
    assert section.input_shape == ((6,) if name == "mlp" else (16, 2))
    expected_layout = [
        (f"{layer}/{part}", w.shape)
        for layer in case.head
        for part, w in zip(("kernel", "bias"), case.model.get_layer(layer).get_weights(), strict=True)
    ]
    assert [(t.name, t.shape) for t in manifest.layout] == expected_layout
    assert json.loads(raw)["task"]["model"] == {"type": "imported", "kind": "classification"}
    # No normalisation given: the identity, so devices feed the features as the model was trained.
    assert manifest.normalisation is not None
    assert set(manifest.normalisation.mean) == {0.0} and set(manifest.normalisation.std) == {1.0}


@pytest.mark.parametrize("name", MODELS)
def test_the_initial_weights_are_the_keras_head_weights(imported: dict[str, Imported], name: str) -> None:
    """The global model starts from the imported weights: initial_weights.f32 (what the
    aggregator serves first) and the converted model's own variables are the head's kernels
    and biases, in the layout's order."""
    case = imported[name]
    expected = head_weights(case.model, case.head)
    raw = (case.out / WEIGHTS_FILE).read_bytes()
    manifest = manifest_from_json((case.out / MANIFEST_FILE).read_bytes())
    assert hashlib.sha256(raw).hexdigest() == manifest.initial_weights_sha256
    np.testing.assert_array_equal(weights_from_bytes(raw, manifest.parameter_count), expected)
    np.testing.assert_array_equal(LiteRTTrainer.from_dir(case.out).get_weights(), expected)


def test_a_hand_edited_imported_manifest_is_refused(imported: dict[str, Imported]) -> None:
    """A trainable layer claimed that the layout does not hold: refused on load, naming the entry."""
    doc = json.loads((imported["cnn"].out / MANIFEST_FILE).read_text())
    doc["imported"]["trainable_layers"][0]["name"] = "conv2"
    with pytest.raises(ManifestError) as exc:
        manifest_from_json(json.dumps(doc))
    assert str(exc.value) == "manifest: layout[0] must be 'conv2/kernel' [n_in, n_out]"


def test_normalisation_is_applied_before_the_model(imported: dict[str, Imported], tmp_path: Path) -> None:
    """--normalisation: the scaling the Keras model was trained on; devices apply it first."""
    case = imported["mlp"]
    mean, std = np.linspace(-2, 2, 6), np.linspace(0.5, 3, 6)
    norm = tmp_path / "norm.json"
    norm.write_text(json.dumps({"mean": mean.tolist(), "std": std.tolist()}))
    out = _import(tmp_path, "mlp_norm", case.model, FEATURES_TASK_TOML, 1, "--normalisation", str(norm))
    raw_features = case.x_keras * std.astype(np.float32) + mean.astype(np.float32)
    np.testing.assert_allclose(
        LiteRTTrainer.from_dir(out).predict(raw_features),
        case.model.predict(case.x_keras, verbose=0),
        atol=1e-5,
    )
    section = manifest_from_json((out / MANIFEST_FILE).read_bytes()).imported
    assert section is not None and [layer.name for layer in section.trainable_layers] == ["out"]


# --- refusals: one line, naming the layer or the shape; nothing written ------------------------------


def _refusal(
    tmp: Path, model: Any, task_toml: str, trainable: str, capsys: pytest.CaptureFixture[str]
) -> str:
    """Runs the CLI's import on ``model``; returns its one-line error after checking it wrote nothing."""
    keras_file = tmp / "vendor.keras"
    model.save(keras_file)
    out = tmp / "out"
    argv = [
        "model",
        "import",
        "--keras",
        str(keras_file),
        "--task",
        str(write_task(tmp / "t.toml", task_toml)),
    ]
    capsys.readouterr()
    assert fedge_main([*argv, "--trainable", trainable, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not out.exists()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedge: error: "), captured.err
    return lines[0].removeprefix("fedge: error: ")


def _sequential(*layers: Any, inputs: tuple[int, ...] = (6,)) -> Any:
    return keras.Sequential([keras.Input(inputs), *layers])


def test_an_unsupported_layer_is_named_with_its_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lstm = _sequential(
        keras.layers.Reshape((6, 1), name="seq"),
        keras.layers.LSTM(4, name="rnn"),
        keras.layers.Dense(3, activation="softmax", name="out"),
    )
    assert _refusal(tmp_path, lstm, FEATURES_TASK_TOML, "last:1", capsys) == (
        f"layer 1 'rnn' (LSTM) is not supported; supported: {SUPPORTED}"
    )


def test_an_unsupported_layer_of_a_functional_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A functional model's layers count its InputLayer, as Keras' model.layers does."""
    inputs = keras.Input((6,))
    h = keras.layers.Reshape((2, 3, 1), name="grid")(inputs)
    h = keras.layers.Conv2D(2, 2, name="conv2d")(h)
    h = keras.layers.Flatten(name="flat")(h)
    outputs = keras.layers.Dense(3, activation="softmax", name="out")(h)
    assert _refusal(tmp_path, keras.Model(inputs, outputs), FEATURES_TASK_TOML, "last:1", capsys) == (
        f"layer 2 'conv2d' (Conv2D) is not supported; supported: {SUPPORTED}"
    )


def test_an_unsupported_activation_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _sequential(
        keras.layers.Dense(4, activation="gelu", name="g"), keras.layers.Dense(3, activation="softmax")
    )
    assert _refusal(tmp_path, model, FEATURES_TASK_TOML, "last:1", capsys) == (
        "layer 0 'g' (Dense): activation 'gelu' is not supported; "
        "supported: relu, tanh, sigmoid, softmax, linear"
    )


def test_trainable_layers_reaching_a_layer_that_is_not_dense(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """last:3 on the CNN would train its pooling layer: refused, naming it and the most allowed."""
    assert _refusal(tmp_path, cnn_model(), RAW_TASK_TOML, "last:3", capsys) == (
        "layer 5 'gap' (GlobalAveragePooling1D): --trainable last:3 would train it, and only Dense layers "
        "train on devices (Dropout, Activation, ReLU, Softmax may sit between them): use --trainable "
        "last:2 or fewer"
    )


def test_a_model_that_does_not_end_in_dense_layers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _sequential(
        keras.layers.Dense(6, activation="relu"),
        keras.layers.Reshape((3, 2), name="pairs"),
        keras.layers.GlobalMaxPooling1D(name="pool"),
        keras.layers.Softmax(name="probs"),
        inputs=(6,),
    )
    toml = FEATURES_TASK_TOML.replace('"mid", ', "")
    assert _refusal(tmp_path, model, toml, "last:1", capsys) == (
        "layer 2 'pool' (GlobalMaxPooling1D): comes after the model's last Dense layer, and only Dense "
        "layers train on devices (only Dropout, Activation, ReLU, Softmax may follow them): end the model "
        "with a Dense layer"
    )


def test_more_trainable_layers_than_the_model_has(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _sequential(keras.layers.Dense(4, activation="relu"), keras.layers.Dense(3, activation="softmax"))
    assert _refusal(tmp_path, model, FEATURES_TASK_TOML, "last:3", capsys) == (
        "--trainable last:3 asks for 3 Dense layers, the model has 2: use --trainable last:2 or fewer"
    )


def test_a_softmax_inside_the_trainable_layers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _sequential(
        keras.layers.Dense(4, activation="softmax", name="mid"), keras.layers.Dense(3, activation="softmax")
    )
    assert _refusal(tmp_path, model, FEATURES_TASK_TOML, "last:2", capsys) == (
        "layer 0 'mid' (Dense): a softmax can only end the last layer; it cannot train inside the head"
    )


@pytest.mark.parametrize(
    ("case", "message"),
    [
        (
            "features: 6 for a task of 5",
            "the Keras model's input has shape (6,); task 'toy-features' feeds shape (5,): its [features] "
            "must give the 6 inputs the model was trained on, in that order",
        ),
        (
            "classes: 3 for a task of 2",
            "the Keras model's output has shape (3,); task 'toy-features' (classification) needs (2,): "
            "2 classes",
        ),
        (
            "windows: 16 readings for a task of 20",
            "the Keras model reads windows of shape (16, 2) (readings, channels); task 'toy-raw' feeds "
            "windows of 20 readings of 2 resources, shape (20, 2)",
        ),
        (
            "a window model on a feature task",
            "the Keras model reads windows of shape (16, 2) (readings, channels); task 'toy-features' "
            "feeds 6 features, shape (6,): a window model needs [features.window] size = 16, "
            'statistics = ["raw"] over 2 resources',
        ),
    ],
)
def test_shapes_that_do_not_fit_the_task(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, message: str
) -> None:
    mlp = _sequential(keras.layers.Dense(4, activation="relu"), keras.layers.Dense(3, activation="softmax"))
    cnn = _sequential(
        keras.layers.Conv1D(4, 3),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(3, activation="softmax"),
        inputs=(16, 2),
    )
    model, toml = {
        "features: 6 for a task of 5": (mlp, FEATURES_TASK_TOML.replace(', "f5"]', "]")),
        "classes: 3 for a task of 2": (mlp, FEATURES_TASK_TOML.replace(', "high"]', "]")),
        "windows: 16 readings for a task of 20": (cnn, RAW_TASK_TOML.replace("size = 16", "size = 20")),
        "a window model on a feature task": (cnn, FEATURES_TASK_TOML),
    }[case]
    assert _refusal(tmp_path, model, toml, "last:1", capsys) == message


def test_a_task_that_is_not_imported_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mlp = _sequential(keras.layers.Dense(3, activation="softmax"))
    toml = FEATURES_TASK_TOML.replace('type = "imported"', 'type = "mlp"\nhidden = []\nseed = 0')
    assert _refusal(tmp_path, mlp, toml, "last:1", capsys) == (
        "task 'toy-features' has [model] type = 'mlp'; an import needs type = \"imported\" (with kind, "
        "without hidden and seed: the layers come from the Keras model)"
    )


@pytest.mark.parametrize("trainable", ["last:0", "2", "first:1", "last:17"])
def test_a_bad_trainable_option(tmp_path: Path, capsys: pytest.CaptureFixture[str], trainable: str) -> None:
    mlp = _sequential(keras.layers.Dense(3, activation="softmax"))
    assert _refusal(tmp_path, mlp, FEATURES_TASK_TOML, trainable, capsys) == (
        "--trainable must be last:N, N the number of Dense layers at the model's end that train (1..16), "
        f"got {trainable!r}"
    )


def test_a_saved_model_is_refused_with_how_to_save_keras(
    imported: dict[str, Imported], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--saved-model: a SavedModel holds graphs, not layers to freeze and train (docs/fine-tuning.md)."""
    saved = tmp_path / "saved"
    tf.saved_model.save(imported["cnn"].model, str(saved))
    out = tmp_path / "out"
    for directory, message in [
        (
            saved,
            f"{saved}: a SavedModel holds graphs, not the Keras layers an import freezes and trains (Keras "
            f"{keras.__version__} cannot load it as layers); save the model as .keras "
            "(model.save('model.keras')) and pass --keras",
        ),
        (tmp_path, f"{tmp_path}: no SavedModel here (no saved_model.pb)"),
    ]:
        capsys.readouterr()
        argv = ["model", "import", "--saved-model", str(directory), "--task", str(imported["cnn"].task_file)]
        assert fedge_main([*argv, "--trainable", "last:2", "--out", str(out)]) == 2
        assert capsys.readouterr().err == f"fedge: error: {message}\n"
        assert not out.exists()


def test_a_corrupt_keras_file_is_one_line_and_writes_nothing(
    imported: dict[str, Imported], tmp_path: Path
) -> None:
    """As a user runs it (a fresh process): exit code 2, one line on stderr, no --out directory."""
    corrupt = tmp_path / "vendor.keras"
    corrupt.write_bytes(imported["mlp"].keras_file.read_bytes()[:2000])  # cut short in a download
    out = tmp_path / "out"
    argv = ["model", "import", "--keras", str(corrupt), "--task", str(imported["mlp"].task_file)]
    proc = fedge(*argv, "--trainable", "last:2", "--out", str(out))
    assert proc.returncode == 2 and proc.stdout == ""
    # TensorFlow's C++ start-up lines (absl, oneDNN) may come first; fedge's error is one line.
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fedge")]
    assert errors == [f"fedge: error: {corrupt} is not a .keras file (not a zip archive)"], proc.stderr
    assert proc.stderr.endswith(errors[0] + "\n") and "Traceback" not in proc.stderr
    assert not out.exists()


def test_a_zip_that_is_not_a_keras_model(imported: dict[str, Imported], tmp_path: Path) -> None:
    foreign = tmp_path / "vendor.keras"
    with zipfile.ZipFile(foreign, "w") as archive:
        archive.writestr("readme.txt", "not a model")
    with pytest.raises(ModelImportError) as exc:
        import_keras_model(foreign, features_task(), 1)
    assert str(exc.value) == (
        f"cannot load Keras model {foreign}: \"There is no item named 'config.json' in the archive\""
    )


def test_a_missing_file_and_a_foreign_suffix(tmp_path: Path) -> None:
    for path, message in [
        (
            tmp_path / "none.keras",
            f"cannot read Keras model {tmp_path / 'none.keras'}: No such file or directory",
        ),
        (tmp_path / "t.toml", f"{tmp_path / 't.toml'}: --keras takes a .keras file (or a legacy .h5 file)"),
    ]:
        write_task(tmp_path / "t.toml", RAW_TASK_TOML)
        with pytest.raises(ModelImportError) as exc:
            import_keras_model(path, raw_task(), 1)
        assert str(exc.value) == message


def test_the_cli_prints_what_it_imported(imported: dict[str, Imported], tmp_path: Path) -> None:
    case = imported["cnn"]
    out = tmp_path / "model"
    argv = ["model", "import", "--keras", str(case.keras_file), "--task", str(case.task_file)]
    proc = fedge(*argv, "--trainable", "last:1", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    manifest = manifest_from_json((out / MANIFEST_FILE).read_bytes())
    assert summary == {
        "task": "toy-raw",
        "out": str(out),
        "manifest": str(out / MANIFEST_FILE),
        "keras_file": str(case.keras_file),
        "keras_sha256": hashlib.sha256(case.keras_file.read_bytes()).hexdigest(),
        "frozen_layers": [n for n, _ in case.frozen] + ["fc", "fc_drop"],
        "trainable_layers": ["out"],
        "parameter_count": 12 * 3 + 3,
        "model_bytes": manifest.model_bytes,
        "model_sha256": manifest.model_sha256,
    }
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST_FILE, MODEL_FILE, WEIGHTS_FILE])


def test_a_regression_model_and_a_legacy_h5_file(tmp_path: Path) -> None:
    """A regression ends in one linear unit, infer gives Keras' value; Keras' legacy .h5 format
    imports like .keras (docs/fine-tuning.md)."""
    from fedge.aggregator.model_export import write_model

    toml = FEATURES_TASK_TOML.replace('classes = ["low", "mid", "high"]\n', "").replace(
        'kind = "classification"', 'kind = "regression"'
    )
    model = _sequential(
        keras.layers.Dense(8, activation="sigmoid", name="h"), keras.layers.Dense(1, name="value")
    )
    h5 = tmp_path / "vendor.h5"
    model.save(h5)
    write_model(import_keras_model(h5, parse_task_spec(toml), 2), tmp_path / "out")
    x = features_x(32, seed=2)
    np.testing.assert_allclose(
        LiteRTTrainer.from_dir(tmp_path / "out").predict(x), model.predict(x, verbose=0), atol=1e-5, rtol=0
    )
    section = manifest_from_json((tmp_path / "out" / MANIFEST_FILE).read_bytes()).imported
    assert section is not None and section.keras_file == "vendor.h5" and section.frozen_layers == ()
