"""The EdgeX ingest: readings as EdgeX publishes them become stored samples, and every sample the
store does not keep is counted by reason in ``report()`` and logged once, naming the setting.

No bus and no core-data: events are decoded from the JSON EdgeX publishes and handed to
:meth:`EdgeXIngest.feed`, which is what the ingest's worker does with each bus message.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from fedge.agent.edgex.ingest import IDLE_FLUSH_S, BackfillCursor, EdgeXIngest
from fedge.agent.edgex.readings import Event, Reading
from fedge.agent.edgex.wire import decode_message
from fedge.agent.sample_store import SampleStore
from fedge.protocol.task import TaskSpec, task_spec_from_dict

NOW = 1_700_000_000.0
NS = 1_000_000_000
MINUTE = 60
DAY = 24 * 3600
YEAR = 365 * DAY
DEVICE = "room-101-2021-03-04"
SENSORS = ("temperature", "humidity", "light", "co2", "humidity_ratio")
DEFAULT_MAX_AGE_S = 30 * DAY  # [edgex] store_max_age_s's default
LOGGER = "fedge.agent.edgex"


def occupancy_task(classes: Sequence[str] = ("false", "true")) -> TaskSpec:
    """Five Float64 room sensors; the label is a Bool resource, one sample per reading."""
    return task_spec_from_dict(
        {
            "task": {"name": "room-occupancy"},
            "features": {"resources": list(SENSORS)},
            "label": {"resource": "occupancy", "classes": list(classes)},
            "model": {"kind": "classification", "hidden": [8]},
            "training": {"optimizer": "sgd", "learning_rate": 0.1, "batch_size": 4, "local_epochs": 1},
        }
    )


def event_json(origin_ns: int, values: Sequence[float], occupied: str) -> bytes:
    """One event as an EdgeX device service publishes it: every value a string, Bool as true/false."""
    readings = [(name, "Float64", f"{value:e}") for name, value in zip(SENSORS, values, strict=True)]
    readings.append(("occupancy", "Bool", occupied))
    return json.dumps(
        {
            "apiVersion": "v3",
            "id": str(uuid.uuid4()),
            "deviceName": DEVICE,
            "profileName": "Room-Sensor",
            "sourceName": "all",
            "origin": origin_ns,
            "readings": [
                {
                    "id": str(uuid.uuid4()),
                    "origin": origin_ns,
                    "deviceName": DEVICE,
                    "resourceName": name,
                    "profileName": "Room-Sensor",
                    "valueType": value_type,
                    "value": text,
                }
                for name, value_type, text in readings
            ],
        }
    ).encode()


def readings_of(payloads: Sequence[bytes]) -> list[Reading]:
    out: list[Reading] = []
    for payload in payloads:
        result = decode_message(payload)
        assert result.rejected == []
        out += [r for event in result.events for r in event.readings]
    return out


def minutes(start_s: float, labels: Sequence[str]) -> list[Reading]:
    """One event a minute from ``start_s`` (Unix seconds); row i's temperature is 20 + i."""
    payloads = [
        event_json(round((start_s + i * MINUTE) * NS), [20.0 + i, 40.0, 300.0, 600.0, 0.004], label)
        for i, label in enumerate(labels)
    ]
    return readings_of(payloads)


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock() -> Clock:
    return Clock()


@contextmanager
def make_ingest(
    tmp_path: Path,
    task: TaskSpec,
    clock: Clock,
    max_age_s: float = DEFAULT_MAX_AGE_S,
    max_samples: int = 1000,
) -> Iterator[EdgeXIngest]:
    with SampleStore(tmp_path / "samples.sqlite", max_samples, max_age_s) as store:
        cursor = BackfillCursor(tmp_path / "cursor.json")
        yield EdgeXIngest(DEVICE, task, store, {}, None, "edgex", None, cursor, clock=clock)


def feed_all(ingest: EdgeXIngest, readings: list[Reading]) -> None:
    ingest.feed(readings)
    ingest._flush()  # what the worker does once the stream pauses


def drop_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and "sample store" in r.getMessage()]


