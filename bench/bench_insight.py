"""What one live prediction costs a device: fedge's LiteRT path vs the same with TensorFlow.

Issue 13 has every agent run the verified global model on each live window of its EdgeX
readings and publish the prediction for a building-management system. On a board that runs
for years, that per-window cost is paid every second. This script measures, on the real HAR
task, real held-out windows and the *same* model and weights on both sides, the whole
per-window path a device runs before publishing:

1. features from the window's raw rows (``fedge.agent.features.extract_features``, the same
   numpy code on both sides),
2. the model on those features: fedge's ``LiteRTTrainer.predict`` (normalisation + the
   ``infer`` signature, what ``fedge.agent.insight.InsightModel`` calls) vs the ``TrainableMLP``
   ``infer`` ``tf.function`` the ``.tflite`` was converted from (what an agent built on
   TensorFlow would call),
3. the ``fedge.insight/1`` JSON document, encoded.

It checks that both sides predict the same (class probabilities within 1e-5); a failed check is
an error (exit 1). It prints a table and writes JSON (``--out``), with the ratio.

Usage: ``python bench/bench_insight.py [--windows 2000] [--out bench/results/insight.json]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "insight.json"
DEFAULT_TASK = ROOT / "tasks" / "har-watch.toml"  # run from the checkout, as make bench does
PROBABILITY_TOLERANCE = 1e-5
THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def time_per_call(call: Callable[[int], object], calls: int) -> float:
    """Milliseconds per call, the garbage collector held off (as ``timeit`` does)."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for i in range(calls):
            call(i)
        return (time.perf_counter_ns() - start) / calls / 1e6
    finally:
        gc.enable()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", type=Path, default=DEFAULT_TASK)
    parser.add_argument("--windows", type=int, default=2000, help="windows timed per repetition")
    parser.add_argument("--reps", type=int, default=5, help="alternating repetitions per side")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    os.environ.update(THREAD_ENV)
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from fedge.agent.features import extract_features
    from fedge.agent.trainer import LiteRTTrainer
    from fedge.aggregator.model_export import build_model
    from fedge.aggregator.trainable_mlp import TrainableMLP
    from fedge.lab import har_watch
    from fedge.lab.train_local import normalisation_of
    from fedge.protocol.task import parse_task_spec

    task = parse_task_spec(args.task.read_text(encoding="utf-8"))
    window = task.features.window
    assert window is not None, "the HAR task is windowed"
    print("[1/4] the model (TensorFlow build and conversion) and the held-out recordings ...", flush=True)
    x_train, _ = har_watch.pooled(har_watch.load_devices(task).values())
    built = build_model(task, normalisation_of(x_train))
    weights = built.weights.astype(np.float32)
    lite = LiteRTTrainer(built.tflite, built.manifest, num_threads=1)
    lite.set_weights(weights)
    module = TrainableMLP(task, weights)
    norm = normalisation_of(x_train)
    mean, std = np.asarray(norm.mean, np.float32), np.asarray(norm.std, np.float32)
    lite.normalisation = norm
    recordings = [r for r in har_watch.load_recordings() if r.subject in har_watch.TEST_SUBJECTS]
    raw_windows = [
        np.ascontiguousarray(r.readings[s : s + window.size])
        for r in recordings
        for s in range(0, r.readings.shape[0] - window.size + 1, window.step)
    ]
    n = len(raw_windows)
    classes = list(task.label.classes or ())
    print(
        f"[2/4] {n} held-out windows of {window.size} rows x {len(task.features.resources)} resources",
        flush=True,
    )

    def payload(probabilities: np.ndarray, i: int) -> bytes:
        best = int(np.argmax(probabilities))
        return json.dumps(
            {
                "schema": "fedge.insight/1",
                "device_id": "watch-01",
                "fleet": "bench",
                "window": {"start": float(i), "end": float(i) + 2.0},
                "published_at": float(i) + 2.1,
                "model": {"version": 12, "generation": 1, "round_id": "r0011-v12", "sha256": "0" * 64},
                "task": {"name": task.name, "kind": task.model.kind},
                "prediction": {
                    "label": classes[best],
                    "class_index": best,
                    "probabilities": {c: float(p) for c, p in zip(classes, probabilities, strict=True)},
                },
                "source": {"edgex_device": "watch-01", "resources": list(task.features.resources)},
            },
            separators=(",", ":"),
        ).encode()

    def fedge_path(i: int) -> bytes:
        features = extract_features(raw_windows[i % n], task.features)
        return payload(lite.predict(features)[0], i)

    def tensorflow_path(i: int) -> bytes:
        features = extract_features(raw_windows[i % n], task.features).astype(np.float32)
        x = (features - mean) / std
        return payload(module.infer(x)["outputs"].numpy()[0], i)

    print("[3/4] checking both sides predict the same ...", flush=True)
    worst = 0.0
    for i in range(min(n, 500)):
        a = json.loads(fedge_path(i))["prediction"]["probabilities"]
        b = json.loads(tensorflow_path(i))["prediction"]["probabilities"]
        worst = max(worst, max(abs(a[c] - b[c]) for c in classes))
    if worst > PROBABILITY_TOLERANCE:
        print(
            f"error: LiteRT and TensorFlow disagree by {worst:.2e} > {PROBABILITY_TOLERANCE}", file=sys.stderr
        )
        return 1
    print(f"[4/4] timing {args.reps} x {args.windows} windows per side, alternating ...", flush=True)
    for i in range(50):  # warm-up: tf.function tracing, interpreter allocation
        fedge_path(i)
        tensorflow_path(i)
    lite_ms: list[float] = []
    tf_ms: list[float] = []
    for _ in range(args.reps):
        lite_ms.append(time_per_call(fedge_path, args.windows))
        tf_ms.append(time_per_call(tensorflow_path, args.windows))
    features_ms = time_per_call(lambda i: extract_features(raw_windows[i % n], task.features), args.windows)
    lite_med, tf_med = statistics.median(lite_ms), statistics.median(tf_ms)
    size = len(fedge_path(0))
    result: dict[str, Any] = {
        "benchmark": "insight",
        "time": datetime.now(UTC).isoformat(),
        "machine": {"python": platform.python_version(), "machine": platform.machine(), "threads": 1},
        "task": task.name,
        "windows": n,
        "max_probability_difference": worst,
        "ms_per_window": {
            "fedge_litert": lite_med,
            "tensorflow": tf_med,
            "reps_litert": lite_ms,
            "reps_tensorflow": tf_ms,
        },
        "features_ms_per_window": features_ms,
        "model_and_json_ms": {"fedge_litert": lite_med - features_ms, "tensorflow": tf_med - features_ms},
        "speedup_whole_path": tf_med / lite_med,
        "speedup_model_and_json": (tf_med - features_ms) / max(lite_med - features_ms, 1e-9),
        "payload_bytes": size,
        "windows_per_cpu_second": {"fedge_litert": 1000 / lite_med, "tensorflow": 1000 / tf_med},
    }
    rows = [
        (
            "per window (features + model + JSON)",
            f"{lite_med:.3f} ms",
            f"{tf_med:.3f} ms",
            f"{tf_med / lite_med:.1f}x",
        ),
        ("  of which features (same numpy code)", f"{features_ms:.3f} ms", f"{features_ms:.3f} ms", "1.0x"),
        (
            "  model + JSON",
            f"{lite_med - features_ms:.3f} ms",
            f"{tf_med - features_ms:.3f} ms",
            f"{result['speedup_model_and_json']:.1f}x",
        ),
        ("windows per CPU-second", f"{1000 / lite_med:,.0f}", f"{1000 / tf_med:,.0f}", ""),
    ]
    print(f"\n{'':40} {'fedge (LiteRT)':>15} {'TensorFlow':>12} {'ratio':>7}")
    for name, a, b, r in rows:
        print(f"{name:40} {a:>15} {b:>12} {r:>7}")
    print(f"payload: {size} bytes; predictions agree within {worst:.1e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
