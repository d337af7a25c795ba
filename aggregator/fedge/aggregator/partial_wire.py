"""The leader's and workers' documents on the broker (``[replicas]``, docs/scale.md).

- **Work order** (leader -> workers, retained on ``aggregator/work``, signed): the open round's
  manifest and the limits it folds with (the norm bounds, the weight and claim caps, which the
  leader derives from its checkpointed history), so every worker builds the same folds.
- **Partial** (worker -> leader, ``aggregator/partial/{worker}``): a
  :class:`~fedge.aggregator.partials.Partial`, sealed with a key derived from the aggregator's
  box key (a partial of one update is one device's update: the broker must not read it) and
  signed with the aggregator's signing key, so only a holder of both keys can hand the leader
  a partial.
- **Verdict** (leader -> worker, ``aggregator/verdict/{worker}``, signed): the partial was
  ``accepted`` (the worker acknowledges its updates to the broker only now), ``conflict`` (it
  names devices the round counted already: the worker folds the batch again without them and
  resends) or ``refused`` (the round is over or the partial is not this round's).

Every decoder bounds the size before it parses, checks every field's type and range, and raises
:class:`PartialWireError` with a reason the caller counts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from nacl.encoding import RawEncoder
from nacl.exceptions import CryptoError
from nacl.hash import blake2b
from nacl.public import PrivateKey
from nacl.secret import SecretBox
from nacl.signing import SigningKey, VerifyKey

from fedge.aggregator.partials import METRIC_NAMES, MeanPart, MomentRow, Partial
from fedge.aggregator.strategies.clipping import NormBounds
from fedge.aggregator.strategies.factory import RoundLimits
from fedge.protocol.bounded_json import BoundedJsonError, loads_bounded
from fedge.protocol.errors import FedgeError
from fedge.protocol.round_manifest import RoundManifest, round_manifest_from_dict
from fedge.protocol.signing import (
    DocType,
    SignatureError,
    canonical_json,
    key_id,
    sign_document,
    verify_document,
)
from fedge.protocol.topics import TopicError, check_id

__all__ = [
    "VERDICTS",
    "PartialWireError",
    "Verdict",
    "WorkOrder",
    "decode_partial",
    "decode_verdict",
    "decode_work_order",
    "encode_partial",
    "encode_verdict",
    "encode_work_order",
    "partial_key",
    "partial_max_bytes",
]

VERDICTS = ("accepted", "conflict", "refused")
#: The settings a worker must share with the leader to fold the same way (compared, not trusted).
FOLD_SETTINGS = ("strategy", "weighting", "update_norm_policy", "max_examples_per_update")
_MAX_DOC_BYTES = 4 * 1024 * 1024  # a work order holds the manifest: 115 KB at 10,000 devices
_MAX_COUNTER = 2**63 - 1


class PartialWireError(FedgeError):
    """A work order, partial or verdict that is malformed, forged or not for this fleet."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def partial_key(box_key: PrivateKey) -> SecretBox:
    """The key partials are sealed with: derived from the aggregator's box key, which the leader
    and every worker hold (devices' updates are sealed to it too)."""
    key = blake2b(bytes(box_key), digest_size=32, person=b"fedge-partial-v1", encoder=RawEncoder)
    return SecretBox(key)


def _b64(array: npt.NDArray[np.float64]) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f8").tobytes()).decode("ascii")


def _unb64(value: Any, length: int, what: str) -> npt.NDArray[np.float64]:
    if not isinstance(value, str) or len(value) > 4 * (8 * length + 2) // 3 + 4:
        raise PartialWireError("bad_partial", f"{what} must be base64 of {length} float64")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise PartialWireError("bad_partial", f"{what} is not base64") from None
    if len(raw) != 8 * length:
        raise PartialWireError("bad_partial", f"{what} has {len(raw)} bytes, not {8 * length}")
    array = np.frombuffer(raw, dtype="<f8").astype(np.float64)
    if not np.all(np.isfinite(array)):
        raise PartialWireError("bad_partial", f"{what} holds NaN or infinity")
    return array


