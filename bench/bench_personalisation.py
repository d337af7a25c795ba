"""Personalisation on the device (issue 17): personal vs global accuracy per device, on each
device's own held-out part, after K federated rounds.

The default data as ``make demo`` runs it: the smartwatch task (``tasks/har-watch.toml``), the
seven training subjects (1-7) as seven devices. The federated rounds run in-process with the
real :class:`RoundEngine` (sealed messages, every check, the deployment's influence bounds, the
demo's server learning rate of 2.0) and each device training with the LiteRT interpreter as
the agent does (``fedge.agent.service``: the global weights set, the held-out part evaluated,
the task's ``local_epochs`` (3) shuffled with ``[seed, version]``). After round ``k`` of the
checkpoints (1, 5 and the last), each device fine-tunes the global model of that round with
:func:`fedge.agent.personal.fine_tune`, the very function the agent calls with
``[personalisation] enabled``, for 1, 5 (the default) and 20 epochs, and both the global and the
personal weights are scored on the device's held-out part.

The three test subjects (8-10) are measured the same way as devices that join after the rounds
(marked ``*``): their data never reached the federation, so they show what personalisation does
for a device the global model has never seen. Their means are kept apart from the fleet's.

Two ways to hold out 20 % of a device's windows, each with its own federated run (the devices
train only on the rest either way):

- ``random``: the agent's own split (:func:`fedge.agent.service.split_holdout`, ``[data]
  holdout_fraction = 0.2``, ``seed = 0``): what the device status reports. Windows overlap by
  half, so a held-out window's neighbours are trained on, which flatters every fit to the
  device's own data, personal weights most.
- ``blocked``: the last 20 % of each exercise's windows in recording order, so no held-out
  window overlaps a trained one: a fairer estimate of how the personal weights do on the
  device's later readings. The data set has two recordings per subject and exercise, so these
  are the end of the second one, whose start (and the whole first one) is trained on.

Usage: ``python bench/bench_personalisation.py [--rounds 20] [--out
bench/results/personalisation.json] [--docs-json docs/results/personalisation.json]``; the plot
goes next to each JSON. About 10 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_training import machine_info  # type: ignore[import-not-found, unused-ignore]  # noqa: E402
from fedge.agent.config import PersonalisationSettings  # noqa: E402
from fedge.agent.personal import fine_tune, to_bytes  # noqa: E402
from fedge.agent.service import LocalData, split_holdout  # noqa: E402
from fedge.agent.trainer import LiteRTTrainer  # noqa: E402
from fedge.aggregator.model_export import build_model, write_model  # noqa: E402
from fedge.aggregator.round_engine import RoundEngine  # noqa: E402
from fedge.aggregator.service import load_model  # noqa: E402
from fedge.lab import har_watch  # noqa: E402
from fedge.protocol.round_manifest import RoundManifest  # noqa: E402
from fedge.protocol.task import parse_task_spec  # noqa: E402
from inprocess_rounds import run_rounds  # type: ignore[import-not-found, unused-ignore]  # noqa: E402

FLEET = "personal"
DEFAULT_OUT = ROOT / "bench" / "results" / "personalisation.json"
HOLDOUT_FRACTION = 0.2
SEED = 0
#: The demo's server learning rate (``fedge demo``); everything else is the deployment default.
SERVER_LEARNING_RATE = 2.0
#: Epochs of fine-tuning measured; the agent's default (``[personalisation] epochs``) among them.
EPOCHS = (1, PersonalisationSettings().epochs, 20)
SPLITS = ("random", "blocked")


def blocked_split(x: np.ndarray, y: np.ndarray, fraction: float) -> LocalData:
    """The last ``fraction`` of each class's windows (in recording order) held out."""
    hold = np.zeros(y.shape[0], bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        hold[idx[idx.shape[0] - round(fraction * idx.shape[0]) :]] = True
    return LocalData(x[~hold], y[~hold], x[hold], y[hold])


def accuracy(trainer: LiteRTTrainer, data: LocalData) -> float:
    value = trainer.evaluate(data.x_holdout, data.y_holdout).accuracy
    return float(value) if value is not None and math.isfinite(value) else 0.0


def federate(
    loaded: Any,
    trainer: LiteRTTrainer,
    devices: dict[str, LocalData],
    rounds: int,
    at_checkpoint: Callable[[int, RoundManifest, np.ndarray], None],
    checkpoints: tuple[int, ...],
) -> list[float]:
    """``rounds`` train rounds (after the moments round) with every device taking part, as the
    agents of ``fedge demo`` do (:func:`inprocess_rounds.run_rounds`); ``at_checkpoint(k, manifest,
    weights)`` after round ``k`` of ``checkpoints`` with the manifest of the global model it
    produced (which the devices would install and fine-tune). Returns the mean held-out accuracy
    over the devices after each round."""
    mean_accuracy: list[float] = []

    def installed(k: int, manifest: RoundManifest, weights: np.ndarray) -> None:
        if k in checkpoints:
            at_checkpoint(k, manifest, weights)

    def closed(manifest: RoundManifest, engine: RoundEngine) -> None:
        if manifest.phase == "train":
            trainer.set_weights(engine.state.weights)
            trainer.normalisation = engine.state.normalisation
            mean_accuracy.append(float(np.mean([accuracy(trainer, d) for d in devices.values()])))

    run_rounds(
        loaded,
        trainer,
        {d: (data.x_train, data.y_train) for d, data in devices.items()},
        rounds,
        fleet=FLEET,
        server_learning_rate=SERVER_LEARNING_RATE,
        seed=SEED,
        holdout={d: (data.x_holdout, data.y_holdout) for d, data in devices.items()},
        closed=closed,
        installed=installed,
    )
    return mean_accuracy


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over ``rows``, and how many devices the personal weights did better and worse on."""
    return {
        "mean_global": round(float(np.mean([r["global"] for r in rows])), 4),
        **{
            f"mean_personal_{e}": round(float(np.mean([r[f"personal_{e}"] for r in rows])), 4) for e in EPOCHS
        },
        **{f"better_{e}": sum(r[f"personal_{e}"] > r["global"] for r in rows) for e in EPOCHS},
        **{f"worse_{e}": sum(r[f"personal_{e}"] < r["global"] for r in rows) for e in EPOCHS},
    }


def measure(
    loaded: Any,
    trainer: LiteRTTrainer,
    devices: dict[str, LocalData],
    newcomers: dict[str, LocalData],
    rounds: int,
    checkpoints: tuple[int, ...],
) -> dict[str, Any]:
    """One split: the federated run of ``devices`` and, at each checkpoint, the personal weights
    of every device and of every newcomer (a device whose data the federation never saw)."""
    per_checkpoint: dict[str, Any] = {}

    def personalise(k: int, manifest: RoundManifest, global_weights: np.ndarray) -> None:
        trainer.normalisation = manifest.normalisation
        rows = []
        for device_id, data in [*devices.items(), *newcomers.items()]:
            row: dict[str, Any] = {
                "device": device_id,
                "in_fleet": device_id in devices,
                "trained": int(data.x_train.shape[0]),
                "held_out": int(data.x_holdout.shape[0]),
            }
            for epochs in EPOCHS:
                tuned = fine_tune(
                    trainer,
                    manifest,
                    global_weights,
                    (data.x_train, data.y_train),
                    (data.x_holdout, data.y_holdout),
                    epochs=epochs,
                    seed=SEED,
                )
                ev = tuned.evaluation
                assert ev is not None and ev.metric == "accuracy"
                # fine_tune leaves the trainer on the global weights: the next round is unchanged.
                assert trainer.get_weights().tobytes() == global_weights.tobytes()
                row["global"] = round(ev.global_value, 4)
                row[f"personal_{epochs}"] = round(ev.personal_value, 4)
                row[f"seconds_{epochs}"] = round(tuned.seconds, 4)
                row["file_bytes"] = len(to_bytes(tuned))
            rows.append(row)
        per_checkpoint[str(k)] = {
            "devices": rows,
            **summary([r for r in rows if r["in_fleet"]]),
            "newcomers": summary([r for r in rows if not r["in_fleet"]]) if newcomers else None,
        }

    mean_accuracy = federate(loaded, trainer, devices, rounds, personalise, checkpoints)
    return {
        "mean_global_accuracy_per_round": [round(a, 4) for a in mean_accuracy],
        "checkpoints": per_checkpoint,
    }


def table(results: dict[str, Any], k: int) -> list[str]:
    """Per device after round ``k``: held out, global, personal at each number of epochs; the
    means of the fleet's devices, then the newcomers (marked ``*``) and their mean."""
    default = PersonalisationSettings().epochs
    head = [
        "split",
        "device",
        "held out",
        "global",
        *(f"personal {e} ep" for e in EPOCHS),
        f"gain ({default} ep)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for split in SPLITS:
        entry = results[split]["checkpoints"][str(k)]
        for r in entry["devices"]:
            if not r["in_fleet"] and r is next(x for x in entry["devices"] if not x["in_fleet"]):
                lines.append(mean_row(split, "**mean, fleet**", entry, default))
            cells = [
                split,
                r["device"] if r["in_fleet"] else f"{r['device']}*",
                str(r["held_out"]),
                f"{r['global']:.3f}",
                *(f"{r[f'personal_{e}']:.3f}" for e in EPOCHS),
                f"{100 * (r[f'personal_{default}'] - r['global']):+.1f} pt",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        if entry["newcomers"] is None:
            lines.append(mean_row(split, "**mean, fleet**", entry, default))
        else:
            lines.append(mean_row(split, "**mean, newcomers***", entry["newcomers"], default))
    return lines


def mean_row(split: str, name: str, means: dict[str, Any], default: int) -> str:
    cells = [
        split,
        name,
        "",
        f"{means['mean_global']:.3f}",
        *(f"{means[f'mean_personal_{e}']:.3f}" for e in EPOCHS),
        f"{100 * (means[f'mean_personal_{default}'] - means['mean_global']):+.1f} pt",
    ]
    return "| " + " | ".join(cells) + " |"


def plot(path: Path, results: dict[str, Any], k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    default = PersonalisationSettings().epochs
    fig, axes = plt.subplots(1, len(SPLITS), figsize=(6 * len(SPLITS), 4), squeeze=False)
    for ax, split in zip(axes[0], SPLITS, strict=True):
        rows = results[split]["checkpoints"][str(k)]["devices"]
        x = np.arange(len(rows))
        width = 0.8 / (1 + len(EPOCHS))
        ax.bar(x - 0.4 + width / 2, [r["global"] for r in rows], width, label="global", color="grey")
        for i, e in enumerate(EPOCHS):
            label = f"personal, {e} epoch{'s' if e > 1 else ''}" + (" (default)" if e == default else "")
            ax.bar(x - 0.4 + width * (i + 1.5), [r[f"personal_{e}"] for r in rows], width, label=label)
        ax.set_xticks(
            x, [r["device"] + ("" if r["in_fleet"] else "*") for r in rows], rotation=30, fontsize=8
        )
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("accuracy on the device's held-out part")
        ax.set_title(f"{split} hold-out, after {k} federated rounds", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(
        "Personal vs global weights per device (smartwatch task: subjects 1-7 the fleet, * joined after)"
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rounds", type=int, default=20, help="federated train rounds (default 20, as make demo)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--docs-json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    rounds = args.rounds
    checkpoints = tuple(sorted({k for k in (1, 5, rounds) if 1 <= k <= rounds}))
    started = time.perf_counter()
    task = parse_task_spec((ROOT / "tasks" / "har-watch.toml").read_text())
    subjects = har_watch.load_devices(task, har_watch.SUBJECTS)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_model(build_model(task), Path(tmp))
        loaded = load_model(Path(tmp))
    trainer = LiteRTTrainer(loaded.model, loaded.manifest)
    for split in SPLITS:
        parts = {
            s: (
                split_holdout(d.x, d.y, HOLDOUT_FRACTION, SEED)
                if split == "random"
                else blocked_split(d.x, d.y, HOLDOUT_FRACTION)
            )
            for s, d in subjects.items()
        }
        devices = {har_watch.device_id(s): parts[s] for s in har_watch.TRAIN_SUBJECTS}
        newcomers = {har_watch.device_id(s): parts[s] for s in har_watch.TEST_SUBJECTS}
        results[split] = measure(loaded, trainer, devices, newcomers, rounds, checkpoints)
        for k, entry in results[split]["checkpoints"].items():
            for who, means in (("fleet", entry), ("newcomers", entry["newcomers"])):
                personal = ", ".join(f"{e} ep {means[f'mean_personal_{e}']:.3f}" for e in EPOCHS)
                print(
                    f"{split} after round {k}, {who}: mean global {means['mean_global']:.3f}; "
                    f"personal {personal}",
                    flush=True,
                )
    lines = table(results, rounds)
    print("\n".join(lines))
    first = results["random"]["checkpoints"][str(rounds)]["devices"][0]
    doc = {
        "benchmark": "personalisation",
        "machine": machine_info(),
        "task": task.name,
        "devices": [har_watch.device_id(s) for s in har_watch.TRAIN_SUBJECTS],
        "newcomers": [har_watch.device_id(s) for s in har_watch.TEST_SUBJECTS],
        "rounds": rounds,
        "checkpoints": list(checkpoints),
        "epochs": list(EPOCHS),
        "default_epochs": PersonalisationSettings().epochs,
        "holdout_fraction": HOLDOUT_FRACTION,
        "server_learning_rate": SERVER_LEARNING_RATE,
        "parameters": int(loaded.manifest.parameter_count),
        "personal_file_bytes": first["file_bytes"],
        "results": results,
        "table": lines,
        "seconds": round(time.perf_counter() - started, 1),
    }
    text = json.dumps(doc, indent=2) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    plot(args.out.with_suffix(".png"), results, rounds)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    if args.docs_json is not None:
        args.docs_json.parent.mkdir(parents=True, exist_ok=True)
        args.docs_json.write_text(text)
        plot(args.docs_json.with_suffix(".png"), results, rounds)
        print(f"wrote {args.docs_json} and {args.docs_json.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
