"""Differential privacy in the rounds: the manifest announces it, devices clip, the aggregator
adds the noise, the accountant charges every used round, stops at the budget, and survives a
restart through the checkpoint.

Real NaCl and the agent's own ``update_payload`` (``support.engine_helpers``); the engine is
pure, so the time is a float and the noise comes from a seeded generator where a test needs to
recompute it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from fedge.aggregator.privacy import AdaptiveClipping, PrivacyConfig, PrivacyStateError, compute_epsilon
from fedge.aggregator.round_engine import RoundEngine
from fedge.aggregator.service import checkpoint_from_state, state_from_checkpoint
from fedge.protocol.dp_noise import gaussian_noise
from fedge.protocol.messages import decode_update
from fedge.protocol.privacy_announcement import PrivacyAnnouncement
from fedge.protocol.reasons import RejectReason
from fedge.protocol.round_manifest import round_manifest_from_dict
from support.engine_helpers import (
    AGGREGATOR_KEY,
    DEVICE_IDS,
    FLEET,
    LAYOUT,
    MODEL_BYTES,
    MODEL_MANIFEST,
    SIGNING_KEY,
    T0,
    devices,
    initial_state,
    registry,
    settings,
)

pytestmark = pytest.mark.aggregator

FOUR = DEVICE_IDS[:4]
FIXED = PrivacyConfig(noise_multiplier=1.5, clip_bound=0.05, epsilon_budget=100.0)


def dp_engine(
    privacy: PrivacyConfig = FIXED,
    *,
    seed: int = 11,
    state: Any = None,
    ids: tuple[str, ...] = FOUR,
    **round_changes: Any,
) -> RoundEngine:
    return RoundEngine(
        FLEET,
        settings(**{"rounds": 5, **round_changes}),
        MODEL_MANIFEST,
        MODEL_BYTES,
        AGGREGATOR_KEY,
        SIGNING_KEY,
        registry(ids),
        state if state is not None else initial_state(),
        privacy=privacy,
        noise_rng=np.random.default_rng(seed),
    )


def big_delta(device: str, scale: float) -> np.ndarray:
    i = DEVICE_IDS.index(device)
    return (
        np.random.default_rng([i, 99])
        .normal(0.0, scale, size=MODEL_MANIFEST.parameter_count)
        .astype(np.float32)
    )


def test_the_manifest_announces_the_privacy_and_devices_parse_it() -> None:
    engine = dp_engine()
    pub = engine.open_round(T0)
    doc = pub.manifest.to_dict()
    assert doc["privacy"] == {
        "noise": "central",
        "clip_bound": 0.05,
        "adaptive_clipping": False,
        "noise_multiplier": 1.5,
        "expected_participants": 4,
        "epsilon_spent": 0.0,
        "epsilon_budget": 100.0,
        "target_delta": 1e-5,
    }
    assert round_manifest_from_dict(doc).privacy == pub.manifest.privacy


def test_a_fleet_without_privacy_keeps_manifests_without_the_field() -> None:
    engine = RoundEngine(
        FLEET,
        settings(),
        MODEL_MANIFEST,
        MODEL_BYTES,
        AGGREGATOR_KEY,
        SIGNING_KEY,
        registry(FOUR),
        initial_state(),
    )
    pub = engine.open_round(T0)
    assert "privacy" not in pub.manifest.to_dict()
    assert engine.status(T0)["privacy"] is None


def test_devices_clip_to_the_announced_bound_before_sealing() -> None:
    engine = dp_engine()
    m = engine.open_round(T0).manifest
    dev = devices(FOUR)["dev-a"]
    header, body = dev.update_parts(m, big_delta("dev-a", 1.0))
    update = decode_update(header, body, LAYOUT, m.codec)
    assert np.linalg.norm(update.delta.astype(np.float64)) == pytest.approx(0.05, rel=1e-6)
    assert "clip_indicator" not in header  # fixed clipping: no indicator


def test_the_aggregate_is_the_noised_sum_of_clipped_updates_over_the_selected_count() -> None:
    engine = dp_engine(seed=5)
    pub = engine.open_round(T0)
    m = pub.manifest
    devs = devices(FOUR)
    clipped = []
    for d in FOUR[:3]:  # one selected device does not report: the denominator stays 4
        delta = big_delta(d, 1.0 if d == "dev-a" else 1e-4)
        header, body = devs[d].update_parts(m, delta)
        clipped.append(decode_update(header, body, LAYOUT, m.codec).delta.astype(np.float64))
        assert engine.handle(devs[d].topic, devs[d].update(m, delta), T0 + 1).accepted
    before = engine.state.weights.astype(np.float64).copy()
    engine.round_due(T0 + 1000)
    record = engine.close_round()
    noise = gaussian_noise(np.random.default_rng(5), MODEL_MANIFEST.parameter_count, 1.5 * 0.05)
    expected = (before + 1.0 * (np.sum(clipped, axis=0) + noise) / 4).astype(np.float32)
    np.testing.assert_allclose(engine.state.weights, expected, rtol=1e-5, atol=1e-7)
    assert record.outcome == "aggregated"
    assert record.norm_bound == 0.05
    assert record.epsilon_spent == pytest.approx(compute_epsilon(1.5, 1.0, 1, 1e-5))
    assert engine.status(T0)["privacy"]["rounds_charged"] == 1


def test_an_update_over_the_bound_is_clipped_by_the_aggregator_too() -> None:
    """A device that skips clipping (or a codec that rounds up) gains no extra influence."""
    engine = dp_engine()
    m = engine.open_round(T0).manifest
    dev = devices(FOUR)["dev-a"]
    unclipped = replace(m, privacy=None)  # what a device ignoring the announcement would send
    payload = dev.update(unclipped, big_delta("dev-a", 1.0))
    assert engine.handle(dev.topic, payload, T0 + 1).accepted
    assert engine.current is not None
    assert engine.current.folds.updates.clipped == 1


def test_adaptive_rounds_need_the_indicator_and_other_rounds_refuse_it() -> None:
    adaptive = replace(FIXED, adaptive=AdaptiveClipping(clip_count_stddev=2.0))
    engine = dp_engine(adaptive)
    m = engine.open_round(T0).manifest
    assert m.privacy is not None and m.privacy.adaptive_clipping
    dev = devices(FOUR)["dev-a"]
    without = dev.update(
        replace(m, privacy=replace(m.privacy, adaptive_clipping=False)), big_delta("dev-a", 1.0)
    )
    outcome = engine.handle(dev.topic, without, T0 + 1)
    assert (outcome.accepted, outcome.reason) == (False, RejectReason.BAD_SCHEMA)
    assert engine.current is not None and engine.current.folds.dp is not None
    assert engine.current.folds.dp.sum.count == 0  # nothing folded in

    plain = dp_engine(FIXED)
    pm = plain.open_round(T0).manifest
    assert pm.privacy is not None
    with_indicator = dev.update(replace(pm, privacy=replace(pm.privacy, adaptive_clipping=True)))
    outcome = plain.handle(dev.topic, with_indicator, T0 + 1)
    assert (outcome.accepted, outcome.reason) == (False, RejectReason.BAD_SCHEMA)


def test_adaptive_clipping_moves_the_bound_from_the_noisy_count() -> None:
    # Every update far over a tiny bound: the count says "all clipped", the bound grows.
    adaptive = PrivacyConfig(
        noise_multiplier=0.5,
        clip_bound=1e-4,
        epsilon_budget=1000.0,
        adaptive=AdaptiveClipping(clip_count_stddev=1.0),
    )
    engine = dp_engine(adaptive, seed=3)
    bounds = []
    devs = devices(FOUR)
    now = T0
    for _ in range(3):
        pub = engine.open_round(now)
        m = pub.manifest
        assert m.privacy is not None
        bounds.append(m.privacy.clip_bound)
        for d in FOUR:
            assert engine.handle(devs[d].topic, devs[d].update(m, big_delta(d, 1.0)), now + 1).accepted
        engine.close_round()
        now += 100
    assert bounds[0] == 1e-4
    assert bounds[1] > bounds[0] and bounds[2] > bounds[1]  # exp(0.2 * ~0.5) a round, noise aside


def test_training_stops_before_the_budget_is_overspent() -> None:
    one_round = compute_epsilon(1.5, 1.0, 1, 1e-5)
    two_rounds = compute_epsilon(1.5, 1.0, 2, 1e-5)
    budget = (two_rounds + compute_epsilon(1.5, 1.0, 3, 1e-5)) / 2  # two rounds fit, not three
    engine = dp_engine(replace(FIXED, epsilon_budget=budget), rounds=10)
    devs = devices(FOUR)
    now, phases = T0, []
    while True:
        pub = engine.open_round(now)
        phases.append(pub.manifest.phase)
        if pub.manifest.phase == "final":
            break
        for d in FOUR:
            assert engine.handle(devs[d].topic, devs[d].update(pub.manifest), now + 1).accepted
        engine.close_round()
        now += 100
    assert phases == ["train", "train", "final"]
    assert engine.done and engine.budget_spent
    status = engine.status(now)["privacy"]
    assert status["epsilon_spent"] == pytest.approx(two_rounds) and two_rounds <= budget
    assert status["rounds_left"] == 0 and status["budget_spent"] is True
    assert pub.manifest.privacy is not None and pub.manifest.privacy.epsilon_spent == pytest.approx(
        two_rounds
    )
    assert one_round < two_rounds


def test_an_aborted_round_costs_nothing() -> None:
    engine = dp_engine(min_devices=3)
    devs = devices(FOUR)
    m = engine.open_round(T0).manifest
    assert engine.handle(devs["dev-a"].topic, devs["dev-a"].update(m), T0 + 1).accepted
    record = engine.close_round()
    assert record.outcome == "aborted"
    assert engine.accountant is not None and engine.accountant.rounds == 0
    assert record.epsilon_spent == 0.0


def test_the_spent_budget_survives_a_restart_through_the_checkpoint() -> None:
    engine = dp_engine()
    devs = devices(FOUR)
    now = T0
    for _ in range(2):
        m = engine.open_round(now).manifest
        for d in FOUR:
            assert engine.handle(devs[d].topic, devs[d].update(m), now + 1).accepted
        engine.close_round()
        now += 100
    spent = engine.status(now)["privacy"]["epsilon_spent"]
    restored_state = state_from_checkpoint(checkpoint_from_state(engine.snapshot()))
    assert restored_state.privacy is not None and restored_state.privacy["rounds"] == 2
    restored = dp_engine(state=restored_state)
    assert restored.status(now)["privacy"]["epsilon_spent"] == pytest.approx(spent)
    assert restored.open_round(now).manifest.privacy.epsilon_spent == pytest.approx(spent)  # type: ignore[union-attr]

    with pytest.raises(PrivacyStateError, match=r"'noise_multiplier' is 1\.5, the config has 3\.0"):
        dp_engine(
            replace(FIXED, noise_multiplier=3.0),
            state=state_from_checkpoint(checkpoint_from_state(engine.snapshot())),
        )


def test_the_announcement_refuses_what_no_device_should_act_on() -> None:
    good = PrivacyAnnouncement("central", 0.1, True, 1.0, 7, 0.0, 8.0, 1e-5).to_dict()
    assert PrivacyAnnouncement.from_dict(good).to_dict() == good
    for key, value, message in (
        ("noise", "skellam", "privacy.noise must be one of"),
        ("clip_bound", 0, "privacy.clip_bound must be > 0"),
        ("clip_bound", float("nan"), "privacy.clip_bound must be finite"),
        ("adaptive_clipping", 1, "privacy.adaptive_clipping must be true or false"),
        ("expected_participants", 0, "privacy.expected_participants must be an integer"),
        ("target_delta", 1.0, "privacy.target_delta must be in"),
        ("epsilon_spent", -1.0, "privacy.epsilon_spent must be finite and in"),
    ):
        with pytest.raises(Exception, match=message):
            PrivacyAnnouncement.from_dict({**good, key: value})
    with pytest.raises(Exception, match=r"privacy fields: missing \['target_delta'\]"):
        PrivacyAnnouncement.from_dict({k: v for k, v in good.items() if k != "target_delta"})
