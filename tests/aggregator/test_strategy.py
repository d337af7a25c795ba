"""The strategy seam: the round's folds, tiny cases with hand-computed expected values.

The round engine feeds every accepted report to a fold (``add``) and asks for the round's
outcome once (``result``); clipping, the round's metrics and the weighting wrap or parametrise
any fold. Each case is small enough to check by hand: deltas like ``[3, 4]`` (norm 5), claims
like 10 and 30. The engine's use of them is covered by ``test_round_engine.py`` and
``test_influence_bounds.py``.
"""

from __future__ import annotations

import math
import re

import numpy as np
import numpy.typing as npt
import pytest

from fedge.aggregator.config import RoundSettings
from fedge.aggregator.fedavg import AggregationError, FedAvg
from fedge.aggregator.moments import MomentsAggregation
from fedge.aggregator.strategies.clipping import NormBounds, NormClip, NormTooLarge, l2, norm_bounds
from fedge.aggregator.strategies.factory import (
    InfluenceHistory,
    RoundFolds,
    RoundLimits,
    build_round_folds,
    round_limits,
)
from fedge.aggregator.strategies.fold import MomentsFold, MomentsResult, UpdateFold
from fedge.aggregator.strategies.metrics import RoundMetrics
from fedge.aggregator.strategies.weighting import (
    CappedClaims,
    Weighting,
    claim_cap,
    equal_weights,
    update_weighting,
    weight_cap,
)
from fedge.protocol.messages import Evaluation, MomentsPayload, UpdatePayload
from fedge.protocol.model_manifest import Normalisation


def exactly(message: str) -> str:
    """A ``match=`` pattern for exactly this message."""
    return f"^{re.escape(message)}$"


def vec(*values: float) -> npt.NDArray[np.float32]:
    return np.array(values, dtype=np.float32)


def update(
    *values: float, examples: int = 1, train_loss: float = 0.5, evaluation: Evaluation | None = None
) -> UpdatePayload:
    return UpdatePayload(vec(*values), examples, train_loss, evaluation)


