"""Attacks on a device through a real broker: forged, replayed, rolled-back and expired
manifests, and tampered blobs. The test plays the aggregator (a real RoundEngine with real
keys) and the attacker; the device is a real agent process. Each attack must be refused with
its exact reason, and the device must stay on the model it had.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey
from paho.mqtt.enums import CallbackAPIVersion

from fedge.aggregator.config import RoundSettings
from fedge.aggregator.round_engine import EngineState, RoundEngine
from fedge.aggregator.service import load_model
from fedge.lab.broker import MosquittoBroker
from fedge.lab.provision import render_toml, write_private
from fedge.protocol.sealing import key_to_text, read_header
from fedge.protocol.signing import DocType, sign_document, signing_key_to_text
from fedge.protocol.topics import FleetTopics
from support.mqtt_fixtures import TrafficRecorder
from support.source_tree import PYTHONPATH as SOURCE_PYTHONPATH

pytest_plugins = ("support.mqtt_fixtures",)
pytestmark = [pytest.mark.slow, pytest.mark.adversarial]

REPO = Path(__file__).resolve().parents[2]
FLEET = "adv"
DEVICE = "watch-01"
TOPICS = FleetTopics(FLEET)
# The deployment defaults but for a single device and deadlines that never bite.
SETTINGS = RoundSettings(
    rounds=5, min_devices=1, round_timeout_s=600.0, manifest_ttl_s=3600.0, wait_for_devices_s=0.0
)


class Aggregator:
    """The legitimate aggregator's publishing side, driven by the test."""

    def __init__(
        self,
        model_dir: Path,
        broker: MosquittoBroker,
        device_key: PrivateKey,
        signing: SigningKey,
        box: PrivateKey,
    ) -> None:
        loaded = load_model(model_dir)
        state = EngineState(0, "", 0, loaded.initial_weights.copy(), None, {})
        self.engine = RoundEngine(
            FLEET,
            SETTINGS,
            loaded.manifest,
            loaded.model,
            box,
            signing,
            {DEVICE: device_key.public_key},
            state,
        )
        self.signing = signing
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)

    def announce(self, now: float) -> bytes:
        pub = self.engine.open_round(now)
        for topic, blob in pub.blobs.items():
            self.publish(topic, blob)
        self.publish(TOPICS.manifest, pub.manifest_frame)
        return pub.manifest_frame

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _status(recorder: TrafficRecorder) -> dict[str, object]:
    for m in reversed(recorder.messages):
        if m.topic == TOPICS.status(DEVICE) and m.payload:
            status: dict[str, object] = json.loads(m.payload)
            return status
    return {}


def _rejected(recorder: TrafficRecorder) -> dict[str, int]:
    value = _status(recorder).get("rejected_manifests") or {}
    assert isinstance(value, dict)
    return value


