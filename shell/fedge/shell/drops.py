"""Messages a service did not handle: counted by reason, the first of each reason logged.

"One message never ends a service" has a second half: no message disappears silently either.
Every service that drops a message (a blob nobody asked for, a status too large to parse, a
full inbox, a bug in a handler) counts it here under a reason; the count goes into the
service's status, and the first of each reason is logged with what an operator can do about it.
Later ones are only counted, so a flood cannot flood the log as well.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Mapping


class DroppedMessages:
    """Thread-safe counts by reason (paho's network thread and a worker both count).

    ``advice`` maps a reason's family (the part before the first ``_`` or ``:``, so
    ``blob_too_large`` -> ``blob``) to what to do; ``routine`` reasons happen in a healthy
    fleet and are logged at INFO, the rest at ERROR. ``status_field`` says where the counts
    are published, for the log line.
    """

    def __init__(
        self,
        log: logging.Logger,
        advice: Mapping[str, str],
        status_field: str,
        routine: frozenset[str] = frozenset(),
    ) -> None:
        self._log = log
        self._advice = dict(advice)
        self._status_field = status_field
        self._routine = routine
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def count(self, reason: str, topic: str, detail: str, exc: BaseException | None = None) -> None:
        """Counts one dropped message; logs it (with ``exc``'s traceback) if it is the first of
        its reason."""
        with self._lock:
            self._counts[reason] += 1
            first = self._counts[reason] == 1
        if first:
            self._log.log(
                logging.INFO if reason in self._routine else logging.ERROR,
                "dropped a message on %s (%s): %s. %s Further ones are only counted (%s).",
                topic,
                reason,
                detail,
                self._advice.get(reason.split(":")[0].split("_")[0], ""),
                self._status_field,
                exc_info=exc,
            )

    def counts(self) -> dict[str, int]:
        """A copy of the counts, for a status."""
        with self._lock:
            return dict(self._counts)

    def __getitem__(self, reason: str) -> int:
        with self._lock:
            return self._counts[reason]
