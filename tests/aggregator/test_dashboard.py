"""The dashboard's view and routes: what ``/api/fleet`` says, what the page may load.

Pure functions on hand-made statuses and real HTTP against a real :class:`HttpEndpoint`; the page
itself is checked in a real browser in ``tests/e2e/test_dashboard_browser.py``.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from fedge.aggregator.dashboard import (
    CHART_ROUNDS,
    DASHBOARD_SCHEMA,
    build_view,
    dashboard_routes,
    history_points,
    prediction_row,
    view_json,
)
from fedge.shell.http_endpoint import HttpEndpoint


def record(n: int, phase: str = "train", outcome: str = "aggregated", **extra: Any) -> dict[str, Any]:
    return {
        "round_number": n,
        "phase": phase,
        "outcome": outcome,
        "version": n + 1,
        "fed_eval_accuracy": 0.5 + n / 100,
        "fed_eval_mse": None,
        "train_loss": 1.0 / n,
        "reported": 3,
        "selected": 4,
        **extra,
    }


def insight(label: str | None = "occupied", value: float | None = None, end: float = 100.0) -> dict[str, Any]:
    prediction: dict[str, Any] = (
        {"label": label, "class_index": 1, "probabilities": {label: 0.75, "vacant": 0.25}}
        if label is not None
        else {"value": value, "units": "degC"}
    )
    return {
        "schema": "fedge.insight/1",
        "window": {"start": end - 60, "end": end},
        "model": {"version": 9, "generation": 1, "round_id": "r", "sha256": "0" * 64},
        "prediction": prediction,
    }


def test_history_points_are_aggregated_training_rounds_only() -> None:
    history = [record(1, phase="moments"), record(2), record(3, outcome="aborted"), record(4)]
    points = history_points(history)
    assert [p["round"] for p in points] == [2, 4]
    assert points[0] == {
        "round": 2, "version": 3, "accuracy": 0.52, "mse": None, "loss": 0.5, "reported": 3, "selected": 4,
    }  # fmt: skip
    many = history_points([record(n) for n in range(1, CHART_ROUNDS + 11)])
    assert len(many) == CHART_ROUNDS and many[0]["round"] == 11  # the newest rounds


def test_prediction_rows_and_malformed_insights() -> None:
    assert prediction_row("d1", insight()) == {
        "device_id": "d1", "time": 100.0, "model_version": 9, "prediction": "occupied", "confidence": 0.75,
    }  # fmt: skip
    row = prediction_row("d2", insight(label=None, value=21.456))
    assert row is not None and row["prediction"] == "21.46 degC" and row["confidence"] is None
    assert prediction_row("d3", {**insight(), "schema": "fedge.insight/2"}) is None
    assert prediction_row("d3", {**insight(), "prediction": "occupied"}) is None
    assert prediction_row("d3", insight(label=None, value=None)) is None
    long = prediction_row("d4", insight(label="x" * 500))
    assert long is not None and long["prediction"] == "x" * 64


def test_the_view() -> None:
    status = {
        "fleet": "f1", "time": 5.0, "state": "running", "phase": "train", "round_id": "r5",
        "completed_rounds": 4, "rounds": 20, "version": 6, "generation": 2, "selected": 4,
        "reported": ["a", "b"], "rejected_total": {"bad_seal": 2}, "eval_metric": "accuracy",
    }  # fmt: skip
    devices = [
        {"device_id": "a", "condition": "online", "state": "training", "ready": True, "last_seen": 4.0}
    ]
    view = build_view(
        status, {"devices": {"online": 1, "stale": 0, "stale_after_s": 90.0, "stale_ids": []}},
        [record(1), record(2)], devices,
        {"b": insight(end=50.0), "a": insight(end=90.0), "c": {"schema": "bogus"}},
    )  # fmt: skip
    assert view["schema"] == DASHBOARD_SCHEMA
    assert view["round"] == {
        "state": "running", "phase": "train", "round_id": "r5", "completed": 4, "planned": 20,
        "version": 6, "generation": 2, "selected": 4, "reported": 2,
    }  # fmt: skip
    assert view["counts"] == {"online": 1, "stale": 0} and view["devices"] == devices
    assert view["rejected"] == {"bad_seal": 2}
    assert [p["round"] for p in view["history"]] == [1, 2]
    assert [p["device_id"] for p in view["predictions"]] == ["a", "b"]  # newest first; "c" left out
    assert view["rollout"] is None  # a status without the gate's block
    json.loads(view_json(view))


def test_the_view_shows_the_rollout_gate_and_predictions_name_the_promoted_version() -> None:
    rollout = {
        "gate": True, "promoted_version": 5, "refused": 2,
        "last_decision": {"action": "refuse", "version": 6, "reason": "accuracy 0.5 not >= 0.69"},
    }  # fmt: skip
    view = build_view(
        {"rollout": rollout}, {}, [], [], {"a": {**insight(), "rollout": {"version": 5, "sequence": 3}}}
    )
    assert view["rollout"] == {
        "gate": True, "promoted_version": 5, "refused": 2, "last": "refuse v6: accuracy 0.5 not >= 0.69",
    }  # fmt: skip
    assert view["predictions"][0]["model_version"] == 5  # the promoted weights made it, not v9


def test_routes_serve_the_page_its_script_and_the_view() -> None:
    view = {"schema": DASHBOARD_SCHEMA, "fleet": "f1"}
    endpoint = HttpEndpoint("127.0.0.1", 0, dashboard_routes(lambda: view_json(view)))
    try:
        with urllib.request.urlopen(endpoint.url + "/", timeout=5) as answer:
            page = answer.read().decode()
            csp = answer.headers["Content-Security-Policy"]
            assert answer.headers["Content-Type"] == "text/html; charset=utf-8"
        assert '<script src="dashboard.js"></script>' in page
        assert "<script>" not in page  # no inline script: the CSP forbids it
        assert "script-src 'self'" in csp and "default-src 'none'" in csp
        with urllib.request.urlopen(endpoint.url + "/dashboard.js", timeout=5) as answer:
            script = answer.read().decode()
            assert answer.headers["Content-Type"] == "text/javascript; charset=utf-8"
        assert "innerHTML" not in script  # values are written as text, never as markup
        with urllib.request.urlopen(endpoint.url + "/api/fleet", timeout=5) as answer:
            assert json.loads(answer.read()) == view
            assert answer.headers["X-Content-Type-Options"] == "nosniff"
    finally:
        endpoint.stop()
