"""The ``fedge`` command as a user runs it: real subprocesses, real files, real exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedge.protocol.model_manifest import manifest_from_json

REPO = Path(__file__).resolve().parents[2]
HAR_TASK = REPO / "tasks" / "har-watch.toml"


def fedge(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(
        [sys.executable, "-m", "fedge.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
        check=False,
    )


EX_CONFIG = 78  # a configuration error: systemd's RestartPreventExitStatus=78 stops restarts


def assert_clean_error(proc: subprocess.CompletedProcess[str], message: str, code: int = 2) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"fedge: error: {message}" in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_model_build_writes_a_model_directory(tmp_path: Path) -> None:
    out = tmp_path / "model"
    proc = fedge("model", "build", "--task", str(HAR_TASK), "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["layers"] == [48, 64, 32, 7]
    assert summary["parameter_count"] == 5447
    manifest = manifest_from_json((out / "manifest.json").read_bytes())
    assert manifest.model_sha256 == summary["model_sha256"]
    assert (out / "model.tflite").stat().st_size == summary["model_bytes"]


def test_train_local_reaches_the_reference_accuracy(har_model_dir: Path, tmp_path: Path) -> None:
    plot = tmp_path / "train-local.png"
    proc = fedge(
        "train-local",
        "--task",
        str(HAR_TASK),
        "--model-dir",
        str(har_model_dir),
        "--json",
        "--plot",
        str(plot),
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["test_subjects"] == [8, 9, 10]
    assert result["runtime"] == "ai_edge_litert"
    assert result["epochs"] == 20 and len(result["history"]) == 20
    assert result["test_accuracy"] >= 0.80
    assert result["train_examples"] > 3000 and result["test_examples"] > 1000
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_train_local_builds_the_model_itself_and_prints_a_table() -> None:
    proc = fedge("train-local", "--task", str(HAR_TASK), "--epochs", "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["epoch", "train", "loss", "test", "loss", "test", "acc"]
    assert len(lines) == 4
    assert "har-watch: held-out accuracy" in lines[-1] and "subjects [8, 9, 10]" in lines[-1]


def test_missing_task_file(tmp_path: Path) -> None:
    proc = fedge("model", "build", "--task", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "o"))
    assert_clean_error(proc, f"cannot read task spec {tmp_path / 'nope.toml'}: No such file or directory")
    assert not (tmp_path / "o").exists()


def test_invalid_task_names_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(HAR_TASK.read_text().replace("learning_rate = 0.02", "learning_rate = -1"))
    proc = fedge("train-local", "--task", str(bad))
    assert_clean_error(proc, f"{bad}: task spec: training.learning_rate: must be > 0, got -1.0")


def test_task_that_is_not_utf8(tmp_path: Path) -> None:
    bad = tmp_path / "bin.toml"
    bad.write_bytes(b"\xff\xfe\x00name")
    assert_clean_error(
        fedge("model", "build", "--task", str(bad), "--out", str(tmp_path)),
        f"task spec {bad} is not UTF-8 text",
    )


def test_corrupt_model_dir_is_refused(har_model_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(har_model_dir, d)
    (d / "manifest.json").write_text('{"format": "something-else"}')
    proc = fedge("train-local", "--task", str(HAR_TASK), "--model-dir", str(d))
    assert_clean_error(proc, "manifest format must be 'fedge-model/1', got 'something-else'")


def test_zero_epochs_is_refused() -> None:
    proc = fedge("train-local", "--task", str(HAR_TASK), "--epochs", "0")
    assert_clean_error(proc, "--epochs must be >= 1")


def test_config_errors_exit_78(tmp_path: Path) -> None:
    """A service whose config is wrong exits 78 (EX_CONFIG), not 2: the unit is not restarted."""
    missing = tmp_path / "agent.toml"
    proc = fedge("agent", "run", "--config", str(missing))
    assert_clean_error(proc, f"cannot read config {missing}: No such file or directory", EX_CONFIG)
    config = tmp_path / "aggregator.toml"
    config.write_text(
        '[aggregator]\nfleet = "demo"\n\n[mqtt]\nusername = "aggregator"\npassword = "s3cret"\n'
    )
    config.chmod(0o644)
    proc = fedge("aggregator", "run", "--config", str(config))
    assert_clean_error(
        proc, f"config {config} holds a password ([mqtt] password) but is accessible", EX_CONFIG
    )
    assert "s3cret" not in proc.stderr
    config.write_text('[aggregator]\nfleet = "demo"\n\n[rounds]\nrounds = 0\n')
    proc = fedge("aggregator", "run", "--config", str(config))
    assert_clean_error(proc, "[rounds] rounds must be an integer in 1..1000000, got 0", EX_CONFIG)


@pytest.mark.parametrize("args", [[], ["model"], ["bogus"]])
def test_usage_errors_exit_2(args: list[str]) -> None:
    proc = fedge(*args)
    assert proc.returncode == 2
    assert "usage: fedge" in proc.stderr and "Traceback" not in proc.stderr


def test_version() -> None:
    proc = fedge("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == "fedge 0.1.0"


def test_a_service_key_readable_by_others_is_a_config_error(tmp_path: Path, har_model_dir: Path) -> None:
    """The key is part of the service's configuration: a key file of mode 0644 exits 78 with
    the fix, so systemd does not restart the agent into the same refusal."""
    from fedge.lab.provision import create_fleet

    files = create_fleet(
        tmp_path, "demo", har_model_dir, "mqtt://127.0.0.1:1", {"watch-01": 1}, {"min_devices": 1}
    )
    key = tmp_path / "keys" / "watch-01.box"
    key.chmod(0o644)
    proc = fedge("agent", "run", "--config", str(files.agent_configs["watch-01"]))
    assert_clean_error(
        proc,
        f"private key file {key} is accessible by group or others (mode 0644); fix it with: chmod 600 {key}",
        EX_CONFIG,
    )
    signing = tmp_path / "keys" / "aggregator.sign"
    signing.chmod(0o640)
    proc = fedge("aggregator", "run", "--config", str(files.aggregator_config))
    assert_clean_error(
        proc, f"private key file {signing} is accessible by group or others (mode 0640)", EX_CONFIG
    )


def test_the_cli_starts_without_numpy_or_the_services() -> None:
    """``fedge --help`` and argument errors answer fast on a board: importing the CLI loads
    neither numpy nor either service (they are imported by the commands that run them)."""
    from support.source_tree import PYTHONPATH

    heavy = ("numpy", "fedge.agent", "fedge.aggregator", "paho")
    probe = f"import sys, fedge.cli; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": PYTHONPATH},
        check=True,
    )
    assert out.stdout.strip() == "[]"
