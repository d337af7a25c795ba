"""Streaming FedAvg, weighted metric means and federated feature moments.

The accumulators take input from untrusted devices: every bad update must be a precise
:class:`AggregationError` that leaves the accumulator exactly as if it had never been offered.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tracemalloc
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.aggregator.fedavg import AggregationError, StreamingFedAvg, WeightedMeanAccumulator
from fedge.aggregator.moments import MomentsAccumulator
from fedge.protocol.errors import FedgeError
from fedge.protocol.model_manifest import normalisation_from_moments

P = 257
MAX_EXAMPLES = 10_000


def exactly(message: str) -> str:
    """A ``match=`` pattern for exactly this message."""
    return f"^{re.escape(message)}$"


def updates(n: int, seed: int = 0, p: int = P) -> tuple[np.ndarray, list[np.ndarray], list[int]]:
    """A global model and ``n`` devices' local models with their example counts."""
    rng = np.random.default_rng(seed)
    global_w = rng.normal(0, 1, p).astype(np.float32)
    local = [(global_w + rng.normal(0, 0.1, p)).astype(np.float32) for _ in range(n)]
    examples = [int(e) for e in rng.integers(1, MAX_EXAMPLES + 1, n)]
    return global_w, local, examples


def fill(acc: StreamingFedAvg, global_w: np.ndarray, local: list[np.ndarray], examples: list[int]) -> None:
    for w, n in zip(local, examples, strict=True):
        acc.add(w - global_w, n)


def state(acc: StreamingFedAvg) -> tuple[int, int, bytes]:
    return acc.count, acc.total_examples, acc.mean_delta().tobytes() if acc.count else b""


# --- FedAvg against numpy -------------------------------------------------------------------


@pytest.mark.parametrize("server_lr", [1.0, 0.5, 1.7])
def test_fedavg_equals_numpy_weighted_mean(server_lr: float) -> None:
    global_w, local, examples = updates(12)
    acc = StreamingFedAvg(P, MAX_EXAMPLES)
    fill(acc, global_w, local, examples)
    deltas = np.stack([w - global_w for w in local]).astype(np.float64)
    expected_mean = np.average(deltas, axis=0, weights=examples)
    np.testing.assert_allclose(acc.mean_delta(), expected_mean, rtol=1e-12, atol=1e-15)
    expected = (global_w.astype(np.float64) + server_lr * expected_mean).astype(np.float32)
    out = acc.result(global_w, server_lr)
    assert out.dtype == np.float32 and out.shape == (P,)
    np.testing.assert_array_max_ulp(out, expected, maxulp=1)
    assert acc.count == 12 and acc.total_examples == sum(examples)


def test_server_lr_one_is_the_weighted_mean_of_local_models() -> None:
    global_w, local, examples = updates(7, seed=3)
    acc = StreamingFedAvg(P, MAX_EXAMPLES)
    fill(acc, global_w, local, examples)
    expected = np.average(np.stack(local).astype(np.float64), axis=0, weights=examples)
    # Only the float32 subtraction local - global separates the two formulations.
    np.testing.assert_allclose(acc.result(global_w, 1.0), expected, rtol=0, atol=1e-6)


def test_single_update_with_server_lr_one_reproduces_the_local_model() -> None:
    global_w, local, examples = updates(1, seed=4)
    acc = StreamingFedAvg(P, MAX_EXAMPLES)
    fill(acc, global_w, local, examples)
    np.testing.assert_allclose(acc.result(global_w, 1.0), local[0], rtol=0, atol=1e-6)


def test_result_can_be_read_repeatedly_and_does_not_alias_state() -> None:
    global_w, local, examples = updates(3)
    acc = StreamingFedAvg(P, MAX_EXAMPLES)
    fill(acc, global_w, local, examples)
    first = acc.result(global_w, 1.0)
    acc.mean_delta()[:] = 1e9  # a caller scribbling on the returned array
    assert acc.result(global_w, 1.0).tobytes() == first.tobytes()


# --- order independence ---------------------------------------------------------------------


