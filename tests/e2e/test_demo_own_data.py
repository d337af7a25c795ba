"""``fedge demo --train --test``: the whole demo on a building's own data.

A synthetic building export (four days of five Float64 sensors, occupancy a linear function of
two of them), a profile, a task from ``fedge task init --hidden none``; the demo replays the
training CSV as one EdgeX device per day through the real broker into real agent processes, and
scores every global model on the test CSV next to the centralized reference (``fedge
train-local --train --test``, same data, same seed).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from fedge.cli import main
from fedge.lab.demo import DemoOptions, render_table, run_demo, write_outputs
from fedge.protocol.task import parse_task_spec
from fedge.tools.task_init import main as task_init_main
from support.building import SENSORS_PROFILE_YAML

pytestmark = pytest.mark.slow

PROFILE_YAML = SENSORS_PROFILE_YAML

DAYS = ("2025-03-01", "2025-03-02", "2025-03-03", "2025-03-04")
MINUTES = 240  # rows per day, one a minute


def write_csv(path: Path, days: tuple[str, ...], seed: int) -> Path:
    """One row a minute from 08:00 UTC; ``occupied`` is true when ``s0 + 0.5 s1`` (plus a little
    noise) is positive; s2-s4 are noise."""
    rng = np.random.default_rng(seed)
    lines = ["time,s0,s1,s2,s3,s4,occupied"]
    for day in days:
        start = datetime.fromisoformat(day).replace(hour=8, tzinfo=UTC)
        s = rng.normal(0.0, 1.0, (MINUTES, 5))
        occupied = s[:, 0] + 0.5 * s[:, 1] + rng.normal(0.0, 0.1, MINUTES) > 0
        for i in range(MINUTES):
            when = (start + timedelta(minutes=i)).strftime("%Y-%m-%dT%H:%M:%SZ")
            values = ",".join(f"{v:.5f}" for v in s[i])
            lines.append(f"{when},{values},{'true' if occupied[i] else 'false'}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("demo-own-data")
    profile = tmp / "sensors.yaml"
    profile.write_text(PROFILE_YAML)
    task = tmp / "occupancy.toml"
    argv = ["task", "init", "--profile", str(profile), "--label", "occupied", "--hidden", "none"]
    assert task_init_main([*argv, "--out", str(task)]) == 0
    return {
        "profile": profile,
        "task": task,
        "train": write_csv(tmp / "train.csv", DAYS, seed=1),
        "test": write_csv(tmp / "test.csv", ("2025-03-05",), seed=2),
    }


def test_demo_on_own_data_trains_one_device_per_day_close_to_the_centralized_reference(
    tmp_path: Path, files: dict[str, Path]
) -> None:
    options = DemoOptions(
        task=parse_task_spec(files["task"].read_text()),
        task_file=files["task"],
        out=tmp_path / "demo",
        rounds=4,
        round_timeout_s=20.0,
        min_devices=4,
        train_csv=files["train"],
        test_csv=files["test"],
        profile_file=files["profile"],
        split_by="day",
        seed=0,
    )
    summary = run_demo(options)
    write_outputs(summary, options.out)
    data = summary.to_dict()
    print(render_table(summary))
    assert summary.devices == len(DAYS)
    assert sorted(d for d in summary.processes if d != "aggregator") == [f"Test-Sensors-{d}" for d in DAYS]
    assert summary.rounds_completed == 4
    assert [r["round"] for r in summary.per_round] == [1, 2, 3, 4]
    assert all(r["test_accuracy"] is not None for r in summary.per_round)
    assert summary.metric == "accuracy"
    assert summary.centralized_accuracy is not None and summary.final_accuracy is not None
    assert summary.centralized_accuracy > 0.9  # the label is linear in s0 and s1
    assert abs(summary.final_accuracy - summary.centralized_accuracy) <= 0.05
    keys = ("final_accuracy", "centralized_accuracy", "final_mse", "centralized_mse", "per_round", "data")
    assert set(keys) <= set(data)
    assert data["final_mse"] is None and all(r["test_mse"] is None for r in data["per_round"])
    assert data["data"]["groups"] == {f"Test-Sensors-{d}": MINUTES for d in DAYS}
    saved = json.loads((options.out / "summary.json").read_text())
    assert saved["final_accuracy"] == summary.final_accuracy
    assert (options.out / "rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        ("--task", "--train needs --task"),
        ("--profile", "--train needs --profile"),
        ("--test", "--train needs --test"),
        ("--split-by", "--train needs --split-by"),
    ],
)
def test_own_data_options_are_checked_before_anything_starts(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, files: dict[str, Path], drop: str, message: str
) -> None:
    given = {
        "--task": str(files["task"]),
        "--profile": str(files["profile"]),
        "--train": str(files["train"]),
        "--test": str(files["test"]),
        "--split-by": "day",
    }
    del given[drop]
    argv = [item for pair in given.items() for item in pair]
    assert main(["demo", "--out", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_missing_csv_is_refused_before_anything_starts(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, files: dict[str, Path]
) -> None:
    argv = ["--task", str(files["task"]), "--profile", str(files["profile"]), "--split-by", "day"]
    argv += ["--train", str(tmp_path / "nope.csv"), "--test", str(files["test"])]
    assert main(["demo", "--out", str(tmp_path / "out"), *argv]) == 2
    assert "nope.csv" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_demo_on_own_data_reports_a_regression_tasks_own_metric(tmp_path: Path) -> None:
    """A Float64 label (a comfort index linear in two sensors): the task is a regression, the
    table, JSON and rounds carry MSE, and the federated model beats predicting the mean."""
    profile = tmp_path / "comfort.yaml"
    profile.write_text(
        PROFILE_YAML.replace('"occupied"', '"comfort"').replace('valueType: "Bool"', 'valueType: "Float64"')
    )
    task = tmp_path / "comfort.toml"
    argv = ["task", "init", "--profile", str(profile), "--label", "comfort", "--hidden", "none"]
    assert task_init_main([*argv, "--out", str(task)]) == 0

    def write(path: Path, days: tuple[str, ...], seed: int) -> Path:
        rng = np.random.default_rng(seed)
        lines = ["time,s0,s1,s2,s3,s4,comfort"]
        for day in days:
            start = datetime.fromisoformat(day).replace(hour=8, tzinfo=UTC)
            s = rng.normal(0.0, 1.0, (MINUTES, 5))
            comfort = 2.0 * s[:, 0] - s[:, 1] + rng.normal(0.0, 0.1, MINUTES)
            for i in range(MINUTES):
                when = (start + timedelta(minutes=i)).strftime("%Y-%m-%dT%H:%M:%SZ")
                lines.append(f"{when},{','.join(f'{v:.5f}' for v in s[i])},{comfort[i]:.5f}")
        path.write_text("\n".join(lines) + "\n")
        return path

    options = DemoOptions(
        task=parse_task_spec(task.read_text()),
        task_file=task,
        out=tmp_path / "demo",
        rounds=3,
        round_timeout_s=20.0,
        server_learning_rate=1.0,  # what `fedge demo --train` uses (2.0 overshoots: MSE 1.2)
        min_devices=4,
        train_csv=write(tmp_path / "train.csv", DAYS, seed=3),
        test_csv=write(tmp_path / "test.csv", ("2025-03-05",), seed=4),
        profile_file=profile,
        split_by="day",
        seed=0,
    )
    summary = run_demo(options)
    table = render_table(summary)
    print(table)
    assert summary.metric == "mse" and summary.rounds_completed == 3
    assert all(r["test_mse"] is not None for r in summary.per_round)
    assert (
        summary.final_accuracy is None
        and summary.final_mse is not None
        and summary.centralized_mse is not None
    )
    # The label's variance is about 5; the centralized reference reaches about 0.01.
    assert summary.final_mse < 0.1
    assert table.splitlines()[0].split()[1:6] == ["held-out", "MSE", "fed.", "eval", "MSE"]
    assert any(r["fed_eval_mse"] is not None for r in summary.per_round)  # the devices' own evaluations
