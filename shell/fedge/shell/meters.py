"""The few numbers a service's status does not already hold, recorded as they happen: MQTT
payload bytes in and out, durations (a round, a local training). Standard library only and
always on (a lock and an addition each), so a service records them whether or not it serves
metrics; :mod:`fedge.shell.prometheus` turns them into metric families at scrape time.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from dataclasses import dataclass


class Counts:
    """Thread-safe counters keyed by a label value (paho's thread and a worker both count)."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, label: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[label] += amount

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class Traffic:
    """MQTT payload bytes received and sent, by the kind of topic (the first level under the
    fleet's base: ``update``, ``status``, ``manifest``, ``blob``, ...): a bounded label set."""

    def __init__(self, base: str) -> None:
        self._prefix = base + "/"
        self.received = Counts()
        self.sent = Counts()

    def kind(self, topic: str) -> str:
        if not topic.startswith(self._prefix):
            return "other"
        level = topic[len(self._prefix) :].split("/", 1)[0]
        return level if level in TOPIC_KINDS else "other"

    def inbound(self, topic: str, payload_bytes: int) -> None:
        self.received.add(self.kind(topic), payload_bytes)

    def outbound(self, topic: str, payload_bytes: int) -> None:
        self.sent.add(self.kind(topic), payload_bytes)


#: The topic levels under ``fedge/v1/{fleet}/`` (fedge.protocol.topics); any other is "other".
TOPIC_KINDS = frozenset({"update", "status", "manifest", "blob", "keys", "aggregator", "insight"})


@dataclass(frozen=True)
class HistogramSnapshot:
    """Cumulative counts per upper bound (the last is +Inf), the sum and the count."""

    buckets: list[tuple[float, int]]
    sum: float
    count: int


class Durations:
    """A histogram of seconds with fixed bucket bounds, thread-safe."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError("bucket bounds must be strictly increasing")
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # the last: above every bound
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        index = bisect.bisect_left(self.bounds, seconds)
        with self._lock:
            self._counts[index] += 1
            self._sum += seconds

    def snapshot(self) -> HistogramSnapshot:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, buckets = 0, []
        for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        return HistogramSnapshot(buckets, total, cumulative)
