"""Federated feature normalisation: devices send moments, never samples.

Each device reports, per feature, its sample count, sum and sum of squares. These add up
across devices, so the aggregator can get the exact global mean and standard deviation (as if
all samples were pooled) from ``fedge.protocol.model_manifest.normalisation_from_moments``: the
``"pooled"`` method.

Moments come from untrusted devices, so each report is checked for being possible at all: a
sum of squares is never negative, and by Cauchy-Schwarz ``sum**2 <= count * sum_sq`` for any
real samples (a violation would mean a negative variance). Possible is not honest, though: one
device reporting feature values of 1e4 with a plausible count moves the pooled mean of a
feature whose honest values are near 1 to about 2,000, and the normalisation is then fixed for
the model's life. So the default ``"robust"`` method (:func:`robust_normalisation`) keeps every
device's moments and, per feature:

1. weights each device by its count capped at the median count (a claimed count buys nothing
   beyond a typical device's);
2. excludes devices whose mean lies more than :data:`OUTLIER_Z` robust standard deviations
   from the median device mean (the robust standard deviation combines the median
   within-device variance and the spread of device means, 1.4826 x their MAD); the half of the
   devices closest to the median is always kept;
3. caps each device's variance at :data:`VARIANCE_CAP` x the median device variance;
4. pools what is left exactly, like ``"pooled"`` does.

With fewer compromised devices than honest ones, an excluded device has no influence at all,
and one that stays inside the bounds moves a feature's mean by at most its weight share times
``OUTLIER_Z`` robust standard deviations, and its variance by at most its share times
``VARIANCE_CAP + OUTLIER_Z**2`` median variances (its capped variance plus its distance from
the mean). With k of n devices compromised, counts capped at the median make that share at
most k x the median count over the capped total: about k / n when devices hold similar
amounts of data. Memory: two float64 vectors per device for the round (96 floats for
har-watch), which the robust median needs. :class:`MomentsAggregation` is this as the round
engine's moments fold (``fedge.aggregator.strategies.fold.MomentsFold``). Pure numpy, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from fedge.aggregator.fedavg import AggregationError
from fedge.aggregator.strategies.fold import MomentsResult
from fedge.protocol.errors import ManifestError
from fedge.protocol.messages import MomentsPayload
from fedge.protocol.model_manifest import Normalisation, normalisation_from_moments

__all__ = [
    "CAUCHY_SCHWARZ_RTOL",
    "OUTLIER_Z",
    "VARIANCE_CAP",
    "MomentsAccumulator",
    "MomentsAggregation",
    "RobustNormalisation",
    "robust_normalisation",
]

#: Relative slack for ``mean**2 <= mean_sq``. Honest moments of a constant feature meet it
#: with equality, and a device summing in float32 can overshoot by a few ulps times log(n);
#: a larger excess cannot be rounding. Loose is safe: anything it lets through has a variance
#: of practically zero, which the normalisation clamps anyway.
CAUCHY_SCHWARZ_RTOL = 1e-5

#: A device whose mean of a feature is more than this many robust standard deviations from the
#: median device mean is left out of that feature's normalisation. Honest devices with
#: different data (one subject moves more than another) lie well inside: the robust standard
#: deviation includes both the within-device variance and the spread of device means.
OUTLIER_Z = 3.0
#: A device's variance of a feature counts as at most this many times the median device
#: variance (a standard deviation 3x the typical one), so one device cannot flatten a feature
#: to zero by reporting a huge spread.
VARIANCE_CAP = 9.0
#: MAD -> standard deviation for normally distributed values.
_MAD_TO_STD = 1.4826

FeatureValues = Sequence[float] | npt.NDArray[np.floating[Any]]


class RobustNormalisation:
    """The result of :func:`robust_normalisation`: the normalisation and what was left out."""

    def __init__(self, normalisation: Normalisation, excluded: npt.NDArray[np.bool_]) -> None:
        self.normalisation = normalisation
        #: ``excluded[i, f]``: device ``i``'s mean of feature ``f`` was an outlier.
        self.excluded = excluded

    @property
    def outlier_devices(self) -> list[int]:
        """Indices (in report order) of devices left out of at least one feature."""
        return [int(i) for i in np.flatnonzero(self.excluded.any(axis=1))]


def robust_normalisation(
    counts: npt.NDArray[np.float64],
    sums: npt.NDArray[np.float64],
    sums_sq: npt.NDArray[np.float64],
    min_std: float = 1e-6,
) -> RobustNormalisation:
    """Per-feature mean and standard deviation from devices' moments, bounded against outliers.

    ``counts`` is ``(m,)``, ``sums`` and ``sums_sq`` are ``(m, F)``: one row per device, already
    checked by :meth:`MomentsAccumulator.add`. The steps and the bound they give are in the
    module docstring.
    """
    n = np.asarray(counts, np.float64)
    means = sums / n[:, None]
    variances = np.maximum(sums_sq / n[:, None] - means * means, 0.0)
    weights = np.minimum(n, np.median(n))
    median_mean = np.median(means, axis=0)
    deviation = np.abs(means - median_mean)
    median_deviation = np.median(deviation, axis=0)
    median_variance = np.median(variances, axis=0)
    robust_std = np.sqrt(median_variance + (_MAD_TO_STD * median_deviation) ** 2)
    keep = deviation <= np.maximum(OUTLIER_Z * robust_std, median_deviation)
    capped_variances = np.minimum(variances, VARIANCE_CAP * median_variance)
    w = weights[:, None] * keep
    total = w.sum(axis=0)  # > 0: the closer half is always kept, and every count is >= 1
    mean = (w * means).sum(axis=0) / total
    variance = (w * (capped_variances + (means - mean) ** 2)).sum(axis=0) / total
    std = np.maximum(np.sqrt(variance), min_std)
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
        raise AggregationError("moments: the robust normalisation is not finite")
    try:
        normalisation = Normalisation(tuple(mean.tolist()), tuple(std.tolist()))
    except ManifestError as exc:
        raise AggregationError(f"moments: {exc}") from None
    return RobustNormalisation(normalisation, ~keep)


class MomentsAccumulator:
    """Collects devices' per-feature (count, sum, sum of squares) for a global normalisation.

    Keeps the running totals (for ``"pooled"``) and each device's row (for ``"robust"``). A
    rejected report leaves everything exactly as it was.
    """

    def __init__(self, n_features: int, *, max_count_per_update: int | None = None) -> None:
        if isinstance(n_features, bool) or not isinstance(n_features, int) or n_features < 1:
            raise AggregationError(f"n_features must be an integer >= 1, got {n_features!r}")
        if max_count_per_update is not None and (
            isinstance(max_count_per_update, bool)
            or not isinstance(max_count_per_update, int)
            or max_count_per_update < 1
        ):
            raise AggregationError(
                f"max_count_per_update must be an integer >= 1 or None, got {max_count_per_update!r}"
            )
        self.n_features = n_features
        # Without a cap, one device claiming a huge count dominates the global mean.
        self.max_count_per_update = max_count_per_update
        self._count = 0
        self._updates = 0
        self._sums = np.zeros(n_features, dtype=np.float64)
        self._sums_sq = np.zeros(n_features, dtype=np.float64)
        self._rows: list[tuple[int, npt.NDArray[np.float64], npt.NDArray[np.float64]]] = []
        self.last_outlier_devices: list[int] = []

    @property
    def count(self) -> int:
        """Samples counted over all accepted reports."""
        return self._count

    @property
    def updates(self) -> int:
        """How many reports were accepted."""
        return self._updates

    def add(self, count: int, sums: FeatureValues, sums_sq: FeatureValues) -> None:
        """Adds one device's moments after checking they could come from real samples."""
        self.absorb([(count, sums, sums_sq)])

    def _checked_row(
        self, count: int, sums: FeatureValues, sums_sq: FeatureValues
    ) -> tuple[int, npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 1:
            raise AggregationError(f"moments: count must be an integer >= 1, got {count!r}")
        if self.max_count_per_update is not None and count > self.max_count_per_update:
            raise AggregationError(
                f"moments: count {count} is over the limit of {self.max_count_per_update} per update"
            )
        n = int(count)
        s = self._vector(sums, "sums")
        sq = self._vector(sums_sq, "sums_sq")
        if np.any(sq < 0):
            raise AggregationError(f"moments: sums_sq[{int(np.argmax(sq < 0))}] is negative")
        # sum**2 <= n * sum_sq, divided by n**2 so it cannot overflow for finite inputs.
        with np.errstate(over="ignore"):
            mean = s / n
            excess = mean * mean > (sq / n) * (1 + CAUCHY_SCHWARZ_RTOL)
        if np.any(excess):
            i = int(np.argmax(excess))
            raise AggregationError(
                f"moments: feature {i} is impossible: sum**2 ({s[i] ** 2:.6g}) exceeds "
                f"count * sum_sq ({n * sq[i]:.6g}), i.e. a negative variance"
            )
        return n, s, sq

    def absorb(self, rows: Sequence[tuple[int, FeatureValues, FeatureValues]]) -> None:
        """Adds several devices' moments (one device's, or a replica's partial) all or nothing:
        every row is checked and the totals computed before anything changes."""
        checked = [self._checked_row(*row) for row in rows]
        new_sums, new_sums_sq = self._sums.copy(), self._sums_sq.copy()
        with np.errstate(over="ignore"):
            for _, s, sq in checked:
                new_sums += s
                new_sums_sq += sq
        if not (np.all(np.isfinite(new_sums)) and np.all(np.isfinite(new_sums_sq))):
            raise AggregationError("moments: the totals overflow")
        self._sums, self._sums_sq = new_sums, new_sums_sq
        self._rows.extend(checked)
        self._count += sum(row[0] for row in checked)
        self._updates += len(checked)

    def totals(self) -> tuple[int, npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """The pooled (count, sums, sums of squares): what a building gateway reports upstream."""
        return self._count, self._sums.copy(), self._sums_sq.copy()

    @property
    def rows(self) -> list[tuple[int, npt.NDArray[np.float64], npt.NDArray[np.float64]]]:
        """Each accepted report's (count, sums, sums_sq), in arrival order (a replica's partial)."""
        return list(self._rows)

    @property
    def counts(self) -> list[int]:
        """Each accepted report's count, in arrival order."""
        return [row[0] for row in self._rows]

    def normalisation(self, min_std: float = 1e-6, method: str = "pooled") -> Normalisation:
        """The mean and (population) standard deviation of every feature: pooled exactly over
        all reports, or ``"robust"`` (:func:`robust_normalisation`; which reports were left
        out as outliers is in :attr:`last_outlier_devices`)."""
        if self._count < 2:
            raise AggregationError(f"normalisation needs at least 2 samples, got {self._count}")
        if method == "robust":
            result = robust_normalisation(
                np.array([row[0] for row in self._rows], np.float64),
                np.stack([row[1] for row in self._rows]),
                np.stack([row[2] for row in self._rows]),
                min_std,
            )
            self.last_outlier_devices = result.outlier_devices
            return result.normalisation
        if method != "pooled":
            raise AggregationError(f"unknown moments aggregation {method!r}; known: pooled, robust")
        try:
            return normalisation_from_moments(
                self._count, self._sums.tolist(), self._sums_sq.tolist(), min_std=min_std
            )
        except ManifestError as exc:  # e.g. a mean beyond float range after division
            raise AggregationError(f"moments: {exc}") from None

    def _vector(self, values: Any, what: str) -> npt.NDArray[np.float64]:
        try:
            arr = np.asarray(values)
        except (ValueError, TypeError):  # ragged nesting
            raise AggregationError(f"moments: {what} must be a flat list of numbers") from None
        if arr.dtype == np.bool_ or not (
            np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
        ):
            raise AggregationError(f"moments: {what} must be real numbers, got dtype {arr.dtype}")
        if arr.shape != (self.n_features,):
            raise AggregationError(f"moments: {what} must have shape ({self.n_features},), got {arr.shape}")
        out = arr.astype(np.float64)
        if not np.all(np.isfinite(out)):
            raise AggregationError(f"moments: {what} contains NaN or infinity")
        return out


class MomentsAggregation:
    """The moments round's fold (``fedge.aggregator.strategies.fold.MomentsFold``): devices'
    moments into the normalisation by ``method`` (``[rounds] moments_aggregation``).

    An unknown method fails at ``result`` (the round is aborted) rather than when the round
    opens: configuration already refuses one, and a round engine must never crash on it.
    """

    def __init__(self, n_features: int, max_count_per_update: int | None, method: str) -> None:
        self.accumulator = MomentsAccumulator(n_features, max_count_per_update=max_count_per_update)
        self.method = method

    @property
    def count(self) -> int:
        return self.accumulator.count

    def add(self, moments: MomentsPayload) -> None:
        self.accumulator.add(moments.count, moments.sums, moments.sums_sq)

    def result(self) -> MomentsResult:
        normalisation = self.accumulator.normalisation(method=self.method)
        return MomentsResult(normalisation, tuple(self.accumulator.last_outlier_devices))
