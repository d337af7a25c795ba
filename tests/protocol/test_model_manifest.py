"""Model manifests: weight layout, normalisation, JSON round trips and strict parsing.

``manifest_from_json`` reads a file a device downloaded; every malformed or tampered input must
be a :class:`ManifestError` with a precise message, and nothing else may escape.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedge.protocol.errors import FedgeError, ManifestError
from fedge.protocol.model_manifest import (
    MANIFEST_FORMAT,
    MAX_MANIFEST_BYTES,
    SIGNATURES,
    ModelManifest,
    Normalisation,
    TensorLayout,
    manifest_from_json,
    mlp_tensor_layout,
    normalisation_from_moments,
)
from fedge.protocol.task import TaskSpec, parse_task_spec, task_spec_from_dict

HAR_TASK_PATH = Path(__file__).resolve().parents[2] / "tasks" / "har-watch.toml"
MODEL_SHA = "ab" * 32
WEIGHTS_SHA = "0123456789abcdef" * 4
SHA_ERROR = "manifest: {} must be 64 lowercase hex digits"


def _har_task() -> TaskSpec:
    return parse_task_spec(HAR_TASK_PATH.read_text(encoding="utf-8"))


HAR_TASK = _har_task()


def _normalisation(n: int = 48) -> Normalisation:
    return Normalisation(
        mean=tuple(i * 0.5 - 3.0 for i in range(n)), std=tuple(1.0 + i / 10 for i in range(n))
    )


def _manifest(normalisation: Normalisation | None = None) -> ModelManifest:
    return ModelManifest(
        task=HAR_TASK,
        model_file="model.tflite",
        model_sha256=MODEL_SHA,
        model_bytes=123_456,
        initial_weights_sha256=WEIGHTS_SHA,
        normalisation=normalisation,
        tensorflow_version="2.21.0",
    )


MANIFEST = _manifest(_normalisation())
MANIFEST_DICT: dict[str, Any] = json.loads(MANIFEST.to_json())


def _manifest_dict() -> dict[str, Any]:
    """A fresh, valid manifest in its JSON form (with normalisation)."""
    return copy.deepcopy(MANIFEST_DICT)


def _parse_error(data: Any) -> str:
    """The ManifestError message for ``data`` serialised as JSON."""
    with pytest.raises(ManifestError) as exc:
        manifest_from_json(json.dumps(data))
    return str(exc.value)


# --- weight layout --------------------------------------------------------------------------


def test_har_layout_is_kernel_then_bias_per_layer_with_exact_offsets() -> None:
    layout = mlp_tensor_layout((48, 64, 32, 7))
    assert layout == (
        TensorLayout("dense0/kernel", (48, 64), 0),
        TensorLayout("dense0/bias", (64,), 3072),
        TensorLayout("dense1/kernel", (64, 32), 3136),
        TensorLayout("dense1/bias", (32,), 5184),
        TensorLayout("dense2/kernel", (32, 7), 5216),
        TensorLayout("dense2/bias", (7,), 5440),
    )
    assert [t.size for t in layout] == [3072, 64, 2048, 32, 224, 7]
    assert sum(t.size for t in layout) == 5447
    assert MANIFEST.parameter_count == 5447
    assert MANIFEST.layout == layout


@settings(max_examples=50, deadline=None)
@given(sizes=st.lists(st.integers(1, 300), min_size=2, max_size=8))
def test_layout_is_contiguous_and_totals_the_parameter_count(sizes: list[int]) -> None:
    layout = mlp_tensor_layout(sizes)
    assert len(layout) == 2 * (len(sizes) - 1)
    offset = 0
    for t in layout:
        assert t.offset == offset
        assert t.size == math.prod(t.shape)
        offset += t.size
    assert offset == sum(a * b + b for a, b in itertools.pairwise(sizes))


def test_layout_of_a_single_layer_size_is_empty() -> None:
    assert mlp_tensor_layout([5]) == ()


def test_linear_model_manifest_has_one_dense_layer_and_round_trips() -> None:
    """``hidden = []``: one kernel and one bias, 48 * 7 + 7 parameters, parsed back as written."""
    data = HAR_TASK.to_dict()
    data["model"]["hidden"] = []
    manifest = replace(_manifest(_normalisation()), task=task_spec_from_dict(data))
    assert manifest.layout == (
        TensorLayout("dense0/kernel", (48, 7), 0),
        TensorLayout("dense0/bias", (7,), 336),
    )
    assert manifest.parameter_count == 343
    assert manifest_from_json(manifest.to_json()) == manifest
    assert json.loads(manifest.to_json())["layout"][1] == {
        "name": "dense0/bias",
        "shape": [7],
        "offset": 336,
        "size": 7,
    }


# --- normalisation --------------------------------------------------------------------------


def test_normalisation_rejects_mean_and_std_of_different_length() -> None:
    with pytest.raises(ManifestError) as exc:
        Normalisation(mean=(0.0, 1.0), std=(1.0,))
    assert str(exc.value) == "normalisation: mean and std differ in length"


@pytest.mark.parametrize(
    ("mean", "std", "index"),
    [
        ((0.0, 0.0), (1.0, 0.0), 1),
        ((0.0,), (-1.0,), 0),
        ((math.nan, 0.0), (1.0, 1.0), 0),
        ((0.0, 0.0, 0.0), (1.0, 1.0, math.nan), 2),
        ((math.inf,), (1.0,), 0),
        ((0.0,), (math.inf,), 0),
    ],
    ids=["std zero", "std negative", "mean nan", "std nan", "mean inf", "std inf"],
)
def test_normalisation_rejects_bad_values_naming_the_index(
    mean: tuple[float, ...], std: tuple[float, ...], index: int
) -> None:
    with pytest.raises(ManifestError) as exc:
        Normalisation(mean=mean, std=std)
    assert str(exc.value) == (
        f"normalisation[{index}]: mean must be finite and std finite and > 0, "
        f"got mean={mean[index]}, std={std[index]}"
    )


def test_normalisation_dict_round_trip() -> None:
    norm = _normalisation(5)
    assert Normalisation.from_dict(json.loads(json.dumps(norm.to_dict()))) == norm


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_normalisation_from_moments_matches_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(loc=[0.0, 10.0, -5.0, 100.0], scale=[1.0, 0.5, 3.0, 20.0], size=(500, 4))

    norm = normalisation_from_moments(len(x), x.sum(axis=0).tolist(), (x * x).sum(axis=0).tolist())

    np.testing.assert_allclose(norm.mean, x.mean(axis=0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(norm.std, x.std(axis=0), rtol=1e-7)


def test_moments_of_two_halves_add_up_to_the_whole() -> None:
    """The federated computation: devices send sums, the aggregator adds them."""
    rng = np.random.default_rng(42)
    x = rng.normal(loc=3.0, scale=2.0, size=(301, 6))
    a, b = x[:120], x[120:]

    whole = normalisation_from_moments(len(x), x.sum(0).tolist(), (x * x).sum(0).tolist())
    added = normalisation_from_moments(
        len(a) + len(b),
        (a.sum(0) + b.sum(0)).tolist(),
        ((a * a).sum(0) + (b * b).sum(0)).tolist(),
    )
    np.testing.assert_allclose(added.mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(added.std, whole.std, rtol=1e-9)
    np.testing.assert_allclose(added.std, x.std(axis=0), rtol=1e-7)


def test_constant_feature_gets_min_std_instead_of_zero() -> None:
    norm = normalisation_from_moments(4, [8.0, 4.0], [16.0, 6.0], min_std=1e-3)
    assert norm.mean == (2.0, 1.0)
    assert norm.std[0] == 1e-3  # constant 2.0: variance 0
    assert norm.std[1] == pytest.approx(math.sqrt(6.0 / 4 - 1.0))


def test_normalisation_from_moments_needs_two_samples() -> None:
    with pytest.raises(ManifestError) as exc:
        normalisation_from_moments(1, [1.0], [1.0])
    assert str(exc.value) == "normalisation needs at least 2 samples, got 1"


def test_normalisation_from_moments_rejects_length_mismatch() -> None:
    with pytest.raises(ManifestError) as exc:
        normalisation_from_moments(3, [1.0, 2.0], [1.0])
    assert str(exc.value) == "normalisation: sums and sums of squares differ in length"


# --- manifest round trips -------------------------------------------------------------------


@pytest.mark.parametrize("normalisation", [_normalisation(), None], ids=["normalised", "no normalisation"])
def test_manifest_json_round_trip_through_a_file(tmp_path: Path, normalisation: Normalisation | None) -> None:
    manifest = _manifest(normalisation)
    path = tmp_path / "manifest.json"
    path.write_text(manifest.to_json(), encoding="utf-8")

    from_bytes = manifest_from_json(path.read_bytes())
    from_text = manifest_from_json(path.read_text(encoding="utf-8"))

    assert from_bytes == manifest
    assert from_text == manifest
    assert from_bytes.to_json() == manifest.to_json()
    assert from_bytes.task.sha256() == HAR_TASK.sha256()


def test_manifest_json_describes_the_model() -> None:
    data = MANIFEST_DICT
    assert data["format"] == MANIFEST_FORMAT == "fedge-model/1"
    assert data["task_sha256"] == HAR_TASK.sha256()
    assert data["parameter_count"] == 5447
    assert (data["input_dim"], data["output_dim"]) == (48, 7)
    assert data["feature_names"][:2] == ["accel_x.mean", "accel_x.std"]
    assert len(data["feature_names"]) == 48
    assert data["layout"][1] == {"name": "dense0/bias", "shape": [64], "offset": 3072, "size": 64}
    assert data["signatures"] == SIGNATURES
    assert data["builder"] == {"tensorflow": "2.21.0"}
    assert data["normalisation"]["std"][:2] == [1.0, 1.1]
    assert MANIFEST.to_json().endswith("}\n")


# --- manifest_from_json rejects ---------------------------------------------------------------


@pytest.mark.parametrize("as_bytes", [False, True], ids=["str", "bytes"])
def test_oversize_input_is_rejected_before_parsing(as_bytes: bool) -> None:
    """Invalid JSON over the limit reports the size, proving json.loads never ran."""
    raw: str | bytes = "x" * (MAX_MANIFEST_BYTES + 1)
    if as_bytes:
        raw = raw.encode()
    with pytest.raises(ManifestError) as exc:
        manifest_from_json(raw)
    assert str(exc.value) == (f"manifest is over the limit of {MAX_MANIFEST_BYTES} bytes")


def test_size_limit_is_inclusive() -> None:
    """A valid manifest padded to exactly the limit parses; one byte more is refused."""
    text = MANIFEST.to_json()
    exact = text + " " * (MAX_MANIFEST_BYTES - len(text))
    assert len(exact.encode()) == MAX_MANIFEST_BYTES
    assert manifest_from_json(exact.encode()) == MANIFEST
    with pytest.raises(ManifestError, match="over the limit"):
        manifest_from_json((exact + " ").encode())


@pytest.mark.parametrize(
    "raw",
    ["", "{", '{"format": "fedge-model/1",}', "not json", b"\xff\xfe\x00garbage", b'{"a": "\xc3\x28"}'],
    ids=["empty", "unclosed", "trailing comma", "word", "bad utf-16", "bad utf-8"],
)
def test_bad_json_is_rejected(raw: str | bytes) -> None:
    with pytest.raises(ManifestError) as exc:
        manifest_from_json(raw)
    assert str(exc.value).startswith("manifest is not valid JSON: ")


@pytest.mark.parametrize("raw", ["[]", "null", "42", '"fedge-model/1"', "[{}]"])
def test_non_object_is_rejected(raw: str) -> None:
    with pytest.raises(ManifestError) as exc:
        manifest_from_json(raw)
    assert str(exc.value) == "manifest must be a JSON object"


@pytest.mark.parametrize(
    ("fmt", "shown"),
    [("fedge-model/2", "'fedge-model/2'"), (1, "1"), (None, "None")],
)
def test_wrong_format_is_rejected(fmt: Any, shown: str) -> None:
    data = _manifest_dict()
    data["format"] = fmt
    assert _parse_error(data) == f"manifest format must be 'fedge-model/1', got {shown}"


def test_missing_format_is_rejected() -> None:
    data = _manifest_dict()
    del data["format"]
    assert _parse_error(data) == "manifest format must be 'fedge-model/1', got None"


def test_missing_task_is_rejected() -> None:
    data = _manifest_dict()
    del data["task"]
    assert _parse_error(data) == "manifest: missing 'task'"


def test_invalid_embedded_task_reports_the_task_field() -> None:
    data = _manifest_dict()
    data["task"]["training"]["learning_rate"] = -1
    assert _parse_error(data) == "manifest: task spec: training.learning_rate: must be > 0, got -1.0"


def test_embedded_task_that_is_not_an_object_is_rejected() -> None:
    data = _manifest_dict()
    data["task"] = "har-watch"
    assert _parse_error(data) == "manifest: task spec: <root>: must be a table"


@pytest.mark.parametrize("key", ["model_sha256", "initial_weights_sha256"])
@pytest.mark.parametrize(
    "value",
    ["AB" * 32, "ab" * 31 + "a", "ab" * 33, "g" * 64, "", 0, None, ["ab" * 32]],
    ids=["uppercase", "63 digits", "66 digits", "not hex", "empty", "int", "null", "list"],
)
def test_bad_sha256_is_rejected(key: str, value: Any) -> None:
    data = _manifest_dict()
    data[key] = value
    assert _parse_error(data) == SHA_ERROR.format(key)


def test_missing_sha256_is_rejected() -> None:
    data = _manifest_dict()
    del data["initial_weights_sha256"]
    assert _parse_error(data) == SHA_ERROR.format("initial_weights_sha256")


@pytest.mark.parametrize(
    "model_file",
    ["models/model.tflite", "/etc/passwd", "../model.tflite", "..", ".", "", 7, None],
)
def test_model_file_must_be_a_plain_file_name(model_file: Any) -> None:
    data = _manifest_dict()
    data["model_file"] = model_file
    assert _parse_error(data) == "manifest: model_file must be a plain file name"


@pytest.mark.parametrize("model_bytes", [0, -1, "123456", True, 1.5, None])
def test_model_bytes_must_be_a_positive_integer(model_bytes: Any) -> None:
    data = _manifest_dict()
    data["model_bytes"] = model_bytes
    assert _parse_error(data) == "manifest: model_bytes must be a positive integer"


def test_normalisation_length_must_match_the_task() -> None:
    data = _manifest_dict()
    data["normalisation"] = _normalisation(47).to_dict()
    assert _parse_error(data) == "manifest: normalisation has 47 features, the task has 48"


@pytest.mark.parametrize(
    ("normalisation", "message"),
    [
        ([1.0], "normalisation: must be an object with 'mean' and 'std'"),
        ({"mean": [0.0]}, "normalisation: must be an object with 'mean' and 'std'"),
        (
            {"mean": [0.0], "std": [1.0], "var": [1.0]},
            "normalisation: must be an object with 'mean' and 'std'",
        ),
        ({"mean": ["0"], "std": [1.0]}, "normalisation.mean: must be a list of numbers"),
        ({"mean": [0.0], "std": [True]}, "normalisation.std: must be a list of numbers"),
        ({"mean": 0.0, "std": [1.0]}, "normalisation.mean: must be a list of numbers"),
        ({"mean": [0.0, 1.0], "std": [1.0]}, "normalisation: mean and std differ in length"),
        (
            {"mean": [0.0], "std": [0]},
            "normalisation[0]: mean must be finite and std finite and > 0, got mean=0.0, std=0.0",
        ),
    ],
    ids=["list", "no std", "extra key", "string mean", "bool std", "scalar mean", "lengths", "std 0"],
)
def test_malformed_normalisation_is_rejected(normalisation: Any, message: str) -> None:
    data = _manifest_dict()
    data["normalisation"] = normalisation
    assert _parse_error(data) == message


def test_nan_normalisation_in_json_is_rejected() -> None:
    """Python's json accepts the non-standard NaN literal; the manifest must not."""
    text = MANIFEST.to_json().replace('"mean": [\n      -3.0,', '"mean": [\n      NaN,', 1)
    assert "NaN" in text
    with pytest.raises(ManifestError) as exc:
        manifest_from_json(text)
    assert str(exc.value).startswith(
        "normalisation[0]: mean must be finite and std finite and > 0, got mean=nan"
    )


