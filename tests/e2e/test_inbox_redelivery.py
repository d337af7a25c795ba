"""A burst larger than the aggregator's inbox is delivered again, never dropped (issue 16).

The aggregator bounds what its broker may send it unacknowledged with the MQTT 5 receive
maximum. Mosquitto before 2.0.13 (the 2.0.11 of Debian 12 and Ubuntu 22.04, the one these tests
run) does not honour it under a burst: ``bench_replicas`` at 10,000 devices had the broker push
several thousand updates beyond it, the inbox overflowed and 1,417 acknowledged updates were
dropped and counted as ``inbox_full``, so the round missed them. Now a QoS 1 message that finds
the inbox full is left unacknowledged and the aggregator reconnects, once its inbox is empty, so
the broker sends it again.

Mosquitto 2.0.11 also sends again, after such a reconnect, some messages that were acknowledged
(its PUBACK handling only frees messages on its in-flight list, and the ones it sent past the
receive maximum are not all on it): those are refused as duplicates ("counted already"), never
counted twice.

Real parts: a real Mosquitto, the real aggregator service (in a thread, so its inbox bound can
be made small enough for a burst of 60 updates to overflow it; the deployment default, 64 MiB,
is overflowed the same way by ``bench/bench_replicas.py --sizes 10000``), real sealed updates.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fedge.agent.core import DeviceIdentity, seal_contribution
from fedge.aggregator.config import load_aggregator_config
from fedge.aggregator.service import AggregatorService, load_model
from fedge.lab.broker import MosquittoBroker
from fedge.lab.provision import create_fleet
from fedge.protocol.codec import Codec
from fedge.protocol.framing import FrameKind, decode_frame
from fedge.protocol.messages import Evaluation, encode_moments, encode_update
from fedge.protocol.topics import FleetTopics
from support.mqtt_fixtures import mosquitto  # noqa: F401  (fixture)

DEVICES = 60
#: Room for this many of the model's updates: 60 arriving at once overflow it many times over.
INBOX_UPDATES = 4


class Watcher:
    """Publishes the devices' sealed messages in one burst and watches manifests and the status."""

    def __init__(self, broker: MosquittoBroker, topics: FleetTopics) -> None:
        self.topics = topics
        self.versions: set[int] = set()
        self.status: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe([(topics.manifest, 1), (topics.aggregator_status, 1)])
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if not msg.payload:
            return
        with self.lock:
            if msg.topic == self.topics.aggregator_status:
                self.status = json.loads(msg.payload)
            else:
                frame = decode_frame(bytes(msg.payload), FrameKind.SIGNED, len(msg.payload))
                self.versions.add(int(json.loads(frame.body[64:])["version"]))

    def wait(self, what: str, done: Any, timeout: float) -> None:
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            with self.lock:
                if done(self):
                    return
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}; last status: {self.status}")

    def burst(self, messages: list[tuple[str, bytes]]) -> None:
        infos = [self.client.publish(topic, payload, qos=1) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(30)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_a_burst_beyond_the_inbox_is_delivered_again_and_counted_once(
    tmp_path: Path,
    mosquitto: MosquittoBroker,  # noqa: F811
    har_model_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    devices = [f"dev-{i:02d}" for i in range(DEVICES)]
    fleet = "redeliver"
    files = create_fleet(
        tmp_path / "fleet",
        fleet,
        har_model_dir,
        mosquitto.url,
        dict.fromkeys(devices, 1),
        rounds={"rounds": 1, "min_devices": DEVICES, "round_timeout_s": 120.0, "wait_for_devices_s": 0.0},
    )
    loaded = load_model(har_model_dir)
    manifest = loaded.manifest
    rng = np.random.default_rng(3)
    topics = FleetTopics(fleet)
    moments: list[tuple[str, bytes]] = []
    updates: list[tuple[str, bytes]] = []
    for device, key in files.device_keys.items():
        identity = DeviceIdentity(fleet, device, key, files.box_key.public_key)
        x = rng.normal(0.0, 1.0, (50, manifest.task.input_dim))
        body = encode_moments(50, x.sum(axis=0), (x * x).sum(axis=0))
        moments.append((topics.update(device), seal_contribution(identity, "m-v1", 1, 1, "moments", body)))
        delta = rng.normal(0.0, 0.01, manifest.parameter_count).astype(np.float32)
        evaluation = Evaluation(examples=60, loss=0.6, accuracy=0.8, mse=None)
        body = encode_update(delta, manifest.layout, Codec.FP32, 300, 0.5, evaluation)
        updates.append((topics.update(device), seal_contribution(identity, "r0001-v2", 2, 2, "update", body)))
    update_bytes = len(updates[0][1])

    service = AggregatorService(
        load_aggregator_config(files.aggregator_config, {}), inbox_max_bytes=INBOX_UPDATES * update_bytes
    )
    assert service.receive_maximum() == 10  # the floor; a broker honouring it would overflow 4 too
    runner = threading.Thread(target=service.run, daemon=True)
    watcher = Watcher(mosquitto, topics)
    runner.start()
    try:
        watcher.wait("the moments round", lambda w: 1 in w.versions, 60)
        watcher.burst(moments)
        watcher.wait("the train round", lambda w: 2 in w.versions, 60)
        watcher.burst(updates)
        watcher.wait("the final model", lambda w: 3 in w.versions, 90)
        watcher.wait(
            "the status after the round",
            lambda w: w.status.get("completed_rounds") == 1 and w.status.get("current_round") is None,
            20,
        )
        status = watcher.status
    finally:
        service.request_stop()
        runner.join(15)
        watcher.close()
    assert not runner.is_alive(), "the aggregator did not stop"
    train = [h for h in status["history"] if h["phase"] == "train"]
    # Every device's update counted, once, and nothing dropped. Mosquitto 2.0.11 also sends some
    # acknowledged messages again after the reconnect (see above): refused as duplicates.
    assert [(h["outcome"], h["reported"]) for h in train] == [("aggregated", DEVICES)]
    assert set(status["rejected_total"]) <= {"duplicate"}
    assert status["messages_dropped"] == {} and status["inbox_overflow"] == 0
    inbox = status["inbox"]
    assert inbox["deferred"] > 0 and inbox["redeliveries"] >= 1
    assert inbox["messages"] == 0 and inbox["bytes"] == 0
    warnings = [r.getMessage() for r in caplog.records if "inbox.deferred" in r.getMessage()]
    assert len(warnings) == 1 and "Mosquitto before 2.0.13" in warnings[0]