def test_order_of_arrival_does_not_matter() -> None:
    global_w, local, examples = updates(200, seed=1)
    forward = StreamingFedAvg(P, MAX_EXAMPLES)
    fill(forward, global_w, local, examples)
    order = np.random.default_rng(9).permutation(200)
    shuffled = StreamingFedAvg(P, MAX_EXAMPLES)
    fill(shuffled, global_w, [local[i] for i in order], [examples[i] for i in order])
    a, b = forward.result(global_w, 1.0), shuffled.result(global_w, 1.0)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)
    np.testing.assert_array_max_ulp(a, b, maxulp=1)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 25),
    p=st.integers(1, 16),
    scale=st.sampled_from([1e-6, 1e-2, 1.0, 1e3]),
    server_lr=st.floats(0.05, 2.0),
)
def test_order_independence_property(
    data: st.DataObject, n: int, p: int, scale: float, server_lr: float
) -> None:
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    global_w = rng.normal(0, 1, p).astype(np.float32)
    deltas = [(rng.normal(0, scale, p)).astype(np.float32) for _ in range(n)]
    examples = data.draw(st.lists(st.integers(1, MAX_EXAMPLES), min_size=n, max_size=n), label="examples")
    order = data.draw(st.permutations(range(n)), label="order")
    a, b = StreamingFedAvg(p, MAX_EXAMPLES), StreamingFedAvg(p, MAX_EXAMPLES)
    for d, e in zip(deltas, examples, strict=True):
        a.add(d, e)
    for i in order:
        b.add(deltas[i], examples[i])
    # float64 sums of exact products: differences are rounding noise of n * 1e-16 relative to
    # the largest delta, and at most one float32 rounding step in the published model.
    bound = 1e-13 * max(float(np.max(np.abs(d))) for d in deltas)
    np.testing.assert_allclose(a.mean_delta(), b.mean_delta(), rtol=0, atol=bound)
    np.testing.assert_array_max_ulp(a.result(global_w, server_lr), b.result(global_w, server_lr), maxulp=1)


# --- rejected updates change nothing --------------------------------------------------------


def _with_nan() -> np.ndarray:
    d = np.zeros(P, np.float32)
    d[17] = np.nan
    return d


def _with_inf() -> np.ndarray:
    d = np.zeros(P, np.float32)
    d[-1] = -np.inf
    return d


EXAMPLES_RANGE = f"examples must be an integer in 1..{MAX_EXAMPLES}, got"
BAD_ADDS: list[tuple[str, Any, Any, str]] = [
    ("nan", _with_nan(), 10, "delta contains NaN or infinity"),
    ("inf", _with_inf(), 10, "delta contains NaN or infinity"),
    ("short", np.zeros(P - 1, np.float32), 10, f"delta must have shape ({P},), got ({P - 1},)"),
    ("long", np.zeros(P + 1, np.float32), 10, f"delta must have shape ({P},), got ({P + 1},)"),
    ("2-D", np.zeros((1, P), np.float32), 10, f"delta must have shape ({P},), got (1, {P})"),
    ("float64", np.zeros(P, np.float64), 10, "delta must be float32, got float64"),
    ("float16", np.zeros(P, np.float16), 10, "delta must be float32, got float16"),
    ("big-endian", np.zeros(P, ">f4"), 10, "delta must be float32, got >f4"),
    ("list", [0.0] * P, 10, "delta must be a numpy array, got list"),
    ("examples 0", np.zeros(P, np.float32), 0, f"{EXAMPLES_RANGE} 0"),
    ("examples -1", np.zeros(P, np.float32), -1, f"{EXAMPLES_RANGE} -1"),
    ("examples > max", np.zeros(P, np.float32), MAX_EXAMPLES + 1, f"{EXAMPLES_RANGE} {MAX_EXAMPLES + 1}"),
    ("examples float", np.zeros(P, np.float32), 5.0, f"{EXAMPLES_RANGE} 5.0"),
    ("examples bool", np.zeros(P, np.float32), True, f"{EXAMPLES_RANGE} True"),
]


@pytest.mark.parametrize(
    ("delta", "examples", "message"), [b[1:] for b in BAD_ADDS], ids=[b[0] for b in BAD_ADDS]
)
def test_rejected_add_leaves_the_accumulator_unchanged(delta: Any, examples: Any, message: str) -> None:
    global_w, local, counts = updates(6, seed=2)
    clean = StreamingFedAvg(P, MAX_EXAMPLES)
    fill(clean, global_w, local, counts)
    dirty = StreamingFedAvg(P, MAX_EXAMPLES)
    for w, n in zip(local, counts, strict=True):  # rejected before the first add, between, after
        before = state(dirty)
        with pytest.raises(AggregationError, match=exactly(message)):
            dirty.add(delta, examples)
        assert state(dirty) == before
        dirty.add(w - global_w, n)
    with pytest.raises(AggregationError, match=exactly(message)):
        dirty.add(delta, examples)
    assert state(dirty) == state(clean)
    assert dirty.result(global_w, 0.7).tobytes() == clean.result(global_w, 0.7).tobytes()


