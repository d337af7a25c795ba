"""The ``fedge`` command line.

Every subcommand imports its side lazily: ``fedge train-local`` with a ready model never loads
TensorFlow, and bad input ends in a one-line ``fedge: error: ...`` and exit code 2, never a
traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fedge import __version__
from protocol.errors import FedgeError
from protocol.task import TaskSpec, parse_task_spec

EXIT_USAGE = 2


def read_task(path: Path) -> TaskSpec:
    """Reads and validates a task spec file; every problem is a :class:`FedgeError`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FedgeError(f"cannot read task spec {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise FedgeError(f"task spec {path} is not UTF-8 text") from None
    try:
        return parse_task_spec(text)
    except FedgeError as exc:
        raise FedgeError(f"{path}: {exc}") from None


def _quiet_tensorflow() -> None:
    # TensorFlow's C++ start-up chatter hides fedge's own output; users can still override.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def cmd_model_build(args: argparse.Namespace) -> int:
    task = read_task(args.task)
    normalisation = None
    if args.normalisation is not None:
        from protocol.model_manifest import Normalisation  # noqa: PLC0415

        try:
            normalisation = Normalisation.from_dict(json.loads(args.normalisation.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise FedgeError(f"cannot read normalisation {args.normalisation}: {exc}") from None
    _quiet_tensorflow()
    from aggregator.model_export import build_model, write_model  # noqa: PLC0415 - needs TF

    built = build_model(task, normalisation)
    manifest_path = write_model(built, args.out)
    m = built.manifest
    summary = {
        "task": task.name,
        "out": str(args.out),
        "manifest": str(manifest_path),
        "layers": list(task.layer_sizes),
        "parameter_count": m.parameter_count,
        "model_bytes": m.model_bytes,
        "model_sha256": m.model_sha256,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"built {task.name}: layers {'-'.join(map(str, task.layer_sizes))}, "
            f"{m.parameter_count} parameters, {m.model_bytes} bytes, builtin ops only\n"
            f"  {manifest_path}\n  sha256 {m.model_sha256}"
        )
    return 0


def cmd_train_local(args: argparse.Namespace) -> int:
    task = read_task(args.task)
    if args.epochs < 1:
        raise FedgeError("--epochs must be >= 1")
    if args.model_dir is None:
        _quiet_tensorflow()
    from fedge.progress import ProgressBar  # noqa: PLC0415
    from fedge.train_local import train_local  # noqa: PLC0415

    bar = ProgressBar("train-local", enabled=False if args.no_progress else None)
    result = train_local(
        task, args.epochs, seed=args.seed, model_dir=args.model_dir, runtime=args.runtime,
        progress=bar,
    )
    if args.plot is not None:
        from fedge.plots import plot_history  # noqa: PLC0415

        h = result.history
        plot_history(
            args.plot,
            f"fedge train-local: {task.name} (LiteRT, {result.train_examples} windows)",
            [r.epoch for r in h],
            [r.train_loss for r in h],
            [r.test_loss for r in h],
            [r.test_accuracy for r in h],
        )
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    print(f"{'epoch':>5} {'train loss':>10} {'test loss':>10} {'test acc':>8}")
    for r in result.history:
        acc = f"{r.test_accuracy:.3f}" if r.test_accuracy is not None else "-"
        print(f"{r.epoch:>5} {r.train_loss:>10.4f} {r.test_loss:>10.4f} {acc:>8}")
    metric = (
        f"held-out accuracy {result.test_accuracy:.3f}"
        if result.test_accuracy is not None
        else f"held-out MSE {result.test_mse:.4f}"
    )
    print(
        f"{task.name}: {metric} on subjects {result.test_subjects} "
        f"({result.test_examples} windows), trained centrally on {result.train_examples} windows "
        f"in {result.seconds:.2f}s with {result.runtime}"
    )
    if args.plot is not None:
        print(f"plot: {args.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedge", description="Federated learning for IoT edge devices in smart buildings."
    )
    parser.add_argument("--version", action="version", version=f"fedge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    model = sub.add_parser("model", help="build trainable TFLite models (aggregator side)")
    model_sub = model.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)
    build = model_sub.add_parser("build", help="build and convert a task's model (no Flex ops)")
    build.add_argument("--task", type=Path, required=True, help="task spec (TOML)")
    build.add_argument("--out", type=Path, required=True, help="output directory")
    build.add_argument(
        "--normalisation", type=Path, help="JSON {mean: [...], std: [...]} to put in the manifest"
    )
    build.add_argument("--json", action="store_true", help="print a JSON summary")
    build.set_defaults(func=cmd_model_build)

    tl = sub.add_parser(
        "train-local", help="train centrally with LiteRT on the HAR data: the reference accuracy"
    )
    tl.add_argument("--task", type=Path, required=True, help="task spec (TOML)")
    tl.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    tl.add_argument("--seed", type=int, default=0, help="shuffling seed (default 0)")
    tl.add_argument("--model-dir", type=Path, help="use a model from 'fedge model build'")
    tl.add_argument(
        "--runtime", choices=["auto", "ai_edge_litert", "tflite_runtime"], default="auto",
        help="TFLite runtime (default: ai_edge_litert, else tflite_runtime)",
    )
    tl.add_argument("--plot", type=Path, help="write a PNG of loss and accuracy per epoch")
    tl.add_argument("--json", action="store_true", help="print the result as JSON")
    tl.add_argument("--no-progress", action="store_true", help="no progress bar")
    tl.set_defaults(func=cmd_train_local)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except FedgeError as exc:
        print(f"fedge: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fedge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
