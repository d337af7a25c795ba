"""How much an accepted update counts: its weight in the mean and in the round's metrics.

A device claims how many examples it trained on, and nothing can check the claim: a device
claiming a million examples would otherwise buy the round (SECURITY.md). So by default every
update counts once (``weighting = "equal"``); where claims do count (the opt-in
``weighting = "examples"``, and the round's reported loss and evaluation) each is capped at
``example_cap_ratio`` x the median claim of the previous round that had reports, and counts
once while no such round exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from fedge.aggregator.config import RoundSettings

__all__ = ["CappedClaims", "Weighting", "claim_cap", "equal_weights", "update_weighting", "weight_cap"]


class Weighting(Protocol):
    """A claimed example count -> how much the report counts (> 0)."""

    def __call__(self, examples: int) -> float: ...


def equal_weights(examples: int) -> float:
    """Every report counts once, whatever it claims: one device's share of n is 1/n."""
    return 1.0


@dataclass(frozen=True)
class CappedClaims:
    """A claimed count counts as itself, capped at ``cap`` (None: uncapped, plain FedAvg)."""

    cap: float | None = None

    def __call__(self, examples: int) -> float:
        return float(examples) if self.cap is None else min(float(examples), self.cap)


def claim_cap(settings: RoundSettings, claim_median: float | None) -> float | None:
    """The most a claimed count counts for in the next round: ``example_cap_ratio`` x the
    previous round's median claim (and at least 1), or None before any claim was seen. It caps
    the weight of an update (``weighting = "examples"``) and of a device's training loss and
    evaluation in the round's metrics, so a device claiming a million examples cannot decide
    the federated evaluation an operator reads either."""
    if not claim_median:
        return None
    return max(1.0, settings.example_cap_ratio * claim_median)


def weight_cap(settings: RoundSettings, claim_median: float | None) -> float | None:
    """``weighting = "examples"``: the largest weight one update may have in the next round;
    None with equal weights or before any claim was seen, when every update counts once."""
    return claim_cap(settings, claim_median) if settings.weighting == "examples" else None


def update_weighting(cap: float | None) -> Weighting:
    """An update's weight in the mean: once without a weight cap (equal weighting, or no claims
    seen yet), else its claim capped at ``cap``."""
    return equal_weights if cap is None else CappedClaims(cap)
