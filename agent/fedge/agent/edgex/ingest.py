"""EdgeX -> samples -> local store, with a core-data backfill after every (re)connection.

One worker thread owns the :class:`SampleBuilder` and the store: bus events arrive on a
bounded queue; after each connection the worker first backfills from core-data everything
since the newest reading it has, then drains the queue, so readings that arrived during an
outage are neither lost (backfill) nor counted twice (the builder drops duplicates by
resource and origin). Raw readings never leave this process; only feature vectors and labels
are stored, and only on the device.

With ``live=True`` the worker also builds prediction windows from the same readings (an
unlabelled :class:`SampleBuilder`: the same screening, alignment and windows, no label needed)
and keeps the newest in a bounded :class:`~fedge.agent.live.LiveWindowBuffer`, which the agent's
worker drains with :meth:`EdgeXIngest.live_windows` to publish predictions. The training path
(builder, store, cursor) is the same with or without it.

No sample is dropped silently: the builder counts its drops (``quality`` in :meth:`EdgeXIngest.report`)
and the store's refusals and evictions are counted by reason under ``store``, the first of
each kind per run logged with the setting to change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from itertools import chain
from operator import attrgetter
from pathlib import Path
from typing import Any

import numpy as np

from fedge.agent.edgex.bus import EdgeXBusSubscriber
from fedge.agent.edgex.core_data import CoreDataClient
from fedge.agent.edgex.readings import Event, Reading
from fedge.agent.edgex.samples import Sample, SampleBuilder
from fedge.agent.live import NO_LIVE_WINDOWS, LiveWindow, LiveWindowBuffer, LiveWindows
from fedge.agent.sample_store import DROP_REASONS, AddOutcome, SampleStore
from fedge.protocol.bounded_json import BoundedJsonError, loads_bounded
from fedge.protocol.errors import FedgeError
from fedge.protocol.mqtt_settings import MqttSettings
from fedge.protocol.task import TaskSpec
from fedge.shell.files import atomic_write
from fedge.shell.storage_faults import StateDirWatch, StorageFault, storage_fault
from fedge.shell.threads import name_current_thread

#: The cursor is ``{"resume_ns": N}``; anything far bigger is not one.
MAX_CURSOR_BYTES = 4096

log = logging.getLogger("fedge.agent.edgex")
_ORIGIN = attrgetter("origin_ns")
_READINGS = attrgetter("readings")
#: Messages of decoded events waiting for the ingest thread at most. Past it paho's EdgeX thread
#: waits (back-pressure: the broker holds what follows), so a burst never becomes a heap of
#: decoded readings: 100,000 let a backlog hold 7-10 MiB of Reading objects the allocator kept
#: after; 32 messages (~11,000 readings of a 345-reading event) still fill every 4,096-reading
#: batch (measured: bench_agent_memory.py --ingest-queue; issue 18).
_QUEUE_LIMIT = 32
IDLE_FLUSH_S = 1.0
#: While stopping, the longest the ingest thread waits for the next item, and paho's EdgeX thread
#: between looks at whether the ingest thread is still there to take what it queues.
STOP_WAIT_S = 0.5
#: Readings the ingest thread takes from its queue at once at most (:meth:`EdgeXIngest._drain`).
BATCH_READINGS = 4096
#: With no reading stored yet, a first backfill reaches this far back.
FIRST_BACKFILL_S = 24 * 3600.0
#: Feature bytes of a full store (``store_max_samples`` x the task's features x 4) above which the
#: agent warns at start: a round loads every sample of the task into memory. The default store
#: (200,000 samples) of a 48-statistic task is 38 MB; of a raw-window task (600 inputs) 480 MB,
#: too much for a small board.
STORE_WARN_BYTES = 256 * 1024 * 1024


class BackfillCursor:
    """Where the next backfill starts, persisted atomically at most every few seconds (a stale
    cursor only re-reads windows the store already has, which it ignores)."""

    def __init__(self, path: Path, min_interval_s: float = 5.0) -> None:
        self.path = path
        self.min_interval_s = min_interval_s
        self._saved_at = float("-inf")

    def load(self) -> int | None:
        try:
            with self.path.open("rb") as f:
                raw = f.read(MAX_CURSOR_BYTES + 1)
            data = loads_bounded(raw, max_bytes=MAX_CURSOR_BYTES)
        except FileNotFoundError:
            return None
        except (OSError, BoundedJsonError) as exc:
            raise FedgeError(f"backfill cursor {self.path} is unreadable: {exc}") from None
        value = data.get("resume_ns") if isinstance(data, dict) else None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise FedgeError(f"backfill cursor {self.path} has no valid resume_ns")
        return value

    def save(self, origin_ns: int, now: float, force: bool = False) -> None:
        if not force and now - self._saved_at < self.min_interval_s:
            return
        try:
            atomic_write(self.path, json.dumps({"resume_ns": origin_ns}).encode("utf-8"))
        except OSError as exc:  # the old cursor stays: a backfill re-reads a little more
            found = storage_fault(exc)
            if found is not None:
                raise StorageFault("backfill cursor", self.path, *found) from None
            raise FedgeError(f"cannot write backfill cursor {self.path}: {exc.strerror}") from None
        self._saved_at = now


def task_key(task: TaskSpec) -> str:
    """Samples belong to a feature and label definition, not to a model or optimizer."""
    spec = {"features": task.to_dict()["features"], "label": task.to_dict()["label"]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


class EdgeXIngest:
    def __init__(
        self,
        device: str,
        task: TaskSpec,
        store: SampleStore,
        limits: Mapping[str, tuple[float | None, float | None]],
        bus_settings: MqttSettings | None,
        prefix: str,
        core_data: CoreDataClient | None,
        cursor: BackfillCursor,
        clock: Callable[[], float] = time.time,
        first_backfill_s: float = FIRST_BACKFILL_S,
        live: bool = False,
        label_units: str | None = None,
    ) -> None:
        self.device = device
        self.first_backfill_s = first_backfill_s
        self.task = task
        self.key = task_key(task)
        self.store = store
        full_bytes = store.max_samples * task.input_dim * 4
        if full_bytes > STORE_WARN_BYTES:
            log.warning(
                "[edgex] store_max_samples = %d: a full store of task %r (%d features a sample) holds "
                "%d MB, and every round loads it all into memory; if the device cannot spare that, "
                "lower [edgex] store_max_samples (%d stays within %d MiB; docs/task-spec.md, "
                '"Raw windows")',
                store.max_samples,
                task.name,
                task.input_dim,
                full_bytes // 1_000_000,
                STORE_WARN_BYTES // (task.input_dim * 4),
                STORE_WARN_BYTES // 2**20,
            )
        self.builder = SampleBuilder(task, limits, device=device)
        #: Prediction windows (``live``): the same windows from the features alone.
        self.live_builder = SampleBuilder(task, limits, device=device, labelled=False) if live else None
        self.live = LiveWindowBuffer()
        self.label_units = label_units
        self.live_errors = 0
        self._last_feed = time.monotonic()
        self._flushed = True
        self.core_data = core_data
        self.clock = clock
        self.cursor = cursor
        # Where a backfill resumes: the first row of the next window not yet stored. Resuming
        # on that row keeps the window grid of an uninterrupted stream, so after an outage the
        # stored windows are exactly those of a run without one (the store drops repeats).
        self.resume_ns = cursor.load()
        self.last_origin_ns: int | None = None
        rate = task.features.sample_rate_hz
        rows_per_step = task.features.window.step if task.features.window is not None else 1
        self.step_ns = int(rows_per_step * 1e9 / rate) if rate else None
        self.inbox: queue.Queue[list[Event] | None] = queue.Queue(maxsize=_QUEUE_LIMIT)
        self.backfill_needed = threading.Event()
        self.stop_requested = threading.Event()
        self.ignored_events = 0
        self.backfilled_readings = 0
        self.backfill_errors = 0
        self.last_error: str | None = None
        self.stored = 0
        #: This run's samples the store did not keep, by reason: already stored (``duplicate``)
        #: or dropped (:data:`fedge.agent.sample_store.DROP_REASONS`). In :meth:`report`.
        # store_error: samples lost because the store raised (a full disk, a damaged file).
        self.store_counts: dict[str, int] = dict.fromkeys(("duplicate", *DROP_REASONS, "store_error"), 0)
        self._logged_drops: set[str] = set()  # "age", "count": logged once per run
        # A full or read-only state directory: one line per episode, the lost samples counted
        # (store_error), the store tried again with the next batch.
        self.state_dir_watch = StateDirWatch(
            log,
            "[agent] state_dir",
            store.path.parent,
            "agent",
            "the samples it cannot store are dropped, counted in data.store.store_error of the device status",
        )
        self._thread = threading.Thread(target=self._run, name="fedge-edgex-ingest", daemon=True)
        #: Called (from the ingest thread) when new live windows are ready: the agent's worker
        #: sleeps until then instead of asking on a timer (:meth:`set_live_listener`).
        self._on_live: Callable[[], None] | None = None
        self.bus = (
            EdgeXBusSubscriber(bus_settings, prefix, self._on_events, on_connect=self._request_backfill)
            if bus_settings is not None
            else None
        )

    # --- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        if self.core_data is not None:
            self._request_backfill()  # at first start too: catch up before going live
        self._thread.start()
        if self.bus is not None:
            self.bus.start()

    def stop(self) -> None:
        self.stop_requested.set()
        if self.bus is not None:
            self.bus.stop()
        try:  # the ingest thread takes what is queued, then this; one that ended takes nothing
            self.inbox.put(None, timeout=10)
        except queue.Full:
            log.warning("stopping: the ingest thread of %s takes no more readings", self.device)
        self._thread.join(timeout=10)
        if self.resume_ns is not None:
            try:
                self.cursor.save(self.resume_ns, self.clock(), force=True)
            except FedgeError as exc:  # the next backfill starts a little earlier
                log.warning("%s", exc)

    # --- inputs ------------------------------------------------------------------------------

    def _request_backfill(self) -> None:
        """A (re)connection: read what core-data holds since the cursor. The ingest thread sleeps
        until there is work, so it is woken (an empty item) rather than left to notice."""
        self.backfill_needed.set()
        self.inbox.put([])

    def _on_events(self, events: list[Event]) -> None:
        """paho's EdgeX thread: queues this device's events for the ingest thread. The queue is
        bounded: a full one makes this thread wait (back-pressure: the broker holds what follows),
        never drop; once the agent is stopping and the ingest thread no longer takes any (it
        failed, or a disk stopped answering), the events are logged as not stored and the thread
        goes on, so stopping never hangs on it (a core-data backfill reads them at the next start)."""
        mine = [e for e in events if e.device == self.device]
        if len(mine) != len(events):
            self.ignored_events += len(events) - len(mine)
        if not mine:
            return
        while True:
            try:
                self.inbox.put(mine, timeout=STOP_WAIT_S)
                return
            except queue.Full:
                if self.stop_requested.is_set() and not self._thread.is_alive():
                    log.warning(
                        "stopping: %d EdgeX readings of %s not stored (the ingest thread has ended); "
                        "a core-data backfill ([edgex] core_data) reads them at the next start",
                        sum(map(len, map(_READINGS, mine))),
                        self.device,
                    )
                    return

    def feed(self, readings: Iterable[Reading]) -> int:
        """Builds samples from readings and stores them; returns how many were stored."""
        readings = list(readings)
        samples = self.builder.add(readings)
        if self.live_builder is not None:
            self._live(lambda b: b.add(readings))
        self._last_feed = time.monotonic()
        self._flushed = False
        return self._store(samples, readings)

    def feed_events(self, events: list[Event]) -> int:
        """:meth:`feed` of the events' readings, in order (what the ingest thread does with the
        events the bus queued)."""
        return self.feed(chain.from_iterable(map(_READINGS, events)))

    def _store(self, samples: list[Sample], readings: list[Reading]) -> int:
        stored = 0
        if samples:
            try:
                outcome = self.store.add_counted(samples, self.key, self.clock())
            except StorageFault as exc:  # full or read-only: counted, logged once, tried again next batch
                self.store_counts["store_error"] += len(samples)
                self.last_error = self.state_dir_watch.failed(exc)
                return 0
            except FedgeError:
                self.store_counts["store_error"] += len(samples)  # lost: counted, then reported
                raise
            stored = outcome.inserted
            self._count_drops(outcome)
        self.stored += stored
        if readings:
            newest = max(map(_ORIGIN, readings))
            if self.last_origin_ns is None or newest > self.last_origin_ns:
                self.last_origin_ns = newest
        if samples:
            nxt = max(s.start_ns for s in samples) + (self.step_ns or 1)
            if self.resume_ns is None or nxt > self.resume_ns:
                self.resume_ns = nxt
                try:
                    self.cursor.save(nxt, self.clock())
                except StorageFault as exc:  # the samples are stored; the cursor is saved later
                    self.last_error = self.state_dir_watch.failed(exc)
                    return stored
            self._wrote()
        return stored

    def _wrote(self) -> None:
        """The store took a batch: a full or read-only episode is over."""
        problem = self.state_dir_watch.problem
        if self.state_dir_watch.wrote() and self.last_error == problem:
            self.last_error = None

    def _count_drops(self, outcome: AddOutcome) -> None:
        """Counts what the store did not keep; logs the first drop of each kind this run."""
        self.store_counts["duplicate"] += outcome.duplicate
        for reason in DROP_REASONS:
            self.store_counts[reason] += getattr(outcome, reason)
        aged = outcome.expired + outcome.evicted_age
        if aged and "age" not in self._logged_drops:
            self._logged_drops.add("age")
            age_s = outcome.oldest_age_s or 0.0
            max_age_s = self.store.max_age_s
            log.warning(
                "sample store: dropped %d sample(s) of %s older than [edgex] store_max_age_s = %.0f s "
                "(%.1f days): expired %d (too old when built), evicted_age %d (aged out); the oldest was "
                "%.0f s (%.1f days) old. To keep older data, such as a replayed historical export, raise "
                "[edgex] store_max_age_s or set it to 0 (keep samples of any age). Further drops are "
                "counted in the status (data.store), not logged",
                aged,
                self.device,
                max_age_s,
                max_age_s / 86400,
                outcome.expired,
                outcome.evicted_age,
                age_s,
                age_s / 86400,
            )
        if outcome.evicted_count and "count" not in self._logged_drops:
            self._logged_drops.add("count")
            log.info(
                "sample store: full at [edgex] store_max_samples = %d; evicted the %d oldest sample(s) "
                "(evicted_count). Raise [edgex] store_max_samples to keep more. Further evictions are "
                "counted in the status (data.store), not logged",
                self.store.max_samples,
                outcome.evicted_count,
            )

    def _live(self, build: Callable[[SampleBuilder], list[Sample]]) -> None:
        """Prediction windows from the live builder into the buffer; a failure here is counted
        (``live.errors`` in the report) and never touches the training path."""
        assert self.live_builder is not None
        try:
            windows = build(self.live_builder)
        except Exception as exc:  # predictions are best effort; training data is not
            self.live_errors += 1
            if self.live_errors == 1:
                log.error("live prediction windows of %s: %s (counted in data.live.errors)", self.device, exc)
            return
        spec = self.task.features
        self.live.put(
            LiveWindow(s.features, s.start_ns, s.end_ns, spec, self.device, self.label_units) for s in windows
        )
        if windows and self._on_live is not None:
            self._on_live()

    def set_live_listener(self, listener: Callable[[], None]) -> None:
        """``listener`` is called (from the ingest thread) whenever new live windows are ready
        for :meth:`live_windows`: the agent's worker sleeps until then instead of asking."""
        self._on_live = listener

    def _flush(self) -> None:
        if self.live_builder is not None:
            self._live(lambda b: b.flush())
        self._store(self.builder.flush(), [])
        self._flushed = True

    def _first_backfill_start_ns(self) -> int:
        """Where the first backfill (no cursor yet) starts: ``[edgex] first_backfill_s`` back,
        or the beginning (0) for everything core-data holds."""
        if self.first_backfill_s == 0:
            log.info("first backfill of %s: all core-data holds ([edgex] first_backfill_s = 0)", self.device)
            return 0
        start = max(0.0, self.clock() - self.first_backfill_s)
        log.info(
            "first backfill of %s: readings of the last %.0f s; older ones in core-data are not read "
            "(set [edgex] first_backfill_s = 0 to read everything, e.g. a historical export)",
            self.device,
            self.first_backfill_s,
        )
        return int(start * 1e9)

    def _backfill(self) -> None:
        assert self.core_data is not None
        start = self.resume_ns if self.resume_ns is not None else self._first_backfill_start_ns()
        end = int((self.clock() + 365 * 24 * 3600) * 1e9)  # replayed data may carry future origins
        try:
            batch: list[Reading] = []
            for reading in self.core_data.readings_for_device(self.device, start, end):
                batch.append(reading)
                if len(batch) >= 4096:
                    self.backfilled_readings += len(batch)
                    self.feed(batch)
                    batch = []
            self.backfilled_readings += len(batch)
            self.feed(batch)
            log.info("backfilled %d readings of %s from core-data", self.backfilled_readings, self.device)
        except FedgeError as exc:
            self.backfill_errors += 1
            self.last_error = f"backfill: {exc}"
            log.warning("core-data backfill failed (will retry on the next connection): %s", exc)

    def _run(self) -> None:
        """Wakes only for work: events, a backfill request (an empty item), stop (None), or the
        end of a pause in the stream when rows wait in the reorder buffer (``IDLE_FLUSH_S``).

        It ends at the None :meth:`stop` queues after the bus has stopped, not when stop is
        requested: until then it stores what is queued, so paho's EdgeX thread, which may be
        waiting to queue one more message (the queue is bounded), can finish and the bus stop;
        nothing queued is lost (at most ``_QUEUE_LIMIT`` messages: well under a second)."""
        name_current_thread("fedge-ingest")  # what top -H and the benchmarks show
        while True:
            stopping = self.stop_requested.is_set()
            if self.backfill_needed.is_set() and self.core_data is not None and not stopping:
                self.backfill_needed.clear()
                self._backfill()
            timeout = None if self._flushed else max(0.0, self._last_feed + IDLE_FLUSH_S - time.monotonic())
            if stopping:  # stop() queues None after the bus stops: never wait much longer
                timeout = STOP_WAIT_S if timeout is None else min(timeout, STOP_WAIT_S)
            try:
                item = self.inbox.get(timeout=timeout)
            except queue.Empty:
                # The stream paused: rows waiting in the reorder buffer become samples now
                # instead of whenever the next reading comes.
                self._flush()
                continue
            if item is None:
                break
            if not item:  # a wake-up: a backfill was requested
                continue
            events, stop = self._drain(item)
            try:
                self.feed_events(events)
            except FedgeError as exc:
                self.last_error = str(exc)
                log.error("could not store samples: %s", exc)
            if stop:
                break

    def _drain(self, first: list[Event]) -> tuple[list[Event], bool]:
        """``first`` and the events queued behind it, up to ``BATCH_READINGS`` readings, and
        whether a stop came next. Stops at a wake-up (a backfill request: its flag is set, so the
        loop's next turn backfills, after these events, as it would have).

        Why: a backlog (the demo replays 170,000 readings a device) queues faster than it is
        stored; one batch of several events costs one feature extraction and one store
        transaction instead of one each. The readings, in the same order, give the same samples
        however they are split (the builder's and ``extract_features``' contract).
        """
        events = list(first)
        readings = sum(map(len, map(_READINGS, first)))
        while readings < BATCH_READINGS:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return events, True
            if not item:  # a wake-up: backfill_needed is set, the loop's next turn backfills
                break
            events += item
            readings += sum(map(len, map(_READINGS, item)))
        return events, False

    # --- outputs -----------------------------------------------------------------------------

    def training_data(self, task: TaskSpec) -> tuple[np.ndarray, np.ndarray]:
        if task_key(task) != self.key:
            raise FedgeError(
                "the round's task reads other features or labels than this device was provisioned "
                "for; update the device's task spec"
            )
        return self.store.load(self.key)

    def live_windows(self, task: TaskSpec | None) -> LiveWindows:
        """The pending prediction windows (built for this device's own task; ``task``, the
        verified model's, is not needed) and how many were dropped; clears them."""
        return self.live.take() if self.live_builder is not None else NO_LIVE_WINDOWS

    def available(self) -> int | None:
        """Samples stored for this device's task (what the device's ``ready`` status is from)."""
        return self.store.stats(self.clock()).per_task.get(self.key, 0)

    def report(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "bus_connected": self.bus.connected.is_set() if self.bus is not None else False,
            "stored_samples": self.store.stats(self.clock()).per_task.get(self.key, 0),
            "stored_this_run": self.stored,
            "quality": self.builder.quality.to_dict(),
            "store": dict(self.store_counts),
            "bus": self.bus.report() if self.bus is not None else None,
            "ignored_events": self.ignored_events,
            "backfilled_readings": self.backfilled_readings,
            "backfill_errors": self.backfill_errors,
            "last_origin_ns": self.last_origin_ns,
            "resume_ns": self.resume_ns,
            "last_error": self.last_error,
            "live": (
                {
                    "quality": self.live_builder.quality.to_dict(),
                    "pending": len(self.live),
                    "errors": self.live_errors,
                }
                if self.live_builder is not None
                else None
            ),
        }
