"""The device's side of the protocol without I/O: the twin of the aggregator's pure round engine.

:class:`DeviceCore` is given what arrives (a manifest frame, the blobs it named, the result of
local training) together with a clock reading and the keys the device trusts, and returns what
to do as :data:`Action` values: persist this state, fetch these blobs, load and train, send this
sealed frame. It opens no socket, reads no file and starts no thread, so the agent's service
(``fedge.agent.service``), the tests' simulated devices and the benchmarks' simulated fleet all
run the same verification, round logic and sealing; only the agent does the I/O.

Its phases are an explicit table (:data:`TRANSITIONS`), as h11 keeps its connection states: an
event a phase does not expect is a :class:`DeviceCoreError` (a bug in the caller), never a
silently different path.

    WAITING  --manifest accepted-->  FETCHING  --blobs, taking part-->  TRAINING
       ^   <--rejected / repeated--'    |  '--blobs missing / bad / not taking part--> WAITING
       '----------------------------------------------- sealed / too late <-- TRAINING
                                                  not enough data |   ^ retry (data arrived)
                                                                  v   |
       WAITING <-- too late / superseded --------------------- WAITING_FOR_DATA

and from any phase, :meth:`DeviceCore.abandon` (carrying out an action failed) back to WAITING.

**Sparse updates.** In a round whose codec is a top-k one (``manifest.topk_fraction``) the core
adds the device's error-feedback residual to the delta before it is encoded and keeps what the
update did not carry as the next residual (``fedge.agent.error_feedback``): a
:class:`SaveResidual` before the :class:`Send`. A residual of another model or generation is
dropped with a :class:`Note`; a dense round drops any residual (it would be stale by the time
a sparse round came back).

**Secure aggregation.** For a train manifest that announces ``secure_aggregation`` the core never
seals an update: when training finishes it hands the delta to the shell in a
:class:`SecureUpdate` (TRAINING --secured--> WAITING), and the shell runs the round's masked
protocol (``fedge.agent.secure_agent``). A device that cannot take part (no identity key
configured) sits such a round out, and one configured with ``require_secure_aggregation`` sits
out train rounds *without* it: :class:`RefuseRound`, counted, and the model still loaded.

The persisted counter is the one rule that is about ordering, not values: the core hands out
:class:`Persist` (the counter already advanced) before the :class:`Send` that uses it, and the
shell carries actions out in order, so a crash between them can waste a counter but never
reuse one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import numpy as np
from nacl.public import PrivateKey, PublicKey
from nacl.signing import VerifyKey

from fedge.agent.device_state import (
    MAX_COUNTER,
    DeviceState,
    DeviceStateError,
    ManifestChainError,
    ManifestRollbackError,
    manifest_is_new,
)
from fedge.agent.error_feedback import Residual
from fedge.protocol.codec import decode_tensors
from fedge.protocol.dp_noise import clip_l2, unclipped_indicator
from fedge.protocol.errors import FedgeError
from fedge.protocol.messages import Evaluation, encode_moments, encode_update
from fedge.protocol.round_manifest import RoundManifest, RoundManifestError, round_manifest_from_dict
from fedge.protocol.sealing import SealedHeader, seal
from fedge.protocol.signing import DocType, SignatureError, verify_document
from fedge.protocol.topics import FleetTopics

#: A signed round manifest is a few kB; anything far bigger is refused before it is parsed.
MAX_MANIFEST_FRAME_BYTES = 8 * 1024 * 1024
#: The largest model or weights blob a device accepts.
MAX_BLOB_BYTES = 64 * 1024 * 1024


class DeviceCoreError(FedgeError):
    """An event the core's current phase does not expect: a bug in the code driving it."""


class ManifestRejected(FedgeError):
    """A round manifest this device does not act on; ``reason`` is its counted name."""

    def __init__(self, reason: str, detail: str, *, park: bool = False) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        #: Signed by a key not (yet) trusted: a rotation may vouch for it, so keep the frame.
        self.park = park


class Phase(StrEnum):
    WAITING = "waiting"  # no round in hand: waiting for the next manifest
    FETCHING = "fetching"  # a manifest accepted; waiting for the blobs it names
    TRAINING = "training"  # taking part: the shell trains (or computes moments) on local data
    WAITING_FOR_DATA = "waiting_for_data"  # selected, but too few local samples yet: retrying


