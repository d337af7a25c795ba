"""``fedge demo --data direct``: a device reads the CSV the demo writes, in a real agent process
that never imports a data-set package (issue 18).

The demo's own functions write the device's CSV (its subject's recordings, labels included) and
provision the agent (``[data] source = "csv"``); the agent is the product (``python -m fedge.cli
agent run``) against a real Mosquitto, started with ``-X importtime``, so every module the
process imports is listed on its stderr. Once its status says it has stored its CSV's samples,
the list must hold none of seglearn, pandas, scikit-learn or fedge's lab package, and the
stored samples must be byte for byte what the data-set loader computes. The control run (a
``har-watch`` device, as the demo provisioned before) shows the check sees such an import.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from fedge.agent.edgex.ingest import task_key
from fedge.agent.sample_store import SampleStore
from fedge.lab import har_watch
from fedge.lab.broker import MosquittoBroker
from fedge.lab.demo import DEVICE_CSV, write_device_csvs
from fedge.lab.provision import FleetFiles, create_fleet
from fedge.protocol.task import TaskSpec
from fedge.protocol.topics import FleetTopics
from fedge.tools import bundled
from support.fleet_harness import latest_status
from support.mqtt_fixtures import TrafficRecorder
from support.source_tree import PYTHONPATH

pytest_plugins = ("support.mqtt_fixtures",)

REPO = Path(__file__).resolve().parents[2]
TASK = REPO / "tasks" / "har-watch.toml"
FLEET = "direct"
DEVICE = "watch-02"
#: What a device must never load: the data set's packages and fedge's lab part.
DATA_SET_MODULES = ("seglearn", "pandas", "sklearn", "fedge.lab")


def imported_modules(importtime: str) -> set[str]:
    """The modules ``-X importtime`` reports (``import time: self | cumulative | name``)."""
    names = set()
    for line in importtime.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def heavy(names: set[str]) -> list[str]:
    return sorted(n for n in names if any(n == m or n.startswith(m + ".") for m in DATA_SET_MODULES))


def run_agent_until(
    files: FleetFiles, recorder: TrafficRecorder, predicate: Any, what: str, tmp_path: Path
) -> tuple[dict[str, Any], set[str]]:
    """The agent process, with ``-X importtime``, until its status meets ``predicate``; its last
    status and the modules it imported."""
    topic = FleetTopics(FLEET).status(DEVICE)
    stderr = tmp_path / f"{DEVICE}.importtime"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    command = ["agent", "run", "--config", str(files.agent_configs[DEVICE])]
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "fedge.cli", *command],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**env, "PYTHONPATH": PYTHONPATH},
            cwd=REPO,
        )
    try:
        recorder.wait_for(lambda ms: predicate(latest_status(ms, topic)), 120, what)
    finally:
        proc.terminate()
        proc.wait(30)
    return latest_status(recorder.messages, topic), imported_modules(stderr.read_text(errors="replace"))


def test_a_demo_device_reads_its_csv_and_never_imports_the_data_set_packages(
    tmp_path: Path, mosquitto: MosquittoBroker, traffic_recorder: TrafficRecorder, har_task: TaskSpec
) -> None:
    subjects = {DEVICE: 2}
    direct = write_device_csvs(tmp_path / "fleet" / "devices", har_task, subjects)
    assert direct.files[DEVICE] == tmp_path / "fleet" / "devices" / DEVICE / DEVICE_CSV
    files = create_fleet(
        tmp_path / "fleet",
        FLEET,
        tmp_path / "model",
        mosquitto.url,
        subjects,
        {"rounds": 1},
        edgex={"profile": str(bundled.profiles_dir() / "wearable-imu.yaml")},
        task_file=TASK,
        csv_files=direct.files,
    )
    assert f'csv_file = "{direct.files[DEVICE]}"' in files.agent_configs[DEVICE].read_text()
    expected = har_watch.load_devices(har_task, [2])[2]
    assert direct.expected == {DEVICE: expected.x.shape[0]}

    def stored_all(status: dict[str, Any]) -> bool:
        data = status.get("data") or {}
        return data.get("stored_samples") == expected.x.shape[0] and (data.get("csv") or {}).get("caught_up")

    status, modules = run_agent_until(
        files, traffic_recorder, stored_all, "the CSV's samples stored", tmp_path
    )
    assert "fedge.agent.csv_source" in modules and "numpy" in modules  # the list is the process's
    assert heavy(modules) == []
    # Connected over paho, publishing status: urllib.request (paho imports it) stayed a stand-in,
    # so what it would have loaded is not there either (fedge.shell.deferred_imports).
    assert "paho.mqtt.client" in modules and not {"urllib.request", "http.client", "email.parser"} & modules
    assert status["data"]["csv"]["bad_rows"] == dict.fromkeys(status["data"]["csv"]["bad_rows"], 0)
    store = SampleStore(files.root / "state" / DEVICE / "samples.sqlite", 200_000, 0)
    try:
        x, y = store.load(task_key(har_task))
    finally:
        store.close()
    assert x.tobytes() == expected.x.tobytes() and y.tolist() == expected.y.tolist()


def test_the_check_sees_a_data_set_import_in_a_har_watch_device(
    tmp_path: Path, mosquitto: MosquittoBroker, traffic_recorder: TrafficRecorder
) -> None:
    files = create_fleet(
        tmp_path / "fleet", FLEET, tmp_path / "model", mosquitto.url, {DEVICE: 2}, {"rounds": 1}
    )
    assert '"har-watch"' in files.agent_configs[DEVICE].read_text()
    _, modules = run_agent_until(
        files,
        traffic_recorder,
        lambda s: s.get("state") not in (None, "offline"),
        "the device online",
        tmp_path,
    )
    assert "fedge.lab.har_watch" in heavy(modules)
