"""Where one agent's memory goes, phase by phase (issue 18: the whole agent at 53 MB or less).

``bench_agent_budget.py`` measures a fleet of agents (peak RSS, CPU); this benchmark takes one
real agent in service apart. The fleet is stood up as the budget benchmark (and ``fedge demo``)
stand it up: Mosquitto locked down as ``fedge broker config`` writes it (TLS, a password per
principal, ACLs), the real aggregator, the default task with ``[data] source = "edgex"``
(wearable IMU profile), provisioned by ``create_fleet``; the agent runs ``fedge agent run`` with a
``NOTIFY_SOCKET``. Its subject's recordings are replayed as EdgeX events (the backlog), then R
train rounds (default 3), then an idle phase with the live readings arriving.

Per phase (``imports``: a fresh interpreter after each import stage; ``connected``: READY and
idle, connected to the broker and the EdgeX bus; ``backlog``: the replay being ingested;
``round``: the rounds; ``after``: idle after the rounds), the snapshot with the highest RSS of
those taken every ``--every`` seconds:

- RSS split anonymous / file-backed / shmem (``/proc/<pid>/smaps_rollup``) and the top mappings
  by RSS (``/proc/<pid>/smaps``: which shared libraries, the heap, other anonymous mappings,
  thread stacks: 8 MiB anonymous mappings preceded by a guard page);
- from inside the agent (it runs under a small launcher, ``--as-agent``, that records SQLite
  connections as they open and answers SIGUSR1 with a JSON dump; nothing else changes):
  pymalloc's arenas (``sys._debugmallocstats``), glibc malloc (``mallinfo2``: in use, free in
  the arenas, mmapped), each SQLite connection's page cache (``sqlite3_db_status``
  ``CACHE_USED``) and SQLite's whole heap (``sqlite3_memory_used``), the modules loaded;
- threads (``/proc/<pid>/task``) and their names.

And, each in a fresh interpreter in the same run: the LiteRT interpreter's cost (imports, one
trainer built, one round of training, a second interpreter as insight builds it), the
training-only process and the floor (Python with numpy alone), reusing the budget benchmark's
``baselines`` (read-only use).

Usage: ``python bench/bench_agent_memory.py [--rounds 3] [--idle 10] [--every 1.0]
[--model-dir DIR] [--label after] [--out bench/results/agent_memory.json]``
(``make bench-agent-memory``). ``--label`` names the run in the JSON (``before``/``after``); an
existing report's other labels are kept, so two runs can be compared in one file.
"""

from __future__ import annotations

import os
import sys

# --- the launcher the agent runs under (kept light: it shares the agent's process) ----------

_DUMP_PATH_ENV = "FEDGE_MEMORY_DUMP"
_QUEUE_LIMIT_ENV = "FEDGE_MEMORY_INGEST_QUEUE"
_TRIM_ENV = "FEDGE_MEMORY_TRIM"


def _as_agent(argv: list[str]) -> int:
    """Runs ``fedge`` with ``argv`` after recording SQLite connections and installing a SIGUSR1
    handler that writes the process's allocator and cache figures to ``$FEDGE_MEMORY_DUMP``."""
    import signal
    import sqlite3

    # Strong references (a Connection takes no weak reference): a closed one is skipped (its
    # handle is NULL), and the object itself is a few hundred bytes.
    connections: list[sqlite3.Connection] = []
    real_connect = sqlite3.connect

    def connect(*args: object, **kwargs: object) -> sqlite3.Connection:
        conn = real_connect(*args, **kwargs)  # type: ignore[call-overload]
        connections.append(conn)
        return conn  # type: ignore[no-any-return]

    sqlite3.connect = connect  # type: ignore[assignment]

    trim = os.environ.get(_TRIM_ENV) == "1"

    def dump(_signum: int, _frame: object) -> None:
        if trim:  # an experiment (--trim): what glibc's malloc_trim would give back, at best
            import ctypes

            ctypes.CDLL(None).malloc_trim(0)
        try:
            data = _inside_figures(connections)
        except Exception as exc:  # a failed dump must not stop the agent
            data = {"error": repr(exc)}
        import json

        path = os.environ[_DUMP_PATH_ENV]
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(path + ".tmp", path)

    signal.signal(signal.SIGUSR1, dump)
    queue_limit = os.environ.get(_QUEUE_LIMIT_ENV)
    if queue_limit:  # an experiment (--ingest-queue): the EdgeX ingest queue's bound, in events
        # The ingest module imports numpy: what ``fedge agent run`` sets before numpy loads comes
        # first, as in the agent (it sets it again, to the same).
        from fedge.cli import prepare_agent_process

        prepare_agent_process()
        from fedge.agent.edgex import ingest

        ingest._QUEUE_LIMIT = int(queue_limit)
    from fedge.cli import main

    return main(argv)


