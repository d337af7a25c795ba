"""The round manifest's ``strategy`` object (``fedge.protocol.strategy_announcement``): what an
aggregator announces for ``[rounds] strategy``, and every malformed announcement a device
refuses, as a :class:`RoundManifestError` naming the field (never a crash)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest

from fedge.protocol.codec import Codec
from fedge.protocol.model_manifest import ModelManifest, Normalisation
from fedge.protocol.round_manifest import RoundManifest, RoundManifestError, round_manifest_from_dict
from fedge.protocol.strategy_announcement import (
    DEFAULT_STRATEGY,
    ROBUST_STRATEGIES,
    SERVER_OPTIMIZERS,
    STRATEGIES,
    STRATEGY_PARAMETERS,
    StrategyAnnouncement,
    StrategyAnnouncementError,
)
from fedge.protocol.task import parse_task_spec

pytestmark = pytest.mark.protocol

HAR_TASK = parse_task_spec(
    (Path(__file__).resolve().parents[2] / "tasks" / "har-watch.toml").read_text(encoding="utf-8")
)
NORM = Normalisation(mean=tuple(0.1 * i for i in range(48)), std=tuple(1.0 + i / 10 for i in range(48)))
MODEL = ModelManifest(
    task=HAR_TASK,
    model_file="model.tflite",
    model_sha256="ab" * 32,
    model_bytes=1000,
    initial_weights_sha256="cd" * 32,
    normalisation=NORM,
    tensorflow_version="2.21.0",
)
TRAIN = RoundManifest(
    fleet="fleet-1",
    version=4,
    parent_sha256="fe" * 32,
    phase="train",
    round_number=2,
    round_id="r-2",
    issued_at=1_700_000_000.0,
    deadline=1_700_000_060.0,
    expires_at=1_700_000_120.0,
    selected_devices=("watch-01", "watch-02", "watch-03"),
    min_devices=2,
    codec=Codec.FP32,
    model_sha256="ab" * 32,
    model_bytes=1000,
    weights_sha256="01" * 32,
    weights_bytes=4 * MODEL.parameter_count,
    model_manifest=MODEL,
    normalisation=NORM,
)
TRAIN_DICT: dict[str, Any] = json.loads(json.dumps(TRAIN.to_dict()))

#: A valid parameter set for every announced strategy.
GOOD: dict[str, dict[str, float | int]] = {
    "fedavgm": {"server_learning_rate": 1.0, "server_momentum": 0.9},
    "fedadagrad": {
        "server_learning_rate": 0.05,
        "server_beta1": 0.9,
        "server_beta2": 0.99,
        "server_tau": 0.001,
    },
    "fedadam": {"server_learning_rate": 0.05, "server_beta1": 0.9, "server_beta2": 0.99, "server_tau": 0.001},
    "fedyogi": {"server_learning_rate": 0.05, "server_beta1": 0.9, "server_beta2": 0.99, "server_tau": 0.001},
    "median": {"server_learning_rate": 1.0},
    "trimmed_mean": {"server_learning_rate": 1.0, "trim_fraction": 0.2},
    "krum": {"server_learning_rate": 1.0, "byzantine_devices": 1},
    "multi_krum": {"server_learning_rate": 1.0, "byzantine_devices": 2, "multi_krum_select": 0},
}


def with_strategy(value: Any, **changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(TRAIN_DICT)
    data.update(changes)
    data["strategy"] = value
    return data


def refused(data: dict[str, Any]) -> RoundManifestError:
    with pytest.raises(RoundManifestError) as err:
        round_manifest_from_dict(data)
    assert "\n" not in str(err.value)
    return err.value


def test_the_names_and_their_parameters() -> None:
    assert (DEFAULT_STRATEGY, *SERVER_OPTIMIZERS, *ROBUST_STRATEGIES) == STRATEGIES
    assert DEFAULT_STRATEGY == "fedavg" and DEFAULT_STRATEGY not in STRATEGY_PARAMETERS
    assert set(STRATEGY_PARAMETERS) == set(GOOD)
    for name, params in GOOD.items():
        assert STRATEGY_PARAMETERS[name][0] == "server_learning_rate"
        assert set(params) == set(STRATEGY_PARAMETERS[name])


@pytest.mark.parametrize("name", list(GOOD))
def test_each_strategy_round_trips_through_a_train_manifest(name: str) -> None:
    doc = json.loads(json.dumps(with_strategy({"name": name, "parameters": GOOD[name]})))
    parsed = round_manifest_from_dict(doc)
    assert parsed.strategy == StrategyAnnouncement(name, GOOD[name])
    assert parsed.to_dict() == doc
    assert parsed.sha256() != TRAIN.sha256()  # the announcement is part of what is signed


def test_plain_fedavg_is_not_announced() -> None:
    assert "strategy" not in TRAIN_DICT and round_manifest_from_dict(TRAIN_DICT).strategy is None


def test_integers_stay_integers_and_integral_numbers_are_accepted_for_real_parameters() -> None:
    a = StrategyAnnouncement.from_dict(
        {
            "name": "multi_krum",
            "parameters": {"server_learning_rate": 1, "byzantine_devices": 2, "multi_krum_select": 3},
        }
    )
    assert a.parameters == {"server_learning_rate": 1.0, "byzantine_devices": 2, "multi_krum_select": 3}
    assert type(a.parameters["server_learning_rate"]) is float
    assert type(a.parameters["byzantine_devices"]) is int
    assert hash(a) == hash(StrategyAnnouncement("multi_krum", dict(a.parameters)))


@pytest.mark.parametrize(
    ("value", "field", "message"),
    [
        (None, "strategy", "strategy must be an object"),
        ([], "strategy", "strategy must be an object"),
        ({"name": "median"}, "strategy", "strategy must have exactly the fields ['name', 'parameters']"),
        (
            {"name": "median", "parameters": {"server_learning_rate": 1.0}, "version": 1},
            "strategy",
            "strategy must have exactly the fields ['name', 'parameters']",
        ),
        (
            {"name": "fedavg", "parameters": {}},
            "strategy.name",
            "strategy.name must be one of ('fedavgm', 'fedadagrad', 'fedadam', 'fedyogi', 'median', "
            "'trimmed_mean', 'krum', 'multi_krum') (fedavg is not announced)",
        ),
        (
            {"name": "bulyan", "parameters": {"server_learning_rate": 1.0}},
            "strategy.name",
            "strategy.name must be one of ('fedavgm', 'fedadagrad', 'fedadam', 'fedyogi', 'median', "
            "'trimmed_mean', 'krum', 'multi_krum') (fedavg is not announced)",
        ),
        (
            {"name": "median", "parameters": []},
            "strategy.parameters",
            "strategy.parameters must be an object",
        ),
        (
            {"name": "krum", "parameters": {"server_learning_rate": 1.0}},
            "strategy.parameters",
            "strategy.parameters of krum must be exactly ['server_learning_rate', 'byzantine_devices']",
        ),
        (
            {"name": "median", "parameters": {"server_learning_rate": 1.0, "trim_fraction": 0.1}},
            "strategy.parameters",
            "strategy.parameters of median must be exactly ['server_learning_rate']",
        ),
        (
            {"name": "median", "parameters": {"server_learning_rate": -0.5}},
            "strategy.parameters.server_learning_rate",
            "strategy.parameters.server_learning_rate must be finite and >= 0",
        ),
        (
            {"name": "trimmed_mean", "parameters": {"server_learning_rate": 1.0, "trim_fraction": math.nan}},
            "strategy.parameters.trim_fraction",
            "strategy.parameters.trim_fraction must be finite and >= 0",
        ),
        (
            {"name": "fedavgm", "parameters": {"server_learning_rate": math.inf, "server_momentum": 0.9}},
            "strategy.parameters.server_learning_rate",
            "strategy.parameters.server_learning_rate must be finite and >= 0",
        ),
        (
            {"name": "fedavgm", "parameters": {"server_learning_rate": 1.0, "server_momentum": 1e13}},
            "strategy.parameters.server_momentum",
            "strategy.parameters.server_momentum must be finite and >= 0",
        ),
        (
            {"name": "fedavgm", "parameters": {"server_learning_rate": "1", "server_momentum": 0.9}},
            "strategy.parameters.server_learning_rate",
            "strategy.parameters.server_learning_rate must be a number",
        ),
        (
            {"name": "median", "parameters": {"server_learning_rate": True}},
            "strategy.parameters.server_learning_rate",
            "strategy.parameters.server_learning_rate must be a number",
        ),
        (
            {"name": "krum", "parameters": {"server_learning_rate": 1.0, "byzantine_devices": -1}},
            "strategy.parameters.byzantine_devices",
            "strategy.parameters.byzantine_devices must be an integer in 0..1000000",
        ),
        (
            {"name": "krum", "parameters": {"server_learning_rate": 1.0, "byzantine_devices": 1.0}},
            "strategy.parameters.byzantine_devices",
            "strategy.parameters.byzantine_devices must be an integer in 0..1000000",
        ),
        (
            {
                "name": "multi_krum",
                "parameters": {
                    "server_learning_rate": 1.0,
                    "byzantine_devices": 1,
                    "multi_krum_select": 2_000_000,
                },
            },
            "strategy.parameters.multi_krum_select",
            "strategy.parameters.multi_krum_select must be an integer in 0..1000000",
        ),
    ],
)
def test_a_bad_strategy_object_is_refused_naming_the_field(value: Any, field: str, message: str) -> None:
    err = refused(with_strategy(value))
    assert (str(err), err.field) == (message, field)


@pytest.mark.parametrize("name", [["median"], {"median": 1}])
def test_a_name_that_is_not_a_string_is_refused(name: Any) -> None:
    err = refused(with_strategy({"name": name, "parameters": {"server_learning_rate": 1.0}}))
    assert err.field == "strategy.name"


@pytest.mark.parametrize("name", [7, None])
def test_a_hashable_name_that_is_not_a_string_is_refused(name: Any) -> None:
    err = refused(with_strategy({"name": name, "parameters": {"server_learning_rate": 1.0}}))
    assert err.field == "strategy.name"


@pytest.mark.parametrize("phase", ["moments", "final"])
def test_a_strategy_outside_a_train_round_is_refused(phase: str) -> None:
    good = {"name": "median", "parameters": {"server_learning_rate": 1.0}}
    err = refused(with_strategy(good, phase=phase))
    assert (str(err), err.field, err.found) == ("strategy is only for train rounds", "strategy", phase)


def test_the_announcement_refuses_the_same_things_when_built_directly() -> None:
    with pytest.raises(StrategyAnnouncementError) as err:
        StrategyAnnouncement("fedavg", {})
    assert err.value.field == "strategy.name"
    with pytest.raises(StrategyAnnouncementError) as err:
        StrategyAnnouncement("median", {"server_learning_rate": math.nan})
    assert err.value.field == "strategy.parameters.server_learning_rate"
    with pytest.raises(StrategyAnnouncementError) as err:
        StrategyAnnouncement("median", [("server_learning_rate", 1.0)])  # type: ignore[arg-type]
    assert err.value.field == "strategy.parameters"
