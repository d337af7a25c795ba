"""Held-out accuracy against bytes per update for every tensor codec, in one run (issue 15,
"Bytes").

The default task as the demo runs it: subjects 1-7 of the real smartwatch data as 7 devices,
subjects 8-10 held out, the deployment's round settings with the demo's server learning rate
(2.0), the same rounds from the same initial model for every codec. Everything but the network
is the product: the real :class:`RoundEngine` (sealed messages, every check, the norm bounds),
devices training with the LiteRT interpreter exactly as the agent does, and for the sparse
codecs the agent's own error feedback (``fedge.agent.core.sparse_update_payload``: the residual
is added before the top k are chosen and what was not sent is kept for the next round). One
sparse run leaves error feedback out, to show what it is for.

Bytes are measured, not computed: the length of each sealed update message as it would go on
the wire (the MQTT payload), averaged over every update of the run; the fp32 run is the
baseline of the ratios. The target: an update at most 0.1x fp32 within 1 point of fp32's
accuracy after the same rounds.

Usage: ``python bench/bench_codecs.py [--rounds 30] [--out bench/results/codecs.json] [--quick]``;
the plot goes next to the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
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
from fedge.agent.core import (  # noqa: E402
    DeviceIdentity,
    moments_payload,
    seal_contribution,
    sparse_update_payload,
    update_payload,
)
from fedge.agent.service import LocalData, split_holdout  # noqa: E402
from fedge.agent.trainer import LiteRTTrainer  # noqa: E402
from fedge.aggregator.config import RoundSettings  # noqa: E402
from fedge.aggregator.model_export import build_model, write_model  # noqa: E402
from fedge.aggregator.round_engine import EngineState, RoundEngine  # noqa: E402
from fedge.aggregator.service import load_model  # noqa: E402
from fedge.lab import har_watch  # noqa: E402
from fedge.protocol.codec import Codec  # noqa: E402
from fedge.protocol.task import parse_task_spec  # noqa: E402
from fedge.protocol.topics import FleetTopics  # noqa: E402

FLEET = "codecs"
TOPICS = FleetTopics(FLEET)
DEFAULT_OUT = ROOT / "bench" / "results" / "codecs.json"
QUICK_OUT = ROOT / "bench" / "results" / "codecs-quick.json"
SERVER_LEARNING_RATE = 2.0  # the demo's


@dataclass(frozen=True)
class Variant:
    """One run's codec, its ``topk_fraction`` (sparse only) and whether error feedback is on."""

    name: str
    codec: Codec
    topk_fraction: float = 0.1
    error_feedback: bool = True


VARIANTS = (
    Variant("fp32", Codec.FP32),
    Variant("fp16", Codec.FP16),
    Variant("int8", Codec.INT8),
    Variant("topk-fp16 0.1", Codec.TOPK_FP16, 0.1),
    Variant("topk-int8 0.1", Codec.TOPK_INT8, 0.1),
    Variant("topk-int8 0.05", Codec.TOPK_INT8, 0.05),
    Variant("topk-int8 0.1, no EF", Codec.TOPK_INT8, 0.1, error_feedback=False),
)
QUICK_VARIANTS = ("fp32", "topk-int8 0.1")


@dataclass
class Device:
    device_id: str
    data: LocalData
    key: PrivateKey
    residual: np.ndarray | None = None


