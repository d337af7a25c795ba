"""Server optimizers on the aggregated mean (``[rounds] strategy``: fedavgm, fedadagrad,
fedadam, fedyogi; Reddi et al. 2021): the arithmetic against references written out
coordinate by coordinate, their state through the checkpoint, and their rounds through the
round engine (plain, secure and differentially private)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from fedge.aggregator.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fedge.aggregator.config import ROUND_KEYS, RoundSettings, round_settings_from_table
from fedge.aggregator.fedavg import AggregationError, FedAvg
from fedge.aggregator.round_engine import EngineState, RoundEngine, start_generation
from fedge.aggregator.service import checkpoint_from_state, state_from_checkpoint
from fedge.aggregator.strategies.factory import (
    InfluenceHistory,
    build_round_folds,
    strategy_announcement,
    update_strategy,
)
from fedge.aggregator.strategies.server_optimizers import (
    ServerOptimizer,
    ServerOptimizerState,
    ServerOptimizerStateError,
    check_state,
    initial_state,
    optimizer_step,
    state_from_json,
    state_to_json,
)
from fedge.aggregator.strategies.weighting import equal_weights
from fedge.protocol.config_source import Table
from fedge.protocol.messages import UpdatePayload
from fedge.protocol.round_manifest import round_manifest_from_dict
from fedge.protocol.strategy_announcement import StrategyAnnouncement
from support.engine_helpers import (
    DEVICE_IDS,
    INITIAL_WEIGHTS,
    T0,
    P,
    delta_for,
    devices,
    make_engine,
    plain_fedavg,
)
from support.engine_helpers import (
    initial_state as engine_initial_state,
)

pytestmark = pytest.mark.aggregator

OPTIMIZERS = ("fedavgm", "fedadagrad", "fedadam", "fedyogi")


def vec(*values: float) -> npt.NDArray[np.float32]:
    return np.array(values, dtype=np.float32)


def upd(*values: float) -> UpdatePayload:
    return UpdatePayload(vec(*values), 10, 0.5, None)


def rounds_table(**values: Any) -> Table:
    return Table({"rounds": values}, "rounds", ROUND_KEYS)


def opt_settings(strategy: str, **changes: Any) -> RoundSettings:
    return RoundSettings(strategy=strategy, server_learning_rate=0.1, **changes)


# --- the arithmetic ----------------------------------------------------------------------------

#: Three rounds of two updates each, over three weights (means: [0.2, -0.4, 0.0],
#: [0.3, 0.1, -0.5], [-0.1, 0.25, 0.05]).
ROUNDS = (
    ((0.1, -0.3, 0.2), (0.3, -0.5, -0.2)),
    ((0.4, 0.0, -0.5), (0.2, 0.2, -0.5)),
    ((-0.2, 0.25, 0.0), (0.0, 0.25, 0.1)),
)
START = (1.0, -2.0, 0.5)


def reference(strategy: str, s: RoundSettings) -> list[list[float]]:
    """The weights after each of the three rounds, one coordinate at a time in Python floats,
    from the formulas of Reddi et al. (Algorithm 2; FedAvgM: ``m = beta m + d``, ``w += lr m``)
    with ``m_0 = 0`` and ``v_0 = tau**2``."""
    lr, tau = s.server_learning_rate, s.server_tau
    w = list(START)
    m = [0.0] * 3
    v = [tau * tau] * 3
    out = []
    for a, b in ROUNDS:
        for i in range(3):
            # The mean of the float32 deltas, as the fold sees them.
            d = (float(np.float32(a[i])) + float(np.float32(b[i]))) / 2
            if strategy == "fedavgm":
                m[i] = s.server_momentum * m[i] + d
                w[i] += lr * m[i]
                continue
            m[i] = s.server_beta1 * m[i] + (1 - s.server_beta1) * d
            if strategy == "fedadagrad":
                v[i] = v[i] + d * d
            elif strategy == "fedadam":
                v[i] = s.server_beta2 * v[i] + (1 - s.server_beta2) * d * d
            else:
                sign = (v[i] - d * d > 0) - (v[i] - d * d < 0)
                v[i] = v[i] - (1 - s.server_beta2) * d * d * sign
            w[i] += lr * m[i] / (math.sqrt(v[i]) + tau)
        out.append(list(w))
    return out


def run_folds(s: RoundSettings) -> tuple[list[npt.NDArray[np.float32]], ServerOptimizerState | None]:
    """The three rounds through the strategy the factory builds, each continuing the last
    round's state; the weights are carried in float32 as the engine carries them."""
    w = vec(*START)
    state: ServerOptimizerState | None = None
    out = []
    history = InfluenceHistory()
    for a, b in ROUNDS:
        folds = build_round_folds(
            replace(s, update_norm_ratio=0.0, update_norm_adaptive=0.0), w, history, 3, 1, state
        )
        folds.add_update(upd(*a))
        folds.add_update(upd(*b))
        w = folds.updates.result(w)
        assert folds.optimizer is not None and folds.optimizer.next_state is not None
        state = folds.optimizer.next_state
        out.append(w)
    return out, state


