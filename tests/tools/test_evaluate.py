"""``fedge evaluate``: a real model (built with TensorFlow once per task), real CSV files, the real
LiteRT trainer. Every score is checked against one computed here independently: the arrays built
directly with numpy (windows too) and scored with :meth:`LiteRTTrainer.evaluate` and ``predict``.

The tasks come from ``fedge task init`` on a profile of five Float64 sensors and a Bool label.
Commands run through :func:`fedge.tools.evaluate.main` (``fedge``'s error handling, in process).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from fedge.agent.edgex.profile import load_profile
from fedge.agent.trainer import LiteRTTrainer
from fedge.protocol.model_manifest import INITIAL_WEIGHTS_FILE, Normalisation
from fedge.protocol.task import TaskSpec, parse_task_spec
from fedge.protocol.weights import weights_from_bytes, weights_to_bytes
from fedge.tools.evaluate import add_parser
from fedge.tools.evaluate import main as evaluate_main
from fedge.tools.task_init import choose_task, write_task
from support.building import SENSORS_PROFILE_YAML

SENSORS_YAML = SENSORS_PROFILE_YAML
SENSORS = ("s0", "s1", "s2", "s3", "s4")
#: Columns in another order than the task's, and one the task does not read.
CSV_COLUMNS = ("occupied", "s3", "time", "s0", "s1", "s2", "s4")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("evaluate")


@pytest.fixture(scope="module")
def profile_path(workdir: Path) -> Path:
    path = workdir / "sensors.yaml"
    path.write_text(SENSORS_YAML)
    return path


def init_task(profile_path: Path, out: Path, label: str) -> tuple[Path, TaskSpec]:
    """A task as ``fedge task init --label LABEL`` writes it (the defaults: every other resource)."""
    choice = choose_task(load_profile(profile_path), label)
    return out, write_task(choice, out, str(profile_path), force=True)


@pytest.fixture(scope="module")
def class_task(profile_path: Path, workdir: Path) -> tuple[Path, TaskSpec]:
    return init_task(profile_path, workdir / "occupied.toml", "occupied")


@pytest.fixture(scope="module")
def regression_task(profile_path: Path, workdir: Path) -> tuple[Path, TaskSpec]:
    return init_task(profile_path, workdir / "s4.toml", "s4")


def sensor_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Five sensors (float64) and an occupancy flag that depends on the first two."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)) * [2.0, 1.0, 1.0, 3.0, 0.5] + [20.0, 40.0, 0.0, 5.0, -1.0]
    occupied = ((x[:, 0] - 20.0) / 2.0 + (x[:, 1] - 40.0)) > 0
    return x, occupied


def write_csv(
    path: Path, x: np.ndarray, occupied: np.ndarray, overrides: dict[tuple[int, str], str] | None = None
) -> Path:
    """The data as a building's export might hold it: Bool as true/false and as 1/0, full
    precision floats (``repr``), a time column the task does not read."""
    lines = [",".join(CSV_COLUMNS)]
    for i in range(x.shape[0]):
        flag = bool(occupied[i])
        cells = {
            "occupied": ("true" if flag else "false") if i % 2 == 0 else ("1" if flag else "0"),
            "time": f"2025-01-01T00:{i // 60 % 60:02d}:{i % 60:02d}",
            **{name: repr(float(x[i, j])) for j, name in enumerate(SENSORS)},
        }
        for (row, column), text in (overrides or {}).items():
            if row == i:
                cells[column] = text
        lines.append(",".join(cells[c] for c in CSV_COLUMNS))
    path.write_text("\n".join(lines) + "\n")
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = evaluate_main(["evaluate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    assert err == ""
    result: dict[str, object] = json.loads(out)
    return result


def reference(
    model_dir: Path, weights: np.ndarray | None = None, normalisation: Normalisation | None = None
) -> LiteRTTrainer:
    """The trainer scoring the arrays built here (the model's initial weights by default)."""
    trainer = LiteRTTrainer.from_dir(model_dir)
    trainer.normalisation = normalisation
    if weights is None:
        weights = weights_from_bytes((model_dir / INITIAL_WEIGHTS_FILE).read_bytes(), trainer.parameter_count)
    trainer.set_weights(weights)
    return trainer


def confusion(y: Sequence[int], predicted: Sequence[int], n_classes: int) -> list[list[int]]:
    matrix = [[0] * n_classes for _ in range(n_classes)]
    for true, guess in zip(y, predicted, strict=True):
        matrix[true][guess] += 1
    return matrix


# --- classification -----------------------------------------------------------------------------


def test_classification_scores_equal_litert_on_the_same_arrays(
    capsys: pytest.CaptureFixture[str],
    build_model_dir: Callable[[TaskSpec], Path],
    class_task: tuple[Path, TaskSpec],
    tmp_path: Path,
) -> None:
    task_path, task = class_task
    model_dir = build_model_dir(task)
    x, occupied = sensor_data(120, seed=7)
    csv_path = write_csv(tmp_path / "data.csv", x, occupied)
    result = run_json(capsys, "--task", str(task_path), "--model-dir", str(model_dir), "--csv", str(csv_path))

    xs, ys = x.astype(np.float32), occupied.astype(np.int64)  # classes ["false", "true"]
    trainer = reference(model_dir)
    expected = trainer.evaluate(xs, ys)
    predicted = trainer.predict(xs).argmax(axis=1)
    assert result["examples"] == expected.examples == 120
    assert result["rows"] == 120
    assert result["accuracy"] == expected.accuracy
    assert result["loss"] == pytest.approx(expected.loss, rel=1e-6)
    assert result["confusion_matrix"] == confusion(ys.tolist(), predicted.tolist(), 2)
    assert result["classes"] == ["false", "true"]
    assert (result["mae"], result["rmse"], result["mse"]) == (None, None, None)
    assert (result["weights"], result["normalisation"], result["kind"]) == (
        "initial",
        "none",
        "classification",
    )
    assert result["runtime"] == "ai_edge_litert"
    quality = result["quality"]
    assert isinstance(quality, dict)
    assert (quality["readings"], quality["accepted"], quality["rows"], quality["samples"]) == (
        720,
        720,
        120,
        120,
    )


def test_trained_weights_and_a_normalisation_file(
    capsys: pytest.CaptureFixture[str],
    build_model_dir: Callable[[TaskSpec], Path],
    class_task: tuple[Path, TaskSpec],
    tmp_path: Path,
) -> None:
    """A global model's weights blob (--weights) and the fleet's normalisation (--normalisation):
    here trained centrally on other data of the same building, then scored on this CSV."""
    task_path, task = class_task
    model_dir = build_model_dir(task)
    train_x, train_occupied = sensor_data(400, seed=1)
    normalisation = Normalisation(tuple(train_x.mean(axis=0)), tuple(train_x.std(axis=0)))
    trainer = reference(model_dir, normalisation=normalisation)
    trainer.fit(train_x, train_occupied.astype(np.int64), epochs=20, rng=np.random.default_rng(0))
    weights = trainer.get_weights()
    weights_file = tmp_path / "global.f32"
    weights_file.write_bytes(weights_to_bytes(weights))
    norm_file = tmp_path / "normalisation.json"
    norm_file.write_text(json.dumps(normalisation.to_dict()))

    x, occupied = sensor_data(150, seed=2)
    csv_path = write_csv(tmp_path / "data.csv", x, occupied)
    result = run_json(
        capsys,
        *("--task", str(task_path), "--model-dir", str(model_dir), "--csv", str(csv_path)),
        *("--weights", str(weights_file), "--normalisation", str(norm_file)),
    )
    xs, ys = x.astype(np.float32), occupied.astype(np.int64)
    fresh = reference(model_dir, weights_from_bytes(weights_file.read_bytes(), weights.size), normalisation)
    expected = fresh.evaluate(xs, ys)
    matrix = confusion(ys.tolist(), fresh.predict(xs).argmax(axis=1).tolist(), 2)
    assert result["accuracy"] == expected.accuracy
    assert expected.accuracy is not None and expected.accuracy >= 0.9  # it learned the rule
    assert result["loss"] == pytest.approx(expected.loss, rel=1e-6)
    assert result["confusion_matrix"] == matrix
    assert sum(matrix[i][i] for i in range(2)) == round(expected.accuracy * 150)
    assert (result["weights"], result["normalisation"]) == (str(weights_file), str(norm_file))

    # The table says the same.
    code, out, err = run(
        capsys,
        *("--task", str(task_path), "--model-dir", str(model_dir), "--csv", str(csv_path)),
        *("--weights", str(weights_file), "--normalisation", str(norm_file)),
    )
    assert code == 0 and err == ""
    correct = matrix[0][0] + matrix[1][1]
    assert out.splitlines() == [
        f"{task.name}: 150 examples from 150 rows of {csv_path} (ai_edge_litert)",
        f"model {model_dir}, weights {weights_file}, normalisation {norm_file}",
        f"loss {expected.loss:.4f}  accuracy {expected.accuracy:.4f} ({correct}/150)",
        "confusion matrix (rows: true class, columns: predicted class)",
        f"        {'false':>6}  {'true':>6}",
        f" false  {matrix[0][0]:>6}  {matrix[0][1]:>6}",
        f"  true  {matrix[1][0]:>6}  {matrix[1][1]:>6}",
    ]


def test_a_profile_drops_what_a_device_would_drop(
    capsys: pytest.CaptureFixture[str],
    build_model_dir: Callable[[TaskSpec], Path],
    class_task: tuple[Path, TaskSpec],
    profile_path: Path,
    tmp_path: Path,
) -> None:
    """With --profile: s0 = 75 is out of the profile's range, an empty cell a missing reading,
    NaN not finite: each row dropped and counted, as the device's sample builder does."""
    task_path, task = class_task
    model_dir = build_model_dir(task)
    x, occupied = sensor_data(60, seed=3)
    overrides = {(5, "s0"): "75", (9, "s2"): "", (11, "s3"): "NaN"}
    csv_path = write_csv(tmp_path / "data.csv", x, occupied, overrides)
    result = run_json(
        capsys,
        *("--task", str(task_path), "--model-dir", str(model_dir), "--csv", str(csv_path)),
        *("--profile", str(profile_path)),
    )
    keep = [i for i in range(60) if i not in (5, 9, 11)]
    xs, ys = x[keep].astype(np.float32), occupied[keep].astype(np.int64)
    expected = reference(model_dir).evaluate(xs, ys)
    assert (result["rows"], result["examples"]) == (60, 57)
    assert result["accuracy"] == expected.accuracy
    quality = result["quality"]
    assert isinstance(quality, dict)
    assert (quality["out_of_range"], quality["not_finite"], quality["incomplete"]) == (1, 1, 3)

    # Without the profile there are no limits: only the empty cell and the NaN drop their rows.
    result = run_json(capsys, "--task", str(task_path), "--model-dir", str(model_dir), "--csv", str(csv_path))
    assert result["examples"] == 58


# --- regression ---------------------------------------------------------------------------------


def test_regression_gives_mae_and_rmse(
    capsys: pytest.CaptureFixture[str],
    build_model_dir: Callable[[TaskSpec], Path],
    regression_task: tuple[Path, TaskSpec],
    tmp_path: Path,
) -> None:
    task_path, task = regression_task
    assert task.features.resources == ("s0", "s1", "s2", "s3", "occupied")
    model_dir = build_model_dir(task)
    x, occupied = sensor_data(90, seed=4)
    csv_path = write_csv(tmp_path / "data.csv", x, occupied)
    result = run_json(capsys, "--task", str(task_path), "--model-dir", str(model_dir), "--csv", str(csv_path))

    xs = np.column_stack([x[:, :4], occupied.astype(np.float64)]).astype(np.float32)
    ys = x[:, 4].astype(np.float32)
    trainer = reference(model_dir)
    expected = trainer.evaluate(xs, ys)
    assert expected.mse is not None
    errors = trainer.predict(xs).reshape(-1).astype(np.float64) - ys.astype(np.float64)
    assert result["examples"] == 90
    assert result["mse"] == expected.mse
    assert result["rmse"] == pytest.approx(math.sqrt(expected.mse), rel=1e-12)
    assert result["mae"] == pytest.approx(float(np.mean(np.abs(errors))), rel=1e-12)
    assert result["loss"] == pytest.approx(expected.loss, rel=1e-6)
    assert (result["accuracy"], result["confusion_matrix"], result["classes"]) == (None, None, None)

    code, out, err = run(
        capsys, "--task", str(task_path), "--model-dir", str(model_dir), "--csv", str(csv_path)
    )
    assert code == 0 and err == ""
    assert out.splitlines()[2] == (
        f"loss {expected.loss:.4f}  MSE {expected.mse:.4f}  MAE {result['mae']:.4f}  "
        f"RMSE {math.sqrt(expected.mse):.4f}"
    )


# --- windows: the device's windowing, over a file longer than one feeding ----------------------


def test_windowed_task_scores_the_windows_a_device_builds(
    capsys: pytest.CaptureFixture[str],
    build_model_dir: Callable[[TaskSpec], Path],
    class_task: tuple[Path, TaskSpec],
    tmp_path: Path,
) -> None:
    base_path, _ = class_task
    # The written spec, with a window (its comments show where it goes) and a rate.
    resources = 'resources = ["s0", "s1", "s2", "s3", "s4"]\n'
    text = base_path.read_text()
    assert resources in text
    text = text.replace('name = "test-sensors-occupied"', 'name = "windowed"').replace(
        resources,
        resources
        + 'sample_rate_hz = 0.5\n[features.window]\nsize = 4\nstep = 3\nstatistics = ["mean", "max"]\n',
    )
    task_path = tmp_path / "windowed.toml"
    task_path.write_text(text)
    task = parse_task_spec(text)
    assert task.input_dim == 10
    model_dir = build_model_dir(task)
    n = 3001  # 18,006 readings: fed to the sample builder in several batches
    x, occupied = sensor_data(n, seed=5)
    csv_path = write_csv(tmp_path / "data.csv", x, occupied)
    result = run_json(capsys, "--task", str(task_path), "--model-dir", str(model_dir), "--csv", str(csv_path))

    starts = range(0, n - 4 + 1, 3)
    xs = np.array(
        [[f(x[s : s + 4, j]) for j in range(5) for f in (np.mean, np.max)] for s in starts], dtype=np.float32
    )
    # The window's majority class; a tie (2 of 4) goes to the smaller index, false.
    ys = np.array([int(occupied[s : s + 4].sum() > 2) for s in starts], dtype=np.int64)
    trainer = reference(model_dir)
    expected = trainer.evaluate(xs, ys)
    assert result["examples"] == len(starts) == 1000
    assert result["accuracy"] == expected.accuracy
    assert result["loss"] == pytest.approx(expected.loss, rel=1e-6)
    assert result["confusion_matrix"] == confusion(
        ys.tolist(), trainer.predict(xs).argmax(axis=1).tolist(), 2
    )


# --- errors: one line, exit code 2, nothing on stdout -------------------------------------------


def test_errors_are_one_line_and_print_nothing_else(
    capsys: pytest.CaptureFixture[str],
    build_model_dir: Callable[[TaskSpec], Path],
    class_task: tuple[Path, TaskSpec],
    regression_task: tuple[Path, TaskSpec],
    profile_path: Path,
    tmp_path: Path,
) -> None:
    task_path, task = class_task
    model_dir = build_model_dir(task)
    x, occupied = sensor_data(20, seed=6)
    good = write_csv(tmp_path / "good.csv", x, occupied)
    lines = good.read_text().splitlines()

    no_s2 = tmp_path / "no-s2.csv"
    no_s2.write_text(
        "\n".join(",".join(c for k, c in enumerate(ln.split(",")) if k != 5) for ln in lines) + "\n"
    )
    not_a_number = write_csv(tmp_path / "nan-text.csv", x, occupied, {(6, "s1"): "21x"})
    short_row = tmp_path / "short.csv"
    short_row.write_text("\n".join([*lines[:4], "1,2,3", *lines[4:]]) + "\n")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    unknown = write_csv(tmp_path / "unknown.csv", x, occupied, {(i, "occupied"): "maybe" for i in range(20)})
    bad_weights = tmp_path / "bad.f32"
    bad_weights.write_bytes(b"\0" * 12)

    base = ["--task", str(task_path), "--model-dir", str(model_dir)]
    cases: list[tuple[list[str], str]] = [
        (
            [*base, "--csv", str(no_s2)],
            f"{no_s2}: no column 's2' in the header; the task reads s0, s1, s2, s3, s4, occupied (label)",
        ),
        ([*base, "--csv", str(not_a_number)], f"{not_a_number} line 8: column 's1': '21x' is not a number"),
        (
            [*base, "--csv", str(not_a_number), "--profile", str(profile_path)],
            f"{not_a_number} line 8: column 's1': '21x' is not a Float64 (the profile's valueType)",
        ),
        ([*base, "--csv", str(short_row)], f"{short_row} line 5: 3 fields, the header has 7"),
        (
            [*base, "--csv", str(empty)],
            f"{empty}: no header row (it names the columns: s0, s1, s2, s3, s4, occupied)",
        ),
        (
            [*base, "--csv", str(unknown)],
            f"{unknown}: no samples: 20 rows gave none (dropped: unknown_label 20)",
        ),
        (
            [*base, "--csv", str(tmp_path / "absent.csv")],
            f"cannot read {tmp_path / 'absent.csv'}: No such file or directory",
        ),
        (
            [*base, "--csv", str(good), "--weights", str(bad_weights)],
            f"{bad_weights} is 12 bytes; the model's 130 float32 parameters are 520",  # 5-16-2
        ),
        (
            ["--task", str(regression_task[0]), "--model-dir", str(model_dir), "--csv", str(good)],
            f"the model in {model_dir} was built for task 'test-sensors-occupied', whose [features] "
            "differs from that of task 'test-sensors-s4'; build its model with fedge model build",
        ),
    ]
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        assert (code, out, err) == (2, "", f"fedge: error: {message}\n"), argv


# --- the parser, as fedge's cli.py wires it; no TensorFlow --------------------------------------


def test_add_parser_wires_evaluate(
    capsys: pytest.CaptureFixture[str],
    build_model_dir: Callable[[TaskSpec], Path],
    class_task: tuple[Path, TaskSpec],
    tmp_path: Path,
) -> None:
    task_path, task = class_task
    model_dir = build_model_dir(task)
    x, occupied = sensor_data(30, seed=8)
    csv_path = write_csv(tmp_path / "data.csv", x, occupied)
    parser = argparse.ArgumentParser(prog="fedge")
    add_parser(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(
        [
            "evaluate",
            "--task",
            str(task_path),
            "--model-dir",
            str(model_dir),
            "--csv",
            str(csv_path),
            "--json",
        ]
    )
    assert args.command == "evaluate"
    assert (args.task, args.model_dir, args.csv) == (task_path, model_dir, csv_path)
    assert (args.weights, args.normalisation, args.profile, args.runtime) == (None, None, None, "auto")
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 30
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["evaluate", "--task", str(task_path), "--csv", str(csv_path)])
    assert exc.value.code == 2
    assert "one of the arguments --model-dir --global is required" in capsys.readouterr().err


def test_evaluation_runs_on_litert_without_tensorflow(
    build_model_dir: Callable[[TaskSpec], Path], class_task: tuple[Path, TaskSpec], tmp_path: Path
) -> None:
    task_path, task = class_task
    model_dir = build_model_dir(task)
    x, occupied = sensor_data(25, seed=9)
    csv_path = write_csv(tmp_path / "data.csv", x, occupied)
    probe = (
        "import sys\n"
        "from fedge.tools.evaluate import main\n"
        "code = main(sys.argv[1:])\n"
        "heavy = sorted(m for m in ('tensorflow', 'keras') if m in sys.modules)\n"
        "print('heavy:', heavy)\n"
        "sys.exit(code)\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            probe,
            "evaluate",
            "--task",
            str(task_path),
            "--model-dir",
            str(model_dir),
            "--csv",
            str(csv_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{task.name}: 25 examples from 25 rows of {csv_path} (ai_edge_litert)"
    assert lines[-1] == "heavy: []"


# --- time: the CSV's time column places rows, and a gap splits windows as on a device -----------


def test_a_gap_in_the_time_column_splits_windows_as_a_device_would(
    capsys: pytest.CaptureFixture[str],
    build_model_dir: Callable[[TaskSpec], Path],
    class_task: tuple[Path, TaskSpec],
    tmp_path: Path,
) -> None:
    base_path, _ = class_task
    resources = 'resources = ["s0", "s1", "s2", "s3", "s4"]\n'
    text = base_path.read_text().replace('name = "test-sensors-occupied"', 'name = "windowed"')
    text = text.replace(
        resources,
        resources
        + 'sample_rate_hz = 0.5\n[features.window]\nsize = 4\nstep = 3\nstatistics = ["mean", "max"]\n',
    )
    task_path = tmp_path / "windowed.toml"
    task_path.write_text(text)
    model_dir = build_model_dir(parse_task_spec(text))
    n, gap_at = 40, 17
    x, occupied = sensor_data(n, seed=11)
    # Rows 2 s apart (the task's period) in epoch seconds, with a minute missing before row 17.
    times = [1_740_000_000 + 2 * i + (60 if i >= gap_at else 0) for i in range(n)]
    csv_path = write_csv(
        tmp_path / "gap.csv", x, occupied, {(i, "time"): str(t) for i, t in enumerate(times)}
    )
    result = run_json(capsys, "--task", str(task_path), "--model-dir", str(model_dir), "--csv", str(csv_path))

    # A device's windows: within each stretch, never across the gap (13 windows without it).
    starts = [*range(0, gap_at - 4 + 1, 3), *range(gap_at, n - 4 + 1, 3)]
    xs = np.array(
        [[f(x[s : s + 4, j]) for j in range(5) for f in (np.mean, np.max)] for s in starts], dtype=np.float32
    )
    ys = np.array([int(occupied[s : s + 4].sum() > 2) for s in starts], dtype=np.int64)
    expected = reference(model_dir).evaluate(xs, ys)
    assert result["examples"] == len(starts) == 12
    assert result["quality"]["gap"] == 1  # type: ignore[index]
    assert result["accuracy"] == expected.accuracy
    assert result["loss"] == pytest.approx(expected.loss, rel=1e-6)

    # The same rows without their times (no time column): one stretch, 13 windows.
    untimed = tmp_path / "untimed.csv"
    untimed.write_text(csv_path.read_text().replace("time", "note", 1))
    again = run_json(capsys, "--task", str(task_path), "--model-dir", str(model_dir), "--csv", str(untimed))
    assert again["examples"] == 13
    # Named with --time-column, the renamed column places the rows again.
    named = run_json(
        capsys,
        "--task",
        str(task_path),
        "--model-dir",
        str(model_dir),
        "--csv",
        str(untimed),
        "--time-column",
        "note",
    )
    assert named["examples"] == 12