@pytest.mark.parametrize(
    "builder", [None, "2.21.0", {}, {"tensorflow": 2.21}], ids=["null", "str", "empty", "float"]
)
def test_builder_tensorflow_must_be_a_string(builder: Any) -> None:
    data = _manifest_dict()
    data["builder"] = builder
    assert _parse_error(data) == "manifest: builder.tensorflow must be a string"


@pytest.mark.parametrize(
    ("count", "shown"),
    [(5448, "5448"), (0, "0"), (None, "null"), ("5447", '"5447"'), (5447.0, "5447.0")],
    ids=["off by one", "zero", "null", "string", "float"],
)
def test_tampered_parameter_count_is_rejected(count: Any, shown: str) -> None:
    data = _manifest_dict()
    data["parameter_count"] = count
    assert _parse_error(data) == f"manifest: parameter_count {shown} does not match the task's 5447"


@pytest.mark.parametrize(
    ("key", "value"),
    [("layout", []), ("input_dim", 47), ("output_dim", 8), ("feature_names", ["a"]), ("signatures", {})],
)
def test_tampered_derived_fields_are_rejected(key: str, value: Any) -> None:
    data = _manifest_dict()
    data[key] = value
    assert _parse_error(data).startswith(f"manifest: {key} ")
    assert "does not match the task's" in _parse_error(data)


