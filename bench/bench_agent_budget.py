"""The whole agent in service, measured as its process during a real fleet run (issue 18).

``bench_training.py`` measures the training process alone; a device runs the whole agent: EdgeX
ingest, the sample store, the trainer, two MQTT connections, the outbox, its status and the
systemd notifications. This benchmark stands a fleet up as ``fedge demo`` does on its default
path and reads each agent process from /proc:

- a real Mosquitto locked down as ``fedge broker config`` writes it (TLS with a lab CA, a
  password per principal, ACLs; ``fedge.lab.demo.start_locked_broker``), the real aggregator
  (``python -m fedge.cli aggregator run``) and N real agents (``python -m fedge.cli agent run``,
  default 7, one per training subject), provisioned with ``create_fleet`` exactly as
  ``run_demo`` does (the default task ``tasks/har-watch.toml``, fp32, server learning rate 2.0,
  ``[data] source = "edgex"`` with the wearable IMU profile, each agent on its own EdgeX-bus
  principal); every round selects every device (``min_devices`` = N) so that each agent trains
  in each round;
- the EdgeX path: the subjects' recordings replayed as EdgeX v4 events on the broker (the
  demo's 1.23 M readings for 7 devices), then, as in the demo, each device's live (unlabelled)
  readings in real time at the task's rate (50 rows a second, 6 readings a row) until the quiet
  phase;
- R train rounds (default 30), then an idle phase (default 60 s): the aggregator has finished
  (no round open), the agents stay connected and the live readings keep arriving; then a quiet
  phase (the idle's length, at most 30 s) with the live readings stopped too: nothing arrives;
- in both, each thread's wake-ups a second (``/proc/<pid>/task/*/status``: voluntary and
  nonvoluntary context switches) by its kernel name (``comm``: the agent names its threads,
  ``fedge.shell.threads``; an unnamed one is "thread <n>" by start order), and the CPU;
- each agent gets a ``NOTIFY_SOCKET`` of its own (a datagram socket this script binds), so its
  ``READY=1`` is read as systemd would: start-up to READY is spawn -> that datagram.

Per agent, from /proc/<pid>/{stat,status} every 0.1 s (``bench_fleet_budget.Sampler``): peak
RSS (VmRSS; RssAnon and RssFile apart; VmHWM), CPU-s for start-up, for the EdgeX backlog (and
per reading: the CPU between the replay's start and the agent's status showing every sample
stored, over the readings of its subject), per train round (round 1's manifest to round R's
aggregation over R, live readings included), and in the idle phase (% of one core). Start-up
to READY and to its first accepted update (the aggregator's log). One agent's
/proc/<pid>/smaps at the end of the rounds says where its memory is: each shared library's
resident pages, the heap and the other anonymous mappings.

The baselines in the same run, each a fresh interpreter started from a small launcher
(``bench_training.run_worker``): the training-only process (``training_worker.py agent-train``:
the model, one device's samples, the task's local epochs: what a round costs with nothing else
loaded) and the floor (``training_worker.py baseline``: Python with numpy alone). And where an
agent's import memory goes: RSS after each import stage in a fresh interpreter
and the Python objects tracemalloc counts after them. fedge's modules are compiled to bytecode
first, as a wheel install does (``--no-precompile``: compiled from source at every start, as in
a checkout run with ``PYTHONDONTWRITEBYTECODE``).

Usage: ``python bench/bench_agent_budget.py [--devices 7] [--rounds 30] [--idle 60] [--quick]
[--keep] [--no-precompile] [--out bench/results/agent_budget.json]
[--docs-json docs/results/agent_budget.json]``
(``make bench-agent-budget``). ``--quick``: 3 devices, 3 rounds, 15 s idle
(``agent_budget-quick.json``). A validity failure (a round not aggregated, an agent that exited,
a reading that is not the agent's) exits 1 and writes ``<out>-failed.json``; a missed target is
only reported.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import agent_processes as ap  # type: ignore[import-not-found, unused-ignore]  # noqa: E402
import bench_fleet_budget as fb  # type: ignore[import-not-found, unused-ignore]  # noqa: E402
from agent_processes import (  # type: ignore[import-not-found, unused-ignore]  # noqa: E402
    BenchError,
    NotifyListener,
    spawn,
)
from bench_training import machine_info, run_worker  # type: ignore[import-not-found, unused-ignore]  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "agent_budget.json"
TASK = ROOT / "tasks" / "har-watch.toml"
MIB = 1024 * 1024
SAMPLE_INTERVAL_S = 0.1
PSS_EVERY = 20  # the Sampler's ticks between two smaps_rollup reads (2 s)
#: The issue's targets for the whole agent on the default task.
TARGET_PEAK_RSS_BYTES = 53 * 1000 * 1000  # "53 MB"
TARGET_CPU_S_PER_ROUND = 0.107
TARGET_IDLE_CPU_PERCENT = 1.0
#: Settle time after the aggregator exits before the idle window opens (the last round's
#: status, predictions and outbox flush are not idle work).
IDLE_SETTLE_S = 5.0
#: After the idle phase, the quiet one (the live readings stopped too): at most this long, and
#: this long after the stream stops before it opens (the ingest's last flush).
QUIET_S = 30.0
QUIET_SETTLE_S = 3.0

#: Import stages of an agent, measured in a fresh interpreter (RSS after each).
STAGES = (
    "fedge.cli",  # first, as in fedge agent run: it prepares the process (prepare_agent_process)
    "numpy",
    "ai_edge_litert.interpreter",
    "ssl",
    "paho.mqtt.client",
    "nacl.public",
    "fedge.protocol.task",
    "fedge.agent.core",
    "fedge.agent.trainer",
    "fedge.agent.edgex.wire",
    "fedge.agent.edgex.ingest",
    "fedge.agent.edgex.profile",
    "fedge.agent.wiring",
    "fedge.agent.service",
)

_STAGE_PROBE = (
    "import importlib, json, sys, tracemalloc\n"
    + ap.RSS_SOURCE
    + r"""
