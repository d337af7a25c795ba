"""The rollout gate (``[rollout]``, ``docs/rollout.md``): a global model reaches the devices'
predictions only when it is not worse than the one they predict with now.

Federated learning itself is not gated: every round trains on the newest global model. What is
gated is the model devices *predict* with. A round's federated evaluation measures the weights
its manifest carried (the previous round's output), so candidate ``V`` (the weights of manifest
``V``) is judged when round ``V`` closes, from that round's evaluation reports:

- accuracy: promoted iff ``value >= promoted_value - margin`` (absolute points);
- mse: promoted iff ``value <= promoted_value * (1 + margin)`` (relative).

The first candidate with an evaluation (of a model generation) is promoted: there is nothing to
compare it with. A round without an evaluation (aborted, moments, secure aggregation, no device
evaluated) judges nothing. Every decision is signed (:mod:`fedge.protocol.rollout`) with the next
sequence number; ``fedge model rollback --to V`` asks for an explicit rollback to an earlier
promoted version whose weights are kept (the newest ``[rollout] keep``).

:class:`RolloutGate` is the pure core (state, time as an argument); :class:`Rollout` is its
shell in the aggregator service: the state file and the kept weights in
``<state_dir>/rollout/``, what to publish, the operator's request file.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nacl.signing import SigningKey

from fedge.protocol.config_source import ConfigError, Table
from fedge.protocol.digests import is_sha256_hex
from fedge.protocol.errors import FedgeError
from fedge.protocol.rollout import (
    RolloutDecision,
    RolloutError,
    sign_decision,
    sign_rollback_request,
    verify_rollback_request,
)
from fedge.protocol.signing import key_id
from fedge.protocol.topics import FleetTopics
from fedge.shell.files import atomic_write

if TYPE_CHECKING:
    from fedge.aggregator.rollout_validation import ValidationSet
    from fedge.aggregator.round_engine import Publication, RoundRecord
    from fedge.protocol.model_manifest import ModelManifest

log = logging.getLogger("fedge.aggregator.rollout")

ROLLOUT_KEYS = {"gate", "margin", "keep", "validation_file"}
#: Where the gate keeps its state and the promoted weights, under ``[aggregator] state_dir``.
ROLLOUT_DIR = "rollout"
STATE_FILE = "state.json"
#: Written by ``fedge model rollback`` (signed), read and removed by the running aggregator.
REQUEST_FILE = "rollback-request.bin"
MAX_STATE_BYTES = 1 << 20


@dataclass(frozen=True)
class RolloutSettings:
    #: On by default: a building operator expects a fleet never to swap the model its
    #: predictions come from for a worse one; the cost is that predictions follow training one
    #: round late (a candidate is judged when the next round's evaluations arrive).
    gate: bool = True
    #: How much worse a candidate may be and still be promoted: accuracy points (0.01 = one
    #: point) or, for regression, a relative MSE increase (0.01 = 1 %). Fleets evaluate on
    #: different devices each round, so 0 would refuse on noise.
    margin: float = 0.01
    #: Promoted versions whose weights are kept for ``fedge model rollback`` (bounded disk).
    keep: int = 5
    #: The operator's own labelled set (``.npz`` of ``x`` and ``y``,
    #: ``fedge.aggregator.rollout_validation``): candidates must not be worse there either.
    validation_file: Path | None = None


ROLLOUT_DEFAULT = RolloutSettings()


def rollout_settings_from_table(t: Table, base: Path = Path()) -> RolloutSettings:
    """``[rollout]``; ``validation_file`` relative to the config's directory ``base``."""
    validation = t.opt_text("validation_file")
    return RolloutSettings(
        gate=t.flag("gate", True),
        margin=t.number("margin", 0.01, 0.0, 1.0),
        keep=t.integer("keep", 5, 1, 100),
        validation_file=base / validation if validation else None,
    )


def not_worse(metric: str, value: float, promoted: float, margin: float) -> bool:
    """The gate's rule: whether a candidate scoring ``value`` may replace one scoring
    ``promoted`` (accuracy: higher is better, ``margin`` absolute; mse: lower is better,
    ``margin`` relative)."""
    if metric == "mse":
        return value <= promoted * (1.0 + margin)
    return value >= promoted - margin


