"""``fedge agent run``: the device's I/O shell around the trainer.

Threads: paho's network thread only verifies nothing and queues (manifests, blobs, acks); one
worker thread verifies manifests, fetches blobs, trains and seals. Sealed messages go through
the on-disk outbox first and leave it only when the broker acknowledges them (PUBACK), so an
update survives a crash or a broker outage; updates of rounds that closed are dropped (and
logged) when a newer manifest arrives.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from nacl.public import PrivateKey
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedge.agent.config import AgentConfig
from fedge.agent.device_state import DeviceStateStore, ManifestChainError, ManifestRollbackError
from fedge.agent.outbox import Outbox
from fedge.agent.systemd_notify import Notifier, status_line
from fedge.agent.trainer import LiteRTTrainer
from fedge.agent.trust import TrustStore
from fedge.protocol.config_source import ConfigError
from fedge.protocol.errors import FedgeError
from fedge.protocol.key_rotation import read_rotation_unverified
from fedge.protocol.keyfile import MAX_KEY_FILE_BYTES, KeyFileError, check_private_key_file
from fedge.protocol.messages import Evaluation, encode_moments, encode_update
from fedge.protocol.round_manifest import RoundManifest, RoundManifestError, round_manifest_from_dict
from fedge.protocol.sealing import SealedHeader, seal
from fedge.protocol.signing import DocType, SignatureError, verify_document
from fedge.protocol.task import TaskSpec
from fedge.protocol.topics import FleetTopics
from fedge.protocol.weights import weights_from_bytes

log = logging.getLogger("fedge.agent")
MAX_MANIFEST_FRAME_BYTES = 8 * 1024 * 1024
MAX_BLOB_BYTES = 64 * 1024 * 1024
HEARTBEAT_INTERVAL_S = 5.0
#: What to do about a message the agent dropped, by reason (the part before "_" or ":").
_DROP_ADVICE = {
    "blob": "A blob that is not (or not exactly) one this device asked for: a re-delivery, or "
    "someone who may publish blobs altered one; a manifest's blobs that never arrive intact "
    "leave the device on its model.",
    "rotation": "A signing-key rotation over the size bound: not from fedge's aggregator.",
    "unexpected": "A message on a topic the agent does not subscribe to.",
    "handler": "A bug in fedge: the message was skipped. Please report this traceback.",
}
#: Dropped messages that happen in a healthy fleet: logged at INFO, not ERROR.
_ROUTINE_DROPS = frozenset({"blob_unwanted"})


@dataclass(frozen=True)
class LocalData:
    """The device's own samples (raw features), split into training and held-out parts."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_holdout: np.ndarray
    y_holdout: np.ndarray


