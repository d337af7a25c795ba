"""fedge.shell.files' small state files (the personal weights, the error-feedback residual):
a bounded read, and an atomic replace or a removal, on real files. A write that fails midway is
a real one: a tiny tmpfs (:mod:`support.tiny_fs`, needs root) too small for it."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from fedge.shell.files import OversizedFile, read_bounded, replace_or_remove
from support.tiny_fs import TinyFs

pytest_plugins = ("support.tiny_fs",)


def names(directory: Path) -> list[str]:
    """Everything in ``directory``, temp files (``.<name>.*.tmp``) included."""
    return sorted(p.name for p in directory.iterdir())


# --- read_bounded ----------------------------------------------------------------------------


def test_a_file_up_to_the_limit_is_read_whole_and_a_missing_one_is_none(tmp_path: Path) -> None:
    path = tmp_path / "state.bin"
    path.write_bytes(b"x" * 100)
    assert read_bounded(path, 100) == b"x" * 100
    assert read_bounded(tmp_path / "none.bin", 100) is None


def test_a_file_over_the_limit_is_refused_with_the_reason_for_the_caller_to_word(tmp_path: Path) -> None:
    path = tmp_path / "state.bin"
    path.write_bytes(b"x" * 101)
    with pytest.raises(OversizedFile) as info:
        read_bounded(path, 100)
    assert str(info.value) == "over 100 bytes"
    assert (info.value.path, info.value.limit) == (path, 100)
    assert path.read_bytes() == b"x" * 101  # read, never touched


def test_a_huge_file_is_refused_after_limit_plus_one_bytes(tmp_path: Path) -> None:
    path = tmp_path / "huge.bin"
    path.touch()
    os.truncate(path, 64 * 1024**3)  # sparse: only a bounded read returns at once
    with pytest.raises(OversizedFile) as info:
        read_bounded(path, 1024 * 1024)
    assert str(info.value) == "over 1048576 bytes"


def test_a_path_that_cannot_be_read_is_the_oserror_for_the_caller_to_word(tmp_path: Path) -> None:
    path = tmp_path / "state.bin"
    path.mkdir()  # a directory where the file should be
    with pytest.raises(OSError) as info:
        read_bounded(path, 100)
    assert info.value.strerror == "Is a directory"


# --- replace_or_remove -----------------------------------------------------------------------


def test_data_replaces_the_file_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "state.bin"
    path.write_bytes(b"old")
    path.chmod(0o644)
    replace_or_remove(path, b"new")
    assert path.read_bytes() == b"new" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert names(tmp_path) == ["state.bin"]


def test_none_removes_the_file_and_a_missing_one_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "state.bin"
    path.write_bytes(b"old")
    replace_or_remove(path, None)
    assert names(tmp_path) == []
    replace_or_remove(path, None)  # nothing to remove: no error
    assert names(tmp_path) == []


def test_a_removal_that_fails_raises_and_leaves_what_was_there(tmp_path: Path) -> None:
    path = tmp_path / "state.bin"
    path.mkdir()  # unlink() of a directory fails whoever runs it
    with pytest.raises(OSError) as info:
        replace_or_remove(path, None)
    assert info.value.strerror == "Is a directory" and path.is_dir()


def test_a_replace_that_fails_midway_leaves_no_half_written_file_and_drops_the_old_one(
    tmp_path: Path, tiny_fs: list[TinyFs]
) -> None:
    """A real file system of 1 MiB and 2 MiB to write: the write itself fails part-way (ENOSPC).
    Neither the new content nor the old file is left: the caller holds the new state in memory,
    and the old one read back after a restart would be stale."""
    fs = TinyFs(tmp_path / "state", "1m")
    tiny_fs.append(fs)
    path = fs.path / "residual.bin"
    path.write_bytes(b"old residual")
    with pytest.raises(OSError) as info:
        replace_or_remove(path, b"x" * 2 * 1024 * 1024)
    assert info.value.errno == errno.ENOSPC
    assert names(fs.path) == []  # no temp file, no half-written file, no old file
    replace_or_remove(path, b"new")  # the space the failed write took is back
    assert path.read_bytes() == b"new"


def test_a_replace_in_a_missing_directory_is_the_oserror_for_the_caller_to_word(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        replace_or_remove(tmp_path / "gone" / "state.bin", b"new")
    assert info.value.strerror == "No such file or directory"


def test_a_fifo_where_the_file_should_be_is_refused_at_once_not_waited_on(tmp_path: Path) -> None:
    path = tmp_path / "state.bin"
    os.mkfifo(path)  # nobody writes to it: a blocking open would never return
    with pytest.raises(OSError) as info:
        read_bounded(path, 100)
    assert (info.value.errno, info.value.strerror) == (errno.EINVAL, "Not a regular file")
    assert stat.S_ISFIFO(os.stat(path).st_mode)  # left as it was
