"""Runs agent-side training in a fresh interpreter and reports what it imported.

Used by the tests as a subprocess, so its ``sys.modules`` is exactly what the agent itself
pulls in (pytest's process has TensorFlow loaded for the aggregator tests).

Usage: python agent_probe.py MODEL_DIR BATCHES.npz OUT_WEIGHTS.npy  -> JSON on stdout
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from fedge.agent.trainer import LiteRTTrainer


def main() -> None:
    model_dir, batches_path, out_path = (Path(a) for a in sys.argv[1:4])
    batches = np.load(batches_path)
    trainer = LiteRTTrainer.from_dir(model_dir)
    trainer.set_weights(batches["start"])
    losses = []
    for i in range(int(batches["steps"])):
        losses.append(trainer.train_step(batches[f"x{i}"], batches[f"y{i}"]))
    # And the agent's normal path: shuffled epochs plus evaluation.
    trainer.fit(batches["x0"], batches["y0"], epochs=2, rng=np.random.default_rng(0))
    trainer.evaluate(batches["x0"], batches["y0"])
    np.save(out_path, _weights_after(trainer, batches))
    heavy = sorted(
        m
        for m in sys.modules
        if m.split(".")[0]
        in {"tensorflow", "keras", "tf_keras", "jax", "torch", "seglearn", "pandas", "sklearn"}
        or m.startswith(("fedge.aggregator", "fedge.lab"))
    )
    print(
        json.dumps(
            {
                "runtime": trainer.runtime.name,
                "numpy": np.__version__,
                "losses": losses,
                "heavy_modules": heavy,
            }
        )
    )


def _weights_after(trainer: LiteRTTrainer, batches: np.lib.npyio.NpzFile) -> np.ndarray:
    """Weights after exactly the fixed steps (replayed from the start: fit() moved them on)."""
    trainer.set_weights(batches["start"])
    for i in range(int(batches["steps"])):
        trainer.train_step(batches[f"x{i}"], batches[f"y{i}"])
    return trainer.get_weights()


if __name__ == "__main__":
    main()
