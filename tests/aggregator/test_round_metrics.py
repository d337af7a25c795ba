"""The round's federated evaluation in the task's own metric: accuracy or MSE.

A regression task's devices report ``Evaluation.mse`` and no accuracy; the round record, the
status and the round's log line must carry that, not an accuracy of ``None``. The engine here
runs a linear-regression task (``hidden = []``, 48 -> 1: 49 weights) with real keys and sealed
updates, as in ``test_round_engine.py``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import numpy as np
import pytest

from fedge.aggregator.round_engine import RoundEngine, RoundRecord, eval_metric
from fedge.protocol.messages import Evaluation
from fedge.protocol.model_manifest import ModelManifest
from fedge.protocol.task import TaskSpec
from fedge.protocol.weights import weights_to_bytes
from support.engine_helpers import (
    AGGREGATOR_KEY,
    DEVICE_IDS,
    FLEET,
    MODEL_BYTES,
    SIGNING_KEY,
    T0,
    TASK,
    devices,
    initial_state,
    make_engine,
    registry,
    settings,
)
from support.tasks import task_variant

THREE = DEVICE_IDS[:3]
REGRESSION_TASK: TaskSpec = task_variant(
    TASK, {"model.kind": "regression", "label.classes": None, "model.hidden": []}
)
REGRESSION_WEIGHTS = np.random.default_rng(99).normal(0.0, 0.1, 49).astype(np.float32)


def regression_engine() -> RoundEngine:
    manifest = ModelManifest(
        task=REGRESSION_TASK,
        model_file="model.tflite",
        model_sha256=hashlib.sha256(MODEL_BYTES).hexdigest(),
        model_bytes=len(MODEL_BYTES),
        initial_weights_sha256=hashlib.sha256(weights_to_bytes(REGRESSION_WEIGHTS)).hexdigest(),
        normalisation=None,
        tensorflow_version="none (test)",
    )
    assert manifest.parameter_count == 49
    return RoundEngine(
        FLEET,
        settings(),
        manifest,
        MODEL_BYTES,
        AGGREGATOR_KEY,
        SIGNING_KEY,
        registry(THREE),
        initial_state(weights=REGRESSION_WEIGHTS),
    )


def test_the_task_kind_names_its_metric() -> None:
    assert eval_metric("classification") == "accuracy"
    assert eval_metric("regression") == "mse"


def test_a_regression_round_records_the_weighted_mse_and_the_status_names_it() -> None:
    engine = regression_engine()
    assert engine.status(T0)["eval_metric"] == "mse"
    devs = devices(THREE)
    m = engine.open_round(T0).manifest
    evaluations = [Evaluation(10, 0.4, None, 0.4), Evaluation(30, 0.1, None, 0.1), None]
    for i, (d, ev) in enumerate(zip(THREE, evaluations, strict=True)):
        delta = np.full(49, 0.001 * (i + 1), np.float32)
        assert engine.handle(devs[d].topic, devs[d].update(m, delta, evaluation=ev), T0 + 1).accepted
    record = engine.close_round()

    assert record.outcome == "aggregated"
    assert record.fed_eval_metric == "mse"
    assert record.fed_eval_mse == pytest.approx((10 * 0.4 + 30 * 0.1) / 40, rel=1e-12)
    assert record.fed_eval_loss == pytest.approx((10 * 0.4 + 30 * 0.1) / 40, rel=1e-12)
    assert record.fed_eval_accuracy is None and record.fed_eval_examples == 40
    assert record.fed_eval_summary() == "fed. eval MSE 0.175 (RMSE 0.4183)"
    status = engine.status(T0 + 2)
    assert status["eval_metric"] == "mse"
    assert status["history"][-1]["fed_eval_mse"] == record.fed_eval_mse
    assert status["history"][-1]["fed_eval_metric"] == "mse"
    json.dumps(status, allow_nan=False)  # published as JSON


def test_a_classification_round_keeps_accuracy_and_has_no_mse() -> None:
    engine = make_engine()
    assert engine.status(T0)["eval_metric"] == "accuracy"
    devs = devices(THREE)
    m = engine.open_round(T0).manifest
    for d in THREE:
        ev = Evaluation(20, 0.5, 0.75, None)
        assert engine.handle(devs[d].topic, devs[d].update(m, evaluation=ev), T0 + 1).accepted
    record = engine.close_round()
    assert (record.fed_eval_metric, record.fed_eval_accuracy, record.fed_eval_mse) == ("accuracy", 0.75, None)
    assert record.fed_eval_summary() == "fed. eval accuracy 0.7500"


def _record(**changes: object) -> RoundRecord:
    base = RoundRecord(
        round_number=1,
        round_id="r0001-v2",
        phase="train",
        outcome="aggregated",
        version=2,
        selected=3,
        reported=3,
        examples=300,
        train_loss=0.5,
        fed_eval_loss=None,
        fed_eval_accuracy=None,
        fed_eval_examples=0,
        mean_update_bytes=None,
        rejected={},
    )
    return replace(base, **changes)


@pytest.mark.parametrize(
    ("changes", "line"),
    [
        ({"fed_eval_accuracy": 0.91234}, "fed. eval accuracy 0.9123"),
        ({}, "fed. eval accuracy none"),  # no device evaluated (or a moments round)
        ({"fed_eval_metric": "mse", "fed_eval_mse": 0.0412}, "fed. eval MSE 0.0412 (RMSE 0.203)"),
        ({"fed_eval_metric": "mse", "fed_eval_accuracy": 0.5}, "fed. eval MSE none"),
        ({"fed_eval_metric": "mse", "fed_eval_mse": 2.5e6}, "fed. eval MSE 2.5e+06 (RMSE 1581)"),
        # Devices' MSE is checked finite only: a negative mean is shown, with no square root.
        ({"fed_eval_metric": "mse", "fed_eval_mse": -0.5}, "fed. eval MSE -0.5"),
    ],
)
def test_the_round_log_line_names_the_tasks_metric(changes: dict[str, object], line: str) -> None:
    assert _record(**changes).fed_eval_summary() == line
