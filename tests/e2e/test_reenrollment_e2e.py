"""A device revoked, then enrolled again under a new key with fresh state, is accepted from its
first update on (issue 10, item 5), through the real CLI, a real broker and a running aggregator.

Before, the aggregator kept the old key's counter and refused the new key's counters 1, 2, ...
as ``replayed_counter`` until they passed it. A counter sequence belongs to a key: anything the
old key sealed no longer opens, so nothing can be replayed by starting the new key's at 1.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedge.lab.broker import MosquittoBroker
from support.fleet_harness import REPO, Fleet, latest_status, wait_status
from support.mqtt_fixtures import TrafficRecorder

pytest_plugins = ("support.mqtt_fixtures",)
pytestmark = [pytest.mark.slow, pytest.mark.adversarial]

DEVICE = "watch-03"


def fedge(*args: str) -> str:
    """The real CLI, as an operator runs it; its stdout."""
    proc = subprocess.run(
        [sys.executable, "-m", "fedge.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_a_re_enrolled_device_with_a_new_key_and_fresh_state_is_accepted_at_once(
    tmp_path: Path, mosquitto: MosquittoBroker, har_model_dir: Path
) -> None:
    # min_devices 3: while the device is away no round completes without it (a device known to be
    # offline is otherwise left out, and the other two would finish every round before it is back).
    fleet = Fleet(
        tmp_path / "fleet",
        mosquitto.url,
        har_model_dir,
        3,
        {"rounds": 8, "min_devices": 3, "round_timeout_s": 15.0},
    )
    registry = fleet.files.registry
    with TrafficRecorder.for_broker(mosquitto) as recorder:
        try:
            for device in fleet.files.agent_configs:
                fleet.start_agent(device)
            fleet.start_aggregator()
            wait_status(recorder, fleet, lambda s: s.get("completed_rounds", 0) >= 2, 120, "two rounds")

            # The device is lost: revoked; its replacement gets a new key and a fresh state.
            fleet.signal(DEVICE, signal.SIGTERM)
            fleet.wait_exit(DEVICE, 30)
            assert "no restart needed" in fedge("revoke", "--registry", str(registry), "--id", DEVICE)
            record = fedge("keys", "device", "--id", DEVICE, "--out", str(tmp_path / "new"))
            (tmp_path / "record.toml").write_text(record.splitlines()[-1] + "\n")
            fedge("enroll", "--registry", str(registry), "--record", str(tmp_path / "record.toml"), "--force")
            shutil.copyfile(tmp_path / "new" / f"{DEVICE}.box", fleet.root / "keys" / f"{DEVICE}.box")
            shutil.rmtree(fleet.root / "state" / DEVICE)
            # The registry is read again before every round: the next one knows the new key.
            version = latest_status(recorder.messages, fleet.topics.aggregator_status)["version"]
            wait_status(
                recorder, fleet, lambda s: s.get("version", 0) > version, 60, "a round after the enrollment"
            )
            fleet.start_agent(DEVICE)

            code = fleet.wait_exit("aggregator", 300)
            assert code == 0, fleet.log("aggregator")[-3000:]
        finally:
            fleet.stop_all()
        status = latest_status(recorder.messages, fleet.topics.aggregator_status)
    # Its updates under the new key (counters from 1 again) were accepted from its first round
    # back: no round refused it, and the last rounds had all three devices.
    assert "replayed_counter" not in status["rejected_total"], status["rejected_total"]
    assert status["history"][-1]["reported"] == 3, status["history"]
    # Its first life sealed counter 1 (moments), and so did the re-enrolled one (fresh state).
    log = fleet.log(DEVICE)
    assert log.count(", counter 1, message ") == 2, log[-3000:]
