"""The sample builder: streaming equals batch feature extraction, and every data-quality policy.

No mocks: real Reading objects go in, and samples are checked against
:func:`fedge.agent.features.extract_features` and :func:`fedge.agent.features.window_labels` on the whole
recorded signal. Every bad input asserts the exact counters of its reason.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.agent.edgex.readings import Reading, parse_value
from fedge.agent.edgex.samples import (
    DEFAULT_REORDER_WINDOW_NS,
    READING_REASONS,
    ROW_REASONS,
    QualityReport,
    Sample,
    SampleBuilder,
    SampleError,
    bool_class_indices,
)
from fedge.agent.features import extract_features, window_count, window_labels
from fedge.protocol.errors import FedgeError
from fedge.protocol.task import WINDOW_STATISTICS, TaskSpec, task_spec_from_dict

DEVICE = "watch-1"
T0 = 1_700_000_000_000_000_000  # a realistic Unix-nanosecond origin
P = 20_000_000  # 50 Hz
CLASSES = ("walk", "run", "sit")


def make_task(
    resources: Sequence[str] = ("a", "b"),
    window: tuple[int, int, Sequence[str]] | None = None,
    kind: str = "classification",
    rate: float | None = 50.0,
    classes: Sequence[str] = CLASSES,
) -> TaskSpec:
    features: dict[str, Any] = {"resources": list(resources)}
    if rate is not None:
        features["sample_rate_hz"] = rate
    if window is not None:
        size, step, stats = window
        features["window"] = {"size": size, "step": step, "statistics": list(stats)}
    label: dict[str, Any] = {"resource": "label"}
    if kind == "classification":
        label["classes"] = list(classes)
    return task_spec_from_dict(
        {
            "task": {"name": "t"},
            "features": features,
            "label": label,
            "model": {"kind": kind, "hidden": [4]},
            "training": {"optimizer": "sgd", "learning_rate": 0.1, "batch_size": 4, "local_epochs": 1},
        }
    )


def reading(resource: str, value: Any, t: int, value_type: str = "Float64", device: str = DEVICE) -> Reading:
    return Reading(device, resource, "profile", value_type, value, t)


def row(task: TaskSpec, t: int, values: Sequence[Any], label: Any, device: str = DEVICE) -> list[Reading]:
    """One instant's readings, as EdgeX sends one command's event: features, then the label."""
    out = [reading(r, v, t, device=device) for r, v in zip(task.features.resources, values, strict=True)]
    if isinstance(label, str):
        out.append(reading(task.label.resource, label, t, "String", device))
    elif isinstance(label, int):
        out.append(reading(task.label.resource, label, t, "Int32", device))
    else:
        out.append(reading(task.label.resource, label, t, "Float64", device))
    return out


def stream(
    task: TaskSpec, x: np.ndarray, labels: Sequence[Any], t0: int = T0, period: int = P
) -> list[Reading]:
    out: list[Reading] = []
    for i in range(x.shape[0]):
        out += row(task, t0 + i * period, [float(v) for v in x[i]], labels[i])
    return out


def label_values(task: TaskSpec, y: np.ndarray) -> list[Any]:
    """Label readings' values: class names for classification, floats for regression."""
    if task.label.classes is not None:
        return [task.label.classes[int(i)] for i in y]
    return [float(v) for v in y]


def run(builder: SampleBuilder, chunks: Sequence[Sequence[Reading]]) -> list[Sample]:
    samples: list[Sample] = []
    for chunk in chunks:
        samples += builder.add(chunk)
    return samples + builder.flush()


def features_of(samples: Sequence[Sample], dim: int) -> np.ndarray:
    return np.stack([s.features for s in samples]) if samples else np.empty((0, dim), np.float32)


def counts(builder: SampleBuilder) -> dict[str, int]:
    """Non-zero counters only, so an assertion names exactly what happened."""
    return {k: v for k, v in builder.quality.to_dict().items() if v}


def check_invariants(q: QualityReport) -> None:
    d = q.to_dict()
    assert d["readings"] == d["accepted"] + sum(d[r] for r in READING_REASONS)


