"""How much two compromised devices of seven can hurt the model: fedge's default influence bounds
against plain FedAvg, on the default task, in one run (issue 10, item 2).

Everything but the network is the product: the real :class:`RoundEngine` (sealed messages,
every check), honest devices training with the LiteRT interpreter on their own subject's
smartwatch data exactly as the agent does (seeded 80/20 split, local epochs from the task),
and held-out accuracy on subjects 8-10. Attackers use real device keys and send what the
outside review sent: feature moments of 1e4 with an honest-looking count in the moments round,
then in every train round ``-w`` at the documented hard norm bound (0.5 x the model's norm)
claiming 1,000,000 examples (the first attacker) or 10x over it (the second).

For each setting (``plain``: claimed-example weighting, no norm bound, pooled moments;
``defaults``: ``RoundSettings()``), a clean run and one run per attacker pair; reported: the
final accuracy, its drop from the clean run, and whether the normalisation stayed within the
honest devices' range. ``--server-lr`` (default 1.0, the deployment default) applies to both.
Usage: ``python bench/bench_poisoning.py [--out bench/results/poisoning.json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from nacl.public import PrivateKey
from nacl.signing import SigningKey

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_training import machine_info  # noqa: E402
from fedge.agent.core import DeviceIdentity, seal_contribution  # noqa: E402
from fedge.agent.service import split_holdout  # noqa: E402
from fedge.agent.trainer import LiteRTTrainer  # noqa: E402
from fedge.aggregator.config import RoundSettings  # noqa: E402
from fedge.aggregator.model_export import build_model, write_model  # noqa: E402
from fedge.aggregator.round_engine import EngineState, RoundEngine  # noqa: E402
from fedge.aggregator.service import load_model  # noqa: E402
from fedge.lab import har_watch  # noqa: E402
from fedge.protocol.errors import FedgeError  # noqa: E402
from fedge.protocol.messages import Evaluation, encode_moments, encode_update  # noqa: E402
from fedge.protocol.task import parse_task_spec  # noqa: E402
from fedge.protocol.topics import FleetTopics  # noqa: E402

FLEET = "poison"
TOPICS = FleetTopics(FLEET)
DEFAULT_OUT = ROOT / "bench" / "results" / "poisoning.json"
PAIRS = ((6, 7), (1, 2), (3, 4), (2, 5), (1, 7))
PLAIN = {
    "weighting": "examples",
    "example_cap_ratio": 1000.0,
    "update_norm_ratio": 0.0,
    "update_norm_adaptive": 0.0,
    "moments_aggregation": "pooled",
}


class World:
    """The data, the model and the keys, shared by every run."""

    def __init__(self, model_dir: Path) -> None:
        task = parse_task_spec((ROOT / "tasks" / "har-watch.toml").read_text())
        devices = har_watch.load_devices(task, har_watch.SUBJECTS)
        self.x_test, self.y_test = har_watch.pooled([devices[s] for s in har_watch.TEST_SUBJECTS])
        self.local = {s: split_holdout(devices[s].x, devices[s].y, 0.2, 0) for s in har_watch.TRAIN_SUBJECTS}
        self.loaded = load_model(model_dir)
        self.trainer = LiteRTTrainer(self.loaded.model, self.loaded.manifest)
        self.box = PrivateKey.generate()
        self.signing = SigningKey.generate()
        self.keys = {s: PrivateKey.generate() for s in har_watch.TRAIN_SUBJECTS}


def run(
    world: World, settings: RoundSettings, attackers: tuple[int, ...], silent: bool = False
) -> dict[str, Any]:
    """One federated run; ``attackers`` send poison, or nothing at all if ``silent`` (what losing
    their data alone costs)."""
    ids = {s: har_watch.device_id(s) for s in har_watch.TRAIN_SUBJECTS}
    state = EngineState(0, "", 0, world.loaded.initial_weights.copy(), None, {})
    engine = RoundEngine(
        FLEET,
        settings,
        world.loaded.manifest,
        world.loaded.model,
        world.box,
        world.signing,
        {ids[s]: k.public_key for s, k in world.keys.items()},
        state,
    )
    counters = dict.fromkeys(ids, 0)
    layout = world.loaded.manifest.layout
    now = 1_700_000_000.0

    def send(subject: int, manifest: Any, kind: str, header: dict[str, Any], body: bytes) -> str:
        counters[subject] += 1
        identity = DeviceIdentity(FLEET, ids[subject], world.keys[subject], world.box.public_key)
        frame = seal_contribution(
            identity, manifest.round_id, manifest.version, counters[subject], kind, (header, body)
        )
        return engine.handle(TOPICS.update(ids[subject]), frame, now).reason

    accuracies: list[float] = []
    clipped = diverged = 0
    for _ in range(3 * settings.rounds + 3):  # aborted rounds are retried; do not loop forever
        pub = engine.open_round(now)
        m = pub.manifest
        if m.phase == "final":
            break
        w = engine.state.weights.copy()
        world.trainer.normalisation = m.normalisation
        for s in har_watch.TRAIN_SUBJECTS:
            data = world.local[s]
            if silent and s in attackers:
                continue
            if m.phase == "moments":
                if s in attackers:
                    n, v, f = 400, 1e4, data.x_train.shape[1]
                    send(s, m, "moments", *encode_moments(n, np.full(f, n * v), np.full(f, n * (v * v + 1))))
                else:
                    x = data.x_train.astype(np.float64)
                    send(s, m, "moments", *encode_moments(x.shape[0], x.sum(axis=0), (x * x).sum(axis=0)))
                continue
            if s in attackers:
                norm = float(np.linalg.norm(w.astype(np.float64)))
                factor = 1.0 if s == attackers[0] else 10.0
                delta = (-w / norm * 0.5 * max(norm, 1.0) * factor).astype(np.float32)
                send(s, m, "update", *encode_update(delta, layout, m.codec, 1_000_000, 0.01, None))
                continue
            world.trainer.set_weights(w)
            ev = world.trainer.evaluate(data.x_holdout, data.y_holdout)
            rng = np.random.default_rng([0, m.version])
            try:
                losses = world.trainer.fit(data.x_train, data.y_train, rng=rng)
                delta = world.trainer.get_weights() - w
                evaluation = Evaluation(ev.examples, ev.loss, ev.accuracy, ev.mse)
                n = data.x_train.shape[0]
                send(s, m, "update", *encode_update(delta, layout, m.codec, n, losses[-1], evaluation))
            except FedgeError:  # a poisoned model makes training diverge (NaN): the agent sends nothing
                diverged += 1
        record = engine.close_round()
        clipped += record.clipped
        if m.phase == "train" and record.outcome == "aggregated":
            world.trainer.set_weights(engine.state.weights)
            world.trainer.normalisation = engine.state.normalisation
            accuracies.append(float(world.trainer.evaluate(world.x_test, world.y_test).accuracy or 0.0))
        now += 100.0
    honest = [s for s in har_watch.TRAIN_SUBJECTS if s not in attackers]
    means = np.stack([world.local[s].x_train.mean(axis=0) for s in honest])
    norm = engine.state.normalisation
    assert norm is not None
    mean = np.asarray(norm.mean)
    in_range = bool(np.all(mean >= means.min(axis=0) - 1e-9) and np.all(mean <= means.max(axis=0) + 1e-9))
    return {
        "attackers": list(attackers),
        "final_accuracy": round(accuracies[-1], 4) if accuracies else 0.0,
        "completed_rounds": engine.state.completed_rounds,
        "diverged_trainings": diverged,
        "accuracy_per_round": [round(a, 4) for a in accuracies],
        "normalisation_in_honest_range": in_range,
        "max_mean_feature": float(mean.max()),
        "clipped_updates": clipped,
        "rejected": dict(engine.state.rejected_total),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--server-lr", type=float, default=1.0)
    cfg = parser.parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedge-poison-") as tmp:
        task = parse_task_spec((ROOT / "tasks" / "har-watch.toml").read_text())
        write_model(build_model(task), Path(tmp))
        world = World(Path(tmp))
        base = RoundSettings(
            rounds=cfg.rounds, min_devices=2, server_learning_rate=cfg.server_lr, wait_for_devices_s=0.0
        )
        settings = {"plain": replace(base, **PLAIN), "defaults": base}
        results: dict[str, list[dict[str, Any]]] = {}
        for name, s in settings.items():
            clean = run(world, s, ())
            rows = [clean]
            for pair in PAIRS:
                row = run(world, s, pair)
                absent = run(world, s, pair, silent=True)
                row["drop_from_clean"] = round(clean["final_accuracy"] - row["final_accuracy"], 4)
                row["accuracy_without_them"] = absent["final_accuracy"]
                row["drop_from_without_them"] = round(absent["final_accuracy"] - row["final_accuracy"], 4)
                rows.append(row)
                print(f"{name:8s} attackers {pair}: {row['final_accuracy']:.3f}", file=sys.stderr, flush=True)
            results[name] = rows
    lines = [
        "setting | attackers | final acc | drop from clean | acc without them | drop from that"
        " | rounds | moments in honest range | clipped | diverged",
        "--- | --- | --- | --- | --- | --- | --- | --- | --- | ---",
    ]
    for name, rows in results.items():
        for r in rows:
            who = ",".join(map(str, r["attackers"])) or "none (clean)"
            drop = r.get("drop_from_clean", 0.0)
            without = r.get("accuracy_without_them")
            own = f"{without:.3f} | {r['drop_from_without_them']:+.3f}" if without is not None else "- | -"
            lines.append(
                f"{name} | {who} | {r['final_accuracy']:.3f} | {drop:+.3f} | {own} | "
                f"{r['completed_rounds']} | {r['normalisation_in_honest_range']} | "
                f"{r['clipped_updates']} | {r['diverged_trainings']}"
            )
    worst = {n: max(r.get("drop_from_clean", 0.0) for r in rows) for n, rows in results.items()}
    lines.append("")
    lines.append("worst drop: " + ", ".join(f"{n} {d:.3f}" for n, d in worst.items()))
    print("\n".join(lines))
    out = {
        "machine": machine_info(),
        "config": {"rounds": cfg.rounds, "server_lr": cfg.server_lr, "pairs": [list(p) for p in PAIRS]},
        "results": results,
        "worst_drop": worst,
        "seconds": round(time.perf_counter() - start, 1),
    }
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
