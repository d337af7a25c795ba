"""LiteRT vs TensorFlow for fedge's on-device training: speed, memory, start-up, size.

Why this exists: fedge trains on devices with the LiteRT interpreter instead of TensorFlow,
and claims that is both much faster per step and small enough for an IoT board. This script
measures those claims in one run, on the real HAR task and real (normalised) smartwatch
features, with the *same* model, the *same* initial weights and the *same* batches on both
sides:

1. milliseconds per train step (batch 32): ``LiteRTTrainer.train_step`` vs the
   ``TrainableMLP.train`` ``tf.function`` the ``.tflite`` was converted from;
2. milliseconds per inference call (batch 32 and batch 1);
3. peak RSS of a fresh agent-style training process vs a fresh TensorFlow one;
4. start-up: ``import fedge.agent.trainer`` + interpreter vs ``import tensorflow``;
5. the ``.tflite`` size vs the SavedModel directory it was converted from.

It also checks that the comparison is a fair one: after the same 10 SGD steps LiteRT's and
TensorFlow's weights must agree, and the agent process must not have loaded TensorFlow. A
failed check is a real error (exit 1); a missed performance target is only reported (exit 0).

Usage: ``python bench/bench_training.py [--out bench/results/training.json]`` (``make bench``).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "training_worker.py"
DEFAULT_OUT = ROOT / "bench" / "results" / "training.json"
DEFAULT_TASK = ROOT / "tasks" / "har-watch.toml"

#: Targets fedge's design promises; missing one is reported, never an error.
TARGET_TRAIN_SPEEDUP = 10.0
TARGET_AGENT_RSS_MB = 80.0
#: LiteRT and TensorFlow run the same float32 math in a different order (XNNPACK vs Eigen).
WEIGHT_TOLERANCE = 1e-4
AGREEMENT_STEPS = 10
WORKER_TIMEOUT_S = 300.0
MB = 1_000_000  # decimal megabytes, so "80 MB" means 80,000,000 bytes

#: Same thread settings for every process; the per-library knobs are set in code as well.
THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
THREADS_NOTE = (
    "one thread everywhere: LiteRT Interpreter(num_threads=1) (default XNNPACK delegate); "
    "TensorFlow tf.config.threading intra_op=1, inter_op=1; OMP/OPENBLAS/MKL_NUM_THREADS=1"
)


class BenchError(Exception):
    """Something went wrong that makes the numbers meaningless (not a missed target)."""


# --- configuration -------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """How much work each measurement does; defaults keep the whole run well under 3 minutes."""

    task_path: Path
    out: Path
    reps: int = 7
    litert_steps: int = 2000
    tf_steps: int = 500
    warmup: int = 200
    epochs: int = 5
    import_reps: int = 3
    seed: int = 0


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(
        description="Benchmark LiteRT vs TensorFlow training of a fedge model (see docs/benchmarks.md)."
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    parser.add_argument("--task", type=Path, default=DEFAULT_TASK, help="task spec (default har-watch)")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per measurement (default 7)")
    parser.add_argument("--litert-steps", type=int, default=2000, help="LiteRT calls per repetition")
    parser.add_argument("--tf-steps", type=int, default=500, help="TensorFlow calls per repetition")
    parser.add_argument("--epochs", type=int, default=5, help="epochs in the fresh-process runs")
    parser.add_argument("--import-reps", type=int, default=3, help="fresh processes per start-up timing")
    args = parser.parse_args(argv)
    for name in ("reps", "litert_steps", "tf_steps", "epochs", "import_reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return Config(
        task_path=args.task,
        out=args.out,
        reps=args.reps,
        litert_steps=args.litert_steps,
        tf_steps=args.tf_steps,
        epochs=args.epochs,
        import_reps=args.import_reps,
    )


# --- timing --------------------------------------------------------------------------------


@dataclass
class Timing:
    """Per-call milliseconds of each timed repetition; the median is what gets compared."""

    calls: int
    reps_ms: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.reps_ms)

    def to_dict(self) -> dict[str, Any]:
        return {
            "median_ms": self.median,
            "min_ms": min(self.reps_ms),
            "max_ms": max(self.reps_ms),
            "calls_per_rep": self.calls,
            "reps_ms": self.reps_ms,
        }


def time_rep(call: Callable[[int], object], calls: int) -> float:
    """Milliseconds per call over ``calls`` calls, with the garbage collector held off.

    GC pauses land at random in one engine's loop or the other's; ``timeit`` disables it for the
    same reason.
    """
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for i in range(calls):
            call(i)
        elapsed = time.perf_counter_ns() - start
    finally:
        gc.enable()
    return elapsed / calls / 1e6


def compare_calls(
    litert: Callable[[int], object],
    tensorflow: Callable[[int], object],
    cfg: Config,
    reset: Callable[[], None] | None = None,
) -> tuple[Timing, Timing]:
    """Warms both up, then alternates their repetitions so drift (turbo, neighbours) hits both."""
    for i in range(cfg.warmup):
        litert(i)
        tensorflow(i)
    lt, tt = Timing(cfg.litert_steps), Timing(cfg.tf_steps)
    for _ in range(cfg.reps):
        if reset is not None:
            reset()  # both restart from the same weights, so they do the same arithmetic
        lt.reps_ms.append(time_rep(litert, cfg.litert_steps))
        tt.reps_ms.append(time_rep(tensorflow, cfg.tf_steps))
    return lt, tt


# --- fresh processes -----------------------------------------------------------------------


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(THREAD_ENV)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


#: Starts the worker from a small, fresh Python instead of from this (large) process.
#: Why: Linux carries a process's ``ru_maxrss`` over ``fork``/``vfork`` + ``exec`` from the
#: memory it was forked from, so a worker started directly from here would report *this*
#: process's peak (hundreds of MB, with TensorFlow loaded) as its own. Forked from a ~10 MB
#: launcher, its ``ru_maxrss`` is its own peak, as for an agent started by systemd.
LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call([sys.executable, *sys.argv[1:]]))"


def run_worker(mode: str, *args: str) -> tuple[dict[str, Any], float]:
    """Runs ``training_worker.py`` in a fresh interpreter; returns its JSON and wall seconds."""
    cmd = [sys.executable, "-I", "-c", LAUNCHER, str(WORKER), mode, *args]
    start = time.perf_counter()
    # Own session, so a timeout can stop the launcher and the worker it started together.
    with subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise BenchError(f"worker {mode} took longer than {WORKER_TIMEOUT_S:.0f}s") from None
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        raise BenchError(f"worker {mode} failed (exit {proc.returncode}):\n{tail}")
    lines = [line for line in stdout.splitlines() if line.strip()]
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise BenchError(f"worker {mode} printed no JSON result; stdout was: {stdout[-500:]!r}") from None
    return result, wall


# --- machine -------------------------------------------------------------------------------


def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine_info() -> dict[str, Any]:
    """Enough to tell two result files apart: numbers from different machines don't compare."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "versions": {
            "ai-edge-litert": _version("ai-edge-litert"),
            "tensorflow": _version("tensorflow-cpu", "tensorflow"),
            "numpy": _version("numpy"),
            "fedge": _version("fedge"),
        },
    }