def _inside_figures(connections: list[Any]) -> dict[str, object]:
    import ctypes
    import tempfile

    out: dict[str, object] = {"modules": len(sys.modules), "allocated_blocks": sys.getallocatedblocks()}
    # pymalloc: sys._debugmallocstats writes to C stderr; read it back through a temporary file.
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        try:
            sys.stderr.flush()
            os.dup2(tmp.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode(errors="replace")
    pymalloc: dict[str, int] = {}
    for line in text.splitlines():
        for key, label in (
            ("bytes in allocated blocks", "allocated_bytes"),
            ("bytes in available blocks", "free_in_pools_bytes"),
            ("bytes lost to pool headers", "pool_headers_bytes"),
            ("bytes lost to quantization", "quantization_bytes"),
            ("bytes lost to arena alignment", "arena_alignment_bytes"),
            ("arenas allocated current", "arenas_current"),
            ("arenas highwater mark", "arenas_highwater"),
        ):
            if line.startswith("# " + key) or line.startswith(key):
                with_value = line.replace(",", "").split("=")
                if len(with_value) == 2:
                    pymalloc[label] = int(with_value[1].strip())
    if "arenas_current" in pymalloc:
        pymalloc["arenas_bytes"] = pymalloc["arenas_current"] * 1024 * 1024  # 1 MiB arenas (3.11: 1 MiB)
    out["pymalloc"] = pymalloc

    class Mallinfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in (
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            )
        ]

    libc = ctypes.CDLL(None)
    if hasattr(libc, "mallinfo2"):
        libc.mallinfo2.restype = Mallinfo2
        mi = libc.mallinfo2()
        out["glibc_malloc"] = {
            "heap_arenas_bytes": mi.arena,
            "mmapped_bytes": mi.hblkhd,
            "mmapped_blocks": mi.hblks,
            "in_use_bytes": mi.uordblks,
            "free_bytes": mi.fordblks,
            "top_releasable_bytes": mi.keepcost,
        }
    import _sqlite3

    lib = ctypes.CDLL(_sqlite3.__file__)
    lib.sqlite3_memory_used.restype = ctypes.c_int64
    lib.sqlite3_memory_highwater.restype = ctypes.c_int64
    lib.sqlite3_db_filename.restype = ctypes.c_char_p
    lib.sqlite3_db_filename.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.sqlite3_db_status.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_int),
        ctypes.POINTER(ctypes.c_int),
        ctypes.c_int,
    ]
    conns = []
    for conn in connections:
        # CPython's pysqlite_Connection: PyObject_HEAD, then the sqlite3* handle.
        db = ctypes.c_void_p.from_address(id(conn) + 2 * ctypes.sizeof(ctypes.c_void_p)).value
        if not db:
            continue  # closed
        name = lib.sqlite3_db_filename(db, b"main")
        figures: dict[str, object] = {"file": os.path.basename((name or b"").decode() or ":memory:")}
        for code, label in ((1, "cache_used_bytes"), (2, "schema_used_bytes"), (3, "stmt_used_bytes")):
            cur, hi = ctypes.c_int(), ctypes.c_int()
            lib.sqlite3_db_status(db, code, ctypes.byref(cur), ctypes.byref(hi), 0)
            figures[label] = cur.value
        conns.append(figures)
    out["sqlite"] = {
        "memory_used_bytes": lib.sqlite3_memory_used(),
        "memory_highwater_bytes": lib.sqlite3_memory_highwater(0),
        "connections": conns,
    }
    return out


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--as-agent":
    sys.exit(_as_agent(sys.argv[2:]))


