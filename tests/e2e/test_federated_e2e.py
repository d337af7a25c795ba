"""Federated rounds end to end: real Mosquitto, real processes, real LiteRT and real NaCl.

Scenarios: full rounds with every update sealed (a subscriber on ``#`` sees only ciphertext),
an agent killed mid-round (the round completes with the quorum), a late agent catching up,
the aggregator SIGKILLed mid-round and restarted (no version regression, nothing counted
twice), and replayed updates (rejected, counted, aggregate unchanged).

Freezing an agent with SIGSTOP keeps its broker connection open but silences it: that is how
these tests hold a round open until its deadline without sleeping or racing.
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from nacl.public import PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from fedge.aggregator.checkpoint import load_checkpoint
from fedge.lab.broker import MosquittoBroker
from fedge.protocol.model_manifest import INITIAL_WEIGHTS_FILE
from fedge.protocol.sealing import SealError, open_sealed, read_header
from fedge.protocol.weights import weights_from_bytes
from support.fleet_harness import Fleet, latest_status, wait_device_online, wait_status
from support.mqtt_fixtures import RecordedMessage, TrafficRecorder

pytest_plugins = ("support.mqtt_fixtures",)
pytestmark = pytest.mark.slow


@pytest.fixture()
def recorder(mosquitto: MosquittoBroker) -> Iterator[TrafficRecorder]:
    with TrafficRecorder.for_broker(mosquitto) as rec:
        yield rec


def _fleet(tmp_path: Path, broker: MosquittoBroker, model_dir: Path, devices: int, **rounds: object) -> Fleet:
    return Fleet(tmp_path / "fleet", broker.url, model_dir, devices, rounds)


def _publish_raw(broker: MosquittoBroker, topic: str, payload: bytes) -> None:
    """What an attacker on the broker can do: publish any bytes on any topic."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def test_full_rounds_with_every_update_sealed(
    tmp_path: Path, mosquitto: MosquittoBroker, recorder: TrafficRecorder, har_model_dir: Path
) -> None:
    fleet = _fleet(tmp_path, mosquitto, har_model_dir, 3, rounds=2, min_devices=3, round_timeout_s=60.0)
    try:
        for device in fleet.files.agent_configs:
            fleet.start_agent(device)
        fleet.start_aggregator()
        assert fleet.wait_exit("aggregator", 120) == 0, fleet.log("aggregator")
        # Every device verifies and loads the final model (version 4: moments, 2 rounds, final).
        for device in fleet.files.agent_configs:
            topic = fleet.topics.status(device)
            recorder.wait_for(
                lambda ms, t=topic: latest_status(ms, t).get("model_version") == 4,
                30,
                f"{device} on the final model",
            )
    finally:
        fleet.stop_all()
    status = latest_status(recorder.messages, fleet.topics.aggregator_status)
    assert status["state"] == "done" and status["completed_rounds"] == 2
    assert status["rejected_total"] == {}
    manifests = fleet.manifests(recorder)
    assert [m.phase for m in manifests] == ["moments", "train", "train", "final"]
    assert [m.version for m in manifests] == [1, 2, 3, 4]
    assert all(b.parent_sha256 == a.sha256() for a, b in itertools.pairwise(manifests))

    updates = recorder.matching(fleet.topics.update_filter)
    distinct = {m.payload for m in updates}
    assert len(distinct) == 3 * 3  # moments + 2 updates from each of 3 devices
    aggregator_key = fleet.files.box_key
    for raw in distinct:
        header, ciphertext = read_header(raw)
        device_public = fleet.files.device_keys[header.device_id].public_key
        payload_header, body = open_sealed(header, ciphertext, aggregator_key, device_public)
        # The broker and anyone subscribed see no plaintext: neither the tensor bytes nor the
        # payload's JSON (example counts, losses, evaluation).
        assert len(body) >= 64 and body[:64] not in raw and body[-64:] not in raw
        assert b"train_loss" not in raw and b'"count"' not in raw and b"evaluation" not in raw
        # Nobody without the aggregator's private key opens it, not even with the device's key pair.
        with pytest.raises(SealError) as exc:
            open_sealed(header, ciphertext, PrivateKey.generate(), device_public)
        assert exc.value.reason == "decrypt_failed"
        other = next(k for d, k in fleet.files.device_keys.items() if d != header.device_id)
        with pytest.raises(SealError) as exc:
            open_sealed(header, ciphertext, aggregator_key, other.public_key)
        assert exc.value.reason == "decrypt_failed"
        assert payload_header  # it really was an update or moments payload

    checkpoint = load_checkpoint(fleet.root / "state" / "aggregator" / "checkpoint.bin", 10**8)
    assert checkpoint is not None
    assert checkpoint.round_number == 2 and checkpoint.model_version == 4
    initial = weights_from_bytes((har_model_dir / INITIAL_WEIGHTS_FILE).read_bytes(), checkpoint.weights.size)
    assert np.abs(checkpoint.weights - initial).max() > 1e-3