# --- the benchmark -------------------------------------------------------------------------


def metric(unit: str, litert: float, tensorflow: float, **detail: Any) -> dict[str, Any]:
    """One comparison; ratio > 1 means TensorFlow needs more (time, memory, bytes) than LiteRT."""
    return {
        "unit": unit,
        "litert": litert,
        "tensorflow": tensorflow,
        "ratio_tf_over_litert": tensorflow / litert if litert > 0 else None,
        **detail,
    }


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(cfg: Config) -> dict[str, Any]:
    """All measurements; returns the JSON-ready result (targets and checks included)."""
    started = time.perf_counter()
    from fedge.protocol.task import parse_task_spec

    try:  # before the slow imports, so a typo in --task fails in a blink
        task = parse_task_spec(cfg.task_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BenchError(f"cannot read task spec {cfg.task_path}: {exc.strerror}") from None
    os.environ.update(THREAD_ENV)
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    # Imported here, after the environment is set: TensorFlow and the BLAS libraries read it once.
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)

    from fedge.agent.trainer import LiteRTTrainer
    from fedge.aggregator.model_export import build_model, write_model
    from fedge.aggregator.trainable_mlp import TrainableMLP
    from fedge.lab import har_watch
    from fedge.lab.train_local import normalisation_of

    batch_size = task.training.batch_size
    print(f"[1/6] loading the HAR watch data for {task.name} ...", flush=True)
    x_raw, y_raw = har_watch.pooled(har_watch.load_devices(task).values())

    print("[2/6] building and converting the model with TensorFlow ...", flush=True)
    built = build_model(task, normalisation_of(x_raw))
    w0 = built.weights.astype(np.float32)
    trainer = LiteRTTrainer(built.tflite, built.manifest, num_threads=1)
    xp = trainer.prepare_x(x_raw)  # validated and normalised, exactly as fit() feeds the model
    yp = trainer.prepare_y(y_raw, xp.shape[0])
    order = np.random.default_rng(cfg.seed).permutation(xp.shape[0])
    n_batches = xp.shape[0] // batch_size
    if n_batches < AGREEMENT_STEPS:
        raise BenchError(f"only {n_batches} full batches of {batch_size}; need {AGREEMENT_STEPS}")
    # Contiguous copies made once, so neither engine's loop pays for fancy indexing.
    xb = [np.ascontiguousarray(xp[order[i * batch_size : (i + 1) * batch_size]]) for i in range(n_batches)]
    yb = [np.ascontiguousarray(yp[order[i * batch_size : (i + 1) * batch_size]]) for i in range(n_batches)]
    x1 = [np.ascontiguousarray(xp[order[i : i + 1]]) for i in range(n_batches)]
    module = TrainableMLP(task, w0)

    # Same weights, same 10 batches: if the engines disagree, the timings compare different work.
    trainer.set_weights(w0)
    module.set_weights(w0)
    lite_losses = [trainer.train_step(xb[i], yb[i]) for i in range(AGREEMENT_STEPS)]
    tf_losses = [float(module.train(xb[i], yb[i])["loss"]) for i in range(AGREEMENT_STEPS)]
    weight_diff = float(np.max(np.abs(trainer.get_weights() - module.get_weights()["weights"].numpy())))
    loss_diff = float(max(abs(a - b) for a, b in zip(lite_losses, tf_losses, strict=True)))

    print(f"[3/6] timing train steps (batch {batch_size}) ...", flush=True)

    def reset() -> None:
        trainer.set_weights(w0)
        module.set_weights(w0)

    def lite_step(i: int) -> float:
        k = i % n_batches
        return trainer.train_step(xb[k], yb[k])

    def tf_step(i: int) -> float:
        k = i % n_batches
        return float(module.train(xb[k], yb[k])["loss"])

    lite_train, tf_train = compare_calls(lite_step, tf_step, cfg, reset)
    # TensorFlow's best case: inputs already tf.Tensors, no numpy conversion per call.
    xt = [tf.constant(a) for a in xb]
    yt = [tf.constant(a) for a in yb]

    def tf_step_tensors(i: int) -> float:
        k = i % n_batches
        return float(module.train(xt[k], yt[k])["loss"])

    _, tf_train_tensors = compare_calls(lite_step, tf_step_tensors, replace(cfg, reps=3), reset)

    print(f"[4/6] timing inference (batch {batch_size} and 1) ...", flush=True)
    # The raw signature runner of a second interpreter, like tf.function on the TF side; the
    # agent's public predict() adds validation and normalisation and is timed separately.
    infer_interp = trainer.runtime.interpreter_class(model_content=built.tflite, num_threads=1)
    lite_infer = infer_interp.get_signature_runner("infer")
    infer_timings: dict[int, tuple[Timing, Timing]] = {}
    predict_timings: dict[int, float] = {}
    for size, batches in ((batch_size, xb), (1, x1)):

        def lite_inf(i: int, b: list[Any] = batches) -> object:
            return lite_infer(x=b[i % n_batches])["outputs"]

        def tf_inf(i: int, b: list[Any] = batches) -> object:
            return module.infer(b[i % n_batches])["outputs"].numpy()

        infer_timings[size] = compare_calls(lite_inf, tf_inf, cfg)
        raw = [x_raw[order[i * size : (i + 1) * size]] for i in range(n_batches)]
        predict_timings[size] = statistics.median(
            time_rep(lambda i, r=raw: trainer.predict(r[i % n_batches]), cfg.litert_steps) for _ in range(3)
        )

    print("[5/6] model sizes ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="fedge-bench-savedmodel-") as tmp:
        sm = TrainableMLP(task, w0)
        tf.saved_model.save(sm, tmp, signatures=sm.signatures())
        savedmodel_bytes = dir_bytes(Path(tmp))

    print("[6/6] fresh processes: peak RSS and start-up time ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="fedge-bench-") as tmp_s:
        tmp = Path(tmp_s)
        model_dir = tmp / "model"
        write_model(built, model_dir)
        data_dir = tmp / "data"
        data_dir.mkdir()
        np.save(data_dir / "x.npy", x_raw)
        np.save(data_dir / "y.npy", y_raw)
        common = ["--model-dir", str(model_dir), "--data-dir", str(data_dir), "--epochs", str(cfg.epochs)]
        common += ["--seed", str(cfg.seed)]
        base, _ = run_worker("baseline")
        agent_run, agent_wall = run_worker("agent-train", *common)
        tf_run, tf_wall = run_worker("tf-train", *common)
        final_weight_diff = float(
            np.max(np.abs(np.load(data_dir / "weights-agent.npy") - np.load(data_dir / "weights-tf.npy")))
        )
        agent_imports: list[dict[str, Any]] = []
        tf_imports: list[dict[str, Any]] = []
        for _ in range(cfg.import_reps):  # interleaved, for the same reason as the timings
            agent_imports.append(run_worker("agent-import", "--model-dir", str(model_dir))[0])
            tf_imports.append(run_worker("tf-import", "--model-dir", str(model_dir))[0])

    def med(runs: list[dict[str, Any]], key: str) -> float:
        return statistics.median(float(r[key]) for r in runs)

    lite_size = len(built.tflite)
    metrics: dict[str, Any] = {
        "train_step_ms": metric(
            "ms",
            lite_train.median,
            tf_train.median,
            batch_size=batch_size,
            litert_detail=lite_train.to_dict(),
            tensorflow_detail=tf_train.to_dict(),
        ),
        "train_step_ms_tf_tensor_inputs": metric(
            "ms",
            lite_train.median,
            tf_train_tensors.median,
            note="TensorFlow fed pre-built tf.Tensors (its best case); LiteRT as in train_step_ms",
            tensorflow_detail=tf_train_tensors.to_dict(),
        ),
        f"infer_ms_batch{batch_size}": metric(
            "ms",
            infer_timings[batch_size][0].median,
            infer_timings[batch_size][1].median,
            batch_size=batch_size,
            litert_detail=infer_timings[batch_size][0].to_dict(),
            tensorflow_detail=infer_timings[batch_size][1].to_dict(),
        ),
        "infer_ms_batch1": metric(
            "ms",
            infer_timings[1][0].median,
            infer_timings[1][1].median,
            batch_size=1,
            litert_detail=infer_timings[1][0].to_dict(),
            tensorflow_detail=infer_timings[1][1].to_dict(),
        ),
        "litert_predict_api_ms": {
            "unit": "ms",
            "note": "LiteRTTrainer.predict on raw features (validation + normalisation + infer)",
            f"batch{batch_size}": predict_timings[batch_size],
            "batch1": predict_timings[1],
        },
        "peak_rss_mb": metric(
            "MB",
            agent_run["peak_rss_bytes"] / MB,
            tf_run["peak_rss_bytes"] / MB,
            epochs=cfg.epochs,
            examples=agent_run["examples"],
            baseline_python_numpy_mb=base["peak_rss_bytes"] / MB,
            litert_process=agent_run | {"wall_s": agent_wall},
            tensorflow_process=tf_run | {"wall_s": tf_wall},
            final_weights_max_abs_diff=final_weight_diff,
        ),
        "startup_s": metric(
            "s",
            med(agent_imports, "ready_s"),
            med(tf_imports, "import_s"),
            note="LiteRT: import fedge.agent.trainer + create the interpreter; TensorFlow: import tensorflow",
            litert_import_only_s=med(agent_imports, "import_s"),
            runs={"litert": agent_imports, "tensorflow": tf_imports},
        ),
        "ready_to_train_s": metric(
            "s",
            med(agent_imports, "first_step_s"),
            med(tf_imports, "first_step_s"),
            note="fresh process: imports, model ready, first train step done (TF traces here)",
        ),
        "model_bytes": metric(
            "bytes",
            lite_size,
            savedmodel_bytes,
            note="LiteRT: the .tflite file; TensorFlow: the SavedModel directory it is converted from",
            parameter_bytes=built.manifest.parameter_count * 4,
        ),
    }
    agent_tf = bool(agent_run["tensorflow_in_sys_modules"]) or any(
        r["tensorflow_in_sys_modules"] for r in agent_imports
    )
    # ru_maxrss must match the worker's own high-water mark, or it measured someone else's memory.
    rss_pairs = [(r["peak_rss_bytes"], r.get("peak_rss_vmhwm_bytes")) for r in (agent_run, tf_run)]
    rss_consistent = all(hwm is None or abs(maxrss - hwm) <= 0.05 * hwm for maxrss, hwm in rss_pairs)
    checks = {
        "weights_agree_after_10_steps": {
            "max_abs_weight_diff": weight_diff,
            "max_abs_loss_diff": loss_diff,
            "tolerance": WEIGHT_TOLERANCE,
            "passed": weight_diff <= WEIGHT_TOLERANCE,
        },
        "ru_maxrss_matches_vmhwm": {
            "pairs_bytes": rss_pairs,
            "tolerance": 0.05,
            "passed": rss_consistent,
        },
        "agent_process_without_tensorflow": {
            "tensorflow_in_sys_modules": agent_tf,
            "third_party_modules": agent_run["third_party_modules"],
            "passed": not agent_tf,
        },
    }
    speedup = metrics["train_step_ms"]["ratio_tf_over_litert"]
    agent_mb = metrics["peak_rss_mb"]["litert"]
    targets = [
        {
            "name": "train_step_speedup",
            "description": f"LiteRT >= {TARGET_TRAIN_SPEEDUP:g}x faster per train step than TensorFlow",
            "value": speedup,
            "threshold": TARGET_TRAIN_SPEEDUP,
            "passed": speedup is not None and speedup >= TARGET_TRAIN_SPEEDUP,
        },
        {
            "name": "agent_peak_rss",
            "description": f"agent training process peak RSS <= {TARGET_AGENT_RSS_MB:g} MB (10^6 bytes)",
            "value": agent_mb,
            "threshold": TARGET_AGENT_RSS_MB,
            "passed": agent_mb <= TARGET_AGENT_RSS_MB,
        },
    ]
    return {
        "benchmark": "fedge-training",
        "format": 1,
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "duration_s": time.perf_counter() - started,
        "machine": machine_info(),
        "config": {
            "task": task.name,
            "task_file": str(cfg.task_path),
            "layers": list(task.layer_sizes),
            "parameter_count": built.manifest.parameter_count,
            "optimizer": task.training.optimizer,
            "batch_size": batch_size,
            "examples": int(xp.shape[0]),
            "distinct_batches": n_batches,
            "reps": cfg.reps,
            "warmup_calls": cfg.warmup,
            "litert_calls_per_rep": cfg.litert_steps,
            "tensorflow_calls_per_rep": cfg.tf_steps,
            "fresh_process_epochs": cfg.epochs,
            "startup_reps": cfg.import_reps,
            "runtime": trainer.runtime.name,
            "threads": THREADS_NOTE,
        },
        "metrics": metrics,
        "checks": checks,
        "checks_passed": all(c["passed"] for c in checks.values()),
        "targets": targets,
        "targets_passed": all(t["passed"] for t in targets),
    }


# --- output --------------------------------------------------------------------------------


def _fmt(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value:.4f}" if value < 0.1 else f"{value:.3f}"
    if unit == "s":
        return f"{value:.3f}"
    if unit == "MB":
        return f"{value:.1f}"
    return f"{value:,.0f}"


def render_table(result: dict[str, Any]) -> str:
    """The human-readable summary; the JSON file holds every repetition and detail."""
    m = result["metrics"]
    cfg = result["config"]
    bs = cfg["batch_size"]
    rows = [
        (f"train step, batch {bs} (ms)", m["train_step_ms"]),
        (f"inference, batch {bs} (ms)", m[f"infer_ms_batch{bs}"]),
        ("inference, batch 1 (ms)", m["infer_ms_batch1"]),
        (f"peak RSS, fresh training process, {cfg['fresh_process_epochs']} epochs (MB)", m["peak_rss_mb"]),
        ("start-up: import fedge.agent.trainer + interpreter | import tensorflow (s)", m["startup_s"]),
        ("ready to train: imports + model + first step (s)", m["ready_to_train_s"]),
        ("model size: .tflite | SavedModel dir (bytes)", m["model_bytes"]),
    ]
    head = ("metric", "LiteRT", "TensorFlow", "TF/LiteRT")
    body = [
        (
            name,
            _fmt(v["litert"], v["unit"]),
            _fmt(v["tensorflow"], v["unit"]),
            f"{v['ratio_tf_over_litert']:.1f}x",
        )
        for name, v in rows
    ]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(4)]

    def line(r: Sequence[str]) -> str:
        return " | ".join(r[i].ljust(widths[i]) if i == 0 else r[i].rjust(widths[i]) for i in range(4))

    sep = "-+-".join("-" * w for w in widths)
    out = [line(head), sep, *(line(r) for r in body), sep]
    for t in result["targets"]:
        verdict = "PASS" if t["passed"] else "MISS"
        out.append(f"target {verdict}: {t['description']} (measured {t['value']:.1f})")
    c = result["checks"]
    agree = c["weights_agree_after_10_steps"]
    out.append(
        f"check  {'ok  ' if agree['passed'] else 'FAIL'}: weights after {AGREEMENT_STEPS} identical "
        f"SGD steps, "
        f"max |LiteRT - TF| = {agree['max_abs_weight_diff']:.2e} (tolerance {agree['tolerance']:g}); "
        f"loss diff {agree['max_abs_loss_diff']:.2e}"
    )
    notf = c["agent_process_without_tensorflow"]
    out.append(
        f"check  {'ok  ' if notf['passed'] else 'FAIL'}: 'tensorflow' in the agent process's sys.modules: "
        f"{notf['tensorflow_in_sys_modules']} (loaded: {', '.join(notf['third_party_modules'])})"
    )
    if not c["ru_maxrss_matches_vmhwm"]["passed"]:
        pairs = c["ru_maxrss_matches_vmhwm"]["pairs_bytes"]
        out.append(f"check  FAIL: ru_maxrss differs from the workers' VmHWM (bytes): {pairs}")
    tt = m["train_step_ms_tf_tensor_inputs"]
    rss = m["peak_rss_mb"]
    pred = m["litert_predict_api_ms"]
    mach = result["machine"]
    out += [
        "",
        f"threads: {cfg['threads']}.",
        f"times: median of {cfg['reps']} repetitions ({cfg['litert_calls_per_rep']} LiteRT / "
        f"{cfg['tensorflow_calls_per_rep']} TF calls each, after {cfg['warmup_calls']} warm-up calls), "
        f"same initial weights and the same {cfg['distinct_batches']} batches of real normalised "
        f"HAR features on both sides; TF inputs are numpy arrays like LiteRT's.",
        f"TF fed pre-built tf.Tensors instead: {_fmt(tt['tensorflow'], 'ms')} ms/step "
        f"({tt['ratio_tf_over_litert']:.1f}x LiteRT). LiteRTTrainer.predict() incl. validation and "
        f"normalisation: {pred[f'batch{bs}']:.4f} ms (batch {bs}), {pred['batch1']:.4f} ms (batch 1).",
        f"RSS: python+numpy alone {rss['baseline_python_numpy_mb']:.1f} MB; weights after "
        f"{cfg['fresh_process_epochs']} epochs in the two processes differ by at most "
        f"{rss['final_weights_max_abs_diff']:.2e}. Start-up times are from warm file caches.",
        f"machine: {mach['platform']}, {mach['cpu_model']}, {mach['cpu_count']} CPUs, "
        f"Python {mach['python']}, "
        f"ai-edge-litert {mach['versions']['ai-edge-litert']}, tensorflow {mach['versions']['tensorflow']}, "
        f"numpy {mach['versions']['numpy']}.",
    ]
    return "\n".join(out)


def write_json(result: dict[str, Any], path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    except OSError as exc:
        raise BenchError(f"cannot write {path}: {exc.strerror}") from None


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    from fedge.protocol.errors import FedgeError

    try:
        result = run(cfg)
        write_json(result, cfg.out)
    except (BenchError, FedgeError) as exc:
        print(f"bench_training: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_training: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a library failed in a way nobody anticipated: keep the traceback
        traceback.print_exc()
        print(f"bench_training: error: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print()
    print(render_table(result))
    print(f"\nresults: {cfg.out}  (total {result['duration_s']:.1f}s)")
    if not result["checks_passed"]:
        print(
            "bench_training: error: a validity check failed (see 'check FAIL' above); "
            "the comparison is not trustworthy",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
