"""The last N (origin, column) keys a sample builder placed, to count redeliveries as duplicates.

Why its own structure: a set of N ints (``origin * stride + column``) with a deque to evict them
held ~2.9 MB per builder at the default 16,384 keys (after churn the set's table has 8 slots a
key, and each key is a 40-byte int), and an EdgeX agent runs two builders: the largest objects
it keeps (issue 18). Here a key is one bit of its origin's column mask, and the eviction order is
kept per *group*: the keys remembered together at one origin (a whole row is one group). That is
~0.3 MB for the same answers: exactly the last N keys, oldest evicted first, a key remembered
again not refreshed.

Within a group the bits were remembered in ascending column order (callers hand keys sorted by
origin, then column), so evicting part of a group drops its lowest bits: its oldest keys.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from itertools import repeat
from typing import Any


class RecentKeys:
    """A bounded, insertion-ordered set of (origin, column) keys; ``capacity`` 0 remembers none."""

    __slots__ = ("_count", "_groups", "_masks", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        #: origin -> the columns remembered at it, as bits.
        self._masks: dict[int, int] = {}
        #: (origin, bits) in the order they were remembered, oldest first; disjoint bits.
        self._groups: deque[tuple[int, int]] = deque()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def has(self, origin: int, column: int) -> bool:
        return (self._masks.get(origin, 0) >> column) & 1 == 1

    def keys(self) -> list[tuple[int, int]]:
        """Every remembered key, oldest first (for tests and reports; not on the hot path)."""
        out: list[tuple[int, int]] = []
        for origin, bits in self._groups:
            column = 0
            while bits:
                if bits & 1:
                    out.append((origin, column))
                bits >>= 1
                column += 1
        return out

    def add(self, origin: int, column: int) -> None:
        """Remembers one key (a key already remembered keeps its place)."""
        if self.capacity == 0:
            return
        bit = 1 << column
        had = self._masks.get(origin, 0)
        if had & bit:
            return
        self._masks[origin] = had | bit
        self._groups.append((origin, bit))
        self._count += 1
        if self._count > self.capacity:
            self._evict()

    def add_rows(self, origins: Sequence[int], columns: int) -> None:
        """Whole rows: the ``columns`` bits (columns ``0..n-1``) at each origin, origins ascending,
        as :meth:`add` of each key in turn would remember them."""
        if self.capacity == 0 or not origins:
            return
        masks = self._masks
        if not masks.keys().isdisjoint(origins):  # rare: a key may be remembered already
            for origin in origins:
                for column in range(columns):
                    self.add(origin, column)
            return
        full = (1 << columns) - 1
        masks.update(zip(origins, repeat(full)))
        self._groups.extend(zip(origins, repeat(full)))
        self._count += len(origins) * columns
        if self._count > self.capacity:
            self._evict()

    def add_entries(self, entries: Sequence[tuple[int, int, Any]]) -> None:
        """The (origin, column) of each entry, sorted by origin then column, as :meth:`add` of each
        in turn would remember them."""
        if self.capacity == 0 or not entries:
            return
        grouped: list[tuple[int, int]] = []
        origin: int | None = None
        bits = 0
        for when, column, _ in entries:
            if when != origin:
                if origin is not None:
                    grouped.append((origin, bits))
                origin, bits = when, 0
            bits |= 1 << column
        assert origin is not None
        grouped.append((origin, bits))
        masks = self._masks
        get = masks.get
        if any(get(o, 0) & b for o, b in grouped):  # rare: some key is remembered already
            for when, column, _ in entries:
                self.add(when, column)
            return
        for o, b in grouped:
            masks[o] = get(o, 0) | b
        self._groups.extend(grouped)
        self._count += len(entries)
        if self._count > self.capacity:
            self._evict()

    def _evict(self) -> None:
        """Forgets the oldest keys until ``capacity`` remain."""
        excess = self._count - self.capacity
        groups, masks = self._groups, self._masks
        while excess > 0:
            origin, bits = groups[0]
            n = bits.bit_count()
            if n <= excess:
                groups.popleft()
                rest = masks[origin] & ~bits
                if rest:
                    masks[origin] = rest
                else:
                    del masks[origin]
                excess -= n
            else:  # part of the group: its lowest bits, the keys remembered first
                gone = 0
                for _ in range(excess):
                    low = bits & -bits
                    gone |= low
                    bits ^= low
                groups[0] = (origin, bits)
                masks[origin] &= ~gone
                excess = 0
        self._count = self.capacity