@pytest.mark.parametrize("strategy", OPTIMIZERS)
def test_each_optimizer_matches_the_reference_over_three_rounds(strategy: str) -> None:
    s = opt_settings(strategy)
    got, state = run_folds(s)
    want = reference(strategy, s)
    for g, r in zip(got, want, strict=True):
        # The weights are float32 between rounds, as in the engine: one rounding per round.
        np.testing.assert_allclose(g, np.array(r), rtol=0, atol=2e-6)
    assert state is not None and state.step == 3 and state.strategy == strategy
    assert (state.v is None) == (strategy == "fedavgm")


def test_fedavgm_by_hand() -> None:
    """One weight, beta 0.5, lr 1, means 1, 2, 3: m = 1, 2.5, 4.25; w = 1, 3.5, 7.75."""
    s = RoundSettings(strategy="fedavgm", server_learning_rate=1.0, server_momentum=0.5)
    state: ServerOptimizerState | None = None
    w = 0.0
    for mean, want_m, want_w in ((1.0, 1.0, 1.0), (2.0, 2.5, 3.5), (3.0, 4.25, 7.75)):
        step, state = optimizer_step(s, state, np.array([mean]))
        w += float(step[0])
        assert (float(state.m[0]), w) == (want_m, want_w)


def test_fedadam_by_hand() -> None:
    """One weight, lr 0.1, b1 0.9, b2 0.99, tau 0.001, means 0.2 then -0.2:
    round 1: m = 0.02, v = 0.99e-6 + 0.0004 = 0.00040099, step = 0.1 * 0.02 / (0.0200247... + 0.001);
    round 2: m = 0.018 - 0.02 = -0.002, v = 0.99 * 0.00040099 + 0.0004."""
    s = RoundSettings(strategy="fedadam", server_learning_rate=0.1)
    step1, st = optimizer_step(s, None, np.array([0.2]))
    assert math.isclose(float(st.m[0]), 0.02, rel_tol=1e-12)
    assert st.v is not None and math.isclose(float(st.v[0]), 0.00040099, rel_tol=1e-12)
    assert math.isclose(float(step1[0]), 0.1 * 0.02 / (math.sqrt(0.00040099) + 0.001), rel_tol=1e-12)
    step2, st2 = optimizer_step(s, st, np.array([-0.2]))
    v2 = 0.99 * 0.00040099 + 0.01 * 0.04
    assert math.isclose(float(st2.m[0]), -0.002, rel_tol=1e-9)
    assert st2.v is not None and math.isclose(float(st2.v[0]), v2, rel_tol=1e-12)
    assert math.isclose(float(step2[0]), 0.1 * -0.002 / (math.sqrt(v2) + 0.001), rel_tol=1e-9)
    assert (st.step, st2.step) == (1, 2)


def test_yogi_moves_v_additively_toward_the_squared_mean() -> None:
    s = RoundSettings(strategy="fedyogi", server_beta2=0.9)
    state = initial_state("fedyogi", 2, s.server_tau)
    state = replace(state, v=np.array([1.0, 0.0]))
    _, after = optimizer_step(s, state, np.array([0.5, 0.5]))
    assert after.v is not None
    # v above d**2 shrinks by (1 - b2) d**2, below it grows by as much (Adam would multiply).
    np.testing.assert_allclose(after.v, [1.0 - 0.1 * 0.25, 0.0 + 0.1 * 0.25])


