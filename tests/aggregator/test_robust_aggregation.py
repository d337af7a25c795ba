"""Robust aggregation (``[rounds] strategy``: median, trimmed_mean, krum, multi_krum): the pure
statistics on small matrices and against a brute-force Krum, the fold that holds a round's
updates (its memory cap, its refusals), rounds through the real round engine with sealed device
messages where two of seven devices poison the round, and the configurations refused."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from nacl.public import PrivateKey

from fedge.aggregator.config import RoundSettings, load_aggregator_config
from fedge.aggregator.fedavg import AggregationError
from fedge.aggregator.privacy_config import SecureSettings, robust_with_dp, robust_with_secure
from fedge.aggregator.round_engine import RoundEngine, RoundRecord
from fedge.aggregator.strategies.factory import InfluenceHistory, build_round_folds, strategy_announcement
from fedge.aggregator.strategies.robust import (
    Krum,
    Median,
    RobustFold,
    TooManyUpdates,
    TrimmedMean,
    coordinate_median,
    krum_scores,
    krum_select,
    trimmed_mean,
)
from fedge.protocol.config_source import ConfigError
from fedge.protocol.errors import FedgeError
from fedge.protocol.messages import UpdatePayload
from fedge.protocol.reasons import RejectReason
from fedge.protocol.round_manifest import round_manifest_from_dict
from fedge.protocol.signing import DocType, key_id, verify_document
from support.aggregator_toml import MINIMAL_AGGREGATOR_TOML
from support.engine_helpers import (
    DEVICE_IDS,
    DEVICE_KEYS,
    INITIAL_WEIGHTS,
    SIGNING_KEY,
    T0,
    P,
    devices,
    make_engine,
    settings,
)

pytestmark = pytest.mark.aggregator

F64 = npt.NDArray[np.float64]


def m64(*rows: tuple[float, ...]) -> F64:
    return np.array(rows, dtype=np.float64)


# --- the statistics ----------------------------------------------------------------------------


def test_the_coordinate_median_of_small_matrices() -> None:
    odd = m64((1.0, 10.0, -3.0), (2.0, 20.0, -1.0), (100.0, -5.0, -2.0))
    np.testing.assert_array_equal(coordinate_median(odd), [2.0, 10.0, -2.0])
    # An even count: the mean of the two middle values, per column.
    even = m64((1.0, 0.0), (3.0, 0.0), (10.0, 1.0), (1e9, 1.0))
    np.testing.assert_array_equal(coordinate_median(even), [6.5, 0.5])
    np.testing.assert_array_equal(coordinate_median(m64((4.0, -4.0))), [4.0, -4.0])


def test_the_trimmed_mean_of_small_matrices() -> None:
    x = m64((1.0, 5.0), (2.0, -100.0), (3.0, 6.0), (4.0, 7.0), (100.0, 8.0))
    # n = 5: trim_fraction 0.2 drops floor(1.0) = 1 value from each end, per column.
    np.testing.assert_array_equal(trimmed_mean(x, 0.2), [3.0, 6.0])
    # 0.19 drops floor(0.95) = 0: the plain mean.
    np.testing.assert_array_equal(trimmed_mean(x, 0.19), [22.0, -74.0 / 5])
    # 0.4 drops 2 from each end: the median of 5.
    np.testing.assert_array_equal(trimmed_mean(x, 0.4), coordinate_median(x))
    # n = 7, 0.3: floor(2.1) = 2 from each end; the values ordered per column, not per row.
    y = m64(*((float(v), float(-v)) for v in (7, 1, 6, 2, 5, 3, 4)))
    np.testing.assert_array_equal(trimmed_mean(y, 0.3), [4.0, -4.0])


def test_a_trim_that_leaves_no_value_is_refused() -> None:
    x = np.zeros((4, 2))
    with pytest.raises(AggregationError, match=r"^trim_fraction=0\.5 leaves no value of 4$"):
        trimmed_mean(x, 0.5)
    trimmed_mean(x, 0.49)  # floor(1.96) = 1: two of four values left


def brute_krum_scores(x: F64, f: int) -> list[float]:
    """Krum's score written out: for each update, the sum of its ``n - f - 2`` smallest squared
    distances to the other updates."""
    n = len(x)
    out = []
    for i in range(n):
        d = sorted(
            float(sum((a - b) ** 2 for a, b in zip(x[i], x[j], strict=True))) for j in range(n) if j != i
        )
        out.append(sum(d[: n - f - 2]))
    return out


@pytest.mark.parametrize(("n", "f"), [(3, 0), (5, 1), (8, 2), (9, 3), (12, 1)])
def test_krum_scores_match_the_brute_force(n: int, f: int) -> None:
    rng = np.random.default_rng(n * 10 + f)
    x = rng.normal(0.0, 1.0, size=(n, 6))
    x[0] *= 30.0  # one far away: its score is the worst
    got = krum_scores(x, f)
    np.testing.assert_allclose(got, brute_krum_scores(x, f), rtol=1e-9, atol=1e-9)
    assert int(np.argmax(got)) == 0


@pytest.mark.parametrize(("n", "f", "select"), [(5, 1, 1), (8, 2, 0), (8, 2, 3), (8, 2, 100), (7, 0, 0)])
def test_krum_select_takes_the_best_scores_of_the_brute_force(n: int, f: int, select: int) -> None:
    rng = np.random.default_rng(n + 7 * f + select)
    x = rng.normal(0.0, 1.0, size=(n, 4))
    brute = brute_krum_scores(x, f)
    m = n - f if select == 0 else min(select, n - f)
    want = tuple(sorted(range(n), key=lambda i: (brute[i], i))[:m])
    assert krum_select(x, f, select) == want


def test_krum_select_breaks_ties_by_arrival() -> None:
    x = np.zeros((5, 3))
    assert krum_select(x, 1, 1) == (0,)
    assert krum_select(x, 1, 0) == (0, 1, 2, 3)


@pytest.mark.parametrize(("n", "f"), [(2, 0), (4, 1), (6, 2)])
def test_krum_needs_more_than_2f_plus_2_updates(n: int, f: int) -> None:
    with pytest.raises(AggregationError) as err:
        krum_scores(np.zeros((n, 2)), f)
    assert str(err.value) == (f"Krum with byzantine_devices={f} needs more than {2 * f + 2} updates, got {n}")
    krum_scores(np.zeros((n + 1, 2)), f)  # one more is enough


# --- the fold ------------------------------------------------------------------------------------


def upd(values: Any, examples: Any = 10) -> UpdatePayload:
    return UpdatePayload(np.asarray(values, dtype=np.float32), examples, 0.5, None)


def test_the_fold_holds_copies_and_steps_by_the_server_learning_rate() -> None:
    fold = Median(3, 100, 10, 0.5)
    rows = [[1.0, 2.0, 3.0], [2.0, 2.0, -3.0], [9.0, -8.0, 0.0]]
    arrays = [np.array(r, dtype=np.float32) for r in rows]
    for a in arrays:
        fold.add(upd(a))
    arrays[0][:] = 1000.0  # the fold holds its own copy
    out = fold.result(np.array([10.0, 20.0, 30.0], dtype=np.float32))
    np.testing.assert_array_equal(out, [10.0 + 0.5 * 2.0, 20.0 + 0.5 * 2.0, 30.0 + 0.5 * 0.0])
    assert out.dtype == np.float32 and fold.count == 3


def test_an_update_over_the_cap_is_refused_and_leaves_the_held_updates_unchanged() -> None:
    fold = TrimmedMean(2, 100, 3, 1.0, 0.0)
    for row in ([1.0, 1.0], [2.0, 4.0], [3.0, 7.0]):
        fold.add(upd(row))
    held = [u.copy() for u in fold.updates]
    with pytest.raises(TooManyUpdates) as err:
        fold.add(upd([1e6, 1e6]))
    assert isinstance(err.value, AggregationError) and err.value.limit == 3
    assert str(err.value) == "the round already holds robust_max_updates=3 updates"
    assert fold.count == 3
    for a, b in zip(fold.updates, held, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fold.result(np.zeros(2, dtype=np.float32)), [2.0, 4.0])


@pytest.mark.parametrize("examples", [0, -1, 101, True, 1.5, "10", None])
def test_bad_example_counts_are_refused_changing_nothing(examples: Any) -> None:
    fold = Median(2, 100, 10, 1.0)
    fold.add(upd([1.0, 2.0]))
    with pytest.raises(AggregationError) as err:
        fold.add(upd([5.0, 5.0], examples))
    assert str(err.value) == f"examples must be an integer in 1..100, got {examples!r}"
    assert fold.count == 1
    np.testing.assert_array_equal(fold.result(np.zeros(2, dtype=np.float32)), [1.0, 2.0])


@pytest.mark.parametrize(
    ("delta", "message"),
    [
        (np.zeros(3, dtype=np.float32), r"^delta must have shape \(2,\), got \(3,\)$"),
        (np.zeros(2, dtype=np.float64), r"^delta must be float32, got float64$"),
        (np.array([np.nan, 0.0], dtype=np.float32), r"^delta contains NaN or infinity$"),
    ],
)
def test_bad_deltas_are_refused_changing_nothing(delta: Any, message: str) -> None:
    fold = Krum(2, 100, 10, 1.0, 0, 1)
    with pytest.raises(AggregationError, match=message):
        fold.add(UpdatePayload(delta, 10, 0.5, None))
    assert fold.count == 0


def test_a_fold_without_updates_or_overflowing_float32_is_an_aggregation_error() -> None:
    with pytest.raises(AggregationError, match="no updates were added"):
        Median(2, 100, 10, 1.0).result(np.zeros(2, dtype=np.float32))
    fold = Median(2, 100, 10, 1.0)
    fold.add(upd([3e38, 0.0]))
    with pytest.raises(AggregationError, match="overflow float32"):
        fold.result(np.array([3e38, 0.0], dtype=np.float32))


def test_krum_folds_average_the_selected_updates() -> None:
    rows = [[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.1, 0.1], [50.0, -50.0]]
    krum = Krum(2, 100, 10, 1.0, 1, 1)
    multi = Krum(2, 100, 10, 1.0, 1, 0)
    for r in rows:
        krum.add(upd(r))
        multi.add(upd(r))
    zero = np.zeros(2, dtype=np.float32)
    out = krum.result(zero)
    assert len(krum.selected) == 1 and 4 not in krum.selected
    np.testing.assert_array_equal(out, np.asarray(rows[krum.selected[0]], dtype=np.float32))
    out = multi.result(zero)
    assert sorted(multi.selected) == [0, 1, 2, 3]  # n - f = 4: every honest one
    np.testing.assert_allclose(out, [0.05, 0.05], rtol=1e-6)


def test_the_factory_builds_each_robust_fold_from_the_settings() -> None:
    w = np.zeros(3, dtype=np.float32)
    for name, cls in (
        ("median", Median),
        ("trimmed_mean", TrimmedMean),
        ("krum", Krum),
        ("multi_krum", Krum),
    ):
        s = RoundSettings(strategy=name, robust_max_updates=7, byzantine_devices=2, multi_krum_select=3)
        folds = build_round_folds(s, w, InfluenceHistory(), 3, 1)
        fold = folds.metrics.inner
        assert type(fold) is cls and isinstance(fold, RobustFold)
        assert fold.max_updates == 7 and folds.optimizer is None
        if isinstance(fold, Krum):
            assert (fold.byzantine, fold.select) == (2, 1 if name == "krum" else 3)


# --- rounds through the engine ---------------------------------------------------------------------

#: Seven enrolled devices: the helpers' five and two more.
SEVEN = (*DEVICE_IDS, "dev-f", "dev-g")
for _extra in SEVEN[len(DEVICE_IDS) :]:
    DEVICE_KEYS.setdefault(_extra, PrivateKey.generate())
#: The two that poison the round.
ATTACKERS = ("dev-f", "dev-g")
HONEST = tuple(d for d in SEVEN if d not in ATTACKERS)

_rng = np.random.default_rng(2024)
#: The direction the honest devices agree on, each with its own noise (a fifth of it).
BASE = _rng.normal(0.0, 0.01, size=P)
DELTAS: dict[str, npt.NDArray[np.float32]] = {
    d: (BASE + _rng.normal(0.0, 0.002, size=P)).astype(np.float32) for d in HONEST
}
# Sign-flipped and scaled ten times, each with a little noise so that they are not identical.
DELTAS.update({d: (-10.0 * BASE + _rng.normal(0.0, 0.002, size=P)).astype(np.float32) for d in ATTACKERS})
HONEST_MEAN = np.mean([DELTAS[d].astype(np.float64) for d in HONEST], axis=0)


def robust_settings(strategy: str, **changes: Any) -> RoundSettings:
    """No norm bound, so that what keeps the attackers out is the strategy alone."""
    return settings(
        strategy=strategy,
        min_devices=5,
        max_update_norm=0.0,
        update_norm_ratio=0.0,
        update_norm_adaptive=0.0,
        **changes,
    )


def poisoned_round(s: RoundSettings) -> tuple[RoundEngine, RoundRecord, list[str]]:
    """One train round where every one of the seven devices reports its ``DELTAS`` (the
    attackers in the middle of the arrivals); the rejection reasons of the refused ones."""
    engine = make_engine(s, devices=SEVEN)
    m = engine.open_round(T0).manifest
    assert set(m.selected_devices) == set(SEVEN)
    devs = devices(SEVEN)
    reasons = []
    for d in ("dev-a", "dev-b", "dev-f", "dev-c", "dev-g", "dev-d", "dev-e"):
        out = engine.handle(devs[d].topic, devs[d].update(m, DELTAS[d], examples=50), T0 + 1)
        if not out.accepted:
            reasons.append(str(out.reason))
    return engine, engine.close_round(), reasons


def distance_to_honest_mean(weights: npt.NDArray[np.float32]) -> float:
    """How far the round moved the model from where the honest mean would have, relative to the
    honest mean's own size."""
    moved = weights.astype(np.float64) - INITIAL_WEIGHTS.astype(np.float64)
    return float(np.linalg.norm(moved - HONEST_MEAN) / np.linalg.norm(HONEST_MEAN))


