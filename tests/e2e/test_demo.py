"""``fedge demo`` as a user runs it: the issue's accuracy, size and time targets on real data.

The fp32 run also puts two of its seven devices in the agent image (podman: what a board running
``docker run`` does), so the targets are met by a fleet with container agents in every round.
Without podman the run is all host processes locally; CI has podman (``require_podman`` fails
there when it is missing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from support.podman_support import build_agent_image, podman_env, remove_containers, require_podman
from support.source_tree import PYTHONPATH as SOURCE_PYTHONPATH

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def run_demo(out: Path, *args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "fedge.cli", "demo", "--out", str(out), "--json", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        check=False,
        env=dict(podman_env(), TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary: dict[str, Any] = json.loads(proc.stdout)
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (out / "rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return summary


@pytest.fixture(scope="module")
def agent_image() -> str | None:
    """The agent image (built with podman), or None where podman cannot run outside CI."""
    try:
        require_podman()
    except pytest.skip.Exception:
        return None
    return build_agent_image()[0]


CONTAINER_DEVICES = ("watch-01", "watch-02")


def test_default_demo_meets_the_accuracy_size_and_time_targets(
    tmp_path: Path, agent_image: str | None
) -> None:
    containers = ["--container-agents", "2", "--agent-image", agent_image] if agent_image else []
    try:
        fp32 = run_demo(tmp_path / "fp32", *containers)
    finally:
        remove_containers([f"fedge-demo-{d}" for d in CONTAINER_DEVICES])
    # The int8 run reads the data set directly (the EdgeX path gives the same samples: the fp32
    # run and tests/e2e/test_edgex_e2e.py prove it), which keeps this test's time down.
    int8 = run_demo(tmp_path / "int8", "--codec", "int8", "--data", "direct")
    if agent_image:
        for device in CONTAINER_DEVICES:
            log = (tmp_path / "fp32" / "logs" / f"{device}.log").read_text()
            assert "TensorFlow Lite XNNPACK delegate" in log, log[-2000:]  # LiteRT, in the image
            assert "update for round r0020-" in log, log[-2000:]  # it trained in the last round
            # Its state is in its volume, written as the image's uid 10001.
            heartbeat = tmp_path / "fp32" / "containers" / device / "state" / "heartbeat"
            assert heartbeat.stat().st_uid == 10001
    for s in (fp32, int8):
        assert (s["devices"], s["rounds_completed"]) == (7, 20)
        assert s["rejected"] == {}
        assert all(r["reported"] == 7 for r in s["per_round"])
        assert all(code == 0 for code in s["processes"].values()), s["processes"]
        assert s["seconds"] < 300
    assert fp32["final_accuracy"] >= 0.80
    assert fp32["final_accuracy"] >= 0.95 * fp32["centralized_accuracy"]
    assert int8["final_accuracy"] >= fp32["final_accuracy"] - 0.01
    assert int8["mean_update_bytes"] <= 0.30 * fp32["mean_update_bytes"]


def test_demo_with_a_relative_output_directory(tmp_path: Path) -> None:
    """As `make demo` runs it: --out relative to the working directory."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedge.cli",
            "demo",
            "--out",
            "demo-out",
            "--devices",
            "2",
            "--rounds",
            "1",
            "--data",
            "direct",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
        check=False,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=SOURCE_PYTHONPATH),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["rounds_completed"] == 1
    assert (tmp_path / "demo-out" / "summary.json").exists()


