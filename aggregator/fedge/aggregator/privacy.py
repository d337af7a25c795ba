"""Client-level differential privacy, the aggregator's part (issue 14): the accountant, the
budget stop and the adaptive clip bound.

Pure (no I/O, no clocks), like ``RoundEngine``: the engine asks :meth:`PrivacyAccountant.
would_exceed_budget` before it opens a train round, calls :meth:`PrivacyAccountant.record_round`
once for every round whose noised aggregate it *uses* (aborted rounds whose sum is never
unmasked or applied cost nothing), and checkpoints :meth:`PrivacyAccountant.state` with
``EngineState``. The noise itself is in ``fedge.protocol.dp_noise``; the concepts are in
``docs/differential-privacy.md``.

The accounting uses Google's ``dp-accounting``:

- **Neighbouring relation**: add or remove one device (all of its data): client-level DP.
- **Mechanism per round**: the Gaussian mechanism on the sum of clipped updates (sensitivity
  the clip bound, noise ``noise_multiplier * clip_bound``), Poisson-subsampled with
  ``sampling_rate`` (a ``PoissonSampledDpEvent``; with ``sampling_rate = 1`` simply a
  ``GaussianDpEvent``), composed over rounds. With adaptive clipping each round also releases
  the noisy count of unclipped updates; both Gaussians are composed into one event, so their
  joint cost is that of one Gaussian of multiplier ``noise_multiplier`` (Andrew et al. 2021).
- **Accountant**: RDP (``RdpAccountant``, the default orders) or PLD (``PLDAccountant``,
  pessimistic discretisation, tighter, slower).

Sampling in fedge: ``RoundEngine.select_devices`` draws a fixed number of the ready devices
without replacement, from a seed, and the signed manifest names them. Amplification by
subsampling needs the sample to be random *and secret* from whoever the guarantee is against;
fedge's is neither secret (the manifest, the broker's traffic) nor unpredictable (the seed). So
the sound default is ``sampling_rate = 1``: every round is charged to every device at full
price. A rate below 1 (Poisson accounting, ``k / N``, as in McMahan et al. 2018) only holds once
selection is independent per device (Poisson), drawn from a secret random source, and hidden
from the adversary considered; see ``docs/differential-privacy.md``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import dp_accounting
import numpy as np
import numpy.typing as npt
from dp_accounting import pld, rdp

from fedge.protocol.errors import FedgeError

__all__ = [
    "ACCOUNTANTS",
    "PLD_DISCRETIZATION",
    "STATE_FORMAT",
    "AdaptiveClipping",
    "PrivacyAccountant",
    "PrivacyConfig",
    "PrivacyError",
    "PrivacyStateError",
    "compute_epsilon",
    "next_clip_bound",
    "noise_multiplier_for",
    "split_noise_multiplier",
    "unclipped_fraction",
]

AccountantName = Literal["rdp", "pld"]
ACCOUNTANTS: Final = ("rdp", "pld")
#: Width of the privacy-loss grid of the PLD accountant. dp-accounting's default (1e-4) takes
#: five seconds for a hundred full-batch rounds, 1e-3 a quarter of a second. The grid is
#: pessimistic, so a coarser one only rounds epsilon up: by 1e-6 for 100 full-batch rounds, by
#: 1.4 % for 10,000 rounds at q = 0.01 (0.960 instead of 0.947).
PLD_DISCRETIZATION: Final = 1e-3
#: The version of :meth:`PrivacyAccountant.state`'s layout.
STATE_FORMAT: Final = 1
_MAX_NOISE_MULTIPLIER = 1e4


class PrivacyError(FedgeError):
    """A privacy parameter that cannot work (say, a sampling rate of 0)."""


class PrivacyStateError(PrivacyError):
    """A checkpointed privacy state that is damaged or does not belong to this config."""


def _number(name: str, value: object, *, low: float, high: float = math.inf, low_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PrivacyError(f"{name} must be a number, not {value!r}")
    v = float(value)
    too_low = v <= low if low_open else v < low
    if not math.isfinite(v) or too_low or v > high:
        if high == math.inf:
            wanted = f"a finite number {'>' if low_open else '>='} {low:g}"
        else:
            wanted = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
        raise PrivacyError(f"{name} must be {wanted}, not {value!r}")
    return v


@dataclass(frozen=True)
class AdaptiveClipping:
    """The clip bound follows a quantile of the update norms (Andrew et al. 2021).

    After each round: ``bound *= exp(-learning_rate * (unclipped_fraction - target_quantile))``,
    where the fraction of devices whose update was within the bound is estimated from a sum
    noised with standard deviation ``clip_count_stddev`` (in devices). Defaults are the paper's
    (and TensorFlow Federated's): median, rate 0.2; :meth:`for_participants` picks
    ``clip_count_stddev = expected participants / 20``."""

    clip_count_stddev: float
    target_quantile: float = 0.5
    learning_rate: float = 0.2

    def __post_init__(self) -> None:
        _number("clip_count_stddev", self.clip_count_stddev, low=0.0)
        _number("target_quantile", self.target_quantile, low=0.0, high=1.0, low_open=False)
        _number("learning_rate", self.learning_rate, low=0.0)

    @classmethod
    def for_participants(cls, expected_participants: float) -> AdaptiveClipping:
        """The paper's defaults, with ``clip_count_stddev = expected_participants / 20`` (a
        standard deviation of 0.05 on the estimated fraction)."""
        m = _number("expected_participants", expected_participants, low=0.0)
        return cls(clip_count_stddev=m / 20)

    @property
    def indicator_noise_multiplier(self) -> float:
        """The count's noise over its sensitivity. Devices send ``+1`` (within the bound) or
        ``-1`` (``fedge.protocol.dp_noise.unclipped_indicator``), the centred bit times two, so
        one device moves the sum by at most 1 and the sum's noise is ``2 * clip_count_stddev``
        in these units: multiplier ``2 * clip_count_stddev``."""
        return 2 * self.clip_count_stddev


def split_noise_multiplier(noise_multiplier: float, clip_count_stddev: float) -> float:
    """The noise multiplier left for the updates when a round also releases the noisy count of
    unclipped updates, so that the two together cost what one Gaussian of ``noise_multiplier``
    costs: ``(z**-2 - (2 * clip_count_stddev)**-2) ** -0.5`` (Andrew et al. 2021, section 3.2).
    Needs ``2 * clip_count_stddev > noise_multiplier``."""
    z = _number("noise_multiplier", noise_multiplier, low=0.0)
    zb = 2 * _number("clip_count_stddev", clip_count_stddev, low=0.0)
    rest = z**-2 - zb**-2
    if rest <= 0:
        raise PrivacyError(
            f"clip_count_stddev {clip_count_stddev:g} is too small for noise_multiplier {z:g}: "
            f"the count alone would spend the whole budget (need 2 * clip_count_stddev > {z:g})"
        )
    return float(rest**-0.5)


def unclipped_fraction(noisy_indicator_sum: float, expected_participants: float) -> float:
    """The estimated fraction of updates within the bound, from the noisy sum of the devices'
    ``+1``/``-1`` indicators: ``1/2 + sum / (2 m)``, ``m`` the *expected* number of
    participants (a public constant: dividing by the actual count would leak it). Not clamped to
    [0, 1]: the noise makes it wander, and the geometric update takes any value."""
    s = _number("noisy_indicator_sum", noisy_indicator_sum, low=-math.inf)
    m = _number("expected_participants", expected_participants, low=0.0)
    return 0.5 + s / (2 * m)


def next_clip_bound(bound: float, fraction_unclipped: float, adaptive: AdaptiveClipping) -> float:
    """Andrew et al.'s geometric update: ``bound * exp(-eta * (fraction - target))``. More
    updates within the bound than the target quantile: the bound shrinks; fewer: it grows."""
    b = _number("bound", bound, low=0.0)
    f = _number("fraction_unclipped", fraction_unclipped, low=-math.inf)
    return b * math.exp(-adaptive.learning_rate * (f - adaptive.target_quantile))


@dataclass(frozen=True)
class PrivacyConfig:
    """The fleet's privacy parameters (the planned ``[privacy]`` table). Defaults, and why,
    in ``docs/differential-privacy.md``.

    ``noise_multiplier``: the noise on the sum over the clip bound, for the whole round (with
    adaptive clipping it covers the count too; the updates get
    :attr:`update_noise_multiplier`). ``clip_bound``: the fixed bound, or the first one with
    ``adaptive``. ``epsilon_budget``/``target_delta``: training stops before a round would make
    the spent epsilon at ``target_delta`` exceed the budget. ``sampling_rate``: the probability
    that a given device takes part in a round, for Poisson accounting (1: none assumed).
    ``accountant``: ``"rdp"`` or ``"pld"``."""

    noise_multiplier: float
    clip_bound: float = 0.1
    epsilon_budget: float = 8.0
    target_delta: float = 1e-5
    sampling_rate: float = 1.0
    accountant: AccountantName = "rdp"
    adaptive: AdaptiveClipping | None = None

    def __post_init__(self) -> None:
        _number("noise_multiplier", self.noise_multiplier, low=0.0)
        _number("clip_bound", self.clip_bound, low=0.0)
        _number("epsilon_budget", self.epsilon_budget, low=0.0)
        _number("target_delta", self.target_delta, low=0.0, high=1.0, low_open=True)
        if self.target_delta >= 1:
            raise PrivacyError(f"target_delta must be in (0, 1), not {self.target_delta!r}")
        _number("sampling_rate", self.sampling_rate, low=0.0, high=1.0)
        if self.accountant not in ACCOUNTANTS:
            raise PrivacyError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, not {self.accountant!r}")
        if self.adaptive is not None:
            split_noise_multiplier(self.noise_multiplier, self.adaptive.clip_count_stddev)

    @property
    def update_noise_multiplier(self) -> float:
        """The multiplier of the noise on the sum of updates: ``noise_multiplier`` with fixed
        clipping, less with adaptive clipping (:func:`split_noise_multiplier`)."""
        if self.adaptive is None:
            return float(self.noise_multiplier)
        return split_noise_multiplier(self.noise_multiplier, self.adaptive.clip_count_stddev)

    def parameters(self) -> dict[str, Any]:
        """The parameters a checkpointed state must match, flat and JSON-safe."""
        a = self.adaptive
        return {
            "accountant": self.accountant,
            "noise_multiplier": float(self.noise_multiplier),
            "clip_bound": float(self.clip_bound),
            "epsilon_budget": float(self.epsilon_budget),
            "target_delta": float(self.target_delta),
            "sampling_rate": float(self.sampling_rate),
            "adaptive_clip_count_stddev": None if a is None else float(a.clip_count_stddev),
            "adaptive_target_quantile": None if a is None else float(a.target_quantile),
            "adaptive_learning_rate": None if a is None else float(a.learning_rate),
        }


# -- epsilon -------------------------------------------------------------------------------------


def _round_event(sampling_rate: float, noise_multiplier: float) -> Any:
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate == 1.0:
        return gaussian
    return dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)


def _new_accountant(name: AccountantName) -> Any:
    if name == "pld":
        return pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    return rdp.RdpAccountant()


@functools.lru_cache(maxsize=256)
def _rdp_of_one_round(sampling_rate: float, noise_multiplier: float) -> npt.NDArray[np.float64]:
    """The RDP curve (at dp-accounting's default orders) of one round, computed once: the
    subsampled-Gaussian series is slow at some fractional orders, and a fleet repeats the same
    round. Read-only, because it is shared."""
    accountant = rdp.RdpAccountant()
    accountant.compose(_round_event(sampling_rate, noise_multiplier), 1)
    curve = np.array(accountant.rdp, dtype=np.float64)
    curve.setflags(write=False)
    return curve


def _epsilon(
    runs: Sequence[tuple[float, int]], noise_multiplier: float, delta: float, name: AccountantName
) -> float:
    """Epsilon at ``delta`` after ``runs`` of ``(sampling_rate, rounds)``. RDP: the same sum of
    ``count * curve`` that ``RdpAccountant.compose(event, count)`` forms, then its conversion."""
    runs = [(q, n) for q, n in runs if n > 0]
    if not runs:
        return 0.0
    if name == "rdp":
        total = np.zeros_like(_rdp_of_one_round(runs[0][0], noise_multiplier))
        for q, n in runs:
            total += n * _rdp_of_one_round(q, noise_multiplier)
        orders = rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS
        return float(rdp.rdp_privacy_accountant.compute_epsilon(orders, total, delta)[0])
    accountant = _new_accountant(name)
    for q, n in runs:
        accountant.compose(_round_event(q, noise_multiplier), n)
    return float(accountant.get_epsilon(delta))


def compute_epsilon(
    noise_multiplier: float,
    sampling_rate: float,
    rounds: int,
    delta: float,
    accountant: AccountantName = "rdp",
) -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds of the (Poisson-subsampled) Gaussian
    mechanism with ``noise_multiplier`` (the effective one: with adaptive clipping, the
    config's ``noise_multiplier``, not the updates' share)."""
    z = _number("noise_multiplier", noise_multiplier, low=0.0)
    q = _number("sampling_rate", sampling_rate, low=0.0, high=1.0)
    d = _number("delta", delta, low=0.0, high=1.0)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise PrivacyError(f"rounds must be an integer >= 0, not {rounds!r}")
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, not {accountant!r}")
    return _epsilon([(q, rounds)], z, d, accountant)


def noise_multiplier_for(
    epsilon: float,
    delta: float,
    rounds: int,
    sampling_rate: float,
    accountant: AccountantName = "rdp",
    rel_tol: float = 1e-3,
) -> float:
    """The smallest noise multiplier (to ``rel_tol``) whose ``rounds`` rounds at
    ``sampling_rate`` spend at most ``epsilon`` at ``delta``, by binary search (epsilon falls
    as the multiplier grows). The result always meets the target; one ``rel_tol`` less would
    not. With adaptive clipping this is the config's ``noise_multiplier``."""
    target = _number("epsilon", epsilon, low=0.0)
    tol = _number("rel_tol", rel_tol, low=0.0, high=0.5)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise PrivacyError(f"rounds must be an integer >= 1, not {rounds!r}")

    def spent(z: float) -> float:
        return compute_epsilon(z, sampling_rate, rounds, delta, accountant)

    low, high = 0.0, 1.0
    while spent(high) > target:
        low, high = high, high * 2
        if high > _MAX_NOISE_MULTIPLIER:
            raise PrivacyError(
                f"no noise multiplier up to {_MAX_NOISE_MULTIPLIER:g} reaches epsilon {target:g}"
            )
    while high - low > tol * high:
        mid = (low + high) / 2
        if spent(mid) > target:
            low = mid
        else:
            high = mid
    return high


# -- the accountant ------------------------------------------------------------------------------


_STATE_KEYS: Final = frozenset(
    {"format", "rounds", "ledger", "current_clip_bound", "epsilon_spent"}
    | set(PrivacyConfig(noise_multiplier=1.0).parameters())
)


class PrivacyAccountant:
    """What the fleet has spent, and whether it may spend more.

    ``ledger``: the rounds recorded so far as runs ``[sampling_rate, rounds]``; ``clip_bound``:
    the bound for the next round (fixed, or adapted). Everything survives a restart through
    :meth:`state` and :meth:`from_state`. Epsilon is always computed from the ledger alone, so
    a restored accountant gives the very same numbers as the one that was checkpointed."""

    def __init__(self, config: PrivacyConfig) -> None:
        self.config = config
        self._ledger: list[list[float | int]] = []
        self._clip_bound = float(config.clip_bound)
        self._cache: dict[tuple[tuple[tuple[float, int], ...], float], float] = {}

    def _spent(self, runs: list[tuple[float, int]], delta: float) -> float:
        key = (tuple(runs), delta)
        if key not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = _epsilon(runs, self.config.noise_multiplier, delta, self.config.accountant)
        return self._cache[key]

    # -- reading ---------------------------------------------------------------------------------

    @property
    def rounds(self) -> int:
        """The number of rounds recorded."""
        return sum(int(n) for _, n in self._ledger)

    @property
    def clip_bound(self) -> float:
        """The clip bound for the next round."""
        return self._clip_bound

    @property
    def ledger(self) -> list[list[float | int]]:
        return [list(run) for run in self._ledger]

    def _runs(self) -> list[tuple[float, int]]:
        return [(float(q), int(n)) for q, n in self._ledger]

    def epsilon_spent(self, delta: float | None = None) -> float:
        """Epsilon at ``delta`` (default: the config's ``target_delta``) of every round
        recorded so far: the guarantee each device has for the whole training so far."""
        d = self.config.target_delta if delta is None else _number("delta", delta, low=0.0, high=1.0)
        return self._spent(self._runs(), d)

    def epsilon_after(self, extra_rounds: int = 1, sampling_rate: float | None = None) -> float:
        """Epsilon at ``target_delta`` if ``extra_rounds`` more rounds ran at ``sampling_rate``
        (default: the config's)."""
        q = self._rate(sampling_rate)
        if isinstance(extra_rounds, bool) or not isinstance(extra_rounds, int) or extra_rounds < 0:
            raise PrivacyError(f"extra_rounds must be an integer >= 0, not {extra_rounds!r}")
        runs = self._runs()
        if runs and runs[-1][0] == q:
            runs[-1] = (q, runs[-1][1] + extra_rounds)
        else:
            runs.append((q, extra_rounds))
        return self._spent(runs, self.config.target_delta)

    def would_exceed_budget(self, sampling_rate: float | None = None) -> bool:
        """True if one more round would take the spent epsilon over ``epsilon_budget``: ask
        before opening a train round, and do not open it if so (the fleet then stops with
        what it has, the budget never overspent)."""
        return self.epsilon_after(1, sampling_rate) > self.config.epsilon_budget

    def rounds_left(self, sampling_rate: float | None = None, limit: int = 1_000_000) -> int:
        """How many more rounds fit in the budget (at most ``limit``), for status pages."""
        if self.epsilon_after(1, sampling_rate) > self.config.epsilon_budget:
            return 0
        fits, over = 1, 2
        while over <= limit and self.epsilon_after(over, sampling_rate) <= self.config.epsilon_budget:
            fits, over = over, over * 2
        if over > limit:
            if self.epsilon_after(limit, sampling_rate) <= self.config.epsilon_budget:
                return limit
            over = limit
        while over - fits > 1:
            mid = (fits + over) // 2
            if self.epsilon_after(mid, sampling_rate) <= self.config.epsilon_budget:
                fits = mid
            else:
                over = mid
        return fits

    # -- writing ---------------------------------------------------------------------------------

    def _rate(self, sampling_rate: float | None) -> float:
        if sampling_rate is None:
            return float(self.config.sampling_rate)
        return _number("sampling_rate", sampling_rate, low=0.0, high=1.0)

    def record_round(
        self,
        sampling_rate: float | None = None,
        noisy_indicator_sum: float | None = None,
        expected_participants: float | None = None,
    ) -> float:
        """Charges one round whose noised aggregate was used, and returns the epsilon spent.

        Recording never refuses for the budget: the round has happened, and its cost must be
        on the books (gate with :meth:`would_exceed_budget` before the round instead). With
        adaptive clipping, pass the round's noisy sum of ``+1``/``-1`` indicators and the
        expected number of participants: the bound is updated in the same step, so the count
        is never used without being charged. Arguments are checked before anything changes."""
        q = self._rate(sampling_rate)
        adaptive = self.config.adaptive
        given = noisy_indicator_sum is not None or expected_participants is not None
        next_bound = self._clip_bound
        if adaptive is None:
            if given:
                raise PrivacyError("clipping is fixed: record_round takes no indicator sum")
        else:
            if noisy_indicator_sum is None or expected_participants is None:
                raise PrivacyError(
                    "clipping is adaptive: record_round needs noisy_indicator_sum and expected_participants"
                )
            fraction = unclipped_fraction(noisy_indicator_sum, expected_participants)
            next_bound = next_clip_bound(self._clip_bound, fraction, adaptive)
        if self._ledger and float(self._ledger[-1][0]) == q:
            self._ledger[-1][1] = int(self._ledger[-1][1]) + 1
        else:
            self._ledger.append([q, 1])
        self._clip_bound = next_bound
        return self.epsilon_spent()

    # -- checkpoint ------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """A plain, JSON-safe dict (numbers, strings, lists, None) to checkpoint with the engine:
        the config's parameters (checked on restore), the ledger, the clip bound for the next
        round (``current_clip_bound``), and
        the epsilon spent (for people and dashboards; recomputed on restore)."""
        return {
            "format": STATE_FORMAT,
            **self.config.parameters(),
            "rounds": self.rounds,
            "ledger": self.ledger,
            "current_clip_bound": self._clip_bound,
            "epsilon_spent": self.epsilon_spent(),
        }

    @classmethod
    def from_state(cls, config: PrivacyConfig, state: Mapping[str, Any]) -> PrivacyAccountant:
        """The accountant a checkpointed :meth:`state` describes, for ``config``. Refuses, with a
        one-line :class:`PrivacyStateError` naming the key, a state that is damaged or whose
        parameters differ from ``config`` (the spent budget would no longer mean anything)."""
        if not isinstance(state, Mapping):
            raise PrivacyStateError(f"privacy state: must be a mapping, not {type(state).__name__}")
        missing = sorted(_STATE_KEYS - set(state))
        if missing:
            raise PrivacyStateError(f"privacy state: {missing[0]!r} is missing")
        unknown = sorted(set(state) - _STATE_KEYS, key=str)
        if unknown:
            raise PrivacyStateError(f"privacy state: unknown key {unknown[0]!r}")
        if state["format"] != STATE_FORMAT or isinstance(state["format"], bool):
            raise PrivacyStateError(
                f"privacy state: 'format' is {state['format']!r}, expected {STATE_FORMAT}"
            )
        for key, expected in config.parameters().items():
            found = state[key]
            if type(found) is not type(expected) and not (
                isinstance(expected, float) and isinstance(found, int) and not isinstance(found, bool)
            ):
                raise PrivacyStateError(f"privacy state: {key!r} is {found!r}, the config has {expected!r}")
            if found != expected:
                raise PrivacyStateError(f"privacy state: {key!r} is {found!r}, the config has {expected!r}")
        ledger = _checked_ledger(state["ledger"])
        accountant = cls(config)
        try:
            clip_bound = _number("current_clip_bound", state["current_clip_bound"], low=0.0)
        except PrivacyError as exc:
            raise PrivacyStateError(f"privacy state: {exc}") from None
        rounds = sum(n for _, n in ledger)
        if state["rounds"] != rounds or isinstance(state["rounds"], bool):
            raise PrivacyStateError(
                f"privacy state: 'rounds' is {state['rounds']!r}, the ledger holds {rounds}"
            )
        if config.adaptive is None and clip_bound != config.clip_bound:
            raise PrivacyStateError(
                f"privacy state: 'current_clip_bound' is {clip_bound!r}, "
                f"fixed clipping at {config.clip_bound!r}"
            )
        accountant._ledger = [[q, n] for q, n in ledger]
        accountant._clip_bound = clip_bound
        return accountant


def _checked_ledger(value: object) -> list[tuple[float, int]]:
    if not isinstance(value, list):
        raise PrivacyStateError(f"privacy state: 'ledger' must be a list, not {type(value).__name__}")
    runs: list[tuple[float, int]] = []
    for i, run in enumerate(value):
        ok = (
            isinstance(run, list)
            and len(run) == 2
            and isinstance(run[0], int | float)
            and not isinstance(run[0], bool)
            and math.isfinite(run[0])
            and 0 < run[0] <= 1
            and isinstance(run[1], int)
            and not isinstance(run[1], bool)
            and run[1] >= 1
        )
        if not ok:
            raise PrivacyStateError(
                f"privacy state: 'ledger'[{i}] must be [sampling_rate in (0, 1], rounds >= 1], not {run!r}"
            )
        runs.append((float(run[0]), int(run[1])))
    return runs
