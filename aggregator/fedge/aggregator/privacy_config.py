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
}
#: ``noise``: who adds it. "central": the aggregator, to the sum (it sees the updates: trusted).
#: The distributed kinds ("skellam", "discrete_gaussian") need secure aggregation.
PRIVACY_NOISE: Final = ("central",)


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


PRIVACY_OFF: Final = PrivacySettings()


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
    )
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
