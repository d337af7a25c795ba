"""Shared fixtures (the real HAR task, real models built once per session with TensorFlow) and
the markers: each test carries its part's marker from its folder (``pytest -m agent``, or
``pytest tests/agent``), and attacks carry ``adversarial``.

Layout: ``tests/<part>/`` for protocol, shell, edgex, agent, aggregator, tools, e2e, deploy and
contract (the MQTT contract, ``docs/asyncapi.yaml``);
``tests/support/`` holds the harnesses they share (imported as ``support.<module>``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from fedge.protocol.task import TaskSpec, parse_task_spec

REPO = Path(__file__).resolve().parent.parent
HAR_TASK_PATH = REPO / "tasks" / "har-watch.toml"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def har_task() -> TaskSpec:
    return parse_task_spec(HAR_TASK_PATH.read_text())


@pytest.fixture(scope="session")
def build_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[TaskSpec], Path]:
    """Builds (once per distinct task) a real model directory with TensorFlow."""
    from fedge.aggregator.model_export import build_model, write_model

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


# Tests that attack fedge (bad, replayed, forged, tampered or oversized input; floods) carry
# the `adversarial` marker, so `pytest -m adversarial` runs the whole attack suite. Modules
# that are attacks throughout mark themselves; elsewhere the test's name says it.
_ATTACK_MODULES = {
    "test_round_engine.py",
    "test_federated_e2e.py",
    "test_sealing.py",
    "test_framing.py",
    "test_signing.py",
    "test_messages.py",
    "test_codec.py",
    "test_round_manifest.py",
    "test_edgex_wire.py",
    "test_trainer.py",
    "test_model_manifest.py",
    "test_task_spec.py",
    "test_edgex_profiles.py",
    "test_edgex_core_data.py",
    "test_broker_security.py",
    "test_config_source.py",
}
_ATTACK_WORDS = (
    "reject",
    "replay",
    "refuse",
    "forged",
    "flip",
    "tamper",
    "flood",
    "attack",
    "fuzz",
    "arbitrary",
    "spoof",
    "malformed",
    "huge",
    "declare",
    "overflow",
    "duplicate",
    "not_finite",
    "nan",
    "bomb",
    "oversize",
    "too_large",
    "wrong",
    "unknown",
    "garbage",
    "bad",
    "cannot",
    "takeover",
    "take_over",
    "readable",
    "outsider",
)


#: The folders under tests/ whose tests carry a marker of the same name.
PARTS = ("protocol", "shell", "edgex", "agent", "aggregator", "tools", "e2e", "deploy", "contract")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    tests = Path(__file__).resolve().parent
    for item in items:
        # The first folder under tests/ names the part, also for a subfolder (protocol/secagg).
        relative = item.path.resolve().relative_to(tests).parts if item.path.is_relative_to(tests) else ()
        part = relative[0] if len(relative) > 1 else ""
        if part in PARTS:
            item.add_marker(getattr(pytest.mark, part))
        if item.path.name in _ATTACK_MODULES and any(w in item.name.lower() for w in _ATTACK_WORDS):
            item.add_marker(pytest.mark.adversarial)