def test_agent_killed_mid_round_the_round_completes_with_the_quorum(
    tmp_path: Path, mosquitto: MosquittoBroker, recorder: TrafficRecorder, har_model_dir: Path
) -> None:
    fleet = _fleet(tmp_path, mosquitto, har_model_dir, 3, rounds=1, min_devices=2, round_timeout_s=4.0)
    try:
        for device in fleet.files.agent_configs:
            fleet.start_agent(device)
            wait_device_online(recorder, fleet, device)
        fleet.signal("watch-03", signal.SIGSTOP)  # connected, selected, and silent
        fleet.start_aggregator()
        wait_status(recorder, fleet, lambda s: s.get("phase") == "train", 60, "the first training round")
        fleet.kill("watch-03")  # dies in the middle of the round it was selected for
        assert fleet.wait_exit("aggregator", 60) == 0, fleet.log("aggregator")
    finally:
        fleet.stop_all()
    status = latest_status(recorder.messages, fleet.topics.aggregator_status)
    record = next(r for r in status["history"] if r["phase"] == "train")
    assert (record["outcome"], record["reported"], record["selected"]) == ("aggregated", 2, 3)
    assert status["completed_rounds"] == 1
    # Its Last Will told everyone it is gone.
    assert latest_status(recorder.messages, fleet.topics.status("watch-03"))["state"] == "offline"


def test_a_late_agent_catches_up_with_the_newest_model(
    tmp_path: Path, mosquitto: MosquittoBroker, recorder: TrafficRecorder, har_model_dir: Path
) -> None:
    fleet = _fleet(
        tmp_path,
        mosquitto,
        har_model_dir,
        3,
        rounds=5,
        min_devices=2,
        round_timeout_s=4.0,
        wait_for_devices_s=0.5,
    )
    try:
        fleet.start_agent("watch-01")
        fleet.start_agent("watch-02")
        fleet.start_aggregator()
        wait_status(recorder, fleet, lambda s: s.get("completed_rounds", 0) >= 1, 60, "round 1 done")
        fleet.start_agent("watch-03")  # offline until now: catches up from the retained manifest
        assert fleet.wait_exit("aggregator", 90) == 0, fleet.log("aggregator")
    finally:
        fleet.stop_all()
    checkpoint = load_checkpoint(fleet.root / "state" / "aggregator" / "checkpoint.bin", 10**8)
    assert checkpoint is not None
    history = [r for r in checkpoint.metadata["history"] if r["phase"] == "train"]
    assert history[0]["round_number"] == 1 and history[0]["reported"] == 2
    assert any(r["reported"] == 3 for r in history[1:]), history
    final_version = fleet.manifests(recorder)[-1].version
    assert latest_status(recorder.messages, fleet.topics.status("watch-03"))["model_version"] == final_version


def test_aggregator_killed_mid_round_resumes_without_regression_or_double_counting(
    tmp_path: Path, mosquitto: MosquittoBroker, recorder: TrafficRecorder, har_model_dir: Path
) -> None:
    fleet = _fleet(tmp_path, mosquitto, har_model_dir, 3, rounds=3, min_devices=2, round_timeout_s=5.0)
    try:
        for device in fleet.files.agent_configs:
            fleet.start_agent(device)
            wait_device_online(recorder, fleet, device)
        fleet.signal("watch-03", signal.SIGSTOP)  # every round now stays open until its deadline
        fleet.start_aggregator()
        before = wait_status(
            recorder,
            fleet,
            lambda s: s.get("completed_rounds") == 1 and len(s.get("reported", [])) == 2,
            60,
            "round 2 open with two updates counted",
        )
        fleet.kill("aggregator")  # SIGKILL with two accepted updates in memory
        fleet.start_aggregator()
        assert fleet.wait_exit("aggregator", 90) == 0, fleet.log("aggregator")
    finally:
        fleet.stop_all()
    manifests = fleet.manifests(recorder)
    versions = [m.version for m in manifests]
    assert versions == sorted(set(versions)), "a version was published twice or went back"
    assert min(v for v in versions if v > before["version"]) == before["version"] + 1
    checkpoint = load_checkpoint(fleet.root / "state" / "aggregator" / "checkpoint.bin", 10**8)
    assert checkpoint is not None and checkpoint.round_number == 3
    # Each round was aggregated exactly once, from two devices' updates: nothing counted twice.
    records = [r for r in checkpoint.metadata["history"] if r["phase"] == "train"]
    aggregated = [r["round_number"] for r in records if r["outcome"] == "aggregated"]
    assert aggregated == [1, 2, 3]
    samples = {
        d: latest_status(recorder.messages, fleet.topics.status(d))["samples"]
        for d in ("watch-01", "watch-02")
    }
    for r in records:
        assert (r["reported"], r["examples"]) == (2, sum(samples.values())), r


