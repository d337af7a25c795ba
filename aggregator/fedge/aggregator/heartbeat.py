"""A heartbeat file the aggregator's main loop touches, for a liveness probe to read.

The aggregator serves no port, so the only way for Kubernetes (or systemd, or a person) to
tell a hung round loop from a busy one is a file whose modification time the loop keeps fresh.
The loop touches it on every turn, also while a follower waits for the Lease and while it
waits for the broker: the file says "the loop turns", not "rounds progress".

The file must be private to one process: with leader election, replicas share the checkpoint
volume, and a heartbeat there would let one replica's loop vouch for the other's.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("fedge.aggregator")


class Heartbeat:
    """Touches ``path`` at most every ``interval_s`` (a touch is a syscall, the loop turns at
    10 Hz). A failing touch is logged once and otherwise ignored: the probe will notice."""

    def __init__(
        self, path: Path, interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = path
        self.interval_s = interval_s
        self.clock = clock
        self._last = float("-inf")
        self._failing = False

    def age_s(self) -> float:
        """Seconds since the loop last beat (whether or not the file could be touched); inf
        before the first beat. What ``/healthz`` and ``/readyz`` read (fedge.aggregator.metrics)."""
        return self.clock() - self._last

    def beat(self) -> None:
        now = self.clock()
        if now - self._last < self.interval_s:
            return
        self._last = now
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a"):
                pass
            os.utime(self.path)
        except OSError as exc:
            if not self._failing:
                log.error("cannot touch the heartbeat file %s: %s", self.path, exc)
            self._failing = True
            return
        self._failing = False


def heartbeat_age_s(path: Path, now: float | None = None) -> float | None:
    """Seconds since the heartbeat was last touched; None if there is none (what the probes in
    k8s/base/aggregator-deployment.yaml compute inline)."""
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return None
    return (time.time() if now is None else now) - mtime
