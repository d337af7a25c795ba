"""RecentKeys answers exactly as the set-and-deque it replaced: the last N keys, oldest evicted
first, a key remembered again keeping its place, whatever mix of single keys, whole rows and
sorted entries it is given."""

from __future__ import annotations

from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.agent.edgex.recent_keys import RecentKeys


class _Reference:
    """The structure SampleBuilder used before: an insertion-ordered set, evicted oldest first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.keys: OrderedDict[tuple[int, int], None] = OrderedDict()

    def add(self, origin: int, column: int) -> None:
        if self.capacity == 0 or (origin, column) in self.keys:
            return
        self.keys[(origin, column)] = None
        if len(self.keys) > self.capacity:
            self.keys.popitem(last=False)


_ORIGINS = st.integers(1_700_000_000_000_000_000, 1_700_000_000_000_000_040)
_COLUMNS = st.integers(0, 9)
_OPS = st.one_of(
    st.tuples(st.just("add"), _ORIGINS, _COLUMNS),
    st.tuples(st.just("rows"), st.lists(_ORIGINS, max_size=6, unique=True), st.integers(1, 9)),
    st.tuples(
        st.just("entries"), st.lists(st.tuples(_ORIGINS, _COLUMNS), max_size=12, unique=True), st.none()
    ),
)


@settings(max_examples=300, deadline=None)
@given(capacity=st.sampled_from([0, 1, 3, 7, 16, 100]), ops=st.lists(_OPS, max_size=40))
def test_recent_keys_remembers_what_the_set_and_deque_remembered(
    capacity: int, ops: list[tuple[str, object, object]]
) -> None:
    recent, reference = RecentKeys(capacity), _Reference(capacity)
    for op, a, b in ops:
        if op == "add":
            assert isinstance(a, int) and isinstance(b, int)
            recent.add(a, b)
            reference.add(a, b)
        elif op == "rows":
            assert isinstance(a, list) and isinstance(b, int)
            recent.add_rows(sorted(a), b)
            for origin in sorted(a):
                for column in range(b):
                    reference.add(origin, column)
        else:
            assert isinstance(a, list)
            entries = [(o, c, None) for o, c in sorted(a)]
            recent.add_entries(entries)
            for o, c, _ in entries:
                reference.add(o, c)
        assert recent.keys() == list(reference.keys)
        assert len(recent) == len(reference.keys)
    for origin in range(1_700_000_000_000_000_000, 1_700_000_000_000_000_041):
        for column in range(10):
            assert recent.has(origin, column) == ((origin, column) in reference.keys)


def test_a_partly_evicted_row_keeps_its_newest_columns() -> None:
    recent = RecentKeys(5)
    recent.add_rows([10, 20], 3)  # keys (10,0) (10,1) (10,2) (20,0) (20,1) (20,2): (10,0) goes
    assert recent.keys() == [(10, 1), (10, 2), (20, 0), (20, 1), (20, 2)]
    recent.add(30, 4)
    assert recent.keys() == [(10, 2), (20, 0), (20, 1), (20, 2), (30, 4)]
    assert not recent.has(10, 1) and recent.has(10, 2) and recent.has(30, 4)
    recent.add(20, 1)  # remembered already: keeps its place, evicts nothing
    assert len(recent) == 5 and recent.keys()[0] == (10, 2)


@pytest.mark.parametrize("capacity", [0, 16_384])
def test_a_long_stream_keeps_at_most_capacity_keys_and_a_few_groups(capacity: int) -> None:
    recent = RecentKeys(capacity)
    for start in range(0, 100_000, 500):
        recent.add_rows(list(range(start, start + 500)), 8)
    assert len(recent) == capacity
    # 16,384 keys of 8-column rows: 2,048 origins (no key stored on its own)
    assert len(recent._masks) == capacity // 8 and len(recent._groups) == capacity // 8
