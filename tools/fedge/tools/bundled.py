"""The data files fedge ships: task specs (``fedge.tasks``) and EdgeX device profiles
(``fedge.edgex_profiles``), found the same way in a checkout, an editable install and a wheel.

Why not :mod:`importlib.resources`: both are data-only namespace packages, and under an editable
install their search path also holds setuptools' path-hook entry, on which Python 3.11's
resource reader fails. The package's search locations are read directly instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fedge.protocol.errors import FedgeError

TASKS = "fedge.tasks"
PROFILES = "fedge.edgex_profiles"
DEFAULT_TASK = "har-watch.toml"


def data_dir(package: str) -> Path:
    """The folder holding ``package``'s data files."""
    try:
        spec = importlib.util.find_spec(package)
    except ModuleNotFoundError:
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if Path(location).is_dir():
            return Path(location)
    raise FedgeError(f"this fedge install has no {package} data (reinstall fedge: pip install fedge)")


def task_path(name: str = DEFAULT_TASK) -> Path:
    """A task spec shipped with fedge (``tasks/`` in the repository)."""
    return data_dir(TASKS) / name


def profiles_dir() -> Path:
    """The EdgeX device profiles shipped with fedge (``edgex_profiles/`` in the repository)."""
    return data_dir(PROFILES)