@dataclass(frozen=True)
class Candidate:
    """The weights one manifest carried, as the gate judges them."""

    version: int
    round_id: str
    weights_sha256: str
    weights_bytes: int
    generation: int
    model_sha256: str
    value: float | None  # the federated evaluation in the task's metric; None: not evaluated
    validation: float | None = None  # on [rollout] validation_file; None: no such set


@dataclass(frozen=True)
class Promoted:
    version: int
    round_id: str
    weights_sha256: str
    weights_bytes: int
    generation: int
    model_sha256: str
    value: float | None
    validation: float | None = None


@dataclass
class GateState:
    """Everything the gate keeps across restarts (``state.json``)."""

    sequence: int = 0
    promoted: Promoted | None = None
    #: Promoted versions, newest last (at most ``keep``): what a rollback may go back to.
    history: list[Promoted] = field(default_factory=list)
    promotions: int = 0
    refusals: int = 0
    rollbacks: int = 0
    last_decision: dict[str, Any] | None = None
    #: The signed frames on ``rollout`` and ``rollout/decision`` (base64), republished as they are.
    serving_frame: str | None = None
    decision_frame: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> GateState:
        def promoted(value: Any) -> Promoted | None:
            return None if value is None else Promoted(**value)

        return cls(
            sequence=int(doc["sequence"]),
            promoted=promoted(doc.get("promoted")),
            history=[p for p in (promoted(v) for v in doc.get("history", [])) if p is not None],
            promotions=int(doc.get("promotions", 0)),
            refusals=int(doc.get("refusals", 0)),
            rollbacks=int(doc.get("rollbacks", 0)),
            last_decision=doc.get("last_decision"),
            serving_frame=doc.get("serving_frame"),
            decision_frame=doc.get("decision_frame"),
        )


