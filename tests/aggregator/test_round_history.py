"""The aggregator's round history stays bounded however many rounds a fleet runs."""

from __future__ import annotations

import itertools
from typing import Any

from fedge.aggregator.round_history import HISTORY_LIMIT, HISTORY_RECENT, remember


def _record(n: int) -> dict[str, Any]:
    return {"round_number": n}


def test_history_keeps_every_round_up_to_the_limit() -> None:
    history: list[dict[str, Any]] = []
    for n in range(1, HISTORY_LIMIT + 1):
        remember(history, _record(n))
    assert [r["round_number"] for r in history] == list(range(1, HISTORY_LIMIT + 1))


def test_a_long_run_keeps_the_recent_rounds_the_first_and_a_thinned_span_within_the_limit() -> None:
    history: list[dict[str, Any]] = []
    lengths = []
    for n in range(1, 10_001):
        remember(history, _record(n))
        lengths.append(len(history))
    numbers = [r["round_number"] for r in history]
    assert max(lengths) == HISTORY_LIMIT
    assert numbers[-HISTORY_RECENT:] == list(range(10_001 - HISTORY_RECENT, 10_001))
    assert numbers[0] == 1
    assert numbers == sorted(set(numbers))  # in order, none twice
    # The older part still spans the run: no gap wider than a sixteenth of it.
    assert max(b - a for a, b in itertools.pairwise(numbers)) < 10_000 / 16


def test_a_checkpoint_written_before_the_bound_is_thinned_at_the_next_round() -> None:
    history = [_record(n) for n in range(1, 5_001)]
    remember(history, _record(5_001))
    numbers = [r["round_number"] for r in history]
    assert len(history) <= HISTORY_LIMIT
    assert numbers[0] == 1
    assert numbers[-HISTORY_RECENT:] == list(range(5_002 - HISTORY_RECENT, 5_002))
