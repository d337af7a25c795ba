"""``fedge agent run``: the device's I/O shell around :class:`fedge.agent.core.DeviceCore`.

The core decides (verifies manifests, names the blobs to fetch, says when to train and what to
seal); this shell does the I/O it asks for, in the order it asks: MQTT, the files in the state
directory, the LiteRT trainer, systemd. Its stages come from :func:`fedge.agent.wiring.build_agent`.

Threads: paho's network thread only checks blobs against the wanted set and queues (manifests,
rotations, blobs); one worker thread drives the core, loads and trains. Neither polls: the
worker sleeps until its nearest deadline (:meth:`AgentService._next_turn_in`: the status
interval, a retry, the systemd watchdog, its liveness beat every :data:`IDLE_WAKE_S`) unless
something wakes it first (a message queued, a PUBACK, a connection, new live windows, a
write-back request ending, stop); paho's thread waits for traffic (a quarter keepalive at
most, :func:`fedge.shell.mqtt.start_loop`); the main thread waits for stop alone. Sealed messages go
through the on-disk outbox first and leave it only when the broker acknowledges them (PUBACK),
so an update survives a crash or a broker outage; updates of rounds that closed are dropped (and
logged) when a newer manifest arrives.

Secure aggregation (with ``[agent] identity_key_file`` and the rest): on every connect the agent
publishes its identity certificate (retained) and subscribes to the fleet's certificates and to
the secure rounds' documents; paho's thread verifies certificates and queues round documents in
:class:`~fedge.agent.secure_agent.SecureRounds`, which the worker drives after the core hands it
a trained delta (:class:`~fedge.agent.core.SecureUpdate`). Its sealed frames take the same path
as updates: a counter reserved and persisted first, the outbox, PUBACK.

Personalisation (``[personalisation]``, :mod:`fedge.agent.personal`): once the round in hand is
done (the update sent, or the device not taking part), the worker fine-tunes a copy of the newest
global model on the device's training part and predicts with it from then on; the trainer holds
the global weights again afterwards, so the next update is what it would have been without.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

import numpy as np
import paho.mqtt.client as mqtt

from fedge.agent.chunk_transfer import BlobPieces, outbox_frames
from fedge.agent.core import (
    MAX_BLOB_BYTES,
    MAX_MANIFEST_FRAME_BYTES,
    Action,
    DropOtherRounds,
    FetchBlobs,
    Load,
    Note,
    Persist,
    Phase,
    RefuseRound,
    Reject,
    SaveResidual,
    SecureUpdate,
    Send,
    StatusState,
    Train,
    check_blob,
)
from fedge.agent.error_feedback import ResidualError
from fedge.agent.insight import InsightPublisher
from fedge.agent.rollout import RolloutFollower
from fedge.agent.systemd_notify import Notifier, status_line
from fedge.agent.trainer import LiteRTTrainer
from fedge.agent.wiring import AgentStages, ProvidedData
from fedge.protocol.config_source import ConfigError
from fedge.protocol.errors import FedgeError
from fedge.protocol.key_rotation import read_rotation_unverified
from fedge.protocol.round_manifest import RoundManifest
from fedge.protocol.statuses import device_status, offline_will
from fedge.protocol.topics import TopicError
from fedge.protocol.weights import weights_from_bytes
from fedge.shell.drops import DroppedMessages
from fedge.shell.meters import Durations, Traffic
from fedge.shell.mqtt import connect, make_client, publish_queued, start_loop, stop_loop, watch_connection
from fedge.shell.storage_faults import STATE_DIR_RETRY_S, StateDirWatch, StorageFault
from fedge.shell.threads import name_current_thread

if TYPE_CHECKING:  # built only when configured (issue 18: what an agent does not run, it does not import)
    from fedge.agent.home_assistant import HomeAssistantDiscovery
    from fedge.agent.personal import PersonalWeights
    from fedge.agent.secure_agent import SecureRounds
    from fedge.shell.http_endpoint import HttpEndpoint

__all__ = [
    "MAX_BLOB_BYTES",
    "MAX_MANIFEST_FRAME_BYTES",
    "AgentService",
    "LocalData",
    "run_agent",
    "split_holdout",
]

log = logging.getLogger("fedge.agent")
HEARTBEAT_INTERVAL_S = 5.0
#: Fewer local samples than this: the device is not ready (no split into train and held-out).
MIN_LOCAL_SAMPLES = 2
#: How often a device selected without enough data looks at its data again.
DATA_RETRY_S = 5.0
#: The longest the worker sleeps with nothing to do. Each turn pings its liveness (the heartbeat
#: file, ``alive_at`` for /healthz): both fail after 120 s (``fedge.agent.metrics.LIVE_MAX_AGE_S``,
#: the image's ``FEDGE_HEALTH_MAX_AGE_S``), so an idle worker is never near looking hung.
IDLE_WAKE_S = 30.0
#: How often the worker asks a data source that cannot tell when it has new live windows (no
#: ``set_live_listener``) for them, while predictions are on: every LIVE_POLL_S while they come,
#: twice as long after each ask that found none, at most LIVE_POLL_MAX_S (a silent sensor feed
#: costs a wake-up every 8 s; its first window after the pause waits at most that long).
LIVE_POLL_S = 1.0
LIVE_POLL_MAX_S = 8.0
#: While a secure-aggregation round is in hand the worker turns at least this often: the round's
#: steps have deadlines of their own (``fedge.agent.secure_agent``); that is a round, not idle.
SECURE_TURN_S = 0.5
#: If the worker's next deadline cannot be worked out, or stays in the past for MAX_BUSY_TURNS
#: turns in a row with nothing new (a bug), it turns this often instead of spinning.
FALLBACK_TURN_S = 0.5
MAX_BUSY_TURNS = 100
#: ``fedge_agent_training_seconds`` buckets: a local training takes seconds on a gateway,
#: minutes on a small board.
TRAINING_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
#: What to do about a message the agent dropped, by reason (the part before "_" or ":").
_DROP_ADVICE = {
    "blob": "A blob that is not (or not exactly) one this device asked for: a re-delivery, or "
    "someone who may publish blobs altered one; a manifest's blobs that never arrive intact "
    "leave the device on its model.",
    "rotation": "A signing-key rotation over the size bound: not from fedge's aggregator.",
    "unexpected": "A message on a topic the agent does not subscribe to.",
    "handler": "A bug in fedge: the message was skipped. Please report this traceback.",
    "identity": "An identity certificate that does not verify with [agent] operator_verify_keys for "
    "this fleet and the device its topic names: a device certified by another operator, or someone "
    "who may publish on identity/+ forging one. That device's secure-aggregation messages are refused.",
    "secagg": "A secure-aggregation round document or step refused (the reason says which): a round "
    "config that is not the one its manifest implies, a document not signed by the aggregator's key, "
    "a malicious request. The device sends nothing for it; see docs/secure-aggregation.md.",
    "plain": "A train round without secure aggregation, refused because of [agent] "
    "require_secure_aggregation = true: the device installs the model but sends no plain update.",
    "state": "The round's manifest or update could not be stored before a newer manifest closed the round: "
    "[agent] state_dir was full or read-only (logged when it began). Free space there or remount it "
    "read-write; the agent takes part again by itself once it can write.",
}
#: Dropped messages that happen in a healthy fleet: logged at INFO, not ERROR.
_ROUTINE_DROPS = frozenset({"blob_unwanted", "plain_round_refused"})


@dataclass(frozen=True)
class LocalData:
    """The device's own samples (raw features), split into training and held-out parts."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_holdout: np.ndarray
    y_holdout: np.ndarray


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