class Outcome(StrEnum):
    """What happened to an event; with the phase it names the next phase in TRANSITIONS."""

    MANIFEST_ACCEPTED = "manifest_accepted"
    MANIFEST_REJECTED = "manifest_rejected"
    MANIFEST_REPEATED = "manifest_repeated"
    SUPERSEDED = "superseded"
    BLOBS_MISSING = "blobs_missing"
    BLOBS_BAD = "blobs_bad"
    NOT_TAKING_PART = "not_taking_part"
    TAKING_PART = "taking_part"
    SEALED = "sealed"
    SECURED = "secured"  # the delta handed to the secure-aggregation round (never sealed plain)
    TOO_LATE = "too_late"
    NOT_ENOUGH_DATA = "not_enough_data"
    DATA_RETRY = "data_retry"
    ABANDONED = "abandoned"


#: (phase, outcome) -> next phase. Anything else is a DeviceCoreError.
TRANSITIONS: Mapping[tuple[Phase, Outcome], Phase] = {
    (Phase.WAITING, Outcome.MANIFEST_ACCEPTED): Phase.FETCHING,
    (Phase.WAITING, Outcome.MANIFEST_REJECTED): Phase.WAITING,
    (Phase.WAITING, Outcome.MANIFEST_REPEATED): Phase.WAITING,
    (Phase.FETCHING, Outcome.SUPERSEDED): Phase.WAITING,
    (Phase.FETCHING, Outcome.BLOBS_MISSING): Phase.WAITING,
    (Phase.FETCHING, Outcome.BLOBS_BAD): Phase.WAITING,
    (Phase.FETCHING, Outcome.NOT_TAKING_PART): Phase.WAITING,
    (Phase.FETCHING, Outcome.TAKING_PART): Phase.TRAINING,
    (Phase.TRAINING, Outcome.SEALED): Phase.WAITING,
    (Phase.TRAINING, Outcome.SECURED): Phase.WAITING,
    (Phase.TRAINING, Outcome.TOO_LATE): Phase.WAITING,
    (Phase.TRAINING, Outcome.NOT_ENOUGH_DATA): Phase.WAITING_FOR_DATA,
    (Phase.WAITING_FOR_DATA, Outcome.DATA_RETRY): Phase.TRAINING,
    (Phase.WAITING_FOR_DATA, Outcome.TOO_LATE): Phase.WAITING,
    (Phase.WAITING_FOR_DATA, Outcome.SUPERSEDED): Phase.WAITING,
    (Phase.WAITING, Outcome.ABANDONED): Phase.WAITING,
    (Phase.FETCHING, Outcome.ABANDONED): Phase.WAITING,
    (Phase.TRAINING, Outcome.ABANDONED): Phase.WAITING,
    (Phase.WAITING_FOR_DATA, Outcome.ABANDONED): Phase.WAITING,
}


# --- actions: what the shell does, in the order given ------------------------------------------


@dataclass(frozen=True)
class Persist:
    """Save this device state (atomically) before carrying out any later action."""

    state: DeviceState


@dataclass(frozen=True)
class SaveResidual:
    """Save the error-feedback residual (atomically; None: remove it) before any later action."""

    residual: Residual | None


@dataclass(frozen=True)
class Reject:
    """Count and log a refused manifest (``rejected_manifests[reason]``); keep it if ``park``."""

    reason: str
    detail: str
    frame: bytes | None = None  # set when the frame should be parked for a later rotation


@dataclass(frozen=True)
class DropOtherRounds:
    """Queued messages of any round but ``round_id`` are stale: drop them from the outbox."""

    round_id: str


@dataclass(frozen=True)
class FetchBlobs:
    """Subscribe to these blobs and collect them (checked with :func:`check_blob`)."""

    wanted: frozenset[str]


@dataclass(frozen=True)
class Load:
    """Load the model (``model`` is None when the loaded one is already this manifest's) and
    set the global weights and normalisation."""

    manifest: RoundManifest
    model: bytes | None
    weights: bytes


