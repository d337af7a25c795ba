"""One message must never end a service: a device's retained status bomb, through the real,
generated TLS broker configuration, against a real ``fedge aggregator run``.

A device may write its own retained ``status/{device}``. Two compromised devices do, before the
aggregator starts: 100 kB of ``[`` (over the aggregator's status bound) and 60 kB of ``[``
(under it, but nested 60,000 deep: ``json.loads`` raises RecursionError). Being retained, the
broker hands both to every aggregator that subscribes, at every restart. The aggregator must
count them by reason in its retained status, complete its rounds with the fleet's real agents,
exit 0, and do it again when restarted against the same retained messages.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from support.fleet_harness import Fleet, latest_status
from support.mqtt_fixtures import TrafficRecorder
from support.secure_fleet import SecureFleet

pytestmark = [pytest.mark.slow, pytest.mark.adversarial]

DEVICES = ("watch-01", "watch-02")
# Deployment defaults, except how many rounds and how long to wait for the devices to start.
ROUNDS: dict[str, object] = {"rounds": 2, "wait_for_devices_s": 120.0}
TOO_LARGE = b"[" * 100_000  # over the aggregator's 64 KiB status bound: dropped at the callback
TOO_DEEP = b"[" * 60_000  # under it, 60,000 levels deep: refused before json.loads recurses
BOMBS = {"status_too_large": 1, "status_too_deep": 1}


def _plant_bombs(sf: SecureFleet) -> None:
    """Each device, as itself (its own credentials, its own ACL'd topic), retains its bomb."""
    t = sf.fleet.topics
    for device, bomb in zip(DEVICES, (TOO_LARGE, TOO_DEEP), strict=True):
        reason = sf.publish(device, t.status(device), bomb, retain=True)
        assert not reason.is_failure, f"the broker refused {device}'s status: {reason}"


def _wait_aggregator_status(
    rec: TrafficRecorder,
    fleet: Fleet,
    proc: subprocess.Popen[bytes],
    predicate: Callable[[dict[str, Any]], bool],
    timeout: float,
    what: str,
) -> dict[str, Any]:
    """Waits (bounded) until the aggregator's retained status satisfies ``predicate``; fails at
    once, with its log, if the aggregator process exits first."""
    topic = fleet.topics.aggregator_status
    rec.wait_for(lambda ms: predicate(latest_status(ms, topic)) or proc.poll() is not None, timeout, what)
    if proc.poll() is not None and not predicate(latest_status(rec.messages, topic)):
        raise AssertionError(
            f"the aggregator exited with {proc.returncode} before {what}; log:\n"
            f"{fleet.log('aggregator')[-3000:]}"
        )
    return latest_status(rec.messages, topic)


def _run_rounds(
    sf: SecureFleet, rec: TrafficRecorder, env: dict[str, str] | None, rounds: int
) -> dict[str, Any]:
    """Starts the aggregator against the planted bombs; once it has counted them, starts the
    agents (whose statuses then replace the bombs); returns its final status after exit 0."""
    fleet = sf.fleet
    rec.clear()
    proc = fleet.spawn(
        "aggregator", ["aggregator", "run", "--config", str(fleet.files.aggregator_config)], env
    )
    _wait_aggregator_status(
        rec,
        fleet,
        proc,
        lambda s: set(s.get("messages_dropped") or {}) == set(BOMBS),
        60,
        "both status bombs counted",
    )
    for device in DEVICES:
        fleet.start_agent(device)
    assert fleet.wait_exit("aggregator", 300) == 0, fleet.log("aggregator")[-3000:]
    status = latest_status(rec.messages, fleet.topics.aggregator_status)
    assert status["state"] == "done" and status["completed_rounds"] == rounds, status
    return status


def _stop_agents(sf: SecureFleet) -> None:
    for device in DEVICES:
        sf.fleet.procs[device].terminate()
        assert sf.fleet.wait_exit(device, 30) == 0, sf.fleet.log(device)[-3000:]


def test_a_retained_status_bomb_neither_stops_the_aggregator_nor_its_restart(
    tmp_path: Path, har_model_dir: Path
) -> None:
    with SecureFleet(tmp_path, har_model_dir, len(DEVICES), ROUNDS) as sf, sf.recorder("monitor") as rec:
        _plant_bombs(sf)
        first = _run_rounds(sf, rec, None, rounds=2)
        assert first["messages_dropped"] == BOMBS  # counted once each, nothing else dropped
        assert first["rejected_total"] == {}  # the honest agents' updates were all accepted
        assert sorted(first["online_devices"]) == list(DEVICES)

        # The bombs again (the agents' statuses had replaced them), then a restart that resumes
        # from the checkpoint and runs one more round with the same agents.
        _stop_agents(sf)
        _plant_bombs(sf)
        second = _run_rounds(sf, rec, {"FEDGE_AGGREGATOR__ROUNDS__ROUNDS": "3"}, rounds=3)
        # Each bomb reaches it twice now: queued in its persistent session (published while it
        # was away) and again as the retained message when it subscribes.
        assert second["messages_dropped"] == {reason: 2 for reason in BOMBS}
        assert second["rejected_total"] == {}
        # Resumed, not restarted: its first manifest is round 3, under a newer version.
        resumed = sf.fleet.manifests(rec)[0]
        assert (resumed.phase, resumed.round_number) == ("train", 3)
        assert resumed.version > first["version"]
        log = sf.fleet.log("aggregator")
        assert "resuming from checkpoint" in log
        assert log.count("status_too_deep") == 2  # logged once per run, not once per message
