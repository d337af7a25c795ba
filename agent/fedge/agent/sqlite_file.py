"""What fedge's on-device SQLite files share: a schema check on open, locked transactions, and
the life cycle of the one connection (:class:`SQLiteFile`, the base of the outbox and the sample
store).

Each file (the outbox, the sample store) carries an ``application_id`` and a schema version, so
a foreign database or one from a newer fedge is refused with a clear error instead of being
misread; every write runs in one ``BEGIN IMMEDIATE`` transaction under the owner's lock.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from fedge.protocol.errors import FedgeError
from fedge.shell.files import fsync_directory
from fedge.shell.storage_faults import StorageFault, storage_fault


@dataclass(frozen=True)
class SQLiteFileKind:
    """One kind of file: its name in messages, its identity, its schema and its error types
    (``fault``: a write the file system refused for being full or read-only, which derives from
    both ``error`` and :class:`~fedge.shell.files.StorageFault`)."""

    what: str  # e.g. "outbox", "sample store"
    application_id: int
    schema_version: int
    schema: str
    error: type[FedgeError]
    fault: type[StorageFault]


#: Each connection's page cache, KiB (SQLite's default is 2000 KiB). An agent's files are small
#: and read in whole or by the newest rows; the kernel's page cache keeps their pages hot, so a
#: bigger cache only counts them twice in the agent's RSS. A ``pragmas`` entry can raise it.
CACHE_KIB = 256


def _fault_error(exc: BaseException, path: Path, kind: SQLiteFileKind) -> StorageFault | None:
    """``kind.fault`` when ``exc`` is the file system being full or read-only, else None."""
    found = storage_fault(exc, path.parent)
    return None if found is None else kind.fault(kind.what, path, *found)


def check_or_create_schema(conn: sqlite3.Connection, path: Path, kind: SQLiteFileKind) -> None:
    """Creates the schema in an empty database; refuses another application's or version's."""
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    if app_id == 0 and conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0] == 0:
        for statement in kind.schema.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(f"PRAGMA application_id = {kind.application_id}")
        conn.execute(f"PRAGMA user_version = {kind.schema_version}")
        return
    if app_id != kind.application_id:
        raise kind.error(f"{path} is an SQLite database but not a fedge {kind.what}")
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version != kind.schema_version:
        raise kind.error(
            f"{kind.what} {path} has schema version {version}; this fedge reads {kind.schema_version}"
        )


@contextmanager
def write_transaction(
    lock: threading.Lock | threading.RLock,
    connection: Callable[[], sqlite3.Connection | None],
    path: Path,
    kind: SQLiteFileKind,
) -> Iterator[sqlite3.Connection]:
    """Holds ``lock`` and one write transaction; SQLite errors become ``kind.error`` (a full or
    read-only file system ``kind.fault``: nothing was written, the same write may succeed later).

    On an error the transaction is rolled back, unless SQLite already did: it rolls back by
    itself on ``SQLITE_FULL`` and some I/O errors, and a ROLLBACK then would fail and hide the
    real error ("cannot rollback - no transaction is active").
    """
    with lock:
        conn = connection()
        if conn is None:
            raise kind.error(f"{kind.what} {path} is closed")
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
        except sqlite3.Error as exc:
            fault = _fault_error(exc, path, kind)
            if fault is not None:
                raise fault from None
            raise kind.error(f"{kind.what} {path}: {exc}") from None


def _rollback(conn: sqlite3.Connection) -> None:
    """Rolls back the open transaction, if SQLite has not already; never hides the error that
    made it necessary."""
    if conn.in_transaction:
        # The first error is the one to report; SQLite ends the transaction either way.
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def open_sqlite_file(
    path: Path,
    kind: SQLiteFileKind,
    synchronous: str,
    pragmas: tuple[str, ...] = (),
    on_open: Callable[[sqlite3.Connection], None] | None = None,
) -> sqlite3.Connection:
    """Opens (creating it 0600) a file of ``kind``: integrity check, WAL, ``synchronous``,
    ``pragmas``, then the schema check and ``on_open`` in one transaction."""
    create_private_file(path, kind)
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
    except sqlite3.Error as exc:
        raise kind.error(f"cannot open {kind.what} {path}: {exc}") from None
    try:
        _prepare(conn, path, kind, synchronous, pragmas, on_open)
    except BaseException:
        conn.close()
        raise
    return conn


def _prepare(
    conn: sqlite3.Connection,
    path: Path,
    kind: SQLiteFileKind,
    synchronous: str,
    pragmas: tuple[str, ...],
    on_open: Callable[[sqlite3.Connection], None] | None,
) -> None:
    try:
        # A small page cache, set first (quick_check reads every page through it): SQLite's
        # default keeps up to 2 MiB per connection, and an agent holds several connections
        # (samples, outbox, state, trust) whose working sets are a few pages each; the OS page
        # cache holds the file anyway. See CACHE_KIB.
        conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        # quick_check reads every page: a torn or overwritten file is reported at start, not
        # when the file is first needed.
        check = conn.execute("PRAGMA quick_check").fetchall()
        if check != [("ok",)]:
            problems = "; ".join(str(row[0]) for row in check[:3])
            raise kind.error(f"{kind.what} {path} is corrupt ({problems}); move it aside")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise kind.error(f"{kind.what} {path}: the file system does not support WAL mode")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        for pragma in pragmas:
            conn.execute(f"PRAGMA {pragma}")
        conn.execute("BEGIN IMMEDIATE")
        try:
            check_or_create_schema(conn, path, kind)
            if on_open is not None:
                on_open(conn)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
    except sqlite3.Error as exc:
        fault = _fault_error(exc, path, kind)
        if fault is not None:  # a full or read-only file system: the file is fine, leave it
            raise fault from None
        raise kind.error(
            f"{kind.what} {path} is not a usable SQLite database ({exc}); move it aside"
        ) from None


def create_private_file(path: Path, kind: SQLiteFileKind) -> None:
    """Creates the database file mode 0600 (SQLite gives its -wal and -shm files the same mode)
    and makes its directory entry durable.

    SQLite would create it with the umask's mode, and it does not fsync the directory for the
    main file, so a fresh file could vanish in a power cut.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        fault = _fault_error(exc, path, kind)
        if fault is not None:
            raise fault from None
        raise kind.error(f"cannot create {kind.what} {path}: {exc.strerror}") from None
    os.close(fd)
    try:
        fsync_directory(path.parent)
    except OSError as exc:
        raise kind.error(f"cannot sync the directory of {kind.what} {path}: {exc.strerror}") from None


class SQLiteFile:
    """One open file of a kind: one connection, guarded by one lock (safe to use from two
    threads, e.g. the agent's loop and paho's network thread), closed once.

    The outbox and the sample store derive from it; each opens its file with its own
    ``synchronous`` level, pragmas and ``on_open`` (see :func:`open_sqlite_file`).
    """

    def __init__(
        self,
        path: Path,
        kind: SQLiteFileKind,
        synchronous: str,
        pragmas: tuple[str, ...] = (),
        on_open: Callable[[sqlite3.Connection], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self._kind = kind
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = open_sqlite_file(
            self.path, kind, synchronous, pragmas, on_open
        )

    def close(self) -> None:
        """Closes the database; safe to call twice. Later calls raise the kind's error."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        """Holds the lock and one write transaction; SQLite errors become the kind's error."""
        return write_transaction(self._lock, lambda: self._conn, self.path, self._kind)
