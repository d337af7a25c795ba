"""The manifest of an imported Keras model (``fedge model import``): its ``imported`` section and
its ``layout``, which is read rather than derived from the task, so it is checked field by
field. Pure protocol: no TensorFlow, no Keras (the real import is tests/aggregator/test_keras_import.py).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from fedge.protocol.errors import ManifestError
from fedge.protocol.model_manifest import (
    ImportedLayer,
    ImportedModel,
    ModelManifest,
    Normalisation,
    TensorLayout,
    manifest_from_json,
)
from fedge.protocol.task import TaskSpec, parse_task_spec

TASK_TOML = """
[task]
name = "vendor-cnn"
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
optimizer = "sgd"
learning_rate = 0.05
momentum = 0.9
batch_size = 16
local_epochs = 1
"""
TASK: TaskSpec = parse_task_spec(TASK_TOML)
#: fc [8 -> 12] with a bias, out [12 -> 3] with a bias: 96 + 12 + 36 + 3 = 147 parameters.
LAYOUT = (
    TensorLayout("fc/kernel", (8, 12), 0),
    TensorLayout("fc/bias", (12,), 96),
    TensorLayout("out/kernel", (12, 3), 108),
    TensorLayout("out/bias", (3,), 144),
)
IMPORTED = ImportedModel(
    keras_file="vendor.keras",
    keras_sha256="1f" * 32,
    keras_version="3.15.1",
    weights_sha256="2e" * 32,
    input_shape=(16, 2),
    trainable_layers=(ImportedLayer("fc", "Dense"), ImportedLayer("out", "Dense")),
    frozen_layers=(
        ImportedLayer("conv1", "Conv1D"),
        ImportedLayer("bn1", "BatchNormalization"),
        ImportedLayer("gap", "GlobalAveragePooling1D"),
    ),
    layout=LAYOUT,
)


def _manifest(imported: ImportedModel | None = IMPORTED, task: TaskSpec = TASK) -> ModelManifest:
    return ModelManifest(
        task=task,
        model_file="model.tflite",
        model_sha256="ab" * 32,
        model_bytes=40_000,
        initial_weights_sha256="cd" * 32,
        normalisation=Normalisation((0.0,) * task.input_dim, (1.0,) * task.input_dim),
        tensorflow_version="2.21.0",
        imported=imported,
    )


DOC: dict[str, Any] = json.loads(_manifest().to_json())


def _error(edit: Any) -> str:
    doc = copy.deepcopy(DOC)
    edit(doc)
    with pytest.raises(ManifestError) as exc:
        manifest_from_json(json.dumps(doc))
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_an_imported_manifest_round_trips_with_its_own_layout() -> None:
    manifest = manifest_from_json(_manifest().to_json())
    assert manifest == _manifest()
    assert manifest.layout == LAYOUT and manifest.parameter_count == 147
    assert DOC["imported"] == {
        "keras_file": "vendor.keras",
        "keras_sha256": "1f" * 32,
        "keras_version": "3.15.1",
        "weights_sha256": "2e" * 32,
        "input_shape": [16, 2],
        "trainable_layers": [{"name": "fc", "class": "Dense"}, {"name": "out", "class": "Dense"}],
        "frozen_layers": [
            {"name": "conv1", "class": "Conv1D"},
            {"name": "bn1", "class": "BatchNormalization"},
            {"name": "gap", "class": "GlobalAveragePooling1D"},
        ],
    }
    assert DOC["layout"][2] == {"name": "out/kernel", "shape": [12, 3], "offset": 108, "size": 36}
    assert DOC["task"]["model"] == {"type": "imported", "kind": "classification"}


def test_a_layer_without_bias_is_a_kernel_alone() -> None:
    layout = (TensorLayout("fc/kernel", (8, 12), 0), TensorLayout("out/kernel", (12, 3), 96))
    manifest = _manifest(
        ImportedModel(**{**IMPORTED.__dict__, "layout": layout})  # type: ignore[arg-type]
    )
    assert manifest_from_json(manifest.to_json()).parameter_count == 132


def test_an_mlp_manifest_has_no_imported_key_and_refuses_one() -> None:
    """A built model's manifest is exactly as it was before imports existed."""
    mlp_task = parse_task_spec(TASK_TOML.replace('type = "imported"', "hidden = [4]\nseed = 0"))
    doc = json.loads(_manifest(None, mlp_task).to_json())
    assert "imported" not in doc
    doc["imported"] = DOC["imported"]
    with pytest.raises(ManifestError) as exc:
        manifest_from_json(json.dumps(doc))
    assert str(exc.value) == "manifest: imported is only for a task whose [model] type is 'imported'"


