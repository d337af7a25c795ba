"""Shamir sharing over GF(2**521 - 1): any t shares rebuild the secret; t - 1 reveal nothing,
in the algebraic sense that every secret is consistent with them (and with equally likely
coefficients: for each candidate secret exactly one polynomial matches the shares)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.protocol.secagg import SecAggError, SecAggReason
from fedge.protocol.secagg.shamir import (
    PRIME,
    SHARE_BYTES,
    Share,
    interpolate,
    reconstruct_secret,
    split_secret,
)

secrets = st.binary(min_size=32, max_size=32)


@st.composite
def sharings(draw: st.DrawFn) -> tuple[bytes, int, list[Share]]:
    n = draw(st.integers(2, 9))
    t = draw(st.integers(1, n))
    xs = draw(st.lists(st.integers(1, 65_535), min_size=n, max_size=n, unique=True))
    seed = draw(st.binary(min_size=8, max_size=8))
    counter = itertools.count()

    def random_bytes(size: int) -> bytes:
        return (seed + next(counter).to_bytes(8, "big")) * (size // 16) + b"\x00" * (size % 16)

    secret = draw(secrets)
    return secret, t, split_secret(secret, xs, t, random_bytes)


@settings(max_examples=60, deadline=None)
@given(sharings(), st.randoms(use_true_random=False))
def test_any_t_shares_rebuild_the_secret(sharing: tuple[bytes, int, list[Share]], rnd: object) -> None:
    secret, t, shares = sharing
    chosen = list(shares)
    rnd.shuffle(chosen)  # type: ignore[attr-defined]
    assert reconstruct_secret(chosen[:t], t) == secret
    assert reconstruct_secret(chosen, t) == secret  # extra shares are checked, and agree
    assert all(len(share.to_bytes()) == SHARE_BYTES for share in shares)
    assert all(Share.from_bytes(share.to_bytes()) == share for share in shares)


def _coefficients(points: list[tuple[int, int]]) -> list[int]:
    """The coefficients (constant first) of the polynomial of degree < len(points) through them."""
    result = [0] * len(points)
    for i, (xi, yi) in enumerate(points):
        basis, denominator = [1], 1
        for j, (xj, _) in enumerate(points):
            if j != i:
                basis = [(a - xj * b) % PRIME for a, b in zip([0, *basis], [*basis, 0], strict=True)]
                denominator = denominator * (xi - xj) % PRIME
        scale = yi * pow(denominator, -1, PRIME) % PRIME
        result = [(r + scale * b) % PRIME for r, b in zip(result, basis, strict=True)]
    return result


@settings(max_examples=40, deadline=None)
@given(sharings(), secrets)
def test_t_minus_one_shares_are_consistent_with_every_secret(
    sharing: tuple[bytes, int, list[Share]], other_secret: bytes
) -> None:
    """For the t - 1 shares an adversary holds and *any* other secret, there is one polynomial
    with that secret as constant term through those shares; sharing the other secret with its
    coefficients gives exactly the same t - 1 shares. So the shares say nothing about which."""
    _, t, shares = sharing
    seen = shares[: t - 1]
    points = [(0, int.from_bytes(other_secret, "big")), *((s.x, s.y) for s in seen)]
    coefficients = _coefficients(points)
    feed = iter(c.to_bytes(66, "big") for c in coefficients[1:])
    resplit = split_secret(other_secret, [s.x for s in shares], t, lambda size: next(feed))
    assert resplit[: t - 1] == seen
    assert reconstruct_secret(resplit[:t], t) == other_secret
    assert interpolate([*seen, resplit[t - 1]], 0) == int.from_bytes(other_secret, "big")


def test_too_few_shares_inconsistent_shares_and_bad_encodings_are_refused() -> None:
    shares = split_secret(b"\x01" * 32, [1, 2, 3, 4], 3)
    with pytest.raises(SecAggError) as caught:
        reconstruct_secret(shares[:2], 3)
    assert caught.value.reason == SecAggReason.TOO_FEW_SHARES
    lie = Share(shares[3].x, (shares[3].y + 1) % PRIME)
    with pytest.raises(SecAggError) as caught:
        reconstruct_secret([*shares[:3], lie], 3)
    assert caught.value.reason == SecAggReason.INCONSISTENT_SHARES
    with pytest.raises(SecAggError) as caught:
        reconstruct_secret([shares[0], shares[0], shares[1]], 3)
    assert caught.value.reason == SecAggReason.BAD_SHARE
    for raw in (b"", bytes(SHARE_BYTES), b"\x00\x00\x00\x01" + b"\xff" * 66, b"\x00" * (SHARE_BYTES + 1)):
        with pytest.raises(SecAggError) as caught:
            Share.from_bytes(raw)  # x = 0 is the secret itself; y >= p is outside the field
        assert caught.value.reason == SecAggReason.BAD_SHARE


def test_bad_sharing_parameters_are_refused() -> None:
    for secret, xs, t in (
        (b"\x01" * 31, [1, 2], 2),
        (b"\x01" * 32, [1, 1], 2),
        (b"\x01" * 32, [1, 2], 3),
        (b"\x01" * 32, [1, 2], 0),
    ):
        with pytest.raises(SecAggError) as caught:
            split_secret(secret, xs, t)
        assert caught.value.reason == SecAggReason.BAD_PARAMETERS