def test_tampered_task_is_caught_by_its_hash() -> None:
    data = _manifest_dict()
    data["task"]["training"]["learning_rate"] = 0.5  # still a valid task, but not the one hashed
    assert _parse_error(data) == "manifest: task_sha256 does not match the embedded task"


def test_missing_task_hash_is_rejected() -> None:
    data = _manifest_dict()
    del data["task_sha256"]
    assert _parse_error(data) == "manifest: task_sha256 does not match the embedded task"


def test_manifest_error_is_a_fedge_error() -> None:
    assert issubclass(ManifestError, FedgeError)


# --- regressions: bugs these tests found, now fixed ------------------------------------------


def test_deeply_nested_json_is_a_manifest_error() -> None:
    with pytest.raises(ManifestError):
        manifest_from_json("[" * 100_000)


def test_overlong_integer_is_a_manifest_error() -> None:
    with pytest.raises(ManifestError):
        manifest_from_json('{"format": "fedge-model/1", "model_bytes": ' + "1" * 5000 + "}")


def test_huge_integer_in_the_task_is_a_manifest_error() -> None:
    data = _manifest_dict()
    data["task"]["training"]["learning_rate"] = 10**400
    with pytest.raises(ManifestError):
        manifest_from_json(json.dumps(data))


def test_huge_integer_in_normalisation_is_a_manifest_error() -> None:
    data = _manifest_dict()
    data["normalisation"]["mean"][0] = 10**400
    with pytest.raises(ManifestError):
        manifest_from_json(json.dumps(data))


