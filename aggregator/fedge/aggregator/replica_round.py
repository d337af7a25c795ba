"""A round split over a leader and workers (``[replicas]``): the engine's side, pure.

The leader's :class:`~fedge.aggregator.round_engine.RoundEngine` opens and closes rounds as
always; :func:`work_order` is what it hands its workers, and :func:`absorb` adds a worker's
partial to the open round, or answers why not (``fedge.aggregator.partial_wire.Verdict``).

A worker runs its own ``RoundEngine`` that never opens a round: :func:`follow` puts it in the
leader's round (with the leader's limits), its ``handle`` checks and opens each update exactly
as the leader would, and the decoded payloads of the current batch are kept
(:class:`WorkerBatch`) until the leader accepted the partial built from them
(:func:`partial_of`). A ``conflict`` (a device another worker or the leader counted already: a
QoS 1 redelivery or a resend after a reconnect that the broker handed to another member) is
folded again without those devices and resent, so no update is counted twice and none is
dropped with its batch.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from fedge.aggregator.fedavg import AggregationError
from fedge.aggregator.partial_wire import FOLD_SETTINGS, Verdict, WorkOrder
from fedge.aggregator.partials import Partial, absorb_partial, fold_parts
from fedge.aggregator.round_engine import RoundEngine, _OpenRound
from fedge.aggregator.strategies.factory import round_folds_for_limits
from fedge.protocol.errors import FedgeError
from fedge.protocol.messages import MomentsPayload, UpdatePayload
from fedge.protocol.reasons import RejectReason

__all__ = ["ReplicaMismatch", "WorkerBatch", "absorb", "follow", "partial_of", "take_batch", "work_order"]


class ReplicaMismatch(FedgeError):
    """A worker configured to fold otherwise than its leader (a different ``[rounds]``)."""


@dataclass
class WorkerBatch:
    """What a worker accepted and refused since its last partial."""

    #: The decoded payloads accepted, in order (a partial is folded from them).
    kept: list[tuple[str, UpdatePayload | MomentsPayload]] = field(default_factory=list)
    accepted: dict[str, int] = field(default_factory=dict)
    spent: dict[str, int] = field(default_factory=dict)
    rejected: Counter[str] = field(default_factory=Counter)
    update_bytes: int = 0
    #: When the batch's first message was handled (monotonic s); None while it is empty.
    started: float | None = None

    def keep(self, device: str, payload: UpdatePayload | MomentsPayload) -> None:
        self.kept.append((device, payload))

    def __len__(self) -> int:
        return len(self.accepted) + len(self.spent) + sum(self.rejected.values())

    def touch(self, now: float | None = None) -> None:
        """Marks the batch started (the flush interval runs from its first message)."""
        if self.started is None:
            self.started = time.monotonic() if now is None else now


def fold_settings(engine: RoundEngine) -> dict[str, object]:
    return {key: getattr(engine.settings, key) for key in FOLD_SETTINGS}


def work_order(engine: RoundEngine) -> WorkOrder | None:
    """The leader's open round as its workers must fold it; None between rounds."""
    r = engine.current
    if r is None:
        return None
    return WorkOrder(r.manifest, r.folds.limits, fold_settings(engine))


def follow(engine: RoundEngine, order: WorkOrder) -> bool:
    """Puts a worker's engine in the leader's round; False if it is in that round already.
    ``ReplicaMismatch`` if the worker's ``[rounds]`` fold otherwise than the leader's."""
    r = engine.current
    m = order.manifest
    if r is not None and r.manifest.round_id == m.round_id and r.manifest.version == m.version:
        return False
    mine = fold_settings(engine)
    if mine != order.settings:
        differ = ", ".join(f"{k} {mine[k]!r} (leader: {order.settings.get(k)!r})" for k in sorted(mine))
        raise ReplicaMismatch(f"this worker's [rounds] differ from the leader's: {differ}")
    folds = round_folds_for_limits(
        engine.settings,
        order.limits,
        engine.model_manifest.parameter_count,
        engine.model_manifest.task.input_dim,
    )
    engine.current = _OpenRound(m, folds)
    engine.current.batch = WorkerBatch()
    return True