@pytest.fixture()
def setup(
    tmp_path: Path, mosquitto: MosquittoBroker, har_model_dir: Path
) -> Iterator[tuple[Aggregator, TrafficRecorder, subprocess.Popen[bytes]]]:
    device_key, signing, box = PrivateKey.generate(), SigningKey.generate(), PrivateKey.generate()
    write_private(tmp_path / "device.box", key_to_text(device_key))
    (tmp_path / "agent.toml").write_text(
        render_toml(
            {
                "agent": {
                    "device_id": DEVICE,
                    "fleet": FLEET,
                    "state_dir": "state",
                    "key_file": "device.box",
                    "aggregator_public_key": key_to_text(box.public_key),
                    "aggregator_verify_keys": [signing_key_to_text(signing.verify_key)],
                    "status_interval_s": 0.5,
                    "blob_timeout_s": 3.0,
                },
                "mqtt": {"broker": mosquitto.url},
                "data": {"source": "har-watch", "subject": 1},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = SOURCE_PYTHONPATH
    aggregator = Aggregator(har_model_dir, mosquitto, device_key, signing, box)
    with TrafficRecorder.for_broker(mosquitto, topic_filter="fedge/#") as recorder:
        with (tmp_path / "agent.log").open("ab") as log:
            agent = subprocess.Popen(
                [sys.executable, "-m", "fedge.cli", "agent", "run", "--config", str(tmp_path / "agent.toml")],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )
        try:
            aggregator.announce(NOW)
            recorder.wait_for(lambda ms: _status(recorder).get("model_version") == 1, 60, "the device on v1")
            yield aggregator, recorder, agent
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(20)
            aggregator.close()


NOW = time.time()  # manifests are issued now and expire an hour and ten minutes later


def test_a_manifest_signed_by_an_unknown_key_is_refused(
    setup: tuple[Aggregator, TrafficRecorder, object],
) -> None:
    aggregator, recorder, _ = setup
    forger = SigningKey.generate()
    doc = dataclasses.replace(aggregator.engine.open_round(NOW).manifest, version=99).to_dict()
    aggregator.publish(TOPICS.manifest, sign_document(DocType.ROUND_MANIFEST, doc, forger))
    recorder.wait_for(lambda ms: _rejected(recorder).get("unknown_key") == 1, 20, "unknown_key counted")
    assert _status(recorder)["model_version"] == 1


def test_a_manifest_with_a_forged_signature_is_refused(
    setup: tuple[Aggregator, TrafficRecorder, object],
) -> None:
    aggregator, recorder, _ = setup
    frame = bytearray(aggregator.engine.open_round(NOW).manifest_frame)
    frame[-10] ^= 0x01  # one bit of the signed document
    aggregator.publish(TOPICS.manifest, bytes(frame))
    recorder.wait_for(lambda ms: _rejected(recorder).get("bad_signature") == 1, 20, "bad_signature counted")
    assert _status(recorder)["model_version"] == 1


def test_replayed_and_rolled_back_manifests_are_refused(
    setup: tuple[Aggregator, TrafficRecorder, object],
) -> None:
    aggregator, recorder, _ = setup
    first = next(m.payload for m in recorder.messages if m.topic == TOPICS.manifest and m.payload)
    aggregator.announce(NOW)  # a genuine v2: accepted
    recorder.wait_for(lambda ms: _status(recorder).get("model_version") == 2, 60, "the device on v2")
    aggregator.publish(TOPICS.manifest, first)  # the old, genuinely signed v1 again
    recorder.wait_for(lambda ms: _rejected(recorder).get("rollback") == 1, 20, "rollback counted")
    # The same version with other content, genuinely signed (e.g. a compromised signing step).
    assert aggregator.engine.current is not None
    manifest = aggregator.engine.current.manifest
    assert manifest.version == 2
    other = dataclasses.replace(manifest, deadline=manifest.deadline + 1)
    aggregator.publish(
        TOPICS.manifest, sign_document(DocType.ROUND_MANIFEST, other.to_dict(), aggregator.signing)
    )
    recorder.wait_for(lambda ms: _rejected(recorder).get("rollback") == 2, 20, "same version, other content")
    assert _status(recorder)["model_version"] == 2


def test_an_expired_manifest_is_refused(setup: tuple[Aggregator, TrafficRecorder, object]) -> None:
    aggregator, recorder, _ = setup
    pub = aggregator.engine.open_round(1.0)  # issued in 1970: expired long ago
    for topic, blob in pub.blobs.items():
        aggregator.publish(topic, blob)
    aggregator.publish(TOPICS.manifest, pub.manifest_frame)
    recorder.wait_for(lambda ms: _rejected(recorder).get("expired") == 1, 20, "expired counted")
    assert _status(recorder)["model_version"] == 1


def test_a_tampered_weights_blob_is_never_loaded(setup: tuple[Aggregator, TrafficRecorder, object]) -> None:
    aggregator, recorder, _ = setup
    aggregator.engine.state.weights = aggregator.engine.state.weights + 0.01  # new weights: a new blob
    pub = aggregator.engine.open_round(NOW)
    weights_topic = TOPICS.blob(pub.manifest.weights_sha256)
    tampered = bytearray(pub.blobs[weights_topic])
    tampered[0] ^= 0x01
    aggregator.publish(weights_topic, bytes(tampered))  # the attacker owns the blob topic
    aggregator.publish(TOPICS.manifest, pub.manifest_frame)
    recorder.wait_for(
        lambda ms: "did not arrive" in str(_status(recorder).get("last_error") or ""), 30, "the blob refused"
    )
    # The signed manifest was accepted, but nothing was computed from the tampered weights.
    sent = [read_header(m.payload)[0] for m in recorder.matching(TOPICS.update(DEVICE)) if m.payload]
    assert pub.manifest.round_id not in {h.round_id for h in sent}


def test_a_rotated_signing_key_is_followed_and_the_old_one_retired(
    setup: tuple[Aggregator, TrafficRecorder, object],
) -> None:
    from fedge.protocol.key_rotation import sign_rotation

    aggregator, recorder, _ = setup
    old = aggregator.signing
    new = SigningKey.generate()
    # A manifest signed by the new key before the device saw the rotation: parked, not lost.
    aggregator.engine.signing_key = new
    aggregator.announce(NOW)
    recorder.wait_for(lambda ms: _rejected(recorder).get("unknown_key") == 1, 20, "new key not yet trusted")
    aggregator.publish(TOPICS.rotation(1), sign_rotation(old, new.verify_key, FLEET, 1, NOW))
    recorder.wait_for(
        lambda ms: _status(recorder).get("model_version") == 2, 30, "the parked manifest accepted"
    )
    # The old key is retired: a manifest it signs is refused even though it once was trusted.
    aggregator.engine.signing_key = old
    aggregator.announce(NOW)
    recorder.wait_for(lambda ms: _rejected(recorder).get("unknown_key") == 2, 20, "old key refused")
    assert _status(recorder)["model_version"] == 2
    # A rotation signed by a key nobody trusts is refused.
    intruder = SigningKey.generate()
    aggregator.publish(
        TOPICS.rotation(2), sign_rotation(intruder, SigningKey.generate().verify_key, FLEET, 2, NOW)
    )
    recorder.wait_for(lambda ms: _rejected(recorder).get("rotation_unknown_key") == 1, 20, "forged rotation")


def test_a_manifest_that_does_not_chain_to_the_accepted_one_is_refused(
    setup: tuple[Aggregator, TrafficRecorder, object],
) -> None:
    aggregator, recorder, _ = setup
    pub = aggregator.engine.open_round(NOW)  # v2, whose parent is v1 (the device's)
    assert pub.manifest.version == 2
    for topic, blob in pub.blobs.items():
        aggregator.publish(topic, blob)
    # Correctly signed (e.g. a compromised signing step), but not the successor of v1.
    forged = dataclasses.replace(pub.manifest, parent_sha256="0" * 64)
    frame = sign_document(DocType.ROUND_MANIFEST, forged.to_dict(), aggregator.signing)
    aggregator.publish(TOPICS.manifest, frame)
    recorder.wait_for(lambda ms: _rejected(recorder).get("broken_chain") == 1, 20, "broken_chain counted")
    status = _status(recorder)
    assert status["model_version"] == 1
    assert "its parent is " + "0" * 64 in str(status["last_error"])
    # The true successor, chained to v1, is accepted.
    aggregator.publish(TOPICS.manifest, pub.manifest_frame)
    recorder.wait_for(lambda ms: _status(recorder).get("model_version") == 2, 60, "the device on v2")
    assert _rejected(recorder) == {"broken_chain": 1}