class LastDeltaWins:
    """A fold that is not FedAvg: the next model is the global one plus the last delta added.

    It refuses an update claiming 13 examples, so tests can see what a refusal leaves behind.
    """

    def __init__(self) -> None:
        self.seen: list[npt.NDArray[np.float32]] = []

    def add(self, update: UpdatePayload) -> None:
        if update.examples == 13:
            raise AggregationError("13 examples: refused by the test fold")
        self.seen.append(update.delta)

    def result(self, global_weights: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return (global_weights + self.seen[-1]).astype(np.float32)


def test_the_test_fold_and_the_real_ones_satisfy_the_interfaces() -> None:
    folds: list[UpdateFold] = [
        LastDeltaWins(),
        FedAvg(2, 100, 1.0, equal_weights),
        NormClip(LastDeltaWins(), NormBounds(None, None)),
        RoundMetrics(LastDeltaWins(), equal_weights),
    ]
    moments: MomentsFold = MomentsAggregation(1, 100, "pooled")
    assert len(folds) == 4 and moments.count == 0


# --- clipping, around any fold ---------------------------------------------------------------


def test_a_fold_that_is_not_fedavg_gets_clipping_for_free() -> None:
    inner = LastDeltaWins()
    fold = NormClip(inner, NormBounds(hard=2.5, clip=2.5))
    fold.add(update(3.0, 4.0))  # norm 5: scaled by 2.5 / 5 to [1.5, 2]
    np.testing.assert_array_equal(inner.seen[-1], vec(1.5, 2.0))
    assert inner.seen[-1].dtype == np.float32
    small = update(0.6, 0.8)  # norm 1: within the bound, passed on as it came
    fold.add(small)
    assert inner.seen[-1] is small.delta
    assert fold.clipped == 1 and fold.raw_norms == pytest.approx([5.0, 1.0])
    np.testing.assert_array_equal(fold.result(vec(10.0, 10.0)), vec(10.6, 10.8))


def test_reject_refuses_over_the_hard_bound_and_still_clips_to_the_adaptive_one() -> None:
    bounds = NormBounds(hard=2.0, clip=1.0)  # e.g. ratio bound 2, previous median norm 1
    inner = LastDeltaWins()
    rejecting = NormClip(inner, bounds, reject=True)
    with pytest.raises(NormTooLarge, match=exactly("update norm 5 is over the bound 2")) as caught:
        rejecting.add(update(3.0, 4.0))
    assert (caught.value.norm, caught.value.bound) == (5.0, 2.0)
    assert isinstance(caught.value, AggregationError)  # the engine's catch-all still holds
    assert inner.seen == [] and rejecting.clipped == 0 and rejecting.raw_norms == []
    rejecting.add(update(0.9, 1.2))  # norm 1.5: under the hard bound, over the adaptive one
    np.testing.assert_allclose(inner.seen[-1], vec(0.6, 0.8), rtol=1e-6)
    assert rejecting.clipped == 1 and rejecting.raw_norms == pytest.approx([1.5])

    clipping = NormClip(LastDeltaWins(), bounds, reject=False)
    clipping.add(update(3.0, 4.0))  # the same update is clipped to the smallest bound instead
    np.testing.assert_allclose(clipping.result(vec(0.0, 0.0)), vec(0.6, 0.8), rtol=1e-6)
    assert clipping.clipped == 1 and clipping.raw_norms == [5.0]


def test_unbounded_passes_every_update_on_and_still_records_its_norm() -> None:
    inner = LastDeltaWins()
    fold = NormClip(inner, NormBounds(None, None), reject=True)
    fold.add(update(300.0, 400.0))
    np.testing.assert_array_equal(inner.seen[-1], vec(300.0, 400.0))
    assert fold.clipped == 0 and fold.raw_norms == [500.0]


def test_a_refused_add_leaves_the_clipping_and_the_fold_unchanged() -> None:
    inner = LastDeltaWins()
    fold = NormClip(inner, NormBounds(hard=2.5, clip=2.5))
    fold.add(update(3.0, 4.0))
    with pytest.raises(AggregationError, match="refused by the test fold"):
        fold.add(update(30.0, 40.0, examples=13))  # would be clipped, but the fold refuses it
    assert len(inner.seen) == 1 and fold.clipped == 1 and fold.raw_norms == [5.0]


def test_the_norm_is_computed_in_float64() -> None:
    # 3e20**2 overflows float32; the norm itself does not.
    assert l2(vec(3e20, 4e20)) == pytest.approx(5e20)


# --- the bounds from the settings and the history --------------------------------------------

W = vec(3.0, 4.0)  # a global model of norm 5


@pytest.mark.parametrize(
    ("changes", "initial_norm", "median", "expected"),
    [
        ({}, None, None, NormBounds(2.5, 2.5)),  # 0.5 x 5, no history: the ratio bound alone
        ({}, None, 0.4, NormBounds(2.5, 0.4)),  # the adaptive bound: 1.0 x the previous median
        ({"update_norm_adaptive": 2.0}, None, 0.4, NormBounds(2.5, 0.8)),
        ({}, 10.0, None, NormBounds(5.0, 5.0)),  # the initial model's norm is the floor
        ({"max_update_norm": 1.0}, None, 3.0, NormBounds(1.0, 1.0)),  # the smallest hard bound
        ({"update_norm_ratio": 0.0}, None, 0.4, NormBounds(None, 0.4)),
        ({"update_norm_ratio": 0.0, "update_norm_adaptive": 0.0}, None, 0.4, NormBounds(None, None)),
    ],
)
def test_norm_bounds(
    changes: dict[str, float], initial_norm: float | None, median: float | None, expected: NormBounds
) -> None:
    assert norm_bounds(RoundSettings(**changes), W, initial_norm, median) == expected


def test_a_zero_model_with_a_zero_initial_model_keeps_the_ratio_of_one() -> None:
    assert norm_bounds(RoundSettings(), vec(0.0, 0.0), 0.0, None) == NormBounds(0.5, 0.5)


def test_the_adaptive_bound_is_the_median_raw_norm_of_the_round_before() -> None:
    history = InfluenceHistory(initial_norm=5.0)
    folds = build_round_folds(RoundSettings(), W, history, parameter_count=2, n_features=1)
    assert folds.limits.bounds == NormBounds(2.5, 2.5)
    for values in [(0.375, 0.5), (0.75, 1.0), (30.0, 40.0)]:  # norms 0.625, 1.25 and 50 (clipped)
        folds.add_update(update(*values, examples=10))
    assert folds.updates.clipped == 1 and folds.updates.raw_norms == [0.625, 1.25, 50.0]
    history = folds.next_history(history)
    # The median of the norms before clipping: the outsized update does not move it.
    assert history == InfluenceHistory(update_norm_median=1.25, claim_median=10.0, initial_norm=5.0)
    assert round_limits(RoundSettings(), W, history).bounds == NormBounds(2.5, 1.25)


def test_a_round_without_updates_keeps_the_history() -> None:
    before = InfluenceHistory(update_norm_median=0.7, claim_median=40.0, initial_norm=5.0)
    empty = build_round_folds(RoundSettings(), W, before, 2, 1)
    assert empty.next_history(before) == before
    moments = build_round_folds(RoundSettings(), W, before, 2, 1)
    moments.add_moments(MomentsPayload(3, np.array([3.0]), np.array([5.0])))
    moments.add_moments(MomentsPayload(7, np.array([7.0]), np.array([9.0])))
    # A moments round has claims (its counts) but no update norms.
    assert moments.next_history(before) == InfluenceHistory(0.7, 5.0, 5.0)


# --- weighting ------------------------------------------------------------------------------


def test_weightings() -> None:
    assert equal_weights(1_000_000) == 1.0
    assert CappedClaims(500.0)(1_000_000) == 500.0 and CappedClaims(500.0)(20) == 20.0
    assert CappedClaims()(7) == 7.0  # uncapped: plain FedAvg
    assert update_weighting(None) is equal_weights
    assert update_weighting(200.0) == CappedClaims(200.0)


@pytest.mark.parametrize(
    ("changes", "median", "claims", "weights"),
    [
        ({}, None, None, None),  # no claim seen yet
        ({}, 100.0, 100.0, None),  # equal weighting: only the metrics are capped
        ({"weighting": "examples"}, None, None, None),  # counts once until a claim was seen
        ({"weighting": "examples"}, 100.0, 100.0, 100.0),
        ({"weighting": "examples", "example_cap_ratio": 2.0}, 100.0, 200.0, 200.0),
        ({"weighting": "examples", "example_cap_ratio": 2.0}, 0.2, 1.0, 1.0),  # never below 1
    ],
)
def test_the_caps_come_from_the_previous_rounds_median_claim(
    changes: dict[str, object], median: float | None, claims: float | None, weights: float | None
) -> None:
    s = RoundSettings(**changes)
    assert claim_cap(s, median) == claims and weight_cap(s, median) == weights
    limits = round_limits(s, W, InfluenceHistory(claim_median=median))
    assert (limits.claim_cap, limits.weight_cap) == (claims, weights)


# --- FedAvg as a fold -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weighting", "second_claim", "expected"),
    [
        # ([1, 0] x 1 + [0, 3] x 3) / 4 = [0.25, 2.25]; the model [1, 1] + 0.5 x that
        (CappedClaims(), 3, vec(1.125, 2.125)),
        # ([1, 0] + [0, 3]) / 2 = [0.5, 1.5]
        (equal_weights, 3, vec(1.25, 1.75)),
        # claims 1 and 5, capped at 3: ([1, 0] x 1 + [0, 3] x 3) / 4 again
        (CappedClaims(3.0), 5, vec(1.125, 2.125)),
    ],
    ids=["claims", "equal", "capped"],
)
def test_fedavg_weights_each_delta(
    weighting: Weighting, second_claim: int, expected: npt.NDArray[np.float32]
) -> None:
    fold = FedAvg(2, 100, 0.5, weighting)
    fold.add(update(1.0, 0.0, examples=1))
    fold.add(update(0.0, 3.0, examples=second_claim))
    np.testing.assert_array_equal(fold.result(vec(1.0, 1.0)), expected)


