"""Accuracy vs epsilon: what client-level differential privacy costs on the default task, with
7 devices and with the same data over 100 devices, in one run (issue 14).

Everything but the network is the product: the real :class:`RoundEngine` with ``[privacy]``
(central Gaussian noise on the sum of clipped updates, divided by the expected participants,
adaptive clipping, the accountant's budget stop), sealed messages with every check, and honest
devices training with the LiteRT interpreter on their own data exactly as the agent does
(seeded 80/20 split, local epochs from the task, ``fedge.agent.core.update_payload``, which
clips the delta on the device and adds the clip indicator). Held-out accuracy is measured on
subjects 8-10 after every train round.

Fleets: ``7`` = subjects 1-7 as devices (non-IID, one person each); ``100`` = the same training
windows (each subject's 80 % split) shuffled per subject with a fixed seed and dealt round-robin
into 100 shards of ~equal size (25-26 windows; each subject's holdout part dealt the same way
for the devices' own evaluation), so the shards mix subjects (close to IID).

For each fleet and each epsilon in {1, 4, 8, inf}: ``inf`` is privacy off with the deployment
defaults (``RoundSettings()``: equal weighting and the influence bounds); each private run uses
``privacy_config(PrivacySettings(enabled=True, epsilon_budget=E), RoundSettings(rounds=R))``:
the ``[privacy]`` defaults (adaptive clipping at the median, target_delta 1e-5, the noise
multiplier derived for R rounds) except the initial clip bound, which is **measured**: the
median L2 norm of the device updates in the first train round of that fleet's non-private run
(``--clip-bound`` overrides it). That is the tuning docs/differential-privacy.md recommends; the
bound then moves adaptively. The server learning rate is 2.0 for every run (``--server-lr``):
the value ``fedge demo`` uses for this task, with and without ``--dp-epsilon``, tuned on it
(lab/fedge/lab/demo.py), so these numbers compare with the demo's. bench_poisoning keeps the
deployment default 1.0; at 1.0 this bench measured a slightly lower non-private accuracy after
30 rounds (0.806 with 7 devices and 0.685 with 100, against 0.823 and 0.714 at 2.0) and the
same picture under DP. The noise is drawn from a seeded generator (``noise_rng``) so the run is
repeatable; the product draws a secret seed.

One LiteRT interpreter is shared by all devices, reloaded with each device's starting weights
(``set_weights`` also resets the optimizer state), as in bench_poisoning: 100 devices cost 100
short trainings per round, not 100 interpreters.

Usage: ``python bench/bench_dp.py [--rounds 30] [--out bench/results/dp.json] [--quick]``;
the plot goes next to the JSON (``dp.png``). ``--quick``: 3 rounds, epsilon {8, inf}, 7 and 20
devices, written to ``dp-quick.json``/``.png`` unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from nacl.public import PrivateKey
from nacl.signing import SigningKey

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_training import machine_info  # type: ignore[import-not-found, unused-ignore]  # noqa: E402
from fedge.agent.core import DeviceIdentity, moments_payload, seal_contribution, update_payload  # noqa: E402
from fedge.agent.service import LocalData, split_holdout  # noqa: E402
from fedge.agent.trainer import LiteRTTrainer  # noqa: E402
from fedge.aggregator.config import RoundSettings  # noqa: E402
from fedge.aggregator.model_export import build_model, write_model  # noqa: E402
from fedge.aggregator.privacy import PrivacyConfig  # noqa: E402
from fedge.aggregator.privacy_config import PrivacySettings, privacy_config  # noqa: E402
from fedge.aggregator.round_engine import EngineState, RoundEngine  # noqa: E402
from fedge.aggregator.service import load_model  # noqa: E402
from fedge.lab import har_watch  # noqa: E402
from fedge.protocol.errors import FedgeError  # noqa: E402
from fedge.protocol.task import parse_task_spec  # noqa: E402
from fedge.protocol.topics import FleetTopics  # noqa: E402

FLEET = "dp"
TOPICS = FleetTopics(FLEET)
DEFAULT_OUT = ROOT / "bench" / "results" / "dp.json"
QUICK_OUT = ROOT / "bench" / "results" / "dp-quick.json"
EPSILONS = (math.inf, 8.0, 4.0, 1.0)  # inf first: it measures the initial clip bound
QUICK_EPSILONS = (math.inf, 8.0)
SHARD_SEED = 14  # the shuffle of each subject's windows before they are dealt into shards
NOISE_SEED = 14  # the DP noise (the product draws a secret one)
TARGET_DELTA = 1e-5
CHECKPOINTS = (10, 20, 30)


@dataclass(frozen=True)
class Device:
    device_id: str
    data: LocalData
    key: PrivateKey


def deal(parts: list[np.ndarray], shards: int, salt: int) -> list[list[int]]:
    """Indices into the concatenation of ``parts``: each part shuffled (seeded), then dealt
    round-robin, the deal continuing across parts, so shard sizes differ by at most one."""
    hands: list[list[int]] = [[] for _ in range(shards)]
    offset = turn = 0
    for i, x in enumerate(parts):
        order = np.random.default_rng([SHARD_SEED, salt, i]).permutation(x.shape[0])
        for j in order:
            hands[turn % shards].append(offset + int(j))
            turn += 1
        offset += x.shape[0]
    return hands


class World:
    """The data, the model, the keys and the interpreter, shared by every run."""

    def __init__(self, model_dir: Path) -> None:
        task = parse_task_spec((ROOT / "tasks" / "har-watch.toml").read_text())
        devices = har_watch.load_devices(task, har_watch.SUBJECTS)
        self.x_test, self.y_test = har_watch.pooled([devices[s] for s in har_watch.TEST_SUBJECTS])
        self.local = {s: split_holdout(devices[s].x, devices[s].y, 0.2, 0) for s in har_watch.TRAIN_SUBJECTS}
        self.loaded = load_model(model_dir)
        self.trainer = LiteRTTrainer(self.loaded.model, self.loaded.manifest)
        self.box = PrivateKey.generate()
        self.signing = SigningKey.generate()

    def subject_devices(self) -> list[Device]:
        return [
            Device(har_watch.device_id(s), self.local[s], PrivateKey.generate())
            for s in har_watch.TRAIN_SUBJECTS
        ]

    def shard_devices(self, shards: int) -> list[Device]:
        """The subjects' training windows dealt into ``shards`` devices (and their holdout
        windows the same way, for each device's own evaluation)."""
        subjects = [self.local[s] for s in har_watch.TRAIN_SUBJECTS]
        xs, ys = [d.x_train for d in subjects], [d.y_train for d in subjects]
        hx, hy = [d.x_holdout for d in subjects], [d.y_holdout for d in subjects]
        x, y, x_hold, y_hold = np.concatenate(xs), np.concatenate(ys), np.concatenate(hx), np.concatenate(hy)
        train, hold = deal(xs, shards, 0), deal(hx, shards, 1)
        return [
            Device(
                f"shard-{i:03d}",
                LocalData(x[train[i]], y[train[i]], x_hold[hold[i]], y_hold[hold[i]]),
                PrivateKey.generate(),
            )
            for i in range(shards)
        ]