traced = sys.argv[1] == "traced"  # RSS is read untraced; tracemalloc's own memory would add to it
if traced:
    tracemalloc.start(1)
rows = [{"stage": "python", "rss_bytes": rss(), "modules": len(sys.modules)}]
for name in sys.argv[2:]:
    module = importlib.import_module(name)
    if name == "fedge.cli":  # what fedge agent run does first (OpenBLAS, malloc, deferred imports)
        module.prepare_agent_process()
    rows.append({"stage": name, "rss_bytes": rss(), "modules": len(sys.modules)})
# Python's own allocations (objects, code, module dicts) after every import: the rest of the RSS
# is shared libraries and the allocators' overhead.
traced_bytes = tracemalloc.get_traced_memory()[0] if traced else None
third = sorted({m.split(".")[0] for m in sys.modules} - set(sys.stdlib_module_names))
print(json.dumps({"stages": rows, "tracemalloc_total_bytes": traced_bytes, "third_party": third,
                  "loaded": {m: m in sys.modules for m in ("requests", "urllib3", "yaml", "http.client",
                                                            "tensorflow", "seglearn", "pandas")}}))
"""
)


# --- /proc: where one process's memory is ---------------------------------------------------


def smaps_breakdown(pid: int) -> dict[str, int]:
    """Resident bytes by mapping: each file (a shared library, a model), ``[heap]``,
    ``[stack]`` and ``anon`` (other anonymous mappings: thread stacks, arenas, numpy buffers)."""
    try:
        return ap.smaps_mappings(pid, split_stacks=False)[0]
    except OSError:
        return {}


def grouped_smaps(breakdown: dict[str, int]) -> dict[str, int]:
    """The smaps breakdown in a few groups a reader can act on."""
    groups: dict[str, int] = {}
    for name, size in breakdown.items():
        low = name.lower()
        if name in ("[heap]", "anon"):
            key = "heap and anonymous (Python objects, buffers, arenas, thread stacks)"
        elif "python" in low and ".so" in low:
            key = "libpython"
        elif "litert" in low or "tensorflow" in low or "_pywrap" in low:
            key = "LiteRT libraries"
        elif "openblas" in low or "multiarray" in low or "numpy" in low or "gfortran" in low:
            key = "numpy and OpenBLAS"
        elif "ssl" in low or "crypto" in low:
            key = "OpenSSL"
        elif "sodium" in low or "nacl" in low:
            key = "libsodium (PyNaCl)"
        elif "sqlite" in low:
            key = "SQLite library"
        elif name.startswith("python3") or name == "python":
            key = "python executable"
        elif ".so" in low:
            key = "other shared libraries"
        elif name.startswith("["):
            key = "stack and kernel mappings"
        else:
            key = "other files (locale, model, databases)"
        groups[key] = groups.get(key, 0) + size
    return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


# --- the fleet ------------------------------------------------------------------------------


def feed_recordings(
    options: Any,
    observer: Any,
    subjects: dict[str, int],
    broker_url: str,
    procs: dict[str, subprocess.Popen[bytes]],
    simulator_creds: dict[str, Any] | None,
) -> dict[str, Any]:
    """``fedge demo``'s replay (``_feed_through_edgex``), keeping the replay's report: each
    subject's readings, and when every agent's status showed all its samples stored."""
    from fedge.lab import demo, har_watch
    from fedge.lab.edgex_simulate import ROW_PERIOD_NS, SimulateOptions, simulate

    def data(device: str) -> dict[str, Any]:
        status = observer.view.device_status.get(device, {})
        report = status.get("data") if isinstance(status, dict) else None
        return report if isinstance(report, dict) else {}

    demo._wait(lambda: all(data(d).get("bus_connected") for d in subjects), observer, 120, "EdgeX", procs)
    loaded = har_watch.load_devices(options.task, subjects.values())
    expected = {har_watch.device_id(s): d.x.shape[0] for s, d in loaded.items()}
    recordings = har_watch.load_recordings()
    span_ns = max(
        sum(
            r.readings.shape[0] * ROW_PERIOD_NS + int(SimulateOptions.gap_s * 1e9)
            for r in recordings
            if r.subject == s
        )
        for s in subjects.values()
    )
    started = time.time()
    report = simulate(
        SimulateOptions(
            start_ns=time.time_ns() - span_ns,
            broker_url=broker_url,
            version=options.edgex_version,
            subjects=tuple(subjects.values()),
            **demo._client_creds(simulator_creds),
        )
    )
    published = time.time()
    stored_at: dict[str, float] = {}

    def all_stored() -> bool:
        for d in subjects:
            if d not in stored_at and data(d).get("stored_samples", 0) >= expected[d]:
                stored_at[d] = time.time()
        return len(stored_at) == len(subjects)

    demo._wait(all_stored, observer, 300, "every agent to store its samples", procs)
    channels = len(har_watch.RESOURCES)
    return {
        "started": started,
        "published": published,
        "stored_at": stored_at,
        "events": report.events,
        "readings": report.readings,
        "readings_by_device": {d: report.rows_by_device.get(d, 0) * channels for d in subjects},
        "expected_samples": expected,
        "last_origin_ns": report.last_origin_ns,
    }


@dataclass(frozen=True)
class Config:
    devices: int
    rounds: int
    idle_s: float
    round_timeout_s: float
    out: Path
    docs_json: Path | None
    keep: bool
    quick: bool
    precompile: bool


def first_updates(aggregator_log: Path) -> dict[str, float]:
    """Each device's first accepted update (the aggregator log's time)."""
    out: dict[str, float] = {}
    pattern = re.compile(r"accepted update from (\S+)")
    for line in aggregator_log.read_text(errors="replace").splitlines():
        m = pattern.search(line)
        t = fb._log_time(line)
        if m and t is not None:
            out.setdefault(m.group(1).rstrip(":,"), t)
    return out


def run_fleet(cfg: Config, model_dir: Path, work: Path) -> dict[str, Any]:
    from fedge.lab import demo, har_watch
    from fedge.protocol.task import parse_task_spec

    task = parse_task_spec(TASK.read_text(encoding="utf-8"))
    root = work / "fleet"
    logs = root / "logs"
    subjects = {har_watch.device_id(s): s for s in har_watch.TRAIN_SUBJECTS[: cfg.devices]}
    options = demo.DemoOptions(task=task, out=root, devices=cfg.devices, rounds=cfg.rounds)
    broker, broker_url, creds = demo._start_secure_broker(root, list(subjects), model_dir)
    sampler = ap.Sampler(SAMPLE_INTERVAL_S, PSS_EVERY)
    notify = NotifyListener(work, list(subjects))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    live_stop = threading.Event()
    live_thread: threading.Thread | None = None
    observer: Any = None
    marks: dict[str, float] = {"start": time.time()}
    spawned: dict[str, float] = {}
    smaps: dict[str, Any] = {}
    try:
        sampler.add("broker", broker.pid, ())
        sampler.add("bench", os.getpid(), ())
        rounds = {
            "rounds": cfg.rounds,
            "min_devices": cfg.devices,
            "round_timeout_s": cfg.round_timeout_s,
            "codec": "fp32",
            "server_learning_rate": 2.0,
            "wait_for_devices_s": 60.0,
        }
        fleet = ap.provision_locked(root, model_dir, broker_url, creds, subjects, rounds, TASK)
        observer = ap.observer_for(fleet, model_dir, broker_url, creds, task)
        observer.start()
        notify.start()
        sampler.start()
        for device, agent_cfg in fleet.agent_configs.items():
            argv = ap.fedge_argv("agent", "run", "--config", str(agent_cfg))
            spawned[device] = time.time()
            procs[device] = spawn(argv, logs / f"{device}.log", {"NOTIFY_SOCKET": notify.paths[device]})
            sampler.add(device, procs[device].pid, ("agent", "run", str(agent_cfg)))
        ap.wait_ready(notify, procs, subjects, 120, logs)
        marks["all_ready"] = time.time()
        print(f"  all {cfg.devices} agents READY; replaying the EdgeX recordings...", flush=True)
        feed = feed_recordings(options, observer, subjects, broker_url, procs, creds.get("simulator"))
        marks["feed_start"], marks["stored"] = feed["started"], max(feed["stored_at"].values())
        print(
            f"  {feed['readings']:,} readings stored in {marks['stored'] - feed['started']:.0f} s", flush=True
        )
        # Every device's live readings start together (the demo starts each after its own
        # recordings, which end at different times: some would wait minutes for their first),
        # so that every agent takes readings at the task's rate through the rounds and the idle.
        together = max(feed["last_origin_ns"].values())
        live_thread = demo._start_live_stream(
            options,
            subjects,
            dict.fromkeys(subjects, together),
            broker_url,
            5,
            creds.get("simulator"),
            live_stop,
        )
        procs["aggregator"] = spawn(
            ap.fedge_argv("aggregator", "run", "--config", str(fleet.aggregator_config)),
            logs / "aggregator.log",
        )
        sampler.add("aggregator", procs["aggregator"].pid, ("aggregator", "run"))
        marks["aggregator_start"] = time.time()
        ap.wait_for_exit(procs, "aggregator", 120 + (cfg.rounds + 2) * cfg.round_timeout_s, logs)
        marks["aggregator_exit"] = time.time()
        first = next(iter(subjects))
        smaps["after_rounds"] = smaps_breakdown(procs[first].pid)
        print(f"  rounds done; idle phase ({cfg.idle_s:.0f} s, live readings still arriving)...", flush=True)
        time.sleep(IDLE_SETTLE_S)
        marks["idle_start"] = time.time()
        statuses_before = {d: dict(observer.view.device_status.get(d, {})) for d in subjects}
        threads_before = {d: thread_wakeups(procs[d].pid) for d in subjects}
        time.sleep(cfg.idle_s)
        marks["idle_end"] = time.time()
        statuses_after = {d: dict(observer.view.device_status.get(d, {})) for d in subjects}
        threads_after = {d: thread_wakeups(procs[d].pid) for d in subjects}
        wakeups = {d: wakeups_per_s(threads_before[d], threads_after[d], cfg.idle_s) for d in subjects}
        smaps["after_idle"] = smaps_breakdown(procs[first].pid)
        smaps["device"] = first
        if not live_thread.is_alive():
            raise BenchError("the live EdgeX stream ended before the idle phase did")
        time.sleep(2 * SAMPLE_INTERVAL_S)
        dead = [d for d in subjects if procs[d].poll() is not None]
        if dead:
            raise BenchError(f"{dead} exited during the idle phase; see {logs}")
        # Quiet: the live readings stop too, so nothing at all arrives; what each thread still
        # does is its own (deadlines, keepalive), the "wakes up only when there is work".
        quiet_s = min(cfg.idle_s, QUIET_S)
        print(f"  quiet phase ({quiet_s:.0f} s, no live readings)...", flush=True)
        live_stop.set()
        live_thread.join(timeout=10)
        time.sleep(QUIET_SETTLE_S)
        threads_before = {d: thread_wakeups(procs[d].pid) for d in subjects}
        cpu_before = {d: ap.proc_cpu_s(procs[d].pid) for d in subjects}
        time.sleep(quiet_s)
        threads_after = {d: thread_wakeups(procs[d].pid) for d in subjects}
        cpu_after = {d: ap.proc_cpu_s(procs[d].pid) for d in subjects}
        quiet = {d: wakeups_per_s(threads_before[d], threads_after[d], quiet_s) for d in subjects}
        quiet_cpu = {d: 100.0 * (cpu_after[d] - cpu_before[d]) / quiet_s for d in subjects}
    finally:
        live_stop.set()
        if live_thread is not None:
            live_thread.join(timeout=10)
        ap.terminate(procs)
        if sampler.is_alive():
            sampler.stop()
        if notify.is_alive():
            notify.stop()
        if observer is not None:
            observer.stop()
        broker.stop()
    if sampler.errors:
        raise BenchError("the /proc sampler failed:\n" + "\n".join(sampler.errors))
    summary = summarise(
        cfg, sampler, notify, logs, subjects, spawned, marks, feed, smaps, statuses_before, statuses_after
    )
    for d in subjects:
        summary["agents"][d]["idle_wakeups_per_s"] = wakeups[d]
        summary["agents"][d]["quiet_wakeups_per_s"] = quiet[d]
        summary["agents"][d]["quiet_cpu_percent"] = round(quiet_cpu[d], 3)
    summary["quiet_s"] = quiet_s
    summary["agent_quiet_cpu_percent"] = _min_median_max(quiet_cpu.values())
    for phase, rates in (("quiet", quiet), ("idle", wakeups)):
        # Per thread name, the median over the agents (each agent's threads have the same roles).
        names = sorted({k for w in rates.values() for k in w})
        summary[f"agent_{phase}_wakeups_per_s_median"] = {
            k: round(statistics.median(w.get(k, 0.0) for w in rates.values()), 2) for k in names
        }
        summary[f"agent_{phase}_wakeups_per_s_total"] = _min_median_max(
            sum(w.values()) for w in rates.values()
        )
    return summary


def _min_median_max(values: Iterable[float]) -> dict[str, float]:
    xs = list(values)
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def summarise(
    cfg: Config,
    sampler: Any,
    notify: NotifyListener,
    logs: Path,
    subjects: dict[str, int],
    spawned: dict[str, float],
    marks: dict[str, float],
    feed: dict[str, Any],
    smaps: dict[str, Any],
    before: dict[str, dict[str, Any]],
    after: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    rounds = fb.read_aggregator_log(logs / "aggregator.log")
    train = {r.number: r for r in rounds if r.phase == "train" and r.outcome == "aggregated"}
    missing = [n for n in range(1, cfg.rounds + 1) if n not in train]
    if missing:
        raise BenchError(f"train rounds {missing} were not aggregated; see {logs}")
    for tr in sampler.traces.values():
        if tr.mismatch or not tr.samples:
            raise BenchError(f"{tr.name}: {tr.mismatch or 'never read'}")
    t_first, t_last = train[1].published, train[cfg.rounds].closed
    assert t_last is not None
    updates = first_updates(logs / "aggregator.log")
    idle_s = marks["idle_end"] - marks["idle_start"]
    agents: dict[str, dict[str, Any]] = {}
    for d in subjects:
        tr = sampler.traces[d]
        readings = feed["readings_by_device"].get(d, 0)
        ingest_cpu = tr.cpu_at(feed["stored_at"][d]) - tr.cpu_at(feed["started"])
        contributed = sum(1 for r in train.values() if d in r.accepted_from)
        rounds_cpu = tr.cpu_at(t_last) - tr.cpu_at(t_first)
        idle_cpu = tr.cpu_at(marks["idle_end"]) - tr.cpu_at(marks["idle_start"])
        idle_rate = idle_cpu / idle_s
        wall_rounds = t_last - t_first
        agents[d] = {
            "pid": tr.pid,
            "peak_rss_bytes": tr.peak_rss,
            "vm_hwm_bytes": tr.hwm,
            "peak_rss_anon_bytes": tr.peak_anon,
            "peak_rss_file_bytes": tr.peak_file,
            "peak_rss_startup_bytes": tr.peak_rss_between(spawned[d], marks["all_ready"]),
            "peak_rss_ingest_bytes": tr.peak_rss_between(feed["started"], marks["stored"]),
            "peak_rss_rounds_bytes": tr.peak_rss_between(t_first, t_last),
            "peak_rss_idle_bytes": tr.peak_rss_between(marks["idle_start"], marks["idle_end"]),
            "threads_max": tr.threads,
            "startup_to_ready_s": notify.ready_at[d] - spawned[d],
            "startup_to_first_update_s": updates[d] - spawned[d] if d in updates else None,
            "first_manifest_to_first_update_s": updates[d] - train[1].published if d in updates else None,
            "cpu_s_to_ready": tr.cpu_at(notify.ready_at[d]),
            "cpu_s_ingest": ingest_cpu,
            "ingest_readings": readings,
            "ingest_cpu_us_per_reading": 1e6 * ingest_cpu / readings if readings else None,
            "ingest_wall_s": feed["stored_at"][d] - feed["started"],
            "cpu_s_per_round": rounds_cpu / cfg.rounds,
            # The whole run to the last round (start-up, the EdgeX backlog, the rounds) over R:
            # what a device pays per round over a short fleet's life.
            "cpu_s_whole_run_per_round": tr.cpu_at(t_last) / cfg.rounds,
            # Take away what the agent spends anyway (live readings, status, MQTT keep-alives):
            # what training, sealing and publishing a round cost.
            "cpu_s_per_round_less_idle": (rounds_cpu - idle_rate * wall_rounds) / cfg.rounds,
            "train_rounds_contributed": contributed,
            "idle_cpu_s": idle_cpu,
            "idle_cpu_percent": 100.0 * idle_rate,
            "idle_live_readings": _live_count(after.get(d, {})) - _live_count(before.get(d, {})),
            # EdgeX messages the agent's bus connection took in the idle window (its status).
            "idle_bus_messages": _bus_messages(after.get(d, {})) - _bus_messages(before.get(d, {})),
            "status_data_at_idle_end": after.get(d, {}).get("data"),
            "notify_messages": notify.messages[d],
            "cpu_s_total": tr.samples[-1][1],
        }
    values = list(agents.values())

    def dist(key: str) -> dict[str, float]:
        xs = sorted(float(v[key]) for v in values if v[key] is not None)
        return {"min": xs[0], "median": statistics.median(xs), "max": xs[-1], "mean": statistics.fmean(xs)}

    def proc(name: str) -> dict[str, Any]:
        tr = sampler.traces[name]
        return {
            "peak_rss_bytes": tr.peak_rss,
            "cpu_s_per_round": (tr.cpu_at(t_last) - tr.cpu_at(t_first)) / cfg.rounds,
            "idle_cpu_percent": 100.0
            * (tr.cpu_at(marks["idle_end"]) - tr.cpu_at(marks["idle_start"]))
            / idle_s,
        }

    walls = [(r.closed or r.published) - r.published for r in train.values()]
    return {
        "devices": cfg.devices,
        "rounds": cfg.rounds,
        "rounds_aggregated": len(train),
        "round_wall_s_median": statistics.median(walls),
        "train_rounds_s": t_last - t_first,
        "idle_s": idle_s,
        "feed": {
            "events": feed["events"],
            "readings": feed["readings"],
            "publish_s": feed["published"] - feed["started"],
            "stored_s": marks["stored"] - feed["started"],
        },
        "marks": {k: v - marks["start"] for k, v in marks.items()},
        "machine_busy_in_rounds": sampler.machine_busy(t_first, t_last),
        "machine_busy_idle": sampler.machine_busy(marks["idle_start"], marks["idle_end"]),
        "agent_peak_rss_bytes": dist("peak_rss_bytes"),
        "agent_peak_rss_anon_bytes": dist("peak_rss_anon_bytes"),
        "agent_peak_rss_file_bytes": dist("peak_rss_file_bytes"),
        "agent_cpu_s_per_round": dist("cpu_s_per_round"),
        "agent_cpu_s_per_round_less_idle": dist("cpu_s_per_round_less_idle"),
        "agent_cpu_s_whole_run_per_round": dist("cpu_s_whole_run_per_round"),
        "agent_ingest_cpu_us_per_reading": dist("ingest_cpu_us_per_reading"),
        "agent_idle_cpu_percent": dist("idle_cpu_percent"),
        "agent_startup_to_ready_s": dist("startup_to_ready_s"),
        "agent_startup_to_first_update_s": dist("startup_to_first_update_s"),
        "agent_first_manifest_to_first_update_s": dist("first_manifest_to_first_update_s"),
        "agent_cpu_s_to_ready": dist("cpu_s_to_ready"),
        "agent_threads_max": dist("threads_max"),
        "aggregator": proc("aggregator"),
        "broker": proc("broker"),
        "smaps": {
            "device": smaps.get("device"),
            "after_rounds_groups": grouped_smaps(smaps.get("after_rounds", {})),
            "after_idle_groups": grouped_smaps(smaps.get("after_idle", {})),
            "after_rounds_top": dict(list(smaps.get("after_rounds", {}).items())[:20]),
        },
        "rss_series": {
            d: [(round(t - marks["start"], 2), rss) for t, _, rss in sampler.traces[d].samples[::5]]
            for d in subjects
        },
        "agents": agents,
    }


def thread_wakeups(pid: int) -> dict[str, tuple[str, int]]:
    """Each thread of ``pid``: its name (``comm``: the agent names its own threads, see
    ``fedge.shell.threads``) and how often it has been switched out and in again, the
    voluntary (a wait, a select, a blocking read each count one) and the nonvoluntary
    (preempted while running) context switches together."""
    out: dict[str, tuple[str, int]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            switches = 0
            for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                    switches += int(line.split()[1])
            out[tid] = (name, switches)
        except (OSError, ValueError):
            continue
    return out


def wakeups_per_s(
    before: dict[str, tuple[str, int]], after: dict[str, tuple[str, int]], seconds: float
) -> dict[str, float]:
    """Wake-ups a second of each thread over the idle window, by thread name: the main thread
    is "main"; a thread whose comm is still the process's (not named) is "thread <n>" by start
    order; two threads of one name are told apart by a suffix."""
    out: dict[str, float] = {}
    main = min(after, key=int, default="")
    process_name = after[main][0] if main else ""
    for n, (tid, (name, count)) in enumerate(sorted(after.items(), key=lambda kv: int(kv[0]))):
        if tid not in before:  # started in the window: not an idle thread's rate
            continue
        label = "main" if tid == main else (f"thread {n}" if name == process_name else name)
        while label in out:
            label += "'"
        out[label] = round((count - before[tid][1]) / seconds, 2)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _bus_messages(status: dict[str, Any]) -> int:
    data = status.get("data") if isinstance(status.get("data"), dict) else {}
    bus = data.get("bus") if isinstance(data, dict) else None
    value = bus.get("messages") if isinstance(bus, dict) else None
    return int(value) if isinstance(value, int) else 0


def _live_count(status: dict[str, Any]) -> int:
    """Live (unlabelled) readings the agent's status counts as accepted, when it reports them."""
    data = status.get("data") if isinstance(status.get("data"), dict) else {}
    live = data.get("live") if isinstance(data, dict) else None
    quality = live.get("quality") if isinstance(live, dict) else None
    if isinstance(quality, dict):
        value = quality.get("readings") or quality.get("rows") or 0
        return int(value) if isinstance(value, int | float) else 0
    return 0


