"""The outbox: durable, bounded, ordered, never loses or double-counts a message."""

from __future__ import annotations

import os
import queue
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fedge.agent.outbox import Outbox, OutboxError, OutboxFullError, OutboxMessage, OutboxStats

REPO = Path(__file__).resolve().parents[2]
TOPIC = "fedge/v1/updates/dev-1"


def put(box: Outbox, payload: bytes, round_id: str = "r1", kind: str = "update", qos: int = 1) -> int:
    return box.put(TOPIC, payload, qos, round_id, kind)


def payloads(box: Outbox) -> list[bytes]:
    return [m.payload for m in box.pending()]


def test_put_stores_every_field(tmp_path: Path) -> None:
    before = time.time()
    with Outbox(tmp_path / "outbox.db") as box:
        mid = box.put(TOPIC, b"\x00sealed\xff", 2, "round-3", "update")
        [msg] = box.pending()
    assert msg == OutboxMessage(mid, TOPIC, b"\x00sealed\xff", 2, "round-3", "update", msg.created_at, 0)
    assert before <= msg.created_at <= time.time()


def test_pending_keeps_insertion_order_and_limit(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db") as box:
        ids = [put(box, bytes([i]), round_id=f"r{9 - i}") for i in range(10)]
        assert [m.id for m in box.pending()] == ids
        assert payloads(box) == [bytes([i]) for i in range(10)]
        assert [m.id for m in box.pending(limit=3)] == ids[:3]
        # Acknowledging from the middle keeps the order of the rest.
        box.acknowledge(ids[4])
        assert [m.id for m in box.pending()] == ids[:4] + ids[5:]


def test_messages_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        a = put(box, b"a")
        b = put(box, b"b", round_id="r2")
        box.record_attempt(a)
        box.record_attempt(a)
        box.acknowledge(b)
        before = box.pending()
    with Outbox(path) as box:
        after = box.pending()
        assert after == before
        assert [(m.id, m.payload, m.attempts) for m in after] == [(a, b"a", 2)]
        # Ids are never reused, not even after a delete and a restart.
        assert put(box, b"c") > b


def test_acknowledge_is_idempotent(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db") as box:
        a = put(box, b"a")
        b = put(box, b"b")
        assert box.acknowledge(a) is True
        assert box.acknowledge(a) is False
        assert box.acknowledge(12345) is False
        assert payloads(box) == [b"b"]
        assert box.stats() == OutboxStats(pending=1, bytes=1, dropped_total=0, acknowledged_total=1)
        assert box.record_attempt(a) is False
        assert box.mark_in_flight(a, 7) is False
        assert box.acknowledge(b) is True


def test_acknowledge_by_paho_mid(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        a = put(box, b"a")
        b = put(box, b"b")
        c = put(box, b"c")
        assert box.mark_in_flight(a, 1) is True
        assert box.mark_in_flight(b, 2) is True
        assert box.acknowledge_mid(1) == a
        assert box.acknowledge_mid(1) is None
        # paho reuses mids: the newest holder wins, the older one loses it.
        assert box.mark_in_flight(c, 2) is True
        assert box.acknowledge_mid(2) == c
        assert payloads(box) == [b"b"]
        assert box.mark_in_flight(b, 3) is True
        with pytest.raises(OutboxError, match=r"an MQTT message id is 1\.\.65535, got 0"):
            box.mark_in_flight(b, 0)
    # After a restart paho's mids mean nothing: the message is pending, and mid 3 unknown.
    with Outbox(path) as box:
        assert box.acknowledge_mid(3) is None
        assert payloads(box) == [b"b"]
        assert box.stats().acknowledged_total == 2


def test_full_by_count_refuses_and_keeps_existing_messages(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db", max_messages=3) as box:
        ids = [put(box, bytes([i]) * 10) for i in range(3)]
        with pytest.raises(
            OutboxFullError,
            match=r"is full: 3 of 3 messages, 30 of 67108864 bytes; cannot add 5 bytes for round 'r9'",
        ):
            put(box, b"x" * 5, round_id="r9")
        assert [m.id for m in box.pending()] == ids
        assert payloads(box) == [bytes([i]) * 10 for i in range(3)]
        assert box.stats() == OutboxStats(pending=3, bytes=30, dropped_total=0, acknowledged_total=0)
        box.acknowledge(ids[0])
        assert put(box, b"x" * 5) > ids[2]


def test_full_by_bytes_refuses_and_keeps_existing_messages(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db", max_bytes=100) as box:
        put(box, b"a" * 60)
        with pytest.raises(OutboxFullError, match=r"1 of 1000 messages, 60 of 100 bytes; cannot add 41"):
            put(box, b"b" * 41)
        put(box, b"c" * 40)  # exactly full is allowed
        assert payloads(box) == [b"a" * 60, b"c" * 40]
        assert box.stats().bytes == 100


def test_a_message_that_can_never_fit_is_invalid_not_full(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db", max_bytes=100) as box:
        with pytest.raises(OutboxError, match=r"payload is 101 bytes, over the limit of 100 for one") as e:
            put(box, b"x" * 101)
        assert not isinstance(e.value, OutboxFullError)
        assert box.pending() == []


@pytest.mark.parametrize(
    ("topic", "payload", "qos", "round_id", "kind", "error"),
    [
        ("", b"p", 1, "r", "k", r"topic must be a non-empty string"),
        ("a/+/b", b"p", 1, "r", "k", r"topic 'a/\+/b' contains a wildcard"),
        ("a/#", b"p", 1, "r", "k", r"topic 'a/#' contains a wildcard"),
        ("a\0b", b"p", 1, "r", "k", r"topic 'a\\x00b' contains a NUL character"),
        ("a/\udcff", b"p", 1, "r", "k", r"is not valid UTF-8"),
        ("a" * 65536, b"p", 1, "r", "k", r"topic is 65536 bytes, over MQTT's 65535"),
        (TOPIC, "text", 1, "r", "k", r"payload must be bytes, got str"),
        (TOPIC, b"p", 3, "r", "k", r"qos must be 0, 1 or 2, got 3"),
        (TOPIC, b"p", -1, "r", "k", r"qos must be 0, 1 or 2, got -1"),
        (TOPIC, b"p", True, "r", "k", r"qos must be 0, 1 or 2, got True"),
        (TOPIC, b"p", 1, "", "k", r"round_id must be a non-empty string without NUL, got ''"),
        (TOPIC, b"p", 1, "r", None, r"kind must be a non-empty string without NUL, got None"),
    ],
)
def test_invalid_messages_are_refused(
    tmp_path: Path, topic: str, payload: bytes, qos: int, round_id: str, kind: str, error: str
) -> None:
    with Outbox(tmp_path / "outbox.db") as box:
        with pytest.raises(OutboxError, match=error):
            box.put(topic, payload, qos, round_id, kind)
        assert box.stats().pending == 0


def test_invalid_limits_are_refused(tmp_path: Path) -> None:
    with pytest.raises(OutboxError, match=r"max_messages must be a positive integer, got 0"):
        Outbox(tmp_path / "outbox.db", max_messages=0)


def test_drop_rounds_counts_and_persists(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        for round_id, n in (("r1", 3), ("r2", 2), ("r3", 4)):
            for i in range(n):
                put(box, f"{round_id}-{i}".encode(), round_id=round_id)
        assert box.drop_rounds(["r1", "r-unknown"]) == 3
        assert box.drop_rounds({"r1"}) == 0
        assert box.drop_rounds(lambda r: int(r[1:]) < 3) == 2  # newest manifest says round 3 is open
        assert payloads(box) == [f"r3-{i}".encode() for i in range(4)]
        with pytest.raises(OutboxError, match=r"takes a collection of round ids, not one string"):
            box.drop_rounds("r3")
        assert box.stats() == OutboxStats(pending=4, bytes=16, dropped_total=5, acknowledged_total=0)


def test_stats_persist_across_reopening(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        ids = [put(box, b"x" * 10, round_id=f"r{i % 2}") for i in range(6)]
        box.acknowledge(ids[0])
        box.acknowledge(ids[2])
        box.acknowledge(ids[2])
        box.drop_rounds(["r1"])
        expected = OutboxStats(pending=1, bytes=10, dropped_total=3, acknowledged_total=2)
        assert box.stats() == expected
    with Outbox(path) as box:
        assert box.stats() == expected
        box.acknowledge(ids[4])
        assert box.stats() == OutboxStats(pending=0, bytes=0, dropped_total=3, acknowledged_total=3)


def test_garbage_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    path.write_bytes(b"this is not SQLite " * 500)
    with pytest.raises(
        OutboxError,
        match=rf"outbox {re.escape(str(path))} is not a usable SQLite database"
        r" \(file is not a database\); move it aside",
    ):
        Outbox(path)
    assert path.read_bytes() == b"this is not SQLite " * 500  # left for inspection, not replaced


def test_torn_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        for _ in range(50):
            put(box, os.urandom(2000))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        OutboxError,
        match=rf"outbox {re.escape(str(path))} is not a usable SQLite database"
        r" \(database disk image is malformed\)",
    ):
        Outbox(path)


def test_another_sqlite_database_is_not_taken_for_an_outbox(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE readings (value REAL)")
    with pytest.raises(OutboxError, match=rf"{re.escape(str(path))} is an SQLite database but not a fedge"):
        Outbox(path)


def test_missing_directory_and_closed_outbox_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(OutboxError, match=r"cannot create outbox .*/missing/outbox.db: No such file"):
        Outbox(tmp_path / "missing" / "outbox.db")
    box = Outbox(tmp_path / "outbox.db")
    box.close()
    box.close()
    with pytest.raises(OutboxError, match=r"outbox .* is closed"):
        put(box, b"x")


def test_file_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        put(box, b"x")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(Path(f"{path}-wal").stat().st_mode) == 0o600


def test_two_threads_put_and_acknowledge_without_loss(tmp_path: Path) -> None:
    """The agent's loop puts and publishes; paho's network thread acknowledges by mid.

    The outbox is small and the acknowledgements start only once it is full, so the producer
    meets a full outbox and must wait: nothing is dropped, nothing acknowledged twice.
    """
    n = 500
    path = tmp_path / "outbox.db"
    box = Outbox(path, max_messages=20)
    mids: queue.Queue[int | None] = queue.Queue()
    put_ids: list[int] = []
    acked_ids: list[int] = []
    errors: list[BaseException] = []
    refusals = 0
    full_seen = threading.Event()

    def producer() -> None:
        nonlocal refusals
        try:
            for i in range(n):
                while True:
                    try:
                        message_id = box.put(TOPIC, i.to_bytes(4, "big"), 1, f"r{i // 100}", "update")
                        break
                    except OutboxFullError:
                        refusals += 1
                        full_seen.set()
                        time.sleep(0.0005)
                put_ids.append(message_id)
                box.record_attempt(message_id)
                mid = i % 65535 + 1
                assert box.mark_in_flight(message_id, mid)
                mids.put(mid)
        except BaseException as exc:
            errors.append(exc)
        finally:
            full_seen.set()
            mids.put(None)

    def network_thread() -> None:
        try:
            full_seen.wait(timeout=30)
            while (mid := mids.get()) is not None:
                message_id = box.acknowledge_mid(mid)
                assert message_id is not None
                acked_ids.append(message_id)
                assert box.acknowledge(message_id) is False
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=producer), threading.Thread(target=network_thread)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert len(put_ids) == n
    assert len(set(put_ids)) == n
    assert acked_ids == put_ids
    assert box.pending() == []
    assert box.stats() == OutboxStats(pending=0, bytes=0, dropped_total=0, acknowledged_total=n)
    box.close()
    with Outbox(path) as reopened:
        assert reopened.stats() == OutboxStats(pending=0, bytes=0, dropped_total=0, acknowledged_total=n)
    assert refusals > 0


_KILLED_AFTER_PUT = """
import os, signal, sys
from pathlib import Path
from fedge.agent.outbox import Outbox

box = Outbox(Path(sys.argv[1]))
message_id = box.put("fedge/v1/updates/dev-1", bytes(range(256)) * 40, 1, "round-7", "update")
print(message_id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_put_survives_sigkill_right_after_it_returns(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        earlier = put(box, b"earlier")
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_AFTER_PUT, str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    message_id = int(proc.stdout)
    # The killed process never checkpointed: the message lives only in the WAL until recovery.
    assert Path(f"{path}-wal").stat().st_size > 0
    with Outbox(path) as box:
        assert [(m.id, m.payload, m.round_id) for m in box.pending()] == [
            (earlier, b"earlier", "r1"),
            (message_id, bytes(range(256)) * 40, "round-7"),
        ]
        assert box.stats().pending == 2