def run(
    loaded: Any,
    trainer: LiteRTTrainer,
    devices: list[Device],
    test: tuple[np.ndarray, np.ndarray],
    variant: Variant,
    rounds: int,
    seed: int,
) -> dict[str, Any]:
    """One federated run of ``rounds`` train rounds with ``variant``'s codec; ``seed`` seeds
    the devices' batch order."""
    started = time.perf_counter()
    settings = replace(
        RoundSettings(rounds=rounds, min_devices=2, wait_for_devices_s=0.0),
        server_learning_rate=SERVER_LEARNING_RATE,
        codec=variant.codec,
        topk_fraction=variant.topk_fraction,
    )
    box, signing = PrivateKey.generate(), SigningKey.generate()
    state = EngineState(0, "", 0, loaded.initial_weights.copy(), None, {})
    engine = RoundEngine(
        FLEET,
        settings,
        loaded.manifest,
        loaded.model,
        box,
        signing,
        {d.device_id: d.key.public_key for d in devices},
        state,
    )
    by_id = {d.device_id: d for d in devices}
    for d in devices:
        d.residual = None
    counters = dict.fromkeys(by_id, 0)
    now = 1_700_000_000.0
    refused: dict[str, int] = {}
    sizes: list[int] = []
    body_sizes: list[int] = []

    def send(device: Device, manifest: Any, kind: str, payload: tuple[dict[str, Any], bytes]) -> None:
        counters[device.device_id] += 1
        identity = DeviceIdentity(FLEET, device.device_id, device.key, box.public_key)
        frame = seal_contribution(
            identity, manifest.round_id, manifest.version, counters[device.device_id], kind, payload
        )
        if kind == "update":
            sizes.append(len(frame))
            body_sizes.append(len(payload[1]))
        reason = engine.handle(TOPICS.update(device.device_id), frame, now).reason
        if reason != "accepted":
            refused[str(reason)] = refused.get(str(reason), 0) + 1

    accuracies: list[float] = []
    x_test, y_test = test
    for _ in range(2 * rounds + 3):
        m = engine.open_round(now).manifest
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
            trainer.set_weights(w)
            ev = trainer.evaluate(data.x_holdout, data.y_holdout)
            losses = trainer.fit(data.x_train, data.y_train, rng=np.random.default_rng([seed, m.version]))
            delta = trainer.get_weights() - w
            n = int(data.x_train.shape[0])
            if variant.codec.sparse:
                residual = device.residual if variant.error_feedback else None
                payload, owed = sparse_update_payload(m, delta, residual, n, losses[-1], ev)
                device.residual = owed
            else:
                payload = update_payload(m, delta, n, losses[-1], ev)
            send(device, m, "update", payload)
        record = engine.close_round()
        if m.phase == "train" and record.outcome == "aggregated":
            trainer.set_weights(engine.state.weights)
            trainer.normalisation = engine.state.normalisation
            acc = trainer.evaluate(x_test, y_test).accuracy
            accuracies.append(float(acc) if acc is not None and math.isfinite(acc) else 0.0)
        now += 100.0
    return {
        "variant": variant.name,
        "codec": variant.codec.value,
        "topk_fraction": variant.topk_fraction if variant.codec.sparse else None,
        "error_feedback": variant.error_feedback if variant.codec.sparse else None,
        "updates": len(sizes),
        "mean_message_bytes": round(float(np.mean(sizes)), 1),
        "mean_body_bytes": round(float(np.mean(body_sizes)), 1),
        "max_message_bytes": int(max(sizes)),
        "final_accuracy": round(accuracies[-1], 4) if accuracies else 0.0,
        "mean_of_last_5": round(float(np.mean(accuracies[-5:])), 4) if accuracies else 0.0,
        "accuracy_per_round": [round(a, 4) for a in accuracies],
        "refused_messages": refused,
        "seconds": round(time.perf_counter() - started, 1),
    }


def table(runs: list[dict[str, Any]]) -> list[str]:
    head = ("codec", "bytes/update", "x fp32", "final acc", "last5", "vs fp32", "target")
    lines = ["{:<22} {:>12} {:>7} {:>9} {:>6} {:>8} {:>7}".format(*head)]
    for r in runs:
        target = {None: "base", True: "yes", False: "no"}[r["meets_target"]]
        lines.append(
            f"{r['variant']:<22} {r['mean_message_bytes']:>12.0f} {r['bytes_ratio_to_fp32']:>7.3f} "
            f"{r['final_accuracy']:>9.3f} {r['mean_of_last_5']:>6.3f} "
            f"{r['points_vs_fp32']:>+7.1f}p {target:>7}"
        )
    return lines


