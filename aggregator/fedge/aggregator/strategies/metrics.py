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
from fedge.aggregator.strategies.fold import UpdateFold
from fedge.aggregator.strategies.weighting import Weighting
from fedge.protocol.messages import UpdatePayload

__all__ = ["RoundMetrics"]


class RoundMetrics:
    """An update fold that also keeps the round's weighted metrics of the updates it accepted."""

    def __init__(self, inner: UpdateFold, weighting: Weighting) -> None:
        self.inner = inner
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
        ev = update.evaluation
        train_loss = self.train_loss.plus(update.train_loss, self.weighting(update.examples))
        eval_loss, eval_accuracy, eval_mse = self.eval_loss, self.eval_accuracy, self.eval_mse
        if ev is not None:
            eval_weight = self.weighting(ev.examples)
            eval_loss = eval_loss.plus(ev.loss, eval_weight)
            if ev.accuracy is not None:
                eval_accuracy = eval_accuracy.plus(ev.accuracy, eval_weight)
            if ev.mse is not None:
                eval_mse = eval_mse.plus(ev.mse, eval_weight)
        self.inner.add(update)
        self.train_loss, self.eval_loss = train_loss, eval_loss
        self.eval_accuracy, self.eval_mse = eval_accuracy, eval_mse
        self.examples += update.examples

    def result(self, global_weights: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return self.inner.result(global_weights)
