"""Fine-tuning a vendor's model (issue 17): a 1D CNN pretrained centrally, its head fine-tuned
by the fleet, against fedge's own MLP on features trained from scratch by the same fleet.

The default data as ``make demo`` uses it (seglearn's smartwatch set, one subject per device),
split three ways so no subject is in two parts:

1. **Vendor**: subjects 1-3. A Keras 1D CNN on raw windows (``tasks/har-watch-raw.toml``'s 6
   channels x 100 readings: Conv1D 32 k5 + BatchNormalization + ReLU, MaxPooling1D, Conv1D 64 k5
   + BatchNormalization + ReLU, GlobalAveragePooling1D, Dense 32 relu, Dense 7 softmax) trained
   centrally with Keras ``fit`` (Adam, a fixed number of epochs, seeded; the test subjects are
   never used to pick anything), saved as ``.keras`` and imported by the real ``fedge model
   import --trainable last:2`` (the CLI's ``main``, in this process): the convolutions are
   constants of the ``.tflite``, only ``fc`` and ``out`` train.
2. **Fleet**: subjects 4-7 as 4 devices. Federated rounds run in-process with the real
   :class:`RoundEngine` (sealed messages, every check, FedAvg weighted by examples, the
   deployment's influence bounds, the demo's server learning rate 2.0), each device training
   with the agent's :class:`LiteRTTrainer` on its own windows (the task's 3 local epochs,
   shuffled with ``[seed, version]``) and sending what ``fedge.agent.core`` sends. The same
   rounds, devices and settings train the baseline: the default MLP on window statistics
   (``tasks/har-watch.toml``, ``fedge model build``) from its random initial weights, after the
   moments round that gives it its normalisation, as in ``make demo``.
3. **Test**: subjects 8-10, scored after every round (round 0: the weights before any training
   round: the vendor's model as imported, the MLP's random initial weights).

Bytes per update: the encoded payload (``fedge.protocol.messages.encode_update``, which the
agent's ``update_payload`` calls) and the sealed message of a real update of the run, with the
round's codec (fp32, the default), plus the encoded body in fp16 and int8.

Device cost: the imported CNN's train step (batch 32) in LiteRT, in a fresh process that
imports only the agent (TensorFlow must stay out), vs the same Keras model's train step (base
frozen, head trainable, SGD with momentum as the task says) in a fresh TensorFlow process,
twice: Keras' ``train_on_batch`` and a ``tf.function`` with ``GradientTape``. Per process: the
median of ``--steps`` individually timed steps after a warm-up, and peak RSS (``ru_maxrss``,
started from a small launcher as ``bench_training.py`` does). Each process runs twice, in turn
with the others; the lower median and the higher RSS are reported (the machine is shared).
The MLP's LiteRT step is timed the same way for scale. Both sides start from the same weights
and take the same batches; their losses over the first steps are compared, so the timings
compare the same arithmetic.

Usage: ``python bench/bench_fine_tuning.py [--rounds 20 | --quick] [--out
bench/results/fine_tuning.json] [--docs-json docs/results/fine_tuning.json]``
(``make bench-fine-tuning``); the plot goes next to each JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

DEFAULT_OUT = ROOT / "bench" / "results" / "fine_tuning.json"
RAW_TASK = ROOT / "tasks" / "har-watch-raw.toml"
MLP_TASK = ROOT / "tasks" / "har-watch.toml"
VENDOR_SUBJECTS = (1, 2, 3)
FLEET_SUBJECTS = (4, 5, 6, 7)
TEST_SUBJECTS = (8, 9, 10)
#: ``--trainable last:2``: fc (Dense 32 relu) and out (Dense 7 softmax).
TRAINABLE = 2
VENDOR_EPOCHS = 10
VENDOR_LEARNING_RATE = 1e-3
VENDOR_BATCH = 32
SEED = 0
FLEET = "finetune"
#: The demo's server learning rate for the smartwatch data (``fedge demo``), for both models.
SERVER_LEARNING_RATE = 2.0
#: Device cost: steps of batch 32, individually timed after a warm-up; losses compared over the first.
STEP_BATCH = 32
STEPS = 300
WARMUP = 30
AGREEMENT_STEPS = 10
DISTINCT_BATCHES = 40
LOSS_TOLERANCE = 1e-3
#: Fresh processes per runtime for the device cost, run in turn.
REPEATS = 2
WORKER_TIMEOUT_S = 300.0
MB = 1_000_000
WORKER_MODES = ("litert", "keras", "tf-function")

#: The imported task: har-watch-raw.toml with the model from Keras (no hidden, no seed).
IMPORTED_MODEL = '[model]\ntype = "imported"\nkind = "classification"\n'


def imported_task_toml() -> str:
    """``tasks/har-watch-raw.toml`` with its ``[model]`` replaced by an imported one; features,
    labels and ``[training]`` (SGD 0.02, momentum 0.9, batch 32, 3 local epochs) unchanged."""
    text = RAW_TASK.read_text()
    start = text.index("\n[model]\n") + 1
    end = text.index("\n[training]\n") + 1
    return (
        text[:start].replace('name = "har-watch-raw"', 'name = "har-watch-cnn"')
        + IMPORTED_MODEL
        + ("\n" + text[end:])
    )


# --- fresh processes for the device cost ----------------------------------------------------------


def peak_rss_bytes() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def time_steps(step: Callable[[int], float], steps: int, warmup: int) -> list[float]:
    """Milliseconds of each of ``steps`` calls after ``warmup`` untimed ones."""
    import gc

    for i in range(warmup):
        step(i)
    gc.collect()
    gc.disable()
    try:
        out = []
        for i in range(steps):
            t0 = time.perf_counter_ns()
            step(i)
            out.append((time.perf_counter_ns() - t0) / 1e6)
    finally:
        gc.enable()
    return out


def worker(mode: str, model_dir: Path, data_dir: Path, keras_file: Path | None, steps: int) -> dict[str, Any]:
    """One process, one runtime: the same batches from the same initial weights; the first
    steps' losses, then ``steps`` timed steps, then the process's peak RSS."""
    import numpy as np

    xb, yb = np.load(data_dir / "x.npy"), np.load(data_dir / "y.npy")
    k = xb.shape[0]
    result: dict[str, Any] = {"mode": mode}
    step: Callable[[int], float]
    if mode == "litert":
        from fedge.agent.trainer import LiteRTTrainer, load_model_dir

        model, manifest = load_model_dir(model_dir)
        trainer = LiteRTTrainer(model, manifest, num_threads=1)
        xp = [trainer.prepare_x(b) for b in xb]
        yp = [trainer.prepare_y(b, b.shape[0]) for b in yb]

        def step(i: int) -> float:
            return trainer.train_step(xp[i % k], yp[i % k])

        result["runtime"] = trainer.runtime.name
    else:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        import keras

        assert keras_file is not None
        manifest_json = json.loads((model_dir / "manifest.json").read_text())
        head = {layer["name"] for layer in manifest_json["imported"]["trainable_layers"]}
        training = manifest_json["task"]["training"]
        net = keras.saving.load_model(keras_file, compile=False)
        for layer in net.layers:
            layer.trainable = layer.name in head  # a frozen BatchNormalization runs in inference mode
        opt = keras.optimizers.SGD(learning_rate=training["learning_rate"], momentum=training["momentum"])
        loss_fn = keras.losses.SparseCategoricalCrossentropy()
        length, channels = net.input_shape[1], net.input_shape[2]
        # fedge's channel-major x[c * length + t] as Keras reads it, (length, channels).
        xw = [
            tf.constant(np.ascontiguousarray(b.reshape(-1, channels, length).transpose(0, 2, 1))) for b in xb
        ]
        yt = [tf.constant(b.astype(np.int32)) for b in yb]
        if mode == "keras":
            net.compile(optimizer=opt, loss=loss_fn)

            def step(i: int) -> float:
                return float(net.train_on_batch(xw[i % k], yt[i % k]))

        else:
            variables = net.trainable_variables

            @tf.function  # type: ignore[untyped-decorator, misc, unused-ignore]
            def train(x: Any, y: Any) -> Any:
                with tf.GradientTape() as tape:
                    loss = loss_fn(y, net(x, training=False))
                opt.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
                return loss

            def step(i: int) -> float:
                return float(train(xw[i % k], yt[i % k]))

        result["tensorflow"] = tf.__version__
        result["keras"] = keras.__version__
    result["first_losses"] = [step(i) for i in range(AGREEMENT_STEPS)]
    times = time_steps(step, steps, WARMUP)
    result.update(
        {
            "steps": steps,
            "warmup": WARMUP,
            "median_ms": statistics.median(times),
            "p10_ms": float(np.percentile(times, 10)),
            "p90_ms": float(np.percentile(times, 90)),
            "peak_rss_bytes": peak_rss_bytes(),
            "tensorflow_in_sys_modules": "tensorflow" in sys.modules,
        }
    )
    if mode == "litert" and result["tensorflow_in_sys_modules"]:
        raise SystemExit("bench_fine_tuning: the LiteRT worker imported tensorflow (it must not)")
    return result


def combine(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """One runtime's processes as one result: the lowest median step time (the least disturbed
    by other load on the machine) and the highest peak RSS (the conservative memory figure)."""
    best = min(reps, key=lambda r: float(r["median_ms"]))
    out = dict(best)
    out["median_ms"] = float(best["median_ms"])
    out["median_ms_per_process"] = [round(float(r["median_ms"]), 4) for r in reps]
    out["peak_rss_bytes"] = max(int(r["peak_rss_bytes"]) for r in reps)
    out["peak_rss_bytes_per_process"] = [int(r["peak_rss_bytes"]) for r in reps]
    out["processes"] = len(reps)
    return out


def run_worker(
    mode: str, model_dir: Path, data_dir: Path, keras_file: Path | None, steps: int
) -> dict[str, Any]:
    """``worker`` in a fresh interpreter forked from a small launcher (``bench_training``'s
    reason: ``ru_maxrss`` is inherited over fork + exec from the forking process)."""
    from bench_training import LAUNCHER, worker_env  # type: ignore[import-not-found, unused-ignore]

    cmd = [sys.executable, "-I", "-c", LAUNCHER, str(Path(__file__).resolve()), "--worker", mode]
    cmd += ["--model-dir", str(model_dir), "--data-dir", str(data_dir), "--steps", str(steps)]
    if keras_file is not None:
        cmd += ["--keras-file", str(keras_file)]
    with subprocess.Popen(
        cmd, cwd=ROOT, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    ) as proc:  # fmt: skip
        try:
            stdout, stderr = proc.communicate(timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise SystemExit(f"bench_fine_tuning: worker {mode} took over {WORKER_TIMEOUT_S:.0f} s") from None
    if proc.returncode != 0:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        raise SystemExit(f"bench_fine_tuning: worker {mode} failed (exit {proc.returncode}):\n{tail}")
    lines = [line for line in stdout.splitlines() if line.strip()]
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# --- the vendor's model ---------------------------------------------------------------------------


def windows(x: Any) -> Any:
    """fedge's channel-major raw vectors ``(n, 600)`` as Keras reads them, ``(n, 100, 6)``."""
    import numpy as np

    return np.ascontiguousarray(x.reshape(x.shape[0], 6, 100).transpose(0, 2, 1))


