"""From a float update to integers modulo ``2**bits`` and back, so masks can hide it exactly.

Masking only works on integers modulo ``2**bits`` (a uniform mask hides any value there; floats
have no such group). So a device, before masking:

1. **clips** its update to the round's L2 bound ``C`` (``x * min(1, C / ||x||)``). This is the
   norm bound the aggregator can no longer apply: it never sees an individual update, so every
   bound on a device's influence has to be applied by the device before masking (see
   ``docs/secure-aggregation.md``);
2. **scales** by ``s = (M - 1) / C``, where ``M = min((2**(bits-1) - 1) // n, 2**40)`` and n is
   the number of devices selected for the round. After clipping every coordinate lies in
   ``[-C, C]``, so a scaled coordinate lies in ``[-(M - 1), M - 1]`` (up to float rounding);
3. **rounds stochastically** (down with probability ``1 - frac``, up with probability ``frac``,
   using the ``numpy.random.Generator`` the caller passes, so tests are reproducible and devices
   use fresh randomness): unbiased, ``E[q] = s x``, and ``|q - s x| < 1``. The result is clamped
   to ``[-M, M]`` (a no-op but for float rounding at the edge), so one device contributes at most
   ``M`` in absolute value per coordinate;
4. encodes each integer modulo ``2**bits`` (two's complement).

**Headroom**: the sum of at most n devices has ``|sum| <= n M <= 2**(bits-1) - 1``, so it never
wraps and decodes exactly as a signed integer: :meth:`Quantiser.dequantise_sum` is
``signed(sum) / s``, and needs no count of survivors.

**Error bound** (:meth:`Quantiser.error_bound`): for ``m`` summed devices, every coordinate of
the dequantised sum differs from the sum of the *clipped* float updates by less than
``m (1 + 2**-12) / s`` (each device's rounding is under one step ``1 / s``; the ``2**-12``
covers float rounding of ``s x``, which is below ``2**-13`` steps because ``M <= 2**40``), and
the L2 error is below ``sqrt(d)`` times that. The error is unbiased with a standard deviation of
at most ``sqrt(m) / (2 s)`` per coordinate. With the default 32 bits and 100 devices, ``C = 1``:
``s ~ 2.1e7``, worst case ``4.7e-6`` per coordinate of the sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedge.protocol.secagg.errors import SecAggReason, refusal
from fedge.protocol.secagg.prg import MAX_VECTOR_LENGTH, check_bits, modulus_mask

#: Largest step count per coordinate and device: keeps ``s x`` exact to ``2**-13`` of a step.
MAX_LEVEL = 2**40
#: Relative slack of :meth:`Quantiser.error_bound` over one step per device (float rounding).
ERROR_SLACK = 2.0**-12


def clip_to_norm(update: npt.ArrayLike, bound: float) -> npt.NDArray[np.float64]:
    """``update`` scaled down to L2 norm ``bound`` if it is longer; refuses non-finite values."""
    vector = np.asarray(update, dtype=np.float64).reshape(-1)
    if not bool(np.all(np.isfinite(vector))):
        raise refusal(SecAggReason.BAD_VECTOR, "the update holds NaN or infinite values")
    norm = float(np.linalg.norm(vector))
    if norm > bound:
        return vector * (bound / norm)
    return vector


@dataclass(frozen=True)
class Quantiser:
    """The round's quantisation: clip bound ``clip_norm``, modulus ``2**bits``, ``max_summands``
    devices at most (the number selected for the round)."""

    clip_norm: float
    bits: int
    max_summands: int

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise refusal(
                SecAggReason.BAD_PARAMETERS,
                "clip_norm must be finite and > 0",
                field="clip_norm",
                found=self.clip_norm,
            )
        if (
            isinstance(self.max_summands, bool)
            or not isinstance(self.max_summands, int)
            or self.max_summands < 1
        ):
            raise refusal(SecAggReason.BAD_PARAMETERS, "max_summands must be >= 1", found=self.max_summands)
        if self.level < 2:
            raise refusal(
                SecAggReason.BAD_PARAMETERS,
                f"2**{self.bits} leaves no headroom for {self.max_summands} devices",
                field="bits",
                found=self.bits,
            )

    @property
    def level(self) -> int:
        """``M``: the largest absolute integer one device contributes per coordinate."""
        return min(((1 << (self.bits - 1)) - 1) // self.max_summands, MAX_LEVEL)

    @property
    def scale(self) -> float:
        """``s``: integer steps per unit of the update."""
        return (self.level - 1) / self.clip_norm

    def error_bound(self, summands: int) -> float:
        """Bound on each coordinate's error of the dequantised sum of ``summands`` devices."""
        return summands * (1.0 + ERROR_SLACK) / self.scale

    def quantise(self, update: npt.ArrayLike, rng: np.random.Generator) -> npt.NDArray[np.uint64]:
        """Clip, scale, round stochastically with ``rng``, and encode modulo ``2**bits``."""
        clipped = clip_to_norm(update, self.clip_norm)
        if clipped.size > MAX_VECTOR_LENGTH:
            raise refusal(
                SecAggReason.TOO_LARGE, "update too long", expected=MAX_VECTOR_LENGTH, found=clipped.size
            )
        scaled = clipped * self.scale
        floor = np.floor(scaled)
        rounded = floor + (rng.random(scaled.shape) < (scaled - floor))
        integers = np.clip(rounded, -self.level, self.level).astype(np.int64)
        encoded: npt.NDArray[np.uint64] = integers.astype(np.uint64) & modulus_mask(self.bits)
        return encoded

    def dequantise_sum(self, total: npt.NDArray[np.uint64]) -> npt.NDArray[np.float64]:
        """The float sum from the unmasked integer sum (signed modulo ``2**bits``, over ``s``)."""
        values = np.asarray(total, dtype=np.uint64) & modulus_mask(self.bits)
        signed = values.astype(np.int64)
        signed[values >= np.uint64(1 << (self.bits - 1))] -= np.int64(1) << np.int64(self.bits)
        return signed.astype(np.float64) / self.scale
