"""Versioned binary frames: a fixed header, a small JSON header, and a binary body.

Layout (all integers big-endian)::

    offset  size  field
    0       4     magic  b"FEDG"
    4       1     frame format version (1)
    5       1     kind   (see FrameKind)
    6       2     reserved, must be 0
    8       4     header length H   (<= MAX_HEADER_BYTES)
    12      4     body length B     (<= the caller's limit)
    16      H     header: UTF-8 JSON object
    16+H    B     body: opaque bytes (tensors, ciphertext, ...)

Every length is checked against its limit and against the bytes actually received *before*
anything is sliced, decoded or allocated, so a frame that declares a 4 GiB body costs nothing.
Never pickle: headers are JSON, bodies are documented byte layouts.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from fedge.protocol.bounded_json import BoundedJsonError, loads_bounded
from fedge.protocol.errors import ReasonFieldError
from fedge.protocol.reasons import RejectReason

MAGIC = b"FEDG"
FRAME_VERSION = 1
_PREFIX = struct.Struct(">4sBBHII")
PREFIX_BYTES = _PREFIX.size  # 16
#: The prefix's layout, for readers that check a frame's prefix on their own fast path.
PREFIX_LAYOUT = _PREFIX
MAX_HEADER_BYTES = 16 * 1024
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024


class FrameKind(IntEnum):
    SEALED = 1  # device -> aggregator, body is a NaCl box (see protocol.sealing)
    PAYLOAD = 2  # the plaintext inside a sealed frame
    SIGNED = 3  # aggregator -> devices, body is an Ed25519 signature + document


class FrameError(ReasonFieldError[RejectReason]):
    """A frame is malformed, over a limit, or of an unexpected kind or version.

    ``reason`` is one of :data:`fedge.protocol.reasons.FRAME_REASONS`; a sealed message or a
    signed document passes it on with a prefix saying which of its frames was bad.
    """


@dataclass(frozen=True)
class Frame:
    kind: FrameKind
    header: dict[str, Any]
    body: bytes


def encode_frame(kind: FrameKind, header: dict[str, Any], body: bytes = b"") -> bytes:
    """Serialises a frame; the header is canonical JSON (sorted keys, no spaces)."""
    try:
        raw_header = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    except ValueError as exc:
        raise FrameError(
            RejectReason.BAD_HEADER, f"header cannot be encoded: {exc}", field="header"
        ) from None
    if len(raw_header) > MAX_HEADER_BYTES:
        raise FrameError(
            RejectReason.HEADER_TOO_LARGE,
            f"{len(raw_header)} bytes > {MAX_HEADER_BYTES}",
            field="header length",
            expected=f"<= {MAX_HEADER_BYTES}",
            found=len(raw_header),
        )
    return _PREFIX.pack(MAGIC, FRAME_VERSION, int(kind), 0, len(raw_header), len(body)) + raw_header + body


def decode_frame(data: bytes, expected_kind: FrameKind, max_body: int = DEFAULT_MAX_BODY_BYTES) -> Frame:
    """Parses and checks a frame; every failure is a :class:`FrameError` with a short reason."""
    if len(data) < PREFIX_BYTES:
        raise FrameError(
            RejectReason.TRUNCATED,
            f"{len(data)} bytes is shorter than the {PREFIX_BYTES}-byte prefix",
            field="frame length",
            expected=f">= {PREFIX_BYTES}",
            found=len(data),
        )
    magic, version, kind, reserved, header_len, body_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise FrameError(
            RejectReason.BAD_MAGIC,
            f"not a fedge frame (magic {magic!r})",
            field="magic",
            expected=MAGIC,
            found=magic,
        )
    if version != FRAME_VERSION:
        raise FrameError(
            RejectReason.UNSUPPORTED_VERSION,
            f"frame version {version}, this fedge reads {FRAME_VERSION}",
            field="version",
            expected=FRAME_VERSION,
            found=version,
        )
    if kind != expected_kind:
        raise FrameError(
            RejectReason.WRONG_KIND,
            f"frame kind {kind}, expected {int(expected_kind)}",
            field="kind",
            expected=int(expected_kind),
            found=kind,
        )
    if reserved != 0:
        raise FrameError(
            RejectReason.BAD_RESERVED,
            "reserved bytes must be zero",
            field="reserved",
            expected=0,
            found=reserved,
        )
    if header_len > MAX_HEADER_BYTES:
        raise FrameError(
            RejectReason.HEADER_TOO_LARGE,
            f"declares a {header_len}-byte header > {MAX_HEADER_BYTES}",
            field="header length",
            expected=f"<= {MAX_HEADER_BYTES}",
            found=header_len,
        )
    if body_len > max_body:
        raise FrameError(
            RejectReason.BODY_TOO_LARGE,
            f"declares a {body_len}-byte body > {max_body}",
            field="body length",
            expected=f"<= {max_body}",
            found=body_len,
        )
    if PREFIX_BYTES + header_len + body_len != len(data):
        raise FrameError(
            RejectReason.LENGTH_MISMATCH,
            f"declares {PREFIX_BYTES + header_len + body_len} bytes, got {len(data)}",
            field="frame length",
            expected=PREFIX_BYTES + header_len + body_len,
            found=len(data),
        )
    raw_header = data[PREFIX_BYTES : PREFIX_BYTES + header_len]
    try:
        # Strict UTF-8 (json.loads on bytes would also guess UTF-16/32), bounded nesting, and
        # no NaN/Infinity, which encode_frame never writes.
        header = loads_bounded(raw_header, max_bytes=MAX_HEADER_BYTES)
    except BoundedJsonError:
        raise FrameError(RejectReason.BAD_HEADER, "header is not UTF-8 JSON", field="header") from None
    if not isinstance(header, dict):
        raise FrameError(RejectReason.BAD_HEADER, "header must be a JSON object", field="header")
    return Frame(FrameKind(kind), header, bytes(data[PREFIX_BYTES + header_len :]))