# --- streaming equals batch -------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_chunked_stream_equals_extract_features_on_the_whole_signal(data: st.DataObject) -> None:
    n_res = data.draw(st.integers(1, 3), label="resources")
    windowed = data.draw(st.booleans(), label="windowed")
    window = None
    if windowed:
        stats = data.draw(st.lists(st.sampled_from(WINDOW_STATISTICS), min_size=1, max_size=4, unique=True))
        window = (
            data.draw(st.integers(1, 12), label="size"),
            data.draw(st.integers(1, 15), label="step"),
            stats,
        )
    kind = data.draw(st.sampled_from(["classification", "regression"]), label="kind")
    task = make_task([f"r{i}" for i in range(n_res)], window, kind)
    n = data.draw(st.integers(0, 80), label="rows")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    x = rng.normal(size=(n, n_res)) * 10.0 ** rng.integers(-3, 4)
    y = rng.integers(0, len(CLASSES), n) if kind == "classification" else rng.normal(size=n)
    readings = stream(task, x, label_values(task, y))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(readings)), max_size=12), label="cuts"))
    bounds = [0, *cuts, len(readings)]
    chunks = [readings[a:b] for a, b in itertools.pairwise(bounds)]

    builder = SampleBuilder(task)
    samples = run(builder, chunks)

    expected = extract_features(x, task.features)
    expected_y = window_labels(y, task.features.window, task.model.kind)
    assert np.array_equal(features_of(samples, task.input_dim), expected)  # bit for bit
    assert all(s.features.dtype == np.float32 and s.features.shape == (task.input_dim,) for s in samples)
    assert [s.label for s in samples] == expected_y.tolist()
    size, step = (
        (1, 1) if task.features.window is None else (task.features.window.size, task.features.window.step)
    )
    assert [(s.start_ns, s.end_ns) for s in samples] == [
        (T0 + i * step * P, T0 + (i * step + size - 1) * P) for i in range(len(expected))
    ]
    assert counts(builder) == {
        k: v
        for k, v in {
            "readings": len(readings),
            "accepted": len(readings),
            "rows": n,
            "samples": len(expected),
        }.items()
        if v
    }


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1), size=st.integers(1, 10), step=st.integers(1, 10), n=st.integers(0, 150)
)
def test_shuffled_arrival_within_the_reorder_window_gives_the_ordered_samples(
    seed: int, size: int, step: int, n: int
) -> None:
    task = make_task(("a", "b", "c"), (size, step, ("mean", "std", "median")))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    y = rng.integers(0, 3, n)
    # Readings of one row carry origins spread over the alignment tolerance (a quarter period).
    readings = [
        replace(r, origin_ns=r.origin_ns + int(rng.integers(0, P // 4 + 1)))
        for r in stream(task, x, label_values(task, y))
    ]
    # Arrival order: origin plus a jitter under the reorder window, so no reading ever arrives
    # a whole window behind the newest one.
    jitter = rng.integers(0, DEFAULT_REORDER_WINDOW_NS, len(readings))
    shuffled = [
        readings[i] for i in np.argsort([r.origin_ns + j for r, j in zip(readings, jitter, strict=True)])
    ]

    ordered_builder, shuffled_builder = SampleBuilder(task), SampleBuilder(task)
    ordered = run(ordered_builder, [readings])
    arrived = run(shuffled_builder, [shuffled[i : i + 37] for i in range(0, len(shuffled), 37)])

    assert np.array_equal(features_of(arrived, task.input_dim), features_of(ordered, task.input_dim))
    assert np.array_equal(features_of(ordered, task.input_dim), extract_features(x, task.features))
    assert [s.label for s in ordered] == window_labels(y, task.features.window, "classification").tolist()
    assert [(s.label, s.start_ns, s.end_ns) for s in arrived] == [
        (s.label, s.start_ns, s.end_ns) for s in ordered
    ]
    newest, reordered = -1, 0
    for r in shuffled:
        reordered += r.origin_ns < newest
        newest = max(newest, r.origin_ns)
    assert shuffled_builder.quality.reordered == reordered
    arrival_independent = [counts(b) for b in (shuffled_builder, ordered_builder)]
    for c in arrival_independent:
        c.pop("reordered", None)
    assert arrival_independent[0] == arrival_independent[1]


def test_samples_are_emitted_once_the_reorder_window_has_passed() -> None:
    task = make_task(("a",), None)
    builder = SampleBuilder(task, reorder_window_ns=3 * P)
    assert builder.add(row(task, T0, [1.0], "walk")) == []
    # The watermark is now T0, and T0 + tolerance is not before it: the first row stays open.
    assert builder.add(row(task, T0 + 3 * P, [2.0], "run")) == []
    [first] = builder.add(row(task, T0 + 4 * P, [3.0], "sit"))
    assert (first.features.tolist(), first.label, first.start_ns, first.end_ns) == ([1.0], 0, T0, T0)
    assert [s.label for s in builder.flush()] == [1, 2]
    assert builder.buffered["pending"] == 0


# --- screening: one focused case per reason ---------------------------------------------------


@pytest.fixture()
def task2() -> TaskSpec:
    """Two features, no window: each complete row is one sample."""
    return make_task(("a", "b"), None)


def test_wrong_device_and_unknown_resources_are_ignored(task2: TaskSpec) -> None:
    builder = SampleBuilder(task2, device=DEVICE)
    readings = [
        *row(task2, T0, [1.0, 2.0], "walk"),
        *row(task2, T0 + P, [9.0, 9.0], "run", device="watch-2"),
        reading("temperature", 21.5, T0 + P),
        *row(task2, T0 + 2 * P, [3.0, 4.0], "sit"),
    ]
    samples = run(builder, [readings])
    assert [s.features.tolist() for s in samples] == [[1.0, 2.0], [3.0, 4.0]]
    assert counts(builder) == {"readings": 10, "accepted": 6, "ignored": 4, "rows": 2, "samples": 2}


def test_builder_without_a_device_binds_to_the_first_one_it_sees(task2: TaskSpec) -> None:
    builder = SampleBuilder(task2)
    run(builder, [row(task2, T0, [1.0, 2.0], "walk", "watch-7") + row(task2, T0 + P, [1.0, 2.0], "walk")])
    assert builder.device == "watch-7"
    assert builder.quality.ignored == 3


def test_non_numeric_values_are_dropped_and_their_rows_are_incomplete(task2: TaskSpec) -> None:
    builder = SampleBuilder(task2)
    readings = [
        reading("a", "fast", T0, "String"),
        reading("b", 1.0, T0),
        reading("label", "walk", T0, "String"),
        reading("a", None, T0 + P),  # a Float64 reading without a value
        reading("b", (1.0, 2.0), T0 + P, "Float64Array"),
        reading("label", "walk", T0 + P, "String"),
        reading("a", True, T0 + 2 * P, "Bool"),  # booleans and integers are numbers
        reading("b", 7, T0 + 2 * P, "Int16"),
        reading("label", "walk", T0 + 2 * P, "String"),
    ]
    [sample] = run(builder, [readings])
    assert sample.features.tolist() == [1.0, 7.0]
    assert counts(builder) == {
        "readings": 9,
        "accepted": 6,
        "not_numeric": 3,
        "incomplete": 2,
        "rows": 1,
        "samples": 1,
    }


def test_nan_and_infinity_are_dropped(task2: TaskSpec) -> None:
    builder = SampleBuilder(task2)
    readings = [
        *row(task2, T0, [math.nan, 1.0], "walk"),
        *row(task2, T0 + P, [math.inf, -math.inf], "walk"),
        *row(task2, T0 + 2 * P, [1.0, 2.0], "walk"),
    ]
    [sample] = run(builder, [readings])
    assert sample.start_ns == T0 + 2 * P
    assert counts(builder) == {
        "readings": 9,
        "accepted": 6,
        "not_finite": 3,
        "incomplete": 2,
        "rows": 1,
        "samples": 1,
    }


def test_values_outside_the_profile_limits_are_dropped_bounds_included(task2: TaskSpec) -> None:
    limits = {"a": (0.0, 10.0), "b": (None, 5.0), "other": (1.0, 2.0)}
    builder = SampleBuilder(task2, limits)
    readings = [
        *row(task2, T0, [-0.1, 1.0], "walk"),
        *row(task2, T0 + P, [10.5, 1.0], "walk"),
        *row(task2, T0 + 2 * P, [1.0, 5.01], "walk"),
        *row(task2, T0 + 3 * P, [0.0, -1e9], "walk"),
        *row(task2, T0 + 4 * P, [10.0, 5.0], "walk"),
    ]
    samples = run(builder, [readings])
    assert [s.features.tolist() for s in samples] == [[0.0, -1e9], [10.0, 5.0]]
    assert counts(builder) == {
        "readings": 15,
        "accepted": 12,
        "out_of_range": 3,
        "incomplete": 3,
        "rows": 2,
        "samples": 2,
    }


def test_a_redelivered_event_is_a_duplicate(task2: TaskSpec) -> None:
    builder = SampleBuilder(task2)
    event = row(task2, T0, [1.0, 2.0], "walk")
    samples = run(builder, [event, event, row(task2, T0 + P, [3.0, 4.0], "run"), event])
    assert [s.end_ns for s in samples] == [T0, T0 + P]
    assert counts(builder) == {"readings": 12, "accepted": 6, "duplicate": 6, "rows": 2, "samples": 2}


def test_a_redelivered_bad_reading_is_a_duplicate_not_counted_twice(task2: TaskSpec) -> None:
    builder = SampleBuilder(task2)
    bad = reading("a", math.nan, T0)
    run(builder, [[bad], [bad]])
    assert counts(builder) == {"readings": 2, "not_finite": 1, "duplicate": 1}


def test_readings_older_than_the_reorder_window_are_late(task2: TaskSpec) -> None:
    builder = SampleBuilder(task2, reorder_window_ns=10 * P)
    samples = builder.add(row(task2, T0, [1.0, 1.0], "walk") + row(task2, T0 + 20 * P, [2.0, 2.0], "walk"))
    samples += builder.add(row(task2, T0 + 9 * P, [3.0, 3.0], "walk"))  # 11 periods behind the newest
    samples += builder.add(row(task2, T0 + 10 * P, [4.0, 4.0], "walk"))  # exactly the window: in time
    samples += builder.flush()
    assert [s.features[0] for s in samples] == [1.0, 4.0, 2.0]
    assert counts(builder) == {
        "readings": 12,
        "accepted": 9,
        "late": 3,
        "reordered": 3,
        "rows": 3,
        "gap": 2,
        "samples": 3,
    }


def test_readings_of_rows_already_emitted_are_late(task2: TaskSpec) -> None:
    builder = SampleBuilder(task2)
    run(builder, [row(task2, T0, [1.0, 1.0], "walk"), row(task2, T0 + P, [1.0, 1.0], "walk")])
    # After flush, the last row (and its alignment tolerance) is closed for good.
    tolerance = builder.align_tolerance_ns
    assert builder.add([reading("a", 5.0, T0 + P + tolerance)]) == []
    assert builder.quality.late == 1
    builder.add([reading("a", 5.0, T0 + P + tolerance + 1)])
    assert (builder.quality.late, builder.quality.accepted) == (1, 7)


def test_a_straggler_within_the_tolerance_and_the_reorder_window_joins_its_row(task2: TaskSpec) -> None:
    builder = SampleBuilder(task2, reorder_window_ns=10 * P)
    tolerance = builder.align_tolerance_ns
    builder.add([reading("a", 1.0, T0), reading("label", "walk", T0, "String")])
    builder.add(row(task2, T0 + 10 * P + 1, [2.0, 2.0], "run"))  # the row at T0 is still open...
    builder.add([reading("b", 1.5, T0 + tolerance)])  # ...because this may still arrive
    samples = builder.flush()
    assert [(s.features.tolist(), s.start_ns) for s in samples] == [
        ([1.0, 1.5], T0),
        ([2.0, 2.0], T0 + 10 * P + 1),
    ]
    assert counts(builder) == {
        "readings": 6,
        "accepted": 6,
        "reordered": 1,
        "rows": 2,
        "gap": 1,
        "samples": 2,
    }


def test_out_of_order_rows_are_reordered_not_dropped(task2: TaskSpec) -> None:
    builder = SampleBuilder(task2)
    readings = [
        *row(task2, T0, [0.0, 0.0], "walk"),
        *row(task2, T0 + 2 * P, [2.0, 2.0], "sit"),
        *row(task2, T0 + P, [1.0, 1.0], "run"),
    ]
    samples = run(builder, [readings])
    assert [(s.features[0], s.label) for s in samples] == [(0.0, 0), (1.0, 1), (2.0, 2)]
    assert counts(builder) == {"readings": 9, "accepted": 9, "reordered": 3, "rows": 3, "samples": 3}


def test_rows_missing_a_feature_or_the_label_are_incomplete(task2: TaskSpec) -> None:
    builder = SampleBuilder(task2)
    readings = [
        reading("a", 1.0, T0),  # no b
        reading("label", "walk", T0, "String"),
        reading("a", 1.0, T0 + P),  # no label
        reading("b", 1.0, T0 + P),
        *row(task2, T0 + 2 * P, [2.0, 2.0], "run"),
    ]
    [sample] = run(builder, [readings])
    assert sample.label == 1
    assert counts(builder) == {"readings": 7, "accepted": 7, "incomplete": 2, "rows": 1, "samples": 1}


def test_alignment_tolerance_is_a_quarter_period_by_default(task2: TaskSpec) -> None:
    builder = SampleBuilder(task2)
    assert builder.align_tolerance_ns == P // 4
    readings = [
        reading("a", 1.0, T0),
        reading("b", 2.0, T0 + 3_000_000),
        reading("label", "walk", T0 + P // 4, "String"),  # exactly the tolerance: same row
        reading("a", 3.0, T0 + P),
        reading("b", 4.0, T0 + P),
        reading("label", "run", T0 + P + P // 4 + 1, "String"),  # one ns beyond: a row of its own
    ]
    [sample] = run(builder, [readings])
    assert (sample.features.tolist(), sample.label, sample.start_ns, sample.end_ns) == ([1.0, 2.0], 0, T0, T0)
    assert counts(builder) == {"readings": 6, "accepted": 6, "incomplete": 2, "rows": 1, "samples": 1}


def test_without_a_sample_rate_readings_align_only_on_identical_origins() -> None:
    task = make_task(("a", "b"), None, rate=None)
    builder = SampleBuilder(task)
    assert (builder.align_tolerance_ns, builder.max_gap_ns) == (0, None)
    readings = [reading("a", 1.0, T0), reading("b", 2.0, T0 + 1), reading("label", "walk", T0, "String")]
    assert run(builder, [readings]) == []
    assert counts(builder) == {"readings": 3, "accepted": 3, "reordered": 1, "incomplete": 2}


def test_a_resource_repeating_within_the_tolerance_starts_a_new_row(task2: TaskSpec) -> None:
    builder = SampleBuilder(task2, align_tolerance_ns=P)
    readings = [*row(task2, T0, [1.0, 1.0], "walk"), *row(task2, T0 + P // 2, [2.0, 2.0], "run")]
    samples = run(builder, [readings[::-1]])
    assert [(s.features[0], s.start_ns) for s in samples] == [(1.0, T0), (2.0, T0 + P // 2)]


def test_labels_that_are_not_classes_drop_their_rows(task2: TaskSpec) -> None:
    builder = SampleBuilder(task2)
    labels = [
        reading("label", "swim", T0, "String"),
        reading("label", 3, T0 + P, "Int32"),  # index beyond the 3 classes
        reading("label", 1.0, T0 + 2 * P, "Float64"),  # floats are not class indices
        reading("label", -1, T0 + 3 * P, "Int8"),
        reading("label", 2, T0 + 4 * P, "Uint8"),  # an integer index is a class
        reading("label", "run", T0 + 5 * P, "String"),
    ]
    readings: list[Reading] = []
    for i, label in enumerate(labels):
        readings += [reading("a", float(i), T0 + i * P), reading("b", 0.0, T0 + i * P), label]
    samples = run(builder, [readings])
    assert [(s.features[0], s.label) for s in samples] == [(4.0, 2), (5.0, 1)]
    assert counts(builder) == {"readings": 18, "accepted": 18, "unknown_label": 4, "rows": 2, "samples": 2}


# --- Bool labels and features ----------------------------------------------------------------


def bool_rows(task: TaskSpec, texts: Sequence[str]) -> list[Reading]:
    """One row per text: feature ``a`` is the row's index, the label a Bool parsed as EdgeX sends it."""
    out: list[Reading] = []
    for i, text in enumerate(texts):
        t = T0 + i * P
        out += [reading("a", float(i), t), reading("label", parse_value("Bool", text), t, "Bool")]
    return out


@pytest.mark.parametrize(
    ("classes", "false_index", "true_index"),
    [
        (["false", "true"], 0, 1),
        (["True", "FALSE"], 1, 0),  # named values match by name, ignoring case, in any order
        (["0", "1"], 0, 1),
        (["1", "0"], 1, 0),
        (["vacant", "occupied"], 0, 1),  # unnamed: false is the first class, true the second
    ],
)
def test_bool_labels_map_false_and_true_to_their_classes(
    classes: list[str], false_index: int, true_index: int
) -> None:
    task = make_task(("a",), None, classes=classes)
    builder = SampleBuilder(task)
    # EdgeX writes Bool values "true"/"false"; Go's ParseBool (and a CSV replay) also gives 1/0.
    samples = run(builder, [bool_rows(task, ["false", "true", "1", "0", "True", "FALSE"])])
    expected = [false_index, true_index, true_index, false_index, true_index, false_index]
    assert [(s.features[0], s.label) for s in samples] == list(zip(range(6), expected, strict=True))
    assert all(type(s.label) is int for s in samples)
    assert counts(builder) == {"readings": 12, "accepted": 12, "rows": 6, "samples": 6}


def test_hand_made_bool_values_in_text_or_0_1_are_labels_too() -> None:
    task = make_task(("a",), None, classes=["false", "true"])
    builder = SampleBuilder(task)
    values: list[Any] = ["TRUE", "false", 1, 0, "yes", 2, None]
    readings: list[Reading] = []
    for i, value in enumerate(values):
        readings += [reading("a", float(i), T0 + i * P), reading("label", value, T0 + i * P, "Bool")]
    samples = run(builder, [readings])
    assert [(s.features[0], s.label) for s in samples] == [(0.0, 1), (1.0, 0), (2.0, 1), (3.0, 0)]
    assert counts(builder) == {"readings": 14, "accepted": 14, "unknown_label": 3, "rows": 4, "samples": 4}


@pytest.mark.parametrize("classes", [["true", "yes"], ["0", "true"], ["off", "on", "false"]])
def test_bool_labels_of_classes_that_do_not_fit_a_bool_are_unknown(classes: list[str]) -> None:
    task = make_task(("a",), None, classes=classes)
    builder = SampleBuilder(task)
    assert run(builder, [bool_rows(task, ["false", "true"])]) == []
    assert counts(builder) == {"readings": 4, "accepted": 4, "unknown_label": 2}


@pytest.mark.parametrize(
    ("classes", "indices"),
    [
        (("false", "true"), (0, 1)),
        (("TRUE", "False"), (1, 0)),
        (("0", "1"), (0, 1)),
        (("1", "0"), (1, 0)),
        (("no", "yes"), (0, 1)),
        (("yes", "no"), (0, 1)),  # unnamed: by position, as an integer label 0/1 would be
        (("true", "yes"), None),
        (("false", "1"), None),
        (("true", "true2"), None),
        (("false", "true", "maybe"), None),
    ],
)
def test_bool_class_indices(classes: tuple[str, ...], indices: tuple[int, int] | None) -> None:
    assert bool_class_indices(classes) == indices


def test_bool_features_are_zero_or_one() -> None:
    task = make_task(("a", "b"), (2, 2, ("mean",)))
    builder = SampleBuilder(task)
    texts = [("true", "false"), ("1", "false"), ("false", "0"), ("False", "TRUE")]
    readings: list[Reading] = []
    for i, (a, b) in enumerate(texts):
        t = T0 + i * P
        readings += [
            reading("a", parse_value("Bool", a), t, "Bool"),
            reading("b", parse_value("Bool", b), t, "Bool"),
            reading("label", "walk", t, "String"),
        ]
    readings += [reading("a", "maybe", T0 + 4 * P, "Bool")]  # not a Bool: dropped, counted
    samples = run(builder, [readings])
    assert [s.features.tolist() for s in samples] == [[1.0, 0.0], [0.0, 0.5]]
    assert counts(builder)["not_numeric"] == 1


def test_bool_regression_labels_are_zero_or_one() -> None:
    task = make_task(("a",), None, kind="regression")
    samples = run(SampleBuilder(task), [bool_rows(task, ["true", "false"])])
    assert [(s.features[0], s.label) for s in samples] == [(0.0, 1.0), (1.0, 0.0)]


def test_a_row_missing_features_counts_incomplete_even_with_an_unknown_label(task2: TaskSpec) -> None:
    builder = SampleBuilder(task2)
    run(builder, [[reading("a", 1.0, T0), reading("label", "swim", T0, "String")]])
    assert counts(builder) == {"readings": 2, "accepted": 2, "incomplete": 1}


def test_regression_labels_are_numbers_checked_like_features() -> None:
    task = make_task(("a",), (2, 2, ("mean",)), kind="regression")
    builder = SampleBuilder(task, {"label": (0.0, 100.0)})
    readings = [
        *row(task, T0, [1.0], 20.0),
        *row(task, T0 + P, [3.0], 21.0),
        *row(task, T0 + 2 * P, [5.0], math.nan),
        *row(task, T0 + 3 * P, [7.0], 150.0),
        *row(task, T0 + 4 * P, [9.0], 22),  # an integer label is a number
        reading("label", "warm", T0 + 5 * P, "String"),
        reading("a", 11.0, T0 + 5 * P),
        *row(task, T0 + 6 * P, [13.0], 24.5),
    ]
    samples = run(builder, [readings])
    # rows kept: t0, t1, t4, t6 (holes of 2 periods stay within the default gap of 3)
    assert [(s.features.tolist(), s.label) for s in samples] == [([2.0], 20.5), ([11.0], 23.25)]
    assert counts(builder) == {
        "readings": 14,
        "accepted": 11,
        "not_finite": 1,
        "out_of_range": 1,
        "not_numeric": 1,
        "incomplete": 3,
        "rows": 4,
        "samples": 2,
    }


def test_window_label_is_the_majority_class_ties_to_the_smaller_index() -> None:
    task = make_task(("a",), (4, 4, ("max",)))
    labels = ["run", "walk", "walk", "run", "run", "run", "sit", "walk", "sit", "sit", "run", "run"]
    samples = run(SampleBuilder(task), [stream(task, np.arange(12.0).reshape(-1, 1), labels)])
    assert [(s.features[0], s.label) for s in samples] == [(3.0, 0), (7.0, 1), (11.0, 1)]


# --- gaps -------------------------------------------------------------------------------------


def test_windows_never_span_a_gap() -> None:
    task = make_task(("a", "b"), (6, 3, ("mean", "min", "p90")))
    rng = np.random.default_rng(7)
    first, second = rng.normal(size=(10, 2)), rng.normal(size=(10, 2))
    labels = label_values(task, rng.integers(0, 3, 20))
    readings = stream(task, first, labels[:10]) + stream(task, second, labels[10:], t0=T0 + 10 * P + 4 * P)
    builder = SampleBuilder(task)
    samples = run(builder, [readings])
    expected = np.concatenate(
        [extract_features(first, task.features), extract_features(second, task.features)]
    )
    assert np.array_equal(features_of(samples, task.input_dim), expected)
    assert [s.start_ns for s in samples] == [T0, T0 + 3 * P, T0 + 13 * P + P, T0 + 16 * P + P]
    assert counts(builder) == {"readings": 60, "accepted": 60, "rows": 20, "gap": 1, "samples": 4}


def test_a_hole_of_exactly_max_gap_is_not_a_gap() -> None:
    task = make_task(("a",), (4, 4, ("mean",)))
    builder = SampleBuilder(task)
    assert builder.max_gap_ns == 3 * P
    x = np.arange(4.0).reshape(-1, 1)
    readings = stream(task, x[:2], ["walk"] * 2) + stream(task, x[2:], ["walk"] * 2, t0=T0 + P + 3 * P)
    [sample] = run(builder, [readings])
    assert (sample.features[0], sample.start_ns, sample.end_ns) == (1.5, T0, T0 + 5 * P)
    assert builder.quality.gap == 0


def test_without_a_sample_rate_there_is_no_gap_unless_configured() -> None:
    task = make_task(("a",), (2, 2, ("mean",)), rate=None)
    readings = stream(task, np.arange(4.0).reshape(-1, 1), ["walk"] * 4, period=3_600 * 10**9)
    assert len(run(SampleBuilder(task), [readings])) == 2
    split = SampleBuilder(task, max_gap_ns=60 * 10**9)
    assert run(split, [readings]) == []
    assert split.quality.gap == 3


def test_a_gap_discards_a_step_larger_than_the_window() -> None:
    # step 5 > size 2: after a window, rows are skipped; a gap resets the skipping too.
    task = make_task(("a",), (2, 5, ("mean",)))
    x = np.arange(10.0).reshape(-1, 1)
    readings = stream(task, x[:3], ["walk"] * 3) + stream(task, x[3:], ["walk"] * 7, t0=T0 + 100 * P)
    samples = run(SampleBuilder(task), [readings[i : i + 2] for i in range(0, len(readings), 2)])
    assert [s.features[0] for s in samples] == [0.5, 3.5, 8.5]


# --- backfill and memory ----------------------------------------------------------------------


def test_an_overlapping_backfill_replay_produces_no_duplicate_samples() -> None:
    task = make_task(("a", "b"), (10, 5, ("mean", "max")))
    rng = np.random.default_rng(3)
    x = rng.normal(size=(250, 2))
    readings = stream(task, x, label_values(task, rng.integers(0, 3, 250)))
    per_row = 3
    live_a, live_b = readings[: 200 * per_row], readings[200 * per_row :]
    backfill = readings[100 * per_row : 200 * per_row]  # core-data replays rows 100..199

    builder = SampleBuilder(task)
    samples = run(builder, [live_a, backfill, live_b])
    reference = SampleBuilder(task)
    expected = run(reference, [readings])

    assert [s.end_ns for s in samples] == [s.end_ns for s in expected]
    assert len({s.end_ns for s in samples}) == len(samples)
    assert np.array_equal(features_of(samples, task.input_dim), features_of(expected, task.input_dim))
    assert counts(builder) == {**counts(reference), "readings": 1050, "duplicate": 300}


def test_a_backfill_older_than_the_key_memory_is_late_never_a_sample(task2: TaskSpec) -> None:
    builder = SampleBuilder(task2, recent_keys=30)
    x = np.arange(400.0).reshape(200, 2)
    readings = stream(task2, x, ["walk"] * 200)
    assert len(run(builder, [readings])) == 200
    assert builder.buffered["recent_keys"] == 30
    assert builder.add(readings[150 * 3 :]) + builder.flush() == []
    # keys of rows 190..199 are remembered (duplicates); rows 150..189 predate the last row (late)
    assert (builder.quality.duplicate, builder.quality.late, builder.quality.samples) == (30, 120, 200)


def test_a_full_reorder_buffer_closes_the_oldest_rows_early(task2: TaskSpec) -> None:
    builder = SampleBuilder(task2, reorder_window_ns=10**12, max_pending=6)
    readings = stream(task2, np.zeros((4, 2)), ["walk"] * 4)
    assert [s.end_ns for s in builder.add(readings)] == [T0, T0 + P]
    assert builder.buffered["pending"] == 6
    builder.add([reading("b", 5.0, T0 + 4)])  # would have joined row 0: that row is gone
    assert counts(builder) == {
        "readings": 13,
        "accepted": 12,
        "overflow": 2,
        "late": 1,
        "rows": 2,
        "samples": 2,
    }


def _long_stream(task: TaskSpec, rows: int) -> Iterator[Reading]:
    for i in range(rows):
        t = T0 + i * P
        yield Reading(DEVICE, "a", "p", "Float64", float(i % 97), t)
        yield Reading(DEVICE, "label", "p", "String", CLASSES[(i // 500) % 3], t)


def test_memory_stays_bounded_over_100k_rows() -> None:
    task = make_task(("a",), (50, 25, ("mean", "std", "max")))
    builder = SampleBuilder(task, recent_keys=1000)
    source = _long_stream(task, 100_000)
    total, peak = 0, {"pending": 0, "pending_keys": 0, "recent_keys": 0, "window_rows": 0}
    while chunk := [r for _, r in zip(range(2000), source, strict=False)]:
        total += len(builder.add(chunk))
        peak = {k: max(v, builder.buffered[k]) for k, v in peak.items()}
    total += len(builder.flush())
    rows_in_reorder_window = DEFAULT_REORDER_WINDOW_NS // P + 1
    assert peak["pending"] <= 2 * (rows_in_reorder_window + 1)
    assert peak["pending_keys"] == peak["pending"]
    assert peak["recent_keys"] == 1000
    assert peak["window_rows"] < 50
    assert task.features.window is not None
    assert total == window_count(100_000, task.features.window) == 3999
    assert counts(builder) == {"readings": 200_000, "accepted": 200_000, "rows": 100_000, "samples": 3999}


# --- report and configuration ----------------------------------------------------------------


def test_quality_is_a_persistent_snapshot(task2: TaskSpec) -> None:
    builder = SampleBuilder(task2)
    builder.add(row(task2, T0, [1.0, 1.0], "walk"))
    snapshot = builder.quality
    builder.add(row(task2, T0 + P, [math.nan, 1.0], "walk"))
    builder.flush()
    assert snapshot.readings == 3
    report = builder.quality
    assert report.to_dict() == {
        "readings": 6,
        "accepted": 5,
        "reordered": 0,
        "ignored": 0,
        "duplicate": 0,
        "late": 0,
        "not_numeric": 0,
        "not_finite": 1,
        "out_of_range": 0,
        "rows": 1,
        "incomplete": 1,
        "unknown_label": 0,
        "gap": 0,
        "overflow": 0,
        "samples": 1,
    }
    assert set(READING_REASONS + ROW_REASONS) < set(report.to_dict())
    check_invariants(report)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"limits": {"a": (5.0, 1.0)}}, "limits['a'] minimum 5.0 exceeds maximum 1.0"),
        ({"limits": {"a": (math.nan, None)}}, "limits['a'] bounds must be finite numbers or None"),
        ({"limits": {"a": [0.0, 1.0]}}, "limits['a'] must be (minimum, maximum)"),
        ({"limits": {"a": ("0", 1.0)}}, "limits['a'] bounds must be finite numbers or None, got '0'"),
        ({"reorder_window_ns": -1}, "reorder_window_ns must be an integer >= 0, got -1"),
        ({"align_tolerance_ns": 1.5}, "align_tolerance_ns must be an integer >= 0, got 1.5"),
        ({"max_gap_ns": 0}, "max_gap_ns must be an integer >= 1, got 0"),
        ({"max_pending": True}, "max_pending must be an integer >= 1, got True"),
        ({"recent_keys": -5}, "recent_keys must be an integer >= 0, got -5"),
        ({"device": ""}, "device must be a non-empty string"),
    ],
)
def test_invalid_configuration_is_refused_with_the_field_named(
    task2: TaskSpec, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(SampleError) as info:
        SampleBuilder(task2, **kwargs)
    assert message in str(info.value)
    assert isinstance(info.value, FedgeError)


def test_har_task_defaults(har_task: TaskSpec) -> None:
    CLASSES_HAR = har_task.label.classes or ()
    builder = SampleBuilder(har_task)
    assert (builder.period_ns, builder.align_tolerance_ns, builder.max_gap_ns) == (2e7, 5_000_000, 60_000_000)
    rng = random.Random(0)
    x = np.array([[rng.gauss(0, 1) for _ in range(6)] for _ in range(300)])
    labels = [rng.choice(CLASSES_HAR) for _ in range(300)]
    samples = run(builder, [stream(har_task, x, labels)])
    assert np.array_equal(features_of(samples, har_task.input_dim), extract_features(x, har_task.features))
    assert len(samples) == 5


class _OneByOne(SampleBuilder):
    """The builder with its batch path turned off: every reading through ``_take``, one by one."""

    def _add_in_order(self, batch: list[Reading], rows: list[Any]) -> bool:
        return False


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_the_batch_path_gives_what_one_by_one_gives(data: st.DataObject) -> None:
    """Batches (``SampleBuilder.add`` of an event's readings, at once when they are new, in order
    and usable) give the same samples, counters and buffers as every reading taken in turn,
    whatever the stream holds: redeliveries, late and reordered readings, foreign devices and
    resources, bad values, labels that are not classes, flushes, a small reorder buffer."""
    labelled = data.draw(st.booleans(), label="labelled")
    kind = data.draw(st.sampled_from(["classification", "regression"]), label="kind")
    task = make_task(("a", "b"), (3, data.draw(st.integers(1, 4), label="step"), ("mean", "max")), kind=kind)
    limits = {"a": (-5.0, 5.0), "label": (-10.0, 10.0)} if kind == "regression" else {"a": (-5.0, 5.0)}
    options = {
        "max_pending": data.draw(st.sampled_from([4, 16, 1000]), label="max_pending"),
        "recent_keys": data.draw(st.sampled_from([0, 5, 100]), label="recent_keys"),
    }
    rng = random.Random(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    stream_: list[Reading] = []
    t = T0
    for i in range(data.draw(st.integers(1, 120), label="rows")):
        t += P * (1 if rng.random() < 0.95 else 5)
        label: Any = CLASSES[i % 3] if kind == "classification" else float(i % 7)
        if kind == "classification" and rng.random() < 0.05:
            label = "dance"
        values = [
            rng.choice([rng.uniform(-4, 4), 6.0, math.nan, "x"])
            if rng.random() < 0.05
            else rng.uniform(-4, 4)
            for _ in range(2)
        ]
        out = row(task, t + rng.choice([0, 0, 0, P // 8]), values, label)
        if rng.random() < 0.05:
            out.append(reading("other", 1.0, t))
        if rng.random() < 0.05:
            out.append(reading("a", 1.0, t, device="watch-2"))
        if rng.random() < 0.05 and stream_:
            out.append(rng.choice(stream_))  # a redelivery (maybe late by now)
        if rng.random() < 0.05:
            out.append(reading("b", 0.5, t - rng.choice([P, 10 * P, 100 * P])))  # a straggler
        stream_ += out
    builders = [
        SampleBuilder(task, limits, device=DEVICE, labelled=labelled, reorder_window_ns=3 * P, **options),
        _OneByOne(task, limits, device=DEVICE, labelled=labelled, reorder_window_ns=3 * P, **options),
    ]
    outputs: list[list[Any]] = [[], []]
    i = 0
    while i < len(stream_):
        size = rng.choice([1, 3, 7, 20, 100])
        flush = rng.random() < 0.05
        for builder, out in zip(builders, outputs, strict=True):
            out += builder.add(stream_[i : i + size])
            if flush:
                out += builder.flush()
        i += size
    for builder, out in zip(builders, outputs, strict=True):
        out += builder.flush()
    assert builders[0].quality == builders[1].quality
    assert builders[0].buffered == builders[1].buffered
    assert [(s.start_ns, s.end_ns, repr(s.label), s.features.tobytes()) for s in outputs[0]] == [
        (s.start_ns, s.end_ns, repr(s.label), s.features.tobytes()) for s in outputs[1]
    ]
    assert builders[0]._recent.keys() == builders[1]._recent.keys()
    assert builders[0]._recent._masks == builders[1]._recent._masks
