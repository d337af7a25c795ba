"""Issue 16: a state directory that is full or read-only, on the device and on the aggregator.

Real parts throughout: Mosquitto, the agent and aggregator processes, and a real file system
for the state directory: a small tmpfs mounted there (so the tests need root, and skip without
it), filled up with a filler file to make it full and remounted read-only to make it read-only.

What must hold: the failure is one log line naming the directory and the fix (then only
counted), never a traceback or an exit; nothing is published that was not stored first (the
aggregator publishes no manifest it could not checkpoint); nothing on disk is corrupted; and
when space returns (or the disk is writable again) the service goes on by itself, no restart.
A state directory that is read-only or full at start is one ``fedge: error:`` line and exit 78.

An agent's state directory cannot be remounted read-only while the agent runs (the kernel
refuses with EBUSY: the agent holds its SQLite files open for writing), so the read-only case
mid-run is the aggregator's here; the agent's classification of a read-only SQLite file is in
tests/shell/test_storage_faults.py.
"""

from __future__ import annotations

import itertools
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedge.agent.device_state import DeviceStateStore
from fedge.agent.outbox import Outbox
from fedge.aggregator.checkpoint import load_checkpoint
from fedge.lab.broker import MosquittoBroker
from fedge.lab.provision import create_fleet
from support.cli import fedge
from support.fleet_harness import Fleet, latest_status, wait_device_online, wait_status
from support.mqtt_fixtures import TrafficRecorder
from support.tiny_fs import TinyFs

pytest_plugins = ("support.mqtt_fixtures", "support.tiny_fs")
pytestmark = pytest.mark.slow

EX_CONFIG = 78


@pytest.fixture()
def recorder(mosquitto: MosquittoBroker) -> Iterator[TrafficRecorder]:
    with TrafficRecorder.for_broker(mosquitto) as rec:
        yield rec


def error_lines(log: str, logger: str) -> list[str]:
    """The text of each ERROR line of ``logger`` (after the time and level)."""
    return re.findall(rf"^\S+ \S+ ERROR {re.escape(logger)}: (.*)$", log, re.M)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], message: str) -> None:
    assert proc.returncode == EX_CONFIG, proc.stderr
    assert proc.stderr.splitlines() == [f"fedge: error: {message}"], proc.stderr


RO_FIX = (
    "its file system is mounted read-only: remount it read-write (a volume mounted :ro or readOnly: true, "
    "or a file system the kernel made read-only after I/O errors, which needs fsck or new storage first), "
    "then start the {service}"
)
FULL_FIX = "its file system is full: free space there (or give it a bigger volume), then start the {service}"


# --- at start --------------------------------------------------------------------------------


def test_a_read_only_or_full_state_dir_at_start_is_one_line_naming_the_fix_and_exit_78(
    tmp_path: Path, tiny_fs: list[TinyFs], har_model_dir: Path
) -> None:
    files = create_fleet(
        tmp_path, "disk", har_model_dir, "mqtt://127.0.0.1:1", {"watch-01": 1}, {"min_devices": 1}
    )
    agent_dir = tmp_path / "state" / "watch-01"
    aggregator_dir = tmp_path / "state" / "aggregator"
    agent_fs, aggregator_fs = TinyFs(agent_dir, "256k"), TinyFs(aggregator_dir, "256k")
    tiny_fs += [agent_fs, aggregator_fs]

    agent_fs.remount("ro")
    aggregator_fs.remount("ro")
    assert_one_line_error(
        fedge("agent", "run", "--config", str(files.agent_configs["watch-01"])),
        f"cannot write [agent] state_dir {agent_dir}: Read-only file system; "
        + RO_FIX.format(service="agent"),
    )
    assert_one_line_error(
        fedge("aggregator", "run", "--config", str(files.aggregator_config)),
        f"cannot write [aggregator] state_dir {aggregator_dir}: Read-only file system; "
        + RO_FIX.format(service="aggregator"),
    )

    agent_fs.remount("rw")
    agent_fs.fill()  # an empty file still fits (an inode): the probe writes a page
    assert_one_line_error(
        fedge("agent", "run", "--config", str(files.agent_configs["watch-01"])),
        f"cannot write [agent] state_dir {agent_dir}: No space left on device; "
        + FULL_FIX.format(service="agent"),
    )
    assert sorted(p.name for p in agent_dir.iterdir()) == ["filler"]  # no probe left behind


# --- the device ------------------------------------------------------------------------------