def test_rejected_first_add_leaves_nothing_to_average() -> None:
    acc = StreamingFedAvg(P, MAX_EXAMPLES)
    with pytest.raises(AggregationError):
        acc.add(_with_nan(), 5)
    assert (acc.count, acc.total_examples) == (0, 0)
    with pytest.raises(AggregationError, match=exactly("no updates were added; there is nothing to average")):
        acc.result(np.zeros(P, np.float32), 1.0)
    with pytest.raises(AggregationError, match=exactly("no updates were added; there is nothing to average")):
        acc.mean_delta()


def test_numpy_integer_example_counts_are_accepted() -> None:
    acc = StreamingFedAvg(P, MAX_EXAMPLES)
    acc.add(np.ones(P, np.float32), np.int64(MAX_EXAMPLES))
    assert acc.total_examples == MAX_EXAMPLES and isinstance(acc.total_examples, int)


def test_non_contiguous_and_read_only_deltas_are_accepted_and_not_modified() -> None:
    base = np.arange(2 * P, dtype=np.float32) / P
    delta = base[::2]
    delta.flags.writeable = False
    acc = StreamingFedAvg(P, MAX_EXAMPLES)
    acc.add(delta, 3)
    np.testing.assert_array_equal(acc.mean_delta(), delta.astype(np.float64))
    np.testing.assert_array_equal(base, np.arange(2 * P, dtype=np.float32) / P)


@pytest.mark.parametrize(
    ("global_w", "lr", "message"),
    [
        (np.zeros(P, np.float64), 1.0, "global_weights must be float32, got float64"),
        (np.zeros(P + 1, np.float32), 1.0, f"global_weights must have shape ({P},), got ({P + 1},)"),
        (np.full(P, np.nan, np.float32), 1.0, "global_weights contains NaN or infinity"),
        (np.zeros(P, np.float32), 0.0, "server_learning_rate must be > 0, got 0.0"),
        (np.zeros(P, np.float32), -1.0, "server_learning_rate must be > 0, got -1.0"),
        (np.zeros(P, np.float32), float("nan"), "server_learning_rate must be finite, got nan"),
        (np.zeros(P, np.float32), "1", "server_learning_rate must be a real number, got str"),
        (np.zeros(P, np.float32), 10**400, f"server_learning_rate must be finite, got {10**400!r}"),
    ],
)
def test_result_rejects_bad_arguments(global_w: np.ndarray, lr: Any, message: str) -> None:
    acc = StreamingFedAvg(P, MAX_EXAMPLES)
    acc.add(np.ones(P, np.float32), 2)
    with pytest.raises(AggregationError, match=exactly(message)):
        acc.result(global_w, lr)
    assert state(acc) == (1, 2, np.ones(P).tobytes())


def test_result_overflowing_float32_is_an_error() -> None:
    big = np.full(4, 3e38, np.float32)
    acc = StreamingFedAvg(4, 10)
    acc.add(big, 10)
    with pytest.raises(AggregationError, match=exactly("the aggregated weights overflow float32")):
        acc.result(big, 1.0)
    # No overflow in the float64 accumulator itself.
    np.testing.assert_array_equal(acc.mean_delta(), big.astype(np.float64))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 10), "parameter_count must be an integer >= 1, got 0"),
        ((10, 0), "max_examples_per_update must be an integer >= 1, got 0"),
        ((True, 10), "parameter_count must be an integer >= 1, got True"),
        ((10, 2.5), "max_examples_per_update must be an integer >= 1, got 2.5"),
    ],
)
def test_constructor_validation(args: tuple[Any, Any], message: str) -> None:
    with pytest.raises(AggregationError, match=exactly(message)):
        StreamingFedAvg(*args)


def test_aggregation_error_is_a_fedge_error() -> None:
    assert issubclass(AggregationError, FedgeError)


# --- memory stays flat ----------------------------------------------------------------------


def _array_bytes(obj: object) -> int:
    return sum(v.nbytes for v in vars(obj).values() if isinstance(v, np.ndarray))


def test_memory_does_not_grow_with_the_number_of_updates() -> None:
    p = 100_000
    acc = StreamingFedAvg(p, MAX_EXAMPLES)
    delta = np.random.default_rng(0).normal(0, 1, p).astype(np.float32)
    held = _array_bytes(acc)
    assert held == 2 * 8 * p  # the float64 sum and its scratch buffer: O(P)
    acc.add(delta, 1)
    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        for i in range(1000):
            acc.add(delta, 1 + i % 100)
        end, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert _array_bytes(acc) == held
    assert set(vars(acc)) == {
        "parameter_count",
        "max_examples_per_update",
        "_sum",
        "_scratch",
        "_count",
        "_total_examples",
        "_total_weight",
    }
    # add() allocates no arrays: the traced heap neither grows nor spikes by a model's size.
    assert end - start < 4096
    # Transient: only the finiteness check's boolean mask (p bytes), never a float64 copy (8p).
    assert peak - start < 4 * p
    assert acc.count == 1001