def test_the_optimizer_step_is_pure_and_a_failed_round_keeps_the_state() -> None:
    s = opt_settings("fedadam")
    state = initial_state("fedadam", 3, s.server_tau)
    m_before = state.m.copy()
    optimizer_step(s, state, np.array([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(state.m, m_before)
    fold = ServerOptimizer(FedAvg(3, 100, 0.1, equal_weights), opt_settings("fedavgm"), None)
    fold.add(upd(1e37, 1.0, 1.0))
    fold.add(upd(1e37, 1.0, 1.0))
    with pytest.raises(AggregationError, match="overflow float32"):
        fold.result(vec(3.4e38, 0.0, 0.0))
    assert fold.next_state is None


def test_fedavg_stays_the_plain_fold() -> None:
    s = RoundSettings()
    assert s.strategy == "fedavg"
    folds = build_round_folds(s, vec(1.0, 2.0), InfluenceHistory(), 2, 1)
    assert folds.optimizer is None and type(folds.metrics.inner) is FedAvg
    assert strategy_announcement(s) is None


@pytest.mark.parametrize("strategy", OPTIMIZERS)
def test_update_strategy_builds_the_optimizer_around_the_mean(strategy: str) -> None:
    folds = build_round_folds(opt_settings(strategy), vec(1.0, 2.0), InfluenceHistory(), 2, 1)
    fold = update_strategy(opt_settings(strategy), folds.limits, 2)
    assert isinstance(fold, ServerOptimizer) and isinstance(fold.inner, FedAvg)
    assert folds.optimizer is folds.metrics.inner


# --- the state: checkpoint, restarts, strategy changes --------------------------------------------


def test_the_state_round_trips_through_json_exactly() -> None:
    rng = np.random.default_rng(3)
    for strategy in OPTIMIZERS:
        state = ServerOptimizerState(
            strategy,
            7,
            rng.normal(size=5),
            None if strategy == "fedavgm" else np.abs(rng.normal(size=5)),
        )
        assert state_from_json(state_to_json(state)) == state
    assert state_from_json(None) is None and state_to_json(None) is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"strategy": "median"}, "checkpoint metadata: server_optimizer.strategy 'median' is unknown"),
        ({"step": -1}, "checkpoint metadata: server_optimizer.step is -1"),
        ({"parameter_count": True}, "checkpoint metadata: server_optimizer.parameter_count is True"),
        ({"v": None}, "checkpoint metadata: server_optimizer.v must be present for fedadam"),
        ({"m": "!!"}, "checkpoint metadata: server_optimizer.m is not base64"),
        ({"m": "AAAAAAAAAAA="}, "checkpoint metadata: server_optimizer.m holds 1 values, not 2"),
        ({"m": 3}, "checkpoint metadata: server_optimizer.m must be base64 text"),
        ({"v": "AAAAAAAA+H8AAAAAAAAAAA=="}, "checkpoint metadata: server_optimizer.v is not finite"),
        ({"strategy": "fedavgm"}, "checkpoint metadata: server_optimizer.v must be null for fedavgm"),
        ({"step": 1.5}, "checkpoint metadata: server_optimizer.step is 1.5"),
        ({"parameter_count": 0}, "checkpoint metadata: server_optimizer.parameter_count is 0"),
        (
            {"extra": 1},
            "checkpoint metadata: server_optimizer must be an object with "
            "['m', 'parameter_count', 'step', 'strategy', 'v']",
        ),
    ],
)
def test_a_malformed_state_is_refused(change: dict[str, Any], message: str) -> None:
    good = state_to_json(initial_state("fedadam", 2, 1e-3))
    assert good is not None
    with pytest.raises(ServerOptimizerStateError) as err:
        state_from_json({**good, **change})
    assert str(err.value) == message  # one line, exactly


