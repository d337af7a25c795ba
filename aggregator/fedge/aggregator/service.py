"""``fedge aggregator run``: the thin I/O shell around :class:`RoundEngine`.

paho's network thread only queues incoming messages; one loop thread owns the engine, so no
rule about updates ever runs concurrently with another. The shell checkpoints the engine's
state *before* publishing a manifest (a restart never reuses a version) and after every round.

With leader election (:mod:`fedge.aggregator.leadership`) the service first campaigns, touching its
heartbeat and connecting to nothing; only once it holds the Lease does it read the checkpoint
(the one the previous leader wrote on the shared volume) and connect to the broker. Before
every checkpoint write and every publish it checks that it still leads; when it does not, it
stops at once and exits with :data:`EXIT_LEADERSHIP_LOST`.

Secure rounds (``[privacy] secure_aggregation``): the engine returns the round's signed
documents (``Publication.secagg`` after the manifest, then :meth:`RoundEngine.tick` on every turn
of the loop); the shell publishes each retained, QoS 1 (an empty payload clears a topic), with
the same leadership check as every publish. The round's session lives only in this process: a
restart or a leader change mid-round loses it, the round is aborted (its manifest version is
never reused) and the next manifest opens a new one; the new process clears the lost round's
retained documents with its first manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import numpy as np
import paho.mqtt.client as mqtt
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from fedge.aggregator.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from fedge.aggregator.chunk_blobs import blob_messages, clear_topics, retained_messages
from fedge.aggregator.chunk_intake import ChunkIntake, is_chunk
from fedge.aggregator.config import AggregatorConfig
from fedge.aggregator.dashboard import build_view, view_json
from fedge.aggregator.fleet_summary import DeviceSeen, build_fleet_summary, device_condition
from fedge.aggregator.heartbeat import Heartbeat
from fedge.aggregator.leader_config import EXIT_LEADERSHIP_LOST
from fedge.aggregator.privacy_config import privacy_config, secure_settings
from fedge.aggregator.registry import load_registry, load_registry_file
from fedge.aggregator.replica_leader import PartialIntake
from fedge.aggregator.rollout import Rollout, RolloutPublication
from fedge.aggregator.round_engine import (
    EngineState,
    Publication,
    RoundEngine,
    RoundRecord,
    eval_metric,
    start_generation,
)
from fedge.aggregator.strategies.server_optimizers import (
    ServerOptimizerState,
    ServerOptimizerStateError,
    state_from_json,
    state_to_json,
)
from fedge.protocol.bounded_json import BoundedJsonError, loads_bounded
from fedge.protocol.config_source import ConfigError
from fedge.protocol.errors import FedgeError
from fedge.protocol.model_manifest import INITIAL_WEIGHTS_FILE, ModelManifest, manifest_from_json
from fedge.protocol.reasons import RejectReason
from fedge.protocol.secagg.wire import Publication as SecAggPublication
from fedge.protocol.statuses import AGGREGATOR_STATUS_SCHEMA
from fedge.protocol.topics import FleetTopics
from fedge.protocol.weights import WeightsError, weights_from_bytes
from fedge.shell.drops import DroppedMessages
from fedge.shell.files import prepare_writable_dir, read_private_key
from fedge.shell.meters import Counts, Durations, Traffic
from fedge.shell.mqtt import connect, make_client, publish_queued, watch_connection
from fedge.shell.storage_faults import STATE_DIR_RETRY_S, StateDirWatch, StorageFault, unwritable_dir_fix

if TYPE_CHECKING:  # the Kubernetes client is imported only with [leader] enabled
    from fedge.aggregator.leadership import Leadership
    from fedge.shell.http_endpoint import HttpEndpoint

log = logging.getLogger("fedge.aggregator")
CHECKPOINT_FILE = "checkpoint.bin"
ROTATION_FILE_PREFIX = "aggregator.rotation."  # written by `fedge keys rotate`
MAX_CHECKPOINT_BYTES = 1024 * 1024 * 1024
_INBOX_LIMIT = 100_000
#: How long a redelivery's reconnect waits for paho to send what it queued and the DISCONNECT.
REDELIVERY_DISCONNECT_S = 10.0
#: Deployment default of the inbox's byte bound (see ``AggregatorService``).
DEFAULT_INBOX_MAX_BYTES = 64 * 1024 * 1024
#: A device's status is 0.3-1 KB of JSON; a bigger one is dropped in paho's thread, unparsed.
MAX_STATUS_BYTES = 64 * 1024
STATUS_INTERVAL_S = 0.5
#: A prediction is ~1 KB of JSON (``fedge.insight/1``); a bigger one is dropped unparsed.
MAX_INSIGHT_BYTES = 16 * 1024
#: The dashboard's view is rebuilt for new device statuses and predictions at most this often.
DASHBOARD_INTERVAL_S = 1.0
#: ``fedge_aggregator_round_duration_seconds`` buckets: rounds last seconds to hours.
ROUND_DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 4 * 3600.0)
#: What an operator should do about a dropped message, by reason (prefix before "_" or ":").
_DROP_ADVICE = {
    "inbox": "The aggregator cannot keep up with what arrives: a flood (check which device "
    "publishes so much on update/+) or inbox bounds too small for the fleet.",
    "status": "A device wrote a malformed status (a bug or a compromised device); it is ignored. "
    "If it is retained, clear it with an empty retained message on that topic.",
    "handler": "A bug in fedge: the message was skipped. Please report this traceback.",
    "chunk": "A piece of a chunked update was refused or its transfer cut off (docs/faults.md, "
    "'A transfer cut mid-way'): the device's update for that round is lost unless it sends it again; "
    "if it is over_budget or too_many_transfers, raise [aggregator] chunk_budget_bytes or "
    "chunk_transfers_per_device; if too_large, the device's chunk_bytes is over the aggregator's.",
}


def set_tcp_nodelay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """paho's ``on_socket_open``: turns Nagle's algorithm off on the broker connection.

    Why: with manual acks the aggregator writes a small PUBACK for the round's last update and,
    a millisecond later, the next manifest's blobs. With Nagle on, that second write waits until
    the broker ACKs the first segment, which a broker with nothing to answer delays by its
    delayed-ACK timer (40 ms on Linux): bench_rounds measured the aggregator's tail at N = 10
    go from 5 to 44 ms per round. MQTT packets are whole messages, so nothing gains from Nagle's
    coalescing. A socket that refuses the option (not TCP, e.g. a WebSocket wrapper) is left as is.
    """
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass(frozen=True)
class LoadedModel:
    manifest: ModelManifest
    model: bytes
    initial_weights: np.ndarray


def load_model(model_dir: Path) -> LoadedModel:
    """Reads a ``fedge model build`` directory and checks hashes and sizes."""
    try:
        manifest = manifest_from_json((model_dir / "manifest.json").read_bytes())
        model = (model_dir / manifest.model_file).read_bytes()
        weights_raw = (model_dir / INITIAL_WEIGHTS_FILE).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read model directory {model_dir}: {exc}") from None
    if hashlib.sha256(model).hexdigest() != manifest.model_sha256:
        raise ConfigError(f"{model_dir}: model.tflite does not match its manifest's SHA-256")
    if hashlib.sha256(weights_raw).hexdigest() != manifest.initial_weights_sha256:
        raise ConfigError(f"{model_dir}: {INITIAL_WEIGHTS_FILE} does not match its manifest's SHA-256")
    try:
        weights = weights_from_bytes(weights_raw, manifest.parameter_count)
    except WeightsError as exc:  # a manifest whose hash matches a blob of another model's size
        raise ConfigError(f"{model_dir}: {INITIAL_WEIGHTS_FILE}: {exc}") from None
    return LoadedModel(manifest, model, weights)


def initial_state(loaded: LoadedModel, generation: int = 1) -> EngineState:
    """A fleet's state before its first round: the model's initial weights (an aggregator
    without a checkpoint; a worker, which keeps no state)."""
    return EngineState(
        version=0,
        last_manifest_sha256="",
        completed_rounds=0,
        weights=loaded.initial_weights.copy(),
        normalisation=loaded.manifest.normalisation,
        counters={},
        generation=generation,
        model_sha256=loaded.manifest.model_sha256,
    )


def state_from_checkpoint(ck: Checkpoint) -> EngineState:
    meta = dict(ck.metadata)
    return EngineState(
        version=ck.model_version,
        last_manifest_sha256=ck.parent_hash or "",
        completed_rounds=ck.round_number,
        weights=np.asarray(ck.weights, np.float32).copy(),
        normalisation=ck.normalisation,
        counters=dict(ck.device_counters),
        rejected_total={str(k): int(v) for k, v in dict(meta.get("rejected_total", {})).items()},
        history=list(meta.get("history", [])),
        published_weights_sha256=meta.get("published_weights_sha256"),
        update_norm_median=_positive_or_none(meta.get("update_norm_median")),
        claim_median=_positive_or_none(meta.get("claim_median")),
        initial_norm=_positive_or_none(meta.get("initial_norm")),
        counter_keys={
            str(k): str(v) for k, v in dict(meta.get("counter_keys") or {}).items() if isinstance(v, str)
        },
        generation=_generation(meta.get("generation", 1)),
        model_sha256=meta.get("model_sha256") if isinstance(meta.get("model_sha256"), str) else None,
        privacy=_privacy_state(meta.get("privacy")),
        server_optimizer=_server_optimizer_state(meta.get("server_optimizer")),
    )


def _server_optimizer_state(value: object) -> ServerOptimizerState | None:
    """The checkpointed server-optimizer state (absent in checkpoints before server optimizers,
    null before a server optimizer's first round); checked against ``[rounds] strategy`` and
    the model when the engine restores it."""
    try:
        return state_from_json(value)
    except ServerOptimizerStateError as exc:
        raise CheckpointError(str(exc)) from None


def _privacy_state(value: object) -> dict[str, Any] | None:
    """The checkpointed accountant state: an object (checked against ``[privacy]`` when the
    engine restores it), or absent / null (no rounds under differential privacy yet)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise CheckpointError(f"checkpoint metadata: privacy must be an object or null, not {value!r}")
    return dict(value)


def _generation(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"checkpoint metadata: generation must be an integer >= 1, not {value!r}")
    return value


def _positive_or_none(value: object) -> float | None:
    """A checkpointed bound reference; anything else (absent in checkpoints written before the
    influence bounds existed) means "no history yet"."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
        return None
    return float(value)


def checkpoint_from_state(state: EngineState) -> Checkpoint:
    return Checkpoint(
        weights=state.weights,
        model_version=state.version,
        round_number=state.completed_rounds,
        round_id=f"v{state.version}",
        parent_hash=state.last_manifest_sha256 or None,
        device_counters=dict(state.counters),
        normalisation=state.normalisation,
        metadata={
            "rejected_total": dict(state.rejected_total),
            "history": list(state.history),
            "published_weights_sha256": state.published_weights_sha256,
            "update_norm_median": state.update_norm_median,
            "claim_median": state.claim_median,
            "initial_norm": state.initial_norm,
            "counter_keys": dict(state.counter_keys),
            "generation": state.generation,
            "model_sha256": state.model_sha256,
            "privacy": state.privacy,
            "server_optimizer": state_to_json(state.server_optimizer),
        },
    )


def influence_summary(record: RoundRecord) -> str:
    """What the influence bounds did in a round, for the log line an operator reads."""
    if record.phase == "moments":
        return f"{record.outlier_devices} device(s) left out of the normalisation as outliers"
    if record.secure_aggregation:
        bound = "none" if record.norm_bound is None else f"{record.norm_bound:.4g}"
        return (
            f"secure aggregation: {record.reported} update(s) in the sum, {record.dropped} selected "
            f"device(s) not in it, clipped to norm {bound} on the devices"
        )
    bound = "unbounded" if record.norm_bound is None else f"{record.norm_bound:.4g}"
    return f"{record.clipped} update(s) clipped to norm {bound}, {record.spent} refused after opening"


class LeadershipLost(Exception):
    """Raised in the round loop the moment this replica may no longer act as leader."""


class AggregatorService:
    def __init__(
        self,
        config: AggregatorConfig,
        clock: Callable[[], float] = time.time,
        inbox_limit: int = _INBOX_LIMIT,
        leadership: Leadership | None = None,
        inbox_max_bytes: int = DEFAULT_INBOX_MAX_BYTES,
    ) -> None:
        """Everything that can be wrong with the configuration fails here; the checkpoint is
        read here too, unless ``leadership`` defers it until this replica leads.

        The inbox (what paho's network thread queues for the loop) is bounded by
        ``inbox_limit`` messages and ``inbox_max_bytes`` bytes of payload; a message that would
        pass either bound is dropped and counted (``inbox_full``), never queued without bound
        and never blocking paho. The default, 64 MiB, holds about 2,500 sealed har-watch fp32
        updates (26 KB each), or a hundred of a model 25 times bigger: a whole round of a
        large fleet arriving at once. Without it, the 100,000-message bound alone would let a
        flood of the largest packets a broker passes (16 MiB without a model-sized limit) make
        the aggregator hold 1.6 TB; with it, a flood costs at most 64 MiB, and what it pushes
        out is counted.
        """
        if inbox_max_bytes < 1:
            raise ConfigError(f"inbox_max_bytes must be positive, not {inbox_max_bytes}")
        self.config = config
        self.clock = clock
        self.leadership = leadership
        self.heartbeat = Heartbeat(config.heartbeat_path)
        self.topics = FleetTopics(config.fleet)
        self.loaded = load_model(config.model_dir)
        self.registry = load_registry(config.registry_file)
        enrolled, wanted = len(self.registry), config.rounds.min_devices
        if enrolled < wanted:
            raise ConfigError(f"{enrolled} enrolled devices cannot satisfy min_devices={wanted}")
        self.box_key = PrivateKey(read_private_key(config.box_key_file, "box"))
        self.signing_key = SigningKey(read_private_key(config.signing_key_file, "signing"))
        # Created and proven writable (a probe file) now: a wrong owner or a read-only volume is
        # one ConfigError line with the fix, not a traceback at the first checkpoint.
        try:
            prepare_writable_dir(config.state_dir)
        except OSError as exc:
            fix = unwritable_dir_fix(exc, "aggregator")  # full or read-only: no ownership problem
            if fix is not None:
                raise ConfigError(
                    f"cannot write [aggregator] state_dir {config.state_dir}: {exc.strerror}; {fix}"
                ) from None
            raise ConfigError(
                f"cannot write [aggregator] state_dir {config.state_dir}: {exc.strerror}; it must be a "
                "directory the aggregator can write: its image runs as uid 10001, so give it the "
                "volume (sudo chown -R 10001:10001 HOST_DIR; on Kubernetes, fsGroup: 10001)"
            ) from None
        self.checkpoint_path = config.state_dir / CHECKPOINT_FILE
        # Checkpoint writes the state directory refuses (full, read-only): logged once, counted in
        # the status (state_dir), retried; nothing of a round is published before its checkpoint.
        self.state_dir_watch = StateDirWatch(
            log,
            "[aggregator] state_dir",
            config.state_dir,
            "aggregator",
            "it publishes no new round, whose version a restart could reuse (state_dir in aggregator/status)",
        )
        # [privacy]: resolved once (the derived noise multiplier), and dp-accounting loaded,
        # only when it is enabled.
        self.privacy = privacy_config(config.privacy, config.rounds)
        if self.privacy is not None:
            log.info(
                "differential privacy: epsilon budget %g at delta %g, noise multiplier %.4g, clip bound %g%s",
                self.privacy.epsilon_budget,
                self.privacy.target_delta,
                self.privacy.noise_multiplier,
                self.privacy.clip_bound,
                " (adaptive)" if self.privacy.adaptive is not None else "",
            )
        self.secure = secure_settings(config.privacy)
        if self.secure is not None:
            log.info(
                "secure aggregation: train rounds run SecAgg+ (modulus 2**%d, threshold %s)",
                self.secure.bits,
                self.secure.threshold or "chosen per round",
            )
        # [replicas]: the leader takes its workers' partials (docs/scale.md).
        self.intake = (
            PartialIntake(config.replicas, self.topics, self.box_key, self.signing_key)
            if config.replicas.enabled
            else None
        )
        # [rollout]: which global model devices predict with (docs/rollout.md).
        self.rollout = Rollout(
            config.rollout,
            config.state_dir,
            self.topics,
            self.signing_key,
            eval_metric(self.loaded.manifest.task.model.kind),
            (self.loaded.model, self.loaded.manifest),  # to score [rollout] validation_file
        )
        self.engine: RoundEngine
        if leadership is None:
            self._load_state()
        # (topic, payload, (mid, qos) to acknowledge once handled, or None)
        self.inbox: queue.Queue[tuple[str, bytes, tuple[int, int] | None]] = queue.Queue(maxsize=inbox_limit)
        self.inbox_max_bytes = inbox_max_bytes
        # Written from paho's thread and the loop's: guarded by _counts_lock.
        self._inbox_bytes = 0
        self._counts_lock = threading.Lock()
        # QoS 1 messages that found the inbox full and were left unacknowledged, so the broker
        # delivers them again after a reconnect (_redeliver): since the last redelivery, in all,
        # and how many redeliveries there were. Guarded by _counts_lock.
        self._deferred = 0
        self._deferred_total = 0
        self._redeliveries = 0
        # Set while the loop reconnects for a redelivery: that CONNACK is not a broker restart.
        self._redelivering = threading.Event()
        self.dropped = DroppedMessages(
            log, _DROP_ADVICE, "messages_dropped in aggregator/status", frozenset({"chunk_duplicate"})
        )
        # Updates over chunk_bytes arrive in sealed pieces (fedge.aggregator.chunk_intake).
        self.chunks = ChunkIntake(
            config.chunk_bytes, config.chunk_transfers_per_device, config.chunk_budget_bytes, self._drop
        )
        self._status_dirty = True
        self._status_sent_at = float("-inf")
        self.online: set[str] = set()
        # Devices whose status says "ready": false (too few local samples): not selected while
        # enough others are ready, and waited for before the first round.
        self.not_ready: set[str] = set()
        # Each device's last status (state, ready, when it arrived), for the fleet summary.
        self.seen: dict[str, DeviceSeen] = {}
        self.wall_seen: dict[str, float] = {}  # when (epoch s) each device's status last came
        # With [metrics] enabled: each enrolled device's latest prediction, and the dashboard's
        # view as JSON (rebuilt in the main thread, read whole by the HTTP threads).
        self.insights: dict[str, dict[str, Any]] = {}
        self.dashboard_json: bytes = b"{}"
        self._dashboard_due = False  # a prediction or a device's status arrived since the last view
        self._dashboard_built_at = float("-inf")
        self._stale_sent: frozenset[str] = frozenset()
        # For [metrics] (fedge.aggregator.metrics, read from the HTTP server's threads): what the
        # status lacks, recorded as it happens, and the last status published (replaced whole).
        self.traffic = Traffic(self.topics.base)
        self.accepted = Counts()
        self.round_outcomes = Counts()
        self.round_durations = Durations(ROUND_DURATION_BUCKETS)
        self.last_status: dict[str, Any] | None = None
        self.endpoint: HttpEndpoint | None = None
        self.connected = threading.Event()
        # Set by every CONNACK after the first: the broker may have restarted without what it
        # retained (mosquitto saves its store every autosave_interval, not on each message), so
        # the loop publishes the current model blobs and manifest again (_republish_retained).
        self.reconnected = threading.Event()
        self._connacks = 0
        self._last_publication: Publication | None = None
        self.stop_requested = threading.Event()
        self.client = make_client(config.mqtt, manual_ack=True)
        watch_connection(self.client, log, self._on_connect, self.connected.clear)
        self.client.on_message = self._on_message
        self.client.on_socket_open = set_tcp_nodelay

    def _load_state(self) -> None:
        """The engine, from the checkpoint if there is one (else from the initial weights)."""
        config, loaded = self.config, self.loaded
        ck = load_checkpoint(self.checkpoint_path, MAX_CHECKPOINT_BYTES)
        generation = config.model_generation
        initial = initial_state(loaded, generation)
        state = initial if ck is None else self._resume_or_roll(ck, initial)
        if self.privacy is None and state.privacy is not None:
            log.warning(
                "[privacy] is off, but the checkpoint has rounds under differential privacy "
                "(epsilon %s spent): rounds from now on add noise no more, and the fleet's "
                "guarantee ends here",
                state.privacy.get("epsilon_spent"),
            )
            state.privacy = None
        elif self.privacy is not None and state.privacy is None and state.completed_rounds > 0:
            log.warning(
                "[privacy] is on from round %d: the %d rounds before were not private, and the "
                "epsilon reported covers only the rounds from now on",
                state.completed_rounds + 1,
                state.completed_rounds,
            )
        try:
            self.engine = RoundEngine(
                config.fleet,
                config.rounds,
                loaded.manifest,
                loaded.model,
                self.box_key,
                self.signing_key,
                self.registry,
                state,
                privacy=self.privacy,
                secure=self.secure,
            )
        except ServerOptimizerStateError as exc:  # the strategy of a running fleet changed
            raise ConfigError(f"{self.checkpoint_path}: {exc}") from None
        except FedgeError as exc:
            if self.privacy is None:
                raise
            from fedge.aggregator.privacy import PrivacyStateError  # noqa: PLC0415 - loads dp-accounting

            if not isinstance(exc, PrivacyStateError):
                raise
            # A privacy ledger spent under other [privacy] parameters.
            raise ConfigError(
                f"{self.checkpoint_path}: {exc}; the [privacy] parameters (and [rounds] rounds, "
                "which the noise multiplier is derived from) of a running fleet cannot change: "
                "its budget was spent at the old ones. Restore them (docs/differential-privacy.md)"
            ) from None
        if config.replicas.enabled:
            self.engine.partial_grace_s = config.replicas.partial_grace_s

    def _resume_or_roll(self, ck: Checkpoint, initial: EngineState) -> EngineState:
        """The checkpoint's state for the configured model, or a new model generation.

        The same generation must be the same model. A higher ``model_generation`` than the
        checkpoint's starts that generation with the configured model (``start_generation``:
        the manifest chain and replay counters go on, so devices accept it from the signer
        they trust); a lower one is refused (generations only go forward)."""
        previous = state_from_checkpoint(ck)
        path, generation = self.checkpoint_path, initial.generation
        if generation < previous.generation:
            raise ConfigError(
                f"{path} is model generation {previous.generation}; [aggregator] model_generation = "
                f"{generation} would go back (generations only go forward)"
            )
        if generation > previous.generation:
            log.warning(
                "starting model generation %d with %s (the checkpoint had generation %d at version %d, "
                "%d rounds done): devices get the new model as version %d",
                generation,
                initial.model_sha256,
                previous.generation,
                previous.version,
                previous.completed_rounds,
                previous.version + 1,
            )
            return start_generation(previous, generation, initial)
        other_model = previous.model_sha256 not in (None, initial.model_sha256)
        if other_model or ck.weights.shape != initial.weights.shape:
            raise ConfigError(
                f"{path} is for another model ({previous.model_sha256 or 'parameter count differs'}); "
                f"to roll the fleet to this model set [aggregator] model_generation = "
                f'{previous.generation + 1} (docs/own-data.md, "A new model for a running fleet")'
            )
        log.info(
            "resuming from checkpoint: generation %d, version %d, %d rounds done%s",
            previous.generation,
            previous.version,
            previous.completed_rounds,
            " (recovered from .prev)" if ck.recovered_from_previous else "",
        )
        if previous.model_sha256 is None:
            previous.model_sha256 = initial.model_sha256  # recorded from the next checkpoint on
        return previous

    # --- paho callbacks (network thread: only queue and flag) ------------------------------

    def _on_connect(self, client: mqtt.Client) -> None:
        """After each successful CONNACK (a refusal or a lost connection is logged by
        :func:`~fedge.shell.mqtt.watch_connection`, which clears ``connected``)."""
        updates = self.topics.update_filter
        if self.intake is not None:  # the broker hands each update to one of the leader and its workers
            updates = self.topics.shared_update_filter(self.config.replicas.share_group)
        topics = [(updates, 1), (self.topics.status_filter, 1)]
        if self.intake is not None:
            topics.append((self.topics.partial_filter, 1))
        if self.config.metrics.enabled:  # the dashboard lists each device's latest prediction
            topics.append((self.topics.insight_filter, 1))
        client.subscribe(topics)
        self._connacks += 1
        if self._redelivering.is_set():  # our own reconnect (_redeliver): the broker kept its store
            self._redelivering.clear()
        elif self._connacks > 1:
            self.reconnected.set()
        self.connected.set()
        log.info("connected to %s", self.config.mqtt.url)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """Only bounds, queues and counts. Never raises: paho 2.x re-raises a callback's
        exception, which ends its network thread and with it the aggregator's connection."""
        topic = "?"
        try:
            topic = msg.topic
            payload = bytes(msg.payload)
            self.traffic.inbound(topic, len(payload))
            self._enqueue(topic, payload, (msg.mid, msg.qos))
        except Exception as exc:  # one message never ends the service
            self._drop(f"handler_error:{type(exc).__name__}", topic, repr(exc), exc)

    def _enqueue(self, topic: str, payload: bytes, ack: tuple[int, int] | None = None) -> None:
        """Queues a message for the loop, which acknowledges it to the broker (``ack``: its
        (mid, qos)) once it is handled. With the MQTT 5 receive maximum
        (:meth:`receive_maximum`) the broker then never has more unacknowledged messages out to
        this aggregator than its inbox holds: a burst of a whole large fleet's updates waits in
        the broker's queue (bounded by ``max_queued_messages``) instead of overflowing the
        inbox. Never blocks paho's network thread: it also reads the PUBACKs the main thread
        waits for. A message refused here is acknowledged at once and counted, except a QoS 1
        message that finds the inbox full: a broker that ignores the receive maximum (Mosquitto
        before 2.0.13, Debian's and Ubuntu 22.04's 2.0.11 among them, sends a whole burst at
        once) would make the aggregator drop acknowledged updates, so it is left unacknowledged
        (``deferred``) and :meth:`_redeliver` has the broker send it again."""
        size = len(payload)
        if size > MAX_STATUS_BYTES and topic.startswith(self.topics.base + "/status/"):
            self._drop("status_too_large", topic, f"{size} bytes > {MAX_STATUS_BYTES}")
            self._ack(ack)
            return
        if size > MAX_INSIGHT_BYTES and topic.startswith(self.topics.base + "/insight/"):
            self._drop("insight_too_large", topic, f"{size} bytes > {MAX_INSIGHT_BYTES}")
            self._ack(ack)
            return
        with self._counts_lock:
            queued = self._inbox_bytes
            fits = queued + size <= self.inbox_max_bytes
            if fits:
                self._inbox_bytes += size
        if not fits:
            detail = f"{queued} bytes queued + {size} > {self.inbox_max_bytes}"
            if ack is not None and ack[1] > 0:
                self._defer(topic, detail)
                return
            self._drop("inbox_full", topic, detail)
            self._ack(ack)
            return
        try:
            self.inbox.put_nowait((topic, payload, ack))
        except queue.Full:
            self._release(size)
            if ack is not None and ack[1] > 0:
                self._defer(topic, f"{self.inbox.maxsize} messages queued")
                return
            self._drop("inbox_full", topic, f"{self.inbox.maxsize} messages queued")
            self._ack(ack)

    def _defer(self, topic: str, detail: str) -> None:
        """Leaves a QoS 1 message that found the inbox full unacknowledged: the broker keeps it
        in this aggregator's session and sends it again after the next reconnect, which
        :meth:`_redeliver` makes once the inbox is empty. Nothing is lost and memory stays
        bounded, whatever the broker sends."""
        with self._counts_lock:
            self._deferred += 1
            self._deferred_total += 1
            first = self._deferred_total == 1
        self._status_dirty = True
        if first:
            log.warning(
                "the inbox is full (%s, on %s): the broker sent more unacknowledged messages than "
                "this aggregator's receive maximum (%d) allows, as Mosquitto before 2.0.13 does "
                "under a burst. Such messages are left unacknowledged and the broker delivers them "
                "again after a reconnect once the inbox is empty; upgrade the broker to stop the "
                "extra traffic (docs/faults.md). Counted as inbox.deferred in aggregator/status.",
                detail,
                topic,
                self.receive_maximum(),
            )

    def _redeliver_due(self) -> bool:
        """Whether messages were deferred and the inbox has room for them again (it is empty)."""
        with self._counts_lock:
            return self._deferred > 0 and self._inbox_bytes == 0 and self.inbox.empty()

    def _redeliver(self) -> None:
        """Reconnects (a clean DISCONNECT, then the same persistent session) so the broker sends
        the deferred messages again: MQTT requires it to resend every unacknowledged PUBLISH
        of a resumed session. Runs in the main thread, between messages, so every PUBACK of a
        handled message is queued before the DISCONNECT and none is lost with the connection."""
        with self._counts_lock:
            pending, self._deferred = self._deferred, 0
            self._redeliveries += 1
        log.info(
            "reconnecting so the broker delivers again the %d message(s) left unacknowledged while "
            "the inbox was full",
            pending,
        )
        self._redelivering.set()
        self.client.disconnect()
        # paho's loop writes the queued PUBACKs, then the DISCONNECT, then calls on_disconnect
        # (which clears ``connected``); stopping the loop before that would lose them, and
        # without the DISCONNECT the broker would publish this aggregator's will.
        until = time.monotonic() + REDELIVERY_DISCONNECT_S
        while self.connected.is_set() and time.monotonic() < until:
            self.heartbeat.beat()
            time.sleep(0.005)
        self.client.loop_stop()
        # What arrived between the check that the inbox was empty and the DISCONNECT is
        # unacknowledged too: the broker sends it again, so the copy queued here must go, or it
        # would be handled twice (the second time refused as a duplicate). QoS 0 has no resend.
        kept: list[tuple[str, bytes, tuple[int, int] | None]] = []
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
            if item[2] is not None and item[2][1] > 0:
                self._release(len(item[1]))
            else:
                kept.append(item)
        for item in kept:
            self.inbox.put_nowait(item)
        connect(self.client, self.config.mqtt, receive_maximum=self.receive_maximum())
        self.client.loop_start()
        self._status_dirty = True

    def _ack(self, ack: tuple[int, int] | None) -> None:
        """PUBACKs a QoS 1 message (paho's ``manual_ack``): it is handled, or refused for good."""
        if ack is not None and ack[1] > 0:
            self.client.ack(*ack)

    def receive_maximum(self) -> int:
        """How many QoS 1 messages the broker may have out to this aggregator unacknowledged:
        as many of the largest accepted message as the inbox holds, in bytes and in messages (at
        least 10, at most MQTT's 65,535). The default model's 22 KB updates: 2,592 in 64 MiB."""
        largest = max(1, self.engine.message_limit())
        return max(10, min(65_535, self.inbox.maxsize, self.inbox_max_bytes // largest))

    def _release(self, size: int) -> None:
        with self._counts_lock:
            # Never below 0: a message put into the inbox directly (not by _enqueue) was never
            # counted in the first place.
            self._inbox_bytes = max(0, self._inbox_bytes - size)

    def _drop(self, reason: str, topic: str, detail: str, exc: BaseException | None = None) -> None:
        """Counts a message that was not handled (either thread): ``messages_dropped`` in the
        status, which is due again; the first of each reason is logged with what to do."""
        self.dropped.count(reason, topic, detail, exc)
        self._status_dirty = True

    @property
    def messages_dropped(self) -> dict[str, int]:
        """Messages not handled, by reason: ``inbox_full``, ``status_*`` (a device's status
        refused: ``status_too_large``, ``status_too_deep``, ``status_bad_json``,
        ``status_bad_utf8``, ``status_not_finite``, ``status_not_an_object``,
        ``status_bad_topic``) and ``handler_error:<exception>`` (a bug: the message was skipped).
        Update rejections are the engine's (``rejected_total``)."""
        return self.dropped.counts()

    @property
    def inbox_overflow(self) -> int:
        """Messages dropped because the inbox was full (by count or bytes)."""
        return self.dropped["inbox_full"]

    def inbox_status(self) -> dict[str, int]:
        """What the inbox holds now, against its bounds."""
        with self._counts_lock:
            queued_bytes, deferred, redeliveries = self._inbox_bytes, self._deferred_total, self._redeliveries
        return {
            "messages": self.inbox.qsize(),
            "bytes": queued_bytes,
            "max_messages": self.inbox.maxsize,
            "max_bytes": self.inbox_max_bytes,
            "deferred": deferred,
            "redeliveries": redeliveries,
        }

    # --- main loop (one thread owns the engine) ---------------------------------------------

    def _ensure_leader(self) -> None:
        """Before every checkpoint write and publish: a replica that no longer leads stops."""
        if self.leadership is not None and not self.leadership.is_leader:
            raise LeadershipLost

    def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        self._ensure_leader()
        info = publish_queued(self.client, topic, payload, qos=1, retain=retain)
        self.traffic.outbound(topic, len(payload))
        while not info.is_published():
            if self.stop_requested.is_set():
                return
            self.heartbeat.beat()  # waiting for the broker is not hanging: paho reconnects
            self._ensure_leader()
            info.wait_for_publish(timeout=0.5)

    def _announce(self, pub: Publication) -> None:
        if not self._checkpoint():
            return  # asked to stop while the checkpoint could not be written: nothing published
        for topic, blob in blob_messages(self.topics, pub.blobs, self.config.chunk_bytes):
            self._publish(topic, blob, retain=True)
        self._publish_work_order()
        self._publish(self.topics.manifest, pub.manifest_frame, retain=True)
        self._publish_secagg(pub.secagg)
        for topic in pub.clear_blobs:
            if topic != self.rollout.kept_blob_topic():  # the promoted weights stay for predictions
                size = max(pub.manifest.weights_bytes, pub.manifest.model_bytes)
                for cleared in clear_topics(self.topics, topic, size, self.config.chunk_bytes):
                    self._publish(cleared, b"", retain=True)
        self._last_publication = pub
        self.chunks.expire(self.engine, self.clock())  # what the closed round left half-sent
        m = pub.manifest
        log.info(
            "published manifest v%d: %s round %s, %d devices selected, deadline in %.0fs",
            m.version,
            m.phase,
            m.round_id,
            len(m.selected_devices),
            m.deadline - m.issued_at,
        )

    def _checkpoint(self) -> bool:
        """Saves the engine's state before anything of a new manifest goes out, so a restart
        never reuses a published version nor goes back to an older model.

        A state directory that is full or read-only does not end the aggregator and nothing of
        the round is published: the first failure is logged (one line with the fix), every one
        counted (``state_dir`` in the status), and the save retried every
        :data:`~fedge.shell.files.STATE_DIR_RETRY_S` while the loop goes on draining messages,
        publishing its status and beating. Once it is written, the round is published as usual.
        False only if asked to stop meanwhile. Any other error writing it propagates."""
        while True:
            self._ensure_leader()
            try:
                save_checkpoint(self.checkpoint_path, checkpoint_from_state(self.engine.snapshot()))
            except StorageFault as exc:
                self.state_dir_watch.failed(exc)
                self._status_dirty = True
                until = time.monotonic() + STATE_DIR_RETRY_S
                while time.monotonic() < until:
                    if self.stop_requested.is_set():
                        return False
                    self._drain(0.1)
                continue
            if self.state_dir_watch.wrote():
                self._status_dirty = True
            return True

    def _republish_retained(self) -> None:
        """After a reconnect: the newest manifest and its blobs again, byte for byte (the same
        signed frame, so devices that have it ignore it). A broker killed before its autosave
        comes back without them, and devices waiting for a blob would wait for the next model
        version; found by the chaos loop (tests/e2e/test_chaos.py). A secure round's documents
        are not repeated: that round ends at its deadline and the next one starts clean."""
        if not self.reconnected.is_set():
            return
        self.reconnected.clear()
        pub = self._last_publication
        if pub is None:
            return
        blobs = {self.topics.blob(self.engine.model_sha256): self.engine.model_bytes, **pub.blobs}
        for topic, blob in blob_messages(self.topics, blobs, self.config.chunk_bytes):
            self._publish(topic, blob, retain=True)
        self._publish_work_order()
        self._publish(self.topics.manifest, pub.manifest_frame, retain=True)
        self._publish_rollout(self.rollout.retained())
        self._status_dirty = True
        log.info("reconnected: published manifest v%d and its model again", pub.manifest.version)

    def _publish_rollout(self, pub: RolloutPublication | None) -> None:
        """The rollout gate's blob and signed decisions (``fedge.aggregator.rollout``), retained."""
        items = pub.items if pub is not None else ()
        weights_bytes = 4 * self.engine.model_manifest.parameter_count
        for topic, payload in retained_messages(self.topics, items, self.config.chunk_bytes, weights_bytes):
            self._publish(topic, payload, retain=True)
        if pub is not None:
            self._status_dirty = True

    def _rollout_request(self) -> None:
        """Carries out a rollback ``fedge model rollback`` asked for, if there is one."""
        state, model = self.engine.state, self.engine.model_sha256
        pub = self.rollout.take_request(state.generation, model, state.published_weights_sha256, self.clock())
        self._publish_rollout(pub)

    def _publish_work_order(self) -> None:
        """``[replicas]``: the open round as the workers fold it, retained, before its manifest
        (the broker routes it to the workers before any device can answer the manifest)."""
        if self.intake is not None:
            self._publish(self.topics.work, self.intake.work_order(self.engine), retain=True)

    def _publish_secagg(self, publications: Sequence[SecAggPublication]) -> None:
        """A secure round's signed documents (or the empty payloads that clear them), in order."""
        for p in publications:
            self._publish(p.topic, p.payload, retain=p.retain)

    def _tick(self) -> None:
        """Lets the engine close the secure round's phases that are due; publishes what it says."""
        publications = self.engine.tick(self.clock())
        if publications:
            self._publish_secagg(publications)
            self._status_dirty = True

    def _publish_rotations(self) -> None:
        """Every rotation document ``fedge keys rotate`` left beside the signing key, retained,
        so a device that was offline for several rotations can follow them in order."""
        directory = self.config.signing_key_file.parent
        for path in sorted(directory.glob(f"{ROTATION_FILE_PREFIX}[0-9]*")):
            try:
                sequence = int(path.name[len(ROTATION_FILE_PREFIX) :])
                frame = path.read_bytes()
            except (ValueError, OSError) as exc:
                log.error("skipping rotation file %s: %s", path, exc)
                continue
            self._publish(self.topics.rotation(sequence), frame, retain=True)
            log.info("published signing-key rotation %d", sequence)

    def _reload_registry(self) -> None:
        """Enrollments and revocations take effect from the next round on."""
        try:
            registry = load_registry_file(self.config.registry_file)
        except FedgeError as exc:
            log.error("device registry unreadable, keeping the previous one: %s", exc)
            return
        self.engine.set_registry(registry.devices, set(registry.revoked))

    def _publish_status(self, force: bool = True) -> None:
        """Retained status and fleet summary for operators and BMS; at most twice a second
        unless ``force``d. A device turning stale (no status for a while) is a change too."""
        now = time.monotonic()
        if not force and now - self._status_sent_at < STATUS_INTERVAL_S:
            return
        stale = self._stale_devices()
        if not force and not self._status_dirty and stale == self._stale_sent:
            return
        self._ensure_leader()
        status = self.status()
        self.last_status = status
        summary = self.fleet_summary(status)
        self._refresh_dashboard(status, summary)
        # Offline, nothing is queued: paho would send a queued status after the fresh one the
        # reconnect publishes, and the broker would retain the older (found by the chaos loop).
        online = self.connected.is_set()
        if online:
            encoded = json.dumps(status).encode()
            self.client.publish(self.topics.aggregator_status, encoded, qos=1, retain=True)
            self.traffic.outbound(self.topics.aggregator_status, len(encoded))
            encoded_summary = json.dumps(summary).encode()
            self.client.publish(self.topics.fleet_summary, encoded_summary, qos=1, retain=True)
            self.traffic.outbound(self.topics.fleet_summary, len(encoded_summary))
        if self.leadership is not None:
            self.leadership.report(status, self.clock())
        self._status_dirty = not online
        self._status_sent_at = now
        self._stale_sent = stale

    def _stale_devices(self) -> frozenset[str]:
        now = self.clock()
        return frozenset(d for d, seen in self.seen.items() if device_condition(seen, now) == "stale")

    def fleet_summary(self, status: dict[str, Any] | None = None) -> dict[str, Any]:
        """The retained ``aggregator/fleet`` (``fedge.fleet/1``, :mod:`fleet_summary`)."""
        status = self.status() if status is None else status
        return build_fleet_summary(status, self.seen, self.engine.registry, self.clock())

    def status(self) -> dict[str, Any]:
        """The retained ``aggregator/status``: the engine's, plus which devices are online and
        what this service dropped (``messages_dropped`` by reason; ``inbox_overflow`` is its
        ``inbox_full``), its inbox, and its state directory (``state_dir``: the problem while
        checkpoint writes fail for a full or read-only file system, and the failed writes so far)."""
        status = {"schema": AGGREGATOR_STATUS_SCHEMA, **self.engine.status(self.clock())}
        status["generation"] = self.engine.state.generation
        status["online_devices"] = sorted(self.online)
        status["not_ready_devices"] = sorted(self.not_ready)
        dropped = self.messages_dropped
        status["inbox_overflow"] = dropped.get("inbox_full", 0)
        status["messages_dropped"] = dropped
        status["inbox"] = self.inbox_status()
        status["state_dir"] = self.state_dir_watch.report()
        status["replicas"] = None if self.intake is None else self.intake.status()
        status["upstream"] = None  # a building gateway's (fedge.aggregator.building)
        current = self.engine.current
        judged = (
            current.manifest.version if current is not None and current.manifest.phase == "train" else None
        )
        status["rollout"] = self.rollout.status(judged)
        return status

    def _drain(self, timeout: float) -> None:
        """Handles at most one queued message. Whatever that message does, the loop goes on:
        an exception from handling it is counted (``handler_error:<type>``) and logged; only
        :class:`LeadershipLost` (and KeyboardInterrupt/SystemExit, which are no Exceptions)
        propagate."""
        self.heartbeat.beat()
        self._ensure_leader()
        if self._redeliver_due():
            self._redeliver()
        try:
            item = self.inbox.get(timeout=timeout)
        except queue.Empty:
            self._publish_status(force=False)
            self._dashboard_tick()
            return
        topic, payload = item[0], item[1]
        ack: tuple[int, int] | None = item[2] if len(item) > 2 else None
        self._release(len(payload))
        try:
            self._handle(topic, payload)
        except LeadershipLost:
            raise  # not acknowledged: the broker keeps it in this session
        except Exception as exc:  # one message never ends the service
            self._drop(f"handler_error:{type(exc).__name__}", topic, repr(exc), exc)
        self._ack(ack)
        self._publish_status(force=False)
        self._dashboard_tick()

    def _handle(self, topic: str, payload: bytes) -> None:
        if topic.startswith(self.topics.base + "/status/"):
            self._track_status(topic, payload)
            return
        if topic.startswith(self.topics.base + "/insight/"):
            self._track_insight(topic, payload)
            return
        if self.intake is not None and topic.startswith(self.topics.base + "/aggregator/partial/"):
            answer = self.intake.handle(self.engine, topic, payload, self.clock())
            if answer is not None:
                self._publish(answer[0], answer[1], retain=False)
            self._status_dirty = True
            return
        if is_chunk(payload):  # a piece of a larger update: the engine sees only the whole
            self._status_dirty = True
            whole = self.chunks.take(self.engine, topic, payload, self.clock())
            if whole is None:
                return
            payload = whole
        outcome = self.engine.handle(topic, payload, self.clock())
        if outcome.accepted:
            self.accepted.add(outcome.kind or "update")
            log.info("accepted %s from %s", outcome.kind, outcome.device_id)
        elif outcome.reason == RejectReason.DUPLICATE:  # a QoS 1 redelivery, a resend after a reconnect
            log.info("rejected message from %s on %s: duplicate (counted already)", outcome.device_id, topic)
        else:
            log.warning("rejected message from %s on %s: %s", outcome.device_id or "?", topic, outcome.reason)
        self._status_dirty = True

    def _track_insight(self, topic: str, payload: bytes) -> None:
        """Keeps each enrolled device's latest prediction for the dashboard (an empty payload:
        cleared). Bounded: one document per enrolled device, each at most MAX_INSIGHT_BYTES."""
        try:
            device = self.topics.device_of(topic, "insight")
        except FedgeError as exc:
            self._drop("insight_bad_topic", topic, str(exc))
            return
        if device not in self.engine.registry:
            self._drop("insight_unknown_device", topic, f"{device!r} is not enrolled")
            return
        if not payload:
            self.insights.pop(device, None)
        else:
            try:
                document = loads_bounded(payload, max_bytes=MAX_INSIGHT_BYTES)
            except BoundedJsonError as exc:
                self._drop(f"insight_{exc.reason}", topic, str(exc))
                return
            if not isinstance(document, dict):
                self._drop("insight_not_an_object", topic, f"a JSON {type(document).__name__}")
                return
            self.insights[device] = document
        self._dashboard_due = True

    def _dashboard_tick(self) -> None:
        """Rebuilds the dashboard's view when a prediction or a device status changed it, at
        most once a second (a status publish rebuilds it anyway)."""
        if self._dashboard_due and time.monotonic() - self._dashboard_built_at >= DASHBOARD_INTERVAL_S:
            self._refresh_dashboard()

    def _refresh_dashboard(
        self, status: dict[str, Any] | None = None, summary: dict[str, Any] | None = None
    ) -> None:
        """Rebuilds the dashboard's view (main thread); the HTTP route hands out the bytes.
        ``status`` and ``summary``: the ones just published, if any (not built again)."""
        if not self.config.metrics.enabled:
            return
        self._dashboard_due = False
        self._dashboard_built_at = time.monotonic()
        status = status if status is not None else self.last_status or self.status()
        now = self.clock()
        devices = []
        for device in sorted(set(self.engine.registry) | set(self.seen)):
            seen = self.seen.get(device)
            devices.append(
                {
                    "device_id": device,
                    "condition": device_condition(seen, now),
                    "state": seen.state if seen else None,
                    "ready": seen.ready if seen else None,
                    "last_seen": self.wall_seen.get(device),
                }
            )
        summary = summary if summary is not None else self.fleet_summary(status)
        view = build_view(status, summary, self.engine.state.history, devices, self.insights)
        self.dashboard_json = view_json(view)

    def _track_status(self, topic: str, payload: bytes) -> None:
        """Which devices are online, from their retained statuses (an empty one: cleared)."""
        try:
            device = self.topics.device_of(topic, "status")
        except FedgeError as exc:
            self._drop("status_bad_topic", topic, str(exc))
            return
        state: object = "offline"
        if payload:
            try:
                status = loads_bounded(payload, max_bytes=MAX_STATUS_BYTES)
            except BoundedJsonError as exc:
                self._drop(f"status_{exc.reason}", topic, str(exc))
                return
            if not isinstance(status, dict):
                self._drop("status_not_an_object", topic, f"a JSON {type(status).__name__}")
                return
            state = status.get("state")
            ready = status.get("ready") is not False  # absent (older agents): ready
        else:
            ready = True
        self.seen[device] = DeviceSeen(state if isinstance(state, str) else "online", ready, self.clock())
        self.wall_seen[device] = time.time()
        self._dashboard_due = True  # its state and last status on the dashboard
        was = (device in self.online, device in self.not_ready)
        if state == "offline":
            self.online.discard(device)
        else:
            self.online.add(device)
        if ready:
            self.not_ready.discard(device)
        else:
            self.not_ready.add(device)
        if was != (device in self.online, device in self.not_ready):
            self._status_dirty = True

    def _unavailable(self) -> frozenset[str]:
        """The devices a round leaves out while enough others remain
        (:meth:`RoundEngine.select_devices`): those whose status says they are not ready, and
        those whose last status is ``offline`` (their Last Will, or a clean stop). A device
        known to be gone would keep every round waiting for its deadline (bench_fleet_budget
        found it: an OOM-killed agent stayed selected). Devices never heard from stay in."""
        gone = {device for device in self.seen if device not in self.online}
        return frozenset(self.not_ready | gone)

    def _wait_for_devices(self) -> None:
        """Before the first round, give enrolled devices a moment to connect (bounded)."""
        wanted = set(self.engine.registry)
        until = self.clock() + self.config.rounds.wait_for_devices_s

        def all_ready() -> bool:
            return wanted <= self.online and not wanted & self.not_ready

        while not self.stop_requested.is_set() and self.clock() < until and not all_ready():
            self._drain(0.1)
        online = self.online & wanted
        log.info(
            "%d of %d enrolled devices online, %d of them ready%s",
            len(online),
            len(wanted),
            len(online - self.not_ready),
            f" (not ready: {', '.join(sorted(online & self.not_ready))}: too few local samples)"
            if online & self.not_ready
            else "",
        )

    def _campaign(self, leadership: Leadership) -> bool:
        """Waits (heartbeat fresh, nothing connected) until this replica leads; False if asked
        to stop first."""
        leadership.start()
        reported: object = object()
        while not self.stop_requested.is_set():
            self.heartbeat.beat()
            if leadership.is_leader:
                log.info("%s leads: loading the checkpoint and starting rounds", leadership.identity)
                return True
            holder = leadership.holder
            if holder != reported:
                log.info("%s follows; the lease is held by %s", leadership.identity, holder or "nobody")
                reported = holder
            self.stop_requested.wait(0.1)
        return False

    def run(self) -> int:
        """0 when stopped or done; :data:`EXIT_LEADERSHIP_LOST` when the Lease was lost. With
        ``[metrics] enabled`` it serves /metrics, /healthz and /readyz meanwhile."""
        self.heartbeat.beat()
        if self.config.metrics.enabled:  # prometheus-client is imported only then
            from fedge.aggregator.metrics import serve_metrics  # noqa: PLC0415

            self.endpoint = serve_metrics(self)
        try:
            return self._run_elected()
        finally:
            if self.endpoint is not None:
                self.endpoint.stop()

    def _run_elected(self) -> int:
        if self.leadership is None:
            return self._run_rounds()
        try:
            if not self._campaign(self.leadership):
                return 0
            self._load_state()
            return self._run_rounds()
        finally:
            self.leadership.stop()

    def _run_rounds(self) -> int:
        connect(self.client, self.config.mqtt, receive_maximum=self.receive_maximum())
        self.client.loop_start()
        lost = False
        try:
            while not self.connected.wait(0.2):
                self.heartbeat.beat()
                self._ensure_leader()
                if self.stop_requested.is_set():
                    return 0
            self._publish_rotations()
            self._wait_for_devices()
            if self.stop_requested.is_set():
                return 0
            self._reload_registry()
            self._announce(self.engine.open_round(self.clock(), self._unavailable()))
            self._publish_rollout(self.rollout.retained())
            self._publish_status()
            while not self.stop_requested.is_set():
                self._republish_retained()
                self._rollout_request()
                if self.engine.current is None:  # final model published
                    self._tick()  # clears a secure round left to publish, if any
                    if self.config.exit_when_done:
                        break
                    self._drain(0.5)
                    continue
                self._drain(0.1)
                self._tick()
                if self.engine.round_due(self.clock()):
                    issued_at = self.engine.current.manifest.issued_at
                    record = self.engine.close_round()
                    self.round_outcomes.add(record.outcome)
                    self.round_durations.observe(max(0.0, self.clock() - issued_at))
                    log.info(
                        "round %s %s: %d/%d devices, %s, rejected %s; %s",
                        record.round_id,
                        record.outcome,
                        record.reported,
                        record.selected,
                        record.fed_eval_summary(),
                        ", ".join(f"{why}: {n}" for why, n in sorted(record.rejected.items())) or "none",
                        influence_summary(record),
                    )
                    published = self.engine.state.published_weights_sha256
                    judged = self.rollout.judge_round(record, self._last_publication, published, self.clock())
                    self._reload_registry()
                    self._announce(self.engine.open_round(self.clock(), self._unavailable()))
                    self._publish_rollout(judged)
                    self._publish_status()
            return 0
        except LeadershipLost:
            lost = True
            log.error(
                "lost the lease: stopped publishing; exiting with %d to rejoin as a follower",
                EXIT_LEADERSHIP_LOST,
            )
            return EXIT_LEADERSHIP_LOST
        finally:
            if not lost and (self.leadership is None or self.leadership.is_leader):
                self._publish_status()
            self.client.disconnect()
            self.client.loop_stop()

    def request_stop(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        self.stop_requested.set()


def run_aggregator(config: AggregatorConfig, env: Mapping[str, str] | None = None) -> int:
    leadership = None
    if config.leader.enabled:  # only then the Kubernetes client (~48 MB) is imported
        from fedge.aggregator.leadership import leadership_from_settings  # noqa: PLC0415

        leadership = leadership_from_settings(config.leader)
    service = AggregatorService(config, leadership=leadership)
    signal.signal(signal.SIGTERM, service.request_stop)
    signal.signal(signal.SIGINT, service.request_stop)
    return service.run()