def test_a_refused_fedavg_add_changes_nothing() -> None:
    fold = FedAvg(2, 100, 1.0, CappedClaims())
    fold.add(update(1.0, 2.0, examples=4))
    for bad in [update(1.0, 2.0, 3.0), update(1.0, 2.0, examples=101), update(math.nan, 0.0)]:
        with pytest.raises(AggregationError):
            fold.add(bad)
    assert (fold.mean.count, fold.mean.total_examples, fold.mean.total_weight) == (1, 4, 4.0)
    np.testing.assert_array_equal(fold.result(vec(0.0, 0.0)), vec(1.0, 2.0))


def test_a_bad_server_learning_rate_fails_at_the_result_not_before() -> None:
    fold = FedAvg(2, 100, 0.0, equal_weights)
    fold.add(update(1.0, 2.0))
    with pytest.raises(AggregationError, match=exactly("server_learning_rate must be > 0, got 0.0")):
        fold.result(vec(0.0, 0.0))


# --- the round's metrics --------------------------------------------------------------------


def test_metrics_weigh_claims_capped_and_count_what_the_fold_accepted() -> None:
    inner = LastDeltaWins()
    metrics = RoundMetrics(inner, CappedClaims(20.0))
    metrics.add(update(1.0, 0.0, examples=10, train_loss=1.0, evaluation=Evaluation(10, 2.0, 0.5, None)))
    metrics.add(update(0.0, 1.0, examples=30, train_loss=3.0, evaluation=Evaluation(40, 4.0, None, 0.1)))
    # Claims 10 and 30, capped at 20: (10 x 1 + 20 x 3) / 30; evaluations 10 and 40 -> 10 and 20.
    assert metrics.train_loss.mean == pytest.approx(7 / 3)
    assert metrics.eval_loss.mean == pytest.approx((10 * 2.0 + 20 * 4.0) / 30)
    assert metrics.eval_accuracy.mean == 0.5 and metrics.eval_accuracy.count == 1
    assert metrics.eval_mse.mean == 0.1 and metrics.eval_mse.count == 1
    assert metrics.eval_loss.total_weight == 30.0
    assert metrics.examples == 40  # what the devices claimed, uncapped
    assert len(inner.seen) == 2


