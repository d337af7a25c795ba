"""The agent never imports TensorFlow, and dependencies point one way: agent -> protocol <- aggregator,
and both -> shell -> protocol (the I/O shell both sides share imports only the protocol)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

from fedge.aggregator.trainable_mlp import TrainableMLP
from fedge.protocol.task import TaskSpec
from source_tree import PYTHONPATH as SOURCE_PYTHONPATH

REPO = Path(__file__).resolve().parent.parent
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


def test_agent_training_in_a_fresh_process_never_imports_tensorflow(
    har_task: TaskSpec, har_model_dir: Path, tmp_path: Path
) -> None:
    arrays = write_batches(har_task, tmp_path / "batches.npz")
    report = run_probe(sys.executable, har_model_dir, tmp_path / "batches.npz", tmp_path / "w.npy")
    assert report["runtime"] == "ai_edge_litert"
    assert report["heavy_modules"] == []
    # The probe really trained: its weights match TensorFlow's after the same steps.
    np.testing.assert_allclose(np.load(tmp_path / "w.npy"), tensorflow_weights(har_task, arrays), atol=1e-6)


def _part(module: str) -> str:
    """What an import names: the part for fedge's own (``fedge.agent.x`` -> ``agent``; the CLI
    and its tools are ``cli``, ``tools``, ``version``), else the top-level module."""
    names = module.split(".")
    return names[1] if names[0] == "fedge" and len(names) > 1 else names[0]


def _imports(package: str) -> dict[str, set[str]]:
    """Parts and top-level modules imported anywhere (also lazily, inside functions) by each
    file of one part (its folder: ``agent`` -> agent/fedge/agent)."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / package / "fedge" / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(_part(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(_part(node.module))
        found[str(path.relative_to(REPO))] = names
    return found


def test_dependencies_point_one_way() -> None:
    tools = {"cli", "tools", "lab", "version"}
    forbidden = {
        "protocol": {"shell", "agent", "aggregator", *tools}
        | {"tensorflow", "paho", "requests", "socket", "sqlite3"},
        # The shell: only fedge.protocol and third-party I/O libraries, never a side's code.
        "shell": {"agent", "aggregator", *tools, "tensorflow", "keras", "seglearn", "pandas"},
        "agent": {"aggregator", *tools, "tensorflow", "keras", "seglearn", "pandas"},
        "aggregator": {"agent", *tools},
    }
    violations = {
        f"{file} imports {sorted(names & bad)}"
        for package, bad in forbidden.items()
        for file, names in _imports(package).items()
        if names & bad
    }
    assert violations == set()
    # The scan itself works: it sees the imports it must see.
    assert "tensorflow" in _imports("aggregator")["aggregator/fedge/aggregator/trainable_mlp.py"]
    assert "protocol" in _imports("agent")["agent/fedge/agent/trainer.py"]
    assert {"protocol", "paho"} <= _imports("shell")["shell/fedge/shell/mqtt.py"]