def _int(doc: Mapping[str, Any], key: str, low: int = 0, high: int = _MAX_COUNTER) -> int:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise PartialWireError("bad_partial", f"{key} must be an integer in {low}..{high}")
    return value


def _float(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
        raise PartialWireError("bad_partial", f"{what} must be a finite number")
    return float(value)


def _opt_float(value: Any, what: str) -> float | None:
    return None if value is None else _float(value, what)


def _id(value: Any, what: str) -> str:
    try:
        return check_id(value, what)
    except TopicError as exc:
        raise PartialWireError("bad_partial", str(exc)) from None


def _counters(value: Any, what: str, limit: int) -> dict[str, int]:
    if not isinstance(value, dict) or len(value) > limit:
        raise PartialWireError("bad_partial", f"{what} must be an object of at most {limit} devices")
    return {_id(device, "device id"): _int(value, device) for device in value}


# --- work order ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkOrder:
    """The open round as every worker folds it."""

    manifest: RoundManifest
    limits: RoundLimits
    #: ``FOLD_SETTINGS`` as the leader has them: a worker configured otherwise refuses to fold.
    settings: dict[str, Any]

    @property
    def round_id(self) -> str:
        return self.manifest.round_id


def encode_work_order(order: WorkOrder, signing_key: SigningKey) -> bytes:
    limits = order.limits
    doc = {
        "manifest": order.manifest.to_dict(),
        "manifest_sha256": order.manifest.sha256(),
        "bounds": {"hard": limits.bounds.hard, "clip": limits.bounds.clip},
        "weight_cap": limits.weight_cap,
        "claim_cap": limits.claim_cap,
        "settings": dict(order.settings),
    }
    return sign_document(DocType.AGGREGATOR_WORK, doc, signing_key)


def decode_work_order(data: bytes, verify_key: VerifyKey, fleet: str) -> WorkOrder:
    doc = _verified(data, DocType.AGGREGATOR_WORK, verify_key, _MAX_DOC_BYTES)
    try:
        manifest = round_manifest_from_dict(doc.get("manifest"))
    except FedgeError as exc:
        raise PartialWireError("bad_work_order", f"manifest: {exc}") from None
    if manifest.fleet != fleet:
        raise PartialWireError("wrong_fleet", f"a work order of fleet {manifest.fleet!r}, not {fleet!r}")
    if doc.get("manifest_sha256") != manifest.sha256():
        raise PartialWireError("bad_work_order", "manifest_sha256 does not match the manifest")
    bounds = doc.get("bounds")
    settings = doc.get("settings")
    if not isinstance(bounds, dict) or not isinstance(settings, dict) or set(settings) != set(FOLD_SETTINGS):
        raise PartialWireError("bad_work_order", "bounds and settings must be objects of the known keys")
    limits = RoundLimits(
        bounds=NormBounds(
            hard=_opt_float(bounds.get("hard"), "hard"), clip=_opt_float(bounds.get("clip"), "clip")
        ),
        weight_cap=_opt_float(doc.get("weight_cap"), "weight_cap"),
        claim_cap=_opt_float(doc.get("claim_cap"), "claim_cap"),
    )
    return WorkOrder(manifest, limits, settings)


# --- partial ---------------------------------------------------------------------------------


def partial_max_bytes(parameter_count: int, n_features: int, max_devices: int) -> int:
    """The largest partial a worker of this model can send: the sum, every device's moment
    row, base64 inside base64 (about 16/9 of the raw bytes), and 1 MiB for the rest."""
    raw = 8 * (parameter_count + 2 * n_features * max_devices)
    return 1024 * 1024 + 2 * raw + 200 * max_devices


def encode_partial(partial: Partial, box: SecretBox, signing_key: SigningKey) -> bytes:
    p = partial
    inner = {
        "fleet": p.fleet,
        "round_id": p.round_id,
        "version": p.version,
        "worker": p.worker,
        "batch": p.batch,
        "accepted": p.accepted,
        "spent": p.spent,
        "rejected": p.rejected,
        "update_bytes": p.update_bytes,
        "delta_sum": None if p.delta_sum is None else _b64(p.delta_sum),
        "updates": p.updates,
        "examples": p.examples,
        "total_weight": p.total_weight,
        "metrics": {k: [m.weighted_sum, m.total_weight, m.count] for k, m in p.metrics.items()},
        "claimed_examples": p.claimed_examples,
        "raw_norms": list(p.raw_norms),
        "clipped": p.clipped,
        "claims": list(p.claims),
        "moment_rows": [[r.device, r.count, _b64(r.sums), _b64(r.sums_sq)] for r in p.moment_rows],
    }
    sealed = box.encrypt(canonical_json(inner))
    outer = {
        "fleet": p.fleet,
        "worker": p.worker,
        "round_id": p.round_id,
        "batch": p.batch,
        "sealed": base64.b64encode(bytes(sealed)).decode("ascii"),
    }
    return sign_document(DocType.AGGREGATOR_PARTIAL, outer, signing_key)


def decode_partial(
    data: bytes,
    box: SecretBox,
    verify_key: VerifyKey,
    fleet: str,
    worker: str,
    parameter_count: int,
    n_features: int,
    max_devices: int,
) -> Partial:
    """The partial ``worker`` sent (the topic names the worker; the signed document must agree)."""
    limit = partial_max_bytes(parameter_count, n_features, max_devices)
    if len(data) > limit:
        raise PartialWireError("too_large", f"{len(data)} bytes > {limit}")
    outer = _verified(data, DocType.AGGREGATOR_PARTIAL, verify_key, limit)
    if outer.get("fleet") != fleet:
        raise PartialWireError("wrong_fleet", f"a partial of fleet {outer.get('fleet')!r}")
    if outer.get("worker") != worker:
        raise PartialWireError(
            "worker_mismatch", f"signed for worker {outer.get('worker')!r}, sent as {worker!r}"
        )
    sealed = outer.get("sealed")
    try:
        plain = box.decrypt(base64.b64decode(sealed, validate=True)) if isinstance(sealed, str) else None
    except (binascii.Error, ValueError, CryptoError):
        plain = None
    if plain is None:
        raise PartialWireError("bad_seal", "the partial does not open with this aggregator's key")
    try:
        doc = loads_bounded(plain, max_bytes=limit, max_depth=4)
    except BoundedJsonError as exc:
        raise PartialWireError("bad_partial", str(exc)) from None
    if not isinstance(doc, dict):
        raise PartialWireError("bad_partial", "a partial must be a JSON object")
    for key in ("fleet", "worker", "round_id", "batch"):
        if doc.get(key) != outer.get(key):
            raise PartialWireError("bad_partial", f"the sealed {key} differs from the signed one")
    updates = _int(doc, "updates", 0, max_devices)
    metrics: dict[str, MeanPart] = {}
    raw_metrics = doc.get("metrics")
    if not isinstance(raw_metrics, dict) or not set(raw_metrics) <= set(METRIC_NAMES):
        raise PartialWireError("bad_partial", f"metrics must be an object of {', '.join(METRIC_NAMES)}")
    for name, value in raw_metrics.items():
        if not isinstance(value, list) or len(value) != 3:
            raise PartialWireError(
                "bad_partial", f"metric {name} must be [weighted_sum, total_weight, count]"
            )
        count = value[2]
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= max_devices:
            raise PartialWireError("bad_partial", f"metric {name}'s count is out of range")
        metrics[name] = MeanPart(_float(value[0], name), _float(value[1], name), count)
    rows = doc.get("moment_rows")
    norms = doc.get("raw_norms")
    claims = doc.get("claims")
    if (
        not (isinstance(rows, list) and isinstance(norms, list) and isinstance(claims, list))
        or max(len(rows), len(norms), len(claims)) > max_devices
    ):
        raise PartialWireError("bad_partial", f"moment_rows, raw_norms and claims: lists of <= {max_devices}")
    moment_rows = []
    for row in rows:
        if not isinstance(row, list) or len(row) != 4:
            raise PartialWireError("bad_partial", "a moment row is [device, count, sums, sums_sq]")
        count = row[1]
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise PartialWireError("bad_partial", "a moment row's count must be an integer >= 1")
        sums, sums_sq = _unb64(row[2], n_features, "sums"), _unb64(row[3], n_features, "sums_sq")
        moment_rows.append(MomentRow(_id(row[0], "device id"), count, sums, sums_sq))
    for claim in claims:
        if isinstance(claim, bool) or not isinstance(claim, int) or claim < 0:
            raise PartialWireError("bad_partial", "claims must be integers >= 0")
    rejected = doc.get("rejected")
    if not isinstance(rejected, dict) or len(rejected) > 64:
        raise PartialWireError("bad_partial", "rejected must be an object of at most 64 reasons")
    delta = doc.get("delta_sum")
    return Partial(
        fleet=fleet,
        round_id=_text(doc, "round_id"),
        version=_int(doc, "version", 1),
        worker=worker,
        batch=_int(doc, "batch", 1),
        accepted=_counters(doc.get("accepted"), "accepted", max_devices),
        spent=_counters(doc.get("spent"), "spent", max_devices),
        rejected={_text({"r": r}, "r"): _int(rejected, r, 0, 2**31) for r in rejected},
        update_bytes=_int(doc, "update_bytes"),
        delta_sum=None if delta is None else _unb64(delta, parameter_count, "delta_sum"),
        updates=updates,
        examples=_int(doc, "examples"),
        total_weight=_float(doc.get("total_weight"), "total_weight"),
        metrics=metrics,
        claimed_examples=_int(doc, "claimed_examples"),
        raw_norms=tuple(_float(n, "a raw norm") for n in norms),
        clipped=_int(doc, "clipped", 0, max_devices),
        claims=tuple(claims),
        moment_rows=tuple(moment_rows),
    )


def _text(doc: Mapping[str, Any], key: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= 128:
        raise PartialWireError("bad_partial", f"{key} must be a string of 1-128 characters")
    return value


# --- verdict ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """The leader's answer to one partial."""

    fleet: str
    round_id: str
    worker: str
    batch: int
    outcome: str
    #: ``conflict``: devices the round counted already (from another worker, or the leader).
    conflicts: tuple[str, ...] = ()
    #: ``refused``: why (e.g. ``round_closed``, ``wrong_round``, ``bad_partial``).
    reason: str = ""


def encode_verdict(verdict: Verdict, signing_key: SigningKey) -> bytes:
    v = verdict
    doc = {
        "fleet": v.fleet,
        "round_id": v.round_id,
        "worker": v.worker,
        "batch": v.batch,
        "outcome": v.outcome,
        "conflicts": list(v.conflicts),
        "reason": v.reason,
    }
    return sign_document(DocType.PARTIAL_VERDICT, doc, signing_key)


def decode_verdict(data: bytes, verify_key: VerifyKey, fleet: str, worker: str) -> Verdict:
    doc = _verified(data, DocType.PARTIAL_VERDICT, verify_key, _MAX_DOC_BYTES)
    if doc.get("fleet") != fleet or doc.get("worker") != worker:
        raise PartialWireError("wrong_worker", f"a verdict for {doc.get('fleet')!r}/{doc.get('worker')!r}")
    outcome = doc.get("outcome")
    conflicts = doc.get("conflicts")
    reason = doc.get("reason")
    if outcome not in VERDICTS or not isinstance(conflicts, list) or not isinstance(reason, str):
        raise PartialWireError("bad_verdict", f"outcome must be one of {', '.join(VERDICTS)}")
    return Verdict(
        fleet=fleet,
        round_id=_text(doc, "round_id"),
        worker=worker,
        batch=_int(doc, "batch", 1),
        outcome=outcome,
        conflicts=tuple(_id(d, "device id") for d in conflicts),
        reason=reason[:200],
    )


def _verified(data: bytes, doc_type: str, verify_key: VerifyKey, limit: int) -> dict[str, Any]:
    try:
        doc, _ = verify_document(data, doc_type, {key_id(verify_key): verify_key}, limit)
    except SignatureError as exc:
        raise PartialWireError(f"signature_{exc.reason}", str(exc)) from None
    return doc


def digest(data: bytes) -> str:
    """A short name for a document in log lines."""
    return hashlib.sha256(data).hexdigest()[:12]
