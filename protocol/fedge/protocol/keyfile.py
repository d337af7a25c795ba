"""The rules for keys as text, shared by every side: private key files are owner-only and
hold one line of base64; a key written as text anywhere is the base64 of exactly its size.

Pure: the caller opens the file and passes its bytes and ``st_mode`` (from ``fstat`` on the
opened descriptor, so a symlink is judged by its target and cannot be swapped in between).
Error messages describe the problem and the fix, never the key's content.
"""

from __future__ import annotations

import base64
import binascii
import stat
from typing import Literal

from fedge.protocol.errors import FedgeError, FieldError

KeyKind = Literal["box", "signing"]
MAX_KEY_FILE_BYTES = 1024
_KIND_NAMES: dict[str, str] = {"box": "X25519 private key", "signing": "Ed25519 signing key seed"}


class KeyFileError(FedgeError):
    """A key file cannot be read, is too open, malformed, or would overwrite another one."""


class KeyTextError(FieldError):
    """Text that should be a key's base64 is not base64, or not of the key's size.

    Callers pass it on as their own error (a seal, a signature, a rotation), keeping the message.
    """


def key_bytes_from_text(text: str, size: int, what: str) -> bytes:
    """The ``size`` bytes whose base64 is ``text`` (``what`` names the key in the message).

    One rule for every key fedge reads as text: strict base64 (no stray characters) and exactly
    the key's size. Whitespace is the caller's to strip or refuse.
    """
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError):  # binascii.Error is a ValueError
        raise KeyTextError(f"{what} is not base64") from None
    if len(raw) != size:
        raise KeyTextError(
            f"{what} must be {size} bytes, got {len(raw)}", field=what, expected=size, found=len(raw)
        )
    return raw


def check_private_key_file(raw: bytes, st_mode: int, path: str, kind: KeyKind) -> bytes:
    """The 32 key bytes, if the file is a regular owner-only file holding one base64 key."""
    if kind not in _KIND_NAMES:
        raise ValueError(f"kind must be 'box' or 'signing', not {kind!r}")
    if not stat.S_ISREG(st_mode):
        raise KeyFileError(f"private key file {path} is not a regular file")
    mode = stat.S_IMODE(st_mode)
    if mode & 0o077:
        raise KeyFileError(
            f"private key file {path} is accessible by group or others (mode {mode:04o}); "
            f"fix it with: chmod 600 {path}"
        )
    expected = f"expected one line with the base64 of a 32-byte {_KIND_NAMES[kind]}"

    def malformed(problem: str) -> KeyFileError:
        return KeyFileError(f"private key file {path} is malformed: {problem}; {expected}")

    if len(raw) > MAX_KEY_FILE_BYTES:
        raise malformed(f"over {MAX_KEY_FILE_BYTES} bytes")
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise malformed("not ASCII text") from None
    if not text:
        raise malformed("empty")
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise malformed("not base64") from None
    if len(key) != 32:
        raise malformed(f"decodes to {len(key)} bytes")
    return key
