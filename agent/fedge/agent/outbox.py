"""An on-disk outbox: sealed updates wait here until the MQTT broker acknowledges them.

A device may lose power or its network at any moment, and an update costs minutes of training,
so an update is written to disk *before* it is published and removed only when the broker's
PUBACK arrives (paho's ``on_publish``). SQLite in WAL mode with ``synchronous=FULL`` makes
every :meth:`Outbox.put` durable once it returns, even across a power cut.

Payloads are opaque bytes (already sealed); the outbox never looks inside. It is bounded by a
message count and a byte total, and when full it *refuses* new messages with
:class:`OutboxFullError` instead of dropping old ones: only the caller knows which update
matters. Messages leave in exactly two ways, both counted in :meth:`Outbox.stats`:
acknowledged by the broker, or dropped because their round closed (:meth:`Outbox.drop_rounds`).

Safe to call from two threads (the agent's loop and paho's network thread): one lock guards
the one connection. One process owns an outbox file at a time.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from fedge.agent.sqlite_file import SQLiteFile, SQLiteFileKind
from fedge.protocol.errors import FedgeError
from fedge.shell.storage_faults import StorageFault

DEFAULT_MAX_MESSAGES = 1000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
#: MQTT's own limit on a PUBLISH payload (the remaining-length field tops out at 256 MiB).
MQTT_MAX_PAYLOAD = 268_435_455
#: Topics are UTF-8 strings of at most 65535 bytes in MQTT.
MQTT_MAX_TOPIC_BYTES = 65_535
#: Marks the SQLite file as a fedge outbox ('fdgo'), so another database is never mistaken for one.
APPLICATION_ID = 0x6664676F
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: an id is never reused after delete
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    size INTEGER NOT NULL,
    qos INTEGER NOT NULL,
    round_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    mid INTEGER
);
CREATE INDEX messages_round ON messages(round_id);
CREATE INDEX messages_mid ON messages(mid);
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO counters VALUES ('acknowledged_total', 0), ('dropped_total', 0);
"""


class OutboxError(FedgeError):
    """The outbox file is unusable (corrupt, foreign, unwritable) or a message is invalid."""


class OutboxStorageFault(OutboxError, StorageFault):
    """The file system of the outbox is full or read-only: nothing was stored or changed."""


_KIND = SQLiteFileKind("outbox", APPLICATION_ID, SCHEMA_VERSION, _SCHEMA, OutboxError, OutboxStorageFault)


class OutboxFullError(OutboxError):
    """The outbox holds its maximum of messages or bytes; nothing was stored or dropped."""


@dataclass(frozen=True)
class OutboxMessage:
    """One stored update. ``created_at`` is wall-clock seconds since the epoch."""

    id: int
    topic: str
    payload: bytes
    qos: int
    round_id: str
    kind: str
    created_at: float
    attempts: int


@dataclass(frozen=True)
class OutboxStats:
    """What is waiting now, and how many messages ever left (persisted across restarts)."""

    pending: int
    bytes: int
    dropped_total: int
    acknowledged_total: int


