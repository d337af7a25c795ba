"""A tiny real file system as a state directory: a tmpfs mounted at a test's directory, which
a filler file makes full and a remount makes read-only (issue 16, tests/e2e/test_disk_faults.py
and tests/shell/test_storage_faults.py).

Mounting needs root (tests and CI run as root); without it, or where the kernel refuses the
mount (a container without CAP_SYS_ADMIN), the test is skipped, naming why. Every mount is
undone by the ``tiny_fs`` fixture, whether the test passed or failed.

PYTEST_DONT_REWRITE: test modules load it as a plugin after importing it (it raises its
AssertionErrors itself).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


class TinyFs:
    """A tmpfs of ``size`` mounted at ``path``: :meth:`fill` makes it full, :meth:`free` gives
    the space back, :meth:`remount` makes it read-only (``"ro"``) or writable (``"rw"``).
    Unmounted by :meth:`close` whatever happened (the ``tiny_fs`` fixture calls it)."""

    def __init__(self, path: Path, size: str) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs as a state directory needs root")
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs at {path}: {mounted.stderr.strip()}")
        self.filler = path / "filler"

    def fill(self) -> None:
        """Writes the filler until the file system refuses (ENOSPC)."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for chunk in (1 << 16, 4096, 512):
                try:
                    while True:
                        os.write(fd, b"\0" * chunk)
                except OSError:
                    pass
        finally:
            os.close(fd)
        if os.statvfs(self.path).f_bavail != 0:
            raise AssertionError(f"{self.path} still has room after filling it")

    def free(self) -> None:
        self.filler.unlink()

    def remount(self, mode: str) -> None:
        """``ro`` or ``rw``; the kernel refuses ``ro`` while a file there is open for writing
        (EBUSY), which the aggregator does only for a moment: tried a few times."""
        for _ in range(50):
            done = subprocess.run(["mount", "-o", f"remount,{mode}", str(self.path)], capture_output=True)
            if done.returncode == 0:
                return
            time.sleep(0.02)
        raise AssertionError(f"cannot remount {self.path} {mode}: {done.stderr.decode().strip()}")

    def close(self) -> None:
        subprocess.run(["mount", "-o", "remount,rw", str(self.path)], check=False, capture_output=True)
        subprocess.run(["umount", "-l", str(self.path)], check=False, capture_output=True)


@pytest.fixture()
def tiny_fs() -> Iterator[list[TinyFs]]:
    """Mount with ``tiny_fs.append(TinyFs(path, size))``; every one is unmounted at the end."""
    mounts: list[TinyFs] = []
    try:
        yield mounts
    finally:
        for fs in reversed(mounts):
            fs.close()
