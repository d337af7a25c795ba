"""Devices behind real, faulty network links (tests/support/netns.py: a network namespace and a
veth pair per device, faults set by the kernel), in a fleet of real processes and a real
Mosquitto listening on each link:

- a device on a 64 kbit/s link and one losing 20% of its packets each way (from its first
  connection on) keep taking part in every round;
- a device partitioned in the middle of sending its update, for longer than a round: the fleet
  goes on without it, the update waits in its socket and outbox, drains when the link heals,
  is refused as stale (never counted), and the device takes part again.

Needs root, iproute2 and iptables (skipped with the reason otherwise; make test runs as root).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from support.chaos import AggregatorLedger
from support.fleet_harness import Fleet, latest_status, wait_device_online, wait_status
from support.mqtt_fixtures import TrafficRecorder
from support.netns import DeviceLink, broker_on, netns_unavailable

pytestmark = pytest.mark.slow

WAIT_S = 90.0


@pytest.fixture(scope="module")
def netns_ok() -> None:
    why = netns_unavailable()
    if why is not None:
        pytest.skip(why)


def start_behind(fleet: Fleet, device: str, link: DeviceLink, port: int) -> None:
    fleet.start_agent(
        device,
        env_overrides={"FEDGE_AGENT__MQTT__BROKER": f"mqtt://{link.host_ip}:{port}"},
        prefix=link.prefix,
    )


def version_of(round_id: str) -> int:
    return int(round_id.rsplit("-v", 1)[1])


def history(recorder: TrafficRecorder, fleet: Fleet) -> list[dict[str, Any]]:
    return list(latest_status(recorder.messages, fleet.topics.aggregator_status).get("history", []))


@pytest.fixture()
def links(netns_ok: None) -> Iterator[list[DeviceLink]]:
    with ExitStack() as stack:
        yield [stack.enter_context(DeviceLink(i)) for i in (1, 2)]


def test_devices_on_a_64_kbit_link_and_a_20_percent_lossy_link_take_part_in_every_round(
    tmp_path: Path, links: list[DeviceLink], har_model_dir: Path
) -> None:
    slow, lossy = links
    slow.rate_limit(64)
    rounds = 2
    with broker_on(tmp_path, links) as broker, TrafficRecorder.for_broker(broker) as recorder:
        fleet = Fleet(
            tmp_path / "fleet",
            broker.url,
            har_model_dir,
            3,
            # The slow device fetches a 22 KB model and sends a 22 KB update each round: about
            # 6 s at 64 kbit/s; the deadline leaves it room.
            {"rounds": rounds, "min_devices": 3, "round_timeout_s": 30},
        )
        try:
            fleet.start_agent("watch-01")
            start_behind(fleet, "watch-02", slow, broker.port)
            # The loss is there from the start: the device's first connection goes through it too.
            lossy.loss(0.20)
            start_behind(fleet, "watch-03", lossy, broker.port)
            for device in ("watch-01", "watch-02", "watch-03"):
                wait_device_online(recorder, fleet, device, WAIT_S)
            fleet.start_aggregator()
            assert fleet.wait_exit("aggregator", 240) == 0, fleet.log("aggregator")[-3000:]
        finally:
            fleet.stop_all()
        trained = [r for r in history(recorder, fleet) if r.get("phase") == "train"]
        assert [(r["outcome"], r["reported"]) for r in trained] == [("aggregated", 3)] * rounds
        ledger = AggregatorLedger.parse(fleet.log("aggregator"))
        for r in trained:
            assert sorted(ledger.accepted[r["round_id"]]) == ["watch-01", "watch-02", "watch-03"]
        for device in ("watch-02", "watch-03"):
            assert "Traceback" not in fleet.log(device)


def test_a_device_partitioned_while_sending_is_left_out_then_its_stale_update_is_refused_and_it_rejoins(
    tmp_path: Path, links: list[DeviceLink], har_model_dir: Path
) -> None:
    link = links[0]
    with broker_on(tmp_path, links) as broker, TrafficRecorder.for_broker(broker) as recorder:
        fleet = Fleet(
            tmp_path / "fleet",
            broker.url,
            har_model_dir,
            3,
            {"rounds": 100_000, "min_devices": 2, "round_timeout_s": 4},
        )
        try:
            fleet.start_agent("watch-01")
            fleet.start_agent("watch-02")
            start_behind(fleet, "watch-03", link, broker.port)
            for device in ("watch-01", "watch-02", "watch-03"):
                wait_device_online(recorder, fleet, device, WAIT_S)
            fleet.start_aggregator()
            wait_status(
                recorder,
                fleet,
                lambda s: any(
                    r.get("phase") == "train" and r.get("reported") == 3 for r in s.get("history", [])
                ),
                WAIT_S,
                "a round with all three devices",
            )
            # A slow uplink keeps watch-03's next update on the wire for seconds; cut the link
            # as soon as it is sealed, so it is neither delivered nor acknowledged.
            sealed_before = fleet.log("watch-03").count(" sealed (")
            link.rate_limit(32, downlink=False)
            deadline = time.monotonic() + WAIT_S
            while fleet.log("watch-03").count(" sealed (") == sealed_before:
                assert time.monotonic() < deadline, fleet.log("watch-03")[-2000:]
                time.sleep(0.01)
            link.partition()
            line = [x for x in fleet.log("watch-03").splitlines() if " sealed (" in x][-1]
            cut_round = line.split("update for round ")[1].split(" ")[0]
            cut_version = version_of(cut_round)
            # Longer than a round: two more rounds close without watch-03.
            wait_status(
                recorder,
                fleet,
                lambda s: (
                    sum(1 for r in s.get("history", []) if version_of(r["round_id"]) > cut_version) >= 2
                ),
                WAIT_S,
                "two rounds after the partition",
            )
            link.heal()
            link.unlimit()
            # The update drains, is refused as stale, and watch-03 takes part again.
            deadline = time.monotonic() + WAIT_S
            while True:
                ledger = AggregatorLedger.parse(fleet.log("aggregator"))
                rejoined = [
                    r for r, ds in ledger.accepted.items() if version_of(r) > cut_version and "watch-03" in ds
                ]
                if rejoined and ledger.refused.get("watch-03"):
                    break
                assert time.monotonic() < deadline, fleet.log("aggregator")[-3000:]
                time.sleep(0.1)
            # Its backlog drains: the device says so on its status topic without waiting for the
            # next periodic status.
            recorder.wait_for(
                lambda ms: latest_status(ms, fleet.topics.status("watch-03")).get("outbox_pending") == 0,
                WAIT_S,
                "watch-03's outbox drained",
            )
            fleet.signal("aggregator", signal.SIGTERM)
            assert fleet.wait_exit("aggregator", 30) == 0, fleet.log("aggregator")[-3000:]
        finally:
            fleet.stop_all()
        assert "watch-03" not in ledger.accepted.get(cut_round, [])
        assert set(ledger.refused["watch-03"]) <= {"wrong_round", "no_open_round", "late"}, ledger.refused
        records = {r["round_id"]: r for r in history(recorder, fleet)}
        if cut_round in records:
            assert records[cut_round]["reported"] == len(ledger.accepted.get(cut_round, []))
        assert "Traceback" not in fleet.log("watch-03")
