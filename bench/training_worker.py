"""One measurement in a fresh process for ``bench_training.py``; prints one JSON line.

Why a separate script: peak RSS and start-up time only mean something in a process that has
loaded nothing else. The module level imports the standard library only, and each mode
imports just what its side needs: the ``agent-*`` modes load ``agent`` and ``protocol`` (and,
through them, numpy and LiteRT) -- exactly what a device loads -- and check that TensorFlow
stayed out; the ``tf-*`` modes load TensorFlow and the aggregator's ``TrainableMLP``.

Modes:

``agent-train`` / ``tf-train``
    Train ``--epochs`` epochs on ``x.npy``/``y.npy`` from ``--data-dir`` with the model in
    ``--model-dir``, the same shuffling (``--seed``) and batch size, one thread; report peak RSS
    and the per-epoch losses, and save the final weights next to the data.
``agent-import`` / ``tf-import``
    Time the imports, getting ready to train, and the first train step.
``baseline``
    Peak RSS of Python plus numpy alone, the floor any Python agent pays.

Both sides pin themselves to one thread (LiteRT ``num_threads=1``; TensorFlow intra- and
inter-op parallelism 1); the parent also sets ``OMP_NUM_THREADS``/``OPENBLAS_NUM_THREADS``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

MODES = ("agent-train", "tf-train", "agent-import", "tf-import", "baseline")


def peak_rss_bytes() -> int:
    """``ru_maxrss`` in bytes (Linux reports KiB, macOS bytes)."""
    raw = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(raw) if sys.platform == "darwin" else int(raw) * 1024


def peak_rss_vmhwm_bytes() -> int | None:
    """Linux's per-address-space high-water mark (``VmHWM``), a cross-check of ``ru_maxrss``."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_fields() -> dict[str, int | None]:
    return {"peak_rss_bytes": peak_rss_bytes(), "peak_rss_vmhwm_bytes": peak_rss_vmhwm_bytes()}


def third_party_modules() -> list[str]:
    """Top-level non-standard-library packages loaded, to show what a process dragged in."""
    names = {m.split(".", 1)[0] for m in list(sys.modules)}
    internal = {"__main__", "cython_runtime"}  # cython_runtime: created by any Cython extension
    return sorted(
        n for n in names if n not in sys.stdlib_module_names and not n.startswith("_") and n not in internal
    )


def assert_no_tensorflow(result: dict[str, Any]) -> None:
    """The agent must never load TensorFlow; the measured RSS would be meaningless if it did."""
    loaded = "tensorflow" in sys.modules
    result["tensorflow_in_sys_modules"] = loaded
    result["aggregator_in_sys_modules"] = "aggregator" in sys.modules
    result["third_party_modules"] = third_party_modules()
    if loaded:
        emit(result)
        sys.exit("training_worker: the agent process imported tensorflow (it must not)")