def run(
    world: World,
    devices: list[Device],
    settings: RoundSettings,
    privacy: PrivacyConfig | None,
    noise_seed: int,
) -> dict[str, Any]:
    """One federated run of ``settings.rounds`` train rounds (fewer if the budget stops it)."""
    started = time.perf_counter()
    by_id = {d.device_id: d for d in devices}
    state = EngineState(0, "", 0, world.loaded.initial_weights.copy(), None, {})
    engine = RoundEngine(
        FLEET,
        settings,
        world.loaded.manifest,
        world.loaded.model,
        world.box,
        world.signing,
        {d.device_id: d.key.public_key for d in devices},
        state,
        privacy=privacy,
        noise_rng=np.random.default_rng(noise_seed),
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

    trainer = world.trainer
    accuracies: list[float] = []
    clip_bounds: list[float | None] = []  # the bound devices clipped to in each train round
    epsilons: list[float | None] = []
    median_norms: list[float] = []
    clipped_share: list[float | None] = []  # the share of devices whose update was over the bound
    diverged = aborted = 0
    for _ in range(3 * settings.rounds + 3):  # aborted rounds are retried; do not loop forever
        pub = engine.open_round(now)
        m = pub.manifest
        if m.phase == "final":
            break
        w = engine.state.weights.copy()
        trainer.normalisation = m.normalisation
        norms: list[float] = []
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
            except FedgeError:  # noise can take the model where training diverges: the agent sends nothing
                diverged += 1
                continue
            norms.append(float(np.linalg.norm(delta.astype(np.float64))))
            send(device, m, "update", update_payload(m, delta, int(data.x_train.shape[0]), losses[-1], ev))
        record = engine.close_round()
        if m.phase == "train" and record.outcome == "aggregated":
            trainer.set_weights(engine.state.weights)
            trainer.normalisation = engine.state.normalisation
            acc = trainer.evaluate(world.x_test, world.y_test).accuracy
            accuracies.append(float(acc) if acc is not None and math.isfinite(acc) else 0.0)
            bound = m.privacy.clip_bound if m.privacy is not None else None
            clip_bounds.append(bound)
            epsilons.append(record.epsilon_spent)
            median_norms.append(float(np.median(norms)) if norms else math.nan)
            clipped_share.append(
                sum(n > bound for n in norms) / len(norms) if bound is not None and norms else None
            )
        elif m.phase == "train":
            aborted += 1
        now += 100.0
    status = engine.status(now)
    p = status["privacy"]
    return {
        "devices": len(devices),
        "epsilon_budget": None if privacy is None else privacy.epsilon_budget,
        "final_accuracy": round(accuracies[-1], 4) if accuracies else 0.0,
        "accuracy_at": {str(k): round(accuracies[k - 1], 4) for k in CHECKPOINTS if len(accuracies) >= k},
        "completed_rounds": engine.state.completed_rounds,
        "epsilon_spent": None if p is None else p["epsilon_spent"],
        "budget_spent": None if p is None else p["budget_spent"],
        "noise_multiplier": None if p is None else p["noise_multiplier"],
        "update_noise_multiplier": None if p is None else p["update_noise_multiplier"],
        "clip_bound_initial": None if privacy is None else privacy.clip_bound,
        "clip_bound_final": None if p is None else p["clip_bound"],
        # The noise on each coordinate of the averaged update at the final bound: z_update * C / m.
        "noise_stddev_on_mean": (
            None if p is None else p["update_noise_multiplier"] * p["clip_bound"] / len(devices)
        ),
        "accuracy_per_round": [round(a, 4) for a in accuracies],
        "clip_bound_per_round": clip_bounds,
        "epsilon_per_round": epsilons,
        "median_update_norm_per_round": [round(n, 5) for n in median_norms],
        "clipped_share_per_round": clipped_share,
        "diverged_trainings": diverged,
        "aborted_rounds": aborted,
        "refused_messages": refused,
        "seconds": round(time.perf_counter() - started, 1),
    }


def eps_name(e: float) -> str:
    return "inf" if math.isinf(e) else f"{e:g}"


def fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def table(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = [
        "devices | epsilon | final acc | acc@10 | acc@20 | acc@30 | rounds | eps spent | z (z updates)"
        " | clip bound first -> final | noise std on mean | acc / non-private | seconds",
        "--- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | ---",
    ]
    for fleet, rows in results.items():
        plain = next(r["final_accuracy"] for r in rows if r["epsilon_budget"] is None)
        for r in rows:
            at = [r["accuracy_at"].get(str(k)) for k in CHECKPOINTS]
            z = (
                "-"
                if r["noise_multiplier"] is None
                else f"{r['noise_multiplier']:.2f} ({r['update_noise_multiplier']:.2f})"
            )
            clip = (
                "-"
                if r["clip_bound_initial"] is None
                else f"{r['clip_bound_initial']:.3g} -> {r['clip_bound_final']:.3g}"
            )
            ratio = r["final_accuracy"] / plain if plain > 0 else None
            eps = "inf" if r["epsilon_budget"] is None else f"{r['epsilon_budget']:g}"
            lines.append(
                f"{fleet} | {eps} | {r['final_accuracy']:.3f} | {' | '.join(fmt(a) for a in at)} | "
                f"{r['completed_rounds']} | {fmt(r['epsilon_spent'], '.3f')} | {z} | {clip} | "
                f"{fmt(r['noise_stddev_on_mean'], '.3g')} | "
                f"{'-' if r['epsilon_budget'] is None else fmt(ratio, '.2f')} | {r['seconds']:.0f}"
            )
    return lines


def plot(path: Path, results: dict[str, list[dict[str, Any]]], titles: dict[str, str]) -> None:
    """Held-out accuracy per round, one line per epsilon, one panel per fleet (headless)."""
    import matplotlib  # optional, demo-only dependency (fedge[demo])

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"inf": "tab:gray", "8": "tab:green", "4": "tab:blue", "1": "tab:red"}
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), dpi=100, sharey=True)
    axes = np.atleast_1d(axes)
    for ax, (fleet, rows) in zip(axes, results.items(), strict=True):
        for r in rows:
            name = "inf" if r["epsilon_budget"] is None else f"{r['epsilon_budget']:g}"
            acc = r["accuracy_per_round"]
            label = "no DP" if name == "inf" else f"ε = {name} (z = {r['noise_multiplier']:.2f})"
            ax.plot(range(1, len(acc) + 1), acc, label=label, color=colors.get(name), marker=".")
        ax.set_title(titles[fleet])
        ax.set_xlabel("round")
        ax.set_ylim(0.0, 1.0)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    axes[0].set_ylabel("held-out accuracy (subjects 8-10)")
    fig.suptitle("har-watch: accuracy vs epsilon (central DP, adaptive clipping, δ = 1e-5)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help=f"JSON (default {DEFAULT_OUT})")
    parser.add_argument("--rounds", type=int, default=None, help="train rounds (default 30; --quick 3)")
    parser.add_argument(
        "--shard-rounds", type=int, default=None, help="train rounds of the second fleet (default --rounds)"
    )
    parser.add_argument("--shards", type=int, default=None, help="devices of the second fleet (default 100)")
    parser.add_argument("--server-lr", type=float, default=2.0)
    parser.add_argument(
        "--clip-bound", type=float, default=None, help="initial clip bound (default: measured, see above)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: 3 rounds, epsilon 8 and inf, 7/20")
    cfg = parser.parse_args(argv)
    rounds = cfg.rounds or (3 if cfg.quick else 30)
    shard_rounds = cfg.shard_rounds or rounds
    shards = cfg.shards or (20 if cfg.quick else 100)
    epsilons = QUICK_EPSILONS if cfg.quick else EPSILONS
    out: Path = cfg.out or (QUICK_OUT if cfg.quick else DEFAULT_OUT)
    start = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {}
    titles: dict[str, str] = {}
    measured: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="fedge-dp-") as tmp:
        task = parse_task_spec((ROOT / "tasks" / "har-watch.toml").read_text())
        write_model(build_model(task), Path(tmp))
        world = World(Path(tmp))
        fleets = {
            "7": (world.subject_devices(), rounds, "7 devices (subjects 1-7)"),
            str(shards): (
                world.shard_devices(shards),
                shard_rounds,
                f"{shards} devices (1-7's windows dealt)",
            ),
        }
        for fleet, (devices, n_rounds, title) in fleets.items():
            titles[fleet] = title
            settings = RoundSettings(
                rounds=n_rounds,
                min_devices=2,
                server_learning_rate=cfg.server_lr,
                wait_for_devices_s=0.0,
            )
            rows: list[dict[str, Any]] = []
            clip = cfg.clip_bound
            for i, eps in enumerate(epsilons):
                privacy = None
                if not math.isinf(eps):
                    assert clip is not None
                    privacy = privacy_config(
                        PrivacySettings(
                            enabled=True, epsilon_budget=eps, target_delta=TARGET_DELTA, clip_bound=clip
                        ),
                        settings,
                    )
                row = run(world, devices, settings, privacy, NOISE_SEED + 1000 * i + len(devices))
                if privacy is None and clip is None:
                    first = row["median_update_norm_per_round"][0]
                    clip = measured[fleet] = float(f"{first:.3g}")
                rows.append(row)
                print(
                    f"{title}, epsilon {eps_name(eps)}: final {row['final_accuracy']:.3f} "
                    f"after {row['completed_rounds']} rounds ({row['seconds']:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
            results[fleet] = rows
    lines = table(results)
    print("\n".join(lines))
    seconds = round(time.perf_counter() - start, 1)
    doc = {
        "machine": machine_info(),
        "config": {
            "task": "har-watch",
            "rounds": rounds,
            "shard_rounds": shard_rounds,
            "shards": shards,
            "epsilons": [eps_name(e) for e in epsilons],
            "target_delta": TARGET_DELTA,
            "server_lr": cfg.server_lr,
            "clip_bound": cfg.clip_bound,
            "clip_bound_measured": measured,
            "shard_seed": SHARD_SEED,
            "noise_seed": NOISE_SEED,
            "quick": cfg.quick,
        },
        "results": results,
        "table": lines,
        "seconds": seconds,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    png = out.with_suffix(".png")
    plot(png, results, titles)
    print(f"\nwrote {out} and {png} in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
