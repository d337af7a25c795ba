"""A compromised device for end-to-end attack tests: a real device's key and broker credentials,
and poisoned payloads in every round.

It follows the protocol exactly as ``fedge.agent.service.AgentService`` does (verifies each manifest
with the pinned key, fetches the global weights by hash, seals with its own key and a fresh
counter, publishes QoS 1 on its own ``update/{id}``), so everything it sends authenticates and
reaches the round engine; only the content is hostile:

- moments rounds: feature values of ``moments_value`` (1e4) with an honest-looking count;
- train rounds: ``-w`` (shrink the model toward 0) scaled to ``norm_factor`` x the documented
  hard bound (0.5 x the model's norm: exactly at the bound, or 10x over it), claiming
  ``claimed_examples`` (1,000,000) examples.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field

import numpy as np
import paho.mqtt.client as mqtt
from nacl.public import PrivateKey, PublicKey
from nacl.signing import VerifyKey
from paho.mqtt.enums import CallbackAPIVersion

from fedge.agent.core import DeviceIdentity, seal_contribution, verify_manifest
from fedge.protocol.errors import FedgeError
from fedge.protocol.messages import encode_moments, encode_update
from fedge.protocol.round_manifest import RoundManifest
from fedge.protocol.signing import key_id
from fedge.protocol.topics import FleetTopics
from fedge.protocol.weights import weights_from_bytes

#: The default ``update_norm_ratio``: what a device can read in docs/configuration.md.
DOCUMENTED_RATIO = 0.5


@dataclass
class Poisoner:
    fleet: str
    device_id: str
    device_key: PrivateKey
    aggregator_key: PublicKey
    verify_key: VerifyKey
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    moments_value: float = 1e4
    moments_count: int = 400
    claimed_examples: int = 1_000_000
    norm_factor: float = 1.0
    sent: list[str] = field(default_factory=list)  # round ids it sent a poisoned payload for
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.topics = FleetTopics(self.fleet)
        self._counter = 0
        self._seen_version = 0
        self._waiting: dict[str, RoundManifest] = {}
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.device_id, protocol=mqtt.MQTTv5)
        if self.username is not None:
            self.client.username_pw_set(self.username, self.password)
        if self.ca_file is not None:
            self.client.tls_set(ca_certs=self.ca_file)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message

    def start(self) -> None:
        self.client.connect(self.host, self.port, 30)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object
    ) -> None:
        # It looks online like any agent (the aggregator waits for enrolled devices' statuses).
        status = json.dumps({"device_id": self.device_id, "state": "online"}).encode()
        client.publish(self.topics.status(self.device_id), status, qos=1, retain=True)
        client.subscribe(self.topics.manifest, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            if msg.topic == self.topics.manifest and msg.payload:
                self._manifest(bytes(msg.payload))
            elif msg.topic.startswith(self.topics.base + "/blob/"):
                self._weights(msg.topic.rsplit("/", 1)[-1], bytes(msg.payload))
        except (FedgeError, ValueError) as exc:  # recorded for the test's failure message
            self.errors.append(f"{msg.topic}: {exc}")

    def _manifest(self, frame: bytes) -> None:
        trusted = {key_id(self.verify_key): self.verify_key}
        manifest = verify_manifest(frame, trusted, fleet=self.fleet, now=None)
        with self._lock:
            if manifest.version <= self._seen_version or not manifest.is_selected(self.device_id):
                return
            self._seen_version = manifest.version
        if manifest.phase == "moments":
            n, v = self.moments_count, self.moments_value
            sums = np.full(manifest.model_manifest.task.input_dim, n * v)
            sums_sq = np.full(manifest.model_manifest.task.input_dim, n * (v * v + 1.0))
            self._send(manifest, "moments", *encode_moments(n, sums, sums_sq))
        elif manifest.phase == "train":
            self._waiting[manifest.weights_sha256] = manifest
            self.client.subscribe(self.topics.blob(manifest.weights_sha256), qos=1)

    def _weights(self, sha: str, payload: bytes) -> None:
        manifest = self._waiting.pop(sha, None)
        if manifest is None or hashlib.sha256(payload).hexdigest() != sha:
            return
        self.client.unsubscribe(self.topics.blob(sha))
        w = weights_from_bytes(payload, manifest.model_manifest.parameter_count).astype(np.float64)
        norm = float(np.linalg.norm(w))
        bound = DOCUMENTED_RATIO * max(norm, 1.0)
        delta = (-w / max(norm, 1e-12) * bound * self.norm_factor).astype(np.float32)
        header, body = encode_update(
            delta, manifest.model_manifest.layout, manifest.codec, self.claimed_examples, 0.01, None
        )
        self._send(manifest, "update", header, body)

    def _send(self, manifest: RoundManifest, kind: str, header: dict[str, object], body: bytes) -> None:
        self._counter += 1
        identity = DeviceIdentity(self.fleet, self.device_id, self.device_key, self.aggregator_key)
        frame = seal_contribution(
            identity, manifest.round_id, manifest.version, self._counter, kind, (header, body)
        )
        self.client.publish(self.topics.update(self.device_id), frame, qos=1)
        self.sent.append(manifest.round_id)
