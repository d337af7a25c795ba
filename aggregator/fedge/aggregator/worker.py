"""``fedge aggregator run`` with ``[replicas] role = "worker"``: folds a share of the updates.

The worker subscribes to the fleet's updates through the shared subscription the leader is in
(the broker hands each update to one member), to the leader's retained work order, and to its
own verdicts. It checks, opens and folds each update exactly as the leader would
(:mod:`fedge.aggregator.replica_round`) and every ``flush_updates`` updates or
``flush_interval_s`` sends the leader a sealed partial (:mod:`fedge.aggregator.partial_wire`).

Nothing is lost when a worker dies: it acknowledges an update to the broker (paho's
``manual_ack``) only once the leader's verdict on the partial holding it arrived. Until then the
broker keeps the update in the worker's persistent session (a stable client id,
``<[mqtt] client_id>-<worker_id>``), and a restarted worker gets it again; one the leader has
counted already comes back as a ``conflict`` and is left out, so nothing counts twice either.
The MQTT 5 receive maximum bounds how many updates the broker has handed the worker
unacknowledged, and with it the worker's memory.

One message never ends the worker: anything a message raises is counted by reason and logged.
A worker whose ``[rounds]`` differ from the leader's (it would fold otherwise) stops with a
one-line error (exit 78) instead of taking its share of the updates.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import paho.mqtt.client as mqtt
from nacl.public import PrivateKey
from nacl.signing import SigningKey
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedge.aggregator.config import AggregatorConfig
from fedge.aggregator.heartbeat import Heartbeat
from fedge.aggregator.partial_wire import (
    PartialWireError,
    decode_verdict,
    decode_work_order,
    encode_partial,
    partial_key,
)
from fedge.aggregator.registry import load_registry, load_registry_file
from fedge.aggregator.replica_round import ReplicaMismatch, WorkerBatch, follow, partial_of, take_batch
from fedge.aggregator.round_engine import RoundEngine
from fedge.aggregator.service import initial_state, load_model, set_tcp_nodelay
from fedge.protocol.config_source import ConfigError
from fedge.protocol.errors import FedgeError
from fedge.protocol.reasons import RejectReason
from fedge.protocol.topics import FleetTopics
from fedge.shell.drops import DroppedMessages
from fedge.shell.files import prepare_writable_dir, read_private_key
from fedge.shell.mqtt import connect, make_client, publish_queued, watch_connection

log = logging.getLogger("fedge.aggregator.worker")
#: The most updates the broker may have handed this worker unacknowledged (MQTT 5 receive
#: maximum): about 30 MB of sealed updates of the default model at most.
RECEIVE_MAXIMUM = 1000
#: A partial with no verdict this long is sent again (the leader answers a resend, never
#: counts it twice).
RESEND_AFTER_S = 5.0
EXIT_CONFIG = 78
#: How long a stopping worker waits for the verdicts on what it holds before it leaves.
LEAVE_S = 5.0
_ADVICE = {
    "handler": "A bug in fedge: the message was skipped. Please report this traceback.",
    "work": "The leader's work order did not verify: give every worker the leader's signing key.",
    "verdict": "A verdict did not verify: give every worker the leader's signing key.",
    "late": "Updates reached this worker after the leader closed their round: the worker is too "
    "slow for the fleet (more workers, or a longer [rounds] round_timeout_s).",
}


@dataclass
class InFlight:
    """A partial sent and not answered yet, with the messages it holds unacknowledged."""

    round_id: str
    seq: int
    batch: WorkerBatch
    mids: list[tuple[int, int]]
    exclude: frozenset[str] = frozenset()
    sent_at: float = 0.0
    payload: bytes = b""


@dataclass
class WorkerCounts:
    partials: int = 0
    accepted: int = 0
    conflicts: int = 0
    refused: dict[str, int] = field(default_factory=dict)


class AggregatorWorker:
    def __init__(self, config: AggregatorConfig, clock: Callable[[], float] = time.time) -> None:
        """Everything wrong with the configuration fails here, as for the leader."""
        self.config = config
        self.settings = config.replicas
        self.clock = clock
        self.worker_id = config.replicas.worker_id
        self.topics = FleetTopics(config.fleet)
        loaded = load_model(config.model_dir)
        self.box_key = PrivateKey(read_private_key(config.box_key_file, "box"))
        self.signing_key = SigningKey(read_private_key(config.signing_key_file, "signing"))
        self.box = partial_key(self.box_key)
        try:
            prepare_writable_dir(config.state_dir)  # the heartbeat only: a worker keeps no state
        except OSError as exc:
            raise ConfigError(
                f"cannot write [aggregator] state_dir {config.state_dir}: {exc.strerror}"
            ) from None
        self.heartbeat = Heartbeat(config.heartbeat_path)
        self.engine = RoundEngine(
            config.fleet,
            config.rounds,
            loaded.manifest,
            loaded.model,
            self.box_key,
            self.signing_key,
            load_registry(config.registry_file),
            initial_state(loaded),
        )
        self.inbox: queue.Queue[tuple[str, bytes, int, int]] = queue.Queue()
        self.held: list[tuple[str, bytes, int, int]] = []  # updates that came before a work order
        self.batch_mids: list[tuple[int, int]] = []  # the open batch's messages, unacknowledged
        self.inflight: InFlight | None = None
        self.seq = 0
        self.counts = WorkerCounts()
        self.dropped = DroppedMessages(log, _ADVICE, "the worker's log")
        self.stop_requested = threading.Event()
        self.exit_code = 0
        self.client = make_client(
            config.mqtt, client_id=f"{config.mqtt.client_id}-{self.worker_id}", manual_ack=True
        )
        watch_connection(self.client, log, self._on_connect, lambda: None)
        self.client.on_message = self._on_message
        self.client.on_socket_open = set_tcp_nodelay  # acks then partials: no Nagle stall

    # --- paho's thread ---------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client) -> None:
        client.subscribe(
            [
                (self.topics.shared_update_filter(self.settings.share_group), 1),
                # QoS 0 on purpose: the updates the worker holds unacknowledged fill the
                # broker's window of QoS 1 messages to it (the receive maximum), and a verdict
                # queued behind them could never arrive to free it. Mosquitto sends QoS 0 at
                # once. A verdict lost with the connection is asked for again (RESEND_AFTER_S);
                # the work order is retained and comes again with the next subscription.
                (self.topics.work, 0),
                (self.topics.verdict(self.worker_id), 0),
            ]
        )
        log.info("worker %s connected to %s", self.worker_id, self.config.mqtt.url)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self.inbox.put_nowait((msg.topic, bytes(msg.payload), msg.mid, msg.qos))
        except Exception as exc:  # never raise in paho's thread
            self.dropped.count(f"handler_error:{type(exc).__name__}", "?", repr(exc), exc)

    # --- the loop --------------------------------------------------------------------------

    def _ack(self, mids: list[tuple[int, int]]) -> None:
        for mid, qos in mids:
            if qos > 0:
                self.client.ack(mid, qos)

    def _handle(self, topic: str, payload: bytes, mid: int, qos: int) -> None:
        if topic == self.topics.work:
            try:
                self._work_order(payload)
            finally:
                self._ack([(mid, qos)])
            return
        if topic == self.topics.verdict(self.worker_id):
            try:
                self._verdict(payload)
            finally:
                self._ack([(mid, qos)])
            return
        if self.engine.current is None:  # no round yet (a fresh start): the work order comes next
            self.held.append((topic, payload, mid, qos))
            return
        outcome = self.engine.handle(topic, payload, self.clock())
        if outcome.reason == RejectReason.DUPLICATE:  # a QoS 1 redelivery, a resend after a reconnect
            log.info("rejected message from %s on %s: duplicate (counted already)", outcome.device_id, topic)
        elif not outcome.accepted:
            log.warning("rejected message from %s on %s: %s", outcome.device_id or "?", topic, outcome.reason)
        batch = self.engine.current.batch
        if batch is not None:
            batch.touch()
        self.batch_mids.append((mid, qos))

    def _work_order(self, payload: bytes) -> None:
        if not payload:
            self._abandon("the leader published the final model")
            self.engine.current = None
            return
        try:
            order = decode_work_order(payload, self.signing_key.verify_key, self.config.fleet)
        except PartialWireError as exc:
            self.dropped.count(f"work_{exc.reason}", self.topics.work, str(exc))
            return
        current = self.engine.current
        if current is not None and current.manifest.round_id == order.round_id:
            return
        self._abandon(f"round {order.round_id} opened")
        try:
            registry = load_registry_file(self.config.registry_file)
            self.engine.set_registry(registry.devices, set(registry.revoked))
        except FedgeError as exc:
            log.error("device registry unreadable, keeping the previous one: %s", exc)
        try:
            follow(self.engine, order)
        except ReplicaMismatch as exc:
            log.error("%s; give the worker the leader's aggregator.toml", exc)
            self.exit_code = EXIT_CONFIG
            self.stop_requested.set()
            return
        log.info("following round %s (v%d)", order.round_id, order.manifest.version)
        held, self.held = self.held, []
        for message in held:
            self._handle(*message)

    def _abandon(self, why: str) -> None:
        """The round this worker folded is over: what it holds of it can count no more
        (the leader refuses partials of a closed round). Acknowledged, counted, logged."""
        late = take_batch(self.engine)
        mids, self.batch_mids = self.batch_mids, []
        if late is not None and late.accepted:
            self.dropped.count("late", self.topics.update_filter, f"{len(late.accepted)} updates; {why}")
        if self.inflight is not None:
            mids += self.inflight.mids
            self.inflight = None
        self._ack(mids)

    def _verdict(self, payload: bytes) -> None:
        try:
            verdict = decode_verdict(payload, self.signing_key.verify_key, self.config.fleet, self.worker_id)
        except PartialWireError as exc:
            self.dropped.count(f"verdict_{exc.reason}", self.topics.verdict(self.worker_id), str(exc))
            return
        f = self.inflight
        if f is None or (verdict.round_id, verdict.batch) != (f.round_id, f.seq):
            return  # an answer to a resend that was answered already
        if verdict.outcome == "conflict":
            self.counts.conflicts += 1
            log.info(
                "partial %d: %s counted already; sending it without them", f.seq, ", ".join(verdict.conflicts)
            )
            f.exclude |= frozenset(verdict.conflicts)
            self._send(f)
            return
        self.inflight = None
        self._ack(f.mids)
        if verdict.outcome == "accepted":
            self.counts.accepted += 1
            return
        self.counts.refused[verdict.reason] = self.counts.refused.get(verdict.reason, 0) + 1
        log.warning(
            "partial %d refused by the leader: %s (%d updates)", f.seq, verdict.reason, len(f.batch.accepted)
        )

    def _send(self, f: InFlight) -> None:
        partial = partial_of(self.engine, f.batch, self.worker_id, f.seq, f.exclude)
        f.payload = encode_partial(partial, self.box, self.signing_key)
        f.sent_at = time.monotonic()
        publish_queued(self.client, self.topics.partial(self.worker_id), f.payload, qos=1)
        self.counts.partials += 1

    def _flush_due(self, now: bool = False) -> None:
        r = self.engine.current
        if r is None or r.batch is None or self.inflight is not None or len(r.batch) == 0:
            if self.inflight is not None and time.monotonic() - self.inflight.sent_at > RESEND_AFTER_S:
                publish_queued(self.client, self.topics.partial(self.worker_id), self.inflight.payload, qos=1)
                self.inflight.sent_at = time.monotonic()
            return
        started = r.batch.started or time.monotonic()
        if (
            len(r.batch) < self.settings.flush_updates
            and time.monotonic() - started < self.settings.flush_interval_s
        ):
            return
        batch = take_batch(self.engine)
        if batch is None:
            return
        self.seq += 1
        mids, self.batch_mids = self.batch_mids, []
        self.inflight = InFlight(r.manifest.round_id, self.seq, batch, mids)
        self._send(self.inflight)

    def run(self) -> int:
        connect(self.client, self.config.mqtt, receive_maximum=RECEIVE_MAXIMUM)
        self.client.loop_start()
        try:
            while not self.stop_requested.is_set():
                self._turn()
            if self.exit_code == 0:
                self._leave()
            return self.exit_code
        finally:
            self.client.disconnect()
            self.client.loop_stop()

    def _turn(self, flush_now: bool = False) -> None:
        """One turn of the loop: at most one message, then a partial if one is due."""
        self.heartbeat.beat()
        try:
            message = self.inbox.get(timeout=0.02)
        except queue.Empty:
            message = None
        if message is not None:
            try:
                self._handle(*message)
            except Exception as exc:  # one message never ends the worker
                self.dropped.count(f"handler_error:{type(exc).__name__}", message[0], repr(exc), exc)
                self._ack([(message[2], message[3])])
        self._flush_due(flush_now)

    def _leave(self) -> None:
        """A stop (SIGTERM: a scale-down, a rolling update) hands over what this worker holds.

        It leaves the shared subscription first, so the broker hands it nothing more; sends what
        it folded and waits (at most ``LEAVE_S``) for the verdicts; then, holding nothing
        unacknowledged, it ends its broker session (session expiry 0 on DISCONNECT). A member
        that is gone keeps its turn in the group while its session lives, and what the broker
        queued for it would wait there unread. Holding something still, it keeps the session,
        so the same worker started again gets those updates back."""
        if not self.client.is_connected():
            return
        self.client.unsubscribe(self.topics.shared_update_filter(self.settings.share_group))
        until = time.monotonic() + LEAVE_S
        while time.monotonic() < until:
            self._turn(flush_now=True)
            if self.inflight is None and not self.batch_mids and not self.held and self.inbox.empty():
                props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
                props.SessionExpiryInterval = 0
                self.client.disconnect(properties=props)
                log.info("worker %s left the share group holding nothing; session ended", self.worker_id)
                return
        log.warning(
            "worker %s stopped holding unacknowledged updates; its broker session keeps them for the "
            "same worker_id to take back",
            self.worker_id,
        )

    def request_stop(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        self.stop_requested.set()


def run_worker(config: AggregatorConfig) -> int:
    worker = AggregatorWorker(config)
    signal.signal(signal.SIGTERM, worker.request_stop)
    signal.signal(signal.SIGINT, worker.request_stop)
    log.info(
        "aggregator worker %s of fleet %s: shared group %s, partials every %d updates or %.2fs",
        worker.worker_id,
        config.fleet,
        config.replicas.share_group,
        config.replicas.flush_updates,
        config.replicas.flush_interval_s,
    )
    return worker.run()
