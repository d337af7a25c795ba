"""How fedge's rounds scale with the fleet: up to 10,000 simulated devices, one aggregator.

Why this exists: issue 16 asks what one aggregator costs for a fleet of thousands -- round
overhead, aggregator CPU and RSS, broker RSS, the cost per device and how it grows with N -- and
sets the targets "aggregator memory flat in N, round overhead growing no faster than linearly".
``bench_rounds.py`` measures rounds for N <= 100 with the simulated devices in its own process;
this script takes the same pieces to N = 10,000:

- the real aggregator process (``fedge aggregator run``, via ``rounds_worker.py``) with every
  device enrolled (``fedge.lab.provision.create_fleet`` writes ``devices.toml`` and the keys),
  the real har-watch model (5,447 parameters) and a fresh real Mosquitto per N;
- N light simulated devices (``scale_worker.py``: ``mqtt_sim.SimFleet``'s device work -- verify
  the signed manifest, random delta, encode, seal with the device's NaCl key, publish QoS 1 --
  one MQTT connection per device) spread over ``--workers`` processes, each serving its sockets
  from one event loop instead of a thread per device;
- the round clock of ``rounds_observer.py`` (a passive client in its own process), and a
  sampler here reading ``/proc`` of the aggregator, the broker and the workers every 0.1 s (CPU
  seconds, RSS, peak RSS) and ``/proc/stat`` (the whole machine).

Per N: median round overhead (manifest to next manifest; ``--rounds`` train rounds), split into
the simulated devices' part (manifest in -> last update out) and the aggregator's tail (last
update out -> next manifest in); aggregator peak RSS and CPU seconds per round; broker peak
RSS; bytes per update; cost per device; and from N to N the growth (ratio of round overhead to
ratio of N, aggregator RSS slope in MB per 1000 devices) and which process is the bottleneck.

A failed validity check (a round not aggregated from every device, a missing measurement) is an
error (exit 1); a missed target is only reported (exit 0).

Usage: ``python bench/bench_scale.py [--sizes 100,1000,5000,10000] [--quick] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import resource
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench_rounds import (
    DEFAULT_TASK,
    MB,
    ROOT,
    TARGET_RSS_GROWTH_SHARE,
    BenchError,
    _f,
    _int_list,
    _mb,
    _table,
    _tail,
    build_model_dir,
    finish_observer,
    finish_worker,
    mosquitto_version,
    mqtt5_publish_bytes,
    start_observer,
    start_worker,
    stop_worker,
    write_json,
)
from bench_training import _version, machine_info

SCALE_WORKER = Path(__file__).resolve().parent / "scale_worker.py"
DEFAULT_OUT = ROOT / "bench" / "results" / "scale.json"
DEFAULT_SIZES = (100, 1000, 5000, 10000)
QUICK_SIZES = (100, 1000)
SAMPLE_S = 0.1
AGGREGATOR_EXIT_TIMEOUT_S = 60.0
WORKER_EXIT_TIMEOUT_S = 60.0
#: Before the first round the aggregator waits (at most this long) until every device is online.
WAIT_FOR_DEVICES_S = 60.0
#: create_fleet runs before the broker picks its port; the aggregator's config gets the real URL.
PLACEHOLDER_URL = "mqtt://127.0.0.1:1"
# TARGET_RSS_GROWTH_SHARE (from bench_rounds): "aggregator memory flat in N" as bench_rounds.py
# states the streaming claim, a growth below that share of keeping every fp32 delta.
#: "Round overhead growing no faster than linearly": from each N to the next, the overhead ratio
#: is at most the ratio of N times this (10% for noise).
LINEAR_TOLERANCE = 1.10
#: A process using at least this share of one core during the rounds counts as saturated.
SATURATED_SHARE = 0.85


def round_timeout_s(n: int) -> float:
    """A deadline that never closes a round on this 2-core machine: every device reports.

    Measured at N=10,000 (2 workers): ~2.5 ms per device to verify the 113 KB manifest plus
    ~0.5 ms to seal and publish, i.e. ~15-30 s per round; this allows 60 s + 30 ms per device.
    """
    return 60.0 + 0.03 * n


def connect_timeout_s(n: int) -> float:
    return 60.0 + 0.02 * n


# --- configuration -------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    task_path: Path
    out: Path
    sizes: tuple[int, ...] = DEFAULT_SIZES
    rounds: int = 5
    workers: int = 2
    codec: str = "fp32"
    model_dir: Path | None = None
    quick: bool = False
    seed: int = 0


def parse_args(argv: Sequence[str] | None) -> Config:
    from fedge.protocol.codec import Codec

    parser = argparse.ArgumentParser(
        description="fedge's rounds for up to 10,000 simulated devices and one aggregator: round "
        "overhead, aggregator CPU and RSS, broker RSS, cost per device, growth with N."
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    parser.add_argument("--task", type=Path, default=DEFAULT_TASK, help="task spec (default har-watch)")
    parser.add_argument("--sizes", type=_int_list, default=None,
                        help="fleet sizes (default 100,1000,5000,10000; --quick: 100,1000)")
    parser.add_argument("--rounds", type=int, default=None, help="train rounds per N (default 5; --quick 2)")
    parser.add_argument("--workers", type=int, default=2, help="processes hosting the devices (default 2)")
    parser.add_argument("--codec", choices=[c.value for c in Codec], default=Codec.FP32.value,
                        help="codec of the rounds (default fp32)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="an already built model directory (default: fedge model build into a temp dir)")
    parser.add_argument("--quick", action="store_true", help="N = 100 and 1000, 2 rounds each")
    args = parser.parse_args(argv)
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    rounds = args.rounds or (2 if args.quick else 5)
    if rounds < 1 or args.workers < 1:
        parser.error("--rounds and --workers must be >= 1")
    if any(n < args.workers for n in sizes):
        parser.error("every size must be >= --workers")
    return Config(
        task_path=args.task,
        out=args.out,
        sizes=tuple(sizes),
        rounds=rounds,
        workers=args.workers,
        codec=args.codec,
        model_dir=args.model_dir,
        quick=args.quick,
    )


# --- file descriptors --------------------------------------------------------------------------


def raise_nofile(wanted: int) -> dict[str, Any]:
    """This process's RLIMIT_NOFILE (inherited by the broker, the aggregator and the workers):
    the soft limit up to the hard one, and as root the hard one up to ``wanted`` if lower."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft, hard = before
    if hard != resource.RLIM_INFINITY and hard < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    after = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {"before": list(before), "after": list(after), "wanted": wanted}


