"""The round manifest: the signed, retained announcement of the global model and the round.

Every publication bumps ``version`` and names the previous manifest's hash (``parent_sha256``),
so manifests form a chain that devices can only move forward along. It names the model and
weights blobs by SHA-256 (devices fetch and verify them), the round's id, phase, deadline and
selected devices, the task's model manifest, and the feature normalisation. It is signed as
:attr:`fedge.protocol.signing.DocType.ROUND_MANIFEST`.

Phases: ``moments`` (devices send feature moments for the federated normalisation),
``train`` (devices train and send updates), ``final`` (training is over; no round is open).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from fedge.protocol.codec import Codec, CodecError, check_topk_fraction, parse_codec
from fedge.protocol.digests import is_sha256_hex
from fedge.protocol.errors import FedgeError, FieldError
from fedge.protocol.model_manifest import ModelManifest, Normalisation, manifest_from_json
from fedge.protocol.privacy_announcement import PrivacyAnnouncement, PrivacyAnnouncementError
from fedge.protocol.secagg.announcement import (
    SecureAggregationAnnouncement,
    SecureAggregationAnnouncementError,
)
from fedge.protocol.signing import canonical_json
from fedge.protocol.strategy_announcement import StrategyAnnouncement, StrategyAnnouncementError
from fedge.protocol.topics import TopicError, check_id
from fedge.protocol.weights import weights_nbytes

PHASES = ("moments", "train", "final")
FIRST_GENERATION = 1
MAX_GENERATION = 1_000_000
MAX_SELECTED_DEVICES = 100_000


class RoundManifestError(FieldError):
    """A round manifest has a missing, mistyped or inconsistent field."""


#: ``aggregation.mode``: the only value a manifest carries (synchronous rounds leave it out).
ASYNC_MODE = "async"
#: Bounds on ``aggregation.buffer_size`` (K) and ``aggregation.max_staleness`` (S).
MAX_BUFFER_SIZE = 100_000
MAX_STALENESS = 1000


@dataclass(frozen=True)
class AsyncAggregation:
    """What a train manifest of a buffered asynchronous fleet announces (docs/async.md): a new
    version follows every ``buffer_size`` accepted updates, and an update trained from a version
    more than ``max_staleness`` versions old is refused. Devices need nothing from it to train
    (they answer the newest manifest as always); it is signed so what the aggregator does with
    a late update is part of what the fleet was told."""

    buffer_size: int
    max_staleness: int

    def to_dict(self) -> dict[str, Any]:
        return {"mode": ASYNC_MODE, "buffer_size": self.buffer_size, "max_staleness": self.max_staleness}

    @classmethod
    def from_dict(cls, data: Any) -> AsyncAggregation:
        """Strict: exactly ``mode`` ("async"), ``buffer_size`` (1..100000) and ``max_staleness``
        (0..1000)."""
        keys = {"mode", "buffer_size", "max_staleness"}
        if not isinstance(data, dict) or set(data) != keys:
            raise RoundManifestError(
                "aggregation must be an object with exactly mode, buffer_size and max_staleness",
                field="aggregation",
                expected=sorted(keys),
                found=sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__,
            )
        if data["mode"] != ASYNC_MODE:
            raise RoundManifestError(
                f'aggregation.mode must be "{ASYNC_MODE}"',
                field="aggregation.mode",
                expected=ASYNC_MODE,
                found=data["mode"],
            )
        values: dict[str, int] = {}
        for key, low, high in (("buffer_size", 1, MAX_BUFFER_SIZE), ("max_staleness", 0, MAX_STALENESS)):
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise RoundManifestError(
                    f"aggregation.{key} must be an integer in {low}..{high}",
                    field=f"aggregation.{key}",
                    expected=f"{low}..{high}",
                    found=value,
                )
            values[key] = value
        return cls(buffer_size=values["buffer_size"], max_staleness=values["max_staleness"])


@dataclass(frozen=True)
class RoundManifest:
    fleet: str
    version: int
    parent_sha256: str
    phase: str
    round_number: int
    round_id: str
    issued_at: float
    deadline: float
    expires_at: float
    selected_devices: tuple[str, ...]
    min_devices: int
    codec: Codec
    model_sha256: str
    model_bytes: int
    weights_sha256: str
    weights_bytes: int
    model_manifest: ModelManifest
    normalisation: Normalisation | None
    #: The model generation (``[aggregator] model_generation``), so a device can say which model
    #: it runs (its predictions name it). Left out of the document while it is the first, 1:
    #: manifests of a fleet that never changed its model stay what devices before this field
    #: accept, and a device must know the field only once a fleet moves to a new generation.
    generation: int = FIRST_GENERATION
    #: Differential privacy (``[privacy]``): the clip bound devices apply, the noise, the budget
    #: spent. Left out of the document when off, like ``generation``.
    privacy: PrivacyAnnouncement | None = None
    #: Secure aggregation (``[privacy] secure_aggregation``), in train manifests only: the
    #: device's update goes into the masked sum, never in the clear. Left out when off.
    secure_aggregation: SecureAggregationAnnouncement | None = None
    #: The aggregation strategy (``[rounds] strategy``: a server optimizer or a robust
    #: aggregator, ``docs/strategies.md``) and its parameters, in train manifests only. Left out
    #: for plain FedAvg, like ``generation``.
    strategy: StrategyAnnouncement | None = None
    #: With a sparse codec (``topk-fp16``, ``topk-int8``): the share of each tensor's values an
    #: update carries (``[rounds] topk_fraction``), which fixes every tensor's ``k``. Present
    #: exactly when the codec is sparse, so dense manifests are what they always were.
    topk_fraction: float | None = None
    #: Buffered asynchronous aggregation (``[rounds] aggregation = "async"``, docs/async.md),
    #: in train manifests only: the aggregator folds updates trained from any of the last
    #: ``max_staleness`` versions and publishes a new one every ``buffer_size`` accepted
    #: updates. Left out for synchronous rounds, so their manifests (and hashes) are unchanged.
    aggregation: AsyncAggregation | None = None

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "fleet": self.fleet,
            "version": self.version,
            "parent_sha256": self.parent_sha256,
            "phase": self.phase,
            "round_number": self.round_number,
            "round_id": self.round_id,
            "issued_at": self.issued_at,
            "deadline": self.deadline,
            "expires_at": self.expires_at,
            "selected_devices": list(self.selected_devices),
            "min_devices": self.min_devices,
            "codec": self.codec.value,
            "model_sha256": self.model_sha256,
            "model_bytes": self.model_bytes,
            "weights_sha256": self.weights_sha256,
            "weights_bytes": self.weights_bytes,
            "model_manifest": self.model_manifest.to_dict(),
            "normalisation": self.normalisation.to_dict() if self.normalisation else None,
        }
        if self.generation != FIRST_GENERATION:
            doc["generation"] = self.generation
        if self.privacy is not None:
            doc["privacy"] = self.privacy.to_dict()
        if self.secure_aggregation is not None:
            doc["secure_aggregation"] = self.secure_aggregation.to_dict()
        if self.strategy is not None:
            doc["strategy"] = self.strategy.to_dict()
        if self.topk_fraction is not None:
            doc["topk_fraction"] = self.topk_fraction
        if self.aggregation is not None:
            doc["aggregation"] = self.aggregation.to_dict()
        return doc

    def sha256(self) -> str:
        """Hash of the canonical document: what the next manifest's ``parent_sha256`` names."""
        return hashlib.sha256(canonical_json(self.to_dict())).hexdigest()

    @cached_property
    def _selected_set(self) -> frozenset[str]:
        return frozenset(self.selected_devices)

    def is_selected(self, device_id: str) -> bool:
        return device_id in self._selected_set