def vendor_model(x: Any, y: Any, x_test: Any, y_test: Any, path: Path) -> dict[str, Any]:
    """Trains the vendor's CNN centrally on its own subjects and saves it as ``.keras``. The
    test accuracy is only reported (Keras' own ``evaluate``), never used to choose anything."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(SEED)
    tf.config.experimental.enable_op_determinism()
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((100, 6)),
            layers.Conv1D(32, 5, name="conv1"),
            layers.BatchNormalization(name="bn1"),
            layers.ReLU(name="relu1"),
            layers.MaxPooling1D(2, name="pool1"),
            layers.Conv1D(64, 5, name="conv2"),
            layers.BatchNormalization(name="bn2"),
            layers.ReLU(name="relu2"),
            layers.GlobalAveragePooling1D(name="gap"),
            layers.Dense(32, activation="relu", name="fc"),
            layers.Dense(7, activation="softmax", name="out"),
        ],
        name="vendor_cnn",
    )
    model.compile(
        optimizer=keras.optimizers.Adam(VENDOR_LEARNING_RATE),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    started = time.perf_counter()
    history = model.fit(windows(x), y, epochs=VENDOR_EPOCHS, batch_size=VENDOR_BATCH, verbose=0)
    seconds = time.perf_counter() - started
    _, accuracy = model.evaluate(windows(x_test), y_test, verbose=0)
    model.save(path)
    trainable = sum(int(w.numpy().size) for w in model.trainable_weights)
    return {
        "layers": [f"{layer.name} ({type(layer).__name__})" for layer in model.layers],
        "subjects": list(VENDOR_SUBJECTS),
        "windows": int(x.shape[0]),
        "epochs": VENDOR_EPOCHS,
        "optimizer": f"adam {VENDOR_LEARNING_RATE}",
        "batch_size": VENDOR_BATCH,
        "train_loss_per_epoch": [round(float(v), 4) for v in history.history["loss"]],
        "train_seconds": round(seconds, 1),
        "keras_test_accuracy": round(float(accuracy), 4),
        "parameters_total": int(model.count_params()),
        "parameters_trainable_in_keras": trainable,
        "parameters_batchnorm_statistics": int(model.count_params()) - trainable,
        "keras_file_bytes": path.stat().st_size,
    }


# --- the federated rounds -------------------------------------------------------------------------


def federate(
    loaded: Any, devices: dict[str, tuple[Any, Any]], test: tuple[Any, Any], rounds: int
) -> dict[str, Any]:
    """``rounds`` train rounds of every device (:func:`inprocess_rounds.run_rounds`: after a
    moments round if the model has no normalisation yet, as the aggregator service starts); test
    accuracy before the first and after each; the sizes of the updates the devices sent."""
    from fedge.agent.trainer import LiteRTTrainer
    from inprocess_rounds import run_rounds  # type: ignore[import-not-found, unused-ignore]

    trainer = LiteRTTrainer(loaded.model, loaded.manifest)

    def test_accuracy(weights: Any, normalisation: Any) -> float:
        trainer.set_weights(weights)
        trainer.normalisation = normalisation
        value = trainer.evaluate(*test).accuracy
        return float(value) if value is not None and math.isfinite(value) else 0.0

    accuracy: list[float] = []
    if loaded.manifest.normalisation is not None:  # the weights before any round, as imported
        accuracy.append(test_accuracy(loaded.initial_weights, loaded.manifest.normalisation))

    def closed(manifest: Any, engine: Any) -> None:
        # After the moments round: the initial weights, now with the fleet's normalisation.
        accuracy.append(test_accuracy(engine.state.weights, engine.state.normalisation))

    started = time.perf_counter()
    run = run_rounds(
        loaded,
        trainer,
        devices,
        rounds,
        fleet=FLEET,
        server_learning_rate=SERVER_LEARNING_RATE,
        seed=SEED,
        closed=closed,
    )
    return {
        "accuracy_per_round": [round(a, 4) for a in accuracy],
        "codec": run.settings.codec.value,
        "update_body_and_header_bytes": sorted(set(run.payload_bytes)),
        "sealed_update_bytes": sorted(set(run.sealed_bytes)),
        "device_training_seconds_total": round(run.train_seconds, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }


def encoded_sizes(loaded: Any) -> dict[str, int]:
    """The encoded update body of this model's weight vector in each dense codec."""
    import numpy as np

    from fedge.protocol.codec import Codec, encode_tensors

    delta = np.random.default_rng(SEED).normal(0, 0.01, loaded.manifest.parameter_count).astype(np.float32)
    layout = loaded.manifest.layout
    return {
        c.value: len(encode_tensors(delta, layout, c, None)) for c in (Codec.FP32, Codec.FP16, Codec.INT8)
    }