ROBUST_CASES = {
    "median": {},
    "trimmed_mean": {"trim_fraction": 0.3},  # floor(0.3 * 7) = 2 from each end
    "krum": {"byzantine_devices": 2},
    "multi_krum": {"byzantine_devices": 2},
}


@pytest.mark.parametrize("strategy", list(ROBUST_CASES))
def test_two_poisoners_of_seven_barely_move_a_robust_round(strategy: str) -> None:
    engine, record, reasons = poisoned_round(robust_settings(strategy, **ROBUST_CASES[strategy]))
    assert reasons == [] and record.outcome == "aggregated" and record.reported == 7
    assert record.strategy == strategy
    # The honest devices' spread around their mean is ~0.18 of its norm (noise 0.002 / 0.01 x
    # sqrt(4/5)); the poisoned mean is ~3.1 away (below). Each robust statistic stays within
    # the honest spread, and multi-Krum averages exactly the five honest updates.
    limit = {"median": 0.15, "trimmed_mean": 0.15, "krum": 0.2, "multi_krum": 1e-5}[strategy]
    assert distance_to_honest_mean(engine.state.weights) < limit
    # The engine aggregated exactly what the statistic gives on the decoded (fp32: exact) deltas.
    stacked = np.stack(
        [
            DELTAS[d].astype(np.float64)
            for d in ("dev-a", "dev-b", "dev-f", "dev-c", "dev-g", "dev-d", "dev-e")
        ]
    )
    s = engine.settings
    if strategy == "median":
        agg = coordinate_median(stacked)
    elif strategy == "trimmed_mean":
        agg = trimmed_mean(stacked, s.trim_fraction)
    else:
        chosen = krum_select(stacked, s.byzantine_devices, 1 if strategy == "krum" else 0)
        assert not {2, 4} & set(chosen)  # neither attacker is picked
        agg = stacked[list(chosen)].mean(axis=0)
    np.testing.assert_array_equal(
        engine.state.weights, (INITIAL_WEIGHTS.astype(np.float64) + agg).astype(np.float32)
    )