def pin_tensorflow_threads() -> Any:
    """Imports TensorFlow pinned to one intra-op and one inter-op thread, like LiteRT's one."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    return tf


def emit(result: dict[str, Any]) -> None:
    """The parent reads the last stdout line; anything else a library prints goes before it."""
    sys.stdout.flush()
    print(json.dumps(result), flush=True)


def _batches(n: int, batch_size: int, order: Any) -> list[Any]:
    return [order[s : s + batch_size] for s in range(0, n, batch_size)]


def agent_train(model_dir: Path, data_dir: Path, epochs: int, seed: int) -> dict[str, Any]:
    """What an agent does for a round: load the model, fit local epochs, read the weights."""
    import numpy as np

    from fedge.agent.trainer import LiteRTTrainer, load_model_dir

    model, manifest = load_model_dir(model_dir)
    trainer = LiteRTTrainer(model, manifest, num_threads=1)
    x = np.load(data_dir / "x.npy")
    y = np.load(data_dir / "y.npy")
    start = time.perf_counter()
    losses = trainer.fit(x, y, epochs=epochs, rng=np.random.default_rng(seed))
    seconds = time.perf_counter() - start
    weights = trainer.get_weights()
    np.save(data_dir / "weights-agent.npy", weights)
    result: dict[str, Any] = {
        "mode": "agent-train",
        "runtime": trainer.runtime.name,
        "examples": int(x.shape[0]),
        "epochs": epochs,
        "epoch_losses": losses,
        "train_seconds": seconds,
        **rss_fields(),
    }
    assert_no_tensorflow(result)
    return result


def tf_train(model_dir: Path, data_dir: Path, epochs: int, seed: int) -> dict[str, Any]:
    """The same round in TensorFlow: same weights, normalisation, shuffling and batches."""
    tf = pin_tensorflow_threads()
    import numpy as np

    from fedge.aggregator.trainable_mlp import TrainableMLP
    from fedge.protocol.model_manifest import INITIAL_WEIGHTS_FILE, manifest_from_json
    from fedge.protocol.weights import weights_from_bytes

    manifest = manifest_from_json((model_dir / "manifest.json").read_bytes())
    task = manifest.task
    initial = weights_from_bytes((model_dir / INITIAL_WEIGHTS_FILE).read_bytes(), manifest.parameter_count)
    module = TrainableMLP(task, initial)
    x = np.load(data_dir / "x.npy").astype(np.float32)
    y = np.load(data_dir / "y.npy").astype(np.int32)
    if manifest.normalisation is not None:
        mean = np.asarray(manifest.normalisation.mean, np.float32)
        std = np.asarray(manifest.normalisation.std, np.float32)
        x = (x - mean) / std
    x = np.ascontiguousarray(x)
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    batch_size = task.training.batch_size
    losses: list[float] = []
    start = time.perf_counter()
    # Mirrors LiteRTTrainer.fit: a fresh permutation per epoch, last partial batch included.
    for _ in range(epochs):
        total = 0.0
        for idx in _batches(n, batch_size, rng.permutation(n)):
            total += float(module.train(x[idx], y[idx])["loss"]) * len(idx)
        loss = total / n
        if not math.isfinite(loss):
            raise SystemExit(f"training_worker: TensorFlow training diverged (loss {loss})")
        losses.append(loss)
    seconds = time.perf_counter() - start
    np.save(data_dir / "weights-tf.npy", module.get_weights()["weights"].numpy())
    return {
        "mode": "tf-train",
        "tensorflow_version": tf.__version__,
        "examples": int(n),
        "epochs": epochs,
        "epoch_losses": losses,
        "train_seconds": seconds,
        **rss_fields(),
    }


def agent_import(model_dir: Path) -> dict[str, Any]:
    """Start-up cost of an agent: ``import fedge.agent.trainer``, then the interpreter, then a step."""
    t0 = time.perf_counter()
    import numpy as np

    from fedge.agent.trainer import LiteRTTrainer, load_model_dir

    t_import = time.perf_counter()
    model, manifest = load_model_dir(model_dir)
    trainer = LiteRTTrainer(model, manifest, num_threads=1)
    t_ready = time.perf_counter()
    d_in = manifest.task.input_dim
    x = np.random.default_rng(0).normal(size=(manifest.task.training.batch_size, d_in)).astype(np.float32)
    y = np.zeros(x.shape[0], np.int32)
    trainer.train_step(x, y)
    t_step = time.perf_counter()
    result: dict[str, Any] = {
        "mode": "agent-import",
        "import_s": t_import - t0,
        "ready_s": t_ready - t0,
        "first_step_s": t_step - t0,
        **rss_fields(),
    }
    assert_no_tensorflow(result)
    return result


def tf_import(model_dir: Path) -> dict[str, Any]:
    """Start-up cost of TensorFlow: ``import tensorflow``, then the model, then a traced step."""
    t0 = time.perf_counter()
    tf = pin_tensorflow_threads()
    t_import = time.perf_counter()
    import numpy as np

    from fedge.aggregator.trainable_mlp import TrainableMLP
    from fedge.protocol.model_manifest import INITIAL_WEIGHTS_FILE, manifest_from_json
    from fedge.protocol.weights import weights_from_bytes

    manifest = manifest_from_json((model_dir / "manifest.json").read_bytes())
    initial = weights_from_bytes((model_dir / INITIAL_WEIGHTS_FILE).read_bytes(), manifest.parameter_count)
    module = TrainableMLP(manifest.task, initial)
    t_ready = time.perf_counter()
    d_in = manifest.task.input_dim
    x = np.random.default_rng(0).normal(size=(manifest.task.training.batch_size, d_in)).astype(np.float32)
    y = np.zeros(x.shape[0], np.int32)
    float(module.train(x, y)["loss"])  # the first call traces the tf.function
    t_step = time.perf_counter()
    return {
        "mode": "tf-import",
        "tensorflow_version": tf.__version__,
        "import_s": t_import - t0,
        "ready_s": t_ready - t0,
        "first_step_s": t_step - t0,
        **rss_fields(),
    }


def baseline() -> dict[str, Any]:
    """Python and numpy alone: the part of any agent's RSS that LiteRT cannot shave off."""
    import numpy as np

    return {"mode": "baseline", "numpy": np.__version__, **rss_fields()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.mode != "baseline" and args.model_dir is None:
        parser.error(f"{args.mode} needs --model-dir")
    if args.mode.endswith("-train") and args.data_dir is None:
        parser.error(f"{args.mode} needs --data-dir")
    if args.mode == "agent-train":
        result = agent_train(args.model_dir, args.data_dir, args.epochs, args.seed)
    elif args.mode == "tf-train":
        result = tf_train(args.model_dir, args.data_dir, args.epochs, args.seed)
    elif args.mode == "agent-import":
        result = agent_import(args.model_dir)
    elif args.mode == "tf-import":
        result = tf_import(args.model_dir)
    else:
        result = baseline()
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
