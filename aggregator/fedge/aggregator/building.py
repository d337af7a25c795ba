"""``fedge aggregator run`` with ``[upstream] enabled``: a building gateway under a campus.

The service is the aggregator's (its devices, broker, checkpoint, status, metrics are the same);
what differs is who opens rounds. The campus's signed manifests and weights blobs come over the
building broker's bridge (``fedge/v1/{campus}/manifest``, ``.../blob/+``). For each campus round
that selects this building, the building opens a round of its own devices with the campus's
global weights, normalisation and phase, ending ``margin_s`` before the campus deadline at the
latest; when it closes, the building seals its contribution (:mod:`fedge.aggregator.upstream`) to
the campus aggregator as the device ``building_id`` and publishes it on
``fedge/v1/{campus}/update/{building_id}``, which the bridge carries out. The campus's final
manifest becomes the building's final manifest.

Every campus document is checked before it counts: the manifest against the campus signing keys
(pinned in ``[upstream]``), for the campus fleet, not expired, newer than the last; a weights
blob against the SHA-256 in its topic and the manifest. One that fails is counted
(``upstream_*`` in ``messages_dropped``) and logged; it never ends the service.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import paho.mqtt.client as mqtt
from nacl.public import PrivateKey

from fedge.aggregator.config import AggregatorConfig
from fedge.aggregator.service import AggregatorService, LeadershipLost
from fedge.aggregator.upstream import building_contribution, local_timeout
from fedge.protocol.bounded_json import BoundedJsonError
from fedge.protocol.errors import FedgeError
from fedge.protocol.round_manifest import RoundManifest, round_manifest_from_dict
from fedge.protocol.sealing import SealedHeader, public_key_from_text, seal
from fedge.protocol.signing import DocType, SignatureError, key_id, verify_document, verify_key_from_text
from fedge.protocol.topics import FleetTopics
from fedge.protocol.weights import WeightsError, weights_from_bytes
from fedge.shell.files import read_private_key
from fedge.shell.mqtt import connect

log = logging.getLogger("fedge.aggregator.building")
MAX_CAMPUS_MANIFEST_BYTES = 4 * 1024 * 1024


class BuildingService(AggregatorService):
    def __init__(self, config: AggregatorConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        up = config.upstream
        self.upstream = up
        self.campus_topics = FleetTopics(up.campus_fleet)
        keys = [verify_key_from_text(text) for text in up.campus_verify_keys]
        self.campus_trusted = {key_id(k): k for k in keys}
        self.campus_public = public_key_from_text(up.campus_public_key)
        self.building_key = PrivateKey(read_private_key(up.key_file, "box"))
        #: The newest campus manifest verified, and the weights blobs it may name (by SHA-256).
        self.campus: RoundManifest | None = None
        self.campus_weights: dict[str, bytes] = {}
        #: The campus round the open local round follows, and every campus round answered.
        self.following: RoundManifest | None = None
        self.answered: set[str] = set()
        self.sent_upstream = 0

    # --- campus documents, from the bridge ----------------------------------------------------

    def _on_connect(self, client: mqtt.Client) -> None:
        super()._on_connect(client)
        client.subscribe([(self.campus_topics.manifest, 1), (self.campus_topics.blob_filter, 1)])

    def _handle(self, topic: str, payload: bytes) -> None:
        if topic == self.campus_topics.manifest:
            self._campus_manifest(payload)
            return
        if topic.startswith(self.campus_topics.base + "/blob/"):
            self._campus_blob(topic, payload)
            return
        super()._handle(topic, payload)

    def _campus_manifest(self, payload: bytes) -> None:
        if not payload:
            return
        if len(payload) > MAX_CAMPUS_MANIFEST_BYTES:
            self._drop("upstream_manifest_too_large", self.campus_topics.manifest, f"{len(payload)} bytes")
            return
        try:
            doc, _ = verify_document(
                payload, DocType.ROUND_MANIFEST, self.campus_trusted, MAX_CAMPUS_MANIFEST_BYTES
            )
            manifest = round_manifest_from_dict(doc)
        except (SignatureError, BoundedJsonError, FedgeError) as exc:
            self._drop("upstream_manifest_refused", self.campus_topics.manifest, str(exc))
            return
        if manifest.fleet != self.upstream.campus_fleet:
            self._drop("upstream_manifest_refused", self.campus_topics.manifest, f"fleet {manifest.fleet!r}")
            return
        if self.campus is not None and manifest.version <= self.campus.version:
            return  # the same one again (retained, after a reconnect), or an older one
        if manifest.secure_aggregation is not None:
            # A building's contribution is its devices' mean, computed in the clear: it has no
            # masked input to give a secure round, which would wait for it until its deadline.
            self._drop(
                "upstream_secure_round",
                self.campus_topics.manifest,
                f"campus round {manifest.round_id} is a secure-aggregation round, which a building "
                "cannot take part in: turn [privacy] secure_aggregation off at the campus (docs/scale.md)",
            )
            return
        if manifest.model_sha256 != self.engine.model_sha256:
            self._drop(
                "upstream_model_mismatch",
                self.campus_topics.manifest,
                f"the campus runs model {manifest.model_sha256[:12]}, this building "
                f"{self.engine.model_sha256[:12]}: give the building the campus's model directory",
            )
            return
        self.campus = manifest
        log.info("campus manifest v%d: %s round %s", manifest.version, manifest.phase, manifest.round_id)

    def _campus_blob(self, topic: str, payload: bytes) -> None:
        sha = topic.rsplit("/", 1)[-1]
        if not payload or sha == self.engine.model_sha256:
            return  # a cleared blob, or the model this building has already
        if hashlib.sha256(payload).hexdigest() != sha:
            self._drop("upstream_blob_mismatch", topic, "the payload does not hash to its topic")
            return
        if len(payload) != 4 * self.engine.model_manifest.parameter_count:
            self._drop("upstream_blob_refused", topic, f"{len(payload)} bytes is not this model's weights")
            return
        self.campus_weights = {**dict(list(self.campus_weights.items())[-1:]), sha: payload}

    # --- rounds ---------------------------------------------------------------------------------

    def _follow_campus(self) -> None:
        """Opens the local round of the newest campus round, once its weights are here."""
        m = self.campus
        if m is None or m.round_id in self.answered or self.engine.current is not None:
            return
        now = self.clock()
        if m.phase != "final" and (
            now > m.deadline - self.upstream.margin_s or not m.is_selected(self.upstream.building_id)
        ):
            self.answered.add(m.round_id)
            log.info(
                "campus round %s: %s", m.round_id, "not selected" if now <= m.deadline else "too late to join"
            )
            return
        blob = self.campus_weights.get(m.weights_sha256)
        if blob is None:
            return  # its weights are on their way over the bridge
        try:
            weights = weights_from_bytes(blob, self.engine.model_manifest.parameter_count)
        except WeightsError as exc:
            self._drop("upstream_blob_refused", self.campus_topics.blob(m.weights_sha256), str(exc))
            self.answered.add(m.round_id)
            return
        self.answered.add(m.round_id)
        state = self.engine.state
        state.weights = weights
        state.normalisation = m.normalisation
        timeout = local_timeout(m, now, self.upstream.margin_s, self.config.rounds.round_timeout_s)
        pub = self.engine.open_round(now, self._unavailable(), phase=m.phase, timeout_s=timeout)
        self.following = m if m.phase != "final" else None
        self._announce(pub)
        self._publish_status()

    def _close_local_round(self) -> None:
        campus = self.following
        assert campus is not None and self.engine.current is not None
        contribution = building_contribution(self.engine, campus)
        record = self.engine.close_round()
        self.following = None
        self.round_outcomes.add(record.outcome)
        log.info(
            "round %s %s: %d/%d devices (for campus round %s)",
            record.round_id,
            record.outcome,
            record.reported,
            record.selected,
            campus.round_id,
        )
        if contribution is None:
            log.warning(
                "campus round %s: nothing sent upstream (%d of min_devices=%d devices reported)",
                campus.round_id,
                record.reported,
                self.config.rounds.min_devices,
            )
            return
        kind, header, body = contribution
        bind = SealedHeader(
            self.upstream.campus_fleet,
            self.upstream.building_id,
            campus.round_id,
            campus.version,
            kind,
            campus.version,
        )
        sealed = seal(bind, header, body, self.building_key, self.campus_public)
        self._publish(self.campus_topics.update(self.upstream.building_id), sealed, retain=False)
        self.sent_upstream += 1
        log.info("sent the campus our %s for round %s (%d bytes)", kind, campus.round_id, len(sealed))
        self._checkpoint()

    def _run_rounds(self) -> int:
        connect(self.client, self.config.mqtt, receive_maximum=self.receive_maximum())
        self.client.loop_start()
        try:
            while not self.connected.wait(0.2):
                self.heartbeat.beat()
                if self.stop_requested.is_set():
                    return 0
            self._publish_rotations()
            self._wait_for_devices()
            self._publish_status()
            while not self.stop_requested.is_set():
                self._republish_retained()
                self._drain(0.1)
                if self.engine.current is None:
                    self._reload_registry()
                    self._follow_campus()
                    if self._campus_done() and self.config.exit_when_done:
                        break
                    continue
                if self.engine.round_due(self.clock()):
                    self._close_local_round()
                    self._publish_status()
            return 0
        except LeadershipLost:
            return 75
        finally:
            self._publish_status()
            self.client.disconnect()
            self.client.loop_stop()

    def _campus_done(self) -> bool:
        """The campus published its final model and this building published it to its devices."""
        return (
            self.campus is not None and self.campus.phase == "final" and self.campus.round_id in self.answered
        )

    def status(self) -> dict[str, Any]:
        status = super().status()
        status["upstream"] = {
            "campus_fleet": self.upstream.campus_fleet,
            "building_id": self.upstream.building_id,
            "campus_version": self.campus.version if self.campus is not None else None,
            "following": self.following.round_id if self.following is not None else None,
            "sent": self.sent_upstream,
        }
        return status


def run_building(config: AggregatorConfig) -> int:
    import signal  # noqa: PLC0415

    service = BuildingService(config)
    signal.signal(signal.SIGTERM, service.request_stop)
    signal.signal(signal.SIGINT, service.request_stop)
    log.info(
        "building %s of campus %s: rounds follow the campus's, contributions to %s",
        config.upstream.building_id,
        config.upstream.campus_fleet,
        service.campus_topics.update(config.upstream.building_id),
    )
    return service.run()