# --- weighted mean of metrics ---------------------------------------------------------------


def test_weighted_mean_equals_numpy_average() -> None:
    rng = np.random.default_rng(5)
    values = rng.uniform(0, 3, 50)
    weights = rng.integers(1, 1000, 50)
    acc = WeightedMeanAccumulator()
    for v, w in zip(values, weights, strict=True):
        acc.add(float(v), int(w))
    assert acc.mean == pytest.approx(np.average(values, weights=weights), rel=1e-12)
    assert acc.count == 50 and acc.total_weight == float(weights.sum())


@pytest.mark.parametrize(
    ("value", "weight", "message"),
    [
        (float("nan"), 1, "value must be finite, got nan"),
        (1.0, float("inf"), "weight must be finite, got inf"),
        (1.0, 0, "weight must be > 0, got 0.0"),
        (1.0, -3, "weight must be > 0, got -3.0"),
        (True, 1, "value must be a real number, got bool"),
        ("0.5", 1, "value must be a real number, got str"),
        (1e308, 1e10, "the weighted sum overflows"),
    ],
)
def test_weighted_mean_rejects_bad_values(value: Any, weight: Any, message: str) -> None:
    acc = WeightedMeanAccumulator()
    acc.add(0.25, 4)
    with pytest.raises(AggregationError, match=exactly(message)):
        acc.add(value, weight)
    assert (acc.mean, acc.count, acc.total_weight) == (0.25, 1, 4.0)


def test_weighted_mean_of_nothing_is_an_error() -> None:
    with pytest.raises(AggregationError, match=exactly("no values were added; there is no mean")):
        _ = WeightedMeanAccumulator().mean


# --- federated feature moments --------------------------------------------------------------


def device_moments(x: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    return x.shape[0], x.sum(axis=0), (x * x).sum(axis=0)


def test_moments_equal_numpy_over_the_pooled_data() -> None:
    rng = np.random.default_rng(11)
    n_features = 6
    # Devices differ in size and in distribution (offset and spread), as buildings do.
    parts = [
        rng.normal(rng.uniform(-50, 50, n_features), rng.uniform(0.1, 10, n_features), (size, n_features))
        for size in (1, 3, 40, 500, 77)
    ]
    acc = MomentsAccumulator(n_features)
    for part in parts:
        acc.add(*device_moments(part))
    pooled = np.concatenate(parts)
    norm = acc.normalisation()
    np.testing.assert_allclose(norm.mean, pooled.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(norm.std, pooled.std(axis=0), rtol=1e-9)
    assert acc.count == pooled.shape[0] and acc.updates == len(parts)
    n, total, total_sq = device_moments(pooled)
    central = normalisation_from_moments(n, total.tolist(), total_sq.tolist())
    np.testing.assert_allclose(norm.std, central.std, rtol=1e-12)


def test_moments_accept_lists_and_integer_arrays() -> None:
    acc = MomentsAccumulator(2)
    acc.add(2, [1, 4], [1.0, 10.0])  # samples (0, 1) and (1, 3)
    acc.add(np.int32(1), np.array([2, 2]), np.array([4, 4]))
    norm = acc.normalisation()
    pooled = np.array([[0, 1], [1, 3], [2, 2]], np.float64)
    np.testing.assert_allclose(norm.mean, pooled.mean(axis=0), rtol=1e-15)
    np.testing.assert_allclose(norm.std, pooled.std(axis=0), rtol=1e-15)


def test_constant_feature_is_possible_and_gets_min_std() -> None:
    acc = MomentsAccumulator(1)
    x = np.full((5, 1), 21.5)
    acc.add(*device_moments(x))
    acc.add(*device_moments(np.full((3, 1), 21.5, np.float32).astype(np.float64)))
    norm = acc.normalisation(min_std=1e-3)
    assert norm.mean == (21.5,) and norm.std == (1e-3,)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=6),
    offset=st.sampled_from([0.0, 1.0, -300.0, 1e5]),
    spread=st.sampled_from([0.0, 1e-3, 1.0, 100.0]),
)
def test_honest_moments_are_never_rejected(
    data: st.DataObject, sizes: list[int], offset: float, spread: float
) -> None:
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    acc = MomentsAccumulator(3)
    for size in sizes:
        x = (offset + spread * rng.normal(0, 1, (size, 3))).astype(np.float32).astype(np.float64)
        acc.add(*device_moments(x))
    assert acc.count == sum(sizes)