@dataclass(frozen=True)
class Train:
    """Take part: ``kind`` "update" (train, then :meth:`DeviceCore.trained`) or "moments"
    (then :meth:`DeviceCore.moments_computed`)."""

    manifest: RoundManifest
    kind: str


@dataclass(frozen=True)
class Send:
    """Queue a sealed frame in the outbox (it leaves when the broker acknowledges it)."""

    topic: str
    frame: bytes
    round_id: str
    kind: str
    counter: int


@dataclass(frozen=True)
class SecureUpdate:
    """Take part in ``manifest``'s secure-aggregation round with ``delta`` (trained weights -
    global weights): the shell waits for the round's config, checks it against the manifest and
    masks the clipped, quantised delta; it never leaves the device in the clear. Compared by
    manifest only (``delta`` is an array)."""

    manifest: RoundManifest
    delta: np.ndarray = field(compare=False)


@dataclass(frozen=True)
class RefuseRound:
    """This device sits the manifest's round out for ``reason`` (counted in the status's
    ``messages_dropped``): a plain round under ``require_secure_aggregation``, a secure round
    without an identity key."""

    round_id: str
    reason: str
    detail: str


@dataclass(frozen=True)
class StatusState:
    """The device's status ``state`` changed (``idle``, ``training``): publish the status."""

    state: str


@dataclass(frozen=True)
class Note:
    """A line for the log; ``problem`` ones also become the status's ``last_error``."""

    text: str
    problem: bool = False


Action = (
    Persist
    | SaveResidual
    | Reject
    | DropOtherRounds
    | FetchBlobs
    | Load
    | Train
    | Send
    | SecureUpdate
    | RefuseRound
    | StatusState
    | Note
)

#: :class:`RefuseRound` reasons.
PLAIN_ROUND_REFUSED = "plain_round_refused"
SECAGG_NOT_CONFIGURED = "secagg_not_configured"


@dataclass(frozen=True)
class DeviceIdentity:
    """Who the device is on the wire: its fleet, id, X25519 key and the aggregator's key."""

    fleet: str
    device_id: str
    device_key: PrivateKey
    aggregator_key: PublicKey


# --- pure functions, shared with simulated devices ---------------------------------------------


def verify_manifest(
    frame: bytes,
    trusted: Mapping[str, VerifyKey],
    *,
    fleet: str,
    now: float | None,
    parse: Callable[[Any], RoundManifest] = round_manifest_from_dict,
) -> RoundManifest:
    """The manifest in ``frame`` if a trusted key signed it for ``fleet`` and it has not expired
    at ``now`` (None: not checked, for observers reading history); else :class:`ManifestRejected`.

    ``parse`` lets a simulator of thousands of devices parse one frame once; it must be
    :func:`round_manifest_from_dict` or a cache of it.
    """
    if len(frame) > MAX_MANIFEST_FRAME_BYTES:
        raise ManifestRejected("too_large", f"{len(frame)} bytes")
    try:
        doc, _ = verify_document(frame, DocType.ROUND_MANIFEST, trusted, MAX_MANIFEST_FRAME_BYTES)
        manifest = parse(doc)
    except SignatureError as exc:
        raise ManifestRejected(exc.reason, str(exc), park=exc.reason == "unknown_key") from None
    except RoundManifestError as exc:
        raise ManifestRejected("bad_manifest", str(exc)) from None
    if manifest.fleet != fleet:
        raise ManifestRejected("wrong_fleet", f"manifest for fleet {manifest.fleet!r}")
    if now is not None and now > manifest.expires_at:
        raise ManifestRejected("expired", f"manifest v{manifest.version} expired")
    return manifest


def check_blob(sha256: str, payload: bytes, wanted: frozenset[str] | set[str]) -> tuple[str, str] | None:
    """``(reason, detail)`` if a blob that arrived on ``.../blob/<sha256>`` is not one to keep."""
    if sha256 not in wanted:
        return "blob_unwanted", "no manifest being fetched names it"
    if len(payload) > MAX_BLOB_BYTES:
        return "blob_too_large", f"{len(payload)} bytes > {MAX_BLOB_BYTES}"
    if hashlib.sha256(payload).hexdigest() != sha256:
        return "blob_hash_mismatch", "its SHA-256 is not the one in its topic"
    return None


