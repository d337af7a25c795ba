"""Progress on stderr without dependencies: a bar redrawn in place when stderr is a terminal
(:class:`ProgressBar`), one line per step when it is not (:class:`StepLines`: a log file, CI,
``docker logs``, where a redrawn bar is noise and no output at all looks like a hang)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


class ProgressBar:
    """``bar(done, total)`` redraws a one-line bar at most ten times a second."""

    def __init__(self, label: str, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._last = 0.0
        self._start = time.monotonic()

    def __call__(self, done: int, total: int, suffix: str = "") -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        frac = done / total if total else 1.0
        filled = int(30 * frac)
        elapsed = now - self._start
        self.stream.write(
            f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} {elapsed:5.1f}s {suffix}"
        )
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


class StepLines:
    """``lines(done, total, details)`` writes one line each time ``done`` grows:
    ``<label>: <unit> <done>/<total> done, <details>, <elapsed>s elapsed``; nothing while it
    stays the same, so it may be called as often as a :class:`ProgressBar`."""

    def __init__(
        self,
        label: str,
        unit: str,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self._done = 0
        self._start = clock()

    def __call__(self, done: int, total: int, details: str = "") -> None:
        if done <= self._done:
            return
        self._done = done
        elapsed = self.clock() - self._start
        parts = [f"{self.unit} {done}/{total} done", *([details] if details else [])]
        parts.append(f"{elapsed:.1f}s elapsed")
        self.stream.write(f"{self.label}: {', '.join(parts)}\n")
        self.stream.flush()
