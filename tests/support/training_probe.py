"""Runs the agent's training in a fresh interpreter (``agent_probe.py``) and the same steps in
TensorFlow, so tests can check what the device process imports and that both runtimes agree."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import tensorflow as tf

from fedge.aggregator.trainable_mlp import TrainableMLP
from fedge.protocol.task import TaskSpec
from support.source_tree import PYTHONPATH as SOURCE_PYTHONPATH
from support.source_tree import REPO

PROBE = Path(__file__).resolve().parent / "agent_probe.py"
STEPS = 10


def write_batches(task: TaskSpec, path: Path, seed: int = 11) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {
        "start": rng.normal(0, 0.2, TrainableMLP(task).parameter_count).astype(np.float32),
        "steps": np.array(STEPS),
    }
    for i in range(STEPS):
        arrays[f"x{i}"] = rng.normal(size=(32, task.input_dim)).astype(np.float32)
        arrays[f"y{i}"] = rng.integers(0, task.output_dim, 32).astype(np.int32)
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return arrays


def run_probe(python: str, model_dir: Path, batches: Path, out: Path) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = SOURCE_PYTHONPATH
    proc = subprocess.run(
        [python, str(PROBE), str(model_dir), str(batches), str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tensorflow_weights(task: TaskSpec, arrays: dict[str, np.ndarray]) -> np.ndarray:
    ref = TrainableMLP(task, arrays["start"])
    for i in range(STEPS):
        ref.train(tf.constant(arrays[f"x{i}"]), tf.constant(arrays[f"y{i}"]))
    return ref.get_weights()["weights"].numpy()