def seal_contribution(
    identity: DeviceIdentity,
    round_id: str,
    model_version: int,
    counter: int,
    kind: str,
    payload: tuple[dict[str, Any], bytes],
) -> bytes:
    """A payload sealed to the aggregator and bound to this device, the round, the counter and
    the manifest version it answers (what the aggregator checks before it opens anything)."""
    bind = SealedHeader(identity.fleet, identity.device_id, round_id, counter, kind, model_version)
    return seal(bind, payload[0], payload[1], identity.device_key, identity.aggregator_key)


def moments_payload(x: np.ndarray) -> tuple[dict[str, Any], bytes]:
    """What a device sends in a moments round: count, sums and sums of squares (float64)."""
    x = x.astype(np.float64)
    return encode_moments(x.shape[0], x.sum(axis=0), (x * x).sum(axis=0))


def update_payload(
    manifest: RoundManifest,
    delta: np.ndarray,
    examples: int,
    train_loss: float,
    evaluation: Evaluation | None,
) -> tuple[dict[str, Any], bytes]:
    """What a device sends in a train round: its weight delta in the manifest's codec.

    In a round with differential privacy (``manifest.privacy``) the delta is clipped here, on
    the device, to the announced L2 bound before it is encoded, and with adaptive clipping
    the header says whether it had to be (``+1`` within the bound, ``-1`` clipped): the bound
    is what the noise is calibrated to, so it must hold before the update leaves the device."""
    indicator: int | None = None
    privacy = manifest.privacy
    if privacy is not None:
        clipped = clip_l2(delta, privacy.clip_bound)
        delta = clipped.update
        if privacy.adaptive_clipping:
            indicator = unclipped_indicator(clipped)
    return encode_update(
        delta.astype(np.float32),
        manifest.model_manifest.layout,
        manifest.codec,
        examples,
        train_loss,
        evaluation,
        indicator,
        topk_fraction=manifest.topk_fraction,
    )


def sparse_update_payload(
    manifest: RoundManifest,
    delta: np.ndarray,
    residual: np.ndarray | None,
    examples: int,
    train_loss: float,
    evaluation: Evaluation | None,
) -> tuple[tuple[dict[str, Any], bytes], np.ndarray]:
    """A sparse round's update with error feedback, and the new residual: ``delta + residual``
    is encoded (its top k per tensor) and what the update does not carry, quantisation error
    included, is owed to the next round (``fedge.agent.error_feedback``). Sparse codecs come
    without DP or secure aggregation (the manifest parser refuses the combination)."""
    layout = manifest.model_manifest.layout
    owed = delta.astype(np.float32)
    if residual is not None:
        owed = owed + residual.astype(np.float32)
    payload = update_payload(manifest, owed, examples, train_loss, evaluation)
    sent = decode_tensors(payload[1], layout, manifest.codec, manifest.topk_fraction)
    return payload, owed - sent


# --- the state machine -------------------------------------------------------------------------