# --- the benchmark ----------------------------------------------------------------------------

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from datetime import datetime  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import agent_processes as ap  # type: ignore[import-not-found, unused-ignore]  # noqa: E402
import bench_agent_budget as bab  # type: ignore[import-not-found, unused-ignore]  # noqa: E402
import bench_fleet_budget as fb  # type: ignore[import-not-found, unused-ignore]  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "agent_memory.json"
TASK = ROOT / "tasks" / "har-watch.toml"
MIB = 1024 * 1024
PHASES = ("connected", "backlog", "round", "after")
TARGET_PEAK_RSS_BYTES = 53 * 1000 * 1000

#: Import stages of an agent (fresh interpreter, RSS after each), in the order ``agent run``
#: loads them.
STAGES = (
    "fedge.cli",
    "numpy",
    "ai_edge_litert.interpreter",
    "ssl",
    "paho.mqtt.client",
    "nacl.public",
    "fedge.agent.config",
    "fedge.agent.core",
    "fedge.agent.trainer",
    "fedge.agent.wiring",
    "fedge.agent.service",
)

#: A trainer in an agent-sized process: RSS after the agent's imports, LiteRT's import (an agent
#: loads it for its first round), one interpreter, one round of training, a second interpreter
#: (insight's), its predictions.
_LITERT_PROBE = (
    "import json, sys\nfrom pathlib import Path\n"
    + ap.RSS_SOURCE
    + r"""
import fedge.agent.service, fedge.agent.wiring  # the agent's imports
import numpy as np
from fedge.agent.trainer import LiteRTTrainer
rows = [("the agent's imports", rss())]
model_dir, data_dir, epochs = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
x, y = np.load(data_dir / "x.npy"), np.load(data_dir / "y.npy")
import ai_edge_litert.interpreter  # an agent imports LiteRT when it builds its first trainer
rows.append(("LiteRT imported", rss()))
t = LiteRTTrainer.from_dir(model_dir)
rows.append(("one interpreter built", rss()))
t.fit(x, y, epochs=epochs)
rows.append(("one round trained", rss()))
t.evaluate(x, y)
rows.append(("evaluated", rss()))
t2 = LiteRTTrainer.from_dir(model_dir)
t2.set_weights(t.get_weights())
rows.append(("second interpreter (insight)", rss()))
t2.predict(x[:1])
rows.append(("a prediction", rss()))
print(json.dumps(rows))
"""
)


# --- /proc --------------------------------------------------------------------------------------


def status_rss(pid: int) -> dict[str, int]:
    """VmRSS and its split (RssAnon, RssFile, RssShmem), VmHWM, threads from /proc/<pid>/status
    (OSError if the process is gone)."""
    names = {
        "VmRSS": "rss_bytes",
        "RssAnon": "anon_bytes",
        "RssFile": "file_bytes",
        "RssShmem": "shmem_bytes",
        "VmHWM": "hwm_bytes",
        "Threads": "threads",
    }
    status = ap.proc_status(pid)
    if not status:
        raise OSError(f"/proc/{pid}/status: the process is gone")
    return {names[k]: v for k, v in status.items()}


