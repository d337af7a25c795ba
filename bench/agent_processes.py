"""The fleet's processes as the agent benchmarks run and read them, in one place.

``bench_fleet_budget.py``, ``bench_agent_budget.py`` and ``bench_agent_memory.py`` all start real
``fedge`` processes (agents, the aggregator) and read them from /proc; they share this module so
that a process is spawned, sampled and stopped the same way in each, and a fix reaches all three:

- spawning: ``fedge_argv`` (``python -m fedge.cli``), ``child_env``, ``spawn`` (its own session,
  output to a log, extra environment such as ``NOTIFY_SOCKET``), ``terminate``;
- readiness as systemd reads it: ``NotifyListener`` (one ``NOTIFY_SOCKET`` per agent) and
  ``wait_ready``; ``wait_for_exit`` for the aggregator's rounds;
- /proc: ``proc_stat``, ``proc_status``, ``proc_cpu_s``, ``proc_pss``, ``thread_names``,
  ``smaps_mappings`` (resident bytes by mapping), ``machine_cpu``, and the ``Sampler`` thread
  that records each traced process's CPU and RSS;
- the locked-down fleet ``fedge demo`` stands up (``provision_locked``, ``observer_for``), the
  model (``build_model``), the bytecode (``precompile_fedge``) and the fresh-interpreter probes
  (``RSS_SOURCE``, ``run_probe``).
"""

from __future__ import annotations

import itertools
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
TICK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A validity check failed: the run's numbers cannot be trusted."""


# --- spawning ---------------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KUBERNETES_SERVICE_HOST",)}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    return env


def spawn(argv: list[str], log: Path, extra_env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``argv`` in its own session (``terminate`` signals it alone), its output appended to
    ``log``, with ``child_env`` and ``extra_env`` (an agent's ``NOTIFY_SOCKET``)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = child_env()
    env.update(extra_env or {})
    with log.open("ab") as f:
        return subprocess.Popen(
            argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
        )


def fedge_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedge.cli", *args]


def terminate(procs: dict[str, subprocess.Popen[bytes]], timeout: float = 20.0) -> None:
    """The demo's shutdown (SIGTERM, SIGKILL after ``timeout``), with more time: agents that
    stored a backlog flush before they exit."""
    from fedge.lab.demo import terminate_processes

    terminate_processes(procs, timeout)


def wait_for_exit(
    procs: dict[str, subprocess.Popen[bytes]],
    name: str,
    timeout_s: float,
    logs: Path,
    prefix: str = "",
    ignore: Collection[str] = (),
    poll_s: float = 0.2,
) -> None:
    """Waits for ``procs[name]`` (the aggregator, once its rounds are done) to exit 0; any other
    process exiting meanwhile (but those in ``ignore``), the deadline passing or a non-zero exit
    is a ``BenchError`` (``prefix`` names the run in it)."""
    deadline = time.monotonic() + timeout_s
    proc = procs[name]
    while proc.poll() is None:
        if time.monotonic() > deadline:
            raise BenchError(f"{prefix}the {name} did not finish in time; see {logs}")
        dead = [d for d, p in procs.items() if p.poll() is not None and d not in ignore]
        if dead:
            raise BenchError(f"{prefix}{dead} exited during the rounds; see {logs}")
        time.sleep(poll_s)
    if proc.returncode != 0:
        raise BenchError(f"{prefix}the {name} exited with {proc.returncode}; see {logs}")


# --- systemd-style readiness ------------------------------------------------------------------


class NotifyListener(threading.Thread):
    """One ``NOTIFY_SOCKET`` per agent (a datagram socket, as systemd binds for a Type=notify
    unit): the time of each agent's ``READY=1`` and its last ``STATUS=``."""

    def __init__(self, directory: Path, devices: Sequence[str]) -> None:
        super().__init__(daemon=True, name="notify")
        self.sockets: dict[str, socket.socket] = {}
        self.paths: dict[str, str] = {}
        for device in devices:
            path = str(directory / f"{device}.notify")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.bind(path)
            self.sockets[device], self.paths[device] = s, path
        self.ready_at: dict[str, float] = {}
        self.last_status: dict[str, str] = {}
        self.messages: dict[str, int] = dict.fromkeys(devices, 0)
        self.stop_event = threading.Event()

    def run(self) -> None:
        by_fd = {s.fileno(): d for d, s in self.sockets.items()}
        while not self.stop_event.is_set():
            readable, _, _ = select.select(list(self.sockets.values()), [], [], 0.5)
            now = time.time()
            for s in readable:
                device = by_fd[s.fileno()]
                text = s.recv(65536).decode(errors="replace")
                self.messages[device] += 1
                for line in text.splitlines():
                    if line == "READY=1":
                        self.ready_at.setdefault(device, now)
                    elif line.startswith("STATUS="):
                        self.last_status[device] = line[7:]

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)
        for s in self.sockets.values():
            s.close()


def wait_ready(
    notify: NotifyListener,
    procs: dict[str, subprocess.Popen[bytes]],
    devices: Collection[str],
    timeout_s: float,
    logs: Path,
) -> None:
    """Waits for every device's ``READY=1``; an agent exiting first, or the deadline, is a
    ``BenchError``."""
    until = time.monotonic() + timeout_s
    while set(notify.ready_at) != set(devices):
        dead = [d for d, p in procs.items() if p.poll() is not None]
        if dead or time.monotonic() > until:
            missing = sorted(set(devices) - set(notify.ready_at))
            raise BenchError(f"agents {missing} sent no READY=1 (exited: {dead}); see {logs}")
        time.sleep(0.05)


# --- /proc ------------------------------------------------------------------------------------


def proc_stat(pid: int) -> tuple[float, int] | None:
    """(utime + stime in seconds, start time in ticks), or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # fields[0] is field 3 (state): utime 14, stime 15, starttime 22
    return (int(fields[11]) + int(fields[12])) / TICK, int(fields[19])


def proc_cpu_s(pid: int) -> float:
    """The process's CPU seconds so far (utime + stime); OSError if it is gone."""
    st = proc_stat(pid)
    if st is None:
        raise OSError(f"process {pid} is gone")
    return st[0]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem (bytes) and Threads from /proc/<pid>/status
    ({} if gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0]) * 1024
                elif key == "Threads":
                    out[key] = int(value)
    except (OSError, ValueError):
        return {}
    return out


