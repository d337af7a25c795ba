"""A device's own CSV of readings as its data source: ``[data] source = "csv"``.

A building's logger (or an EdgeX export) writes rows of readings to a file on the device; the
agent reads it in the format ``docs/own-data.md`` documents (:mod:`fedge.agent.csv_format`: a
header naming the task's resources and a time column, one row per instant). Each row becomes
the EdgeX readings it stands for, and those go through exactly the EdgeX ingest's path
(:class:`~fedge.agent.edgex.ingest.EdgeXIngest`: the same :class:`SampleBuilder`, sample store,
live prediction windows and report), so the samples are byte for byte those of the same
readings arriving as EdgeX events. Nothing here imports a data-set package: a device install
needs neither ``lab/`` nor ``tools/``.

**Streaming, bounded.** The file is read line by line from a byte offset, at most
:data:`BATCH_ROWS` rows at a time, each line at most :data:`MAX_LINE_BYTES` (a longer one is a
bad row, skipped without being held in memory), so a 10 GB file costs what a batch costs.

**Growing files.** A logger appends: the source's thread reads only the new rows, from its
offset, when the file changes. On Linux it sleeps until inotify reports a change in the file's
directory (:class:`DirWatch`: a write, a close after writing, a file created, moved in or
away, a permission change: so a rotation, a file that appears or becomes readable, all wake
it), and otherwise only for its own deadlines (a half-written last line settling, the reorder
buffer's flush) and once every :data:`WATCH_MAX_WAIT_S` (a network filesystem's remote writes
raise no inotify event). Where inotify is unavailable (another OS, no free watch, a directory
that does not exist yet) it looks every :data:`POLL_S` instead, logged once. A last line
without its newline is a row being written: it is read once it has not changed for
:data:`SETTLE_S`. The offset survives restarts
(``csv_cursor.json`` in the state directory); it points at the first row of the next window
not yet stored, so the windows after a restart are those of an uninterrupted run (the store
drops the repeats). A file that shrinks or is replaced (another inode, another header) is read
again from its start; repeated samples are dropped by the store as ``duplicate``.

**Bad rows never stop it.** A row that cannot be read (:data:`BAD_ROW_REASONS`) is skipped,
counted by reason in the status (``data.csv.bad_rows``) and logged as one line naming the file,
the line and the fix (the first :data:`MAX_LOGGED_BAD_ROWS` of a run; the rest are counted). A
file that is missing, unreadable or has a header the task cannot use is one log line naming the
fix and ``data.last_error``; the source looks again when the file changes (or every poll).
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import errno
import hashlib
import json
import logging
import os
import select
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from fedge.agent.csv_format import (
    TIME_COLUMNS,
    CsvError,
    check_header,
    find_time_column,
    parse_time,
    task_cell,
    task_columns,
)
from fedge.agent.edgex.ingest import IDLE_FLUSH_S, BackfillCursor, EdgeXIngest
from fedge.agent.edgex.readings import Reading
from fedge.agent.edgex.samples import DEFAULT_MAX_PENDING
from fedge.agent.sample_store import SampleStore
from fedge.protocol.bounded_json import BoundedJsonError, loads_bounded
from fedge.protocol.errors import FedgeError
from fedge.protocol.task import TaskSpec
from fedge.shell.files import atomic_write
from fedge.shell.threads import name_current_thread

log = logging.getLogger("fedge.agent.csv")

#: Without inotify: how often the source looks for new rows (and for a file that was missing or
#: unusable).
POLL_S = 1.0
#: With inotify: the longest the source sleeps without an event (a file on a network filesystem
#: changes without one).
WATCH_MAX_WAIT_S = 60.0
#: Rows read between two feeds of the sample builder (and two looks at the stop flag).
BATCH_ROWS = 2048
#: A line longer than this is not a row of readings (a header of 4096 resources is shorter).
MAX_LINE_BYTES = 64 * 1024
#: How long an unterminated last line must stay unchanged before it is read as a row.
SETTLE_S = 2.0
#: Bad rows logged per run, one line each; the rest are counted in the status only.
MAX_LOGGED_BAD_ROWS = 100
#: Why a row is skipped: a line over :data:`MAX_LINE_BYTES`, not UTF-8, not CSV (a stray
#: quote, a NUL), another number of fields than the header, no valid time, a cell that is not
#: the reading its column needs.
BAD_ROW_REASONS = ("too_long", "encoding", "syntax", "fields", "time", "value")
#: The cursor file in ``[agent] state_dir`` and its largest valid size.
CURSOR_FILE = "csv_cursor.json"
MAX_CURSOR_BYTES = 4096
#: How often the cursor is written while rows keep coming.
CURSOR_INTERVAL_S = 5.0

_FIXES = {
    "too_long": f"a row of readings is one line of at most {MAX_LINE_BYTES} bytes; fix the logger's output",
    "encoding": "save the file as UTF-8",
    "syntax": "fix the row's quoting (a cell with a comma is quoted, a quote inside it doubled)",
    "fields": "give every row one cell per header column (an empty cell for a missing reading)",
    "time": "give every row its time (ISO 8601, e.g. 2025-03-01T08:00:00Z, or epoch seconds)",
    "value": "fix the cell, or leave it empty for a missing reading",
}


# inotify(7): the events that can mean new rows, or a file to (re)open, in the file's directory.
_IN_MODIFY = 0x002
_IN_ATTRIB = 0x004
_IN_CLOSE_WRITE = 0x008
_IN_MOVED_FROM = 0x040
_IN_MOVED_TO = 0x080
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_IGNORED = 0x8000  # the watch is gone (the directory deleted or unmounted)
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
WATCH_MASK = (
    _IN_MODIFY | _IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
)
_EVENT_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)
#: Bytes read from the inotify descriptor per read, and reads per wake-up: what is left waits
#: for the next wake-up (which then comes at once), so a burst of events is never held whole.
_EVENT_BUFFER = 64 * 1024
_READS_PER_WAKE = 16


class DirWatch:
    """inotify on one directory (Linux), through libc with ctypes; :meth:`wait` sleeps until an
    event, :meth:`wake` (another thread, e.g. stop) or a timeout. :meth:`open` returns None
    (with the reason) where inotify is unavailable."""

    def __init__(self, fd: int, directory: Path) -> None:
        self.fd = fd
        self.directory = directory
        self.gone = False  # IN_IGNORED: the directory went away; the caller falls back to polling
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    @classmethod
    def open(cls, directory: Path) -> DirWatch | str:
        """A watch on ``directory``, or why there cannot be one."""
        if not sys.platform.startswith("linux"):
            return f"no inotify on {sys.platform}"
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            init1, add_watch = libc.inotify_init1, libc.inotify_add_watch
        except (OSError, AttributeError) as exc:
            return f"no inotify in the C library ({exc})"
        init1.argtypes, init1.restype = [ctypes.c_int], ctypes.c_int
        add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        add_watch.restype = ctypes.c_int
        fd = init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            return f"inotify_init1: {os.strerror(ctypes.get_errno())}"
        if add_watch(fd, os.fsencode(directory), WATCH_MASK) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            hint = " (raise fs.inotify.max_user_watches)" if err == errno.ENOSPC else ""
            return f"cannot watch {directory}: {os.strerror(err)}{hint}"
        return cls(fd, directory)

    def wait(self, timeout: float | None) -> bool:
        """Sleeps until an event, a :meth:`wake` or ``timeout`` (None: no timeout); True if an
        event came. Reads (and forgets) at most a bounded number of events' bytes."""
        try:
            ready, _, _ = select.select([self.fd, self._wake_r], [], [], timeout)
        except InterruptedError:  # pragma: no cover (Python retries select itself)
            return False
        if self._wake_r in ready:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except BlockingIOError:
                pass
        if self.fd not in ready:
            return False
        for _ in range(_READS_PER_WAKE):
            try:
                data = os.read(self.fd, _EVENT_BUFFER)
            except BlockingIOError:
                break
            offset = 0
            while offset + _EVENT_HEADER.size <= len(data):
                _, mask, _, length = _EVENT_HEADER.unpack_from(data, offset)
                if mask & _IN_IGNORED:
                    self.gone = True
                offset += _EVENT_HEADER.size + length
        return True

    def wake(self) -> None:
        """Ends a :meth:`wait` in another thread now."""
        with contextlib.suppress(OSError):  # a wake-up is pending already (the pipe is full)
            os.write(self._wake_w, b"!")

    def close(self) -> None:
        for fd in (self.fd, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


class _NoBackfill(BackfillCursor):
    """The ingest's backfill cursor is for core-data; a CSV source keeps its own (:class:`CsvCursor`)."""

    def load(self) -> int | None:
        return None

    def save(self, origin_ns: int, now: float, force: bool = False) -> None:
        return None


@dataclass(frozen=True)
class CsvPosition:
    """Where reading resumes: the byte ``offset`` of a line, the number of lines before it
    (``line``), and which file it belongs to (inode and a hash of its header line)."""

    inode: int
    header_sha256: str
    offset: int
    line: int


class CsvCursor:
    """The position in ``state_dir/csv_cursor.json``, written atomically."""

    def __init__(self, path: Path, csv_file: Path) -> None:
        self.path = path
        self.csv_file = csv_file

    def load(self) -> CsvPosition | None:
        """The saved position of ``csv_file``, or None (none yet, or for another file). An
        unreadable cursor is logged and reading starts over (the store drops the repeats)."""
        try:
            with self.path.open("rb") as f:
                data = loads_bounded(f.read(MAX_CURSOR_BYTES + 1), max_bytes=MAX_CURSOR_BYTES)
        except FileNotFoundError:
            return None
        except (OSError, BoundedJsonError) as exc:
            log.warning(
                "CSV cursor %s is unreadable (%s): reading %s from its start", self.path, exc, self.csv_file
            )
            return None
        if not isinstance(data, dict) or data.get("file") != str(self.csv_file):
            return None
        fields = [data.get(k) for k in ("inode", "offset", "line")]
        sha = data.get("header_sha256")
        if not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in fields
        ) or not isinstance(sha, str):
            log.warning("CSV cursor %s is not valid: reading %s from its start", self.path, self.csv_file)
            return None
        inode, offset, line = (int(v) for v in fields)  # type: ignore[arg-type]
        return CsvPosition(inode, sha, offset, line)

    def save(self, position: CsvPosition) -> None:
        document = {
            "file": str(self.csv_file),
            "inode": position.inode,
            "header_sha256": position.header_sha256,
            "offset": position.offset,
            "line": position.line,
        }
        atomic_write(self.path, json.dumps(document).encode("utf-8"), 0o644)


