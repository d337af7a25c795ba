"""Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(2**521 - 1).

Why this field: a share must be uniform over a field larger than the secret, so that any
``t - 1`` shares are consistent with *every* secret; ``2**521 - 1`` is a Mersenne prime above
``2**256`` (the secrets here are 32-byte X25519 private keys and self-mask secrets), and Python
integers do the arithmetic exactly. (Splitting over a smaller field, byte by byte over GF(256)
or modulo a 255-bit prime, would need either care about encoding or a prime just under the
secret size; a 521-bit field costs 66 bytes per share and avoids both.)

Share holders are identified by their x coordinate, the holder's 1-based index in the round's
sorted device list (:meth:`fedge.protocol.secagg.config.RoundConfig.share_x`), so a holder
cannot pretend to hold another's share without the aggregator noticing.

A share encodes to :data:`SHARE_BYTES` bytes whatever its value (4-byte big-endian x, 66-byte
big-endian y): the size of a message never depends on a secret.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nacl.utils import random as nacl_random

from fedge.protocol.secagg.errors import SecAggReason, refusal

PRIME = 2**521 - 1
SECRET_BYTES = 32
_X_BYTES = 4
_Y_BYTES = 66  # ceil(521 / 8)
SHARE_BYTES = _X_BYTES + _Y_BYTES
#: Most share holders a secret may have: x coordinates stay far below the field size, and a
#: caller cannot ask for an unbounded number of polynomial evaluations.
MAX_HOLDERS = 65_535

RandomBytes = Callable[[int], bytes]


@dataclass(frozen=True)
class Share:
    """One point ``(x, y)`` of the sharing polynomial; ``x`` is never 0 (that is the secret)."""

    x: int
    y: int

    def __post_init__(self) -> None:
        if not 1 <= self.x <= MAX_HOLDERS:
            raise refusal(SecAggReason.BAD_SHARE, f"share x must be in 1..{MAX_HOLDERS}", found=self.x)
        if not 0 <= self.y < PRIME:
            raise refusal(SecAggReason.BAD_SHARE, "share y is outside the field")

    def to_bytes(self) -> bytes:
        return self.x.to_bytes(_X_BYTES, "big") + self.y.to_bytes(_Y_BYTES, "big")

    @staticmethod
    def from_bytes(data: bytes) -> Share:
        if len(data) != SHARE_BYTES:
            raise refusal(
                SecAggReason.BAD_SHARE,
                "wrong share size",
                field="share",
                expected=SHARE_BYTES,
                found=len(data),
            )
        return Share(int.from_bytes(data[:_X_BYTES], "big"), int.from_bytes(data[_X_BYTES:], "big"))


def _check_threshold(threshold: int, holders: int) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise refusal(SecAggReason.BAD_PARAMETERS, "threshold must be a positive integer", found=threshold)
    if threshold > holders:
        raise refusal(
            SecAggReason.BAD_PARAMETERS,
            "threshold exceeds the number of holders",
            field="threshold",
            expected=f"<= {holders}",
            found=threshold,
        )


def random_field_element(random_bytes: RandomBytes = nacl_random) -> int:
    """A uniform element of the field, by rejection sampling of 521-bit numbers."""
    while True:
        value = int.from_bytes(random_bytes(_Y_BYTES), "big") & PRIME  # PRIME is 521 one-bits
        if value < PRIME:
            return value


def split_secret(
    secret: bytes, xs: Sequence[int], threshold: int, random_bytes: RandomBytes = nacl_random
) -> list[Share]:
    """Shares of ``secret`` (32 bytes) at the distinct points ``xs``; any ``threshold`` rebuild it.

    The polynomial has the secret as constant term and ``threshold - 1`` uniform coefficients.
    """
    if len(secret) != SECRET_BYTES:
        raise refusal(SecAggReason.BAD_PARAMETERS, "a shared secret is 32 bytes", found=len(secret))
    if len(xs) > MAX_HOLDERS or len(set(xs)) != len(xs):
        raise refusal(SecAggReason.BAD_PARAMETERS, "holders must be distinct and at most 65535")
    _check_threshold(threshold, len(xs))
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [random_field_element(random_bytes) for _ in range(threshold - 1)]
    return [Share(x, _evaluate(coefficients, x)) for x in xs]


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    result = 0
    for coefficient in reversed(coefficients):
        result = (result * x + coefficient) % PRIME
    return result


def interpolate(shares: Sequence[Share], at: int = 0) -> int:
    """The value at ``at`` of the polynomial of degree ``< len(shares)`` through ``shares``."""
    xs = [share.x for share in shares]
    if len(set(xs)) != len(xs):
        raise refusal(SecAggReason.BAD_SHARE, "two shares at the same x")
    total = 0
    for i, share in enumerate(shares):
        numerator, denominator = 1, 1
        for j, other in enumerate(xs):
            if j != i:
                numerator = numerator * (at - other) % PRIME
                denominator = denominator * (share.x - other) % PRIME
        total = (total + share.y * numerator * pow(denominator, -1, PRIME)) % PRIME
    return total


def polynomial_through(shares: Sequence[Share]) -> list[int]:
    """The coefficients (constant first) of the polynomial of degree ``< len(shares)`` through
    ``shares``: Lagrange's basis polynomials, each the product of all ``(X - x_j)`` divided by
    one ``(X - x_i)`` (synthetic division), weighted by ``y_i / prod_{j != i} (x_i - x_j)``."""
    xs = [share.x for share in shares]
    if len(set(xs)) != len(xs):
        raise refusal(SecAggReason.BAD_SHARE, "two shares at the same x")
    n = len(xs)
    master = [1]  # prod_j (X - x_j), constant first
    for x in xs:
        grown = [0] * (len(master) + 1)
        for k, c in enumerate(master):
            grown[k] = (grown[k] - x * c) % PRIME
            grown[k + 1] = (grown[k + 1] + c) % PRIME
        master = grown
    coefficients = [0] * n
    for share in shares:
        quotient = [0] * n  # master / (X - x_i): degree n - 1
        quotient[n - 1] = master[n]
        for k in range(n - 1, 0, -1):
            quotient[k - 1] = (master[k] + share.x * quotient[k]) % PRIME
        weight = share.y * pow(_evaluate(quotient, share.x), -1, PRIME) % PRIME
        for k in range(n):
            coefficients[k] = (coefficients[k] + weight * quotient[k]) % PRIME
    return coefficients


def reconstruct_secret(shares: Sequence[Share], threshold: int) -> bytes:
    """The 32-byte secret from at least ``threshold`` shares.

    The first ``threshold`` shares determine the polynomial; every further share must lie on it
    (else ``inconsistent_shares``: some holder sent a wrong share, and which one cannot be told
    from the shares alone). A constant term that is not a 32-byte value is inconsistent too.
    """
    _check_threshold(threshold, max(len(shares), threshold))
    if len(shares) < threshold:
        raise refusal(
            SecAggReason.TOO_FEW_SHARES,
            "not enough shares to rebuild the secret",
            expected=f">= {threshold}",
            found=len(shares),
        )
    basis = list(shares[:threshold])
    # The polynomial once (O(t^2)), then each further share checked by Horner (O(t)): checking
    # each by a fresh interpolation made a 100-device round's unmasking O(N^4) (6.5 s).
    coefficients = polynomial_through(basis)
    xs = {share.x for share in basis}
    for extra in shares[threshold:]:
        if extra.x in xs:
            raise refusal(SecAggReason.BAD_SHARE, "two shares at the same x")
        xs.add(extra.x)
        if _evaluate(coefficients, extra.x) != extra.y:
            raise refusal(SecAggReason.INCONSISTENT_SHARES, "the shares do not lie on one polynomial")
    secret = coefficients[0]
    if secret >= 1 << (8 * SECRET_BYTES):
        raise refusal(SecAggReason.INCONSISTENT_SHARES, "the shares rebuild no 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")
