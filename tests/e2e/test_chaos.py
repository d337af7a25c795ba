"""The chaos loop (tests/support/chaos.py): kill -9 the broker, the aggregator and an agent at
every phase of a round, and check after the run that no model went back, nothing was counted
twice, no acknowledged update was lost, and the fleet always completed the next round.

``make test`` runs the short loop (one kill per phase, the targets taking turns); ``make chaos``
runs every (target, phase) pair ``FEDGE_CHAOS_REPEATS`` times (3 by default) and writes the
recovery times to ``bench/results/chaos.json``.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedge.lab.broker import MosquittoBroker
from support.chaos import (
    PHASES,
    WORKER,
    ChaosLoop,
    ChaosReport,
    Fault,
    check_invariants,
    schedule,
    short_schedule,
    write_report,
)
from support.fleet_harness import Fleet, wait_device_online
from support.mqtt_fixtures import TrafficRecorder

pytest_plugins = ("support.mqtt_fixtures",)
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DEVICES = 4
ROUND_TIMEOUT_S = 4.0


@pytest.fixture()
def recorder(mosquitto: MosquittoBroker) -> Iterator[TrafficRecorder]:
    with TrafficRecorder.for_broker(mosquitto) as rec:
        yield rec


def _run(
    tmp_path: Path,
    broker: MosquittoBroker,
    recorder: TrafficRecorder,
    model_dir: Path,
    long: bool,
    replicated: bool = False,
) -> None:
    """The loop on a fleet of DEVICES agents. ``replicated``: the aggregator has a worker
    ([replicas]); the worker (and, in the long loop, the leader) is killed at every phase, and the
    worker's refusals are in the ledger."""
    fleet = Fleet(
        tmp_path / "fleet",
        broker.url,
        model_dir,
        DEVICES,
        {"rounds": 100_000, "min_devices": 2, "round_timeout_s": ROUND_TIMEOUT_S},
        replicas=replicated,
    )
    devices = sorted(fleet.files.agent_configs)
    workers = [WORKER] if replicated else []
    loop = ChaosLoop(fleet, broker, recorder, victim=devices[-1])
    repeats = int(os.environ.get("FEDGE_CHAOS_REPEATS", "3"))
    if replicated:
        short = [Fault("worker", p) for p in PHASES]
        faults = schedule(repeats, targets=("worker", "aggregator")) if long else short
    else:
        faults = schedule(repeats) if long else short_schedule()
    report = ChaosReport(DEVICES, ROUND_TIMEOUT_S)
    try:
        for worker in workers:
            fleet.start_worker(worker)
        for device in devices:
            fleet.start_agent(device)
            wait_device_online(recorder, fleet, device)
        fleet.start_aggregator()
        loop.run(faults, DEVICES, report)
        fleet.signal("aggregator", signal.SIGTERM)
        assert fleet.wait_exit("aggregator", 30) == 0, fleet.log("aggregator")[-3000:]
    finally:
        fleet.stop_all()
        report.note_outbox_drops(fleet, recorder, devices)
        print(report.table())
        if long:
            name = "chaos-replicas.json" if replicated else "chaos.json"
            write_report(report, REPO / "bench" / "results" / name)
    assert len(report.results) == len(faults)
    problems = check_invariants(fleet, recorder, loop, devices, workers=workers)
    assert problems == [], "\n".join(problems)
    if replicated:  # the worker did take its share between the kills: the leader counted its partials
        assert "of worker-1:" in fleet.log("aggregator")


def test_chaos_short_loop_every_phase_once(
    tmp_path: Path, mosquitto: MosquittoBroker, recorder: TrafficRecorder, har_model_dir: Path
) -> None:
    _run(tmp_path, mosquitto, recorder, har_model_dir, long=False)


@pytest.mark.chaos
@pytest.mark.skipif(os.environ.get("FEDGE_CHAOS") != "1", reason="the long chaos loop: make chaos")
def test_chaos_long_loop_every_target_at_every_phase(
    tmp_path: Path, mosquitto: MosquittoBroker, recorder: TrafficRecorder, har_model_dir: Path
) -> None:
    _run(tmp_path, mosquitto, recorder, har_model_dir, long=True)


def test_chaos_short_loop_a_worker_killed_at_every_phase(
    tmp_path: Path, mosquitto: MosquittoBroker, recorder: TrafficRecorder, har_model_dir: Path
) -> None:
    _run(tmp_path, mosquitto, recorder, har_model_dir, long=False, replicated=True)


@pytest.mark.chaos
@pytest.mark.skipif(os.environ.get("FEDGE_CHAOS") != "1", reason="the long chaos loop: make chaos")
def test_chaos_long_loop_leader_and_worker_at_every_phase(
    tmp_path: Path, mosquitto: MosquittoBroker, recorder: TrafficRecorder, har_model_dir: Path
) -> None:
    _run(tmp_path, mosquitto, recorder, har_model_dir, long=True, replicated=True)
