"""What ``fedge aggregator run`` loads before its first round (issue 18: the process's imports
had grown to 87.6 MB when the docs said 44.7 MB).

The heavy libraries are each imported only where they are used: the Kubernetes client with
``[leader]`` enabled, dp-accounting with ``[privacy]``, prometheus-client with ``[metrics]``,
TensorFlow and Keras only by ``fedge model build``/``import``. A fresh interpreter imports the
aggregator's entry points exactly as the CLI does and lists the third-party packages it got:
memory is not timed here, which packages are loaded is what decides it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from support.source_tree import PYTHONPATH

#: ``fedge aggregator run``: the CLI, then the config and the service (or, by the config, the
#: worker or the building gateway).
ENTRY_POINTS = (
    "fedge.cli",
    "fedge.aggregator.config",
    "fedge.aggregator.service",
    "fedge.aggregator.worker",
    "fedge.aggregator.building",
)
#: What a plain aggregator may load beyond the standard library.
ALLOWED = ["fedge", "nacl", "numpy", "paho"]

PROBE = f"""
import json, sys
for name in {list(ENTRY_POINTS)!r}:
    __import__(name)
third_party = {{m.split(".")[0] for m in sys.modules}} - set(sys.stdlib_module_names)
print(json.dumps(sorted(m for m in third_party if not m.startswith("_"))))
"""


def test_the_aggregator_entry_points_import_no_kubernetes_tensorflow_or_other_heavy_library() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": PYTHONPATH},
        check=True,
        timeout=120,
    )
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    for heavy in (
        "kubernetes",
        "tensorflow",
        "keras",
        "dp_accounting",
        "prometheus_client",
        "tflite_runtime",
    ):
        assert heavy not in loaded
    assert loaded == ALLOWED
