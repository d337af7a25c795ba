"""Where fedge's parts live in this checkout, for subprocesses that must import them from the
tree rather than from an install (the tflite-runtime venv has no fedge installed).

Each part's folder holds its package (``agent/fedge/agent``: setup.py), so the folders, not the
repository root, go on ``PYTHONPATH``; ``fedge`` is a namespace package that joins them up.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PARTS = ("protocol", "shell", "agent", "aggregator", "tools", "lab")
#: The value for ``PYTHONPATH``: every part's folder.
PYTHONPATH = os.pathsep.join(str(REPO / part) for part in PARTS)
