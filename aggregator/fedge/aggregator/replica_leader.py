"""The leader's side of ``[replicas]``: its work orders, and its workers' partials in.

The aggregator service calls :meth:`PartialIntake.work_order` before each manifest (published
retained on ``aggregator/work``, so a worker that starts or restarts mid-round finds the round)
and :meth:`PartialIntake.handle` for each message on ``aggregator/partial/+``; it publishes the
verdict this returns. A partial that does not decode (forged, altered, not this fleet's, too
large) is counted by reason in the status (``replicas.refused``) and logged; it never ends the
service, and it is answered with no verdict (its sender cannot be told apart from a forger).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from nacl.public import PrivateKey
from nacl.signing import SigningKey

from fedge.aggregator.partial_wire import (
    PartialWireError,
    Verdict,
    decode_partial,
    encode_verdict,
    encode_work_order,
    partial_key,
)
from fedge.aggregator.replica_config import ReplicaSettings
from fedge.aggregator.replica_round import absorb, work_order
from fedge.aggregator.round_engine import RoundEngine
from fedge.protocol.topics import FleetTopics, TopicError

log = logging.getLogger("fedge.aggregator")


@dataclass
class WorkerSeen:
    """One worker as the leader knows it, for the status."""

    partials: int = 0
    updates: int = 0
    verdicts: Counter[str] = field(default_factory=Counter)
    last_seen: float = 0.0


class PartialIntake:
    def __init__(
        self, settings: ReplicaSettings, topics: FleetTopics, box_key: PrivateKey, signing_key: SigningKey
    ) -> None:
        self.settings = settings
        self.topics = topics
        self.box = partial_key(box_key)
        self.signing_key = signing_key
        self.workers: dict[str, WorkerSeen] = {}
        #: Partials that did not decode, by reason (``bad_seal``, ``signature_*``, ...).
        self.refused: Counter[str] = Counter()

    def work_order(self, engine: RoundEngine) -> bytes:
        """The open round's signed work order; empty (clears the retained one) between rounds."""
        order = work_order(engine)
        return b"" if order is None else encode_work_order(order, self.signing_key)

    def handle(self, engine: RoundEngine, topic: str, payload: bytes, now: float) -> tuple[str, bytes] | None:
        """The verdict to publish (topic, payload) for one partial, or None if it was refused
        before it could be read."""
        try:
            worker = self.topics.device_of(topic, "aggregator/partial")
        except TopicError:
            self._refuse("bad_topic", topic, "not aggregator/partial/{worker}")
            return None
        mm = engine.model_manifest
        selected = len(engine.current.manifest.selected_devices) if engine.current is not None else 0
        try:
            partial = decode_partial(
                payload,
                self.box,
                self.signing_key.verify_key,
                engine.fleet,
                worker,
                mm.parameter_count,
                mm.task.input_dim,
                max(1, selected, len(engine.registry)),
            )
        except PartialWireError as exc:
            self._refuse(exc.reason, topic, str(exc))
            return None
        verdict = absorb(engine, partial, now)
        seen = self.workers.setdefault(worker, WorkerSeen())
        seen.partials += 1
        seen.verdicts[verdict.outcome] += 1
        seen.last_seen = time.time()
        if verdict.outcome == "accepted":
            seen.updates += len(partial.accepted)
            moments = {row.device for row in partial.moment_rows}
            for device in partial.accepted:  # the lone aggregator's words, so one log reads the same
                log.info("accepted %s from %s", "moments" if device in moments else "update", device)
            log.info(
                "partial %d of %s: %d accepted, %d refused in round %s",
                partial.batch,
                worker,
                len(partial.accepted),
                len(partial.spent),
                partial.round_id,
            )
        else:
            log.warning("partial %d of %s %s: %s", partial.batch, worker, verdict.outcome, _why(verdict))
        return self.topics.verdict(worker), encode_verdict(verdict, self.signing_key)

    def _refuse(self, reason: str, topic: str, detail: str) -> None:
        self.refused[reason] += 1
        log.warning(
            "refused a partial on %s: %s; a worker with other keys than the leader's, or a forgery "
            "(give every worker the leader's box and signing keys)",
            topic,
            detail,
        )

    def status(self) -> dict[str, Any]:
        return {
            "share_group": self.settings.share_group,
            "workers": {
                name: {
                    "partials": w.partials,
                    "updates": w.updates,
                    "verdicts": dict(w.verdicts),
                    "last_seen": w.last_seen,
                }
                for name, w in sorted(self.workers.items())
            },
            "refused": dict(self.refused),
        }


def _why(verdict: Verdict) -> str:
    if verdict.outcome == "conflict":
        return (
            f"{', '.join(verdict.conflicts)} counted already (the worker folds the batch again without them)"
        )
    return verdict.reason