def test_a_device_whose_state_dir_fills_up_says_so_once_counts_the_lost_rounds_and_recovers(
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    recorder: TrafficRecorder,
    har_model_dir: Path,
    tiny_fs: list[TinyFs],
) -> None:
    fleet = Fleet(
        tmp_path / "fleet",
        mosquitto.url,
        har_model_dir,
        2,
        {"rounds": 7, "min_devices": 1, "round_timeout_s": 3.0},
    )
    state_dir = fleet.root / "state" / "watch-01"
    fs = TinyFs(state_dir, "16m")
    tiny_fs.append(fs)
    device_topic = fleet.topics.status("watch-01")
    try:
        for device in fleet.files.agent_configs:
            fleet.start_agent(device)
            wait_device_online(recorder, fleet, device)
        fleet.start_aggregator()
        wait_status(recorder, fleet, lambda s: s.get("completed_rounds", 0) >= 1, 60, "round 1")
        fs.fill()
        recorder.wait_for(
            lambda ms: (
                latest_status(ms, device_topic).get("messages_dropped", {}).get("state_dir_full", 0) >= 1
            ),
            60,
            "a round watch-01 could not store, counted",
        )
        lost = latest_status(recorder.messages, device_topic)
        assert lost["last_error"] is not None and " is full (" in lost["last_error"]
        assert fleet.procs["watch-01"].poll() is None  # still running
        fs.free()
        freed_at = latest_status(recorder.messages, fleet.topics.aggregator_status)["completed_rounds"]
        wait_status(
            recorder,
            fleet,
            lambda s: any(
                r["round_number"] > freed_at + 1 and r["reported"] == 2 for r in s.get("history", [])
            ),
            60,
            "a round with watch-01's update again",
        )
        assert fleet.wait_exit("aggregator", 60) == 0, fleet.log("aggregator")
        final_version = latest_status(recorder.messages, fleet.topics.aggregator_status)["version"]
        recorder.wait_for(
            lambda ms: latest_status(ms, device_topic).get("model_version") == final_version,
            30,
            "watch-01 on the final model",
        )
        assert fleet.procs["watch-01"].poll() is None  # never restarted
    finally:
        fleet.stop_all()

    log = fleet.log("watch-01")
    assert "Traceback" not in log, log
    # One line for the whole episode, naming the directory, the file that failed and the fix.
    fix = (
        "free space on its file system (or give it a bigger volume). The agent keeps running, retries "
        "every 2 s and goes on by itself once it can write (no restart needed); meanwhile the round in "
        "hand waits in memory until the round closes, and what is lost is counted (messages_dropped: "
        "state_dir_full, state_dir_read_only in the device status)"
    )
    failed = {
        f"[agent] state_dir {state_dir} is full (cannot write {what}: No space left on device): {fix}"
        for what in (f"device state {state_dir / 'state.json'}", f"outbox {state_dir / 'outbox.sqlite'}")
    }
    errors = error_lines(log, "fedge.agent")
    episode = [line for line in errors if line.startswith("[agent] state_dir")]
    assert len(episode) == 1 and episode[0] in failed, errors
    # The lost round is a counted drop, whose first one is logged with what to do.
    assert [line for line in errors if line.startswith("dropped a message")] == [
        line for line in errors if "(state_dir_full)" in line
    ]
    assert (
        len(re.findall(r"\(state_dir_full\): .* could not be stored before a newer manifest closed", log))
        == 1
    )
    assert re.findall(
        r"INFO fedge\.agent: \[agent\] state_dir (\S+) can be written again \(\d+ write", log
    ) == [str(state_dir)]
    final = latest_status(recorder.messages, device_topic)
    assert final["last_error"] is None
    assert final["messages_dropped"]["state_dir_full"] >= 1
    # Nothing corrupted: the state and the outbox open (the outbox's integrity check runs on
    # open), the state is on the final model, and every update left the outbox.
    state = DeviceStateStore(state_dir / "state.json").load()
    assert state.manifest_version == final_version
    with Outbox(state_dir / "outbox.sqlite") as outbox:
        stats = outbox.stats()
    assert (stats.pending, stats.dropped_total) == (0, 0)
    assert 0 < stats.acknowledged_total <= state.update_counter  # a counter is never used twice
    assert sorted(p.name for p in state_dir.iterdir() if p.name.endswith(".tmp")) == []


# --- the aggregator --------------------------------------------------------------------------


