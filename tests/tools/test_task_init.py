"""``fedge task init``: a task spec from an EdgeX profile that parses, fits the profile and
round-trips, with one-line errors for every option a profile cannot satisfy.

Real profiles (``edgex_profiles/``) and profiles written here; real files. The commands run
through :func:`fedge.tools.task_init.main` (``fedge``'s error handling, in process), and once as a
subprocess for the exit code a shell sees.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedge.agent.edgex.profile import check_task_against_profile, load_profile
from fedge.protocol.task import TaskSpec, parse_task_spec, task_spec_from_dict
from fedge.tools.task_init import add_parser, default_name, parse_hidden
from fedge.tools.task_init import main as task_init_main

REPO = Path(__file__).resolve().parents[2]
PROFILES = REPO / "edgex_profiles"

#: Five Float64 sensors and a Bool label, as a building's own profile might have them.
SENSORS_YAML = """\
name: "Test-Sensors"
manufacturer: "fedge tests"
description: "Five Float64 sensors and an occupancy flag"
deviceResources:
  - name: "s0"
    description: "first sensor"
    properties: { valueType: "Float64", readWrite: "R", units: "degC", minimum: -50, maximum: 50 }
  - name: "s1"
    properties: { valueType: "Float64", readWrite: "R" }
  - name: "s2"
    properties: { valueType: "Float64", readWrite: "R" }
  - name: "s3"
    properties: { valueType: "Float64", readWrite: "R" }
  - name: "s4"
    properties: { valueType: "Float64", readWrite: "R" }
  - name: "occupied"
    properties: { valueType: "Bool", readWrite: "R" }
deviceCommands:
  - name: "all"
    readWrite: "R"
    resourceOperations:
      - { deviceResource: "s0" }
      - { deviceResource: "s1" }
      - { deviceResource: "s2" }
      - { deviceResource: "s3" }
      - { deviceResource: "s4" }
      - { deviceResource: "occupied" }
"""

#: A String label whose values the profile fixes through a command's mappings; a level as an
#: integer; a text note no task can use; a write-only setpoint.
MODES_YAML = """\
name: "Mode-Unit"
deviceResources:
  - name: "temperature"
    properties: { valueType: "Float32", readWrite: "R" }
  - name: "valve"
    properties: { valueType: "Uint8", readWrite: "R", minimum: 0, maximum: 100 }
  - name: "mode"
    properties: { valueType: "String", readWrite: "R" }
  - name: "level"
    properties: { valueType: "Int16", readWrite: "R" }
  - name: "note"
    properties: { valueType: "String", readWrite: "R" }
  - name: "target"
    properties: { valueType: "Float32", readWrite: "W" }
deviceCommands:
  - name: "state"
    readWrite: "R"
    resourceOperations:
      - { deviceResource: "temperature" }
      - { deviceResource: "valve" }
      - { deviceResource: "mode", mappings: { "0": "off", "1": "heat", "2": "cool", "3": "heat" } }
      - { deviceResource: "level" }
"""

ONLY_TEXT_YAML = """\
name: "Text-Only"
deviceResources:
  - name: "state"
    properties: { valueType: "Bool", readWrite: "R" }
  - name: "note"
    properties: { valueType: "String", readWrite: "R" }
