"""The sample store: bounded by age and count, persistent, per task, and loud about bad files."""

from __future__ import annotations

import re
import sqlite3
import stat
import threading
from pathlib import Path

import numpy as np
import pytest

from fedge.agent.edgex.samples import Sample
from fedge.agent.outbox import Outbox
from fedge.agent.sample_store import AddOutcome, SampleStore, SampleStoreError, SampleStoreStats
from fedge.protocol.errors import FedgeError

NOW = 1_700_000_000.0  # wall-clock seconds
NS = 1_000_000_000
HOUR = 3600.0


def sample(end_s: float, features: list[float] | None = None, label: int | float = 0) -> Sample:
    """A one-second sample ending ``end_s`` seconds before NOW."""
    end_ns = int(NOW * NS) - round(end_s * NS)
    vec = np.asarray(features if features is not None else [end_s, -end_s, 0.5], np.float32)
    return Sample(vec, label, end_ns - NS, end_ns)


def store(tmp_path: Path, max_samples: int = 100, max_age_s: float = HOUR) -> SampleStore:
    return SampleStore(tmp_path / "samples.db", max_samples, max_age_s)


def test_load_returns_float32_features_and_labels_in_time_order(tmp_path: Path) -> None:
    with store(tmp_path) as s:
        batch = [sample(10, [1, 2, 3], 2), sample(30, [4, 5, 6], 0), sample(20, [7, 8, 9], 1)]
        assert s.add(batch, "task-a", NOW) == 3
        x, y = s.load("task-a")
    assert x.dtype == np.float32 and x.shape == (3, 3)
    assert x.tolist() == [[4, 5, 6], [7, 8, 9], [1, 2, 3]]  # oldest (30 s ago) first
    assert y.dtype == np.int32 and y.tolist() == [0, 1, 2]


def test_regression_labels_load_as_float32(tmp_path: Path) -> None:
    with store(tmp_path) as s:
        s.add([sample(2, [1.0], 21.5), sample(1, [2.0], -3.25)], "reg", NOW)
        x, y = s.load("reg")
    assert y.dtype == np.float32 and y.tolist() == [21.5, -3.25]
    assert x.tolist() == [[1.0], [2.0]]


def test_features_round_trip_bit_for_bit(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 48)).astype(np.float32) * np.float32(1e30)
    with store(tmp_path) as s:
        s.add([sample(100 - i, list(vectors[i]), i % 7) for i in range(50)], "har", NOW)
        x, _ = s.load("har")
    assert np.array_equal(x, vectors)


def test_duplicates_are_ignored_and_counted(tmp_path: Path) -> None:
    with store(tmp_path) as s:
        first = [sample(3), sample(2), sample(1)]
        assert s.add(first, "t", NOW) == 3
        assert s.add([sample(2), sample(1), sample(0.5)], "t", NOW) == 1  # a replayed overlap
        assert s.add([sample(0.25), sample(0.25)], "t", NOW) == 1  # duplicate within one batch
        assert s.stats(NOW).duplicates_total == 3
        assert s.load("t")[0].shape == (5, 3)


def test_samples_survive_a_restart_with_their_counters(tmp_path: Path) -> None:
    with store(tmp_path) as s:
        s.add([sample(3, label=1), sample(2, label=2)], "t", NOW)
        s.add([sample(2, label=2)], "t", NOW)
        before = s.load("t")
    with store(tmp_path) as s:
        after = s.load("t")
        assert s.stats(NOW).duplicates_total == 1
        assert s.add([sample(3, label=1)], "t", NOW) == 0  # still known after the restart
    assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])


def test_tasks_never_mix(tmp_path: Path) -> None:
    with store(tmp_path) as s:
        assert s.add([sample(2, [1, 1, 1], 1)], "spec-aaa", NOW) == 1
        # same end time, another task: not a duplicate, a sample of its own
        assert s.add([sample(2, [9.0], 0.5)], "spec-bbb", NOW) == 1
        xa, ya = s.load("spec-aaa")
        xb, yb = s.load("spec-bbb")
        xc, yc = s.load("spec-ccc")
        assert s.stats(NOW).per_task == {"spec-aaa": 1, "spec-bbb": 1}
    assert (xa.tolist(), ya.tolist(), ya.dtype) == ([[1, 1, 1]], [1], np.int32)
    assert (xb.tolist(), yb.tolist(), yb.dtype) == ([[9.0]], [0.5], np.float32)
    assert (xc.shape, yc.shape) == ((0, 0), (0,))