class DeviceCore:
    """One device's protocol state: the persisted :class:`DeviceState` snapshot, the phase, the
    round in hand and which model is loaded. Not thread-safe: one worker drives it."""

    def __init__(
        self,
        identity: DeviceIdentity,
        state: DeviceState,
        *,
        secure_aggregation: bool = False,
        require_secure_aggregation: bool = False,
    ) -> None:
        """``secure_aggregation``: the device can take part in secure rounds (it has an identity
        key); ``require_secure_aggregation``: it takes part in no other train round."""
        if require_secure_aggregation and not secure_aggregation:
            raise DeviceCoreError("device core: requiring secure aggregation needs an identity key")
        self.secure_aggregation = secure_aggregation
        self.require_secure_aggregation = require_secure_aggregation
        self.identity = identity
        self.topics = FleetTopics(identity.fleet)
        self.state = state
        self.phase = Phase.WAITING
        #: The round being fetched or worked on.
        self.pending: RoundManifest | None = None
        #: The newest manifest whose blobs arrived (what the status reports).
        self.current: RoundManifest | None = None
        self.loaded_model_sha256: str | None = None
        self.wanted: frozenset[str] = frozenset()
        #: The error-feedback residual of sparse rounds; the shell sets the stored one at start
        #: (``fedge.agent.error_feedback.ResidualStore``) and saves what :class:`SaveResidual` says.
        self.residual: Residual | None = None

    def _move(self, outcome: Outcome) -> None:
        nxt = TRANSITIONS.get((self.phase, outcome))
        if nxt is None:
            raise DeviceCoreError(f"device core: {outcome.value} is not expected in phase {self.phase.value}")
        self.phase = nxt
        if nxt is Phase.WAITING:
            self.pending = None
            self.wanted = frozenset()

    def _persist(self, state: DeviceState) -> Persist:
        self.state = state
        return Persist(state)

    # --- events ------------------------------------------------------------------------------

    def manifest_arrived(self, frame: bytes, trusted: Mapping[str, VerifyKey], now: float) -> list[Action]:
        """A frame from the retained manifest topic. A manifest that arrives while blobs are
        being fetched supersedes that fetch (call :meth:`superseded` first)."""
        try:
            manifest = verify_manifest(frame, trusted, fleet=self.identity.fleet, now=now)
        except ManifestRejected as exc:
            self._move(Outcome.MANIFEST_REJECTED)
            return [Reject(exc.reason, exc.detail, frame if exc.park else None)]
        try:
            is_new = manifest_is_new(
                self.state, manifest.version, manifest.sha256(), parent_sha256=manifest.parent_sha256
            )
        except ManifestRollbackError as exc:
            self._move(Outcome.MANIFEST_REJECTED)
            return [Reject("rollback", str(exc))]
        except ManifestChainError as exc:
            self._move(Outcome.MANIFEST_REJECTED)
            return [Reject("broken_chain", str(exc))]
        if not is_new and self.current is not None and self.current.version == manifest.version:
            self._move(Outcome.MANIFEST_REPEATED)  # the same manifest again (retained re-delivery)
            return []
        actions: list[Action] = []
        if is_new:
            actions.append(
                self._persist(
                    replace(self.state, manifest_version=manifest.version, manifest_sha256=manifest.sha256())
                )
            )
        wanted = {manifest.model_sha256, manifest.weights_sha256}
        if self.loaded_model_sha256 == manifest.model_sha256:
            wanted.discard(manifest.model_sha256)
        self._move(Outcome.MANIFEST_ACCEPTED)
        self.pending = manifest
        self.wanted = frozenset(wanted)
        if manifest.aggregation is None:
            actions.append(DropOtherRounds(manifest.round_id))
        # else buffered asynchronous aggregation (docs/async.md): an update of an earlier
        # round still in the outbox counts for the aggregator (weighted by its staleness, or
        # refused ``stale`` when too old), so a newer manifest does not drop it.
        actions.append(FetchBlobs(self.wanted))
        return actions

    def superseded(self) -> list[Action]:
        """A newer manifest arrived before this one's blobs (or enough local data) did:
        abandon the round in hand quietly."""
        self._move(Outcome.SUPERSEDED)
        return []

    def not_enough_data(self, have: int, need: int) -> list[Action]:
        """Selected, but the device holds fewer samples than training needs (its data source
        started late, or the store is still filling). The round is kept: the shell retries
        with :meth:`retry_data` until the deadline, and the status says ``not_ready``."""
        manifest = self._pending()
        self._move(Outcome.NOT_ENOUGH_DATA)
        return [
            StatusState("not_ready"),
            Note(
                f"round {manifest.round_id}: {have} local sample(s), {need} needed; retrying until "
                "its deadline (check the data source: the EdgeX bus, the task's resources)",
                problem=True,
            ),
        ]

    def retry_data(self, now: float) -> list[Action]:
        """Time to look at the local data again (WAITING_FOR_DATA): train, or give up if the
        round has closed."""
        manifest = self._pending()
        if now > manifest.deadline:
            self._move(Outcome.TOO_LATE)
            return [
                Note(f"round {manifest.round_id} closed before this device had enough data"),
                StatusState("idle"),
            ]
        self._move(Outcome.DATA_RETRY)
        return [Train(manifest, "moments" if manifest.phase == "moments" else "update")]

    def blobs_missing(self) -> list[Action]:
        """The fetch timed out (or the service is stopping) without every wanted blob."""
        manifest = self._pending()
        self._move(Outcome.BLOBS_MISSING)
        return [Note(f"blobs for manifest v{manifest.version} did not arrive", problem=True)]

    def blobs_arrived(self, blobs: Mapping[str, bytes], now: float) -> list[Action]:
        """Every wanted blob, each already checked with :func:`check_blob`."""
        manifest = self._pending()
        missing = self.wanted - set(blobs)
        if missing:
            raise DeviceCoreError(f"device core: blobs {sorted(missing)} are still missing")
        weights = blobs[manifest.weights_sha256]
        if len(weights) != manifest.weights_bytes:
            self._move(Outcome.BLOBS_BAD)
            return [Reject("bad_blob", "weights blob has the wrong size")]
        model = blobs.get(manifest.model_sha256) if manifest.model_sha256 in self.wanted else None
        if model is not None:
            self.loaded_model_sha256 = None  # until the shell reports it loaded (model_loaded)
        self.current = manifest
        actions: list[Action] = [Load(manifest, model, weights)]
        if manifest.phase == "final" or not manifest.is_selected(self.identity.device_id):
            self._move(Outcome.NOT_TAKING_PART)
            return [*actions, StatusState("idle")]
        if self.state.last_round_id == manifest.round_id:
            self._move(Outcome.NOT_TAKING_PART)  # already contributed (e.g. restarted after sealing)
            return actions
        if now > manifest.deadline:
            self._move(Outcome.NOT_TAKING_PART)
            return [*actions, Note(f"round {manifest.round_id} closed before this device could take part")]
        refused = self._refusal(manifest)
        if refused is not None:
            self._move(Outcome.NOT_TAKING_PART)
            return [*actions, refused, Note(refused.detail, problem=True), StatusState("idle")]
        self._move(Outcome.TAKING_PART)
        kind = "moments" if manifest.phase == "moments" else "update"
        return [*actions, StatusState("training"), Train(manifest, kind)]

    def trained(
        self, delta: np.ndarray, examples: int, train_loss: float, evaluation: Evaluation | None, now: float
    ) -> list[Action]:
        """Local training finished: ``delta`` = trained weights - global weights. In a secure
        round the delta goes to the shell's secure round (:class:`SecureUpdate`), never sealed."""
        manifest = self._pending()
        if manifest.secure_aggregation is not None:
            return self._secure(manifest, delta, now)
        if manifest.codec.sparse:
            return self._seal(
                manifest,
                "update",
                lambda: self._sparse(manifest, delta, examples, train_loss, evaluation),
                now,
            )

        def dense() -> tuple[tuple[dict[str, Any], bytes], list[Action]]:
            return update_payload(manifest, delta, examples, train_loss, evaluation), self._drop_residual()

        return self._seal(manifest, "update", dense, now)

    def moments_computed(self, x_train: np.ndarray, now: float) -> list[Action]:
        """The local training features (raw) for a moments round."""
        return self._seal(self._pending(), "moments", lambda: (moments_payload(x_train), []), now)

    def abandon(self) -> Phase:
        """Carrying out an action raised (bad local data, a model the runtime refuses): drop the
        round in hand and wait for the next manifest. Returns the phase that was left."""
        left = self.phase
        self._move(Outcome.ABANDONED)
        return left

    def reserve_counter(self) -> Persist:
        """The next sealed counter, for a message the shell seals itself (secure aggregation):
        carry out the returned :class:`Persist` before using ``state.update_counter``. The same
        counter as updates and moments, so no two sealed messages ever share one."""
        if self.state.update_counter >= MAX_COUNTER:
            raise DeviceStateError("device state: update counter exhausted")
        return self._persist(replace(self.state, update_counter=self.state.update_counter + 1))

    def model_loaded(self, model_sha256: str) -> None:
        """The shell loaded this model: later manifests naming it do not fetch it again."""
        self.loaded_model_sha256 = model_sha256

    # --- helpers -----------------------------------------------------------------------------

    def _pending(self) -> RoundManifest:
        if self.pending is None:
            raise DeviceCoreError(f"device core: no round in hand in phase {self.phase.value}")
        return self.pending

    def _refusal(self, manifest: RoundManifest) -> RefuseRound | None:
        """Why this selected device sits the round out, if it does (see :class:`RefuseRound`)."""
        if manifest.phase != "train":
            return None
        if manifest.secure_aggregation is not None and not self.secure_aggregation:
            return RefuseRound(
                manifest.round_id,
                SECAGG_NOT_CONFIGURED,
                f"round {manifest.round_id} uses secure aggregation, but this device has no identity "
                "key: set [agent] identity_key_file, identity_certificate_file and operator_verify_keys",
            )
        if manifest.secure_aggregation is None and self.require_secure_aggregation:
            return RefuseRound(
                manifest.round_id,
                PLAIN_ROUND_REFUSED,
                f"round {manifest.round_id} has no secure aggregation and [agent] "
                "require_secure_aggregation = true: this device does not send a plain update",
            )
        return None

    def _sparse(
        self,
        manifest: RoundManifest,
        delta: np.ndarray,
        examples: int,
        train_loss: float,
        evaluation: Evaluation | None,
    ) -> tuple[tuple[dict[str, Any], bytes], list[Action]]:
        """A sparse round's payload with error feedback, and the actions that keep the residual."""
        notes: list[Action] = []
        residual = self.residual
        count = manifest.model_manifest.parameter_count
        if residual is not None and not residual.fits(manifest.model_sha256, manifest.generation, count):
            notes.append(
                Note(
                    f"error-feedback residual reset: it is for model {residual.model_sha256[:12]} "
                    f"generation {residual.generation} ({residual.values.shape[0]} parameters), the "
                    f"round's is {manifest.model_sha256[:12]} generation {manifest.generation} ({count})"
                )
            )
            residual = None
        payload, owed = sparse_update_payload(
            manifest, delta, None if residual is None else residual.values, examples, train_loss, evaluation
        )
        self.residual = Residual(manifest.model_sha256, manifest.generation, owed)
        return payload, [*notes, SaveResidual(self.residual)]

    def _secure(self, manifest: RoundManifest, delta: np.ndarray, now: float) -> list[Action]:
        if self.phase is not Phase.TRAINING:
            raise DeviceCoreError(f"device core: an update is not expected in phase {self.phase.value}")
        if now > manifest.deadline:
            self._move(Outcome.TOO_LATE)
            return [
                Note(f"round {manifest.round_id} closed while training; update not sent"),
                StatusState("idle"),
            ]
        # Handed to the secure round now: a restart does not train for this round again (its
        # round keys would die with the process anyway: docs/secure-aggregation.md).
        done = self._persist(replace(self.state, last_round_id=manifest.round_id))
        self._move(Outcome.SECURED)
        return [done, *self._drop_residual(), SecureUpdate(manifest, delta)]

    def _drop_residual(self) -> list[Action]:
        """A dense train round (plain or secure) drops any error-feedback residual."""
        if self.residual is None:
            return []
        self.residual = None
        return [SaveResidual(None), Note("dense round: error-feedback residual dropped")]

    def _seal(
        self,
        manifest: RoundManifest,
        kind: str,
        payload: Callable[[], tuple[tuple[dict[str, Any], bytes], list[Action]]],
        now: float,
    ) -> list[Action]:
        """``payload`` gives the payload and the actions to carry out before it is sent."""
        if self.phase is not Phase.TRAINING:
            raise DeviceCoreError(f"device core: a {kind} result is not expected in phase {self.phase.value}")
        if now > manifest.deadline:
            self._move(Outcome.TOO_LATE)
            return [
                Note(f"round {manifest.round_id} closed while training; update not sent"),
                StatusState("idle"),
            ]
        if self.state.update_counter >= MAX_COUNTER:  # before payload() moves the residual
            raise DeviceStateError("device state: update counter exhausted")
        (header, body), before_send = payload()
        counter = self.state.update_counter + 1
        reserve = self._persist(replace(self.state, update_counter=counter))  # before it is used
        frame = seal_contribution(
            self.identity, manifest.round_id, manifest.version, counter, kind, (header, body)
        )
        send = Send(self.topics.update(self.identity.device_id), frame, manifest.round_id, kind, counter)
        done = self._persist(replace(self.state, last_round_id=manifest.round_id))
        self._move(Outcome.SEALED)
        return [reserve, *before_send, send, done, StatusState("idle")]
