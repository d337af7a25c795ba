"""Bounded decoding of secure-aggregation messages: JSON objects with base64 binary fields.

Every message of the protocol is a canonical JSON object (sorted keys, no whitespace), so the
later MQTT integration can put it in a sealed payload header or a signed document as it is.
Binary values (keys, signatures, ciphertexts, shares, the masked vector) are standard base64.

Each helper checks a size *before* it allocates: the whole message against a byte limit
derived from the round (before ``json.loads``), a list's length before walking it, a base64
string's length before decoding it. A wrong field is a :class:`SecAggError` that names it.
No pickle anywhere.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from fedge.protocol.bounded_json import BoundedJsonError, loads_bounded
from fedge.protocol.secagg.errors import SecAggReason, refusal
from fedge.protocol.signing import canonical_json
from fedge.protocol.topics import TopicError, check_id

#: JSON overhead allowed per id in a list or map key (quotes, comma, colon): generous.
ID_OVERHEAD = 8
#: Longest id the contract allows (:func:`fedge.protocol.topics.check_id`).
MAX_ID_CHARS = 64
#: A fixed allowance for a message's own small fields (type, round id, sender, counts).
ENVELOPE_BYTES = 512


def b64_len(size: int) -> int:
    """Length of the base64 text of ``size`` bytes (with padding)."""
    return 4 * ((size + 2) // 3)


def encode(document: Mapping[str, Any]) -> bytes:
    """Canonical JSON bytes of a message: what is signed, sealed or sent."""
    return canonical_json(document)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_object(data: bytes, max_bytes: int, kind: str, fields: set[str]) -> dict[str, Any]:
    """The JSON object in ``data``, refused before parsing when over ``max_bytes``.

    ``kind`` must match the object's ``"type"`` field and the keys must be exactly ``fields``
    (plus ``"type"``), so one message cannot be passed off as another.
    """
    try:
        document = loads_bounded(bytes(data), max_bytes=max_bytes, max_depth=4)
    except BoundedJsonError as exc:
        reason = SecAggReason.TOO_LARGE if exc.reason == "too_large" else SecAggReason.BAD_MESSAGE
        raise refusal(reason, f"{kind}: {exc.detail}", found=len(data)) from None
    return check_object(document, kind, fields)


def check_object(document: Any, kind: str, fields: set[str]) -> dict[str, Any]:
    """``document`` if it is a JSON object of type ``kind`` with exactly ``fields``."""
    expected = {*fields, "type"}
    if not isinstance(document, dict) or set(document) != expected:
        found = sorted(document) if isinstance(document, dict) else type(document).__name__
        raise refusal(
            SecAggReason.BAD_MESSAGE,
            f"{kind} must be an object with exactly {sorted(expected)}",
            field=kind,
            expected=sorted(expected),
            found=found,
        )
    if document["type"] != kind:
        raise refusal(
            SecAggReason.BAD_MESSAGE,
            f"expected a {kind!r} message",
            field="type",
            expected=kind,
            found=document["type"],
        )
    return document


def get_id(document: Mapping[str, Any], key: str, what: str = "device id") -> str:
    """A device or round id (:func:`~fedge.protocol.topics.check_id`)."""
    return check_device_id(document[key], key, what)


def check_device_id(value: Any, field: str, what: str = "device id") -> str:
    try:
        return check_id(value, what)
    except TopicError as exc:
        raise refusal(SecAggReason.BAD_MESSAGE, str(exc), field=field, found=str(value)[:80]) from None


def get_int(document: Mapping[str, Any], key: str, low: int, high: int) -> int:
    value = document[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise refusal(
            SecAggReason.BAD_MESSAGE,
            f"{key} must be an integer in {low}..{high}",
            field=key,
            expected=f"{low}..{high}",
            found=value,
        )
    return value


def get_float(document: Mapping[str, Any], key: str, low: float, high: float) -> float:
    value = document[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise refusal(
            SecAggReason.BAD_MESSAGE,
            f"{key} must be a number in [{low}, {high}]",
            field=key,
            expected=f"[{low}, {high}]",
            found=value,
        )
    return float(value)


def get_bytes(document: Mapping[str, Any], key: str, size: int) -> bytes:
    """Exactly ``size`` bytes from the base64 text at ``key`` (length checked before decoding)."""
    return decode_b64(document[key], key, size)


def decode_b64(value: Any, field: str, size: int) -> bytes:
    if not isinstance(value, str) or len(value) != b64_len(size):
        found = len(value) if isinstance(value, str) else type(value).__name__
        raise refusal(
            SecAggReason.BAD_MESSAGE,
            f"{field} must be the base64 of {size} bytes",
            field=field,
            expected=b64_len(size),
            found=found,
        )
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise refusal(SecAggReason.BAD_MESSAGE, f"{field} is not base64", field=field) from None
    if len(raw) != size:
        raise refusal(SecAggReason.BAD_MESSAGE, f"{field} must be {size} bytes", field=field, found=len(raw))
    return raw


def get_id_list(document: Mapping[str, Any], key: str, max_count: int) -> tuple[str, ...]:
    """Distinct ids, at most ``max_count`` (counted before any is checked)."""
    value = document[key]
    if not isinstance(value, list):
        raise refusal(SecAggReason.BAD_MESSAGE, f"{key} must be a list", field=key)
    if len(value) > max_count:
        raise refusal(
            SecAggReason.TOO_LARGE,
            f"{key} lists too many ids",
            field=key,
            expected=max_count,
            found=len(value),
        )
    ids = tuple(check_device_id(item, key) for item in value)
    if len(set(ids)) != len(ids):
        raise refusal(SecAggReason.BAD_MESSAGE, f"{key} repeats an id", field=key)
    return ids


def get_bytes_map(document: Mapping[str, Any], key: str, size: int, max_count: int) -> dict[str, bytes]:
    """``{device id: exactly size bytes}``, at most ``max_count`` entries (counted first)."""
    value = document[key]
    if not isinstance(value, dict):
        raise refusal(SecAggReason.BAD_MESSAGE, f"{key} must be an object", field=key)
    if len(value) > max_count:
        raise refusal(
            SecAggReason.TOO_LARGE,
            f"{key} holds too many entries",
            field=key,
            expected=max_count,
            found=len(value),
        )
    return {check_device_id(k, key): decode_b64(v, f"{key}[{k}]", size) for k, v in value.items()}


def vector_width(bits: int) -> int:
    """Bytes per coordinate on the wire: the fewest that hold ``bits`` bits."""
    return (bits + 7) // 8


def pack_vector(vector: npt.NDArray[np.uint64], bits: int) -> bytes:
    """Little-endian, :func:`vector_width` bytes per coordinate."""
    width = vector_width(bits)
    raw = np.ascontiguousarray(vector, dtype="<u8").view(np.uint8).reshape(-1, 8)
    return raw[:, :width].tobytes()


def unpack_vector(data: bytes, length: int, bits: int, field: str = "vector") -> npt.NDArray[np.uint64]:
    """The inverse of :func:`pack_vector`; refuses a wrong length or a value ``>= 2**bits``."""
    width = vector_width(bits)
    if len(data) != length * width:
        raise refusal(
            SecAggReason.BAD_VECTOR,
            f"{field} must be {length} coordinates of {width} bytes",
            field=field,
            expected=length * width,
            found=len(data),
        )
    padded = np.zeros((length, 8), dtype=np.uint8)
    padded[:, :width] = np.frombuffer(data, dtype=np.uint8).reshape(length, width)
    vector = padded.view("<u8").reshape(length).astype(np.uint64)
    if bits < 64 and bool(np.any(vector >> np.uint64(bits))):
        raise refusal(SecAggReason.BAD_VECTOR, f"{field} holds a value >= 2**{bits}", field=field)
    return vector