def test_a_task_keeps_its_vector_length_and_label_kind(tmp_path: Path) -> None:
    with store(tmp_path) as s:
        s.add([sample(3, [1, 2, 3], 0)], "t", NOW)
        with pytest.raises(
            SampleStoreError, match="task 't' holds samples of 3 features with class labels; got 2 "
        ):
            s.add([sample(2, [1, 2], 0)], "t", NOW)
        with pytest.raises(SampleStoreError, match="got 3 features with value labels"):
            s.add([sample(2, [1, 2, 3], 0.5)], "t", NOW)
        assert s.load("t")[0].shape == (1, 3)


def test_add_refuses_samples_already_too_old(tmp_path: Path) -> None:
    with store(tmp_path, max_age_s=HOUR) as s:
        assert s.add([sample(HOUR + 1), sample(HOUR - 1), sample(5)], "t", NOW) == 2
        stats = s.stats(NOW)
    assert (stats.samples, stats.expired_total, stats.evicted_age_total) == (2, 1, 0)


YEAR = 365 * 24 * HOUR
DEFAULT_MAX_AGE_S = 30 * 24 * HOUR  # [edgex] store_max_age_s's default


def test_an_old_sample_is_refused_under_a_named_reason_with_its_age(tmp_path: Path) -> None:
    with store(tmp_path, max_age_s=DEFAULT_MAX_AGE_S) as s:
        outcome = s.add_counted([sample(3 * YEAR), sample(2 * YEAR), sample(5)], "t", NOW)
        stats = s.stats(NOW)
    assert outcome == AddOutcome(inserted=1, expired=2, oldest_age_s=pytest.approx(3 * YEAR))
    assert (stats.samples, stats.expired_total, stats.evicted_age_total) == (1, 2, 0)


def test_max_age_zero_keeps_samples_of_any_age(tmp_path: Path) -> None:
    with store(tmp_path, max_age_s=0) as s:
        outcome = s.add_counted([sample(10 * YEAR), sample(3 * YEAR), sample(5)], "t", NOW)
        assert s.evict(NOW + 50 * YEAR) == 0
        stats = s.stats(NOW + 50 * YEAR)
        assert s.load("t")[0].shape == (3, 3)
    assert outcome == AddOutcome(inserted=3)
    assert (stats.samples, stats.expired_total, stats.evicted_age_total) == (3, 0, 0)


def test_max_age_zero_still_evicts_by_count(tmp_path: Path) -> None:
    with store(tmp_path, max_samples=2, max_age_s=0) as s:
        outcome = s.add_counted(
            [sample(3 * YEAR, label=3), sample(2 * YEAR, label=2), sample(YEAR, label=1)], "t", NOW
        )
        _, y = s.load("t")
    assert outcome == AddOutcome(inserted=3, evicted_count=1)
    assert y.tolist() == [2, 1]


def test_add_counted_names_every_sample_it_did_not_keep(tmp_path: Path) -> None:
    with store(tmp_path, max_samples=3, max_age_s=HOUR) as s:
        assert s.add_counted([sample(3000), sample(2000), sample(1000)], "t", NOW) == AddOutcome(inserted=3)
        # An hour later the 3000 s old sample has aged out; a replayed one is a duplicate, one
        # built from old readings is refused, and the new two push the oldest left over out.
        later = NOW + 1000
        batch = [sample(1000), sample(5000), sample(-999), sample(-998)]  # ages 2000, 6000, 1, 2
        outcome = s.add_counted(batch, "t", later)
    assert outcome == AddOutcome(
        inserted=2,
        duplicate=1,
        expired=1,
        evicted_age=1,
        evicted_count=1,
        oldest_age_s=pytest.approx(6000.0),
    )


