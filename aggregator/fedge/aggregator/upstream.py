"""Two-tier aggregation: a building gateway's aggregator under a campus aggregator (``[upstream]``).

A building gateway runs a fleet of its own devices and its own broker, bridged to the campus
broker (``fedge broker config --bridge-to``, docs/scale.md). To the campus the building is one
device: it is enrolled there under ``building_id`` with a box key of its own. Each campus round
(its signed manifest and global weights come over the bridge) opens a round of the building's
devices with the campus's global weights, normalisation and phase; when that round closes (every
device reported, or ``margin_s`` before the campus deadline) the building sends the campus one
sealed message, exactly what a device sends, bound to the campus round:

- a moments round: the pooled moments of its devices (count, sums, sums of squares);
- a train round: the FedAvg mean of its devices' clipped deltas, ``examples`` = how many devices
  it holds (so a campus with ``weighting = "examples"`` weighs buildings by their devices), the
  mean train loss and the devices' pooled evaluation.

The campus never sees one device's update (a building's round aborts below ``min_devices``, which
should be 2 or more), and a building that is cut off delays no one: the campus closes its round
at its own deadline with the buildings that reported, and what the cut-off building sends later
is refused there as late or of another round. This module is pure: the building's round timing
and its contribution (the settings: ``fedge.aggregator.upstream_config``; the shell:
``fedge.aggregator.building``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedge.aggregator.moments import MomentsAggregation
from fedge.aggregator.partials import fold_chain
from fedge.aggregator.round_engine import RoundEngine
from fedge.protocol.messages import Evaluation, encode_moments, encode_update
from fedge.protocol.round_manifest import RoundManifest


def local_timeout(campus: RoundManifest, now: float, margin_s: float, own_timeout_s: float) -> float:
    """How long the building's round may last: its own round timeout, and never past the campus
    deadline less the margin (at least 1 s)."""
    return max(1.0, min(own_timeout_s, campus.deadline - margin_s - now))


def building_contribution(
    engine: RoundEngine, campus: RoundManifest
) -> tuple[str, dict[str, Any], bytes] | None:
    """What the building sends the campus for its open round, before the engine closes it:
    ``(kind, payload header, body)``; None when the round has fewer than ``min_devices``
    reports (it will abort: nothing of so few devices may leave the building)."""
    r = engine.current
    if r is None or len(r.reported) < engine.settings.min_devices:
        return None
    folds = r.folds
    if r.manifest.phase == "moments":
        moments = folds.moments
        if not isinstance(moments, MomentsAggregation):
            return None
        count, sums, sums_sq = moments.accumulator.totals()
        header, body = encode_moments(count, sums, sums_sq)
        return "moments", header, body
    _, metrics, mean = fold_chain(folds)
    if mean.count == 0:
        return None
    delta = mean.mean_delta().astype(np.float32)
    ev = None
    if metrics.eval_loss.count:
        ev = Evaluation(
            examples=max(1, int(metrics.eval_loss.total_weight)),
            loss=metrics.eval_loss.mean,
            accuracy=metrics.eval_accuracy.mean if metrics.eval_accuracy.count else None,
            mse=metrics.eval_mse.mean if metrics.eval_mse.count else None,
        )
    header, body = encode_update(
        delta,
        engine.layout,
        campus.codec,
        mean.count,  # the campus weighs buildings by their devices (weighting = "examples")
        metrics.train_loss.mean,
        ev,
        topk_fraction=campus.topk_fraction,
    )
    return "update", header, body
