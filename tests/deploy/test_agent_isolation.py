"""The agent never imports TensorFlow, and dependencies point one way: agent -> protocol <- aggregator,
and both -> shell -> protocol (the I/O shell both sides share imports only the protocol)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np

from fedge.protocol.task import TaskSpec
from support.training_probe import run_probe, tensorflow_weights, write_batches

REPO = Path(__file__).resolve().parents[2]
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


def _module_level_imports(path: Path) -> set[str]:
    """Parts imported at a module's top level (what importing it loads, not its functions)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.Import):
            names.update(_part(a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(_part(node.module))
    return names


def test_production_tools_never_need_the_lab() -> None:
    """A device or gateway install has no fedge.lab: the production tools never import it, and
    the CLI only inside the commands that need it (behind ``require_lab``)."""
    tools_root = REPO / "tools" / "fedge"
    lab_users = {
        str(path.relative_to(REPO))
        for path in sorted((tools_root / "tools").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedge.lab")
    }
    assert lab_users == set()
    cli = tools_root / "cli.py"
    assert "lab" not in _module_level_imports(cli)
    assert "lab" in {
        _part(node.module)
        for node in ast.walk(ast.parse(cli.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module
    }  # the scan sees the lazy imports it allows