"""


def write_profile(tmp_path: Path, text: str, name: str = "profile.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = task_init_main(["task", "init", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def init_ok(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert err == ""
    return out


def assert_error(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err == f"fedge: error: {message}\n"


def check_written(path: Path, profile_path: Path) -> TaskSpec:
    """The file parses, fits its profile and round-trips through the canonical form."""
    text = path.read_text()
    task = parse_task_spec(text)
    check_task_against_profile(task, load_profile(profile_path))
    again = task_spec_from_dict(task.to_dict())
    assert again == task and again.sha256() == task.sha256()
    assert tomllib.loads(text)["model"]["type"] == "mlp"
    return task


# --- real profiles ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("profile", "options", "kind", "classes", "features"),
    [
        (
            "room-environment-sensor.yaml",
            ["--label", "occupancy"],
            "classification",
            ("false", "true"),
            ("temperature", "humidity", "co2", "light"),
        ),
        (
            "power-meter.yaml",
            ["--label", "power"],
            "regression",
            None,
            ("energy", "voltage", "current", "power_factor"),
        ),
        (
            "hvac-unit.yaml",
            ["--label", "mode", "--classes", "off,heat,cool,fan,auto"],
            "classification",
            ("off", "heat", "cool", "fan", "auto"),
            ("setpoint", "supply_temperature", "return_temperature", "fan_speed"),
        ),
        (
            "hvac-unit.yaml",
            ["--label", "fan_speed"],
            "regression",
            None,
            ("setpoint", "supply_temperature", "return_temperature"),
        ),
        (
            "room-environment-sensor.yaml",
            ["--label", "co2", "--features", "temperature, humidity,occupancy"],
            "regression",
            None,
            ("temperature", "humidity", "occupancy"),
        ),
        (
            "wearable-imu.yaml",
            ["--label", "activity", "--classes", "PEN,ABD,FEL,IR,ER,TRAP,ROW"],
            "classification",
            ("PEN", "ABD", "FEL", "IR", "ER", "TRAP", "ROW"),
            ("accel_x", "accel_y", "accel_z", "gyro_x", "gyro_y", "gyro_z"),
        ),
    ],
)
def test_real_profiles_give_valid_tasks(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    profile: str,
    options: list[str],
    kind: str,
    classes: tuple[str, ...] | None,
    features: tuple[str, ...],
) -> None:
    out_file = tmp_path / "task.toml"
    out = init_ok(capsys, "--profile", str(PROFILES / profile), *options, "--out", str(out_file))
    task = check_written(out_file, PROFILES / profile)
    assert task.model.kind == kind
    assert task.label.classes == classes
    assert task.features.resources == features
    assert task.features.window is None  # one reading row per sample
    assert task.features.sample_rate_hz is None
    assert task.model.hidden == (16,)
    assert task.layer_sizes == (len(features), 16, len(classes) if classes else 1)
    profile_name = load_profile(PROFILES / profile).name
    assert task.name == default_name(profile_name, task.label.resource)
    assert out.splitlines()[0].startswith(f"wrote {out_file}: task {task.name!r}, ")
    assert out.splitlines()[1] == f"next: fedge model build --task {out_file} --out MODEL_DIR"


def test_room_sensor_file_explains_its_choices(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_file = tmp_path / "room.toml"
    init_ok(
        capsys,
        "--profile",
        str(PROFILES / "room-environment-sensor.yaml"),
        "--label",
        "occupancy",
        "--out",
        str(out_file),
    )
    text = out_file.read_text()
    assert text.startswith("# Task spec written by `fedge task init` from the EdgeX device profile\n")
    # Every resource the task reads is described next to it, from the profile.
    assert "#   temperature: Float32, degC, -40..85 (Air temperature)\n" in text
    assert "#   co2: Uint16, ppm, 0..10000 (CO2 concentration (NDIR))\n" in text
    assert "# The profile's command 'environment' reads these resources and the label in one event," in text
    assert "# A Bool, so two classes: false is 'false', true is 'true'.\n" in text
    assert '\nname = "room-environment-sensor-occupancy"\n' in text
    assert (
        '\ndescription = "Classify occupancy from temperature, humidity, co2, light '
        '(EdgeX profile Room-Environment-Sensor)."\n' in text
    )
    assert "\nhidden = [16]   # hidden layer sizes, ReLU; [] is a linear model\n" in text
    # The commented-out lines are valid spec once uncommented.
    lines = text.splitlines()
    uncommented = "\n".join(
        line.removeprefix("# ")
        if line.startswith(("# sample_rate_hz", "# [features.window]", "# size", "# step", "# statistics"))
        else line
        for line in lines
    )
    windowed = parse_task_spec(uncommented)
    assert windowed.features.window is not None and windowed.features.window.size == 10
    assert windowed.features.sample_rate_hz == pytest.approx(1 / 60)
    assert windowed.input_dim == 16


# --- a building's own profile: five Float64 sensors and a Bool label --------------------------


def test_five_sensors_and_a_bool_label(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    profile = write_profile(tmp_path, SENSORS_YAML)
    out_file = tmp_path / "occupancy.toml"
    init_ok(capsys, "--profile", str(profile), "--label", "occupied", "--out", str(out_file))
    task = check_written(out_file, profile)
    assert task.to_dict() == {
        "name": "test-sensors-occupied",
        "description": "Classify occupied from s0, s1, s2, s3, s4 (EdgeX profile Test-Sensors).",
        "features": {"resources": ["s0", "s1", "s2", "s3", "s4"], "sample_rate_hz": None, "window": None},
        "label": {"resource": "occupied", "classes": ["false", "true"]},
        "model": {"type": "mlp", "kind": "classification", "hidden": [16], "seed": 0},
        "training": {
            "optimizer": "sgd",
            "learning_rate": 0.02,
            "momentum": 0.9,
            "batch_size": 32,
            "local_epochs": 2,
        },
    }
    assert "#   s0: Float64, degC, -50..50 (first sensor)\n" in out_file.read_text()


def test_round_trip_the_choices_give_the_same_spec(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Naming every choice explicitly (--name, --features, --classes, --hidden) reproduces the
    spec the defaults chose: the file says everything it decided."""
    profile = write_profile(tmp_path, SENSORS_YAML)
    first = tmp_path / "first.toml"
    init_ok(capsys, "--profile", str(profile), "--label", "occupied", "--out", str(first))
    task = parse_task_spec(first.read_text())
    second = tmp_path / "second.toml"
    init_ok(
        capsys,
        "--profile",
        str(profile),
        "--label",
        task.label.resource,
        "--features",
        ",".join(task.features.resources),
        "--classes",
        ",".join(task.label.classes or ()),
        "--name",
        task.name,
        "--hidden",
        ",".join(map(str, task.model.hidden)),
        "--out",
        str(second),
    )
    again = check_written(second, profile)
    assert again.sha256() == task.sha256()


