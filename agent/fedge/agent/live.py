"""Live prediction windows: what a data source hands the agent to predict on.

A source builds them from the device's newest readings, with the features and windows of its
task spec (``fedge.agent.features.extract_features``, through the EdgeX sample builder's
unlabelled mode, or a recorded data set); the agent's worker takes them with
``LocalDataSource.live_windows`` and runs the verified global model on them
(``fedge.agent.insight``). Between the two threads sits a :class:`LiveWindowBuffer`: bounded,
newest kept, every window it had to drop counted.

Pure: numpy and a lock, no I/O, no clock.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from fedge.protocol.task import FeatureSpec

#: Windows a source keeps for the agent at most: while the worker trains (minutes on a
#: board), older windows give way to newer ones, and only the newest can be published anyway.
DEFAULT_LIVE_WINDOWS = 32


@dataclass(frozen=True, eq=False)
class LiveWindow:
    """One prediction window: its features as extracted, not normalised (statistics, or a raw
    window's readings channel-major, exactly as a training sample of the same rows), and the
    origins it spans.

    ``start_ns`` and ``end_ns`` are the origins of its first and last row. ``spec`` is the
    feature definition the features were computed with (the agent predicts only with a model
    whose task reads the same). ``edgex_device`` names the EdgeX device the readings came from
    (None for a recorded data set); ``label_units`` is the label resource's ``units`` in the
    device profile (regression), when known.
    """

    features: np.ndarray
    start_ns: int
    end_ns: int
    spec: FeatureSpec
    edgex_device: str | None = None
    label_units: str | None = None


@dataclass(frozen=True)
class LiveWindows:
    """What :meth:`LocalDataSource.live_windows` returns: the pending windows, oldest first, and
    how many windows were dropped since the last call because the buffer was full."""

    windows: tuple[LiveWindow, ...] = ()
    dropped: int = 0


#: No windows (a source without live data).
NO_LIVE_WINDOWS = LiveWindows()


class LiveWindowBuffer:
    """A bounded, thread-safe queue of the newest live windows (a producer thread puts, the
    agent's worker takes). When full, the oldest window is dropped and counted."""

    def __init__(self, maxlen: int = DEFAULT_LIVE_WINDOWS) -> None:
        if isinstance(maxlen, bool) or not isinstance(maxlen, int) or maxlen < 1:
            raise ValueError(f"live window buffer: maxlen must be an integer >= 1, got {maxlen!r}")
        self.maxlen = maxlen
        self._windows: deque[LiveWindow] = deque()
        self._dropped = 0
        self._lock = threading.Lock()

    def put(self, windows: Iterable[LiveWindow]) -> None:
        with self._lock:
            for window in windows:
                if len(self._windows) >= self.maxlen:
                    self._windows.popleft()
                    self._dropped += 1
                self._windows.append(window)

    def take(self) -> LiveWindows:
        """Every pending window (oldest first) and the drop count since the last take; clears both."""
        with self._lock:
            taken = LiveWindows(tuple(self._windows), self._dropped)
            self._windows.clear()
            self._dropped = 0
        return taken

    def __len__(self) -> int:
        with self._lock:
            return len(self._windows)