@dataclass
class _OpenFile:
    handle: BinaryIO
    inode: int
    header_sha256: str
    header_end: int
    width: int
    time_index: int
    time_column: str
    columns: list[tuple[str, int]]


class CsvSource(EdgeXIngest):
    """``[data] source = "csv"``: the rows of ``csv_file`` as this device's readings (module
    docstring). ``value_types`` are the profile's (resource -> EdgeX ``valueType``); without a
    profile a cell is typed as ``fedge evaluate`` types it."""

    def __init__(
        self,
        csv_file: Path,
        device: str,
        task: TaskSpec,
        store: SampleStore,
        limits: Mapping[str, tuple[float | None, float | None]],
        cursor: CsvCursor,
        value_types: Mapping[str, str] | None = None,
        profile_name: str = "",
        clock: Callable[[], float] = time.time,
        live: bool = False,
        label_units: str | None = None,
        poll_s: float = POLL_S,
        settle_s: float = SETTLE_S,
    ) -> None:
        super().__init__(
            device,
            task,
            store,
            limits,
            None,
            "",
            None,
            _NoBackfill(cursor.path),
            clock=clock,
            live=live,
            label_units=label_units,
        )
        self.csv_file = csv_file
        self.csv_cursor = cursor
        self.value_types = dict(value_types or {})
        self.profile_name = profile_name
        self.poll_s = poll_s
        self.settle_s = settle_s
        self.required = [*task.features.resources, task.label.resource]
        self.bad_rows: dict[str, int] = dict.fromkeys(BAD_ROW_REASONS, 0)
        self.last_bad_row: dict[str, Any] | None = None
        self.rows_read = 0
        self.restarts = 0  # times the file was read again from its start (shrunk or replaced)
        #: Every whole line of the file is read and its samples are built (until it grows); a
        #: last line still without its newline may wait (``settle_s``).
        self.caught_up = False
        self._logged_bad = 0
        self._file: _OpenFile | None = None
        self._offset = 0  # byte offset of the next unread line
        self._line = 0  # lines consumed before it (the header is line 1)
        self._skipping = False  # inside a line over MAX_LINE_BYTES, until its newline
        self._tail: tuple[int, int, float] | None = None  # unterminated last line: offset, size, seen
        #: (origin, offset, line) of the rows fed and not yet behind a stored window: the first
        #: one at or after ``resume_ns`` is where a restart resumes.
        window = task.features.window
        self._marks: deque[tuple[int, int, int]] = deque(
            maxlen=2 * (window.size if window is not None else 1) + DEFAULT_MAX_PENDING + BATCH_ROWS
        )
        self._saved = cursor.load()
        self._cursor_saved_at = float("-inf")
        self._problem: str | None = None
        self._watch: DirWatch | None = None
        self._watch_lock = threading.Lock()  # stop() wakes the watch the thread may be closing
        self._watch_problem: str | None = None  # why the source polls (logged once)

    # --- life cycle ----------------------------------------------------------------------

    def stop(self) -> None:
        self.stop_requested.set()
        with self._watch_lock:
            if self._watch is not None:
                self._watch.wake()  # the thread sleeps in the watch: it sees stop at once
        super().stop()  # the worker has ended: the offset and marks are final
        self._save_cursor(force=True)
        if self._file is not None:
            self._file.handle.close()
            self._file = None

    def _run(self) -> None:
        name_current_thread("fedge-csv")
        try:
            self._loop()
        finally:
            with self._watch_lock:
                if self._watch is not None:
                    self._watch.close()
                    self._watch = None

    def _loop(self) -> None:
        while not self.stop_requested.is_set():
            store_failed = False
            try:
                got = self._read_batch()
            except FedgeError as exc:  # the store failed: logged, counted (store_error), tried again
                self.last_error = str(exc)
                log.error("could not store samples from %s: %s", self.csv_file, exc)
                got, store_failed = 0, True
            if got:
                continue
            if not self._flushed and time.monotonic() - self._last_feed >= IDLE_FLUSH_S:
                self._flush()  # the rows waiting in the reorder buffer become samples now
                self._after_feed(force=True)
            self.caught_up = self._file is not None and self._flushed
            watch = self._ensure_watch()
            if watch is None or store_failed:
                self.stop_requested.wait(self.poll_s)
            else:
                watch.wait(self._next_look_in())

    def _ensure_watch(self) -> DirWatch | None:
        """The inotify watch on the file's directory, (re)made if there is none; None (the
        reason logged once per reason) where there cannot be one: the source polls."""
        with self._watch_lock:
            if self._watch is not None and self._watch.gone:
                self._watch.close()
                self._watch = None
            if self._watch is not None or self.stop_requested.is_set():
                return self._watch
            opened = DirWatch.open(self.csv_file.parent)
            if isinstance(opened, str):
                if opened != self._watch_problem:
                    self._watch_problem = opened
                    log.info(
                        "%s: %s; looking for new rows every %g s instead", self.csv_file, opened, self.poll_s
                    )
                return None
            self._watch, self._watch_problem = opened, None
            return opened

    def _next_look_in(self) -> float:
        """How long the source may sleep with a watch: until the reorder buffer is due to flush
        or a half-written last line has settled, else :data:`WATCH_MAX_WAIT_S`."""
        now = time.monotonic()
        due = [now + WATCH_MAX_WAIT_S]
        if not self._flushed:
            due.append(self._last_feed + IDLE_FLUSH_S)
        if self._tail is not None:
            due.append(self._tail[2] + self.settle_s)
        return max(0.0, min(due) - now)

    # --- the file --------------------------------------------------------------------------

    def _set_problem(self, message: str) -> None:
        """A file problem: logged once while it lasts, and ``data.last_error``."""
        if message != self._problem:
            log.warning("%s", message)
        self._problem = self.last_error = message

    def _clear_problem(self) -> None:
        if self._problem is not None and self.last_error == self._problem:
            self.last_error = None
        self._problem = None

    def _open(self) -> bool:
        """Opens the file and reads its header; resumes at the saved position if it is this
        file's. False (with the problem logged) if it cannot be read yet."""
        path = self.csv_file
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            self._set_problem(
                f"[data] csv_file {path}: no such file (yet); the agent reads it once it exists"
            )
            return False
        except OSError as exc:
            self._set_problem(
                f"cannot read [data] csv_file {path}: {exc.strerror}; make it readable by the agent's user"
            )
            return False
        try:
            opened = self._read_header(handle)
        except CsvError as exc:
            handle.close()
            self._set_problem(f"[data] csv_file {exc}")
            return False
        except OSError as exc:
            handle.close()
            self._set_problem(f"cannot read [data] csv_file {path}: {exc.strerror}")
            return False
        if opened is None:  # no complete header line yet
            handle.close()
            self._set_problem(
                f"[data] csv_file {path}: no complete header line yet; the agent reads it once written"
            )
            return False
        self._file = opened
        saved, self._saved = self._saved, None
        size = os.fstat(handle.fileno()).st_size
        if (
            saved is not None
            and saved.inode == opened.inode
            and saved.header_sha256 == opened.header_sha256
            and opened.header_end <= saved.offset <= size
        ):
            self._offset, self._line = saved.offset, saved.line
            log.info(
                "reading %s from line %d (byte %d), where the last run stopped",
                path,
                saved.line + 1,
                saved.offset,
            )
        else:
            if saved is not None:
                log.info(
                    "%s is not the file the last run read (replaced or shrunk): reading it from its start",
                    path,
                )
            self._offset, self._line = opened.header_end, 1
        handle.seek(self._offset)
        self._skipping = False
        self._tail = None
        self._marks.clear()
        self._clear_problem()
        return True

    def _read_header(self, handle: BinaryIO) -> _OpenFile | None:
        raw = handle.readline(MAX_LINE_BYTES + 1)
        if not raw.endswith(b"\n"):
            if len(raw) > MAX_LINE_BYTES:
                raise CsvError(f"{self.csv_file}: the header line is longer than {MAX_LINE_BYTES} bytes")
            return None
        path = self.csv_file
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise CsvError(f"{path}: the header is not UTF-8 text; save the file as UTF-8") from None
        try:
            fields = next(csv.reader([text.rstrip("\r\n")], strict=True), [])
        except csv.Error as exc:
            raise CsvError(f"{path}: the header is not valid CSV: {exc}") from None
        header = check_header(path, fields, self.required, task_columns(self.required))
        time_column = find_time_column(header)
        if time_column is None:
            raise CsvError(
                f"{path}: no time column in the header; a device places its readings in time: name "
                f"one of the columns {', '.join(TIME_COLUMNS)} (ISO 8601 or epoch seconds)"
            )
        if header.count(time_column) > 1:
            raise CsvError(f"{path}: the time column {time_column!r} appears more than once")
        return _OpenFile(
            handle=handle,
            inode=os.fstat(handle.fileno()).st_ino,
            header_sha256=hashlib.sha256(raw).hexdigest(),
            header_end=handle.tell(),
            width=len(header),
            time_index=header.index(time_column),
            time_column=time_column,
            columns=[(name, header.index(name)) for name in self.required],
        )

    def _replaced(self) -> bool:
        """Whether the path now names another file, or the file shrank below the offset."""
        assert self._file is not None
        try:
            st = os.stat(self.csv_file)
        except OSError:
            return False  # moved away (rotation): finish the open file; look again next poll
        return st.st_ino != self._file.inode or st.st_size < self._offset

    # --- rows ------------------------------------------------------------------------------

    def _read_batch(self) -> int:
        """Reads up to :data:`BATCH_ROWS` new lines and feeds their readings; 0 when there was
        nothing new to read."""
        if self._file is not None and self._replaced():
            self.restarts += 1
            log.info("%s was replaced or shrank: reading it again from its start", self.csv_file)
            self._file.handle.close()
            self._file = None
        if self._file is None and not self._open():
            return 0
        assert self._file is not None
        handle = self._file.handle
        readings: list[Reading] = []
        lines = progress = 0
        for _ in range(BATCH_ROWS):  # lines, or pieces of a line over the limit
            start = self._offset
            raw = handle.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            progress += 1
            complete = raw.endswith(b"\n")
            if self._skipping:  # the rest of a line over the limit, never held whole
                self._offset = handle.tell()
                if complete:
                    self._skipping = False
                    self._line += 1
                continue
            if not complete and len(raw) > MAX_LINE_BYTES:
                self._offset = handle.tell()
                self._skipping = True
                self._bad("too_long", self._line + 1, f"a line of more than {MAX_LINE_BYTES} bytes")
                continue
            if not complete and not self._settled(start, len(raw)):
                handle.seek(start)  # a row being written: read it once it is whole
                progress -= 1
                break
            self._tail = None
            self._offset = handle.tell()
            self._line += 1
            lines += 1
            row = self._row(raw, self._line)
            if row:
                readings.extend(row)
                self._marks.append((row[0].origin_ns, start, self._line - 1))
        if lines:
            self.caught_up = False  # before the count moves: whoever sees the count sees this
            self.feed(readings)
            self._after_feed()
            self.rows_read += lines
        return progress

    def _settled(self, offset: int, size: int) -> bool:
        """Whether an unterminated last line has stayed the same for ``settle_s``."""
        now = time.monotonic()
        if self._tail is None or self._tail[:2] != (offset, size):
            self._tail = (offset, size, now)
            return False
        return now - self._tail[2] >= self.settle_s

    def _row(self, raw: bytes, line: int) -> list[Reading]:
        """The readings of one line (none for a blank or bad one; a bad one is counted)."""
        assert self._file is not None
        try:
            text = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            self._bad("encoding", line, "not UTF-8 text")
            return []
        if not text.strip():
            return []
        try:
            fields = next(csv.reader([text], strict=True), [])
        except csv.Error as exc:
            self._bad("syntax", line, f"not valid CSV: {exc}")
            return []
        if len(fields) != self._file.width:
            self._bad("fields", line, f"{len(fields)} fields, the header has {self._file.width}")
            return []
        where = f"{self.csv_file} line {line}"
        try:
            origin = parse_time(
                fields[self._file.time_index].strip(), f"{where}: column {self._file.time_column!r}"
            )
        except CsvError as exc:
            self._bad("time", line, str(exc).removeprefix(f"{where}: "))
            return []
        readings = []
        for name, column in self._file.columns:
            cell = fields[column].strip()
            if not cell:
                continue  # a missing reading: its row is incomplete
            try:
                value_type, value = task_cell(where, name, cell, self.task, self.value_types.get(name))
            except CsvError as exc:
                self._bad("value", line, str(exc).removeprefix(f"{where}: "))
                return []
            readings.append(Reading(self.device, name, self.profile_name, value_type, value, origin))
        return readings

    def _bad(self, reason: str, line: int, detail: str) -> None:
        self.bad_rows[reason] += 1
        message = f"{self.csv_file} line {line}: {detail}; row skipped ({reason}): {_FIXES[reason]}"
        self.last_bad_row = {"line": line, "reason": reason, "error": message}
        self._logged_bad += 1
        if self._logged_bad <= MAX_LOGGED_BAD_ROWS:
            log.warning("%s", message)
        if self._logged_bad == MAX_LOGGED_BAD_ROWS:
            log.warning(
                "%s: %d bad rows logged; further ones are counted in the status (data.csv.bad_rows), "
                "not logged",
                self.csv_file,
                MAX_LOGGED_BAD_ROWS,
            )

    # --- the cursor ------------------------------------------------------------------------

    def _after_feed(self, force: bool = False) -> None:
        """Drops the marks of rows behind the stored windows; saves the cursor now and then."""
        resume = self.resume_ns
        if resume is not None:
            while self._marks and self._marks[0][0] < resume:
                self._marks.popleft()
        self._save_cursor(force)

    def _save_cursor(self, force: bool = False) -> None:
        if self._file is None or self._skipping:  # never resume inside a line
            return
        now = time.monotonic()
        if not force and now - self._cursor_saved_at < CURSOR_INTERVAL_S:
            return
        offset, line = (self._marks[0][1], self._marks[0][2]) if self._marks else (self._offset, self._line)
        try:
            self.csv_cursor.save(CsvPosition(self._file.inode, self._file.header_sha256, offset, line))
        except OSError as exc:  # the old cursor stays: a restart re-reads a little more
            log.warning(
                "cannot write CSV cursor %s: %s (a restart re-reads more rows)", self.csv_cursor.path, exc
            )
            return
        self._cursor_saved_at = now

    # --- outputs ---------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        base = super().report()
        for key in ("bus_connected", "bus", "ignored_events", "backfilled_readings", "backfill_errors"):
            base.pop(key, None)
        base["csv"] = {
            "file": str(self.csv_file),
            "offset": self._offset,
            "line": self._line,
            "rows_read": self.rows_read,
            "bad_rows": dict(self.bad_rows),
            "last_bad_row": self.last_bad_row,
            "restarts": self.restarts,
            "caught_up": self.caught_up,
        }
        return base