def proc_pss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def thread_names(pid: int) -> list[str]:
    """Each thread's kernel name (``comm``), by thread id."""
    names = []
    for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
        try:
            names.append(Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip())
        except OSError:
            continue
    return names


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat's cpu line."""
    with open("/proc/stat", encoding="ascii") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return float(sum(values[:8]) - idle), float(sum(values[:8]))


def smaps_mappings(pid: int, split_stacks: bool = True) -> tuple[dict[str, int], dict[str, int]]:
    """Resident bytes by mapping name (a file's basename, ``[heap]``, ``[stack]``, ``anon``),
    largest first, and the thread stacks: anonymous 8 MiB mappings right after a 4 KiB no-access
    guard page, counted apart as "thread stacks" when ``split_stacks`` (else left in ``anon``).
    OSError if the process is gone."""
    by_name: dict[str, int] = {}
    stacks = {"count": 0, "rss_bytes": 0}
    current = "anon"
    prev_guard_end = -1
    cur_is_stack = False
    with open(f"/proc/{pid}/smaps", encoding="utf-8", errors="replace") as f:
        for line in f:
            head = line.split(None, 5)
            if len(head) >= 5 and "-" in head[0] and not line[0].isupper():
                start_s, end_s = head[0].split("-")
                cur_start, cur_end = int(start_s, 16), int(end_s, 16)
                path = head[5].strip() if len(head) > 5 else ""
                current = os.path.basename(path) if path.startswith("/") else (path or "anon")
                cur_is_stack = split_stacks and (
                    current == "anon" and cur_start == prev_guard_end and cur_end - cur_start == 8 * MIB
                )
                prev_guard_end = cur_end if (current == "anon" and head[1] == "---p") else -1
                if cur_is_stack:
                    stacks["count"] += 1
            elif line.startswith("Rss:"):
                kb = int(line.split()[1]) * 1024
                key = "thread stacks" if cur_is_stack else current
                by_name[key] = by_name.get(key, 0) + kb
                if cur_is_stack:
                    stacks["rss_bytes"] += kb
    return dict(sorted(by_name.items(), key=lambda kv: -kv[1])), stacks


