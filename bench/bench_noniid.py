"""Strategies on non-IID fleets: held-out accuracy per round against centralized, in one run
(issue 15, "Non-IID").

Two real workloads:

- **har-watch, label skew**: the default task's training windows (subjects 1-7) split over 20
  devices by label skew: for every class, the share each device gets is drawn from a
  Dirichlet(alpha) distribution (Hsu et al. 2019), alpha 0.1 (most devices see two or three
  classes) and 1.0 (milder); held-out accuracy on subjects 8-10.
- **appliances, one device per day**: the own-data journey's house (``make demo-building``:
  ``fedge dataset appliances`` and ``fedge task init`` as the Makefile runs them), each of the
  21 training days one device, its samples built from its day's CSV as a device builds them;
  held-out accuracy on the following week.

Each device holds out 20 % of its own samples for its evaluation. Every strategy runs the same
rounds on the same split from the same initial model, with the real :class:`RoundEngine`
(sealed messages, every check, the deployment's norm bounds) and devices training with the
LiteRT interpreter exactly as the agent does (one interpreter reloaded per device, as in
``bench_dp.py``). FedProx is a model property (``[training] proximal_mu`` in the task spec), so
its runs use a second model build. The centralized reference is ``fedge train-local``'s
training of the same model on the pooled training data (20 epochs). The recommended strategy
is the one with the best mean rank over the three splits.

Usage: ``python bench/bench_noniid.py [--rounds 60] [--out bench/results/noniid.json]
[--quick]``; the plot goes next to the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from nacl.public import PrivateKey
from nacl.signing import SigningKey

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_training import machine_info  # type: ignore[import-not-found, unused-ignore]  # noqa: E402
from fedge.agent.core import DeviceIdentity, moments_payload, seal_contribution, update_payload  # noqa: E402
from fedge.agent.edgex.profile import load_profile  # noqa: E402
from fedge.agent.service import LocalData, split_holdout  # noqa: E402
from fedge.agent.trainer import LiteRTTrainer  # noqa: E402
from fedge.aggregator.config import RoundSettings  # noqa: E402
from fedge.aggregator.model_export import build_model, write_model  # noqa: E402
from fedge.aggregator.round_engine import EngineState, RoundEngine  # noqa: E402
from fedge.aggregator.service import load_model  # noqa: E402
from fedge.lab import har_watch  # noqa: E402
from fedge.lab.train_local import train_local, train_local_csv  # noqa: E402
from fedge.protocol.errors import FedgeError  # noqa: E402
from fedge.protocol.task import TaskSpec, parse_task_spec, task_spec_from_dict  # noqa: E402
from fedge.protocol.topics import FleetTopics  # noqa: E402
from fedge.tools.evaluate import csv_samples  # noqa: E402

FLEET = "noniid"
TOPICS = FleetTopics(FLEET)
DEFAULT_OUT = ROOT / "bench" / "results" / "noniid.json"
QUICK_OUT = ROOT / "bench" / "results" / "noniid-quick.json"
DEVICES = 20
ALPHAS = (0.1, 1.0)
SPLIT_SEED = 15
CHECKPOINTS = (10, 30, 60)
#: FedProx's coefficient in its runs (Li et al. try 0.001..1).
PROXIMAL_MU = 0.1
#: Epochs of the centralized reference (the pooled training data, the same model).
CENTRAL_EPOCHS = 20


@dataclass(frozen=True)
class Strategy:
    """One run's aggregation: ``[rounds]`` changes, and whether the model is FedProx's."""

    name: str
    rounds: dict[str, Any]
    fedprox: bool = False


#: The strategies compared. Server learning rates: FedAvg's family as the demo runs it (2.0;
#: FedAvgM 1.0, since its momentum sums about 1 / (1 - 0.9) rounds); the adaptive optimizers at
#: 0.1, the best of 0.01, 0.03 and 0.1 on both label-skew splits in a 60-round sweep (Reddi et
#: al.'s best are 10**-1.5..10**-0.5). FedProx at mu 0.1 (0.01 changed nothing measurable).
STRATEGIES = (
    Strategy("fedavg", {"server_learning_rate": 2.0}),
    Strategy("fedprox", {"server_learning_rate": 2.0}, fedprox=True),
    Strategy("fedavgm", {"strategy": "fedavgm", "server_learning_rate": 1.0}),
    Strategy("fedadam", {"strategy": "fedadam", "server_learning_rate": 0.1}),
    Strategy("fedyogi", {"strategy": "fedyogi", "server_learning_rate": 0.1}),
    Strategy("fedadagrad", {"strategy": "fedadagrad", "server_learning_rate": 0.1}),
    Strategy("trimmed_mean", {"strategy": "trimmed_mean", "server_learning_rate": 2.0}),
    Strategy("median", {"strategy": "median", "server_learning_rate": 2.0}),
)
QUICK_STRATEGIES = ("fedavg", "fedadam")


@dataclass(frozen=True)
class Device:
    device_id: str
    data: LocalData
    key: PrivateKey


def dirichlet_split(y: np.ndarray, devices: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Indices of ``y`` for each device: each class's windows shuffled and cut in Dirichlet(alpha)
    proportions. Every device gets at least 2 windows (taken from the largest shards), so each
    can train and hold one out."""
    rng = np.random.default_rng([seed, int(alpha * 1000)])
    parts: list[list[int]] = [[] for _ in range(devices)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        shares = rng.dirichlet(np.full(devices, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
        for d, chunk in enumerate(np.split(idx, cuts)):
            parts[d].extend(int(i) for i in chunk)
    for d in range(devices):
        while len(parts[d]) < 2:
            donor = max(range(devices), key=lambda k: len(parts[k]))
            parts[d].append(parts[donor].pop())
    return [np.array(sorted(p), dtype=np.int64) for p in parts]


class World:
    """One workload: its task, test set, centralized reference, the two model builds (plain and
    FedProx) and its non-IID splits (name -> devices), shared by every run on it."""

    def __init__(self, name: str, task: TaskSpec, work: Path, test: tuple[np.ndarray, np.ndarray]) -> None:
        self.name = name
        self.task = task
        self.x_test, self.y_test = test
        prox = task.to_dict()
        prox["training"]["proximal_mu"] = PROXIMAL_MU
        self.models = {
            False: self._build(task, work / "plain"),
            True: self._build(task_spec_from_dict(prox), work / "prox"),
        }
        self.trainers = {k: LiteRTTrainer(v.model, v.manifest) for k, v in self.models.items()}
        self.box = PrivateKey.generate()
        self.signing = SigningKey.generate()
        self.splits: dict[str, list[Device]] = {}
        self.centralized = math.nan

    @staticmethod
    def _build(task: TaskSpec, out: Path) -> Any:
        write_model(build_model(task), out)
        return load_model(out)

    def add_split(self, name: str, parts: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
        """Devices from ``(device id, x, y)``: each holds out 20 % of its own samples."""
        self.splits[name] = [
            Device(device_id, split_holdout(x, y, 0.2, i), PrivateKey.generate())
            for i, (device_id, x, y) in enumerate(parts)
        ]


def har_watch_world(work: Path, alphas: tuple[float, ...]) -> World:
    """The default task; subjects 1-7's windows over 20 devices by label skew, 8-10 held out."""
    task = parse_task_spec((ROOT / "tasks" / "har-watch.toml").read_text())
    devices = har_watch.load_devices(task, har_watch.SUBJECTS)
    test = har_watch.pooled([devices[s] for s in har_watch.TEST_SUBJECTS])
    x_train, y_train = har_watch.pooled([devices[s] for s in har_watch.TRAIN_SUBJECTS])
    world = World("har-watch", task, work / "har-watch", test)
    for alpha in alphas:
        parts = dirichlet_split(y_train, DEVICES, alpha, SPLIT_SEED)
        world.add_split(
            f"alpha={alpha:g}", [(f"dev-{i:02d}", x_train[idx], y_train[idx]) for i, idx in enumerate(parts)]
        )
    reference = train_local(task, CENTRAL_EPOCHS, seed=0, model_dir=work / "har-watch" / "plain")
    world.centralized = float(reference.test_accuracy if reference.test_accuracy is not None else math.nan)
    return world


def appliances_world(work: Path) -> World:
    """The own-data journey's house (``make demo-building``): ``fedge dataset appliances`` and
    ``fedge task init`` exactly as the Makefile runs them, one device per training day (its
    samples built as a device builds them from the CSV), the following week held out."""
    out = work / "appliances"
    fedge = [str(Path(sys.executable).parent / "fedge")]
    subprocess.run([*fedge, "dataset", "appliances", "--out", str(out)], check=True, capture_output=True)
    profile_file = out / "appliances-profile.yaml"
    task_file = out / "task.toml"
    subprocess.run(
        [
            *fedge,
            *("task", "init", "--profile", str(profile_file), "--label", "AppliancesActive"),
            *("--window", "6,1", "--statistics", "mean,std,range", "--hidden", "none"),
            *("--out", str(task_file), "--force"),
        ],
        check=True,
        capture_output=True,
    )
    task = parse_task_spec(task_file.read_text())
    profile = load_profile(profile_file)
    test = csv_samples(out / "appliances-test.csv", task, profile)
    world = World("appliances", task, out, (test.x, test.y))
    lines = (out / "appliances-train.csv").read_text().splitlines()
    days: dict[str, list[str]] = {}
    for line in lines[1:]:
        days.setdefault(line[:10], []).append(line)
    parts = []
    for day, rows in sorted(days.items()):
        day_csv = out / f"day-{day}.csv"
        day_csv.write_text("\n".join([lines[0], *rows]) + "\n")
        samples = csv_samples(day_csv, task, profile)
        parts.append((f"day-{day}", samples.x, samples.y))
    world.add_split("one device per day", parts)
    reference = train_local_csv(
        task,
        out / "appliances-train.csv",
        out / "appliances-test.csv",
        CENTRAL_EPOCHS,
        0,
        profile,
        model_dir=out / "plain",
    )
    world.centralized = float(reference.accuracy if reference.accuracy is not None else math.nan)
    return world


def run(world: World, devices: list[Device], strategy: Strategy, rounds: int) -> dict[str, Any]:
    """One federated run of ``rounds`` train rounds; held-out accuracy after each."""
    started = time.perf_counter()
    loaded = world.models[strategy.fedprox]
    trainer = world.trainers[strategy.fedprox]
    settings = replace(RoundSettings(rounds=rounds, min_devices=2, wait_for_devices_s=0.0), **strategy.rounds)
    by_id = {d.device_id: d for d in devices}
    state = EngineState(0, "", 0, loaded.initial_weights.copy(), None, {})
    engine = RoundEngine(
        FLEET,
        settings,
        loaded.manifest,
        loaded.model,
        world.box,
        world.signing,
        {d.device_id: d.key.public_key for d in devices},
        state,
    )
    counters = dict.fromkeys(by_id, 0)
    now = 1_700_000_000.0
    refused: dict[str, int] = {}

    def send(device: Device, manifest: Any, kind: str, payload: tuple[dict[str, Any], bytes]) -> None:
        counters[device.device_id] += 1
        identity = DeviceIdentity(FLEET, device.device_id, device.key, world.box.public_key)
        frame = seal_contribution(
            identity, manifest.round_id, manifest.version, counters[device.device_id], kind, payload
        )
        reason = engine.handle(TOPICS.update(device.device_id), frame, now).reason
        if reason != "accepted":
            refused[str(reason)] = refused.get(str(reason), 0) + 1

    accuracies: list[float] = []
    diverged = aborted = 0
    for _ in range(3 * rounds + 3):
        pub = engine.open_round(now)
        m = pub.manifest
        if m.phase == "final":
            break
        w = engine.state.weights.copy()
        trainer.normalisation = m.normalisation
        for device_id in m.selected_devices:
            device = by_id[device_id]
            data = device.data
            if m.phase == "moments":
                send(device, m, "moments", moments_payload(data.x_train))
                continue
            try:
                trainer.set_weights(w)
                ev = trainer.evaluate(data.x_holdout, data.y_holdout) if data.x_holdout.shape[0] > 0 else None
                losses = trainer.fit(data.x_train, data.y_train, rng=np.random.default_rng([0, m.version]))
                delta = trainer.get_weights() - w
            except FedgeError:
                diverged += 1
                continue
            send(device, m, "update", update_payload(m, delta, int(data.x_train.shape[0]), losses[-1], ev))
        record = engine.close_round()
        if m.phase == "train" and record.outcome == "aggregated":
            trainer.set_weights(engine.state.weights)
            trainer.normalisation = engine.state.normalisation
            acc = trainer.evaluate(world.x_test, world.y_test).accuracy
            accuracies.append(float(acc) if acc is not None and math.isfinite(acc) else 0.0)
        elif m.phase == "train":
            aborted += 1
        now += 100.0
    return {
        "strategy": strategy.name,
        "rounds_settings": strategy.rounds,
        "fedprox_mu": PROXIMAL_MU if strategy.fedprox else None,
        "final_accuracy": round(accuracies[-1], 4) if accuracies else 0.0,
        "best_of_last_5": round(max(accuracies[-5:]), 4) if accuracies else 0.0,
        "mean_of_last_5": round(float(np.mean(accuracies[-5:])), 4) if accuracies else 0.0,
        "accuracy_at": {str(k): round(accuracies[k - 1], 4) for k in CHECKPOINTS if len(accuracies) >= k},
        "accuracy_per_round": [round(a, 4) for a in accuracies],
        "diverged_trainings": diverged,
        "aborted_rounds": aborted,
        "refused_messages": refused,
        "seconds": round(time.perf_counter() - started, 1),
    }


def label_skew(devices: list[Device], classes: int) -> dict[str, float]:
    """How skewed a split is: the mean number of classes a device has any window of, and the
    mean share of its windows in its largest class."""
    present, top = [], []
    for d in devices:
        counts = np.bincount(d.data.y_train, minlength=classes)
        present.append(int((counts > 0).sum()))
        top.append(float(counts.max() / max(1, counts.sum())))
    return {
        "mean_classes_per_device": round(float(np.mean(present)), 2),
        "mean_top_class_share": round(float(np.mean(top)), 3),
    }


def table(results: dict[str, dict[str, Any]]) -> list[str]:
    head = ("split", "strategy", "@10", "@30", "@60", "last5", "vs central", "s")
    lines = ["{:<32} {:<14} {:>6} {:>6} {:>6} {:>6} {:>10} {:>6}".format(*head)]
    for split, entry in results.items():
        for r in entry["runs"]:
            at = [r["accuracy_at"].get(str(k), math.nan) for k in CHECKPOINTS]
            lines.append(
                f"{split:<32} {r['strategy']:<14} {at[0]:>6.3f} {at[1]:>6.3f} {at[2]:>6.3f} "
                f"{r['mean_of_last_5']:>6.3f} {r['gap_to_centralized_points']:>+9.1f}p {r['seconds']:>6.1f}"
            )
        lines.append(f"{split:<32} {'centralized':<14} {'':>20} {entry['centralized']:>6.3f}")
    return lines


def plot(path: Path, results: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (split, entry) in zip(axes[0], results.items(), strict=True):
        for r in entry["runs"]:
            acc = r["accuracy_per_round"]
            ax.plot(range(1, len(acc) + 1), acc, label=r["strategy"], linewidth=1.2)
        ax.axhline(entry["centralized"], color="black", linestyle="--", linewidth=1, label="centralized")
        ax.set_title(f"{split} ({entry['devices']} devices)", fontsize=10)
        ax.set_xlabel("round")
        ax.set_ylabel("held-out accuracy")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Strategies on non-IID devices: held-out accuracy per round")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--quick", action="store_true", help="3 rounds, fedavg and fedadam, har-watch alpha 0.1 only"
    )
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else args.rounds
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    strategies = [s for s in STRATEGIES if not args.quick or s.name in QUICK_STRATEGIES]
    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        worlds = [har_watch_world(Path(tmp), ALPHAS[:1] if args.quick else ALPHAS)]
        if not args.quick:
            worlds.append(appliances_world(Path(tmp)))
        for world in worlds:
            for split, devices in world.splits.items():
                key = f"{world.name} {split}"
                entry: dict[str, Any] = {
                    "workload": world.name,
                    "task": world.task.name,
                    "devices": len(devices),
                    "centralized": round(world.centralized, 4),
                    "label_skew": label_skew(devices, world.task.output_dim),
                    "runs": [],
                }
                for s in strategies:
                    r = run(world, devices, s, rounds)
                    r["gap_to_centralized_points"] = round(100 * (r["mean_of_last_5"] - world.centralized), 1)
                    entry["runs"].append(r)
                    print(f"{key} {s.name}: {r['final_accuracy']:.3f} ({r['seconds']:.1f} s)", flush=True)
                best = max(entry["runs"], key=lambda r: r["mean_of_last_5"])
                entry["best_strategy"] = best["strategy"]
                entry["best_within_2_points"] = bool(best["gap_to_centralized_points"] >= -2.0)
                results[key] = entry
    lines = table(results)
    print("\n".join(lines))
    # The recommended strategy: the best mean rank over every split (ties: the simpler one first).
    ranks: dict[str, list[int]] = {s.name: [] for s in strategies}
    for entry in results.values():
        ordered = sorted(entry["runs"], key=lambda r: -r["mean_of_last_5"])
        for i, r in enumerate(ordered):
            ranks[r["strategy"]].append(i + 1)
    recommended = min(strategies, key=lambda s: float(np.mean(ranks[s.name]))).name
    print(f"best mean rank over the splits: {recommended}")
    doc = {
        "benchmark": "noniid",
        "machine": machine_info(),
        "rounds": rounds,
        "proximal_mu": PROXIMAL_MU,
        "centralized_epochs": CENTRAL_EPOCHS,
        "recommended_strategy": recommended,
        "mean_rank": {k: round(float(np.mean(v)), 2) for k, v in ranks.items()},
        "results": results,
        "table": lines,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    plot(out.with_suffix(".png"), results)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
