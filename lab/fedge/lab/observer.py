"""Watches a fleet from the outside, as a building-management system or the demo would.

Subscribes to the retained manifest and statuses, verifies each manifest's signature with the
aggregator's verify key, fetches the weights it names, and evaluates every global model on
held-out data with LiteRT. It never sees an update in the clear: those are sealed.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from nacl.signing import VerifyKey

from fedge.agent.core import verify_manifest
from fedge.agent.trainer import LiteRTTrainer
from fedge.protocol.bounded_json import BoundedJsonError, loads_bounded
from fedge.protocol.errors import FedgeError
from fedge.protocol.round_manifest import RoundManifest
from fedge.protocol.signing import key_id
from fedge.protocol.topics import FleetTopics
from fedge.protocol.weights import weights_from_bytes
from fedge.shell.mqtt import ephemeral_settings, make_client

#: Statuses are a few KB of JSON (the aggregator's holds its last rounds); refuse more unparsed.
MAX_STATUS_BYTES = 256 * 1024
#: Errors kept verbatim in :attr:`FleetView.errors`; beyond, they are only counted by reason.
MAX_KEPT_ERRORS = 100


@dataclass
class ModelEvaluation:
    """A global model, evaluated on held-out data: ``after_round`` rounds of training went in."""

    version: int
    after_round: int
    phase: str
    loss: float
    accuracy: float | None
    mse: float | None = None  # a regression's held-out MSE


@dataclass
class FleetView:
    manifests: list[RoundManifest] = field(default_factory=list)
    evaluations: list[ModelEvaluation] = field(default_factory=list)
    aggregator_status: dict[str, Any] = field(default_factory=dict)
    device_status: dict[str, dict[str, Any]] = field(default_factory=dict)
    insights: dict[str, dict[str, Any]] = field(default_factory=dict)  # device -> latest prediction
    insight_counts: Counter[str] = field(default_factory=Counter)  # device -> predictions seen
    rounds: dict[str, dict[str, Any]] = field(default_factory=dict)  # round_id -> record
    errors: list[str] = field(default_factory=list)  # the first MAX_KEPT_ERRORS, verbatim
    error_counts: Counter[str] = field(default_factory=Counter)  # every error, by reason


class FleetObserver:
    def __init__(
        self,
        fleet: str,
        host: str,
        port: int,
        verify_key: VerifyKey,
        model: bytes,
        x_test: np.ndarray,
        y_test: np.ndarray,
        mqtt_protocol: int = 5,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
    ) -> None:
        self.topics = FleetTopics(fleet)
        self.trusted = {key_id(verify_key): verify_key}
        self.model = model
        self.model_sha256 = hashlib.sha256(model).hexdigest()
        self.x_test, self.y_test = x_test, y_test
        self.view = FleetView()
        self.changed = threading.Condition()
        self._trainer: LiteRTTrainer | None = None
        self._awaiting: dict[str, RoundManifest] = {}
        # TLS exactly when a CA is given.
        self.settings = ephemeral_settings(
            host,
            port,
            ca_file is not None,
            "fedge-observer",
            protocol=mqtt_protocol,
            username=username,
            password=password,
            ca_file=ca_file,
        )
        self.client = make_client(self.settings, persistent=False)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.host, self.port = host, port

    def start(self) -> None:
        """Connects at once (a clean start), so a broker that is not there fails here."""
        self.client.connect(self.host, self.port, self.settings.keepalive)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        client.subscribe(
            [
                (self.topics.manifest, 1),
                (self.topics.aggregator_status, 1),
                (self.topics.status_filter, 1),
                (self.topics.insight_filter, 1),
            ]
        )

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """Never raises: paho 2.x re-raises a callback's exception, which would end its network
        thread and the observer with it. Whatever one message causes is recorded in
        ``view.errors`` and counted by reason in ``view.error_counts``."""
        topic = "?"
        try:
            topic = msg.topic
            self._handle(topic, bytes(msg.payload))
        except BoundedJsonError as exc:
            self._error(f"json_{exc.reason}", topic, exc)
        except FedgeError as exc:
            self._error(getattr(exc, "reason", type(exc).__name__), topic, exc)
        except Exception as exc:  # one message never ends the observer
            self._error(f"handler_error:{type(exc).__name__}", topic, exc)
        with self.changed:
            self.changed.notify_all()

    def _handle(self, topic: str, payload: bytes) -> None:
        if topic == self.topics.manifest and payload:
            self._manifest(payload)
        elif topic == self.topics.aggregator_status and payload:
            status = self._json_object(payload)
            self.view.aggregator_status = status
            history = status.get("history", [])
            for record in history if isinstance(history, list) else []:
                if isinstance(record, dict) and isinstance(record.get("round_id"), str):
                    self.view.rounds[record["round_id"]] = record
        elif topic.startswith(self.topics.base + "/status/") and payload:
            device = self.topics.device_of(topic, "status")
            self.view.device_status[device] = self._json_object(payload)
        elif topic.startswith(self.topics.base + "/insight/") and payload:
            device = self.topics.device_of(topic, "insight")
            self.view.insights[device] = self._json_object(payload)
            self.view.insight_counts[device] += 1
        elif topic.startswith(self.topics.base + "/blob/"):
            self._weights(topic.rsplit("/", 1)[-1], payload)

    @staticmethod
    def _json_object(payload: bytes) -> dict[str, Any]:
        status = loads_bounded(payload, max_bytes=MAX_STATUS_BYTES)
        if not isinstance(status, dict):
            raise BoundedJsonError("bad_json", f"a status must be a JSON object, not {type(status).__name__}")
        return status

    def _error(self, reason: str, topic: str, exc: Exception) -> None:
        self.view.error_counts[reason] += 1
        if len(self.view.errors) < MAX_KEPT_ERRORS:
            self.view.errors.append(f"{topic}: {reason}: {exc}")

    def _manifest(self, frame: bytes) -> None:
        # Verified as a device verifies it (history is read too: no expiry check).
        manifest = verify_manifest(frame, self.trusted, fleet=self.topics.fleet, now=None)
        if self.view.manifests and manifest.version <= self.view.manifests[-1].version:
            return
        self.view.manifests.append(manifest)
        if manifest.model_sha256 != self.model_sha256:
            raise FedgeError("the fleet's model is not the one this observer evaluates")
        if manifest.phase in ("train", "final"):
            self._awaiting[manifest.weights_sha256] = manifest
            self.client.subscribe(self.topics.blob(manifest.weights_sha256), qos=1)

    def _weights(self, sha: str, payload: bytes) -> None:
        manifest = self._awaiting.pop(sha, None)
        if manifest is None or hashlib.sha256(payload).hexdigest() != sha:
            return
        self.client.unsubscribe(self.topics.blob(sha))
        if self._trainer is None:
            self._trainer = LiteRTTrainer(self.model, manifest.model_manifest)
        self._trainer.normalisation = manifest.normalisation
        self._trainer.set_weights(weights_from_bytes(payload, manifest.model_manifest.parameter_count))
        ev = self._trainer.evaluate(self.x_test, self.y_test)
        after = manifest.round_number if manifest.phase == "final" else manifest.round_number - 1
        self.view.evaluations.append(
            ModelEvaluation(manifest.version, after, manifest.phase, ev.loss, ev.accuracy, ev.mse)
        )

    def wait(self, timeout: float) -> None:
        with self.changed:
            self.changed.wait(timeout)
