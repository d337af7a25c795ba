"""fedge.shell.files: atomic writes, private key files and bounded config reads, on real files
with real modes (no mocks). A failure in the middle of a write is a real one: the file-size
limit (RLIMIT_FSIZE) of a child process, which makes the write itself fail with EFBIG."""

from __future__ import annotations

import base64
import errno
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedge.protocol.config_source import ConfigError
from fedge.protocol.keyfile import MAX_KEY_FILE_BYTES, KeyFileError
from fedge.shell.files import atomic_write, read_config_file, read_private_key
from support.source_tree import PYTHONPATH as SOURCE_PYTHONPATH

KEY = bytes(range(32))
KEY_TEXT = base64.b64encode(KEY) + b"\n"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def leftovers(directory: Path) -> list[str]:
    """Temp files an atomic write could leave: ``.<name>.*.tmp``."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.fixture
def umask_077() -> Iterator[None]:
    """A strict umask, as a service runs with: modes must not depend on it."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


# --- atomic_write ----------------------------------------------------------------------------


def test_writes_bytes_or_chunks_with_the_mode_asked_for_whatever_the_umask(
    tmp_path: Path, umask_077: None
) -> None:
    secret, public = tmp_path / "state.json", tmp_path / "manifest.json"
    atomic_write(secret, b'{"a": 1}')
    atomic_write(public, [b"one ", b"two ", memoryview(b"three")], 0o644)
    assert secret.read_bytes() == b'{"a": 1}' and mode_of(secret) == 0o600
    assert public.read_bytes() == b"one two three" and mode_of(public) == 0o644
    atomic_write(secret, b"replaced")  # over an existing file: its content, its mode
    assert secret.read_bytes() == b"replaced" and mode_of(secret) == 0o600
    assert leftovers(tmp_path) == []


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    """The child may write files of at most 64 KiB; writing 1 MiB fails in the write itself."""
    target = tmp_path / "checkpoint.bin"
    target.write_bytes(b"old checkpoint")
    target.chmod(0o600)
    child = f"""
import resource, signal, sys
from pathlib import Path
from fedge.shell.files import atomic_write
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write() instead of a signal
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    atomic_write(Path({str(target)!r}), [b"x" * 65536, b"y" * 1024 * 1024])
except OSError as exc:
    print(exc.errno, exc.strerror)
    sys.exit(0)
sys.exit("the write did not fail")
"""
    env = {**os.environ, "PYTHONPATH": SOURCE_PYTHONPATH}
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{errno.EFBIG} File too large"
    assert target.read_bytes() == b"old checkpoint"
    assert leftovers(tmp_path) == []


