"""Two-tier aggregation on real brokers: two buildings under a campus, each tier its own Mosquitto.

Each building has its own broker (bridged to the campus broker by the lines
``fedge broker config --bridge-to`` writes), its own aggregator with ``[upstream]`` and two real
agents; the campus aggregator sees the buildings as its devices. Checked on what crossed the
campus broker and the aggregators' own records: every campus round aggregates both buildings'
contributions, no device's message and nothing of a building's own topic tree reaches the campus,
and a building cut off from the campus for longer than a round delays no one: the campus closes
that round at its deadline with the other building, refuses the stale contribution that drains
over the bridge once the link is back, and counts the building again in the next round.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fedge.lab.broker import BrokerSettings, MosquittoBroker, find_mosquitto, free_loopback_port
from fedge.lab.provision import FleetFiles, create_fleet
from fedge.protocol.sealing import key_to_text, read_header
from fedge.protocol.signing import signing_key_to_text
from fedge.protocol.topics import FleetTopics
from fedge.tools.broker_config import Bridge
from support.fleet_harness import latest_status
from support.mqtt_fixtures import TrafficRecorder
from support.source_tree import PYTHONPATH as SOURCE_PYTHONPATH

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
CAMPUS = "campus"
BUILDINGS = {"building-1": {"watch-01": 1, "watch-02": 2}, "building-2": {"watch-03": 3, "watch-04": 4}}
CAMPUS_ROUND_S = 12.0


class Site:
    """The brokers, fleets and processes of one two-tier deployment."""

    def __init__(self, root: Path, model_dir: Path, campus_rounds: int) -> None:
        exe = find_mosquitto()
        if exe is None:
            pytest.skip("mosquitto is not installed")
        self.root = root
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        # The campus broker listens once per building, so one building's link can be cut alone.
        self.links = {b: free_loopback_port() for b in BUILDINGS}
        listeners = tuple(f"listener {port} 127.0.0.1" for port in self.links.values())
        self.campus_broker = MosquittoBroker(
            BrokerSettings(data_dir=root / "campus-broker", extra_lines=listeners), executable=exe
        )
        self.campus_broker.start()
        self.campus: FleetFiles = create_fleet(
            root / "campus", CAMPUS, model_dir, self.campus_broker.url, dict.fromkeys(BUILDINGS, 1),
            rounds={"rounds": campus_rounds, "min_devices": 1, "round_timeout_s": CAMPUS_ROUND_S,
                    "weighting": "examples", "wait_for_devices_s": 0.0, "server_learning_rate": 2.0},
        )  # fmt: skip
        self.brokers: dict[str, MosquittoBroker] = {}
        self.fleets: dict[str, FleetFiles] = {}
        for building, devices in BUILDINGS.items():
            bridge = Bridge(f"127.0.0.1:{self.links[building]}", CAMPUS, building)
            broker = MosquittoBroker(
                BrokerSettings(data_dir=root / f"{building}-broker", extra_lines=tuple(bridge.lines())),
                executable=exe,
            )
            broker.start()
            self.brokers[building] = broker
            fleet = create_fleet(
                root / building, building, model_dir, broker.url, devices,
                rounds={"rounds": 1000, "min_devices": 2, "round_timeout_s": 60.0,
                        "wait_for_devices_s": 30.0},
            )  # fmt: skip
            key_file = self.campus.root / "keys" / f"{building}.box"
            upstream = (
                "\n[upstream]\nenabled = true\n"
                f'campus_fleet = "{CAMPUS}"\nbuilding_id = "{building}"\n'
                f'campus_verify_keys = ["{signing_key_to_text(self.campus.signing_key.verify_key)}"]\n'
                f'campus_public_key = "{key_to_text(self.campus.box_key.public_key)}"\n'
                f'key_file = "{key_file}"\nmargin_s = 3.0\n'
            )
            with fleet.aggregator_config.open("a") as f:
                f.write(upstream)
            self.fleets[building] = fleet

    def spawn(self, name: str, args: list[str]) -> None:
        log = (self.root / f"{name}.log").open("ab")
        env = {"PYTHONPATH": SOURCE_PYTHONPATH, "PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "2"}
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "fedge.cli", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
        log.close()

    def start(self) -> None:
        for building, fleet in self.fleets.items():
            for device, config in fleet.agent_configs.items():
                self.spawn(device, ["agent", "run", "--config", str(config)])
            self.spawn(building, ["aggregator", "run", "--config", str(fleet.aggregator_config)])
        self.spawn("campus", ["aggregator", "run", "--config", str(self.campus.aggregator_config)])

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        for broker in [*self.brokers.values(), self.campus_broker]:
            broker.stop()

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float) -> None:
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            if check():
                return
            time.sleep(0.2)
        logs = "\n".join(f"--- {n}\n{self.log(n)[-2000:]}" for n in ("campus", *BUILDINGS))
        raise AssertionError(f"timed out waiting for {what}\n{logs}")


@pytest.fixture()
def site(tmp_path: Path, har_model_dir: Path, request: pytest.FixtureRequest) -> Iterator[Site]:
    s = Site(tmp_path, har_model_dir, getattr(request, "param", 3))
    try:
        yield s
    finally:
        s.stop()


def campus_status(site: Site, recorder: TrafficRecorder) -> dict[str, Any]:
    return latest_status(recorder.messages, FleetTopics(CAMPUS).aggregator_status)


def train_records(status: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in status["history"] if r["phase"] == "train"]


def test_two_buildings_under_a_campus_every_round_both_and_no_device_update_reaches_the_campus(
    site: Site,
) -> None:
    with TrafficRecorder.for_broker(site.campus_broker) as recorder:
        site.start()
        site.wait_for(
            "3 campus rounds", lambda: campus_status(site, recorder).get("completed_rounds") == 3, 240
        )
        status = campus_status(site, recorder)
        site.wait_for(
            "the buildings' final manifests",
            lambda: all("campus manifest v5: final" in site.log(b) for b in BUILDINGS),
            30,
        )
    records = train_records(status)
    assert [r["outcome"] for r in records] == ["aggregated"] * 3
    assert [r["reported"] for r in records] == [2, 2, 2]
    assert status["rejected_total"] == {}
    # The campus broker saw the buildings' sealed contributions, and nothing of any device.
    updates = [m for m in recorder.messages if m.topic.startswith(f"fedge/v1/{CAMPUS}/update/")]
    senders = {read_header(m.payload)[0].device_id for m in updates if m.payload}
    assert senders == set(BUILDINGS)
    assert not [m.topic for m in recorder.messages if m.topic.startswith(("fedge/v1/building-", "edgex/"))]
    devices = {d for ds in BUILDINGS.values() for d in ds}
    assert not [m.topic for m in recorder.messages if any(d in m.topic for d in devices)]
    for building in BUILDINGS:
        log = site.log(building)
        assert log.count("sent the campus our update") == 3 and "sent the campus our moments" in log
        assert "Traceback" not in log


@pytest.mark.parametrize("site", [4], indirect=True)
def test_a_building_cut_off_longer_than_a_round_delays_no_one_and_its_stale_contribution_is_refused(
    site: Site,
) -> None:
    if shutil.which("iptables") is None:
        pytest.skip("iptables is not installed (scripts/system-deps.sh)")
    port = site.links["building-2"]
    rules = [["INPUT", "-p", "tcp", "--dport", str(port), "-j", "DROP"],
             ["INPUT", "-p", "tcp", "--sport", str(port), "-j", "DROP"]]  # fmt: skip
    with TrafficRecorder.for_broker(site.campus_broker) as recorder:
        site.start()
        site.wait_for(
            "campus round 1", lambda: campus_status(site, recorder).get("completed_rounds") == 1, 240
        )
        cut_round = campus_status(site, recorder)["round_id"]
        for rule in rules:
            subprocess.run(["iptables", "-I", *rule], check=True)
        try:
            cut_at = time.monotonic()
            site.wait_for(
                "campus round 2", lambda: campus_status(site, recorder).get("completed_rounds") == 2, 60
            )
            round_2_s = time.monotonic() - cut_at
        finally:
            for rule in rules:
                subprocess.run(["iptables", "-D", *rule], check=False)
        site.wait_for(
            "campus round 4", lambda: campus_status(site, recorder).get("completed_rounds") == 4, 120
        )
        status = campus_status(site, recorder)
    records = {r["round_id"]: r for r in train_records(status)}
    cut = records[cut_round]
    assert (cut["outcome"], cut["reported"]) == ("aggregated", 1)  # building-1 alone, at the deadline
    assert round_2_s < CAMPUS_ROUND_S + 10  # nobody waited for the cut-off building past the deadline
    last = train_records(status)[-1]
    assert last["reported"] == 2, json.dumps(train_records(status))  # building-2 is back
    # What building-2 sent for the cut round drained over the bridge later and was refused there.
    refused = sum(status["rejected_total"].values())
    assert refused >= 1 and set(status["rejected_total"]) <= {"wrong_round", "late", "not_selected"}, status[
        "rejected_total"
    ]