# --- report ---------------------------------------------------------------------------------------


def table(doc: dict[str, Any]) -> list[str]:
    """The Evidence table: accuracy at a few rounds, update sizes, parameters, device cost."""
    cnn, mlp = doc["cnn_head"], doc["mlp"]
    rounds = doc["rounds"]
    marks = sorted({r for r in (0, 1, 5, 10, rounds) if r <= rounds})
    head = ["", "CNN, head fine-tuned (imported)", "MLP on features, from scratch (built)"]
    rows = [
        ["input", "raw window, 600 values", f"{mlp['input_dim']} window statistics"],
        ["pretrained on", "subjects 1-3 (Keras, centrally)", "nothing"],
        *(
            [
                f"test accuracy, round {r}",
                f"{cnn['accuracy_per_round'][r]:.3f}",
                f"{mlp['accuracy_per_round'][r]:.3f}",
            ]
            for r in marks
        ),
        [
            "best test accuracy (round)",
            f"{max(cnn['accuracy_per_round']):.3f} ({cnn['best_round']})",
            f"{max(mlp['accuracy_per_round']):.3f} ({mlp['best_round']})",
        ],
        ["parameters in the model", str(cnn["parameters_total"]), str(mlp["parameters"])],
        ["parameters that train and travel", str(cnn["parameters"]), str(mlp["parameters"])],
        [
            f"update body ({cnn['codec']}) / sealed message, bytes",
            f"{cnn['encoded_bytes'][cnn['codec']]} / {cnn['sealed_update_bytes'][0]}",
            f"{mlp['encoded_bytes'][mlp['codec']]} / {mlp['sealed_update_bytes'][0]}",
        ],
        [
            "update body, fp16 / int8, bytes",
            f"{cnn['encoded_bytes']['fp16']} / {cnn['encoded_bytes']['int8']}",
            f"{mlp['encoded_bytes']['fp16']} / {mlp['encoded_bytes']['int8']}",
        ],
        [".tflite bytes", str(cnn["model_bytes"]), str(mlp["model_bytes"])],
    ]
    cost = doc["device_cost"]
    rows += [
        [
            "LiteRT train step, batch 32 (median ms)",
            f"{cost['litert_cnn']['median_ms']:.2f}",
            f"{cost['litert_mlp']['median_ms']:.2f}",
        ],
        [
            "LiteRT process peak RSS (MB)",
            f"{cost['litert_cnn']['peak_rss_mb']:.1f}",
            f"{cost['litert_mlp']['peak_rss_mb']:.1f}",
        ],
    ]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += [
        "",
        "| the CNN's train step, batch 32 | median ms | ratio to LiteRT | peak RSS (MB) | ratio to LiteRT |",
        "|---|---|---|---|---|",
    ]
    for key, name in (
        ("litert_cnn", "LiteRT (fedge agent, imported model)"),
        ("keras_cnn", "TensorFlow, Keras train_on_batch"),
        ("tf_function_cnn", "TensorFlow, tf.function + GradientTape"),
    ):
        c = cost[key]
        lines.append(
            f"| {name} | {c['median_ms']:.2f} | {c['ms_ratio_to_litert']:.1f}x | {c['peak_rss_mb']:.1f} | "
            f"{c['rss_ratio_to_litert']:.1f}x |"
        )
    return lines


