"""Which parts a build of fedge contains: every part whose folder is present.

Everything is in one import namespace, ``fedge``, laid out over the design card's folders (each
part keeps its folder; inside it, ``fedge/<part>`` so that mypy and plain ``sys.path`` imports
see the same names the installed wheel has):

    protocol/fedge/protocol     fedge.protocol     the contract (pure)
    shell/fedge/shell           fedge.shell        the I/O shell both sides share (files, MQTT)
    agent/fedge/agent           fedge.agent        the device side
    aggregator/fedge/aggregator fedge.aggregator   the gateway side
    tools/fedge                 fedge.cli, fedge.version, fedge.tools   the CLI, production tools
    lab/fedge/lab               fedge.lab          the demo and test infrastructure
    tasks/, edgex_profiles/     fedge.tasks, fedge.edgex_profiles      data (task specs, profiles)

No folder named ``fedge`` has an ``__init__.py``: ``fedge`` is a namespace package, so the parts
join up wherever they are found. A device image copies only protocol/, shell/, agent/, tools/
and the data (docker/agent.Dockerfile): its wheel then carries no aggregator or lab code. All other
metadata is in pyproject.toml.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import find_namespace_packages, setup

ROOT = Path(__file__).resolve().parent
#: import name -> folder, for each part that may be present.
PARTS = {
    "fedge": "tools/fedge",
    "fedge.protocol": "protocol/fedge/protocol",
    "fedge.shell": "shell/fedge/shell",
    "fedge.agent": "agent/fedge/agent",
    "fedge.aggregator": "aggregator/fedge/aggregator",
    "fedge.lab": "lab/fedge/lab",
    "fedge.tasks": "tasks",
    "fedge.edgex_profiles": "edgex_profiles",
}
DATA = {"fedge.tasks": ["*.toml"], "fedge.edgex_profiles": ["*.yaml", "*.md"]}


def present_parts() -> dict[str, str]:
    return {name: folder for name, folder in PARTS.items() if (ROOT / folder).is_dir()}


def packages(parts: dict[str, str]) -> list[str]:
    """Each present part and its subpackages (found in its own folder, not its parent's)."""
    found = []
    for name, folder in parts.items():
        found.append(name)
        if name in DATA:
            continue
        subs = find_namespace_packages(where=str(ROOT / folder), exclude=["*__pycache__*"])
        found += [f"{name}.{sub}" for sub in subs if f"{name}.{sub}" not in parts]
    return sorted(set(found))


parts = present_parts()
setup(
    package_dir=parts,
    packages=packages(parts),
    package_data={name: globs for name, globs in DATA.items() if name in parts},
)
