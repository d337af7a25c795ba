"""``Outbox.put_all``: the pieces of one chunked update go in together or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedge.agent.outbox import Outbox, OutboxFullError

TOPIC = "fedge/v1/f1/update/dev-a"


def test_pieces_are_stored_in_order_with_consecutive_ids(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db")
    first = box.put(TOPIC, b"before", 1, "r1", "update")
    ids = box.put_all(TOPIC, [b"p0", b"p1", b"p2"], 1, "r1", "update")
    assert ids == [first + 1, first + 2, first + 3]
    assert [m.payload for m in box.pending()] == [b"before", b"p0", b"p1", b"p2"]
    box.acknowledge(ids[0])
    assert [m.payload for m in box.pending()] == [b"before", b"p1", b"p2"]  # only the rest goes again
    box.close()


def test_pieces_that_do_not_all_fit_are_refused_whole(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db", max_messages=3, max_bytes=100)
    box.put(TOPIC, b"x" * 10, 1, "r1", "moments")
    with pytest.raises(OutboxFullError) as too_many:
        box.put_all(TOPIC, [b"a", b"b", b"c"], 1, "r1", "update")
    assert str(too_many.value) == (
        f"outbox {tmp_path / 'outbox.db'} is full: 1 of 3 messages, 10 of 100 bytes; "
        "cannot add 3 pieces of 3 bytes for round 'r1'"
    )
    with pytest.raises(OutboxFullError):
        box.put_all(TOPIC, [b"a" * 50, b"b" * 50], 1, "r1", "update")
    assert [m.payload for m in box.pending()] == [b"x" * 10]  # nothing of either was stored
    box.close()
