"""What fedge's on-device SQLite files share: a schema check on open, and locked transactions.

Each file (the outbox, the sample store) carries an ``application_id`` and a schema version, so
a foreign database or one from a newer fedge is refused with a clear error instead of being
misread; every write runs in one ``BEGIN IMMEDIATE`` transaction under the owner's lock.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import FedgeError


@dataclass(frozen=True)
class SQLiteFileKind:
    """One kind of file: its name in messages, its identity, its schema and its error type."""

    what: str  # e.g. "outbox", "sample store"
    application_id: int
    schema_version: int
    schema: str
    error: type[FedgeError]


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
    """Holds ``lock`` and one write transaction; SQLite errors become ``kind.error``."""
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
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise kind.error(f"{kind.what} {path}: {exc}") from None
