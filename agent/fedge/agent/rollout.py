"""The device's side of the rollout gate (``docs/rollout.md``): which global weights predict.

The device trains on every verified global model, as always; its *predictions* use the weights
the aggregator promoted (the signed ``rollout`` document, :mod:`fedge.protocol.rollout`), once it
has one and has fetched those weights (the retained ``blob/{weights_sha256}``, checked by size and
SHA-256). Before the first promotion, or when the aggregator clears the topic (gate turned off),
predictions use the newest verified global model, as without the gate.

Replay protection: the newest accepted decision's ``sequence`` is kept in
``<state_dir>/rollout.json`` (written before the decision is acted on). A decision numbered
lower than that one is a replay (an old promotion republished by someone who recorded it): it
is refused and counted (``refused.replayed`` in the device status's ``rollout``); the same
decision again (a retained message after a reconnect) is nothing new. An operator's rollback is a
new decision with the next number, ``action: "rollback"``, naming the older version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nacl.signing import VerifyKey

from fedge.protocol.rollout import (
    MAX_ROLLOUT_BYTES,
    RolloutDecision,
    RolloutError,
    decision_from_dict,
    verify_decision,
)
from fedge.protocol.topics import FleetTopics
from fedge.shell.files import atomic_write

log = logging.getLogger("fedge.agent.rollout")

STATE_FILE = "rollout.json"
#: How often the device asks the broker again for promoted weights that have not come.
RESUBSCRIBE_S = 10.0

#: Called with the accepted decision and its verified weights (None, None: predict with the
#: newest global model again).
ApplyFn = Callable[[RolloutDecision | None, bytes | None], None]


class RolloutFollower:
    """Verifies rollout decisions, fetches the promoted weights, hands them to predictions.

    :meth:`offer` and :meth:`offer_blob` run in paho's thread under the service's lock (they only
    keep bytes); :meth:`turn` runs in the worker (verifies, persists, applies)."""

    def __init__(self, state_dir: Path, topics: FleetTopics, apply: ApplyFn) -> None:
        self.path = state_dir / STATE_FILE
        self.topics = topics
        self.apply = apply
        self.sequence = 0
        self.decision: RolloutDecision | None = None
        self.refused: dict[str, int] = {}
        self._pending: bytes | None = None
        self._weights: bytes | None = None
        self._applied = False
        self._asked_at = float("-inf")
        self._load()

    def _load(self) -> None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning(
                "rollout: cannot read %s (%s); predictions use the newest global model", self.path, exc
            )
            return
        try:
            doc = json.loads(raw)
            self.sequence = int(doc["sequence"])
            self.decision = decision_from_dict(doc["decision"]) if doc.get("decision") is not None else None
        except (ValueError, KeyError, TypeError, RolloutError) as exc:
            log.warning(
                "rollout: %s is unreadable (%s); the newest retained decision is accepted again",
                self.path,
                exc,
            )
            self.sequence, self.decision = 0, None

    def _save(self, decision: RolloutDecision) -> None:
        doc = {"sequence": decision.sequence, "decision": decision.to_dict()}
        atomic_write(self.path, json.dumps(doc, sort_keys=True).encode())

    # --- paho's thread ---------------------------------------------------------------------

    def offer(self, payload: bytes) -> tuple[str, str] | None:
        """A message on ``rollout``; ``(reason, detail)`` if it is dropped at once."""
        if len(payload) > MAX_ROLLOUT_BYTES:
            return "rollout_too_large", f"{len(payload)} bytes > {MAX_ROLLOUT_BYTES}"
        self._pending = payload  # only the newest matters; b"": the topic was cleared
        return None

    def wanted_blob(self) -> str | None:
        """The promoted weights' SHA-256 while they are still to come."""
        d = self.decision
        return d.weights_sha256 if d is not None and self._weights is None else None

    def offer_blob(self, sha: str, payload: bytes) -> bool:
        """Keeps the promoted weights if these are they (size and SHA-256); True if taken."""
        d = self.decision
        if d is None or sha != d.weights_sha256 or self._weights is not None:
            return False
        if len(payload) != d.weights_bytes or hashlib.sha256(payload).hexdigest() != sha:
            self._count("bad_weights")
            return False
        self._weights = payload
        return True

    # --- the worker ------------------------------------------------------------------------

    def next_turn_at(self, connected: bool) -> float | None:
        """When (``time.monotonic()``) :meth:`turn` has something to do by itself: asking the
        broker again for promoted weights that have not come (every :data:`RESUBSCRIBE_S`,
        while connected); None if nothing. A decision or the weights arriving wake the worker
        anyway (the service's ``_on_message``)."""
        if not connected or self.wanted_blob() is None:
            return None
        return self._asked_at + RESUBSCRIBE_S

    def turn(
        self,
        trusted: Mapping[str, VerifyKey],
        subscribe: Callable[[str], None] | None,
        fetched: Callable[[str], None] | None = None,
    ) -> None:
        """Verifies a pending decision, asks for the weights (``subscribe``, None while offline)
        and applies them once they are in (then ``fetched`` with their blob topic: no longer
        needed). Never raises."""
        frame, self._pending = self._pending, None
        try:
            if frame is not None:
                self._take(frame, trusted)
            sha = self.wanted_blob()
            if (
                sha is not None
                and subscribe is not None
                and time.monotonic() - self._asked_at >= RESUBSCRIBE_S
            ):
                self._asked_at = time.monotonic()
                subscribe(self.topics.blob(sha))
            if self.decision is not None and self._weights is not None and not self._applied:
                self._applied = True
                self.apply(self.decision, self._weights)
                if fetched is not None and self.decision.weights_sha256 is not None:
                    fetched(self.topics.blob(self.decision.weights_sha256))
                log.info(
                    "rollout: predictions use v%s (decision %d: %s)",
                    self.decision.promoted_version,
                    self.decision.sequence,
                    self.decision.action,
                )
        except Exception as exc:  # a bad document never ends the worker
            self._count(f"error:{type(exc).__name__}")
            log.warning("rollout: %s: %s", type(exc).__name__, exc)

    def _take(self, frame: bytes, trusted: Mapping[str, VerifyKey]) -> None:
        if not frame:  # cleared: the gate was turned off
            if self.decision is not None:
                log.info("rollout: the aggregator cleared its promotion; predictions use the newest model")
            self.decision, self._weights, self._applied = None, None, False
            self.apply(None, None)
            return
        try:
            decision = verify_decision(frame, trusted, self.topics.fleet)
        except RolloutError as exc:
            self._count(str(exc.reason))
            log.warning("rollout: decision refused (%s): %s", exc.reason, exc)
            return
        if not decision.serving:
            self._count("not_serving")
            return
        if decision.sequence < self.sequence or (
            decision.sequence == self.sequence and (self.decision is None or decision != self.decision)
        ):
            self._count("replayed")
            log.warning(
                "rollout: decision %d (%s v%s) refused: this device accepted decision %d already; an old "
                "document replayed (nothing to do: the aggregator's next decision is accepted)",
                decision.sequence,
                decision.action,
                decision.promoted_version,
                self.sequence,
            )
            return
        if decision == self.decision:
            return  # the retained copy again
        try:
            self._save(decision)  # before acting on it: a restart never takes an older one again
        except OSError as exc:  # a full or read-only state_dir: not taken, tried again when resent
            self._count("state_dir")
            log.warning(
                "rollout: decision %d not taken: cannot write %s (%s); free or fix [agent] state_dir",
                decision.sequence,
                self.path,
                exc,
            )
            return
        self.sequence, self.decision = decision.sequence, decision
        self._weights, self._applied, self._asked_at = None, False, float("-inf")

    def _count(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def report(self, predicting: int | None) -> dict[str, Any]:
        """``rollout`` in the device status: the accepted decision and the version predicting."""
        d = self.decision
        return {
            "sequence": self.sequence,
            "action": d.action if d else None,
            "promoted_version": d.promoted_version if d else None,
            "predicting_version": predicting,
            "refused": dict(self.refused),
        }
