"""``fedge train-local --train CSV --test CSV``: the centralized reference on a building's own
data. Real CSVs through the device's sample builder, the model built with TensorFlow (``fedge
model build``'s path), trained and scored with the real LiteRT trainer. The same seed gives the
same JSON; the test metrics come from ``fedge evaluate``'s own scoring.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedge.agent.edgex.profile import load_profile
from fedge.cli import main
from fedge.tools.task_init import choose_task, write_task

PROFILE_YAML = """\
name: "Room-Sensor"
deviceResources:
  - name: "temperature"
    properties: { valueType: "Float64", readWrite: "R" }
  - name: "co2"
    properties: { valueType: "Float64", readWrite: "R" }
  - name: "occupied"
    properties: { valueType: "Bool", readWrite: "R" }
  - name: "power"
    properties: { valueType: "Float64", readWrite: "R" }
"""


def write_csv(path: Path, n: int, seed: int) -> Path:
    """Occupancy follows CO2; power follows temperature and CO2. A time column, Bool as 1/0."""
    rng = np.random.default_rng(seed)
    temperature = rng.normal(21.0, 1.5, n)
    co2 = rng.normal(600.0, 150.0, n)
    occupied = co2 + rng.normal(0.0, 40.0, n) > 600.0
    power = 2.0 * temperature + 0.01 * co2 + rng.normal(0.0, 0.1, n)
    lines = ["timestamp,temperature,co2,occupied,power"]
    for i in range(n):
        numbers = [repr(float(c)) for c in (temperature[i], co2[i], power[i])]
        lines.append(",".join([str(1_740_000_000 + 60 * i), *numbers[:2], str(int(occupied[i])), numbers[2]]))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("train-local-csv")
    profile = tmp / "room.yaml"
    profile.write_text(PROFILE_YAML)
    out: dict[str, Path] = {"profile": profile}
    for label in ("occupied", "power"):
        out[label] = tmp / f"{label}.toml"
        write_task(choose_task(load_profile(profile), label), out[label], str(profile), force=True)
    out["train"] = write_csv(tmp / "train.csv", 300, seed=1)
    out["test"] = write_csv(tmp / "test.csv", 120, seed=2)
    return out


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["train-local", "--no-progress", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_classification_reference_is_reproducible_and_scored_like_evaluate(
    capsys: pytest.CaptureFixture[str], files: dict[str, Path]
) -> None:
    argv = ["--task", str(files["occupied"]), "--train", str(files["train"]), "--test", str(files["test"])]
    argv += ["--profile", str(files["profile"]), "--epochs", "5", "--seed", "3", "--json"]
    first = run(capsys, *argv)
    assert first[0] == 0, first[2]
    second = run(capsys, *argv)
    assert second[1] == first[1]  # the same seed: identical JSON (the model built anew each time)
    result = json.loads(first[1])
    assert (result["train_examples"], result["test_examples"]) == (300, 120)
    assert result["classes"] == ["false", "true"]
    matrix = np.array(result["confusion_matrix"])
    assert matrix.sum() == 120
    assert result["accuracy"] == pytest.approx(np.trace(matrix) / 120)
    assert result["accuracy"] > 0.8  # CO2 tells occupancy: the reference learned it
    assert len(result["history"]) == 5 and result["history"][-1]["test_loss"] == pytest.approx(result["loss"])
    other = run(capsys, *argv[:-3], "--seed", "4", "--json")
    assert json.loads(other[1])["history"] != result["history"]  # the seed does shuffle


def test_regression_reports_mse_mae_rmse(capsys: pytest.CaptureFixture[str], files: dict[str, Path]) -> None:
    code, out, err = run(
        capsys,
        *("--task", str(files["power"]), "--train", str(files["train"]), "--test", str(files["test"])),
        *("--epochs", "3", "--json"),
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["kind"] == "regression" and result["accuracy"] is None
    assert result["rmse"] == pytest.approx(result["mse"] ** 0.5)
    assert result["mae"] > 0 and result["test_examples"] == 120


def test_bad_options_are_one_line_errors(
    capsys: pytest.CaptureFixture[str], files: dict[str, Path], tmp_path: Path
) -> None:
    task = ["--task", str(files["occupied"])]
    untimed = tmp_path / "t.csv"
    untimed.write_text("temperature,co2,occupied\n1,2,true\n")
    cases = [
        ([*task, "--train", str(files["train"])], "--train and --test go together"),
        (
            [*task, "--profile", str(files["profile"])],
            "--profile and --time-column go with --train and --test",
        ),
        (
            [*task, "--train", str(files["train"]), "--test", str(untimed), "--time-column", "when"],
            f"{files['train']}: no time column 'when' in the header",
        ),
    ]
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        assert (code, out) == (2, ""), argv
        assert err.startswith(f"fedge: error: {message}") and err.count("\n") == 1, err
