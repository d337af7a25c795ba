"""The real smartwatch IMU data set shipped by ``seglearn==1.2.5``, one subject per device.

140 recordings of 6 channels (accelerometer ``ax ay az``, gyroscope ``wx wy wz``) at 50 Hz,
7 shoulder exercises, 10 subjects. fedge treats each subject as one device and holds out
subjects 8, 9 and 10 as the test set, so accuracy is measured on people the model never saw.

Windows never cross recordings: each recording is windowed on its own, and every window of a
recording carries that recording's exercise label. A window's features are what the task asks
for, statistics or the raw readings (``statistics = ["raw"]``), computed by
:func:`fedge.agent.features.extract_features` as the agent computes them from EdgeX readings: the
same recordings replayed through EdgeX give byte-identical samples
(tests/edgex/test_raw_windows_edgex.py).

As an agent's source (:class:`HarWatchSource`) a subject also has live windows to predict on: the
held-out test subjects' windows, replayed in time (one every window step, ``step /
sample_rate_hz`` seconds, as a sensor would give them), each device starting at its own place in
them, so ``fedge demo`` publishes predictions (``insight/{device_id}``) of people the model never saw.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedge.agent.features import extract_features
from fedge.agent.live import DEFAULT_LIVE_WINDOWS, NO_LIVE_WINDOWS, LiveWindow, LiveWindows
from fedge.protocol.errors import FedgeError
from fedge.protocol.task import TaskSpec

#: The data set's channel names, in order, and the EdgeX resource names fedge gives them.
CHANNELS = ("ax", "ay", "az", "wx", "wy", "wz")
RESOURCES = ("accel_x", "accel_y", "accel_z", "gyro_x", "gyro_y", "gyro_z")
LABEL_RESOURCE = "activity"
CLASSES = ("PEN", "ABD", "FEL", "IR", "ER", "TRAP", "ROW")
SAMPLE_RATE_HZ = 50.0
SUBJECTS = tuple(range(1, 11))
TEST_SUBJECTS = (8, 9, 10)
TRAIN_SUBJECTS = tuple(s for s in SUBJECTS if s not in TEST_SUBJECTS)


class DatasetError(FedgeError):
    """The data set is unavailable or does not fit the task spec."""


@dataclass(frozen=True)
class Recording:
    """One exercise recording: readings ``(n, 6)`` in time order and its class index."""

    subject: int
    readings: np.ndarray
    label: int


@dataclass(frozen=True)
class DeviceData:
    """One device's samples: features ``x`` ``(n, input_dim)`` and class indices ``y``."""

    device_id: str
    subject: int
    x: np.ndarray
    y: np.ndarray


def device_id(subject: int) -> str:
    return f"watch-{subject:02d}"


def load_recordings() -> list[Recording]:
    """Loads the raw recordings from seglearn (installed by the ``demo`` extra)."""
    try:
        from seglearn.datasets import load_watch  # noqa: PLC0415 - demo-only dependency
    except ImportError as exc:
        raise DatasetError(
            f"the HAR watch data set needs seglearn==1.2.5 and pandas ({exc}); "
            "install them with: pip install 'fedge[demo]'"
        ) from None
    data: dict[str, Any] = load_watch()
    if tuple(data["X_labels"]) != CHANNELS or tuple(data["y_labels"]) != CLASSES:
        raise DatasetError("seglearn's watch data set has unexpected channels or classes")
    return [
        Recording(int(s), np.asarray(x, dtype=np.float64), int(y))
        for x, y, s in zip(data["X"], data["y"], data["subject"], strict=True)
    ]


def check_task(task: TaskSpec) -> None:
    """The task must read the IMU's six resources (any order) and label the seven exercises."""
    unknown = [r for r in task.features.resources if r not in RESOURCES]
    if unknown:
        raise DatasetError(
            f"task {task.name!r} reads {unknown}, which the HAR watch data set does not have "
            f"(it has {list(RESOURCES)})"
        )
    if task.label.resource != LABEL_RESOURCE or task.label.classes != CLASSES:
        raise DatasetError(
            f"task {task.name!r} must label resource {LABEL_RESOURCE!r} with classes {list(CLASSES)}"
        )


