"""The device's bounded local store of training samples: feature vectors and labels, nothing else.

Samples arrive continuously from :class:`fedge.agent.edgex.samples.SampleBuilder`; training rounds
come every few minutes or hours and after restarts, so the samples wait here, in SQLite.

*Only feature vectors and labels are stored, never the readings themselves* (unless the task
asks for them, below). Raw sensor data never leaves the device (only model updates do), and data
minimisation applies on the device too: a stolen or decommissioned gateway's disk should hold no
more than training needs, and windowed statistics say far less about the people in a building
than the raw signal does. A task that asks for raw windows (``statistics = ["raw"]``, for a
model that reads the signal) makes its windows' readings the feature vectors, so they are
stored: that is the task author's choice, and they still never leave the device. Such a vector
is large (600 float32 for 6 resources x 100 readings, 2,400 bytes), so ``max_samples`` should
be sized for it: :meth:`SampleStore.load` holds every sample of the task in memory at once
(``n x dim x 4`` bytes; it fills the array row by row, without a second copy).

The store is bounded twice. A sample is kept at most ``max_age_s`` after its data was
measured (``end_ns``, the readings' origin time, not when it was stored, so a backfill of old
readings does not extend their retention), and at most ``max_samples`` samples are kept in all;
beyond that the oldest go first, whatever their task. Both bounds are enforced on every
:meth:`SampleStore.add` and by :meth:`SampleStore.evict` (for time passing without new data).
``max_age_s = 0`` keeps samples of any age (a replayed historical export); then only the count
bound evicts. Every sample refused or evicted is counted by reason (:data:`DROP_REASONS`), in
the file since its creation (:meth:`SampleStore.stats`) and per call (:class:`AddOutcome`).

Samples of different tasks never mix: each belongs to a ``task_key`` (the hash of the task's
feature spec, say), and a task's vector length and label kind are fixed by its first sample.

Durability: WAL with ``synchronous=NORMAL``. In WAL mode NORMAL never corrupts the database on
power loss; it may only lose the last few commits. That is the right trade for samples, unlike
the outbox's ``FULL`` (an update there costs minutes of training): a few lost seconds of samples
cost nothing, new ones keep coming, while an fsync per add at sensor rate would wear an SD card
or eMMC and stall the ingest loop.

Safe to call from several threads: one lock guards the one connection. One process owns a
store file at a time.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from fedge.agent.edgex.samples import Sample
from fedge.agent.sqlite_file import SQLiteFile, SQLiteFileKind
from fedge.protocol.errors import FedgeError
from fedge.protocol.task import MAX_FEATURES
from fedge.shell.storage_faults import StorageFault

#: Marks the SQLite file as a fedge sample store ('fdgs'), so no other database is mistaken for one.
APPLICATION_ID = 0x66646773
SCHEMA_VERSION = 1
MAX_TASK_KEY_CHARS = 256
_INT64 = 2**63

LabelKind = Literal["class", "value"]

_SCHEMA = """
CREATE TABLE tasks (
    task_key TEXT PRIMARY KEY,
    dim INTEGER NOT NULL,
    label_kind TEXT NOT NULL CHECK (label_kind IN ('class', 'value'))
);
CREATE TABLE samples (
    id INTEGER PRIMARY KEY,
    task_key TEXT NOT NULL REFERENCES tasks(task_key),
    start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL,
    features BLOB NOT NULL,  -- little-endian float32, tasks.dim of them
    label REAL NOT NULL,     -- class index or regression target
    added_at REAL NOT NULL,
    UNIQUE (task_key, end_ns)
);
CREATE INDEX samples_end ON samples(end_ns, id);
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO counters VALUES
    ('duplicates_total', 0), ('expired_total', 0), ('evicted_age_total', 0), ('evicted_count_total', 0);
