"""Federated feature normalisation: devices send moments, never samples.

Each device reports, per feature, its sample count, sum and sum of squares. These add up
across devices, so the aggregator gets the exact global mean and standard deviation (as if all
samples were pooled) from ``protocol.model_manifest.normalisation_from_moments``.

Moments come from untrusted devices, so each report is checked for being possible at all: a
sum of squares is never negative, and by Cauchy-Schwarz ``sum**2 <= count * sum_sq`` for any
real samples (a violation would mean a negative variance). Pure numpy, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from aggregator.fedavg import AggregationError
from protocol.errors import ManifestError
from protocol.model_manifest import Normalisation, normalisation_from_moments

__all__ = ["CAUCHY_SCHWARZ_RTOL", "MomentsAccumulator"]

#: Relative slack for ``mean**2 <= mean_sq``. Honest moments of a constant feature meet it
#: with equality, and a device summing in float32 can overshoot by a few ulps times log(n);
#: a larger excess cannot be rounding. Loose is safe: anything it lets through has a variance
#: of practically zero, which the normalisation clamps anyway.
CAUCHY_SCHWARZ_RTOL = 1e-5

FeatureValues = Sequence[float] | npt.NDArray[np.floating[Any]]


class MomentsAccumulator:
    """Sums devices' per-feature (count, sum, sum of squares) into a global normalisation.

    A rejected report leaves the totals exactly as they were.
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
        with np.errstate(over="ignore"):
            new_sums = self._sums + s
            new_sums_sq = self._sums_sq + sq
        if not (np.all(np.isfinite(new_sums)) and np.all(np.isfinite(new_sums_sq))):
            raise AggregationError("moments: the totals overflow")
        self._sums, self._sums_sq = new_sums, new_sums_sq
        self._count += n
        self._updates += 1

    def normalisation(self, min_std: float = 1e-6) -> Normalisation:
        """The pooled mean and (population) standard deviation of every feature."""
        if self._count < 2:
            raise AggregationError(f"normalisation needs at least 2 samples, got {self._count}")
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
