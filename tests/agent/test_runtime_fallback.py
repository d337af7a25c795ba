"""The tflite-runtime fallback, proven in a second environment without ai-edge-litert.

``make test`` creates that environment (tflite-runtime 2.14, numpy<2) and passes its Python
in ``FEDGE_TFLITE_PYTHON``. In CI the environment must exist; on a developer machine without
it the test is skipped with the command that creates it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedge.protocol.task import TaskSpec
from support.tasks import task_variant
from support.training_probe import run_probe, tensorflow_weights, write_batches

FALLBACK_PYTHON = os.environ.get("FEDGE_TFLITE_PYTHON")


@pytest.fixture(scope="module")
def fallback_python() -> str:
    if not FALLBACK_PYTHON:
        if os.environ.get("CI"):
            pytest.fail("CI must run the fallback test: FEDGE_TFLITE_PYTHON is not set (use make test)")
        pytest.skip("FEDGE_TFLITE_PYTHON not set; run `make tflite-env` and `make pytest`")
    return FALLBACK_PYTHON


def test_fallback_environment_has_no_litert(fallback_python: str) -> None:
    proc = subprocess.run(
        [fallback_python, "-c", "import ai_edge_litert"], capture_output=True, text=True, check=False
    )
    assert proc.returncode != 0 and "No module named 'ai_edge_litert'" in proc.stderr


def test_agent_trains_with_tflite_runtime_like_tensorflow(
    fallback_python: str, har_task: TaskSpec, har_model_dir: Path, tmp_path: Path
) -> None:
    arrays = write_batches(har_task, tmp_path / "batches.npz")
    report = run_probe(fallback_python, har_model_dir, tmp_path / "batches.npz", tmp_path / "w.npy")
    assert report["runtime"] == "tflite_runtime"
    assert str(report["numpy"]).startswith("1.")
    assert report["heavy_modules"] == []
    np.testing.assert_allclose(np.load(tmp_path / "w.npy"), tensorflow_weights(har_task, arrays), atol=1e-6)


def test_a_fedprox_model_trains_with_tflite_runtime_like_tensorflow(
    fallback_python: str, har_task: TaskSpec, build_model_dir: Callable[[TaskSpec], Path], tmp_path: Path
) -> None:
    """The proximal term (``training.proximal_mu``) in the fallback runtime too."""
    task = task_variant(har_task, {"training.proximal_mu": 0.5})
    arrays = write_batches(task, tmp_path / "batches.npz")
    report = run_probe(fallback_python, build_model_dir(task), tmp_path / "batches.npz", tmp_path / "w.npy")
    assert report["runtime"] == "tflite_runtime"
    np.testing.assert_allclose(np.load(tmp_path / "w.npy"), tensorflow_weights(task, arrays), atol=1e-6)