"""


#: Why the store drops a sample: already older than ``max_age_s`` when added (never stored),
#: stored but now older than ``max_age_s``, or among the oldest beyond ``max_samples``.
DROP_REASONS: tuple[str, ...] = ("expired", "evicted_age", "evicted_count")


class SampleStoreError(FedgeError):
    """The store file is unusable (corrupt, foreign, unwritable) or a sample is invalid."""


class SampleStoreStorageFault(SampleStoreError, StorageFault):
    """The file system of the store is full or read-only: nothing was stored or changed."""


_KIND = SQLiteFileKind(
    "sample store", APPLICATION_ID, SCHEMA_VERSION, _SCHEMA, SampleStoreError, SampleStoreStorageFault
)


@dataclass(frozen=True)
class SampleStoreStats:
    """What is stored now, and what was refused or evicted since the file was created.

    Ages are seconds between ``now`` and the samples' ``end_ns``; None when the store is empty.
    ``expired_total`` counts samples already too old when added (never stored).
    """

    samples: int
    per_task: dict[str, int]
    oldest_age_s: float | None
    newest_age_s: float | None
    duplicates_total: int
    expired_total: int
    evicted_age_total: int
    evicted_count_total: int


@dataclass(frozen=True)
class AddOutcome:
    """What one :meth:`SampleStore.add_counted` did with its batch and the store, by reason.

    ``inserted`` new samples; ``duplicate`` already stored; ``expired`` older than ``max_age_s``
    when added (never stored). ``evicted_age`` and ``evicted_count`` are stored samples (of any
    task) deleted by the bounds. ``oldest_age_s`` is the age at ``now`` of the oldest sample
    expired or evicted for age, None if there was none.
    """

    inserted: int = 0
    duplicate: int = 0
    expired: int = 0
    evicted_age: int = 0
    evicted_count: int = 0
    oldest_age_s: float | None = None


class SampleStore(SQLiteFile):
    """A bounded, persistent, per-task store of samples; see the module docstring."""

    def __init__(self, path: Path, max_samples: int, max_age_s: float) -> None:
        """``max_age_s`` 0 keeps samples of any age (only ``max_samples`` evicts)."""
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise SampleStoreError(
                f"sample store: max_samples must be a positive integer, got {max_samples!r}"
            )
        if (
            isinstance(max_age_s, bool)
            or not isinstance(max_age_s, (int, float))
            or not math.isfinite(max_age_s)
            or max_age_s < 0
        ):
            raise SampleStoreError(
                f"sample store: max_age_s must be a positive number or 0 (any age), got {max_age_s!r}"
            )
        self.max_samples = max_samples
        self.max_age_s = float(max_age_s)
        super().__init__(path, _KIND, "NORMAL", pragmas=("foreign_keys=ON",))

    # --- samples -------------------------------------------------------------------------

    def add(self, samples: Iterable[Sample], task_key: str, now: float) -> int:
        """Stores new samples of ``task_key``; returns how many were inserted.

        A sample whose ``(task_key, end_ns)`` is already stored is a duplicate (a replayed
        stream, a restarted builder): ignored and counted. One already older than ``max_age_s``
        is not stored (counted ``expired_total``). Then both bounds are enforced, so the store
        never exceeds ``max_samples``: inserting more than that evicts the oldest at once.
        All or nothing: an invalid sample stores none of the batch.
        """
        return self.add_counted(samples, task_key, now).inserted

    def add_counted(self, samples: Iterable[Sample], task_key: str, now: float) -> AddOutcome:
        """As :meth:`add`, and says what became of every sample it refused or evicted."""
        _check_task_key(task_key)
        now = _check_now(now)
        cutoff_ns = self._cutoff_ns(now)
        rows: list[tuple[str, int, int, bytes, float, float]] = []
        dim: int | None = None
        kind: LabelKind | None = None
        expired = 0
        oldest_ns: int | None = None  # the oldest expired sample's end
        for i, sample in enumerate(samples):
            features, label, sample_kind = _check_sample(i, sample)
            if dim is not None and features.size != dim:
                raise SampleStoreError(
                    f"sample store: sample {i} has {features.size} features, sample 0 {dim}"
                )
            if kind is not None and sample_kind != kind:
                raise SampleStoreError(
                    f"sample store: sample {i} has a {sample_kind} label, sample 0 a {kind}"
                )
            dim, kind = features.size, sample_kind
            if cutoff_ns is not None and sample.end_ns < cutoff_ns:
                expired += 1
                oldest_ns = sample.end_ns if oldest_ns is None else min(oldest_ns, sample.end_ns)
                continue
            rows.append((task_key, sample.start_ns, sample.end_ns, features.tobytes(), label, now))
        with self._transaction() as conn:
            if dim is not None and kind is not None:
                self._check_task(conn, task_key, dim, kind, create=bool(rows))
            before = conn.total_changes
            conn.executemany(
                "INSERT OR IGNORE INTO samples (task_key, start_ns, end_ns, features, label, added_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            inserted = conn.total_changes - before
            _bump(conn, "duplicates_total", len(rows) - inserted)
            _bump(conn, "expired_total", expired)
            aged, excess, oldest_aged_ns = self._evict(conn, cutoff_ns)
        if oldest_aged_ns is not None:
            oldest_ns = oldest_aged_ns if oldest_ns is None else min(oldest_ns, oldest_aged_ns)
        return AddOutcome(
            inserted=inserted,
            duplicate=len(rows) - inserted,
            expired=expired,
            evicted_age=aged,
            evicted_count=excess,
            oldest_age_s=None if oldest_ns is None else now - oldest_ns / 1e9,
        )

    def _check_task(
        self, conn: sqlite3.Connection, task_key: str, dim: int, kind: LabelKind, create: bool
    ) -> None:
        row = conn.execute("SELECT dim, label_kind FROM tasks WHERE task_key = ?", (task_key,)).fetchone()
        if row is None:
            if create:
                conn.execute(
                    "INSERT INTO tasks (task_key, dim, label_kind) VALUES (?, ?, ?)", (task_key, dim, kind)
                )
            return
        if (row[0], row[1]) != (dim, kind):
            raise SampleStoreError(
                f"sample store: task {task_key!r} holds samples of {row[0]} features with {row[1]} labels; "
                f"got {dim} features with {kind} labels (a changed feature spec needs a new task key)"
            )

    def load(self, task_key: str) -> tuple[np.ndarray, np.ndarray]:
        """All samples of ``task_key`` in time order: ``x`` float32 ``(n, d)`` and ``y``.

        ``y`` is int32 class indices or float32 targets. An unknown task gives ``(0, 0)`` and
        ``(0,)`` arrays. Does not evict: call :meth:`evict` first to drop aged samples.
        """
        _check_task_key(task_key)
        with self._transaction() as conn:
            task = conn.execute(
                "SELECT dim, label_kind FROM tasks WHERE task_key = ?", (task_key,)
            ).fetchone()
            n = conn.execute("SELECT count(*) FROM samples WHERE task_key = ?", (task_key,)).fetchone()[0]
            dim = 0 if task is None else int(task[0])
            label_dtype = np.int32 if task is not None and task[1] == "class" else np.float32
            if task is None or not n:
                return np.empty((0, dim), np.float32), np.empty((0,), label_dtype)
            # Row by row into the result: the samples are in memory once, not three times (the
            # fetched rows, their concatenation, the array), which matters for raw windows.
            x = np.empty((n, dim), np.float32)
            labels = np.empty((n,), np.float64)
            rows = conn.execute(
                "SELECT features, label, end_ns FROM samples WHERE task_key = ? ORDER BY end_ns", (task_key,)
            )
            for i, (blob, label, end_ns) in enumerate(rows):
                if not isinstance(blob, bytes) or len(blob) != 4 * dim:
                    size = f"{len(blob)} bytes" if isinstance(blob, bytes) else f"a {type(blob).__name__}"
                    raise SampleStoreError(
                        f"sample store {self.path} is damaged: the sample of task {task_key!r} ending at "
                        f"{end_ns} holds {size}, not {dim} float32 features ({4 * dim} bytes); "
                        "move the file aside (the agent starts an empty one)"
                    )
                x[i] = np.frombuffer(blob, dtype="<f4")
                labels[i] = label
        return x, labels.astype(label_dtype)

    def evict(self, now: float) -> int:
        """Drops samples older than ``max_age_s`` (unless it is 0), then the oldest beyond
        ``max_samples``."""
        now = _check_now(now)
        with self._transaction() as conn:
            aged, excess, _ = self._evict(conn, self._cutoff_ns(now))
        return aged + excess

    def _evict(self, conn: sqlite3.Connection, cutoff_ns: int | None) -> tuple[int, int, int | None]:
        """Deletes by age, then by count: how many of each, and the oldest end_ns aged out."""
        aged, oldest_ns = 0, None
        if cutoff_ns is not None:
            oldest_ns = conn.execute("SELECT min(end_ns) FROM samples").fetchone()[0]
            if oldest_ns is not None and oldest_ns < cutoff_ns:
                aged = conn.execute("DELETE FROM samples WHERE end_ns < ?", (cutoff_ns,)).rowcount
            else:
                oldest_ns = None
        count = conn.execute("SELECT count(*) FROM samples").fetchone()[0]
        excess = max(0, count - self.max_samples)
        if excess:
            conn.execute(
                "DELETE FROM samples WHERE id IN (SELECT id FROM samples ORDER BY end_ns, id LIMIT ?)",
                (excess,),
            )
        if aged or excess:
            # A task without samples no longer fixes a vector length: its spec may change.
            conn.execute("DELETE FROM tasks WHERE task_key NOT IN (SELECT DISTINCT task_key FROM samples)")
        _bump(conn, "evicted_age_total", aged)
        _bump(conn, "evicted_count_total", excess)
        return int(aged), int(excess), oldest_ns

    def _cutoff_ns(self, now: float) -> int | None:
        """Samples ending before this are too old; None when ``max_age_s`` is 0 (any age)."""
        if self.max_age_s == 0:
            return None
        # Float seconds carry about a microsecond of precision at today's epoch; ample for ages.
        return math.floor((now - self.max_age_s) * 1e9)

    def stats(self, now: float) -> SampleStoreStats:
        """Counts now, per task, with the oldest and newest sample's age; totals since creation."""
        now = _check_now(now)
        with self._transaction() as conn:
            per_task = dict(
                conn.execute("SELECT task_key, count(*) FROM samples GROUP BY task_key ORDER BY task_key")
            )
            oldest, newest = conn.execute("SELECT min(end_ns), max(end_ns) FROM samples").fetchone()
            counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
        return SampleStoreStats(
            samples=sum(per_task.values()),
            per_task=per_task,
            oldest_age_s=None if oldest is None else now - oldest / 1e9,
            newest_age_s=None if newest is None else now - newest / 1e9,
            duplicates_total=counters["duplicates_total"],
            expired_total=counters["expired_total"],
            evicted_age_total=counters["evicted_age_total"],
            evicted_count_total=counters["evicted_count_total"],
        )


