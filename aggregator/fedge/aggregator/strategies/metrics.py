"""The round's reported training loss and federated evaluation, folded with the update itself.

What an operator reads in the round record (``examples``, ``train_loss``, ``fed_eval_*``) must
count exactly the updates the strategy accepted, so :class:`RoundMetrics` wraps the strategy's
fold and takes both in one all-or-nothing ``add``. Each device's value weighs its claimed count,
capped by the round's claim weighting (``fedge.aggregator.strategies.weighting``): a device
claiming a million examples cannot decide the federated evaluation.

It sits inside the clipping (``NormClip(RoundMetrics(strategy))``): an update over the hard norm
bound is refused as such before any of its metrics is looked at, the order of the rejection
reasons in docs/protocol.md.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fedge.aggregator.fedavg import WeightedMeanAccumulator
from fedge.aggregator.strategies.fold import UpdateFold, prepared
from fedge.aggregator.strategies.weighting import Weighting
from fedge.protocol.messages import UpdatePayload

__all__ = ["RoundMetrics"]


class RoundMetrics:
    """An update fold that also keeps the round's weighted metrics of the updates it accepted."""

    def __init__(self, inner: UpdateFold, weighting: Weighting) -> None:
        self.inner = inner
        self._prepared = prepared(inner)  # the inner fold, if it takes prepared updates
        self.weighting = weighting
        self.train_loss = WeightedMeanAccumulator()
        self.eval_loss = WeightedMeanAccumulator()
        self.eval_accuracy = WeightedMeanAccumulator()
        #: Regression tasks' metric: the devices' mean squared error on their held-out data.
        self.eval_mse = WeightedMeanAccumulator()
        #: The claimed example counts of the accepted updates, summed (uncapped: what devices said).
        self.examples = 0

    def add(self, update: UpdatePayload) -> None:
        """The metrics go into new accumulators first (a sum may overflow), then the update into
        the inner fold, which checks before it changes anything; only then are they kept."""
        self._add(update, None)

    @property
    def takes_prepared(self) -> bool:
        """Whether the fold inside takes prepared updates (``strategies.fold.PreparedFold``)."""
        return self._prepared is not None

    def add_prepared(self, update: UpdatePayload, cast: npt.NDArray[np.float64]) -> None:
        """:meth:`add` for a delta already cast to float64 (``strategies.fold.PreparedFold``)."""
        self._add(update, cast)

    def _add(self, update: UpdatePayload, cast: npt.NDArray[np.float64] | None) -> None:
        # The new sums first (sum_with checks and may refuse), kept only once the inner fold took
        # the update: what building new accumulators with ``plus`` did, without building them.
        ev = update.evaluation
        train_loss = self.train_loss.sum_with(update.train_loss, self.weighting(update.examples))
        eval_loss = eval_accuracy = eval_mse = None
        if ev is not None:
            eval_weight = self.weighting(ev.examples)
            eval_loss = self.eval_loss.sum_with(ev.loss, eval_weight)
            if ev.accuracy is not None:
                eval_accuracy = self.eval_accuracy.sum_with(ev.accuracy, eval_weight)
            if ev.mse is not None:
                eval_mse = self.eval_mse.sum_with(ev.mse, eval_weight)
        if cast is None:
            self.inner.add(update)
        else:
            inner = self._prepared
            if inner is None:
                raise TypeError(f"{type(self.inner).__name__} takes no prepared updates")
            inner.add_prepared(update, cast)
        self.train_loss.take(train_loss)
        if eval_loss is not None:
            self.eval_loss.take(eval_loss)
        if eval_accuracy is not None:
            self.eval_accuracy.take(eval_accuracy)
        if eval_mse is not None:
            self.eval_mse.take(eval_mse)
        self.examples += update.examples

    def result(self, global_weights: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return self.inner.result(global_weights)
