"""Time to a target accuracy with devices of mixed speed: synchronous rounds vs buffered
asynchronous aggregation (FedBuff, docs/async.md), in one run (issue 19).

Each mode is a whole ``fedge demo`` fleet (``fedge.lab.demo.run_demo``): Mosquitto, the real
aggregator and N real agents as processes on the default task (``tasks/har-watch.toml``, the
direct CSV data path, fp32, server learning rate 2.0), the same devices and the same speeds:

- ``--slow`` agents (default a third) run ``--factor`` times slower (default 5): the lab pacer
  (``fedge.lab.pacer``) freezes their processes (SIGSTOP) four fifths of every second;
- ``--offline`` agents (default 1) are frozen for ``--offline-s`` out of every
  ``--offline-every-s`` seconds (default 20 of 60): offline for rounds at a time.

The only difference between the two runs is ``[rounds] aggregation`` (and what it implies:
async has ``min_devices`` and ``buffer_size`` K a third of the devices, ``max_staleness`` 4; sync
the demo's ``min_devices``, half the devices, and waits for every selected device or the
``--round-timeout`` deadline). Every global model the aggregator publishes is scored on the
held-out subjects by the demo's observer; the time of a model is its manifest's ``issued_at``
minus the first train manifest's, so both modes are timed by the same clock from the same point
(after the moments round). Reported per mode: the time and the number of versions to the
first model at or above ``--target`` (default 0.70; the centralized reference is ~0.78), the best
and final accuracy, and the accuracy after 30, 60 and 120 s.

Usage: ``python bench/bench_async.py [--devices 7] [--sync-rounds 12] [--async-rounds 36]
[--target 0.70] [--out bench/results/async.json]``. Not timed in CI: it takes a few minutes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
#: The held-out accuracy of the newest model this many seconds into training.
CHECKPOINTS_S = (2, 5, 10)


def run_mode(args: argparse.Namespace, mode: str, rounds: int, server_lr: float) -> dict[str, Any]:
    # the lab's heavy imports, after argparse
    from fedge.cli import read_task
    from fedge.lab.demo import DemoOptions, run_demo
    from fedge.lab.observer import FleetObserver
    from fedge.tools.bundled import task_path

    seen: list[FleetObserver] = []

    def keep(observer: FleetObserver) -> None:
        if not seen:
            seen.append(observer)

    n = args.devices
    third = max(1, (n + 2) // 3)
    options = DemoOptions(
        task=read_task(task_path()),
        out=Path(args.work) / f"{mode}-lr{server_lr}",
        server_learning_rate=server_lr,
        devices=n,
        rounds=rounds,
        data_path="direct",
        reference_epochs=args.reference_epochs,
        round_timeout_s=args.round_timeout,
        aggregation=mode,
        min_devices=third if mode == "async" else None,
        buffer_size=third if mode == "async" else None,
        slow_devices=args.slow if args.slow is not None else max(1, n // 3),
        slow_factor=args.factor,
        offline_devices=args.offline,
        offline_s=args.offline_s,
        offline_every_s=args.offline_every_s,
    )
    wall = time.perf_counter()
    summary = run_demo(options, on_progress=keep)
    wall = time.perf_counter() - wall
    view = seen[0].view
    issued = {m.version: m.issued_at for m in view.manifests}
    trains = [m for m in view.manifests if m.phase == "train"]
    t0 = trains[0].issued_at
    first_version = trains[0].version
    curve = sorted(
        (issued[e.version] - t0, e.version - first_version, e.accuracy)
        for e in view.evaluations
        if e.version in issued and e.accuracy is not None and e.after_round >= 1
    )
    hit = next((c for c in curve if c[2] >= args.target), None)
    # Reached and held: the first of three consecutive published models all at the target.
    held = next(
        (curve[i] for i in range(len(curve) - 2) if all(c[2] >= args.target for c in curve[i : i + 3])),
        None,
    )

    def at(seconds: float) -> float | None:
        before = [acc for t, _, acc in curve if t <= seconds]
        return before[-1] if before else None

    return {
        "mode": mode,
        "server_learning_rate": server_lr,
        "rounds_requested": rounds,
        "versions_published": len(trains),
        "slow_devices": summary.slow_devices,
        "offline_devices": summary.offline_devices,
        "centralized_accuracy": summary.centralized_accuracy,
        "seconds_to_target": None if hit is None else round(hit[0], 2),
        "versions_to_target": None if hit is None else hit[1],
        "seconds_to_target_held": None if held is None else round(held[0], 2),
        "versions_to_target_held": None if held is None else held[1],
        "best_accuracy": max((c[2] for c in curve), default=None),
        "final_accuracy": summary.final_accuracy,
        "accuracy_at_s": {str(s): at(s) for s in CHECKPOINTS_S},
        "training_seconds": round(curve[-1][0], 2) if curve else None,
        "wall_seconds": round(wall, 1),
        "rejected": summary.rejected,
        "curve": [[round(t, 2), v, round(a, 4)] for t, v, a in curve],
    }


def render(results: dict[str, Any]) -> str:
    """The runs as a Markdown table (docs/async.md quotes it)."""

    def f(x: float | None) -> str:
        return "–" if x is None else f"{x:.3f}"

    def rejected(counts: dict[str, int]) -> str:
        return ", ".join(f"{why} {n}" for why, n in counts.items()) or "–"

    def reach(seconds: float | None, versions: int | None) -> str:
        return "never" if seconds is None else f"{seconds:.2f} s (v+{versions})"

    head = "| mode | server lr | versions | reached target | held (3 in a row) | best | final | "
    head += " | ".join(f"@{s} s" for s in CHECKPOINTS_S) + " | training s | rejected |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results["runs"]:
        acc = r["accuracy_at_s"]
        lines.append(
            f"| {r['mode']} | {r['server_learning_rate']} | {r['versions_published']} | "
            f"{reach(r['seconds_to_target'], r['versions_to_target'])} | "
            f"{reach(r['seconds_to_target_held'], r['versions_to_target_held'])} | "
            f"{f(r['best_accuracy'])} | {f(r['final_accuracy'])} | "
            + " | ".join(f(acc[str(s)]) for s in CHECKPOINTS_S)
            + f" | {r['training_seconds']} | {rejected(r['rejected'])} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=7)
    p.add_argument("--sync-rounds", type=int, default=20)
    p.add_argument("--async-rounds", type=int, default=60)
    p.add_argument("--server-lr", type=float, default=2.0, help="both modes (the demo's default)")
    p.add_argument(
        "--async-lrs", default="1.0", help="more async runs at these server learning rates (comma-separated)"
    )
    p.add_argument("--target", type=float, default=0.70)
    p.add_argument("--slow", type=int, default=None, help="slow agents (default a third)")
    p.add_argument("--factor", type=float, default=5.0)
    p.add_argument("--offline", type=int, default=1)
    p.add_argument("--offline-s", type=float, default=4.0)
    p.add_argument("--offline-every-s", type=float, default=10.0)
    p.add_argument("--round-timeout", type=float, default=15.0)
    p.add_argument("--reference-epochs", type=int, default=5)
    p.add_argument("--work", default="/tmp/fedge-bench-async")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "async.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = {
        "target_accuracy": args.target,
        "devices": args.devices,
        "factor": args.factor,
        "offline": {"devices": args.offline, "seconds": args.offline_s, "every_s": args.offline_every_s},
        "round_timeout_s": args.round_timeout,
        "runs": [
            run_mode(args, "sync", args.sync_rounds, args.server_lr),
            run_mode(args, "async", args.async_rounds, args.server_lr),
            *(
                run_mode(args, "async", args.async_rounds, float(lr))
                for lr in args.async_lrs.split(",")
                if lr
            ),
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"target accuracy {args.target}; {args.devices} devices; results in {args.out}")
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
