"""50 real agents in one fleet on this machine, and one agent under a board's budget (issue 16).

Everything is the product: a real Mosquitto broker (:class:`~fedge.lab.broker.MosquittoBroker`,
its own data directory, a free loopback port, anonymous plain MQTT, persistence off), the real
aggregator (``python -m fedge.cli aggregator run``) and real agent processes (``python -m
fedge.cli agent run``), provisioned with :func:`~fedge.lab.provision.create_fleet` as ``fedge
demo`` does: the default task (``tasks/har-watch.toml``: MLP 48-64-32-7, 3 local epochs), the
demo's server learning rate 2.0, fp32 updates, the smartwatch data set (subjects 1-7; device
``watch-NN`` reads subject ``(NN - 1) % 7 + 1``, so 50 devices are about 7 copies of the 7
subjects). The model is built once by ``fedge model build`` in its own process. Every round
selects every device (``min_devices`` = the fleet's size) and the deadline (``round_timeout_s``
300 s) is far longer than a round takes, so a round closes when all devices have reported.
Agents start first; the aggregator starts once all of them are online (their retained status).

Two data paths (``--data`` for Part A): ``direct`` (default; ``fedge demo --data direct``, as
bench_vs_flower does): each agent reads its subject itself (``[data] source = "har-watch"``,
which imports seglearn and with it pandas, scipy and scikit-learn: about 110 MiB of the agent's
RSS that a board does not have); ``edgex`` (``fedge demo``'s default, a board's path): the
agents read ``[data] source = "edgex"`` and this script replays their subjects once as a
simulated EdgeX device service on the broker (``fedge.lab.edgex_simulate.simulate``; all devices
of a subject take the same EdgeX device's events), then waits until each agent's status says it
stored all its samples. Ingesting costs an agent 5-15 CPU-s and the replay (JSON encoding in
this process) about as much per subject, so ``--data edgex`` suits small fleets: 10 agents took
5.5 min on 2 busy cores, and 50 did not finish the feed in 7 min (load average 30-70).

Part A, the fleet: 7 agents (the baseline), then 50, each for R train rounds (after the moments
round). Measured:

- per round wall time: the aggregator log's "published manifest vN: train round rK-vN" to
  "round rK-vN aggregated: n/N devices"; rounds completed and each round's reported/selected;
- each agent's peak RSS: /proc/<pid>/status VmRSS (and RssAnon, RssFile) sampled every 0.25 s,
  and the kernel's high-water mark VmHWM; PSS (smaps_rollup: shared pages split between the
  processes sharing them) every 2 s, for the fleet's real total. A reading is the agent's: its
  command line holds ``agent run --config <its config>`` and its start time never changes;
- CPU-seconds per agent per train round: utime + stime (/proc/<pid>/stat) between round 1's
  manifest and round R's aggregation, divided by R; start-up, data loading and the moments
  round are reported apart;
- the aggregator's and the broker's peak RSS and CPU per round, and the machine's busy fraction
  during the train rounds (/proc/stat) next to this run's own share of it (agents, aggregator,
  broker and this script): the difference is other load on the machine.

Part B, the board: a fleet of 8 agents (subjects 1-7, and ``watch-08`` on subject 1 again) in
which ``watch-01`` runs under a board's budget: a cgroup with a 128 MiB memory limit (the same
memory+swap limit where the kernel has one) and one CPU (a CFS quota of 100 ms per 100 ms). A
shell moves itself into the cgroups and then ``exec``s the agent, so the agent never runs
outside them (checked: its pid is in the groups' ``cgroup.procs``). ``watch-01`` and its
unconstrained twin ``watch-08`` read EdgeX (a board's data path); the other six read the data
set directly. Both serve the agent's Prometheus endpoint (``[metrics]``, scraped every second):
the agent reports its own usage there (``process_resident_memory_bytes``,
``process_cpu_seconds_total``, ``fedge_agent_training_seconds_count``), not in its MQTT status,
whose keys the report lists. Reported: the train rounds each contributed to (the aggregator's
"accepted update from" lines), peak RSS (/proc, and the cgroup's ``memory.max_usage_in_bytes``;
v2: ``memory.peak``), CPU per round and before round 1, the cgroup's failcnt and OOM counters,
and its CPU throttling (``cpu.stat``). Cgroup v1 memory charges a file page to the group that
first read it: shared libraries already cached by other agents are in the agent's RSS but not
in its group's usage. Part B': the same budget on an agent with the direct data source (a fleet
of 2, one round, a 20 s deadline since a dead device stays selected): it needs ~190-220 MiB and
is OOM-killed (a missed target, reported; not a failure of the run).

Cgroup v1 (``/sys/fs/cgroup/{memory,cpu}``) is used when mounted, else v2
(``/sys/fs/cgroup/cgroup.controllers``: ``memory.max``, ``memory.swap.max``, ``cpu.max``), else
the run fails; the groups (``fedge-board-<pid>``) are made under the cgroups this script runs in,
so the agent stays inside their accounting, and removed at the end. Needs root and mosquitto.

Usage: ``python bench/bench_fleet_budget.py [--rounds 10] [--devices 50] [--baseline-devices 7]
[--board-fleet 8] [--data direct|edgex] [--skip-direct-board] [--quick] [--keep]
[--out bench/results/fleet_budget.json]`` (``make bench-fleet-budget``). ``--quick``: 10 agents
against 3, 2 rounds, a board fleet of 4 (``fleet_budget-quick.json`` unless ``--out``). The
plot goes next to the JSON (``.png``) when matplotlib is installed. A failed validity check (a
train round not aggregated, a process that exited early, a reading that is not the agent's, a
board agent outside its cgroup) exits 1 and writes ``<out>-failed.json``; a missed target (the
board's agent OOM-killed or not contributing, a round with fewer devices or retried) is only
reported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from agent_processes import (  # type: ignore[import-not-found, unused-ignore]  # noqa: E402
    BenchError,
    Sampler,
    Trace,
    build_model,
    fedge_argv,
    machine_cpu,
    spawn,
    terminate,
    wait_for_exit,
)
from bench_training import machine_info  # type: ignore[import-not-found, unused-ignore]  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "fleet_budget.json"
TASK = ROOT / "tasks" / "har-watch.toml"
FLEET = "budget"
TRAIN_SUBJECTS = 7
MIB = 1024 * 1024
BOARD_MEMORY_BYTES = 128 * MIB
BOARD_CPU_QUOTA_US = 100_000
BOARD_CPU_PERIOD_US = 100_000
SAMPLE_INTERVAL_S = 0.25
PSS_EVERY = 8  # ticks between two smaps_rollup reads (2 s)
SCRAPE_INTERVAL_S = 1.0
#: Part B': the round deadline when the board's agent may be gone (a dead device stays selected).
DIRECT_BOARD_TIMEOUT_S = 20.0


class StatusWatch:
    """Subscribes to the fleet's device statuses: who is online, and each one's last status."""

    def __init__(self, host: str, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from fedge.protocol.topics import FleetTopics

        self.topics = FleetTopics(FLEET)
        self.latest: dict[str, dict[str, Any]] = {}
        self.keys_seen: set[str] = set()
        self.lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"fedge-bench-watch-{os.getpid()}", protocol=mqtt.MQTTv5
        )
        self.client.on_connect = lambda c, *_: c.subscribe([(self.topics.status_filter, 1)])
        self.client.on_message = self._message
        self.client.connect(host, port, 60)
        self.client.loop_start()

    def _message(self, client: Any, userdata: Any, msg: Any) -> None:
        if not msg.payload:
            return
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(doc, dict):
            device = msg.topic.rsplit("/", 1)[-1]
            with self.lock:
                self.latest[device] = doc
                if doc.get("state") != "offline":
                    self.keys_seen |= set(doc)
                    if isinstance(doc.get("data"), dict):
                        self.keys_seen |= {f"data.{k}" for k in doc["data"]}

    def online(self) -> set[str]:
        with self.lock:
            return {d for d, s in self.latest.items() if s.get("state") not in (None, "offline")}

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class MetricsScraper(threading.Thread):
    """Every second, the agents' own Prometheus endpoints: what each reports of its usage."""

    WANTED = (
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "fedge_agent_training_seconds_count",
        "fedge_agent_model_version",
    )

    def __init__(self, ports: dict[str, int]) -> None:
        super().__init__(daemon=True, name="scraper")
        self.ports = ports
        self.samples: dict[str, list[tuple[float, dict[str, float]]]] = {d: [] for d in ports}
        self.failures: dict[str, int] = dict.fromkeys(ports, 0)
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            for device, port in self.ports.items():
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                        text = r.read().decode()
                except OSError:
                    self.failures[device] += 1
                    continue
                values: dict[str, float] = {}
                for line in text.splitlines():
                    name, _, value = line.partition(" ")
                    if name in self.WANTED:
                        with contextlib.suppress(ValueError):
                            values[name] = float(value)
                self.samples[device].append((time.time(), values))
            self.stop_event.wait(SCRAPE_INTERVAL_S)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=10)

    def summary(self, device: str) -> dict[str, Any]:
        samples = self.samples[device]
        rss = [v["process_resident_memory_bytes"] for _, v in samples if "process_resident_memory_bytes" in v]
        last = samples[-1][1] if samples else {}
        return {
            "scrapes": len(samples),
            "failed_scrapes": self.failures[device],
            "peak_resident_memory_bytes": max(rss) if rss else None,
            "last": last,
        }