# --- baselines ------------------------------------------------------------------------------


def baselines(model_dir: Path, work: Path) -> dict[str, Any]:
    """The training-only process and the floor, each a fresh interpreter; the import stages."""
    import numpy as np

    from fedge.lab import har_watch
    from fedge.protocol.task import parse_task_spec

    task = parse_task_spec(TASK.read_text(encoding="utf-8"))
    device = har_watch.load_devices(task, [har_watch.TRAIN_SUBJECTS[0]])[har_watch.TRAIN_SUBJECTS[0]]
    data_dir = work / "train-data"
    data_dir.mkdir()
    np.save(data_dir / "x.npy", device.x.astype(np.float32))
    np.save(data_dir / "y.npy", device.y.astype(np.int32))
    epochs = task.training.local_epochs
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    trained, wall = run_worker(
        "agent-train", "--model-dir", str(model_dir), "--data-dir", str(data_dir), "--epochs", str(epochs)
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    floor, _ = run_worker("baseline")
    probes = {
        mode: ap.run_probe(_STAGE_PROBE, mode, *STAGES, what="the import probe") for mode in ("rss", "traced")
    }
    imports = probes["rss"]
    imports["tracemalloc_total_bytes"] = probes["traced"]["tracemalloc_total_bytes"]
    return {
        "training_only": {
            "examples": trained["examples"],
            "epochs": epochs,
            "peak_rss_bytes": trained["peak_rss_bytes"],
            "train_s_per_round": trained["train_seconds"],
            "process_cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
            "wall_s": wall,
        },
        "floor_python_numpy": {"peak_rss_bytes": floor["peak_rss_bytes"], "numpy": floor.get("numpy")},
        "imports": imports,
    }


# --- report ---------------------------------------------------------------------------------


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / MIB:.1f}"