class Snapshots(threading.Thread):
    """Every 0.1 s the agent's RSS (peak per phase); every ``every`` s a full snapshot (smaps and
    the agent's own dump), keeping per phase the one with the highest RSS."""

    def __init__(self, pid: int, dump_path: Path, every: float) -> None:
        super().__init__(daemon=True, name="snapshots")
        self.pid, self.dump_path, self.every = pid, dump_path, every
        self.phase = "start"
        self.stop_event = threading.Event()
        self.peak: dict[str, dict[str, int]] = {}
        self.best: dict[str, dict[str, Any]] = {}
        self.series: list[tuple[float, str, int, int, int]] = []
        self.errors: list[str] = []
        self.cpu: dict[str, list[float]] = {}  # phase -> [first, last] CPU seconds read in it
        self.t0 = time.time()

    def full(self) -> dict[str, Any]:
        before = status_rss(self.pid)
        mappings, stacks = ap.smaps_mappings(self.pid)
        with_dump: dict[str, Any] = {}
        mtime = self.dump_path.stat().st_mtime_ns if self.dump_path.exists() else 0
        os.kill(self.pid, signal.SIGUSR1)
        until = time.monotonic() + 3.0
        while time.monotonic() < until:
            if self.dump_path.exists() and self.dump_path.stat().st_mtime_ns != mtime:
                with_dump = json.loads(self.dump_path.read_text())
                break
            time.sleep(0.02)
        return {
            "t": round(time.time() - self.t0, 2),
            **before,
            "top_mappings": {k: v for k, v in list(mappings.items())[:14]},
            "thread_stacks": stacks,
            "thread_names": ap.thread_names(self.pid),
            "inside": with_dump,
        }

    def take(self) -> None:
        phase = self.phase  # the phase the snapshot starts in (a dump can take a moment)
        snap = self.full()
        if phase in PHASES and snap["rss_bytes"] >= self.best.get(phase, {}).get("rss_bytes", -1):
            self.best[phase] = snap

    def run(self) -> None:
        next_full = time.monotonic()
        while not self.stop_event.is_set():
            try:
                s = status_rss(self.pid)
                phase = self.phase
                cpu = ap.proc_cpu_s(self.pid)
                self.cpu.setdefault(phase, [cpu, cpu])[1] = cpu
                self.series.append(
                    (round(time.time() - self.t0, 2), phase, s["rss_bytes"], s["anon_bytes"], s["file_bytes"])
                )
                p = self.peak.setdefault(
                    phase, {"rss_bytes": 0, "anon_bytes": 0, "file_bytes": 0, "threads": 0}
                )
                for k in p:
                    p[k] = max(p[k], s.get(k, 0))
                if time.monotonic() >= next_full and phase in PHASES:
                    self.take()
                    next_full = time.monotonic() + self.every
            except (OSError, ValueError) as exc:
                self.errors.append(repr(exc))
                return
            self.stop_event.wait(0.1)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=10)


# --- the run ------------------------------------------------------------------------------------


