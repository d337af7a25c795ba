"""Buffered asynchronous aggregation (``[rounds] aggregation = "async"``, docs/async.md).

Driven like ``test_round_engine.py``: the pure engine, real NaCl keys, updates sealed the way
the agent seals them, time as a float. Under test: an update trained from an older version is
checked against the manifest it was trained from and folded scaled by ``1/sqrt(1+s)``; one
older than ``max_staleness`` is refused ``stale`` without a trace; a new version follows every
``buffer_size`` accepted updates; every synchronous check (counter, duplicate, norm bound) still
holds; the manifest announces the mode, and a synchronous fleet's manifests do not change.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.agent.core import DeviceCore, DeviceIdentity, DropOtherRounds, FetchBlobs, Persist
from fedge.agent.device_state import DeviceState
from fedge.aggregator.async_rounds import STALE, StalenessWindow, staleness_weight
from fedge.aggregator.config import RoundSettings, load_aggregator_config
from fedge.aggregator.round_engine import Outcome, Publication, RoundEngine
from fedge.protocol.config_source import ConfigError
from fedge.protocol.errors import FedgeError
from fedge.protocol.round_manifest import (
    AsyncAggregation,
    RoundManifestError,
    round_manifest_from_dict,
)
from fedge.protocol.signing import key_id
from support.aggregator_toml import MINIMAL_AGGREGATOR_TOML
from support.engine_helpers import (
    AGGREGATOR_KEY,
    DEVICE_IDS,
    DEVICE_KEYS,
    FLEET,
    INITIAL_WEIGHTS,
    SIGNING_KEY,
    T0,
    Device,
    delta_for,
    devices,
    initial_state,
    make_engine,
    settings,
)

FIVE = DEVICE_IDS[:5]


def async_engine(**changes: Any) -> RoundEngine:
    """Plain equal-weight FedAvg, no norm bound (so the arithmetic is exact), asynchronous."""
    plain: dict[str, Any] = {
        "aggregation": "async",
        "weighting": "equal",
        "min_devices": 1,
        "rounds": 10,
        "max_update_norm": 0.0,
        "update_norm_ratio": 0.0,
        "update_norm_adaptive": 0.0,
    }
    return make_engine(settings(**{**plain, **changes}), initial_state(), devices=FIVE)


def send(engine: RoundEngine, device: Device, payload: bytes, now: float) -> Outcome:
    return engine.handle(device.topic, payload, now)


def accepted(device: str) -> Outcome:
    return Outcome(True, "accepted", device, "update")


def publish_next(engine: RoundEngine, now: float) -> Publication:
    engine.close_round()
    return engine.open_round(now)


# --- the staleness weight and window ------------------------------------------------------------


def test_the_staleness_weight_is_fedbuffs_inverse_square_root() -> None:
    assert staleness_weight(0) == 1.0
    assert staleness_weight(3) == 0.5
    assert staleness_weight(1) == pytest.approx(1 / math.sqrt(2))
    with pytest.raises(ValueError, match="staleness must be >= 0, got -1"):
        staleness_weight(-1)


def test_the_window_keeps_the_last_max_staleness_plus_one_versions() -> None:
    engine = async_engine(buffer_size=1, max_staleness=2)
    window = engine.window
    assert isinstance(window, StalenessWindow)
    devs = devices(FIVE)
    pub = engine.open_round(T0)
    for i in range(4):
        assert send(engine, devs["dev-a"], devs["dev-a"].update(pub.manifest), T0 + 1) == accepted("dev-a")
        pub = publish_next(engine, T0 + 2 + i)
    assert window.versions() == [3, 4, 5]


# --- the manifest -------------------------------------------------------------------------------


def test_an_async_train_manifest_announces_k_and_s_and_parses_back() -> None:
    engine = async_engine(buffer_size=2, max_staleness=3)
    m = engine.open_round(T0).manifest
    doc = m.to_dict()
    assert doc["aggregation"] == {"mode": "async", "buffer_size": 2, "max_staleness": 3}
    assert m.aggregation == AsyncAggregation(buffer_size=2, max_staleness=3)
    assert round_manifest_from_dict(doc) == m


def test_a_sync_manifest_and_an_async_moments_manifest_carry_no_aggregation() -> None:
    sync = make_engine(settings()).open_round(T0).manifest
    assert "aggregation" not in sync.to_dict()
    assert sync.aggregation is None
    moments = make_engine(
        settings(aggregation="async", min_devices=1), initial_state(normalisation=None)
    ).open_round(T0)
    assert moments.manifest.phase == "moments"
    assert "aggregation" not in moments.manifest.to_dict()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"mode": "async", "buffer_size": 2}, "aggregation must be an object with exactly mode, buffer_size"),
        ("async", "aggregation must be an object with exactly mode, buffer_size"),
        ({"mode": "sync", "buffer_size": 2, "max_staleness": 1}, 'aggregation.mode must be "async"'),
        (
            {"mode": "async", "buffer_size": 0, "max_staleness": 1},
            r"aggregation.buffer_size must be an integer",
        ),
        ({"mode": "async", "buffer_size": True, "max_staleness": 1}, r"aggregation.buffer_size must be an"),
        ({"mode": "async", "buffer_size": 2, "max_staleness": -1}, r"aggregation.max_staleness must be an"),
        ({"mode": "async", "buffer_size": 2, "max_staleness": 1.0}, r"aggregation.max_staleness must be an"),
    ],
)
def test_a_malformed_aggregation_announcement_is_refused(value: object, message: str) -> None:
    doc = async_engine().open_round(T0).manifest.to_dict()
    doc["aggregation"] = value
    with pytest.raises(RoundManifestError, match=message):
        round_manifest_from_dict(doc)


def test_aggregation_outside_a_train_round_is_refused() -> None:
    doc = make_engine(settings(), initial_state(normalisation=None)).open_round(T0).manifest.to_dict()
    doc["aggregation"] = {"mode": "async", "buffer_size": 2, "max_staleness": 1}
    with pytest.raises(RoundManifestError, match="aggregation is only for train rounds without secure_agg"):
        round_manifest_from_dict(doc)


# --- the buffer ---------------------------------------------------------------------------------


def test_a_new_version_is_due_after_buffer_size_accepted_updates_not_before() -> None:
    engine = async_engine(buffer_size=2)
    devs = devices(FIVE)
    m = engine.open_round(T0).manifest
    assert len(m.selected_devices) == 5
    assert send(engine, devs["dev-a"], devs["dev-a"].update(m), T0 + 1) == accepted("dev-a")
    assert not engine.round_due(T0 + 1)
    assert send(engine, devs["dev-b"], devs["dev-b"].update(m), T0 + 1) == accepted("dev-b")
    assert engine.round_due(T0 + 1)  # long before the deadline, three devices still silent
    record = engine.close_round()
    assert (record.outcome, record.reported, record.selected) == ("aggregated", 2, 5)
    assert engine.open_round(T0 + 2).manifest.version == m.version + 1


def test_a_stale_update_is_folded_scaled_by_its_staleness_weight() -> None:
    lr = 0.5
    engine = async_engine(buffer_size=2, server_learning_rate=lr)
    devs = devices(FIVE)
    v1 = engine.open_round(T0).manifest
    deltas = {d: delta_for(d, 1, scale=0.05) for d in FIVE}
    for d in ("dev-a", "dev-b"):
        assert send(engine, devs[d], devs[d].update(v1, deltas[d]), T0 + 1) == accepted(d)
    w1 = INITIAL_WEIGHTS.astype(np.float64) + lr * (deltas["dev-a"] + deltas["dev-b"]) / 2
    v2 = publish_next(engine, T0 + 2).manifest
    np.testing.assert_allclose(engine.state.weights, w1, atol=1e-6)
    # dev-c trained from v1 (one version behind), dev-a from v2.
    assert send(engine, devs["dev-c"], devs["dev-c"].update(v1, deltas["dev-c"]), T0 + 3) == accepted("dev-c")
    assert send(engine, devs["dev-a"], devs["dev-a"].update(v2, deltas["dev-d"]), T0 + 3) == accepted("dev-a")
    assert engine.round_due(T0 + 3)
    record = engine.close_round()
    assert record.outcome == "aggregated"
    expected = w1 + lr * (deltas["dev-c"] / math.sqrt(2) + deltas["dev-d"]) / 2
    np.testing.assert_allclose(engine.state.weights, expected, atol=1e-6)
    assert engine.state.counters == {"dev-a": 2, "dev-b": 1, "dev-c": 1}


def test_an_update_older_than_max_staleness_is_refused_stale_without_a_trace() -> None:
    def run(attack: bool) -> tuple[np.ndarray, dict[str, int]]:
        engine = async_engine(buffer_size=1, max_staleness=1)
        devs = devices(FIVE)
        v1 = engine.open_round(T0).manifest
        late = devs["dev-e"].update(v1)  # trained from v1, arrives after v3 is out
        assert send(engine, devs["dev-a"], devs["dev-a"].update(v1), T0 + 1) == accepted("dev-a")
        v2 = publish_next(engine, T0 + 2).manifest
        assert send(engine, devs["dev-b"], devs["dev-b"].update(v2), T0 + 3) == accepted("dev-b")
        v3 = publish_next(engine, T0 + 4).manifest
        if attack:
            assert send(engine, devs["dev-e"], late, T0 + 5) == Outcome(False, STALE, "dev-e", "update")
        assert send(engine, devs["dev-c"], devs["dev-c"].update(v3), T0 + 5) == accepted("dev-c")
        record = engine.close_round()
        assert record.rejected == ({STALE: 1} if attack else {})
        assert engine.state.rejected_total == record.rejected
        assert "dev-e" not in engine.state.counters
        return engine.state.weights, record.rejected

    clean, _ = run(False)
    hit, _ = run(True)
    np.testing.assert_array_equal(clean, hit)


def test_within_the_window_the_binding_is_checked_against_the_base_manifest() -> None:
    engine = async_engine(buffer_size=1, max_staleness=2, devices_per_round=2)
    devs = devices(FIVE)
    v1 = engine.open_round(T0).manifest
    chosen = v1.selected_devices[0]
    d = devs[chosen]
    assert send(engine, d, d.update(v1), T0 + 1) == accepted(chosen)
    v2 = publish_next(engine, T0 + 2).manifest
    # the round id of another version than the one it claims: wrong_round
    assert send(engine, d, d.update(v1, round_id=v2.round_id), T0 + 3).reason == "wrong_round"
    # a version never published (the future): wrong_round
    assert send(engine, d, d.update(v2, model_version=v2.version + 1), T0 + 3).reason == "wrong_round"
    # not selected in the manifest it trained from
    outsider = next(x for x in FIVE if not v1.is_selected(x))
    assert send(engine, devs[outsider], devs[outsider].update(v1), T0 + 3).reason == "not_selected"
    assert engine.current is not None and engine.current.reported == {}


def test_a_replayed_counter_is_refused_for_a_stale_update_too() -> None:
    engine = async_engine(buffer_size=1)
    devs = devices(FIVE)
    v1 = engine.open_round(T0).manifest
    a = devs["dev-a"]
    assert send(engine, a, a.update(v1), T0 + 1) == accepted("dev-a")
    publish_next(engine, T0 + 2)
    replay = a.update(v1, counter=1)  # trained from v1 (in the window), the counter already used
    assert send(engine, a, replay, T0 + 3) == Outcome(False, "replayed_counter", "dev-a", "update")


def test_one_update_per_device_per_buffer_whatever_version_it_trained_from() -> None:
    engine = async_engine(buffer_size=3)
    devs = devices(FIVE)
    v1 = engine.open_round(T0).manifest
    for dev in ("dev-a", "dev-b", "dev-c"):
        assert send(engine, devs[dev], devs[dev].update(v1), T0 + 1) == accepted(dev)
    v2 = publish_next(engine, T0 + 2).manifest
    assert send(engine, devs["dev-d"], devs["dev-d"].update(v1), T0 + 3) == accepted("dev-d")
    assert send(engine, devs["dev-d"], devs["dev-d"].update(v2), T0 + 3) == Outcome(
        False, "duplicate", "dev-d", "update"
    )


def test_the_norm_bound_judges_the_update_as_sent_not_as_weighted() -> None:
    # A stale update of norm 1.2 would weigh 1.2/sqrt(2) < 1 after scaling: the hard bound of 1
    # still refuses it, and a fresh one of norm 3 is clipped to 1 as in a synchronous round.
    engine = async_engine(buffer_size=2, max_update_norm=1.0, update_norm_policy="reject")
    devs = devices(FIVE)
    v1 = engine.open_round(T0).manifest
    unit = delta_for("dev-a", 1)
    unit = unit / np.linalg.norm(unit)
    for dev in ("dev-a", "dev-b"):
        assert send(engine, devs[dev], devs[dev].update(v1, unit * 0.5), T0 + 1) == accepted(dev)
    publish_next(engine, T0 + 2)
    big = devs["dev-c"].update(v1, (unit * 1.2).astype(np.float32))
    assert send(engine, devs["dev-c"], big, T0 + 3) == Outcome(False, "norm_too_large", "dev-c", "update")


def test_the_deadline_aggregates_a_partial_buffer_of_min_devices() -> None:
    engine = async_engine(buffer_size=3, round_timeout_s=10.0)
    devs = devices(FIVE)
    m = engine.open_round(T0).manifest
    assert send(engine, devs["dev-a"], devs["dev-a"].update(m), T0 + 1) == accepted("dev-a")
    assert not engine.round_due(T0 + 9)
    assert engine.round_due(T0 + 10.5)
    assert engine.close_round().outcome == "aggregated"


def test_the_engine_refuses_async_with_a_robust_strategy_or_a_buffer_below_min_devices() -> None:
    with pytest.raises(FedgeError, match='aggregation = "async" runs without secure aggregation'):
        make_engine(settings(aggregation="async", strategy="median"))
    with pytest.raises(
        FedgeError, match="buffer_size=1 is below min_devices=2: every buffer would be aborted"
    ):
        make_engine(settings(aggregation="async", buffer_size=1))


def test_sync_is_the_default() -> None:
    s = RoundSettings()
    assert (s.aggregation, s.buffer_size, s.max_staleness, s.asynchronous) == ("sync", 3, 4, False)
    assert make_engine(settings()).window is None


# --- the configuration --------------------------------------------------------------------------


def load(tmp_path: Path, extra: str) -> RoundSettings:
    path = tmp_path / "aggregator.toml"
    path.write_text(MINIMAL_AGGREGATOR_TOML + extra)
    return load_aggregator_config(path, {}).rounds


def test_the_rounds_table_reads_the_async_keys(tmp_path: Path) -> None:
    r = load(tmp_path, '[rounds]\naggregation = "async"\nbuffer_size = 5\nmax_staleness = 2\n')
    assert (r.aggregation, r.buffer_size, r.max_staleness) == ("async", 5, 2)
    assert load(tmp_path, "").aggregation == "sync"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            '[rounds]\naggregation = "async"\nstrategy = "krum"\nmin_devices = 5\n',
            r'\[rounds\] strategy = "krum" needs a cohort of updates side by side: use aggregation = "sync"',
        ),
        (
            '[rounds]\naggregation = "async"\nmin_devices = 3\n[privacy]\nsecure_aggregation = true\n',
            r'aggregation = "async" cannot run with \[privacy\] secure_aggregation \(its masks need a cohort',
        ),
        (
            '[rounds]\naggregation = "async"\n[privacy]\nenabled = true\nepsilon_budget = 8.0\n',
            r'aggregation = "async" cannot run with \[privacy\] differential privacy',
        ),
        (
            '[rounds]\naggregation = "async"\n[replicas]\nenabled = true\n',
            r'aggregation = "async" cannot run with \[replicas\] .*: turn \[replicas\] off',
        ),
        (
            '[rounds]\naggregation = "async"\nbuffer_size = 1\nmin_devices = 2\n',
            r"\[rounds\] buffer_size=1 is below min_devices=2: every buffer would be aborted",
        ),
        ('[rounds]\naggregation = "fast"\n', "aggregation"),
        ("[rounds]\nmax_staleness = -1\n", "max_staleness"),
    ],
)
def test_what_async_refuses_at_start(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, extra)


# --- the device core ----------------------------------------------------------------------------


def test_a_device_keeps_its_queued_update_when_a_newer_async_manifest_arrives() -> None:
    """A synchronous manifest drops queued messages of other rounds (they would be refused
    ``wrong_round``); an asynchronous one keeps them: the aggregator still folds them in."""
    identity = DeviceIdentity(FLEET, "dev-a", DEVICE_KEYS["dev-a"], AGGREGATOR_KEY.public_key)
    trusted = {key_id(SIGNING_KEY.verify_key): SIGNING_KEY.verify_key}
    asynchronous = async_engine().open_round(T0)
    m = asynchronous.manifest
    actions = DeviceCore(identity, DeviceState()).manifest_arrived(
        asynchronous.manifest_frame, trusted, T0 + 1
    )
    assert actions == [
        Persist(DeviceState(manifest_version=m.version, manifest_sha256=m.sha256())),
        FetchBlobs(frozenset({m.model_sha256, m.weights_sha256})),
    ]
    sync = make_engine(settings()).open_round(T0)
    actions = DeviceCore(identity, DeviceState()).manifest_arrived(sync.manifest_frame, trusted, T0 + 1)
    assert DropOtherRounds(sync.manifest.round_id) in actions


def test_a_server_optimizer_steps_on_each_buffer_and_keeps_its_state() -> None:
    engine = async_engine(buffer_size=2, strategy="fedadam", server_learning_rate=0.01)
    devs = devices(FIVE)
    v1 = engine.open_round(T0).manifest
    assert v1.strategy is not None and v1.aggregation is not None
    for dev in ("dev-a", "dev-b"):
        assert send(engine, devs[dev], devs[dev].update(v1), T0 + 1) == accepted(dev)
    v2 = publish_next(engine, T0 + 2).manifest
    first = engine.state.server_optimizer
    assert first is not None and not np.array_equal(engine.state.weights, INITIAL_WEIGHTS)
    assert send(engine, devs["dev-c"], devs["dev-c"].update(v1), T0 + 3) == accepted("dev-c")
    assert send(engine, devs["dev-a"], devs["dev-a"].update(v2), T0 + 3) == accepted("dev-a")
    assert engine.close_round().outcome == "aggregated"
    assert engine.state.server_optimizer is not None and engine.state.server_optimizer != first
