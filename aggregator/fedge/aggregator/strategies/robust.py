"""Robust aggregation: a round's next model from statistics a few bad updates cannot drag far.

- ``median``: the coordinate-wise median of the updates (Yin et al. 2018).
- ``trimmed_mean``: per coordinate, the mean of the values left once the ``floor(trim_fraction
  * n)`` smallest and as many largest are dropped (Yin et al. 2018).
- ``krum``: the one update whose ``n - f - 2`` nearest neighbours (squared L2) are closest,
  for ``f`` assumed Byzantine devices, ``n > 2f + 2`` (Blanchard et al. 2017).
- ``multi_krum``: the mean of the ``m`` updates with the best Krum scores (``m = 0``: ``n - f``;
  scored once, as Flower and most implementations do, not re-scored after each pick).

None of these is a running sum: each needs every update of the round, so a :class:`RobustFold`
holds them (float32, ``4 n P`` bytes) and computes at :meth:`RobustFold.result` in float64:
the ``8 n P`` stack plus the sort's or the median's working copy, a measured peak of about
``20 n P`` bytes in all (Krum's ``n x n`` distances on top). ``max_updates``
(``[rounds] robust_max_updates``) caps ``n``: an update beyond it is refused with
:class:`TooManyUpdates` (``too_many_updates``) and changes nothing. Every update counts once
(no example weights), and the norm bounds (``NormClip``) still apply in front.

The next model is ``global + server_learning_rate * aggregate``. Pure numpy, no I/O.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from fedge.aggregator.fedavg import AggregationError, _check_weight_vector
from fedge.protocol.messages import UpdatePayload

__all__ = [
    "Krum",
    "Median",
    "RobustFold",
    "TooManyUpdates",
    "TrimmedMean",
    "coordinate_median",
    "krum_scores",
    "krum_select",
    "trimmed_mean",
]

F64 = npt.NDArray[np.float64]


class TooManyUpdates(AggregationError):
    """A robust fold already holds its ``max_updates`` updates."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the round already holds robust_max_updates={limit} updates")
        self.limit = limit


def coordinate_median(updates: F64) -> F64:
    """The median of each column of ``updates`` (``n x P``)."""
    out: F64 = np.median(updates, axis=0)
    return out


def trimmed_mean(updates: F64, trim_fraction: float) -> F64:
    """Per column, the mean after dropping the ``floor(trim_fraction * n)`` smallest and
    largest values (``trim_fraction`` in ``[0, 0.5)``, so at least one value is left)."""
    n = updates.shape[0]
    k = math.floor(trim_fraction * n)
    if not 0 <= 2 * k < n:
        raise AggregationError(f"trim_fraction={trim_fraction} leaves no value of {n}")
    ordered = np.sort(updates, axis=0)
    out: F64 = ordered[k : n - k].mean(axis=0)
    return out


def krum_scores(updates: F64, byzantine: int) -> F64:
    """Each update's Krum score: the sum of its squared L2 distances to its ``n - f - 2``
    nearest other updates. Needs ``n > 2f + 2``."""
    n = updates.shape[0]
    if n <= 2 * byzantine + 2:
        raise AggregationError(
            f"Krum with byzantine_devices={byzantine} needs more than {2 * byzantine + 2} updates, got {n}"
        )
    squares = np.einsum("ij,ij->i", updates, updates)
    distances = squares[:, None] + squares[None, :] - 2.0 * (updates @ updates.T)
    np.maximum(distances, 0.0, out=distances)
    np.fill_diagonal(distances, np.inf)
    nearest = np.sort(distances, axis=1)[:, : n - byzantine - 2]
    out: F64 = nearest.sum(axis=1)
    return out


def krum_select(updates: F64, byzantine: int, select: int) -> tuple[int, ...]:
    """The indices of the ``select`` best-scored updates (0: ``n - f``; at most ``n - f``),
    best first; ties go to the earlier update."""
    n = updates.shape[0]
    scores = krum_scores(updates, byzantine)
    m = n - byzantine if select == 0 else min(select, n - byzantine)
    return tuple(int(i) for i in np.argsort(scores, kind="stable")[:m])


class RobustFold:
    """Holds a round's updates (at most ``max_updates``) and aggregates them at
    :meth:`result`; a subclass says how (:meth:`aggregate`)."""

    def __init__(
        self,
        parameter_count: int,
        max_examples_per_update: int,
        max_updates: int,
        server_learning_rate: float,
    ) -> None:
        self.parameter_count = parameter_count
        self.max_examples_per_update = max_examples_per_update
        self.max_updates = max_updates
        self.server_learning_rate = server_learning_rate
        self.updates: list[npt.NDArray[np.float32]] = []

    @property
    def count(self) -> int:
        return len(self.updates)

    def add(self, update: UpdatePayload) -> None:
        """Holds a copy of the delta; refuses a bad one, or one over the cap, changing nothing."""
        delta = _check_weight_vector(update.delta, self.parameter_count, "delta")
        n = update.examples
        if (
            isinstance(n, bool)
            or not isinstance(n, int | np.integer)
            or not 1 <= n <= self.max_examples_per_update
        ):
            raise AggregationError(
                f"examples must be an integer in 1..{self.max_examples_per_update}, got {n!r}"
            )
        if len(self.updates) >= self.max_updates:
            raise TooManyUpdates(self.max_updates)
        self.updates.append(delta.copy())

    def aggregate(self, updates: F64) -> F64:
        raise NotImplementedError

    def result(self, global_weights: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        _check_weight_vector(global_weights, self.parameter_count, "global_weights")
        if not self.updates:
            raise AggregationError("no updates were added; there is nothing to aggregate")
        aggregate = self.aggregate(np.stack(self.updates).astype(np.float64))
        with np.errstate(over="ignore", invalid="ignore"):
            out = (global_weights.astype(np.float64) + self.server_learning_rate * aggregate).astype(
                np.float32
            )
        if not np.all(np.isfinite(out)):
            raise AggregationError("the aggregated weights overflow float32")
        return out


class Median(RobustFold):
    """``strategy = "median"``."""

    def aggregate(self, updates: F64) -> F64:
        return coordinate_median(updates)


class TrimmedMean(RobustFold):
    """``strategy = "trimmed_mean"``."""

    def __init__(
        self,
        parameter_count: int,
        max_examples_per_update: int,
        max_updates: int,
        server_learning_rate: float,
        trim_fraction: float,
    ) -> None:
        super().__init__(parameter_count, max_examples_per_update, max_updates, server_learning_rate)
        self.trim_fraction = trim_fraction

    def aggregate(self, updates: F64) -> F64:
        return trimmed_mean(updates, self.trim_fraction)


class Krum(RobustFold):
    """``strategy = "krum"`` (``select = 1``) or ``"multi_krum"`` (``select``: 0 = ``n - f``)."""

    def __init__(
        self,
        parameter_count: int,
        max_examples_per_update: int,
        max_updates: int,
        server_learning_rate: float,
        byzantine: int,
        select: int,
    ) -> None:
        super().__init__(parameter_count, max_examples_per_update, max_updates, server_learning_rate)
        self.byzantine = byzantine
        self.select = select
        #: Set by :meth:`result`: the indices (in ``add`` order) of the updates averaged.
        self.selected: tuple[int, ...] = ()

    def aggregate(self, updates: F64) -> F64:
        self.selected = krum_select(updates, self.byzantine, self.select)
        out: F64 = updates[list(self.selected)].mean(axis=0)
        return out
