"""fedge.protocol.dp_noise: clipping, and the noise samplers' distributions at fixed seeds.

Statistical checks use tolerances of several standard errors (stated at each), at fixed seeds,
so they are deterministic; each test runs well under a second or two.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction

import numpy as np
import pytest

from fedge.protocol.dp_noise import (
    DpNoiseError,
    clip_l2,
    discrete_gaussian,
    discrete_gaussian_share,
    float_stddev,
    gaussian_noise,
    integer_noise_plan,
    noise_generator,
    quantised_l2_sensitivity,
    skellam_mu_for_stddev,
    skellam_share,
    unclipped_indicator,
)

# -- clipping ------------------------------------------------------------------------------------


def test_an_update_within_the_bound_comes_back_bit_for_bit() -> None:
    x = np.random.default_rng(1).normal(size=1000).astype(np.float32)
    bound = float(np.linalg.norm(x.astype(np.float64))) * 1.01
    c = clip_l2(x, bound)
    assert c.unclipped
    assert np.array_equal(c.update, x.astype(np.float64))
    assert c.update is not x
    assert unclipped_indicator(c) == 1


def test_an_update_exactly_at_the_bound_is_not_clipped() -> None:
    x = np.array([3.0, 4.0])
    c = clip_l2(x, 5.0)
    assert c.unclipped and c.norm == 5.0
    assert np.array_equal(c.update, x)


def test_a_long_update_is_scaled_to_the_bound_in_its_own_direction() -> None:
    rng = np.random.default_rng(2)
    for _ in range(100):
        x = rng.normal(scale=rng.uniform(0.1, 100), size=int(rng.integers(1, 5000)))
        bound = float(np.linalg.norm(x)) * rng.uniform(0.01, 0.99)
        c = clip_l2(x, bound)
        assert not c.unclipped
        assert unclipped_indicator(c) == -1
        assert c.norm == pytest.approx(float(np.linalg.norm(x)), rel=0)
        # the norm after clipping is the bound to float64 precision
        assert abs(float(np.linalg.norm(c.update)) - bound) <= 1e-14 * bound
        # the direction is unchanged: a positive multiple of x
        np.testing.assert_allclose(c.update, x * (bound / c.norm), rtol=0, atol=0)


def test_clip_refuses_bad_bounds_and_non_finite_updates() -> None:
    for bound in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(DpNoiseError, match="clip bound"):
            clip_l2(np.ones(3), bound)
    with pytest.raises(DpNoiseError, match="not finite"):
        clip_l2(np.array([1.0, math.nan]), 1.0)
    with pytest.raises(DpNoiseError, match="not finite"):
        clip_l2(np.array([1.0, math.inf]), 1.0)


# -- Skellam -------------------------------------------------------------------------------------


def _check_moments(samples: np.ndarray, variance: float, k: float = 5.0) -> None:
    """Mean within ``k`` standard errors of 0; sample variance within ``k`` standard errors of
    ``variance`` (the standard error of a sample variance is ``variance * sqrt(2 / N)`` for
    a near-Gaussian distribution; Skellam's and the discrete Gaussian's excess kurtosis at the
    parameters used here is below 0.05)."""
    n = samples.size
    assert abs(float(samples.mean())) <= k * math.sqrt(variance / n)
    assert abs(float(samples.var()) - variance) <= k * variance * math.sqrt(2 / n)


def test_a_skellam_share_has_mean_0_and_variance_2_mu_over_n() -> None:
    rng = np.random.default_rng(20260601)
    mu, n = 1000.0, 8
    share = skellam_share(rng, 200_000, mu, n)
    assert share.dtype == np.int64 and share.shape == (200_000,)
    _check_moments(share, 2 * mu / n)


def test_the_sum_of_n_skellam_shares_has_variance_2_mu() -> None:
    """The documented variance of the distributed noise: n devices, each with its own
    generator, each adding a share; the sum has variance 2 mu (and the float-domain standard
    deviation of the dequantised sum is the plan's)."""
    n, coords = 10, 100_000
    plan = integer_noise_plan(noise_multiplier=0.8, clip_bound=0.5, scale=64.0, dimension=400, n_devices=n)
    generators = [np.random.default_rng(s) for s in np.random.SeedSequence(7).spawn(n)]
    total = sum(skellam_share(g, coords, plan.skellam_mu, n) for g in generators)
    assert isinstance(total, np.ndarray)
    _check_moments(total, 2 * plan.skellam_mu)
    assert 2 * plan.skellam_mu == pytest.approx(plan.variance, rel=1e-12)
    as_float = total / plan.scale
    assert float(as_float.std()) == pytest.approx(plan.float_stddev, rel=5 * math.sqrt(1 / (2 * coords)))


def test_skellam_shares_are_reproducible_from_the_generator() -> None:
    a = skellam_share(np.random.default_rng(3), (4, 5), 10.0, 3)
    b = skellam_share(np.random.default_rng(3), (4, 5), 10.0, 3)
    assert a.shape == (4, 5)
    assert np.array_equal(a, b)


def test_skellam_refuses_bad_parameters() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(DpNoiseError, match="mu"):
        skellam_share(rng, 3, 0.0, 2)
    for n in (0, -1, 2.0, True):
        with pytest.raises(DpNoiseError, match="number of devices"):
            skellam_share(rng, 3, 1.0, n)  # type: ignore[arg-type]


def test_skellam_mu_for_stddev() -> None:
    assert skellam_mu_for_stddev(10.0) == 50.0


# -- discrete Gaussian ---------------------------------------------------------------------------


def _dgauss_pmf(sigma2: float, support: range) -> dict[int, float]:
    """The exact pmf of N_Z(0, sigma2), normalised over a support wide enough that the mass
    outside it is below 1e-30."""
    weights = {y: math.exp(-(y * y) / (2 * sigma2)) for y in support}
    total = sum(weights.values())
    return {y: w / total for y, w in weights.items()}


def _chi2_upper(df: int, z: float = 3.719) -> float:
    """The chi-square quantile with ``df`` degrees of freedom at upper tail 1e-4 (``z`` is the
    standard normal's), by Wilson and Hilferty's approximation (good to ~1 % for df >= 5)."""
    h = 2 / (9 * df)
    return float(df * (1 - h + z * math.sqrt(h)) ** 3)


def _goodness_of_fit(samples: list[int], sigma2: float) -> tuple[float, float, float]:
    """(chi-square statistic, its 1e-4 critical value, total-variation distance) of ``samples``
    against N_Z(0, sigma2); cells with an expected count < 5 are pooled into one tail cell."""
    n = len(samples)
    pmf = _dgauss_pmf(sigma2, range(-80, 81))
    counts: dict[int, int] = {}
    for y in samples:
        counts[y] = counts.get(y, 0) + 1
    cells = [y for y in pmf if pmf[y] * n >= 5]
    lo, hi = min(cells), max(cells)
    assert cells == list(range(lo, hi + 1))
    chi2 = sum((counts.get(y, 0) - pmf[y] * n) ** 2 / (pmf[y] * n) for y in cells)
    df = len(cells) - 1
    tail_p = sum(p for y, p in pmf.items() if y < lo or y > hi)
    tail_n = sum(c for y, c in counts.items() if y < lo or y > hi)
    if tail_p * n >= 5:
        chi2 += (tail_n - tail_p * n) ** 2 / (tail_p * n)
        df += 1
    tv = 0.5 * sum(abs(counts.get(y, 0) / n - p) for y, p in pmf.items())
    return chi2, _chi2_upper(max(df, 5)), tv


@pytest.mark.parametrize("sigma2", [Fraction(1, 2), Fraction(5, 2)])
def test_the_discrete_gaussian_matches_its_pmf(sigma2: Fraction) -> None:
    """Chi-square goodness of fit against exp(-y^2 / 2 sigma2) / Z for small sigma (40,000
    samples, upper tail 1e-4), and a total-variation distance below 0.02 (its expected value
    at this n is about 0.005)."""
    source = random.Random(f"dgauss-{sigma2}")
    chi2, critical, tv = _goodness_of_fit(
        [discrete_gaussian(sigma2, source) for _ in range(40_000)], float(sigma2)
    )
    assert chi2 < critical
    assert tv < 0.02


def test_a_rounded_float_gaussian_fails_the_same_fit() -> None:
    """The check above has power: rounding a continuous Gaussian of variance 1/2 to the nearest
    integer is not N_Z(0, 1/2), and it fails by far (chi-square over 400, TV about 0.04)."""
    x = np.rint(np.random.default_rng(1).normal(0.0, math.sqrt(0.5), 40_000)).astype(int)
    chi2, critical, tv = _goodness_of_fit([int(y) for y in x], 0.5)
    assert chi2 > 10 * critical
    assert tv > 0.02


@pytest.mark.parametrize("sigma2", [Fraction(5, 2), 100, Fraction(10**6, 3)])
def test_discrete_gaussian_mean_and_variance(sigma2: Fraction | int) -> None:
    source = random.Random(11)
    samples = discrete_gaussian_share(source, 30_000, sigma2, 1)
    assert samples.dtype == np.int64
    # the variance of N_Z(0, s2) is within 1e-6 of s2 for s2 >= 1 (and below it)
    _check_moments(samples.astype(np.float64), float(sigma2))


def test_the_sum_of_discrete_gaussian_shares_has_the_documented_variance() -> None:
    """n devices each adding N_Z(0, sigma2 / n): the sum has variance n * Var N_Z(0, sigma2/n),
    which for sigma2 / n = 2 is sigma2 to within 1e-14."""
    n, coords, sigma2 = 5, 4000, Fraction(10)
    sources = [random.Random(f"device-{i}") for i in range(n)]
    total = sum(discrete_gaussian_share(s, coords, sigma2, n) for s in sources)
    assert isinstance(total, np.ndarray)
    per_device = _dgauss_pmf(float(sigma2 / n), range(-80, 81))
    exact_var = n * sum(y * y * p for y, p in per_device.items())
    assert exact_var == pytest.approx(float(sigma2), rel=1e-12)
    _check_moments(total.astype(np.float64), exact_var)


def test_the_discrete_gaussian_takes_its_variance_exactly_and_its_coins_from_the_source() -> None:
    calls: list[int] = []

    class Counting(random.Random):
        def randrange(self, start: int, /) -> int:  # type: ignore[override]
            calls.append(start)
            return super().randrange(start)

    a = [discrete_gaussian("5/2", Counting(5)) for _ in range(50)]
    assert calls and all(isinstance(m, int) and m >= 1 for m in calls)
    b = [discrete_gaussian(Fraction(5, 2), random.Random(5)) for _ in range(50)]
    assert a == b  # the same coins give the same samples: nothing else is random
    assert discrete_gaussian(2.5, random.Random(5)) == b[0]  # 2.5 is exactly 5/2 in binary


def test_discrete_gaussian_refuses_bad_variances() -> None:
    for bad in (0, -1, "x", math.nan, math.inf):
        with pytest.raises(DpNoiseError, match="sigma2"):
            discrete_gaussian(bad, random.Random(0))


# -- continuous Gaussian, scale ------------------------------------------------------------------


def test_gaussian_noise_has_the_requested_stddev() -> None:
    x = gaussian_noise(np.random.default_rng(5), 200_000, 3.0)
    assert x.dtype == np.float64
    _check_moments(x, 9.0)
    with pytest.raises(DpNoiseError):
        gaussian_noise(np.random.default_rng(5), 3, -1.0)
    assert noise_generator().normal() != noise_generator().normal()


def test_integer_noise_plan_maps_the_integer_domain_to_the_float_domain() -> None:
    plan = integer_noise_plan(
        noise_multiplier=1.0, clip_bound=1.0, scale=2.0**10, dimension=10_000, n_devices=20
    )
    assert plan.sensitivity == 1024 + 100
    assert plan.stddev == 1124
    assert plan.variance == 1124**2
    assert plan.skellam_mu == 631_688
    assert plan.discrete_gaussian_sigma2 == Fraction(1124**2)
    assert plan.float_stddev == 1124 / 1024
    assert plan.effective_noise_multiplier == pytest.approx(1 + 100 / 1024)
    assert float_stddev(50.0, 10.0) == 5.0
    with pytest.raises(DpNoiseError, match="scale"):
        float_stddev(1.0, 0.0)


def test_quantised_sensitivity_bounds_every_rounding() -> None:
    rng = np.random.default_rng(9)
    bound, scale, d = 0.7, 13.0, 257
    limit = quantised_l2_sensitivity(bound, scale, d)
    for _ in range(200):
        x = clip_l2(rng.normal(scale=5.0, size=d), bound).update * scale
        nearest = np.rint(x)
        floor = np.floor(x)
        stochastic = floor + (rng.random(d) < (x - floor))
        adversarial = np.where(x >= 0, np.ceil(x), np.floor(x))  # rounds every coordinate away from 0
        for q in (nearest, stochastic, adversarial):
            assert float(np.linalg.norm(q)) <= limit
    with pytest.raises(DpNoiseError, match="dimension"):
        quantised_l2_sensitivity(1.0, 1.0, 0)