@pytest.mark.parametrize("value", [[], "fedadam", 3])
def test_a_state_that_is_not_an_object_is_refused(value: object) -> None:
    with pytest.raises(
        ServerOptimizerStateError, match=r"^checkpoint metadata: server_optimizer must be an object"
    ):
        state_from_json(value)


def send_round(engine: RoundEngine, now: float, scale: float = 0.01) -> None:
    m = engine.open_round(now).manifest
    devs = devices(m.selected_devices)
    for d in m.selected_devices:
        payload = devs[d].update(m, delta_for(d, m.round_number, scale), examples=50)
        devs[d].counter = engine.state.counters.get(d, 0)
        assert engine.handle(devs[d].topic, payload, now + 1).accepted
    assert engine.close_round().outcome == "aggregated"


def fresh_devices_round(engine: RoundEngine, now: float) -> None:
    """A train round with every selected device, each with its counter past the engine's."""
    m = engine.open_round(now).manifest
    devs = devices(m.selected_devices)
    for d in m.selected_devices:
        devs[d].counter = engine.state.counters.get(d, 0)
        payload = devs[d].update(m, delta_for(d, m.round_number), examples=50)
        assert engine.handle(devs[d].topic, payload, now + 1).accepted
    assert engine.close_round().outcome == "aggregated"


@pytest.mark.parametrize("strategy", OPTIMIZERS)
def test_a_restart_from_the_checkpoint_gives_identical_next_weights(strategy: str, tmp_path: Path) -> None:
    s = plain_fedavg(strategy=strategy, server_learning_rate=0.05)
    engine = make_engine(s)
    fresh_devices_round(engine, T0)
    fresh_devices_round(engine, T0 + 100)
    assert engine.state.server_optimizer is not None and engine.state.server_optimizer.step == 2
    path = tmp_path / "checkpoint.bin"
    save_checkpoint(path, checkpoint_from_state(engine.snapshot()))
    ck = load_checkpoint(path, 1 << 30)
    assert ck is not None
    restored_state = state_from_checkpoint(ck)
    assert restored_state.server_optimizer == engine.state.server_optimizer
    restored = make_engine(s, restored_state)
    fresh_devices_round(engine, T0 + 200)
    fresh_devices_round(restored, T0 + 200)
    assert np.array_equal(engine.state.weights, restored.state.weights)
    assert restored.state.server_optimizer == engine.state.server_optimizer
    assert restored.state.server_optimizer is not None and restored.state.server_optimizer.step == 3


class ServiceFleet:
    """Two provisioned devices (``create_fleet``: real keys, registry and aggregator.toml, the
    real har-watch model) that seal their reports for an ``AggregatorService``'s engine."""

    def __init__(self, tmp_path: Path, har_model_dir: Path, **rounds: Any) -> None:
        from fedge.lab.provision import create_fleet

        self.files = create_fleet(
            tmp_path,
            "opt",
            har_model_dir,
            "mqtt://127.0.0.1:9",
            {"watch-01": 1, "watch-02": 2},
            {"min_devices": 2, **rounds},
        )
        self.counters = {d: 0 for d in self.files.device_keys}

    def sealed(
        self, engine: RoundEngine, device: str, kind: str, header: dict[str, Any], body: bytes
    ) -> bytes:
        from fedge.protocol.sealing import SealedHeader, seal

        m = engine.current.manifest if engine.current is not None else None
        assert m is not None
        self.counters[device] += 1
        bind = SealedHeader(engine.fleet, device, m.round_id, self.counters[device], kind, m.version)
        return seal(bind, header, body, self.files.device_keys[device], self.files.box_key.public_key)

    def run_round(self, engine: RoundEngine, now: float) -> None:
        """The engine's next round (moments or train) with both devices reporting."""
        from fedge.agent.core import moments_payload, update_payload

        m = engine.open_round(now).manifest
        p = engine.model_manifest.parameter_count
        for i, d in enumerate(m.selected_devices):
            kind = "moments" if m.phase == "moments" else "update"
            if kind == "moments":
                x = np.random.default_rng(i).normal(
                    0.5 * i, 1.0 + i, size=(40, engine.model_manifest.task.input_dim)
                )
                header, body = moments_payload(x)
            else:
                delta = (
                    np.random.default_rng([i, m.round_number]).normal(0.0, 0.01, size=p).astype(np.float32)
                )
                header, body = update_payload(m, delta, 50, 0.5, None)
            out = engine.handle(engine.topics.update(d), self.sealed(engine, d, kind, header, body), now + 1)
            assert out.accepted, out.reason
        assert engine.close_round().outcome == "aggregated"