def test_replayed_updates_are_rejected_counted_and_change_nothing(
    tmp_path: Path, mosquitto: MosquittoBroker, recorder: TrafficRecorder, har_model_dir: Path
) -> None:
    fleet = _fleet(tmp_path, mosquitto, har_model_dir, 3, rounds=2, min_devices=2, round_timeout_s=6.0)
    topic = fleet.topics.update("watch-01")
    try:
        for device in fleet.files.agent_configs:
            fleet.start_agent(device)
            wait_device_online(recorder, fleet, device)
        fleet.signal("watch-03", signal.SIGSTOP)
        fleet.start_aggregator()
        wait_status(
            recorder,
            fleet,
            lambda s: s.get("phase") == "train" and "watch-01" in s.get("reported", []),
            60,
            "watch-01 reported in round 1",
        )
        round1 = next(
            m.payload for m in recorder.matching(topic) if read_header(m.payload)[0].kind == "update"
        )
        _publish_raw(mosquitto, topic, round1)  # the same update again, same round
        wait_status(recorder, fleet, lambda s: s["rejected_total"].get("duplicate") == 1, 20, "duplicate")
        wait_status(
            recorder,
            fleet,
            lambda s: s.get("completed_rounds") == 1 and s.get("phase") == "train",
            30,
            "round 2 open",
        )
        _publish_raw(mosquitto, topic, round1)  # round 1's update replayed into round 2
        wait_status(recorder, fleet, lambda s: s["rejected_total"].get("wrong_round") == 1, 20, "wrong_round")
        assert fleet.wait_exit("aggregator", 60) == 0, fleet.log("aggregator")
    finally:
        fleet.stop_all()
    status = latest_status(recorder.messages, fleet.topics.aggregator_status)
    assert status["rejected_total"] == {"duplicate": 1, "wrong_round": 1}
    samples = {
        d: latest_status(recorder.messages, fleet.topics.status(d))["samples"]
        for d in ("watch-01", "watch-02")
    }
    for r in (r for r in status["history"] if r["phase"] == "train"):
        assert (r["reported"], r["examples"]) == (2, sum(samples.values())), r
    assert "rejected message from watch-01" in fleet.log("aggregator")


def test_mqtt_311_fleet_completes_a_round(
    tmp_path: Path, mosquitto: MosquittoBroker, recorder: TrafficRecorder, har_model_dir: Path
) -> None:
    fleet = Fleet(
        tmp_path / "fleet",
        mosquitto.url,
        har_model_dir,
        2,
        {"rounds": 1, "min_devices": 2, "round_timeout_s": 60.0},
        mqtt_protocol=3,
    )
    try:
        for device in fleet.files.agent_configs:
            fleet.start_agent(device)
        fleet.start_aggregator()
        assert fleet.wait_exit("aggregator", 90) == 0, fleet.log("aggregator")
    finally:
        fleet.stop_all()
    status = latest_status(recorder.messages, fleet.topics.aggregator_status)
    assert status["completed_rounds"] == 1 and status["rejected_total"] == {}


def test_a_flood_on_update_topics_neither_hangs_nor_stops_the_aggregator(
    tmp_path: Path, mosquitto: MosquittoBroker, recorder: TrafficRecorder, har_model_dir: Path
) -> None:
    """Any client that may publish on update/+ could once fill the inbox, block paho's network
    thread and, with it, the PUBACKs the aggregator waits for: a permanent hang."""
    import threading

    from fedge.aggregator.config import load_aggregator_config
    from fedge.aggregator.service import AggregatorService

    fleet = _fleet(
        tmp_path,
        mosquitto,
        har_model_dir,
        1,
        rounds=1,
        min_devices=1,
        round_timeout_s=1.0,
        wait_for_devices_s=0.0,
    )
    service = AggregatorService(load_aggregator_config(fleet.files.aggregator_config, {}), inbox_limit=20)
    runner = threading.Thread(target=service.run, daemon=True)
    runner.start()
    try:
        recorder.wait_for(
            lambda ms: any(m.topic == fleet.topics.manifest for m in ms), 20, "a first manifest"
        )
        flooder = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        flooder.connect(mosquitto.host, mosquitto.port)
        flooder.loop_start()
        infos = [flooder.publish(fleet.topics.update("watch-01"), b"junk" * 64, qos=1) for _ in range(5000)]
        for info in infos:
            info.wait_for_publish(30)
        flooder.disconnect()
        flooder.loop_stop()
        # Rounds keep going (no device answers, so they abort and are re-announced). The wait
        # only counts messages (it runs on every one of the flood's); signatures are checked after.
        topic = fleet.topics.manifest

        def announced(ms: list[RecordedMessage]) -> int:
            return sum(1 for m in ms if m.topic == topic and m.payload)

        seen = announced(recorder.messages)
        recorder.wait_for(lambda ms: announced(ms) >= seen + 2, 60, "two more manifests")
        versions = [m.version for m in fleet.manifests(recorder)]
        assert versions == sorted(set(versions)) and len(versions) >= 3
        status = wait_status(
            recorder,
            fleet,
            lambda s: s.get("rejected_total", {}).get("frame_bad_magic", 0) > 0,
            20,
            "the junk counted",
        )
        assert status["rejected_total"]["frame_bad_magic"] + status["inbox_overflow"] >= 20
    finally:
        service.request_stop()
        runner.join(15)
    assert not runner.is_alive(), "the aggregator did not stop"