def test_the_aggregator_publishes_nothing_it_could_not_checkpoint_and_goes_on_when_it_can(
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    recorder: TrafficRecorder,
    har_model_dir: Path,
    tiny_fs: list[TinyFs],
) -> None:
    fleet = Fleet(
        tmp_path / "fleet",
        mosquitto.url,
        har_model_dir,
        2,
        {"rounds": 4, "min_devices": 1, "round_timeout_s": 3.0},
    )
    state_dir = fleet.root / "state" / "aggregator"
    fs = TinyFs(state_dir, "2m")
    tiny_fs.append(fs)

    def status() -> dict[str, object]:
        return latest_status(recorder.messages, fleet.topics.aggregator_status)

    def held_back(fault: str, version: int) -> None:
        """While the checkpoint fails: counted, said in the status, and no newer manifest."""
        wait_status(
            recorder,
            fleet,
            lambda s: s.get("state_dir", {}).get("failed_writes", {}).get(fault, 0) >= 2,
            30,
            f"two failed checkpoint writes ({fault})",
        )
        assert fleet.procs["aggregator"].poll() is None
        assert fleet.manifests(recorder)[-1].version == version
        state = status()["state_dir"]
        assert isinstance(state, dict) and state["problem"] in error_lines(
            fleet.log("aggregator"), "fedge.aggregator"
        )

    try:
        for device in fleet.files.agent_configs:
            fleet.start_agent(device)
            wait_device_online(recorder, fleet, device)
        fleet.signal("watch-02", signal.SIGSTOP)  # selected and silent: each round lasts to its deadline
        fleet.start_aggregator()
        first = wait_status(
            recorder, fleet, lambda s: s.get("phase") == "train", 60, "the first training round"
        )
        fs.fill()  # the round closes at its deadline: its checkpoint does not fit
        held_back("full", first["version"])
        fs.free()
        wait_status(recorder, fleet, lambda s: s.get("version") == first["version"] + 2, 30, "rounds again")
        fs.remount("ro")
        held_back("read_only", first["version"] + 2)
        fs.remount("rw")
        assert fleet.wait_exit("aggregator", 60) == 0, fleet.log("aggregator")
    finally:
        fleet.stop_all()

    log = fleet.log("aggregator")
    assert "Traceback" not in log, log
    checkpoint = state_dir / "checkpoint.bin"
    meanwhile = (
        "The aggregator keeps running, retries every 2 s and goes on by itself once it can write (no restart "
        "needed); meanwhile it publishes no new round, whose version a restart could reuse (state_dir in "
        "aggregator/status)"
    )
    expected = [
        f"[aggregator] state_dir {state_dir} is full (cannot write checkpoint {checkpoint}: No space left on "
        f"device): free space on its file system (or give it a bigger volume). {meanwhile}",
        f"[aggregator] state_dir {state_dir} is read-only (cannot write checkpoint {checkpoint}: Read-only "
        "file system): remount it read-write (a file system the kernel made read-only after I/O errors needs "
        f"fsck or new storage first). {meanwhile}",
        # The heartbeat is in the state directory too: said once as well, whichever comes first.
        f"cannot touch the heartbeat file {state_dir / 'heartbeat'}: [Errno 30] Read-only file system: "
        f"'{state_dir / 'heartbeat'}'",
    ]
    assert sorted(error_lines(log, "fedge.aggregator")) == sorted(expected)
    assert (
        len(re.findall(r"INFO fedge\.aggregator: \[aggregator\] state_dir \S+ can be written again", log))
        == 2
    )
    final = status()
    assert final["state"] == "done" and final["completed_rounds"] == 4
    state = final["state_dir"]
    assert isinstance(state, dict) and state["problem"] is None
    assert state["failed_writes"]["full"] >= 2 and state["failed_writes"]["read_only"] >= 2
    # Every version published once, in order, each the parent of the next; the checkpoint on
    # disk is the last one published (a restart resumes there, never behind what devices have).
    manifests = fleet.manifests(recorder)
    assert [m.version for m in manifests] == list(range(1, manifests[-1].version + 1))
    assert manifests[-1].phase == "final"
    assert all(b.parent_sha256 == a.sha256() for a, b in itertools.pairwise(manifests))
    saved = load_checkpoint(checkpoint, 10**8)
    assert saved is not None and not saved.recovered_from_previous
    assert (saved.model_version, saved.round_number) == (manifests[-1].version, 4)
    assert saved.parent_hash == manifests[-1].sha256()
    # (rollout/: the rollout gate's state and promoted weights, docs/rollout.md)
    assert sorted(p.name for p in state_dir.iterdir()) == [
        "checkpoint.bin",
        "checkpoint.prev",
        "heartbeat",
        "rollout",
    ]
    assert not [
        p.name for p in (state_dir / "rollout").iterdir() if p.name.startswith(".")
    ]  # no temp file left
