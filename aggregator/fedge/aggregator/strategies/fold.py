"""The interfaces between the round engine and the arithmetic: pure folds.

A fold sees one accepted report at a time (``add``) and keeps only what its maths needs (FedAvg
a running sum: memory O(model), whatever the fleet size); ``result`` turns what it folded into
the round's outcome. The engine calls ``add`` only for reports that passed every check of the
protocol, and ``result`` once, when the round closes with enough reports.

Why a fold and not a list of replies (Flower's ``aggregate_fit(results)``): a round's updates
never need to be in memory together, and a refused report must leave the aggregate exactly as
if it never arrived, which an ``add`` that checks before it changes anything guarantees.

The contract of ``add``: it checks its input first and raises
:class:`~fedge.aggregator.fedavg.AggregationError` (or a subclass) without changing anything;
otherwise it folds the report in completely. The engine turns the error into a rejection
reason; a fold never sees topics, devices or keys. Folds are not thread-safe: the engine drives
one round's folds from one thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from fedge.protocol.messages import MomentsPayload, UpdatePayload
from fedge.protocol.model_manifest import Normalisation

__all__ = ["MomentsFold", "MomentsResult", "PreparedFold", "UpdateFold", "prepared"]


class UpdateFold(Protocol):
    """A train round's aggregation: decoded updates in, the next global model out."""

    def add(self, update: UpdatePayload) -> None:
        """Folds in one accepted update, or raises ``AggregationError`` changing nothing."""
        ...

    def result(self, global_weights: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The next global model from the current one; ``AggregationError`` aborts the round."""
        ...


class PreparedFold(UpdateFold, Protocol):
    """An update fold that can also take an update whose delta the caller already cast to
    float64 and checked (the round engine's fast path, issue 18): ``add_prepared`` does exactly
    what ``add`` does, to the bit and with the same refusals, without casting again.

    ``cast`` is ``update.delta`` (after whatever the links outside scaled it by) as float64,
    every value finite; the fold may change it in place (it is the caller's scratch), and it
    must not read ``update.delta``, which an outer link may have scaled in ``cast`` only.
    """

    def add_prepared(self, update: UpdatePayload, cast: npt.NDArray[np.float64]) -> None: ...


def prepared(fold: object) -> PreparedFold | None:
    """``fold`` if it (and every fold inside it) takes prepared updates, else None."""
    if getattr(fold, "takes_prepared", False):
        return fold  # type: ignore[return-value]  # checked: the flag is set only by PreparedFolds
    return None


@dataclass(frozen=True)
class MomentsResult:
    """A moments round's outcome: the normalisation, and which reports it left out."""

    normalisation: Normalisation
    #: Indices, in ``add`` order, of the reports left out of at least one feature as outliers.
    outlier_rows: tuple[int, ...] = ()


class MomentsFold(Protocol):
    """A moments round's aggregation: devices' feature moments in, the normalisation out."""

    @property
    def count(self) -> int:
        """Samples counted over the accepted reports (the round record's ``examples``)."""
        ...

    def add(self, moments: MomentsPayload) -> None:
        """Folds in one device's moments, or raises ``AggregationError`` changing nothing."""
        ...

    def result(self) -> MomentsResult:
        """The normalisation; ``AggregationError`` aborts the round."""
        ...