def test_the_same_poisoned_round_under_fedavg_moves_far() -> None:
    engine, record, reasons = poisoned_round(robust_settings("fedavg"))
    assert reasons == [] and record.outcome == "aggregated"
    # (5 honest - 2 x 10 BASE) / 7: about -15/7 BASE where the honest mean is +BASE.
    assert distance_to_honest_mean(engine.state.weights) > 2.8
    moved = engine.state.weights.astype(np.float64) - INITIAL_WEIGHTS.astype(np.float64)
    assert float(np.dot(moved, HONEST_MEAN)) < 0  # the model went the wrong way


def test_updates_over_robust_max_updates_are_refused_and_the_round_still_aggregates() -> None:
    engine, record, reasons = poisoned_round(robust_settings("median", robust_max_updates=5))
    assert reasons == ["too_many_updates", "too_many_updates"]
    assert record.outcome == "aggregated" and record.reported == 5
    assert record.rejected == {RejectReason.TOO_MANY_UPDATES: 2}
    status = engine.status(T0 + 2)
    assert status["rejected_total"] == {"too_many_updates": 2}
    assert status["limits"]["strategy"] == "median"
    assert status["history"][-1]["rejected"] == {"too_many_updates": 2}
    # The first five arrivals were held: dev-a, dev-b, dev-f, dev-c, dev-g (dev-d, dev-e refused).
    held = np.stack([DELTAS[d].astype(np.float64) for d in ("dev-a", "dev-b", "dev-f", "dev-c", "dev-g")])
    np.testing.assert_array_equal(
        engine.state.weights,
        (INITIAL_WEIGHTS.astype(np.float64) + coordinate_median(held)).astype(np.float32),
    )