def run_agent(
    model_dir: Path, work: Path, rounds: int, idle_s: float, every: float, agent_env: dict[str, str]
) -> dict[str, Any]:
    from fedge.lab import demo, har_watch
    from fedge.protocol.task import parse_task_spec

    task = parse_task_spec(TASK.read_text(encoding="utf-8"))
    root = work / "fleet"
    logs = root / "logs"
    subjects = {har_watch.device_id(s): s for s in har_watch.TRAIN_SUBJECTS[:1]}
    device = next(iter(subjects))
    options = demo.DemoOptions(task=task, out=root, devices=1, rounds=rounds)
    broker, broker_url, creds = demo._start_secure_broker(root, list(subjects), model_dir)
    notify = ap.NotifyListener(work, list(subjects))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    live_stop = threading.Event()
    live_thread: threading.Thread | None = None
    observer: Any = None
    snaps: Snapshots | None = None
    marks: dict[str, float] = {}
    try:
        rounds_table: dict[str, object] = {
            "rounds": rounds,
            "min_devices": 1,
            "round_timeout_s": 120.0,
            "codec": "fp32",
            "server_learning_rate": 2.0,
            "wait_for_devices_s": 60.0,
        }
        fleet = ap.provision_locked(root, model_dir, broker_url, creds, subjects, rounds_table, TASK)
        observer = ap.observer_for(fleet, model_dir, broker_url, creds, task)
        observer.start()
        notify.start()
        dump_path = work / "agent-dump.json"
        argv = [sys.executable, str(Path(__file__).resolve()), "--as-agent", "agent", "run", "--config"]
        argv.append(str(fleet.agent_configs[device]))
        procs[device] = ap.spawn(
            argv,
            logs / f"{device}.log",
            {"NOTIFY_SOCKET": notify.paths[device], _DUMP_PATH_ENV: str(dump_path), **agent_env},
        )
        snaps = Snapshots(procs[device].pid, dump_path, every)
        snaps.start()
        ap.wait_ready(notify, procs, subjects, 120, logs)
        snaps.phase = "connected"
        time.sleep(max(3.0, 2 * every))
        snaps.take()
        snaps.phase = "backlog"
        print("  READY; replaying the EdgeX recordings (the backlog)...", flush=True)
        feed = bab.feed_recordings(options, observer, subjects, broker_url, procs, creds.get("simulator"))
        marks["stored_s"] = max(feed["stored_at"].values()) - feed["started"]
        snaps.phase = "between"
        live_thread = demo._start_live_stream(
            options,
            subjects,
            dict.fromkeys(subjects, max(feed["last_origin_ns"].values())),
            broker_url,
            5,
            creds.get("simulator"),
            live_stop,
        )
        time.sleep(2.0)
        snaps.phase = "round"
        print(f"  {feed['readings']:,} readings stored; {rounds} rounds...", flush=True)
        procs["aggregator"] = ap.spawn(
            ap.fedge_argv("aggregator", "run", "--config", str(fleet.aggregator_config)),
            logs / "aggregator.log",
        )
        ap.wait_for_exit(procs, "aggregator", 120 + (rounds + 2) * 120, logs)
        snaps.phase = "settle"
        time.sleep(bab.IDLE_SETTLE_S)
        snaps.phase = "after"
        print(f"  rounds done; {idle_s:.0f} s idle...", flush=True)
        time.sleep(idle_s)
        snaps.take()
        if procs[device].poll() is not None:
            raise ap.BenchError(f"the agent exited; see {logs}")
        rounds_done = fb.read_aggregator_log(logs / "aggregator.log")
        aggregated = sum(1 for r in rounds_done if r.phase == "train" and r.outcome == "aggregated")
        if aggregated < rounds:
            raise ap.BenchError(f"only {aggregated} of {rounds} train rounds aggregated; see {logs}")
    finally:
        if snaps is not None:
            snaps.stop()
        live_stop.set()
        if live_thread is not None:
            live_thread.join(timeout=10)
        ap.terminate(procs)
        notify.stop()
        if observer is not None:
            observer.stop()
        broker.stop()
    assert snaps is not None
    if snaps.errors:
        raise ap.BenchError("reading /proc failed: " + "; ".join(snaps.errors))
    return {
        "device": device,
        "readings": feed["readings_by_device"][device],
        "backlog_stored_s": marks["stored_s"],
        "peak_by_phase": snaps.peak,
        "cpu_s_by_phase": {k: round(v[1] - v[0], 3) for k, v in snaps.cpu.items()},
        "phases": snaps.best,
        "series": snaps.series,
    }


def import_stages() -> dict[str, Any]:
    data: dict[str, Any] = ap.run_probe(bab._STAGE_PROBE, "rss", *STAGES, what="the import probe")
    return data


def litert_costs(model_dir: Path, data_dir: Path, epochs: int) -> list[tuple[str, int]]:
    rows = ap.run_probe(_LITERT_PROBE, str(model_dir), str(data_dir), str(epochs), what="the LiteRT probe")
    return [tuple(r) for r in rows]


# --- report -------------------------------------------------------------------------------------


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / MIB:.1f}"


