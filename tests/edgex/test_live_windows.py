"""Prediction windows from live EdgeX readings: the sample builder's unlabelled mode gives the
windows and features of training on the same rows, needs no label, and the ingest hands them to
the agent through a bounded buffer without touching what it stores for training."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedge.agent.edgex.ingest import BackfillCursor, EdgeXIngest
from fedge.agent.edgex.readings import Reading
from fedge.agent.edgex.samples import SampleBuilder
from fedge.agent.sample_store import SampleStore
from fedge.protocol.task import TaskSpec

DEVICE = "watch-01"
T0 = 1_700_000_000 * 10**9
PERIOD = 20_000_000  # 50 Hz
CLASSES = ("PEN", "ABD", "FEL", "IR", "ER", "TRAP", "ROW")


def rows(task: TaskSpec, n: int, *, labelled: bool = True, start: int = 0) -> list[Reading]:
    """``n`` rows of the HAR task's six Float32 resources (and the activity label)."""
    rng = np.random.default_rng(start)
    out: list[Reading] = []
    for i in range(start, start + n):
        t = T0 + i * PERIOD
        for name, value in zip(task.features.resources, rng.normal(0, 1, 6), strict=True):
            out.append(Reading(DEVICE, name, "Wearable-IMU", "Float32", float(value), t))
        if labelled:
            out.append(Reading(DEVICE, "activity", "Wearable-IMU", "String", CLASSES[(i // 150) % 7], t))
    return out


def test_unlabelled_windows_are_the_training_windows_and_need_no_label(har_task: TaskSpec) -> None:
    readings = rows(har_task, 420)
    labelled = SampleBuilder(har_task, device=DEVICE)
    training = labelled.add(readings) + labelled.flush()
    live = SampleBuilder(har_task, device=DEVICE, labelled=False)
    windows = live.add(readings) + live.flush()
    assert len(training) == len(windows) == 7  # (420 - 100) // 50 + 1
    for sample, window in zip(training, windows, strict=True):
        assert (window.start_ns, window.end_ns) == (sample.start_ns, sample.end_ns)
        np.testing.assert_array_equal(window.features, sample.features)
        assert np.isnan(window.label)
    assert live.quality.ignored == 420  # the label readings: not needed
    assert live.quality.rows == 420 and live.quality.incomplete == 0

    # The same features without any label reading: the same windows.
    bare = SampleBuilder(har_task, device=DEVICE, labelled=False)
    unlabelled = bare.add(rows(har_task, 420, labelled=False)) + bare.flush()
    assert [(w.start_ns, w.end_ns) for w in unlabelled] == [(w.start_ns, w.end_ns) for w in windows]
    for a, b in zip(unlabelled, windows, strict=True):
        np.testing.assert_array_equal(a.features, b.features)
    # ...whereas training, without labels, has no sample at all.
    no_labels = SampleBuilder(har_task, device=DEVICE)
    assert no_labels.add(rows(har_task, 420, labelled=False)) + no_labels.flush() == []
    assert no_labels.quality.incomplete == 420


def test_a_row_missing_a_feature_is_incomplete_for_predictions_too(har_task: TaskSpec) -> None:
    readings = [
        r for r in rows(har_task, 120, labelled=False) if not (r.resource == "gyro_z" and r.origin_ns == T0)
    ]
    live = SampleBuilder(har_task, device=DEVICE, labelled=False)
    windows = live.add(readings) + live.flush()
    assert live.quality.incomplete == 1 and live.quality.rows == 119
    assert [w.start_ns for w in windows] == [T0 + PERIOD]  # the window starts after the hole


def test_the_ingest_hands_live_windows_over_and_stores_exactly_what_it_would_without(
    tmp_path: Path, har_task: TaskSpec
) -> None:
    def ingest(name: str, live: bool) -> EdgeXIngest:
        store = SampleStore(tmp_path / f"{name}.sqlite", 10**6, 0)
        cursor = BackfillCursor(tmp_path / f"{name}.json")
        return EdgeXIngest(
            DEVICE, har_task, store, {}, None, "edgex", None, cursor, clock=lambda: T0 / 1e9, live=live
        )

    with_live, without = ingest("live", True), ingest("plain", False)
    readings = rows(har_task, 420)
    assert with_live.feed(readings) == without.feed(readings) > 0
    with_live._flush()
    without._flush()
    x_live, y_live = with_live.store.load(with_live.key)
    x_plain, y_plain = without.store.load(without.key)
    np.testing.assert_array_equal(x_live, x_plain)
    np.testing.assert_array_equal(y_live, y_plain)

    taken = with_live.live_windows(None)
    assert taken.dropped == 0 and len(taken.windows) == x_plain.shape[0] == 7
    np.testing.assert_array_equal(np.stack([w.features for w in taken.windows]), x_plain)
    assert {(w.edgex_device, w.spec) for w in taken.windows} == {(DEVICE, har_task.features)}
    assert with_live.live_windows(None).windows == ()  # taken means cleared
    assert without.live_windows(None).windows == ()
    assert with_live.report()["live"]["quality"]["rows"] == 420
    assert without.report()["live"] is None

    # A worker busy for long: only the newest 32 windows wait, the rest are counted as dropped.
    with_live.feed(rows(har_task, 50 * 40, start=420))
    assert with_live.live_builder is not None
    built = with_live.live_builder.quality.samples - 7
    busy = with_live.live_windows(None)
    assert built > 32 and len(busy.windows) == 32 and busy.dropped == built - 32
    for store in (with_live.store, without.store):
        store.close()


def test_the_ingest_announces_new_live_windows_so_the_agent_worker_need_not_ask(
    tmp_path: Path, har_task: TaskSpec
) -> None:
    """The agent's worker sleeps until the ingest calls its listener (``set_live_listener``):
    called once windows are there to take, never for readings that close none."""
    store = SampleStore(tmp_path / "live.sqlite", 10**6, 0)
    cursor = BackfillCursor(tmp_path / "live.json")
    source = EdgeXIngest(
        DEVICE, har_task, store, {}, None, "edgex", None, cursor, clock=lambda: T0 / 1e9, live=True
    )
    announced: list[int] = []
    source.set_live_listener(lambda: announced.append(len(source.live_windows(None).windows)))
    window = har_task.features.window
    assert window is not None
    readings = rows(har_task, 420)
    source.feed(readings[: 7 * (window.size - 1)])  # 7 readings a row: one row short of a window
    assert announced == []
    source.feed(readings[7 * (window.size - 1) :])
    source._flush()
    assert announced and all(n > 0 for n in announced)
    assert sum(announced) == 7  # every window announced and taken once: (420 - 100) // 50 + 1
    store.close()