# --- the aggregator's log ---------------------------------------------------------------------

_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")
# Round ids: "m-v1" (moments), "r0003-v4" (train round 3), "final-v7".
_PUBLISHED = re.compile(r"published manifest v(\d+): (\w+) round (\S+), (\d+) devices selected")
_CLOSED = re.compile(r"round (\S+) (aggregated|aborted): (\d+)/(\d+) devices")
_NUMBER = re.compile(r"^r(\d+)-v\d+$")
_ACCEPTED = re.compile(r"accepted (\w+) from (\S+)")


def _log_time(line: str) -> float | None:
    m = _LOG_TIME.match(line)
    if not m:
        return None
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1000


@dataclass
class RoundLog:
    round_id: str
    number: int
    phase: str
    selected: int
    published: float
    closed: float | None = None
    outcome: str | None = None
    reported: int | None = None
    accepted_from: list[str] = field(default_factory=list)


def read_aggregator_log(path: Path) -> list[RoundLog]:
    rounds: list[RoundLog] = []
    by_id: dict[str, RoundLog] = {}
    for line in path.read_text(errors="replace").splitlines():
        t = _log_time(line)
        if t is None:
            continue
        if m := _PUBLISHED.search(line):
            n = _NUMBER.match(m.group(3))
            r = RoundLog(m.group(3), int(n.group(1)) if n else 0, m.group(2), int(m.group(4)), t)
            rounds.append(r)
            by_id[r.round_id] = r
        elif m := _CLOSED.search(line):
            r2 = by_id.get(m.group(1))
            if r2 is not None:
                r2.closed, r2.outcome = t, m.group(2)
                r2.reported = int(m.group(3))
        elif (m := _ACCEPTED.search(line)) and rounds:
            rounds[-1].accepted_from.append(m.group(2))
    return rounds


# --- cgroups: the board's budget --------------------------------------------------------------


