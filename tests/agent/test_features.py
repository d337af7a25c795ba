"""Feature extraction: readings to windowed statistics or raw windows, and one label per window.

Expected values come from closed forms on hand-built (arange) signals or from direct numpy
computations on each window, never from the module's own statistic table.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.agent.features import FeatureError, extract_features, window_count, window_labels
from fedge.protocol.errors import FedgeError
from fedge.protocol.task import WINDOW_STATISTICS, FeatureSpec, WindowSpec


def _spec(resources: tuple[str, ...], window: WindowSpec | None) -> FeatureSpec:
    return FeatureSpec(resources=resources, sample_rate_hz=None, window=window)


#: Direct, per-window reference implementations (1-D input).
REFERENCE: dict[str, Callable[[np.ndarray], float]] = {
    "mean": lambda x: float(np.sum(x) / x.size),
    "std": lambda x: float(np.sqrt(np.sum((x - np.sum(x) / x.size) ** 2) / x.size)),
    "min": lambda x: float(np.min(x)),
    "max": lambda x: float(np.max(x)),
    "median": lambda x: float(np.median(x)),
    "rms": lambda x: float(np.sqrt(np.sum(x * x) / x.size)),
    "range": lambda x: float(np.max(x) - np.min(x)),
    "p10": lambda x: float(np.percentile(x, 10)),
    "p25": lambda x: float(np.percentile(x, 25)),
    "p75": lambda x: float(np.percentile(x, 75)),
    "p90": lambda x: float(np.percentile(x, 90)),
    "mad": lambda x: float(np.mean(np.abs(x - x.mean()))),
}


def _arange_stats(start: float, n: int) -> dict[str, float]:
    """Closed-form statistics of the consecutive integers ``start .. start + n - 1``."""
    mean = start + (n - 1) / 2
    var = (n * n - 1) / 12
    mad = n / 4 if n % 2 == 0 else (n * n - 1) / (4 * n)
    return {
        "mean": mean,
        "std": math.sqrt(var),
        "min": start,
        "max": start + n - 1,
        "median": mean,
        "rms": math.sqrt(var + mean * mean),
        "range": n - 1,
        # numpy's default (linear) percentile of evenly spaced values
        "p10": start + 0.10 * (n - 1),
        "p25": start + 0.25 * (n - 1),
        "p75": start + 0.75 * (n - 1),
        "p90": start + 0.90 * (n - 1),
        "mad": mad,
    }


# --- window_count ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "size", "step", "expected"),
    [
        (0, 10, 5, 0),
        (9, 10, 5, 0),
        (10, 10, 5, 1),
        (14, 10, 5, 1),
        (15, 10, 5, 2),
        (27, 10, 4, 5),
        (100, 100, 50, 1),
        (150, 100, 50, 2),
        (5, 1, 1, 5),
        (10, 3, 10, 1),  # step larger than the window: gaps between windows
        (13, 3, 10, 2),
    ],
)
def test_window_count(n: int, size: int, step: int, expected: int) -> None:
    assert window_count(n, WindowSpec(size, step, ("mean",))) == expected


# --- extract_features -----------------------------------------------------------------------


def test_without_window_each_row_is_a_sample_as_float32() -> None:
    readings = np.array([[1, 2], [3, 4], [5, 6]], dtype=np.int64)
    out = extract_features(readings, _spec(("a", "b"), None))
    assert out.dtype == np.float32
    assert out.shape == (3, 2)
    np.testing.assert_array_equal(out, readings.astype(np.float32))


def test_without_window_accepts_nested_lists_and_empty_input() -> None:
    spec = _spec(("a",), None)
    out = extract_features([[0.5], [1.5]], spec)  # type: ignore[arg-type]
    np.testing.assert_array_equal(out, np.array([[0.5], [1.5]], np.float32))
    assert extract_features(np.empty((0, 1)), spec).shape == (0, 1)


def test_every_statistic_matches_closed_forms_on_arange_signals() -> None:
    """Two channels (t and 3t + 100), all statistics, size 10 step 4: resource-major output."""
    size, step, n = 10, 4, 27
    window = WindowSpec(size, step, WINDOW_STATISTICS)
    spec = _spec(("ramp", "steep"), window)
    t = np.arange(n, dtype=np.float64)
    readings = np.stack([t, 3 * t + 100], axis=1)

    out = extract_features(readings, spec)

    assert out.dtype == np.float32
    assert out.shape == (5, 2 * len(WINDOW_STATISTICS)) == (window_count(n, window), spec.input_dim)
    for k in range(out.shape[0]):
        ramp = _arange_stats(k * step, size)
        expected: dict[str, float] = {f"ramp.{s}": v for s, v in ramp.items()}
        for s, v in ramp.items():
            # 3t + 100: location statistics map affinely, spread statistics scale by 3.
            if s in ("std", "range", "mad"):
                expected[f"steep.{s}"] = 3 * v
            elif s == "rms":
                expected[f"steep.{s}"] = math.sqrt(9 * ramp["std"] ** 2 + (3 * ramp["mean"] + 100) ** 2)
            else:
                expected[f"steep.{s}"] = 3 * v + 100
        row = [expected[name] for name in spec.names]
        np.testing.assert_allclose(out[k], np.array(row, np.float32), rtol=1e-6, err_msg=f"window {k}")


def test_column_order_follows_feature_names() -> None:
    """Each column is the named statistic of the named resource (resource-major)."""
    window = WindowSpec(4, 4, ("max", "min", "mean"))
    spec = _spec(("x", "y", "z"), window)
    readings = np.array([[1, 10, 100], [2, 20, 200], [3, 30, 300], [4, 40, 400]], dtype=float)

    out = extract_features(readings, spec)

    assert spec.names == ("x.max", "x.min", "x.mean", "y.max", "y.min", "y.mean", "z.max", "z.min", "z.mean")
    np.testing.assert_array_equal(out, np.array([[4, 1, 2.5, 40, 10, 25, 400, 100, 250]], np.float32))


def test_every_statistic_matches_numpy_on_random_readings() -> None:
    rng = np.random.default_rng(7)
    window = WindowSpec(25, 10, WINDOW_STATISTICS)
    spec = _spec(("a", "b", "c"), window)
    readings = rng.normal(size=(93, 3)) * [1.0, 10.0, 0.1] + [0.0, -50.0, 3.0]

    out = extract_features(readings, spec)

    assert out.shape == (window_count(93, window), 36) == (7, 36)
    for k in range(out.shape[0]):
        chunk = readings[k * 10 : k * 10 + 25]
        expected = [REFERENCE[s](chunk[:, c]) for c in range(3) for s in WINDOW_STATISTICS]
        np.testing.assert_allclose(out[k], np.array(expected, np.float32), rtol=1e-5, atol=1e-6)


def test_readings_after_the_last_complete_window_are_ignored() -> None:
    spec = _spec(("a",), WindowSpec(10, 5, ("mean", "max")))
    rng = np.random.default_rng(3)
    base = rng.normal(size=(24, 1))  # windows at 0 and 5 and 10; readings 20..23 are left over
    changed = base.copy()
    changed[20:] = 1e6

    a, b = extract_features(base, spec), extract_features(changed, spec)

    assert a.shape == (3, 2)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, extract_features(base[:20], spec))


@pytest.mark.parametrize("n", [0, 1, 9])
def test_too_short_input_gives_no_samples(n: int) -> None:
    spec = _spec(("a", "b"), WindowSpec(10, 5, ("mean", "std", "p90")))
    out = extract_features(np.zeros((n, 2)), spec)
    assert out.shape == (0, 6)
    assert out.dtype == np.float32


@pytest.mark.parametrize(
    ("readings", "shape"),
    [
        (np.zeros(5), "(5,)"),
        (np.zeros((5, 3)), "(5, 3)"),
        (np.zeros((5, 1)), "(5, 1)"),
        (np.zeros((2, 2, 2)), "(2, 2, 2)"),
        (np.float64(1.0), "()"),
    ],
    ids=["1-d", "too many columns", "too few columns", "3-d", "scalar"],
)
@pytest.mark.parametrize("windowed", [False, True], ids=["rows", "windows"])
def test_wrong_shape_is_a_feature_error(readings: np.ndarray, shape: str, windowed: bool) -> None:
    spec = _spec(("a", "b"), WindowSpec(2, 1, ("mean",)) if windowed else None)
    with pytest.raises(FeatureError) as exc:
        extract_features(readings, spec)
    assert str(exc.value) == f"readings must have shape (n, 2), got {shape}"
    assert isinstance(exc.value, FedgeError)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("windowed", [False, True], ids=["rows", "windows"])
def test_non_finite_readings_are_a_feature_error(bad: float, windowed: bool) -> None:
    spec = _spec(("a", "b"), WindowSpec(2, 1, ("mean",)) if windowed else None)
    readings = np.ones((4, 2))
    readings[2, 1] = bad
    with pytest.raises(FeatureError) as exc:
        extract_features(readings, spec)
    assert str(exc.value) == "readings contain NaN or infinity"


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(0, 60),
    size=st.integers(1, 15),
    step=st.integers(1, 15),
    channels=st.integers(1, 3),
    stats=st.lists(st.sampled_from(WINDOW_STATISTICS), min_size=1, max_size=5, unique=True),
    seed=st.integers(0, 2**32 - 1),
)
def test_windows_are_the_statistics_of_their_readings(
    n: int, size: int, step: int, channels: int, stats: list[str], seed: int
) -> None:
    window = WindowSpec(size, step, tuple(stats))
    spec = _spec(tuple(f"r{c}" for c in range(channels)), window)
    readings = np.random.default_rng(seed).uniform(-100, 100, size=(n, channels))

    out = extract_features(readings, spec)

    assert out.shape == (window_count(n, window), spec.input_dim)
    assert out.shape[0] == max(0, (n - size) // step + 1)
    for k in range(out.shape[0]):
        chunk = readings[k * step : k * step + size]
        assert chunk.shape[0] == size
        expected = [REFERENCE[s](chunk[:, c]) for c in range(channels) for s in stats]
        np.testing.assert_allclose(out[k], np.array(expected, np.float32), rtol=1e-5, atol=1e-4)


# --- window_labels --------------------------------------------------------------------------


def test_labels_without_window_are_cast_per_kind() -> None:
    cls = window_labels(np.array([0, 2, 1]), None, "classification")
    reg = window_labels(np.array([0.5, 1.5]), None, "regression")
    assert cls.dtype == np.int32
    np.testing.assert_array_equal(cls, [0, 2, 1])
    assert reg.dtype == np.float32
    np.testing.assert_array_equal(reg, np.array([0.5, 1.5], np.float32))


def test_majority_label_per_window() -> None:
    window = WindowSpec(4, 2, ("mean",))
    labels = np.array([1, 1, 1, 0, 2, 2, 2, 2, 0])  # windows [0:4], [2:6], [4:8]; label 8 left over
    out = window_labels(labels, window, "classification")
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, [1, 2, 2])


def test_majority_tie_goes_to_the_smallest_class_index() -> None:
    window = WindowSpec(4, 4, ("mean",))
    labels = np.array([3, 3, 1, 1, 5, 2, 5, 2, 6, 0, 0, 6])
    np.testing.assert_array_equal(window_labels(labels, window, "classification"), [1, 2, 0])


def test_regression_label_is_the_window_mean() -> None:
    window = WindowSpec(3, 2, ("mean",))
    labels = np.array([1.0, 2.0, 6.0, 4.0, 5.0, 100.0])  # windows [0:3], [2:5]; the last is left over
    out = window_labels(labels, window, "regression")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [3.0, 5.0], rtol=1e-7)


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_too_few_labels_give_no_samples(kind: str) -> None:
    out = window_labels(np.array([1, 1]), WindowSpec(3, 1, ("mean",)), kind)  # type: ignore[arg-type]
    assert out.shape == (0,)
    assert out.dtype == (np.int32 if kind == "classification" else np.float32)


def test_labels_align_with_feature_windows() -> None:
    window = WindowSpec(5, 3, ("mean",))
    n = 20
    readings = np.arange(n, dtype=float).reshape(-1, 1)
    labels = np.repeat([0, 1], n // 2)
    feats = extract_features(readings, _spec(("a",), window))
    labs = window_labels(labels, window, "classification")
    assert feats.shape[0] == labs.shape[0] == window_count(n, window) == 6
    # window k covers readings 3k..3k+4; its label is 1 once most of them are >= 10
    np.testing.assert_array_equal(labs, [0, 0, 0, 1, 1, 1])
    np.testing.assert_allclose(feats[:, 0], [3 * k + 2 for k in range(6)])


@pytest.mark.parametrize("window", [None, WindowSpec(2, 1, ("mean",))], ids=["rows", "windows"])
def test_labels_must_be_one_dimensional(window: WindowSpec | None) -> None:
    with pytest.raises(FeatureError) as exc:
        window_labels(np.zeros((3, 2)), window, "classification")
    assert str(exc.value) == "labels must be one-dimensional, got shape (3, 2)"


@pytest.mark.parametrize("window", [WindowSpec(2, 2, ("mean",)), None], ids=["windowed", "unwindowed"])
def test_negative_class_index_is_a_feature_error(window: WindowSpec | None) -> None:
    with pytest.raises(FeatureError) as exc:
        window_labels(np.array([0, -1, 2, 2]), window, "classification")
    assert str(exc.value) == "class indices must be >= 0"


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), max_size=40),
    size=st.integers(1, 10),
    step=st.integers(1, 10),
)
def test_majority_labels_match_a_direct_count(labels: list[int], size: int, step: int) -> None:
    window = WindowSpec(size, step, ("mean",))
    out = window_labels(np.array(labels, dtype=np.int64), window, "classification")
    assert out.shape == (window_count(len(labels), window),)
    for k, got in enumerate(out):
        chunk = labels[k * step : k * step + size]
        best = max(chunk.count(c) for c in set(chunk))
        assert got == min(c for c in set(chunk) if chunk.count(c) == best)


# --- raw windows (statistics = ["raw"]) -----------------------------------------------------


def test_raw_windows_are_the_readings_channel_major() -> None:
    """docs/task-spec.md's example: x[c * size + t] is reading t (oldest first) of resource c."""
    window = WindowSpec(3, 2, ("raw",))
    spec = _spec(("a", "b"), window)
    readings = np.array([[1, 10], [2, 20], [3, 30], [4, 40], [5, 50], [6, 60]], dtype=np.float64)

    out = extract_features(readings, spec)

    assert spec.names == ("a[0]", "a[1]", "a[2]", "b[0]", "b[1]", "b[2]")
    assert spec.raw_shape == (2, 3) and spec.input_dim == 6
    assert out.dtype == np.float32 and out.flags.c_contiguous
    assert out.tolist() == [[1, 2, 3, 10, 20, 30], [3, 4, 5, 30, 40, 50]]
    # The reshape docs/task-spec.md promises gives the windows back as channels x length.
    assert out.reshape(-1, 2, 3)[1].tolist() == [[3, 4, 5], [30, 40, 50]]
    # Row 6 (index 5) starts no complete window: it is left over, for the caller's next call.
    assert np.array_equal(out, extract_features(readings[:5], spec))


