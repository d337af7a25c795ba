"""Choosing the graph degree k and the threshold t from the fleet size and target failure rates.

The two failure events (Bell et al. 2020, section 3; bounded here with a union bound over the n
devices and treating each neighbour as independently dropped or corrupted with the given
rates; in a complete graph the draws are without replacement, for which the binomial tail is
an upper bound):

- **Privacy fails** for an honest device u if the adversary (the aggregator together with the
  corrupted devices) can get both t shares of u's self-mask secret and t shares of its mask key.
  Corrupted neighbours (c of them) hand over both; an honest neighbour reveals at most one of
  the two for u (:class:`~fedge.protocol.secagg.device.DeviceSession` remembers), so the
  adversary needs ``k - c >= 2 (t - c)``, that is ``c >= 2t - k``. With ``t > k / 2`` the
  honest neighbours alone can never be made to reveal both, and with c corrupted neighbours
  privacy holds while ``c < 2t - k``. Bound: ``n * P[Binomial(k, gamma) >= 2t - k]``.
- **The round fails** if some device, alive or dropped, has fewer than t surviving neighbours
  (its secret cannot be rebuilt). Bound: ``n * P[Binomial(k, 1 - delta) < t]``.

:func:`choose_parameters` takes the smallest even k (below ``n - 1``) for which some t meets
both targets (``2**-security_bits`` and ``2**-correctness_bits``), and the smallest such t (the
most dropouts tolerated). Bell et al. get k = O(log n): with 10 % dropouts and 10 % corrupted
devices this gives k = 104, t = 73 for 200 devices, k = 112, t = 78 for 1000 and k = 124,
t = 86 for 10^4 (the tests pin these). Below about 200 devices no sparse graph reaches the
targets, so the fleet uses the complete graph (k = n - 1) with the smallest threshold that
meets the privacy target, if that one still meets the correctness target; else Bonawitz et
al.'s rule for a malicious server, ``t = floor(2k/3) + 1``: privacy holds while fewer than a
third of a device's neighbours are corrupted, and a device is recovered while at least t of its
neighbours survive (40 devices: t = 27, so 12 dropouts are tolerated). The bounds reached are
reported (``security_log2``, ``correctness_log2``, ``meets_targets``) so an operator sees what
a small fleet gets.

Sane minimums: at least 3 devices (with 2, the sum and one's own input reveal the other's),
``t >= 2`` (one neighbour alone must never be able to unmask anyone) and ``t > k / 2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedge.protocol.secagg.errors import SecAggReason, refusal
from fedge.protocol.secagg.graph import check_degree, is_complete

MIN_DEVICES = 3
#: Most devices a round may select: bounds every list in every message and the graph's size.
MAX_DEVICES = 10_000
#: Most neighbours a device may have (the complete graph of up to 1001 devices).
MAX_DEGREE = 1_000


@dataclass(frozen=True)
class SecAggParams:
    """The graph degree and threshold for ``n`` devices, and the failure bounds they reach."""

    n: int
    degree: int
    threshold: int
    dropout_rate: float
    corrupt_fraction: float
    #: log2 of the bound on the probability that some honest device's input is exposed.
    security_log2: float
    #: log2 of the bound on the probability that dropouts make the round fail.
    correctness_log2: float
    meets_targets: bool

    @property
    def complete(self) -> bool:
        return is_complete(self.n, self.degree)


def check_parameters(n: int, degree: int, threshold: int) -> None:
    """Refuses (``bad_parameters``) a fleet size, degree and threshold the protocol does not allow."""
    if isinstance(n, bool) or not isinstance(n, int) or not MIN_DEVICES <= n <= MAX_DEVICES:
        raise refusal(
            SecAggReason.BAD_PARAMETERS, f"n must be in {MIN_DEVICES}..{MAX_DEVICES}", field="n", found=n
        )
    check_degree(n, degree)
    if degree > MAX_DEGREE:
        raise refusal(
            SecAggReason.BAD_PARAMETERS, f"degree must be <= {MAX_DEGREE}", field="degree", found=degree
        )
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, int)
        or not max(2, degree // 2 + 1) <= threshold <= degree
    ):
        raise refusal(
            SecAggReason.BAD_PARAMETERS,
            "threshold must be > degree / 2, >= 2 and <= degree",
            field="threshold",
            expected=f"{max(2, degree // 2 + 1)}..{degree}",
            found=threshold,
        )


def _log2_binomial_tail(k: int, p: float, at_least: int) -> float:
    """log2 P[Binomial(k, p) >= at_least] (``-inf`` when impossible)."""
    if at_least <= 0:
        return 0.0
    if at_least > k or p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return 0.0
    logs = [
        math.lgamma(k + 1)
        - math.lgamma(i + 1)
        - math.lgamma(k - i + 1)
        + i * math.log(p)
        + (k - i) * math.log1p(-p)
        for i in range(at_least, k + 1)
    ]
    top = max(logs)
    return (top + math.log(sum(math.exp(value - top) for value in logs))) / math.log(2)


def failure_bounds(
    n: int, degree: int, threshold: int, dropout_rate: float, corrupt_fraction: float
) -> tuple[float, float]:
    """``(security_log2, correctness_log2)``: union bounds over ``n`` devices, as log2."""
    log2_n = math.log2(n)
    security = log2_n + _log2_binomial_tail(degree, corrupt_fraction, 2 * threshold - degree)
    survivors_short = degree - threshold + 1  # fewer than t survive  <=>  more than k - t drop
    correctness = log2_n + _log2_binomial_tail(degree, dropout_rate, survivors_short)
    return min(security, 0.0), min(correctness, 0.0)


def choose_parameters(
    n: int,
    *,
    dropout_rate: float = 0.1,
    corrupt_fraction: float = 0.1,
    security_bits: int = 40,
    correctness_bits: int = 20,
) -> SecAggParams:
    """The degree and threshold for ``n`` devices (module docstring: how and why)."""
    if isinstance(n, bool) or not isinstance(n, int) or not MIN_DEVICES <= n <= MAX_DEVICES:
        raise refusal(
            SecAggReason.BAD_PARAMETERS, f"n must be in {MIN_DEVICES}..{MAX_DEVICES}", field="n", found=n
        )
    for name, rate in (("dropout_rate", dropout_rate), ("corrupt_fraction", corrupt_fraction)):
        if not 0.0 <= rate < 0.5:
            raise refusal(SecAggReason.BAD_PARAMETERS, f"{name} must be in [0, 0.5)", field=name, found=rate)
    if not 1 <= security_bits <= 256 or not 1 <= correctness_bits <= 256:
        raise refusal(SecAggReason.BAD_PARAMETERS, "security_bits and correctness_bits must be in 1..256")

    def build(degree: int, threshold: int) -> SecAggParams:
        security, correctness = failure_bounds(n, degree, threshold, dropout_rate, corrupt_fraction)
        meets = security <= -security_bits and correctness <= -correctness_bits
        return SecAggParams(
            n, degree, threshold, dropout_rate, corrupt_fraction, security, correctness, meets
        )

    def best_threshold(degree: int) -> int | None:
        for threshold in range(max(2, degree // 2 + 1), degree + 1):
            candidate = build(degree, threshold)
            if candidate.security_log2 > -security_bits:
                continue
            return threshold if candidate.correctness_log2 <= -correctness_bits else None
        return None

    for degree in range(4, min(n - 1, MAX_DEGREE + 1), 2):
        threshold = best_threshold(degree)
        if threshold is not None:
            return build(degree, threshold)
    degree = n - 1
    if degree > MAX_DEGREE:
        raise refusal(
            SecAggReason.BAD_PARAMETERS,
            "no degree up to the maximum meets the targets; relax them",
            field="n",
            found=n,
        )
    threshold = best_threshold(degree)
    if threshold is None:
        threshold = max(2, min(degree, 2 * degree // 3 + 1))
    return build(degree, threshold)