def take_batch(engine: RoundEngine) -> WorkerBatch | None:
    """The current batch (None if there is none or it is empty), replaced by an empty one."""
    r = engine.current
    if r is None or r.batch is None or len(r.batch) == 0:
        return None
    batch, r.batch = r.batch, WorkerBatch()
    return batch


def partial_of(
    engine: RoundEngine, batch: WorkerBatch, worker: str, seq: int, exclude: frozenset[str] = frozenset()
) -> Partial:
    """The partial of ``batch`` without the devices in ``exclude`` (a leader's ``conflict``),
    folded afresh with the round's limits."""
    r = engine.current
    if r is None:
        raise FedgeError("no round is open")
    mm = engine.model_manifest
    folds = round_folds_for_limits(engine.settings, r.folds.limits, mm.parameter_count, mm.task.input_dim)
    moment_devices: list[str] = []
    for device, payload in batch.kept:
        if device in exclude:
            continue
        if isinstance(payload, MomentsPayload):
            folds.add_moments(payload)
            moment_devices.append(device)
        else:
            folds.add_update(payload)
    rejected = dict(batch.rejected)
    if exclude:  # counted by the round already: this copy is a duplicate, like one at the leader
        dropped = len(exclude & (set(batch.accepted) | set(batch.spent)))
        if dropped:
            rejected[RejectReason.DUPLICATE] = rejected.get(RejectReason.DUPLICATE, 0) + dropped
    parts = fold_parts(folds, moment_devices)
    return Partial(
        fleet=engine.fleet,
        round_id=r.manifest.round_id,
        version=r.manifest.version,
        worker=worker,
        batch=seq,
        accepted={d: c for d, c in batch.accepted.items() if d not in exclude},
        spent={d: c for d, c in batch.spent.items() if d not in exclude},
        rejected=rejected,
        update_bytes=batch.update_bytes,
        **parts,  # type: ignore[arg-type]
    )


def absorb(engine: RoundEngine, partial: Partial, now: float) -> Verdict:
    """The leader adds a worker's partial to its open round, or answers why not. Nothing of a
    partial that is not ``accepted`` is counted; an accepted one counts its devices, their
    counters and its rejections exactly as if the leader had handled those messages."""
    r = engine.current
    p = partial

    def verdict(outcome: str, conflicts: tuple[str, ...] = (), reason: str = "") -> Verdict:
        return Verdict(engine.fleet, p.round_id, p.worker, p.batch, outcome, conflicts, reason)

    if r is None or p.round_id != r.manifest.round_id or p.version != r.manifest.version:
        return verdict("refused", reason="round_closed")
    if (p.worker, p.batch) in r.absorbed:  # a resend: its verdict was lost
        return verdict("accepted")
    m = r.manifest
    if now > m.deadline + engine.partial_grace_s:
        return verdict("refused", reason="late")
    for device in p.devices:
        if device not in engine.registry or not m.is_selected(device):
            return verdict("refused", reason=f"bad_partial: {device} is not selected in this round")
    counters = {**p.spent, **p.accepted}
    conflicts = tuple(
        sorted(d for d, c in counters.items() if r.done(d) or c <= engine.state.counters.get(d, -1))
    )
    if conflicts:
        return verdict("conflict", conflicts)
    try:
        absorb_partial(r.folds, p, r.moment_devices)
    except AggregationError as exc:
        return verdict("refused", reason=f"bad_partial: {exc}")
    r.reported.update(p.accepted)
    r.spent.update(p.spent)
    r.update_bytes += p.update_bytes
    for reason, n in p.rejected.items():
        r.rejected[reason] += n
        engine.state.rejected_total[reason] = engine.state.rejected_total.get(reason, 0) + n
    r.absorbed.add((p.worker, p.batch))
    return verdict("accepted")