#: Copies of the open round's update sent after reconnects (:meth:`AgentService._resend_lost_update`).
RESENDS_PER_ROUND = 2


class AgentService:
    def __init__(self, stages: AgentStages, clock: Callable[[], float] = time.time) -> None:
        config = stages.config
        self.config = config
        self.source = stages.source
        self.core = stages.core
        self.state = stages.state
        self.outbox = stages.outbox
        self.residuals = stages.residuals
        self.personal = stages.personal
        self._personal_retry_at = 0.0  # too little data to fine-tune: when to look again
        self._personal_save_at = 0.0  # a full or read-only state dir refused personal.bin: when to retry
        self.trust = stages.trust
        self.clock = clock
        self.topics = self.core.topics
        self.data: LocalData | None = None
        self._data_version: int | None = None  # the manifest version self.data was read for
        self._local_samples: int | None = None
        self._data_retry_at = 0.0
        self._pending_rotations: list[bytes] = []
        self._parked_manifest: bytes | None = None
        self.trainer: LiteRTTrainer | None = None
        self.rejected_manifests: dict[str, int] = {}
        # Messages not handled, by reason (paho's thread and the worker count).
        self.dropped = DroppedMessages(
            log, _DROP_ADVICE, "messages_dropped in the device status", _ROUTINE_DROPS
        )
        self._next_status_at = 0.0
        # The open round's update and the copies sent after reconnects (_resend_lost_update).
        self._last_update: Send | None = None
        self._resends = 0
        self._resend_due = False
        self.phase_state = "online"
        self.last_error: str | None = None
        # A full or read-only state directory: the first failed write of an episode is logged,
        # the round's actions from the failed one on wait here and are tried again every
        # STATE_DIR_RETRY_S until they succeed or a newer manifest closes the round (counted).
        self.state_dir_watch = StateDirWatch(
            log,
            "[agent] state_dir",
            config.state_dir,
            "agent",
            "the round in hand waits in memory until the round closes, and what is lost is counted "
            "(messages_dropped: state_dir_full, state_dir_read_only in the device status)",
        )
        self._parked: list[Action] = []
        self._parked_retry_at = 0.0
        self._heartbeat_failing = False
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        # Set (under _lock) by whatever gives the worker work; the worker clears it before a turn
        # and sleeps only while it is clear, so a wake-up during a turn is never lost.
        self._kicked = False
        #: Times the worker slept and woke (a deadline, or something to do): an idle agent's
        #: count grows by a few a minute (tests/agent/test_agent_wakeups.py).
        self.worker_wakeups = 0
        self._worker_died = False
        self._next_turn_failed = False  # _next_turn_in's failure logged (once)
        self._busy_turns = 0  # turns in a row with a deadline already due and nothing new
        self._flush_retry_at: float | None = None  # a flush the state directory stopped: when again
        self._live_asked_at = 0.0  # a source without set_live_listener: last asked (monotonic)...
        self._live_poll_s = LIVE_POLL_S  # ... and when to ask again (backs off while none come)
        self._pending_manifest: bytes | None = None
        self._blobs: dict[str, bytes] = {}
        self._wanted_blobs: frozenset[str] = frozenset()
        # Blobs over the aggregator's chunk_bytes arrive in pieces (fedge.agent.chunk_transfer).
        self.blob_pieces = BlobPieces(MAX_BLOB_BYTES)
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
        # For [metrics] (fedge.agent.metrics, read from the HTTP server's threads): the worker's
        # last turn (time.monotonic()), and what the status lacks, recorded as it happens.
        self.alive_at: float | None = None
        self.traffic = Traffic(self.topics.base)
        self.training_durations = Durations(TRAINING_BUCKETS)
        self.endpoint: HttpEndpoint | None = None
        # The Last Will is the status's own shape, every value empty (fedge.protocol.statuses).
        offline = offline_will(config.device_id)
        self.client = make_client(config.mqtt, will=(self.topics.status(config.device_id), offline))
        watch_connection(self.client, log, self._on_connect, self.connected.clear)
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        # Live predictions (insight/{device_id}): the verified global model in an interpreter of
        # its own, run by the worker on the source's live windows (fedge.agent.insight).
        self.insights = InsightPublisher(
            config.insight,
            config.device_id,
            config.fleet,
            self.topics.insight(config.device_id),
            config.runtime,
            self._publish_insight,
            on_published=self._insight_published,
            personalised=stages.personal is not None,
        )
        # [rollout] on the aggregator: the promoted weights predictions use (fedge.agent.rollout).
        self.rollout = RolloutFollower(config.state_dir, self.topics, self.insights.promote)
        # Optional, off by default: Home Assistant discovery of the prediction, and write-back
        # rules through EdgeX core-command (both act on published predictions only).
        self._connections = 0  # CONNACKs so far: the discovery config goes out once per connection
        self.home_assistant: HomeAssistantDiscovery | None = None
        if config.insight.home_assistant:
            from fedge.agent.home_assistant import HomeAssistantDiscovery  # noqa: PLC0415 - when configured

            self.home_assistant = HomeAssistantDiscovery(
                config.insight.home_assistant_prefix,
                config.fleet,
                config.device_id,
                self.topics.insight(config.device_id),
                self.topics.status(config.device_id),
                self._publish_insight,
            )
        self.writeback = stages.writeback
        if self.writeback is not None:
            self.writeback.on_finished = self._kick  # a failed write is pending again
        # A source that says when it has new live windows wakes the worker for them; any other
        # that can have some (not recorded arrays, not an EdgeX source without a live builder:
        # [insight] publish = "off") is asked every LIVE_POLL_S, backing off to LIVE_POLL_MAX_S.
        listen = getattr(self.source, "set_live_listener", None)
        if callable(listen):
            listen(self._kick)
        self._live_polled = (
            not callable(listen)
            and not isinstance(self.source, ProvidedData)
            and getattr(self.source, "live_builder", True) is not None
        )
        self.secure: SecureRounds | None = None
        if stages.secure is not None:
            from fedge.agent.secure_agent import RevealedRecords, SecureRounds  # noqa: PLC0415 - when configured

            self.secure = SecureRounds(
                fleet=config.fleet,
                device_id=config.device_id,
                identity=stages.secure,
                box_key=self.core.identity.device_key,
                aggregator_box_key=self.core.identity.aggregator_key,
                aggregator_keys=self.trust.trusted_keys,
                reserve_counter=self._reserve_counter,
                records=RevealedRecords(config.state_dir),
                count=self._drop,
            )

    @property
    def current(self) -> RoundManifest | None:
        """The newest manifest whose blobs arrived."""
        return self.core.current

    @property
    def model_sha256(self) -> str | None:
        """The model the trainer has loaded (its blob is not fetched again)."""
        return self.core.loaded_model_sha256

    # --- MQTT --------------------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client) -> None:
        """After each successful CONNACK (a refusal or a lost connection is logged by
        :func:`~fedge.shell.mqtt.watch_connection`, which clears ``connected``)."""
        client.subscribe(
            [(self.topics.manifest, 1), (self.topics.rotation_filter, 1), (self.topics.rollout, 1)]
        )
        if self.secure is not None:
            client.subscribe(self.secure.subscriptions)
            own = self.secure.identity_publication()
            client.publish(own.topic, own.payload, qos=own.qos, retain=own.retain)
            self.traffic.outbound(own.topic, len(own.payload))
        with self._lock:
            for sha in self._wanted_blobs | {s for s in [self.rollout.wanted_blob()] if s}:
                client.subscribe(self.topics.blob(sha), qos=1)
            for sha in self._wanted_blobs | {s for s in [self.rollout.wanted_blob()] if s}:
                client.subscribe(self.topics.blob_chunk_filter(sha), qos=1)
        self._connections += 1
        if self._connections > 1:
            self._resend_due = True  # the broker may have lost the open round's update
        self.connected.set()
        log.info("connected to %s", self.config.mqtt.url)
        self._publish_status()
        # And the worker once more, soon: paho sends the QoS 1 messages queued before an outage
        # only after on_connect returns, so a status queued then (published as the connection
        # dropped) would overtake this one and the broker would retain the older (found by the
        # chaos loop: a device's installed model seemed to go back after a broker restart).
        self._next_status_at = 0.0
        if not self._ready_sent:  # state loaded and the broker reached: the service is up
            self._ready_sent = self.notifier.ready(status_line(self.status()))
        self._kick()  # the worker flushes the outbox, publishes the status

    def _kick(self) -> None:
        """Wakes the worker for a turn now (any thread): there is something to do."""
        with self._wake:
            self._kicked = True
            self._wake.notify_all()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        """A PUBACK (paho's thread): with outbox messages in flight the worker acknowledges them
        in the outbox now (the status's ``outbox_pending``), not at its next deadline."""
        if self._in_flight:
            self._kick()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """Queues for the worker (which verifies). Never raises: paho 2.x re-raises a
        callback's exception, which ends its network thread and with it the connection."""
        topic = "?"
        try:
            topic = msg.topic
            payload = bytes(msg.payload)
            self.traffic.inbound(topic, len(payload))
            if self.secure is not None and self.secure.handles(topic):
                # Certificates are verified here, outside the lock; round documents only queued.
                refused = self.secure.offer(topic, payload)
                self._kick()
                if refused is not None:
                    self._drop(refused[0], topic, refused[1])
                return
            with self._wake:
                dropped = self._queue_locked(topic, payload)
                self._kicked = True
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
        elif topic == self.topics.rollout:
            return self.rollout.offer(payload)
        elif topic.startswith(self.topics.base + "/blob/"):
            if not payload:
                return None
            if topic.count("/") > self.topics.blob_filter.count("/"):  # blob/{sha256}/{index}
                return self._blob_piece_locked(topic, payload)
            sha = topic.rsplit("/", 1)[-1]
            if self.rollout.offer_blob(sha, payload) and sha not in self._wanted_blobs:
                return None  # the promoted weights (fedge.agent.rollout)
            refused = check_blob(sha, payload, self._wanted_blobs)
            if refused is not None:
                return refused
            self._blobs[sha] = payload
        else:
            return "unexpected_topic", "not a topic the agent subscribes to"
        return None

    def _blob_piece_locked(self, topic: str, payload: bytes) -> tuple[str, str] | None:
        """One piece of a blob being fetched (``_lock`` held); the whole, once it verifies, is
        kept like a blob that arrived whole."""
        try:
            sha, index = self.topics.blob_chunk_parse(topic)
        except TopicError as exc:
            return "blob_bad_chunk", str(exc)
        promoted = self.rollout.wanted_blob()  # the rollout gate's weights (fedge.agent.rollout)
        wanted = self._wanted_blobs | {promoted} if promoted else self._wanted_blobs
        got = self.blob_pieces.offer(sha, index, payload, wanted)
        if not isinstance(got, bytes):
            return got
        if self.rollout.offer_blob(sha, got) and sha not in self._wanted_blobs:
            return None
        refused = check_blob(sha, got, self._wanted_blobs)
        if refused is not None:
            return refused
        self._blobs[sha] = got
        return None

    def _drop(self, reason: str, topic: str, detail: str, exc: BaseException | None = None) -> None:
        """Counts a message that was not handled (either thread): ``messages_dropped`` in the
        device's status; the first of each reason is logged with what to do."""
        self.dropped.count(reason, topic, detail, exc)

    def _publish_status(self) -> None:
        with self._lock:
            status = self.status()
        self.notifier.status(status_line(status))
        encoded = json.dumps(status).encode()
        self.client.publish(self.topics.status(self.config.device_id), encoded, qos=1, retain=True)
        self.traffic.outbound(self.topics.status(self.config.device_id), len(encoded))

    def status_now(self) -> dict[str, Any]:
        """The status, read under the lock the worker and paho's thread take for it (for
        another thread: the metrics endpoint)."""
        with self._lock:
            return self.status()

    def status(self) -> dict[str, Any]:
        st = self.state.load()
        outbox = self.outbox.stats()
        current = self.core.current
        # Every key must be in fedge.protocol.statuses.DEVICE_STATUS_EMPTY (the Last Will's shape).
        return device_status(
            self.config.device_id,
            self.phase_state,
            model_version=st.manifest_version,
            round_id=current.round_id if current else None,
            ready=self._ready(),
            samples=int(self.data.x_train.shape[0]) if self.data else None,
            holdout_samples=int(self.data.x_holdout.shape[0]) if self.data else None,
            runtime=self.trainer.runtime.name if self.trainer else None,
            outbox_pending=outbox.pending,
            outbox_dropped_total=outbox.dropped_total,
            rejected_manifests=dict(self.rejected_manifests),
            messages_dropped=self.dropped.counts(),
            last_error=self.last_error,
            data=self.source.report(),
            insights=self._insights_report(),
            personalisation=self.personal.report() if self.personal is not None else None,
            rollout=self.rollout.report(self.insights.predicting_version),
            time=self.clock(),
        )

    def _ready(self) -> bool:
        """Whether this device can take part: not waiting for data in a round, and its source
        holds enough samples (a source that cannot tell counts as ready). The aggregator
        waits for, and selects, ready devices."""
        if self.phase_state == "not_ready":
            return False
        available = self.source.available()
        return available is None or available >= MIN_LOCAL_SAMPLES

    # --- the worker: carrying out what the core asks -----------------------------------------

    def _flush_outbox(self) -> None:
        """Acknowledges what the broker PUBACKed, then publishes what is not yet in flight.

        A full or read-only state directory stops the flush with nothing lost: an acknowledged
        message stays in flight (and in the outbox) until its deletion can be written, and a
        message is in flight before its bookkeeping is written, so it is not published twice."""
        in_flight = len(self._in_flight)
        try:
            self._flush_outbox_now()
        except StorageFault as exc:
            self._write_failed(exc)
            self._flush_retry_at = time.monotonic() + STATE_DIR_RETRY_S
            return
        self._flush_retry_at = None
        if len(self._in_flight) < in_flight:  # an acknowledgement was written
            self._wrote()
            if not self._in_flight and self.connected.is_set() and self.outbox.stats().pending == 0:
                self._publish_status()  # the fleet sees the backlog gone now, not a status interval later

    def _write_failed(self, exc: StorageFault) -> None:
        """A write the state directory refused (full, read-only): logged once per episode, and
        the status's ``last_error`` until a write succeeds again."""
        self.last_error = self.state_dir_watch.failed(exc)

    def _wrote(self) -> None:
        """A write succeeded: an episode of a full or read-only state directory is over."""
        problem = self.state_dir_watch.problem
        if self.state_dir_watch.wrote() and self.last_error == problem:
            self.last_error = None

    def _flush_outbox_now(self) -> None:
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
            info = publish_queued(self.client, message.topic, message.payload, qos=message.qos)
            self.traffic.outbound(message.topic, len(message.payload))
            self._in_flight[message.id] = info  # first: a failed write below must not publish it twice
            self.outbox.mark_in_flight(message.id, info.mid)
            self.outbox.record_attempt(message.id)

    def _alive(self, *_: object) -> None:
        """The loop is alive: pings systemd's watchdog and, at most every few seconds, touches
        ``state_dir/heartbeat`` (what the container's HEALTHCHECK reads)."""
        self.notifier.watchdog()
        now = time.monotonic()
        self.alive_at = now
        if now - self._heartbeat_at >= HEARTBEAT_INTERVAL_S:
            self._heartbeat_at = now
            try:
                self._heartbeat.touch()
            except OSError as exc:
                if not self._heartbeat_failing:  # once until it works again
                    log.warning("cannot touch %s: %s", self._heartbeat, exc.strerror)
                self._heartbeat_failing = True
            else:
                self._heartbeat_failing = False

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

    def _carry_out(self, actions: list[Action]) -> None:
        """Does what the core asked, in order (a Persist before the Send that needs it).

        A write the state directory refuses (full, read-only) parks that action and the ones
        after it: :meth:`_retry_parked` carries them out, in order, once it can write, unless a
        newer manifest closes the round first (:meth:`_drop_parked`). Nothing is skipped, so a
        Send never goes before its Persist."""
        for i, action in enumerate(actions):
            try:
                self._carry_out_each([action])
            except StorageFault as exc:
                self._write_failed(exc)
                self._parked = [*actions[i:], *self._parked]
                self._parked_retry_at = time.monotonic() + STATE_DIR_RETRY_S
                return
            if isinstance(action, Persist | Send):
                self._wrote()

    def _retry_parked(self) -> None:
        """The actions a full or read-only state directory stopped, again when due."""
        if self._parked and time.monotonic() >= self._parked_retry_at:
            parked, self._parked = self._parked, []
            self._carry_out(parked)

    def _drop_parked(self) -> None:
        """A newer manifest closes the round whose actions wait for the state directory: they
        are dropped and counted (``state_dir_full`` or ``state_dir_read_only``)."""
        parked, self._parked = self._parked, []
        if not parked:
            return
        problem = self.state_dir_watch.problem or ""
        reason = "state_dir_read_only" if " is read-only (" in problem else "state_dir_full"
        send = next((a for a in parked if isinstance(a, Send)), None)
        if send is not None:
            what, topic = f"the {send.kind} of round {send.round_id} (counter {send.counter})", send.topic
        else:
            pending = self.core.pending
            what, topic = f"round {pending.round_id if pending else '?'}", self.topics.manifest
        self._drop(reason, topic, f"{what} could not be stored before a newer manifest closed the round")
        self._abandon_round()

    def _carry_out_each(self, actions: list[Action]) -> None:
        """Does each of ``actions``; :meth:`_carry_out` hands them over one at a time."""
        for action in actions:
            if isinstance(action, Persist):
                self.state.save(action.state)
            elif isinstance(action, SaveResidual):
                if self.residuals is not None:
                    try:
                        self.residuals.save(action.residual)
                    except ResidualError as exc:  # the update still goes; a restart starts from zero
                        log.warning("%s", exc)
            elif isinstance(action, Reject):
                if action.frame is not None:
                    self._parked_manifest = action.frame  # maybe signed by a key a rotation vouches for
                self.rejected_manifests[action.reason] = self.rejected_manifests.get(action.reason, 0) + 1
                self.last_error = f"manifest rejected: {action.detail}"
                log.warning("manifest rejected (%s): %s", action.reason, action.detail)
            elif isinstance(action, DropOtherRounds):
                self._drop_other_rounds(action.round_id)
                if self.secure is not None:
                    self._carry_out_secure(self.secure.drop_other_rounds(action.round_id))
            elif isinstance(action, SecureUpdate):
                if self.secure is None:  # the core hands none out without an identity key
                    raise ConfigError("a secure round without an identity key")
                self._carry_out_secure(self.secure.begin(action, self.clock()))
            elif isinstance(action, RefuseRound):
                self._drop(action.reason, self.topics.manifest, action.detail)
            elif isinstance(action, FetchBlobs):
                self._carry_out(self._fetch(action.wanted))
            elif isinstance(action, Load):
                self._load(action)
            elif isinstance(action, Train):
                self._carry_out(self._train(action))
            elif isinstance(action, Send):
                message_id = self._queue_sealed(action.topic, action.frame, action.round_id, action.kind)
                if action.kind == "update":
                    self._last_update, self._resends = action, 0
                log.info(
                    "%s for round %s sealed (%d bytes, counter %d, message %d)",
                    action.kind,
                    action.round_id,
                    len(action.frame),
                    action.counter,
                    message_id,
                )
                self._flush_outbox()
            elif isinstance(action, StatusState):
                self.phase_state = action.state
                if self.connected.is_set():  # offline: the reconnect publishes the fresh one
                    self._publish_status()
            elif isinstance(action, Note):
                if action.problem:
                    self.last_error = action.text
                    log.warning("%s", action.text)
                else:
                    log.info("%s", action.text)

    def _carry_out_secure(self, actions: list[Action]) -> None:
        """The secure round's actions; its "idle" only while the core has no round in hand."""
        self._carry_out(
            [a for a in actions if not isinstance(a, StatusState) or self.core.phase is Phase.WAITING]
        )

    def _reserve_counter(self) -> int:
        """The next sealed counter for a secure-aggregation frame, persisted before it is used."""
        reserve = self.core.reserve_counter()
        self.state.save(reserve.state)
        return reserve.state.update_counter

    def _secure_turn(self) -> None:
        """Drives the secure round: the documents that arrived, its deadlines."""
        if self.secure is None:
            return
        newest = self.core.pending or self.core.current
        self._carry_out_secure(self.secure.turn(self.clock(), newest.round_id if newest else None))

    def _resend_lost_update(self) -> None:
        """After a reconnect, each copy of the open round's manifest that arrives sends this
        device's update for that round once more (at most ``RESENDS_PER_ROUND`` times).

        A broker that crashed before its autosave comes back without what it acknowledged
        and had not yet delivered, and without the aggregator's subscription until the
        aggregator reconnects, which its republished manifest shows; a device cannot tell a
        crash from a network blip, so it resends after any reconnect. The first copy of the
        manifest may be the broker's retained one (the aggregator perhaps not subscribed yet),
        the second the aggregator's own after its reconnect. An aggregator that has the update
        refuses the copy as a ``duplicate`` (counted, logged at INFO): never counted twice.
        Found by the chaos loop (tests/e2e/test_chaos.py)."""
        if not self._resend_due:
            return
        last, current = self._last_update, self.core.current
        if last is None or current is None or current.round_id != last.round_id:
            self._resend_due = False  # nothing sent in the open round: nothing to lose
            return
        if self._resends >= RESENDS_PER_ROUND:
            return
        if any(m.round_id == last.round_id and m.kind == last.kind for m in self.outbox.pending()):
            return  # still in the outbox: it goes anyway
        self._resends += 1
        message_id = self._queue_sealed(last.topic, last.frame, last.round_id, last.kind)
        log.info(
            "reconnected in round %s: sent its update again in case the broker lost it "
            "(counter %d, message %d)",
            last.round_id,
            last.counter,
            message_id,
        )
        self._flush_outbox()

    def _queue_sealed(self, topic: str, frame: bytes, round_id: str, kind: str) -> int:
        """Puts a sealed message into the outbox: whole, or over ``[agent] chunk_bytes`` as
        sealed pieces, one entry each, so a reconnect sends again only the pieces the broker
        has not acknowledged (``fedge.agent.chunk_transfer``). Returns the last entry's id."""
        frames = outbox_frames(frame, self.config.chunk_bytes, self.core.identity)
        if len(frames) > 1:
            log.info("%s for round %s is %d bytes: %d sealed pieces", kind, round_id, len(frame), len(frames))
        if len(frames) == 1:
            return self.outbox.put(topic, frame, 1, round_id, kind)
        return self.outbox.put_all(topic, frames, 1, round_id, kind)[-1]

    def _drop_other_rounds(self, round_id: str) -> None:
        dropped = self.outbox.drop_rounds(lambda r: r != round_id)
        if dropped:
            log.info("dropped %d queued message(s) of rounds that closed", dropped)
        pending = {m.id for m in self.outbox.pending()}
        self._in_flight = {k: v for k, v in self._in_flight.items() if k in pending}

    def _fetch(self, wanted: frozenset[str]) -> list[Action]:
        """Collects the wanted blobs (checked in paho's thread) until all are in, the blob
        timeout passes, the service stops or a newer manifest arrives."""
        with self._wake:
            self._wanted_blobs = wanted
            self._blobs = {k: v for k, v in self._blobs.items() if k in wanted}
            self.blob_pieces.keep_only(wanted | {s for s in [self.rollout.wanted_blob()] if s})
        for sha in wanted:
            self.client.subscribe(self.topics.blob(sha), qos=1)
            self.client.subscribe(self.topics.blob_chunk_filter(sha), qos=1)
        deadline = time.monotonic() + self.config.blob_timeout_s
        with self._wake:
            while not wanted <= set(self._blobs):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.stop_requested.is_set() or self._pending_manifest is not None:
                    break
                self._wake.wait(min(remaining, self._liveness_due_in()))
                self._alive()  # a long but healthy wait is not a hang
            got = dict(self._blobs)
            superseded = self._pending_manifest is not None
            self._wanted_blobs = frozenset()
        for sha in wanted:
            self.client.unsubscribe(self.topics.blob(sha))
            self.client.unsubscribe(self.topics.blob_chunk_filter(sha))
        if wanted <= set(got):
            return self.core.blobs_arrived(got, self.clock())
        return self.core.superseded() if superseded else self.core.blobs_missing()

    def _load(self, action: Load) -> None:
        manifest = action.manifest
        if action.model is not None or self.trainer is None:
            if action.model is None:  # cannot happen: the core asks for the model when none is loaded
                raise ConfigError("no model loaded and none fetched")
            self.trainer = LiteRTTrainer(action.model, manifest.model_manifest, self.config.runtime)  # type: ignore[arg-type]
            self.core.model_loaded(manifest.model_sha256)
        self.trainer.normalisation = manifest.normalisation
        global_weights = weights_from_bytes(action.weights, manifest.model_manifest.parameter_count)
        self.trainer.set_weights(global_weights)
        self.insights.load(manifest, action.model, action.weights)  # never raises into the round
        if self.personal is not None:
            refused = self.personal.installed(manifest, global_weights)
            if refused is not None:
                log.info("%s", refused)
            self._predict_with(self.personal.serving)  # an older version's until this one's fine-tune

    def _local_data(self, manifest: RoundManifest) -> LocalData | None:
        """This round's local data (a live source keeps growing), split (seeded) for evaluation;
        None while there are fewer than MIN_LOCAL_SAMPLES."""
        x, y = self.source.training_data(manifest.model_manifest.task)
        self._local_samples = int(x.shape[0])
        if x.shape[0] < MIN_LOCAL_SAMPLES:
            return None
        d = self.config.data
        self.data = split_holdout(x, y, d.holdout_fraction, d.seed)
        self._data_version = manifest.version
        return self.data

    def _personalise(self) -> None:
        """Fine-tunes the installed global model into this device's personal weights
        (``[personalisation]``), once no round is in hand: after the federated update was sealed
        from the global weights, never before. Uses the data this round already read, else reads
        it; with too little, looks again every ``DATA_RETRY_S``. Predictions use the result."""
        personal, trainer = self.personal, self.trainer
        if (
            personal is None
            or trainer is None
            or self.core.phase is not Phase.WAITING
            or not personal.due()
            or time.monotonic() < self._personal_retry_at
        ):
            return
        manifest = personal.manifest
        if manifest is None:
            return
        try:
            data = self.data if self._data_version == manifest.version else self._local_data(manifest)
        except Exception as exc:  # the data source failed: looked at again like too little data
            log.warning("personalisation: the local data could not be read (%s: %s)", type(exc).__name__, exc)
            data = None
        if data is None or data.x_train.shape[0] == 0:
            self._personal_retry_at = time.monotonic() + DATA_RETRY_S
            return
        try:
            weights = personal.fine_tune(
                trainer, (data.x_train, data.y_train), (data.x_holdout, data.y_holdout), progress=self._alive
            )
        except Exception as exc:  # personalisation never ends a round or the worker
            log.warning(
                "personalisation: fine-tuning global v%d failed (%s: %s); predictions stay on the %s "
                "until the next global model",
                manifest.version,
                type(exc).__name__,
                exc,
                "global model" if personal.serving is None else "older personal weights",
            )
            return
        self._predict_with(personal.serving)
        log.info("%s", weights.describe())
        if personal.serving is None:
            log.info(
                "personalisation: the personal weights of global v%d score worse than the global ones on "
                "this device's held-out part; predictions use the global model (the status shows both)",
                manifest.version,
            )
        self._next_status_at = 0.0  # the status's personal vs global metrics are news
        self._save_personal()

    def _save_personal(self) -> None:
        """Writes the newest personal weights to ``state_dir/personal.bin``. A full or read-only
        state directory is counted and logged like every other state file's refused write (the
        status's ``last_error``, one line per episode) and retried every ``STATE_DIR_RETRY_S``;
        the weights serve from memory meanwhile."""
        personal = self.personal
        if personal is None or personal.unsaved is None:
            return
        try:
            wrote = personal.save()
        except StorageFault as exc:
            self._write_failed(exc)
            self._personal_save_at = time.monotonic() + STATE_DIR_RETRY_S
            return
        if wrote:
            self._wrote()

    def _predict_with(self, weights: PersonalWeights | None) -> None:
        """Predictions use these personal weights, or (None) the installed global ones."""
        if weights is None:
            self.insights.personalise(None, None)
        else:
            self.insights.personalise(weights.values, weights.global_version)

    def _train(self, action: Train) -> list[Action]:
        """Trains (or computes moments) and hands the result to the core; with too few local
        samples, tells the core, which keeps the round and has the worker look again."""
        data = self._local_data(action.manifest)
        if data is None:
            self._data_retry_at = time.monotonic() + DATA_RETRY_S
            return self.core.not_enough_data(self._local_samples or 0, MIN_LOCAL_SAMPLES)
        if action.kind == "moments":
            return self.core.moments_computed(data.x_train, self.clock())
        trainer = self.trainer
        if trainer is None:
            raise ConfigError("no model loaded")
        global_weights = trainer.get_weights()
        evaluation = trainer.evaluate(data.x_holdout, data.y_holdout) if data.x_holdout.shape[0] > 0 else None
        started = time.monotonic()
        losses = trainer.fit(
            data.x_train,
            data.y_train,
            rng=np.random.default_rng([self.config.data.seed, action.manifest.version]),
            progress=self._alive,  # long training is not a hang
        )
        self.training_durations.observe(time.monotonic() - started)
        delta = trainer.get_weights() - global_weights
        return self.core.trained(delta, int(data.x_train.shape[0]), losses[-1], evaluation, self.clock())

    def _worker(self) -> None:
        """Turns until stop. An exception that escapes a turn (``_work_once`` catches every
        Exception: an interrupt, or a bug outside it) ends the worker: it is recorded and stop is
        requested, so :meth:`_run` returns 1 ("worker thread died") at once; the traceback goes
        to threading's excepthook as before."""
        name_current_thread("fedge-worker")
        try:
            while not self.stop_requested.is_set():
                self._alive()  # a hung worker stops pinging and systemd (or Docker) restarts the agent
                self._sleep_until_work()
                self._work_once()
        except BaseException:
            if not self.stop_requested.is_set():
                self._worker_died = True
            raise
        finally:
            self.stop_requested.set()

    def _sleep_until_work(self) -> None:
        """Sleeps until the next deadline (:meth:`_next_turn_in`) unless there is work now: a
        manifest, or a kick since the last turn began (``_kicked``: a message queued, a PUBACK,
        a connection, live windows, stop)."""
        timeout = self._next_turn_in()
        with self._wake:
            if self._kicked or self._pending_manifest is not None:
                self._busy_turns = 0
            elif timeout > 0 or self._busy_turns >= MAX_BUSY_TURNS:
                if timeout <= 0 and not self._next_turn_failed:  # a deadline no turn moves: a bug
                    self._next_turn_failed = True
                    log.error(
                        "the worker's next deadline stays in the past; it turns every %g s", FALLBACK_TURN_S
                    )
                self._wake.wait(timeout if timeout > 0 else FALLBACK_TURN_S)
                self.worker_wakeups += 1
                self._busy_turns = 0
            else:
                self._busy_turns += 1
            self._kicked = False

    def _liveness_due_in(self) -> float:
        """Seconds until the worker must ping its liveness again: the systemd watchdog (half its
        interval after the last ping), the heartbeat and /healthz (:data:`IDLE_WAKE_S`)."""
        now = time.monotonic()
        due = (self.alive_at if self.alive_at is not None else now) + IDLE_WAKE_S
        watchdog = self.notifier.watchdog_due_at()
        if watchdog is not None:
            due = min(due, watchdog)
        return max(0.0, due - now)

    def _next_turn_in(self) -> float:
        """Seconds until :meth:`_work_once` has something to do by itself (0: now), from every
        deadline it keeps: its liveness, the status interval, a round waiting for data, actions
        and flushes a full or read-only state directory stopped, personalisation's retries, the
        rollout's resubscribe, a secure round's steps, pending write-backs, live windows of a
        source that cannot announce them. Whatever else makes work wakes the worker (``_kick``)."""
        try:
            now = time.monotonic()
            if self.secure is not None and self.secure.has_work():
                return 0.0
            for info in self._in_flight.values():
                if info.is_published():  # acknowledged before its kick could find it in flight
                    return 0.0
            due = [now + self._liveness_due_in()]
            connected = self.connected.is_set()
            if connected:
                due.append(self._next_status_at)
            if self.core.phase is Phase.WAITING_FOR_DATA:
                due.append(self._data_retry_at)
            if self._parked:
                due.append(self._parked_retry_at)
            if self._flush_retry_at is not None:
                due.append(self._flush_retry_at)
            personal = self.personal
            if personal is not None:
                if personal.unsaved is not None:
                    due.append(self._personal_save_at)
                if self.trainer is not None and self.core.phase is Phase.WAITING and personal.due():
                    due.append(self._personal_retry_at)
            rollout = self.rollout.next_turn_at(connected)
            if rollout is not None:
                due.append(rollout)
            if self.secure is not None and self.secure.round_id is not None:
                due.append(now + SECURE_TURN_S)
            if self.writeback is not None:
                write = self.writeback.next_due()
                if write is not None:
                    due.append(now + (write - self.clock()))
            if self._live_polled and self.config.insight.publish != "off":
                due.append(self._live_asked_at + self._live_poll_s)
            return max(0.0, min(due) - now)
        except Exception as exc:  # a bug here must not end the worker, nor make it spin
            if not self._next_turn_failed:
                self._next_turn_failed = True
                log.error(
                    "the worker's next deadline could not be worked out (%r); it turns every %g s",
                    exc,
                    FALLBACK_TURN_S,
                    exc_info=exc,
                )
            return FALLBACK_TURN_S

    def _work_once(self) -> None:
        """One turn of the worker: flush the outbox, apply rotations, handle the newest manifest
        (if one is pending), publish predictions on the live windows, publish the status when due.

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
            if frame is None:
                self._retry_parked()  # what a full or read-only state directory stopped
            waiting_for_data = self.core.phase is Phase.WAITING_FOR_DATA
            if frame is not None:
                self._drop_parked()  # a round that waited for the state directory is closed
                if waiting_for_data:
                    self.core.superseded()  # a newer manifest replaces the round in hand
                self._carry_out(self.core.manifest_arrived(frame, self.trust.trusted_keys(), self.clock()))
                self._resend_lost_update()
            elif waiting_for_data and time.monotonic() >= self._data_retry_at:
                self._data_retry_at = time.monotonic() + DATA_RETRY_S  # whatever the retry leads to
                self._carry_out(self.core.retry_data(self.clock()))
            self._secure_turn()
            if self.personal is not None and time.monotonic() >= self._personal_save_at:
                self._save_personal()  # what a full or read-only state directory refused
            self._personalise()
            self.rollout.turn(
                self.trust.trusted_keys(),
                self._subscribe if self.connected.is_set() else None,
                self._rollout_fetched,
            )
            self._predict()
            if time.monotonic() >= self._next_status_at and self.connected.is_set():
                # First: a status that fails (a source's report raising) is tried at the next
                # interval, not at once again and again by a worker that sleeps until it is due.
                self._next_status_at = time.monotonic() + self.config.status_interval_s
                self._publish_status()
        except StorageFault as exc:  # not one of a round's actions (those wait in _parked): e.g. a
            # secure round's counter or a resent copy of an update; what it was for is counted
            self._write_failed(exc)
            self._drop(f"state_dir_{exc.fault}", "the worker", str(exc))
        except FedgeError as exc:  # bad data, full outbox...: reported, never a crash
            self._abandon_round()
            self.last_error = str(exc)
            log.error("%s", exc)
        except Exception as exc:  # one message never ends the service
            self._abandon_round()
            self.last_error = f"{type(exc).__name__}: {exc}"
            where = self.topics.manifest if frame is not None else "the worker"
            self._drop(f"handler_error:{type(exc).__name__}", where, repr(exc), exc)

    def _rollout_fetched(self, topic: str) -> None:
        """The promoted weights are in: their blob topic is dropped (unless a round's fetch wants
        it), so the aggregator republishing it is not a blob nobody asked for."""
        with self._lock:
            busy = any(self.topics.blob(sha) == topic for sha in self._wanted_blobs)
        if not busy:
            self.client.unsubscribe([topic, f"{topic}/+"])

    def _subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)
        if topic.startswith(self.topics.base + "/blob/"):  # a blob over chunk_bytes comes in pieces
            self.client.subscribe(f"{topic}/+", qos=1)

    def _predict(self) -> None:
        """Runs the verified global model on the source's new live windows and publishes the
        predictions ``[insight]`` lets through; every other window is counted by reason."""
        self._live_asked_at = time.monotonic()
        try:
            batch = self.source.live_windows(self.insights.task)
        except Exception as exc:  # a source's failure never ends a round or the worker
            self.insights.policy.skip("error")
            log.warning("insight: the data source could not give live windows: %s", exc)
            return
        found = bool(batch.windows or batch.dropped)
        self._live_poll_s = LIVE_POLL_S if found else min(2 * self._live_poll_s, LIVE_POLL_MAX_S)
        self.insights.process(batch, self.clock(), self.connected.is_set())
        if self.home_assistant is not None and self.connected.is_set():
            self.home_assistant.ensure(self._connections)  # once per connection
        if self.writeback is not None:
            self.writeback.tick(self.clock())  # pending writes whose interval has passed

    def _insight_published(self, payload: dict[str, Any], now: float) -> None:
        """A prediction went out on insight/{device_id}: what acts on it (off by default)."""
        if self.home_assistant is not None:
            self.home_assistant.prediction_published(payload, self._connections)
        if self.writeback is not None:
            self.writeback.prediction_published(payload, now)

    def _insights_report(self) -> dict[str, Any]:
        """``insights`` in the status, with ``home_assistant`` and ``writeback`` when configured."""
        report = self.insights.report()
        if self.home_assistant is not None:
            report["home_assistant"] = self.home_assistant.report()
        if self.writeback is not None:
            report["writeback"] = self.writeback.report()
        return report

    def _publish_insight(self, topic: str, payload: bytes) -> bool:
        """Publishes a prediction retained with QoS 1 (the last one stays for a BMS that
        connects later); False if paho refused it."""
        info = self.client.publish(topic, payload, qos=1, retain=True)
        self.traffic.outbound(topic, len(payload))
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def _abandon_round(self) -> None:
        """After a failure: the core waits for the next manifest, whatever it was doing."""
        if self.core.abandon() is Phase.TRAINING:
            self.phase_state = "idle"

    def run(self) -> int:
        """With ``[metrics] enabled``, serves /metrics, /healthz and /readyz meanwhile."""
        if self.config.metrics.enabled:  # prometheus-client is imported only then
            from fedge.agent.metrics import serve_metrics  # noqa: PLC0415

            self.endpoint = serve_metrics(self)
        try:
            self.source.start()
            if self.writeback is not None:
                self.writeback.start()
            try:
                return self._run()
            finally:
                if self.writeback is not None:
                    self.writeback.stop()
                self.source.stop()
        finally:
            if self.endpoint is not None:
                self.endpoint.stop()

    def _run(self) -> int:
        """Waits for stop (a signal, or the worker ending: it requests stop as it dies) without
        waking meanwhile; 1 if the worker died."""
        connect(self.client, self.config.mqtt)
        start_loop(self.client, "fedge-mqtt")
        worker = threading.Thread(target=self._worker, name="fedge-agent-worker", daemon=True)
        worker.start()
        try:
            self.stop_requested.wait()
            if self._worker_died:
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
            stop_loop(self.client)
            self.outbox.close()
            self.notifier.close()

    def request_stop(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        self.stop_requested.set()  # the worker is woken by _run's cleanup (notify_all)


def run_agent(stages: AgentStages) -> int:
    """Runs the agent until SIGTERM or SIGINT; the exit code of ``fedge agent run``."""
    service = AgentService(stages)
    signal.signal(signal.SIGTERM, service.request_stop)
    signal.signal(signal.SIGINT, service.request_stop)
    return service.run()