def test_sha256_with_trailing_newline_is_rejected() -> None:
    data = _manifest_dict()
    data["model_sha256"] = MODEL_SHA + "\n"
    assert _parse_error(data) == SHA_ERROR.format("model_sha256")


def test_size_limit_counts_utf8_bytes_of_a_str() -> None:
    raw = "€" * (MAX_MANIFEST_BYTES // 2)  # 2 Mi characters, 6 MiB as UTF-8
    assert len(raw.encode()) > MAX_MANIFEST_BYTES
    with pytest.raises(ManifestError, match="over the limit"):
        manifest_from_json(raw)


# --- fuzzing: only ManifestError (or success) ---------------------------------------------------

# JSON values with 64-bit integers (huge integers are the known bug above).
_JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=16)
    | st.sampled_from([MANIFEST_FORMAT, MODEL_SHA, "model.tflite", "..", "sgd", "adam", "mean"])
)
_JSON_KEYS = st.sampled_from([*sorted(MANIFEST_DICT), "mean", "std", "tensorflow"]) | st.text(max_size=8)
_JSON_VALUES = st.recursive(
    _JSON_LEAVES,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_JSON_KEYS, children, max_size=3),
    max_leaves=6,
)


def _parse_or_manifest_error(raw: str | bytes) -> ModelManifest | None:
    try:
        manifest = manifest_from_json(raw)
    except ManifestError as exc:
        assert str(exc)
        return None
    # Whatever parses must survive its own round trip.
    assert manifest_from_json(manifest.to_json()) == manifest
    return manifest


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=300))
def test_arbitrary_bytes_only_raise_manifest_error(raw: bytes) -> None:
    _parse_or_manifest_error(raw)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.dictionaries(_JSON_KEYS, _JSON_VALUES, max_size=8))