def max_open_files(pid: int | None) -> int | None:
    """A running process's soft 'Max open files' (from /proc/PID/limits)."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
    except (OSError, ValueError, IndexError):
        pass
    return None


# --- /proc sampling ----------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (its threads included), from /proc/PID/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_memory(pid: int) -> tuple[int | None, int | None]:
    """(VmRSS, VmHWM) in bytes."""
    rss = hwm = None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return rss, hwm


def machine_busy_s() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat: everything but idle and iowait)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in fields[:8]]
    return (sum(values) - values[3] - values[4]) / CLK_TCK


@dataclass
class Sample:
    t: float
    cpu_s: float
    rss: int | None
    hwm: int | None


class Sampler:
    """Every SAMPLE_S: CPU seconds, RSS and peak RSS of the watched processes, and the machine's
    busy CPU seconds; a daemon thread of this process (which does nothing else meanwhile)."""

    def __init__(self) -> None:
        self.pids: dict[str, int] = {}
        self.series: dict[str, list[Sample]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="proc-sampler", daemon=True)

    def watch(self, name: str, pid: int) -> None:
        with self._lock:
            self.pids[name] = pid
            self.series.setdefault(name, [])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=5.0)
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.sample()

    def sample(self) -> None:
        now = time.monotonic()
        with self._lock:
            pids = dict(self.pids)
        rows: dict[str, Sample] = {"machine": Sample(now, machine_busy_s(), None, None)}
        for name, pid in pids.items():
            cpu = proc_cpu_s(pid)
            if cpu is not None:
                rss, hwm = proc_memory(pid)
                rows[name] = Sample(now, cpu, rss, hwm)
        with self._lock:
            for name, s in rows.items():
                self.series.setdefault(name, []).append(s)

    def cpu_at(self, name: str, t: float) -> float | None:
        """CPU seconds of ``name`` at monotonic time ``t``, interpolated between samples."""
        with self._lock:
            series = list(self.series.get(name, []))
        if not series or t < series[0].t or t > series[-1].t:
            return None
        for a, b in itertools.pairwise(series):
            if a.t <= t <= b.t:
                share = (t - a.t) / (b.t - a.t) if b.t > a.t else 0.0
                return a.cpu_s + share * (b.cpu_s - a.cpu_s)
        return series[-1].cpu_s

    def cpu_between(self, name: str, t0: float, t1: float) -> float | None:
        a, b = self.cpu_at(name, t0), self.cpu_at(name, t1)
        return None if a is None or b is None else b - a

    def rss_at(self, name: str, t: float) -> int | None:
        with self._lock:
            series = [s for s in self.series.get(name, []) if s.t <= t and s.rss is not None]
        return series[-1].rss if series else None

    def peak_hwm(self, name: str) -> int | None:
        with self._lock:
            values = [s.hwm for s in self.series.get(name, []) if s.hwm is not None]
        return max(values) if values else None

    def timeline(self, name: str, t0: float, step: float = 1.0) -> list[list[float]]:
        """[seconds since t0, RSS MB, peak RSS MB, CPU seconds] about every ``step`` seconds, and
        every sample where the peak grew (for the JSON: when memory grows)."""
        with self._lock:
            series = [s for s in self.series.get(name, []) if s.rss is not None and s.hwm is not None]
        out: list[list[float]] = []
        last_hwm = 0
        for s in series:
            assert s.rss is not None and s.hwm is not None
            if not out or s.t - t0 - out[-1][0] >= step or s.hwm > last_hwm:
                out.append([round(s.t - t0, 2), round(s.rss / MB, 2), round(s.hwm / MB, 2),
                            round(s.cpu_s, 2)])
            last_hwm = max(last_hwm, s.hwm)
        return out

    def max_rss_between(self, name: str, t0: float, t1: float) -> int | None:
        with self._lock:
            values = [s.rss for s in self.series.get(name, []) if t0 <= s.t <= t1 and s.rss is not None]
        return max(values) if values else None

    def peak_reached_at(self, name: str) -> float | None:
        """When (monotonic) the sampled peak RSS (VmHWM) first reached its final value."""
        with self._lock:
            series = [s for s in self.series.get(name, []) if s.hwm is not None]
        if not series:
            return None
        top = max(s.hwm for s in series if s.hwm is not None)
        return next(s.t for s in series if s.hwm == top)

    def peak_rss(self, name: str) -> int | None:
        with self._lock:
            values = [s.rss for s in self.series.get(name, []) if s.rss is not None]
        return max(values) if values else None


def child_pid(pid: int, timeout: float = 15.0) -> int | None:
    """The first child of ``pid`` (the aggregator under bench_training.LAUNCHER), bounded wait."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return None
        if children:
            return int(children[0])
        time.sleep(0.02)
    return None


# --- the simulated devices' processes --------------------------------------------------------------


def start_device_workers(
    n: int, cfg: Config, broker: Any, fleet_id: str, files: Any, loaded: Any, work_dir: Path, budget_s: float
) -> list[tuple[subprocess.Popen[str], Path]]:
    from fedge.protocol.sealing import key_to_text
    from fedge.protocol.signing import signing_key_to_text

    ids = sorted(files.device_keys)
    m = loaded.manifest
    procs: list[tuple[subprocess.Popen[str], Path]] = []
    for w in range(cfg.workers):
        share = ids[w :: cfg.workers]
        keys_file = work_dir / f"keys-n{n}-w{w}.json"
        keys_file.write_text(json.dumps({d: key_to_text(files.device_keys[d]) for d in share}))
        log = work_dir / f"devices-n{n}-w{w}.log"
        cmd = [
            sys.executable, str(SCALE_WORKER), "--host", broker.host, "--port", str(broker.port),
            "--fleet", fleet_id, "--keys", str(keys_file),
            "--aggregator-public", key_to_text(files.box_key.public_key),
            "--verify-key", signing_key_to_text(files.signing_key.verify_key),
            "--parameters", str(m.parameter_count), "--input-dim", str(m.task.input_dim),
            "--seed", str(cfg.seed + 1000 * n + w), "--connect-timeout", str(connect_timeout_s(n)),
            "--timeout", str(budget_s),
        ]
        with log.open("ab") as err:
            procs.append((
                subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
                                 start_new_session=True),
                log,
            ))
    return procs


def wait_ready(procs: list[tuple[subprocess.Popen[str], Path]], timeout: float, n: int) -> None:
    deadline = time.monotonic() + timeout
    for proc, log in procs:
        assert proc.stdout is not None
        remaining = max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        line = proc.stdout.readline().strip() if ready else ""
        if line != "ready":
            raise BenchError(f"N={n}: a device worker did not connect its devices ({line[:300]!r}); "
                             f"log tail:\n{_tail(log)}")


