"""``fedge agent run`` sets the agent's process up before numpy loads (issue 18: device memory).

OpenBLAS reads ``OPENBLAS_NUM_THREADS`` when numpy is imported, so the setting only works if
nothing on the way to ``cmd_agent_run`` imports numpy: the parser and the agent's configuration
must not. Each check runs in a fresh interpreter (this one has loaded numpy long ago).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")

_PROBE = r"""
import json, os, sys
from fedge.cli import build_parser, prepare_agent_process
args = build_parser().parse_args(["agent", "run", "--config", "agent.toml"])
import fedge.agent.config  # what cmd_agent_run imports before the agent's modules
before = "numpy" in sys.modules
prepare_agent_process()
import numpy
threads = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("Threads:"))
print(json.dumps({"numpy_before": before, "blas": os.environ.get("OPENBLAS_NUM_THREADS"),
                  "threads": threads, "func": args.func.__name__}))
"""


def probe(**env: str) -> dict[str, object]:
    base = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "MALLOC_ARENA_MAX")}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE],
        capture_output=True,
        text=True,
        env={**base, **env},
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_agent_run_keeps_numpy_to_one_blas_thread() -> None:
    result = probe()
    assert result["func"] == "cmd_agent_run"
    assert result["numpy_before"] is False  # the setting comes before numpy's import
    assert result["blas"] == "1"
    assert result["threads"] == 1  # no OpenBLAS worker thread, whatever the machine's cores


def test_an_operators_blas_setting_is_kept() -> None:
    result = probe(OPENBLAS_NUM_THREADS="2", MALLOC_ARENA_MAX="4")
    assert result["blas"] == "2"
    assert result["numpy_before"] is False