def test_arbitrary_json_objects_only_raise_manifest_error(data: dict[str, Any]) -> None:
    _parse_or_manifest_error(json.dumps(data))


def _containers(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths of every dict and list inside ``node`` (the root is ``()``)."""
    found = [path]
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        if isinstance(value, (dict, list)):
            found.extend(_containers(value, (*path, key)))
    return found


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_manifests_only_raise_manifest_error(data: st.DataObject) -> None:
    """Random edits anywhere in a valid manifest, including inside the embedded task."""
    doc = _manifest_dict()
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        path = data.draw(st.sampled_from(_containers(doc)), label="container")
        node: Any = doc
        for key in path:
            node = node[key]
        if isinstance(node, dict):
            existing = st.sampled_from(sorted(node)) if node else _JSON_KEYS
            key = data.draw(existing | _JSON_KEYS, label="key")
        elif node:
            key = data.draw(st.integers(0, len(node) - 1), label="index")
        else:
            continue
        if isinstance(node, dict) and data.draw(st.booleans(), label="delete"):
            node.pop(key, None)
        else:
            node[key] = data.draw(_JSON_VALUES, label="value")
    _parse_or_manifest_error(json.dumps(doc))


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_byte_level_corruption_only_raises_manifest_error(data: st.DataObject) -> None:
    raw = bytearray(MANIFEST.to_json().encode())
    for _ in range(data.draw(st.integers(1, 4), label="flips")):
        i = data.draw(st.integers(0, len(raw) - 1), label="position")
        raw[i] = data.draw(st.integers(0, 255), label="byte")
    _parse_or_manifest_error(bytes(raw))