class RolloutGate:
    """The pure core: decides, numbers and records; the caller signs, stores and publishes."""

    def __init__(self, settings: RolloutSettings, fleet: str, metric: str, state: GateState) -> None:
        self.settings = settings
        self.fleet = fleet
        self.metric = metric
        self.state = state

    def judge(self, candidate: Candidate, now: float) -> RolloutDecision | None:
        """The decision on ``candidate``, or None when there is nothing to decide: no evaluation,
        or the very weights already promoted (an aborted round's retry carries them again)."""
        s = self.state
        if candidate.value is None and candidate.validation is None:
            return None
        current = s.promoted
        if current is not None and current.weights_sha256 == candidate.weights_sha256:
            return None
        comparable = (
            current is not None
            and current.generation == candidate.generation
            and current.model_sha256 == candidate.model_sha256
        )
        margin = self.settings.margin
        if not comparable:
            ok, why = True, "the first evaluated model of its generation"
        else:
            assert current is not None
            pairs = [
                (label, value, reference)
                for label, value, reference in (
                    ("", candidate.value, current.value),
                    ("validation ", candidate.validation, current.validation),
                )
                if value is not None and reference is not None
            ]
            if not pairs:
                return None  # no evaluation both were judged by (e.g. validation set added since)
            verdicts = [not_worse(self.metric, value, reference, margin) for _, value, reference in pairs]
            ok = all(verdicts)
            op = "<=" if self.metric == "mse" else ">="
            why = "; ".join(
                f"{label}{self.metric} {value:.4g} {op if good else 'not ' + op} "
                f"{reference * (1 + margin) if self.metric == 'mse' else reference - margin:.4g} "
                f"(v{current.version}'s {reference:.4g}, margin {margin:g})"
                for (label, value, reference), good in zip(pairs, verdicts, strict=True)
            )
        if ok:
            promoted = Promoted(
                candidate.version,
                candidate.round_id,
                candidate.weights_sha256,
                candidate.weights_bytes,
                candidate.generation,
                candidate.model_sha256,
                candidate.value,
                candidate.validation,
            )
            return self._decide("promote", candidate, promoted, why, now)
        return self._decide("refuse", candidate, current, why, now)

    def rollback(self, to_version: int, generation: int, model_sha256: str, now: float) -> RolloutDecision:
        """An explicit rollback to an earlier promoted ``to_version`` of the running model;
        raises :class:`FedgeError` (one line naming what can be rolled back to) otherwise."""
        s = self.state
        target = next((p for p in reversed(s.history) if p.version == to_version), None)
        kept = ", ".join(f"v{p.version}" for p in s.history) or "none"
        if target is None:
            raise FedgeError(
                f"cannot roll back to v{to_version}: it is not one of the kept promoted versions ({kept}); "
                "raise [rollout] keep to keep more"
            )
        if target.generation != generation or target.model_sha256 != model_sha256:
            raise FedgeError(
                f"cannot roll back to v{to_version}: it belongs to model generation {target.generation}, "
                f"the fleet runs generation {generation}"
            )
        if s.promoted is not None and s.promoted.version == to_version:
            raise FedgeError(f"v{to_version} is already the promoted version: nothing to roll back")
        return self._decide("rollback", target, target, "operator rollback", now)

    def _decide(
        self, action: str, judged: Candidate | Promoted, promoted: Promoted | None, why: str, now: float
    ) -> RolloutDecision:
        s = self.state
        previous = s.promoted
        s.sequence += 1
        if action in ("promote", "rollback"):
            assert promoted is not None
            s.promoted = promoted
            s.history = [p for p in s.history if p.version != promoted.version] + [promoted]
            s.history = s.history[-self.settings.keep :]
            if action == "promote":
                s.promotions += 1
            else:
                s.rollbacks += 1
        else:
            s.refusals += 1
        ref = s.promoted
        decision = RolloutDecision(
            fleet=self.fleet,
            sequence=s.sequence,
            action=action,
            generation=promoted.generation if promoted is not None else 1,
            model_sha256=(promoted.model_sha256 if promoted is not None else "0" * 64),
            metric=self.metric,
            version=judged.version,
            value=judged.value,
            validation=judged.validation,
            margin=self.settings.margin,
            promoted_version=ref.version if ref else None,
            promoted_round_id=ref.round_id if ref else None,
            promoted_value=ref.value if ref else None,
            promoted_validation=ref.validation if ref else None,
            weights_sha256=ref.weights_sha256 if ref else None,
            weights_bytes=ref.weights_bytes if ref else None,
            previous_version=previous.version if previous else None,
            issued_at=now,
            reason=why,
        )
        s.last_decision = decision.to_dict()
        return decision

    def status(self, candidate: int | None) -> dict[str, Any]:
        """``rollout`` in the aggregator status."""
        s, p = self.state, self.state.promoted
        return {
            "gate": self.settings.gate,
            "margin": self.settings.margin,
            "metric": self.metric,
            "promoted_version": p.version if p else None,
            "promoted_value": p.value if p else None,
            "promoted_validation": p.validation if p else None,
            "candidate": candidate,
            "sequence": s.sequence,
            "promoted": s.promotions,
            "refused": s.refusals,
            "rolled_back": s.rollbacks,
            "kept_versions": [h.version for h in s.history],
            "last_decision": _decision_summary(s.last_decision),
        }


def _decision_summary(doc: dict[str, Any] | None) -> dict[str, Any] | None:
    if doc is None:
        return None
    keys = (
        "sequence",
        "action",
        "version",
        "value",
        "promoted_version",
        "previous_version",
        "issued_at",
        "reason",
    )
    return {k: doc.get(k) for k in keys}


@dataclass(frozen=True)
class RolloutPublication:
    """``(topic, payload)`` pairs to publish retained, in order (an empty payload clears)."""

    items: tuple[tuple[str, bytes], ...]