class BoardCgroup:
    """A memory limit and one CPU: cgroup v1 (memory and cpu hierarchies) or v2 (one group)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.version: int
        self.memory: Path
        self.cpu: Path
        self.created: list[Path] = []
        self.samples: list[tuple[float, int]] = []  # t, memory usage (bytes)
        v1_memory, v1_cpu = Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup/cpu")
        if (v1_memory / "memory.limit_in_bytes").exists() and (v1_cpu / "cpu.cfs_quota_us").exists():
            self.version = 1
            self.memory = v1_memory / self._own("memory") / name
            self.cpu = v1_cpu / self._own("cpu") / name
        elif Path("/sys/fs/cgroup/cgroup.controllers").exists():
            self.version = 2
            self.memory = self.cpu = Path("/sys/fs/cgroup") / self._own("") / name
        else:
            raise BenchError(
                "no usable cgroup: neither v1 (/sys/fs/cgroup/memory and /sys/fs/cgroup/cpu) nor v2 "
                "(/sys/fs/cgroup/cgroup.controllers) is mounted"
            )

    @staticmethod
    def _own(controller: str) -> str:
        """This process's cgroup in a hierarchy (v1: the line naming ``controller``; v2: ``0::``),
        relative, so that the board's group is made inside it."""
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if (controller and controller in controllers.split(",")) or (
                not controller and controllers == ""
            ):
                return path.lstrip("/")
        return ""

    @staticmethod
    def _write(path: Path, value: str) -> None:
        try:
            path.write_text(value)
        except OSError as exc:
            raise BenchError(f"cannot write {value!r} to {path}: {exc.strerror} (run as root)") from None

    def create(self) -> None:
        try:
            for path in dict.fromkeys((self.memory, self.cpu)):
                path.mkdir()
                self.created.append(path)
        except OSError as exc:
            raise BenchError(f"cannot create the board's cgroup: {exc}") from None
        if self.version == 1:
            self._write(self.memory / "memory.limit_in_bytes", str(BOARD_MEMORY_BYTES))
            if (self.memory / "memory.memsw.limit_in_bytes").exists():
                self._write(self.memory / "memory.memsw.limit_in_bytes", str(BOARD_MEMORY_BYTES))
            self._write(self.cpu / "cpu.cfs_period_us", str(BOARD_CPU_PERIOD_US))
            self._write(self.cpu / "cpu.cfs_quota_us", str(BOARD_CPU_QUOTA_US))
        else:
            parent = self.memory.parent / "cgroup.subtree_control"
            with contextlib.suppress(OSError):
                parent.write_text("+memory +cpu")
            self._write(self.memory / "memory.max", str(BOARD_MEMORY_BYTES))
            if (self.memory / "memory.swap.max").exists():
                self._write(self.memory / "memory.swap.max", "0")
            self._write(self.cpu / "cpu.max", f"{BOARD_CPU_QUOTA_US} {BOARD_CPU_PERIOD_US}")

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run by a shell that first moves itself into the group(s), then execs it."""
        moves = " && ".join(f"echo $$ > {p / 'cgroup.procs'}" for p in dict.fromkeys((self.memory, self.cpu)))
        return ["/bin/sh", "-c", f'{moves} && exec "$0" "$@"', *argv]

    def contains(self, pid: int) -> bool:
        for path in dict.fromkeys((self.memory, self.cpu)):
            try:
                pids = {int(p) for p in (path / "cgroup.procs").read_text().split()}
            except OSError:
                return False
            if pid not in pids:
                return False
        return True

    def settings(self) -> dict[str, Any]:
        if self.version == 1:
            memsw = self.memory / "memory.memsw.limit_in_bytes"
            return {
                "memory.limit_in_bytes": int(self._read(self.memory / "memory.limit_in_bytes")),
                "memory.memsw.limit_in_bytes": int(self._read(memsw)) if memsw.exists() else None,
                "cpu.cfs_period_us": int(self._read(self.cpu / "cpu.cfs_period_us")),
                "cpu.cfs_quota_us": int(self._read(self.cpu / "cpu.cfs_quota_us")),
            }
        return {
            "memory.max": self._read(self.memory / "memory.max"),
            "cpu.max": self._read(self.cpu / "cpu.max"),
        }

    @staticmethod
    def _read(path: Path) -> str:
        try:
            return path.read_text().strip()
        except OSError:
            return ""

    def usage(self) -> int | None:
        name = "memory.usage_in_bytes" if self.version == 1 else "memory.current"
        text = self._read(self.memory / name)
        return int(text) if text.isdigit() else None

    def sample(self, now: float) -> None:
        usage = self.usage()
        if usage is not None:
            self.samples.append((now, usage))

    @staticmethod
    def _keyed(text: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[key] = int(value)
        return out

    def counters(self) -> dict[str, Any]:
        """What the kernel says about the budget: peak, failures, OOM, throttling."""
        m, c = self.memory, self.cpu
        if self.version == 1:
            stat = self._keyed(self._read(m / "memory.stat"))
            return {
                "memory_peak_bytes": int(self._read(m / "memory.max_usage_in_bytes") or 0),
                "memory_usage_bytes": int(self._read(m / "memory.usage_in_bytes") or 0),
                "memory_failcnt": int(self._read(m / "memory.failcnt") or 0),
                "memsw_peak_bytes": int(self._read(m / "memory.memsw.max_usage_in_bytes") or 0) or None,
                "memsw_failcnt": int(self._read(m / "memory.memsw.failcnt") or 0)
                if (m / "memory.memsw.failcnt").exists()
                else None,
                "oom_control": self._keyed(self._read(m / "memory.oom_control")),
                "memory_stat": {
                    k: stat[k]
                    for k in (
                        "total_rss",
                        "total_cache",
                        "total_mapped_file",
                        "total_swap",
                        "total_pgmajfault",
                    )
                    if k in stat
                },
                "cpu_stat": self._keyed(self._read(c / "cpu.stat")),
            }
        events = self._keyed(self._read(m / "memory.events"))
        return {
            "memory_peak_bytes": int(self._read(m / "memory.peak") or 0) or None,
            "memory_usage_bytes": int(self._read(m / "memory.current") or 0),
            "memory_events": events,
            "oom_control": {"oom_kill": events.get("oom_kill", 0), "under_oom": None},
            "memory_failcnt": events.get("max"),
            "cpu_stat": self._keyed(self._read(c / "cpu.stat")),
        }

    def remove(self) -> list[str]:
        """Removes the groups (emptied first: anything left is moved to the parent); the errors."""
        errors: list[str] = []
        for path in reversed(self.created):
            with contextlib.suppress(OSError):
                for pid in (path / "cgroup.procs").read_text().split():
                    (path.parent / "cgroup.procs").write_text(pid)
            for _ in range(50):
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != 16:  # EBUSY: the last task is still exiting
                        errors.append(f"{path}: {exc}")
                        break
                    time.sleep(0.1)
            else:
                errors.append(f"{path}: still busy")
        self.created = []
        return errors


# --- one fleet --------------------------------------------------------------------------------


@dataclass
class FleetSpec:
    label: str
    devices: int
    rounds: int
    round_timeout_s: float
    board_device: str | None = None  # the device run under the board's budget
    metrics_devices: tuple[str, ...] = ()  # devices serving [metrics]
    twin_of_board: str | None = None  # a device reading the board device's subject
    min_devices: int | None = None  # None: every device (a round needs all of them)
    #: Devices fed through EdgeX (a board's data path: the simulated device service publishes
    #: their subject's readings on the broker); the others read the data set themselves.
    edgex_devices: tuple[str, ...] = ()


def subjects_for(spec: FleetSpec) -> dict[str, int]:
    subjects = {f"watch-{i:02d}": (i - 1) % TRAIN_SUBJECTS + 1 for i in range(1, spec.devices + 1)}
    if spec.twin_of_board is not None and spec.board_device is not None:
        subjects[spec.twin_of_board] = subjects[spec.board_device]
    return subjects


def free_port() -> int:
    from fedge.lab.broker import free_loopback_port

    return free_loopback_port()


def run_fleet(spec: FleetSpec, model_dir: Path, work: Path) -> dict[str, Any]:
    """Broker, agents, then the aggregator once every agent is online; R rounds; everything
    measured. Returns the fleet's summary; raises BenchError when a check fails."""
    from fedge.lab.broker import BrokerSettings, MosquittoBroker
    from fedge.lab.provision import create_fleet

    root = work / spec.label
    logs = root / "logs"
    subjects = subjects_for(spec)
    broker = MosquittoBroker(
        BrokerSettings(data_dir=root / "broker", persistence=False, max_queued_messages=100_000)
    ).start()
    sampler = Sampler(SAMPLE_INTERVAL_S, PSS_EVERY)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    board = BoardCgroup(f"fedge-board-{os.getpid()}") if spec.board_device else None
    watch: StatusWatch | None = None
    scraper: MetricsScraper | None = None
    started = time.time()
    cleanup_errors: list[str] = []
    try:
        assert broker.pid is not None
        sampler.add("broker", broker.pid, ("-c",))
        sampler.add("bench", os.getpid(), ())  # this script (the sampler, the MQTT watch, the feed)
        rounds_table: dict[str, object] = {
            "rounds": spec.rounds,
            "min_devices": spec.min_devices or spec.devices,
            "round_timeout_s": spec.round_timeout_s,
            "server_learning_rate": 2.0,
            "codec": "fp32",
            "wait_for_devices_s": 60.0,
        }
        fleet = create_fleet(root / "fleet", FLEET, model_dir, broker.url, subjects, rounds_table)
        for device in spec.edgex_devices:
            to_edgex(fleet.agent_configs[device], subjects[device])
        metrics_ports: dict[str, int] = {}
        for device in spec.metrics_devices:
            metrics_ports[device] = free_port()
            with fleet.agent_configs[device].open("a") as f:
                f.write(f'\n[metrics]\nenabled = true\nbind = "127.0.0.1"\nport = {metrics_ports[device]}\n')
        watch = StatusWatch(broker.host, broker.port)
        sampler.start()
        if board is not None:
            board.create()
            sampler.extra.append(board.sample)
        for device, cfg in fleet.agent_configs.items():
            argv = fedge_argv("agent", "run", "--config", str(cfg))
            if board is not None and device == spec.board_device:
                argv = board.wrap(argv)
            procs[device] = spawn(argv, logs / f"{device}.log")
            sampler.add(device, procs[device].pid, ("agent", "run", str(cfg)))
        if board is not None and spec.board_device is not None:
            _wait_in_cgroup(board, procs[spec.board_device].pid, sampler, spec.board_device)
        until = time.monotonic() + 60 + 4.0 * spec.devices
        while watch.online() < set(subjects) - board_dead(spec, procs):
            dead = [d for d, p in procs.items() if p.poll() is not None and d != spec.board_device]
            if dead:
                raise BenchError(f"{spec.label}: agents {dead} exited during start-up; see {logs}")
            if time.monotonic() > until:
                missing = sorted(set(subjects) - watch.online())
                raise BenchError(f"{spec.label}: agents {missing} not online after start-up; see {logs}")
            time.sleep(0.2)
        all_online = time.time()
        if metrics_ports:  # from now on: the agents' own report of their usage
            scraper = MetricsScraper(metrics_ports)
            scraper.start()
        feed: dict[str, Any] | None = None
        if spec.edgex_devices:
            feed = feed_edgex(spec, subjects, broker.url, watch, procs)
        data_ready = time.time()
        procs["aggregator"] = spawn(
            fedge_argv("aggregator", "run", "--config", str(fleet.aggregator_config)), logs / "aggregator.log"
        )
        sampler.add("aggregator", procs["aggregator"].pid, ("aggregator", "run"))
        wait_for_exit(
            procs,
            "aggregator",
            120 + (spec.rounds + 2) * spec.round_timeout_s,
            logs,
            prefix=f"{spec.label}: ",
            ignore={spec.board_device} if spec.board_device else (),
            poll_s=0.25,
        )
        finished = time.time()
        time.sleep(2 * SAMPLE_INTERVAL_S)  # one more sample of every agent after the last round
        board_counters = board.counters() if board is not None else None
        board_settings = board.settings() if board is not None else None
        board_alive = procs[spec.board_device].poll() is None if spec.board_device else None
        board_pid = procs[spec.board_device].pid if spec.board_device else 0
        if board is not None and board_alive and not board.contains(board_pid):
            raise BenchError(f"{spec.label}: {spec.board_device} left the board's cgroup during the run")
        latest_status = dict(watch.latest)
        status_keys = sorted(watch.keys_seen)
    finally:
        if scraper is not None:
            scraper.stop()
        terminate(procs)
        sampler.stop()
        if watch is not None:
            watch.stop()
        broker.stop()
        if board is not None:
            cleanup_errors = board.remove()
    if sampler.errors:
        raise BenchError(f"{spec.label}: the /proc sampler failed:\n" + "\n".join(sampler.errors))
    summary = summarise(
        spec, sampler, root / "logs" / "aggregator.log", subjects, started, all_online, data_ready, finished
    )
    summary["processes_exit_codes"] = {d: p.returncode for d, p in procs.items()}
    summary["edgex_feed"] = feed
    summary["data_source"] = {d: "edgex" if d in spec.edgex_devices else "har-watch" for d in subjects}
    summary["logs"] = str(logs)
    if board is not None and spec.board_device is not None:
        summary["board"] = board_summary(
            spec,
            board,
            board_settings,
            board_counters,
            board_alive,
            summary,
            scraper,
            latest_status,
            status_keys,
            cleanup_errors,
            sampler.traces,
        )
    return summary