def render(run: dict[str, Any]) -> str:
    a = run["agent"]
    lines = [f"fedge: where one agent's memory goes ({run['label']}, {a['device']}, MiB)", ""]
    head = f"{'':38}" + "".join(f"{p:>11}" for p in ("imports", *PHASES))
    lines.append(head)
    stages = run.get("imports", {}).get("stages", [])
    last_import = stages[-1]["rss_bytes"] if stages else None
    snaps = a["phases"]

    def row(label: str, imports: float | None, get: Any) -> None:
        cells = [mib(imports)]
        for p in PHASES:
            s = snaps.get(p)
            try:
                cells.append(mib(get(s)) if s else "-")
            except (KeyError, TypeError):
                cells.append("-")
        lines.append(f"{label:38}" + "".join(f"{c:>11}" for c in cells))

    peak = a["peak_by_phase"]
    for label, imports, key in (
        ("peak RSS in the phase", mib(last_import), "rss_bytes"),
        ("  its anonymous peak", "", "anon_bytes"),
        ("  its file-backed peak", "", "file_bytes"),
    ):
        lines.append(
            f"{label:38}{imports:>11}" + "".join(f"{mib(peak.get(p, {}).get(key)):>11}" for p in PHASES)
        )
    cpu = a.get("cpu_s_by_phase", {})
    if cpu:  # (reports before the CPU was recorded have none)
        lines.append(
            f"{'CPU-s in the phase':38}{'':>11}" + "".join(f"{cpu.get(p, 0.0):>11.2f}" for p in PHASES)
        )
    lines.append("snapshot with the phase's highest RSS:")
    row("RSS", last_import, lambda s: s["rss_bytes"])
    row("  anonymous", None, lambda s: s["anon_bytes"])
    row("  file-backed", None, lambda s: s["file_bytes"])
    row("pymalloc arenas", None, lambda s: s["inside"]["pymalloc"]["arenas_bytes"])
    row("  of them in allocated blocks", None, lambda s: s["inside"]["pymalloc"]["allocated_bytes"])
    row("glibc malloc in use", None, lambda s: s["inside"]["glibc_malloc"]["in_use_bytes"])
    row("glibc malloc free (kept)", None, lambda s: s["inside"]["glibc_malloc"]["free_bytes"])
    row("glibc malloc mmapped", None, lambda s: s["inside"]["glibc_malloc"]["mmapped_bytes"])
    row("SQLite heap (all connections)", None, lambda s: s["inside"]["sqlite"]["memory_used_bytes"])
    row(
        "  page caches",
        None,
        lambda s: sum(c["cache_used_bytes"] for c in s["inside"]["sqlite"]["connections"]),
    )
    row("thread stacks (resident)", None, lambda s: s["thread_stacks"]["rss_bytes"])
    lines.append(
        f"{'threads':38}{'':>11}"
        + "".join(f"{len(snaps[p]['thread_names']) if p in snaps else '-':>11}" for p in PHASES)
    )
    lines.append(
        f"{'modules loaded':38}{stages[-1]['modules'] if stages else '-':>11}"
        + "".join(f"{snaps[p]['inside'].get('modules', '-') if p in snaps else '-':>11}" for p in PHASES)
    )
    top = snaps.get("round") or next(iter(snaps.values()))
    lines += ["", "top mappings by RSS in the round's snapshot:"]
    for k, v in top["top_mappings"].items():
        lines.append(f"  {k:50} {mib(v):>7}")
    lines.append(f"threads: {', '.join(top['thread_names'])}")
    conns = top["inside"].get("sqlite", {}).get("connections", [])
    lines.append(
        "SQLite connections: "
        + ", ".join(f"{c['file']} cache {c['cache_used_bytes'] / 1024:.0f} KiB" for c in conns)
    )
    lines += ["", "import stages (fresh interpreter, RSS after each):"]
    previous = 0
    for s in stages:
        lines.append(
            f"  {s['stage']:32} {mib(s['rss_bytes']):>7} (+{mib(s['rss_bytes'] - previous)}) "
            f"{s['modules']} modules"
        )
        previous = s["rss_bytes"]
    lines.append("LiteRT in an agent-sized process (fresh interpreter):")
    previous = 0
    for name, value in run.get("litert", []):
        lines.append(f"  {name:32} {mib(value):>7} (+{mib(value - previous) if previous else '-'})")
        previous = value
    if "baselines" in run:
        b = run["baselines"]
        lines.append(
            f"training-only process: peak {mib(b['training_only']['peak_rss_bytes'])}; "
            f"Python+numpy floor: peak {mib(b['floor_python_numpy']['peak_rss_bytes'])}"
        )
    lines += [
        f"whole agent peak: {mib(run['agent_peak_rss_bytes'])} MiB "
        f"({run['agent_peak_rss_bytes'] / 1e6:.1f} MB); "
        f"target 53 MB: {'met' if run['agent_peak_rss_bytes'] <= TARGET_PEAK_RSS_BYTES else 'missed'}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--idle", type=float, default=10.0)
    p.add_argument("--every", type=float, default=1.0, help="seconds between full snapshots (default 1)")
    p.add_argument("--model-dir", type=Path, default=None, help="a built model (default: fedge model build)")
    p.add_argument("--label", default="current", help="this run's name in the report (before, after, ...)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    p.add_argument(
        "--agent-env",
        action="append",
        default=[],
        metavar="K=V",
        help="an experiment: the agent's environment",
    )
    p.add_argument(
        "--ingest-queue", type=int, default=None, help="an experiment: the EdgeX ingest queue's bound"
    )
    p.add_argument("--trim", action="store_true", help="an experiment: malloc_trim(0) before each snapshot")
    p.add_argument("--agent-only", action="store_true", help="skip the baselines (a quick experiment)")
    a = p.parse_args(argv)
    agent_env = dict(kv.split("=", 1) for kv in a.agent_env)
    if a.ingest_queue is not None:
        agent_env[_QUEUE_LIMIT_ENV] = str(a.ingest_queue)
    if a.trim:
        agent_env[_TRIM_ENV] = "1"
    work = Path(tempfile.mkdtemp(prefix="fedge-agent-memory-"))
    print(f"work directory: {work}", flush=True)
    run: dict[str, Any] = {
        "label": a.label,
        "date": datetime.now().isoformat(timespec="seconds"),
        "agent_env": agent_env,
        "rounds": a.rounds,
    }
    try:
        model_dir = a.model_dir
        if model_dir is None:
            print("building the model...", flush=True)
            model_dir = work / "model"
            ap.build_model(TASK, model_dir)
        ap.precompile_fedge()
        if not a.agent_only:  # --agent-only: the agent in service alone (the report omits the rest)
            print("baselines, import stages, LiteRT...", flush=True)
            run["baselines"] = bab.baselines(model_dir, work)
            run["imports"] = import_stages()
            run["litert"] = litert_costs(
                model_dir, work / "train-data", run["baselines"]["training_only"]["epochs"]
            )
        print("one agent in service...", flush=True)
        run["agent"] = run_agent(model_dir, work, a.rounds, a.idle, a.every, agent_env)
        run["agent_peak_rss_bytes"] = max(v["rss_bytes"] for v in run["agent"]["peak_by_phase"].values())
    except (ap.BenchError, subprocess.CalledProcessError) as exc:
        print(f"FAILED: {exc}; logs in {work}", file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        print(f"FAILED; logs in {work}", file=sys.stderr)
        return 1
    print()
    print(render(run))
    report: dict[str, Any] = {"benchmark": "agent_memory", "issue": 18, "runs": {}}
    if a.out.exists():
        with contextlib.suppress(ValueError):  # an unreadable report is replaced
            report = json.loads(a.out.read_text())
    report.setdefault("runs", {})[a.label] = run
    report["machine"] = bab.machine_info()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"report: {a.out}")
    if not a.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