def test_the_imported_section_goes_with_the_tasks_model_type() -> None:
    with pytest.raises(ManifestError) as exc:
        _manifest(None)
    assert str(exc.value) == (
        "manifest: imported must be given exactly when the task's model type is 'imported' (it is 'imported')"
    )


def _set(path: str, value: Any) -> Any:
    def edit(doc: dict[str, Any]) -> None:
        *parents, key = path.split(".")
        node: Any = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if value is _DELETE:
            del node[key]
        elif isinstance(node, list):
            node[int(key)] = value
        else:
            node[key] = value

    return edit


_DELETE = object()

HAND_EDITS: list[tuple[str, Any, str]] = [
    (
        "section removed",
        _set("imported", _DELETE),
        "manifest: imported must be an object (the task's model is imported)",
    ),
    (
        "unknown key",
        _set("imported.trainable", True),
        "manifest: imported must be an object with exactly: frozen_layers, input_shape, keras_file, "
        "keras_sha256, keras_version, trainable_layers, weights_sha256",
    ),
    (
        "weights hash not hex",
        _set("imported.weights_sha256", "XYZ"),
        "manifest: imported.weights_sha256 must be 64 lowercase hex digits",
    ),
    (
        "keras file with a path",
        _set("imported.keras_file", "../etc/passwd"),
        "manifest: imported.keras_file must be a plain file name of at most 255 characters",
    ),
    (
        "input shape of other size",
        _set("imported.input_shape", [16, 3]),
        "manifest: imported.input_shape must be [d] or [length, channels] of 32 inputs in all "
        "(the task's input_dim)",
    ),
    (
        "a trainable layer renamed",
        _set("imported.trainable_layers.1.name", "logits"),
        "manifest: layout[2] must be 'logits/kernel' [n_in, n_out]",
    ),
    (
        "a layer name with a slash",
        _set("imported.frozen_layers.0.name", "conv/1"),
        "manifest: imported.frozen_layers[0] must be {name, class}: a layer name of 1 to 128 characters "
        "without '/', a Keras class name",
    ),
    (
        "no trainable layer",
        _set("imported.trainable_layers", []),
        "manifest: imported.trainable_layers must be a list of 1 to 16 layers",
    ),
    (
        "two layers of one name",
        _set("imported.trainable_layers.0.name", "out"),
        "manifest: imported.trainable_layers must be layers of distinct names",
    ),
    (
        "a kernel that does not read the previous layer",
        _set(
            "layout",
            [
                *DOC["layout"][:2],
                {"name": "out/kernel", "shape": [11, 3], "offset": 108, "size": 33},
                {"name": "out/bias", "shape": [3], "offset": 141, "size": 3},
            ],
        ),
        "manifest: layout[2] must be a kernel reading the previous layer's 12 outputs",
    ),
    (
        "a shape changed, its offsets not",
        _set("layout.2.shape", [11, 3]),
        "manifest: layout[2] must be at offset 108 with size 33 (contiguous)",
    ),
    (
        "an offset moved",
        _set("layout.1.offset", 97),
        "manifest: layout[1] must be at offset 96 with size 12 (contiguous)",
    ),
    (
        "a bias of the wrong width",
        _set("layout.1.shape", [11]),
        "manifest: layout[1] must be at offset 96 with size 11 (contiguous)",
    ),
    (
        "a tensor of no layer",
        _set("layout", [*DOC["layout"], {"name": "x/kernel", "shape": [3, 3], "offset": 147, "size": 9}]),
        "manifest: layout must be a list of 1 to 4 tensors (the trainable layers')",
    ),
    (
        "a last layer of other width",
        _set(
            "layout",
            [
                *DOC["layout"][:2],
                {"name": "out/kernel", "shape": [12, 4], "offset": 108, "size": 48},
                {"name": "out/bias", "shape": [4], "offset": 156, "size": 4},
            ],
        ),
        "manifest: layout must be a last layer of 3 outputs (the task's output_dim)",
    ),
    (
        "a parameter count that disagrees",
        _set("parameter_count", 148),
        "manifest: parameter_count 148 does not match the task's 147",
    ),
]


@pytest.mark.parametrize(
    ("edit", "message"), [(e, m) for _, e, m in HAND_EDITS], ids=[n for n, _, _ in HAND_EDITS]
)
def test_a_hand_edited_imported_manifest_is_refused(edit: Any, message: str) -> None:
    assert _error(edit) == message