def read_private_key(path: Path) -> bytes:
    """The device's X25519 key; refuses a file others can read (``fedge.protocol.keyfile``)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"cannot read device key {path}: {exc.strerror}") from None
    try:
        st_mode = os.fstat(fd).st_mode
        raw = os.read(fd, MAX_KEY_FILE_BYTES + 1) if stat.S_ISREG(st_mode) else b""
    finally:
        os.close(fd)
    try:
        return check_private_key_file(raw, st_mode, str(path), "box")
    except KeyFileError as exc:  # the device's key is part of its configuration (exit 78)
        raise ConfigError(str(exc)) from None


def rotation_sequence_of(frame: bytes) -> int:
    """Sorting key: the claimed sequence (verified later); unreadable frames sort first."""
    try:
        return read_rotation_unverified(frame).sequence
    except FedgeError:
        return 0


def split_holdout(x: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> LocalData:
    """A seeded random split; the held-out part evaluates each received global model."""
    order = np.random.default_rng(seed).permutation(x.shape[0])
    n_hold = round(fraction * x.shape[0])
    hold, train = order[:n_hold], order[n_hold:]
    return LocalData(x[train], y[train], x[hold], y[hold])


#: Turns the device's local readings into (features, labels) as a task spec says.
DataProvider = Callable[[TaskSpec], tuple[np.ndarray, np.ndarray]]


class AgentService:
    def __init__(
        self,
        config: AgentConfig,
        data_provider: DataProvider,
        clock: Callable[[], float] = time.time,
        data_report: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.config = config
        self.data_provider = data_provider
        self.data_report = data_report
        self.data: LocalData | None = None
        self.clock = clock
        self.topics = FleetTopics(config.fleet)
        self.device_key = PrivateKey(read_private_key(config.key_file))
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.state = DeviceStateStore(config.state_dir / "state.json")
        self.state.load()  # a corrupt state file is an error now, not a silent reset
        self.outbox = Outbox(config.state_dir / "outbox.sqlite")
        # Pinned at provisioning, then moved only by rotations a trusted key vouches for.
        self.trust = TrustStore.open_or_create(
            config.state_dir / "trust.json", config.fleet, config.trusted_keys.values()
        )
        self._pending_rotations: list[bytes] = []
        self._parked_manifest: bytes | None = None
        self.trainer: LiteRTTrainer | None = None
        self.model_sha256: str | None = None
        self.current: RoundManifest | None = None
        self.rejected_manifests: dict[str, int] = {}
        # Messages not handled, by reason; guarded by _lock (paho's thread and the worker count).
        self._dropped: Counter[str] = Counter()
        self._next_status_at = 0.0
        self.phase_state = "online"
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending_manifest: bytes | None = None
        self._blobs: dict[str, bytes] = {}
        self._wanted_blobs: set[str] = set()
        # Outbox message id -> paho's handle; PUBACK is read off the handle by the worker, so no
        # lock is ever held across client.publish() (paho calls back under its own mutex).
        self._in_flight: dict[int, mqtt.MQTTMessageInfo] = {}
        self.stop_requested = threading.Event()
        self.connected = threading.Event()
        # systemd: READY, STATUS and the watchdog (a no-op anywhere else).
        self.notifier = Notifier.from_env()
        self._ready_sent = False
        self._heartbeat = config.state_dir / "heartbeat"
        self._heartbeat_at = float("-inf")
        self.client = self._make_client()

    # --- MQTT --------------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        s = self.config.mqtt
        if s.protocol == 5:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=s.client_id, protocol=mqtt.MQTTv5)
        else:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=s.client_id,
                protocol=mqtt.MQTTv311,
                clean_session=False,
            )
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if s.tls:
            client.tls_set(ca_certs=s.ca_file, certfile=s.cert_file, keyfile=s.key_file)
        offline = json.dumps({"device_id": self.config.device_id, "state": "offline"}).encode()
        client.will_set(self.topics.status(self.config.device_id), offline, qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def _connect(self) -> None:
        s = self.config.mqtt
        if s.protocol == 5:
            # clean_start=False with a session expiry: the broker keeps our subscriptions and
            # queued QoS 1 messages across our reconnects and its own restarts.
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = s.session_expiry_s
            self.client.connect_async(s.host, s.port, s.keepalive, clean_start=False, properties=props)
        else:
            self.client.connect_async(s.host, s.port, s.keepalive)

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        if reason_code.is_failure:
            log.error("broker refused the connection: %s", reason_code)
            return
        client.subscribe([(self.topics.manifest, 1), (self.topics.rotation_filter, 1)])
        with self._lock:
            for sha in self._wanted_blobs:
                client.subscribe(self.topics.blob(sha), qos=1)
        self.connected.set()
        log.info("connected to %s", self.config.mqtt.url)
        self._publish_status()
        if not self._ready_sent:  # state loaded and the broker reached: the service is up
            self._ready_sent = self.notifier.ready(status_line(self.status()))
        with self._wake:
            self._wake.notify_all()  # the worker flushes the outbox

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        self.connected.clear()
        if not self.stop_requested.is_set():
            log.warning("disconnected (%s); reconnecting with backoff", reason_code)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """Queues for the worker (which verifies). Never raises: paho 2.x re-raises a
        callback's exception, which ends its network thread and with it the connection."""
        topic = "?"
        try:
            topic = msg.topic
            payload = bytes(msg.payload)
            with self._wake:
                dropped = self._queue_locked(topic, payload)
                self._wake.notify_all()
            if dropped is not None:
                self._drop(dropped[0], topic, dropped[1])
        except Exception as exc:  # one message never ends the service
            self._drop(f"handler_error:{type(exc).__name__}", topic, repr(exc), exc)

    def _queue_locked(self, topic: str, payload: bytes) -> tuple[str, str] | None:
        """Queues one message (``_lock`` held); returns ``(reason, detail)`` if it is dropped.
        Empty payloads are cleared retained messages: nothing to do, nothing wrong."""
        if topic == self.topics.manifest:
            if payload:
                self._pending_manifest = payload  # only the newest matters
        elif topic.startswith(self.topics.base + "/keys/rotation/"):
            if len(payload) > MAX_MANIFEST_FRAME_BYTES:
                return "rotation_too_large", f"{len(payload)} bytes > {MAX_MANIFEST_FRAME_BYTES}"
            if payload:
                self._pending_rotations.append(payload)
        elif topic.startswith(self.topics.base + "/blob/"):
            sha = topic.rsplit("/", 1)[-1]
            if not payload:
                return None
            if sha not in self._wanted_blobs:
                return "blob_unwanted", "no manifest being fetched names it"
            if len(payload) > MAX_BLOB_BYTES:
                return "blob_too_large", f"{len(payload)} bytes > {MAX_BLOB_BYTES}"
            if hashlib.sha256(payload).hexdigest() != sha:
                return "blob_hash_mismatch", "its SHA-256 is not the one in its topic"
            self._blobs[sha] = payload
        else:
            return "unexpected_topic", "not a topic the agent subscribes to"
        return None

    def _drop(self, reason: str, topic: str, detail: str, exc: BaseException | None = None) -> None:
        """Counts a message that was not handled (either thread; takes ``_lock``); the first of
        each reason is logged with what to do, the rest only counted (``messages_dropped`` in
        the device's status)."""
        with self._lock:
            self._dropped[reason] += 1
            first = self._dropped[reason] == 1
        if first:
            # A blob nobody asked for is routine (a delivery already in flight when the fetch
            # ended): worth a count, not an alarm.
            level = logging.INFO if reason in _ROUTINE_DROPS else logging.ERROR
            log.log(
                level,
                "dropped a message on %s (%s): %s. %s Further ones are only counted "
                "(messages_dropped in the device status).",
                topic,
                reason,
                detail,
                _DROP_ADVICE.get(reason.split(":")[0].split("_")[0], ""),
                exc_info=exc,
            )

    def _publish_status(self) -> None:
        with self._lock:
            status = self.status()
        self.notifier.status(status_line(status))
        self.client.publish(
            self.topics.status(self.config.device_id), json.dumps(status).encode(), qos=1, retain=True
        )

    def status(self) -> dict[str, Any]:
        st = self.state.load()
        outbox = self.outbox.stats()
        return {
            "device_id": self.config.device_id,
            "state": self.phase_state,
            "model_version": st.manifest_version,
            "round_id": self.current.round_id if self.current else None,
            "samples": int(self.data.x_train.shape[0]) if self.data else None,
            "holdout_samples": int(self.data.x_holdout.shape[0]) if self.data else None,
            "runtime": self.trainer.runtime.name if self.trainer else None,
            "outbox_pending": outbox.pending,
            "outbox_dropped_total": outbox.dropped_total,
            "rejected_manifests": dict(self.rejected_manifests),
            "messages_dropped": dict(self._dropped),
            "last_error": self.last_error,
            "data": self.data_report() if self.data_report is not None else None,
            "time": self.clock(),
        }

    # --- the worker ----------------------------------------------------------------------------

    def _flush_outbox(self) -> None:
        """Acknowledges what the broker PUBACKed, then publishes what is not yet in flight."""
        for message_id, info in list(self._in_flight.items()):
            if info.is_published():
                self.outbox.acknowledge(message_id)
                del self._in_flight[message_id]
                log.info("message %d acknowledged by the broker", message_id)
        if not self.connected.is_set():
            return
        for message in self.outbox.pending():
            if message.id in self._in_flight:
                continue  # paho itself retries messages in flight on this session
            info = self.client.publish(message.topic, message.payload, qos=message.qos)
            self.outbox.mark_in_flight(message.id, info.mid)
            self.outbox.record_attempt(message.id)
            self._in_flight[message.id] = info

    def _alive(self, *_: object) -> None:
        """The loop is alive: pings systemd's watchdog and, at most every few seconds, touches
        ``state_dir/heartbeat`` (what the container's HEALTHCHECK reads)."""
        self.notifier.watchdog()
        now = time.monotonic()
        if now - self._heartbeat_at >= HEARTBEAT_INTERVAL_S:
            self._heartbeat_at = now
            try:
                self._heartbeat.touch()
            except OSError as exc:
                log.warning("cannot touch %s: %s", self._heartbeat, exc.strerror)

    def _apply_rotations(self) -> bool:
        """Applies queued signing-key rotations in sequence order; True if one was accepted."""
        with self._lock:
            frames, self._pending_rotations = self._pending_rotations, []
        accepted = False
        for frame in sorted(frames, key=rotation_sequence_of):
            try:
                if self.trust.accept_rotation(frame, self.clock()):
                    accepted = True
                    log.info("accepted signing-key rotation %d", self.trust.rotation_sequence)
            except FedgeError as exc:
                reason = getattr(exc, "reason", "bad_rotation")
                self.rejected_manifests[f"rotation_{reason}"] = (
                    self.rejected_manifests.get(f"rotation_{reason}", 0) + 1
                )
                log.warning("signing-key rotation refused: %s", exc)
        return accepted

    def _reject_manifest(self, reason: str, detail: str) -> None:
        self.rejected_manifests[reason] = self.rejected_manifests.get(reason, 0) + 1
        self.last_error = f"manifest rejected: {detail}"
        log.warning("manifest rejected (%s): %s", reason, detail)

    def _accept_manifest(self, frame: bytes) -> RoundManifest | None:
        if len(frame) > MAX_MANIFEST_FRAME_BYTES:
            self._reject_manifest("too_large", f"{len(frame)} bytes")
            return None
        try:
            doc, _ = verify_document(
                frame, DocType.ROUND_MANIFEST, self.trust.trusted_keys(), MAX_MANIFEST_FRAME_BYTES
            )
            manifest = round_manifest_from_dict(doc)
        except SignatureError as exc:
            if exc.reason == "unknown_key":
                self._parked_manifest = frame  # maybe signed by a key a rotation will vouch for
            self._reject_manifest(exc.reason, str(exc))
            return None
        except RoundManifestError as exc:
            self._reject_manifest("bad_manifest", str(exc))
            return None
        if manifest.fleet != self.config.fleet:
            self._reject_manifest("wrong_fleet", f"manifest for fleet {manifest.fleet!r}")
            return None
        if self.clock() > manifest.expires_at:
            self._reject_manifest("expired", f"manifest v{manifest.version} expired")
            return None
        try:
            is_new = self.state.accept_manifest(
                manifest.version, manifest.sha256(), parent_sha256=manifest.parent_sha256
            )
        except ManifestRollbackError as exc:
            self._reject_manifest("rollback", str(exc))
            return None
        except ManifestChainError as exc:
            self._reject_manifest("broken_chain", str(exc))
            return None
        if not is_new and self.current is not None and self.current.version == manifest.version:
            return None  # the same manifest again (retained re-delivery)
        return manifest

    def _fetch_blobs(self, manifest: RoundManifest) -> tuple[bytes, bytes] | None:
        wanted = {manifest.model_sha256, manifest.weights_sha256}
        if self.model_sha256 == manifest.model_sha256:
            wanted.discard(manifest.model_sha256)
        with self._wake:
            self._wanted_blobs = set(wanted)
            self._blobs = {k: v for k, v in self._blobs.items() if k in wanted}
        for sha in wanted:
            self.client.subscribe(self.topics.blob(sha), qos=1)
        deadline = time.monotonic() + self.config.blob_timeout_s
        with self._wake:
            while not wanted <= set(self._blobs):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.stop_requested.is_set() or self._pending_manifest is not None:
                    break
                self._wake.wait(min(remaining, 0.5))
                self._alive()  # a long but healthy wait is not a hang
            got = dict(self._blobs)
            self._wanted_blobs = set()
        for sha in wanted:
            self.client.unsubscribe(self.topics.blob(sha))
        if not wanted <= set(got):
            if self._pending_manifest is None:
                self.last_error = f"blobs for manifest v{manifest.version} did not arrive"
                log.warning("%s", self.last_error)
            return None
        model = got.get(manifest.model_sha256, b"")
        weights = got[manifest.weights_sha256]
        if len(weights) != manifest.weights_bytes:
            self._reject_manifest("bad_blob", "weights blob has the wrong size")
            return None
        return model, weights

    def _load(self, manifest: RoundManifest, model: bytes, weights_raw: bytes) -> LiteRTTrainer:
        if self.trainer is None or self.model_sha256 != manifest.model_sha256:
            self.trainer = LiteRTTrainer(model, manifest.model_manifest, self.config.runtime)  # type: ignore[arg-type]
            self.model_sha256 = manifest.model_sha256
        self.trainer.normalisation = manifest.normalisation
        self.trainer.set_weights(weights_from_bytes(weights_raw, manifest.model_manifest.parameter_count))
        return self.trainer

    def _local_data(self, task: TaskSpec) -> LocalData:
        """This round's local data (a live source keeps growing), split (seeded) for evaluation."""
        x, y = self.data_provider(task)
        if x.shape[0] < 2:
            raise ConfigError(f"device {self.config.device_id} has {x.shape[0]} samples; needs at least 2")
        d = self.config.data
        self.data = split_holdout(x, y, d.holdout_fraction, d.seed)
        return self.data

    def _seal_and_queue(
        self, manifest: RoundManifest, kind: str, header: dict[str, Any], body: bytes
    ) -> None:
        counter = self.state.next_counter()  # persisted before sealing: never reused after a crash
        sealed_header = SealedHeader(
            self.config.fleet, self.config.device_id, manifest.round_id, counter, kind, manifest.version
        )
        frame = seal(sealed_header, header, body, self.device_key, self.config.aggregator_public_key)
        self.outbox.put(self.topics.update(self.config.device_id), frame, 1, manifest.round_id, kind)
        log.info(
            "%s for round %s sealed (%d bytes, counter %d)", kind, manifest.round_id, len(frame), counter
        )

    def _work_on(self, manifest: RoundManifest) -> None:
        dropped = self.outbox.drop_rounds(lambda r: r != manifest.round_id)
        if dropped:
            log.info("dropped %d queued message(s) of rounds that closed", dropped)
        pending = {m.id for m in self.outbox.pending()}
        self._in_flight = {k: v for k, v in self._in_flight.items() if k in pending}
        blobs = self._fetch_blobs(manifest)
        if blobs is None:
            return
        trainer = self._load(manifest, *blobs)
        self.current = manifest
        st = self.state.load()
        if manifest.phase == "final" or not manifest.is_selected(self.config.device_id):
            self.phase_state = "idle"
            self._publish_status()
            return
        if st.last_round_id == manifest.round_id:
            return  # already contributed to this round (e.g. restarted after sealing)
        if self.clock() > manifest.deadline:
            self.phase_state = "idle"
            log.info("round %s closed before this device could take part", manifest.round_id)
            return
        self.phase_state = "training"
        self._publish_status()
        data = self._local_data(manifest.model_manifest.task)
        if manifest.phase == "moments":
            x = data.x_train.astype(np.float64)
            header, body = encode_moments(x.shape[0], x.sum(axis=0), (x * x).sum(axis=0))
        else:
            global_weights = trainer.get_weights()
            evaluation = None
            if data.x_holdout.shape[0] > 0:
                ev = trainer.evaluate(data.x_holdout, data.y_holdout)
                evaluation = Evaluation(ev.examples, ev.loss, ev.accuracy, ev.mse)
            losses = trainer.fit(
                data.x_train,
                data.y_train,
                rng=np.random.default_rng([self.config.data.seed, manifest.version]),
                progress=self._alive,  # long training is not a hang
            )
            delta = trainer.get_weights() - global_weights
            header, body = encode_update(
                delta.astype(np.float32),
                manifest.model_manifest.layout,
                manifest.codec,
                int(data.x_train.shape[0]),
                losses[-1],
                evaluation,
            )
        if self.clock() > manifest.deadline:
            log.warning("round %s closed while training; update not sent", manifest.round_id)
            self.phase_state = "idle"
            return
        self._seal_and_queue(
            manifest, manifest.phase if manifest.phase == "moments" else "update", header, body
        )
        self.state.update(lambda s: replace(s, last_round_id=manifest.round_id))
        self.phase_state = "idle"
        self._flush_outbox()
        self._publish_status()

    def _worker(self) -> None:
        while not self.stop_requested.is_set():
            self._alive()  # a hung worker stops pinging and systemd (or Docker) restarts the agent
            with self._wake:
                if self._pending_manifest is None:
                    self._wake.wait(0.5)
            self._work_once()

    def _work_once(self) -> None:
        """One turn of the worker: flush the outbox, apply rotations, handle the newest manifest
        (if one is pending), publish the status when due.

        Never raises an Exception: fedge's own errors (bad data, a full outbox) are reported
        in ``last_error``; anything else is a bug, counted as ``handler_error:<type>`` in
        ``messages_dropped`` and logged, and the worker goes on with the next message.
        """
        with self._lock:
            frame, self._pending_manifest = self._pending_manifest, None
        try:
            self._flush_outbox()
            if self._apply_rotations() and frame is None and self._parked_manifest is not None:
                frame, self._parked_manifest = self._parked_manifest, None
            if frame is not None:
                manifest = self._accept_manifest(frame)
                if manifest is not None:
                    self._work_on(manifest)
            if time.monotonic() >= self._next_status_at and self.connected.is_set():
                self._publish_status()
                self._next_status_at = time.monotonic() + self.config.status_interval_s
        except FedgeError as exc:  # bad data, full outbox...: reported, never a crash
            self.last_error = str(exc)
            log.error("%s", exc)
        except Exception as exc:  # one message never ends the service
            self.last_error = f"{type(exc).__name__}: {exc}"
            where = self.topics.manifest if frame is not None else "the worker"
            self._drop(f"handler_error:{type(exc).__name__}", where, repr(exc), exc)

    def run(self) -> int:
        self._connect()
        self.client.loop_start()
        worker = threading.Thread(target=self._worker, name="fedge-agent-worker", daemon=True)
        worker.start()
        try:
            while not self.stop_requested.wait(0.5):
                if not worker.is_alive():
                    log.error("worker thread died")
                    return 1
            return 0
        finally:
            self.notifier.stopping("offline")
            self.stop_requested.set()
            with self._wake:
                self._wake.notify_all()
            worker.join(timeout=10)
            self.phase_state = "offline"
            if self.connected.is_set():
                info = self.client.publish(
                    self.topics.status(self.config.device_id),
                    json.dumps(self.status()).encode(),
                    qos=1,
                    retain=True,
                )
                info.wait_for_publish(timeout=2)
            self.client.disconnect()
            self.client.loop_stop()
            self.outbox.close()
            self.notifier.close()

    def request_stop(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        self.stop_requested.set()


def run_agent(
    config: AgentConfig, data_provider: DataProvider, data_report: Callable[[], dict[str, Any]] | None = None
) -> int:
    service = AgentService(config, data_provider, data_report=data_report)
    signal.signal(signal.SIGTERM, service.request_stop)
    signal.signal(signal.SIGINT, service.request_stop)
    return service.run()