def test_evict_drops_samples_by_age(tmp_path: Path) -> None:
    with store(tmp_path, max_age_s=HOUR) as s:
        s.add([sample(3000), sample(2000), sample(1000), sample(10)], "t", NOW)
        assert s.evict(NOW) == 0
        assert s.evict(NOW + 1000) == 1  # the 3000 s old one is now 4000 s old
        assert s.evict(NOW + 1000) == 0
        assert s.evict(NOW + 2700) == 2
        stats = s.stats(NOW + 2700)
        assert s.load("t")[0].shape == (1, 3)
    assert stats == SampleStoreStats(
        samples=1,
        per_task={"t": 1},
        oldest_age_s=pytest.approx(2710.0),
        newest_age_s=pytest.approx(2710.0),
        duplicates_total=0,
        expired_total=0,
        evicted_age_total=3,
        evicted_count_total=0,
    )


def test_count_bound_evicts_the_oldest_whatever_the_insertion_order(tmp_path: Path) -> None:
    with store(tmp_path, max_samples=5) as s:
        assert s.add([sample(float(age), label=age) for age in (5, 1, 7, 3)], "t", NOW) == 4
        assert s.add([sample(float(age), label=age) for age in (2, 8, 6, 4)], "t", NOW) == 4
        _, y = s.load("t")
        stats = s.stats(NOW)
    assert y.tolist() == [5, 4, 3, 2, 1]  # ages 8, 7 and 6 were the oldest
    assert (stats.samples, stats.evicted_count_total) == (5, 3)


def test_count_bound_is_global_and_old_tasks_go_first(tmp_path: Path) -> None:
    with store(tmp_path, max_samples=4) as s:
        s.add([sample(100 + i) for i in range(3)], "old-spec", NOW)
        s.add([sample(float(i)) for i in range(3)], "new-spec", NOW)
        assert s.stats(NOW).per_task == {"new-spec": 3, "old-spec": 1}
        s.add([sample(0.5)], "new-spec", NOW)
        assert s.stats(NOW).per_task == {"new-spec": 4}
        # the old task's spec no longer holds: its key may now take another vector length
        assert s.add([sample(0.1, [1.0], 0)], "old-spec", NOW) == 1


def test_evict_applies_age_then_count(tmp_path: Path) -> None:
    with store(tmp_path, max_samples=10, max_age_s=100) as s:
        s.add([sample(float(age)) for age in range(0, 100, 10)], "t", NOW)  # 10 samples, ages 0..90
    with SampleStore(tmp_path / "samples.db", max_samples=3, max_age_s=100) as smaller:
        assert smaller.evict(NOW + 25) == 7  # ages 80, 90 by age; then the 5 oldest of 8
        stats = smaller.stats(NOW + 25)
    assert (stats.samples, stats.evicted_age_total, stats.evicted_count_total) == (3, 2, 5)
    assert stats.oldest_age_s == pytest.approx(45.0)


