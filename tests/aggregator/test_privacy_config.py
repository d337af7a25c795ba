"""The aggregator's ``[privacy]`` table and what the service does with it: the derived noise,
the refusals that protect the guarantee, and a spent budget that a changed config cannot
silently reset (the service with the real har-watch model build and a real checkpoint)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fedge.aggregator.checkpoint import save_checkpoint
from fedge.aggregator.config import RoundSettings, load_aggregator_config
from fedge.aggregator.privacy import compute_epsilon
from fedge.aggregator.privacy_config import PRIVACY_OFF, privacy_config
from fedge.aggregator.service import CHECKPOINT_FILE, AggregatorService, checkpoint_from_state
from fedge.lab.provision import create_fleet
from fedge.protocol.config_source import ConfigError

pytestmark = pytest.mark.aggregator


def fleet_config(
    tmp_path: Path, har_model_dir: Path, privacy: dict[str, object] | None, **rounds: Any
) -> Path:
    fleet = create_fleet(
        tmp_path,
        "dp",
        har_model_dir,
        "mqtt://127.0.0.1:9",
        {"watch-01": 1, "watch-02": 2},
        {"min_devices": 2, **rounds},
        privacy=privacy,
    )
    return fleet.aggregator_config


def test_privacy_is_off_by_default_and_loads_no_accountant(tmp_path: Path, har_model_dir: Path) -> None:
    config = load_aggregator_config(fleet_config(tmp_path, har_model_dir, None), {})
    assert config.privacy == PRIVACY_OFF
    assert privacy_config(config.privacy, config.rounds) is None


def test_the_noise_multiplier_is_derived_to_fit_the_rounds_in_the_budget(
    tmp_path: Path, har_model_dir: Path
) -> None:
    path = fleet_config(tmp_path, har_model_dir, {"enabled": True, "epsilon_budget": 4.0}, rounds=30)
    config = load_aggregator_config(path, {})
    dp = privacy_config(config.privacy, config.rounds)
    assert dp is not None and dp.adaptive is not None
    assert compute_epsilon(dp.noise_multiplier, 1.0, 30, 1e-5) <= 4.0
    assert compute_epsilon(dp.noise_multiplier * 0.99, 1.0, 30, 1e-5) > 4.0
    assert dp.adaptive.clip_count_stddev == dp.noise_multiplier  # "0: the noise multiplier"
    # The environment overlays the table like any other.
    env = {
        "FEDGE_AGGREGATOR__PRIVACY__NOISE_MULTIPLIER": "2.5",
        "FEDGE_AGGREGATOR__PRIVACY__ADAPTIVE_CLIPPING": "false",
    }
    fixed = load_aggregator_config(path, env)
    dp2 = privacy_config(fixed.privacy, fixed.rounds)
    assert dp2 is not None and (dp2.noise_multiplier, dp2.adaptive) == (2.5, None)


@pytest.mark.parametrize(
    ("table", "rounds", "message"),
    [
        (
            {"enabled": True},
            {"weighting": "examples"},
            '[privacy] enabled needs [rounds] weighting = "equal": with "examples" one device\'s weight '
            "follows its own claim, so the clip bound no longer bounds its influence",
        ),
        ({"enabled": True, "noise": "skellam"}, {}, "[privacy] noise"),
        ({"enabled": True, "epsilon": 8}, {}, "epsilon"),
        ({"enabled": True, "target_delta": 0.5}, {}, "[privacy] target_delta"),
    ],
)
def test_what_would_break_the_guarantee_is_refused_with_the_fix(
    tmp_path: Path, har_model_dir: Path, table: dict[str, object], rounds: dict[str, object], message: str
) -> None:
    path = fleet_config(tmp_path, har_model_dir, table, **rounds)
    with pytest.raises(ConfigError) as refused:
        load_aggregator_config(path, {})
    assert message in str(refused.value)


def test_a_sampling_rate_below_one_is_accepted_with_a_warning(
    tmp_path: Path, har_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = fleet_config(tmp_path, har_model_dir, {"enabled": True, "sampling_rate": 0.1})
    with caplog.at_level(logging.WARNING, "fedge.aggregator"):
        assert load_aggregator_config(path, {}).privacy.sampling_rate == 0.1
    assert "only valid if that holds" in caplog.text


def test_a_budget_no_noise_can_meet_is_a_config_error() -> None:
    from fedge.aggregator.privacy_config import PrivacySettings

    impossible = PrivacySettings(enabled=True, epsilon_budget=1e-3, target_delta=1e-12)
    with pytest.raises(ConfigError, match=r"^\[privacy\] no noise multiplier up to 10000"):
        privacy_config(impossible, RoundSettings(rounds=1_000_000))


def test_the_service_keeps_the_spent_budget_and_refuses_changed_parameters(
    tmp_path: Path, har_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = fleet_config(tmp_path, har_model_dir, {"enabled": True, "epsilon_budget": 8.0}, rounds=10)
    config = load_aggregator_config(path, {})
    first = AggregatorService(config)
    assert first.engine.accountant is not None
    first.engine.accountant.record_round(noisy_indicator_sum=0.0, expected_participants=2)
    first.engine.state.privacy = first.engine.accountant.state()
    checkpoint = config.state_dir / CHECKPOINT_FILE
    save_checkpoint(checkpoint, checkpoint_from_state(first.engine.snapshot()))
    spent = first.engine.accountant.epsilon_spent()

    again = AggregatorService(config)
    assert again.engine.accountant is not None and again.engine.accountant.rounds == 1
    assert again.engine.accountant.epsilon_spent() == pytest.approx(spent)

    more_rounds = replace(config, rounds=replace(config.rounds, rounds=20))  # a different derived noise
    with pytest.raises(ConfigError) as refused:
        AggregatorService(more_rounds)
    text = str(refused.value)
    assert text.startswith(f"{checkpoint}: privacy state: 'noise_multiplier' is ")
    assert text.endswith(
        "; the [privacy] parameters (and [rounds] rounds, which the noise multiplier is derived from) of a "
        "running fleet cannot change: its budget was spent at the old ones. Restore them "
        "(docs/differential-privacy.md)"
    )

    with caplog.at_level(logging.WARNING, "fedge.aggregator"):
        off = AggregatorService(replace(config, privacy=PRIVACY_OFF))
    assert off.engine.accountant is None and off.engine.state.privacy is None
    assert "the fleet's guarantee ends here" in caplog.text
