"""Issue 16 below the services: a full or read-only file system as each state file reports it.

Real SQLite errors (``PRAGMA max_page_count`` makes SQLite itself answer SQLITE_FULL; a
``mode=ro`` connection SQLITE_READONLY) and real file systems (a tmpfs filled up or remounted
read-only, :mod:`support.tiny_fs`; skipped without root): every file's write refuses with its
own error type that is also a :class:`~fedge.shell.files.StorageFault`, in one line, and leaves
the previous content intact; the same write works once there is room again.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from fedge.agent.device_state import DeviceState, DeviceStateError, DeviceStateStorageFault, DeviceStateStore
from fedge.agent.edgex.ingest import BackfillCursor, EdgeXIngest
from fedge.agent.edgex.samples import Sample
from fedge.agent.outbox import Outbox, OutboxError, OutboxStorageFault
from fedge.agent.sample_store import SampleStore
from fedge.aggregator.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointStorageFault,
    load_checkpoint,
    save_checkpoint,
)
from fedge.protocol.task import task_spec_from_dict
from fedge.shell.files import prepare_writable_dir
from fedge.shell.storage_faults import StateDirWatch, StorageFault, storage_fault
from support.tiny_fs import TinyFs

pytest_plugins = ("support.tiny_fs",)

ENOSPC = "No space left on device"
EROFS = "Read-only file system"


def leftovers(directory: Path) -> list[str]:
    """Temp files a failed atomic write could leave: ``.<name>.*.tmp``."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# --- what counts as full or read-only ------------------------------------------------------------


def test_full_and_read_only_errors_are_told_apart_from_every_other_error(tmp_path: Path) -> None:
    assert storage_fault(OSError(errno.ENOSPC, "x")) == ("full", ENOSPC)
    assert storage_fault(OSError(errno.EDQUOT, "x")) == ("full", "Disk quota exceeded")
    assert storage_fault(OSError(errno.EROFS, "x")) == ("read_only", EROFS)
    for other in (errno.EACCES, errno.EIO, errno.ENOTDIR, errno.EFBIG):
        assert storage_fault(OSError(other, "x")) is None
    assert storage_fault(ValueError("No space left on device")) is None

    db = tmp_path / "db.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE t (b BLOB)")
    conn.commit()
    conn.execute("PRAGMA max_page_count = 3")  # SQLite's own "database or disk is full"
    with pytest.raises(sqlite3.OperationalError) as full:
        conn.execute("INSERT INTO t VALUES (?)", (b"\0" * 100_000,))
    conn.close()
    assert storage_fault(full.value) == ("full", ENOSPC)
    ro = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    with pytest.raises(sqlite3.OperationalError) as read_only:
        ro.execute("INSERT INTO t VALUES (1)")
    ro.close()
    assert storage_fault(read_only.value) == ("read_only", EROFS)
    with pytest.raises(sqlite3.OperationalError) as other:
        sqlite3.connect(db).execute("SELECT * FROM missing")
    assert storage_fault(other.value) is None


# --- the files, on a file system that fills up -----------------------------------------------


def test_a_full_outbox_refuses_in_one_line_stores_nothing_and_works_again_with_room(
    tmp_path: Path, tiny_fs: list[TinyFs]
) -> None:
    fs = TinyFs(tmp_path / "state", "1m")
    tiny_fs.append(fs)
    path = fs.path / "outbox.sqlite"
    with Outbox(path) as outbox:
        first = outbox.put("t/update/d1", b"a" * 1000, 1, "r1", "update")
        fs.fill()
        with pytest.raises(OutboxStorageFault) as refused:
            outbox.put("t/update/d1", b"b" * 200_000, 1, "r1", "update")
        # Before, SQLite's own rollback made ours fail and hid the reason:
        # "outbox ...: cannot rollback - no transaction is active".
        assert str(refused.value) == f"cannot write outbox {path}: {ENOSPC}"
        assert isinstance(refused.value, OutboxError) and isinstance(refused.value, StorageFault)
        assert (refused.value.fault, refused.value.path) == ("full", path)
        with pytest.raises(OutboxStorageFault):
            outbox.acknowledge(first)  # a delete needs room in the WAL too
        assert [m.id for m in outbox.pending()] == [first]  # nothing stored, nothing lost
        fs.free()
        second = outbox.put("t/update/d1", b"b" * 200_000, 1, "r1", "update")
        assert outbox.acknowledge(first)
        assert [m.id for m in outbox.pending()] == [second]
    with Outbox(path) as reopened:  # the integrity check on open passes
        assert [m.payload for m in reopened.pending()] == [b"b" * 200_000]


