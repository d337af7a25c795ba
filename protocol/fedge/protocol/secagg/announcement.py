"""What a round manifest says about secure aggregation (``RoundManifest.secure_aggregation``).

A fleet with ``[privacy] secure_aggregation`` announces it in every signed train manifest, with
the parameters every party must agree on and that the aggregator could otherwise bend: the L2
bound devices clip to before quantising (the aggregator can no longer bound an update it never
sees), the modulus, and the neighbour graph's degree and Shamir threshold. The rest of the
round's :class:`~fedge.protocol.secagg.config.RoundConfig` is derived from the manifest itself
(:func:`fedge.protocol.secure_round_config.round_config_for`): the devices are the selected
ones, the vector is the model's parameters, the phase deadlines are fixed fractions of the
round, and the graph seed is a hash of the previous manifest, the round and the selection.

A device that sees this field never sends a plain update for the round: its update goes only
into the masked sum (``fedge.agent.secure_round``). Left out of manifests when off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

from fedge.protocol.errors import FieldError
from fedge.protocol.secagg.params import MAX_DEGREE

_KEYS: Final = frozenset({"clip_norm", "bits", "degree", "threshold"})
#: The moduli the quantiser supports (``fedge.protocol.secagg.prg.check_bits``).
MIN_BITS: Final = 8
MAX_BITS: Final = 62


class SecureAggregationAnnouncementError(FieldError):
    """The manifest's ``secure_aggregation`` object is missing a field or holds a bad value."""


@dataclass(frozen=True)
class SecureAggregationAnnouncement:
    """The secure round's announced parameters (see the module docstring)."""

    clip_norm: float
    bits: int
    degree: int
    threshold: int

    def __post_init__(self) -> None:
        c = self.clip_norm
        if isinstance(c, bool) or not isinstance(c, int | float) or not math.isfinite(c) or c <= 0:
            raise SecureAggregationAnnouncementError(
                "secure_aggregation.clip_norm must be a finite number > 0",
                field="secure_aggregation.clip_norm",
                expected="> 0",
                found=c,
            )
        for key, low, high in (
            ("bits", MIN_BITS, MAX_BITS),
            ("degree", 2, MAX_DEGREE),
            ("threshold", 2, MAX_DEGREE),
        ):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise SecureAggregationAnnouncementError(
                    f"secure_aggregation.{key} must be an integer in {low}..{high}",
                    field=f"secure_aggregation.{key}",
                    expected=f"{low}..{high}",
                    found=value,
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "clip_norm": float(self.clip_norm),
            "bits": self.bits,
            "degree": self.degree,
            "threshold": self.threshold,
        }

    @staticmethod
    def from_dict(data: Any) -> SecureAggregationAnnouncement:
        if not isinstance(data, dict):
            raise SecureAggregationAnnouncementError(
                "secure_aggregation must be an object",
                field="secure_aggregation",
                expected="an object",
                found=type(data).__name__,
            )
        if set(data) != _KEYS:
            raise SecureAggregationAnnouncementError(
                f"secure_aggregation fields: missing {sorted(_KEYS - set(data))}, unexpected "
                f"{sorted(map(str, set(data) - _KEYS))}",
                field="secure_aggregation",
                expected=sorted(_KEYS),
                found=sorted(map(str, data)),
            )
        clip = data["clip_norm"]
        return SecureAggregationAnnouncement(
            clip_norm=float(clip) if isinstance(clip, int) and not isinstance(clip, bool) else clip,
            bits=data["bits"],
            degree=data["degree"],
            threshold=data["threshold"],
        )