def round_manifest_from_dict(data: Any) -> RoundManifest:
    """Validates a verified manifest document; every problem names the field."""
    if not isinstance(data, dict):
        raise RoundManifestError("round manifest must be an object")
    expected = {
        "fleet",
        "version",
        "parent_sha256",
        "phase",
        "round_number",
        "round_id",
        "issued_at",
        "deadline",
        "expires_at",
        "selected_devices",
        "min_devices",
        "codec",
        "model_sha256",
        "model_bytes",
        "weights_sha256",
        "weights_bytes",
        "model_manifest",
        "normalisation",
    }
    optional = {"generation", "privacy", "secure_aggregation", "strategy", "topk_fraction", "aggregation"}
    if set(data) - optional != expected:
        missing, extra = sorted(expected - set(data)), sorted(set(data) - expected - optional)
        raise RoundManifestError(
            f"round manifest fields: missing {missing}, unexpected {extra}",
            field="round manifest",
            expected=sorted(expected),
            found=sorted(map(str, data)),
        )
    try:
        fleet = check_id(data["fleet"], "fleet id")
        round_id = check_id(data["round_id"], "round id")
        selected_raw = data["selected_devices"]
        if not isinstance(selected_raw, list) or len(selected_raw) > MAX_SELECTED_DEVICES:
            raise RoundManifestError("selected_devices must be a list of device ids")
        selected = tuple(check_id(d) for d in selected_raw)
    except TopicError as exc:
        raise RoundManifestError(str(exc)) from None
    if data["phase"] not in PHASES:
        raise RoundManifestError(
            f"phase must be one of {PHASES}", field="phase", expected=PHASES, found=data["phase"]
        )
    parent = data["parent_sha256"]
    if not (parent == "" or is_sha256_hex(parent)):
        raise RoundManifestError(
            "parent_sha256 must be empty or 64 hex digits",
            field="parent_sha256",
            expected="empty or 64 hex digits",
            found=parent,
        )
    for key in ("model_sha256", "weights_sha256"):
        if not is_sha256_hex(data[key]):
            raise RoundManifestError(
                f"{key} must be 64 hex digits", field=key, expected="64 hex digits", found=data[key]
            )
    ints = {
        k: _int(data, k) for k in ("version", "round_number", "min_devices", "model_bytes", "weights_bytes")
    }
    times = {k: _time(data, k) for k in ("issued_at", "deadline", "expires_at")}
    if not times["issued_at"] <= times["deadline"] <= times["expires_at"]:
        raise RoundManifestError("times must satisfy issued_at <= deadline <= expires_at")
    try:
        codec = parse_codec(data["codec"]) if isinstance(data["codec"], str) else parse_codec("")
        model_manifest = manifest_from_json(canonical_json(data["model_manifest"]))
        norm = None if data["normalisation"] is None else Normalisation.from_dict(data["normalisation"])
    except (CodecError, FedgeError, ValueError) as exc:
        if isinstance(exc, FieldError):  # keep what the inner check knew about the field
            raise RoundManifestError(
                str(exc), field=exc.field, expected=exc.expected, found=exc.found
            ) from None
        raise RoundManifestError(str(exc)) from None
    if norm is not None and len(norm.mean) != model_manifest.task.input_dim:
        raise RoundManifestError(
            "normalisation length does not match the task's input",
            field="normalisation",
            expected=model_manifest.task.input_dim,
            found=len(norm.mean),
        )
    if ints["weights_bytes"] != weights_nbytes(model_manifest.parameter_count):
        raise RoundManifestError(
            "weights_bytes does not match the model's parameter count",
            field="weights_bytes",
            expected=weights_nbytes(model_manifest.parameter_count),
            found=ints["weights_bytes"],
        )
    # The model the round names must be the one its embedded manifest describes.
    for key, named, described in (
        ("model_sha256", data["model_sha256"], model_manifest.model_sha256),
        ("model_bytes", ints["model_bytes"], model_manifest.model_bytes),
    ):
        if named != described:
            raise RoundManifestError(
                "model_sha256/model_bytes differ from the embedded model manifest",
                field=key,
                expected=described,
                found=named,
            )
    if len(set(selected)) != len(selected):
        raise RoundManifestError("selected_devices lists a device twice", field="selected_devices")
    if data["phase"] != "final" and ints["min_devices"] > len(selected):
        raise RoundManifestError(
            "min_devices exceeds the number of selected devices",
            field="min_devices",
            expected=f"<= {len(selected)}",
            found=ints["min_devices"],
        )
    if data["phase"] == "train" and norm is None:
        raise RoundManifestError(
            "a train round needs a normalisation", field="normalisation", expected="an object", found=None
        )
    return RoundManifest(
        fleet=fleet,
        version=ints["version"],
        parent_sha256=parent,
        phase=data["phase"],
        round_number=ints["round_number"],
        round_id=round_id,
        issued_at=times["issued_at"],
        deadline=times["deadline"],
        expires_at=times["expires_at"],
        selected_devices=selected,
        min_devices=ints["min_devices"],
        codec=codec,
        model_sha256=data["model_sha256"],
        model_bytes=ints["model_bytes"],
        weights_sha256=data["weights_sha256"],
        weights_bytes=ints["weights_bytes"],
        model_manifest=model_manifest,
        normalisation=norm,
        generation=_generation(data),
        privacy=_privacy(data),
        secure_aggregation=_secure_aggregation(data),
        strategy=_strategy(data),
        topk_fraction=_topk_fraction(data, codec),
        aggregation=_aggregation(data),
    )