@pytest.mark.parametrize(
    "bad",
    [
        update(1.0, 0.0, examples=13),  # the inner fold refuses it
        update(1.0, 0.0, train_loss=1.7e308, examples=10),  # the weighted loss sum overflows
        update(1.0, 0.0, evaluation=Evaluation(10, 1.7e308, 0.5, None)),
    ],
    ids=["fold refuses", "train loss overflows", "evaluation overflows"],
)
def test_a_refused_metrics_add_leaves_metrics_and_fold_unchanged(bad: UpdatePayload) -> None:
    inner = LastDeltaWins()
    metrics = RoundMetrics(inner, CappedClaims())
    metrics.add(
        update(0.0, 1.0, examples=2, train_loss=1.7e308 / 4, evaluation=Evaluation(2, 1.7e308 / 4, 1, None))
    )
    before = (metrics.train_loss.mean, metrics.eval_loss.mean, metrics.eval_accuracy.mean, metrics.examples)
    with pytest.raises(AggregationError):
        metrics.add(bad)
    after = (metrics.train_loss.mean, metrics.eval_loss.mean, metrics.eval_accuracy.mean, metrics.examples)
    assert after == before and len(inner.seen) == 1
    assert (metrics.train_loss.count, metrics.eval_loss.count) == (1, 1)


def test_regression_mse_is_weighted_like_the_loss_and_a_refused_add_keeps_it() -> None:
    """A regression task's devices report ``mse`` (no accuracy): weighted by capped claims."""
    inner = LastDeltaWins()
    metrics = RoundMetrics(inner, CappedClaims(20.0))
    metrics.add(update(1.0, 0.0, evaluation=Evaluation(10, 0.3, None, 0.25)))
    metrics.add(update(0.0, 1.0, evaluation=Evaluation(40, 0.2, None, 1.7e308 / 40)))
    assert metrics.eval_mse.mean == pytest.approx(10 / 30 * 0.25 + 20 / 30 * (1.7e308 / 40))
    assert metrics.eval_accuracy.count == 0 and metrics.eval_mse.count == 2
    before = (metrics.eval_loss.mean, metrics.eval_mse.mean, metrics.eval_mse.count, len(inner.seen))
    with pytest.raises(AggregationError):  # the weighted MSE sum overflows: refused whole
        metrics.add(update(1.0, 1.0, evaluation=Evaluation(20, 0.1, None, 1.7e308)))
    assert (metrics.eval_loss.mean, metrics.eval_mse.mean, metrics.eval_mse.count, len(inner.seen)) == before


# --- moments as a fold ----------------------------------------------------------------------


