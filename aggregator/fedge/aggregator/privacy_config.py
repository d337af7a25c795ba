"""The aggregator's ``[privacy]`` table: client-level differential privacy for a fleet.

Kept apart from :mod:`fedge.aggregator.config`, and apart from :mod:`fedge.aggregator.privacy`
(the accountant), because the accountant imports Google's ``dp-accounting`` (about 75 MB of
SciPy and mpmath in the process): a fleet without DP never loads it. :func:`privacy_config`
loads it when the table is enabled, once, at start-up.

Off by default: DP costs accuracy, and a fleet opts in. When on, the parameters that would
break the guarantee are refused here, with the fix in the message (``weighting =
"examples"``: one device's weight would follow its own claim, so its influence, the
sensitivity, would not be bounded by the clip bound). The ``[rounds]`` norm bounds step aside:
the DP clip bound is the only one applied, because the adaptive one is the exact median of
the previous round's norms, which is not private.

``secure_aggregation`` (off by default; ``docs/secure-aggregation.md``) runs train rounds as
SecAgg+ rounds: the aggregator only ever sees the sum of the updates. It works without DP and is
refused with it for now (central noise needs the plain updates' sum on a trusted aggregator;
distributed noise is not wired yet), with ``weighting = "examples"`` (the sum carries no
per-device weights), with ``min_devices`` below 3 (the protocol's minimum) and without a static
norm bound (devices clip to it before masking). :func:`secure_settings` is what the round engine
gets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from fedge.protocol.config_source import ConfigError, Table

if TYPE_CHECKING:
    from fedge.aggregator.config import RoundSettings
    from fedge.aggregator.privacy import PrivacyConfig

log = logging.getLogger("fedge.aggregator")

PRIVACY_KEYS: Final = {
    "enabled",
    "noise",
    "epsilon_budget",
    "target_delta",
    "noise_multiplier",
    "clip_bound",
    "adaptive_clipping",
    "target_quantile",
    "clip_learning_rate",
    "clip_count_stddev",
    "sampling_rate",
    "accountant",
    "secure_aggregation",
    "secure_aggregation_bits",
    "secure_aggregation_threshold",
}
#: ``noise``: who adds it. "central": the aggregator, to the sum (it sees the updates: trusted).
#: The distributed kinds ("skellam", "discrete_gaussian") need secure aggregation.
PRIVACY_NOISE: Final = ("central", "distributed_discrete_gaussian")


@dataclass(frozen=True)
class PrivacySettings:
    """``[privacy]`` as written (0 means "derive it"); :func:`privacy_config` resolves it."""

    enabled: bool = False
    noise: str = "central"
    epsilon_budget: float = 8.0
    target_delta: float = 1e-5
    #: 0: the smallest multiplier whose ``[rounds] rounds`` rounds fit in ``epsilon_budget``.
    noise_multiplier: float = 0.0
    clip_bound: float = 0.1
    adaptive_clipping: bool = True
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    #: 0: the noise multiplier itself (the count then takes a quarter of each round's budget).
    clip_count_stddev: float = 0.0
    sampling_rate: float = 1.0
    accountant: str = "rdp"
    #: Secure aggregation (SecAgg+, docs/secure-aggregation.md): train rounds whose updates the
    #: aggregator only ever sees summed. Works without differential privacy (``enabled``).
    secure_aggregation: bool = False
    #: The modulus ``2**bits`` of the masked sum (the quantiser's headroom shrinks with it).
    secure_aggregation_bits: int = 32
    #: The Shamir threshold t; 0: chosen per round by ``fedge.protocol.secagg.choose_parameters``.
    secure_aggregation_threshold: int = 0


PRIVACY_OFF: Final = PrivacySettings()
#: Fewest devices a secure round can have (``fedge.protocol.secagg.params.MIN_DEVICES``).
SECURE_MIN_DEVICES: Final = 3
SECURE_MIN_BITS: Final = 16
SECURE_MAX_BITS: Final = 62
#: Largest threshold (``fedge.protocol.secagg.params.MAX_DEGREE``: a threshold is at most the degree).
SECURE_MAX_THRESHOLD: Final = 1000
SECURE_WITH_CENTRAL_NOISE: Final = (
    '[privacy] enabled with secure_aggregation needs noise = "distributed_discrete_gaussian": each '
    'device adds its share before masking (with "central" the aggregator would see the sum un-noised)'
)
DISTRIBUTED_WITHOUT_SECURE: Final = (
    '[privacy] noise = "distributed_discrete_gaussian" needs secure_aggregation = true (without it '
    'use "central")'
)
SECURE_DP_ADAPTIVE: Final = (
    "[privacy] enabled with secure_aggregation needs adaptive_clipping = false: the count of clipped "
    "updates would travel unmasked"
)
SECURE_DP_BITS: Final = (
    "[privacy] enabled with secure_aggregation needs secure_aggregation_bits = 62: the modulus must "
    "hold the devices' noise shares on top of the sum"
)
SECURE_WITH_EXAMPLES: Final = (
    '[privacy] secure_aggregation needs [rounds] weighting = "equal": the masked sum has no '
    "per-device weights, so each update counts once"
)
SECURE_MIN_DEVICES_MESSAGE: Final = (
    "[privacy] secure_aggregation needs [rounds] min_devices >= 3: the protocol needs at least 3 "
    "devices (with 2, the sum would reveal the other device's update)"
)
SECURE_NEEDS_BOUND: Final = (
    "[privacy] secure_aggregation needs a norm bound devices clip to before masking: set [rounds] "
    "max_update_norm or update_norm_ratio above 0 (the adaptive bound needs the updates' norms, "
    "which the aggregator no longer sees)"
)
SECURE_THRESHOLD_ONE: Final = (
    "[privacy] secure_aggregation_threshold must be 0 (chosen per round) or at least 2, got 1"
)


def sparse_refused(codec: str, what: str) -> str:
    """The refusal of a sparse ``[rounds] codec`` with ``[privacy] enabled`` or ``secure_aggregation``."""
    why = (
        "the device's error-feedback residual would carry update mass past the clip bound"
        if what == "enabled"
        else "the masked sum needs dense vectors"
    )
    return f'[rounds] codec = "{codec}" cannot run with [privacy] {what}: {why}; use fp32, fp16 or int8'


def robust_with_secure(strategy: str) -> str:
    """The refusal of a robust ``[rounds] strategy`` with ``secure_aggregation``."""
    return (
        f'[rounds] strategy = "{strategy}" needs every update on its own, and secure aggregation '
        "only ever shows the sum: use fedavg or a server optimizer (fedavgm, fedadagrad, fedadam, "
        "fedyogi), or set [privacy] secure_aggregation = false"
    )


def robust_with_dp(strategy: str) -> str:
    """The refusal of a robust ``[rounds] strategy`` with ``[privacy] enabled``."""
    return (
        f'[rounds] strategy = "{strategy}" cannot run with [privacy] enabled: the noise is calibrated '
        "to the clipped mean; use fedavg or a server optimizer (fedavgm, fedadagrad, fedadam, fedyogi)"
    )


@dataclass(frozen=True)
class SecureSettings:
    """What the round engine needs of ``[privacy] secure_aggregation`` (on: not None)."""

    bits: int = 32
    #: The Shamir threshold t; 0: ``choose_parameters(n)``'s for the round's n selected devices.
    threshold: int = 0


def secure_settings(settings: PrivacySettings) -> SecureSettings | None:
    """The engine's secure-aggregation settings; None when ``secure_aggregation`` is off."""
    if not settings.secure_aggregation:
        return None
    return SecureSettings(settings.secure_aggregation_bits, settings.secure_aggregation_threshold)