NO_DROPS = {"duplicate": 0, "expired": 0, "evicted_age": 0, "evicted_count": 0, "store_error": 0}


# --- a Bool label ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("classes", "expected"),
    [
        (("false", "true"), [0, 1, 1, 0, 1]),
        (("vacant", "occupied"), [0, 1, 1, 0, 1]),  # unnamed: false is the first class
        (("TRUE", "FALSE"), [1, 0, 0, 1, 0]),  # named: by name, whatever the order
    ],
)
def test_a_bool_label_resource_gives_stored_samples(
    tmp_path: Path, clock: Clock, classes: tuple[str, str], expected: list[int]
) -> None:
    task = occupancy_task(classes)
    with make_ingest(tmp_path, task, clock) as ingest:
        # EdgeX's Go ParseBool spellings: a CSV replayed through a device service may send 1/0.
        feed_all(ingest, minutes(NOW - DAY, ["false", "true", "1", "0", "True"]))
        x, y = ingest.training_data(task)
        report = ingest.report()
    assert y.dtype == np.int32 and y.tolist() == expected
    assert x[:, 0].tolist() == [20.0, 21.0, 22.0, 23.0, 24.0]
    assert report["stored_samples"] == report["stored_this_run"] == 5
    assert report["quality"]["unknown_label"] == 0 and report["quality"]["samples"] == 5
    assert report["store"] == NO_DROPS


# --- old data: counted by reason, logged once --------------------------------------------------