@dataclass
class Trace:
    """One process: what it must look like, and what was read of it."""

    name: str
    pid: int
    must_contain: tuple[str, ...]  # words its command line must hold (checked once it exec'd)
    start: int | None = None  # /proc start time, once the command line matched
    samples: list[tuple[float, float, int]] = field(default_factory=list)  # t, cpu_s, rss
    pss: list[tuple[float, int]] = field(default_factory=list)
    peak_rss: int = 0
    hwm: int = 0
    peak_anon: int = 0  # RssAnon: the process's own memory (heap, stacks)
    peak_file: int = 0  # RssFile: mapped files (shared libraries), shared with other processes
    threads: int = 0
    children_seen: int = 0
    gone_at: float | None = None
    mismatch: str | None = None

    def cpu_at(self, t: float) -> float:
        """The CPU counter at time t (linear between the samples around it)."""
        s = self.samples
        if not s:
            return float("nan")
        if t <= s[0][0]:
            return s[0][1]
        for (t0, c0, _), (t1, c1, _) in itertools.pairwise(s):
            if t0 <= t <= t1:
                return c0 if t1 == t0 else c0 + (c1 - c0) * (t - t0) / (t1 - t0)
        return s[-1][1]

    def peak_rss_between(self, a: float, b: float) -> int:
        return max((rss for t, _, rss in self.samples if a <= t <= b), default=0)


class Sampler(threading.Thread):
    """Every ``interval_s``: each traced process's CPU, RSS (VmRSS), high-water mark and threads;
    every ``pss_every`` ticks its PSS; the machine's CPU counters. A process whose start time
    changes, or whose command line does not hold what it must, is marked (a validity failure)."""

    def __init__(self, interval_s: float = 0.25, pss_every: int = 8) -> None:
        super().__init__(daemon=True, name="sampler")
        self.interval_s, self.pss_every = interval_s, pss_every
        self.traces: dict[str, Trace] = {}
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.errors: list[str] = []
        self.machine: list[tuple[float, float, float]] = []  # t, busy, total
        self.ticks = 0
        self.extra: list[Callable[[float], None]] = []  # more readings each tick (cgroups)

    def add(self, name: str, pid: int, must_contain: Sequence[str]) -> None:
        with self.lock:
            self.traces[name] = Trace(name, pid, tuple(must_contain))

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                self.tick()
                self.stop_event.wait(self.interval_s)
            self.tick()
        except Exception:
            self.errors.append(traceback.format_exc())

    def tick(self) -> None:
        now = time.time()
        with self.lock:
            traces = list(self.traces.values())
        with_pss = self.ticks % self.pss_every == 0
        self.ticks += 1
        for tr in traces:
            if tr.gone_at is not None or tr.mismatch is not None:
                continue
            st = proc_stat(tr.pid)
            if st is None:
                tr.gone_at = now
                continue
            cpu, start = st
            if tr.start is None:
                argv = cmdline(tr.pid)
                if not all(w in argv for w in tr.must_contain):
                    continue  # not exec'd yet (the board's wrapper shell): read it again next tick
                tr.start = start
            elif start != tr.start:
                tr.mismatch = f"pid {tr.pid} is another process now (start time {start} != {tr.start})"
                continue
            status = proc_status(tr.pid)
            if "VmRSS" not in status:
                tr.gone_at = now
                continue
            rss = status["VmRSS"]
            tr.samples.append((now, cpu, rss))
            tr.peak_rss = max(tr.peak_rss, rss)
            tr.hwm = max(tr.hwm, status.get("VmHWM", 0))
            tr.peak_anon = max(tr.peak_anon, status.get("RssAnon", 0))
            tr.peak_file = max(tr.peak_file, status.get("RssFile", 0))
            tr.threads = max(tr.threads, status.get("Threads", 0))
            tr.children_seen = max(tr.children_seen, len(children_of(tr.pid)))
            if with_pss:
                pss = proc_pss(tr.pid)
                if pss is not None:
                    tr.pss.append((now, pss))
        busy, total = machine_cpu()
        self.machine.append((now, busy, total))
        for reading in self.extra:
            reading(now)

    def machine_busy(self, a: float, b: float) -> float | None:
        """The machine's busy fraction (all cores) between a and b."""
        before = [m for m in self.machine if m[0] <= a]
        after = [m for m in self.machine if m[0] >= b]
        if not before or not after:
            return None
        (_, b0, t0), (_, b1, t1) = before[-1], after[0]  # the samples around [a, b]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else None

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=15)