def privacy_settings_from_table(t: Table, rounds: RoundSettings) -> PrivacySettings:
    """``[privacy]``, every key optional, every value checked; refuses what breaks the guarantee."""
    d = PRIVACY_OFF
    settings = PrivacySettings(
        enabled=t.flag("enabled", d.enabled),
        noise=t.choice("noise", d.noise, PRIVACY_NOISE),
        epsilon_budget=t.number("epsilon_budget", d.epsilon_budget, 1e-3, 1e6),
        target_delta=t.number("target_delta", d.target_delta, 1e-12, 0.1),
        noise_multiplier=t.number("noise_multiplier", d.noise_multiplier, 0.0, 1e4),
        clip_bound=t.number("clip_bound", d.clip_bound, 1e-9, 1e9),
        adaptive_clipping=t.flag("adaptive_clipping", d.adaptive_clipping),
        target_quantile=t.number("target_quantile", d.target_quantile, 0.0, 1.0),
        clip_learning_rate=t.number("clip_learning_rate", d.clip_learning_rate, 1e-6, 10.0),
        clip_count_stddev=t.number("clip_count_stddev", d.clip_count_stddev, 0.0, 1e6),
        sampling_rate=t.number("sampling_rate", d.sampling_rate, 1e-6, 1.0),
        accountant=t.choice("accountant", d.accountant, ("rdp", "pld")),
        secure_aggregation=t.flag("secure_aggregation", d.secure_aggregation),
        secure_aggregation_bits=t.integer(
            "secure_aggregation_bits", d.secure_aggregation_bits, SECURE_MIN_BITS, SECURE_MAX_BITS
        ),
        secure_aggregation_threshold=t.integer(
            "secure_aggregation_threshold", d.secure_aggregation_threshold, 0, SECURE_MAX_THRESHOLD
        ),
    )
    if rounds.codec.sparse and (settings.enabled or settings.secure_aggregation):
        what = "secure_aggregation" if settings.secure_aggregation else "enabled"
        raise ConfigError(sparse_refused(rounds.codec.value, what))
    if rounds.robust and settings.secure_aggregation:
        raise ConfigError(robust_with_secure(rounds.strategy))
    if rounds.robust and settings.enabled:
        raise ConfigError(robust_with_dp(rounds.strategy))
    if settings.secure_aggregation:
        _check_secure(settings, rounds)
    elif settings.enabled and settings.noise != "central":
        raise ConfigError(DISTRIBUTED_WITHOUT_SECURE)
    if not settings.enabled:
        return settings
    if rounds.weighting != "equal":
        raise ConfigError(
            '[privacy] enabled needs [rounds] weighting = "equal": with "examples" one device\'s '
            "weight follows its own claim, so the clip bound no longer bounds its influence"
        )
    if settings.sampling_rate < 1.0:
        log.warning(
            "[privacy] sampling_rate = %g assumes each device takes part in a round at random and "
            "in secret; fedge's selection is seeded and named in the manifest, so the epsilon "
            "reported is only valid if that holds (docs/differential-privacy.md)",
            settings.sampling_rate,
        )
    return settings


