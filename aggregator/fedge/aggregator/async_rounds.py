"""Buffered asynchronous aggregation (``[rounds] aggregation = "async"``; docs/async.md).

FedBuff (Nguyen et al., 2022): the aggregator does not wait for a cohort. Every update that
passes the usual checks is folded as it arrives, scaled down by how many versions old the model
it was trained from is, and after ``buffer_size`` (K) accepted updates the fold becomes the next
global model. An update trained from a version more than ``max_staleness`` (S) versions behind
the newest is refused (``stale``).

How it sits in the round engine: a "round" is still one published version, opened by
``open_round`` and closed by ``close_round``. What changes is which updates the open round
takes (:class:`StalenessWindow`: the last S+1 train manifests, so an update bound to any of
them is checked against the manifest it was trained from, exactly as a synchronous round checks
it against the open one), when it is due (K accepted updates, or the deadline), and a fold link
(:class:`StalenessScale`) that scales each update's delta after the norm bounds and before the
metrics and the strategy. Everything else (sealing, the counter, one message per device per
round, the norm bounds, the weight cap, the server optimizers) is the synchronous code path.

The staleness weight is FedBuff's ``1 / sqrt(1 + s)``: a fresh update counts fully, one from
three versions back half. It scales the delta, not the update's share of the mean, so a buffer
of stale updates moves the model less (FedBuff divides by K, not by the sum of the weights).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import replace

import numpy as np
import numpy.typing as npt

from fedge.aggregator.config import RoundSettings
from fedge.aggregator.fedavg import AggregationError
from fedge.aggregator.strategies.clipping import NormClip
from fedge.aggregator.strategies.factory import (
    InfluenceHistory,
    RoundFolds,
    moments_strategy,
    round_limits,
    update_strategy,
)
from fedge.aggregator.strategies.fold import UpdateFold
from fedge.aggregator.strategies.metrics import RoundMetrics
from fedge.aggregator.strategies.server_optimizers import ServerOptimizer, ServerOptimizerState
from fedge.aggregator.strategies.weighting import CappedClaims
from fedge.protocol.messages import UpdatePayload
from fedge.protocol.reasons import RejectReason
from fedge.protocol.round_manifest import AsyncAggregation, RoundManifest

#: The rejection reason of an update trained from a version more than ``max_staleness`` behind.
STALE = RejectReason.STALE


def staleness_weight(staleness: int) -> float:
    """FedBuff's weight of an update ``staleness`` versions behind the newest: ``1/sqrt(1+s)``."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    return 1.0 / math.sqrt(1.0 + staleness)


def announcement(settings: RoundSettings) -> AsyncAggregation | None:
    """What a train manifest announces: K and S with ``aggregation = "async"``, else nothing."""
    if not settings.asynchronous:
        return None
    return AsyncAggregation(buffer_size=settings.buffer_size, max_staleness=settings.max_staleness)


class StalenessScale:
    """A fold link that multiplies each update's delta by the staleness weight the engine set
    (``factor``) just before it added the update. It sits after the norm bounds (which judge the
    update as the device sent it) and before the metrics and the strategy."""

    def __init__(self, inner: UpdateFold) -> None:
        self.inner = inner
        #: The weight of the next update (the engine sets it per update; 1.0: fresh).
        self.factor = 1.0

    def add(self, update: UpdatePayload) -> None:
        if not 0.0 < self.factor <= 1.0:
            raise AggregationError(f"staleness weight {self.factor} is not in (0, 1]")
        if self.factor != 1.0:
            update = replace(update, delta=update.delta * np.float32(self.factor))
        self.inner.add(update)

    def result(self, global_weights: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return self.inner.result(global_weights)


def build_async_round_folds(
    settings: RoundSettings,
    weights: npt.NDArray[np.float32],
    history: InfluenceHistory,
    parameter_count: int,
    n_features: int,
    optimizer_state: ServerOptimizerState | None = None,
) -> tuple[RoundFolds, StalenessScale]:
    """The folds of an asynchronous round: ``NormClip(StalenessScale(RoundMetrics(strategy)))``
    (the synchronous chain, ``strategies.factory.round_folds_for_limits``, with the staleness
    link), and that link, whose ``factor`` the engine sets per update."""
    limits = round_limits(settings, weights, history)
    strategy = update_strategy(settings, limits, parameter_count, optimizer_state)
    metrics = RoundMetrics(strategy, CappedClaims(limits.claim_cap))
    scale = StalenessScale(metrics)
    updates = NormClip(scale, limits.bounds, reject=settings.update_norm_policy == "reject")
    optimizer = strategy if isinstance(strategy, ServerOptimizer) else None
    folds = RoundFolds(limits, updates, metrics, moments_strategy(settings, n_features), optimizer=optimizer)
    return folds, scale


class StalenessWindow:
    """The last ``max_staleness + 1`` train manifests by version: the ones an update may still
    be trained from. In memory only: after a restart, updates bound to a manifest of the
    previous process are refused (``wrong_round``) and their devices train on the next one."""

    def __init__(self, max_staleness: int) -> None:
        self.max_staleness = max_staleness
        self._manifests: OrderedDict[int, RoundManifest] = OrderedDict()

    def add(self, manifest: RoundManifest) -> None:
        """Remembers a newly published train manifest; forgets those now too old."""
        self._manifests[manifest.version] = manifest
        while self._manifests and next(iter(self._manifests)) < manifest.version - self.max_staleness:
            self._manifests.popitem(last=False)

    def clear(self) -> None:
        """A phase other than train was published (moments, final): nothing is open to train from."""
        self._manifests.clear()

    def base(self, version: int) -> RoundManifest | None:
        """The train manifest of ``version`` if it is still in the window."""
        return self._manifests.get(version)

    def versions(self) -> list[int]:
        return list(self._manifests)
