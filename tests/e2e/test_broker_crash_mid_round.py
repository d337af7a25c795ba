"""A broker crash (kill -9, before its first autosave) in the middle of a round, with real
processes: the broker comes back without its retained messages and sessions. The aggregator
publishes its manifest and model again, the device whose update was already counted sends it
again (it cannot know whether the broker lost it), the aggregator refuses the copy as a
duplicate, and the round completes counting each device once (docs/faults.md)."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fedge.lab.broker import MosquittoBroker
from support.chaos import AggregatorLedger
from support.fleet_harness import Fleet, latest_status, wait_device_online, wait_status
from support.mqtt_fixtures import TrafficRecorder

pytest_plugins = ("support.mqtt_fixtures",)
pytestmark = pytest.mark.slow

WAIT_S = 60.0


def wait_log(fleet: Fleet, name: str, predicate: Callable[[str], bool], what: str) -> str:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        text = fleet.log(name)
        if predicate(text):
            return text
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; {name}'s log ends:\n{fleet.log(name)[-3000:]}")


def test_an_update_the_crashed_broker_had_acknowledged_is_sent_again_and_counted_once(
    tmp_path: Path, mosquitto: MosquittoBroker, har_model_dir: Path
) -> None:
    with TrafficRecorder.for_broker(mosquitto) as recorder:
        fleet = Fleet(
            tmp_path / "fleet",
            mosquitto.url,
            har_model_dir,
            2,
            {"rounds": 1, "min_devices": 2, "round_timeout_s": 90},
        )
        try:
            for device in ("watch-01", "watch-02"):
                fleet.start_agent(device)
                wait_device_online(recorder, fleet, device)
            fleet.start_aggregator()
            # The train round opens; watch-02 is frozen before it can train (its first training
            # loads LiteRT, which takes far longer than this), so the round stays open.
            recorder.wait_for(
                lambda ms: any(m.phase == "train" for m in fleet.manifests(recorder)), WAIT_S, "a train round"
            )
            fleet.signal("watch-02", signal.SIGSTOP)
            train = next(m for m in fleet.manifests(recorder) if m.phase == "train")
            wait_log(fleet, "aggregator", lambda t: "accepted update from watch-01" in t, "watch-01's update")

            mosquitto.kill()  # a crash: nothing was saved, retained messages and sessions are gone
            mosquitto.start()

            agent_log = wait_log(
                fleet,
                "watch-01",
                lambda t: f"reconnected in round {train.round_id}: sent its update again" in t,
                "watch-01 to send its update again",
            )
            aggregator_log = wait_log(
                fleet,
                "aggregator",
                lambda t: "rejected message from watch-01 on fedge/v1/e2e/update/watch-01: duplicate" in t,
                "the aggregator to refuse the copy",
            )
            assert "reconnected: published manifest" in aggregator_log
            fleet.signal("watch-02", signal.SIGCONT)
            status = wait_status(
                recorder,
                fleet,
                lambda s: any(r.get("round_id") == train.round_id for r in s.get("history", [])),
                WAIT_S,
                "the train round to close",
            )
            assert fleet.wait_exit("aggregator", WAIT_S) == 0, fleet.log("aggregator")[-3000:]
        finally:
            fleet.stop_all()

        record = next(r for r in status["history"] if r["round_id"] == train.round_id)
        samples = [
            latest_status(recorder.messages, fleet.topics.status(d))["samples"]
            for d in ("watch-01", "watch-02")
        ]
        assert (record["outcome"], record["reported"], record["examples"]) == ("aggregated", 2, sum(samples))
        ledger = AggregatorLedger.parse(fleet.log("aggregator"))
        assert sorted(ledger.accepted[train.round_id]) == ["watch-01", "watch-02"]  # each once
        assert agent_log.count(f"reconnected in round {train.round_id}") <= 2
        assert "Traceback" not in fleet.log("aggregator") + fleet.log("watch-01") + fleet.log("watch-02")