def test_a_missing_directory_is_the_callers_to_word(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        atomic_write(tmp_path / "gone" / "state.json", b"{}")
    # What the callers put in their messages ("cannot write device state ...: <strerror>").
    assert info.value.strerror == "No such file or directory"


def test_without_replace_an_existing_file_is_never_touched(tmp_path: Path) -> None:
    key = tmp_path / "device.box"
    atomic_write(key, b"first\n", replace=False)
    with pytest.raises(FileExistsError):
        atomic_write(key, b"second\n", replace=False)
    assert key.read_bytes() == b"first\n" and mode_of(key) == 0o600
    assert leftovers(tmp_path) == []


def test_keep_previous_moves_the_current_file_aside_first(tmp_path: Path) -> None:
    path, prev = tmp_path / "ck.bin", tmp_path / "ck.prev"
    atomic_write(path, b"v1", keep_previous=prev)  # the first write: nothing to keep
    assert path.read_bytes() == b"v1" and not prev.exists()
    atomic_write(path, b"v2", keep_previous=prev)
    assert (path.read_bytes(), prev.read_bytes()) == (b"v2", b"v1")


def test_concurrent_readers_see_the_old_file_or_the_new_one_never_a_mix(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    versions = [bytes([65 + i]) * 200_000 for i in range(5)]
    atomic_write(path, versions[0])
    seen: set[bytes] = set()
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            seen.add(path.read_bytes())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(4):
            for data in versions:
                atomic_write(path, data)
    finally:
        done.set()
        reader.join()
    assert seen <= set(versions) and seen


# --- read_private_key ------------------------------------------------------------------------


def key_file(path: Path, content: bytes = KEY_TEXT, mode: int = 0o600) -> Path:
    path.write_bytes(content)
    path.chmod(mode)
    return path


def test_an_owner_only_key_file_gives_its_32_bytes_also_through_a_symlink(tmp_path: Path) -> None:
    path = key_file(tmp_path / "device.box")
    assert read_private_key(path, "box") == KEY
    (tmp_path / "link.box").symlink_to(path)  # as Kubernetes mounts a Secret: judged by its target
    assert read_private_key(tmp_path / "link.box", "signing") == KEY


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_a_key_file_group_or_others_can_access_is_refused(tmp_path: Path, mode: int) -> None:
    path = key_file(tmp_path / "aggregator.sign", mode=mode)
    with pytest.raises(ConfigError) as info:
        read_private_key(path, "signing")
    assert str(info.value) == (
        f"private key file {path} is accessible by group or others (mode {mode:04o}); "
        f"fix it with: chmod 600 {path}"
    )


def test_an_oversized_key_file_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    path = key_file(tmp_path / "big.box", KEY_TEXT * 40)
    expected = (
        f"private key file {path} is malformed: over {MAX_KEY_FILE_BYTES} bytes; "
        "expected one line with the base64 of a 32-byte X25519 private key"
    )
    with pytest.raises(ConfigError) as info:
        read_private_key(path, "box")
    assert str(info.value) == expected
    os.truncate(path, 64 * 1024**3)  # 64 GiB (sparse): read whole it would never return
    with pytest.raises(ConfigError) as info:
        read_private_key(path, "box")
    assert str(info.value) == expected


def test_unreadable_key_files_name_the_file_and_the_problem(tmp_path: Path) -> None:
    missing = tmp_path / "none.box"
    with pytest.raises(ConfigError) as info:
        read_private_key(missing, "box")
    assert str(info.value) == f"cannot read private key file {missing}: No such file or directory"
    with pytest.raises(ConfigError) as info:
        read_private_key(missing, "box", what="device key")
    assert str(info.value) == f"cannot read device key {missing}: No such file or directory"
    (tmp_path / "dir").mkdir(mode=0o700)
    with pytest.raises(ConfigError) as info:
        read_private_key(tmp_path / "dir", "box")
    assert str(info.value) == f"private key file {tmp_path / 'dir'} is not a regular file"


def test_the_error_type_is_the_callers_choice(tmp_path: Path) -> None:
    """``fedge keys`` reports KeyFileError, the services ConfigError (exit 78): same words."""
    path = key_file(tmp_path / "device.box", mode=0o644)
    with pytest.raises(KeyFileError, match=r"is accessible by group or others \(mode 0644\)"):
        read_private_key(path, "box", error=KeyFileError)
    with pytest.raises(KeyFileError, match=r"cannot read private key file .*: No such file"):
        read_private_key(tmp_path / "none", "box", error=KeyFileError)


# --- read_config_file ------------------------------------------------------------------------


def test_a_config_file_is_read_with_its_mode_up_to_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(b"x" * 100)
    path.chmod(0o640)
    raw, st_mode = read_config_file(path, 100, "config")
    assert raw == b"x" * 100 and stat.S_ISREG(st_mode) and stat.S_IMODE(st_mode) == 0o640
    path.write_bytes(b"x" * 101)
    with pytest.raises(ConfigError) as info:
        read_config_file(path, 100, "config")
    assert str(info.value) == f"config {path} is over 100 bytes: not a fedge config"


def test_a_huge_config_file_is_refused_after_limit_plus_one_bytes(tmp_path: Path) -> None:
    path = tmp_path / "huge.toml"
    path.touch()
    os.truncate(path, 64 * 1024**3)  # sparse: only a bounded read returns at once
    with pytest.raises(ConfigError) as info:
        read_config_file(path, 1024 * 1024, "password file")
    assert str(info.value) == f"password file {path} is over 1048576 bytes: not a fedge password file"


def test_special_and_missing_config_files(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)  # nobody writes it: opening must not hang
    with pytest.raises(ConfigError) as info:
        read_config_file(fifo, 1024, "config")
    assert str(info.value) == f"cannot read config {fifo}: not a regular file"
    with pytest.raises(ConfigError) as info:
        read_config_file(tmp_path / "none.toml", 1024, "config")
    assert str(info.value) == f"cannot read config {tmp_path / 'none.toml'}: No such file or directory"
