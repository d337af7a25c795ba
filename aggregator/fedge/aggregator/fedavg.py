"""Streaming FedAvg: the new global model as the weighted mean of device updates.

An update is a delta ``local_weights - global_weights`` plus the number of examples the device
trained on, and a weight: the example count in plain FedAvg, 1 or a capped count when the
round engine bounds each device's influence (``[rounds] weighting``). The aggregator folds each
update into a running ``sum(weight * delta)`` as it arrives and forgets it, so memory grows
with the model (a few arrays of ``P`` floats), never with the number of devices in a round.

The sum is kept in float64. In float32, rounding error grows with every addition and depends
on the order updates arrive in (relative error up to ~``n * 6e-8`` over ``n`` updates), so two
runs of the same round could publish different models. In float64 each ``weight * delta``
product is exact for integer weights (a float32 mantissa times an integer below 2**29; equal
weighting uses 1) and summation error stays
near ``n * 1e-16``: far below float32's resolution, so any arrival order gives the same float32
global model up to one final rounding step (~1e-7 relative).

:class:`FedAvg` is this arithmetic as the round engine's update fold
(``fedge.aggregator.strategies.fold.UpdateFold``). Pure numpy, no I/O; an accumulator covers
one round and is not thread-safe.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from fedge.protocol.errors import FedgeError
from fedge.protocol.messages import UpdatePayload

__all__ = ["AggregationError", "FedAvg", "StreamingFedAvg", "WeightedMeanAccumulator"]


_FLOAT64 = np.dtype(np.float64)


class AggregationError(FedgeError):
    """An update or metric cannot be aggregated (shape, dtype, NaN, example count), or there
    is nothing to aggregate yet."""


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise AggregationError(f"{what} must be an integer >= 1, got {value!r}")
    return int(value)


def _finite_float(value: Any, what: str) -> float:
    if type(value) is float and math.isfinite(value):  # the common case, on every update's path
        return value
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise AggregationError(f"{what} must be a real number, got {type(value).__name__}")
    try:
        out = float(value)
    except OverflowError:  # an integer beyond float range
        raise AggregationError(f"{what} must be finite, got {value!r}") from None
    if not math.isfinite(out):
        raise AggregationError(f"{what} must be finite, got {out}")
    return out


def _check_weight_vector(array: Any, parameter_count: int, what: str) -> npt.NDArray[np.float32]:
    """``array`` as a finite float32 vector of ``parameter_count`` values, or an error.

    Strict on dtype on purpose: a float64 update means the device or codec deviated from the
    protocol, and silently casting it would hide that.
    """
    if not isinstance(array, np.ndarray):
        raise AggregationError(f"{what} must be a numpy array, got {type(array).__name__}")
    if array.shape != (parameter_count,):
        raise AggregationError(f"{what} must have shape ({parameter_count},), got {array.shape}")
    if array.dtype != np.float32:
        raise AggregationError(f"{what} must be float32, got {array.dtype}")
    if not np.isfinite(array).all():
        raise AggregationError(f"{what} contains NaN or infinity")
    return array


class StreamingFedAvg:
    """Weighted mean of model deltas, accumulated one update at a time.

    Every ``add`` validates before it touches any state, and the accumulation itself allocates
    nothing (it multiplies into a preallocated buffer), so an update is counted completely or
    not at all.
    """

    def __init__(self, parameter_count: int, max_examples_per_update: int) -> None:
        self.parameter_count = _positive_int(parameter_count, "parameter_count")
        # Bounds the weight a single device can claim in the mean.
        self.max_examples_per_update = _positive_int(max_examples_per_update, "max_examples_per_update")
        self._sum = np.zeros(self.parameter_count, dtype=np.float64)
        self._scratch = np.empty(self.parameter_count, dtype=np.float64)
        self._count = 0
        self._total_examples = 0
        self._total_weight = 0.0

    @property
    def count(self) -> int:
        """How many updates were accepted."""
        return self._count

    @property
    def total_examples(self) -> int:
        """The example counts of all accepted updates, summed."""
        return self._total_examples

    @property
    def total_weight(self) -> float:
        """The weights of all accepted updates, summed (the mean's denominator)."""
        return self._total_weight

    def add(self, delta: npt.NDArray[np.float32], examples: int, weight: float | None = None) -> None:
        """Folds in one device's ``local_weights - global_weights`` trained on ``examples``.

        ``weight`` is how much the update counts in the mean: ``examples`` by default (plain
        FedAvg); the round engine passes 1 for equal weighting, or a capped claim, so that a
        device's claimed example count cannot buy it the round (SECURITY.md).
        """
        _check_weight_vector(delta, self.parameter_count, "delta")
        if (
            isinstance(examples, bool)
            or not isinstance(examples, int | np.integer)
            or not 1 <= examples <= self.max_examples_per_update
        ):
            raise AggregationError(
                f"examples must be an integer in 1..{self.max_examples_per_update}, got {examples!r}"
            )
        n = int(examples)
        w = float(n) if weight is None else _finite_float(weight, "weight")
        if w <= 0:
            raise AggregationError(f"weight must be > 0, got {w}")
        # In place, no temporary: the cast into the scratch buffer, then the weight (exactly
        # np.multiply(delta, w, dtype=float64); a weight of 1 changes nothing, so it is skipped),
        # then the sum. Three passes over P floats, a third of the time of a casting multiply.
        self._scratch[:] = delta
        if w != 1.0:
            self._scratch *= w
        self._sum += self._scratch
        self._count += 1
        self._total_examples += n
        self._total_weight += w

    def add_cast(self, cast: npt.NDArray[np.float64], examples: int, weight: float) -> None:
        """:meth:`add` for a delta the caller already cast to float64 (``cast``, P finite
        values; used as scratch): the same checks on ``examples`` and ``weight``, the same
        arithmetic to the bit (the weight, then the sum), one cast pass fewer."""
        if cast.shape != (self.parameter_count,) or cast.dtype != _FLOAT64:
            raise AggregationError(f"delta must have shape ({self.parameter_count},)")
        if not (
            1 <= examples <= self.max_examples_per_update
            if type(examples) is int
            else not isinstance(examples, bool)
            and isinstance(examples, int | np.integer)
            and 1 <= examples <= self.max_examples_per_update
        ):
            raise AggregationError(
                f"examples must be an integer in 1..{self.max_examples_per_update}, got {examples!r}"
            )
        n = int(examples)
        w = _finite_float(weight, "weight")
        if w <= 0:
            raise AggregationError(f"weight must be > 0, got {w}")
        if w != 1.0:
            cast *= w
        self._sum += cast
        self._count += 1
        self._total_examples += n
        self._total_weight += w

    def parts(self) -> tuple[npt.NDArray[np.float64], int, int, float]:
        """What a replica sends the leader (``fedge.aggregator.partials``): a copy of the
        weighted sum, the count, the examples and the total weight."""
        return self._sum.copy(), self._count, self._total_examples, self._total_weight

    def absorb(self, weighted_sum: npt.NDArray[np.float64], count: int, examples: int, weight: float) -> None:
        """Adds another fold's :meth:`parts` (a replica's partial): checked first, so a refused
        partial changes nothing."""
        if not isinstance(weighted_sum, np.ndarray) or weighted_sum.shape != (self.parameter_count,):
            raise AggregationError(f"a partial's sum must have shape ({self.parameter_count},)")
        if count < 0 or examples < 0 or not math.isfinite(weight) or weight < 0:
            raise AggregationError("a partial's count, examples and weight must be >= 0")
        if count > 0 and weight <= 0:
            raise AggregationError("a partial with updates must have a positive weight")
        with np.errstate(over="ignore", invalid="ignore"):
            total = self._sum + weighted_sum
        if not np.all(np.isfinite(total)):
            raise AggregationError("a partial's sum is not finite or overflows")
        self._sum = total
        self._count += int(count)
        self._total_examples += int(examples)
        self._total_weight += float(weight)

    def mean_delta(self) -> npt.NDArray[np.float64]:
        """The weighted mean delta in float64 (a new array), e.g. for server momentum."""
        if self._count == 0:
            raise AggregationError("no updates were added; there is nothing to average")
        out: npt.NDArray[np.float64] = self._sum / self._total_weight
        return out

    def result(
        self, global_weights: npt.NDArray[np.float32], server_learning_rate: float
    ) -> npt.NDArray[np.float32]:
        """The next global model, ``global + server_learning_rate * mean_delta`` as float32.

        With a server learning rate of 1 this is the weighted mean of the devices' local
        weights. Computed in float64 and rounded once at the end.
        """
        _check_weight_vector(global_weights, self.parameter_count, "global_weights")
        lr = _finite_float(server_learning_rate, "server_learning_rate")
        if lr <= 0:
            raise AggregationError(f"server_learning_rate must be > 0, got {lr}")
        mean = self.mean_delta()
        with np.errstate(over="ignore"):
            out = (global_weights.astype(np.float64) + lr * mean).astype(np.float32)
        if not np.all(np.isfinite(out)):
            raise AggregationError("the aggregated weights overflow float32")
        return out


class FedAvg:
    """FedAvg as a strategy: the round's update fold (``UpdateFold``) over :class:`StreamingFedAvg`.

    Each update's delta counts ``weighting(examples)`` in the mean (the round's weighting:
    ``fedge.aggregator.strategies.weighting``; the claimed count itself is plain FedAvg), and
    the next model is ``global + server_learning_rate * mean``. Streaming: memory O(model).
    """

    def __init__(
        self,
        parameter_count: int,
        max_examples_per_update: int,
        server_learning_rate: float,
        weighting: Callable[[int], float],
    ) -> None:
        self.mean = StreamingFedAvg(parameter_count, max_examples_per_update)
        # Checked by ``result``, like the weights: a bad rate aborts the round, not its opening.
        self.server_learning_rate = server_learning_rate
        self.weighting = weighting

    def add(self, update: UpdatePayload) -> None:
        """Folds in the update's delta with its weight; a refused update changes nothing."""
        self.mean.add(update.delta, update.examples, self.weighting(update.examples))

    #: Takes prepared updates (``strategies.fold.PreparedFold``).
    takes_prepared = True

    def add_prepared(self, update: UpdatePayload, cast: npt.NDArray[np.float64]) -> None:
        """:meth:`add` for a delta already cast to float64 (``strategies.fold.PreparedFold``)."""
        self.mean.add_cast(cast, update.examples, self.weighting(update.examples))

    def result(self, global_weights: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return self.mean.result(global_weights, self.server_learning_rate)

    def mean_delta(self) -> npt.NDArray[np.float64]:
        """The round's weighted mean delta in float64 (what a server optimizer steps with)."""
        return self.mean.mean_delta()


class WeightedMeanAccumulator:
    """A weighted mean of scalars, e.g. devices' evaluation loss weighted by example count.

    The mean of per-device means is wrong when devices hold different amounts of data; this
    weights each device's value by its examples, as if all examples were evaluated together.
    """

    def __init__(self) -> None:
        self._weighted_sum = 0.0
        self._total_weight = 0.0
        self._count = 0

    @property
    def count(self) -> int:
        """How many values were accepted."""
        return self._count

    @property
    def total_weight(self) -> float:
        return self._total_weight

    def add(self, value: float, weight: float) -> None:
        """Adds ``value`` with ``weight`` (finite, > 0); a rejected pair changes nothing."""
        self._weighted_sum, self._total_weight = self._added(value, weight)
        self._count += 1

    def plus(self, value: float, weight: float) -> WeightedMeanAccumulator:
        """A new accumulator with ``value`` added, this one unchanged (all-or-nothing folds
        keep it until the rest of the report is accepted); the same checks as :meth:`add`."""
        out = WeightedMeanAccumulator.__new__(WeightedMeanAccumulator)
        out._weighted_sum, out._total_weight = self._added(value, weight)
        out._count = self._count + 1
        return out

    def sum_with(self, value: float, weight: float) -> tuple[float, float]:
        """The weighted sum and total weight :meth:`add` would leave, this one unchanged; the same
        checks. With :meth:`take`, what :meth:`plus` does without building an accumulator (the
        round's metrics do it for every update)."""
        if type(value) is float and type(weight) is float and weight > 0:  # every update's case
            weighted_sum = self._weighted_sum + value * weight
            total_weight = self._total_weight + weight
            if math.isfinite(weighted_sum) and math.isfinite(total_weight):
                return weighted_sum, total_weight
        return self._added(value, weight)

    def take(self, sums: tuple[float, float]) -> None:
        """Keeps ``sums`` from :meth:`sum_with` as this accumulator's, one more value counted."""
        self._weighted_sum, self._total_weight = sums
        self._count += 1

    def _added(self, value: float, weight: float) -> tuple[float, float]:
        if type(value) is float and type(weight) is float and weight > 0:  # every update's case
            weighted_sum = self._weighted_sum + value * weight
            total_weight = self._total_weight + weight
            if math.isfinite(weighted_sum) and math.isfinite(total_weight) and math.isfinite(value):
                return weighted_sum, total_weight
        v = _finite_float(value, "value")
        w = _finite_float(weight, "weight")
        if w <= 0:
            raise AggregationError(f"weight must be > 0, got {w}")
        weighted_sum = self._weighted_sum + v * w
        total_weight = self._total_weight + w
        if not (math.isfinite(weighted_sum) and math.isfinite(total_weight)):
            raise AggregationError("the weighted sum overflows")
        return weighted_sum, total_weight

    def parts(self) -> tuple[float, float, int]:
        """The weighted sum, total weight and count (a replica's partial carries them)."""
        return self._weighted_sum, self._total_weight, self._count

    def absorb(self, weighted_sum: float, total_weight: float, count: int) -> None:
        """Adds another accumulator's :meth:`parts`; a refused one changes nothing."""
        ws = _finite_float(weighted_sum, "weighted sum")
        tw = _finite_float(total_weight, "total weight")
        if tw < 0 or count < 0 or (count > 0) != (tw > 0):
            raise AggregationError("a partial's metric has an impossible weight or count")
        new_sum, new_weight = self._weighted_sum + ws, self._total_weight + tw
        if not (math.isfinite(new_sum) and math.isfinite(new_weight)):
            raise AggregationError("the weighted sum overflows")
        self._weighted_sum, self._total_weight = new_sum, new_weight
        self._count += int(count)

    @property
    def mean(self) -> float:
        if self._count == 0:
            raise AggregationError("no values were added; there is no mean")
        return self._weighted_sum / self._total_weight
