"""``fedge aggregator retire`` against a real Mosquitto: the fleet's retained messages are
cleared through the aggregator's account and the checkpoint is moved aside, so neither a new
subscriber nor a restarted aggregator finds the fleet."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fedge.aggregator.checkpoint import save_checkpoint
from fedge.aggregator.config import load_aggregator_config
from fedge.aggregator.retire import retire_fleet
from fedge.aggregator.rollout import Candidate
from fedge.aggregator.service import CHECKPOINT_FILE, AggregatorService, checkpoint_from_state
from fedge.lab.broker import MosquittoBroker
from fedge.lab.provision import create_fleet
from fedge.protocol.topics import FleetTopics

pytest_plugins = ("support.mqtt_fixtures",)


def retained(broker: MosquittoBroker, topic_filter: str, settle_s: float = 1.0) -> dict[str, bytes]:
    """The retained messages a new subscriber gets (empty ones are not retained)."""
    got: dict[str, bytes] = {}
    subscribed = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_connect = lambda c, u, f, r, p: c.subscribe(topic_filter, qos=1)
    client.on_subscribe = lambda c, u, m, r, p: subscribed.set()
    client.on_message = lambda c, u, msg: got.__setitem__(msg.topic, bytes(msg.payload))
    client.connect(broker.host, broker.port)
    client.loop_start()
    assert subscribed.wait(10)
    time.sleep(settle_s)
    client.disconnect()
    client.loop_stop()
    return got


def test_retiring_clears_the_fleet_from_the_broker_and_moves_the_checkpoint_aside(
    tmp_path: Path, mosquitto: MosquittoBroker, har_model_dir: Path
) -> None:
    fleet = create_fleet(
        tmp_path, "old", har_model_dir, mosquitto.url, {"watch-01": 1, "watch-02": 2}, {"min_devices": 2}
    )
    config = load_aggregator_config(fleet.aggregator_config, {})
    service = AggregatorService(config)
    pub = service.engine.open_round(time.time())
    checkpoint = config.state_dir / CHECKPOINT_FILE
    save_checkpoint(checkpoint, checkpoint_from_state(service.engine.snapshot()))
    save_checkpoint(checkpoint, checkpoint_from_state(service.engine.snapshot()))  # and a .prev
    topics = FleetTopics("old")
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    publisher.connect(mosquitto.host, mosquitto.port)
    publisher.loop_start()
    what_the_aggregator_left = {
        topics.manifest: pub.manifest_frame,
        topics.aggregator_status: b'{"state": "done"}',
        topics.fleet_summary: b'{"schema": "fedge.fleet/1"}',
    }
    what_the_aggregator_left.update(pub.blobs)
    # The rollout gate's decisions and the promoted weights (docs/rollout.md).
    rollout = service.rollout
    m = pub.manifest
    weights = pub.blobs[topics.blob(m.weights_sha256)]
    candidate = Candidate(m.version, m.round_id, m.weights_sha256, m.weights_bytes, 1, m.model_sha256, 0.5)
    promoted = rollout.judge(candidate, weights, m.weights_sha256, time.time())
    assert promoted is not None
    what_the_aggregator_left.update(promoted.items)
    for topic, payload in what_the_aggregator_left.items():
        publisher.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    publisher.publish(topics.status("watch-01"), b'{"state": "idle"}', qos=1, retain=True).wait_for_publish(
        10
    )
    publisher.disconnect()
    publisher.loop_stop()
    assert set(retained(mosquitto, "fedge/v1/old/#")) == {
        *what_the_aggregator_left,
        topics.status("watch-01"),
    }

    done = retire_fleet(config)

    assert set(what_the_aggregator_left) <= set(done.cleared)
    # What is left is the device's own status (its account, not the aggregator's, writes it).
    assert set(retained(mosquitto, "fedge/v1/old/#")) == {topics.status("watch-01")}
    assert done.checkpoint == checkpoint.with_name("checkpoint.bin.retired")
    assert not checkpoint.exists() and done.checkpoint.exists()
    assert sorted(p.name for p in config.state_dir.glob("checkpoint*")) == [
        "checkpoint.bin.retired",
        "checkpoint.prev.retired",
    ]
    assert AggregatorService(config).engine.state.version == 0  # nothing to resume


def test_retiring_without_a_reachable_broker_is_a_one_line_error_and_changes_nothing(
    tmp_path: Path, har_model_dir: Path
) -> None:
    fleet = create_fleet(
        tmp_path,
        "gone",
        har_model_dir,
        "mqtt://127.0.0.1:9",
        {"watch-01": 1, "watch-02": 2},
        {"min_devices": 2},
    )
    config = load_aggregator_config(fleet.aggregator_config, {})
    service = AggregatorService(config)
    service.engine.open_round(time.time())
    checkpoint = config.state_dir / CHECKPOINT_FILE
    save_checkpoint(checkpoint, checkpoint_from_state(service.engine.snapshot()))
    import pytest

    from fedge.protocol.config_source import ConfigError

    with pytest.raises(ConfigError) as info:
        retire_fleet(config, timeout_s=2)
    assert str(info.value) == (
        "cannot reach the broker mqtt://127.0.0.1:9 (no answer within 2 s); check [mqtt] in the "
        "aggregator's config (the retirement must use the aggregator's account)"
    )
    assert checkpoint.exists()


def test_the_retire_command_names_the_fix_when_the_broker_cannot_be_reached(
    tmp_path: Path, har_model_dir: Path
) -> None:
    import os
    import subprocess
    import sys

    from support.source_tree import PYTHONPATH

    fleet = create_fleet(
        tmp_path,
        "gone",
        har_model_dir,
        "mqtt://127.0.0.1:9",
        {"watch-01": 1, "watch-02": 2},
        {"min_devices": 2},
    )
    out = subprocess.run(
        [sys.executable, "-m", "fedge.cli", "aggregator", "retire", "--config", str(fleet.aggregator_config)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": PYTHONPATH},
        timeout=120,
        check=False,
    )
    assert out.returncode == 78, out.stderr
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the broker mqtt://127.0.0.1:9" in lines[0], out.stderr
