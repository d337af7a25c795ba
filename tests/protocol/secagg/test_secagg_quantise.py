"""Quantisation: clip, scale with headroom, stochastic rounding; the sum never wraps and the
dequantised sum is within the documented bound of the float sum of the clipped updates."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.protocol.secagg import Quantiser, SecAggError, SecAggReason, clip_to_norm


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 200),
    bits=st.sampled_from([16, 24, 32, 48, 62]),
    clip=st.floats(0.01, 100.0),
    spread=st.floats(0.0, 10.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_dequantised_sum_is_within_the_documented_bound(
    n: int, bits: int, clip: float, spread: float, seed: int
) -> None:
    quantiser = Quantiser(clip, bits, n)
    if quantiser.level < 2:
        return
    rng = np.random.default_rng(seed)
    updates = [rng.normal(0.0, spread * clip, 7) for _ in range(n)]
    total = np.zeros(7, dtype=np.uint64)
    for update in updates:
        total += quantiser.quantise(update, rng)
    total &= np.uint64((1 << bits) - 1)
    expected = sum(clip_to_norm(u, clip) for u in updates)
    error = np.abs(quantiser.dequantise_sum(total) - expected)
    assert float(error.max()) < quantiser.error_bound(n)


@pytest.mark.parametrize("bits", [16, 32, 62])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_n_updates_at_the_extreme_do_not_wrap(bits: int, sign: float) -> None:
    """Every device at +C (or -C) on one coordinate: the largest sum there is, still exact."""
    n, clip = 50, 3.0
    quantiser = Quantiser(clip, bits, n)
    rng = np.random.default_rng(1)
    update = np.array([sign * clip * 10, 0.0])  # clipped to (±C, 0)
    total = sum((quantiser.quantise(update, rng) for _ in range(n)), np.zeros(2, dtype=np.uint64))
    result = quantiser.dequantise_sum(total & np.uint64((1 << bits) - 1))
    assert abs(result[0] - sign * clip * n) < quantiser.error_bound(n)
    assert np.sign(result[0]) == sign


def test_stochastic_rounding_is_unbiased() -> None:
    quantiser = Quantiser(1.0, 16, 1000)  # a coarse grid, so rounding matters
    rng = np.random.default_rng(7)
    value = 0.3 / quantiser.scale * 1.0 + 0.0  # 0.3 of a step
    total = sum((quantiser.quantise(np.array([value]), rng) for _ in range(1000)), np.zeros(1, np.uint64))
    mean = quantiser.dequantise_sum(total)[0] / 1000
    assert abs(mean - value) < 0.1 / quantiser.scale  # 4+ sigma of the rounding noise


def test_the_rng_makes_quantisation_reproducible() -> None:
    quantiser = Quantiser(1.0, 32, 10)
    update = np.linspace(-0.2, 0.2, 50)
    first = quantiser.quantise(update, np.random.default_rng(3))
    np.testing.assert_array_equal(first, quantiser.quantise(update, np.random.default_rng(3)))


def test_clipping_scales_long_updates_only() -> None:
    long = np.array([3.0, 4.0])
    np.testing.assert_allclose(clip_to_norm(long, 1.0), [0.6, 0.8])
    np.testing.assert_array_equal(clip_to_norm(np.array([0.3, 0.4]), 1.0), [0.3, 0.4])


def test_bad_updates_and_parameters_are_refused() -> None:
    quantiser = Quantiser(1.0, 32, 10)
    with pytest.raises(SecAggError) as caught:
        quantiser.quantise(np.array([1.0, np.nan]), np.random.default_rng(0))
    assert caught.value.reason == SecAggReason.BAD_VECTOR
    for clip, bits, n in ((0.0, 32, 10), (float("inf"), 32, 10), (1.0, 7, 10), (1.0, 8, 1000), (1.0, 32, 0)):
        with pytest.raises(SecAggError) as caught:
            Quantiser(clip, bits, n)
        assert caught.value.reason == SecAggReason.BAD_PARAMETERS
