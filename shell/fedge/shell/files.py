"""Files every fedge service reads and writes: atomic writes, private keys, config files.

One implementation of each, because the rules are easy to get subtly wrong and must be the
same on the device and the gateway: a state file is never half-written (a crash or a power
cut leaves the old content or the new one), a private key that others can read is refused,
and a config file is read through one descriptor with a size bound.

Errors: :func:`atomic_write` and the small state files' :func:`read_bounded` and
:func:`replace_or_remove` raise :class:`OSError` (and :class:`OversizedFile`) and leave the
wording to their caller (each names its own file: "cannot write device state ...", "cannot
write checkpoint ..."); the config readers raise
:class:`~fedge.protocol.config_source.ConfigError` (exit 78: a key file and a config file are
part of a service's configuration) unless told otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from fedge.protocol.config_source import ConfigError
from fedge.protocol.errors import FedgeError
from fedge.protocol.keyfile import MAX_KEY_FILE_BYTES, KeyFileError, KeyKind, check_private_key_file


def atomic_write(
    path: Path,
    data: bytes | Iterable[bytes],
    mode: int = 0o600,
    *,
    replace: bool = True,
    keep_previous: Path | None = None,
) -> None:
    """Writes ``data`` to ``path`` so that a reader, or a crash at any point, finds the old
    file or the new one, never a mix.

    A temp file in the same directory (created 0600, then set to ``mode``, so a secret is never
    readable by others, whatever the umask), written, fsynced, renamed over ``path``; then the
    directory is fsynced, without which the rename itself may not survive a power cut.

    - ``data``: bytes, or chunks written one after the other (a large checkpoint is never
      joined in memory).
    - ``replace=False``: the temp file is linked to ``path`` instead of renamed, which fails
      with :class:`FileExistsError` if ``path`` exists: a key or a trust store is never
      overwritten by accident.
    - ``keep_previous``: the current file (if any) is first renamed to this name, so between
      the two renames a reader finds at least that one (the checkpoint's ``.prev``).

    Raises :class:`OSError`; the temp file is removed whatever fails (only a crash can leave a
    stray ``.<name>.*.tmp``, which no reader looks at).
    """
    directory = path.parent
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    leftover: str | None = tmp
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            for chunk in (data,) if isinstance(data, bytes | bytearray | memoryview) else data:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if not replace:
            os.link(tmp, path)  # leftover stays tmp: the link is the file now
        else:
            if keep_previous is not None:
                # Missing on the first write, or after a crash between the two renames.
                with contextlib.suppress(FileNotFoundError):
                    os.replace(path, keep_previous)
            os.replace(tmp, path)
            leftover = None
        fsync_directory(directory)
    finally:
        if leftover is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)


class OversizedFile(FedgeError):
    """A file :func:`read_bounded` refused for being over its limit. The message is the reason
    alone ("over <limit> bytes"): the caller names the file, as it does for an :class:`OSError`."""

    def __init__(self, path: Path, limit: int) -> None:
        super().__init__(f"over {limit} bytes")
        self.path = Path(path)
        self.limit = limit


def read_bounded(path: Path, limit: int) -> bytes | None:
    """The content of the small state file ``path``, or None when there is no such file.

    At most ``limit`` + 1 bytes are read, so a file that something else grew (or replaced) is
    refused with :class:`OversizedFile` without being read whole. Any other failure to read is
    the :class:`OSError`, for the caller to word (a state file that cannot be read back is
    usually logged and started afresh, not fatal).
    """
    try:
        # O_NONBLOCK: a FIFO put where the file should be must not block the service's thread
        # on open (nobody writing to it); it is refused below like any other non-regular file.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "Not a regular file", str(path))
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise OversizedFile(path, limit)
    return raw


def replace_or_remove(path: Path, data: bytes | None, mode: int = 0o600) -> None:
    """Replaces the small state file ``path`` with ``data`` (:func:`atomic_write`), or removes
    it for None (a missing file is fine).

    When ``data`` cannot be written, the old file is removed too if it can be: the caller keeps
    the new state in memory, and an older state read back after a restart would be worse than
    none (a residual sent twice, predictions from outdated weights). The write's
    :class:`OSError` is raised either way, for the caller to word.
    """
    try:
        if data is None:
            path.unlink(missing_ok=True)
        else:
            atomic_write(path, data, mode)
    except OSError:
        if data is not None:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        raise


def fsync_directory(directory: Path) -> None:
    """Makes the entries of ``directory`` (a new file, a rename) durable: an fsync of the
    file alone does not cover its name."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: What the write probe of :func:`prepare_writable_dir` writes: one page, so a full file system
#: fails the probe too (an empty file needs only an inode).
PROBE_BYTES = 4096


def prepare_writable_dir(path: Path) -> None:
    """Creates ``path`` and proves this process can write there by writing (one page, fsynced)
    and removing a probe file: a wrong owner, a read-only mount or a full file system fails
    now, not at the first state write. The probe, not the mode bits, decides (root writes
    anywhere); its name is unique per process and call, so replicas sharing a volume do not
    trip over each other. Raises :class:`OSError` (the probe is removed whatever fails); the
    caller names its setting and the fix (:func:`unwritable_dir_fix` for the ones that are no
    ownership problem)."""
    probe = path / f".fedge-write-probe-{os.getpid()}-{time.time_ns()}"
    path.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"\0" * PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            probe.unlink()


def read_private_key(
    path: Path,
    kind: KeyKind,
    *,
    what: str = "private key file",
    error: type[FedgeError] = ConfigError,
) -> bytes:
    """A private key file's 32 bytes; refuses a file that group or others can access, anything
    but a regular file, and a malformed key (:func:`fedge.protocol.keyfile.check_private_key_file`).

    The mode is judged on the opened descriptor (``fstat``), so a symlink (as Kubernetes mounts
    a Secret) is judged by its target, and no other file can be swapped in between check and
    read. At most :data:`~fedge.protocol.keyfile.MAX_KEY_FILE_BYTES` + 1 bytes are read: enough
    to tell a key file from anything bigger. Errors are ``error`` (by default
    :class:`ConfigError`: a service's key is part of its configuration); a file that cannot be
    opened is "cannot read <what> <path>: <reason>".
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        st_mode = os.fstat(fd).st_mode
        raw = os.read(fd, MAX_KEY_FILE_BYTES + 1) if stat.S_ISREG(st_mode) else b""
    finally:
        os.close(fd)
    try:
        return check_private_key_file(raw, st_mode, str(path), kind)
    except KeyFileError as exc:
        raise error(str(exc)) from None


def read_config_file(path: Path, limit: int, what: str) -> tuple[bytes, int]:
    """The content of the regular file ``path`` (at most ``limit`` bytes) and its ``st_mode``:
    the services' :data:`~fedge.protocol.config_source.FileReader` (``protocol`` does no I/O).

    One descriptor for both, so the mode judged is that of the file read (a symlink is judged
    by its target, and cannot be swapped in between). ``O_NONBLOCK`` keeps a FIFO from hanging
    the open; it is refused as not a regular file. Reads ``limit`` + 1 bytes at most, so an
    oversized file is refused without being read whole.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st_mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(st_mode):
            raise ConfigError(f"cannot read {what} {path}: not a regular file")
        try:
            raw = f.read(limit + 1)
        except OSError as exc:
            raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(raw) > limit:
        raise ConfigError(f"{what} {path} is over {limit} bytes: not a fedge {what}")
    return raw, st_mode