class Outbox(SQLiteFile):
    """A bounded, durable FIFO of messages waiting for the broker's acknowledgement."""

    def __init__(
        self,
        path: Path,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        for name, value in (("max_messages", max_messages), ("max_bytes", max_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OutboxError(f"outbox {name} must be a positive integer, got {value!r}")
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        #: A message bigger than this can never be stored, full outbox or not.
        self.max_message_bytes = min(max_bytes, MQTT_MAX_PAYLOAD)
        # synchronous=FULL: an update the outbox accepted survives a power cut.
        super().__init__(path, _KIND, "FULL", on_open=_forget_mids)

    # --- messages ------------------------------------------------------------------------

    def put(self, topic: str, payload: bytes, qos: int, round_id: str, kind: str) -> int:
        """Stores a message durably and returns its id; raises :class:`OutboxFullError` if full."""
        self._validate(topic, payload, qos, round_id, kind)
        size = len(payload)
        with self._transaction() as conn:
            count, total = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM messages").fetchone()
            if count >= self.max_messages or total + size > self.max_bytes:
                raise OutboxFullError(
                    f"outbox {self.path} is full: {count} of {self.max_messages} messages, "
                    f"{total} of {self.max_bytes} bytes; cannot add {size} bytes for round {round_id!r}"
                )
            cur = conn.execute(
                "INSERT INTO messages (topic, payload, size, qos, round_id, kind, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (topic, bytes(payload), size, qos, round_id, kind, time.time()),
            )
            assert cur.lastrowid is not None
            return cur.lastrowid

    def put_all(self, topic: str, payloads: list[bytes], qos: int, round_id: str, kind: str) -> list[int]:
        """Stores the pieces of one chunked message in one transaction, in order: all of them or,
        if they do not all fit (:class:`OutboxFullError`), none, so a crash or a full outbox
        never leaves a transfer that can only expire half-sent at the aggregator."""
        for payload in payloads:
            self._validate(topic, payload, qos, round_id, kind)
        size = sum(len(p) for p in payloads)
        with self._transaction() as conn:
            count, total = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM messages").fetchone()
            if count + len(payloads) > self.max_messages or total + size > self.max_bytes:
                raise OutboxFullError(
                    f"outbox {self.path} is full: {count} of {self.max_messages} messages, "
                    f"{total} of {self.max_bytes} bytes; cannot add {len(payloads)} pieces of {size} bytes "
                    f"for round {round_id!r}"
                )
            ids = []
            for payload in payloads:
                cur = conn.execute(
                    "INSERT INTO messages (topic, payload, size, qos, round_id, kind, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (topic, bytes(payload), len(payload), qos, round_id, kind, time.time()),
                )
                assert cur.lastrowid is not None
                ids.append(cur.lastrowid)
            return ids

    def _validate(self, topic: str, payload: bytes, qos: int, round_id: str, kind: str) -> None:
        if not isinstance(topic, str) or not topic:
            raise OutboxError("outbox: topic must be a non-empty string")
        if "+" in topic or "#" in topic:
            raise OutboxError(f"outbox: topic {topic!r} contains a wildcard ('+' or '#')")
        if "\0" in topic:
            raise OutboxError(f"outbox: topic {topic!r} contains a NUL character")
        try:
            topic_bytes = len(topic.encode("utf-8"))
        except UnicodeEncodeError:
            raise OutboxError(f"outbox: topic {topic!r} is not valid UTF-8") from None
        if topic_bytes > MQTT_MAX_TOPIC_BYTES:
            raise OutboxError(f"outbox: topic is {topic_bytes} bytes, over MQTT's {MQTT_MAX_TOPIC_BYTES}")
        if not isinstance(payload, bytes | bytearray):
            raise OutboxError(f"outbox: payload must be bytes, got {type(payload).__name__}")
        if len(payload) > self.max_message_bytes:
            raise OutboxError(
                f"outbox: payload is {len(payload)} bytes, over the limit of {self.max_message_bytes} "
                "for one message"
            )
        if isinstance(qos, bool) or not isinstance(qos, int) or not 0 <= qos <= 2:
            raise OutboxError(f"outbox: qos must be 0, 1 or 2, got {qos!r}")
        for name, value in (("round_id", round_id), ("kind", kind)):
            if not isinstance(value, str) or not value or "\0" in value:
                raise OutboxError(f"outbox: {name} must be a non-empty string without NUL, got {value!r}")

    def pending(self, limit: int | None = None) -> list[OutboxMessage]:
        """Waiting messages, oldest first (insertion order); at most ``limit`` if given."""
        sql = "SELECT id, topic, payload, qos, round_id, kind, created_at, attempts FROM messages ORDER BY id"
        params: tuple[int, ...] = ()
        if limit is not None:
            sql += " LIMIT ?"
            params = (max(limit, 0),)
        with self._transaction() as conn:
            rows = conn.execute(sql, params).fetchall()
        return [OutboxMessage(*row) for row in rows]

    def mark_in_flight(self, message_id: int, mid: int) -> bool:
        """Remembers paho's message id ``mid`` for a published message; False if it is gone.

        paho reuses mids (1..65535), so any other message still holding ``mid`` loses it.
        """
        if isinstance(mid, bool) or not isinstance(mid, int) or not 1 <= mid <= 65535:
            raise OutboxError(f"outbox: an MQTT message id is 1..65535, got {mid!r}")
        with self._transaction() as conn:
            conn.execute("UPDATE messages SET mid = NULL WHERE mid = ? AND id != ?", (mid, message_id))
            return conn.execute("UPDATE messages SET mid = ? WHERE id = ?", (mid, message_id)).rowcount == 1

    def record_attempt(self, message_id: int) -> bool:
        """Counts one publish attempt (for backoff and diagnostics); False if the message is gone."""
        with self._transaction() as conn:
            cur = conn.execute("UPDATE messages SET attempts = attempts + 1 WHERE id = ?", (message_id,))
            return cur.rowcount == 1

    def acknowledge(self, message_id: int) -> bool:
        """Deletes an acknowledged message. True the first time; False if already gone (idempotent)."""
        with self._transaction() as conn:
            if conn.execute("DELETE FROM messages WHERE id = ?", (message_id,)).rowcount != 1:
                return False
            _bump(conn, "acknowledged_total", 1)
            return True

    def acknowledge_mid(self, mid: int) -> int | None:
        """Acknowledges the message paho published as ``mid``; returns its id, or None if unknown.

        For paho's ``on_publish(client, userdata, mid, reason_code, properties)``.
        """
        with self._transaction() as conn:
            row = conn.execute("SELECT id FROM messages WHERE mid = ?", (mid,)).fetchone()
            if row is None:
                return None
            conn.execute("DELETE FROM messages WHERE id = ?", (row[0],))
            _bump(conn, "acknowledged_total", 1)
            return int(row[0])

    def drop_rounds(self, closed: Callable[[str], bool] | Iterable[str]) -> int:
        """Drops every message of a closed round; returns how many, for the caller to log.

        ``closed`` is a predicate on round ids or a collection of closed round ids. The
        predicate runs without the lock held, so it may call back into the outbox.
        """
        if isinstance(closed, str):
            raise OutboxError("outbox: drop_rounds takes a collection of round ids, not one string")
        if callable(closed):
            is_closed = closed
        else:
            closed_ids = frozenset(closed)
            is_closed = closed_ids.__contains__
        with self._transaction() as conn:
            rounds = [row[0] for row in conn.execute("SELECT DISTINCT round_id FROM messages")]
        doomed = [r for r in rounds if is_closed(r)]
        if not doomed:
            return 0
        with self._transaction() as conn:
            dropped = sum(
                conn.execute("DELETE FROM messages WHERE round_id = ?", (r,)).rowcount for r in doomed
            )
            _bump(conn, "dropped_total", dropped)
        return dropped

    def stats(self) -> OutboxStats:
        """Pending count and bytes now; acknowledged and dropped totals since the file was created."""
        with self._transaction() as conn:
            count, total = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM messages").fetchone()
            counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
        return OutboxStats(
            pending=count,
            bytes=total,
            dropped_total=counters["dropped_total"],
            acknowledged_total=counters["acknowledged_total"],
        )


def _bump(conn: sqlite3.Connection, name: str, by: int) -> None:
    conn.execute("UPDATE counters SET value = value + ? WHERE name = ?", (by, name))


def _forget_mids(conn: sqlite3.Connection) -> None:
    """paho's message ids belong to the process that published; after a restart every
    message must be published again."""
    conn.execute("UPDATE messages SET mid = NULL WHERE mid IS NOT NULL")