def test_the_train_manifest_announces_the_strategy_and_its_parameters() -> None:
    s = robust_settings("multi_krum", byzantine_devices=2, multi_krum_select=3, server_learning_rate=0.5)
    pub = make_engine(s, devices=SEVEN).open_round(T0)
    want = {
        "name": "multi_krum",
        "parameters": {"server_learning_rate": 0.5, "byzantine_devices": 2, "multi_krum_select": 3},
    }
    trusted = {key_id(SIGNING_KEY.verify_key): SIGNING_KEY.verify_key}
    doc, _ = verify_document(pub.manifest_frame, DocType.ROUND_MANIFEST, trusted)
    assert doc["strategy"] == want
    assert round_manifest_from_dict(doc) == pub.manifest
    for name, params in (
        ("median", {"server_learning_rate": 1.0}),
        ("trimmed_mean", {"server_learning_rate": 1.0, "trim_fraction": 0.3}),
        ("krum", {"server_learning_rate": 1.0, "byzantine_devices": 2}),
    ):
        announced = strategy_announcement(robust_settings(name, **ROBUST_CASES[name]))
        assert announced is not None and announced.to_dict() == {"name": name, "parameters": params}
    plain = make_engine(robust_settings("fedavg"), devices=SEVEN).open_round(T0)
    doc, _ = verify_document(plain.manifest_frame, DocType.ROUND_MANIFEST, trusted)
    assert "strategy" not in doc and plain.manifest.strategy is None