@pytest.mark.slow  # builds the real har-watch model (once per session)
def test_the_state_survives_an_aggregator_service_restart_through_its_checkpoint_file(
    tmp_path: Path, har_model_dir: Path
) -> None:
    from fedge.aggregator.config import load_aggregator_config
    from fedge.aggregator.service import CHECKPOINT_FILE, AggregatorService
    from fedge.protocol.config_source import ConfigError

    fleet = ServiceFleet(tmp_path, har_model_dir, strategy="fedyogi", server_learning_rate=0.05)
    config = load_aggregator_config(fleet.files.aggregator_config, {})
    first = AggregatorService(config)
    for r in range(3):  # moments, then two train rounds
        fleet.run_round(first.engine, T0 + 100 * r)
    state = first.engine.state.server_optimizer
    assert state is not None and (state.strategy, state.step) == ("fedyogi", 2)
    # What the service writes before it publishes each manifest (AggregatorService._announce).
    checkpoint = config.state_dir / CHECKPOINT_FILE
    save_checkpoint(first.checkpoint_path, checkpoint_from_state(first.engine.snapshot()))
    assert first.checkpoint_path == checkpoint and checkpoint.is_file()

    again = AggregatorService(config)
    assert again.engine.state.server_optimizer == state
    assert np.array_equal(again.engine.state.weights, first.engine.state.weights)
    counters = dict(fleet.counters)
    fleet.run_round(first.engine, T0 + 300)
    fleet.counters = counters  # the same reports again, to the restarted service
    fleet.run_round(again.engine, T0 + 300)
    assert np.array_equal(again.engine.state.weights, first.engine.state.weights)
    assert again.engine.state.server_optimizer == first.engine.state.server_optimizer
    assert again.engine.state.server_optimizer is not None and again.engine.state.server_optimizer.step == 3

    # Another strategy on the same model generation: one line naming the checkpoint and the fix.
    changed = replace(config, rounds=replace(config.rounds, strategy="fedadam"))
    with pytest.raises(ConfigError) as err:
        AggregatorService(changed)
    p = first.engine.model_manifest.parameter_count
    assert str(err.value) == (
        f'{checkpoint}: the checkpoint holds "fedyogi" server-optimizer state for {p} weights, and '
        f'[rounds] strategy is "fedadam" for {p}: restore the strategy, or start a new model '
        "generation ([aggregator] model_generation + 1; docs/strategies.md)"
    )
    # A new model generation starts the new strategy from no state.
    rolled = AggregatorService(replace(changed, model_generation=2))
    assert rolled.engine.state.server_optimizer is None


def test_an_old_checkpoint_without_the_state_loads_and_starts_one() -> None:
    engine = make_engine(plain_fedavg())
    fresh_devices_round(engine, T0)
    ck = checkpoint_from_state(engine.snapshot())
    assert ck.metadata["server_optimizer"] is None
    old = replace(ck, metadata={k: v for k, v in ck.metadata.items() if k != "server_optimizer"})
    state = state_from_checkpoint(old)
    assert state.server_optimizer is None
    # A fleet moving from fedavg to a server optimizer starts its state at the next round.
    adam = make_engine(plain_fedavg(strategy="fedadam", server_learning_rate=0.05), state)
    fresh_devices_round(adam, T0 + 100)
    assert adam.state.server_optimizer is not None and adam.state.server_optimizer.step == 1


def test_a_malformed_checkpointed_state_is_a_checkpoint_error() -> None:
    ck = checkpoint_from_state(engine_initial_state())
    bad = replace(ck, metadata={**ck.metadata, "server_optimizer": {"strategy": "fedadam"}})
    with pytest.raises(CheckpointError, match="server_optimizer must be an object"):
        state_from_checkpoint(bad)