def test_a_full_state_dir_keeps_the_previous_device_state_and_checkpoint(
    tmp_path: Path, tiny_fs: list[TinyFs]
) -> None:
    fs = TinyFs(tmp_path / "state", "256k")
    tiny_fs.append(fs)
    store = DeviceStateStore(fs.path / "state.json")
    store.save(DeviceState(update_counter=1))
    checkpoint_path = fs.path / "checkpoint.bin"

    def checkpoint(version: int) -> Checkpoint:
        return Checkpoint(np.full(1000, version, np.float32), version, version, f"v{version}", None)

    save_checkpoint(checkpoint_path, checkpoint(1))
    save_checkpoint(checkpoint_path, checkpoint(2))
    fs.fill()

    with pytest.raises(DeviceStateStorageFault) as state_refused:
        store.save(DeviceState(update_counter=2))
    assert str(state_refused.value) == f"cannot write device state {fs.path / 'state.json'}: {ENOSPC}"
    assert isinstance(state_refused.value, DeviceStateError)
    assert store.load() == DeviceState(update_counter=1)

    with pytest.raises(CheckpointStorageFault) as checkpoint_refused:
        save_checkpoint(checkpoint_path, checkpoint(3))
    assert str(checkpoint_refused.value) == f"cannot write checkpoint {checkpoint_path}: {ENOSPC}"
    assert isinstance(checkpoint_refused.value, CheckpointError)
    assert load_checkpoint(checkpoint_path, 10**6) == checkpoint(2)  # not even the .prev fallback
    assert leftovers(fs.path) == []

    fs.free()
    store.save(DeviceState(update_counter=2))
    save_checkpoint(checkpoint_path, checkpoint(3))
    assert store.load().update_counter == 2 and load_checkpoint(checkpoint_path, 10**6) == checkpoint(3)


def test_a_read_only_state_dir_refuses_every_write_as_read_only(
    tmp_path: Path, tiny_fs: list[TinyFs]
) -> None:
    fs = TinyFs(tmp_path / "state", "256k")
    tiny_fs.append(fs)
    store = DeviceStateStore(fs.path / "state.json")
    store.save(DeviceState(update_counter=1))
    checkpoint_path = fs.path / "checkpoint.bin"
    fs.remount("ro")
    with pytest.raises(DeviceStateStorageFault) as refused:
        store.save(DeviceState(update_counter=2))
    assert str(refused.value) == f"cannot write device state {fs.path / 'state.json'}: {EROFS}"
    assert refused.value.fault == "read_only"
    with pytest.raises(CheckpointStorageFault, match=f"^cannot write checkpoint {checkpoint_path}: {EROFS}$"):
        save_checkpoint(checkpoint_path, Checkpoint(np.ones(4, np.float32), 1, 1, "v1", None))
    with pytest.raises(OSError) as probe:
        prepare_writable_dir(fs.path)
    assert probe.value.errno == errno.EROFS
    assert store.load() == DeviceState(update_counter=1)
    # SQLite words a write the kernel refuses under an open connection as a disk I/O error,
    # without the errno: any SQLite error on a file system mounted read-only is read-only.
    with pytest.raises(sqlite3.Error) as other:
        sqlite3.connect(":memory:").execute("SELECT * FROM missing")
    assert storage_fault(other.value, fs.path) == ("read_only", EROFS)
    assert storage_fault(other.value, tmp_path) is None


def test_the_start_probe_fails_on_a_full_file_system_and_leaves_nothing(
    tmp_path: Path, tiny_fs: list[TinyFs]
) -> None:
    fs = TinyFs(tmp_path / "state", "256k")
    tiny_fs.append(fs)
    fs.fill()
    with pytest.raises(OSError) as probe:  # an empty probe file would fit: it writes a page
        prepare_writable_dir(fs.path)
    assert probe.value.errno == errno.ENOSPC
    assert sorted(p.name for p in fs.path.iterdir()) == ["filler"]
    fs.free()
    prepare_writable_dir(fs.path)
    assert list(fs.path.iterdir()) == []