def test_the_engine_refuses_a_robust_strategy_under_secure_aggregation() -> None:
    with pytest.raises(FedgeError) as err:
        RoundEngine(
            "fleet-1",
            robust_settings("median"),
            make_engine().model_manifest,
            b"x",
            PrivateKey.generate(),
            SIGNING_KEY,
            {},
            make_engine().snapshot(),
            secure=SecureSettings(),
        )
    assert str(err.value) == (
        'strategy "median" needs every update on its own: it cannot run under secure aggregation '
        "or differential privacy"
    )


# --- configuration ---------------------------------------------------------------------------------

BASE_TOML = MINIMAL_AGGREGATOR_TOML


def load(tmp_path: Path, rounds: str, privacy: str = "") -> RoundSettings:
    path = tmp_path / "aggregator.toml"
    text = BASE_TOML + "\n[rounds]\n" + rounds + ("\n[privacy]\n" + privacy if privacy else "")
    path.write_text(text)
    return load_aggregator_config(path, {}).rounds


def test_robust_strategies_and_their_keys_load(tmp_path: Path) -> None:
    s = load(
        tmp_path,
        'strategy = "multi_krum"\nmin_devices = 7\nbyzantine_devices = 2\nmulti_krum_select = 4\n'
        "robust_max_updates = 50\n",
    )
    assert (s.strategy, s.byzantine_devices, s.multi_krum_select, s.robust_max_updates) == (
        "multi_krum",
        2,
        4,
        50,
    )
    assert s.robust
    t = load(tmp_path, 'strategy = "trimmed_mean"\ntrim_fraction = 0.25\n')
    assert (t.strategy, t.trim_fraction, t.weighting) == ("trimmed_mean", 0.25, "equal")
    # Defaults: min_devices 2 is enough for the median; Krum needs min_devices >= 2f + 3 = 5.
    assert load(tmp_path, 'strategy = "median"\n').robust_max_updates == 1000
    assert load(tmp_path, 'strategy = "krum"\nmin_devices = 5\n').byzantine_devices == 1