IMPOSSIBLE: list[tuple[str, tuple[Any, Any, Any], str]] = [
    (
        "cauchy-schwarz",
        (2, [10.0, 0.0], [1.0, 0.0]),
        "moments: feature 0 is impossible: sum**2 (100) exceeds count * sum_sq (2), i.e. a negative variance",
    ),
    (
        "sum without squares",
        (1, [0.0, 1e-3], [0.0, 0.0]),
        "moments: feature 1 is impossible: sum**2 (1e-06) exceeds count * sum_sq (0), "
        "i.e. a negative variance",
    ),
    ("negative squares", (3, [0.0, 0.0], [1.0, -1.0]), "moments: sums_sq[1] is negative"),
    ("count 0", (0, [0.0, 0.0], [0.0, 0.0]), "moments: count must be an integer >= 1, got 0"),
    ("count bool", (True, [0.0, 0.0], [0.0, 0.0]), "moments: count must be an integer >= 1, got True"),
    ("count float", (2.0, [0.0, 0.0], [0.0, 0.0]), "moments: count must be an integer >= 1, got 2.0"),
    ("nan sum", (2, [float("nan"), 0.0], [1.0, 1.0]), "moments: sums contains NaN or infinity"),
    ("inf squares", (2, [0.0, 0.0], [1.0, float("inf")]), "moments: sums_sq contains NaN or infinity"),
    ("short", (2, [0.0], [1.0, 1.0]), "moments: sums must have shape (2,), got (1,)"),
    ("long squares", (2, [0.0, 0.0], [1.0, 1.0, 1.0]), "moments: sums_sq must have shape (2,), got (3,)"),
    ("2-D", (2, [[0.0, 0.0]], [1.0, 1.0]), "moments: sums must have shape (2,), got (1, 2)"),
    ("strings", (2, ["0", "1"], [1.0, 1.0]), "moments: sums must be real numbers, got dtype <U1"),
    ("bools", (2, [True, False], [1.0, 1.0]), "moments: sums must be real numbers, got dtype bool"),
    ("ragged", (2, [[0.0], [0.0, 1.0]], [1.0, 1.0]), "moments: sums must be a flat list of numbers"),
    ("overflow", (2, [0.0, 0.0], [1e308, 1e308]), "moments: the totals overflow"),
]


@pytest.mark.parametrize(("args", "message"), [i[1:] for i in IMPOSSIBLE], ids=[i[0] for i in IMPOSSIBLE])
def test_impossible_moments_are_rejected_and_change_nothing(args: tuple[Any, Any, Any], message: str) -> None:
    acc = MomentsAccumulator(2)
    acc.add(4, [2.0, 1.0], [2.0, 1e308])
    before = (acc.count, acc.updates, acc.normalisation())
    with pytest.raises(AggregationError, match=exactly(message)):
        acc.add(*args)
    assert (acc.count, acc.updates, acc.normalisation()) == before


def test_moments_count_cap() -> None:
    acc = MomentsAccumulator(1, max_count_per_update=100)
    acc.add(100, [0.0], [1.0])
    message = "moments: count 101 is over the limit of 100 per update"
    with pytest.raises(AggregationError, match=exactly(message)):
        acc.add(101, [0.0], [1.0])
    assert acc.count == 100


def test_normalisation_needs_two_samples() -> None:
    acc = MomentsAccumulator(1)
    with pytest.raises(AggregationError, match=exactly("normalisation needs at least 2 samples, got 0")):
        acc.normalisation()
    acc.add(1, [3.0], [9.0])
    with pytest.raises(AggregationError, match=exactly("normalisation needs at least 2 samples, got 1")):
        acc.normalisation()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_features": 0}, "n_features must be an integer >= 1, got 0"),
        (
            {"n_features": 2, "max_count_per_update": 0},
            "max_count_per_update must be an integer >= 1 or None, got 0",
        ),
    ],
)
def test_moments_constructor_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(AggregationError, match=exactly(message)):
        MomentsAccumulator(**kwargs)


# --- no TensorFlow on this path -------------------------------------------------------------


def test_aggregation_modules_do_not_import_tensorflow() -> None:
    code = (
        "import sys, fedge.aggregator.fedavg, fedge.aggregator.moments, fedge.aggregator.checkpoint\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
