"""A state directory that is full or read-only: recognising it, the error that says so, and
one service's watch over it (one line per episode, counted, retried).

Both pass (space is freed, the disk remounted), so a service reports them, keeps what it has
and retries instead of dying or calling a file corrupt (docs/faults.md).
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Literal

from fedge.protocol.errors import FedgeError

#: Why a write failed without anything being wrong with the data or the file: the file system
#: is full (or over quota), or read-only. Both pass (space is freed, the disk remounted), so a
#: service reports them, keeps what it has and retries instead of dying or calling a file corrupt.
Fault = Literal["full", "read_only"]
_FAULT_ERRNOS: dict[int, Fault] = {errno.ENOSPC: "full", errno.EDQUOT: "full", errno.EROFS: "read_only"}
# SQLite's primary result codes (the low byte of an extended code).
_SQLITE_READONLY = 8
_SQLITE_FULL = 13


def storage_fault(exc: BaseException, directory: Path | None = None) -> tuple[Fault, str] | None:
    """``(fault, reason)`` when ``exc`` is a file system refusing a write because it is full or
    read-only (an :class:`OSError`'s errno, SQLite's ``SQLITE_FULL`` / ``SQLITE_READONLY``, a
    :class:`StorageFault`); None for anything else. ``reason`` is the operating system's wording
    (SQLite's "database or disk is full" becomes "No space left on device"), so every file says
    it the same way.

    With ``directory`` (where the SQLite file is), any other SQLite error while that file
    system is mounted read-only is one too: SQLite reports a write that the kernel refuses with
    EROFS under an open connection (a file system remounted read-only after I/O errors) as a
    disk I/O error, without the errno."""
    if isinstance(exc, StorageFault):
        return exc.fault, exc.reason
    if isinstance(exc, OSError) and exc.errno in _FAULT_ERRNOS:
        return _FAULT_ERRNOS[exc.errno], os.strerror(exc.errno)
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if isinstance(code, int) and code & 0xFF == _SQLITE_FULL:
            return "full", os.strerror(errno.ENOSPC)
        if isinstance(code, int) and code & 0xFF == _SQLITE_READONLY:
            return "read_only", os.strerror(errno.EROFS)
        if directory is not None and mounted_read_only(directory):
            return "read_only", os.strerror(errno.EROFS)
    return None


def mounted_read_only(directory: Path) -> bool:
    """Whether the file system of ``directory`` is mounted read-only (False if it cannot tell)."""
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return False


class StorageFault(FedgeError):
    """A state file could not be written because its file system is full or read-only.

    Nothing was changed (the old file, or the SQLite transaction rolled back, is intact); the
    same write can succeed later. Each file's own error type derives from it as well (e.g.
    ``OutboxStorageFault(OutboxError, StorageFault)``), so a caller catches either. The message
    is ``"cannot write <what> <path>: <reason>"``.
    """

    def __init__(self, what: str, path: Path, fault: Fault, reason: str) -> None:
        super().__init__(f"cannot write {what} {path}: {reason}")
        self.what = what
        self.path = Path(path)
        self.fault: Fault = fault
        self.reason = reason


def unwritable_dir_fix(exc: BaseException, service: str) -> str | None:
    """What to do about a state directory that is full or read-only at start (None for other
    reasons: ownership, a file in the way), for the ConfigError line: ``exc`` is what
    :func:`prepare_writable_dir` raised, or a :class:`StorageFault` from opening a state file."""
    found = storage_fault(exc)
    if found is None:
        return None
    if found[0] == "full":
        return (
            "its file system is full: free space there (or give it a bigger volume), then start the "
            f"{service}"
        )
    return (
        "its file system is mounted read-only: remount it read-write (a volume mounted :ro or readOnly: "
        "true, or a file system the kernel made read-only after I/O errors, which needs fsck or new "
        f"storage first), then start the {service}"
    )


#: How often a service retries a write its state directory refused.
STATE_DIR_RETRY_S = 2.0


class StateDirWatch:
    """One service's view of its state directory while writes fail for being full or read-only.

    The first failure of an episode logs one ERROR line naming the directory, the reason and the
    fix; further failures are only counted (``failed_writes``, by fault); the first successful
    write after them ends the episode with one INFO line. Thread-safe (the agent's worker and
    the EdgeX ingest both write). :meth:`report` is what a status shows.
    """

    def __init__(
        self, log: logging.Logger, setting: str, directory: Path, service: str, meanwhile: str
    ) -> None:
        """``setting``: e.g. ``[agent] state_dir``; ``service``: "agent"; ``meanwhile``: what the
        service does until it can write again and where that is counted, for the log line."""
        self._log = log
        self._setting = setting
        self._directory = directory
        self._service = service
        self._meanwhile = meanwhile
        self._lock = threading.Lock()
        self._failed: dict[Fault, int] = {"full": 0, "read_only": 0}
        self._problem: str | None = None
        self._fault: Fault | None = None
        self._episode_failures = 0

    def line(self, exc: StorageFault) -> str:
        """The one line for ``exc``: the directory, the reason, the file, the fix."""
        head = f"{self._setting} {self._directory}"
        if exc.fault == "full":
            state, fix = "full", "free space on its file system (or give it a bigger volume)"
        else:
            state = "read-only"
            fix = (
                "remount it read-write (a file system the kernel made read-only after I/O errors "
                "needs fsck or new storage first)"
            )
        return (
            f"{head} is {state} ({exc}): {fix}. The {self._service} keeps running, retries every "
            f"{STATE_DIR_RETRY_S:g} s and goes on by itself once it can write (no restart needed); "
            f"meanwhile {self._meanwhile}"
        )

    def failed(self, exc: StorageFault) -> str:
        """Counts a refused write; logs the line if it starts an episode (or changes its fault).
        Returns the line."""
        line = self.line(exc)
        with self._lock:
            self._failed[exc.fault] += 1
            # A new episode, or the same one turning from full to read-only (or back).
            first = self._problem is None or self._fault != exc.fault
            self._problem, self._fault = line, exc.fault
            self._episode_failures += 1
        if first:
            self._log.error("%s", line)
        return line

    def wrote(self) -> bool:
        """A write succeeded: ends an episode (logged). True if one ended."""
        with self._lock:
            if self._problem is None:
                return False
            failures, self._episode_failures, self._problem = self._episode_failures, 0, None
        self._log.info(
            "%s %s can be written again (%d write(s) had failed); the %s goes on",
            self._setting,
            self._directory,
            failures,
            self._service,
        )
        return True

    @property
    def problem(self) -> str | None:
        """The line of the episode going on; None while writes succeed."""
        with self._lock:
            return self._problem

    def report(self) -> dict[str, Any]:
        """``{"problem": line or None, "failed_writes": {"full": n, "read_only": n}}`` (since start)."""
        with self._lock:
            return {"problem": self._problem, "failed_writes": dict(self._failed)}