@pytest.mark.parametrize(
    ("rounds", "privacy", "message"),
    [
        (
            'strategy = "median"\nweighting = "examples"\n',
            "",
            '[rounds] strategy = "median" counts every update once: set weighting = "equal"',
        ),
        (
            'strategy = "trimmed_mean"\nmin_devices = 3\nrobust_max_updates = 2\n',
            "",
            "[rounds] robust_max_updates=2 is below min_devices=3: every round would be aborted",
        ),
        (
            'strategy = "krum"\nmin_devices = 4\n',
            "",
            '[rounds] strategy = "krum" with byzantine_devices = 1 needs min_devices >= 5 '
            "(Krum needs n > 2f + 2 updates)",
        ),
        (
            'strategy = "multi_krum"\nmin_devices = 6\nbyzantine_devices = 2\n',
            "",
            '[rounds] strategy = "multi_krum" with byzantine_devices = 2 needs min_devices >= 7 '
            "(Krum needs n > 2f + 2 updates)",
        ),
        (
            'strategy = "median"\nmin_devices = 3\n',
            "secure_aggregation = true\n",
            '[rounds] strategy = "median" needs every update on its own, and secure aggregation '
            "only ever shows the sum: use fedavg or a server optimizer (fedavgm, fedadagrad, fedadam, "
            "fedyogi), or set [privacy] secure_aggregation = false",
        ),
        (
            'strategy = "krum"\nmin_devices = 5\n',
            "enabled = true\n",
            '[rounds] strategy = "krum" cannot run with [privacy] enabled: the noise is calibrated '
            "to the clipped mean; use fedavg or a server optimizer (fedavgm, fedadagrad, fedadam, fedyogi)",
        ),
        (
            'strategy = "geometric_median"\n',
            "",
            "[rounds] strategy",
        ),
    ],
    ids=["weighting", "max-updates", "krum-min-devices", "multi-krum-min-devices", "secure", "dp", "unknown"],
)
def test_a_robust_strategy_that_cannot_run_is_refused(
    tmp_path: Path, rounds: str, privacy: str, message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, rounds, privacy)
    if message == "[rounds] strategy":
        assert str(err.value).startswith(message) and "geometric_median" in str(err.value)
    else:
        assert str(err.value) == message
    assert "\n" not in str(err.value)


def test_the_refusal_texts_are_the_privacy_configs() -> None:
    assert robust_with_secure("median").startswith('[rounds] strategy = "median" needs every update')
    assert "[privacy] enabled" in robust_with_dp("krum")


def test_every_robust_strategy_is_refused_with_either_privacy_mode(tmp_path: Path) -> None:
    for name, privacy in itertools.product(
        ("median", "trimmed_mean", "krum", "multi_krum"), ("secure_aggregation", "enabled")
    ):
        with pytest.raises(ConfigError, match=f'^\\[rounds\\] strategy = "{name}"'):
            load(tmp_path, f'strategy = "{name}"\nmin_devices = 5\n', f"{privacy} = true\n")