class Rollout:
    """The gate in the aggregator service: its files, its signatures, what it publishes."""

    def __init__(
        self,
        settings: RolloutSettings,
        state_dir: Path,
        topics: FleetTopics,
        key: SigningKey,
        metric: str,
        model: tuple[bytes, ModelManifest] | None = None,
    ) -> None:
        """``model``: the fleet's model and manifest, which score ``[rollout] validation_file``
        (a bad file is a :class:`ConfigError` here, at start)."""
        self.settings = settings
        self.dir = state_dir / ROLLOUT_DIR
        self.topics = topics
        self.key = key
        self.gate = RolloutGate(settings, topics.fleet, metric, self._load())
        self.request_errors = 0
        self.validation: ValidationSet | None = None
        if settings.gate and settings.validation_file is not None and model is not None:
            from fedge.aggregator.rollout_validation import ValidationSet  # noqa: PLC0415 - an interpreter

            self.validation = ValidationSet(settings.validation_file, *model)
            log.info(
                "rollout: candidates are also judged on %d examples of %s",
                self.validation.size,
                settings.validation_file,
            )

    @property
    def enabled(self) -> bool:
        return self.settings.gate

    # --- files -----------------------------------------------------------------------------

    def _load(self) -> GateState:
        path = self.dir / STATE_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return GateState()
        try:
            if len(raw) > MAX_STATE_BYTES:
                raise ValueError(f"over {MAX_STATE_BYTES} bytes")
            return GateState.from_dict(json.loads(raw))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"the rollout state {path} is unreadable ({exc}); move it aside to start the gate afresh "
                "(devices then refuse decisions until the new sequence passes theirs)"
            ) from None

    def _save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        data = json.dumps(self.gate.state.to_dict(), sort_keys=True).encode()
        atomic_write(self.dir / STATE_FILE, data)

    def _weights_path(self, sha: str) -> Path:
        return self.dir / f"weights-{sha}.bin"

    def weights(self, sha: str) -> bytes | None:
        try:
            data = self._weights_path(sha).read_bytes()
        except OSError:
            return None
        return data if hashlib.sha256(data).hexdigest() == sha else None

    def _keep_weights(self, sha: str, data: bytes) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self._weights_path(sha)
        if not path.exists():
            atomic_write(path, data)
        kept = {p.weights_sha256 for p in self.gate.state.history}
        for old in self.dir.glob("weights-*.bin"):
            sha_of = old.name[len("weights-") : -len(".bin")]
            if is_sha256_hex(sha_of) and sha_of not in kept:
                old.unlink(missing_ok=True)

    # --- the shell's steps -----------------------------------------------------------------

    def kept_blob_topic(self) -> str | None:
        """The promoted weights' blob topic: never cleared while it is promoted."""
        p = self.gate.state.promoted
        return self.topics.blob(p.weights_sha256) if self.enabled and p is not None else None

    def judge(
        self, candidate: Candidate, weights: bytes | None, published_sha: str | None, now: float
    ) -> RolloutPublication | None:
        """Judges the candidate whose weights the closed round's manifest carried; returns what
        to publish after the next manifest (None: nothing decided). ``weights``: the candidate's
        blob (kept for rollbacks; without it nothing is promoted)."""
        if not self.enabled:
            return None
        if weights is None or hashlib.sha256(weights).hexdigest() != candidate.weights_sha256:
            return None
        before = self.gate.state.promoted
        snapshot = self._snapshot()
        try:
            decision = self.gate.judge(candidate, now)
            if decision is None:
                return None
            if decision.action == "promote":
                self._keep_weights(candidate.weights_sha256, weights)
            published = self._signed(decision, before, published_sha, weights if decision.serving else None)
        except OSError as exc:  # a full or read-only state_dir: no decision rather than no aggregator
            self.gate.state = snapshot
            log.error(
                "rollout: cannot write %s (%s): candidate v%d is not judged and predictions stay on v%s; "
                "free or fix [aggregator] state_dir",
                self.dir,
                exc,
                candidate.version,
                before.version if before else "(newest)",
            )
            return None
        log.info(
            "rollout: %s v%d (%s); devices predict with v%s",
            "promoted" if decision.action == "promote" else "refused",
            decision.version,
            decision.reason,
            decision.promoted_version,
        )
        return published

    def _snapshot(self) -> GateState:
        return GateState.from_dict(json.loads(json.dumps(self.gate.state.to_dict())))

    def judge_round(
        self, record: RoundRecord, last: Publication | None, published_sha: str | None, now: float
    ) -> RolloutPublication | None:
        """Judges the weights of the manifest ``record``'s round was announced with (``last``, the
        service's newest publication): its federated evaluation is the round's."""
        if not self.enabled or last is None or last.manifest.version != record.version:
            return None
        m = last.manifest
        value = record.fed_eval_mse if record.fed_eval_metric == "mse" else record.fed_eval_accuracy
        if record.outcome != "aggregated" or record.phase != "train" or record.fed_eval_examples <= 0:
            value = None  # an aborted round's few reports, a moments round: nothing to judge on
        if record.phase != "train":
            return None
        weights = last.blobs.get(self.topics.blob(m.weights_sha256))
        validation = None
        if self.validation is not None and weights is not None:
            try:
                validation = self.validation.evaluate(weights, m.normalisation)
            except Exception as exc:  # the model cannot score the set: judged on the fleet alone
                log.error("rollout: v%d could not be scored on the validation set: %s", m.version, exc)
        candidate = Candidate(
            m.version,
            m.round_id,
            m.weights_sha256,
            m.weights_bytes,
            m.generation,
            m.model_sha256,
            value,
            validation,
        )
        return self.judge(candidate, weights, published_sha, now)

    def rollback(
        self, to_version: int, generation: int, model_sha256: str, published_sha: str | None, now: float
    ) -> RolloutPublication:
        before = self.gate.state.promoted
        snapshot = self._snapshot()
        decision = self.gate.rollback(to_version, generation, model_sha256, now)
        assert decision.weights_sha256 is not None
        weights = self.weights(decision.weights_sha256)
        if weights is None:
            self.gate.state = snapshot
            raise FedgeError(f"cannot roll back to v{to_version}: its kept weights are missing or damaged")
        log.warning("rollout: operator rollback to v%d (was v%s)", to_version, decision.previous_version)
        return self._signed(decision, before, published_sha, weights)

    def _signed(
        self,
        decision: RolloutDecision,
        before: Promoted | None,
        published_sha: str | None,
        weights: bytes | None,
    ) -> RolloutPublication:
        frame = sign_decision(decision, self.key)
        s = self.gate.state
        s.decision_frame = base64.b64encode(frame).decode()
        items: list[tuple[str, bytes]] = []
        if decision.serving:
            assert decision.weights_sha256 is not None and weights is not None
            s.serving_frame = s.decision_frame
            items.append((self.topics.blob(decision.weights_sha256), weights))
            items.append((self.topics.rollout, frame))
            old = before.weights_sha256 if before is not None else None
            if old is not None and old not in (decision.weights_sha256, published_sha):
                items.append((self.topics.blob(old), b""))
        items.append((self.topics.rollout_decision, frame))
        self._save()  # before anything is published: a restart never reuses a sequence number
        return RolloutPublication(tuple(items))

    def retained(self) -> RolloutPublication:
        """At start (after winning the lease, with the state re-read from ``state_dir``) and
        after a reconnect: the promoted weights and both documents again, byte for byte. With
        the gate off, both topics are cleared: a device that still held a promotion from when it
        was on goes back to predicting with the newest model."""
        if not self.enabled:
            return RolloutPublication(((self.topics.rollout, b""), (self.topics.rollout_decision, b"")))
        try:  # a replica that just won the lease: the state the previous leader left
            self.gate.state = self._load()
        except ConfigError as exc:
            log.error("rollout: %s; going on with the state this process had", exc)
        s = self.gate.state
        items: list[tuple[str, bytes]] = []
        p = s.promoted
        if self.enabled and p is not None and s.serving_frame is not None:
            weights = self.weights(p.weights_sha256)
            if weights is not None:
                items.append((self.topics.blob(p.weights_sha256), weights))
            items.append((self.topics.rollout, base64.b64decode(s.serving_frame)))
        if self.enabled and s.decision_frame is not None:
            items.append((self.topics.rollout_decision, base64.b64decode(s.decision_frame)))
        return RolloutPublication(tuple(items))

    def take_request(
        self, generation: int, model_sha256: str, published_sha: str | None, now: float
    ) -> RolloutPublication | None:
        """The operator's signed rollback request, if ``fedge model rollback`` left one: carried out
        (or refused, logged) and removed. Never raises."""
        path = self.dir / REQUEST_FILE
        if not path.exists():
            return None
        try:
            frame = path.read_bytes()
            path.unlink(missing_ok=True)
            trusted = {key_id(self.key.verify_key): self.key.verify_key}
            to_version, _ = verify_rollback_request(frame, trusted, self.topics.fleet)
            if not self.enabled:
                raise FedgeError(
                    "[rollout] gate is off: devices predict with the newest model, nothing to roll back"
                )
            return self.rollback(to_version, generation, model_sha256, published_sha, now)
        except (OSError, RolloutError, FedgeError) as exc:
            self.request_errors += 1
            self.gate.state.last_decision = {
                "action": "rollback_refused",
                "reason": str(exc),
                "issued_at": now,
            }
            log.error("rollout: the rollback request in %s was refused: %s", path, exc)
            with contextlib.suppress(OSError):
                self._save()  # so `fedge model rollback` can say why
            return None

    def status(self, candidate: int | None) -> dict[str, Any]:
        """``rollout`` in the aggregator status; ``candidate``: the version the open train round
        evaluates (None: none)."""
        return self.gate.status(candidate if self.enabled else None) | {
            "request_errors": self.request_errors,
            "validation_examples": self.validation.size if self.validation is not None else None,
        }