def render(report: dict[str, Any]) -> str:
    f, b = report["fleet"], report["baselines"]
    lines = [
        f"fedge: the whole agent in service, {f['devices']} agents on the EdgeX path, {f['rounds']} rounds, "
        f"{f['idle_s']:.0f} s idle",
        "",
        f"{'':34}{'min':>10}{'median':>10}{'max':>10}",
    ]

    def row(label: str, d: dict[str, float], fmt: str, scale: float = 1.0) -> None:
        lines.append(
            f"{label:34}" + "".join(f"{format(d[k] / scale, fmt):>10}" for k in ("min", "median", "max"))
        )

    row("peak RSS (MiB)", f["agent_peak_rss_bytes"], ".1f", MIB)
    row("  of it anonymous (MiB)", f["agent_peak_rss_anon_bytes"], ".1f", MIB)
    row("  of it file-backed (MiB)", f["agent_peak_rss_file_bytes"], ".1f", MIB)
    row("CPU-s per round", f["agent_cpu_s_per_round"], ".3f")
    row("  less the idle cost", f["agent_cpu_s_per_round_less_idle"], ".3f")
    row("  whole run to round R, over R", f["agent_cpu_s_whole_run_per_round"], ".3f")
    row("EdgeX ingest (CPU-us per own rdg)", f["agent_ingest_cpu_us_per_reading"], ".1f")
    row("idle CPU (% of one core)", f["agent_idle_cpu_percent"], ".2f")
    row("start-up to READY (s)", f["agent_startup_to_ready_s"], ".2f")
    row("CPU-s to READY", f["agent_cpu_s_to_ready"], ".2f")
    row("start-up to first update (s)", f["agent_startup_to_first_update_s"], ".1f")
    row("round 1 manifest to update (s)", f["agent_first_manifest_to_first_update_s"], ".2f")
    t = b["training_only"]
    lines += [
        "",
        f"baseline, training-only process: peak RSS {mib(t['peak_rss_bytes'])} MiB, "
        f"{t['train_s_per_round']:.3f} s of training per round ({t['epochs']} epochs, "
        f"{t['examples']} samples)",
        f"floor, Python with numpy alone: peak RSS {mib(b['floor_python_numpy']['peak_rss_bytes'])} MiB",
        f"EdgeX backlog: {f['feed']['readings']:,} readings in {f['feed']['events']:,} events, "
        f"stored in {f['feed']['stored_s']:.0f} s",
        f"aggregator: peak RSS {mib(f['aggregator']['peak_rss_bytes'])} MiB, "
        f"{f['aggregator']['cpu_s_per_round']:.3f} CPU-s per round; "
        f"broker {mib(f['broker']['peak_rss_bytes'])} MiB",
        f"machine busy: {f['machine_busy_in_rounds']:.0%} in the rounds, {f['machine_busy_idle']:.0%} idle",
        "",
        "import stages (fresh interpreter, RSS after each):",
    ]
    previous = 0
    for s in b["imports"]["stages"]:
        lines.append(f"  {s['stage']:32} {mib(s['rss_bytes']):>7} MiB (+{mib(s['rss_bytes'] - previous)})")
        previous = s["rss_bytes"]
    first = f["agents"][f["smaps"]["device"]]
    if "idle_wakeups_per_s" in first:
        woke = ", ".join(f"{k} {v:g}" for k, v in first["idle_wakeups_per_s"].items())
        lines.append(f"{f['smaps']['device']}'s threads, wake-ups a second when idle: {woke}")
    if "agent_idle_wakeups_per_s_median" in f:
        by_thread = sorted(f["agent_idle_wakeups_per_s_median"].items(), key=lambda kv: -kv[1])
        lines.append("median over the agents: " + ", ".join(f"{k} {v:g}" for k, v in by_thread))
        total = f["agent_idle_wakeups_per_s_total"]
        lines.append(
            f"wake-ups a second of a whole idle agent: min {total['min']:.1f}, median {total['median']:.1f}, "
            f"max {total['max']:.1f} (live readings arriving)"
        )
    if "agent_quiet_wakeups_per_s_median" in f:
        by_thread = sorted(f["agent_quiet_wakeups_per_s_median"].items(), key=lambda kv: -kv[1])
        total, cpu = f["agent_quiet_wakeups_per_s_total"], f["agent_quiet_cpu_percent"]
        lines.append(
            f"quiet ({f['quiet_s']:.0f} s, nothing arriving), median over the agents: "
            + ", ".join(f"{k} {v:g}" for k, v in by_thread)
        )
        lines.append(
            f"  whole agent: {total['min']:.2f} to {total['max']:.2f} wake-ups a second, "
            f"{cpu['min']:.3f} to {cpu['max']:.3f}% of one core"
        )
    lines.append(f"where {f['smaps']['device']}'s memory is after the rounds (smaps, resident):")
    for k, v in f["smaps"]["after_rounds_groups"].items():
        lines.append(f"  {k:70} {mib(v):>7} MiB")
    lines.append("")
    for tgt in report["targets"]:
        lines.append(f"[{'met' if tgt['met'] else 'MISSED'}] {tgt['what']}: {tgt['detail']}")
    return "\n".join(lines)


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    f = report["fleet"]
    peak = f["agent_peak_rss_bytes"]["max"]
    cpu = f["agent_cpu_s_per_round"]["median"]
    whole = f["agent_cpu_s_whole_run_per_round"]["median"]
    idle = f["agent_idle_cpu_percent"]["max"]
    arrived = min(a["idle_bus_messages"] for a in f["agents"].values())
    return [
        {
            "what": "live readings reached every agent in the idle phase (1 event of 300 a second)",
            "met": arrived >= 0.8 * f["idle_s"],
            "detail": f"fewest EdgeX messages taken by an agent: {arrived} in {f['idle_s']:.0f} s",
        },
        {
            "what": "the whole agent peaks at 53 MB or less",
            "met": peak <= TARGET_PEAK_RSS_BYTES,
            "detail": f"max over the agents {peak / 1e6:.1f} MB ({mib(peak)} MiB)",
        },
        {
            # The measure (its 0.139): the agent's CPU from start to round R over R,
            # the EdgeX backlog included.
            "what": "device CPU per round on the EdgeX path (whole run / R) at most 0.107 s",
            "met": whole <= TARGET_CPU_S_PER_ROUND,
            "detail": f"median {whole:.3f} CPU-s; a train round alone {cpu:.3f}",
        },
        {
            "what": "an idle agent costs under 1% of one core",
            "met": idle < TARGET_IDLE_CPU_PERCENT,
            "detail": f"max over the agents {idle:.2f}% with live readings arriving",
        },
    ]


