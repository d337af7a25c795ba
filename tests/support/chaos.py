"""A repeatable chaos loop: kill -9 the broker, the aggregator or an agent at a chosen phase of a
round, bring it back, and measure how long the fleet takes to complete a round again.

Everything is the product (a real Mosquitto with its persistence, the aggregator and agent
processes of :class:`~support.fleet_harness.Fleet`); the loop only watches what crosses the
broker (and the aggregator's checkpoint file) to know when a phase is under way, then sends
SIGKILL. Phases, as seen from outside:

``announce``   a new signed manifest was just published (devices are fetching it)
``train``      a few milliseconds after the manifest, before any update (devices train)
``upload``     the round's first sealed update crossed the broker
``aggregate``  every live device's update crossed the broker (the aggregator folds and closes)
``checkpoint`` the aggregator's checkpoint file was just replaced (the next manifest is not out)
``publish``    the next model blob crossed the broker, its manifest not yet

The invariants checked after a run (:func:`check_invariants`) are the issue's: no model
regression (manifest versions and each device's installed version only go forward), nothing
counted twice (each aggregated round's ``examples`` is a sum over distinct devices, and its
count equals the distinct devices the aggregator's log accepted for it), no acknowledged
update lost (every update that crossed the broker, or that the broker acknowledged to its
device, for an aggregated round was counted in it or refused with a logged reason), and the
next round always completes. A device killed before the broker acknowledged its update drops
it when it comes back to a closed round; that is counted (``outbox_dropped_total``),
reported, and not a loss: nothing had acknowledged it.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from fedge.aggregator.checkpoint import load_checkpoint
from fedge.lab.broker import BrokerProcess
from fedge.protocol.sealing import read_header
from support.fleet_harness import Fleet, latest_status
from support.mqtt_fixtures import RecordedMessage, TrafficRecorder

PHASES = ("announce", "train", "upload", "aggregate", "checkpoint", "publish")
TARGETS = ("broker", "aggregator", "agent")
#: With ``[replicas]``: the aggregator worker (the leader is the "aggregator").
WORKER = "worker-1"
#: how long a killed part stays down before it is started again
DOWN_S = 0.5


@dataclass(frozen=True)
class Fault:
    target: str
    phase: str


@dataclass
class FaultResult:
    cycle: int
    target: str
    phase: str
    version_at_kill: int
    recovery_s: float


@dataclass
class ChaosReport:
    devices: int
    round_timeout_s: float
    results: list[FaultResult] = field(default_factory=list)
    #: per device: unacknowledged updates dropped on restart because their round had closed
    outbox_dropped: dict[str, int] = field(default_factory=dict)

    def note_outbox_drops(self, fleet: Fleet, recorder: TrafficRecorder, devices: list[str]) -> None:
        for d in devices:
            status = latest_status(recorder.messages, fleet.topics.status(d))
            self.outbox_dropped[d] = int(status.get("outbox_dropped_total") or 0)

    def to_json(self) -> dict[str, Any]:
        by_target: dict[str, list[float]] = {}
        for r in self.results:
            by_target.setdefault(r.target, []).append(r.recovery_s)
        return {
            "devices": self.devices,
            "round_timeout_s": self.round_timeout_s,
            "faults": [asdict(r) for r in self.results],
            "outbox_dropped": self.outbox_dropped,
            "recovery_s": {
                t: {"n": len(v), "median": sorted(v)[len(v) // 2], "max": max(v)}
                for t, v in by_target.items()
            },
        }

    def table(self) -> str:
        lines = [f"{'target':<11}{'phase':<11}{'faults':>7}{'median s':>10}{'max s':>8}"]
        groups: dict[tuple[str, str], list[float]] = {}
        for r in self.results:
            groups.setdefault((r.target, r.phase), []).append(r.recovery_s)
        for (target, phase), v in sorted(groups.items()):
            s = sorted(v)
            lines.append(f"{target:<11}{phase:<11}{len(s):>7}{s[len(s) // 2]:>10.2f}{s[-1]:>8.2f}")
        return "\n".join(lines)


def schedule(repeats: int, phases: Iterable[str] = PHASES, targets: Iterable[str] = TARGETS) -> list[Fault]:
    """Every (target, phase) pair, ``repeats`` times, in an order that alternates targets."""
    pairs = [Fault(t, p) for p, t in itertools.product(phases, targets)]
    return pairs * repeats


def short_schedule() -> list[Fault]:
    """One kill per phase, the three targets taking turns: each target at two phases."""
    return [Fault(TARGETS[i % 3], p) for i, p in enumerate(PHASES)]


class ChaosLoop:
    def __init__(
        self,
        fleet: Fleet,
        broker: BrokerProcess,
        recorder: TrafficRecorder,
        victim: str,
        recovery_timeout_s: float = 45.0,
    ) -> None:
        self.fleet = fleet
        self.broker = broker
        self.recorder = recorder
        self.victim = victim
        self.recovery_timeout_s = recovery_timeout_s
        self.checkpoint = fleet.root / "state" / "aggregator" / "checkpoint.bin"

    # --- what the broker has seen -----------------------------------------------------------

    def _manifest_count(self, ms: list[RecordedMessage]) -> int:
        return sum(1 for m in ms if m.topic == self.fleet.topics.manifest and m.payload)

    def _latest_version(self) -> int:
        return int(
            latest_status(self.recorder.messages, self.fleet.topics.aggregator_status).get("version", 0)
        )

    def _wait(
        self, predicate: Callable[[list[RecordedMessage]], bool], what: str, timeout: float = 60
    ) -> None:
        self.recorder.wait_for(predicate, timeout, what)

    def _wait_new_manifest(self) -> int:
        """Index (in the recording) just past the next manifest published from now on."""
        start = len(self.recorder.messages)
        self._wait(lambda ms: self._manifest_count(ms[start:]) >= 1, "a new manifest")
        ms = self.recorder.messages
        return next(i for i in range(start, len(ms)) if ms[i].topic == self.fleet.topics.manifest) + 1

    def _updates_since(self, ms: list[RecordedMessage], start: int) -> set[str]:
        devices = set()
        for m in ms[start:]:
            if m.payload and m.topic.startswith(self.fleet.topics.update("x")[:-1]):
                try:
                    if read_header(m.payload)[0].kind == "update":
                        devices.add(m.topic.rsplit("/", 1)[1])
                except Exception:
                    continue
        return devices

    def wait_for_phase(self, phase: str, live_devices: int) -> None:
        """Returns as soon as ``phase`` of some round is under way (see the module docstring)."""
        if phase == "checkpoint":
            before = self._stat()
            deadline = time.monotonic() + 60
            while self._stat() == before:
                if time.monotonic() > deadline:
                    raise AssertionError("the checkpoint was not written within 60 s")
                time.sleep(0.001)
            return
        if phase == "publish":
            start = len(self.recorder.messages)
            self._wait(
                lambda ms: any(
                    mqttmatch(self.fleet.topics.blob_filter, m.topic) and m.payload for m in ms[start:]
                ),
                "a new model blob",
            )
            return
        after = self._wait_new_manifest()
        if phase == "announce":
            return
        if phase == "train":
            time.sleep(0.01)
            return
        need = 1 if phase == "upload" else live_devices
        self._wait(lambda ms: len(self._updates_since(ms, after)) >= need, f"{need} update(s) for {phase}")

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.checkpoint)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns)

    # --- faults -----------------------------------------------------------------------------

    def kill(self, target: str) -> None:
        if target == "broker":
            self.broker.kill()
        elif target in ("aggregator", "worker"):
            self.fleet.kill("aggregator" if target == "aggregator" else WORKER)
        else:
            self.fleet.kill(self.victim)

    def revive(self, target: str) -> None:
        if target == "broker":
            self.broker.restart()
        elif target == "aggregator":
            self.fleet.start_aggregator()
        elif target == "worker":
            self.fleet.start_worker(WORKER)
        else:
            self.fleet.start_agent(self.victim)

    def _recovered_after(self, version: int) -> Callable[[list[RecordedMessage]], bool]:
        """A round announced after the kill (a higher version) was aggregated."""

        def done(ms: list[RecordedMessage]) -> bool:
            status = latest_status(ms, self.fleet.topics.aggregator_status)
            return any(
                r.get("phase") == "train"
                and r.get("outcome") == "aggregated"
                and r.get("version", 0) > version
                for r in status.get("history", [])
            )

        return done

    def inject(self, cycle: int, fault: Fault, live_devices: int) -> FaultResult:
        self.wait_for_phase(fault.phase, live_devices)
        self.kill(fault.target)
        killed_at = time.monotonic()
        version = self._latest_version()
        time.sleep(DOWN_S)
        self.revive(fault.target)
        self._wait(
            self._recovered_after(version),
            f"a round after {fault.target} was killed at {fault.phase} (cycle {cycle})",
            self.recovery_timeout_s,
        )
        return FaultResult(cycle, fault.target, fault.phase, version, time.monotonic() - killed_at)

    def run(self, faults: list[Fault], live_devices: int, report: ChaosReport) -> ChaosReport:
        for cycle, fault in enumerate(faults):
            result = self.inject(cycle, fault, live_devices)
            report.results.append(result)
            print(
                f"chaos {cycle + 1}/{len(faults)}: {fault.target} killed at {fault.phase}, "
                f"recovered in {result.recovery_s:.2f} s",
                flush=True,
            )
        return report


def mqttmatch(topic_filter: str, topic: str) -> bool:
    return bool(mqtt.topic_matches_sub(topic_filter, topic))


def check_invariants(
    fleet: Fleet, recorder: TrafficRecorder, loop: ChaosLoop, devices: list[str], workers: Iterable[str] = ()
) -> list[str]:
    """Everything that went wrong, as sentences; empty when the run kept every invariant.
    ``workers``: aggregator workers ([replicas]), whose refusals are in their own logs."""
    problems: list[str] = []
    versions = [m.version for m in fleet.manifests(recorder)]
    if versions != sorted(set(versions)):
        problems.append(f"manifest versions not strictly increasing: {versions}")
    for device in devices:
        # In the device's own order (its ``time``): QoS 1 delivers a status again after a broker
        # restart (a copy in flight when it died), after newer ones, as MQTT allows; a subscriber
        # keeps the newest by ``time`` (docs/bms.md), and so does this check.
        statuses = [
            json.loads(m.payload) for m in recorder.matching(fleet.topics.status(device)) if m.payload
        ]
        timed = sorted(
            (s for s in statuses if isinstance(s.get("time"), float | int)), key=lambda s: s["time"]
        )
        installed = [s["model_version"] for s in timed if isinstance(s.get("model_version"), int)]
        if any(b < a for a, b in itertools.pairwise(installed)):
            problems.append(f"{device}'s installed model went back: {installed}")
    checkpoint = load_checkpoint(loop.checkpoint, 10**8)
    if checkpoint is None:
        return [*problems, "no checkpoint"]
    records = [r for r in checkpoint.metadata["history"] if r["phase"] == "train"]
    aggregated = [r for r in records if r["outcome"] == "aggregated"]
    numbers = [r["round_number"] for r in aggregated]
    if len(numbers) != len(set(numbers)):
        problems.append(f"a round was aggregated twice: {numbers}")
    agg_versions = [r["version"] for r in aggregated]
    if agg_versions != sorted(set(agg_versions)):
        problems.append(f"aggregated versions not increasing: {agg_versions}")
    samples = {d: latest_status(recorder.messages, fleet.topics.status(d)).get("samples") for d in devices}
    for r in aggregated:
        sums = {
            sum(int(samples[d] or 0) for d in combo)
            for combo in itertools.combinations(devices, r["reported"])
        }
        if r["reported"] > r["selected"] or r["examples"] not in sums:
            problems.append(
                f"round {r['round_id']} counts {r['reported']} updates / {r['examples']} examples: {r}"
            )
    ledger = AggregatorLedger.parse(fleet.log("aggregator"))
    for worker in workers:
        for device, reasons in AggregatorLedger.parse(fleet.log(worker)).refused.items():
            ledger.refused.setdefault(device, []).extend(reasons)
    crossed = _recorded_updates(fleet, recorder)
    for device in devices:  # acknowledged, though perhaps lost before anyone saw it
        for round_id in acknowledged_rounds(fleet.log(device)):
            crossed.setdefault((round_id, device), 1)
    problems.extend(reconcile_updates(ledger, crossed, aggregated))
    for name in ("aggregator", *workers, *devices):
        if "Traceback" in fleet.log(name):
            problems.append(f"a traceback in {name}'s log")
    return problems


_MANIFEST = re.compile(r"published manifest v\d+: train round (\S+),")
_ACCEPTED = re.compile(r"accepted update from (\S+)$")
_REJECTED = re.compile(r"rejected message from (\S+) on \S+/update/\S+: (\S+)")


@dataclass
class AggregatorLedger:
    """What the aggregator's own log says it did with each update, across its restarts: the
    devices it accepted per round, and its refusals (with their reason) per device."""

    accepted: dict[str, list[str]] = field(default_factory=dict)
    refused: dict[str, list[str]] = field(default_factory=dict)

    @staticmethod
    def parse(text: str) -> AggregatorLedger:
        ledger = AggregatorLedger()
        current: str | None = None
        for line in text.splitlines():
            if "resuming from checkpoint" in line:
                current = None  # a restart aborts the open round
            elif m := _MANIFEST.search(line):
                current = m.group(1)
            elif (m := _ACCEPTED.search(line)) and current is not None:
                ledger.accepted.setdefault(current, []).append(m.group(1))
            elif m := _REJECTED.search(line):
                ledger.refused.setdefault(m.group(1), []).append(m.group(2))
        return ledger


_SEALED = re.compile(
    r"(?:update for round (\S+) sealed|reconnected in round (\S+): sent its update again.*)"
    r" \(.*message (\d+)\)"
)
_ACKNOWLEDGED = re.compile(r"message (\d+) acknowledged by the broker")


def acknowledged_rounds(agent_log: str) -> set[str]:
    """The rounds whose update the broker acknowledged (PUBACK), from a device's own log: what
    the broker took responsibility for, whether or not anyone saw it afterwards."""
    round_of: dict[int, str] = {}
    acked: set[str] = set()
    for line in agent_log.splitlines():
        if m := _SEALED.search(line):
            round_of[int(m.group(3))] = m.group(1) or m.group(2)
        elif (m := _ACKNOWLEDGED.search(line)) and int(m.group(1)) in round_of:
            acked.add(round_of[int(m.group(1))])
    return acked


def _recorded_updates(fleet: Fleet, recorder: TrafficRecorder) -> dict[tuple[str, str], int]:
    """(round, device) -> how many sealed updates for that round crossed the broker."""
    seen: dict[tuple[str, str], int] = {}
    prefix = fleet.topics.update("x")[:-1]
    for m in recorder.messages:
        if not (m.payload and m.topic.startswith(prefix)):
            continue
        try:
            header = read_header(m.payload)[0]
        except Exception:
            continue
        if header.kind == "update":
            key = (header.round_id, header.device_id)
            seen[key] = seen.get(key, 0) + 1
    return seen


def reconcile_updates(
    ledger: AggregatorLedger, recorded: dict[tuple[str, str], int], aggregated: list[dict[str, Any]]
) -> list[str]:
    """Nothing counted twice, nothing acknowledged lost: each aggregated round counted exactly the
    devices the aggregator logged as accepted for it, each once; and every update that crossed
    the broker for an aggregated round was counted in it or refused with a logged reason
    (a late one, a duplicate). Updates of rounds a restart aborted count in no round."""
    problems: list[str] = []
    uncounted: dict[str, int] = {}
    for r in aggregated:
        accepted = ledger.accepted.get(r["round_id"], [])
        if len(accepted) != len(set(accepted)) or len(accepted) != r["reported"]:
            counted = f"round {r['round_id']} counted {r['reported']} update(s)"
            problems.append(f"{counted}; the log accepted {sorted(accepted)}")
        for (round_id, device), n in recorded.items():
            if round_id == r["round_id"]:
                uncounted[device] = uncounted.get(device, 0) + n - (device in accepted)
    for device, n in sorted(uncounted.items()):
        if n > len(ledger.refused.get(device, [])):
            problems.append(
                f"{n} update(s) of {device} crossed the broker for aggregated rounds and were neither "
                f"counted nor refused (refusals logged: {ledger.refused.get(device, [])})"
            )
    return problems


def write_report(report: ChaosReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_json(), indent=2) + "\n")


__all__ = [
    "PHASES",
    "TARGETS",
    "AggregatorLedger",
    "ChaosLoop",
    "ChaosReport",
    "Fault",
    "acknowledged_rounds",
    "check_invariants",
    "reconcile_updates",
    "schedule",
    "short_schedule",
    "write_report",
]