def board_dead(spec: FleetSpec, procs: dict[str, subprocess.Popen[bytes]]) -> set[str]:
    """The board's device, if its agent is gone (OOM-killed: a missed target, not a failure)."""
    d = spec.board_device
    return {d} if d is not None and d in procs and procs[d].poll() is not None else set()


def to_edgex(config: Path, subject: int) -> None:
    """The device reads EdgeX (as a board does): ``[data] source = "edgex"`` with the task file,
    ``[edgex]`` on the fleet's broker, the wearable IMU profile and its subject's EdgeX device
    (``watch-0S``: every device of one subject takes the same device's events)."""
    import tomllib

    from fedge.lab.provision import render_toml
    from fedge.tools import bundled

    tables = tomllib.loads(config.read_text())
    tables["data"] = {"source": "edgex", "task": str(TASK)}
    tables["edgex"] = {
        "prefix": "edgex",
        "profile": str(bundled.profiles_dir() / "wearable-imu.yaml"),
        "device": f"watch-{subject:02d}",
    }
    config.write_text(render_toml(tables))


def feed_edgex(
    spec: FleetSpec,
    subjects: dict[str, int],
    broker_url: str,
    watch: StatusWatch,
    procs: dict[str, subprocess.Popen[bytes]],
) -> dict[str, Any]:
    """Replays the EdgeX devices' subjects once (as ``fedge demo`` does: the recordings end now)
    and waits until every EdgeX-fed agent stored all its samples (its status's ``data``)."""
    from fedge.lab import har_watch
    from fedge.lab.edgex_simulate import ROW_PERIOD_NS, SimulateOptions, simulate
    from fedge.protocol.task import parse_task_spec

    devices = list(spec.edgex_devices)
    wanted = sorted({subjects[d] for d in devices})
    task = parse_task_spec(TASK.read_text(encoding="utf-8"))
    expected = {s: int(d.x.shape[0]) for s, d in har_watch.load_devices(task, wanted).items()}

    def data(device: str) -> dict[str, Any]:
        with watch.lock:
            report = watch.latest.get(device, {}).get("data")
        return report if isinstance(report, dict) else {}

    def wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
        until = time.monotonic() + timeout
        while not condition():
            dead = [d for d in devices if procs[d].poll() is not None and d != spec.board_device]
            if dead:
                raise BenchError(f"{spec.label}: {dead} exited while waiting for {what}")
            if time.monotonic() > until:
                raise BenchError(f"{spec.label}: timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.5)

    def alive() -> list[str]:
        return [d for d in devices if d not in board_dead(spec, procs)]

    wait(lambda: all(data(d).get("bus_connected") for d in alive()), 120, "the agents' EdgeX subscriptions")
    recordings = har_watch.load_recordings()
    gap_s = SimulateOptions.gap_s
    span_ns = max(
        sum(r.readings.shape[0] * ROW_PERIOD_NS + int(gap_s * 1e9) for r in recordings if r.subject == s)
        for s in wanted
    )
    started = time.time()
    report = simulate(
        SimulateOptions(broker_url=broker_url, start_ns=time.time_ns() - span_ns, subjects=tuple(wanted))
    )
    published = time.time()
    wait(
        lambda: all(data(d).get("stored_samples", 0) >= expected[subjects[d]] for d in alive()),
        180 + 6.0 * len(devices),
        "every EdgeX-fed agent to store its samples",
    )
    return {
        "subjects": wanted,
        "events": report.events,
        "readings": report.readings,
        "publish_s": published - started,
        "stored_s": time.time() - started,
        "expected_samples": {str(s): n for s, n in expected.items()},
        "stored_samples": {d: data(d).get("stored_samples") for d in devices},
    }


def _wait_in_cgroup(board: BoardCgroup, pid: int, sampler: Sampler, device: str) -> None:
    """The board's agent must run inside the group: checked once its shell exec'd the agent."""
    until = time.monotonic() + 30
    while time.monotonic() < until:
        tr = sampler.traces[device]
        if tr.start is not None:
            if not board.contains(pid):
                raise BenchError(f"{device} (pid {pid}) is not in the board's cgroup {board.memory}")
            return
        if tr.gone_at is not None:
            raise BenchError(f"{device} (pid {pid}) exited before it started; see its log")
        time.sleep(0.1)
    raise BenchError(f"{device} (pid {pid}) never exec'd the agent (its command line never matched)")


def summarise(
    spec: FleetSpec,
    sampler: Sampler,
    aggregator_log: Path,
    subjects: dict[str, int],
    started: float,
    all_online: float,
    data_ready: float,
    finished: float,
) -> dict[str, Any]:
    rounds = read_aggregator_log(aggregator_log)
    failures: list[str] = []
    train = [r for r in rounds if r.phase == "train"]
    moments = [r for r in rounds if r.phase == "moments"]
    aggregated = {r.number: r for r in train if r.outcome == "aggregated"}
    missing = [n for n in range(1, spec.rounds + 1) if n not in aggregated]
    if missing:
        failures.append(f"{spec.label}: train rounds {missing} were not aggregated")
    retried = [r.round_id for r in rounds if r.outcome == "aborted"]
    for tr in sampler.traces.values():
        if tr.mismatch:
            failures.append(f"{spec.label}: {tr.name}: {tr.mismatch}")
        elif not tr.samples:
            failures.append(f"{spec.label}: {tr.name}: no reading (its command line never matched)")
        elif (
            tr.gone_at is not None
            and tr.gone_at < finished
            and tr.name not in (spec.board_device, "aggregator")
        ):
            failures.append(f"{spec.label}: {tr.name} exited before the run ended")
    if failures:
        raise BenchError("; ".join(failures))
    first = aggregated[1].published
    last = aggregated[spec.rounds].closed
    assert last is not None
    r_count = spec.rounds
    round_rows = []
    for n in range(1, spec.rounds + 1):
        r = aggregated[n]
        assert r.closed is not None
        round_rows.append(
            {
                "round": n,
                "round_id": r.round_id,
                "wall_s": r.closed - r.published,
                "reported": r.reported,
                "selected": r.selected,
                "machine_busy": sampler.machine_busy(r.published, r.closed),
            }
        )
    moments_row = None
    if moments:
        m = moments[-1]
        moments_row = {
            "round_id": m.round_id,
            "wall_s": (m.closed - m.published) if m.closed else None,
            "reported": m.reported,
            "selected": m.selected,
            "outcome": m.outcome,
        }
    agents = {d: sampler.traces[d] for d in subjects}
    per_agent: dict[str, dict[str, Any]] = {}
    contributed: dict[str, int] = dict.fromkeys(subjects, 0)
    for r in train:
        if r.outcome == "aggregated":
            for d in set(r.accepted_from):
                if d in contributed:
                    contributed[d] += 1
    for d, tr in agents.items():
        cpu_rounds = (tr.cpu_at(last) - tr.cpu_at(first)) / r_count
        per_agent[d] = {
            "pid": tr.pid,
            "subject": subjects[d],
            "peak_rss_bytes": tr.peak_rss,
            "vm_hwm_bytes": tr.hwm,
            "peak_rss_anon_bytes": tr.peak_anon,
            "peak_rss_file_bytes": tr.peak_file,
            "peak_rss_in_rounds_bytes": tr.peak_rss_between(first, last),
            "peak_pss_bytes": max((p for _, p in tr.pss), default=None),
            "threads_max": tr.threads,
            "children_max": tr.children_seen,
            "cpu_s_startup": tr.cpu_at(all_online),
            "cpu_s_until_round1": tr.cpu_at(first),
            "cpu_s_edgex_ingest": tr.cpu_at(data_ready) - tr.cpu_at(all_online),
            "cpu_s_online_to_round1": tr.cpu_at(first) - tr.cpu_at(all_online),
            "cpu_s_per_round": cpu_rounds,
            "cpu_s_total": tr.samples[-1][1],
            "train_rounds_contributed": contributed[d],
            "samples": len(tr.samples),
            "exited_early": tr.gone_at is not None and tr.gone_at < finished,
        }
    values = list(per_agent.values())

    def dist(key: str) -> dict[str, float]:
        xs = sorted(float(v[key]) for v in values if v[key] is not None)
        return {"min": xs[0], "median": statistics.median(xs), "max": xs[-1], "mean": statistics.fmean(xs)}

    # The fleet's summed RSS and PSS at each sample time (RSS counts shared pages in every process).
    fleet_rss_peak = _peak_sum([tr.samples for tr in agents.values()], lambda s: (s[0], s[2]))
    fleet_pss_peak = _peak_sum([tr.pss for tr in agents.values()], lambda s: s)

    def proc_summary(name: str) -> dict[str, Any]:
        tr = sampler.traces[name]
        return {
            "peak_rss_bytes": tr.peak_rss,
            "vm_hwm_bytes": tr.hwm,
            "cpu_s_total": tr.samples[-1][1] if tr.samples else None,
            "cpu_s_per_round": (tr.cpu_at(last) - tr.cpu_at(first)) / r_count,
            "threads_max": tr.threads,
        }

    wall_rounds = [row["wall_s"] for row in round_rows]
    ours = sum(tr.cpu_at(last) - tr.cpu_at(first) for tr in sampler.traces.values() if tr.samples)
    agent_cpu_rounds = sum(v["cpu_s_per_round"] for v in values) * r_count
    return {
        "label": spec.label,
        "devices": spec.devices,
        "rounds_requested": spec.rounds,
        "rounds_completed": len(aggregated),
        "rounds_retried": retried,
        "round_timeout_s": spec.round_timeout_s,
        "startup_s": all_online - started,
        "edgex_feed_s": data_ready - all_online,
        "until_round1_s": first - started,
        "train_rounds_s": last - first,
        "wall_s": finished - started,
        "round_wall_s": wall_rounds,
        "round_wall_s_median": statistics.median(wall_rounds),
        "rounds": round_rows,
        "moments_round": moments_row,
        "machine_busy_in_rounds": sampler.machine_busy(first, last),
        "machine_cores": os.cpu_count(),
        "agents_cpu_share_of_machine_in_rounds": agent_cpu_rounds / ((last - first) * (os.cpu_count() or 1)),
        # Agents, aggregator, broker and this script: the rest of machine_busy_in_rounds is other load.
        "ours_cpu_share_of_machine_in_rounds": ours / ((last - first) * (os.cpu_count() or 1)),
        "agent_peak_rss_bytes": dist("peak_rss_bytes"),
        "agent_vm_hwm_bytes": dist("vm_hwm_bytes"),
        "agent_peak_rss_anon_bytes": dist("peak_rss_anon_bytes"),
        "agent_peak_pss_bytes": dist("peak_pss_bytes"),
        "agent_cpu_s_per_round": dist("cpu_s_per_round"),
        "agent_cpu_s_startup": dist("cpu_s_startup"),
        "agent_cpu_s_online_to_round1": dist("cpu_s_online_to_round1"),
        "agent_threads_max": dist("threads_max"),
        "fleet_rss_peak_bytes": fleet_rss_peak,
        "fleet_pss_peak_bytes": fleet_pss_peak,
        "aggregator": proc_summary("aggregator"),
        "broker": proc_summary("broker"),
        "agents": per_agent,
    }


def _peak_sum(series: list[list[Any]], point: Callable[[Any], tuple[float, int]]) -> int:
    """The largest sum over the processes of their values read in one tick (a tick stamps all
    its readings with the same time)."""
    sums: dict[float, int] = {}
    for ss in series:
        for s in ss:
            t, v = point(s)
            sums[t] = sums.get(t, 0) + v
    return max(sums.values(), default=0)


def board_summary(
    spec: FleetSpec,
    board: BoardCgroup,
    settings: dict[str, Any] | None,
    counters: dict[str, Any] | None,
    alive: bool | None,
    fleet: dict[str, Any],
    scraper: MetricsScraper | None,
    latest_status: dict[str, dict[str, Any]],
    status_keys: list[str],
    cleanup_errors: list[str],
    traces: dict[str, Trace],
) -> dict[str, Any]:
    assert spec.board_device is not None
    device, twin = spec.board_device, spec.twin_of_board
    usage_key = ("rss", "cpu", "memory", "resident")
    mqtt_usage_keys = [k for k in status_keys if any(w in k.lower() for w in usage_key)]
    out: dict[str, Any] = {
        "device": device,
        "baseline_device": twin,
        "cgroup_version": board.version,
        "cgroup_memory": str(board.memory),
        "cgroup_cpu": str(board.cpu),
        "settings": settings,
        "counters": counters,
        "cgroup_usage_peak_sampled_bytes": max((u for _, u in board.samples), default=None),
        "alive_at_end": alive,
        "agent": fleet["agents"][device],
        "baseline": fleet["agents"][twin] if twin else None,
        "agent_metrics": scraper.summary(device) if scraper else None,
        "baseline_metrics": scraper.summary(twin) if scraper and twin else None,
        "mqtt_status_keys": status_keys,
        "mqtt_status_usage_keys": mqtt_usage_keys,
        "mqtt_status_reports_usage": bool(mqtt_usage_keys),
        "mqtt_status_last": latest_status.get(device),
        "cleanup_errors": cleanup_errors,
        "series": {
            f"{device} cgroup memory usage": _thin(board.samples),
            f"{device} VmRSS": _thin([(t, rss) for t, _, rss in traces[device].samples]),
        },
    }
    if twin:
        out["series"][f"{twin} VmRSS (baseline)"] = _thin([(t, rss) for t, _, rss in traces[twin].samples])
    return out


def _thin(points: list[tuple[float, int]], every_s: float = 1.0) -> list[tuple[float, int]]:
    """At most one point a second: the largest of each second (peaks survive)."""
    out: dict[int, tuple[float, int]] = {}
    for t, v in points:
        k = int(t // every_s)
        if k not in out or v > out[k][1]:
            out[k] = (round(t, 2), v)
    return [out[k] for k in sorted(out)]


# --- the report -------------------------------------------------------------------------------


def mib(v: float | None) -> str:
    return "-" if v is None else f"{v / MIB:.1f}"


def num(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def part_a_ratios(small: dict[str, Any], big: dict[str, Any]) -> dict[str, Any]:
    return {
        "devices": big["devices"] / small["devices"],
        "round_wall_s_median": ratio(big["round_wall_s_median"], small["round_wall_s_median"]),
        "agent_cpu_s_per_round_median": ratio(
            big["agent_cpu_s_per_round"]["median"], small["agent_cpu_s_per_round"]["median"]
        ),
        "agent_peak_rss_median": ratio(
            big["agent_peak_rss_bytes"]["median"], small["agent_peak_rss_bytes"]["median"]
        ),
        "agent_peak_pss_median": ratio(
            big["agent_peak_pss_bytes"]["median"], small["agent_peak_pss_bytes"]["median"]
        ),
        "aggregator_cpu_s_per_round": ratio(
            big["aggregator"]["cpu_s_per_round"], small["aggregator"]["cpu_s_per_round"]
        ),
        "aggregator_peak_rss": ratio(
            big["aggregator"]["peak_rss_bytes"], small["aggregator"]["peak_rss_bytes"]
        ),
        "broker_peak_rss": ratio(big["broker"]["peak_rss_bytes"], small["broker"]["peak_rss_bytes"]),
        "broker_cpu_s_per_round": ratio(big["broker"]["cpu_s_per_round"], small["broker"]["cpu_s_per_round"]),
        "startup_s": ratio(big["startup_s"], small["startup_s"]),
    }


def render(report: dict[str, Any]) -> str:
    a = report["part_a"]
    small, big, ratios = a["baseline"], a["fleet"], a["ratios"]
    lines = [
        f"Part A: a fleet of {big['devices']} agents vs {small['devices']} (baseline), "
        f"{big['rounds_requested']} train rounds each, every device selected, {os.cpu_count()} cores, "
        f"data: {sorted(set(big['data_source'].values()))}",
        f"(machine busy before the run, other load: {num(report.get('machine_busy_before'), '.0%')})",
        f"{'':44} {small['devices']:>10} {big['devices']:>10} {'ratio':>7}",
    ]

    def row(name: str, x: str, y: str, r: float | None) -> None:
        lines.append(f"{name:44} {x:>10} {y:>10} {num(r):>7}")

    row(
        "rounds completed (of requested)",
        f"{small['rounds_completed']}/{small['rounds_requested']}",
        f"{big['rounds_completed']}/{big['rounds_requested']}",
        None,
    )
    row(
        "start-up, all agents online (s)",
        num(small["startup_s"], ".1f"),
        num(big["startup_s"], ".1f"),
        ratios["startup_s"],
    )
    mr_s, mr_b = small["moments_round"] or {}, big["moments_round"] or {}
    row(
        "moments round wall (s)",
        num(mr_s.get("wall_s"), ".1f"),
        num(mr_b.get("wall_s"), ".1f"),
        ratio(mr_b.get("wall_s"), mr_s.get("wall_s")),
    )
    row(
        "train round wall, median (s)",
        num(small["round_wall_s_median"], ".1f"),
        num(big["round_wall_s_median"], ".1f"),
        ratios["round_wall_s_median"],
    )
    row(
        "train round wall, max (s)",
        num(max(small["round_wall_s"]), ".1f"),
        num(max(big["round_wall_s"]), ".1f"),
        ratio(max(big["round_wall_s"]), max(small["round_wall_s"])),
    )
    row(
        "machine busy in train rounds (of all cores)",
        num(small["machine_busy_in_rounds"], ".0%"),
        num(big["machine_busy_in_rounds"], ".0%"),
        None,
    )
    row(
        "  of which this run's processes",
        num(small["ours_cpu_share_of_machine_in_rounds"], ".0%"),
        num(big["ours_cpu_share_of_machine_in_rounds"], ".0%"),
        None,
    )
    row(
        "agent CPU-s per train round, median",
        num(small["agent_cpu_s_per_round"]["median"]),
        num(big["agent_cpu_s_per_round"]["median"]),
        ratios["agent_cpu_s_per_round_median"],
    )
    row(
        "agent CPU-s per train round, max",
        num(small["agent_cpu_s_per_round"]["max"]),
        num(big["agent_cpu_s_per_round"]["max"]),
        None,
    )
    row(
        "agent CPU-s to start (until online), median",
        num(small["agent_cpu_s_startup"]["median"]),
        num(big["agent_cpu_s_startup"]["median"]),
        None,
    )
    if big.get("edgex_feed"):
        row(
            "EdgeX feed until every agent stored its data (s)",
            num(small["edgex_feed_s"], ".1f"),
            num(big["edgex_feed_s"], ".1f"),
            ratio(big["edgex_feed_s"], small["edgex_feed_s"]),
        )
    row(
        "agent CPU-s, online to round 1 (data, moments)",
        num(small["agent_cpu_s_online_to_round1"]["median"]),
        num(big["agent_cpu_s_online_to_round1"]["median"]),
        None,
    )
    row(
        "until round 1: start, data, moments round (s)",
        num(small["until_round1_s"], ".1f"),
        num(big["until_round1_s"], ".1f"),
        ratio(big["until_round1_s"], small["until_round1_s"]),
    )
    row(
        "agent peak RSS, median (MiB)",
        mib(small["agent_peak_rss_bytes"]["median"]),
        mib(big["agent_peak_rss_bytes"]["median"]),
        ratios["agent_peak_rss_median"],
    )
    row(
        "agent peak RSS, max (MiB)",
        mib(small["agent_peak_rss_bytes"]["max"]),
        mib(big["agent_peak_rss_bytes"]["max"]),
        None,
    )
    row(
        "agent peak RssAnon (own memory), median (MiB)",
        mib(small["agent_peak_rss_anon_bytes"]["median"]),
        mib(big["agent_peak_rss_anon_bytes"]["median"]),
        None,
    )
    row(
        "agent VmHWM, max (MiB)",
        mib(small["agent_vm_hwm_bytes"]["max"]),
        mib(big["agent_vm_hwm_bytes"]["max"]),
        None,
    )
    row(
        "agent peak PSS, median (MiB)",
        mib(small["agent_peak_pss_bytes"]["median"]),
        mib(big["agent_peak_pss_bytes"]["median"]),
        ratios["agent_peak_pss_median"],
    )
    row(
        "all agents: RSS sum, peak (MiB)",
        mib(small["fleet_rss_peak_bytes"]),
        mib(big["fleet_rss_peak_bytes"]),
        None,
    )
    row(
        "all agents: PSS sum, peak (MiB)",
        mib(small["fleet_pss_peak_bytes"]),
        mib(big["fleet_pss_peak_bytes"]),
        None,
    )
    row(
        "aggregator peak RSS (MiB)",
        mib(small["aggregator"]["peak_rss_bytes"]),
        mib(big["aggregator"]["peak_rss_bytes"]),
        ratios["aggregator_peak_rss"],
    )
    row(
        "aggregator CPU-s per train round",
        num(small["aggregator"]["cpu_s_per_round"]),
        num(big["aggregator"]["cpu_s_per_round"]),
        ratios["aggregator_cpu_s_per_round"],
    )
    row(
        "broker peak RSS (MiB)",
        mib(small["broker"]["peak_rss_bytes"]),
        mib(big["broker"]["peak_rss_bytes"]),
        ratios["broker_peak_rss"],
    )
    row(
        "broker CPU-s per train round",
        num(small["broker"]["cpu_s_per_round"]),
        num(big["broker"]["cpu_s_per_round"]),
        ratios["broker_cpu_s_per_round"],
    )
    lines.append(f"{big['devices']}-agent rounds (s): " + ", ".join(f"{w:.1f}" for w in big["round_wall_s"]))
    lines += ["", *board_lines(report["part_b"], "Part B")]
    if "part_b_direct" in report:
        lines += ["", *board_lines(report["part_b_direct"], "Part B'")]
    lines.append("")
    lines.append("checks: " + ("all passed" if not report["failures"] else "; ".join(report["failures"])))
    for t in report["targets"]:
        lines.append(f"target: {t['what']}: {'met' if t['met'] else 'MISSED'} ({t['detail']})")
    lines.append(f"took {report['wall_s']:.0f} s; logs in {report['work_dir']}")
    return "\n".join(lines)


def board_lines(b: dict[str, Any], title: str) -> list[str]:
    """Part B's table: the board's agent against its unconstrained twin."""
    board = b["board"]
    agent, base = board["agent"], board["baseline"]
    c = board["counters"] or {}
    cpu_stat = c.get("cpu_stat", {})
    oom = c.get("oom_control", {})
    lines = [
        f"{title}: {board['device']} ({b['data_source'][board['device']]} data) under a board's budget "
        f"(cgroup v{board['cgroup_version']}: "
        f"{BOARD_MEMORY_BYTES // MIB} MiB, 1 CPU) in a fleet of {b['devices']}; "
        f"baseline {board['baseline_device']} (same subject and data path, no limit)",
        f"{'':44} {'board':>10} {'baseline':>10}",
    ]

    def row_b(name: str, x: str, y: str) -> None:
        lines.append(f"{name:44} {x:>10} {y:>10}")

    rr = b["rounds_requested"]
    row_b("alive at the end", str(board["alive_at_end"]), "True")
    row_b(
        f"train rounds contributed (of {rr})",
        str(agent["train_rounds_contributed"]),
        str(base["train_rounds_contributed"]),
    )
    row_b("peak RSS, /proc VmRSS sampled (MiB)", mib(agent["peak_rss_bytes"]), mib(base["peak_rss_bytes"]))
    row_b("peak RSS, /proc VmHWM (MiB)", mib(agent["vm_hwm_bytes"]), mib(base["vm_hwm_bytes"]))
    row_b("peak PSS (MiB)", mib(agent["peak_pss_bytes"]), mib(base["peak_pss_bytes"]))
    row_b(
        "peak RssAnon / RssFile (MiB)",
        f"{mib(agent['peak_rss_anon_bytes'])}/{mib(agent['peak_rss_file_bytes'])}",
        f"{mib(base['peak_rss_anon_bytes'])}/{mib(base['peak_rss_file_bytes'])}",
    )
    am, bm = board["agent_metrics"] or {}, board["baseline_metrics"] or {}
    row_b(
        "own report: process_resident_memory peak (MiB)",
        mib(am.get("peak_resident_memory_bytes")),
        mib(bm.get("peak_resident_memory_bytes")),
    )
    row_b(
        "own report: process_cpu_seconds_total",
        num(am.get("last", {}).get("process_cpu_seconds_total")),
        num(bm.get("last", {}).get("process_cpu_seconds_total")),
    )
    row_b(
        "own report: trainings (training_seconds_count)",
        num(am.get("last", {}).get("fedge_agent_training_seconds_count"), ".0f"),
        num(bm.get("last", {}).get("fedge_agent_training_seconds_count"), ".0f"),
    )
    row_b("cgroup memory peak (max_usage / peak, MiB)", mib(c.get("memory_peak_bytes")), "-")
    ms = c.get("memory_stat", {})
    row_b(
        "cgroup memory at end: anon rss / cache (MiB)",
        f"{mib(ms.get('total_rss'))}/{mib(ms.get('total_cache'))}",
        "-",
    )
    row_b("cgroup failcnt: memory / memory+swap", f"{c.get('memory_failcnt')}/{c.get('memsw_failcnt')}", "-")
    row_b("cgroup OOM: under_oom / oom_kill", f"{oom.get('under_oom')}/{oom.get('oom_kill')}", "-")
    row_b("CPU-s per train round", num(agent["cpu_s_per_round"]), num(base["cpu_s_per_round"]))
    if b.get("edgex_feed"):
        row_b(
            "CPU-s to ingest the EdgeX feed",
            num(agent["cpu_s_edgex_ingest"]),
            num(base["cpu_s_edgex_ingest"]),
        )
    row_b(
        "CPU-s before round 1 (start, data, moments)",
        num(agent["cpu_s_until_round1"]),
        num(base["cpu_s_until_round1"]),
    )
    periods = cpu_stat.get("nr_periods")
    row_b("cpu throttled periods (of periods)", f"{cpu_stat.get('nr_throttled')}/{periods}", "-")
    throttled = cpu_stat.get("throttled_time", cpu_stat.get("throttled_usec"))
    unit = 1e9 if "throttled_time" in cpu_stat else 1e6
    row_b("cpu throttled time (s)", num(throttled / unit if throttled is not None else None), "-")
    row_b("fleet train round wall, median (s)", num(b["round_wall_s_median"], ".1f"), "")
    feed = b.get("edgex_feed")
    if feed:
        lines.append(
            f"EdgeX feed: subjects {feed['subjects']}, {feed['events']} events ({feed['readings']} readings) "
            f"published in {feed['publish_s']:.1f} s, all samples stored after {feed['stored_s']:.1f} s"
        )
    lines.append(
        "the agent's MQTT status reports its usage: "
        + (
            "yes, keys " + ", ".join(board["mqtt_status_usage_keys"])
            if board["mqtt_status_reports_usage"]
            else "no (no RSS/CPU key in fedge/v1/<fleet>/status/<device>; "
            "only [metrics] serves process_* metrics)"
        )
    )
    return lines


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    a, b = report["part_a"], report["part_b"]
    big = a["fleet"]
    board = b["board"]
    out = [
        {
            "what": f"{big['devices']} agents train every round",
            "met": big["rounds_completed"] == big["rounds_requested"]
            and all(r["reported"] == big["devices"] for r in big["rounds"])
            and not big["rounds_retried"],
            "detail": f"{big['rounds_completed']}/{big['rounds_requested']} rounds, reported "
            + ", ".join(f"{r['reported']}/{r['selected']}" for r in big["rounds"])
            + (f"; retried {big['rounds_retried']}" if big["rounds_retried"] else ""),
        },
        {
            "what": "the board agent keeps training under 128 MiB and 1 CPU",
            "met": bool(board["alive_at_end"])
            and board["agent"]["train_rounds_contributed"] == b["rounds_requested"]
            and not (board["counters"] or {}).get("oom_control", {}).get("oom_kill"),
            "detail": f"alive {board['alive_at_end']}, contributed to "
            f"{board['agent']['train_rounds_contributed']}/{b['rounds_requested']} rounds, oom_kill "
            f"{(board['counters'] or {}).get('oom_control', {}).get('oom_kill')}",
        },
        {
            "what": "the agent reports its usage",
            "met": bool(board["mqtt_status_reports_usage"])
            or bool((board["agent_metrics"] or {}).get("peak_resident_memory_bytes")),
            "detail": "MQTT status: "
            + ("yes" if board["mqtt_status_reports_usage"] else "no usage keys")
            + "; [metrics] endpoint: "
            + (
                "process_resident_memory_bytes and process_cpu_seconds_total"
                if (board["agent_metrics"] or {}).get("peak_resident_memory_bytes")
                else "nothing scraped"
            ),
        },
    ]
    if "part_b_direct" in report:
        direct = report["part_b_direct"]["board"]
        oom_kill = (direct["counters"] or {}).get("oom_control", {}).get("oom_kill")
        out.append(
            {
                "what": "the board agent with the lab's direct data source (har-watch via seglearn) keeps "
                "training under 128 MiB",
                "met": bool(direct["alive_at_end"]) and direct["agent"]["train_rounds_contributed"] >= 1,
                "detail": f"alive {direct['alive_at_end']}, contributed to "
                f"{direct['agent']['train_rounds_contributed']}/1 rounds, oom_kill {oom_kill}, "
                f"unconstrained twin's VmHWM {mib(direct['baseline']['vm_hwm_bytes'])} MiB",
            }
        )
    return out


def plot(path: Path, report: dict[str, Any]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed in this venv: no plot", flush=True)
        return False
    a, b = report["part_a"], report["part_b"]
    small, big = a["baseline"], a["fleet"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    for s in (small, big):
        ax.plot(
            range(1, len(s["round_wall_s"]) + 1),
            s["round_wall_s"],
            marker="o",
            label=f"{s['devices']} agents",
        )
    ax.set_xlabel("train round")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("wall time (s)")
    ax.set_title("round wall time")
    ax.legend()
    ax = axes[0][1]
    data = [
        [v["cpu_s_per_round"] for v in small["agents"].values()],
        [v["cpu_s_per_round"] for v in big["agents"].values()],
    ]
    ax.boxplot(data)
    ax.set_xticks([1, 2], [f"{small['devices']} agents", f"{big['devices']} agents"])
    ax.set_ylabel("CPU-s per agent per train round")
    ax.set_title("agent CPU per round")
    ax = axes[1][0]
    data = [
        [v["peak_rss_bytes"] / MIB for v in small["agents"].values()],
        [v["peak_rss_bytes"] / MIB for v in big["agents"].values()],
        [v["peak_pss_bytes"] / MIB for v in big["agents"].values() if v["peak_pss_bytes"]],
    ]
    ax.boxplot(data)
    ax.set_xticks([1, 2, 3], [f"RSS, {small['devices']}", f"RSS, {big['devices']}", f"PSS, {big['devices']}"])
    ax.axhline(BOARD_MEMORY_BYTES / MIB, color="red", linestyle="--", label="board budget 128 MiB")
    ax.set_ylabel("peak per agent (MiB)")
    ax.set_title("agent memory")
    ax.legend()
    ax = axes[1][1]
    series = b["board"].get("series", {})
    for name, points in series.items():
        if points:
            t0 = points[0][0]
            ax.plot([p[0] - t0 for p in points], [p[1] / MIB for p in points], label=name)
    if "part_b_direct" in report:
        for name, points in report["part_b_direct"]["board"].get("series", {}).items():
            if points and "VmRSS" in name:
                t0 = points[0][0]
                label = f"B' {name} (har-watch source)"
                ax.plot([p[0] - t0 for p in points], [p[1] / MIB for p in points], linestyle=":", label=label)
    ax.axhline(BOARD_MEMORY_BYTES / MIB, color="red", linestyle="--", label="limit")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("MiB")
    ax.set_title(f"board agent {b['board']['device']} vs baseline {b['board']['baseline_device']}")
    ax.legend(fontsize=8)
    fig.suptitle(
        f"fedge: {big['devices']} agents on {os.cpu_count()} cores, and one agent in 128 MiB / 1 CPU"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --- main ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    devices: int
    baseline_devices: int
    board_fleet: int
    rounds: int
    round_timeout_s: float
    out: Path
    keep: bool
    skip_direct_board: bool
    data: str


def parse_args(argv: Sequence[str] | None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--devices", type=int, default=None, help="the big fleet (default 50; --quick 10)")
    p.add_argument(
        "--baseline-devices", type=int, default=None, help="the baseline fleet (default 7; --quick 3)"
    )
    p.add_argument(
        "--board-fleet",
        type=int,
        default=None,
        help="Part B's fleet, the board's twin included (default 8; --quick 4)",
    )
    p.add_argument("--rounds", type=int, default=None, help="train rounds per fleet (default 10; --quick 2)")
    p.add_argument("--round-timeout", type=float, default=300.0, help="round_timeout_s (default 300)")
    p.add_argument("--quick", action="store_true", help="a short smoke run")
    p.add_argument("--out", type=Path, default=None, help=f"the JSON report (default {DEFAULT_OUT})")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs) after a good run")
    p.add_argument(
        "--data",
        choices=["direct", "edgex"],
        default="direct",
        help="Part A's data path: direct (default; each agent reads its subject from the data set, as "
        "bench_vs_flower does) or edgex (a simulated EdgeX device service feeds every agent, as a board "
        "gets its readings; slower to start)",
    )
    p.add_argument(
        "--skip-direct-board",
        action="store_true",
        help="leave out Part B' (the budget with the lab's direct data source)",
    )
    a = p.parse_args(argv)
    quick = bool(a.quick)
    out = a.out or (DEFAULT_OUT.with_name("fleet_budget-quick.json") if quick else DEFAULT_OUT)
    cfg = Config(
        devices=a.devices or (10 if quick else 50),
        baseline_devices=a.baseline_devices or (3 if quick else 7),
        board_fleet=a.board_fleet or (4 if quick else 8),
        rounds=a.rounds or (2 if quick else 10),
        round_timeout_s=a.round_timeout,
        out=out,
        keep=a.keep,
        skip_direct_board=a.skip_direct_board,
        data=a.data,
    )
    if cfg.board_fleet < 2:
        p.error("--board-fleet must be at least 2 (the board and its baseline)")
    if min(cfg.devices, cfg.baseline_devices) < 1 or cfg.rounds < 1:
        p.error("--devices, --baseline-devices and --rounds must be at least 1")
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    if sys.platform != "linux":
        print("this benchmark reads /proc and cgroups: Linux only", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("Part B makes cgroups: run as root", file=sys.stderr)
        return 2
    from fedge.lab.broker import find_mosquitto

    if find_mosquitto() is None:
        print("mosquitto is not installed (apt-get install mosquitto)", file=sys.stderr)
        return 2
    started = time.time()

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # the finally blocks stop every process we started

    signal.signal(signal.SIGTERM, stop)
    work = Path(tempfile.mkdtemp(prefix="fedge-fleet-budget-"))
    print(f"work directory (logs): {work}", flush=True)
    failures: list[str] = []
    report: dict[str, Any] = {
        "benchmark": "fleet_budget",
        "issue": 16,
        "date": datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {
            "devices": cfg.devices,
            "baseline_devices": cfg.baseline_devices,
            "board_fleet": cfg.board_fleet,
            "rounds": cfg.rounds,
            "round_timeout_s": cfg.round_timeout_s,
            "task": str(TASK.relative_to(ROOT)),
            "data": f"Part A: {cfg.data}; har-watch, device watch-NN = subject (NN-1) % 7 + 1",
            "server_learning_rate": 2.0,
            "codec": "fp32",
            "broker": "mosquitto, anonymous plain MQTT on loopback, persistence off",
            "sample_interval_s": SAMPLE_INTERVAL_S,
            "board_memory_bytes": BOARD_MEMORY_BYTES,
            "board_cpu_quota_us": BOARD_CPU_QUOTA_US,
            "board_cpu_period_us": BOARD_CPU_PERIOD_US,
        },
        "work_dir": str(work),
    }
    code = 0
    try:
        b0, t0 = machine_cpu()
        time.sleep(3.0)
        b1, t1 = machine_cpu()
        report["machine_busy_before"] = (b1 - b0) / (t1 - t0) if t1 > t0 else None
        print(f"machine busy before the run (other load): {report['machine_busy_before']:.0%}", flush=True)
        print("building the model (TensorFlow, once)...", flush=True)
        model_dir = work / "model"
        build_model(TASK, model_dir)

        def edgex(n: int) -> tuple[str, ...]:
            return tuple(subjects_for(FleetSpec("", n, 0, 0.0))) if cfg.data == "edgex" else ()

        specs = [
            FleetSpec(
                f"fleet-{cfg.baseline_devices}",
                cfg.baseline_devices,
                cfg.rounds,
                cfg.round_timeout_s,
                edgex_devices=edgex(cfg.baseline_devices),
            ),
            FleetSpec(
                f"fleet-{cfg.devices}",
                cfg.devices,
                cfg.rounds,
                cfg.round_timeout_s,
                edgex_devices=edgex(cfg.devices),
            ),
        ]
        results = []
        for spec in specs:
            print(f"Part A: {spec.devices} agents, {spec.rounds} rounds...", flush=True)
            t = time.time()
            results.append(run_fleet(spec, model_dir, work))
            print(f"  done in {time.time() - t:.0f} s", flush=True)
        report["part_a"] = {"baseline": results[0], "fleet": results[1], "ratios": part_a_ratios(*results)}
        board_spec = FleetSpec(
            f"board-{cfg.board_fleet}",
            cfg.board_fleet,
            cfg.rounds,
            cfg.round_timeout_s,
            board_device="watch-01",
            metrics_devices=("watch-01", f"watch-{cfg.board_fleet:02d}"),
            twin_of_board=f"watch-{cfg.board_fleet:02d}",
            min_devices=cfg.board_fleet - 1,  # if the board's agent dies, the others go on
            edgex_devices=("watch-01", f"watch-{cfg.board_fleet:02d}"),
        )
        print(
            f"Part B: watch-01 (EdgeX-fed) under 128 MiB / 1 CPU in a fleet of {cfg.board_fleet}...",
            flush=True,
        )
        t = time.time()
        report["part_b"] = run_fleet(board_spec, model_dir, work)
        print(f"  done in {time.time() - t:.0f} s", flush=True)
        if not cfg.skip_direct_board:
            # The same budget with the lab's data source ([data] source = "har-watch", what Part A's
            # agents use): it imports seglearn (pandas, scipy, scikit-learn) to read the data set.
            direct_spec = FleetSpec(
                "board-direct-2",
                2,
                1,
                DIRECT_BOARD_TIMEOUT_S,
                board_device="watch-01",
                metrics_devices=("watch-01", "watch-02"),
                twin_of_board="watch-02",
                min_devices=1,
            )
            print("Part B': the same budget with the lab's direct data source, 1 round...", flush=True)
            t = time.time()
            report["part_b_direct"] = run_fleet(direct_spec, model_dir, work)
            print(f"  done in {time.time() - t:.0f} s", flush=True)
    except BenchError as exc:
        failures.append(str(exc))
        code = 1
    except (Exception, KeyboardInterrupt):
        failures.append(traceback.format_exc())
        code = 1
    report["wall_s"] = time.time() - started
    report["failures"] = failures
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    if code == 0:
        report["targets"] = targets(report)
        print()
        print(render(report))
        cfg.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        png = cfg.out.with_suffix(".png")
        if plot(png, report):
            print(f"plot: {png}")
        print(f"report: {cfg.out}")
        if not cfg.keep:
            shutil.rmtree(work, ignore_errors=True)
    else:
        failed = cfg.out.with_name(cfg.out.stem + "-failed.json")
        failed.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print("FAILED:\n" + "\n".join(failures), file=sys.stderr)
        print(f"partial report: {failed}; logs kept in {work}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
