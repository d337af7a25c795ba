"""Round manifests: the signed announcement of the global model and the round.

``round_manifest_from_dict`` reads a document a device verified; every malformed field must be a
:class:`RoundManifestError` naming the field, and the hash that chains manifests must be stable.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest

from fedge.protocol.codec import Codec
from fedge.protocol.errors import FedgeError
from fedge.protocol.model_manifest import ModelManifest, Normalisation
from fedge.protocol.privacy_announcement import PrivacyAnnouncement
from fedge.protocol.round_manifest import (
    MAX_SELECTED_DEVICES,
    PHASES,
    AsyncAggregation,
    RoundManifest,
    RoundManifestError,
    round_manifest_from_dict,
)
from fedge.protocol.secagg.announcement import SecureAggregationAnnouncement
from fedge.protocol.strategy_announcement import StrategyAnnouncement
from fedge.protocol.task import parse_task_spec

HAR_TASK_PATH = Path(__file__).resolve().parents[2] / "tasks" / "har-watch.toml"
HAR_TASK = parse_task_spec(HAR_TASK_PATH.read_text(encoding="utf-8"))
MODEL_SHA = "ab" * 32
WEIGHTS_SHA = "0123456789abcdef" * 4
PARENT_SHA = "fe" * 32
NORM = Normalisation(mean=tuple(i * 0.5 - 3.0 for i in range(48)), std=tuple(1.0 + i / 10 for i in range(48)))
MODEL_MANIFEST = ModelManifest(
    task=HAR_TASK,
    model_file="model.tflite",
    model_sha256=MODEL_SHA,
    model_bytes=123_456,
    initial_weights_sha256=WEIGHTS_SHA,
    normalisation=NORM,
    tensorflow_version="2.21.0",
)
MANIFEST = RoundManifest(
    fleet="fleet-1",
    version=7,
    parent_sha256=PARENT_SHA,
    phase="train",
    round_number=3,
    round_id="r-3",
    issued_at=1_700_000_000.5,
    deadline=1_700_000_060.25,
    expires_at=1_700_000_120.0,
    selected_devices=("watch-01", "watch-02", "watch-07"),
    min_devices=2,
    codec=Codec.INT8,
    model_sha256=MODEL_SHA,
    model_bytes=123_456,
    weights_sha256=WEIGHTS_SHA,
    weights_bytes=4 * 5447,
    model_manifest=MODEL_MANIFEST,
    normalisation=NORM,
)
MANIFEST_DICT: dict[str, Any] = json.loads(json.dumps(MANIFEST.to_dict()))


def _data(**changes: Any) -> dict[str, Any]:
    """A fresh, valid manifest document (as a device decodes it) with ``changes`` applied."""
    data = copy.deepcopy(MANIFEST_DICT)
    data.update(changes)
    return data


def _error(data: Any) -> str:
    with pytest.raises(RoundManifestError) as exc:
        round_manifest_from_dict(data)
    return str(exc.value)


# --- round trips and hashing -----------------------------------------------------------------


def test_to_dict_round_trips_through_json() -> None:
    parsed = round_manifest_from_dict(json.loads(json.dumps(MANIFEST.to_dict())))
    assert parsed == MANIFEST
    assert parsed.to_dict() == MANIFEST.to_dict()
    assert parsed.sha256() == MANIFEST.sha256()


@pytest.mark.parametrize(
    ("phase", "with_norm"),
    [("moments", True), ("moments", False), ("train", True), ("final", True), ("final", False)],
    ids=["moments", "moments without normalisation", "train", "final", "final without normalisation"],
)
def test_each_phase_round_trips(phase: str, with_norm: bool) -> None:
    assert phase in PHASES
    manifest = dataclasses.replace(MANIFEST, phase=phase, normalisation=NORM if with_norm else None)
    assert round_manifest_from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest


def test_first_manifest_has_an_empty_parent() -> None:
    manifest = dataclasses.replace(MANIFEST, parent_sha256="", version=0, phase="moments")
    assert round_manifest_from_dict(manifest.to_dict()).parent_sha256 == ""


def test_final_manifest_selects_no_device() -> None:
    manifest = dataclasses.replace(MANIFEST, selected_devices=(), phase="final")
    assert round_manifest_from_dict(manifest.to_dict()).selected_devices == ()


def test_an_open_round_that_cannot_reach_its_quorum_is_refused() -> None:
    manifest = dataclasses.replace(MANIFEST, selected_devices=("watch-01",), min_devices=2)
    with pytest.raises(RoundManifestError, match="min_devices exceeds the number of selected devices"):
        round_manifest_from_dict(manifest.to_dict())


def test_a_device_selected_twice_is_refused() -> None:
    manifest = dataclasses.replace(MANIFEST, selected_devices=("watch-01", "watch-01"), min_devices=1)
    with pytest.raises(RoundManifestError, match="selected_devices lists a device twice"):
        round_manifest_from_dict(manifest.to_dict())


def test_to_dict_has_exactly_the_documented_fields() -> None:
    assert MANIFEST_DICT["codec"] == "int8"
    assert MANIFEST_DICT["selected_devices"] == ["watch-01", "watch-02", "watch-07"]
    assert MANIFEST_DICT["model_manifest"] == json.loads(MODEL_MANIFEST.to_json())
    assert MANIFEST_DICT["normalisation"] == NORM.to_dict()
    assert sorted(MANIFEST_DICT) == sorted(
        [
            "fleet",
            "version",
            "parent_sha256",
            "phase",
            "round_number",
            "round_id",
            "issued_at",
            "deadline",
            "expires_at",
            "selected_devices",
            "min_devices",
            "codec",
            "model_sha256",
            "model_bytes",
            "weights_sha256",
            "weights_bytes",
            "model_manifest",
            "normalisation",
        ]
    )


def test_sha256_is_the_hash_of_the_canonical_document() -> None:
    canonical = json.dumps(MANIFEST.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)
    assert MANIFEST.sha256() == hashlib.sha256(canonical.encode()).hexdigest()
    assert MANIFEST.sha256() == MANIFEST.sha256()
    rebuilt = round_manifest_from_dict(dict(reversed(list(copy.deepcopy(MANIFEST_DICT).items()))))
    assert rebuilt.sha256() == MANIFEST.sha256()


_CHANGES: dict[str, Any] = {
    "fleet": "fleet-2",
    "version": 8,
    "parent_sha256": "",
    "phase": "final",
    "round_number": 4,
    "round_id": "r-4",
    "issued_at": 1_700_000_000.0,
    "deadline": 1_700_000_060.0,
    "expires_at": 1_700_000_121.0,
    "selected_devices": ("watch-01", "watch-02"),
    "min_devices": 3,
    "codec": Codec.FP16,
    "model_sha256": "cd" * 32,
    "model_bytes": 123_457,
    "weights_sha256": "ef" * 32,
    "weights_bytes": 4 * 5447 + 1,
    "model_manifest": dataclasses.replace(MODEL_MANIFEST, model_bytes=1),
    "normalisation": None,
    "generation": 2,
    "privacy": PrivacyAnnouncement("central", 0.5, False, 1.2, 2, 0.0, 8.0, 1e-5),
    "secure_aggregation": SecureAggregationAnnouncement(2.0, 32, 2, 2),
    "strategy": StrategyAnnouncement("median", {"server_learning_rate": 1.0}),
    "topk_fraction": 0.2,
    "aggregation": AsyncAggregation(buffer_size=3, max_staleness=4),
}


def test_generation_is_in_the_document_only_after_the_first() -> None:
    assert MANIFEST.generation == 1 and "generation" not in MANIFEST_DICT  # what older devices accept
    second = dataclasses.replace(MANIFEST, generation=2)
    doc = second.to_dict()
    assert doc["generation"] == 2
    assert round_manifest_from_dict(doc) == second
    assert round_manifest_from_dict(doc).sha256() == second.sha256() != MANIFEST.sha256()
    for bad in (1, 0, True, 2.0, "2", 1_000_001):
        with pytest.raises(RoundManifestError) as err:
            round_manifest_from_dict({**MANIFEST_DICT, "generation": bad})
        assert str(err.value) == "generation must be an integer in 2..1000000 (absent: 1)"
        assert err.value.field == "generation"
    with pytest.raises(RoundManifestError, match=r"unexpected \['generations'\]"):
        round_manifest_from_dict({**MANIFEST_DICT, "generations": 2})


def test_privacy_is_in_the_document_only_when_announced_and_checked_like_any_field() -> None:
    assert MANIFEST.privacy is None and "privacy" not in MANIFEST_DICT
    announced = dataclasses.replace(MANIFEST, privacy=_CHANGES["privacy"])
    doc = announced.to_dict()
    assert doc["privacy"]["clip_bound"] == 0.5
    assert round_manifest_from_dict(json.loads(json.dumps(doc))) == announced
    with pytest.raises(RoundManifestError) as err:
        round_manifest_from_dict({**doc, "privacy": {**doc["privacy"], "clip_bound": 0}})
    assert (str(err.value), err.value.field) == ("privacy.clip_bound must be > 0", "privacy.clip_bound")
    with pytest.raises(RoundManifestError, match="privacy must be an object"):
        round_manifest_from_dict({**doc, "privacy": None})


def test_secure_aggregation_is_announced_in_train_rounds_only() -> None:
    assert MANIFEST.phase == "train" and "secure_aggregation" not in MANIFEST_DICT
    secure = dataclasses.replace(MANIFEST, secure_aggregation=SecureAggregationAnnouncement(1.5, 32, 6, 4))
    doc = secure.to_dict()
    assert doc["secure_aggregation"] == {"clip_norm": 1.5, "bits": 32, "degree": 6, "threshold": 4}
    assert round_manifest_from_dict(json.loads(json.dumps(doc))) == secure
    with pytest.raises(RoundManifestError) as err:
        round_manifest_from_dict({**doc, "phase": "final"})
    assert (str(err.value), err.value.field) == (
        "secure_aggregation is only for train rounds",
        "secure_aggregation",
    )
    for key, bad in (("bits", 63), ("clip_norm", 0), ("threshold", True), ("degree", 1)):
        with pytest.raises(RoundManifestError) as err:
            round_manifest_from_dict({**doc, "secure_aggregation": {**doc["secure_aggregation"], key: bad}})
        assert err.value.field == f"secure_aggregation.{key}"


def test_strategy_is_announced_in_train_rounds_only_and_omitted_for_fedavg() -> None:
    assert MANIFEST.phase == "train" and MANIFEST.strategy is None and "strategy" not in MANIFEST_DICT
    params = {"server_learning_rate": 0.05, "server_beta1": 0.9, "server_beta2": 0.99, "server_tau": 0.001}
    adam = dataclasses.replace(MANIFEST, strategy=StrategyAnnouncement("fedadam", params))
    doc = adam.to_dict()
    assert doc["strategy"] == {"name": "fedadam", "parameters": params}
    assert round_manifest_from_dict(json.loads(json.dumps(doc))) == adam
    assert (
        round_manifest_from_dict(json.loads(json.dumps(doc))).sha256() == adam.sha256() != MANIFEST.sha256()
    )
    krum = {
        "name": "multi_krum",
        "parameters": {"server_learning_rate": 1, "byzantine_devices": 2, "multi_krum_select": 0},
    }
    parsed = round_manifest_from_dict({**MANIFEST_DICT, "strategy": krum})
    assert parsed.strategy is not None and parsed.strategy.parameters["byzantine_devices"] == 2
    with pytest.raises(RoundManifestError) as err:
        round_manifest_from_dict({**doc, "phase": "final"})
    assert (str(err.value), err.value.field) == ("strategy is only for train rounds", "strategy")
    bad: list[tuple[Any, str]] = [
        (None, "strategy"),
        ({"name": "fedadam"}, "strategy"),
        ({"name": "fedavg", "parameters": {}}, "strategy.name"),
        ({"name": "fedprox", "parameters": {}}, "strategy.name"),
        ({"name": "fedadam", "parameters": {**params, "extra": 1}}, "strategy.parameters"),
        ({"name": "fedadam", "parameters": []}, "strategy.parameters"),
        ({"name": "fedadam", "parameters": {**params, "server_tau": -1}}, "strategy.parameters.server_tau"),
        ({"name": "fedadam", "parameters": {**params, "server_tau": True}}, "strategy.parameters.server_tau"),
        (
            {**krum, "parameters": {**krum["parameters"], "byzantine_devices": 1.5}},
            "strategy.parameters.byzantine_devices",
        ),
    ]
    for value, field in bad:
        with pytest.raises(RoundManifestError) as err:
            round_manifest_from_dict({**MANIFEST_DICT, "strategy": value})
        assert err.value.field == field, value


def test_topk_fraction_is_announced_exactly_with_a_sparse_codec() -> None:
    assert MANIFEST.topk_fraction is None and "topk_fraction" not in MANIFEST_DICT
    sparse = dataclasses.replace(MANIFEST, codec=Codec.TOPK_INT8, topk_fraction=0.1)
    doc = sparse.to_dict()
    assert (doc["codec"], doc["topk_fraction"]) == ("topk-int8", 0.1)
    assert round_manifest_from_dict(json.loads(json.dumps(doc))) == sparse
    assert sparse.sha256() != dataclasses.replace(sparse, topk_fraction=0.2).sha256()
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({**doc, "topk_fraction": 0.6}, "topk_fraction", "topk-int8 needs a topk_fraction in 0.001..0.5"),
        ({**doc, "topk_fraction": True}, "topk_fraction", "topk-int8 needs a topk_fraction in 0.001..0.5"),
        ({**doc, "topk_fraction": "0.1"}, "topk_fraction", "topk-int8 needs a topk_fraction in 0.001..0.5"),
        (
            {k: v for k, v in doc.items() if k != "topk_fraction"},
            "topk_fraction",
            "topk_fraction must be present exactly with a sparse codec (codec topk-int8)",
        ),
        (
            {**MANIFEST_DICT, "topk_fraction": 0.1},
            "topk_fraction",
            "topk_fraction must be present exactly with a sparse codec (codec int8)",
        ),
        (
            {**doc, "privacy": _CHANGES["privacy"].to_dict()},
            "codec",
            "codec topk-int8 cannot be used with privacy or secure_aggregation",
        ),
        (
            {**doc, "secure_aggregation": _CHANGES["secure_aggregation"].to_dict()},
            "codec",
            "codec topk-int8 cannot be used with privacy or secure_aggregation",
        ),
    ]
    for data, field, message in cases:
        with pytest.raises(RoundManifestError) as err:
            round_manifest_from_dict(data)
        assert (str(err.value), err.value.field) == (message, field)


def test_the_change_table_covers_every_field() -> None:
    assert set(_CHANGES) == {f.name for f in dataclasses.fields(RoundManifest)}


@pytest.mark.parametrize("field", sorted(_CHANGES))
def test_sha256_changes_with_any_field(field: str) -> None:
    changed = dataclasses.replace(MANIFEST, **{field: _CHANGES[field]})
    assert changed != MANIFEST
    assert changed.sha256() != MANIFEST.sha256()


def test_selected_order_matters_to_the_hash() -> None:
    swapped = dataclasses.replace(MANIFEST, selected_devices=("watch-02", "watch-01", "watch-07"))
    assert swapped.sha256() != MANIFEST.sha256()


def test_is_selected() -> None:
    assert MANIFEST.is_selected("watch-01")
    assert MANIFEST.is_selected("watch-07")
    assert not MANIFEST.is_selected("watch-03")
    assert not MANIFEST.is_selected("watch-0")


def test_round_manifest_error_is_a_fedge_error() -> None:
    assert issubclass(RoundManifestError, FedgeError)


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [None, [], "manifest", 42], ids=repr)
def test_a_non_object_is_refused(data: Any) -> None:
    assert _error(data) == "round manifest must be an object"


@pytest.mark.parametrize("missing", sorted(MANIFEST_DICT))
def test_a_missing_field_is_named(missing: str) -> None:
    data = _data()
    del data[missing]
    assert _error(data) == f"round manifest fields: missing [{missing!r}], unexpected []"


def test_extra_and_missing_fields_are_both_named() -> None:
    data = _data(zeta=1, alpha=2)
    del data["version"]
    assert _error(data) == "round manifest fields: missing ['version'], unexpected ['alpha', 'zeta']"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("fleet", "a/b", "invalid fleet id 'a/b'"),
        ("fleet", None, "invalid fleet id None"),
        ("round_id", "r+1", "invalid round id 'r+1'"),
        ("round_id", "", "invalid round id ''"),
        ("round_id", "r-1\n", "invalid round id 'r-1\\n'"),
    ],
)
def test_bad_ids_are_refused(key: str, value: Any, message: str) -> None:
    assert _error(_data(**{key: value})) == f"{message}: use 1-64 letters, digits, '_', '.', '-'"


@pytest.mark.parametrize(
    "selected",
    [["watch-01", "a/b"], ["#"], [""], [None], ["x" * 65]],
    ids=["slash", "hash", "empty", "null", "too long"],
)
def test_bad_selected_device_ids_are_refused(selected: list[Any]) -> None:
    assert _error(_data(selected_devices=selected)).startswith(f"invalid device id {selected[-1]!r}: ")


@pytest.mark.parametrize("selected", ["watch-01", {"watch-01": 1}, None, 3], ids=repr)
def test_selected_devices_must_be_a_list(selected: Any) -> None:
    assert _error(_data(selected_devices=selected)) == "selected_devices must be a list of device ids"


def test_selected_devices_has_a_limit() -> None:
    assert _error(_data(selected_devices=["d"] * (MAX_SELECTED_DEVICES + 1))) == (
        "selected_devices must be a list of device ids"
    )


@pytest.mark.parametrize("phase", ["Train", "training", "", None, 1, ["train"]], ids=repr)
def test_bad_phase_is_refused(phase: Any) -> None:
    assert _error(_data(phase=phase)) == "phase must be one of ('moments', 'train', 'final')"


@pytest.mark.parametrize(
    "sha",
    ["AB" * 32, "ab" * 31, "ab" * 33, "g" * 64, "ab" * 32 + "\n", None, 0],
    ids=["uppercase", "62 digits", "66 digits", "not hex", "trailing newline", "null", "int"],
)
def test_bad_parent_sha_is_refused(sha: Any) -> None:
    assert _error(_data(parent_sha256=sha)) == "parent_sha256 must be empty or 64 hex digits"


@pytest.mark.parametrize("key", ["model_sha256", "weights_sha256"])
@pytest.mark.parametrize(
    "sha",
    ["", "AB" * 32, "ab" * 31, "g" * 64, "ab" * 32 + "\n", None, ["ab" * 32]],
    ids=["empty", "uppercase", "62 digits", "not hex", "trailing newline", "null", "list"],
)
def test_bad_blob_sha_is_refused(key: str, sha: Any) -> None:
    assert _error(_data(**{key: sha})) == f"{key} must be 64 hex digits"


@pytest.mark.parametrize("key", ["version", "round_number", "min_devices", "model_bytes", "weights_bytes"])
@pytest.mark.parametrize(
    "value",
    [-1, True, False, 1.0, "7", None, 2**63, 10**400],
    ids=["-1", "true", "false", "float", "str", "null", "2^63", "huge"],
)
def test_bad_integers_are_refused(key: str, value: Any) -> None:
    assert _error(_data(**{key: value})) == f"{key} must be a non-negative integer"


def test_largest_integers_are_accepted() -> None:
    parsed = round_manifest_from_dict(_data(version=2**63 - 1, round_number=0, min_devices=0))
    assert (parsed.version, parsed.round_number, parsed.min_devices) == (2**63 - 1, 0, 0)


@pytest.mark.parametrize("key", ["issued_at", "deadline", "expires_at"])
@pytest.mark.parametrize(
    ("value", "message"),
    [
        (True, "must be a number (Unix seconds)"),
        ("1700000000", "must be a number (Unix seconds)"),
        (None, "must be a number (Unix seconds)"),
        (math.nan, "must be finite and >= 0"),
        (math.inf, "must be finite and >= 0"),
        (-math.inf, "must be finite and >= 0"),
        (-1.0, "must be finite and >= 0"),
        (10**400, "must be finite"),
    ],
    ids=["bool", "str", "null", "nan", "inf", "-inf", "negative", "huge int"],
)
def test_bad_times_are_refused(key: str, value: Any, message: str) -> None:
    assert _error(_data(**{key: value})) == f"{key} {message}"


@pytest.mark.parametrize(
    ("issued", "deadline", "expires"),
    [(10.0, 9.0, 20.0), (10.0, 21.0, 20.0), (30.0, 20.0, 10.0), (10.0, 10.0, 9.999)],
    ids=["deadline before issue", "deadline after expiry", "reversed", "expiry before issue"],
)
def test_times_out_of_order_are_refused(issued: float, deadline: float, expires: float) -> None:
    assert _error(_data(issued_at=issued, deadline=deadline, expires_at=expires)) == (
        "times must satisfy issued_at <= deadline <= expires_at"
    )


def test_equal_and_integer_times_are_accepted_as_floats() -> None:
    parsed = round_manifest_from_dict(_data(issued_at=0, deadline=0, expires_at=5))
    assert (parsed.issued_at, parsed.deadline, parsed.expires_at) == (0.0, 0.0, 5.0)
    assert all(type(t) is float for t in (parsed.issued_at, parsed.deadline, parsed.expires_at))


@pytest.mark.parametrize("codec", ["FP32", "int4", "", None, 8], ids=repr)
def test_bad_codec_is_refused(codec: Any) -> None:
    shown = repr(codec) if isinstance(codec, str) else "''"
    assert (
        _error(_data(codec=codec)) == f"unknown codec {shown}; known: fp32, fp16, int8, topk-fp16, topk-int8"
    )


@pytest.mark.parametrize("codec", ["fp32", "fp16", "int8"])
def test_every_codec_is_accepted(codec: str) -> None:
    assert round_manifest_from_dict(_data(codec=codec)).codec is Codec(codec)


def test_a_train_round_without_normalisation_is_refused() -> None:
    assert _error(_data(normalisation=None)) == "a train round needs a normalisation"


@pytest.mark.parametrize("phase", ["moments", "final"])
def test_other_phases_may_lack_a_normalisation(phase: str) -> None:
    assert round_manifest_from_dict(_data(normalisation=None, phase=phase)).normalisation is None


@pytest.mark.parametrize("n", [47, 49, 1])
def test_normalisation_of_the_wrong_length_is_refused(n: int) -> None:
    norm = Normalisation(tuple([0.0] * n), tuple([1.0] * n))
    message = _error(_data(normalisation=norm.to_dict()))
    assert message == "normalisation length does not match the task's input"


@pytest.mark.parametrize(
    ("norm", "message"),
    [
        ({"mean": [0.0] * 48}, "normalisation: must be an object with 'mean' and 'std'"),
        (
            {"mean": [0.0] * 48, "std": [0.0] * 48},
            "normalisation[0]: mean must be finite and std finite and > 0, got mean=0.0, std=0.0",
        ),
        (
            {"mean": [math.nan] * 48, "std": [1.0] * 48},
            "normalisation[0]: mean must be finite and std finite and > 0, got mean=nan, std=1.0",
        ),
        ({"mean": ["0"] * 48, "std": [1.0] * 48}, "normalisation.mean: must be a list of numbers"),
        ({"mean": [10**400] * 48, "std": [1.0] * 48}, "normalisation: values must be finite"),
    ],
    ids=["no std", "zero std", "nan mean", "string mean", "huge int"],
)
def test_malformed_normalisation_is_refused(norm: Any, message: str) -> None:
    assert _error(_data(normalisation=norm)) == message


def test_weights_bytes_must_match_the_parameter_count() -> None:
    for wrong in (4 * 5447 - 4, 4 * 5447 + 4, 5447, 2 * 5447, 0):
        message = _error(_data(weights_bytes=wrong))
        assert message == "weights_bytes does not match the model's parameter count"


_ABSENT = object()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("format", "fedge-model/2", "manifest format must be 'fedge-model/1', got 'fedge-model/2'"),
        ("task", _ABSENT, "manifest: missing 'task'"),
        ("parameter_count", 5448, "manifest: parameter_count 5448 does not match the task's 5447"),
        ("model_sha256", "x", "manifest: model_sha256 must be 64 lowercase hex digits"),
    ],
    ids=["format", "no task", "parameter count", "model sha"],
)
def test_an_invalid_model_manifest_is_a_round_manifest_error(key: str, value: Any, message: str) -> None:
    data = _data()
    if value is _ABSENT:
        del data["model_manifest"][key]
    else:
        data["model_manifest"][key] = value
    assert _error(data) == message


@pytest.mark.parametrize("model_manifest", [None, [], "model", 5], ids=repr)
def test_a_model_manifest_that_is_not_an_object_is_refused(model_manifest: Any) -> None:
    assert _error(_data(model_manifest=model_manifest)) == "manifest must be a JSON object"


@pytest.mark.parametrize(
    "path",
    [("normalisation", "mean", 0), ("builder", "extra"), ("task", "training", "learning_rate")],
    ids=["normalisation mean", "unknown builder key", "learning rate"],
)
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_a_non_finite_number_in_the_model_manifest_is_a_round_manifest_error(
    path: tuple[Any, ...], value: float
) -> None:
    data = _data()
    node = data["model_manifest"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(RoundManifestError):
        round_manifest_from_dict(data)


def test_a_signed_manifest_round_trips_through_signing() -> None:
    """What the aggregator publishes is what a device reconstructs, hash included."""
    from nacl.signing import SigningKey

    from fedge.protocol.signing import key_id, sign_document, verify_document

    key = SigningKey.generate()
    data = sign_document("manifest", MANIFEST.to_dict(), key)
    document, _ = verify_document(data, "manifest", {key_id(key.verify_key): key.verify_key})
    parsed = round_manifest_from_dict(document)
    assert parsed == MANIFEST
    assert parsed.sha256() == MANIFEST.sha256()
