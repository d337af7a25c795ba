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

The engine owns the rules about messages (which one counts, for which round, from whom); the
arithmetic (the norm bounds, the weighting, FedAvg, the moments normalisation) is in the round's
folds, which ``fedge.aggregator.strategies.factory`` builds from the settings and what the
bounds remember of earlier rounds.

**Secure rounds** (``[privacy] secure_aggregation``, ``docs/secure-aggregation.md``): a train
round's manifest announces ``secure_aggregation`` (the clip bound, modulus, graph degree and
threshold), and a :class:`~fedge.aggregator.secure_round.SecureRoundDriver` runs the SecAgg+
round over the config :func:`~fedge.protocol.secure_round_config.round_config_for` derives from
the manifest. The engine hands it every sealed ``secagg_*`` message (after its own cheap checks),
refuses a plain ``update`` (``wrong_kind``), returns the driver's signed documents from
:meth:`RoundEngine.open_round` (``Publication.secagg``) and :meth:`RoundEngine.tick`, and, when
the round closes, moves the model by the mean of the survivors' clipped deltas:
``global + server_learning_rate * sum / survivors``, or by the server optimizer's step for that
mean (``[rounds] strategy``: ``fedavgm``, ``fedadagrad``, ``fedadam``, ``fedyogi``; robust
strategies need individual updates and are refused). It never sees an individual update, so
nothing per update is possible (norm bounds on the aggregator, metrics, example weights):
devices clip before masking, every update counts once, and the record's evaluation fields are
None. Moments rounds stay plain. The driver lives in memory only: a restart or a leader change
mid-round loses it, and the round is aborted (the next manifest opens a new one; an engine
built on a checkpoint clears what the lost round may have left retained, with its first
manifest).

**Buffered asynchronous rounds** (``[rounds] aggregation = "async"``, ``docs/async.md``): a
train round takes updates trained from any manifest of the last ``max_staleness`` versions
(``fedge.aggregator.async_rounds.StalenessWindow``; each checked against the manifest it was
trained from), scales each delta by its staleness weight after the norm bounds, and is due after
``buffer_size`` accepted updates (or at its deadline). Moments rounds stay synchronous.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from nacl.public import PrivateKey, PublicKey
from nacl.signing import SigningKey

from fedge.aggregator.async_rounds import (
    STALE,
    StalenessScale,
    StalenessWindow,
    announcement,
    build_async_round_folds,
    staleness_weight,
)
from fedge.aggregator.config import RoundSettings
from fedge.aggregator.device_boxes import DeviceBoxes
from fedge.aggregator.fedavg import AggregationError
from fedge.aggregator.privacy_config import SECURE_MIN_DEVICES, SecureSettings
from fedge.aggregator.round_history import remember
from fedge.aggregator.secure_round import SecureRoundDriver
from fedge.aggregator.strategies.clipping import NormBounds, NormTooLarge, l2
from fedge.aggregator.strategies.factory import (
    DpRound,
    InfluenceHistory,
    RoundFolds,
    RoundLimits,
    build_dp_round_folds,
    build_round_folds,
    round_limits,
    strategy_announcement,
)
from fedge.aggregator.strategies.robust import TooManyUpdates
from fedge.aggregator.strategies.server_optimizers import (
    ServerOptimizerState,
    check_state,
    optimizer_step,
)
from fedge.protocol.codec import Codec, CodecError, decode_tensors
from fedge.protocol.dp_noise import noise_generator
from fedge.protocol.errors import FedgeError
from fedge.protocol.framing import (
    FRAME_VERSION,
    MAGIC,
    MAX_HEADER_BYTES,
    PREFIX_BYTES,
    PREFIX_LAYOUT,
    FrameKind,
)
from fedge.protocol.messages import (
    Evaluation,
    MessageError,
    UpdatePayload,
    decode_moments,
    decode_update,
    max_sealed_bytes,
)
from fedge.protocol.model_manifest import ModelManifest, Normalisation
from fedge.protocol.privacy_announcement import PrivacyAnnouncement
from fedge.protocol.reasons import RejectReason
from fedge.protocol.round_manifest import RoundManifest
from fedge.protocol.sealing import (
    MAC_BYTES,
    NONCE_BYTES,
    SealedHeader,
    SealError,
    open_into,
    open_sealed,
    read_header,
    read_payload,
)
from fedge.protocol.secagg import SecAggError, choose_parameters
from fedge.protocol.secagg.announcement import (
    SecureAggregationAnnouncement,
    SecureAggregationAnnouncementError,
)
from fedge.protocol.secagg.wire import DEVICE_KINDS as SECAGG_KINDS
from fedge.protocol.secagg.wire import KIND_MASKED
from fedge.protocol.secagg.wire import Publication as SecAggPublication
from fedge.protocol.secagg.wire import max_sealed_bytes as secagg_max_sealed_bytes
from fedge.protocol.secure_dp import DISTRIBUTED_NOISE, SecureDpError, noise_plan
from fedge.protocol.secure_round_config import round_config_for
from fedge.protocol.signing import DocType, sign_document
from fedge.protocol.strategy_announcement import SERVER_OPTIMIZERS
from fedge.protocol.task import ModelKind
from fedge.protocol.topics import FleetTopics, TopicError
from fedge.protocol.weights import WEIGHTS_DTYPE, weights_to_bytes

if TYPE_CHECKING:
    # the accountant loads dp-accounting (~75 MB): only fleets with DP import it
    from fedge.aggregator.privacy import PrivacyAccountant, PrivacyConfig
    from fedge.aggregator.replica_round import WorkerBatch

_ID = rb"([A-Za-z0-9][A-Za-z0-9_.\-]{0,63})"  # fedge.protocol.topics.check_id's ids, as bytes
_UINT = rb"(0|[1-9][0-9]{0,18})"  # a JSON integer >= 0 without a sign, fraction or exponent
#: The cleartext header of an update exactly as fedge writes it (canonical JSON: sorted keys, no
#: spaces), with ids ``check_id`` accepts: what matches parses, with ``json``, to the object
#: ``SealedHeader.from_dict`` accepts with the same values (counters are checked < 2^63 apart).
_CANONICAL_UPDATE_HEADER = re.compile(
    rb'\{"counter":'
    + _UINT
    + rb',"device_id":"'
    + _ID
    + rb'","fleet":"'
    + _ID
    + rb'","kind":"update","model_version":'
    + _UINT
    + rb',"round_id":"'
    + _ID
    + rb'"\}'
)
_MAX_COUNTER = 2**63 - 1
_CODEC_ASCII = {codec: codec.value.encode("ascii") for codec in Codec}
_LITTLE_ENDIAN_F32 = np.dtype(np.float32) == WEIGHTS_DTYPE
_COUNT_END = 2**31  # decode_update's counts are below it
_BIND_OPEN = b'{"bind":'
_PAYLOAD_KEY = b',"payload":'
_COUNT = rb"([1-9][0-9]{0,9})"  # a count as JSON writes it (range checked apart)
#: A JSON number with a fraction or an exponent (its grammar, bounded lengths): what ``json``
#: reads as a float, as ``float`` does (``loads_bounded`` then refuses it if not finite). A number
#: without either is an int to ``json`` and does not match: the general path reads it.
_FLOAT = rb"(-?(?:0|[1-9][0-9]{0,30})(?:\.[0-9]{1,40}(?:[eE][-+]?[0-9]{1,3})?|[eE][-+]?[0-9]{1,3}))"
#: The payload header of an update exactly as fedge writes it (canonical JSON, no clip indicator),
#: matched in the ``PAYLOAD`` frame's header after ``{"bind":<header>,"payload":``.
_CANONICAL_UPDATE_PAYLOAD = re.compile(
    rb'\{"codec":"([a-z0-9-]{1,16})","evaluation":(null|\{"accuracy":(null|'
    + _FLOAT[1:-1]
    + rb")"
    + rb',"examples":'
    + _COUNT
    + rb',"loss":'
    + _FLOAT
    + rb',"mse":(null|'
    + _FLOAT[1:-1]
    + rb")\})"
    + rb',"examples":'
    + _COUNT
    + rb',"train_loss":'
    + _FLOAT
    + rb"\}\}"
)