def test_another_strategy_or_model_size_is_refused_in_one_line() -> None:
    state = engine_initial_state()
    state.server_optimizer = initial_state("fedadam", P, 1e-3)
    for strategy in ("fedyogi", "fedavg", "median"):
        with pytest.raises(ServerOptimizerStateError) as err:
            make_engine(plain_fedavg(strategy=strategy), state)
        assert str(err.value) == (
            f'the checkpoint holds "fedadam" server-optimizer state for {P} weights, and [rounds] '
            f'strategy is "{strategy}" for {P}: restore the strategy, or start a new model generation '
            "([aggregator] model_generation + 1; docs/strategies.md)"
        )
        assert "\n" not in str(err.value)
    with pytest.raises(ServerOptimizerStateError, match='"fedadam" for 5:'):
        check_state(state.server_optimizer, "fedadam", 5)
    make_engine(plain_fedavg(strategy="fedadam"), state)  # the same strategy continues


def test_a_new_model_generation_starts_without_optimizer_state() -> None:
    engine = make_engine(plain_fedavg(strategy="fedadam", server_learning_rate=0.05))
    fresh_devices_round(engine, T0)
    assert engine.state.server_optimizer is not None
    rolled = start_generation(engine.snapshot(), 2, engine_initial_state())
    assert rolled.server_optimizer is None
    make_engine(plain_fedavg(strategy="fedyogi"), rolled)  # any strategy may start it


# --- the engine ------------------------------------------------------------------------------------


def test_the_engine_runs_fedavgm_like_the_reference() -> None:
    s = plain_fedavg(strategy="fedavgm", server_learning_rate=0.5, server_momentum=0.8)
    engine = make_engine(s, engine_initial_state(claim_median=1e9))
    w = INITIAL_WEIGHTS.astype(np.float64)
    m = np.zeros(P)
    for r, now in ((1, T0), (2, T0 + 100), (3, T0 + 200)):
        fresh_devices_round(engine, now)
        ids = DEVICE_IDS[:3]
        mean = np.mean([delta_for(d, r).astype(np.float64) for d in ids], axis=0)
        m = 0.8 * m + mean
        w = w.astype(np.float32).astype(np.float64) + 0.5 * m
        np.testing.assert_allclose(engine.state.weights, w.astype(np.float32), rtol=0, atol=1e-6)
    assert engine.state.server_optimizer is not None and engine.state.server_optimizer.step == 3


def test_the_manifest_record_and_status_name_the_strategy() -> None:
    s = plain_fedavg(strategy="fedadam", server_learning_rate=0.05)
    engine = make_engine(s)
    pub = engine.open_round(T0)
    announced = pub.manifest.strategy
    assert announced == StrategyAnnouncement(
        "fedadam",
        {"server_learning_rate": 0.05, "server_beta1": 0.9, "server_beta2": 0.99, "server_tau": 0.001},
    )
    assert round_manifest_from_dict(pub.manifest.to_dict()) == pub.manifest
    assert engine.status(T0)["limits"]["strategy"] == "fedadam"
    m = pub.manifest
    devs = devices(m.selected_devices)
    for d in m.selected_devices:
        assert engine.handle(devs[d].topic, devs[d].update(m), T0 + 1).accepted
    record = engine.close_round()
    assert record.strategy == "fedadam" and engine.state.history[-1]["strategy"] == "fedadam"


def test_fedavg_manifests_and_moments_manifests_carry_no_strategy() -> None:
    assert make_engine().open_round(T0).manifest.strategy is None
    moments = make_engine(plain_fedavg(strategy="fedadam"), engine_initial_state(normalisation=None))
    pub = moments.open_round(T0)
    assert pub.manifest.phase == "moments" and pub.manifest.strategy is None
    assert "strategy" not in pub.manifest.to_dict()
    rec = make_engine().open_round(T0)
    assert "strategy" not in rec.manifest.to_dict()


