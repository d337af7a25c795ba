"""A chunked update on a slow link, cut mid-way: real Mosquitto, the aggregator and two agents as
processes, one of them behind a 16 kbit/s uplink (tests/support/netns.py) with ``chunk_bytes``
4 KiB on both sides, so its 22 KB update travels in 6 sealed pieces of about 2 s each.

While the pieces are on the wire the link is cut until the agent notices (MQTT keepalive) and
then healed: the agent reconnects, only the pieces the broker had not acknowledged go again, the
aggregator puts the update together with what it already had, and the round counts it once.

Needs root, iproute2 and iptables (skipped with the reason otherwise; make test runs as root).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedge.protocol.chunks import CHUNK_KIND
from fedge.protocol.sealing import read_header
from support.fleet_harness import Fleet, latest_status, wait_device_online
from support.mqtt_fixtures import TrafficRecorder
from support.netns import DeviceLink, broker_on, netns_unavailable

pytestmark = pytest.mark.slow

WAIT_S = 120.0
PIECE = 4096
PIECES_RE = re.compile(r"update for round (\S+) is (\d+) bytes: (\d+) sealed pieces")
SEALED_RE = re.compile(r"update for round (\S+) sealed \(\d+ bytes, counter \d+, message (\d+)\)")
ACKED_RE = re.compile(r"message (\d+) acknowledged by the broker")


@pytest.fixture()
def link() -> Iterator[DeviceLink]:
    why = netns_unavailable()
    if why is not None:
        pytest.skip(why)
    with DeviceLink(1) as device_link:
        yield device_link


def _wait(what: str, check: object, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.01)


def test_a_chunked_update_cut_mid_way_on_a_slow_link_resumes_and_counts_once(
    tmp_path: Path, link: DeviceLink, har_model_dir: Path
) -> None:
    link.rate_limit(16, downlink=False)
    with (
        broker_on(tmp_path, [link]) as broker,
        TrafficRecorder.for_broker(broker) as recorder,
    ):
        fleet = Fleet(
            tmp_path / "fleet",
            broker.url,
            har_model_dir,
            2,
            {"rounds": 1, "min_devices": 2, "round_timeout_s": 240.0},
        )
        fleet.aggregator_env["FEDGE_AGGREGATOR__AGGREGATOR__CHUNK_BYTES"] = str(PIECE)
        slow_env = {
            "FEDGE_AGENT__AGENT__CHUNK_BYTES": str(PIECE),
            "FEDGE_AGENT__MQTT__BROKER": f"mqtt://{link.host_ip}:{broker.port}",
            "FEDGE_AGENT__MQTT__KEEPALIVE": "5",  # a cut link is noticed in seconds
        }
        try:
            fleet.start_agent("watch-01", {"FEDGE_AGENT__AGENT__CHUNK_BYTES": str(PIECE)})
            fleet.start_agent("watch-02", slow_env, prefix=link.prefix)
            for device in ("watch-01", "watch-02"):
                wait_device_online(recorder, fleet, device, WAIT_S)
            fleet.start_aggregator()

            # watch-02's train update: its pieces and their outbox ids.
            def pieces() -> tuple[str, int, list[int]] | None:
                log = fleet.log("watch-02")
                split, sealed = PIECES_RE.findall(log), SEALED_RE.findall(log)
                train = [s for s in sealed if s[0].startswith("r")]
                if not split or not train:
                    return None
                round_id, _, count = split[-1]
                last = int(train[-1][1])
                return round_id, int(count), list(range(last - int(count) + 1, last + 1))

            _wait("watch-02 sealed its update in pieces", lambda: pieces() is not None)
            found = pieces()
            assert found is not None
            round_id, count, ids = found
            assert count >= 5

            def acked() -> set[int]:
                return {int(m) for m in ACKED_RE.findall(fleet.log("watch-02"))} & set(ids)

            _wait("a first piece acknowledged", lambda: len(acked()) >= 1)
            link.partition()
            cut_at = acked()
            assert len(cut_at) < count, "the whole update crossed before the cut: slow the link down"
            disconnects = fleet.log("watch-02").count("disconnected from the broker")
            _wait(
                "watch-02 noticed the cut",
                lambda: fleet.log("watch-02").count("disconnected from the broker") > disconnects,
            )
            link.heal()
            assert fleet.wait_exit("aggregator", 300) == 0, fleet.log("aggregator")[-3000:]
        finally:
            fleet.stop_all()

    status = latest_status(recorder.messages, fleet.topics.aggregator_status)
    assert status["completed_rounds"] == 1 and status["rejected_total"] == {}, status
    train = [r for r in status["history"] if r["round_id"] == round_id]
    assert train and train[0]["reported"] == 2
    assert not [r for r in status["messages_dropped"] if r.startswith("chunk_") and r != "chunk_duplicate"]
    # What crossed the broker from watch-02 in that round: every piece, and fewer copies than
    # sending the whole update again would take (only the unacknowledged ones went again).
    sent = [
        read_header(m.payload)[0]
        for m in recorder.matching(fleet.topics.update("watch-02"))
        if read_header(m.payload)[0].round_id == round_id
    ]
    assert {h.kind for h in sent} == {CHUNK_KIND}
    assert count <= len(sent) <= 2 * count - len(cut_at) < 2 * count
    assert "Traceback" not in fleet.log("watch-02")
