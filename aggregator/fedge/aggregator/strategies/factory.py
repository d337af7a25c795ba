"""The one place that builds a round's folds from ``RoundSettings`` and the bounds' memory.

The round engine opens a round with :func:`build_round_folds`, feeds the result every report
that passed its message checks (:meth:`RoundFolds.add_update`, :meth:`RoundFolds.add_moments`)
and, when the round closes, reads its results, what the round record reports and what the
bounds carry into the next round (:meth:`RoundFolds.next_history`). A train round's updates go
through ``NormClip(RoundMetrics(strategy))``: the norm bounds, then the round's metrics, then
the strategy, each checking before it changes anything, so a refused update leaves no trace.

The strategies (``[rounds] strategy``, docs/strategies.md): ``fedavg`` (``FedAvg``), the
server optimizers (``server_optimizers.ServerOptimizer`` around the FedAvg or DP mean) and the
robust aggregators (``robust``: median, trimmed mean, (Multi-)Krum).

A new strategy is a fold (``fedge.aggregator.strategies.fold``), a ``[rounds]`` value naming
it, and a branch in :func:`update_strategy` (or :func:`moments_strategy`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedge.aggregator.config import RoundSettings
from fedge.aggregator.fedavg import FedAvg
from fedge.aggregator.moments import MomentsAggregation
from fedge.aggregator.strategies.clipping import NormBounds, NormClip, norm_bounds
from fedge.aggregator.strategies.dp_mean import DpGaussianMean
from fedge.aggregator.strategies.fold import MomentsFold, UpdateFold
from fedge.aggregator.strategies.metrics import RoundMetrics
from fedge.aggregator.strategies.robust import Krum, Median, TrimmedMean
from fedge.aggregator.strategies.server_optimizers import ServerOptimizer, ServerOptimizerState
from fedge.aggregator.strategies.weighting import CappedClaims, claim_cap, update_weighting, weight_cap
from fedge.protocol.messages import MomentsPayload, UpdatePayload
from fedge.protocol.strategy_announcement import SERVER_OPTIMIZERS, STRATEGY_PARAMETERS, StrategyAnnouncement

__all__ = [
    "DpRound",
    "InfluenceHistory",
    "RoundFolds",
    "RoundLimits",
    "build_dp_round_folds",
    "build_round_folds",
    "moments_strategy",
    "round_folds_for_limits",
    "round_limits",
    "strategy_announcement",
    "update_strategy",
]


@dataclass(frozen=True)
class InfluenceHistory:
    """What the influence bounds remember of earlier rounds. ``EngineState`` keeps (and the
    checkpoint stores) each field under the same name."""

    #: Median L2 norm, before clipping, of the updates of the last train round that had any:
    #: the reference of ``update_norm_adaptive``.
    update_norm_median: float | None = None
    #: Median example count claimed in the last round that had reports: the reference of
    #: ``example_cap_ratio``.
    claim_median: float | None = None
    #: The initial model's L2 norm: the floor of the ``update_norm_ratio`` bound.
    initial_norm: float | None = None


@dataclass(frozen=True)
class RoundLimits:
    """A round's bounds on one device's influence, fixed when the round opens (the aggregator
    status's ``limits`` and the round record show them)."""

    bounds: NormBounds
    #: ``weighting = "examples"``: the largest weight one update may have; None: each counts once.
    weight_cap: float | None
    #: The most a claimed count weighs in the round's metrics (and, with ``"examples"``, the mean).
    claim_cap: float | None


def round_limits(
    settings: RoundSettings, weights: npt.NDArray[np.float32], history: InfluenceHistory
) -> RoundLimits:
    """The limits of a round whose global model is ``weights``."""
    return RoundLimits(
        bounds=norm_bounds(settings, weights, history.initial_norm, history.update_norm_median),
        weight_cap=weight_cap(settings, history.claim_median),
        claim_cap=claim_cap(settings, history.claim_median),
    )


class RoundFolds:
    """One round's arithmetic, as the round engine drives it (built by :func:`build_round_folds`).

    ``updates`` is the train round's fold chain (clipping outermost), ``metrics`` the link in it
    that keeps the round's metrics, ``moments`` the moments round's fold. Each ``add_*`` raises
    ``AggregationError`` (``NormTooLarge`` for an update refused by the norm bound) and then
    changes nothing.
    """

    def __init__(
        self,
        limits: RoundLimits,
        updates: NormClip,
        metrics: RoundMetrics,
        moments: MomentsFold,
        dp: DpGaussianMean | None = None,
        optimizer: ServerOptimizer | None = None,
    ) -> None:
        self.limits = limits
        self.updates = updates
        self.metrics = metrics
        self.moments = moments
        #: The DP fold of a round with ``[privacy]`` (its noisy indicator sum feeds the
        #: accountant); None otherwise.
        self.dp = dp
        #: The server optimizer of a round with one (its ``next_state`` is the engine's to keep
        #: once the round aggregated); None otherwise.
        self.optimizer = optimizer
        #: The accepted reports' claimed example counts (the next round's claim cap).
        self.claims: list[int] = []

    def add_update(self, update: UpdatePayload) -> None:
        self.updates.add(update)
        self.claims.append(update.examples)

    @property
    def takes_prepared(self) -> bool:
        """Whether the train chain takes prepared updates (:meth:`add_prepared`): the synchronous
        chain over FedAvg, a server optimizer or the DP mean does; robust strategies and the
        asynchronous chain's staleness link do not (they get :meth:`add_update`)."""
        return self.updates.takes_prepared

    def add_prepared(self, update: UpdatePayload, cast: npt.NDArray[np.float64], norm: float) -> None:
        """:meth:`add_update` for an update the caller already cast to float64 and measured
        (``NormClip.add_prepared``): the same outcome to the bit, the same refusals."""
        self.updates.add_prepared(update, cast, norm)
        self.claims.append(update.examples)

    def add_moments(self, moments: MomentsPayload) -> None:
        self.moments.add(moments)
        self.claims.append(moments.count)

    def moments_rows(self) -> list[tuple[int, npt.NDArray[np.float64], npt.NDArray[np.float64]]]:
        """The moments round's accepted rows, in order (a replica's partial carries them)."""
        if not isinstance(self.moments, MomentsAggregation):
            raise TypeError(f"{type(self.moments).__name__} keeps no rows")
        return self.moments.accumulator.rows

    def absorb_moments(
        self, rows: list[tuple[int, npt.NDArray[np.float64], npt.NDArray[np.float64]]]
    ) -> None:
        """Adds a replica's moment rows, all or nothing (their claims come with the partial)."""
        if not isinstance(self.moments, MomentsAggregation):
            raise TypeError(f"{type(self.moments).__name__} cannot absorb rows")
        self.moments.accumulator.absorb(rows)

    def next_history(self, previous: InfluenceHistory) -> InfluenceHistory:
        """What the bounds remember after this round: the medians of its claims and of its
        updates' norms before clipping; a round without any keeps the previous ones (a moments
        round has no updates, an aborted one may have no reports)."""
        norms = self.updates.raw_norms
        return InfluenceHistory(
            update_norm_median=float(statistics.median(norms)) if norms else previous.update_norm_median,
            claim_median=float(statistics.median(self.claims)) if self.claims else previous.claim_median,
            initial_norm=previous.initial_norm,
        )


def update_strategy(
    settings: RoundSettings,
    limits: RoundLimits,
    parameter_count: int,
    optimizer_state: ServerOptimizerState | None = None,
) -> UpdateFold:
    """The train round's aggregation strategy (``[rounds] strategy``), the fold inside the
    clipping and the metrics: FedAvg weighted by the round's weighting, a server optimizer on
    that mean (continuing ``optimizer_state``), or a robust aggregator holding the updates."""
    s = settings
    name = s.strategy
    lr = s.server_learning_rate
    mean = FedAvg(parameter_count, s.max_examples_per_update, lr, update_weighting(limits.weight_cap))
    if name == "fedavg":
        return mean
    if name in SERVER_OPTIMIZERS:
        return ServerOptimizer(mean, s, optimizer_state)
    cap = s.robust_max_updates
    if name == "median":
        return Median(parameter_count, s.max_examples_per_update, cap, lr)
    if name == "trimmed_mean":
        return TrimmedMean(parameter_count, s.max_examples_per_update, cap, lr, s.trim_fraction)
    if name in ("krum", "multi_krum"):
        select = 1 if name == "krum" else s.multi_krum_select
        return Krum(parameter_count, s.max_examples_per_update, cap, lr, s.byzantine_devices, select)
    raise ValueError(f"unknown [rounds] strategy {name!r}")


def strategy_announcement(settings: RoundSettings) -> StrategyAnnouncement | None:
    """What a train manifest says about ``[rounds] strategy``: its name and parameters (the
    ``[rounds]`` keys of the same names); None for plain FedAvg."""
    name = settings.strategy
    if name == "fedavg":
        return None
    return StrategyAnnouncement(name, {key: getattr(settings, key) for key in STRATEGY_PARAMETERS[name]})


def moments_strategy(settings: RoundSettings, n_features: int) -> MomentsFold:
    """The moments round's fold: ``[rounds] moments_aggregation`` (``"robust"`` or ``"pooled"``)."""
    return MomentsAggregation(n_features, settings.max_examples_per_update, settings.moments_aggregation)


def build_round_folds(
    settings: RoundSettings,
    weights: npt.NDArray[np.float32],
    history: InfluenceHistory,
    parameter_count: int,
    n_features: int,
    optimizer_state: ServerOptimizerState | None = None,
) -> RoundFolds:
    """A round's folds, for a global model ``weights`` and the bounds' ``history``; a server
    optimizer continues from ``optimizer_state``."""
    limits = round_limits(settings, weights, history)
    return round_folds_for_limits(settings, limits, parameter_count, n_features, optimizer_state)


def round_folds_for_limits(
    settings: RoundSettings,
    limits: RoundLimits,
    parameter_count: int,
    n_features: int,
    optimizer_state: ServerOptimizerState | None = None,
) -> RoundFolds:
    """A round's folds for limits fixed elsewhere: an aggregator worker folds with the limits
    the leader's work order announces (``fedge.aggregator.partials``)."""
    strategy = update_strategy(settings, limits, parameter_count, optimizer_state)
    metrics = RoundMetrics(strategy, CappedClaims(limits.claim_cap))
    updates = NormClip(metrics, limits.bounds, reject=settings.update_norm_policy == "reject")
    optimizer = strategy if isinstance(strategy, ServerOptimizer) else None
    return RoundFolds(limits, updates, metrics, moments_strategy(settings, n_features), optimizer=optimizer)


@dataclass(frozen=True)
class DpRound:
    """A DP round's parameters, fixed when it opens (the manifest's ``privacy`` says the same)."""

    clip_bound: float
    update_noise_multiplier: float
    #: ``2 * clip_count_stddev``: the noise on the sum of ``+1``/``-1`` indicators; None with
    #: fixed clipping.
    indicator_noise_stddev: float | None
    expected_participants: int


def build_dp_round_folds(
    settings: RoundSettings,
    history: InfluenceHistory,
    parameter_count: int,
    n_features: int,
    dp: DpRound,
    rng: np.random.Generator,
    optimizer_state: ServerOptimizerState | None = None,
) -> RoundFolds:
    """A round's folds under central differential privacy: the DP clip bound is the only norm
    bound (clip, never reject: a device's update is clipped on the device already, and one
    over the bound by codec rounding or by malice is scaled down here), every update counts
    once, and the mean is the noised sum over the expected participants
    (``strategies.dp_mean``). The ``[rounds]`` norm bounds and example weighting are not used:
    the adaptive one is an exact median of the last round's norms, which is not private.
    A server optimizer steps with the noised mean (post-processing: no privacy cost); robust
    strategies are refused with DP (``privacy_config``)."""
    claim = claim_cap(settings, history.claim_median)
    limits = RoundLimits(bounds=NormBounds(hard=None, clip=dp.clip_bound), weight_cap=None, claim_cap=claim)
    fold = DpGaussianMean(
        parameter_count,
        settings.max_examples_per_update,
        expected_participants=dp.expected_participants,
        update_noise_stddev=dp.update_noise_multiplier * dp.clip_bound,
        indicator_noise_stddev=dp.indicator_noise_stddev,
        server_learning_rate=settings.server_learning_rate,
        rng=rng,
    )
    if settings.robust:
        raise ValueError(f'[rounds] strategy = "{settings.strategy}" cannot run under differential privacy')
    optimizer = (
        ServerOptimizer(fold, settings, optimizer_state) if settings.strategy in SERVER_OPTIMIZERS else None
    )
    metrics = RoundMetrics(fold if optimizer is None else optimizer, CappedClaims(claim))
    updates = NormClip(metrics, limits.bounds, reject=False)
    return RoundFolds(
        limits, updates, metrics, moments_strategy(settings, n_features), dp=fold, optimizer=optimizer
    )
