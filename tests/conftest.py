"""Shared fixtures: the real HAR task, and real models built once per session with TensorFlow."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from protocol.task import TaskSpec, parse_task_spec, task_spec_from_dict

REPO = Path(__file__).resolve().parent.parent
HAR_TASK_PATH = REPO / "tasks" / "har-watch.toml"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def har_task() -> TaskSpec:
    return parse_task_spec(HAR_TASK_PATH.read_text())


def task_variant(base: TaskSpec, changes: dict[str, Any]) -> TaskSpec:
    """A copy of ``base`` with dotted-path changes; a value of ``None`` removes the key.

    Example: ``task_variant(t, {"training.optimizer": "adam", "training.momentum": None})``.
    """
    data = base.to_dict()
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        node = data
        for p in parents:
            node = node[p]
        if value is None:
            node.pop(key, None)
        else:
            node[key] = value
    return task_spec_from_dict(data)


@pytest.fixture(scope="session")
def build_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[TaskSpec], Path]:
    """Builds (once per distinct task) a real model directory with TensorFlow."""
    from aggregator.model_export import build_model, write_model

    cache: dict[str, Path] = {}

    def build(task: TaskSpec) -> Path:
        key = task.sha256()
        if key not in cache:
            out = tmp_path_factory.mktemp(f"model-{task.name}")
            write_model(build_model(task), out)
            cache[key] = out
        return cache[key]

    return build


@pytest.fixture(scope="session")
def har_model_dir(build_model_dir: Callable[[TaskSpec], Path], har_task: TaskSpec) -> Path:
    return build_model_dir(har_task)
