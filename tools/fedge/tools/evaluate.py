"""``fedge evaluate``: score a model on a building's own labelled data (a CSV), on LiteRT.

The CSV has a header row naming its columns; the task's feature resources and its label
resource must be among them (other columns are ignored). Each data row becomes the EdgeX
readings a device would receive for one instant, and those go through the device's own
:class:`~fedge.agent.edgex.samples.SampleBuilder`: the same screening, alignment, windows and
labels as on a device, so the score is the one a device would see on that data. The CSV is read
by :mod:`fedge.tools.csv_readings`: a time column (``--time-column``, by default one named
``time``, ``timestamp``, ``date`` or ``datetime``; ISO 8601, a time without a zone is UTC, or
epoch seconds) gives each row's instant, so a gap in time splits windows as on a device; without
one, rows are one sample period apart (``1 / sample_rate_hz``, or one second without a rate), in
file order.

- A cell is the reading's EdgeX value text. With ``--profile`` every column is parsed by its
  resource's ``valueType`` and checked against its ``minimum``/``maximum`` as on the device;
  without one, a feature or a regression label is a number (``true``/``false`` count as 1 and
  0), and a class label is a class name, ``true``/``false``/``1``/``0`` for a Bool-like pair
  of classes, or a class index.
- An empty cell is a missing reading: its row is dropped as ``incomplete``, as on a device.
  Rows a device would drop (``not_finite``, ``out_of_range``, ``unknown_label``, ...) are
  dropped and counted in the report's ``quality``.
- A cell that is not a number where a number is needed, or a missing column, stops the
  evaluation with a one-line error before anything is printed.

The model is a ``fedge model build`` directory (its hashes are checked), with its initial
weights or ``--weights`` (a weights blob, e.g. a global model's, :mod:`fedge.protocol.weights`),
and the manifest's normalisation or ``--normalisation``. Or, with ``--global BROKER_URL --fleet
FLEET --verify-key FILE``, the fleet's current signed global model, fetched from the broker and
verified as a device does (:mod:`fedge.tools.global_model`): its model, its weights and its
manifest's normalisation (or ``--normalisation``). Metrics come from the model's own
``evaluate`` and ``infer`` signatures in the LiteRT interpreter (:class:`LiteRTTrainer`):
loss, accuracy and a confusion matrix (rows: true class, columns: predicted class) for a
classification; loss, MSE, MAE and RMSE for a regression.

No TensorFlow: this module's top level imports only the standard library and
``fedge.protocol``; numpy, the agent and LiteRT are imported by the command.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedge.protocol.errors import FedgeError
from fedge.protocol.model_manifest import INITIAL_WEIGHTS_FILE, Normalisation
from fedge.protocol.task import TaskSpec, parse_task_spec
from fedge.tools.csv_readings import CSV_DEVICE, DEFAULT_PERIOD_NS, task_readings
from fedge.tools.standalone import run_alone

if TYPE_CHECKING:
    import numpy as np

    from fedge.agent.edgex.profile import DeviceProfile
    from fedge.agent.edgex.readings import Reading
    from fedge.agent.litert_runtime import RuntimeName
    from fedge.agent.trainer import LiteRTTrainer
    from fedge.protocol.model_manifest import ModelManifest
    from fedge.tools.global_model import GlobalModel

EXIT_USAGE = 2
#: Readings handed to the sample builder at a time (memory stays bounded for long files).
FEED_READINGS = 8192
#: A normalisation file is a few numbers per feature.
MAX_NORMALISATION_BYTES = 4 * 1024 * 1024


class EvaluateError(FedgeError):
    """The task, model, weights or CSV cannot be evaluated; the message says which and why."""


# --- CSV -> samples, through the device's sample builder ----------------------------------------


@dataclass(frozen=True)
class CsvSamples:
    """The samples a device would build from the CSV, and what its builder did with the rows."""

    x: np.ndarray
    y: np.ndarray
    rows: int
    quality: dict[str, int]


def csv_samples(
    path: Path, task: TaskSpec, profile: DeviceProfile | None = None, time_column: str | None = None
) -> CsvSamples:
    """Reads ``path`` and builds the task's samples from it as a device would (module docstring)."""
    import numpy as np  # noqa: PLC0415

    from fedge.agent.edgex.samples import SampleBuilder  # noqa: PLC0415

    limits: dict[str, tuple[float | None, float | None]] = {}
    if profile is not None:
        from fedge.agent.edgex.profile import check_task_against_profile  # noqa: PLC0415

        check_task_against_profile(task, profile)
        limits = {r.name: (r.minimum, r.maximum) for r in profile.resources}
    builder = SampleBuilder(task, limits, device=CSV_DEVICE)
    rate = task.features.sample_rate_hz
    period_ns = max(1, round(1e9 / rate)) if rate else DEFAULT_PERIOD_NS
    features: list[np.ndarray] = []
    labels: list[int | float] = []
    batch: list[Reading] = []
    rows = 0
    for readings in task_readings(path, task, profile, period_ns, time_column, CSV_DEVICE):
        rows += 1
        batch += readings
        if len(batch) >= FEED_READINGS:
            for s in builder.add(batch):
                features.append(s.features)
                labels.append(s.label)
            batch = []
    for s in [*builder.add(batch), *builder.flush()]:
        features.append(s.features)
        labels.append(s.label)
    quality = builder.quality.to_dict()
    if not features:
        raise EvaluateError(f"{path}: no samples: {rows} rows gave none{_dropped(quality, task)}")
    classification = task.model.kind == "classification"
    x = np.stack(features).astype(np.float32)
    y = np.asarray(labels, dtype=np.int64 if classification else np.float32)
    return CsvSamples(x, y, rows, quality)