#: Kept for callers that name it here; the contract is fedge.protocol.signing.DocType.
MANIFEST_DOC_TYPE = DocType.ROUND_MANIFEST


def eval_metric(kind: ModelKind) -> str:
    """The task's own federated evaluation metric, the ``fed_eval_<metric>`` field of a round
    record that holds it: ``"accuracy"`` (classification) or ``"mse"`` (regression: the devices'
    mean squared error on their held-out data, ``Evaluation.mse``)."""
    return "accuracy" if kind == "classification" else "mse"


@dataclass(frozen=True)
class Outcome:
    """What happened to one message: accepted, or rejected with a stable reason code."""

    accepted: bool
    reason: str
    device_id: str | None
    kind: str | None = None


#: ``failure`` of a secure round that could not open for lack of devices.
SECURE_TOO_FEW_DEVICES = "secure aggregation needs at least 3 selected devices"


@dataclass(frozen=True)
class Publication:
    """What the shell must publish, in order: blobs (retained), then the manifest (retained),
    then ``secagg`` (each as it says: retained, QoS 1; an empty payload clears a topic): the
    previous secure round's clears and this secure round's signed config."""

    manifest: RoundManifest
    manifest_frame: bytes
    blobs: dict[str, bytes]
    clear_blobs: tuple[str, ...]
    secagg: tuple[SecAggPublication, ...] = ()


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
    norm_bound: float | None = None  # the round's clipping bound; None: unbounded
    weighting: str = "examples"
    weight_cap: float | None = None  # "examples" weighting: the largest weight one update could have
    spent: int = 0  # devices whose one authenticated message of the round was refused
    outlier_devices: int = 0  # moments rounds: devices left out of at least one feature
    fed_eval_metric: str = "accuracy"  # the task's metric (``eval_metric``): which field to read
    fed_eval_mse: float | None = None  # regression: weighted mean of the devices' MSE
    #: ``[privacy]``: the epsilon spent after this round (at the config's target delta); None
    #: without differential privacy.
    epsilon_spent: float | None = None
    #: ``[privacy] secure_aggregation``: the round's updates were only ever summed (``reported``
    #: is then the number of devices in the sum, ``examples`` 0 and every evaluation None: the
    #: aggregator sees no device's metrics).
    secure_aggregation: bool = False
    #: Secure rounds: selected devices whose update is not in the sum (all of them if aborted).
    dropped: int = 0
    #: ``[rounds] strategy``: how the round's updates became the model (docs/strategies.md).
    strategy: str = "fedavg"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def fed_eval_summary(self) -> str:
        """The federated evaluation in the task's own metric, for the round's log line:
        ``fed. eval accuracy 0.9123`` or ``fed. eval MSE 0.0412 (RMSE 0.203)``, ``none`` when
        no accepted update carried one (a moments round, or no device evaluated)."""
        if self.fed_eval_metric == "mse":
            mse = self.fed_eval_mse
            if mse is None:
                return "fed. eval MSE none"
            # A device's MSE is only checked to be finite: a negative one gets no square root.
            rmse = f" (RMSE {math.sqrt(mse):.4g})" if mse >= 0 else ""
            return f"fed. eval MSE {mse:.4g}{rmse}"
        acc = self.fed_eval_accuracy
        return f"fed. eval accuracy {'none' if acc is None else f'{acc:.4f}'}"


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
    # The influence bounds' memory of earlier rounds (checkpointed with the rest):
    #: median L2 norm of the updates accepted in the last train round that had any (before
    #: clipping), the reference of ``update_norm_adaptive``;
    update_norm_median: float | None = None
    #: median example count claimed in the last round that had reports, the reference of
    #: ``example_cap_ratio``;
    claim_median: float | None = None
    #: the initial model's L2 norm: the floor of the ``update_norm_ratio`` bound;
    initial_norm: float | None = None
    #: device -> fingerprint of the key its counter was seen under: a new key (re-enrollment)
    #: starts a new counter sequence.
    counter_keys: dict[str, str] = field(default_factory=dict)
    #: The model generation (``[aggregator] model_generation``): a new model or task for a
    #: running fleet starts a new generation, which keeps only the manifest chain (version,
    #: last hash) and the replay counters of the one before (``start_generation``).
    generation: int = 1
    #: The model these weights belong to (None: not recorded, checkpoints before generations).
    model_sha256: str | None = None
    #: ``[privacy]``: the accountant's state (``PrivacyAccountant.state``): what the fleet's
    #: devices have spent, which must survive restarts and leader changes. None: no DP yet.
    privacy: dict[str, Any] | None = None
    #: ``[rounds] strategy`` is a server optimizer: its state (``m``, ``v``, step) after the
    #: last aggregated round, which must survive restarts and leader changes. None: none yet
    #: (a new model generation starts without one).
    server_optimizer: ServerOptimizerState | None = None


def start_generation(previous: EngineState, generation: int, initial: EngineState) -> EngineState:
    """The state of a new model generation: ``initial`` (the new model's weights and
    normalisation, no rounds, no history, no influence references) continuing ``previous``'s
    manifest chain and device counters, so devices accept its first manifest as the next
    version from the signer they trust, and every update bound to an older version, including
    the previous generation's, is refused as it always is."""
    if generation <= previous.generation:
        raise FedgeError(f"model generation {generation} does not follow generation {previous.generation}")
    return replace(
        initial,
        version=previous.version,
        last_manifest_sha256=previous.last_manifest_sha256,
        counters=dict(previous.counters),
        counter_keys=dict(previous.counter_keys),
        generation=generation,
    )


def key_fingerprint(key: PublicKey) -> str:
    """A short, stable name for a device key (first 16 hex digits of its SHA-256)."""
    return hashlib.sha256(bytes(key)).hexdigest()[:16]