def _aggregation(data: dict[str, Any]) -> AsyncAggregation | None:
    """``aggregation``: absent for synchronous rounds; present, in a train round without secure
    aggregation (a masked sum needs a cohort, docs/async.md) and complete."""
    if "aggregation" not in data:
        return None
    if data["phase"] != "train" or "secure_aggregation" in data:
        raise RoundManifestError(
            "aggregation is only for train rounds without secure_aggregation",
            field="aggregation",
            expected="absent",
            found=data["phase"] if data["phase"] != "train" else "secure_aggregation",
        )
    return AsyncAggregation.from_dict(data["aggregation"])


def _topk_fraction(data: dict[str, Any], codec: Codec) -> float | None:
    """``topk_fraction``: present exactly with a sparse codec, in its range; and a sparse codec
    only in rounds without differential privacy or secure aggregation (the device's error
    feedback would escape the clip bound, and the masked sum needs dense vectors)."""
    value = data.get("topk_fraction")
    if codec.sparse and ("privacy" in data or "secure_aggregation" in data):
        raise RoundManifestError(
            f"codec {codec.value} cannot be used with privacy or secure_aggregation",
            field="codec",
            expected="a dense codec",
            found=codec.value,
        )
    if ("topk_fraction" in data) != codec.sparse:
        raise RoundManifestError(
            f"topk_fraction must be present exactly with a sparse codec (codec {codec.value})",
            field="topk_fraction",
            expected="a number" if codec.sparse else "absent",
            found=value,
        )
    try:
        return check_topk_fraction(codec, value)
    except CodecError as exc:
        raise RoundManifestError(str(exc), field=exc.field, expected=exc.expected, found=exc.found) from None