def plot(path: Path, report: dict[str, Any]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed in this venv: no plot", flush=True)
        return False
    f, b = report["fleet"], report["baselines"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    ax = axes[0]
    for d, series in f["rss_series"].items():
        ax.plot([p[0] for p in series], [p[1] / MIB for p in series], linewidth=0.8, label=d)
    marks = f["marks"]
    for key, label in (("feed_start", "replay"), ("aggregator_start", "rounds"), ("idle_start", "idle")):
        if key in marks:
            ax.axvline(marks[key], color="grey", linestyle=":")
            ax.text(marks[key], ax.get_ylim()[0], label, rotation=90, fontsize=8, va="bottom")
    ax.axhline(TARGET_PEAK_RSS_BYTES / MIB, color="red", linestyle="--", label="target 53 MB")
    ax.axhline(
        b["training_only"]["peak_rss_bytes"] / MIB, color="green", linestyle="--", label="training only"
    )
    ax.axhline(
        b["floor_python_numpy"]["peak_rss_bytes"] / MIB, color="black", linestyle="--", label="Python+numpy"
    )
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title("agent RSS")
    ax.legend(fontsize=7)
    ax = axes[1]
    stages = b["imports"]["stages"]
    deltas = [stages[0]["rss_bytes"] / MIB] + [
        (s["rss_bytes"] - p["rss_bytes"]) / MIB for p, s in itertools.pairwise(stages)
    ]
    ax.barh([s["stage"] for s in stages], deltas)
    ax.invert_yaxis()
    ax.set_xlabel("RSS added (MiB)")
    ax.set_title("import stages")
    ax.tick_params(axis="y", labelsize=7)
    ax = axes[2]
    agents = f["agents"]
    names = list(agents)
    xs = list(range(len(names)))
    whole = [agents[d].get("cpu_s_whole_run_per_round", 0.0) for d in names]
    ax.bar([x - 0.2 for x in xs], whole, width=0.4, label="whole run (start-up, backlog, rounds) / R")
    ax.bar(
        [x + 0.2 for x in xs], [agents[d]["cpu_s_per_round"] for d in names], width=0.4, label="a train round"
    )
    ax.set_xticks(xs, names)
    ax.axhline(TARGET_CPU_S_PER_ROUND, color="red", linestyle="--", label="target 0.107 s")
    ax.axhline(b["training_only"]["train_s_per_round"], color="green", linestyle="--", label="training only")
    ax.set_ylabel("CPU-s")
    ax.set_title("agent CPU per round")
    ax.tick_params(axis="x", labelsize=7, rotation=45)
    ax.legend(fontsize=7)
    fig.suptitle("fedge: the whole agent in service (EdgeX path)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def parse_args(argv: Sequence[str] | None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--devices", type=int, default=None, help="agents (default 7; --quick 3)")
    p.add_argument("--rounds", type=int, default=None, help="train rounds (default 30; --quick 3)")
    p.add_argument("--idle", type=float, default=None, help="idle phase in seconds (default 60; --quick 15)")
    p.add_argument("--round-timeout", type=float, default=120.0, help="round_timeout_s (default 120)")
    p.add_argument("--quick", action="store_true", help="a short smoke run")
    p.add_argument("--out", type=Path, default=None, help=f"the JSON report (default {DEFAULT_OUT})")
    p.add_argument("--docs-json", type=Path, default=None, help="also write the report there (docs/results)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    p.add_argument(
        "--no-precompile",
        action="store_true",
        help="do not compile fedge's modules to bytecode first (measure them compiled at every start)",
    )
    a = p.parse_args(argv)
    quick = bool(a.quick)
    cfg = Config(
        devices=a.devices or (3 if quick else 7),
        rounds=a.rounds or (3 if quick else 30),
        idle_s=a.idle if a.idle is not None else (15.0 if quick else 60.0),
        round_timeout_s=a.round_timeout,
        out=a.out or (DEFAULT_OUT.with_name("agent_budget-quick.json") if quick else DEFAULT_OUT),
        docs_json=a.docs_json,
        keep=a.keep,
        quick=quick,
        precompile=not a.no_precompile,
    )
    if not 1 <= cfg.devices <= 7:
        p.error("--devices must be 1..7 (one per training subject)")
    if cfg.rounds < 1 or cfg.idle_s <= 0:
        p.error("--rounds must be at least 1 and --idle positive")
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    if sys.platform != "linux":
        print("this benchmark reads /proc: Linux only", file=sys.stderr)
        return 2
    from fedge.lab.broker import find_mosquitto

    if find_mosquitto() is None:
        print("mosquitto is not installed (apt-get install mosquitto)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="fedge-agent-budget-"))
    print(f"work directory (logs): {work}", flush=True)
    started = time.time()
    report: dict[str, Any] = {
        "benchmark": "agent_budget",
        "issue": 18,
        "date": datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {
            "devices": cfg.devices,
            "rounds": cfg.rounds,
            "idle_s": cfg.idle_s,
            "round_timeout_s": cfg.round_timeout_s,
            "task": str(TASK.relative_to(ROOT)),
            "data": "EdgeX v4 events on the fleet's TLS broker (fedge demo's replay, then live "
            "readings at 50 Hz)",
            "sample_interval_s": SAMPLE_INTERVAL_S,
            "min_devices": cfg.devices,
            "bytecode": "fedge's modules compiled first, as a wheel install does"
            if cfg.precompile
            else "compiled from source at every start (--no-precompile)",
        },
        "work_dir": str(work),
    }
    code = 0
    try:
        print("building the model (TensorFlow, once, in its own process)...", flush=True)
        model_dir = work / "model"
        ap.build_model(TASK, model_dir)
        if cfg.precompile:
            ap.precompile_fedge()
        print("baselines: the training-only process, Python+numpy, the import stages...", flush=True)
        report["baselines"] = baselines(model_dir, work)
        print(
            f"the fleet: {cfg.devices} agents, {cfg.rounds} rounds, then {cfg.idle_s:.0f} s idle...",
            flush=True,
        )
        report["fleet"] = run_fleet(cfg, model_dir, work)
    except BenchError as exc:
        report["failure"] = str(exc)
        code = 1
    except (Exception, KeyboardInterrupt):
        report["failure"] = traceback.format_exc()
        code = 1
    report["wall_s"] = time.time() - started
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    if code != 0:
        failed = cfg.out.with_name(cfg.out.stem + "-failed.json")
        failed.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"FAILED: {report['failure']}\npartial report: {failed}; logs kept in {work}", file=sys.stderr)
        return code
    report["targets"] = targets(report)
    print()
    print(render(report))
    text = json.dumps(report, indent=2, default=str) + "\n"
    cfg.out.write_text(text)
    if cfg.docs_json is not None:
        cfg.docs_json.parent.mkdir(parents=True, exist_ok=True)
        cfg.docs_json.write_text(text)
    if plot(cfg.out.with_suffix(".png"), report):
        print(f"plot: {cfg.out.with_suffix('.png')}")
    print(f"report: {cfg.out}")
    if not cfg.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
