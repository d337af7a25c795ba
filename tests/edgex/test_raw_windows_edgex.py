"""Raw-window tasks (``statistics = ["raw"]``, tasks/har-watch-raw.toml) on the EdgeX path.

The smartwatch data set's recordings go through what an EdgeX device service publishes (the
simulator's events, encoded in each wire format and decoded again) or through the core-data
double (checked against the EdgeX OpenAPI in tests/edgex/test_edgex_core_data.py) into a real
:class:`EdgeXIngest` and a real sample store. What the store then holds must be, byte for byte,
what the data-set loader (``fedge.lab.har_watch``, used by ``fedge demo --data direct`` and
``fedge train-local``) computes from the same recordings: the promise of
``fedge.agent.features``. The statistics task (tasks/har-watch.toml) is checked the same way.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedge.agent.edgex.core_data import CoreDataClient
from fedge.agent.edgex.ingest import FIRST_BACKFILL_S, STORE_WARN_BYTES, BackfillCursor, EdgeXIngest
from fedge.agent.edgex.profile import check_task_against_profile, load_profile
from fedge.agent.edgex.readings import Event, Reading
from fedge.agent.edgex.samples import SampleBuilder
from fedge.agent.edgex.wire import (
    FLOAT_STYLE_BY_VERSION,
    decode_message,
    edgex_event_topic,
    encode_envelope,
    event_to_dto,
)
from fedge.agent.features import extract_features
from fedge.agent.sample_store import SampleStore
from fedge.lab import har_watch
from fedge.lab.edgex_core_data_server import CoreDataServer
from fedge.lab.edgex_simulate import SERVICE, SimulateOptions, replay_events
from fedge.protocol.task import TaskSpec, parse_task_spec, task_spec_from_dict

REPO = Path(__file__).resolve().parents[2]
RAW_TASK = REPO / "tasks" / "har-watch-raw.toml"
STATS_TASK = REPO / "tasks" / "har-watch.toml"
PROFILE = REPO / "edgex_profiles" / "wearable-imu.yaml"
START_NS = 1_700_000_000 * 10**9
DEVICE = "watch-01"
LOGGER = "fedge.agent.edgex"


@pytest.fixture(scope="module")
def raw_task() -> TaskSpec:
    return parse_task_spec(RAW_TASK.read_text())


def _events(max_rows: int | None, version: str = "v4") -> list[Event]:
    options = SimulateOptions(
        broker_url="mqtt://127.0.0.1:1", subjects=(1,), max_rows=max_rows, start_ns=START_NS, version=version
    )
    events, _, _ = replay_events(options)
    return list(events)


def _loader(task: TaskSpec, max_rows: int | None) -> har_watch.DeviceData:
    """The data-set loader on subject 1's first ``max_rows`` rows, recording by recording, as the
    simulator replays them (it stops mid-recording at ``max_rows``)."""
    recordings: list[har_watch.Recording] = []
    left = max_rows if max_rows is not None else 10**12
    for rec in har_watch.load_recordings():
        if rec.subject == 1 and left > 0:
            recordings.append(har_watch.Recording(1, rec.readings[:left], rec.label))
            left -= min(left, rec.readings.shape[0])
    return har_watch.recordings_to_device(1, recordings, task)


def _ingest(
    root: Path,
    task: TaskSpec,
    core_data: CoreDataClient | None = None,
    max_samples: int = 100_000,
    live: bool = False,
    first_backfill_s: float = FIRST_BACKFILL_S,
) -> EdgeXIngest:
    root.mkdir(parents=True, exist_ok=True)
    store = SampleStore(root / "samples.sqlite", max_samples, 0)  # 0: keep samples of any age
    return EdgeXIngest(
        DEVICE,
        task,
        store,
        {},
        None,
        "edgex",
        core_data,
        BackfillCursor(root / "cursor.json"),
        clock=lambda: START_NS / 1e9,
        first_backfill_s=first_backfill_s,
        live=live,
    )


@pytest.fixture()
def closing() -> Iterator[list[EdgeXIngest]]:
    made: list[EdgeXIngest] = []
    yield made
    for ingest in made:
        ingest.store.close()


# --- the task file ---------------------------------------------------------------------------


def test_the_raw_har_task_is_the_har_task_on_raw_windows(raw_task: TaskSpec, har_task: TaskSpec) -> None:
    """Same resources, windows, label, model type and training as tasks/har-watch.toml: only the
    features differ, 600 readings instead of 48 statistics; and it fits the wearable-IMU profile."""
    assert raw_task.name == "har-watch-raw"
    assert raw_task.input_dim == 600 and raw_task.features.raw_shape == (6, 100)
    assert raw_task.layer_sizes == (600, 64, 32, 7) and raw_task.model.type == "mlp"
    raw, har = raw_task.to_dict(), har_task.to_dict()
    assert raw["features"]["window"].pop("statistics") == ["raw"]
    har["features"]["window"].pop("statistics")
    for key in ("features", "label", "model", "training"):
        assert raw[key] == har[key], key
    check_task_against_profile(raw_task, load_profile(PROFILE.read_text()))


# --- the stream builder ----------------------------------------------------------------------


def test_raw_windows_from_a_stream_keep_leftover_rows_for_the_next_call() -> None:
    """docs/task-spec.md's example, as readings: rows (a, b) = (1, 10) ... arrive in two calls;
    the rows after the last complete window wait in the builder and start the next window."""
    task = task_spec_from_dict(
        {
            "task": {"name": "tiny-raw"},
            "features": {
                "resources": ["a", "b"],
                "sample_rate_hz": 50,
                "window": {"size": 3, "step": 2, "statistics": ["raw"]},
            },
            "label": {"resource": "label", "classes": ["x", "y"]},
            "model": {"kind": "classification", "hidden": [4]},
            "training": {"optimizer": "sgd", "learning_rate": 0.1, "batch_size": 4, "local_epochs": 1},
        }
    )
    period = 20_000_000

    def rows(first: int, last: int) -> list[Reading]:
        out: list[Reading] = []
        for i in range(first, last + 1):
            t = START_NS + i * period
            out += [
                Reading(DEVICE, "a", "p", "Float32", float(i), t),
                Reading(DEVICE, "b", "p", "Float32", float(10 * i), t),
                Reading(DEVICE, "label", "p", "String", "y" if i >= 4 else "x", t),
            ]
        return out

    builder = SampleBuilder(task, device=DEVICE)
    first = builder.add(rows(1, 6)) + builder.flush()
    assert [s.features.tolist() for s in first] == [[1, 2, 3, 10, 20, 30], [3, 4, 5, 30, 40, 50]]
    assert [s.label for s in first] == [0, 1]
    assert builder.buffered["window_rows"] == 2  # rows 5 and 6: kept, not dropped
    second = builder.add(rows(7, 7)) + builder.flush()
    assert [s.features.tolist() for s in second] == [[5, 6, 7, 50, 60, 70]]
    assert (second[0].start_ns, second[0].end_ns) == (START_NS + 5 * period, START_NS + 7 * period)
    assert builder.quality.samples == 3 and builder.quality.rows == 7


# --- the EdgeX ingest equals the data-set loader ---------------------------------------------


@pytest.mark.parametrize(
    ("task_file", "version", "content_type", "max_rows"),
    [
        (RAW_TASK, "v4", "application/json", None),  # all of subject 1: 14 recordings, 561 windows
        (RAW_TASK, "v3", "application/json", 4000),
        (RAW_TASK, "v4", "application/cbor", 4000),
        (STATS_TASK, "v4", "application/json", 4000),
    ],
    ids=["raw-v4-json", "raw-v3-json", "raw-v4-cbor", "statistics-v4-json"],
)
def test_the_edgex_bus_path_stores_exactly_the_data_set_loaders_samples(
    tmp_path: Path,
    closing: list[EdgeXIngest],
    task_file: Path,
    version: str,
    content_type: str,
    max_rows: int | None,
) -> None:
    task = parse_task_spec(task_file.read_text())
    ingest = _ingest(tmp_path, task)
    closing.append(ingest)
    style = FLOAT_STYLE_BY_VERSION[version]
    for event in _events(max_rows, version):
        topic = edgex_event_topic("edgex", SERVICE, event.profile, event.device, event.source)
        payload = encode_envelope(event, version, topic, content_type=content_type, float_style=style)
        decoded = decode_message(payload)  # what the agent's bus subscriber does with each message
        assert decoded.rejected == []
        ingest.feed(r for e in decoded.events for r in e.readings)  # what the ingest's worker does
    ingest._flush()  # the stream paused
    x, y = ingest.training_data(task)
    expected = _loader(task, max_rows)

    assert x.shape == expected.x.shape == (expected.x.shape[0], task.input_dim)
    assert x.shape[0] == (561 if max_rows is None else 77)
    assert x.tobytes() == expected.x.tobytes()  # byte-identical features
    assert y.dtype == expected.y.dtype == np.int32 and np.array_equal(y, expected.y)
    report = ingest.report()
    assert report["stored_samples"] == report["quality"]["samples"] == x.shape[0]
    if task.features.raw_shape is not None:
        # The layout docs/task-spec.md gives: window k, resource c, reading t.
        windows = x.reshape(-1, *task.features.raw_shape)
        first = next(r for r in har_watch.load_recordings() if r.subject == 1)
        assert windows[1, 3].tolist() == first.readings[50:150, 3].astype(np.float32).tolist()  # gyro_x


def test_a_core_data_backfill_stores_the_same_raw_windows(
    tmp_path: Path, closing: list[EdgeXIngest], raw_task: TaskSpec
) -> None:
    max_rows = 3000
    with CoreDataServer() as server:
        for event in _events(max_rows):
            server.add_event(json.loads(json.dumps(event_to_dto(event, FLOAT_STYLE_BY_VERSION["v4"]))))
        ingest = _ingest(tmp_path, raw_task, CoreDataClient(server.url), first_backfill_s=0)
        closing.append(ingest)
        ingest._backfill()
        ingest._flush()
    x, y = ingest.training_data(raw_task)
    expected = _loader(raw_task, max_rows)
    assert ingest.backfilled_readings == max_rows * 7  # six resources and the label a row
    assert x.shape == (expected.x.shape[0], 600) and x.shape[0] > 40
    assert x.tobytes() == expected.x.tobytes()
    assert np.array_equal(y, expected.y)


def test_live_prediction_windows_of_a_raw_task_are_its_training_windows(
    tmp_path: Path, closing: list[EdgeXIngest], raw_task: TaskSpec
) -> None:
    ingest = _ingest(tmp_path, raw_task, live=True)
    closing.append(ingest)
    for event in _events(1500):
        ingest.feed(event.readings)
    ingest._flush()
    x, _ = ingest.training_data(raw_task)
    taken = ingest.live_windows(None)
    assert len(taken.windows) == x.shape[0] == 29  # (1500 - 100) // 50 + 1: under the 32 kept
    assert np.stack([w.features for w in taken.windows]).tobytes() == x.tobytes()
    assert {w.spec for w in taken.windows} == {raw_task.features}


# --- the start-up warning about a large store ------------------------------------------------


def test_a_store_too_large_for_raw_windows_is_warned_about_at_start_naming_the_setting(
    tmp_path: Path,
    closing: list[EdgeXIngest],
    raw_task: TaskSpec,
    har_task: TaskSpec,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    closing.append(_ingest(tmp_path / "stats", har_task, max_samples=200_000))  # the default: 38 MB
    closing.append(_ingest(tmp_path / "fits", raw_task, max_samples=111_848))  # 268,435,200 bytes
    assert 111_848 * 2400 <= STORE_WARN_BYTES < 111_849 * 2400
    assert [r for r in caplog.records if "store_max_samples" in r.getMessage()] == []

    closing.append(_ingest(tmp_path / "default", raw_task, max_samples=200_000))
    [record] = [r for r in caplog.records if "store_max_samples" in r.getMessage()]
    assert record.levelno == logging.WARNING and record.name == LOGGER
    assert record.getMessage() == (
        "[edgex] store_max_samples = 200000: a full store of task 'har-watch-raw' (600 features a "
        "sample) holds 480 MB, and every round loads it all into memory; if the device cannot spare "
        "that, lower [edgex] store_max_samples (111848 stays within 256 MiB; docs/task-spec.md, "
        '"Raw windows")'
    )


# --- data quality on raw windows -------------------------------------------------------------


def test_nan_and_out_of_range_readings_never_reach_a_raw_window(raw_task: TaskSpec) -> None:
    """A NaN gyro reading and an accelerometer reading outside the profile's limits are dropped
    at the screen; their rows are incomplete, and the windows are those of the rows kept."""
    events = _events(400)
    readings = [r for e in events for r in e.readings]
    t_nan, t_far = readings[7 * 120].origin_ns, readings[7 * 260].origin_ns  # rows 120 and 260
    bad = [
        Reading(r.device, r.resource, r.profile, r.value_type, float("nan"), r.origin_ns)
        if (r.resource, r.origin_ns) == ("gyro_y", t_nan)
        else Reading(r.device, r.resource, r.profile, r.value_type, 99.0, r.origin_ns)
        if (r.resource, r.origin_ns) == ("accel_z", t_far)
        else r
        for r in readings
    ]
    limits = {"accel_z": (-20.0, 20.0)}
    builder = SampleBuilder(raw_task, limits, device=DEVICE)
    samples = builder.add(bad) + builder.flush()

    quality = builder.quality
    assert (quality.not_finite, quality.out_of_range, quality.incomplete, quality.rows) == (1, 1, 2, 398)
    x = np.stack([s.features for s in samples])
    assert np.all(np.isfinite(x)) and x.reshape(-1, 6, 100)[:, 2].max() <= 20.0
    # The windows are those of the 398 kept rows, one after another (the holes are one row each,
    # shorter than max_gap_ns): the loader's windows of the same rows.
    kept = np.delete(_loader_rows(400), [120, 260], axis=0)
    expected = extract_features(kept, raw_task.features)
    assert x.tobytes() == expected.tobytes()
    assert len(samples) == 6  # (398 - 100) // 50 + 1


def _loader_rows(rows: int) -> np.ndarray:
    first = next(r for r in har_watch.load_recordings() if r.subject == 1)
    return first.readings[:rows]