# --- the EdgeX ingest: readings it cannot store --------------------------------------------------

TASK = task_spec_from_dict(
    {
        "task": {"name": "one-sensor"},
        "features": {"resources": ["x"]},
        "label": {"resource": "y", "classes": ["a", "b"]},
        "model": {"kind": "classification", "hidden": [4]},
        "training": {"optimizer": "sgd", "learning_rate": 0.1, "batch_size": 4, "local_epochs": 1},
    }
)


def test_samples_the_full_store_cannot_take_are_counted_logged_once_and_the_ingest_goes_on(
    tmp_path: Path, tiny_fs: list[TinyFs], caplog: pytest.LogCaptureFixture
) -> None:
    fs = TinyFs(tmp_path / "state", "1m")
    tiny_fs.append(fs)
    now = 1_700_000_000.0
    with SampleStore(fs.path / "samples.sqlite", 100_000, 0) as store:
        ingest = EdgeXIngest(
            "d1",
            TASK,
            store,
            {},
            None,
            "edgex",
            None,
            BackfillCursor(fs.path / "cursor.json"),
            clock=lambda: now,
        )

        def batch(start: int, n: int) -> list[Sample]:
            return [
                Sample(np.ones(1, np.float32) * i, i % 2, i * 10**9, i * 10**9)
                for i in range(start, start + n)
            ]

        assert ingest._store(batch(0, 10), []) == 10
        fs.fill()
        caplog.set_level(logging.INFO, "fedge.agent.edgex")
        for start in (10, 2000, 4000):  # three batches lost, one line
            assert ingest._store(batch(start, 1000), []) == 0
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        line = (
            f"[agent] state_dir {fs.path} is full (cannot write sample store {fs.path / 'samples.sqlite'}: "
            f"{ENOSPC}): free space on its file system (or give it a bigger volume). The agent keeps "
            "running, retries every 2 s and goes on by itself once it can write (no restart needed); "
            "meanwhile the samples it cannot store are dropped, counted in data.store.store_error of the "
            "device status"
        )
        assert errors == [line]
        report = ingest.report()
        assert (report["store"]["store_error"], report["last_error"]) == (3000, line)
        fs.free()
        assert ingest._store(batch(6000, 10), []) == 10
        report = ingest.report()
        assert (report["stored_samples"], report["last_error"]) == (20, None)
        assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO][-1] == (
            f"[agent] state_dir {fs.path} can be written again (3 write(s) had failed); the agent goes on"
        )


# --- StateDirWatch: one line an episode, counts, the end of it -------------------------------


def test_the_watch_logs_each_episode_once_counts_every_failure_and_reports_the_problem(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = logging.getLogger("test.watch")
    watch = StateDirWatch(log, "[x] state_dir", tmp_path, "service", "nothing happens")
    full = StorageFault("outbox", tmp_path / "o", "full", ENOSPC)
    read_only = StorageFault("outbox", tmp_path / "o", "read_only", EROFS)
    assert watch.report() == {"problem": None, "failed_writes": {"full": 0, "read_only": 0}}
    assert not watch.wrote()
    caplog.set_level(logging.INFO, "test.watch")
    first = watch.failed(full)
    assert watch.failed(full) == first
    assert watch.report() == {"problem": first, "failed_writes": {"full": 2, "read_only": 0}}
    assert watch.wrote() and not watch.wrote()
    second = watch.failed(read_only)
    assert watch.failed(full) == first  # the same episode, but full again: said again
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("ERROR", first),
        (
            "INFO",
            f"[x] state_dir {tmp_path} can be written again (2 write(s) had failed); the service goes on",
        ),
        ("ERROR", second),
        ("ERROR", first),
    ]
    assert first == (
        f"[x] state_dir {tmp_path} is full (cannot write outbox {tmp_path / 'o'}: {ENOSPC}): free space on "
        "its file system (or give it a bigger volume). The service keeps running, retries every 2 s and goes "
        "on by itself once it can write (no restart needed); meanwhile nothing happens"
    )
    assert second.startswith(
        f"[x] state_dir {tmp_path} is read-only (cannot write outbox {tmp_path / 'o'}: {EROFS})"
    )
    assert watch.report() == {"problem": first, "failed_writes": {"full": 3, "read_only": 1}}