def test_hidden_layers_and_a_linear_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    profile = write_profile(tmp_path, SENSORS_YAML)
    deep = tmp_path / "deep.toml"
    init_ok(capsys, "--profile", str(profile), "--label", "s4", "--hidden", "32,8", "--out", str(deep))
    task = check_written(deep, profile)
    assert task.model.kind == "regression"
    assert task.features.resources == ("s0", "s1", "s2", "s3", "occupied")  # a Bool is a feature too
    assert task.layer_sizes == (5, 32, 8, 1)
    linear = tmp_path / "linear.toml"
    init_ok(capsys, "--profile", str(profile), "--label", "s4", "--hidden", "none", "--out", str(linear))
    task = check_written(linear, profile)
    assert task.model.hidden == ()
    assert task.layer_sizes == (5, 1)
    text = linear.read_text()
    assert "\nhidden = []   # a linear model (no hidden layer)\n" in text
    assert "# A linear model: 5 inputs, one numeric output, squared-error loss.\n" in text
    assert parse_hidden("") == parse_hidden("Linear") == ()


def test_a_window_and_its_statistics(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    profile = write_profile(tmp_path, SENSORS_YAML)
    out = tmp_path / "window.toml"
    init_ok(
        capsys, "--profile", str(profile), "--label", "occupied", "--window", "6,1",
        "--statistics", "mean,std,range", "--hidden", "none", "--out", str(out),
    )  # fmt: skip
    task = check_written(out, profile)
    assert task.features.window is not None
    assert (task.features.window.size, task.features.window.step) == (6, 1)
    assert task.features.window.statistics == ("mean", "std", "range")
    assert task.layer_sizes == (15, 2)  # 5 resources x 3 statistics
    text = out.read_text()
    assert "\n[features.window]\n" in text and "# [features.window]" not in text
    assert "# A linear model: 15 inputs, softmax over 2 classes, cross-entropy loss.\n" in text
    side_by_side = tmp_path / "side.toml"
    init_ok(
        capsys, "--profile", str(profile), "--label", "occupied", "--window", "10", "--out", str(side_by_side)
    )
    window = check_written(side_by_side, profile).features.window
    assert window is not None
    assert (window.size, window.step, window.statistics) == (10, 10, ("mean", "std", "min", "max"))


def test_window_options_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    profile = str(write_profile(tmp_path, SENSORS_YAML))
    out = tmp_path / "t.toml"
    base = ["--profile", profile, "--label", "occupied", "--out", str(out)]
    assert_error(
        capsys, [*base, "--statistics", "mean"],
        "--statistics needs --window SIZE[,STEP]: statistics are computed over a window",
    )  # fmt: skip
    assert_error(capsys, [*base, "--window", "0"], "--window: size and step must be in 1..1000000, got 0,0")
    assert_error(
        capsys, [*base, "--window", "6,x"],
        "--window: '6,x' is not SIZE or SIZE,STEP (rows per window, rows between window starts), "
        "e.g. 6 or 6,1",
    )  # fmt: skip
    assert_error(
        capsys, [*base, "--window", "6", "--statistics", "mean,avg"],
        "--statistics: unknown statistic 'avg'; known: mean, std, min, max, median, rms, range, p10, p25, "
        "p75, p90, mad; or raw alone (the readings themselves)",
    )  # fmt: skip
    assert_error(
        capsys, [*base, "--window", "6", "--statistics", "mean,mean"], "--statistics lists 'mean' twice"
    )
    assert_error(
        capsys, [*base, "--window", "6", "--statistics", "raw,mean"],
        "--statistics: raw (the readings themselves) stands alone, not with statistics",
    )  # fmt: skip
    assert not out.exists()


def test_a_raw_window_task(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    profile = write_profile(tmp_path, SENSORS_YAML)
    out = tmp_path / "raw.toml"
    init_ok(
        capsys, "--profile", str(profile), "--label", "occupied", "--window", "8,4",
        "--statistics", "raw", "--hidden", "none", "--out", str(out),
    )  # fmt: skip
    task = check_written(out, profile)
    assert task.features.window is not None and task.features.window.raw
    assert task.features.raw_shape == (5, 8)
    assert task.layer_sizes == (40, 2)  # 5 resources x 8 readings
    text = out.read_text()
    assert 'statistics = ["raw"]\n' in text
    assert "# themselves (5 resources x 8 readings = 40 inputs),\n" in text
    assert "# A linear model: 40 inputs, softmax over 2 classes, cross-entropy loss.\n" in text


def test_bool_label_with_its_own_class_names(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    profile = write_profile(tmp_path, SENSORS_YAML)
    out_file = tmp_path / "t.toml"
    init_ok(
        capsys,
        "--profile",
        str(profile),
        "--label",
        "occupied",
        "--classes",
        "vacant,busy",
        "--out",
        str(out_file),
    )
    task = check_written(out_file, profile)
    assert task.label.classes == ("vacant", "busy")
    assert (
        "# A Bool, so two classes: false is 'vacant', true is 'busy' (from --classes).\n"
        in out_file.read_text()
    )


def test_string_label_takes_its_classes_from_the_mappings(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    profile = write_profile(tmp_path, MODES_YAML)
    out_file = tmp_path / "mode.toml"
    init_ok(capsys, "--profile", str(profile), "--label", "mode", "--out", str(out_file))
    task = check_written(out_file, profile)
    assert task.label.classes == ("off", "heat", "cool")  # distinct, in the profile's order
    # Readable numeric resources only: not the String note, not the write-only target.
    assert task.features.resources == ("temperature", "valve", "level")
    assert (
        "# Its classes are the values the profile's command 'state' map readings to" in out_file.read_text()
    )


def test_integer_label_is_a_regression_or_with_classes_a_class_index(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    profile = write_profile(tmp_path, MODES_YAML)
    regression = tmp_path / "level.toml"
    init_ok(capsys, "--profile", str(profile), "--label", "level", "--out", str(regression))
    assert check_written(regression, profile).model.kind == "regression"
    classes = tmp_path / "level-classes.toml"
    init_ok(
        capsys,
        "--profile",
        str(profile),
        "--label",
        "level",
        "--classes",
        "low,mid,high",
        "--out",
        str(classes),
    )
    task = check_written(classes, profile)
    assert (task.model.kind, task.label.classes) == ("classification", ("low", "mid", "high"))
    assert "# An integer label with --classes: a reading is a class index, 0 is the first class;" in (
        classes.read_text()
    )


# --- errors: one line each, exit code 2, nothing written ---------------------------------------


def test_errors_are_one_line_and_write_nothing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    sensors = str(write_profile(tmp_path, SENSORS_YAML, "sensors.yaml"))
    modes = str(write_profile(tmp_path, MODES_YAML, "modes.yaml"))
    text_only = str(write_profile(tmp_path, ONLY_TEXT_YAML, "text.yaml"))
    hvac = str(PROFILES / "hvac-unit.yaml")
    out = str(tmp_path / "t.toml")
    cases: list[tuple[list[str], str]] = [
        (
            ["--profile", sensors, "--label", "ocupied"],
            "--label: profile 'Test-Sensors' has no resource 'ocupied' (did you mean 'occupied'?)",
        ),
        (
            ["--profile", sensors, "--label", "occupied", "--features", "s0,zzz"],
            "--features: profile 'Test-Sensors' has no resource 'zzz'; its resources: "
            "s0, s1, s2, s3, s4, occupied",
        ),
        (
            ["--profile", sensors, "--label", "occupied", "--features", "s0,occupied"],
            "--features: 'occupied' is the label; a resource cannot be both",
        ),
        (
            ["--profile", sensors, "--label", "occupied", "--features", "s0,s1,s0"],
            "--features lists 's0' twice",
        ),
        (
            ["--profile", text_only, "--label", "state"],
            "profile 'Text-Only' has no readable numeric resource besides the label 'state' "
            "to use as a feature",
        ),
        (
            ["--profile", hvac, "--label", "mode"],
            "--label: resource 'mode' is a String with no known set of values in profile 'HVAC-Unit' "
            "(no resourceOperations mappings); name its classes with --classes a,b,c",
        ),
        (
            ["--profile", hvac, "--label", "fan_speed", "--features", "setpoint,mode"],
            "--features: resource 'mode' is String, not a number; features need one of Bool, Int8, "
            "Int16, Int32, Int64, Uint8, Uint16, Uint32, Uint64, Float32, Float64",
        ),
        (
            ["--profile", modes, "--label", "target"],
            "--label: resource 'target' cannot be read (readWrite is 'W')",
        ),
        (
            ["--profile", sensors, "--label", "s0", "--classes", "cold,warm"],
            "--classes: resource 's0' is Float64, a number: its task is a regression, which takes no classes",
        ),
        (
            ["--profile", sensors, "--label", "occupied", "--classes", "a,b,c"],
            "--classes: 'occupied' is a Bool, so it has 2 classes that name both values ('false' and "
            "'true', or '0' and '1', any case and order) or neither (then the first class is false, "
            "the second true); got ['a', 'b', 'c']",
        ),
        (
            ["--profile", modes, "--label", "mode", "--classes", "off,off"],
            "--classes lists 'off' twice",
        ),
        (
            ["--profile", sensors, "--label", "occupied", "--hidden", "16,0"],
            "--hidden: '0' is not a layer size; give sizes in 1..4096 separated by commas, e.g. 32,16, "
            "or 'none' for a linear model",
        ),
        (
            ["--profile", sensors, "--label", "occupied", "--name", "my task"],
            "--name: 'my task' is not a valid task name (letters, digits, _ . -, up to 128, "
            "starting with a letter or digit)",
        ),
        (
            ["--profile", str(tmp_path / "missing.yaml"), "--label", "occupied"],
            f"{tmp_path / 'missing.yaml'}: <file>: cannot read: No such file or directory",
        ),
    ]
    for argv, message in cases:
        assert_error(capsys, [*argv, "--out", out], message)
    assert not (tmp_path / "t.toml").exists()


def test_an_existing_file_is_replaced_only_with_force(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    profile = str(write_profile(tmp_path, SENSORS_YAML))
    out_file = tmp_path / "t.toml"
    out_file.write_text("mine\n")
    argv = ["--profile", profile, "--label", "occupied", "--out", str(out_file)]
    assert_error(capsys, argv, f"--out: {out_file} exists; --force replaces it")
    assert out_file.read_text() == "mine\n"
    init_ok(capsys, *argv, "--force")
    assert parse_task_spec(out_file.read_text()).label.resource == "occupied"


def test_a_shell_sees_exit_code_2_and_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedge.tools.task_init",
            "task",
            "init",
            "--profile",
            str(PROFILES / "hvac-unit.yaml"),
            "--label",
            "mode",
            "--out",
            str(tmp_path / "t.toml"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("fedge: error: --label: resource 'mode'")
    assert not (tmp_path / "t.toml").exists()


# --- the parser, as fedge's cli.py wires it -----------------------------------------------------


def test_add_parser_wires_task_init(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="fedge")
    add_parser(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    profile = write_profile(tmp_path, SENSORS_YAML)
    out_file = tmp_path / "t.toml"
    args = parser.parse_args(
        ["task", "init", "--profile", str(profile), "--label", "occupied", "--out", str(out_file)]
    )
    assert (args.command, args.task_command) == ("task", "init")
    assert (args.profile, args.out) == (profile, out_file)
    assert (args.features, args.classes, args.name, args.hidden, args.force) == (
        None,
        None,
        None,
        None,
        False,
    )
    assert args.func(args) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out_file}: task 'test-sensors-occupied', ")
    check_written(out_file, profile)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["task", "init", "--profile", str(profile), "--out", str(out_file)])
    assert exc.value.code == 2
    assert "the following arguments are required: --label" in capsys.readouterr().err
