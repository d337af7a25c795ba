"""Shared plumbing for the tests that build and run fedge's images with podman.

The images are built by ``scripts/container-images.sh`` (a debootstrap base, ``--pull=never``,
the host's CA bundle mounted for pip). Where podman cannot run, the tests skip locally and fail
in CI (``CI`` set): CI installs podman (``scripts/system-deps.sh``), so a missing podman there is
a broken set-up, not a reason to pass quietly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGES_SCRIPT = ROOT / "scripts" / "container-images.sh"
CONTAINERS_CONF = ROOT / "docker" / "podman" / "containers.conf"


def podman_env() -> dict[str, str]:
    """The environment for every podman call: our containers.conf (runc, rlimits)."""
    env = dict(os.environ)
    env["CONTAINERS_CONF"] = str(CONTAINERS_CONF)
    return env


def require_podman() -> None:
    """Skip (locally) or fail (CI) when podman, debootstrap or root is missing."""
    missing = [
        tool
        for tool in ("podman", "debootstrap")
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists()
    ]
    if os.geteuid() != 0:
        missing.append("root")
    if not missing:
        return
    message = f"container tests need {', '.join(missing)} (scripts/system-deps.sh installs them)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def podman(
    *args: str, check: bool = True, timeout: float = 300, input_text: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs podman with our configuration; on failure the assertion shows podman's stderr."""
    result = subprocess.run(
        ["podman", *args],
        env=podman_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input_text,
        check=False,
    )
    if check:
        assert result.returncode == 0, (
            f"podman {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}"
        )
    return result


def build_images(*targets: str, arch: str | None = None, timeout: float = 1500) -> dict[str, int]:
    """Builds the named targets (``base``, ``agent``, ``aggregator`` or ``FILE=TAG``) and returns
    {image tag: size in bytes}. Podman's layer cache makes a rebuild of unchanged sources cheap."""
    command: list[str] = ["bash", str(IMAGES_SCRIPT)]
    if arch:
        command += ["--arch", arch]
    result = subprocess.run(
        [*command, *targets],
        env=podman_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, (
        f"image build failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-6000:]}"
    )
    sizes: dict[str, int] = {}
    for line in result.stdout.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "image":
            tag, _, size = rest.rpartition(" ")
            sizes[tag] = int(size)
    return sizes


def build_agent_image(arch: str | None = None, timeout: float = 1500) -> tuple[str, int]:
    """The agent image's tag and size (the build also reports the base when it had to make it)."""
    sizes = build_images("agent", arch=arch, timeout=timeout)
    [(tag, size)] = [(t, s) for t, s in sizes.items() if "/fedge-agent:" in t]
    return tag, size


def remove_containers(names: Sequence[str]) -> None:
    """Best-effort clean-up of containers a test started (never fails the test)."""
    for name in names:
        subprocess.run(
            ["podman", "rm", "--force", "--time", "2", name],
            env=podman_env(),
            capture_output=True,
            check=False,
            timeout=60,
        )
