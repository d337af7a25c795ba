"""Central differential privacy as an update fold: the noised sum of clipped updates over a
public denominator (DP-FedAvg, McMahan et al. 2018; adaptive clipping, Andrew et al. 2021).

The round engine puts :class:`DpGaussianMean` inside ``NormClip`` at the round's DP clip
bound, so every update it sees has L2 norm at most ``C`` whatever a device sent: adding or
removing one device moves the sum by at most ``C``. :meth:`result` adds Gaussian noise of
standard deviation ``update_noise_multiplier * C`` to the sum once, divides by the *expected*
number of participants (the round's selected count, public: dividing by the number that
reported would let the count leak through the mean) and applies the server learning rate.

Each update counts once (sensitivity per device, not per example); the claimed example count
is not used. With adaptive clipping each update also carries ``+1``/``-1`` (within the bound
or clipped on the device); their sum gets its own noise, and :attr:`noisy_indicator_sum` is
what the accountant moves the next bound with (``PrivacyAccountant.record_round``).

Streaming like FedAvg: memory O(model), whatever the fleet size. Refusals change nothing.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fedge.aggregator.fedavg import AggregationError, StreamingFedAvg
from fedge.protocol.dp_noise import gaussian_noise
from fedge.protocol.messages import UpdatePayload

__all__ = ["DpGaussianMean"]


class DpGaussianMean:
    """The train round's fold with central DP noise (``UpdateFold``)."""

    def __init__(
        self,
        parameter_count: int,
        max_examples_per_update: int,
        *,
        expected_participants: int,
        update_noise_stddev: float,
        indicator_noise_stddev: float | None,
        server_learning_rate: float,
        rng: np.random.Generator,
    ) -> None:
        if expected_participants < 1:
            raise AggregationError(f"expected_participants must be >= 1, not {expected_participants}")
        self.sum = StreamingFedAvg(parameter_count, max_examples_per_update)
        self.parameter_count = parameter_count
        self.expected_participants = expected_participants
        self.update_noise_stddev = float(update_noise_stddev)
        #: None: fixed clipping (updates carry no indicator).
        self.indicator_noise_stddev = indicator_noise_stddev
        self.server_learning_rate = server_learning_rate
        self.rng = rng
        self._indicator_sum = 0
        #: Set by :meth:`result` with adaptive clipping: the indicators' sum plus its noise.
        self.noisy_indicator_sum: float | None = None

    def add(self, update: UpdatePayload) -> None:
        """Folds in one clipped delta with weight 1 (and its indicator, with adaptive clipping)."""
        self._check_indicator(update)
        self.sum.add(update.delta, update.examples, 1.0)
        if update.clip_indicator is not None:
            self._indicator_sum += update.clip_indicator

    #: Takes prepared updates (``strategies.fold.PreparedFold``).
    takes_prepared = True

    def add_prepared(self, update: UpdatePayload, cast: npt.NDArray[np.float64]) -> None:
        """:meth:`add` for a delta already cast to float64 (``strategies.fold.PreparedFold``)."""
        self._check_indicator(update)
        self.sum.add_cast(cast, update.examples, 1.0)
        if update.clip_indicator is not None:
            self._indicator_sum += update.clip_indicator

    def _check_indicator(self, update: UpdatePayload) -> None:
        adaptive = self.indicator_noise_stddev is not None
        indicator = update.clip_indicator
        if adaptive and indicator not in (1, -1):
            raise AggregationError("an adaptive-clipping round needs the update's clip_indicator")
        if not adaptive and indicator is not None:
            raise AggregationError("a fixed-clipping round takes no clip_indicator")

    def mean_delta(self) -> npt.NDArray[np.float64]:
        """``(sum + N(0, sigma**2 I)) / expected_participants`` in float64: the noised mean (a
        server optimizer steps with it: post-processing, no privacy cost). The noise is drawn
        here, once per call; a round's mean is taken once (by :meth:`result` or an optimizer)."""
        if self.sum.count == 0:
            raise AggregationError("no updates were added; there is no mean")
        noised = self.sum.mean_delta() * self.sum.total_weight + gaussian_noise(
            self.rng, self.parameter_count, self.update_noise_stddev
        )
        if self.indicator_noise_stddev is not None:
            self.noisy_indicator_sum = float(self._indicator_sum) + float(
                gaussian_noise(self.rng, 1, self.indicator_noise_stddev)[0]
            )
        out: npt.NDArray[np.float64] = noised / float(self.expected_participants)
        return out

    def result(self, global_weights: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """``global + lr * (sum + N(0, sigma**2 I)) / expected_participants``. The noise is
        drawn here, once per round; a round closed twice would draw it twice, so the engine
        calls this once."""
        mean = self.mean_delta()
        with np.errstate(over="ignore", invalid="ignore"):
            out = (global_weights.astype(np.float64) + self.server_learning_rate * mean).astype(np.float32)
        if not np.all(np.isfinite(out)):
            raise AggregationError("the aggregated weights overflow float32")
        return out