def _check_secure(settings: PrivacySettings, rounds: RoundSettings) -> None:
    """Refuses what secure aggregation cannot do, or what no round could open with. What
    depends on the round's selection (a threshold the protocol does not allow for n devices, a
    modulus without headroom for them) is checked per round: that round aborts and says why."""
    if settings.enabled:
        if settings.noise != "distributed_discrete_gaussian":
            raise ConfigError(SECURE_WITH_CENTRAL_NOISE)
        if settings.adaptive_clipping:
            raise ConfigError(SECURE_DP_ADAPTIVE)
        if settings.secure_aggregation_bits != 62:
            raise ConfigError(SECURE_DP_BITS)
    if rounds.weighting != "equal":
        raise ConfigError(SECURE_WITH_EXAMPLES)
    if rounds.min_devices < SECURE_MIN_DEVICES:
        raise ConfigError(SECURE_MIN_DEVICES_MESSAGE)
    if not settings.enabled and rounds.max_update_norm == 0.0 and rounds.update_norm_ratio == 0.0:
        raise ConfigError(SECURE_NEEDS_BOUND)  # with DP, devices clip to the privacy clip bound
    threshold = settings.secure_aggregation_threshold
    if threshold == 1:
        raise ConfigError(SECURE_THRESHOLD_ONE)
    n = rounds.devices_per_round
    if n == 0:
        return  # every enrolled device: n is known per round only
    from fedge.protocol.secagg import SecAggError, choose_parameters  # noqa: PLC0415 - secure fleets only
    from fedge.protocol.secagg.params import check_parameters  # noqa: PLC0415
    from fedge.protocol.secagg.quantise import Quantiser  # noqa: PLC0415

    try:
        if threshold:
            check_parameters(n, choose_parameters(n).degree, threshold)
        Quantiser(1.0, settings.secure_aggregation_bits, n)
    except SecAggError as exc:
        raise ConfigError(
            f"[privacy] secure_aggregation cannot run rounds of [rounds] devices_per_round = {n} "
            f"devices: {exc}"
        ) from None


def privacy_config(settings: PrivacySettings, rounds: RoundSettings) -> PrivacyConfig | None:
    """The accountant's config for an enabled table (None when off), with the derived values:
    the noise multiplier that fits ``rounds.rounds`` rounds in the budget, and the count's
    noise. Loads ``dp-accounting``. A budget no noise can meet is a ConfigError naming it."""
    if not settings.enabled:
        return None
    from fedge.aggregator.privacy import (  # noqa: PLC0415 - dp-accounting only with [privacy]
        AdaptiveClipping,
        PrivacyConfig,
        PrivacyError,
        noise_multiplier_for,
    )

    try:
        z = settings.noise_multiplier or noise_multiplier_for(
            settings.epsilon_budget,
            settings.target_delta,
            rounds.rounds,
            settings.sampling_rate,
            "pld" if settings.accountant == "pld" else "rdp",
        )
        adaptive = None
        if settings.adaptive_clipping:
            adaptive = AdaptiveClipping(
                clip_count_stddev=settings.clip_count_stddev or z,
                target_quantile=settings.target_quantile,
                learning_rate=settings.clip_learning_rate,
            )
        return PrivacyConfig(
            noise_multiplier=z,
            clip_bound=settings.clip_bound,
            epsilon_budget=settings.epsilon_budget,
            target_delta=settings.target_delta,
            sampling_rate=settings.sampling_rate,
            accountant="pld" if settings.accountant == "pld" else "rdp",
            adaptive=adaptive,
        )
    except PrivacyError as exc:
        raise ConfigError(f"[privacy] {exc}") from None
