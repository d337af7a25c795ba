"""Devices of mixed speed for the demo and the bench, without a hook in the agent.

The lab freezes agent *processes* it started (``SIGSTOP``) and thaws them (``SIGCONT``) on a
schedule, so everything an agent does (fetching blobs, training, sealing, sending) runs slower,
as on a weaker board:

- a **slow** device runs ``factor`` times slower: in every ``period_s`` it runs for
  ``period_s / factor`` and is frozen for the rest;
- an **intermittent** device is offline for ``outage_s`` out of every ``outage_every_s`` (frozen:
  its connection stays open but silent, like a board that lost power or radio), each device's
  outage shifted so that they do not all drop at once.

Lab code: it runs in the demo's (or the bench's) process and signals only the pids it is given.
Every process is thawed when the pacer stops.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Mapping

from fedge.protocol.errors import FedgeError


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # the process ended: nothing to pace
        os.kill(pid, sig)


class Pacer:
    """Freezes and thaws agent processes on a schedule (module docstring)."""

    def __init__(
        self,
        slow: Mapping[str, int],
        factor: float = 5.0,
        period_s: float = 1.0,
        intermittent: Mapping[str, int] | None = None,
        outage_s: float = 0.0,
        outage_every_s: float = 0.0,
        tick_s: float = 0.05,
    ) -> None:
        if factor < 1.0:
            raise FedgeError(f"a slow device's factor must be at least 1, got {factor}")
        if intermittent and not 0.0 < outage_s < outage_every_s:
            raise FedgeError("outage_s must be above 0 and below outage_every_s")
        self.slow = dict(slow)
        self.factor = factor
        self.period_s = period_s
        self.intermittent = dict(intermittent or {})
        self.outage_s = outage_s
        self.outage_every_s = outage_every_s
        self.tick_s = tick_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._frozen: set[int] = set()

    def frozen_at(self, elapsed: float) -> set[int]:
        """The pids frozen ``elapsed`` seconds after the start (pure: the schedule itself)."""
        frozen: set[int] = set()
        if self.factor > 1.0 and elapsed % self.period_s >= self.period_s / self.factor:
            frozen |= set(self.slow.values())
        n = len(self.intermittent)
        for i, pid in enumerate(self.intermittent[d] for d in sorted(self.intermittent)):
            shifted = elapsed + i * self.outage_every_s / max(n, 1)
            if shifted % self.outage_every_s >= self.outage_every_s - self.outage_s:
                frozen.add(pid)
        return frozen

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fedge-pacer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for pid in {*self.slow.values(), *self.intermittent.values()}:
            _signal(pid, signal.SIGCONT)
        self._frozen.clear()

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            want = self.frozen_at(time.monotonic() - start)
            for pid in want - self._frozen:
                _signal(pid, signal.SIGSTOP)
            for pid in self._frozen - want:
                _signal(pid, signal.SIGCONT)
            self._frozen = want
            self._stop.wait(self.tick_s)