def test_samples_older_than_store_max_age_are_counted_and_logged_once(
    tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    task = occupancy_task()
    caplog.set_level(logging.INFO, logger=LOGGER)
    with make_ingest(tmp_path, task, clock) as ingest:
        start = NOW - 3 * YEAR  # a building's log from three years ago, replayed
        ingest.feed(minutes(start, ["false", "true", "true"]))
        ingest.feed(minutes(start + 3 * MINUTE, ["false", "false"]))
        ingest._flush()
        report = ingest.report()
    assert report["stored_samples"] == report["stored_this_run"] == 0
    assert report["quality"]["samples"] == 5
    assert report["store"] == {**NO_DROPS, "expired": 5}
    [record] = drop_records(caplog)
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert message.startswith(
        f"sample store: dropped 2 sample(s) of {DEVICE} older than [edgex] store_max_age_s = 2592000 s "
        "(30.0 days): expired 2 (too old when built), evicted_age 0 (aged out); the oldest was "
    )
    assert "(1095.0 days) old" in message
    assert "raise [edgex] store_max_age_s or set it to 0 (keep samples of any age)" in message


def test_store_max_age_zero_keeps_old_samples(
    tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    task = occupancy_task()
    caplog.set_level(logging.INFO, logger=LOGGER)
    with make_ingest(tmp_path, task, clock, max_age_s=0) as ingest:
        feed_all(ingest, minutes(NOW - 3 * YEAR, ["false", "true", "true", "false"]))
        _, y = ingest.training_data(task)
        report = ingest.report()
    assert y.tolist() == [0, 1, 1, 0]
    assert report["stored_samples"] == 4
    assert report["store"] == NO_DROPS
    assert drop_records(caplog) == []


def test_aged_out_and_over_count_samples_are_counted_and_each_kind_logged_once(
    tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    task = occupancy_task()
    caplog.set_level(logging.INFO, logger=LOGGER)
    with make_ingest(tmp_path, task, clock, max_age_s=3600, max_samples=4) as ingest:
        feed_all(ingest, minutes(NOW - 10 * MINUTE, ["false", "true", "true"]))
        assert ingest.report()["store"] == NO_DROPS
        clock.now += 2 * 3600  # the first three are now over an hour old
        feed_all(ingest, minutes(clock.now - 10 * MINUTE, ["false", "true", "true", "false", "true", "true"]))
        clock.now += 2 * 3600
        feed_all(ingest, minutes(clock.now - 10 * MINUTE, ["true"]))
        report = ingest.report()
    assert report["stored_samples"] == 1
    assert report["store"] == {**NO_DROPS, "evicted_age": 7, "evicted_count": 2}
    age, count = drop_records(caplog)
    assert age.levelno == logging.WARNING
    assert age.getMessage().startswith(
        f"sample store: dropped 3 sample(s) of {DEVICE} older than [edgex] store_max_age_s = 3600 s "
        "(0.0 days): expired 0 (too old when built), evicted_age 3 (aged out); the oldest was 7800 s"
    )
    assert count.levelno == logging.INFO
    assert count.getMessage().startswith(
        # the first add of six: five rows were final, one more than fits (the sixth came at the flush)
        "sample store: full at [edgex] store_max_samples = 4; evicted the 1 oldest sample(s) "
        "(evicted_count). Raise [edgex] store_max_samples to keep more."
    )


def test_samples_lost_to_a_store_error_are_counted_before_the_error_is_reported(
    tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: the store raises (a full disk, a damaged file) while adding a batch.
    The error still reaches the worker (which logs it and sets last_error), and the batch's
    samples are counted as lost instead of disappearing."""
    from fedge.agent.sample_store import SampleStoreError

    task = occupancy_task()
    with make_ingest(tmp_path, task, clock) as ingest:

        def full_disk(*args: object, **kwargs: object) -> None:
            raise SampleStoreError("sample store: database or disk is full")

        monkeypatch.setattr(ingest.store, "add_counted", full_disk)
        with pytest.raises(SampleStoreError, match="disk is full"):
            feed_all(ingest, minutes(NOW - DAY, ["false", "true", "true"]))
        report = ingest.report()
    assert report["store"] == {**NO_DROPS, "store_error": report["quality"]["samples"]}
    assert report["store"]["store_error"] >= 1 and report["stored_this_run"] == 0


# --- waking only for work -------------------------------------------------------------------------


class RecordingInbox(queue.Queue[list[Event] | None]):
    """The ingest's inbox, recording the timeout of every wait of the ingest thread."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float | None] = []
        self.waiting = threading.Event()

    def get(self, block: bool = True, timeout: float | None = None) -> list[Event] | None:
        if block:  # get_nowait (taking what is queued behind an event) never waits
            self.waits.append(timeout)
            if timeout is None:
                self.waiting.set()
        return super().get(block, timeout)


def test_the_ingest_thread_sleeps_until_events_come_and_flushes_the_reorder_buffer_once_after_a_pause(
    tmp_path: Path, clock: Clock
) -> None:
    with make_ingest(tmp_path, occupancy_task(), clock) as ingest:
        inbox = RecordingInbox()
        ingest.inbox = inbox
        ingest.start()
        try:
            assert inbox.waiting.wait(5)  # nothing to do: one wait without a timeout
            assert inbox.waits == [None]
            inbox.waiting.clear()
            events = decode_message(
                event_json(round(NOW * NS), [21.0, 40.0, 300.0, 600.0, 0.004], "true")
            ).events
            inbox.put(events)
            # The event, then one timed wait for the pause (the reorder buffer holds its row), the
            # flush, and a wait without a timeout again: no polling in between.
            assert inbox.waiting.wait(5)
            assert len(inbox.waits) == 3
            assert inbox.waits[0] is None and inbox.waits[2] is None
            assert inbox.waits[1] is not None and 0 < inbox.waits[1] <= IDLE_FLUSH_S
            assert ingest.store.stats(NOW).per_task.get(ingest.key, 0) == 1  # flushed after the pause
        finally:
            ingest.stop()


# --- a queued backlog ---------------------------------------------------------------------------


def test_a_queued_backlog_is_taken_in_batches_and_stored_as_event_by_event(
    tmp_path: Path, clock: Clock
) -> None:
    """Events queued faster than they are stored (a replayed backlog) are taken several at a
    time, up to BATCH_READINGS readings, and give the samples and counters one event at a time
    gives; a wake-up (a backfill request) and the stop behind them end a batch, nothing lost."""
    labels = ["true", "false"] * 300
    payloads = [
        event_json(round((NOW + i * MINUTE) * NS), [20.0 + i, 40.0, 300.0, 600.0, 0.004], label)
        for i, label in enumerate(labels)
    ]
    events = [decode_message(p).events for p in payloads]
    reports = []
    for name, batched in (("one-by-one", False), ("queued", True)):
        (tmp_path / name).mkdir()
        with make_ingest(tmp_path / name, occupancy_task(), clock) as ingest:
            if batched:

                def produce(ingest: EdgeXIngest = ingest) -> None:
                    """paho's thread: blocks while the bounded queue is full (back-pressure)."""
                    for i, item in enumerate(events):
                        ingest.inbox.put(item)
                        if i == 400:
                            ingest.inbox.put([])  # a wake-up in the middle of the backlog
                    ingest.inbox.put(None)

                producer = threading.Thread(target=produce)
                producer.start()
                ingest._run()  # the ingest thread's loop, here: it stops at the None
                producer.join(10)
                assert not producer.is_alive() and ingest.inbox.empty()
            else:
                for item in events:
                    ingest.feed_events(item)
            ingest._flush()
            reports.append(ingest.report())
            stored = ingest.store.load(ingest.key)
            reports[-1]["samples"] = (stored[0].tobytes(), stored[1].tobytes())
    assert reports[0] == reports[1]
    assert reports[0]["stored_this_run"] == len(labels)
    assert reports[0]["quality"]["readings"] == 6 * len(labels)


def test_stopping_in_a_backlog_stores_what_was_queued_and_never_hangs_paho_s_thread(
    tmp_path: Path, clock: Clock
) -> None:
    """The queue is bounded, so paho's EdgeX thread may be waiting to queue a message when the
    agent stops: the ingest thread keeps taking (and storing) what is queued until the bus has
    stopped and stop's None comes, so that thread finishes, stop returns and nothing is lost."""
    labels = ["true", "false"] * 300
    payloads = [
        event_json(round((NOW + i * MINUTE) * NS), [20.0 + i, 40.0, 300.0, 600.0, 0.004], label)
        for i, label in enumerate(labels)
    ]
    events = [decode_message(p).events for p in payloads]
    (tmp_path / "whole").mkdir()
    (tmp_path / "stopped").mkdir()
    with make_ingest(tmp_path / "whole", occupancy_task(), clock) as reference:
        for item in events:
            reference.feed_events(item)
        reference._flush()
        expected = reference.report()["stored_this_run"]
    with make_ingest(tmp_path / "stopped", occupancy_task(), clock) as ingest:
        ingest._thread.start()  # the ingest thread alone: paho's thread is the producer below
        producer = threading.Thread(target=lambda: [ingest._on_events(item) for item in events], daemon=True)
        producer.start()
        while ingest.inbox.qsize() < 32 and producer.is_alive():  # the queue fills: paho would wait
            time.sleep(0.001)
        ingest.stop_requested.set()  # stop() begins: the bus stops (its thread finishes) first
        producer.join(30)
        assert not producer.is_alive()
        ingest.stop()  # then the None; the ingest thread ends after what was queued
        assert not ingest._thread.is_alive()
        ingest._flush()
        assert ingest.report()["stored_this_run"] == expected == len(labels)


def test_a_stopping_agent_whose_ingest_thread_ended_drops_the_message_with_a_log_line(
    tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """The ingest thread ended (it never started here) and the queue is full: paho's thread does
    not wait for ever once stop is requested; what it held is logged as not stored."""
    event = decode_message(event_json(round(NOW * NS), [20.0, 40.0, 300.0, 600.0, 0.004], "true")).events
    with make_ingest(tmp_path, occupancy_task(), clock) as ingest:
        for _ in range(32):
            ingest.inbox.put(event)
        ingest.stop_requested.set()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            ingest._on_events(event)  # returns: the test would hang here before
    assert [r.getMessage() for r in caplog.records if r.name == LOGGER] == [
        f"stopping: 6 EdgeX readings of {DEVICE} not stored (the ingest thread has ended); a core-data "
        "backfill ([edgex] core_data) reads them at the next start"
    ]