def plot(path: Path, runs: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    for r in runs:
        acc = r["accuracy_per_round"]
        left.plot(range(1, len(acc) + 1), acc, label=r["variant"], linewidth=1.2)
        right.scatter(r["mean_message_bytes"] / 1024, r["mean_of_last_5"], s=30)
        right.annotate(r["variant"], (r["mean_message_bytes"] / 1024, r["mean_of_last_5"]), fontsize=7)
    left.set_xlabel("round")
    left.set_ylabel("held-out accuracy (subjects 8-10)")
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    right.set_xscale("log")
    right.set_xlabel("sealed update, KiB (log)")
    right.set_ylabel("held-out accuracy, mean of the last 5 rounds")
    right.grid(alpha=0.3)
    fig.suptitle("har-watch, 7 devices: accuracy against bytes per update")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seeds", type=int, default=3, help="runs per codec (batch-order seeds), averaged")
    parser.add_argument("--quick", action="store_true", help="3 rounds, 1 seed, fp32 and topk-int8 0.1")
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else args.rounds
    seeds = 1 if args.quick else args.seeds
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    variants = [v for v in VARIANTS if not args.quick or v.name in QUICK_VARIANTS]
    started = time.perf_counter()
    task = parse_task_spec((ROOT / "tasks" / "har-watch.toml").read_text())
    subjects = har_watch.load_devices(task, har_watch.SUBJECTS)
    test = har_watch.pooled([subjects[s] for s in har_watch.TEST_SUBJECTS])
    devices = [
        Device(
            har_watch.device_id(s),
            split_holdout(subjects[s].x, subjects[s].y, 0.2, s),
            PrivateKey.generate(),
        )
        for s in har_watch.TRAIN_SUBJECTS
    ]
    with tempfile.TemporaryDirectory() as tmp:
        write_model(build_model(task), Path(tmp))
        loaded = load_model(Path(tmp))
    trainer = LiteRTTrainer(loaded.model, loaded.manifest)
    runs = []
    for v in variants:
        per_seed = [run(loaded, trainer, devices, test, v, rounds, seed) for seed in range(seeds)]
        r = per_seed[0] | {
            "seeds": seeds,
            "mean_message_bytes": round(float(np.mean([x["mean_message_bytes"] for x in per_seed])), 1),
            "final_accuracy": round(float(np.mean([x["final_accuracy"] for x in per_seed])), 4),
            "mean_of_last_5": round(float(np.mean([x["mean_of_last_5"] for x in per_seed])), 4),
            "mean_of_last_5_per_seed": [x["mean_of_last_5"] for x in per_seed],
            "accuracy_per_round": [
                round(float(a), 4) for a in np.mean([x["accuracy_per_round"] for x in per_seed], axis=0)
            ],
            "refused_messages": [x["refused_messages"] for x in per_seed],
            "seconds": round(sum(x["seconds"] for x in per_seed), 1),
        }
        runs.append(r)
        print(
            f"{v.name}: {r['mean_message_bytes']:.0f} B, {r['mean_of_last_5']:.3f} ({r['seconds']} s)",
            flush=True,
        )
    base = runs[0]
    for r in runs:
        r["bytes_ratio_to_fp32"] = round(r["mean_message_bytes"] / base["mean_message_bytes"], 4)
        r["points_vs_fp32"] = round(100 * (r["mean_of_last_5"] - base["mean_of_last_5"]), 1)
        r["meets_target"] = (
            None if r is base else bool(r["bytes_ratio_to_fp32"] <= 0.1 and r["points_vs_fp32"] >= -1.0)
        )
    lines = table(runs)
    print("\n".join(lines))
    doc = {
        "benchmark": "codecs",
        "machine": machine_info(),
        "task": task.name,
        "devices": len(devices),
        "rounds": rounds,
        "seeds": seeds,
        "server_learning_rate": SERVER_LEARNING_RATE,
        "parameters": loaded.manifest.parameter_count,
        "accuracy_measure": "mean of the last 5 rounds' held-out accuracy (subjects 8-10), over the seeds",
        "runs": runs,
        "table": lines,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    plot(out.with_suffix(".png"), runs)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
