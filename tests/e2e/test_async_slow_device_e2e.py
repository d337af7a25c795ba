"""Buffered asynchronous aggregation over a real broker: versions advance without the slow device.

Real Mosquitto, the aggregator and three agents as processes; watch-03 sits behind a 24 kbit/s
uplink (tests/support/netns.py), so each of its ~22 KB updates takes several seconds to cross,
while watch-01 and watch-02 answer each manifest at full speed. With ``aggregation = "async"``
and ``buffer_size = 2`` the aggregator publishes a new version from the two fast devices' updates
(a synchronous round would wait for all three selected devices), and watch-03's update, trained
from a version that is no longer the newest when it arrives, is folded in (weighted by its
staleness) rather than refused.

Nothing here is timed: the order of what crossed the broker (the recorder sees every message in
the order the broker routed it) shows that newer versions were published while watch-03's update
was on its way. Needs root, iproute2 and iptables (skipped with the reason otherwise).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedge.protocol.round_manifest import round_manifest_from_dict
from fedge.protocol.sealing import read_header
from fedge.protocol.signing import DocType, key_id, verify_document
from support.fleet_harness import Fleet, wait_device_online
from support.mqtt_fixtures import TrafficRecorder
from support.netns import DeviceLink, broker_on, netns_unavailable

pytestmark = pytest.mark.slow

WAIT_S = 120.0
#: The fast devices publish a version every ~0.1 s; watch-03's first update takes ~7.5 s to cross.
#: Enough rounds that it lands while rounds are still open, however fast this machine is.
ROUNDS = 300
FINAL_VERSION = ROUNDS + 2  # the moments round is v1, the train rounds v2..v(ROUNDS + 1)


@pytest.fixture()
def link() -> Iterator[DeviceLink]:
    why = netns_unavailable()
    if why is not None:
        pytest.skip(why)
    with DeviceLink(2) as device_link:
        yield device_link


def test_async_versions_advance_without_waiting_for_the_slow_device(
    tmp_path: Path, link: DeviceLink, har_model_dir: Path
) -> None:
    link.rate_limit(24, downlink=False)
    with (
        broker_on(tmp_path, [link]) as broker,
        TrafficRecorder.for_broker(broker) as recorder,
    ):
        fleet = Fleet(
            tmp_path / "fleet",
            broker.url,
            har_model_dir,
            3,
            {
                "rounds": ROUNDS,
                "min_devices": 2,
                "round_timeout_s": 240.0,
                "aggregation": "async",
                "buffer_size": 2,
                "max_staleness": ROUNDS,
            },
        )
        slow_env = {"FEDGE_AGENT__MQTT__BROKER": f"mqtt://{link.host_ip}:{broker.port}"}
        try:
            fleet.start_agent("watch-01")
            fleet.start_agent("watch-02")
            fleet.start_agent("watch-03", slow_env, prefix=link.prefix)
            for device in ("watch-01", "watch-02", "watch-03"):
                wait_device_online(recorder, fleet, device, WAIT_S)
            fleet.start_aggregator()
            assert fleet.wait_exit("aggregator", 600) == 0, fleet.log("aggregator")[-3000:]
        finally:
            fleet.stop_all()

    verify = fleet.files.signing_key.verify_key
    trusted = {key_id(verify): verify}
    newest = 0  # the newest manifest version published so far, in broker order
    slow: list[tuple[int, int]] = []  # watch-03's train updates: (trained from, newest at arrival)
    records: dict[str, dict[str, Any]] = {}
    for m in recorder.messages:
        if m.topic == fleet.topics.manifest and m.payload:
            doc, _ = verify_document(m.payload, DocType.ROUND_MANIFEST, trusted)
            manifest = round_manifest_from_dict(doc)
            if manifest.phase == "train":
                assert manifest.aggregation is not None
                assert (manifest.aggregation.buffer_size, manifest.aggregation.max_staleness) == (2, ROUNDS)
            newest = max(newest, manifest.version)
        elif m.topic == fleet.topics.update("watch-03") and m.payload:
            header, _ = read_header(m.payload)
            if header.kind == "update":
                slow.append((header.model_version, newest))
        elif m.topic == fleet.topics.aggregator_status and m.payload:
            for record in json.loads(m.payload).get("history", []):
                records[record["round_id"]] = record

    train = [r for r in records.values() if r["phase"] == "train"]
    assert len(train) == ROUNDS and all(r["outcome"] == "aggregated" for r in train), train
    # Versions were published from two updates while three devices were selected: no round
    # waited for the slow device.
    assert [r for r in train if r["reported"] == 2 and r["selected"] == 3], train
    # watch-03's updates arrived after newer versions were out, and were not refused for it.
    landed = [(v, newest_then) for v, newest_then in slow if newest_then < FINAL_VERSION]
    assert landed and any(trained_from < newest_then for trained_from, newest_then in landed), slow
    status = json.loads(
        next(
            m.payload
            for m in reversed(recorder.messages)
            if m.topic == fleet.topics.aggregator_status and m.payload
        )
    )
    # So each of them that landed while a round was open was folded in. (A fast device may see
    # ``duplicate``: one update per device per buffer, and it can send for two versions into one.)
    assert "rejected message from watch-03" not in fleet.log("aggregator")
    assert "accepted update from watch-03" in fleet.log("aggregator")
    for reason in ("stale", "late", "wrong_round", "wrong_version", "not_selected"):
        assert reason not in status["rejected_total"], status["rejected_total"]
    assert "Traceback" not in fleet.log("watch-03") + fleet.log("aggregator")
