"""The rollout gate's signed decisions (``docs/rollout.md``): which global model devices predict with.

Training follows the newest global model, whatever it is; predictions do not. The aggregator
judges every candidate (the weights a round's manifest carried) on the fleet's federated
evaluation, which arrives with the next round's updates, and *promotes* it only if it is not
worse than the promoted model by more than ``[rollout] margin``. Each decision is a signed
document of type :data:`ROLLOUT_DOC_TYPE`, signed with the aggregator's signing key (the key every
device already pins and follows through rotations):

- ``rollout`` (retained) holds the newest ``promote`` or ``rollback``: what devices predict with;
- ``rollout/decision`` (retained) holds the newest decision of any kind, ``refuse`` included:
  what an operator or a building-management system audits.

``sequence`` grows by one with every decision, so a device that accepted decision ``n`` refuses
any document numbered ``n`` or less (a replayed old promotion is counted, never applied), and an
operator's rollback to an earlier model is a *new* decision with the next number, which names the
older version explicitly (``action: "rollback"``): not a replay. Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from nacl.signing import SigningKey, VerifyKey

from fedge.protocol.digests import is_sha256_hex
from fedge.protocol.errors import ReasonError
from fedge.protocol.signing import SignatureError, sign_document, verify_document
from fedge.protocol.topics import check_id

#: The signed type of a rollout decision (part of the signed bytes: a manifest or a rotation
#: cannot be passed off as one).
ROLLOUT_DOC_TYPE = "model-rollout"
#: The signed type of the operator's rollback request (``fedge model rollback``), which the
#: aggregator reads from its state directory; never on the wire.
ROLLBACK_REQUEST_DOC_TYPE = "model-rollback-request"
#: A decision is well under 2 KiB; anything over this is not one of fedge's.
MAX_ROLLOUT_BYTES = 8192
#: ``promote``: the candidate is not worse than the promoted model (beyond the margin), or is the
#: first of its model generation; ``refuse``: it is worse, predictions stay where they were;
#: ``rollback``: the operator went back to an earlier promoted model.
ACTIONS = ("promote", "refuse", "rollback")
#: The actions that change what devices predict with (the ``rollout`` topic holds only these).
SERVING_ACTIONS = ("promote", "rollback")
METRICS = ("accuracy", "mse")


class RolloutError(ReasonError[str]):
    """A rollout document that is not valid (reason: ``bad_signature``, ``bad_document``, ...)."""


@dataclass(frozen=True)
class RolloutDecision:
    """One signed decision. ``version``: the candidate judged (``promote``/``refuse``) or the
    version rolled back to, ``value`` its federated evaluation and ``validation`` its score on the
    aggregator's validation set (None: not evaluated there); ``promoted_*``: what devices predict
    with after this decision (None only after a refusal while nothing was promoted yet);
    ``previous_version``: what was promoted before it."""

    fleet: str
    sequence: int
    action: str
    generation: int
    model_sha256: str
    metric: str
    version: int
    value: float | None
    validation: float | None
    margin: float
    promoted_version: int | None
    promoted_round_id: str | None
    promoted_value: float | None
    promoted_validation: float | None
    weights_sha256: str | None
    weights_bytes: int | None
    previous_version: int | None
    issued_at: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def serving(self) -> bool:
        """Whether devices predict with ``promoted_version`` because of this decision."""
        return self.action in SERVING_ACTIONS


def _int(doc: Mapping[str, Any], key: str, low: int, optional: bool = False) -> int | None:
    value = doc.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < 2**53:
        raise RolloutError("bad_document", f"{key} must be an integer >= {low}, not {value!r}")
    return value


def _float(doc: Mapping[str, Any], key: str, optional: bool = True) -> float | None:
    value = doc.get(key)
    if value is None and optional:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or value != value
        or abs(value) == float("inf")
    ):
        raise RolloutError("bad_document", f"{key} must be a finite number, not {value!r}")
    return float(value)


def _text(doc: Mapping[str, Any], key: str, optional: bool = False, limit: int = 512) -> str | None:
    value = doc.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise RolloutError("bad_document", f"{key} must be text of at most {limit} characters")
    return value


def decision_from_dict(doc: Mapping[str, Any]) -> RolloutDecision:
    """A :class:`RolloutDecision` from its JSON; refuses unknown or missing keys and bad values
    (:class:`RolloutError` ``bad_document``)."""
    expected = set(RolloutDecision.__dataclass_fields__)
    if set(doc) != expected:
        extra, missing = sorted(set(doc) - expected), sorted(expected - set(doc))
        raise RolloutError("bad_document", f"rollout decision keys: unknown {extra}, missing {missing}")
    action = doc["action"]
    if action not in ACTIONS:
        raise RolloutError("bad_document", f"action must be one of {ACTIONS}, not {action!r}")
    if doc["metric"] not in METRICS:
        raise RolloutError("bad_document", f"metric must be one of {METRICS}, not {doc['metric']!r}")
    fleet = _text(doc, "fleet")
    assert fleet is not None
    try:
        check_id(fleet, "fleet id")
    except Exception as exc:
        raise RolloutError("bad_document", str(exc)) from None
    model_sha = doc["model_sha256"]
    weights_sha = doc["weights_sha256"]
    if not is_sha256_hex(model_sha) or (weights_sha is not None and not is_sha256_hex(weights_sha)):
        raise RolloutError("bad_document", "model_sha256 and weights_sha256 must be SHA-256 hex digests")
    decision = RolloutDecision(
        fleet=fleet,
        sequence=_int(doc, "sequence", 1) or 0,
        action=action,
        generation=_int(doc, "generation", 1) or 0,
        model_sha256=model_sha,
        metric=doc["metric"],
        version=_int(doc, "version", 1) or 0,
        value=_float(doc, "value"),
        validation=_float(doc, "validation"),
        margin=_float(doc, "margin", optional=False) or 0.0,
        promoted_version=_int(doc, "promoted_version", 1, optional=True),
        promoted_round_id=_text(doc, "promoted_round_id", optional=True, limit=128),
        promoted_value=_float(doc, "promoted_value"),
        promoted_validation=_float(doc, "promoted_validation"),
        weights_sha256=weights_sha,
        weights_bytes=_int(doc, "weights_bytes", 1, optional=True),
        previous_version=_int(doc, "previous_version", 1, optional=True),
        issued_at=_float(doc, "issued_at", optional=False) or 0.0,
        reason=_text(doc, "reason") or "",
    )
    promoted = (decision.promoted_version, decision.weights_sha256, decision.weights_bytes)
    if decision.serving and None in promoted:
        raise RolloutError("bad_document", f"a {action} decision must name the promoted version and weights")
    if (decision.promoted_version is None) != (decision.weights_sha256 is None):
        raise RolloutError("bad_document", "promoted_version and weights_sha256 come together")
    return decision


def sign_decision(decision: RolloutDecision, key: SigningKey) -> bytes:
    return sign_document(ROLLOUT_DOC_TYPE, decision.to_dict(), key)


def verify_decision(frame: bytes, trusted: Mapping[str, VerifyKey], fleet: str) -> RolloutDecision:
    """The decision in ``frame`` if a trusted key signed it for ``fleet``; raises
    :class:`RolloutError` (the signature's reason, ``bad_document`` or ``wrong_fleet``)."""
    if len(frame) > MAX_ROLLOUT_BYTES:
        raise RolloutError("too_large", f"{len(frame)} bytes > {MAX_ROLLOUT_BYTES}")
    try:
        doc, _ = verify_document(bytes(frame), ROLLOUT_DOC_TYPE, trusted, MAX_ROLLOUT_BYTES)
    except SignatureError as exc:
        raise RolloutError(exc.reason, str(exc)) from None
    decision = decision_from_dict(doc)
    if decision.fleet != fleet:
        raise RolloutError("wrong_fleet", f"a decision for fleet {decision.fleet!r}, not {fleet!r}")
    return decision


def sign_rollback_request(fleet: str, to_version: int, requested_at: float, key: SigningKey) -> bytes:
    """The operator's request (``fedge model rollback``): signed with the aggregator's signing
    key, so only whoever holds that key can move the fleet's predictions."""
    return sign_document(
        ROLLBACK_REQUEST_DOC_TYPE,
        {"fleet": fleet, "to_version": to_version, "requested_at": requested_at},
        key,
    )


def verify_rollback_request(frame: bytes, trusted: Mapping[str, VerifyKey], fleet: str) -> tuple[int, float]:
    """``(to_version, requested_at)`` of a rollback request signed by a trusted key for ``fleet``."""
    try:
        doc, _ = verify_document(bytes(frame), ROLLBACK_REQUEST_DOC_TYPE, trusted, MAX_ROLLOUT_BYTES)
    except SignatureError as exc:
        raise RolloutError(exc.reason, str(exc)) from None
    if set(doc) != {"fleet", "to_version", "requested_at"} or doc["fleet"] != fleet:
        raise RolloutError("bad_document", f"not a rollback request for fleet {fleet!r}")
    version = _int(doc, "to_version", 1)
    at = _float(doc, "requested_at", optional=False)
    assert version is not None and at is not None
    return version, at
