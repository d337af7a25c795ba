"""Task specs: the shipped HAR spec, canonical round trips, hashing, and strict validation.

Every invalid spec must be refused with a :class:`TaskSpecError` that names the offending
field (``exc.field``) and says what is wrong (``exc.problem``); nothing else may escape.
"""

from __future__ import annotations

import copy
import json
import math
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedge.protocol.errors import FedgeError, TaskSpecError
from fedge.protocol.task import (
    MAX_CLASSES,
    MAX_FEATURES,
    MAX_HIDDEN_UNITS,
    MAX_LAYERS,
    WINDOW_STATISTICS,
    TaskSpec,
    parse_task_spec,
    task_spec_from_dict,
)

HAR_TASK_PATH = Path(__file__).resolve().parents[2] / "tasks" / "har-watch.toml"
HAR_RESOURCES = ("accel_x", "accel_y", "accel_z", "gyro_x", "gyro_y", "gyro_z")
HAR_STATISTICS = ("mean", "std", "min", "max", "median", "rms", "p10", "p90")
HAR_CLASSES = ("PEN", "ABD", "FEL", "IR", "ER", "TRAP", "ROW")

#: Marks a key to delete in :func:`_with`.
DELETE = object()

TRAINING_KEYS = (
    "batch_size, beta1, beta2, epsilon, learning_rate, local_epochs, momentum, optimizer, proximal_mu"
)


def _har_toml_dict() -> dict[str, Any]:
    """A fresh copy of the shipped spec in its TOML layout (``[task]`` table)."""
    return tomllib.loads(HAR_TASK_PATH.read_text(encoding="utf-8"))


