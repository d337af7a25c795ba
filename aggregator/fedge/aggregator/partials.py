"""Partial aggregates: what an aggregator worker folded, in a form the leader adds to its round.

With ``[replicas]`` (docs/scale.md) several aggregator processes share a fleet's updates through
an MQTT shared subscription. Each checks, opens and folds the updates the broker hands it exactly
as a lone aggregator would (the same ``RoundEngine`` checks, the same fold chain built from the
round's limits), and every ``flush_updates`` updates or ``flush_interval_s`` it hands the leader
what it folded since the last partial. The leader adds the partial to its own folds
(:func:`absorb_partial`), so the round's result, metrics and the bounds' memory are the same as if
one process had folded every update, up to float64 summation order.

A partial is exact for the folds that are sums: FedAvg's weighted sum, the server optimizers
(which step with FedAvg's mean), the metrics' weighted sums, the clipping's count and raw norms,
the claims, and the moments round's per-device rows. Robust strategies need every update on its
own, differential privacy's noise and secure aggregation's unmasking belong to one process: those
are refused with replicas (``fedge.aggregator.replica_config.check_replicable``).

Pure: no I/O, no keys (``fedge.aggregator.partial_wire`` seals and signs a partial).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from fedge.aggregator.fedavg import AggregationError, FedAvg, StreamingFedAvg, WeightedMeanAccumulator
from fedge.aggregator.strategies.clipping import NormClip
from fedge.aggregator.strategies.factory import RoundFolds
from fedge.aggregator.strategies.metrics import RoundMetrics
from fedge.aggregator.strategies.server_optimizers import ServerOptimizer
from fedge.protocol.errors import FedgeError

__all__ = [
    "METRIC_NAMES",
    "MeanPart",
    "MomentRow",
    "Partial",
    "absorb_partial",
    "fold_chain",
    "fold_parts",
]

#: The round's weighted metrics a partial carries, by their ``RoundMetrics`` attribute names.
METRIC_NAMES = ("train_loss", "eval_loss", "eval_accuracy", "eval_mse")


@dataclass(frozen=True)
class MeanPart:
    """One weighted metric's running parts (``WeightedMeanAccumulator.parts``)."""

    weighted_sum: float
    total_weight: float
    count: int


@dataclass(frozen=True)
class MomentRow:
    """One device's accepted moments (the moments round keeps each device's row)."""

    device: str
    count: int
    sums: npt.NDArray[np.float64]
    sums_sq: npt.NDArray[np.float64]


@dataclass(frozen=True)
class Partial:
    """What one worker accepted and refused in one round since its previous partial.

    ``accepted`` and ``spent`` map each device to the counter of its one authentic message
    (accepted into the folds, or refused after it was opened); ``rejected`` counts every refusal
    by reason, like the round record's ``rejected``. The rest are the folds' parts.
    """

    fleet: str
    round_id: str
    version: int
    worker: str
    #: The worker's sequence number of this partial in the round (1, 2, ...): a resent partial
    #: has the same number, so the leader can tell a resend from a new partial.
    batch: int
    accepted: dict[str, int] = field(default_factory=dict)
    spent: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    update_bytes: int = 0
    #: FedAvg's weighted sum of (clipped) deltas; None in a moments round or with no updates.
    delta_sum: npt.NDArray[np.float64] | None = None
    updates: int = 0
    examples: int = 0
    total_weight: float = 0.0
    metrics: dict[str, MeanPart] = field(default_factory=dict)
    #: The claimed example counts summed (``RoundMetrics.examples``).
    claimed_examples: int = 0
    raw_norms: tuple[float, ...] = ()
    clipped: int = 0
    claims: tuple[int, ...] = ()
    moment_rows: tuple[MomentRow, ...] = ()

    @property
    def devices(self) -> set[str]:
        """Every device with an authentic message in this partial."""
        return set(self.accepted) | set(self.spent)


class ReplicaError(FedgeError):
    """A configuration replicas cannot run, or folds that are not sums."""


