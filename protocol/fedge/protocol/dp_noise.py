"""Client-level differential privacy, the part both sides run: clipping and noise (issue 14).

Pure (numpy, ``fractions`` and the random source the caller passes in; no I/O, no clocks), so
the device and the aggregator compute the same thing. What the parameters mean, and which side
does what, is in ``docs/differential-privacy.md``. In short:

- **Clipping** (device): :func:`clip_l2` scales an update down to L2 norm at most ``bound``
  and reports whether it was already within the bound: the bit that the adaptive-clipping
  quantile estimator of Andrew et al. 2021 sums (:func:`unclipped_indicator`). The aggregator
  updates the bound from the noisy sum of those bits (``fedge.aggregator.privacy``).
- **Distributed noise** (device, with secure aggregation): each of ``n`` devices adds an integer
  share before masking, so that only the *sum* carries the target noise and nobody ever sees an
  un-noised sum. :func:`skellam_share` (Agarwal, Kairouz, Liu 2021) and
  :func:`discrete_gaussian_share` (the exact sampler of Canonne, Kamath, Steinke 2020; the
  distributed discrete Gaussian of Kairouz, Liu, Steinke 2021).
- **Central noise** (aggregator, without secure aggregation): :func:`gaussian_noise`, added once
  to the sum of clipped updates.
- **Scale**: the secure-aggregation layer sends ``x`` as the integer ``round(x * scale)``.
  :func:`integer_noise_plan` turns a noise multiplier, a clip bound and that scale into the
  integer-domain noise each device adds, and says what it amounts to back in the float domain
  (:func:`float_stddev`).

Variances (the sum of ``n`` shares, each device drawing independently):

- Skellam: a share is ``Poisson(mu/n) - Poisson(mu/n)``, variance ``2 mu / n``; the sum of the
  ``n`` shares is exactly ``Poisson(mu) - Poisson(mu)`` (Poisson is closed under sums), variance
  ``2 mu``. For a target integer standard deviation ``s``: ``mu = s**2 / 2``
  (:func:`skellam_mu_for_stddev`).
- Discrete Gaussian: a share is ``N_Z(0, sigma2/n)``, variance at most ``sigma2/n`` (within
  ``3e-7`` relative once ``sigma2/n >= 1``); the sum has variance at most ``sigma2``. The sum is
  not exactly ``N_Z(0, sigma2)`` but close to it when ``sigma2/n`` is not tiny (Kairouz, Liu,
  Steinke 2021, Theorem 1); keep ``sigma2/n >= 1``.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol

import numpy as np
import numpy.typing as npt

from fedge.protocol.errors import FedgeError

__all__ = [
    "Clipped",
    "DpNoiseError",
    "IntegerNoisePlan",
    "RandomSource",
    "clip_l2",
    "discrete_gaussian",
    "discrete_gaussian_share",
    "float_stddev",
    "gaussian_noise",
    "integer_noise_plan",
    "noise_generator",
    "quantised_l2_sensitivity",
    "skellam_mu_for_stddev",
    "skellam_share",
    "unclipped_indicator",
]


class DpNoiseError(FedgeError, ValueError):
    """A parameter that no privacy guarantee can come from (a bound <= 0, n < 1, ...)."""


class RandomSource(Protocol):
    """A source of uniform integers: ``randrange(m)`` is uniform on ``0 .. m-1``.
    ``secrets.SystemRandom()`` in production; ``random.Random(seed)`` in tests."""

    def randrange(self, start: int, /) -> int: ...


# -- clipping ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clipped:
    """An update after :func:`clip_l2`. ``norm``: its L2 norm *before* clipping; ``unclipped``:
    ``norm <= bound`` (Andrew et al.'s bit ``b``), so the update is returned unchanged."""

    update: npt.NDArray[np.float64]
    norm: float
    unclipped: bool


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise DpNoiseError(f"{name} must be a finite number > 0, not {value!r}")
    return value


def clip_l2(update: npt.ArrayLike, bound: float) -> Clipped:
    """Scales ``update`` to L2 norm ``bound`` if it is longer (``x * bound / ||x||``), in float64.

    An update within the bound comes back unchanged (as float64, bit for bit). A clipped one
    has norm ``bound`` up to float64 rounding (a relative error of a few 1e-16); the
    integer-domain sensitivity (:func:`quantised_l2_sensitivity`) leaves more room than that.
    Refuses a non-finite update: a NaN would pass any comparison with the bound."""
    bound = _positive("the clip bound", bound)
    x = np.asarray(update, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise DpNoiseError("the update holds a value that is not finite")
    norm = float(np.linalg.norm(x))
    if norm <= bound:
        return Clipped(update=x.copy(), norm=norm, unclipped=True)
    return Clipped(update=x * (bound / norm), norm=norm, unclipped=False)


def unclipped_indicator(clipped: Clipped) -> int:
    """The device's contribution to the adaptive-clipping estimate, centred: ``+1`` if the
    update was within the bound, ``-1`` if it was clipped, i.e. ``2 * (b - 1/2)``.

    Centred, one device moves the sum by at most 1 in these units (1/2 in units of ``b``),
    which is the sensitivity Andrew et al. use; as an integer it can go through secure
    aggregation beside the update. The aggregator turns the noisy sum back into a fraction
    (``fedge.aggregator.privacy.unclipped_fraction``)."""
    return 1 if clipped.unclipped else -1


# -- central (float) noise -----------------------------------------------------------------------


def noise_generator() -> np.random.Generator:
    """A numpy Generator seeded with 128 bits from the OS (``secrets``): what production code
    passes to :func:`gaussian_noise` and :func:`skellam_share`. Tests pass a seeded one."""
    return np.random.default_rng(secrets.randbits(128))


def gaussian_noise(
    rng: np.random.Generator, shape: int | tuple[int, ...], stddev: float
) -> npt.NDArray[np.float64]:
    """Continuous Gaussian noise ``N(0, stddev**2)`` per coordinate, for the central case: the
    aggregator adds it once to the *sum* of clipped updates, with
    ``stddev = noise_multiplier * clip_bound``. (A float sampler leaks through floating-point
    artefacts in theory, Mironov 2012; the distributed samplers below are exact.)"""
    stddev = float(stddev)
    if not (math.isfinite(stddev) and stddev >= 0):
        raise DpNoiseError(f"the noise standard deviation must be finite and >= 0, not {stddev!r}")
    return rng.normal(0.0, stddev, size=shape)


# -- distributed integer noise -------------------------------------------------------------------


def skellam_mu_for_stddev(stddev: float) -> float:
    """The Skellam parameter ``mu`` whose ``Poisson(mu) - Poisson(mu)`` has standard deviation
    ``stddev``: ``mu = stddev**2 / 2``."""
    return _positive("the integer noise standard deviation", stddev) ** 2 / 2


def _devices(n_devices: int) -> int:
    if isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1:
        raise DpNoiseError(f"the number of devices must be an integer >= 1, not {n_devices!r}")
    return n_devices


def skellam_share(
    rng: np.random.Generator, shape: int | tuple[int, ...], mu: float, n_devices: int
) -> npt.NDArray[np.int64]:
    """One device's share of Skellam noise: ``Poisson(mu/n) - Poisson(mu/n)`` per coordinate.

    The sum of the ``n`` devices' shares is ``Poisson(mu) - Poisson(mu)``: mean 0, variance
    ``2 mu`` (each share has variance ``2 mu / n``). If fewer devices report than were planned
    for, the sum carries less noise (``2 mu`` times the fraction that reported): plan ``n``
    as the number of devices expected to *survive* the round, not the number selected."""
    lam = _positive("mu", mu) / _devices(n_devices)
    a = rng.poisson(lam, size=shape).astype(np.int64)
    b = rng.poisson(lam, size=shape).astype(np.int64)
    return a - b


# The exact sampler of Canonne, Kamath and Steinke 2020 ("The Discrete Gaussian for Differential
# Privacy", Algorithms 1-3), in rational arithmetic: every probability below is an exact
# Fraction and every coin comes from ``source.randrange``, so no float ever rounds the
# distribution.


def _bernoulli(p: Fraction, source: RandomSource) -> bool:
    """True with probability ``p`` (0 <= p <= 1), exactly."""
    return source.randrange(p.denominator) < p.numerator


def _bernoulli_exp_small(gamma: Fraction, source: RandomSource) -> bool:
    """True with probability ``exp(-gamma)`` for ``0 <= gamma <= 1`` (CKS Algorithm 1)."""
    k = 1
    while _bernoulli(gamma / k, source):
        k += 1
    return k % 2 == 1


def _bernoulli_exp(gamma: Fraction, source: RandomSource) -> bool:
    """True with probability ``exp(-gamma)`` for ``gamma >= 0``."""
    while gamma > 1:
        if not _bernoulli_exp_small(Fraction(1), source):
            return False
        gamma -= 1
    return _bernoulli_exp_small(gamma, source)


def _geometric_exp(x: Fraction, source: RandomSource) -> int:
    """``k >= 0`` with probability ``(1 - exp(-x)) exp(-x k)`` for ``x > 0`` (CKS Algorithm 2)."""
    s, t = x.numerator, x.denominator
    while True:
        u = source.randrange(t)
        if _bernoulli_exp(Fraction(u, t), source):
            break
    v = 0
    while _bernoulli_exp(Fraction(1), source):
        v += 1
    return (v * t + u) // s


def _discrete_laplace(t: int, source: RandomSource) -> int:
    """``y`` in Z with probability proportional to ``exp(-|y| / t)``, ``t >= 1`` an integer."""
    while True:
        negative = _bernoulli(Fraction(1, 2), source)
        magnitude = _geometric_exp(Fraction(1, t), source)
        if negative and magnitude == 0:
            continue
        return -magnitude if negative else magnitude


def _exact_variance(sigma2: Fraction | int | float | str) -> Fraction:
    try:
        value = Fraction(sigma2)
    except (ValueError, TypeError, OverflowError, ZeroDivisionError) as exc:
        raise DpNoiseError(f"sigma2 must be a rational number > 0, not {sigma2!r}") from exc
    if value <= 0:
        raise DpNoiseError(f"sigma2 must be > 0, not {sigma2!r}")
    return value


def discrete_gaussian(sigma2: Fraction | int | float | str, source: RandomSource) -> int:
    """One exact sample of the discrete Gaussian ``N_Z(0, sigma2)``: ``y`` in Z with probability
    proportional to ``exp(-y**2 / (2 sigma2))`` (CKS 2020, Algorithm 3).

    ``sigma2`` is taken exactly (a float is read as the binary fraction it is; pass a
    ``Fraction`` or a string such as ``"5/2"`` for a decimal). The variance is at most
    ``sigma2``. Pure Python: tens of microseconds a sample."""
    s2 = _exact_variance(sigma2)
    t = math.isqrt(s2.numerator // s2.denominator) + 1  # floor(sqrt(sigma2)) + 1
    while True:
        y = _discrete_laplace(t, source)
        bias = (abs(y) - s2 / t) ** 2 / (2 * s2)
        if _bernoulli_exp(bias, source):
            return y


def discrete_gaussian_share(
    source: RandomSource, size: int, sigma2: Fraction | int | float | str, n_devices: int
) -> npt.NDArray[np.int64]:
    """One device's share of distributed discrete Gaussian noise: ``size`` independent exact
    samples of ``N_Z(0, sigma2 / n)``. The sum of the ``n`` shares has mean 0 and variance at
    most ``sigma2`` (see the module docstring for how close it is to ``N_Z(0, sigma2)``)."""
    per_device = _exact_variance(sigma2) / _devices(n_devices)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise DpNoiseError(f"size must be an integer >= 0, not {size!r}")
    return np.array([discrete_gaussian(per_device, source) for _ in range(size)], dtype=np.int64)


# -- the scale: integer domain <-> float domain ---------------------------------------------------


def float_stddev(integer_stddev: float, scale: float) -> float:
    """What integer-domain noise amounts to in the float domain. Secure aggregation sends ``x``
    as ``round(x * scale)`` and the aggregator divides the unmasked sum by ``scale``, so noise of
    standard deviation ``s`` on the integer sum is ``s / scale`` on the float sum."""
    return float(integer_stddev) / _positive("the quantisation scale", scale)


def quantised_l2_sensitivity(clip_bound: float, scale: float, dimension: int) -> float:
    """The L2 sensitivity of one device's update in the integer domain: an update of norm at
    most ``clip_bound``, scaled by ``scale`` and rounded coordinate by coordinate (to nearest,
    or stochastically; either moves a coordinate by less than 1), has norm at most
    ``scale * clip_bound + sqrt(dimension)``. This worst-case bound needs no assumption about
    the rounding; conditional randomised rounding (Kairouz et al. 2021) can tighten it."""
    if isinstance(dimension, bool) or not isinstance(dimension, int) or dimension < 1:
        raise DpNoiseError(f"the dimension must be an integer >= 1, not {dimension!r}")
    return _positive("the clip bound", clip_bound) * _positive("the quantisation scale", scale) + math.sqrt(
        dimension
    )


@dataclass(frozen=True)
class IntegerNoisePlan:
    """The integer-domain noise for one round of distributed DP, from :func:`integer_noise_plan`.

    ``sensitivity``: one device's integer-domain L2 sensitivity; ``stddev``/``variance``: of the
    noise on the integer *sum* (``noise_multiplier * sensitivity``), which is what the
    accountant's noise multiplier refers to; ``skellam_mu``: the ``mu`` to pass to
    :func:`skellam_share` (each device draws ``mu / n_devices``); ``discrete_gaussian_sigma2``:
    the ``sigma2`` to pass to :func:`discrete_gaussian_share` (exact, a Fraction);
    ``float_stddev``: the same noise in the float domain; ``effective_noise_multiplier``: that
    over the clip bound, the multiplier a float-domain reader sees (>= the accounted one: the
    rounding costs ``sqrt(dimension) / (scale * clip_bound)`` extra, relatively)."""

    scale: float
    sensitivity: float
    stddev: float
    variance: float
    skellam_mu: float
    discrete_gaussian_sigma2: Fraction
    float_stddev: float
    effective_noise_multiplier: float
    n_devices: int


def integer_noise_plan(
    noise_multiplier: float, clip_bound: float, scale: float, dimension: int, n_devices: int
) -> IntegerNoisePlan:
    """The integer noise that gives the secure sum of ``n_devices`` quantised updates the
    privacy of the Gaussian mechanism with ``noise_multiplier``, at quantisation ``scale``.

    Example: ``noise_multiplier=1``, ``clip_bound=1``, ``scale=2**10``, ``dimension=10_000``:
    sensitivity ``1024 + 100``, integer stddev 1124 (Skellam ``mu`` 631,688), float stddev
    1.098 on the sum, i.e. about 10 % more noise than central DP at the same epsilon. Choose
    ``scale`` so that ``sqrt(dimension) / (scale * clip_bound)`` is small, and the modulus of
    secure aggregation so that the sum (updates plus noise) does not wrap."""
    z = _positive("the noise multiplier", noise_multiplier)
    n = _devices(n_devices)
    sensitivity = quantised_l2_sensitivity(clip_bound, scale, dimension)
    stddev = z * sensitivity
    return IntegerNoisePlan(
        scale=float(scale),
        sensitivity=sensitivity,
        stddev=stddev,
        variance=stddev**2,
        skellam_mu=skellam_mu_for_stddev(stddev),
        discrete_gaussian_sigma2=Fraction(stddev) ** 2,
        float_stddev=float_stddev(stddev, scale),
        effective_noise_multiplier=float_stddev(stddev, scale) / float(clip_bound),
        n_devices=n,
    )
