"""The closed rounds an aggregator remembers: bounded, however long the fleet runs.

A fleet runs for years, a round every few minutes: a list with one record per round grows by
a few KB a round in memory and in every checkpoint (which is rewritten after each round, so
its cost grows too). Measured before this module (``bench/bench_long_run.py``): the aggregator's
RSS rose by 9.6 KB a round, 2.6 MB over 300 rounds, almost all of it the history and the JSON of
its checkpoints.

What the history is for decides what is kept: the status topic shows the last five rounds, the
dashboard plots the whole run, and the log has every round's line. So the last
:data:`HISTORY_RECENT` records are kept as they are, and older ones are thinned to an even grid
of round numbers (the first round always kept) each time the list would pass
:data:`HISTORY_LIMIT`: the plot still spans the run, more coarsely as it grows, and memory is
bounded.
"""

from __future__ import annotations

from typing import Any

#: Records kept verbatim: the most recent rounds.
HISTORY_RECENT = 100
#: Records kept at most (the recent ones plus the thinned older ones).
HISTORY_LIMIT = 200


def remember(history: list[dict[str, Any]], record: dict[str, Any]) -> None:
    """Appends ``record`` to ``history`` in place. Beyond :data:`HISTORY_LIMIT` records, the
    ones older than the last :data:`HISTORY_RECENT` are thinned to a regular grid of round
    numbers from the first (every 2nd, 4th, 8th... round: the smallest power-of-two stride
    that leaves at most half of the older part's room), so the older part spans the run
    evenly. Records without an integer ``round_number`` are dropped from the older part."""
    history.append(record)
    if len(history) <= HISTORY_LIMIT:
        return
    older, recent = history[:-HISTORY_RECENT], history[-HISTORY_RECENT:]
    numbered = [r for r in older if _round_number(r) is not None]
    room = (HISTORY_LIMIT - HISTORY_RECENT) // 2
    kept: list[dict[str, Any]] = []
    if numbered:
        first = _round_number(numbered[0]) or 0
        stride = 2
        while True:
            kept = [r for r in numbered if ((_round_number(r) or 0) - first) % stride == 0]
            if len(kept) <= room:
                break
            stride *= 2
    history[:] = kept + recent


def _round_number(record: dict[str, Any]) -> int | None:
    n = record.get("round_number")
    return n if isinstance(n, int) and not isinstance(n, bool) else None