def _dropped(quality: dict[str, int], task: TaskSpec) -> str:
    reasons = ("not_numeric", "not_finite", "out_of_range", "incomplete", "unknown_label", "gap")
    parts = [f"{r} {quality[r]}" for r in reasons if quality.get(r)]
    window = task.features.window
    if window is not None and quality.get("rows", 0) < window.size:
        parts.append(f"{quality.get('rows', 0)} complete rows, a window needs {window.size}")
    return f" (dropped: {', '.join(parts)})" if parts else ""


# --- the model ----------------------------------------------------------------------------------


def read_task(path: Path) -> TaskSpec:
    """A task spec file, every problem one :class:`FedgeError` naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise EvaluateError(f"cannot read task spec {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise EvaluateError(f"task spec {path} is not UTF-8 text") from None
    try:
        return parse_task_spec(text)
    except FedgeError as exc:
        raise EvaluateError(f"{path}: {exc}") from None


def load_weights(model_dir: Path, manifest: ModelManifest, weights_file: Path | None) -> np.ndarray:
    """The initial weights (hash checked against the manifest) or a weights blob file."""
    from fedge.protocol.weights import WeightsError, weights_from_bytes, weights_nbytes  # noqa: PLC0415

    path = weights_file if weights_file is not None else model_dir / INITIAL_WEIGHTS_FILE
    expected = weights_nbytes(manifest.parameter_count)
    try:
        size = path.stat().st_size
        if size != expected:
            raise EvaluateError(
                f"{path} is {size} bytes; the model's {manifest.parameter_count} float32 "
                f"parameters are {expected}"
            )
        raw = path.read_bytes()
    except OSError as exc:
        raise EvaluateError(f"cannot read weights {path}: {exc.strerror or exc}") from None
    if weights_file is None and hashlib.sha256(raw).hexdigest() != manifest.initial_weights_sha256:
        raise EvaluateError(f"{path} does not match its manifest's initial_weights_sha256")
    try:
        return weights_from_bytes(raw, manifest.parameter_count)
    except WeightsError as exc:
        raise EvaluateError(f"{path}: {exc}") from None


def read_normalisation(path: Path, input_dim: int) -> Normalisation:
    """A ``{"mean": [...], "std": [...]}`` file, one entry per feature."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_NORMALISATION_BYTES + 1)
    except OSError as exc:
        raise EvaluateError(f"cannot read normalisation {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_NORMALISATION_BYTES:
        raise EvaluateError(f"normalisation {path} is over {MAX_NORMALISATION_BYTES} bytes")
    try:
        normalisation = Normalisation.from_dict(json.loads(raw))
    except (ValueError, RecursionError) as exc:
        raise EvaluateError(f"normalisation {path} is not JSON: {exc}") from None
    except FedgeError as exc:
        raise EvaluateError(f"normalisation {path}: {exc}") from None
    if len(normalisation.mean) != input_dim:
        raise EvaluateError(
            f"normalisation {path} has {len(normalisation.mean)} features, the task has {input_dim}"
        )
    return normalisation


def check_model_task(task: TaskSpec, manifest: ModelManifest, model_dir: Path) -> None:
    """The model reads the task's features and predicts its label with its layers; training
    settings may differ (they do not change what the model computes)."""
    ours, theirs = task.to_dict(), manifest.task.to_dict()
    for part in ("features", "label", "model"):
        if ours[part] != theirs[part]:
            raise EvaluateError(
                f"the model in {model_dir} was built for task {manifest.task.name!r}, whose [{part}] "
                f"differs from that of task {task.name!r}; build its model with fedge model build"
            )


# --- metrics ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluationReport:
    """The model's scores on the CSV's samples, and what was evaluated."""

    task: str
    kind: str
    csv: str
    model_dir: str
    weights: str
    normalisation: str
    runtime: str
    rows: int
    examples: int
    loss: float
    accuracy: float | None
    classes: list[str] | None
    confusion_matrix: list[list[int]] | None
    mse: float | None
    mae: float | None
    rmse: float | None
    quality: dict[str, int]
    #: With ``--global``: which manifest was scored (fleet, version, round, ...).
    global_model: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score(trainer: LiteRTTrainer, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Loss and accuracy or MSE from the model's ``evaluate`` signature; the confusion matrix or
    MAE from its ``infer`` signature (LiteRT both)."""
    import numpy as np  # noqa: PLC0415

    evaluation = trainer.evaluate(x, y)
    predictions = trainer.predict(x)
    result: dict[str, Any] = {
        "examples": evaluation.examples,
        "loss": evaluation.loss,
        "accuracy": None,
        "confusion_matrix": None,
        "mse": None,
        "mae": None,
        "rmse": None,
    }
    if trainer.classification:
        n_classes = trainer.task.output_dim
        matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
        np.add.at(matrix, (np.asarray(y, np.int64), predictions.argmax(axis=1)), 1)
        result["accuracy"] = evaluation.accuracy
        result["confusion_matrix"] = matrix.tolist()
    else:
        assert evaluation.mse is not None
        errors = predictions.reshape(-1).astype(np.float64) - np.asarray(y, np.float64)
        result["mse"] = evaluation.mse
        result["mae"] = float(np.mean(np.abs(errors)))
        result["rmse"] = math.sqrt(evaluation.mse)
    return result


def evaluate(
    task: TaskSpec,
    model_dir: Path,
    csv_path: Path,
    *,
    weights_file: Path | None = None,
    normalisation_file: Path | None = None,
    profile: DeviceProfile | None = None,
    runtime: RuntimeName = "auto",
    time_column: str | None = None,
) -> EvaluationReport:
    """Everything ``fedge evaluate`` does but printing: every problem raises before a result."""
    from fedge.agent.trainer import load_model_dir  # noqa: PLC0415

    model, manifest = load_model_dir(model_dir)
    check_model_task(task, manifest, model_dir)
    weights = load_weights(model_dir, manifest, weights_file)
    return _score_model(
        task,
        model,
        manifest,
        weights,
        manifest.normalisation,
        csv_path,
        source=str(model_dir),
        weights_name=str(weights_file) if weights_file is not None else "initial",
        normalisation_file=normalisation_file,
        profile=profile,
        runtime=runtime,
        time_column=time_column,
    )


def evaluate_global(
    task: TaskSpec,
    fetched: GlobalModel,
    csv_path: Path,
    *,
    normalisation_file: Path | None = None,
    profile: DeviceProfile | None = None,
    runtime: RuntimeName = "auto",
    time_column: str | None = None,
) -> EvaluationReport:
    """Scores a fetched global model (:func:`fedge.tools.global_model.fetch_global_model`) as
    :func:`evaluate` scores a model directory: its weights, its manifest's normalisation."""
    from fedge.protocol.weights import WeightsError, weights_from_bytes  # noqa: PLC0415

    manifest = fetched.manifest.model_manifest
    source = f"global model of fleet {fetched.manifest.fleet}"
    check_model_task(task, manifest, Path(source))
    try:
        weights = weights_from_bytes(fetched.weights, manifest.parameter_count)
    except WeightsError as exc:
        raise EvaluateError(f"{source}: weights blob: {exc}") from None
    return _score_model(
        task,
        fetched.model,
        manifest,
        weights,
        fetched.manifest.normalisation,
        csv_path,
        source=f"{source}, manifest v{fetched.manifest.version}",
        weights_name=f"blob {fetched.manifest.weights_sha256[:16]}",
        normalisation_file=normalisation_file,
        profile=profile,
        runtime=runtime,
        time_column=time_column,
        global_model=fetched.describe(),
    )


def _score_model(
    task: TaskSpec,
    model: bytes,
    manifest: ModelManifest,
    weights: np.ndarray,
    normalisation: Normalisation | None,
    csv_path: Path,
    *,
    source: str,
    weights_name: str,
    normalisation_file: Path | None,
    profile: DeviceProfile | None,
    runtime: RuntimeName,
    time_column: str | None,
    global_model: dict[str, Any] | None = None,
) -> EvaluationReport:
    from fedge.agent.trainer import LiteRTTrainer  # noqa: PLC0415

    if normalisation_file is not None:
        normalisation = read_normalisation(normalisation_file, task.input_dim)
    samples = csv_samples(csv_path, task, profile, time_column)
    trainer = LiteRTTrainer(model, manifest, runtime)
    trainer.normalisation = normalisation
    trainer.set_weights(weights)
    scores = score(trainer, samples.x, samples.y)
    return EvaluationReport(
        task=task.name,
        kind=task.model.kind,
        csv=str(csv_path),
        model_dir=source,
        weights=weights_name,
        normalisation=(
            "none"
            if normalisation is None
            else str(normalisation_file)
            if normalisation_file is not None
            else "manifest"
        ),
        runtime=trainer.runtime.name,
        rows=samples.rows,
        classes=list(task.label.classes) if task.label.classes is not None else None,
        quality=samples.quality,
        global_model=global_model,
        **scores,
    )


def render_report(report: EvaluationReport) -> str:
    """The report as a short table."""
    lines = []
    if report.global_model is not None:
        g = report.global_model
        lines.append(
            f"scored the global model of fleet {g['fleet']}: manifest v{g['version']}, round "
            f"{g['round_number']} ({g['round_id']}, phase {g['phase']})"
        )
    lines += [
        f"{report.task}: {report.examples} examples from {report.rows} rows of {report.csv} "
        f"({report.runtime})",
        f"model {report.model_dir}, weights {report.weights}, normalisation {report.normalisation}",
    ]
    if report.classes is not None and report.confusion_matrix is not None:
        assert report.accuracy is not None
        correct = sum(report.confusion_matrix[i][i] for i in range(len(report.classes)))
        lines.append(f"loss {report.loss:.4f}  accuracy {report.accuracy:.4f} ({correct}/{report.examples})")
        width = max(
            6,
            *(len(c) for c in report.classes),
            *(len(str(v)) for row in report.confusion_matrix for v in row),
        )
        lines.append("confusion matrix (rows: true class, columns: predicted class)")
        lines.append(" " * width + "".join(f"  {c:>{width}}" for c in report.classes))
        for name, row in zip(report.classes, report.confusion_matrix, strict=True):
            lines.append(f"{name:>{width}}" + "".join(f"  {v:>{width}}" for v in row))
    else:
        lines.append(
            f"loss {report.loss:.4f}  MSE {report.mse:.4f}  MAE {report.mae:.4f}  RMSE {report.rmse:.4f}"
        )
    q = report.quality
    dropped = [
        f"{r} {q[r]}"
        for r in ("not_numeric", "not_finite", "out_of_range", "incomplete", "unknown_label", "gap")
        if q.get(r)
    ]
    if dropped:
        lines.append(f"dropped as a device would: {', '.join(dropped)}")
    return "\n".join(lines)


# --- command line -------------------------------------------------------------------------------


def cmd_evaluate(args: argparse.Namespace) -> int:
    check_global_args(args)
    task = read_task(args.task)
    profile = None
    if args.profile is not None:
        from fedge.agent.edgex.profile import load_profile  # noqa: PLC0415 - PyYAML

        profile = load_profile(args.profile)
    if args.global_url is not None:
        fetched = fetch_global(args)
        g = fetched.manifest
        print(
            f"fedge evaluate: scoring fleet {g.fleet}'s global model: manifest v{g.version}, "
            f"round {g.round_number} ({g.round_id}, phase {g.phase})",
            file=sys.stderr,
        )
        report = evaluate_global(
            task,
            fetched,
            args.csv,
            normalisation_file=args.normalisation,
            profile=profile,
            runtime=args.runtime,
            time_column=args.time_column,
        )
        print(json.dumps(report.to_dict()) if args.json else render_report(report))
        return 0
    report = evaluate(
        task,
        args.model_dir,
        args.csv,
        weights_file=args.weights,
        normalisation_file=args.normalisation,
        profile=profile,
        runtime=args.runtime,
        time_column=args.time_column,
    )
    print(json.dumps(report.to_dict()) if args.json else render_report(report))
    return 0


def check_global_args(args: argparse.Namespace) -> None:
    """``--global`` needs ``--fleet`` and ``--verify-key``; the broker options go with it alone."""
    if args.global_url is None:
        given = [
            name
            for name, value in (
                ("--fleet", args.fleet),
                ("--verify-key", args.verify_key),
                ("--username", args.username),
                ("--password-file", args.password_file),
                ("--ca-file", args.ca_file),
                ("--timeout", args.timeout),
            )
            if value is not None
        ]
        if given:
            raise EvaluateError(f"{', '.join(given)}: only with --global BROKER_URL")
        return
    missing = [n for n, v in (("--fleet", args.fleet), ("--verify-key", args.verify_key)) if v is None]
    if missing:
        raise EvaluateError(f"--global needs {' and '.join(missing)}")
    if args.weights is not None:
        raise EvaluateError("--weights does not go with --global: the global model brings its weights")
    if args.timeout is not None and not args.timeout > 0:
        raise EvaluateError("--timeout must be > 0 seconds")


def fetch_global(args: argparse.Namespace) -> GlobalModel:
    """The fleet's verified global model, as the command's options say (``--global``)."""
    from fedge.protocol.topics import check_id  # noqa: PLC0415
    from fedge.tools.edgex_tap import client_settings, read_password_file  # noqa: PLC0415
    from fedge.tools.global_model import (  # noqa: PLC0415
        DEFAULT_TIMEOUT_S,
        fetch_global_model,
        read_verify_keys,
    )

    check_id(args.fleet)
    trusted = read_verify_keys(args.verify_key)
    settings = client_settings(
        args.global_url,
        "fedge-evaluate",
        username=args.username,
        password=None if args.password_file is None else read_password_file(args.password_file),
        ca_file=args.ca_file,
    )
    timeout = DEFAULT_TIMEOUT_S if args.timeout is None else args.timeout
    return fetch_global_model(settings, args.fleet, trusted, timeout)


def add_parser(subparsers: Any) -> None:
    """Adds ``fedge evaluate`` to the subparsers of ``fedge``."""
    ev = subparsers.add_parser(
        "evaluate",
        help="score a model on a labelled CSV, as a device builds samples (LiteRT)",
        description="Score a model directory on labelled data: a CSV with a header row naming the "
        "task's feature resources and its label resource. Rows become EdgeX readings and go "
        "through the device's sample builder.",
    )
    ev.add_argument("--task", type=Path, required=True, metavar="FILE", help="task spec (TOML)")
    source = ev.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-dir", type=Path, metavar="DIR", help="a model from 'fedge model build'")
    source.add_argument(
        "--global",
        dest="global_url",
        metavar="BROKER_URL",
        help="score the fleet's current signed global model, fetched from this broker "
        "(mqtt://HOST:PORT or mqtts://); needs --fleet and --verify-key",
    )
    ev.add_argument(
        "--csv", type=Path, required=True, metavar="FILE", help="labelled data, with a header row"
    )
    ev.add_argument(
        "--weights",
        type=Path,
        metavar="FILE",
        help="a weights blob (little-endian float32, e.g. a global model's; default: the initial weights)",
    )
    ev.add_argument(
        "--normalisation",
        type=Path,
        metavar="FILE",
        help="JSON {mean: [...], std: [...]} to use instead of the manifest's",
    )
    ev.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="the device's EdgeX profile: parse cells by valueType, drop out-of-range readings",
    )
    ev.add_argument(
        "--time-column",
        metavar="NAME",
        help="the column of each row's time, ISO 8601 (no zone: UTC) or epoch seconds (default: a "
        "column named time, timestamp, date or datetime if any, else rows one sample period apart)",
    )
    ev.add_argument(
        "--runtime",
        choices=["auto", "ai_edge_litert", "tflite_runtime"],
        default="auto",
        help="TFLite runtime (default: ai_edge_litert, else tflite_runtime)",
    )
    ev.add_argument("--fleet", help="with --global: the fleet whose global model to score")
    ev.add_argument(
        "--verify-key",
        type=Path,
        metavar="FILE",
        help="with --global: the aggregator's verify key (base64, or the aggregator_verify_keys "
        "line / --json output of 'fedge keys aggregator', or an agent config)",
    )
    ev.add_argument("--username", help="with --global: broker username (e.g. a device's or an observer's)")
    ev.add_argument(
        "--password-file",
        type=Path,
        help="with --global: file holding the password, one line, mode 0600 (0400)",
    )
    ev.add_argument("--ca-file", help="with --global: the CA that signed the broker's certificate (mqtts://)")
    ev.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="with --global: how long to wait for the manifest and its blobs (default 30)",
    )
    ev.add_argument("--json", action="store_true", help="print the scores as JSON")
    ev.set_defaults(func=cmd_evaluate)


def main(argv: Sequence[str] | None = None) -> int:
    """This command on its own (``python -m fedge.tools.evaluate evaluate ...``), with
    ``fedge``'s error handling: a one-line ``fedge: error: ...`` and exit code 2."""
    return run_alone(add_parser, "fedge model evaluation", argv)


if __name__ == "__main__":
    sys.exit(main())
