"""Seeds and masks: deterministic, independent across seeds, rounds and pairs, and cancelling."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.protocol.secagg import RoundKeys, SecAggError, SecAggReason
from fedge.protocol.secagg.prg import (
    add_mod,
    agree,
    expand_mask,
    mask_sign,
    modulus_mask,
    pairwise_seed,
    self_mask_seed,
)


@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.integers(1, 300), st.integers(8, 62))
def test_a_mask_is_a_function_of_its_seed_and_in_range(seed: bytes, length: int, bits: int) -> None:
    first, second = expand_mask(seed, length, bits), expand_mask(seed, length, bits)
    np.testing.assert_array_equal(first, second)
    assert first.dtype == np.uint64 and first.shape == (length,)
    assert int(first.max()) < 2**bits
    # A longer mask extends the shorter one (the same ChaCha20 stream).
    np.testing.assert_array_equal(expand_mask(seed, length + 5, bits)[:length], first)


def test_masks_differ_across_seeds_rounds_and_pairs() -> None:
    a, b, c = RoundKeys.generate(), RoundKeys.generate(), RoundKeys.generate()
    secret_ab = agree(a.mask_private, b.mask_public)
    assert secret_ab == agree(b.mask_private, a.mask_public)
    assert secret_ab != agree(a.mask_private, c.mask_public)
    seed = pairwise_seed(secret_ab, "r-1", "a", "b")
    assert seed == pairwise_seed(secret_ab, "r-1", "b", "a")  # either end computes the same
    others = {
        pairwise_seed(secret_ab, "r-2", "a", "b"),
        pairwise_seed(secret_ab, "r-1", "a", "c"),
        pairwise_seed(secret_ab, "r-1", "ab", ""),  # length-prefixed: no ambiguity
        self_mask_seed(secret_ab, "r-1", "a"),
        self_mask_seed(secret_ab, "r-2", "a"),
        self_mask_seed(secret_ab, "r-1", "b"),
    }
    assert seed not in others and len(others) == 6
    masks = [expand_mask(s, 512, 32) for s in [seed, *others]]
    for i, first in enumerate(masks):
        for second in masks[i + 1 :]:
            assert np.count_nonzero(first == second) < 3  # independent streams rarely collide
    # Roughly uniform: the mean of 512 uniform 32-bit values is within 6 sigma of 2**31.
    assert abs(float(masks[0].mean()) - 2**31) < 6 * 2**32 / np.sqrt(12 * 512)


def test_pairwise_masks_cancel_with_the_sign_convention() -> None:
    a, b = RoundKeys.generate(), RoundKeys.generate()
    mask = expand_mask(pairwise_seed(agree(a.mask_private, b.mask_public), "r", "x", "y"), 64, 20)
    total = np.zeros(64, dtype=np.uint64)
    add_mod(total, mask, mask_sign("x", "y"))
    add_mod(total, mask, mask_sign("y", "x"))
    np.testing.assert_array_equal(total & modulus_mask(20), np.zeros(64, dtype=np.uint64))
    assert mask_sign("x", "y") == -mask_sign("y", "x")


def test_a_low_order_public_key_is_refused() -> None:
    with pytest.raises(SecAggError) as caught:
        agree(RoundKeys.generate().mask_private, bytes(32))
    assert caught.value.reason == SecAggReason.BAD_KEY


def test_an_oversized_mask_or_modulus_is_refused_before_allocating() -> None:
    with pytest.raises(SecAggError) as caught:
        expand_mask(bytes(32), 1 << 40, 32)
    assert caught.value.reason == SecAggReason.TOO_LARGE
    with pytest.raises(SecAggError) as caught:
        expand_mask(bytes(32), 4, 63)
    assert caught.value.reason == SecAggReason.BAD_PARAMETERS