class _OpenRound:
    """The open round as the engine keeps it: who reported, who used up their slot, what was
    rejected; the arithmetic is in ``folds``."""

    def __init__(
        self,
        manifest: RoundManifest,
        folds: RoundFolds,
        secure: SecureRoundDriver | None = None,
        secure_failure: str | None = None,
    ) -> None:
        self.manifest = manifest
        self.folds = folds
        #: A secure round's driver (None: a plain round, or a secure one that could not open).
        self.secure = secure
        #: Why a secure round could not open (it was announced with no device selected).
        self.secure_failure = secure_failure
        #: Secure rounds: devices whose masked input the driver accepted.
        self.masked: set[str] = set()
        self.reported: dict[str, int] = {}  # device -> accepted counter
        # device -> counter of its one authenticated message, which was refused: the device's
        # slot in the round is used up, so further messages cost no decryption.
        self.spent: dict[str, int] = {}
        self.moment_devices: list[str] = []  # the moments fold's rows, in order
        self.update_bytes = 0
        self.rejected: Counter[str] = Counter()
        #: An aggregator worker's round (``fedge.aggregator.replica_round``): the batch since its
        #: last partial, whose decoded payloads it keeps until the leader accepted the partial;
        #: None on the leader.
        self.batch: WorkerBatch | None = None
        #: The leader's round with ``[replicas]``: (worker, batch) of every partial absorbed, so
        #: a partial resent because its verdict was lost is answered, not counted again.
        self.absorbed: set[tuple[str, int]] = set()
        #: An asynchronous train round's staleness link (``async_rounds.StalenessScale``), whose
        #: factor is set before each update is folded; None in synchronous rounds.
        self.scale: StalenessScale | None = None
        #: Whether this round's updates can take the engine's fast path (None: not known yet).
        self.fast: bool | None = None
        #: The round id and version as a canonical cleartext header spells them (the fast path).
        self.round_ascii = manifest.round_id.encode("ascii")
        self.version_ascii = str(manifest.version).encode("ascii")

    @property
    def bounds(self) -> NormBounds:
        """The round's norm bounds, fixed when it opened."""
        return self.folds.limits.bounds

    def done(self, device: str) -> bool:
        return device in self.reported or device in self.spent


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
        privacy: PrivacyConfig | None = None,
        noise_rng: np.random.Generator | None = None,
        secure: SecureSettings | None = None,
    ) -> None:
        """``privacy``: the fleet's differential privacy (``[privacy]``), whose accountant
        continues from ``state.privacy`` (a ``PrivacyStateError`` if that was spent under other
        parameters). ``noise_rng``: the DP noise's source; None draws a secret seed (tests pass
        a seeded one). ``secure``: ``[privacy] secure_aggregation`` (train rounds run SecAgg+;
        with ``privacy`` too, devices add the noise before masking: ``fedge.protocol.secure_dp``,
        which needs fixed clipping)."""
        if secure is not None and privacy is not None and privacy.adaptive is not None:
            raise FedgeError("adaptive clipping cannot run under secure aggregation: its count is not masked")
        if settings.robust and (secure is not None or privacy is not None):
            raise FedgeError(
                f'strategy "{settings.strategy}" needs every update on its own: it cannot run under '
                "secure aggregation or differential privacy"
            )
        # A server-optimizer state of another strategy or model: refused (ServerOptimizerStateError).
        check_state(state.server_optimizer, settings.strategy, model_manifest.parameter_count)
        if settings.asynchronous and (secure is not None or privacy is not None or settings.robust):
            raise FedgeError(
                'aggregation = "async" runs without secure aggregation, differential privacy and robust '
                "strategies (docs/async.md)"
            )
        if settings.asynchronous and settings.buffer_size < settings.min_devices:
            raise FedgeError(
                f"buffer_size={settings.buffer_size} is below min_devices={settings.min_devices}: "
                "every buffer would be aborted"
            )
        k = settings.devices_per_round
        if 0 < k < settings.min_devices:
            raise FedgeError(
                f"devices_per_round={k} is below min_devices={settings.min_devices}: no round could pass"
            )
        self.fleet = fleet
        self.topics = FleetTopics(fleet)
        self.settings = settings
        self.model_manifest = model_manifest
        #: The task's own evaluation metric, named in round records and the status.
        self.eval_metric = eval_metric(model_manifest.task.model.kind)
        self.model_bytes = model_bytes
        self.model_sha256 = hashlib.sha256(model_bytes).hexdigest()
        self.signing_key = signing_key
        self.registry: dict[str, PublicKey] = {}
        self.revoked: set[str] = set()
        self.state = state
        self.layout = model_manifest.layout
        #: The largest message accepted on ``update/+``: configured, or derived from the model.
        self.max_message_bytes = settings.max_update_bytes or max_sealed_bytes(
            self.layout, settings.codec, model_manifest.task.input_dim, self._topk_fraction
        )
        if state.initial_norm is None:  # a fresh state holds the initial weights
            state.initial_norm = l2(state.weights)
        self.current: _OpenRound | None = None
        self._model_published = False
        # The fast path's constants and scratch (the delta as float64, reused per update).
        self._fleet_ascii = fleet.encode("ascii")
        self._update_prefix = self.topics.update("x")[:-1]
        self._cast: npt.NDArray[np.float64] | None = None
        self._parameter_count = model_manifest.parameter_count  # a property that builds the layout
        self._accepted: dict[str, Outcome] = {}
        # device -> (its enrolled key, that key's Box's shared key), for the fast path's decryption
        self._shared_keys: dict[str, tuple[PublicKey, bytes]] = {}
        self._fp32_body = WEIGHTS_DTYPE.itemsize * self._parameter_count
        self._max_examples = settings.max_examples_per_update
        self.box_key = box_key  # also makes the device Boxes (the property below)
        self.set_registry(registry)
        self.accountant: PrivacyAccountant | None = None
        if privacy is not None:
            from fedge.aggregator.privacy import PrivacyAccountant  # noqa: PLC0415 - loads dp-accounting

            self.accountant = (
                PrivacyAccountant(privacy)
                if state.privacy is None
                else PrivacyAccountant.from_state(privacy, state.privacy)
            )
            state.privacy = self.accountant.state()
        self.noise_rng = noise_rng if noise_rng is not None else noise_generator()
        self.secure = secure
        # Secure rounds' documents still to publish (the clears of a round closed by
        # close_round): handed out by the next open_round or tick.
        self._secagg_outbox: list[SecAggPublication] = []
        #: ``[replicas]``: how long past a deadline the round waits for workers' partials.
        self.partial_grace_s = 0.0
        #: ``aggregation = "async"``: the train manifests an update may still be trained from.
        self.window = StalenessWindow(settings.max_staleness) if settings.asynchronous else None
        if secure is not None and state.version > 0 and self.phase == "train":
            # The round the checkpoint's version opened may have been a secure round lost with
            # the previous process: clear whatever of it is retained on the broker.
            self._secagg_outbox = self._clears_of(self._round_id("train", state.version))

    @property
    def box_key(self) -> PrivateKey:
        """The aggregator's X25519 key, which devices seal their messages to."""
        return self._box_key

    @box_key.setter
    def box_key(self, key: PrivateKey) -> None:
        # One Box per enrolled device key: the X25519 shared key is computed once, not per
        # message; keyed by the device's public key, so a device re-enrolled under a new key gets
        # a new one. A new aggregator key starts an empty cache: no Box of the old one survives.
        self._box_key = key
        self.boxes = DeviceBoxes(key)
        self._shared_keys = {}  # the fast path's copies of the old key's Boxes' shared keys go too

    def set_registry(self, registry: dict[str, PublicKey], revoked: set[str] | None = None) -> None:
        """New enrollments and revocations, effective from the next round.

        A device enrolled again under a new key (revoked, then re-enrolled with fresh state)
        starts a new counter sequence: its old counter is forgotten. That reopens no replay:
        anything sealed with the old key fails to open with the new one.
        """
        self.registry = dict(registry)
        self._accepted = {d: o for d, o in self._accepted.items() if d in self.registry}
        self._shared_keys = {d: k for d, k in self._shared_keys.items() if self.registry.get(d) is k[0]}
        self.boxes.retain(self.registry.values())  # a revoked or replaced key's Box goes
        self.revoked = set(revoked or ()) - set(registry)
        for device, key in self.registry.items():
            fingerprint = key_fingerprint(key)
            known = self.state.counter_keys.get(device)
            if known is not None and known != fingerprint:
                self.state.counters.pop(device, None)
            self.state.counter_keys[device] = fingerprint

    # --- round lifecycle ---------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.state.completed_rounds >= self.settings.rounds or self.budget_spent

    @property
    def budget_spent(self) -> bool:
        """``[privacy]``: one more train round would spend more than the epsilon budget, so
        training is over (the final model is published, like after the last round)."""
        return self.accountant is not None and self.accountant.would_exceed_budget()

    @property
    def phase(self) -> str:
        if self.done:
            return "final"
        return "moments" if self.state.normalisation is None else "train"

    def select_devices(self, version: int, not_ready: frozenset[str] = frozenset()) -> tuple[str, ...]:
        """The devices asked to take part in manifest ``version``: a seeded choice of
        ``devices_per_round`` (0: all). Devices that said they are not ready (too few local
        samples) are left out while enough others remain for ``min_devices``; otherwise the
        choice is among every enrolled device, as if all were ready."""
        enrolled = sorted(self.registry)
        ready = [d for d in enrolled if d not in not_ready]
        if len(ready) >= self.settings.min_devices:
            enrolled = ready
        k = self.settings.devices_per_round
        if k == 0 or k >= len(enrolled):
            return tuple(enrolled)
        rng = np.random.default_rng([self.settings.selection_seed, version])
        return tuple(sorted(rng.choice(enrolled, size=k, replace=False).tolist()))

    def open_round(
        self,
        now: float,
        not_ready: frozenset[str] = frozenset(),
        *,
        phase: str | None = None,
        timeout_s: float | None = None,
    ) -> Publication:
        """Announces the next round (or the final model): bumps the version, signs the manifest.
        ``not_ready``: devices whose status says they cannot take part yet (``select_devices``).
        ``phase`` and ``timeout_s``: a building gateway's round, which follows its campus's
        (``fedge.aggregator.upstream``); otherwise the engine's own phase and round timeout."""
        version = self.state.version + 1
        phase = self.phase if phase is None else phase
        round_id = self._round_id(phase, version)
        own_timeout = self.settings.round_timeout_s if timeout_s is None else timeout_s
        timeout = 0.0 if phase == "final" else own_timeout
        selected = () if phase == "final" else self.select_devices(version, not_ready)
        weights_bytes = weights_to_bytes(self.state.weights)
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
            selected_devices=selected,
            min_devices=self.settings.min_devices,
            codec=self.settings.codec,
            topk_fraction=self._topk_fraction,
            model_sha256=self.model_sha256,
            model_bytes=len(self.model_bytes),
            weights_sha256=weights_sha,
            weights_bytes=len(weights_bytes),
            model_manifest=self.model_manifest,
            normalisation=self.state.normalisation,
            generation=self.state.generation,
            privacy=self._privacy_announcement(phase, len(selected)),
            strategy=strategy_announcement(self.settings) if phase == "train" else None,
            aggregation=announcement(self.settings) if phase == "train" else None,
        )
        driver: SecureRoundDriver | None = None
        secure_failure: str | None = None
        if phase == "train" and self.secure is not None:
            manifest, driver, secure_failure = self._secure_round(manifest)
        frame = sign_document(MANIFEST_DOC_TYPE, manifest.to_dict(), self.signing_key)
        weights_topic = self.topics.blob(weights_sha)
        previous = self.state.published_weights_sha256
        clear = (self.topics.blob(previous),) if previous not in (None, weights_sha) else ()
        self.state.published_weights_sha256 = weights_sha
        self.state.version = version
        self.state.last_manifest_sha256 = manifest.sha256()
        self.current = None if phase == "final" else self._open(manifest, driver, secure_failure)
        blobs = {weights_topic: weights_bytes}
        if not self._model_published:  # retained: once per process is enough
            blobs = {self.topics.blob(self.model_sha256): self.model_bytes, **blobs}
            self._model_published = True
        secagg = self._take_outbox()
        if driver is not None:
            secagg += driver.start(now)
        return Publication(
            manifest=manifest, manifest_frame=frame, blobs=blobs, clear_blobs=clear, secagg=tuple(secagg)
        )

    def _open(
        self, manifest: RoundManifest, driver: SecureRoundDriver | None, secure_failure: str | None
    ) -> _OpenRound:
        """The round ``manifest`` opens; with ``aggregation = "async"`` a train round's folds
        carry the staleness link and the manifest joins the window updates may be trained from."""
        if self.window is None or manifest.phase != "train":
            if self.window is not None:
                self.window.clear()
            return _OpenRound(manifest, self._round_folds(manifest), driver, secure_failure)
        self.window.add(manifest)
        folds, scale = build_async_round_folds(
            self.settings,
            self.state.weights,
            self._history(),
            self.model_manifest.parameter_count,
            self.model_manifest.task.input_dim,
            self.state.server_optimizer,
        )
        r = _OpenRound(manifest, folds, driver, secure_failure)
        r.scale = scale
        return r

    def _round_id(self, phase: str, version: int) -> str:
        if phase == "train":
            return f"r{self.state.completed_rounds + 1:04d}-v{version}"
        if phase == "moments":
            return f"m-v{version}"
        return f"final-v{version}"

    def _clears_of(self, round_id: str) -> list[SecAggPublication]:
        """Empty retained payloads for every document a secure round ``round_id`` can have
        published (its config, and each enrolled device's bundle, delivery and unmask request)."""
        t = self.topics
        topics = [t.secagg(round_id, "config")] + [
            t.secagg_device(round_id, device, what)
            for device in sorted(self.registry)
            for what in ("bundle", "delivery", "unmask")
        ]
        return [SecAggPublication(topic, b"", retain=True) for topic in topics]

    def _secure_round(
        self, manifest: RoundManifest
    ) -> tuple[RoundManifest, SecureRoundDriver | None, str | None]:
        """The secure train round ``manifest`` opens: the manifest with its
        ``secure_aggregation`` announcement and the round's driver, or, when the round cannot
        run (too few devices selected, a threshold or modulus the protocol does not allow for
        them, no norm bound), the manifest with nobody selected and why. Never a plain round:
        a device of a secure fleet must never be asked for an update in the clear."""
        assert self.secure is not None
        n = len(manifest.selected_devices)
        failure: str | None = None
        if n < SECURE_MIN_DEVICES:
            failure = SECURE_TOO_FEW_DEVICES
        else:
            bounds = self.round_limits().bounds
            clip = bounds.hard if bounds.hard is not None else bounds.clip
            if self.accountant is not None:  # DP: the privacy clip bound is the only bound
                clip = self.accountant.clip_bound
            if clip is None:
                failure = (
                    "secure aggregation needs a norm bound devices clip to before masking "
                    "([rounds] max_update_norm or update_norm_ratio)"
                )
            else:
                try:
                    chosen = choose_parameters(n)
                    announced = SecureAggregationAnnouncement(
                        clip_norm=float(clip),
                        bits=self.secure.bits,
                        degree=chosen.degree,
                        threshold=self.secure.threshold or chosen.threshold,
                    )
                    manifest = replace(manifest, secure_aggregation=announced)
                    config = round_config_for(manifest)  # checks the parameters for n devices
                    if manifest.privacy is not None:  # the devices' noise must fit the modulus
                        noise_plan(manifest.privacy, config, manifest.min_devices)
                except (SecAggError, SecureAggregationAnnouncementError, SecureDpError) as exc:
                    failure = f"secure aggregation cannot open with {n} selected devices: {exc}"
                else:
                    driver = SecureRoundDriver(
                        fleet=self.fleet,
                        config=config,
                        model_version=manifest.version,
                        signing_key=self.signing_key,
                        box_key=self.box_key,
                        registry=self.registry,
                        counters=self.state.counters,  # shared: a counter is never reused
                    )
                    return manifest, driver, None
        return replace(manifest, selected_devices=(), secure_aggregation=None), None, failure

    def _take_outbox(self) -> list[SecAggPublication]:
        out, self._secagg_outbox = self._secagg_outbox, []
        return out

    def tick(self, now: float) -> list[SecAggPublication]:
        """A secure round's documents due by ``now`` (the next phase's per-device documents;
        the clears once it ended), to publish as each says (retained, QoS 1). The shell calls
        it on every turn of its loop, after each message and at least every 100 ms. Empty for
        plain rounds."""
        out = self._take_outbox()
        r = self.current
        if r is not None and r.secure is not None:
            out += r.secure.tick(now)
        return out

    def _round_folds(self, manifest: RoundManifest) -> RoundFolds:
        """The arithmetic of the round ``manifest`` opens: with ``[privacy]``, the DP folds at
        the bound and noise the manifest announces."""
        p = manifest.privacy
        if p is None or self.accountant is None:
            return build_round_folds(
                self.settings,
                self.state.weights,
                self._history(),
                self.model_manifest.parameter_count,
                self.model_manifest.task.input_dim,
                self.state.server_optimizer,
            )
        adaptive = self.accountant.config.adaptive
        dp = DpRound(
            clip_bound=p.clip_bound,
            update_noise_multiplier=self.accountant.config.update_noise_multiplier,
            indicator_noise_stddev=None if adaptive is None else adaptive.indicator_noise_multiplier,
            expected_participants=p.expected_participants,
        )
        return build_dp_round_folds(
            self.settings,
            self._history(),
            self.model_manifest.parameter_count,
            self.model_manifest.task.input_dim,
            dp,
            self.noise_rng,
            self.state.server_optimizer,
        )

    @property
    def _topk_fraction(self) -> float | None:
        """The manifest's ``topk_fraction``: ``[rounds] topk_fraction`` with a sparse codec."""
        return self.settings.topk_fraction if self.settings.codec.sparse else None

    def _privacy_announcement(self, phase: str, selected: int) -> PrivacyAnnouncement | None:
        """What the manifest says about DP: the bound devices clip to, the noise, the budget."""
        a = self.accountant
        if a is None:
            return None
        config = a.config
        return PrivacyAnnouncement(
            noise=DISTRIBUTED_NOISE if self.secure is not None else "central",
            clip_bound=a.clip_bound,
            adaptive_clipping=config.adaptive is not None,
            noise_multiplier=float(config.noise_multiplier),
            expected_participants=max(1, selected),
            epsilon_spent=a.epsilon_spent(),
            epsilon_budget=float(config.epsilon_budget),
            target_delta=float(config.target_delta),
        )

    def _history(self) -> InfluenceHistory:
        """What the influence bounds remember, as ``EngineState`` (and the checkpoint) holds it."""
        s = self.state
        return InfluenceHistory(s.update_norm_median, s.claim_median, s.initial_norm)

    def round_limits(self) -> RoundLimits:
        """The next round's bounds on one device's influence
        (``fedge.aggregator.strategies.factory.round_limits``)."""
        return round_limits(self.settings, self.state.weights, self._history())

    def norm_bounds(self) -> NormBounds:
        """The next round's bounds on an update's L2 norm (``strategies.clipping.norm_bounds``)."""
        return self.round_limits().bounds

    def claim_cap(self) -> float | None:
        """The most a claimed example count counts for in the next round
        (``strategies.weighting.claim_cap``)."""
        return self.round_limits().claim_cap

    def weight_cap(self) -> float | None:
        """``weighting = "examples"``: the largest weight one update may have in the next round
        (``strategies.weighting.weight_cap``); None when every update counts once."""
        return self.round_limits().weight_cap

    def round_due(self, now: float) -> bool:
        """True once every selected device reported, or the deadline passed."""
        if self.current is None:
            return False
        m = self.current.manifest
        if self.current.secure is not None:  # the sum (or the abort) is there, or time is up
            return self.current.secure.done or now >= m.deadline
        if self.current.secure_failure is not None:  # nobody selected: wait out the round
            return now >= m.deadline
        finished = len(self.current.reported) + len(self.current.spent)
        if self.current.scale is not None and len(self.current.reported) >= self.settings.buffer_size:
            return True  # asynchronous: the buffer is full
        return finished >= len(m.selected_devices) or now >= m.deadline + self.partial_grace_s

    def close_round(self) -> RoundRecord:
        """Aggregates the open round if enough devices reported, else aborts it (no new model)."""
        if self.current is None:
            raise FedgeError("no round is open")
        r = self.current
        if r.secure is not None or r.secure_failure is not None:
            return self._close_secure_round(r)
        m = r.manifest
        enough = len(r.reported) >= self.settings.min_devices
        failure: str | None = None
        outliers: list[str] = []
        folds = r.folds
        try:
            if enough and m.phase == "moments":
                moments = folds.moments.result()
                self.state.normalisation = moments.normalisation
                outliers = [r.moment_devices[i] for i in moments.outlier_rows]
            elif enough:
                self.state.weights = folds.updates.result(self.state.weights)
                self.state.completed_rounds += 1
                if folds.optimizer is not None:  # the state moves with the weights, never alone
                    self.state.server_optimizer = folds.optimizer.next_state
                self._charge_privacy(folds, m)
        except AggregationError as exc:
            # E.g. fewer than 2 samples for a normalisation, or weights overflowing float32: the
            # round is aborted (no new model), never a crash of the aggregator.
            enough = False
            failure = str(exc)
        # Counters advance for every authentic message, aggregated or refused: a counter is
        # never reused.
        self.state.counters.update(r.spent)
        self.state.counters.update(r.reported)
        history = folds.next_history(self._history())
        self.state.claim_median = history.claim_median
        self.state.update_norm_median = history.update_norm_median
        metrics = folds.metrics
        record = RoundRecord(
            round_number=m.round_number,
            round_id=m.round_id,
            phase=m.phase,
            outcome="aggregated" if enough else "aborted",
            version=m.version,
            selected=len(m.selected_devices),
            reported=len(r.reported),
            examples=metrics.examples if m.phase == "train" else folds.moments.count,
            train_loss=metrics.train_loss.mean if metrics.train_loss.count else None,
            fed_eval_loss=metrics.eval_loss.mean if metrics.eval_loss.count else None,
            fed_eval_accuracy=metrics.eval_accuracy.mean if metrics.eval_accuracy.count else None,
            fed_eval_examples=int(metrics.eval_loss.total_weight),
            fed_eval_metric=self.eval_metric,
            fed_eval_mse=metrics.eval_mse.mean if metrics.eval_mse.count else None,
            mean_update_bytes=r.update_bytes / len(r.reported) if r.reported else None,
            rejected=dict(r.rejected),
            failure=failure,
            clipped=folds.updates.clipped,
            norm_bound=folds.limits.bounds.clip,
            weighting=self.settings.weighting,
            weight_cap=folds.limits.weight_cap,
            spent=len(r.spent),
            outlier_devices=len(outliers),
            epsilon_spent=None if self.accountant is None else self.accountant.epsilon_spent(),
            strategy=self.settings.strategy,
        )
        remember(self.state.history, record.to_dict())  # bounded: fedge.aggregator.round_history
        self.current = None
        return record

    def _close_secure_round(self, r: _OpenRound) -> RoundRecord:
        """A secure round's end: ``global + server_learning_rate * sum / survivors`` if the
        driver produced the sum of at least ``min_devices`` devices, else aborted with the reason.
        The driver is run to its end first if the deadline passed before it got there."""
        m = r.manifest
        driver = r.secure
        failure = r.secure_failure
        survivors: tuple[str, ...] = ()
        if driver is not None:
            if not driver.done:  # time is up: every phase is due at the round's deadline
                self._secagg_outbox += driver.tick(max(m.deadline, driver.config.deadlines.unmask))
            result = driver.result
            if result is None:
                failure = driver.abort_reason or "the secure round did not finish"
            elif len(result.survivors) < self.settings.min_devices:
                failure = (
                    f"{len(result.survivors)} device(s) in the secure sum, fewer than "
                    f"min_devices={self.settings.min_devices}"
                )
            else:
                survivors = result.survivors
                # With DP the denominator is public and fixed (the selected count): dividing by
                # the survivors would let their number leak through the mean.
                p = m.privacy
                mean = result.dequantised(driver.config) / (
                    p.expected_participants if p is not None else len(survivors)
                )
                optimizer: ServerOptimizerState | None = None
                if self.settings.strategy in SERVER_OPTIMIZERS:  # it acts on the mean: runs here too
                    step, optimizer = optimizer_step(self.settings, self.state.server_optimizer, mean)
                else:
                    step = self.settings.server_learning_rate * mean
                with np.errstate(over="ignore", invalid="ignore"):
                    weights = (self.state.weights.astype(np.float64) + step).astype(np.float32)
                del mean, step
                if np.all(np.isfinite(weights)):
                    self.state.weights = weights
                    self.state.completed_rounds += 1
                    if optimizer is not None:
                        self.state.server_optimizer = optimizer
                    if self.accountant is not None and m.privacy is not None:
                        self.accountant.record_round()  # a noised sum was used: charge it
                        self.state.privacy = self.accountant.state()
                else:
                    survivors, failure = (), "the aggregated weights overflow float32"
        # Counters advanced as the driver accepted messages (it shares the engine's map).
        announced = m.secure_aggregation
        record = RoundRecord(
            round_number=m.round_number,
            round_id=m.round_id,
            phase=m.phase,
            outcome="aggregated" if survivors else "aborted",
            version=m.version,
            selected=len(m.selected_devices),
            reported=len(survivors) if survivors else len(r.masked),
            examples=0,
            train_loss=None,
            fed_eval_loss=None,
            fed_eval_accuracy=None,
            fed_eval_examples=0,
            fed_eval_metric=self.eval_metric,
            fed_eval_mse=None,
            mean_update_bytes=r.update_bytes / len(r.masked) if r.masked else None,
            rejected=dict(r.rejected),
            failure=failure,
            norm_bound=None if announced is None else announced.clip_norm,
            weighting="equal",
            weight_cap=None,
            secure_aggregation=True,
            dropped=len(m.selected_devices) - len(survivors),
            epsilon_spent=None if self.accountant is None else self.accountant.epsilon_spent(),
            strategy=self.settings.strategy,
        )
        remember(self.state.history, record.to_dict())  # bounded: fedge.aggregator.round_history
        self.current = None
        return record

    def _charge_privacy(self, folds: RoundFolds, m: RoundManifest) -> None:
        """A DP round's noised aggregate was used: the accountant charges it (and, with
        adaptive clipping, moves the bound by the noisy count), and the state keeps the ledger
        for the checkpoint. Aborted rounds release nothing and cost nothing."""
        a = self.accountant
        if a is None or folds.dp is None or m.privacy is None:
            return
        if a.config.adaptive is None:
            a.record_round()
        else:
            a.record_round(
                noisy_indicator_sum=folds.dp.noisy_indicator_sum,
                expected_participants=m.privacy.expected_participants,
            )
        self.state.privacy = a.state()

    # --- messages ----------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes, now: float) -> Outcome:
        """Accepts or rejects one message from ``update/+``; every rejection is counted."""
        r = self.current
        fast = None if r is None or r.fast is False else self._fast_update(r, topic, payload, now)
        outcome = self._general_check(topic, payload, now) if fast is None else fast
        if not outcome.accepted:
            self.state.rejected_total[outcome.reason] = self.state.rejected_total.get(outcome.reason, 0) + 1
            if self.current is not None:
                self.current.rejected[outcome.reason] += 1
                if self.current.batch is not None:
                    self.current.batch.rejected[outcome.reason] += 1
        return outcome

    def message_limit(self) -> int:
        """The largest message accepted now: ``max_message_bytes``, or in a secure round the
        largest secure-aggregation message of its config if that is larger (a masked input is
        the model in ``bits``-bit integers, base64)."""
        r = self.current
        if r is not None and r.secure is not None:
            return max(self.max_message_bytes, secagg_max_sealed_bytes(r.secure.config))
        return self.max_message_bytes

    def _general_check(self, topic: str, payload: bytes, now: float) -> Outcome:
        """The outcome of one message, uncounted, by the general path (every message the fast path
        does not decide: ``handle`` tries that first)."""
        limit = self.message_limit()
        if len(payload) > limit:
            return Outcome(False, RejectReason.TOO_LARGE, None)
        try:
            topic_device = self.topics.device_of(topic, "update")
        except TopicError:
            return Outcome(False, RejectReason.BAD_TOPIC, None)
        try:
            header, ciphertext = read_header(payload, limit)
        except SealError as exc:
            return Outcome(False, exc.reason, topic_device)
        device = header.device_id
        if device != topic_device:
            return Outcome(False, RejectReason.DEVICE_MISMATCH, topic_device, header.kind)
        if header.fleet != self.fleet:
            return Outcome(False, RejectReason.WRONG_FLEET, device, header.kind)
        device_key = self.registry.get(device)
        if device_key is None:
            reason = RejectReason.REVOKED_DEVICE if device in self.revoked else RejectReason.UNKNOWN_DEVICE
            return Outcome(False, reason, device, header.kind)
        r = self.current
        if r is None:
            return Outcome(False, RejectReason.NO_OPEN_ROUND, device, header.kind)
        m = r.manifest
        staleness = 0
        if r.scale is not None and self.window is not None:
            # Asynchronous: checked against the manifest the update was trained from.
            base = self.window.base(header.model_version)
            if base is None and header.model_version < m.version - self.window.max_staleness:
                return Outcome(False, STALE, device, header.kind)
            if base is None or header.round_id != base.round_id:
                return Outcome(False, RejectReason.WRONG_ROUND, device, header.kind)
            if now > m.deadline:
                return Outcome(False, RejectReason.LATE, device, header.kind)
            if not base.is_selected(device):
                return Outcome(False, RejectReason.NOT_SELECTED, device, header.kind)
            staleness = m.version - base.version
        else:
            if header.round_id != m.round_id:
                return Outcome(False, RejectReason.WRONG_ROUND, device, header.kind)
            if now > m.deadline:
                return Outcome(False, RejectReason.LATE, device, header.kind)
            if header.model_version != m.version:
                return Outcome(False, RejectReason.WRONG_VERSION, device, header.kind)
            if not m.is_selected(device):
                return Outcome(False, RejectReason.NOT_SELECTED, device, header.kind)
        if r.secure is not None:
            return self._secure_message(r, device, header.kind, topic, payload, now)
        expected_kind = "moments" if m.phase == "moments" else "update"
        if header.kind != expected_kind:
            return Outcome(False, RejectReason.WRONG_KIND, device, header.kind)
        if r.done(device):
            return Outcome(False, RejectReason.DUPLICATE, device, header.kind)
        if header.counter <= self.state.counters.get(device, -1):
            return Outcome(False, RejectReason.REPLAYED_COUNTER, device, header.kind)
        try:
            box = self.boxes.get(device_key)
        except SealError as exc:
            return Outcome(False, exc.reason, device, header.kind)
        try:
            payload_header, body = open_sealed(
                header, ciphertext, self.box_key, device_key, self.max_message_bytes, box=box
            )
        except SealError as exc:
            return Outcome(False, exc.reason, device, header.kind)
        return self._authentic(
            r, device, header, expected_kind, staleness, payload_header, body, len(payload)
        )

    def _authentic(
        self,
        r: _OpenRound,
        device: str,
        header: SealedHeader,
        expected_kind: str,
        staleness: int,
        payload_header: dict[str, Any],
        body: bytes,
        size: int,
    ) -> Outcome:
        """An opened message whose binding checked out: folded in, or refused."""
        # Authentic: this message is the device's one for the round, accepted or not. A device
        # sending bad content again and again would otherwise cost a decryption each time.
        if r.scale is not None:
            r.scale.factor = staleness_weight(staleness)
        refused = self._fold_in(r, device, expected_kind, payload_header, body)
        if refused is not None:
            r.spent[device] = header.counter
            if r.batch is not None:
                r.batch.spent[device] = header.counter
            return Outcome(False, refused, device, header.kind)
        r.reported[device] = header.counter
        r.update_bytes += size
        if r.batch is not None:
            r.batch.accepted[device] = header.counter
            r.batch.update_bytes += size
        return Outcome(True, "accepted", device, header.kind)

    def _secure_message(
        self, r: _OpenRound, device: str, kind: str, topic: str, payload: bytes, now: float
    ) -> Outcome:
        """A secure round takes only its own kinds (a plain ``update`` is ``wrong_kind``: it
        would be an update in the clear); the driver checks and counts the rest."""
        driver = r.secure
        assert driver is not None
        if kind not in SECAGG_KINDS:
            return Outcome(False, RejectReason.WRONG_KIND, device, kind)
        outcome = driver.handle(topic, payload, now)
        if outcome.accepted and outcome.kind == KIND_MASKED:
            r.masked.add(device)
            r.update_bytes += len(payload)
        return Outcome(outcome.accepted, outcome.reason, outcome.device_id or device, outcome.kind or kind)

    def _fold_in(
        self, r: _OpenRound, device: str, kind: str, payload_header: dict[str, Any], body: bytes
    ) -> str | None:
        """Adds an authentic payload to the round's folds; the rejection reason, or None if
        accepted. A fold refuses with an ``AggregationError`` before it changes anything, so a
        refused payload leaves the round exactly as it was."""
        m = r.manifest
        limit = self.settings.max_examples_per_update
        try:
            if kind == "moments":
                moments = decode_moments(payload_header, body, self.model_manifest.task.input_dim)
                if moments.count > limit:
                    return RejectReason.TOO_MANY_EXAMPLES
                try:
                    r.folds.add_moments(moments)
                except AggregationError:  # moments no real data can have, or too many samples
                    return RejectReason.BAD_MOMENTS
                r.moment_devices.append(device)
                if r.batch is not None:
                    r.batch.keep(device, moments)
                return None
            update = decode_update(payload_header, body, self.layout, m.codec, m.topk_fraction)
            # The clip indicator belongs to adaptive-DP rounds only, and they need it.
            adaptive = m.privacy is not None and m.privacy.adaptive_clipping
            if (update.clip_indicator is not None) != adaptive:
                return RejectReason.BAD_SCHEMA
            ev = update.evaluation
            if update.examples > limit or (ev is not None and ev.examples > limit):
                return RejectReason.TOO_MANY_EXAMPLES
            r.folds.add_update(update)  # the norm bounds, then the metrics, then the strategy
            if r.batch is not None:
                r.batch.keep(device, update)
            return None
        except MessageError as exc:
            return exc.reason
        except NormTooLarge:  # over the hard bound, with update_norm_policy = "reject"
            return RejectReason.NORM_TOO_LARGE
        except TooManyUpdates:  # a robust strategy holds robust_max_updates updates already
            return RejectReason.TOO_MANY_UPDATES
        except AggregationError:
            return RejectReason.REJECTED_BY_AGGREGATION

    # --- the fast path (issue 18) ----------------------------------------------------------------
    #
    # A plain train round's update as an honest device seals it, checked and folded in with
    # fewer Python layers, passes and copies than the general path above: the frames' prefixes
    # and the cleartext header read directly (the header through a pattern only the canonical
    # JSON fedge writes matches), decryption into the message's own buffer, the sealed binding
    # compared as bytes, the payload header's usual shape checked inline, and the fp32 delta cast
    # to float64 once for its finiteness, its norm and the fold. It decides only what it is sure
    # the general path would decide the same way: anything unusual (any other round, codec, key
    # order, id, a refusal of any kind) goes to the general path, from the start before the
    # decryption, with the decrypted bytes after it, so every refusal has the general path's
    # reason and leaves what it leaves. The one refusal it makes itself, a box that does not
    # open, is the general path's ``decrypt_failed`` (it would cost a second decryption).
    # tests/aggregator/test_handle_fast_path.py holds the two paths to the same outcomes.

    def _round_is_fast(self, r: _OpenRound) -> bool:
        """Whether the open round's updates can take the fast path: a synchronous plain train
        round, a dense codec, no clip indicator, folds that take prepared updates."""
        m = r.manifest
        return (
            m.phase == "train"
            and r.secure is None
            and r.secure_failure is None
            and r.scale is None
            and not m.codec.sparse
            and not (m.privacy is not None and m.privacy.adaptive_clipping)
            and r.folds.takes_prepared
        )

    def _fast_update(self, r: _OpenRound, topic: str, payload: bytes, now: float) -> Outcome | None:
        """The outcome of a usual update (see above), or None: the general path decides."""
        if r.fast is None:
            r.fast = self._round_is_fast(r)
            if not r.fast:
                return None
        if type(payload) is not bytes:  # paho's payloads are; other buffers go the general way
            return None
        limit = self.max_message_bytes
        size = len(payload)
        if size > limit or size < PREFIX_BYTES:
            return None
        magic, version, kind, reserved, hlen, blen = PREFIX_LAYOUT.unpack_from(payload)
        if (
            magic != MAGIC
            or version != FRAME_VERSION
            or kind != FrameKind.SEALED
            or reserved != 0
            or hlen > MAX_HEADER_BYTES
            or blen > limit
            or PREFIX_BYTES + hlen + blen != size
            or blen < NONCE_BYTES + MAC_BYTES
        ):
            return None
        raw_header = payload[PREFIX_BYTES : PREFIX_BYTES + hlen]
        match = _CANONICAL_UPDATE_HEADER.fullmatch(raw_header)
        if match is None:
            return None
        counter_text, device_raw, fleet_raw, version_text, round_raw = match.groups()
        m = r.manifest
        device = device_raw.decode("ascii")
        if (
            fleet_raw != self._fleet_ascii
            or topic != self._update_prefix + device
            or round_raw != r.round_ascii
            or version_text != r.version_ascii
            or now > m.deadline
        ):
            return None
        counter = int(counter_text)
        device_key = self.registry.get(device)
        if (
            counter > _MAX_COUNTER
            or device_key is None
            or not m.is_selected(device)
            or r.done(device)
            or counter <= self.state.counters.get(device, -1)
        ):
            return None
        known = self._shared_keys.get(device)
        if known is None or known[0] is not device_key:  # a new key: its Box (refused: general path)
            try:
                known = self._shared_keys[device] = (device_key, self.boxes.get(device_key).shared_key())
            except SealError:
                return None
        # An fp32 update's body is the plaintext's last 4 x P bytes: land it aligned.
        inner = open_into(
            known[1], payload, PREFIX_BYTES + hlen, blen - NONCE_BYTES - MAC_BYTES - self._fp32_body
        )
        if inner is None:
            return Outcome(False, RejectReason.DECRYPT_FAILED, device, "update")
        # Authentic from here: anything unusual goes to the general path with the decrypted bytes.
        update = self._fast_payload(m, raw_header, inner)
        if update is None:
            return self._general(r, device, counter, inner, size)
        cast = self._cast
        if cast is None or cast.shape != update.delta.shape:
            cast = self._cast = np.empty(update.delta.shape, np.float64)
        np.copyto(cast, update.delta)
        norm_sq = float(np.dot(cast, cast))  # l2(update.delta) squared, to the bit; finite
        if not math.isfinite(norm_sq):  # unless a value is NaN or inf (float64 squares of float32
            return self._general(r, device, counter, inner, size)  # values cannot overflow)
        try:
            r.folds.add_prepared(update, cast, math.sqrt(norm_sq))
        except AggregationError:  # refused, nothing changed: the general path says why
            return self._general(r, device, counter, inner, size)
        if r.batch is not None:
            r.batch.keep(device, update)
            r.batch.accepted[device] = counter
            r.batch.update_bytes += size
        r.reported[device] = counter
        r.update_bytes += size
        accepted = self._accepted.get(device)
        if accepted is None:  # one immutable Outcome per device, not one per message
            accepted = self._accepted[device] = Outcome(True, "accepted", device, "update")
        return accepted

    def _general(self, r: _OpenRound, device: str, counter: int, inner: memoryview, size: int) -> Outcome:
        """The general path's decision on a message the fast path decrypted but would not fold
        (exactly what ``_check`` does after ``open_sealed``)."""
        m = r.manifest
        header = SealedHeader(self.fleet, device, m.round_id, counter, "update", m.version)
        try:
            payload_header, body = read_payload(header, bytes(inner), self.max_message_bytes)
        except SealError as exc:
            return Outcome(False, exc.reason, device, "update")
        return self._authentic(r, device, header, "update", 0, payload_header, body, size)

    def _fast_payload(self, m: RoundManifest, raw_header: bytes, inner: memoryview) -> UpdatePayload | None:
        """The update in the decrypted ``PAYLOAD`` frame ``inner`` when it is exactly as fedge
        writes it, with every check ``read_payload``, ``decode_update`` and ``_fold_in`` run
        before the folds, but finiteness (the caller's norm); None for anything else.

        As fedge writes it: the binding is the very bytes of the cleartext header (which the
        canonical pattern matched, so both parse to the same object) and the payload header
        matches :data:`_CANONICAL_UPDATE_PAYLOAD`, whose numbers become what ``json`` makes of
        them (an int without fraction or exponent, else a float, refused when not finite)."""
        size = len(inner)
        if size < PREFIX_BYTES:
            return None
        magic, version, kind, reserved, hlen, blen = PREFIX_LAYOUT.unpack_from(inner)
        if (
            magic != MAGIC
            or version != FRAME_VERSION
            or kind != FrameKind.PAYLOAD
            or reserved != 0
            or hlen > MAX_HEADER_BYTES
            or blen > self.max_message_bytes
            or PREFIX_BYTES + hlen + blen != size
        ):
            return None
        end = PREFIX_BYTES + hlen
        head = bytes(memoryview(inner)[PREFIX_BYTES:end])
        start = len(_BIND_OPEN) + len(raw_header) + len(_PAYLOAD_KEY)
        if (
            not head.startswith(_BIND_OPEN)
            or not head.startswith(raw_header, len(_BIND_OPEN))
            or not head.startswith(_PAYLOAD_KEY, len(_BIND_OPEN) + len(raw_header))
        ):
            return None
        match = _CANONICAL_UPDATE_PAYLOAD.fullmatch(head, start)
        if match is None:
            return None
        (
            codec_name,
            ev_text,
            accuracy_text,
            ev_examples_text,
            loss_text,
            mse_text,
            examples_text,
            train_text,
        ) = match.groups()
        codec = m.codec
        if codec_name != _CODEC_ASCII[codec]:
            return None
        limit = self._max_examples
        examples = int(examples_text)
        train_loss = float(train_text)
        # A count out of range is bad_count or too_many_examples; a number json refuses (not
        # finite) the payload frame's bad_header: the general path says which.
        if not 1 <= examples <= limit or examples >= _COUNT_END or not math.isfinite(train_loss):
            return None
        evaluation: Evaluation | None = None
        if ev_text != b"null":
            ev_examples = int(ev_examples_text)
            loss = float(loss_text)
            accuracy = None if accuracy_text == b"null" else float(accuracy_text)
            mse = None if mse_text == b"null" else float(mse_text)
            if (
                not 1 <= ev_examples <= limit
                or ev_examples >= _COUNT_END
                or not math.isfinite(loss)
                or not (accuracy is None or 0.0 <= accuracy <= 1.0)  # False for NaN and inf too
                or not (mse is None or (mse >= 0.0 and math.isfinite(mse)))
            ):
                return None
            evaluation = Evaluation(ev_examples, loss, accuracy, mse)
        count = self._parameter_count
        if codec is Codec.FP32:
            if blen != WEIGHTS_DTYPE.itemsize * count:
                return None
            delta = np.frombuffer(inner, WEIGHTS_DTYPE, count, end)
            if not _LITTLE_ENDIAN_F32:  # converted where float32 is not little-endian, as decode does
                delta = delta.astype(np.float32)
            delta.flags.writeable = False  # as decode_tensors gives it: nobody changes the message
        else:
            try:
                delta = decode_tensors(bytes(memoryview(inner)[end:]), self.layout, codec, m.topk_fraction)
            except CodecError:
                return None
        return UpdatePayload(delta, examples, train_loss, evaluation)

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
            "reported": sorted(r.masked if r.secure is not None else r.reported) if r else [],
            "refused": sorted(r.spent) if r else [],
            "rejected_total": dict(self.state.rejected_total),
            "limits": self.limits(),
            "history": self.state.history[-5:],
            "eval_metric": self.eval_metric,  # which fed_eval_* field of a record is the task's
            "privacy": self.privacy_status(),
            "time": now,
        }

    def privacy_status(self) -> dict[str, Any] | None:
        """``[privacy]`` for operators: the budget, what is spent and what is left; None when off."""
        a = self.accountant
        if a is None:
            return None
        c = a.config
        return {
            "noise": DISTRIBUTED_NOISE if self.secure is not None else "central",
            "epsilon_spent": a.epsilon_spent(),
            "epsilon_budget": float(c.epsilon_budget),
            "target_delta": float(c.target_delta),
            "rounds_charged": a.rounds,
            "rounds_left": a.rounds_left(),
            "budget_spent": self.budget_spent,
            "clip_bound": a.clip_bound,
            "adaptive_clipping": c.adaptive is not None,
            "noise_multiplier": float(c.noise_multiplier),
            "update_noise_multiplier": float(c.update_noise_multiplier),
        }

    def limits(self) -> dict[str, Any]:
        """What bounds one device's influence right now, for operators (status) and logs."""
        s = self.settings
        limits = self.current.folds.limits if self.current is not None else self.round_limits()
        return {
            "max_message_bytes": self.message_limit(),
            "weighting": s.weighting,
            "weight_cap": limits.weight_cap,
            "norm_bound": limits.bounds.clip,
            "norm_bound_hard": limits.bounds.hard,
            "norm_policy": s.update_norm_policy,
            "moments_aggregation": s.moments_aggregation,
            "strategy": s.strategy,
            "secure_aggregation": self.secure_status(),
        }

    def secure_status(self) -> dict[str, Any] | None:
        """``[privacy] secure_aggregation`` for operators (None when off): the modulus, and for
        the open secure round its parameters and phase (``phase`` None: no secure round open;
        ``threshold`` then the configured one, None when chosen per round)."""
        if self.secure is None:
            return None
        r = self.current
        driver = r.secure if r is not None else None
        if driver is None:
            return {
                "bits": self.secure.bits,
                "degree": None,
                "threshold": self.secure.threshold or None,
                "clip_norm": None,
                "phase": None,
            }
        c = driver.config
        return {
            "bits": c.bits,
            "degree": c.degree,
            "threshold": c.threshold,
            "clip_norm": c.clip_norm,
            "phase": str(driver.phase),
        }

    def snapshot(self) -> EngineState:
        """A copy of the durable state, for the checkpoint."""
        return replace(
            self.state,
            weights=self.state.weights.copy(),
            counters=dict(self.state.counters),
            rejected_total=dict(self.state.rejected_total),
            history=list(self.state.history),
            counter_keys=dict(self.state.counter_keys),
            privacy=None if self.state.privacy is None else dict(self.state.privacy),
        )
