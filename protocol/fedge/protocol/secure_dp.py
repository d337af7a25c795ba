"""Differential privacy under secure aggregation: each device adds its share of the noise before
masking, so nobody, the aggregator included, ever sees an un-noised sum.

A secure round with ``[privacy] enabled`` announces ``privacy.noise =
"distributed_discrete_gaussian"``. Every device then, after clipping to the announced bound and
quantising (``fedge.protocol.secagg.quantise``), adds a vector of **exact discrete Gaussian**
noise (``fedge.protocol.dp_noise.discrete_gaussian_share``, Canonne, Kamath and Steinke 2020)
modulo the round's ``2**bits``, and masks the result. Everything is fixed by the signed
manifest and the round config both sides derive from it (:func:`noise_plan`):

- the integer-domain sensitivity ``scale * C + sqrt(d)`` (one device's clipped, rounded update)
  and the noise on the *sum*: standard deviation ``z * sensitivity``, ``z`` the announced noise
  multiplier: the Gaussian mechanism the accountant charges;
- **shares**: each device adds variance ``sigma**2 / min_devices``. A round's sum is used only if
  at least ``min_devices`` devices are in it, so the noise in any sum that is used is at least
  the planned one (more when more survive: safe, at some accuracy);
- **headroom**: the modulus must hold the sum of the quantised updates plus the noise without
  wrapping. The quantiser caps one device's level at ``2**40``, so with 62 bits the sum of up to
  a million devices leaves room for noise of many standard deviations; :func:`noise_plan`
  refuses a round whose sum could reach ``2**(bits-1)`` within 12 standard deviations
  (a probability below ``10**-32`` per coordinate).

The accountant charges each such round as the Gaussian mechanism with multiplier ``z``. Two
corrections are ignored, with reason: the rounding (``sqrt(d)`` in the sensitivity, included),
and the distance between a sum of ``m`` discrete Gaussians and one discrete Gaussian (Kairouz,
Liu and Steinke 2021, Theorem 1: ``tau = 10 * sum_{k<m} exp(-2 pi**2 sigma**2 / m * k/(k+1))``),
which :func:`sum_correction` computes and which is below ``1e-300`` for any plan this module
accepts (the per-share variance is at least ``2**60``).

Pure: no I/O, no clock; randomness comes from the caller (``secrets.SystemRandom()`` on devices).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Final

import numpy as np
import numpy.typing as npt

from fedge.protocol.dp_noise import RandomSource, discrete_gaussian_share, integer_noise_plan
from fedge.protocol.errors import FedgeError
from fedge.protocol.privacy_announcement import PrivacyAnnouncement
from fedge.protocol.secagg.config import RoundConfig
from fedge.protocol.secagg.prg import modulus_mask

#: ``privacy.noise`` of a secure round with differential privacy.
DISTRIBUTED_NOISE: Final = "distributed_discrete_gaussian"
#: Standard deviations of headroom the modulus must leave above the largest sum.
HEADROOM_SIGMAS: Final = 12.0
#: The least variance of one device's share: keeps the sum-of-shares correction negligible.
MIN_SHARE_VARIANCE: Final = 2.0**60


class SecureDpError(FedgeError):
    """A secure round's privacy parameters that cannot give the announced guarantee."""


@dataclass(frozen=True)
class NoisePlan:
    """One secure round's distributed noise (see the module docstring)."""

    #: Variance of the noise on the integer sum (``(z * sensitivity)**2``), exact.
    sum_variance: Fraction
    #: Variance each device adds (``sum_variance / shares``), exact.
    share_variance: Fraction
    #: The number of shares planned for: the manifest's ``min_devices``.
    shares: int
    sensitivity: float
    #: The same noise in the float domain, on the sum (``sqrt(sum_variance) / scale``).
    float_stddev: float


def noise_plan(privacy: PrivacyAnnouncement, config: RoundConfig, min_devices: int) -> NoisePlan:
    """The round's noise, or :class:`SecureDpError` if the announcement and the config disagree
    (another clip bound, adaptive clipping, central noise) or the modulus has no room for it."""
    if privacy.noise != DISTRIBUTED_NOISE:
        raise SecureDpError(f"a secure round with differential privacy announces noise {DISTRIBUTED_NOISE!r}")
    if privacy.adaptive_clipping:
        raise SecureDpError(
            "adaptive clipping cannot run under secure aggregation (its count would be plain)"
        )
    if privacy.clip_bound != config.clip_norm:
        raise SecureDpError(
            f"the privacy clip bound {privacy.clip_bound!r} is not the secure round's {config.clip_norm!r}"
        )
    n = len(config.device_ids)
    if isinstance(min_devices, bool) or not isinstance(min_devices, int) or not 1 <= min_devices <= n:
        raise SecureDpError(f"min_devices must be in 1..{n}, not {min_devices!r}")
    q = config.quantiser
    plan = integer_noise_plan(
        privacy.noise_multiplier, config.clip_norm, q.scale, config.vector_length, min_devices
    )
    share_variance = plan.discrete_gaussian_sigma2 / min_devices
    if share_variance < MIN_SHARE_VARIANCE:
        raise SecureDpError(
            f"each device's noise variance {float(share_variance):.3g} is below {MIN_SHARE_VARIANCE:.3g}: "
            "use more bits (secure_aggregation_bits = 62)"
        )
    # All n selected devices may survive: then the sum carries n / min_devices of the planned
    # variance. The sum must still not wrap.
    worst_stddev = plan.stddev * math.sqrt(n / min_devices)
    if n * q.level + HEADROOM_SIGMAS * worst_stddev >= 2 ** (config.bits - 1):
        raise SecureDpError(
            f"2**{config.bits} has no room for the noise of {n} devices (level {q.level}, noise "
            f"stddev {worst_stddev:.3g}): use secure_aggregation_bits = 62"
        )
    return NoisePlan(
        sum_variance=plan.discrete_gaussian_sigma2,
        share_variance=share_variance,
        shares=min_devices,
        sensitivity=plan.sensitivity,
        float_stddev=plan.float_stddev,
    )


def add_noise_share(
    quantised: npt.NDArray[np.uint64], plan: NoisePlan, bits: int, source: RandomSource
) -> npt.NDArray[np.uint64]:
    """A device's quantised update plus its share of the noise, modulo ``2**bits``."""
    share = discrete_gaussian_share(source, int(quantised.shape[0]), plan.sum_variance, plan.shares)
    noised: npt.NDArray[np.uint64] = (quantised + share.astype(np.uint64)) & modulus_mask(bits)
    return noised


def sum_correction(plan: NoisePlan) -> float:
    """Kairouz et al.'s ``tau`` for a sum of ``shares`` discrete Gaussians of the plan's share
    variance: how far the sum is from one discrete Gaussian, which the Gaussian accounting
    ignores. Below ``1e-300`` for every plan :func:`noise_plan` accepts."""
    s2 = float(plan.share_variance)
    return 10.0 * sum(math.exp(-2 * math.pi**2 * s2 * k / (k + 1)) for k in range(1, plan.shares))