def test_an_aborted_round_leaves_the_state_as_it_was() -> None:
    engine = make_engine(plain_fedavg(strategy="fedadam", server_learning_rate=0.05))
    fresh_devices_round(engine, T0)
    before = engine.state.server_optimizer
    engine.open_round(T0 + 100)
    assert engine.close_round().outcome == "aborted"
    assert engine.state.server_optimizer is before


# --- secure aggregation and differential privacy -----------------------------------------------


def test_a_secure_round_applies_the_server_optimizer_to_the_mean() -> None:
    from test_secure_aggregator_rounds import delta, ids, open_secure_round, secure_engine

    changes = {"strategy": "fedadam", "server_learning_rate": 0.05}
    engine = secure_engine(4, **changes)
    plain = secure_engine(4)
    start = engine.state.weights.copy()
    updates = {d: delta(d) for d in ids(4)}
    assert open_secure_round(engine, dict(updates)).run().outcome == "aggregated"
    assert open_secure_round(plain, dict(updates)).run().outcome == "aggregated"
    state = engine.state.server_optimizer
    assert state is not None and state.step == 1 and state.strategy == "fedadam"
    s = engine.settings
    mean = state.m / (1 - s.server_beta1)
    # The same secure sum as a fedavg fleet's (lr 1: the model moved by the mean itself).
    np.testing.assert_allclose(mean, plain.state.weights.astype(np.float64) - start, rtol=0, atol=1e-7)
    step, _ = optimizer_step(s, None, mean)
    np.testing.assert_allclose(engine.state.weights, (start + step).astype(np.float32), rtol=0, atol=1e-7)
    assert engine.state.history[-1]["strategy"] == "fedadam"


def test_a_dp_round_applies_the_server_optimizer_to_the_noised_mean() -> None:
    from fedge.aggregator.strategies.dp_mean import DpGaussianMean
    from fedge.aggregator.strategies.factory import DpRound, build_dp_round_folds

    s = opt_settings("fedavgm", server_momentum=0.5)
    dp = DpRound(
        clip_bound=1.0, update_noise_multiplier=0.0, indicator_noise_stddev=None, expected_participants=4
    )
    folds = build_dp_round_folds(s, InfluenceHistory(), 2, 1, dp, np.random.default_rng(0))
    assert isinstance(folds.dp, DpGaussianMean) and folds.optimizer is not None
    folds.add_update(upd(0.4, 0.0))
    folds.add_update(upd(0.0, 0.8))
    w = folds.updates.result(vec(0.0, 0.0))
    # No noise: the mean over the 4 expected participants, [0.1, 0.2]; m = mean; w = 0.1 m.
    np.testing.assert_allclose(w, [0.01, 0.02], rtol=1e-6)
    assert folds.optimizer.next_state is not None and folds.optimizer.next_state.step == 1


# --- configuration ---------------------------------------------------------------------------------


def test_the_optimizer_keys_and_their_defaults() -> None:
    d = RoundSettings()
    assert (d.strategy, d.server_momentum, d.server_beta1, d.server_beta2, d.server_tau) == (
        "fedavg",
        0.9,
        0.9,
        0.99,
        1e-3,
    )
    assert d.server_learning_rate == 1.0  # unchanged: adaptive optimizers document a smaller one
    got = round_settings_from_table(
        rounds_table(strategy="fedyogi", server_beta2=0.999, server_learning_rate=0.03)
    )
    assert (got.strategy, got.server_beta2, got.server_learning_rate) == ("fedyogi", 0.999, 0.03)


def test_an_adaptive_optimizer_with_a_large_learning_rate_warns(caplog: pytest.LogCaptureFixture) -> None:
    round_settings_from_table(rounds_table(strategy="fedadam"))
    assert "0.01-0.1 is typical" in caplog.text
    caplog.clear()
    round_settings_from_table(rounds_table(strategy="fedadam", server_learning_rate=0.05))
    round_settings_from_table(rounds_table(strategy="fedavgm"))
    assert "typical" not in caplog.text


def test_the_optimizer_state_is_not_in_the_engine_state_of_a_fedavg_fleet() -> None:
    engine = make_engine()
    fresh_devices_round(engine, T0)
    assert engine.state.server_optimizer is None
    assert isinstance(engine.snapshot(), EngineState)
