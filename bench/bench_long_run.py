"""Memory over 1,000 rounds: does any fedge process creep up round after round? (issue 18)

RSS that grows a little every round is a known failure of long-running federated-learning
stacks (a history list, a cache keyed by round, a leaked interpreter); it takes a gateway or a
board down after weeks, and no short benchmark sees it. This one runs a real fleet for R rounds
and reads every process's memory at the close of each round.

Everything is the product: a real Mosquitto, the real aggregator (``fedge aggregator run``) and
real agents (``fedge agent run``, LiteRT) on the default task (``tasks/har-watch.toml``), 7
devices on the smartwatch data set, each reading its subject's recordings from a CSV file as a
device's logger writes them (``[data] source = "csv"``, as ``fedge demo --data direct`` does),
provisioned by :func:`fedge.lab.provision.create_fleet` as ``fedge demo`` does.
Every round selects every device; the deadline is far longer than a round.

Measured (``/proc`` every 0.25 s, ``bench_fleet_budget.Sampler``): each process's RSS at the close
of every round (the aggregator log's "round ... aggregated"). The baseline is the same run's
own earlier rounds. A cache that fills up (SQLite's page cache, the allocator's arenas) grows
for a while and stops; a leak never stops. So the verdict is taken on the run's second half:
a process is **flat** when its least-squares slope over rounds R/2..R is under 64 KB per 100
rounds (one model's worth of float32 weights is 22 KB) and its RSS at round R is within 1 MB of
its RSS at round R/2. The growth from the warm-up (round ``--warmup``, default 20) to the end
is reported beside it: what a fleet sees in its first weeks.

``python bench/bench_long_run.py [--rounds 1000] [--warmup 20] [--quick] [--replot JSON]`` (``make
bench-long-run``); JSON to bench/results/long_run.json, the plot (RSS per process against the
round) beside it. ``--quick``: 60 rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bench_fleet_budget import (  # noqa: E402
    Sampler,
    Trace,
    fedge_argv,
    read_aggregator_log,
    spawn,
    terminate,
)
from bench_rounds import DEFAULT_TASK, build_model_dir  # noqa: E402
from bench_training import machine_info  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "long_run.json"
FLEET = "longrun"
DEVICES = 7
KB = 1024
MB = 1024 * 1024
#: A process is flat when, over the run's second half, its slope (bytes per 100 rounds) and its
#: growth stay under these.
FLAT_SLOPE_PER_100 = 64 * KB
FLAT_GROWTH = 1 * MB


@dataclass(frozen=True)
class Config:
    rounds: int
    warmup: int
    out: Path
    replot: Path | None = None


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=None, help="train rounds (default 1000)")
    parser.add_argument("--warmup", type=int, default=20, help="rounds before the baseline reading")
    parser.add_argument("--quick", action="store_true", help="60 rounds")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--replot", type=Path, help="render a saved JSON's table and plot again; no run")
    a = parser.parse_args(argv)
    rounds = a.rounds if a.rounds is not None else (60 if a.quick else 1000)
    if rounds < a.warmup + 10:
        parser.error(f"--rounds must be at least --warmup + 10 ({a.warmup + 10})")
    return Config(rounds, a.warmup, a.out, a.replot)


def rss_at(trace: Trace, t: float) -> int | None:
    """The last RSS sample at or before t."""
    best = None
    for ts, _, rss in trace.samples:
        if ts > t:
            break
        best = rss
    return best


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys against xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return 0.0 if den == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den


def analyse(name: str, trace: Trace, closes: list[tuple[int, float]], warmup: int) -> dict[str, Any]:
    series = [(k, r) for k, t in closes if (r := rss_at(trace, t)) is not None]
    after = [(k, r) for k, r in series if k >= warmup]
    if len(after) < 4:
        return {"process": name, "series": series, "flat": None, "problem": "too few readings"}
    half = [(k, r) for k, r in after if k >= series[-1][0] / 2]
    per_round = slope([k for k, _ in half], [r for _, r in half])
    base, middle, last = after[0][1], half[0][1], half[-1][1]
    flat = per_round * 100 < FLAT_SLOPE_PER_100 and last - middle < FLAT_GROWTH
    return {
        "process": name,
        "rss_after_warmup_mb": base / MB,
        "rss_half_mb": middle / MB,
        "rss_last_round_mb": last / MB,
        "growth_mb": (last - base) / MB,
        "second_half_growth_mb": (last - middle) / MB,
        "peak_rss_mb": trace.peak_rss / MB,
        "slope_kb_per_100_rounds": per_round * 100 / KB,
        "flat": flat,
        "series": series,
    }


def run(cfg: Config) -> dict[str, Any]:
    from fedge.lab.broker import BrokerSettings, MosquittoBroker
    from fedge.lab.demo import write_device_csvs
    from fedge.lab.provision import create_fleet
    from fedge.protocol.task import parse_task_spec

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedge-bench-long-") as tmp_s:
        tmp = Path(tmp_s)
        print("building the default model (fedge model build, subprocess) ...", flush=True)
        model_dir = tmp / "model"
        build_model_dir(DEFAULT_TASK, model_dir, tmp)
        logs = tmp / "logs"
        broker = MosquittoBroker(BrokerSettings(data_dir=tmp / "broker", persistence=False)).start()
        sampler = Sampler()
        procs: dict[str, subprocess.Popen[bytes]] = {}
        subjects = {f"watch-{i:02d}": i for i in range(1, DEVICES + 1)}
        try:
            assert broker.pid is not None
            sampler.add("broker", broker.pid, ("-c",))
            rounds_table: dict[str, object] = {
                "rounds": cfg.rounds,
                "min_devices": DEVICES,
                "round_timeout_s": 120.0,
                "server_learning_rate": 2.0,
                "wait_for_devices_s": 60.0,
            }
            # Each agent reads its subject's recordings from a CSV as a device's logger writes
            # them ([data] source = "csv", what `fedge demo --data direct` does): the agent
            # process is the device's, with no data-set packages in it.
            direct = write_device_csvs(tmp / "devices", parse_task_spec(DEFAULT_TASK.read_text()), subjects)
            fleet = create_fleet(
                tmp / "fleet",
                FLEET,
                model_dir,
                broker.url,
                subjects,
                rounds_table,
                task_file=DEFAULT_TASK,
                csv_files=direct.files,
            )
            sampler.start()
            for device, conf in fleet.agent_configs.items():
                procs[device] = spawn(
                    fedge_argv("agent", "run", "--config", str(conf)), logs / f"{device}.log"
                )
                sampler.add(device, procs[device].pid, ("agent", "run", str(conf)))
            procs["aggregator"] = spawn(
                fedge_argv("aggregator", "run", "--config", str(fleet.aggregator_config)),
                logs / "aggregator.log",
            )
            sampler.add("aggregator", procs["aggregator"].pid, ("aggregator", "run"))
            agg = procs["aggregator"]
            last_report = 0.0
            while agg.poll() is None:
                dead = [d for d, p in procs.items() if p.poll() is not None and d != "aggregator"]
                if dead:
                    raise SystemExit(f"agents {dead} exited during the run; see {logs}")
                if time.monotonic() - last_report > 30:
                    done = sum(1 for r in read_aggregator_log(logs / "aggregator.log") if r.closed)
                    print(f"  {done} rounds closed ({time.perf_counter() - started:.0f} s)", flush=True)
                    last_report = time.monotonic()
                time.sleep(0.5)
            time.sleep(0.6)
            if agg.returncode != 0:
                raise SystemExit(f"the aggregator exited with {agg.returncode}; see {logs}")
            rounds = read_aggregator_log(logs / "aggregator.log")
        finally:
            terminate(procs)
            sampler.stop()
            broker.stop()
        train = [r for r in rounds if r.phase == "train"]
        failed = [r.round_id for r in train if r.outcome != "aggregated" or r.reported != DEVICES]
        closes = [(r.number, r.closed) for r in train if r.closed is not None]
        processes = [analyse(name, tr, closes, cfg.warmup) for name, tr in sampler.traces.items()]
        span = (train[-1].closed or 0.0) - train[0].published if train else 0.0
    return {
        "benchmark": "long_run",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {"rounds": cfg.rounds, "warmup": cfg.warmup, "devices": DEVICES, "task": DEFAULT_TASK.name},
        "train_rounds": len(train),
        "rounds_not_aggregated_by_all": failed,
        "train_span_s": span,
        "seconds_per_round": span / len(train) if train else None,
        "flat_rule": {
            "over": "rounds R/2..R",
            "slope_kb_per_100_rounds_below": FLAT_SLOPE_PER_100 / KB,
            "growth_mb_below": FLAT_GROWTH / MB,
        },
        "processes": processes,
        "all_flat": all(p["flat"] for p in processes),
        "seconds": time.perf_counter() - started,
    }


def render(report: dict[str, Any]) -> str:
    rounds = report["train_rounds"]
    lines = [
        f"{rounds} train rounds, {report['config']['devices']} devices, "
        f"{report['seconds_per_round']:.2f} s a round; RSS at the close of round "
        f"{report['config']['warmup']}, round {rounds // 2} and the last; slope and verdict over "
        "the second half",
        f"{'process':<12} {'warm-up':>10} {'half':>10} {'last':>10} {'growth':>10} {'2nd half':>10} "
        f"{'KiB/100 r.':>10} {'peak':>10}  flat",
    ]
    for p in sorted(report["processes"], key=lambda p: p["process"]):
        if p["flat"] is None:
            lines.append(f"{p['process']:<12} {p['problem']}")
            continue
        verdict = "yes" if p["flat"] else "NO"
        lines.append(
            f"{p['process']:<12} {p['rss_after_warmup_mb']:>6.1f} MiB {p['rss_half_mb']:>6.1f} MiB "
            f"{p['rss_last_round_mb']:>6.1f} MiB {p['growth_mb']:>+6.2f} MiB "
            f"{p['second_half_growth_mb']:>+6.2f} MiB {p['slope_kb_per_100_rounds']:>10.1f} "
            f"{p['peak_rss_mb']:>6.1f} MiB  {verdict}"
        )
    if report["rounds_not_aggregated_by_all"]:
        lines.append(f"rounds not aggregated by every device: {report['rounds_not_aggregated_by_all']}")
    return "\n".join(lines)


def plot(path: Path, report: dict[str, Any]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(9, 5))
    warmup = report["config"]["warmup"]
    for p in sorted(report["processes"], key=lambda p: p["process"]):
        series = p["series"]
        base = next((r for k, r in series if k >= warmup), None)
        if base is not None:
            label = f"{p['process']} ({base / MB:.0f} MiB at round {warmup})"
            kept = [(k, r) for k, r in series if k >= warmup]  # before: the start-up's own churn
            ax.plot([k for k, _ in kept], [(r - base) / MB for _, r in kept], label=label, linewidth=1)
    ax.axvline(warmup, color="grey", linestyle=":", linewidth=1)
    ax.axvline(report["train_rounds"] / 2, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("train round (verdict over the rounds right of the dashed line)")
    ax.set_ylabel(f"RSS at the round's close minus at round {warmup} (MiB)")
    ax.set_title(f"fedge memory over {report['train_rounds']} rounds ({report['config']['devices']} devices)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    if cfg.replot is not None:
        report = json.loads(cfg.replot.read_text())
        print(render(report))
        png = cfg.replot.with_suffix(".png")
        if plot(png, report):
            print(f"plot: {png}")
        return 0
    report = run(cfg)
    print(render(report))
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(report, indent=1) + "\n")
    png = cfg.out.with_suffix(".png")
    if plot(png, report):
        print(f"plot: {png}")
    print(f"results: {cfg.out}")
    return 0 if not report["rounds_not_aggregated_by_all"] else 1


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    raise SystemExit(main())