def test_raw_windows_are_the_readings_rounded_once_to_float32() -> None:
    """Nothing but a cast: a float64 reading becomes the float32 nearest to it, as a Float32
    EdgeX reading of the same value would be."""
    spec = _spec(("a",), WindowSpec(4, 4, ("raw",)))
    values = [0.1, 16_777_217.0, -1e-40, 3.4e38]
    out = extract_features(np.array(values).reshape(-1, 1), spec)
    assert out.tobytes() == np.array(values, np.float64).astype(np.float32).tobytes()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_reading_in_a_raw_window_is_a_feature_error(bad: float) -> None:
    spec = _spec(("a", "b"), WindowSpec(2, 1, ("raw",)))
    readings = np.ones((4, 2))
    readings[1, 0] = bad
    with pytest.raises(FeatureError) as exc:
        extract_features(readings, spec)
    assert str(exc.value) == "readings contain NaN or infinity"


def test_too_short_input_gives_no_raw_windows() -> None:
    spec = _spec(("a", "b", "c"), WindowSpec(100, 50, ("raw",)))
    out = extract_features(np.zeros((99, 3)), spec)
    assert out.shape == (0, 300) and out.dtype == np.float32


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(0, 60),
    size=st.integers(1, 15),
    step=st.integers(1, 15),
    channels=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_raw_windows_are_their_readings_bit_for_bit(
    n: int, size: int, step: int, channels: int, seed: int
) -> None:
    window = WindowSpec(size, step, ("raw",))
    spec = _spec(tuple(f"r{c}" for c in range(channels)), window)
    readings = np.random.default_rng(seed).uniform(-100, 100, size=(n, channels))

    out = extract_features(readings, spec)

    assert out.shape == (window_count(n, window), channels * size)
    for k in range(out.shape[0]):
        chunk = readings[k * step : k * step + size]  # (size, channels)
        expected = [chunk[t, c] for c in range(channels) for t in range(size)]
        assert out[k].tobytes() == np.array(expected, np.float32).tobytes()
        for name, value in zip(spec.names, out[k], strict=True):  # "r{c}[{t}]" names its reading
            c, t = int(name[1 : name.index("[")]), int(name[name.index("[") + 1 : -1])
            assert value == np.float32(chunk[t, c])


def test_raw_window_labels_are_those_of_statistics_windows() -> None:
    """The label does not depend on what the features are: majority class per window."""
    labels = np.array([0, 0, 1, 1, 1, 2, 2])
    raw = window_labels(labels, WindowSpec(3, 2, ("raw",)), "classification")
    stats = window_labels(labels, WindowSpec(3, 2, ("mean",)), "classification")
    assert raw.tolist() == stats.tolist() == [0, 1, 2]