def test_pooled_moments_are_the_exact_pooled_mean_and_std() -> None:
    fold = MomentsAggregation(1, 100, "pooled")
    fold.add(MomentsPayload(2, np.array([4.0]), np.array([10.0])))  # samples 1, 3
    fold.add(MomentsPayload(2, np.array([12.0]), np.array([74.0])))  # samples 5, 7
    assert fold.count == 4
    # mean 16 / 4 = 4; variance 84 / 4 - 16 = 5
    assert fold.result() == MomentsResult(Normalisation((4.0,), (math.sqrt(5.0),)), ())


def test_robust_moments_name_the_outlier_rows() -> None:
    fold = MomentsAggregation(1, 1000, "robust")
    for mean in [1.0, 1.1, 0.9, 1.0, 1e4]:  # ten samples each, variance 1 around the mean
        fold.add(MomentsPayload(10, np.array([10 * mean]), np.array([10 * (mean * mean + 1.0)])))
    result = fold.result()
    assert result.outlier_rows == (4,)
    assert result.normalisation.mean[0] == pytest.approx(1.0)


def test_a_refused_moments_add_changes_nothing_and_an_unknown_method_fails_at_the_result() -> None:
    fold = MomentsAggregation(1, 100, "median")  # configuration refuses it; the engine must not crash
    fold.add(MomentsPayload(2, np.array([4.0]), np.array([10.0])))
    with pytest.raises(AggregationError, match="negative variance"):
        fold.add(MomentsPayload(2, np.array([4.0]), np.array([1.0])))  # sum**2 > count x sum_sq
    with pytest.raises(AggregationError, match="over the limit of 100"):
        fold.add(MomentsPayload(101, np.array([4.0]), np.array([10.0])))
    assert fold.count == 2
    with pytest.raises(
        AggregationError, match=exactly("unknown moments aggregation 'median'; known: pooled, robust")
    ):
        fold.result()


# --- the factory ----------------------------------------------------------------------------


def test_the_factory_chains_clipping_metrics_and_the_strategy() -> None:
    s = RoundSettings(weighting="examples", update_norm_policy="reject", server_learning_rate=0.5)
    history = InfluenceHistory(update_norm_median=1.0, claim_median=10.0, initial_norm=5.0)
    folds = build_round_folds(s, W, history, parameter_count=2, n_features=3)
    assert isinstance(folds, RoundFolds)
    assert folds.limits == RoundLimits(NormBounds(2.5, 1.0), weight_cap=10.0, claim_cap=10.0)
    assert folds.updates.reject and folds.updates.inner is folds.metrics
    assert isinstance(folds.metrics.inner, FedAvg) and folds.metrics.weighting == CappedClaims(10.0)
    assert folds.metrics.inner.weighting == CappedClaims(10.0)
    assert isinstance(folds.moments, MomentsAggregation) and folds.moments.method == "robust"
    folds.add_update(update(0.375, 0.5, examples=5))  # norm 0.625: unclipped, weight 5
    folds.add_update(update(0.0, 2.0, examples=50))  # norm 2: clipped to [0, 1], weight capped at 10
    assert folds.claims == [5, 50] and folds.updates.clipped == 1
    # [3, 4] + 0.5 x ([0.375, 0.5] x 5 + [0, 1] x 10) / 15 = [3.0625, 4 + 0.5 x 12.5 / 15]
    np.testing.assert_allclose(folds.updates.result(W), vec(3.0625, 4.0 + 6.25 / 15), rtol=1e-6)


def test_the_norm_bound_is_refused_before_any_metric_is_looked_at() -> None:
    """docs/protocol.md orders norm_too_large before rejected_by_aggregation."""
    folds = build_round_folds(RoundSettings(update_norm_policy="reject"), W, InfluenceHistory(), 2, 1)
    with pytest.raises(NormTooLarge):
        folds.add_update(update(30.0, 40.0, train_loss=1.7e308, examples=10))
    folds.add_update(update(0.375, 0.5, train_loss=1.7e308 / 20, examples=10))
    with pytest.raises(AggregationError) as caught:  # within the bound: the metric overflows
        folds.add_update(update(0.375, 0.5, train_loss=1.7e308, examples=10))
    assert not isinstance(caught.value, NormTooLarge)
    assert folds.claims == [10] and folds.updates.raw_norms == [0.625] and folds.metrics.examples == 10
