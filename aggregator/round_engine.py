"""The aggregator's round engine: a pure state machine, fed messages and the time.

It never touches the network, the disk or the clock: the MQTT shell hands it every message on
``update/+`` with the current time, asks it whether the round is due, and publishes and
checkpoints what it returns. That keeps every rule about which update counts testable in
microseconds and identical in production and tests.

A round: :meth:`RoundEngine.open_round` returns the signed manifest and blobs to publish ->
:meth:`handle` accepts or rejects each sealed message (cheapest check first; a rejected
message leaves the aggregate exactly as if it never arrived) -> once every selected device
reported or the deadline passed, :meth:`close_round` aggregates (if at least ``min_devices``
reported) or aborts, and the next :meth:`open_round` publishes the result.
"""

from __future__ import annotations

import copy
import hashlib
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from nacl.public import Box, PrivateKey, PublicKey
from nacl.signing import SigningKey

from aggregator.config import RoundSettings
from aggregator.fedavg import AggregationError, StreamingFedAvg, WeightedMeanAccumulator
from aggregator.moments import MomentsAccumulator
from protocol.errors import FedgeError
from protocol.messages import MessageError, decode_moments, decode_update
from protocol.model_manifest import ModelManifest, Normalisation
from protocol.round_manifest import RoundManifest
from protocol.sealing import SealError, box_for, open_sealed, read_header
from protocol.signing import sign_document
from protocol.topics import FleetTopics, TopicError

MANIFEST_DOC_TYPE = "round-manifest"


@dataclass(frozen=True)
class Outcome:
    """What happened to one message: accepted, or rejected with a stable reason code."""

    accepted: bool
    reason: str
    device_id: str | None
    kind: str | None = None


@dataclass(frozen=True)
class Publication:
    """What the shell must publish, in order: blobs (retained), then the manifest (retained)."""

    manifest: RoundManifest
    manifest_frame: bytes
    blobs: dict[str, bytes]
    clear_blobs: tuple[str, ...]


@dataclass(frozen=True)
class RoundRecord:
    """One closed round, for status, the demo's table and the plot."""

    round_number: int
    round_id: str
    phase: str
    outcome: str  # "aggregated" | "aborted"
    version: int  # manifest version the round was announced with
    selected: int
    reported: int
    examples: int
    train_loss: float | None
    fed_eval_loss: float | None
    fed_eval_accuracy: float | None
    fed_eval_examples: int
    mean_update_bytes: float | None
    rejected: dict[str, int]
    failure: str | None = None  # why an aggregation with a quorum was aborted
    clipped: int = 0  # updates scaled down to the norm bound
    norm_bound: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class EngineState:
    """Everything that survives a restart (the shell checkpoints it after every round)."""

    version: int
    last_manifest_sha256: str
    completed_rounds: int
    weights: np.ndarray
    normalisation: Normalisation | None
    counters: dict[str, int]
    rejected_total: dict[str, int] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    published_weights_sha256: str | None = None  # to clear that blob once it is superseded


class _OpenRound:
    def __init__(
        self, manifest: RoundManifest, parameter_count: int, settings: RoundSettings, n_features: int
    ) -> None:
        self.manifest = manifest
        self.reported: dict[str, int] = {}  # device -> accepted counter
        self.fedavg = StreamingFedAvg(parameter_count, settings.max_examples_per_update)
        self.moments = MomentsAccumulator(n_features, max_count_per_update=settings.max_examples_per_update)
        self.train_loss = WeightedMeanAccumulator()
        self.eval_loss = WeightedMeanAccumulator()
        self.eval_accuracy = WeightedMeanAccumulator()
        self.update_bytes = 0
        self.clipped = 0
        self.norm_bound = 0.0  # 0: unbounded
        self.rejected: Counter[str] = Counter()