def finish_device_worker(proc: subprocess.Popen[str], log: Path, n: int) -> dict[str, Any]:
    try:
        stdout, _ = proc.communicate(timeout=WORKER_EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        stop_worker(proc)
        raise BenchError(f"N={n}: a device worker did not finish; log tail:\n{_tail(log)}") from None
    lines = [line for line in stdout.splitlines() if line.strip()]
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise BenchError(f"N={n}: a device worker printed no JSON; log tail:\n{_tail(log)}") from None
    result["exit_code"] = proc.returncode
    return result


def merge_work(workers: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The workers' per-version records as one fleet's."""
    merged: dict[int, dict[str, Any]] = {}
    for w in workers:
        for v, rec in w["work"].items():
            m = merged.setdefault(int(v), {
                "version": int(v), "phase": rec["phase"], "updates": 0, "sealed_bytes": 0, "busy_s": 0.0,
                "all_acknowledged": True, "first_arrival": None, "first_publish": None, "last_publish": None,
            })
            m["updates"] += rec["updates"]
            m["sealed_bytes"] += rec["sealed_bytes"]
            m["busy_s"] += rec["busy_s"]
            m["all_acknowledged"] = m["all_acknowledged"] and rec["all_acknowledged"]
            for key, pick in (("first_arrival", min), ("first_publish", min), ("last_publish", max)):
                if rec[key] is not None:
                    m[key] = rec[key] if m[key] is None else pick(m[key], rec[key])
    for m in merged.values():
        m["mean_sealed_bytes"] = m["sealed_bytes"] / m["updates"] if m["updates"] else None
    return merged


def broker_log_issues(path: Path) -> dict[str, Any]:
    """Errors and warnings in mosquitto's log (fd limits, memory, dropped messages, ...)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {"lines": 0, "errors": [], "warnings": []}
    errors = [line for line in lines if "Error" in line or "error" in line]
    warnings = [line for line in lines if "Warning" in line or "warning" in line or "dropped" in line.lower()]
    return {"lines": len(lines), "errors": errors[:10], "error_count": len(errors),
            "warnings": warnings[:10], "warning_count": len(warnings)}


def log_issues(path: Path) -> dict[str, Any]:
    """WARNING and ERROR lines of the aggregator's log (inbox_full drops, rejected updates, ...)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {"warning_count": 0, "error_count": 0, "first": []}
    bad = [line for line in lines if " WARNING " in line or " ERROR " in line]
    return {"warning_count": sum(" WARNING " in line for line in bad),
            "error_count": sum(" ERROR " in line for line in bad), "first": bad[:5]}


def manifest_verify_ms(loaded: Any, n: int, calls: int = 20) -> dict[str, Any]:
    """What one device spends on the signed manifest of a round selecting N devices: the whole
    ``verify_manifest`` of the device core (parse excluded: the simulator parses once per frame)
    and its JSON depth check alone, median of ``calls`` (a real manifest from a RoundEngine)."""
    from nacl.public import PrivateKey
    from nacl.signing import SigningKey

    from fedge.agent.core import verify_manifest
    from fedge.protocol.bounded_json import DEFAULT_MAX_DEPTH, nesting_depth_exceeds
    from fedge.protocol.codec import Codec
    from fedge.protocol.round_manifest import round_manifest_from_dict
    from fedge.protocol.signing import key_id
    from rounds_common import device_ids, make_engine

    signing = SigningKey.generate()
    public = PrivateKey.generate().public_key  # every device may share one: only the ids are signed
    registry = dict.fromkeys(device_ids(n), public)
    eng = make_engine(loaded, Codec.FP32, registry, PrivateKey.generate(), signing)
    pub = eng.open_round(time.time())
    frame = pub.manifest_frame
    trusted = {key_id(signing.verify_key): signing.verify_key}
    parsed = round_manifest_from_dict(json.loads(json.dumps(pub.manifest.to_dict())))
    body = json.dumps(pub.manifest.to_dict(), separators=(",", ":")).encode()

    def median_ms(call: Any) -> float:
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            call()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    return {
        "selected_devices": n,
        "frame_bytes": len(frame),
        "verify_ms": median_ms(lambda: verify_manifest(frame, trusted, fleet=eng.fleet, now=None,
                                                       parse=lambda doc: parsed)),
        "json_depth_check_ms": median_ms(lambda: nesting_depth_exceeds(body, DEFAULT_MAX_DEPTH)),
        "json_loads_ms": median_ms(lambda: json.loads(body)),
    }


# --- one fleet size ---------------------------------------------------------------------------------


def scale_run(n: int, cfg: Config, exe: Path, model_dir: Path, loaded: Any, work_dir: Path) -> dict[str, Any]:
    """N devices, a fresh broker, the real aggregator; cfg.rounds train rounds."""
    from fedge.aggregator.checkpoint import load_checkpoint
    from fedge.aggregator.service import CHECKPOINT_FILE, MAX_CHECKPOINT_BYTES, state_from_checkpoint
    from fedge.lab.broker import BrokerSettings, MosquittoBroker, render_mosquitto_conf
    from fedge.lab.provision import create_fleet
    from fedge.protocol.signing import signing_key_to_text
    from fedge.protocol.topics import FleetTopics
    from mqtt_sim import ManifestSeen, RoundTraffic
    from rounds_common import device_ids

    load_before = os.getloadavg()
    fleet_id = f"scale-n{n}-{uuid.uuid4().hex[:6]}"
    timeout = round_timeout_s(n)
    budget = WAIT_FOR_DEVICES_S + (cfg.rounds + 2) * timeout + 60.0
    started = time.perf_counter()
    t0 = time.perf_counter()
    files = create_fleet(
        work_dir / f"fleet-n{n}", fleet_id, model_dir, PLACEHOLDER_URL, dict.fromkeys(device_ids(n), 1),
        rounds={
            "rounds": cfg.rounds,
            "min_devices": n,  # every device must report: the round closes when the last one did
            "round_timeout_s": timeout,  # never the reason a round closes (see round_timeout_s)
            "codec": cfg.codec,
            "server_learning_rate": 1.0,
            "wait_for_devices_s": WAIT_FOR_DEVICES_S,  # the devices are online before it starts
        },
    )
    fleet_create_s = time.perf_counter() - t0
    settings = BrokerSettings(data_dir=work_dir / f"mosquitto-n{n}")
    broker = MosquittoBroker(settings, executable=exe)
    sampler = Sampler()
    workers: list[tuple[subprocess.Popen[str], Path]] = []
    proc: subprocess.Popen[str] | None = None
    obs: subprocess.Popen[str] | None = None
    agg_log = work_dir / f"aggregator-n{n}.log"
    obs_log = work_dir / f"observer-n{n}.log"
    try:
        broker.start()
        # The aggregator's config names the broker's URL, known only now (a free port).
        conf = files.aggregator_config.read_text().replace(PLACEHOLDER_URL, broker.url)
        files.aggregator_config.write_text(conf)
        assert broker.pid is not None
        sampler.watch("broker", broker.pid)
        sampler.start()
        time.sleep(2 * SAMPLE_S)
        broker_idle_rss = proc_memory(broker.pid)[0]
        verify_text = signing_key_to_text(files.signing_key.verify_key)
        obs = start_observer(broker, fleet_id, verify_text, obs_log, timeout=budget)
        sampler.watch("observer", obs.pid)
        sampler.watch("bench", os.getpid())
        t0 = time.perf_counter()
        workers = start_device_workers(n, cfg, broker, fleet_id, files, loaded, work_dir, budget)
        for w, (p, _) in enumerate(workers):
            sampler.watch(f"devices-{w}", p.pid)
        wait_ready(workers, connect_timeout_s(n) + 10.0, n)
        connect_s = time.perf_counter() - t0
        time.sleep(2 * SAMPLE_S)
        broker_connected_rss = proc_memory(broker.pid)[0]
        agg_started = time.monotonic()
        proc = start_worker(["aggregator", "--config", str(files.aggregator_config)], agg_log)
        agg_pid = child_pid(proc.pid)
        if agg_pid is None:
            raise BenchError(f"N={n}: cannot find the aggregator's process; log tail:\n{_tail(agg_log)}")
        sampler.watch("aggregator", agg_pid)
        deadline = time.monotonic() + budget + 10.0
        while obs.poll() is None:  # the observer exits once it saw the final manifest
            if proc.poll() is not None and proc.returncode != 0:
                raise BenchError(f"the aggregator (N={n}) failed; log tail:\n{_tail(agg_log)}")
            for p, log in workers:
                if p.poll() is not None and p.returncode != 0:
                    raise BenchError(f"N={n}: a device worker failed (exit {p.returncode}); "
                                     f"log tail:\n{_tail(log)}")
            if time.monotonic() >= deadline:
                raise BenchError(f"N={n}: no final manifest after {budget:.0f}s; log tail:\n{_tail(agg_log)}")
            time.sleep(0.05)
        seen = finish_observer(obs, n, obs_log)
        agg = finish_worker(proc, f"aggregator N={n}", AGGREGATOR_EXIT_TIMEOUT_S, agg_log)
        devices = [finish_device_worker(p, log, n) for p, log in workers]
        sampler.stop()
        broker_peak_hwm = proc_memory(broker.pid)[1]
        broker_nofile = max_open_files(broker.pid)
        total_s = time.perf_counter() - started
    finally:
        if proc is not None:
            stop_worker(proc)
        if obs is not None:
            stop_worker(obs)
        for p, _ in workers:
            stop_worker(p)
        sampler.stop()
        broker.stop()
    load_after = os.getloadavg()

    observed = sorted((ManifestSeen(**d) for d in seen["manifests"]), key=lambda s: s.version)
    traffic = {int(v): RoundTraffic(**t) for v, t in seen["traffic"].items()}
    work = merge_work(devices)
    ck = load_checkpoint(files.root / "state" / "aggregator" / CHECKPOINT_FILE, MAX_CHECKPOINT_BYTES)
    if ck is None:
        raise BenchError(f"N={n}: the aggregator left no checkpoint")
    state = state_from_checkpoint(ck)
    history = {h["round_id"]: h for h in state.history}
    worker_names = [f"devices-{w}" for w in range(len(devices))]

    rounds: list[dict[str, Any]] = []
    for cur, nxt in itertools.pairwise(observed):
        wk = work.get(cur.version)
        t = traffic.get(cur.version)
        span = nxt.arrived - cur.arrived
        agg_cpu = sampler.cpu_between("aggregator", cur.arrived, nxt.arrived)
        broker_cpu = sampler.cpu_between("broker", cur.arrived, nxt.arrived)
        dev_cpus = [sampler.cpu_between(w, cur.arrived, nxt.arrived) for w in worker_names]
        dev_cpu = None if any(c is None for c in dev_cpus) else sum(c for c in dev_cpus if c is not None)
        machine = sampler.cpu_between("machine", cur.arrived, nxt.arrived)
        ours = [agg_cpu, broker_cpu, dev_cpu, sampler.cpu_between("observer", cur.arrived, nxt.arrived),
                sampler.cpu_between("bench", cur.arrived, nxt.arrived)]
        others = (
            (machine - sum(c for c in ours if c is not None)) / span
            if machine is not None and span > 0 and all(c is not None for c in ours) else None
        )
        last_out = wk["last_publish"] if wk else None
        rounds.append({
            "version": cur.version,
            "round_id": cur.round_id,
            "phase": cur.phase,
            "overhead_ms": span * 1e3,
            "sim_devices_ms": (last_out - cur.arrived) * 1e3 if last_out else None,
            "aggregator_tail_ms": (nxt.arrived - last_out) * 1e3 if last_out else None,
            "collect_ms": (t.all_reported_at - cur.arrived) * 1e3 if t and t.all_reported_at else None,
            "close_and_announce_ms": (
                (nxt.arrived - t.all_reported_at) * 1e3 if t and t.all_reported_at else None
            ),
            "aggregator_cpu_s": agg_cpu,
            "broker_cpu_s": broker_cpu,
            "devices_cpu_s": dev_cpu,
            "devices_cpu_s_per_worker": dev_cpus,
            "machine_busy_cores": machine / span if machine is not None and span > 0 else None,
            "other_processes_cores": others,
            "max_inbox_messages": t.max_inbox_messages if t else None,
            "max_inbox_bytes": t.max_inbox_bytes if t else None,
            "aggregator_cpu_share": agg_cpu / span if agg_cpu is not None and span > 0 else None,
            "broker_cpu_share": broker_cpu / span if broker_cpu is not None and span > 0 else None,
            "devices_cpu_share_max_worker": (
                max(c for c in dev_cpus if c is not None) / span
                if dev_cpus and all(c is not None for c in dev_cpus) and span > 0 else None
            ),
            "manifest_bytes": cur.frame_bytes,
            "status_bytes": t.status_bytes if t else 0,
            "status_messages": t.status_messages if t else 0,
            "devices": (
                {k: v for k, v in wk.items() if k not in ("first_arrival", "first_publish", "last_publish")}
                if wk else None
            ),
            "aggregator_record": history.get(cur.round_id, {}),
        })
    train = [r for r in rounds if r["phase"] == "train"]

    def med(key: str) -> float | None:
        values = [r[key] for r in train if r[key] is not None]
        return statistics.median(values) if values else None

    problems: list[str] = []
    versions = [s.version for s in observed]
    if versions != list(range(1, len(versions) + 1)):
        problems.append(f"manifest versions seen {versions} are not 1..k")
    if len(train) != cfg.rounds:
        problems.append(f"{len(train)} train rounds observed, expected {cfg.rounds}")
    for r in rounds:
        rec, dev = r["aggregator_record"], r["devices"]
        if rec.get("outcome") != "aggregated" or rec.get("reported") != n:
            problems.append(f"round {r['round_id']}: {rec.get('outcome')} with {rec.get('reported')}/{n}")
        if dev is None or dev["updates"] != n or not dev["all_acknowledged"]:
            problems.append(f"round {r['round_id']}: devices sent {dev and dev['updates']}/{n} (or unacked)")
        elif rec.get("mean_update_bytes") != dev["mean_sealed_bytes"]:
            problems.append(f"round {r['round_id']}: aggregator counted {rec.get('mean_update_bytes')} B per "
                            f"update, devices sealed {dev['mean_sealed_bytes']}")
        for key in ("aggregator_cpu_s", "broker_cpu_s", "devices_cpu_s"):
            if r["phase"] == "train" and r[key] is None:
                problems.append(f"round {r['round_id']}: no {key} measurement")
    if state.rejected_total:
        problems.append(f"rejected updates: {state.rejected_total}")
    if agg.get("exit_code") != 0:
        problems.append(f"aggregator exit code {agg.get('exit_code')}")
    for i, d in enumerate(devices):
        if d["exit_code"] != 0 or not d["finished"] or d["error_count"]:
            problems.append(f"device worker {i}: exit {d['exit_code']}, finished {d['finished']}, "
                            f"{d['error_count']} errors {d['errors'][:3]}")
    agg_hwm = sampler.peak_hwm("aggregator")
    if agg.get("peak_rss_bytes") is None or agg_hwm is None or broker_peak_hwm is None:
        problems.append("a peak RSS measurement is missing (aggregator ru_maxrss / VmHWM, broker VmHWM)")
    elif abs(agg["peak_rss_bytes"] - agg_hwm) > 0.05 * agg_hwm:
        problems.append(f"aggregator ru_maxrss {agg['peak_rss_bytes']} != sampled VmHWM {agg_hwm}")

    first_manifest = observed[0].arrived if observed else None
    # Where the aggregator's peak comes from: the round whose span saw VmHWM reach its final value,
    # and the largest RSS sampled (10 Hz) during the train rounds alone.
    peak_at = sampler.peak_reached_at("aggregator")
    peak_phase = None
    if peak_at is not None and observed:
        before = peak_at < observed[0].arrived
        peak_phase = "before the first manifest" if before else "after the final manifest"
        for cur, nxt in itertools.pairwise(observed):
            if cur.arrived <= peak_at <= nxt.arrived:
                peak_phase = f"{cur.phase} round v{cur.version} (or its close)"
    train_span = [m.arrived for m in observed if m.phase == "train"]
    train_max_rss = (
        sampler.max_rss_between("aggregator", train_span[0], observed[-1].arrived) if train_span else None
    )
    update_bytes = train[0]["devices"]["mean_sealed_bytes"] if train and train[0]["devices"] else None
    agg_cpu_round = med("aggregator_cpu_s")
    dev_cpu_round = med("devices_cpu_s")
    overhead = med("overhead_ms")
    agg_peak = agg["peak_rss_bytes"]
    topic = FleetTopics(fleet_id).update(device_ids(n)[-1])
    return {
        "devices": n,
        "workers": len(devices),
        "fleet": fleet_id,
        "codec": cfg.codec,
        "round_timeout_s": timeout,
        "min_devices": n,
        "train_rounds": len(train),
        "rounds_completed": state.completed_rounds,
        "overhead_ms_median": overhead,
        "overhead_ms_min": min((r["overhead_ms"] for r in train), default=None),
        "overhead_ms_max": max((r["overhead_ms"] for r in train), default=None),
        "overhead_ms_per_device": overhead / n if overhead is not None else None,
        "sim_devices_ms_median": med("sim_devices_ms"),
        "aggregator_tail_ms_median": med("aggregator_tail_ms"),
        "collect_ms_median": med("collect_ms"),
        "close_and_announce_ms_median": med("close_and_announce_ms"),
        "aggregator_cpu_s_per_round": agg_cpu_round,
        "aggregator_cpu_ms_per_device_round": agg_cpu_round * 1e3 / n if agg_cpu_round is not None else None,
        "broker_cpu_s_per_round": med("broker_cpu_s"),
        "devices_cpu_s_per_round": med("devices_cpu_s"),
        "devices_cpu_ms_per_device_round": dev_cpu_round * 1e3 / n if dev_cpu_round is not None else None,
        "cpu_share_median": {
            "aggregator": med("aggregator_cpu_share"),
            "broker": med("broker_cpu_share"),
            "device_worker_max": med("devices_cpu_share_max_worker"),
            "machine_busy_cores": med("machine_busy_cores"),
            "other_processes_cores": med("other_processes_cores"),
        },
        "aggregator_max_inbox_messages": max((r["max_inbox_messages"] or 0 for r in train), default=None),
        "aggregator_max_inbox_mb": max((r["max_inbox_bytes"] or 0 for r in train), default=0) / MB,
        "aggregator_log": log_issues(agg_log),
        "device_manifest_verify_ms": manifest_verify_ms(loaded, n),
        "aggregator_peak_rss_mb": agg_peak / MB,
        "aggregator_peak_rss_vmhwm_mb": agg_hwm / MB if agg_hwm else None,
        "aggregator_rss_before_rounds_mb": _mb(sampler.rss_at("aggregator", first_manifest))
        if first_manifest else None,
        "aggregator_peak_reached_in": peak_phase,
        "aggregator_train_rounds_max_rss_mb": _mb(train_max_rss),
        "aggregator_startup_s": first_manifest - agg_started if first_manifest else None,
        "aggregator_process": agg,
        # RSS over time, against the manifests (seconds since the first one): where memory grows.
        "timeline": {
            "columns": ["s", "rss_mb", "peak_rss_mb", "cpu_s"],
            "manifests_s": [round(m.arrived - first_manifest, 2) for m in observed] if first_manifest else [],
            "aggregator": sampler.timeline("aggregator", first_manifest) if first_manifest else [],
            "broker": sampler.timeline("broker", first_manifest) if first_manifest else [],
        },
        "broker_idle_rss_mb": _mb(broker_idle_rss),
        "broker_connected_rss_mb": _mb(broker_connected_rss),
        "broker_peak_rss_mb": _mb(broker_peak_hwm),
        "broker_kb_per_device_connected": (broker_connected_rss - broker_idle_rss) / n / 1e3
        if broker_connected_rss and broker_idle_rss else None,
        "broker_kb_per_device_peak": (broker_peak_hwm - broker_idle_rss) / n / 1e3
        if broker_peak_hwm and broker_idle_rss else None,
        "broker_max_open_files": broker_nofile,
        "broker_conf": render_mosquitto_conf(settings, 1883).splitlines(),
        "broker_log": broker_log_issues(settings.log_path),
        "device_workers": [{k: v for k, v in d.items() if k != "work"} for d in devices],
        "devices_peak_rss_mb": [d["peak_rss_bytes"] / MB for d in devices],
        "update_bytes": update_bytes,
        "update_mqtt5_publish_bytes": mqtt5_publish_bytes(topic, int(update_bytes)) if update_bytes else None,
        "manifest_bytes": train[0]["manifest_bytes"] if train else None,
        "manifest_fanout_mb_per_round": train[0]["manifest_bytes"] * n / MB if train else None,
        "status_bytes_per_round_median": med("status_bytes"),
        "moments_round_overhead_ms": next(
            (r["overhead_ms"] for r in rounds if r["phase"] == "moments"), None
        ),
        "fleet_create_s": fleet_create_s,
        "connect_s": connect_s,
        "total_s": total_s,
        "load_average_before": list(load_before),
        "load_average_after": list(load_after),
        "rounds": rounds,
        "problems": problems,
    }


# --- the benchmark ------------------------------------------------------------------------------


def run(cfg: Config) -> dict[str, Any]:
    started = time.perf_counter()
    from fedge.lab.broker import find_mosquitto
    from fedge.protocol.task import parse_task_spec
    from rounds_common import load

    try:
        task = parse_task_spec(cfg.task_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BenchError(f"cannot read task spec {cfg.task_path}: {exc.strerror}") from None
    exe = find_mosquitto()
    if exe is None:
        raise BenchError("mosquitto is not installed (apt-get install mosquitto, or scripts/system-deps.sh)")
    # The broker holds a socket per device (plus its own files); each worker its devices' sockets.
    nofile = raise_nofile(max(cfg.sizes) + 4096)
    if nofile["after"][0] < max(cfg.sizes) + 64:
        raise BenchError(f"RLIMIT_NOFILE {nofile['after']} is too low for {max(cfg.sizes)} connections")
    load_start = os.getloadavg()
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} "
          f"({os.cpu_count()} CPUs)", flush=True)
    with tempfile.TemporaryDirectory(prefix="fedge-bench-scale-") as tmp_s:
        tmp = Path(tmp_s)
        model_dir = cfg.model_dir
        build_summary: dict[str, Any] = {}
        if model_dir is None:
            print(f"building the {task.name} model (fedge model build, subprocess) ...", flush=True)
            model_dir = tmp / "model"
            build_summary = build_model_dir(cfg.task_path, model_dir, tmp)
        loaded = load(model_dir)
        results: list[dict[str, Any]] = []
        failures: list[dict[str, Any]] = []
        for n in cfg.sizes:
            la = os.getloadavg()
            print(f"N={n}: {cfg.rounds} train rounds, {cfg.workers} device workers, round_timeout_s "
                  f"{round_timeout_s(n):.0f} (load {la[0]:.2f}) ...", flush=True)
            try:
                r = scale_run(n, cfg, exe, model_dir, loaded, tmp)
            except BenchError as exc:
                # Keep what the smaller fleets measured; a larger one would fail the same way.
                print(f"      N={n} FAILED: {exc}", flush=True)
                failures.append({"devices": n, "error": str(exc)})
                break
            print(f"      overhead median {_f(r['overhead_ms_median'])} ms, aggregator peak "
                  f"{r['aggregator_peak_rss_mb']:.1f} MB, broker peak {_f(r['broker_peak_rss_mb'])} MB, "
                  f"{r['total_s']:.0f}s" + (f"; PROBLEMS: {r['problems'][:3]}" if r["problems"] else ""),
                  flush=True)
            results.append(r)
    if not results:
        raise BenchError(f"no fleet size completed: {failures}")
    return assemble(cfg, task, build_summary, loaded, results, failures, exe, nofile, load_start,
                    time.perf_counter() - started)


def git_state() -> dict[str, Any]:
    """Which code was measured: HEAD and the files that differ from it (others may be editing)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10,
                                  check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.rstrip("\n") if done.returncode == 0 else None

    status = git("status", "--porcelain")
    return {"head": git("rev-parse", "HEAD"),
            "modified": [line[3:] for line in status.splitlines()] if status else []}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of ys over xs."""
    if len(xs) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else None


def growth(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """From each N to the next: how the round overhead, its parts and the aggregator grow."""
    rows = []
    for lo, hi in itertools.pairwise(results):
        n_ratio = hi["devices"] / lo["devices"]
        row: dict[str, Any] = {"from": lo["devices"], "to": hi["devices"], "n_ratio": n_ratio}
        for key in ("overhead_ms_median", "sim_devices_ms_median", "aggregator_tail_ms_median",
                    "aggregator_cpu_s_per_round", "broker_cpu_s_per_round", "devices_cpu_s_per_round"):
            ratio = _ratio(hi[key], lo[key])
            row[key] = {
                "ratio": ratio,
                "ratio_over_n_ratio": ratio / n_ratio if ratio is not None else None,
                "exponent": (
                    math.log(ratio) / math.log(n_ratio) if ratio and ratio > 0 and n_ratio > 1 else None
                ),
            }
        row["aggregator_rss_slope_mb_per_1000"] = (
            (hi["aggregator_peak_rss_mb"] - lo["aggregator_peak_rss_mb"])
            / (hi["devices"] - lo["devices"]) * 1000
        )
        if hi["broker_peak_rss_mb"] is not None and lo["broker_peak_rss_mb"] is not None:
            row["broker_rss_slope_mb_per_1000"] = (
                (hi["broker_peak_rss_mb"] - lo["broker_peak_rss_mb"]) / (hi["devices"] - lo["devices"]) * 1000
            )
        rows.append(row)
    return rows


def bottleneck(r: dict[str, Any]) -> dict[str, Any]:
    """Which process limits the rounds at this N: CPU share of one core during the train rounds."""
    shares = r["cpu_share_median"]
    candidates = {
        "aggregator": shares["aggregator"],
        "broker": shares["broker"],
        "device simulator (busiest worker)": shares["device_worker_max"],
    }
    known = {k: v for k, v in candidates.items() if v is not None}
    top = max(known, key=lambda k: known[k]) if known else None
    machine = shares["machine_busy_cores"]
    cpus = os.cpu_count() or 1
    return {
        "devices": r["devices"],
        "shares_of_one_core": candidates,
        "machine_busy_cores": machine,
        "machine_cores": cpus,
        "busiest": top,
        "busiest_saturated": bool(top and known[top] >= SATURATED_SHARE),
        "machine_saturated": bool(machine is not None and machine >= SATURATED_SHARE * cpus),
        "other_processes_cores": shares["other_processes_cores"],
    }


def assemble(
    cfg: Config,
    task: Any,
    build_summary: dict[str, Any],
    loaded: Any,
    results: list[dict[str, Any]],
    failures: list[dict[str, Any]],
    exe: Path,
    nofile: dict[str, Any],
    load_start: tuple[float, float, float],
    duration_s: float,
) -> dict[str, Any]:
    machine = machine_info()
    machine["versions"].update({"paho-mqtt": _version("paho-mqtt"), "pynacl": _version("pynacl", "PyNaCl"),
                                "mosquitto": mosquitto_version(exe)})
    p = loaded.manifest.parameter_count
    rows = growth(results)
    ns = [r["devices"] for r in results]
    agg_rss = [r["aggregator_peak_rss_mb"] for r in results]
    broker_rss = [r["broker_peak_rss_mb"] for r in results if r["broker_peak_rss_mb"] is not None]
    scaling = {
        "between_sizes": rows,
        "aggregator_rss_slope_mb_per_1000_devices": (
            s * 1000 if (s := _slope(ns, agg_rss)) is not None else None
        ),
        "aggregator_train_rounds_rss_slope_mb_per_1000_devices": (
            s * 1000
            if all(r["aggregator_train_rounds_max_rss_mb"] is not None for r in results)
            and (s := _slope(ns, [r["aggregator_train_rounds_max_rss_mb"] for r in results])) is not None
            else None
        ),
        "broker_rss_slope_mb_per_1000_devices": (
            s * 1000 if len(broker_rss) == len(ns) and (s := _slope(ns, broker_rss)) is not None else None
        ),
        "overhead_exponent_nmin_to_nmax": (
            math.log(results[-1]["overhead_ms_median"] / results[0]["overhead_ms_median"])
            / math.log(ns[-1] / ns[0])
            if len(results) >= 2 and results[0]["overhead_ms_median"] and results[-1]["overhead_ms_median"]
            else None
        ),
        "bottleneck": [bottleneck(r) for r in results],
    }
    problems = [f"N={r['devices']}: {q}" for r in results for q in r["problems"]]
    checks = {
        "rounds_complete_every_device_measured": {"problems": problems, "passed": not problems},
        "every_size_ran": {
            "failed": failures,
            "largest_completed": results[-1]["devices"],
            "passed": not failures,
        },
        "aggregator_without_tensorflow": {
            "passed": not any(r["aggregator_process"].get("tensorflow_in_sys_modules") for r in results),
        },
    }
    targets = []
    if len(results) >= 2:
        growth_mb = agg_rss[-1] - agg_rss[0]
        keep_all_mb = (ns[-1] - ns[0]) * 4 * p / MB
        limit = TARGET_RSS_GROWTH_SHARE * keep_all_mb
        targets.append({
            "name": "aggregator_memory_flat_in_n",
            "description": (
                f"aggregator peak RSS grows by < {TARGET_RSS_GROWTH_SHARE:.0%} of what keeping every "
                f"fp32 delta would add, N={ns[0]}->{ns[-1]} (limit {limit:.1f} MB)"
            ),
            "value": growth_mb,
            "unit": "MB",
            "threshold": limit,
            "passed": growth_mb < limit,
        })
        worst = max(
            (row for row in rows if row["overhead_ms_median"]["ratio_over_n_ratio"] is not None),
            key=lambda row: row["overhead_ms_median"]["ratio_over_n_ratio"],
            default=None,
        )
        if worst is not None:
            value = worst["overhead_ms_median"]["ratio_over_n_ratio"]
            targets.append({
                "name": "round_overhead_at_most_linear",
                "description": (
                    f"from each N to the next, round overhead ratio / N ratio <= {LINEAR_TOLERANCE:.2f} "
                    f"(worst: N={worst['from']}->{worst['to']})"
                ),
                "value": value,
                "unit": "x",
                "threshold": LINEAR_TOLERANCE,
                "passed": all(
                    row["overhead_ms_median"]["ratio_over_n_ratio"] <= LINEAR_TOLERANCE
                    for row in rows if row["overhead_ms_median"]["ratio_over_n_ratio"] is not None
                ),
            })
    return {
        "benchmark": "fedge-scale",
        "format": 1,
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "duration_s": duration_s,
        "machine": machine,
        "load_average_at_start": list(load_start),
        "git": git_state(),
        "rlimit_nofile": nofile,
        "config": {
            "task": task.name,
            "task_file": str(cfg.task_path),
            "parameter_count": p,
            "model_bytes": build_summary.get("model_bytes"),
            "sizes": list(cfg.sizes),
            "train_rounds": cfg.rounds,
            "device_workers": cfg.workers,
            "codec": cfg.codec,
            "quick": cfg.quick,
            "mqtt_protocol": 5,
            "aggregators": 1,
            "round_timeout_s": {str(n): round_timeout_s(n) for n in cfg.sizes},
            "wait_for_devices_s": WAIT_FOR_DEVICES_S,
            "simulated_device": "verify manifest (Ed25519) + parse once per frame, normal(0, 0.01) float32 "
                                "delta, encode, seal (NaCl Box), publish QoS 1 on its own connection; no "
                                "training, no blob download",
        },
        "runs": results,
        "scaling": scaling,
        "checks": checks,
        "checks_passed": all(c["passed"] for c in checks.values()),
        "targets": targets,
        "targets_passed": all(t["passed"] for t in targets),
    }


# --- output ----------------------------------------------------------------------------------


def render_table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    runs = result["runs"]
    out = [
        f"Rounds at scale, one aggregator ({cfg['task']}, {cfg['parameter_count']:,} parameters, "
        f"{cfg['codec']}; "
        f"median of {cfg['train_rounds']} train rounds; {cfg['device_workers']} device worker processes)",
    ]
    rows = [
        (
            f"N={r['devices']}",
            f"{r['rounds_completed']}",
            _f(r["overhead_ms_median"], ",.0f"),
            _f(r["overhead_ms_per_device"], ".2f"),
            _f(r["sim_devices_ms_median"], ",.0f"),
            _f(r["aggregator_tail_ms_median"], ",.0f"),
            _f(r["aggregator_cpu_s_per_round"], ".2f"),
            _f(r["aggregator_cpu_ms_per_device_round"], ".3f"),
            _f(r["aggregator_peak_rss_mb"]),
            _f(r["aggregator_train_rounds_max_rss_mb"]),
            _f(r["broker_peak_rss_mb"]),
            _f(r["broker_kb_per_device_peak"]),
            _f(r["update_bytes"], ",.0f"),
            f"{r['manifest_bytes']:,}" if r["manifest_bytes"] else "-",
            _f(r["device_manifest_verify_ms"]["verify_ms"], ".2f"),
            _f(r["aggregator_max_inbox_messages"], ",.0f"),
        )
        for r in runs
    ]
    out += _table(
        ("devices", "rounds", "overhead ms", "ms/device", "sim devices ms", "agg tail ms", "agg CPU s/round",
         "agg CPU ms/dev/round", "agg peak RSS MB", "agg RSS train MB", "broker peak MB", "broker KB/dev",
         "update B", "manifest B", "dev verify ms", "max inbox"),
        rows,
    )
    out.append("   overhead = manifest in -> next manifest in; sim devices = manifest in -> last update out "
               "(simulator: verify, seal, publish); agg tail = last update out -> next manifest in")
    peaks = "; ".join(f"N={r['devices']}: {r['aggregator_peak_reached_in']}" for r in runs)
    out.append("   agg RSS train = the largest RSS sampled (10 Hz) during the train rounds; the peak was "
               f"reached in: {peaks}")
    out.append("   dev verify ms = one device's verify_manifest of that N's manifest; max inbox = the "
               "largest backlog (updates) the aggregator's status showed")
    out.append("")
    out.append("CPU share of one core during train rounds (median) -> bottleneck")
    brows = [
        (
            f"N={b['devices']}",
            _f(b["shares_of_one_core"]["aggregator"], ".2f"),
            _f(b["shares_of_one_core"]["broker"], ".2f"),
            _f(b["shares_of_one_core"]["device simulator (busiest worker)"], ".2f"),
            f"{_f(b['machine_busy_cores'], '.2f')}/{b['machine_cores']}",
            _f(b["other_processes_cores"], ".2f"),
            f"{b['busiest']}{' (saturated)' if b['busiest_saturated'] else ''}",
        )
        for b in result["scaling"]["bottleneck"]
    ]
    out += _table(
        ("devices", "aggregator", "broker", "device worker", "machine busy cores", "other jobs cores",
         "busiest"),
        brows,
    )
    out.append("")
    rows_g = result["scaling"]["between_sizes"]
    if rows_g:
        out.append("Growth from N to N (ratio / ratio of N: 1.0 = linear; exponent k in overhead ~ N^k)")
        grows = [
            (
                f"{g['from']}->{g['to']}",
                f"{g['n_ratio']:.1f}x",
                f"{_f(g['overhead_ms_median']['ratio'], '.2f')}x",
                _f(g["overhead_ms_median"]["ratio_over_n_ratio"], ".2f"),
                _f(g["overhead_ms_median"]["exponent"], ".2f"),
                _f(g["sim_devices_ms_median"]["exponent"], ".2f"),
                _f(g["aggregator_tail_ms_median"]["exponent"], ".2f"),
                _f(g["aggregator_cpu_s_per_round"]["exponent"], ".2f"),
                _f(g["aggregator_rss_slope_mb_per_1000"], ".2f"),
                _f(g.get("broker_rss_slope_mb_per_1000"), ".1f"),
            )
            for g in rows_g
        ]
        out += _table(
            ("N", "N ratio", "overhead ratio", "ratio/ratio", "overhead k", "sim devices k", "agg tail k",
             "agg CPU k", "agg RSS MB/1000 dev", "broker MB/1000 dev"),
            grows,
        )
        sc = result["scaling"]
        agg_slope = _f(sc["aggregator_rss_slope_mb_per_1000_devices"], ".2f")
        broker_slope = _f(sc["broker_rss_slope_mb_per_1000_devices"], ".1f")
        train_slope = _f(sc["aggregator_train_rounds_rss_slope_mb_per_1000_devices"], ".2f")
        out.append(f"   aggregator peak RSS slope (least squares) {agg_slope} (train rounds alone: "
                   f"{train_slope}) MB per 1000 devices; broker {broker_slope} MB per "
                   f"1000 devices; overhead exponent N={runs[0]['devices']}->{runs[-1]['devices']}: "
                   f"{_f(sc['overhead_exponent_nmin_to_nmax'], '.2f')}")
        out.append("")
    for t in result["targets"]:
        out.append(f"target {'PASS' if t['passed'] else 'MISS'}: {t['description']} "
                   f"(measured {t['value']:.2f} {t['unit']})")
    for name, c in result["checks"].items():
        detail = f": {c.get('problems') or c.get('failed')}" if not c["passed"] else ""
        out.append(f"check  {'ok  ' if c['passed'] else 'FAIL'}: {name}{detail}")
    mach = result["machine"]
    v = mach["versions"]
    la = result["load_average_at_start"]
    out += [
        "",
        f"machine: {mach['platform']}, {mach['cpu_model']}, {mach['cpu_count']} CPUs, "
        f"Python {mach['python']}, mosquitto {v['mosquitto']}, paho-mqtt {v['paho-mqtt']}, "
        f"pynacl {v['pynacl']}; load average at start "
        f"{la[0]:.2f} {la[1]:.2f} {la[2]:.2f}; RLIMIT_NOFILE {result['rlimit_nofile']['after']}",
    ]
    return "\n".join(out)


def plot(path: Path, result: dict[str, Any]) -> bool:
    """Four panels against N (log-log where growth matters); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    runs = result["runs"]
    ns = [r["devices"] for r in runs]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    ax = axes[0][0]
    over = [r["overhead_ms_median"] / 1e3 for r in runs]
    ax.loglog(ns, over, "o-", label="round overhead")
    ax.loglog(ns, [(r["sim_devices_ms_median"] or math.nan) / 1e3 for r in runs], "s--",
              label="sim devices part")
    ax.loglog(ns, [(r["aggregator_tail_ms_median"] or math.nan) / 1e3 for r in runs], "^--",
              label="aggregator tail")
    ax.loglog(ns, [over[0] * n / ns[0] for n in ns], ":", color="grey", label="linear from smallest N")
    ax.set_xlabel("devices")
    ax.set_ylabel("seconds per round")
    ax.set_title("Round overhead")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    ax.plot(ns, [r["aggregator_peak_rss_mb"] for r in runs], "o-", label="aggregator peak")
    ax.plot(ns, [r["aggregator_train_rounds_max_rss_mb"] or math.nan for r in runs], "^--",
            label="aggregator, train rounds (sampled)")
    ax.plot(ns, [r["aggregator_rss_before_rounds_mb"] or math.nan for r in runs], "s--",
            label="aggregator before rounds")
    ax.set_xscale("log")
    ax.set_xlabel("devices")
    ax.set_ylabel("MB")
    ax.set_title("Aggregator RSS")
    ax.legend(fontsize=8)
    ax = axes[1][0]
    ax.plot(ns, [r["aggregator_cpu_ms_per_device_round"] for r in runs], "o-", label="aggregator")
    ax.plot(ns, [r["devices_cpu_ms_per_device_round"] or math.nan for r in runs], "s--",
            label="device simulator")
    ax.set_xscale("log")
    ax.set_xlabel("devices")
    ax.set_ylabel("CPU ms per device per round")
    ax.set_title("CPU cost per device")
    ax.legend(fontsize=8)
    ax = axes[1][1]
    ax.plot(ns, [r["broker_peak_rss_mb"] or math.nan for r in runs], "o-", label="broker peak")
    ax.plot(ns, [r["broker_connected_rss_mb"] or math.nan for r in runs], "s--",
            label="broker, devices connected")
    ax.set_xscale("log")
    ax.set_xlabel("devices")
    ax.set_ylabel("MB")
    ax.set_title("Mosquitto RSS")
    ax.legend(fontsize=8)
    fig.suptitle(f"fedge at scale: {result['config']['task']}, one aggregator, "
                 f"{result['config']['train_rounds']} rounds per N")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    from fedge.protocol.errors import FedgeError

    try:
        result = run(cfg)
        write_json(result, cfg.out)
    except (BenchError, FedgeError) as exc:
        print(f"bench_scale: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_scale: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a library failed in a way nobody anticipated: keep the traceback
        traceback.print_exc()
        print(f"bench_scale: error: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    png = cfg.out.with_suffix(".png")
    plotted = plot(png, result)
    print()
    print(render_table(result))
    print(f"\nresults: {cfg.out}{f' and {png}' if plotted else ''}  (total {result['duration_s']:.1f}s)")
    if not result["checks_passed"]:
        print("bench_scale: error: a validity check failed (see 'check FAIL' above); the numbers are not "
              "trustworthy", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