# --- the operator's command (``fedge model rollback``) ---------------------------------------------


def read_gate_state(state_dir: Path) -> GateState | None:
    """The gate's saved state, or None before its first decision (read-only, for the CLI)."""
    path = state_dir / ROLLOUT_DIR / STATE_FILE
    try:
        return GateState.from_dict(json.loads(path.read_bytes()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FedgeError(f"cannot read the rollout state {path}: {exc}") from None


def request_rollback(
    state_dir: Path, fleet: str, key: SigningKey, to_version: int, wait_s: float, now: float
) -> dict[str, Any]:
    """Leaves a signed rollback request for the running aggregator and waits up to ``wait_s``
    for its decision; returns the decision's summary. Raises :class:`FedgeError` (one line with
    the fix) when the version cannot be rolled back to, the aggregator refused it, or it did not
    answer in time (the request then stays and is carried out when it runs)."""
    state = read_gate_state(state_dir)
    kept = [p.version for p in state.history] if state is not None else []
    if to_version not in kept:
        raise FedgeError(
            f"cannot roll back to v{to_version}: the kept promoted versions are "
            f"{', '.join(f'v{v}' for v in kept) or 'none'} (aggregator/status rollout.kept_versions)"
        )
    assert state is not None
    if state.promoted is not None and state.promoted.version == to_version:
        raise FedgeError(f"v{to_version} is already the promoted version: nothing to roll back")
    directory = state_dir / ROLLOUT_DIR
    atomic_write(directory / REQUEST_FILE, sign_rollback_request(fleet, to_version, now, key))
    deadline = time.monotonic() + wait_s
    while True:
        latest = read_gate_state(state_dir)
        last = latest.last_decision if latest is not None else None
        if last is not None and float(last.get("issued_at") or 0) >= now:
            if last.get("action") == "rollback" and last.get("version") == to_version:
                summary = _decision_summary(last)
                assert summary is not None
                return summary
            if last.get("action") == "rollback_refused":
                raise FedgeError(f"the aggregator refused the rollback: {last.get('reason')}")
        if time.monotonic() >= deadline:
            raise FedgeError(
                f"no answer from the aggregator within {wait_s:g} s: the request waits in "
                f"{directory / REQUEST_FILE} and is carried out when the aggregator (leader) runs; "
                "check it is running with this state_dir"
            )
        time.sleep(0.2)