def _with(data: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``data`` with dotted-path changes; a value of ``DELETE`` removes the key."""
    out = copy.deepcopy(data)
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        node = out
        for p in parents:
            node = node[p]
        if value is DELETE:
            node.pop(key, None)
        else:
            node[key] = value
    return out


def _adam_dict() -> dict[str, Any]:
    return _with(
        _har_toml_dict(),
        {
            "training.optimizer": "adam",
            "training.momentum": DELETE,
            "training.learning_rate": 0.001,
            "training.beta1": 0.85,
            "training.beta2": 0.99,
            "training.epsilon": 1e-8,
        },
    )


def _regression_dict() -> dict[str, Any]:
    """A regression task without a window or sample rate (every optional part left out)."""
    return {
        "task": {"name": "room-temp"},
        "features": {"resources": ["humidity", "co2", "occupancy"]},
        "label": {"resource": "temperature"},
        "model": {"kind": "regression", "hidden": [16]},
        "training": {"optimizer": "sgd", "learning_rate": 0.01, "batch_size": 8, "local_epochs": 3},
    }


# --- the shipped spec -----------------------------------------------------------------------


def test_shipped_har_watch_spec_parses_with_documented_shape() -> None:
    spec = parse_task_spec(HAR_TASK_PATH.read_text(encoding="utf-8"))

    assert spec.name == "har-watch"
    assert spec.features.resources == HAR_RESOURCES
    assert spec.features.sample_rate_hz == 50.0
    assert spec.features.window is not None
    assert (spec.features.window.size, spec.features.window.step) == (100, 50)
    assert spec.features.window.statistics == HAR_STATISTICS
    assert spec.label.resource == "activity"
    assert spec.label.classes == HAR_CLASSES
    assert spec.model.kind == "classification"
    assert spec.model.hidden == (64, 32)
    assert spec.model.seed == 0
    assert spec.training.optimizer == "sgd"
    # Hyper-parameter values are tuned over time; only their kind and validity are pinned here.
    assert isinstance(spec.training.learning_rate, float) and spec.training.learning_rate > 0
    assert 0 <= spec.training.momentum < 1
    assert (spec.training.batch_size, spec.training.local_epochs) == (32, 3)
    assert (spec.input_dim, spec.output_dim) == (48, 7)
    assert spec.layer_sizes == (48, 64, 32, 7)


def test_shipped_har_watch_feature_names_are_resource_major() -> None:
    spec = parse_task_spec(HAR_TASK_PATH.read_text(encoding="utf-8"))

    names = spec.features.names
    assert len(names) == spec.input_dim == 48
    assert names[:3] == ("accel_x.mean", "accel_x.std", "accel_x.min")
    assert names[7] == "accel_x.p90"
    assert names[8] == "accel_y.mean"
    assert names[-1] == "gyro_z.p90"
    assert names == tuple(f"{r}.{s}" for r in HAR_RESOURCES for s in HAR_STATISTICS)


def test_spec_parses_from_a_real_file(tmp_path: Path) -> None:
    """The same spec, written to disk and read back, parses to the shipped spec."""
    path = tmp_path / "copy.toml"
    path.write_text(HAR_TASK_PATH.read_text(encoding="utf-8"), encoding="utf-8")
    assert parse_task_spec(path.read_text(encoding="utf-8")) == task_spec_from_dict(_har_toml_dict())


def test_unwindowed_spec_uses_one_feature_per_resource() -> None:
    spec = task_spec_from_dict(_regression_dict())
    assert spec.features.window is None
    assert spec.features.sample_rate_hz is None
    assert spec.features.names == ("humidity", "co2", "occupancy")
    assert spec.layer_sizes == (3, 16, 1)
    assert spec.label.classes is None
    assert spec.model.seed == 0  # documented default
    assert spec.description == ""


def test_adam_defaults_apply_when_left_out() -> None:
    data = _with(_har_toml_dict(), {"training.optimizer": "adam", "training.momentum": DELETE})
    training = task_spec_from_dict(data).training
    assert (training.beta1, training.beta2, training.epsilon) == (0.9, 0.999, 1e-7)


@pytest.mark.parametrize("make", [_har_toml_dict, _regression_dict], ids=["logistic", "linear"])
def test_no_hidden_layers_is_a_linear_model(make: Any) -> None:
    """``hidden = []`` in TOML: logistic regression (classification) or linear regression."""
    text = HAR_TASK_PATH.read_text(encoding="utf-8")
    assert text.count("\nhidden = [64, 32]\n") == 1
    if make is _har_toml_dict:
        spec = parse_task_spec(text.replace("\nhidden = [64, 32]\n", "\nhidden = []\n"))
        assert spec.layer_sizes == (48, 7)
    else:
        spec = task_spec_from_dict(_with(_regression_dict(), {"model.hidden": []}))
        assert spec.layer_sizes == (3, 1)
    assert spec.model.hidden == ()
    assert spec.to_dict()["model"]["hidden"] == []
    assert task_spec_from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    deep = task_spec_from_dict(_with(make(), {"model.hidden": [4]}))
    assert spec.sha256() != deep.sha256()


# --- canonical form, round trips, hashing ---------------------------------------------------


@pytest.mark.parametrize(
    "make", [_har_toml_dict, _adam_dict, _regression_dict], ids=["sgd", "adam", "regression"]
)
def test_to_dict_round_trips_to_an_equal_spec_with_the_same_hash(make: Any) -> None:
    spec = task_spec_from_dict(make())

    again = task_spec_from_dict(spec.to_dict())
    via_json = task_spec_from_dict(json.loads(json.dumps(spec.to_dict())))

    assert again == spec
    assert via_json == spec
    assert again.sha256() == spec.sha256() == via_json.sha256()
    assert again.to_dict() == spec.to_dict()
    assert re.fullmatch(r"[0-9a-f]{64}", spec.sha256())


def test_canonical_form_carries_only_the_optimizers_own_hyper_parameters() -> None:
    sgd = task_spec_from_dict(_har_toml_dict()).to_dict()["training"]
    adam = task_spec_from_dict(_adam_dict()).to_dict()["training"]

    assert "momentum" in sgd
    assert not {"beta1", "beta2", "epsilon"} & set(sgd)
    assert {"beta1": 0.85, "beta2": 0.99, "epsilon": 1e-8}.items() <= adam.items()
    assert "momentum" not in adam


def test_canonical_form_is_json_ready_and_names_the_model_type() -> None:
    data = task_spec_from_dict(_har_toml_dict()).to_dict()
    assert data["model"]["type"] == "mlp"
    assert data["features"]["resources"] == list(HAR_RESOURCES)  # lists, not tuples
    assert "_source" not in data
    json.dumps(data, allow_nan=False)  # raises if anything is not plain JSON


def test_hash_ignores_toml_formatting_and_int_versus_float() -> None:
    text = HAR_TASK_PATH.read_text(encoding="utf-8")
    reformatted = "# another comment\n" + text.replace("sample_rate_hz = 50", "sample_rate_hz = 50.0")
    assert reformatted != text
    assert parse_task_spec(reformatted).sha256() == parse_task_spec(text).sha256()


@pytest.mark.parametrize(
    "changes",
    [
        {"training.learning_rate": 0.0123},
        {"training.momentum": 0.55},
        {"training.batch_size": 64},
        {"training.local_epochs": 2},
        {"model.hidden": [64, 16]},
        {"model.seed": 1},
        {"features.window.step": 25},
        {"features.window.statistics": ["mean", "std"]},
        {"label.classes": ["PEN", "ABD", "FEL", "IR", "ER", "ROW", "TRAP"]},  # class order matters
    ],
    ids=lambda c: next(iter(c)),
)
def test_hash_changes_when_a_hyper_parameter_changes(changes: dict[str, Any]) -> None:
    base = task_spec_from_dict(_har_toml_dict())
    changed = task_spec_from_dict(_with(_har_toml_dict(), changes))
    assert changed != base
    assert changed.sha256() != base.sha256()


def test_hash_changes_between_adam_hyper_parameters() -> None:
    base = task_spec_from_dict(_adam_dict())
    changed = task_spec_from_dict(_with(_adam_dict(), {"training.beta2": 0.98}))
    assert changed.sha256() != base.sha256()


# --- invalid specs --------------------------------------------------------------------------


def test_invalid_toml_is_a_task_spec_error() -> None:
    with pytest.raises(TaskSpecError) as exc:
        parse_task_spec("[task]\nname = 'har\n")
    assert exc.value.field == "<toml>"
    assert exc.value.problem.startswith("not valid TOML: ")
    assert str(exc.value).startswith("task spec: <toml>: not valid TOML: ")
    assert isinstance(exc.value, FedgeError)


def test_misspelt_key_in_a_real_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    text = HAR_TASK_PATH.read_text(encoding="utf-8")
    assert text.count("\nlearning_rate = ") == 1
    path.write_text(text.replace("\nlearning_rate = ", "\nlearing_rate = "), encoding="utf-8")
    with pytest.raises(TaskSpecError) as exc:
        parse_task_spec(path.read_text(encoding="utf-8"))
    assert exc.value.field == "training.learing_rate"
    assert exc.value.problem == f"unknown key; expected one of: {TRAINING_KEYS}"
    assert str(exc.value) == f"task spec: training.learing_rate: {exc.value.problem}"


def test_root_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(TaskSpecError) as exc:
        task_spec_from_dict(["not", "a", "table"])  # type: ignore[arg-type]
    assert (exc.value.field, exc.value.problem) == ("<root>", "must be a table")


STATS_KNOWN = ", ".join(WINDOW_STATISTICS)

# (changes to the shipped spec's TOML dict, expected field, expected problem)
INVALID_CASES: list[tuple[str, dict[str, Any], str, str]] = [
    # missing tables and keys
    ("missing features", {"features": DELETE}, "features", "missing table"),
    ("missing label", {"label": DELETE}, "label", "missing table"),
    ("missing model", {"model": DELETE}, "model", "missing table"),
    ("missing training", {"training": DELETE}, "training", "missing table"),
    # without [task] the spec is read in its canonical layout, which needs a top-level name
    ("missing task", {"task": DELETE}, "task", "missing table"),
    ("missing task.name", {"task.name": DELETE}, "task.name", "missing"),
    ("missing window.size", {"features.window.size": DELETE}, "features.window.size", "missing"),
    ("missing resources", {"features.resources": DELETE}, "features.resources", "missing"),
    ("missing label.resource", {"label.resource": DELETE}, "label.resource", "missing"),
    ("missing model.kind", {"model.kind": DELETE}, "model.kind", "missing"),
    (
        "missing model.hidden",
        {"model.hidden": DELETE},
        "model.hidden",
        "must be a list of hidden layer sizes ([] for a linear model)",
    ),
    ("missing optimizer", {"training.optimizer": DELETE}, "training.optimizer", "missing"),
    ("missing learning_rate", {"training.learning_rate": DELETE}, "training.learning_rate", "missing"),
    ("missing batch_size", {"training.batch_size": DELETE}, "training.batch_size", "missing"),
    ("missing local_epochs", {"training.local_epochs": DELETE}, "training.local_epochs", "missing"),
    # tables of the wrong type
    ("features not a table", {"features": "accel_x"}, "features", "must be a table"),
    ("window not a table", {"features.window": [100, 50]}, "features.window", "must be a table"),
    ("task not a table", {"task": "har"}, "task", "must be a table"),
    # unknown keys anywhere
    (
        "unknown top-level key",
        {"extra": 1},
        "extra",
        "unknown key; expected one of: features, label, model, task, training",
    ),
    ("unknown task key", {"task.nmae": "x"}, "task.nmae", "unknown key; expected one of: description, name"),
    (
        "unknown features key",
        {"features.rate": 50},
        "features.rate",
        "unknown key; expected one of: resources, sample_rate_hz, window",
    ),
    (
        "unknown window key",
        {"features.window.sizee": 100},
        "features.window.sizee",
        "unknown key; expected one of: size, statistics, step",
    ),
    (
        "unknown label key",
        {"label.class": ["a", "b"]},
        "label.class",
        "unknown key; expected one of: classes, resource",
    ),
    (
        "unknown model key",
        {"model.layers": [64]},
        "model.layers",
        "unknown key; expected one of: hidden, kind, seed, type",
    ),
    (
        "misspelt learning_rate",
        {"training.learing_rate": 0.1},
        "training.learing_rate",
        f"unknown key; expected one of: {TRAINING_KEYS}",
    ),
    # wrong types
    ("bool batch_size", {"training.batch_size": True}, "training.batch_size", "must be an integer"),
    ("float batch_size", {"training.batch_size": 32.0}, "training.batch_size", "must be an integer"),
    ("string local_epochs", {"training.local_epochs": "1"}, "training.local_epochs", "must be an integer"),
    (
        "string learning_rate",
        {"training.learning_rate": "0.05"},
        "training.learning_rate",
        "must be a number",
    ),
    ("bool learning_rate", {"training.learning_rate": True}, "training.learning_rate", "must be a number"),
    ("list momentum", {"training.momentum": [0.9]}, "training.momentum", "must be a number"),
    ("string sample rate", {"features.sample_rate_hz": "50"}, "features.sample_rate_hz", "must be a number"),
    ("bool window size", {"features.window.size": False}, "features.window.size", "must be an integer"),
    (
        "bool hidden unit",
        {"model.hidden": [64, True]},
        "model.hidden[1]",
        f"must be an integer in 1..{MAX_HIDDEN_UNITS}",
    ),
    (
        "float hidden unit",
        {"model.hidden": [64.0]},
        "model.hidden[0]",
        f"must be an integer in 1..{MAX_HIDDEN_UNITS}",
    ),
    (
        "hidden not a list",
        {"model.hidden": 64},
        "model.hidden",
        "must be a list of hidden layer sizes ([] for a linear model)",
    ),
    ("string seed", {"model.seed": "0"}, "model.seed", "must be an integer"),
    ("numeric optimizer", {"training.optimizer": 1}, "training.optimizer", "must be a string"),
    ("numeric task name", {"task.name": 7}, "task.name", "must be a string"),
    ("numeric description", {"task.description": 7}, "task.description", "must be a string"),
    (
        "resources not a list",
        {"features.resources": "accel_x"},
        "features.resources",
        "must be a non-empty list of strings",
    ),
    (
        "numeric resource",
        {"features.resources": ["accel_x", 3]},
        "features.resources[1]",
        "must be a non-empty string",
    ),
    ("empty resource", {"features.resources": [""]}, "features.resources[0]", "must be a non-empty string"),
    ("numeric class", {"label.classes": ["PEN", 2]}, "label.classes[1]", "must be a non-empty string"),
    # out of range
    ("zero learning_rate", {"training.learning_rate": 0}, "training.learning_rate", "must be > 0, got 0.0"),
    (
        "negative learning_rate",
        {"training.learning_rate": -0.1},
        "training.learning_rate",
        "must be > 0, got -0.1",
    ),
    ("nan learning_rate", {"training.learning_rate": math.nan}, "training.learning_rate", "must be finite"),
    ("inf learning_rate", {"training.learning_rate": math.inf}, "training.learning_rate", "must be finite"),
    ("-inf momentum", {"training.momentum": -math.inf}, "training.momentum", "must be finite"),
    ("momentum 1", {"training.momentum": 1.0}, "training.momentum", "must be in [0, 1), got 1.0"),
    ("momentum above 1", {"training.momentum": 1.5}, "training.momentum", "must be in [0, 1), got 1.5"),
    ("negative momentum", {"training.momentum": -0.1}, "training.momentum", "must be in [0, 1), got -0.1"),
    ("batch_size 0", {"training.batch_size": 0}, "training.batch_size", "must be in 1..65536, got 0"),
    (
        "batch_size too big",
        {"training.batch_size": 65537},
        "training.batch_size",
        "must be in 1..65536, got 65537",
    ),
    ("local_epochs 0", {"training.local_epochs": 0}, "training.local_epochs", "must be in 1..10000, got 0"),
    ("zero sample rate", {"features.sample_rate_hz": 0}, "features.sample_rate_hz", "must be > 0, got 0.0"),
    ("window size 0", {"features.window.size": 0}, "features.window.size", "must be in 1..1000000, got 0"),
    ("window step 0", {"features.window.step": 0}, "features.window.step", "must be in 1..1000000, got 0"),
    ("negative seed", {"model.seed": -1}, "model.seed", "must be in 0..2147483647, got -1"),
    ("hidden [0]", {"model.hidden": [0]}, "model.hidden[0]", f"must be an integer in 1..{MAX_HIDDEN_UNITS}"),
    (
        "hidden too wide",
        {"model.hidden": [64, MAX_HIDDEN_UNITS + 1]},
        "model.hidden[1]",
        f"must be an integer in 1..{MAX_HIDDEN_UNITS}",
    ),
    (
        "too many layers",
        {"model.hidden": [8] * (MAX_LAYERS + 1)},
        "model.hidden",
        f"more than {MAX_LAYERS} hidden layers",
    ),
    (
        "too many features",
        {
            "features.resources": [f"r{i}" for i in range(400)],
            "features.window.statistics": list(WINDOW_STATISTICS),
        },
        "features",
        f"4800 features exceed the limit {MAX_FEATURES}",
    ),
    (
        "too many resources",
        {"features.resources": [f"r{i}" for i in range(MAX_FEATURES + 1)]},
        "features.resources",
        f"more than {MAX_FEATURES} entries",
    ),
    # enumerations
    ("unknown optimizer", {"training.optimizer": "rmsprop"}, "training.optimizer", "must be 'sgd' or 'adam'"),
    ("unknown kind", {"model.kind": "clustering"}, "model.kind", "must be 'classification' or 'regression'"),
    (
        "unknown model type",
        {"model.type": "cnn"},
        "model.type",
        "unsupported model type 'cnn'; supported: 'mlp', 'imported'",
    ),
    (
        "unknown statistic",
        {"features.window.statistics": ["mean", "variance"]},
        "features.window.statistics",
        f"unknown statistic 'variance'; known: {STATS_KNOWN}; or 'raw' alone (the readings themselves)",
    ),
    (
        "raw mixed with statistics",
        {"features.window.statistics": ["raw", "mean"]},
        "features.window.statistics",
        "'raw' (the readings themselves) cannot be mixed with statistics; "
        'use ["raw"] alone or statistics alone',
    ),
    (
        "hidden in an imported model",
        {"model.type": "imported", "model.hidden": [8]},
        "model.hidden",
        "an imported model's layers and weights come from its Keras model (fedge model import); "
        "remove the key",
    ),
    (
        "no statistics",
        {"features.window.statistics": []},
        "features.window.statistics",
        "must be a non-empty list of strings",
    ),
    # duplicates
    (
        "duplicate statistic",
        {"features.window.statistics": ["mean", "std", "mean"]},
        "features.window.statistics",
        "lists a statistic twice",
    ),
    (
        "duplicate resource",
        {"features.resources": ["accel_x", "accel_y", "accel_x"]},
        "features.resources",
        "lists a resource twice",
    ),
    ("duplicate class", {"label.classes": ["PEN", "ABD", "PEN"]}, "label.classes", "lists a class twice"),
    # labels
    (
        "classification without classes",
        {"label.classes": DELETE},
        "label.classes",
        "required for a classification model",
    ),
    ("one class", {"label.classes": ["PEN"]}, "label.classes", "needs at least 2 classes"),
    ("no classes", {"label.classes": []}, "label.classes", "must be a non-empty list of strings"),
    (
        "too many classes",
        {"label.classes": [f"c{i}" for i in range(MAX_CLASSES + 1)]},
        "label.classes",
        f"more than {MAX_CLASSES} classes",
    ),
    (
        "regression with classes",
        {"model.kind": "regression"},
        "label.classes",
        "a regression model takes a numeric label, not classes",
    ),
    (
        "label is a feature",
        {"label.resource": "accel_x"},
        "label.resource",
        "'accel_x' is also an input feature",
    ),
    # optimizer-specific keys
    ("sgd with beta1", {"training.beta1": 0.9}, "training.beta1", "applies to 'adam' only"),
    ("sgd with beta2", {"training.beta2": 0.999}, "training.beta2", "applies to 'adam' only"),
    ("sgd with epsilon", {"training.epsilon": 1e-7}, "training.epsilon", "applies to 'adam' only"),
    ("adam with momentum", {"training.optimizer": "adam"}, "training.momentum", "applies to 'sgd' only"),
    (
        "adam beta2 1",
        {"training.optimizer": "adam", "training.momentum": DELETE, "training.beta2": 1.0},
        "training.beta2",
        "must be in [0, 1), got 1.0",
    ),
    (
        "adam epsilon 0",
        {"training.optimizer": "adam", "training.momentum": DELETE, "training.epsilon": 0.0},
        "training.epsilon",
        "must be > 0, got 0.0",
    ),
    # names
    ("empty task name", {"task.name": ""}, "task.name", "'' is not a valid name (letters, digits, _ . -)"),
    (
        "task name with space",
        {"task.name": "har watch"},
        "task.name",
        "'har watch' is not a valid name (letters, digits, _ . -)",
    ),
    (
        "task name leading dash",
        {"task.name": "-har"},
        "task.name",
        "'-har' is not a valid name (letters, digits, _ . -)",
    ),
    (
        "task name too long",
        {"task.name": "a" * 129},
        "task.name",
        f"{'a' * 129!r} is not a valid name (letters, digits, _ . -)",
    ),
    (
        "resource with space",
        {"features.resources": ["accel_x", "accel y"]},
        "features.resources[1]",
        "'accel y' is not a valid resource name",
    ),
    (
        "resource with slash",
        {"features.resources": ["a/b"]},
        "features.resources[0]",
        "'a/b' is not a valid resource name",
    ),
    (
        "label with slash",
        {"label.resource": "act/ivity"},
        "label.resource",
        "'act/ivity' is not a valid name (letters, digits, _ . -)",
    ),
]


@pytest.mark.parametrize(
    ("changes", "field", "problem"), [c[1:] for c in INVALID_CASES], ids=[c[0] for c in INVALID_CASES]
)
def test_invalid_spec_names_the_field(changes: dict[str, Any], field: str, problem: str) -> None:
    with pytest.raises(TaskSpecError) as exc:
        task_spec_from_dict(_with(_har_toml_dict(), changes))
    assert exc.value.field == field
    assert exc.value.problem == problem
    assert str(exc.value) == f"task spec: {field}: {problem}"


def test_longest_valid_name_is_accepted() -> None:
    assert task_spec_from_dict(_with(_har_toml_dict(), {"task.name": "a" * 128})).name == "a" * 128


def test_regression_without_classes_in_canonical_form_accepts_null_classes() -> None:
    """The canonical form writes ``classes: null`` for regression; that must parse back."""
    data = task_spec_from_dict(_regression_dict()).to_dict()
    assert data["label"]["classes"] is None
    assert task_spec_from_dict(data).label.classes is None


def test_canonical_layout_rejects_unknown_top_level_key() -> None:
    data = task_spec_from_dict(_har_toml_dict()).to_dict()
    data["nmae"] = "x"
    with pytest.raises(TaskSpecError) as exc:
        task_spec_from_dict(data)
    assert exc.value.field == "nmae"
    assert exc.value.problem == (
        "unknown key; expected one of: description, features, label, model, name, training"
    )


# --- regressions: bugs these tests found, now fixed ------------------------------------------


def test_task_name_with_trailing_newline_is_refused() -> None:
    text = HAR_TASK_PATH.read_text(encoding="utf-8").replace('name = "har-watch"', 'name = "har-watch\\n"')
    assert text != HAR_TASK_PATH.read_text(encoding="utf-8")
    with pytest.raises(TaskSpecError) as exc:
        parse_task_spec(text)
    assert exc.value.field == "task.name"


def test_resource_with_trailing_newline_is_refused() -> None:
    with pytest.raises(TaskSpecError) as exc:
        task_spec_from_dict(_with(_har_toml_dict(), {"features.resources": ["accel_x\n", "accel_y"]}))
    assert exc.value.field == "features.resources[0]"


def test_huge_integer_learning_rate_is_a_task_spec_error() -> None:
    data = task_spec_from_dict(_har_toml_dict()).to_dict()
    data["training"]["learning_rate"] = 10**400
    with pytest.raises(TaskSpecError) as exc:
        task_spec_from_dict(data)
    assert exc.value.field == "training.learning_rate"


def test_deeply_nested_toml_is_a_task_spec_error() -> None:
    with pytest.raises(TaskSpecError) as exc:
        parse_task_spec("a = " + "[" * 100_000)
    assert exc.value.field == "<toml>"


def test_overlong_integer_literal_is_a_task_spec_error() -> None:
    with pytest.raises(TaskSpecError) as exc:
        parse_task_spec("a = " + "1" * 5000)
    assert exc.value.field == "<toml>"


# --- property: random specs either parse or raise TaskSpecError -----------------------------

# TOML-representable leaves (64-bit ints), plus None, which the JSON layout may contain.
_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(
        ["sgd", "adam", "mlp", "regression", "classification", "mean", "p90", "accel_x", "activity", "PEN"]
    )
)
_KEYS = st.sampled_from(
    [
        "name",
        "task",
        "features",
        "window",
        "resources",
        "classes",
        "hidden",
        "momentum",
        "beta1",
        "learning_rate",
        "size",
        "statistics",
        "kind",
        "type",
    ]
) | st.text(max_size=8)
_VALUES = st.recursive(
    _LEAVES,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_KEYS, children, max_size=4),
    max_leaves=12,
)


def _table_paths(node: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every dict (table) inside ``node``, as key paths; ``()`` is the root."""
    paths = [prefix]
    for key, value in node.items():
        if isinstance(value, dict):
            paths.extend(_table_paths(value, (*prefix, key)))
    return paths


def _base_dicts() -> list[dict[str, Any]]:
    har = _har_toml_dict()
    return [
        har,
        task_spec_from_dict(har).to_dict(),
        _adam_dict(),
        _regression_dict(),
        task_spec_from_dict(_regression_dict()).to_dict(),
        _with(_regression_dict(), {"model.hidden": []}),
    ]


_BASE_DICTS = _base_dicts()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_specs_either_parse_or_raise_task_spec_error(data: st.DataObject) -> None:
    spec_dict = copy.deepcopy(data.draw(st.sampled_from(_BASE_DICTS), label="base"))
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        table_path = data.draw(st.sampled_from(_table_paths(spec_dict)), label="table")
        table = spec_dict
        for key in table_path:
            table = table[key]
        op = data.draw(st.sampled_from(["delete", "replace", "add"]), label="op")
        if op in ("delete", "replace") and table:
            key = data.draw(st.sampled_from(sorted(table)), label="key")
            if op == "delete":
                del table[key]
            else:
                table[key] = data.draw(_VALUES, label="value")
        else:
            table[data.draw(_KEYS, label="new key")] = data.draw(_VALUES, label="value")

    try:
        spec = task_spec_from_dict(spec_dict)
    except TaskSpecError as exc:
        assert exc.problem
        assert str(exc) == f"task spec: {exc.field}: {exc.problem}"
        return
    # Whatever parses must be a consistent spec that survives its own canonical round trip.
    assert isinstance(spec, TaskSpec)
    assert task_spec_from_dict(spec.to_dict()) == spec
    assert len(spec.features.names) == spec.input_dim == spec.layer_sizes[0]


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=200))
def test_arbitrary_text_either_parses_or_raises_task_spec_error(text: str) -> None:
    try:
        parse_task_spec(text)
    except TaskSpecError as exc:
        assert exc.field == "<toml>" or exc.problem
        assert str(exc) == f"task spec: {exc.field}: {exc.problem}"


def test_proximal_mu_is_optional_checked_and_left_out_of_the_canonical_form_when_zero() -> None:
    base = HAR_TASK_PATH.read_text(encoding="utf-8")
    spec = parse_task_spec(base)
    assert spec.training.proximal_mu == 0.0 and "proximal_mu" not in spec.to_dict()["training"]
    prox = parse_task_spec(base.replace("[training]\n", "[training]\nproximal_mu = 0.01\n", 1))
    assert prox.training.proximal_mu == 0.01
    assert prox.to_dict()["training"]["proximal_mu"] == 0.01 and prox.sha256() != spec.sha256()
    assert task_spec_from_dict(prox.to_dict()) == prox
    for bad, message in (
        ("-0.1", "must be in [0, 100]"),
        ("1000.0", "must be in [0, 100]"),
        ('"x"', "must be a number"),
    ):
        with pytest.raises(TaskSpecError) as refused:
            parse_task_spec(base.replace("[training]\n", f"[training]\nproximal_mu = {bad}\n", 1))
        assert refused.value.field == "training.proximal_mu" and message in str(refused.value)