def test_store_file_is_private(tmp_path: Path) -> None:
    with store(tmp_path) as s:
        s.add([sample(1)], "t", NOW)
        for name in ("samples.db", "samples.db-wal"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name


def test_store_uses_wal(tmp_path: Path) -> None:
    with store(tmp_path) as s:
        s.add([sample(1)], "t", NOW)
        conn = sqlite3.connect(tmp_path / "samples.db")
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            conn.close()


def test_only_feature_vectors_and_labels_are_stored(tmp_path: Path) -> None:
    with store(tmp_path) as s:
        s.add([sample(1)], "t", NOW)
    conn = sqlite3.connect(tmp_path / "samples.db")
    try:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(samples)")]
    finally:
        conn.close()
    assert columns == ["id", "task_key", "start_ns", "end_ns", "features", "label", "added_at"]


def test_a_garbage_file_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "samples.db"
    path.write_bytes(b"this is not a database at all" * 200)
    with pytest.raises(SampleStoreError) as info:
        SampleStore(path, 10, HOUR)
    assert str(info.value) == (
        f"sample store {path} is not a usable SQLite database (file is not a database); move it aside"
    )
    assert isinstance(info.value, FedgeError)


def test_a_damaged_store_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "samples.db"
    with SampleStore(path, 10_000, HOUR) as s:
        s.add([sample(i / 100, [float(i)] * 64) for i in range(2000)], "t", NOW)
    data = bytearray(path.read_bytes())
    assert len(data) > 16 * 4096
    data[8 * 4096 : 12 * 4096] = b"\xa5" * (4 * 4096)  # overwrite pages in the middle
    path.write_bytes(bytes(data))
    with pytest.raises(
        SampleStoreError, match=r"sample store .* (is corrupt|is not a usable).*; move it aside"
    ):
        SampleStore(path, 10_000, HOUR)


def test_another_database_is_not_mistaken_for_a_store(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    Outbox(path).close()
    with pytest.raises(SampleStoreError, match="is an SQLite database but not a fedge sample store"):
        SampleStore(path, 10, HOUR)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (sample(1, [1.0, float("nan")]), "sample 1 features contain NaN or infinity"),
        (sample(1, [1.0, 2.0], True), "sample 1 label is a bool"),
        (sample(1, [1.0, 2.0], -1), "sample 1 class index -1 is negative"),
        (sample(1, [1.0, 2.0], float("inf")), "sample 1 label is not finite"),
        (sample(1, [1.0]), "sample 1 has 1 features, sample 0 2"),
        (sample(1, [1.0, 2.0], 0.5), "sample 1 has a value label, sample 0 a class"),
        (Sample(np.zeros((2, 2), np.float32), 0, 0, 1), "features must be a vector of 1..4096 numbers"),
        (Sample(np.zeros(2, np.float32), 0, 5, 1), "sample 1 starts after it ends"),
        (Sample(np.zeros(2, np.float32), 0, 0, 2**63), "sample 1 end_ns must be a 64-bit integer"),
        ((1.0, 2.0), "item 1 is a tuple, not a Sample"),
    ],
)
def test_an_invalid_sample_stores_nothing_of_its_batch(tmp_path: Path, bad: object, message: str) -> None:
    with store(tmp_path) as s:
        with pytest.raises(SampleStoreError, match=message.replace("(", r"\(").replace(")", r"\)")):
            s.add([sample(2, [1.0, 2.0], 0), bad], "t", NOW)  # type: ignore[list-item]
        assert s.stats(NOW).samples == 0


@pytest.mark.parametrize("key", ["", "x" * 257, "a\0b", 7])
def test_bad_task_keys_are_refused(tmp_path: Path, key: object) -> None:
    with store(tmp_path) as s, pytest.raises(SampleStoreError, match="task_key must be a non-empty string"):
        s.add([sample(1)], key, NOW)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("max_samples", "max_age_s", "message"),
    [
        (0, HOUR, "max_samples must be a positive integer, got 0"),
        (True, HOUR, "max_samples must be a positive integer, got True"),
        (10, -1.0, "max_age_s must be a positive number or 0 (any age), got -1.0"),
        (10, float("inf"), "max_age_s must be a positive number or 0 (any age), got inf"),
        (10, True, "max_age_s must be a positive number or 0 (any age), got True"),
    ],
)
def test_bad_bounds_are_refused(tmp_path: Path, max_samples: int, max_age_s: float, message: str) -> None:
    with pytest.raises(SampleStoreError, match=re.escape(message)):
        SampleStore(tmp_path / "samples.db", max_samples, max_age_s)


