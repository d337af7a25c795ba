"""What a round manifest says about differential privacy (``RoundManifest.privacy``).

The aggregator signs it into every manifest of a fleet with ``[privacy] enabled``, so that each
device clips its update to the announced bound (and, with adaptive clipping, reports whether it
had to) before the update leaves it, and so that anyone holding the manifest sees the budget
spent so far. It is a signed statement of what the aggregator does with the sum, not a proof:
with central noise the aggregator is trusted to add it (``docs/differential-privacy.md``).

Left out of the manifest when privacy is off, like ``generation``: a fleet without DP keeps the
manifests devices before this field accept, and one document per content.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

from fedge.protocol.errors import FieldError

#: Who adds the noise: ``central``, the aggregator, to the sum of updates it sees; or
#: ``distributed_discrete_gaussian``, each device, a share before masking, in secure rounds
#: (``fedge.protocol.secure_dp``): nobody sees an un-noised sum.
NOISE_KINDS: Final = ("central", "distributed_discrete_gaussian")
_KEYS: Final = frozenset(
    {
        "noise",
        "clip_bound",
        "adaptive_clipping",
        "noise_multiplier",
        "expected_participants",
        "epsilon_spent",
        "epsilon_budget",
        "target_delta",
    }
)
#: The largest clip bound or noise multiplier a manifest may name (far beyond any useful one).
_MAX_PARAMETER: Final = 1e12


class PrivacyAnnouncementError(FieldError):
    """The manifest's ``privacy`` object has a missing, mistyped or impossible field."""


@dataclass(frozen=True)
class PrivacyAnnouncement:
    """The round's differential-privacy parameters, as devices and observers read them.

    ``clip_bound``: the L2 bound each device clips its update to. ``adaptive_clipping``: the
    device also sends ``+1``/``-1`` (within the bound or not) with its update.
    ``noise_multiplier``: the noise on the sum over the clip bound (the whole round's, count
    included). ``expected_participants``: the public denominator of the mean.
    ``epsilon_spent``: the budget spent by the rounds before this one, at ``target_delta``."""

    noise: str
    clip_bound: float
    adaptive_clipping: bool
    noise_multiplier: float
    expected_participants: int
    epsilon_spent: float
    epsilon_budget: float
    target_delta: float

    def __post_init__(self) -> None:
        if self.noise not in NOISE_KINDS:
            raise PrivacyAnnouncementError(
                f"privacy.noise must be one of {NOISE_KINDS}",
                field="privacy.noise",
                expected=NOISE_KINDS,
                found=self.noise,
            )
        if not isinstance(self.adaptive_clipping, bool):
            raise PrivacyAnnouncementError(
                "privacy.adaptive_clipping must be true or false",
                field="privacy.adaptive_clipping",
                expected="a boolean",
                found=self.adaptive_clipping,
            )
        n = self.expected_participants
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1_000_000:
            raise PrivacyAnnouncementError(
                "privacy.expected_participants must be an integer in 1..1000000",
                field="privacy.expected_participants",
                expected="1..1000000",
                found=n,
            )
        _positive(self.clip_bound, "clip_bound")
        _positive(self.noise_multiplier, "noise_multiplier")
        _positive(self.epsilon_budget, "epsilon_budget")
        _number(self.epsilon_spent, "epsilon_spent", 0.0, math.inf)
        _number(self.target_delta, "target_delta", 0.0, 1.0)
        if not 0 < self.target_delta < 1:
            raise PrivacyAnnouncementError(
                "privacy.target_delta must be in (0, 1)",
                field="privacy.target_delta",
                expected="(0, 1)",
                found=self.target_delta,
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "noise": self.noise,
            "clip_bound": float(self.clip_bound),
            "adaptive_clipping": self.adaptive_clipping,
            "noise_multiplier": float(self.noise_multiplier),
            "expected_participants": self.expected_participants,
            "epsilon_spent": float(self.epsilon_spent),
            "epsilon_budget": float(self.epsilon_budget),
            "target_delta": float(self.target_delta),
        }

    @staticmethod
    def from_dict(data: Any) -> PrivacyAnnouncement:
        """Validates the manifest's ``privacy`` object; every problem names the field."""
        if not isinstance(data, dict):
            raise PrivacyAnnouncementError(
                "privacy must be an object", field="privacy", expected="an object", found=type(data).__name__
            )
        if set(data) != _KEYS:
            raise PrivacyAnnouncementError(
                f"privacy fields: missing {sorted(_KEYS - set(data))}, unexpected "
                f"{sorted(map(str, set(data) - _KEYS))}",
                field="privacy",
                expected=sorted(_KEYS),
                found=sorted(map(str, data)),
            )
        noise = data["noise"]
        if not isinstance(noise, str):
            raise PrivacyAnnouncementError(
                "privacy.noise must be a string", field="privacy.noise", expected=NOISE_KINDS, found=noise
            )
        return PrivacyAnnouncement(
            noise=noise,
            clip_bound=_number(data["clip_bound"], "clip_bound", 0.0, _MAX_PARAMETER),
            adaptive_clipping=data["adaptive_clipping"],
            noise_multiplier=_number(data["noise_multiplier"], "noise_multiplier", 0.0, _MAX_PARAMETER),
            expected_participants=data["expected_participants"],
            epsilon_spent=_number(data["epsilon_spent"], "epsilon_spent", 0.0, math.inf),
            epsilon_budget=_number(data["epsilon_budget"], "epsilon_budget", 0.0, math.inf),
            target_delta=_number(data["target_delta"], "target_delta", 0.0, 1.0),
        )


def _number(value: Any, key: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PrivacyAnnouncementError(
            f"privacy.{key} must be a number", field=f"privacy.{key}", expected="a number", found=value
        )
    v = float(value)
    if not (math.isfinite(v) and low <= v <= high):
        raise PrivacyAnnouncementError(
            f"privacy.{key} must be finite and in [{low:g}, {high:g}]",
            field=f"privacy.{key}",
            expected=f"[{low:g}, {high:g}]",
            found=value,
        )
    return v


def _positive(value: float, key: str) -> None:
    if not value > 0:
        raise PrivacyAnnouncementError(
            f"privacy.{key} must be > 0", field=f"privacy.{key}", expected="> 0", found=value
        )