def _strategy(data: dict[str, Any]) -> StrategyAnnouncement | None:
    """``strategy``: absent for plain FedAvg and outside train rounds; present, a complete
    announcement (``fedge.protocol.strategy_announcement``)."""
    if "strategy" not in data:
        return None
    if data["phase"] != "train":
        raise RoundManifestError(
            "strategy is only for train rounds", field="strategy", expected="absent", found=data["phase"]
        )
    try:
        return StrategyAnnouncement.from_dict(data["strategy"])
    except StrategyAnnouncementError as exc:
        raise RoundManifestError(str(exc), field=exc.field, expected=exc.expected, found=exc.found) from None


def _secure_aggregation(data: dict[str, Any]) -> SecureAggregationAnnouncement | None:
    """``secure_aggregation``: absent unless the round is secure, and then in a train round only."""
    if "secure_aggregation" not in data:
        return None
    if data["phase"] != "train":
        raise RoundManifestError(
            "secure_aggregation is only for train rounds",
            field="secure_aggregation",
            expected="absent",
            found=data["phase"],
        )
    try:
        return SecureAggregationAnnouncement.from_dict(data["secure_aggregation"])
    except SecureAggregationAnnouncementError as exc:
        raise RoundManifestError(str(exc), field=exc.field, expected=exc.expected, found=exc.found) from None


def _privacy(data: dict[str, Any]) -> PrivacyAnnouncement | None:
    """``privacy``: absent when the fleet has no differential privacy; present, it must be a
    complete announcement (``fedge.protocol.privacy_announcement``)."""
    if "privacy" not in data:
        return None
    try:
        return PrivacyAnnouncement.from_dict(data["privacy"])
    except PrivacyAnnouncementError as exc:
        raise RoundManifestError(str(exc), field=exc.field, expected=exc.expected, found=exc.found) from None


def _generation(data: dict[str, Any]) -> int:
    """``generation``: absent is the first; present, it must say a later one (2 and up), so a
    manifest has exactly one document, and one hash, per content."""
    if "generation" not in data:
        return FIRST_GENERATION
    value = data["generation"]
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not FIRST_GENERATION < value <= MAX_GENERATION
    ):
        raise RoundManifestError(
            f"generation must be an integer in 2..{MAX_GENERATION} (absent: 1)",
            field="generation",
            expected=f"2..{MAX_GENERATION}",
            found=value,
        )
    return value


def _int(data: dict[str, Any], key: str) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise RoundManifestError(
            f"{key} must be a non-negative integer",
            field=key,
            expected="an integer in 0..2^63-1",
            found=value,
        )
    return value


def _time(data: dict[str, Any], key: str) -> float:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RoundManifestError(
            f"{key} must be a number (Unix seconds)", field=key, expected="Unix seconds", found=value
        )
    try:
        result = float(value)
    except OverflowError:
        raise RoundManifestError(
            f"{key} must be finite", field=key, expected="finite Unix seconds", found=value
        ) from None
    if not math.isfinite(result) or result < 0:
        raise RoundManifestError(
            f"{key} must be finite and >= 0", field=key, expected="finite Unix seconds >= 0", found=value
        )
    return result
