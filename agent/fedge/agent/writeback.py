"""Write-back to EdgeX through core-command, from ``[[insight.writeback]]`` rules (``docs/edgex.md``,
"Write-back (core-command)").

A rule says: when the device's *published* prediction meets a condition (``when_label`` for a
classification task; ``when_above`` and/or ``when_below`` for regression), write ``values`` to
the command ``command`` of EdgeX device ``device`` (``PUT /api/v3/device/name/{device}/{command}``
on core-command, :class:`fedge.agent.edgex.core_command.CoreCommandClient`).

Only published predictions count: the agent hands every prediction it publishes on
``insight/{device_id}`` to :meth:`Writeback.prediction_published`, so a write is never made from
an unverified model (nothing is published without a verified manifest) nor from stale data (a
stale window is never published), and it is made on exactly what the building's other systems
see on the insight topic.

Trigger semantics (:class:`WritebackPolicy`, pure): **edge-triggered, once per episode**.
An *episode* starts with the first published prediction that meets the condition and ends with
the first that does not. A rule writes once per episode:

- the first prediction of an episode fires the write, unless the rule wrote (or tried to) less
  than ``min_interval_s`` ago (``rate_limited``): the episode then stays *pending* and the write
  fires as soon as the interval has passed (:meth:`WritebackPolicy.due`, asked by the agent's
  worker at each turn; it wakes for :meth:`WritebackPolicy.next_due`), if the condition still
  holds on the newest published prediction;
- further predictions of the same episode write nothing (``already_sent``): the condition still
  holding is not news, and a device that re-writes a setpoint every few minutes fights whoever
  changed it by hand;
- a write that failed leaves the episode pending: it is tried again after ``min_interval_s``,
  and given up (``stale``) once the prediction it acts on describes a window that ended more
  than ``[insight] stale_after_s`` ago (0: never given up).

So a rule makes at most one request per ``min_interval_s``, whatever the model or core-command do,
and the last state of a flapping prediction is still written (late, not lost). Requests run on a
thread of their own (:class:`Writeback`), one at a time, each bounded by the client's timeout; a
rule whose request is still running skips new triggers (``busy``), so at most one request per rule
is ever queued. Nothing a request does (an error, a timeout) reaches the agent's worker.

Every outcome is counted by reason in the device status (``insights.writeback``:
``{"sent": n, "skipped": {reason: n}, "failed": {reason: n}}``); the first of each reason is
logged with what to change.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fedge.agent.config import WritebackRule
from fedge.shell.threads import name_current_thread

log = logging.getLogger("fedge.agent.writeback")

#: Why a rule did not write on a published prediction (or gave a pending write up):
#:
#: - ``not_matched``: the prediction does not meet the rule's condition;
#: - ``already_sent``: it does, but this episode was written already (edge-triggered);
#: - ``rate_limited``: the rule wrote less than ``min_interval_s`` ago; the write is pending;
#: - ``busy``: the rule's previous request is still running;
#: - ``kind_mismatch``: a ``when_label`` rule on a regression prediction, or the reverse;
#: - ``unknown_label``: ``when_label`` is none of the model's classes;
#: - ``stale``: a pending write was given up, its prediction older than ``stale_after_s``.
SKIP_REASONS: tuple[str, ...] = (
    "not_matched",
    "already_sent",
    "rate_limited",
    "busy",
    "kind_mismatch",
    "unknown_label",
    "stale",
)
_ROUTINE = frozenset({"not_matched", "already_sent", "rate_limited"})
_ADVICE = {
    "not_matched": "the prediction does not meet the rule's condition (nothing to configure)",
    "already_sent": "the condition still holds and was written once already: rules are "
    "edge-triggered (nothing to configure)",
    "rate_limited": "the rule wrote less than its min_interval_s ago; the write follows once the "
    "interval has passed. Lower [[insight.writeback]] min_interval_s to write sooner",
    "busy": "the rule's previous request to core-command is still running (each is bounded by a "
    "5 s timeout); check core-command's health",
    "kind_mismatch": "when_label is for classification tasks, when_above/when_below for "
    "regression; fix the rule in [[insight.writeback]] for the model's task",
    "unknown_label": "when_label is none of the model's classes (they are in the insight "
    "payload's prediction.probabilities); fix [[insight.writeback]] when_label",
    "stale": "a pending write was given up because its prediction got older than [insight] "
    "stale_after_s; check core-command (its failures are counted in writeback.failed)",
}


@dataclass
class _RuleState:
    holding: bool = False  # the condition held on the newest published prediction
    written: bool = False  # this episode was written (a request answered 200)
    in_flight: bool = False
    last_attempt: float | None = None


def evaluate(rule: WritebackRule, insight: Mapping[str, Any]) -> bool | str:
    """Whether ``insight`` (an ``fedge.insight/1`` payload) meets ``rule``'s condition, or the
    reason it cannot be judged (``kind_mismatch``, ``unknown_label``)."""
    prediction = insight.get("prediction")
    if not isinstance(prediction, Mapping):
        return "kind_mismatch"
    if rule.when_label is not None:
        probabilities = prediction.get("probabilities")
        if "label" not in prediction or not isinstance(probabilities, Mapping):
            return "kind_mismatch"
        if rule.when_label not in probabilities:
            return "unknown_label"
        return bool(prediction["label"] == rule.when_label)
    value = prediction.get("value")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "kind_mismatch"
    above_ok = rule.when_above is None or value > rule.when_above
    below_ok = rule.when_below is None or value < rule.when_below
    return above_ok and below_ok


class WritebackPolicy:
    """Which rules write, and when (pure: the time is an argument; not thread-safe, the caller
    serialises). See the module docstring for the semantics."""

    def __init__(self, rules: tuple[WritebackRule, ...], stale_after_s: float) -> None:
        self.rules = rules
        self.stale_after_s = stale_after_s
        self.sent = 0
        self.skipped: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self._states = [_RuleState() for _ in rules]
        self._window_end: float | None = None  # of the newest published prediction

    def published(self, insight: Mapping[str, Any], now: float) -> tuple[list[int], list[tuple[int, str]]]:
        """A prediction was published: ``(rules to fire now, [(rule, skip reason)])``. The
        caller calls :meth:`started` for each rule it fires and :meth:`skip` for each reason."""
        window = insight.get("window")
        end = window.get("end") if isinstance(window, Mapping) else None
        self._window_end = float(end) if isinstance(end, (int, float)) else now
        fire: list[int] = []
        skips: list[tuple[int, str]] = []
        for index, rule in enumerate(self.rules):
            state = self._states[index]
            verdict = evaluate(rule, insight)
            if verdict is not True:
                state.holding, state.written = False, False
                skips.append((index, verdict if isinstance(verdict, str) else "not_matched"))
                continue
            if state.holding and state.written:
                skips.append((index, "already_sent"))
                continue
            state.holding = True
            if state.in_flight:
                skips.append((index, "busy"))
            elif state.last_attempt is not None and now - state.last_attempt < rule.min_interval_s:
                skips.append((index, "rate_limited"))
            else:
                fire.append(index)
        return fire, skips

    def due(self, now: float) -> tuple[list[int], list[tuple[int, str]]]:
        """Pending writes whose interval has passed: ``(rules to fire, [(rule, "stale")])``."""
        fire: list[int] = []
        skips: list[tuple[int, str]] = []
        for index, rule in enumerate(self.rules):
            state = self._states[index]
            if not state.holding or state.written or state.in_flight or state.last_attempt is None:
                continue
            if now - state.last_attempt < rule.min_interval_s:
                continue
            end = self._window_end
            if self.stale_after_s > 0 and end is not None and now - end > self.stale_after_s:
                state.holding = False  # given up; the next prediction that meets it starts anew
                skips.append((index, "stale"))
            else:
                fire.append(index)
        return fire, skips

    def next_due(self) -> float | None:
        """When (the caller's clock, as ``now``) :meth:`due` next has a pending write to fire or
        give up; None while nothing is pending (a request in flight is not pending: its end is)."""
        times = [
            state.last_attempt + rule.min_interval_s
            for rule, state in zip(self.rules, self._states, strict=True)
            if state.holding and not state.written and not state.in_flight and state.last_attempt is not None
        ]
        return min(times, default=None)

    def started(self, index: int, now: float) -> None:
        state = self._states[index]
        state.in_flight = True
        state.last_attempt = now

    def finished(self, index: int, failure: str | None) -> None:
        """The request of rule ``index`` ended: ``failure`` is None (sent) or its reason."""
        state = self._states[index]
        state.in_flight = False
        if failure is None:
            self.sent += 1
            state.written = state.holding  # an episode that ended meanwhile is not this one
        else:
            self.failed[failure] = self.failed.get(failure, 0) + 1

    def skip(self, reason: str) -> bool:
        """Counts a skip; True the first time ``reason`` is counted."""
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown write-back skip reason {reason!r}")
        first = reason not in self.skipped
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        return first

    def report(self) -> dict[str, Any]:
        return {"sent": self.sent, "skipped": dict(self.skipped), "failed": dict(self.failed)}


#: ``write(device, command, values)``: one request, raising on failure (an exception with a
#: ``reason`` attribute, e.g. ``CoreCommandError``, is counted under it; any other as ``error``).
WriteFn = Callable[[str, str, Mapping[str, str]], None]
Clock = Callable[[], float]


class Writeback:
    """Runs the rules: decides with :class:`WritebackPolicy` (under a lock), sends on a thread of
    its own. :meth:`prediction_published` and :meth:`tick` are called by the agent's worker and
    return at once; :meth:`report` may be called from any thread."""

    def __init__(self, rules: tuple[WritebackRule, ...], stale_after_s: float, write: WriteFn) -> None:
        self.policy = WritebackPolicy(rules, stale_after_s)
        self._write = write
        self._lock = threading.Lock()
        # At most one job per rule is ever queued or running (a rule in flight is "busy").
        self._jobs: queue.Queue[int | None] = queue.Queue(maxsize=len(rules) + 1)
        self._failures_logged: set[str] = set()
        self._thread: threading.Thread | None = None
        #: Called (from the write-back thread) when a request ends: a failed one is pending
        #: again, so the agent's worker, which sleeps until its next deadline, looks again.
        self.on_finished: Callable[[], None] | None = None

    def start(self) -> None:
        if self._thread is None and self.policy.rules:
            self._thread = threading.Thread(target=self._run, name="fedge-agent-writeback", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 6.0) -> None:
        thread = self._thread
        if thread is not None:
            self._jobs.put(None)
            thread.join(timeout_s)
            self._thread = None

    def prediction_published(self, insight: Mapping[str, Any], now: float) -> None:
        with self._lock:
            fire, skips = self.policy.published(insight, now)
        self._act(fire, skips, now)

    def next_due(self) -> float | None:
        """When (the clock :meth:`tick` is given) a pending write is next due; None if none."""
        with self._lock:
            return self.policy.next_due()

    def tick(self, now: float) -> None:
        """Fires pending writes whose interval has passed (every worker turn)."""
        if not self.policy.rules:
            return
        with self._lock:
            fire, skips = self.policy.due(now)
        self._act(fire, skips, now)

    def report(self) -> dict[str, Any]:
        with self._lock:
            return self.policy.report()

    def _act(self, fire: list[int], skips: list[tuple[int, str]], now: float) -> None:
        for index, reason in skips:
            with self._lock:
                first = self.policy.skip(reason)
            if first:
                level = logging.DEBUG if reason in _ROUTINE else logging.WARNING
                log.log(
                    level,
                    "write-back: rule %d (%s) did not write (%s): %s. Further ones are counted in the "
                    "status (insights.writeback.skipped.%s), not logged",
                    index,
                    self.policy.rules[index].describe(),
                    reason,
                    _ADVICE[reason],
                    reason,
                )
        for index in fire:
            with self._lock:
                self.policy.started(index, now)
            self._jobs.put_nowait(index)  # never blocks: one slot per rule, and it was not in flight

    def _run(self) -> None:
        name_current_thread("fedge-writeback")
        while True:
            index = self._jobs.get()
            if index is None:
                return
            rule = self.policy.rules[index]
            failure: str | None = None
            detail = ""
            try:
                self._write(rule.device, rule.command, dict(rule.values))
            except Exception as exc:  # a failed write never ends the thread, nor the agent
                failure = str(getattr(exc, "reason", "") or "error")
                detail = str(exc)
            with self._lock:
                self.policy.finished(index, failure)
                first = failure is not None and failure not in self._failures_logged
                if first:
                    self._failures_logged.add(str(failure))
                sent = self.policy.sent
            if self.on_finished is not None:
                self.on_finished()
            if failure is None:
                if sent == 1:
                    log.info("write-back: rule %d (%s) wrote %s", index, rule.describe(), dict(rule.values))
            elif first:
                log.warning(
                    "write-back: rule %d (%s) failed (%s): %s. Tried again after its min_interval_s; "
                    "check [edgex] core_command and token_file, and that the device and command exist "
                    "in core-command. Further failures are counted in the status "
                    "(insights.writeback.failed.%s), not logged",
                    index,
                    rule.describe(),
                    failure,
                    detail,
                    failure,
                )