def test_demo_refuses_more_devices_than_training_subjects(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedge.cli", "demo", "--out", str(tmp_path), "--devices", "8"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--devices must be 1..7 (subjects 1-7; 8-10 are held out for testing)" in proc.stderr


def test_demo_with_differential_privacy_spends_no_more_than_its_budget(tmp_path: Path) -> None:
    """``--dp-epsilon``: the aggregator's [privacy], devices clipping to the signed bound, the
    accountant's epsilon in the JSON; through the demo's real broker, agents and aggregator."""
    from fedge.aggregator.privacy import compute_epsilon, noise_multiplier_for

    out = tmp_path / "dp"
    s = run_demo(
        out, "--devices", "3", "--rounds", "3", "--data", "direct", "--dp-epsilon", "4", "--dp-delta", "1e-6"
    )
    assert (s["rounds_completed"], s["rejected"]) == (3, {})
    assert (s["secure_aggregation"], s["dropped"], s["delta"]) == (False, 0, 1e-6)
    z = noise_multiplier_for(4.0, 1e-6, 3, 1.0)
    assert s["epsilon_spent"] == pytest.approx(compute_epsilon(z, 1.0, 3, 1e-6), rel=1e-9)
    assert 3.9 < s["epsilon_spent"] <= 4.0
    log = (out / "logs" / "aggregator.log").read_text()
    assert f"differential privacy: epsilon budget 4 at delta 1e-06, noise multiplier {z:.4g}" in log
    plain = run_demo(tmp_path / "plain", "--devices", "2", "--rounds", "1", "--data", "direct")
    assert (plain["epsilon_spent"], plain["delta"]) == (None, None)


def test_demo_refuses_privacy_options_without_an_epsilon(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedge.cli", "demo", "--out", str(tmp_path), "--dp-delta", "1e-6"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--dp-delta and --dp-clip-bound go with --dp-epsilon (differential privacy)" in proc.stderr


def test_demo_with_secure_aggregation_and_two_devices_dropping_every_round(tmp_path: Path) -> None:
    """``--secure-aggregation --drop-devices 2``: identity keys and certificates for every device,
    masked updates only, two agents frozen mid-round in every round (SIGSTOP once their
    neighbours' keys are relayed) and the rounds still aggregate from the five survivors."""
    out = tmp_path / "secure"
    # The frozen devices make every phase wait for its deadline: short rounds keep the test quick.
    args = ["--rounds", "3", "--data", "direct", "--round-timeout", "10"]
    s = run_demo(out, *args, "--secure-aggregation", "--drop-devices", "2")
    assert (s["secure_aggregation"], s["rounds_completed"], s["devices"]) == (True, 3, 7)
    assert [r["dropped"] for r in s["per_round"]] == [2, 2, 2] and s["dropped"] == 6
    assert [(r["reported"], r["selected"]) for r in s["per_round"]] == [(5, 7)] * 3
    assert all(code == 0 for code in s["processes"].values()), s["processes"]
    log = (out / "logs" / "aggregator.log").read_text()
    assert "secure" in log
    for device in (f"watch-{i:02d}" for i in range(1, 8)):
        agent_log = (out / "logs" / f"{device}.log").read_text()
        assert "update for round" not in agent_log  # never a plain update ("update for round R sealed")


def test_demo_with_secure_aggregation_and_differential_privacy_noises_on_the_devices(tmp_path: Path) -> None:
    """``--secure-aggregation --dp-epsilon``: each device adds its share of the noise before
    masking (distributed discrete Gaussian), the accountant charges every aggregated round."""
    from fedge.aggregator.privacy import compute_epsilon, noise_multiplier_for

    out = tmp_path / "secure-dp"
    s = run_demo(
        out,
        "--devices",
        "3",
        "--rounds",
        "2",
        "--data",
        "direct",
        "--secure-aggregation",
        "--dp-epsilon",
        "8",
    )
    assert (s["secure_aggregation"], s["rounds_completed"], s["dropped"]) == (True, 2, 0)
    z = noise_multiplier_for(8.0, 1e-5, 2, 1.0)
    assert s["epsilon_spent"] == pytest.approx(compute_epsilon(z, 1.0, 2, 1e-5), rel=1e-9)
    aggregator_log = (out / "logs" / "aggregator.log").read_text()
    assert "differential privacy: epsilon budget 8" in aggregator_log
    config = (out / "fleet" / "aggregator.toml").read_text()
    assert 'noise = "distributed_discrete_gaussian"' in config and "secure_aggregation_bits = 62" in config


def test_demo_with_aggregator_replicas_counts_every_update_once(tmp_path: Path) -> None:
    """``--aggregator-replicas 3``: a leader and two workers, each its own principal of the
    demo's locked-down broker, sharing the updates; every round counts every device once and
    both workers' shares are in the leader's counts (the summary's ``workers``)."""
    out = tmp_path / "replicas"
    s = run_demo(out, "--devices", "4", "--rounds", "3", "--data", "direct", "--aggregator-replicas", "3")
    assert (s["rounds_completed"], s["rejected"], s["aggregator_replicas"]) == (3, {}, 3)
    assert [(r["reported"], r["selected"]) for r in s["per_round"]] == [(4, 4)] * 3
    workers = s["workers"]
    assert set(workers) == {"aggregator-worker-1", "aggregator-worker-2"}
    # 16 updates (the moments round and 3 train rounds of 4 devices) over three members.
    assert all(w["updates"] >= 1 and set(w["verdicts"]) <= {"accepted", "conflict"} for w in workers.values())
    assert sum(w["updates"] for w in workers.values()) < 16
    assert {name: code for name, code in s["processes"].items() if "worker" in name} == {
        "aggregator-worker-1": 0,
        "aggregator-worker-2": 0,
    }
    for worker in workers:
        assert "Traceback" not in (out / "logs" / f"{worker}.log").read_text()


def test_demo_refuses_replicas_with_secure_aggregation(tmp_path: Path) -> None:
    args = ["demo", "--out", str(tmp_path), "--aggregator-replicas", "2", "--secure-aggregation"]
    proc = subprocess.run(
        [sys.executable, "-m", "fedge.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--aggregator-replicas above 1 cannot run with --secure-aggregation" in proc.stderr


def test_demo_with_two_buildings_under_a_campus(tmp_path: Path) -> None:
    """``--buildings 2``: four locked-down brokers' worth of deployment (the campus's and one per
    building, bridged), a building aggregator each and the campus aggregator; every campus round
    aggregates both buildings and the global model learns."""
    out = tmp_path / "buildings"
    s = run_demo(out, "--devices", "4", "--rounds", "3", "--data", "direct", "--buildings", "2")
    assert (s["rounds_completed"], s["rejected"]) == (3, {})
    assert s["buildings"] == {"building-1": ["watch-01", "watch-03"], "building-2": ["watch-02", "watch-04"]}
    assert [(r["reported"], r["selected"]) for r in s["per_round"]] == [(2, 2)] * 3
    assert s["final_accuracy"] > 0.5  # 7 classes: chance is 0.14
    for building in s["buildings"]:
        log = (out / "logs" / f"{building}.log").read_text()
        assert log.count("sent the campus our update") == 3 and "Traceback" not in log
    conf = (out / "broker" / "building-1" / "config" / "mosquitto.conf").read_text()
    assert "connection campus-building-1" in conf and "bridge_cafile" in conf


def test_demo_refuses_buildings_with_too_few_devices_or_the_edgex_replay(tmp_path: Path) -> None:
    for args, message in (
        (["--buildings", "3", "--devices", "4", "--data", "direct"], "--buildings 3 needs at least 6"),
        (["--buildings", "2", "--devices", "4"], "--buildings runs without --data edgex (use --data direct)"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "fedge.cli", "demo", "--out", str(tmp_path), *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=300,
            check=False,
        )
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert message in proc.stderr
