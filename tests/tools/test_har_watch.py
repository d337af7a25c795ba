"""The real smartwatch data set as per-device data: one subject per device, 8-10 held out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedge.agent.features import window_count
from fedge.lab import har_watch
from fedge.protocol.task import TaskSpec, parse_task_spec
from support.tasks import task_variant


@pytest.fixture(scope="module")
def devices(har_task: TaskSpec) -> dict[int, har_watch.DeviceData]:
    return har_watch.load_devices(har_task)


def test_one_device_per_subject(devices: dict[int, har_watch.DeviceData]) -> None:
    assert sorted(devices) == list(range(1, 11))
    assert [d.device_id for d in devices.values()] == [f"watch-{s:02d}" for s in range(1, 11)]
    assert har_watch.TEST_SUBJECTS == (8, 9, 10)
    assert set(har_watch.TRAIN_SUBJECTS).isdisjoint(har_watch.TEST_SUBJECTS)


def test_windows_never_cross_recordings(har_task: TaskSpec, devices: dict[int, har_watch.DeviceData]) -> None:
    recordings = har_watch.load_recordings()
    assert len(recordings) == 140
    assert har_task.features.window is not None
    for subject, data in devices.items():
        own = [r for r in recordings if r.subject == subject]
        assert len(own) == 14
        windows = sum(window_count(len(r.readings), har_task.features.window) for r in own)
        assert data.x.shape == (windows, 48)
        assert data.y.shape == (data.x.shape[0],)
        assert data.x.dtype == np.float32 and data.y.dtype == np.int32
        assert np.all(np.isfinite(data.x))
        # Every subject performed every exercise.
        assert set(data.y.tolist()) == set(range(7))


def test_first_window_features_are_the_statistics_of_the_first_two_seconds(
    devices: dict[int, har_watch.DeviceData],
) -> None:
    first = next(r for r in har_watch.load_recordings() if r.subject == 1)
    window = first.readings[:100]  # 2 s at 50 Hz
    expected_accel_x = [
        window[:, 0].mean(),
        window[:, 0].std(),
        window[:, 0].min(),
        window[:, 0].max(),
        np.median(window[:, 0]),
        np.sqrt(np.mean(window[:, 0] ** 2)),
        np.percentile(window[:, 0], 10),
        np.percentile(window[:, 0], 90),
    ]
    np.testing.assert_allclose(devices[1].x[0, :8], expected_accel_x, rtol=1e-6)
    assert devices[1].y[0] == first.label


def test_resource_order_follows_the_task(
    har_task: TaskSpec, devices: dict[int, har_watch.DeviceData]
) -> None:
    reordered = task_variant(har_task, {"features.resources": list(reversed(har_task.features.resources))})
    data = har_watch.load_devices(reordered, subjects=[1])[1]
    # gyro_z comes first now: its 8 statistics equal the last 8 of the default order.
    np.testing.assert_array_equal(data.x[:, :8], devices[1].x[:, -8:])


def test_task_that_reads_unknown_resources_is_refused(har_task: TaskSpec) -> None:
    task = task_variant(har_task, {"features.resources": ["accel_x", "temperature"]})
    with pytest.raises(har_watch.DatasetError, match=r"reads \['temperature'\], which the HAR watch"):
        har_watch.load_devices(task, subjects=[1])


def test_task_with_other_classes_is_refused(har_task: TaskSpec) -> None:
    task = task_variant(har_task, {"label.classes": ["walk", "run"]})
    with pytest.raises(har_watch.DatasetError, match="must label resource 'activity' with classes"):
        har_watch.load_devices(task, subjects=[1])


def test_unknown_subject_is_refused(har_task: TaskSpec) -> None:
    with pytest.raises(har_watch.DatasetError, match=r"unknown subjects \[11\]"):
        har_watch.load_devices(har_task, subjects=[1, 11])


def test_raw_windows_are_each_recordings_readings_channel_major() -> None:
    """tasks/har-watch-raw.toml: a sample is a window's 100 readings of each of the 6 resources,
    x[c * 100 + t], windowed per recording as for statistics (the same windows, the same labels)."""
    task = parse_task_spec((Path(__file__).resolve().parents[2] / "tasks" / "har-watch-raw.toml").read_text())
    assert task.features.window is not None
    data = har_watch.load_devices(task, subjects=[1])[1]
    own = [r for r in har_watch.load_recordings() if r.subject == 1]
    counts = [window_count(len(r.readings), task.features.window) for r in own]
    assert data.x.shape == (sum(counts), 600) and data.x.dtype == np.float32
    assert data.y.tolist() == [r.label for r, n in zip(own, counts, strict=True) for _ in range(n)]
    # The second recording's third window: its rows 100..199, resource by resource.
    k = counts[0] + 2
    expected = own[1].readings[100:200].T.astype(np.float32).reshape(-1)
    assert data.x[k].tobytes() == expected.tobytes()