# --- the locked-down fleet (``fedge demo``'s default path) --------------------------------------


def provision_locked(
    root: Path,
    model_dir: Path,
    broker_url: str,
    creds: dict[str, dict[str, Any]],
    subjects: dict[str, int],
    rounds: dict[str, object],
    task_file: Path,
) -> Any:
    """``create_fleet`` as ``run_demo`` calls it for the broker ``fedge.lab.demo`` locked down
    (``_start_secure_broker``'s ``creds``): the EdgeX source with the wearable IMU profile, each
    agent on its own EdgeX-bus principal, every principal's password and the lab CA."""
    from fedge.lab import demo
    from fedge.lab.provision import create_fleet
    from fedge.tools import bundled
    from fedge.tools.broker_config import edgex_principal

    return create_fleet(
        root / "files",
        demo.FLEET,
        model_dir,
        broker_url,
        subjects,
        rounds=rounds,
        edgex={"prefix": "edgex", "profile": str(bundled.profiles_dir() / "wearable-imu.yaml")},
        task_file=task_file,
        mqtt_extra={
            name: {k: v for k, v in c.items() if k in ("username", "password", "ca_file")}
            for name, c in creds.items()
        },
        edgex_extra={
            d: {k: v for k, v in creds[edgex_principal(d)].items() if k in ("username", "password")}
            for d in subjects
        },
    )


def observer_for(fleet: Any, model_dir: Path, broker_url: str, creds: dict[str, Any], task: Any) -> Any:
    """The demo's ``FleetObserver`` of ``fleet`` (not started), scoring on the test subjects."""
    from fedge.lab import demo, har_watch
    from fedge.lab.observer import FleetObserver
    from fedge.protocol.mqtt_settings import parse_broker_url

    host, port, _ = parse_broker_url(broker_url)
    x_test, y_test = har_watch.pooled(har_watch.load_devices(task, har_watch.TEST_SUBJECTS).values())
    return FleetObserver(
        demo.FLEET,
        host,
        port,
        fleet.signing_key.verify_key,
        (model_dir / "model.tflite").read_bytes(),
        x_test,
        y_test,
        **demo._client_creds(creds.get("observer")),
    )


# --- the model and the bytecode ---------------------------------------------------------------


def build_model(task_file: Path, model_dir: Path) -> None:
    """``fedge model build`` in its own process (TensorFlow never loads into the bench's)."""
    built = subprocess.run(
        fedge_argv("model", "build", "--task", str(task_file), "--out", str(model_dir)),
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=ROOT,
        check=False,
        timeout=600,
    )
    if built.returncode != 0:
        raise BenchError(f"fedge model build failed ({built.returncode}):\n{built.stdout}{built.stderr}")


def precompile_fedge() -> None:
    """fedge's device-side modules compiled to bytecode, as a wheel install leaves them: this
    checkout may not have it (PYTHONDONTWRITEBYTECODE), and compiling ~100 modules at every start
    costs each agent ~2 MiB of RSS and CPU that a device never pays."""
    import compileall

    for part in ("agent", "protocol", "shell", "tools"):
        if not compileall.compile_dir(str(ROOT / part / "fedge"), quiet=1):
            raise BenchError(f"compileall failed under {part}/fedge")


# --- fresh-interpreter probes -------------------------------------------------------------------

#: ``rss()`` for a probe's source: the process's VmRSS in bytes.
RSS_SOURCE = r"""
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
"""


def run_probe(source: str, *args: str, what: str = "the probe") -> Any:
    """Runs ``source`` in a fresh interpreter (``python -c``, the checkout's environment) and
    returns the JSON of its last line; a failure is a ``BenchError`` with its stderr's end."""
    probe = subprocess.run(
        [sys.executable, "-c", source, *args],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=ROOT,
        check=False,
        timeout=300,
    )
    if probe.returncode != 0:
        raise BenchError(f"{what} failed:\n{probe.stderr[-2000:]}")
    return json.loads(probe.stdout.strip().splitlines()[-1])