def _check_task_key(task_key: object) -> None:
    if (
        not isinstance(task_key, str)
        or not task_key
        or len(task_key) > MAX_TASK_KEY_CHARS
        or "\0" in task_key
    ):
        raise SampleStoreError(
            f"sample store: task_key must be a non-empty string of at most {MAX_TASK_KEY_CHARS} characters "
            f"without NUL, got {task_key!r}"
        )


def _check_now(now: object) -> float:
    if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now):
        raise SampleStoreError(f"sample store: now must be a finite number of seconds, got {now!r}")
    return float(now)


def _check_sample(i: int, sample: object) -> tuple[np.ndarray, float, LabelKind]:
    """The sample's features as little-endian float32, its label, and the label's kind."""
    if not isinstance(sample, Sample):
        raise SampleStoreError(f"sample store: item {i} is a {type(sample).__name__}, not a Sample")
    try:
        features = np.asarray(sample.features, dtype="<f4")
    except (TypeError, ValueError):
        raise SampleStoreError(f"sample store: sample {i} features are not numbers") from None
    if features.ndim != 1 or not 1 <= features.size <= MAX_FEATURES:
        raise SampleStoreError(
            f"sample store: sample {i} features must be a vector of 1..{MAX_FEATURES} numbers, "
            f"got shape {features.shape}"
        )
    if not np.all(np.isfinite(features)):
        raise SampleStoreError(f"sample store: sample {i} features contain NaN or infinity")
    label = sample.label
    kind: LabelKind
    if isinstance(label, (bool, np.bool_)):
        raise SampleStoreError(f"sample store: sample {i} label is a bool, not a class index or number")
    if isinstance(label, (int, np.integer)):
        if label < 0:
            raise SampleStoreError(f"sample store: sample {i} class index {label} is negative")
        kind = "class"
    elif isinstance(label, (float, np.floating)):
        if not math.isfinite(label):
            raise SampleStoreError(f"sample store: sample {i} label is not finite")
        kind = "value"
    else:
        raise SampleStoreError(f"sample store: sample {i} label {label!r} is not a number")
    for name in ("start_ns", "end_ns"):
        value = getattr(sample, name)
        if isinstance(value, bool) or not isinstance(value, int) or not -_INT64 <= value < _INT64:
            raise SampleStoreError(f"sample store: sample {i} {name} must be a 64-bit integer, got {value!r}")
    if sample.start_ns > sample.end_ns:
        raise SampleStoreError(f"sample store: sample {i} starts after it ends")
    return features, float(label), kind


def _bump(conn: sqlite3.Connection, name: str, by: int) -> None:
    if by:
        conn.execute("UPDATE counters SET value = value + ? WHERE name = ?", (by, name))
