"""The wheel: one ``fedge`` namespace and nothing generic, the data files inside, and a device
build without server or demo code. Built from the tree and installed into an empty venv, run from
outside the checkout (issue 11)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
#: What a device image copies (docker/agent.Dockerfile): no aggregator/, no lab/.
DEVICE_PARTS = (
    "pyproject.toml",
    "setup.py",
    "README.md",
    "protocol",
    "shell",
    "agent",
    "tools",
    "tasks",
    "edgex_profiles",
)
ALL_PARTS = (*DEVICE_PARTS, "aggregator", "lab")


def copy_parts(parts: tuple[str, ...], dest: Path) -> Path:
    """A source tree of just these parts (a build writes build/ and *.egg-info next to the
    sources: never into the checkout)."""
    dest.mkdir()
    for part in parts:
        src = REPO / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dest / part)
    return dest


def build_wheel(source: Path, out: Path) -> Path:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",  # the build itself is isolated: pip fetches setuptools>=77 (pyproject.toml)
            "-q",
            "-w",
            str(out),
            ".",
        ],
        cwd=source,
        check=True,
        timeout=300,
        capture_output=True,
    )
    (wheel,) = out.glob("fedge-*.whl")
    return wheel


def top_levels(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        return {name.split("/")[0] for name in z.namelist() if not name.split("/")[0].endswith(".dist-info")}


def names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        return set(z.namelist())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    return build_wheel(copy_parts(ALL_PARTS, tmp / "src"), tmp / "out")


def test_the_wheel_installs_one_namespace_with_its_data(wheel: Path) -> None:
    assert top_levels(wheel) == {"fedge"}  # no agent, aggregator or protocol in site-packages
    files = names(wheel)
    assert "fedge/__init__.py" not in files  # a namespace package over the parts
    for expected in (
        "fedge/cli.py",
        "fedge/version.py",
        "fedge/tools/broker_config.py",
        "fedge/protocol/round_manifest.py",
        "fedge/shell/mqtt.py",
        "fedge/agent/service.py",
        "fedge/agent/edgex/wire.py",
        "fedge/aggregator/round_engine.py",
        "fedge/lab/demo.py",
        "fedge/tasks/har-watch.toml",
        "fedge/edgex_profiles/wearable-imu.yaml",
    ):
        assert expected in files, expected


def test_a_device_build_carries_no_server_or_demo_code(tmp_path: Path) -> None:
    source = copy_parts(DEVICE_PARTS, tmp_path / "device-src")
    files = names(build_wheel(source, tmp_path / "out"))
    assert not any(f.startswith(("fedge/aggregator/", "fedge/lab/")) for f in files)
    assert {
        "fedge/agent/service.py",
        "fedge/shell/files.py",
        "fedge/cli.py",
        "fedge/tasks/har-watch.toml",
    } <= files


def test_installed_from_the_wheel_the_cli_runs_outside_the_checkout(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
        check=True,
        timeout=600,
        capture_output=True,
    )
    fedge = env_dir / "bin" / "fedge"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for args in (["demo", "--help"], ["agent", "run", "--help"], ["--version"]):
        proc = subprocess.run([str(fedge), *args], cwd=outside, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
    # The default demo's task is found from here, inside the installed package, and parses.
    probe = (
        "from fedge.tools.bundled import task_path, profiles_dir; "
        "from fedge.protocol.task import parse_task_spec; "
        "p = task_path(); print(p); print(parse_task_spec(p.read_text()).name); "
        "print(sorted(x.name for x in profiles_dir().glob('*.yaml'))[0])"
    )
    proc = subprocess.run([str(python), "-c", probe], cwd=outside, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    path, task, profile = proc.stdout.split()
    assert path.startswith(str(env_dir)) and path.endswith("fedge/tasks/har-watch.toml")
    assert (task, profile) == ("har-watch", "devices.yaml")