def fold_chain(folds: RoundFolds) -> tuple[NormClip, RoundMetrics, StreamingFedAvg]:
    """The fold chain of a replicable round: NormClip(RoundMetrics(FedAvg | ServerOptimizer(FedAvg)))."""
    clip = folds.updates
    metrics = clip.inner
    if not isinstance(metrics, RoundMetrics):
        raise ReplicaError("this round's folds have no metrics link: not a replicable round")
    strategy: object = metrics.inner
    if isinstance(strategy, ServerOptimizer):
        strategy = strategy.inner
    if not isinstance(strategy, FedAvg):
        raise ReplicaError(f"{type(strategy).__name__} is not a sum: replicas cannot split it")
    return clip, metrics, strategy.mean


def fold_parts(folds: RoundFolds, moment_devices: list[str]) -> dict[str, object]:
    """The folds' parts as :class:`Partial` fields (the round bookkeeping is the engine's)."""
    clip, metrics, mean = fold_chain(folds)
    delta_sum, updates, examples, weight = mean.parts()
    rows = tuple(
        MomentRow(device, n, s, sq)
        for device, (n, s, sq) in zip(moment_devices, folds.moments_rows(), strict=True)
    )
    return {
        "delta_sum": delta_sum if updates else None,
        "updates": updates,
        "examples": examples,
        "total_weight": weight,
        "metrics": {name: MeanPart(*_metric(metrics, name).parts()) for name in METRIC_NAMES},
        "claimed_examples": metrics.examples,
        "raw_norms": tuple(clip.raw_norms),
        "clipped": clip.clipped,
        "claims": tuple(folds.claims),
        "moment_rows": rows,
    }


def _metric(metrics: RoundMetrics, name: str) -> WeightedMeanAccumulator:
    value = getattr(metrics, name)
    assert isinstance(value, WeightedMeanAccumulator)
    return value


def absorb_partial(folds: RoundFolds, partial: Partial, moment_devices: list[str]) -> None:
    """Adds ``partial`` to the leader's ``folds`` (and its moment rows' devices to
    ``moment_devices``), all or nothing: ``AggregationError`` if the parts are inconsistent or
    overflow, and then nothing changed."""
    clip, metrics, mean = fold_chain(folds)
    p = partial
    if p.updates != len(p.raw_norms) or p.clipped > p.updates or p.clipped < 0:
        raise AggregationError("a partial's update count, norms and clipped count disagree")
    if len(p.claims) != p.updates + len(p.moment_rows):
        raise AggregationError("a partial's claims do not match its updates and moments")
    if len(p.accepted) != p.updates + len(p.moment_rows):
        raise AggregationError("a partial's accepted devices do not match its updates and moments")
    if not all(np.isfinite(n) and n >= 0 for n in p.raw_norms):
        raise AggregationError("a partial's norms must be finite and >= 0")
    if not set(p.metrics) <= set(METRIC_NAMES):
        raise AggregationError("a partial names an unknown metric")
    # Trial runs on copies, so a refusal half way leaves the round's folds as they were.
    trial_mean = StreamingFedAvg(mean.parameter_count, mean.max_examples_per_update)
    trial_mean.absorb(*mean.parts())
    if p.updates:
        if p.delta_sum is None:
            raise AggregationError("a partial with updates has no sum")
        trial_mean.absorb(p.delta_sum, p.updates, p.examples, p.total_weight)
    trial_metrics: dict[str, WeightedMeanAccumulator] = {}
    for name in METRIC_NAMES:
        acc = WeightedMeanAccumulator()
        acc.absorb(*_metric(metrics, name).parts())
        part = p.metrics.get(name)
        if part is not None:
            acc.absorb(part.weighted_sum, part.total_weight, part.count)
        trial_metrics[name] = acc
    if p.moment_rows:
        folds.absorb_moments([(row.count, row.sums, row.sums_sq) for row in p.moment_rows])
        moment_devices.extend(row.device for row in p.moment_rows)
    # The trials passed, so the same additions on the real folds cannot fail.
    if p.updates and p.delta_sum is not None:
        mean.absorb(p.delta_sum, p.updates, p.examples, p.total_weight)
    for name, acc in trial_metrics.items():
        setattr(metrics, name, acc)
    metrics.examples += p.claimed_examples
    clip.raw_norms.extend(p.raw_norms)
    clip.clipped += p.clipped
    folds.claims.extend(p.claims)