def test_a_closed_store_says_so(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.close()
    s.close()
    with pytest.raises(SampleStoreError, match="is closed"):
        s.load("t")


def test_concurrent_writers_lose_and_double_count_nothing(tmp_path: Path) -> None:
    errors: list[BaseException] = []
    inserted: list[int] = []
    lock = threading.Lock()

    with store(tmp_path, max_samples=10_000, max_age_s=10 * HOUR) as s:

        def writer(offset: int) -> None:
            try:
                for batch in range(25):
                    # batches overlap their neighbour's by half: many duplicates, each counted once
                    ages = [float(offset * 1000 + batch * 4 + i) for i in range(8)]
                    n = s.add([sample(age) for age in ages], "t", NOW)
                    with lock:
                        inserted.append(n)
                s.load("t")
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = s.stats(NOW)
    assert errors == []
    distinct = {k * 1000 + b * 4 + i for k in range(4) for b in range(25) for i in range(8)}
    assert sum(inserted) == stats.samples == len(distinct) == 4 * 104
    assert stats.duplicates_total == 4 * 25 * 8 - len(distinct)


# --- raw windows: large vectors ------------------------------------------------------------


def test_raw_window_samples_of_600_floats_round_trip_bit_for_bit(tmp_path: Path) -> None:
    """tasks/har-watch-raw.toml's samples: 6 resources x 100 readings, 2,400 bytes each."""
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(300, 600)).astype(np.float32) * np.float32(9.81)
    vectors[0, :3] = [np.float32(0.1), -0.0, np.finfo(np.float32).tiny / 2]  # subnormal, signed zero
    with store(tmp_path, max_samples=1000) as s:
        assert s.add([sample(400 - i, list(vectors[i]), i % 7) for i in range(300)], "raw", NOW) == 300
        x, y = s.load("raw")
    assert x.dtype == np.float32 and x.shape == (300, 600) and x.flags.c_contiguous
    assert x.tobytes() == vectors.tobytes()
    assert y.dtype == np.int32 and y.tolist() == [i % 7 for i in range(300)]
    conn = sqlite3.connect(tmp_path / "samples.db")
    try:
        sizes = {row[0] for row in conn.execute("SELECT length(features) FROM samples")}
    finally:
        conn.close()
    assert sizes == {2400}


@pytest.mark.parametrize(
    ("damage", "holds"),
    [("x'00000000'", "4 bytes"), ("zeroblob(2404)", "2404 bytes"), ("'text'", "a str")],
    ids=["short", "long", "not-a-blob"],
)
def test_a_damaged_sample_is_refused_by_name_and_nothing_else_is_lost(
    tmp_path: Path, damage: str, holds: str
) -> None:
    path = tmp_path / "samples.db"
    vectors = np.arange(5 * 600, dtype=np.float32).reshape(5, 600)
    with store(tmp_path) as s:
        s.add([sample(10 - i, list(vectors[i]), i) for i in range(5)], "raw", NOW)
        s.add([sample(3, [1.0, 2.0], 0.5)], "other", NOW)
        damaged_end_ns = int(NOW * NS) - round((10 - 2) * NS)
    conn = sqlite3.connect(path)
    try:  # what a bug or a stray tool could leave: a row SQLite itself finds nothing wrong with
        with conn:
            conn.execute(f"UPDATE samples SET features = {damage} WHERE end_ns = ?", (damaged_end_ns,))
    finally:
        conn.close()

    with store(tmp_path) as s:  # the file opens: it is a valid database
        with pytest.raises(SampleStoreError) as info:
            s.load("raw")
        assert str(info.value) == (
            f"sample store {path} is damaged: the sample of task 'raw' ending at {damaged_end_ns} holds "
            f"{holds}, not 600 float32 features (2400 bytes); move the file aside (the agent starts an "
            "empty one)"
        )
        # Nothing else is lost: every sample is still there, the other task loads, the store
        # takes new samples, and the error repeats (it does not go away by itself).
        assert s.stats(NOW).per_task == {"raw": 5, "other": 1}
        x, y = s.load("other")
        assert x.tolist() == [[1.0, 2.0]] and y.tolist() == [0.5]
        assert s.add([sample(1, [3.0, 4.0], 1.5)], "other", NOW) == 1
        assert s.load("other")[0].tolist() == [[1.0, 2.0], [3.0, 4.0]]
        with pytest.raises(SampleStoreError, match="is damaged"):
            s.load("raw")
    conn = sqlite3.connect(path)
    try:
        intact = [
            np.frombuffer(row[0], "<f4")
            for row in conn.execute(
                "SELECT features FROM samples WHERE task_key = 'raw' AND end_ns != ? ORDER BY end_ns",
                (damaged_end_ns,),
            )
        ]
    finally:
        conn.close()
    assert np.array_equal(np.stack(intact), vectors[[0, 1, 3, 4]])