def recordings_to_device(subject: int, recordings: Iterable[Recording], task: TaskSpec) -> DeviceData:
    """Features and labels of one subject's recordings, as the task spec says."""
    check_task(task)
    columns = [RESOURCES.index(r) for r in task.features.resources]
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for rec in recordings:
        feats = extract_features(rec.readings[:, columns], task.features)
        xs.append(feats)
        ys.append(np.full(feats.shape[0], rec.label, np.int32))
    x = np.concatenate(xs) if xs else np.empty((0, task.input_dim), np.float32)
    y = np.concatenate(ys) if ys else np.empty((0,), np.int32)
    return DeviceData(device_id(subject), subject, x, y)


def load_devices(task: TaskSpec, subjects: Iterable[int] = SUBJECTS) -> dict[int, DeviceData]:
    """One :class:`DeviceData` per requested subject."""
    wanted = list(subjects)
    bad = [s for s in wanted if s not in SUBJECTS]
    if bad:
        raise DatasetError(f"unknown subjects {bad}; the data set has subjects 1..10")
    recordings = load_recordings()
    return {s: recordings_to_device(s, (r for r in recordings if r.subject == s), task) for s in wanted}


def pooled(devices: Iterable[DeviceData]) -> tuple[np.ndarray, np.ndarray]:
    """All devices' samples in one array pair (for centralised reference training)."""
    items = list(devices)
    return np.concatenate([d.x for d in items]), np.concatenate([d.y for d in items])


class LiveReplay:
    """Recorded windows given out in time, as if a sensor were producing them now: window ``i``
    (counting from the first call) ends at ``t0 + i * period``; a call returns the windows that
    ended since the last one (at most ``keep``, the newest; the others are counted as dropped).
    ``x`` is cycled from ``offset`` on."""

    def __init__(
        self, x: np.ndarray, task: TaskSpec, offset: int, t0: float, keep: int = DEFAULT_LIVE_WINDOWS
    ) -> None:
        if x.shape[0] == 0:
            raise DatasetError("no windows to replay")
        rate = task.features.sample_rate_hz or SAMPLE_RATE_HZ
        window = task.features.window
        self.x = x
        self.spec = task.features
        self.period_s = (window.step if window is not None else 1) / rate
        self.span_s = ((window.size if window is not None else 1) - 1) / rate
        self.offset = offset % x.shape[0]
        self.t0 = t0
        self.keep = keep
        self.given = 0  # windows handed out or dropped so far

    def due(self, now: float) -> LiveWindows:
        total = int((now - self.t0) / self.period_s) + 1 if now >= self.t0 else 0
        new = range(self.given, max(self.given, total))
        dropped = max(0, len(new) - self.keep)
        windows = []
        for i in new[dropped:]:
            end = self.t0 + i * self.period_s
            features = self.x[(self.offset + i) % self.x.shape[0]]
            windows.append(LiveWindow(features, int((end - self.span_s) * 1e9), int(end * 1e9), self.spec))
        self.given = max(self.given, total)
        return LiveWindows(tuple(windows), dropped)


class HarWatchSource:
    """One subject of the recorded data set as an agent's data source (``[data] source =
    "har-watch"``: tests and comparisons without EdgeX); loaded once per task. Its live windows
    replay the test subjects' windows in time (:class:`LiveReplay`)."""

    def __init__(self, subject: int, clock: Callable[[], float] = time.time) -> None:
        self.subject = subject
        self.clock = clock
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._replays: dict[str, LiveReplay] = {}

    def start(self) -> None:
        return None

    def stop(self) -> None:
        return None

    def training_data(self, task: TaskSpec) -> tuple[np.ndarray, np.ndarray]:
        if task.sha256() not in self._cache:
            data = load_devices(task, [self.subject])[self.subject]
            self._cache[task.sha256()] = (data.x, data.y)
        return self._cache[task.sha256()]

    def available(self) -> int | None:
        return None  # known once a round names the task

    def report(self) -> dict[str, Any] | None:
        return None

    def live_windows(self, task: TaskSpec | None) -> LiveWindows:
        """The test subjects' windows for ``task`` (the verified model's) that are due now; none
        before a model names the task. Each subject starts its replay at its own place."""
        if task is None:
            return NO_LIVE_WINDOWS
        replay = self._replays.get(task.sha256())
        if replay is None:
            x, _ = pooled(load_devices(task, TEST_SUBJECTS).values())
            offset = (self.subject - 1) * x.shape[0] // len(SUBJECTS)
            replay = self._replays[task.sha256()] = LiveReplay(x, task, offset, self.clock())
        return replay.due(self.clock())