def plot(path: Path, doc: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("cnn_head", "mlp"):
        acc = doc[key]["accuracy_per_round"]
        if key == "cnn_head":
            label = (
                f"1D CNN pretrained on subjects 1-3, head fine-tuned "
                f"({doc['cnn_head']['parameters']} of {doc['cnn_head']['parameters_total']} weights train)"
            )
        else:
            label = f"MLP on window statistics, from scratch ({doc['mlp']['parameters']} weights)"
        ax.plot(range(len(acc)), acc, marker="o", markersize=3, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("federated round (0: before training)")
    ax.set_ylabel("accuracy on subjects 8-10")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Fine-tuning a vendor's CNN vs training fedge's MLP (4 devices: subjects 4-7)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- main -----------------------------------------------------------------------------------------


def cli(argv: list[str]) -> dict[str, Any]:
    """Runs ``fedge`` in this process (its real ``main``); returns its ``--json`` summary."""
    import contextlib
    import io

    from fedge.cli import main as fedge_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = fedge_main([*argv, "--json"])
    if code != 0:
        raise SystemExit(f"bench_fine_tuning: fedge {' '.join(argv)} failed (exit {code})")
    summary: dict[str, Any] = json.loads(out.getvalue().strip().splitlines()[-1])
    return summary


def batches(x: Any, y: Any, count: int, seed: int) -> tuple[Any, Any]:
    """``count`` distinct batches of ``STEP_BATCH`` windows, stacked: the device-cost workers' input."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(x.shape[0])[: count * STEP_BATCH]
    return (
        np.ascontiguousarray(x[order].reshape(count, STEP_BATCH, -1)),
        np.ascontiguousarray(y[order].reshape(count, STEP_BATCH)),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=20, help="federated train rounds (default 20)")
    parser.add_argument("--quick", action="store_true", help="3 rounds and 100 timed steps: a smoke run")
    parser.add_argument(
        "--steps", type=int, default=STEPS, help=f"timed train steps per process (default {STEPS})"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--docs-json", type=Path, default=None, help="also write the JSON (and plot) here")
    parser.add_argument("--worker", choices=WORKER_MODES, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--keras-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(
            json.dumps(worker(args.worker, args.model_dir, args.data_dir, args.keras_file, args.steps)),
            flush=True,
        )
        return 0
    rounds, steps = (3, 100) if args.quick else (args.rounds, args.steps)
    if rounds < 1 or steps < 1:
        parser.error("--rounds and --steps must be >= 1")
    started = time.perf_counter()
    load_start = os.getloadavg()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np

    from bench_training import machine_info
    from fedge.aggregator.service import load_model
    from fedge.lab import har_watch
    from fedge.protocol.task import parse_task_spec

    raw_task = parse_task_spec(imported_task_toml())
    mlp_task = parse_task_spec(MLP_TASK.read_text())
    print("[1/5] loading the smartwatch data (raw windows and window statistics) ...", flush=True)
    raw = har_watch.load_devices(raw_task)
    feats = har_watch.load_devices(mlp_task)

    def pooled(data: dict[int, Any], subjects: tuple[int, ...]) -> tuple[Any, Any]:
        return np.concatenate([data[s].x for s in subjects]), np.concatenate([data[s].y for s in subjects])

    phases: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        print(f"[2/5] training the vendor's CNN on subjects 1-3 ({VENDOR_EPOCHS} epochs) ...", flush=True)
        keras_file = tmp / "vendor-cnn.keras"
        vendor = vendor_model(*pooled(raw, VENDOR_SUBJECTS), *pooled(raw, TEST_SUBJECTS), keras_file)
        task_file = tmp / "har-watch-cnn.toml"
        task_file.write_text(imported_task_toml())
        cnn_dir, mlp_dir = tmp / "cnn", tmp / "mlp"
        imported = cli(
            ["model", "import", "--keras", str(keras_file), "--task", str(task_file),
             "--trainable", f"last:{TRAINABLE}", "--out", str(cnn_dir)]
        )  # fmt: skip
        cli(["model", "build", "--task", str(MLP_TASK), "--out", str(mlp_dir)])
        phases["vendor_training_and_import"] = time.perf_counter() - t0
        cnn_loaded, mlp_loaded = load_model(cnn_dir), load_model(mlp_dir)

        results: dict[str, dict[str, Any]] = {}
        for key, loaded, data in (("cnn_head", cnn_loaded, raw), ("mlp", mlp_loaded, feats)):
            print(f"[3/5] {rounds} federated rounds, {key}, devices = subjects 4-7 ...", flush=True)
            devices = {har_watch.device_id(s): (data[s].x, data[s].y) for s in FLEET_SUBJECTS}
            run = federate(loaded, devices, pooled(data, TEST_SUBJECTS), rounds)
            m = loaded.manifest
            run.update(
                {
                    "task": m.task.name,
                    "input_dim": m.task.input_dim,
                    "parameters": int(m.parameter_count),
                    "model_bytes": int(m.model_bytes),
                    "encoded_bytes": encoded_sizes(loaded),
                    "best_round": int(np.argmax(run["accuracy_per_round"])),
                    "layout": [{"name": t.name, "shape": list(t.shape)} for t in m.layout],
                }
            )
            results[key] = run
            print(f"    accuracy per round: {run['accuracy_per_round']}", flush=True)
            phases[f"rounds_{key}"] = run["seconds"]
        results["cnn_head"]["parameters_total"] = vendor["parameters_total"]
        results["cnn_head"]["import"] = imported

        print(
            f"[4/5] device cost: {steps} train steps of batch {STEP_BATCH} per fresh process ...", flush=True
        )
        t0 = time.perf_counter()
        jobs: list[tuple[str, str, Path, Path]] = []
        for key, model_dir, data in (("cnn", cnn_dir, raw), ("mlp", mlp_dir, feats)):
            data_dir = tmp / f"batches-{key}"
            data_dir.mkdir()
            xb, yb = batches(*pooled(data, FLEET_SUBJECTS), DISTINCT_BATCHES, SEED)
            np.save(data_dir / "x.npy", xb)
            np.save(data_dir / "y.npy", yb)
            for mode in WORKER_MODES if key == "cnn" else ("litert",):
                jobs.append((f"{mode.replace('-', '_')}_{key}", mode, model_dir, data_dir))
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in jobs}
        # Every process REPEATS times, in turn, so a burst of load on the shared machine does
        # not land on one runtime only.
        for rep in range(REPEATS):
            for name, mode, model_dir, data_dir in jobs:
                print(f"    {name} ({rep + 1}/{REPEATS}) ...", flush=True)
                keras_arg = keras_file if mode != "litert" else None
                runs[name].append(run_worker(mode, model_dir, data_dir, keras_arg, steps))
        phases["device_cost"] = time.perf_counter() - t0
    cost: dict[str, Any] = {name: combine(reps) for name, reps in runs.items()}
    lite = cost["litert_cnn"]
    for c in cost.values():
        c["peak_rss_mb"] = round(c["peak_rss_bytes"] / MB, 1)
        c["ms_ratio_to_litert"] = round(c["median_ms"] / lite["median_ms"], 2)
        c["rss_ratio_to_litert"] = round(c["peak_rss_bytes"] / lite["peak_rss_bytes"], 2)
    loss_diff = {
        key: max(abs(a - b) for a, b in zip(lite["first_losses"], cost[key]["first_losses"], strict=True))
        for key in ("keras_cnn", "tf_function_cnn")
    }
    cost["same_arithmetic"] = {
        "steps": AGREEMENT_STEPS,
        "max_abs_loss_diff_vs_litert": {k: float(f"{v:.3g}") for k, v in loss_diff.items()},
        "tolerance": LOSS_TOLERANCE,
        "passed": all(v <= LOSS_TOLERANCE for v in loss_diff.values()),
    }
    doc: dict[str, Any] = {
        "benchmark": "fine_tuning",
        "machine": machine_info(),
        "load_average_at_start": [round(v, 2) for v in load_start],
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
        "vendor_subjects": list(VENDOR_SUBJECTS),
        "fleet_subjects": list(FLEET_SUBJECTS),
        "test_subjects": list(TEST_SUBJECTS),
        "test_windows": int(sum(raw[s].x.shape[0] for s in TEST_SUBJECTS)),
        "rounds": rounds,
        "server_learning_rate": SERVER_LEARNING_RATE,
        "training": {
            "optimizer": raw_task.training.optimizer,
            "learning_rate": raw_task.training.learning_rate,
            "momentum": raw_task.training.momentum,
            "batch_size": raw_task.training.batch_size,
            "local_epochs": raw_task.training.local_epochs,
        },
        "trainable": f"last:{TRAINABLE}",
        "vendor": vendor,
        "cnn_head": results["cnn_head"],
        "mlp": results["mlp"],
        "device_cost": cost,
        "phase_seconds": {k: round(v, 1) for k, v in phases.items()},
    }
    lines = table(doc)
    doc["table"] = lines
    doc["seconds"] = round(time.perf_counter() - started, 1)
    print("\n".join(lines))
    print(
        f"vendor model before fine-tuning: {doc['cnn_head']['accuracy_per_round'][0]:.3f} "
        f"(Keras evaluate: {vendor['keras_test_accuracy']:.3f}); "
        f"loss agreement over {AGREEMENT_STEPS} steps: "
        f"{cost['same_arithmetic']}; {doc['seconds']:.0f} s, load {doc['load_average_at_start']} -> "
        f"{doc['load_average_at_end']}"
    )
    text = json.dumps(doc, indent=2) + "\n"
    for path in [args.out] + ([args.docs_json] if args.docs_json is not None else []):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        plot(path.with_suffix(".png"), doc)
        print(f"wrote {path} and {path.with_suffix('.png')}")
    if not cost["same_arithmetic"]["passed"]:
        print("bench_fine_tuning: error: LiteRT and TensorFlow disagree on the same steps", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