class RoundEngine:
    def __init__(
        self,
        fleet: str,
        settings: RoundSettings,
        model_manifest: ModelManifest,
        model_bytes: bytes,
        box_key: PrivateKey,
        signing_key: SigningKey,
        registry: dict[str, PublicKey],
        state: EngineState,
    ) -> None:
        k = settings.devices_per_round
        if 0 < k < settings.min_devices:
            raise FedgeError(
                f"devices_per_round={k} is below min_devices={settings.min_devices}: no round could pass"
            )
        self.fleet = fleet
        self.topics = FleetTopics(fleet)
        self.settings = settings
        self.model_manifest = model_manifest
        self.model_bytes = model_bytes
        self.model_sha256 = hashlib.sha256(model_bytes).hexdigest()
        self.box_key = box_key
        self.signing_key = signing_key
        self.registry = dict(registry)
        self.revoked: set[str] = set()
        self.state = state
        self.layout = model_manifest.layout
        self.current: _OpenRound | None = None
        self._model_published = False
        # One Box per device: the X25519 shared key is computed once, not per message.
        self._boxes: dict[str, Box] = {}

    def set_registry(self, registry: dict[str, PublicKey], revoked: set[str] | None = None) -> None:
        """New enrollments and revocations, effective from the next round."""
        for device, key in list(self.registry.items()):
            if registry.get(device) != key:
                self._boxes.pop(device, None)
        self.registry = dict(registry)
        self.revoked = set(revoked or ()) - set(registry)

    # --- round lifecycle ---------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.state.completed_rounds >= self.settings.rounds

    @property
    def phase(self) -> str:
        if self.done:
            return "final"
        return "moments" if self.state.normalisation is None else "train"

    def select_devices(self, version: int) -> tuple[str, ...]:
        enrolled = sorted(self.registry)
        k = self.settings.devices_per_round
        if k == 0 or k >= len(enrolled):
            return tuple(enrolled)
        rng = np.random.default_rng([self.settings.selection_seed, version])
        return tuple(sorted(rng.choice(enrolled, size=k, replace=False).tolist()))

    def open_round(self, now: float) -> Publication:
        """Announces the next round (or the final model): bumps the version, signs the manifest."""
        version = self.state.version + 1
        phase = self.phase
        if phase == "train":
            round_id = f"r{self.state.completed_rounds + 1:04d}-v{version}"
        elif phase == "moments":
            round_id = f"m-v{version}"
        else:
            round_id = f"final-v{version}"
        timeout = 0.0 if phase == "final" else self.settings.round_timeout_s
        weights_bytes = self.state.weights.astype("<f4").tobytes()
        weights_sha = hashlib.sha256(weights_bytes).hexdigest()
        manifest = RoundManifest(
            fleet=self.fleet,
            version=version,
            parent_sha256=self.state.last_manifest_sha256,
            phase=phase,
            round_number=self.state.completed_rounds + (0 if phase == "final" else 1),
            round_id=round_id,
            issued_at=now,
            deadline=now + timeout,
            expires_at=now + timeout + self.settings.manifest_ttl_s,
            selected_devices=() if phase == "final" else self.select_devices(version),
            min_devices=self.settings.min_devices,
            codec=self.settings.codec,
            model_sha256=self.model_sha256,
            model_bytes=len(self.model_bytes),
            weights_sha256=weights_sha,
            weights_bytes=len(weights_bytes),
            model_manifest=self.model_manifest,
            normalisation=self.state.normalisation,
        )
        frame = sign_document(MANIFEST_DOC_TYPE, manifest.to_dict(), self.signing_key)
        weights_topic = self.topics.blob(weights_sha)
        previous = self.state.published_weights_sha256
        clear = (self.topics.blob(previous),) if previous not in (None, weights_sha) else ()
        self.state.published_weights_sha256 = weights_sha
        self.state.version = version
        self.state.last_manifest_sha256 = manifest.sha256()
        s = self.settings
        norm_bound = s.max_update_norm or s.update_norm_ratio * float(
            np.linalg.norm(self.state.weights.astype(np.float64))
        )
        self.current = (
            None
            if phase == "final"
            else _OpenRound(
                manifest,
                self.model_manifest.parameter_count,
                self.settings,
                self.model_manifest.task.input_dim,
            )
        )
        blobs = {weights_topic: weights_bytes}
        if not self._model_published:  # retained: once per process is enough
            blobs = {self.topics.blob(self.model_sha256): self.model_bytes, **blobs}
            self._model_published = True
        if self.current is not None:
            self.current.norm_bound = norm_bound
        return Publication(manifest=manifest, manifest_frame=frame, blobs=blobs, clear_blobs=clear)

    def round_due(self, now: float) -> bool:
        """True once every selected device reported, or the deadline passed."""
        if self.current is None:
            return False
        m = self.current.manifest
        return len(self.current.reported) >= len(m.selected_devices) or now >= m.deadline

    def close_round(self) -> RoundRecord:
        """Aggregates the open round if enough devices reported, else aborts it (no new model)."""
        if self.current is None:
            raise FedgeError("no round is open")
        r = self.current
        m = r.manifest
        enough = len(r.reported) >= self.settings.min_devices
        failure: str | None = None
        try:
            if enough and m.phase == "moments":
                self.state.normalisation = r.moments.normalisation()
            elif enough:
                self.state.weights = r.fedavg.result(self.state.weights, self.settings.server_learning_rate)
                self.state.completed_rounds += 1
        except AggregationError as exc:
            # E.g. fewer than 2 samples for a normalisation, or weights overflowing float32: the
            # round is aborted (no new model), never a crash of the aggregator.
            enough = False
            failure = str(exc)
        # Counters advance for every authentic update, aggregated or not: a counter is never reused.
        self.state.counters.update(r.reported)
        record = RoundRecord(
            round_number=m.round_number,
            round_id=m.round_id,
            phase=m.phase,
            outcome="aggregated" if enough else "aborted",
            version=m.version,
            selected=len(m.selected_devices),
            reported=len(r.reported),
            examples=r.fedavg.total_examples if m.phase == "train" else r.moments.count,
            train_loss=r.train_loss.mean if r.train_loss.count else None,
            fed_eval_loss=r.eval_loss.mean if r.eval_loss.count else None,
            fed_eval_accuracy=r.eval_accuracy.mean if r.eval_accuracy.count else None,
            fed_eval_examples=int(r.eval_loss.total_weight),
            mean_update_bytes=r.update_bytes / len(r.reported) if r.reported else None,
            rejected=dict(r.rejected),
            failure=failure,
            clipped=r.clipped,
            norm_bound=r.norm_bound,
        )
        self.state.history.append(record.to_dict())
        self.current = None
        return record

    # --- messages ----------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes, now: float) -> Outcome:
        """Accepts or rejects one message from ``update/+``; every rejection is counted."""
        outcome = self._check(topic, payload, now)
        if not outcome.accepted:
            self.state.rejected_total[outcome.reason] = self.state.rejected_total.get(outcome.reason, 0) + 1
            if self.current is not None:
                self.current.rejected[outcome.reason] += 1
        return outcome

    def _check(self, topic: str, payload: bytes, now: float) -> Outcome:
        if len(payload) > self.settings.max_update_bytes:
            return Outcome(False, "too_large", None)
        try:
            topic_device = self.topics.device_of(topic, "update")
        except TopicError:
            return Outcome(False, "bad_topic", None)
        try:
            header, ciphertext = read_header(payload, self.settings.max_update_bytes)
        except SealError as exc:
            return Outcome(False, exc.reason, topic_device)
        device = header.device_id
        if device != topic_device:
            return Outcome(False, "device_mismatch", topic_device, header.kind)
        if header.fleet != self.fleet:
            return Outcome(False, "wrong_fleet", device, header.kind)
        device_key = self.registry.get(device)
        if device_key is None:
            reason = "revoked_device" if device in self.revoked else "unknown_device"
            return Outcome(False, reason, device, header.kind)
        r = self.current
        if r is None:
            return Outcome(False, "no_open_round", device, header.kind)
        m = r.manifest
        if header.round_id != m.round_id:
            return Outcome(False, "wrong_round", device, header.kind)
        if now > m.deadline:
            return Outcome(False, "late", device, header.kind)
        if header.model_version != m.version:
            return Outcome(False, "wrong_version", device, header.kind)
        if not m.is_selected(device):
            return Outcome(False, "not_selected", device, header.kind)
        expected_kind = "moments" if m.phase == "moments" else "update"
        if header.kind != expected_kind:
            return Outcome(False, "wrong_kind", device, header.kind)
        if device in r.reported:
            return Outcome(False, "duplicate", device, header.kind)
        if header.counter <= self.state.counters.get(device, -1):
            return Outcome(False, "replayed_counter", device, header.kind)
        box = self._boxes.get(device)
        if box is None:
            try:
                box = self._boxes[device] = box_for(self.box_key, device_key)
            except SealError as exc:
                return Outcome(False, exc.reason, device, header.kind)
        try:
            payload_header, body = open_sealed(
                header, ciphertext, self.box_key, device_key, self.settings.max_update_bytes, box=box
            )
        except SealError as exc:
            return Outcome(False, exc.reason, device, header.kind)
        try:
            if expected_kind == "moments":
                moments = decode_moments(payload_header, body, self.model_manifest.task.input_dim)
                if moments.count > self.settings.max_examples_per_update:
                    return Outcome(False, "too_many_examples", device, header.kind)
                try:
                    r.moments.add(moments.count, moments.sums, moments.sums_sq)
                except AggregationError:  # moments no real data can have, or too many samples
                    return Outcome(False, "bad_moments", device, header.kind)
            else:
                update = decode_update(payload_header, body, self.layout, m.codec)
                ev = update.evaluation
                limit = self.settings.max_examples_per_update
                if update.examples > limit or (ev is not None and ev.examples > limit):
                    return Outcome(False, "too_many_examples", device, header.kind)
                delta, clipped = update.delta, False
                if r.norm_bound > 0.0:
                    norm = float(np.linalg.norm(update.delta.astype(np.float64)))
                    if norm > r.norm_bound:
                        if self.settings.update_norm_policy == "reject":
                            return Outcome(False, "norm_too_large", device, header.kind)
                        scale = np.float32(r.norm_bound / norm)
                        delta, clipped = (update.delta * scale).astype(np.float32), True
                # All or nothing: the metrics go into copies first; the delta, whose add also
                # checks before it changes anything, goes in last; then the copies are kept.
                train_loss, eval_loss, eval_acc = (
                    copy.copy(r.train_loss),
                    copy.copy(r.eval_loss),
                    copy.copy(r.eval_accuracy),
                )
                train_loss.add(update.train_loss, update.examples)
                if ev is not None:
                    eval_loss.add(ev.loss, ev.examples)
                    if ev.accuracy is not None:
                        eval_acc.add(ev.accuracy, ev.examples)
                r.fedavg.add(delta, update.examples)
                r.train_loss, r.eval_loss, r.eval_accuracy = train_loss, eval_loss, eval_acc
                r.clipped += clipped
        except MessageError as exc:
            return Outcome(False, exc.reason, device, header.kind)
        except AggregationError:
            return Outcome(False, "rejected_by_aggregation", device, header.kind)
        r.reported[device] = header.counter
        r.update_bytes += len(payload)
        return Outcome(True, "accepted", device, header.kind)

    # --- status ------------------------------------------------------------------------------

    def status(self, now: float) -> dict[str, Any]:
        r = self.current
        return {
            "fleet": self.fleet,
            "state": "done" if self.done and r is None else "running",
            "phase": r.manifest.phase if r else self.phase,
            "version": self.state.version,
            "completed_rounds": self.state.completed_rounds,
            "rounds": self.settings.rounds,
            "round_id": r.manifest.round_id if r else None,
            "deadline": r.manifest.deadline if r else None,
            "selected": len(r.manifest.selected_devices) if r else 0,
            "reported": sorted(r.reported) if r else [],
            "rejected_total": dict(self.state.rejected_total),
            "history": self.state.history[-5:],
            "time": now,
        }

    def snapshot(self) -> EngineState:
        """A copy of the durable state, for the checkpoint."""
        return replace(
            self.state,
            weights=self.state.weights.copy(),
            counters=dict(self.state.counters),
            rejected_total=dict(self.state.rejected_total),
            history=list(self.state.history),
        )
