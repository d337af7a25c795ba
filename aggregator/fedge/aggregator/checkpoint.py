"""The aggregator's checkpoint: everything it needs to resume after a crash or a pod restart.

Written after every round, so it must never be left half-written. One file::

    b"FEDGECK1" | u32 little-endian JSON length | JSON (UTF-8) | weights blob (fedge.protocol.weights)

The JSON carries the SHA-256 of the weights, checked on load. Saving writes a temporary file in
the same directory, fsyncs it, moves the current checkpoint to ``path.with_suffix('.prev')``,
renames the new one into place and fsyncs the directory: at any instant a reader finds the
old checkpoint, the new one, or (between the two renames) only ``.prev``. Loading falls back
to ``.prev`` when the latest file is missing or corrupt, and says so.

Counters and device sets are the caller's to keep consistent (e.g. that versions only grow);
this module stores and returns them exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
from collections.abc import Mapping, Set
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from fedge.protocol.errors import FedgeError, ManifestError
from fedge.protocol.model_manifest import Normalisation
from fedge.protocol.weights import weights_from_bytes, weights_nbytes, weights_to_bytes
from fedge.shell.files import atomic_write
from fedge.shell.storage_faults import StorageFault, storage_fault

__all__ = [
    "HEADER_BYTES",
    "MAGIC",
    "Checkpoint",
    "CheckpointError",
    "CheckpointStorageFault",
    "load_checkpoint",
    "previous_path",
    "save_checkpoint",
]

MAGIC = b"FEDGECK1"
_HEADER = struct.Struct("<8sI")
HEADER_BYTES = _HEADER.size
_SHA256_RE = re.compile(r"[0-9a-f]{64}")  # used with fullmatch
_MAX_COUNTER = 2**63 - 1  # fits every consumer's int64
_JSON_KEYS = frozenset(
    {
        "model_version",
        "round_number",
        "round_id",
        "parent_hash",
        "parameter_count",
        "weights_sha256",
        "device_counters",
        "round_devices",
        "normalisation",
        "metadata",
    }
)

log = logging.getLogger(__name__)


class CheckpointError(FedgeError):
    """A checkpoint cannot be written, or is corrupt, truncated, oversized or malformed."""


class CheckpointStorageFault(CheckpointError, StorageFault):
    """The state directory is full or read-only: the checkpoint on disk is the previous one."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """The aggregator's state between rounds, validated and copied on construction.

    ``round_devices`` are the devices already counted in the current round, so an update
    replayed after a restart is not counted twice. ``metadata`` must be plain JSON; it is
    stored as a copy (nested containers are not frozen). Two checkpoints are equal when every
    field is, the weights bit for bit.
    """

    weights: npt.NDArray[np.float32]
    model_version: int
    round_number: int
    round_id: str
    parent_hash: str | None
    device_counters: Mapping[str, int] = field(default_factory=dict)
    round_devices: Set[str] = frozenset()
    normalisation: Normalisation | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    recovered_from_previous: bool = False

    def __post_init__(self) -> None:
        w = self.weights
        if not isinstance(w, np.ndarray) or w.ndim != 1 or w.size == 0 or w.dtype != np.float32:
            raise CheckpointError("checkpoint: weights must be a non-empty 1-D float32 array")
        if not np.all(np.isfinite(w)):
            raise CheckpointError("checkpoint: weights contain NaN or infinity")
        frozen = w.copy()
        frozen.flags.writeable = False
        object.__setattr__(self, "weights", frozen)
        for name in ("model_version", "round_number"):
            value = getattr(self, name)
            if not _is_int(value) or not 0 <= value <= _MAX_COUNTER:
                raise CheckpointError(f"checkpoint: {name} must be an integer >= 0, got {value!r}")
        if not isinstance(self.round_id, str) or not self.round_id:
            raise CheckpointError(f"checkpoint: round_id must be a non-empty string, got {self.round_id!r}")
        if self.parent_hash is not None and (
            not isinstance(self.parent_hash, str) or not _SHA256_RE.fullmatch(self.parent_hash)
        ):
            raise CheckpointError("checkpoint: parent_hash must be None or 64 lowercase hex digits")
        if not isinstance(self.device_counters, Mapping):
            raise CheckpointError("checkpoint: device_counters must be a mapping")
        counters = dict(self.device_counters)
        for device, counter in counters.items():
            if not isinstance(device, str) or not device:
                raise CheckpointError(f"checkpoint: device ids must be non-empty strings, got {device!r}")
            if not _is_int(counter) or not 0 <= counter <= _MAX_COUNTER:
                raise CheckpointError(
                    f"checkpoint: counter of device {device!r} must be an integer in 0..2**63-1, "
                    f"got {counter!r}"
                )
        object.__setattr__(self, "device_counters", MappingProxyType(counters))
        # A str is a collection of strings too; only real sets are accepted.
        if not isinstance(self.round_devices, Set):
            raise CheckpointError("checkpoint: round_devices must be a set of device ids")
        for device in self.round_devices:
            if not isinstance(device, str) or not device:
                raise CheckpointError(f"checkpoint: device ids must be non-empty strings, got {device!r}")
        object.__setattr__(self, "round_devices", frozenset(self.round_devices))
        if self.normalisation is not None and not isinstance(self.normalisation, Normalisation):
            raise CheckpointError("checkpoint: normalisation must be a Normalisation or None")
        object.__setattr__(self, "metadata", MappingProxyType(_plain_json(self.metadata)))
        if not isinstance(self.recovered_from_previous, bool):
            raise CheckpointError("checkpoint: recovered_from_previous must be a bool")

    @property
    def weights_sha256(self) -> str:
        return hashlib.sha256(weights_to_bytes(self.weights)).hexdigest()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Checkpoint):
            return NotImplemented
        return weights_to_bytes(self.weights) == weights_to_bytes(other.weights) and all(
            getattr(self, name) == getattr(other, name)
            for name in (
                "model_version",
                "round_number",
                "round_id",
                "parent_hash",
                "device_counters",
                "round_devices",
                "normalisation",
                "metadata",
                "recovered_from_previous",
            )
        )


def _plain_json(metadata: Any) -> dict[str, Any]:
    """A copy of ``metadata`` that survives a JSON round trip unchanged, or an error.

    Checked by round-tripping, so that what ``load_checkpoint`` returns is exactly what was
    saved: int keys (which JSON turns into strings), tuples and NaN are refused up front.
    """
    if not isinstance(metadata, Mapping):
        raise CheckpointError("checkpoint: metadata must be a mapping")
    original = dict(metadata)
    try:
        copy = json.loads(json.dumps(original, allow_nan=False))
    except (TypeError, ValueError, RecursionError):
        copy = None
    if copy != original or not isinstance(copy, dict):
        raise CheckpointError("checkpoint: metadata must be plain JSON (string keys, lists, finite numbers)")
    return copy


def previous_path(path: Path | str) -> Path:
    """Where the checkpoint before ``path`` is kept: ``path.with_suffix('.prev')``."""
    p = Path(path)
    if p.suffix == ".prev" or not p.name:
        raise CheckpointError(f"checkpoint path {p} cannot have a '.prev' suffix or an empty name")
    return p.with_suffix(".prev")


# --- writing -------------------------------------------------------------------------------


def _encode(checkpoint: Checkpoint) -> list[bytes]:
    weights = weights_to_bytes(checkpoint.weights)
    doc = {
        "model_version": checkpoint.model_version,
        "round_number": checkpoint.round_number,
        "round_id": checkpoint.round_id,
        "parent_hash": checkpoint.parent_hash,
        "parameter_count": checkpoint.weights.size,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "device_counters": dict(checkpoint.device_counters),
        "round_devices": sorted(checkpoint.round_devices),
        "normalisation": None if checkpoint.normalisation is None else checkpoint.normalisation.to_dict(),
        "metadata": dict(checkpoint.metadata),
    }
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(text) > 0xFFFFFFFF:
        raise CheckpointError(f"checkpoint JSON is {len(text)} bytes, over the format's 4 GiB limit")
    return [_HEADER.pack(MAGIC, len(text)), text, weights]


def save_checkpoint(path: Path | str, checkpoint: Checkpoint) -> None:
    """Atomically replaces the checkpoint at ``path``, keeping the old one as ``.prev``
    (:func:`fedge.shell.files.atomic_write`, mode 0600).

    Returns only once the new checkpoint and the directory entry are on disk (fsync). A full or
    read-only file system is a :class:`CheckpointStorageFault` ("cannot write checkpoint PATH:
    No space left on device"), and the checkpoint on disk is then still the previous one: the
    new content goes to a temp file first, which is removed when it cannot be written whole.
    """
    path = Path(path)
    prev = previous_path(path)
    try:
        atomic_write(path, _encode(checkpoint), keep_previous=prev)
    except OSError as exc:
        found = storage_fault(exc)
        if found is not None:
            raise CheckpointStorageFault("checkpoint", path, *found) from None
        raise CheckpointError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from None


# --- reading -------------------------------------------------------------------------------


def _read_exactly(f: BinaryIO, n: int, path: Path) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise CheckpointError(f"{path}: file changed while it was being read")
    return data


def _read(path: Path, max_bytes: int) -> Checkpoint:
    """One checkpoint file; ``OSError`` (e.g. missing) propagates, content errors do not."""
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        # Every length is checked against the file size and the limit before it is read.
        if size > max_bytes:
            raise CheckpointError(f"{path}: {size} bytes is over the limit of {max_bytes} bytes")
        if size < HEADER_BYTES:
            raise CheckpointError(f"{path}: truncated: {size} bytes, shorter than the header")
        magic, json_len = _HEADER.unpack(_read_exactly(f, HEADER_BYTES, path))
        if magic != MAGIC:
            raise CheckpointError(f"{path}: not a fedge checkpoint (magic {magic!r})")
        if json_len > size - HEADER_BYTES:
            raise CheckpointError(
                f"{path}: header declares {json_len} bytes of JSON but only "
                f"{size - HEADER_BYTES} bytes follow (truncated or corrupt)"
            )
        doc = _parse_json(_read_exactly(f, json_len, path), path)
        weights_len = size - HEADER_BYTES - json_len
        expected_len = weights_nbytes(doc["parameter_count"])
        if weights_len != expected_len:
            raise CheckpointError(
                f"{path}: {weights_len} bytes of weights, expected {expected_len} "
                f"for {doc['parameter_count']} float32 parameters (truncated or corrupt)"
            )
        raw = _read_exactly(f, weights_len, path)
        if f.read(1):
            raise CheckpointError(f"{path}: file changed while it was being read")
    digest = hashlib.sha256(raw).hexdigest()
    if digest != doc["weights_sha256"]:
        raise CheckpointError(
            f"{path}: weights SHA-256 {digest} does not match the recorded {doc['weights_sha256']}"
        )
    try:
        return Checkpoint(
            weights=weights_from_bytes(raw, doc["parameter_count"]),
            model_version=doc["model_version"],
            round_number=doc["round_number"],
            round_id=doc["round_id"],
            parent_hash=doc["parent_hash"],
            device_counters=doc["device_counters"],
            round_devices=frozenset(doc["round_devices"]),
            normalisation=doc["normalisation"],
            metadata=doc["metadata"],
        )
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def _parse_json(raw: bytes, path: Path) -> dict[str, Any]:
    """The header JSON with the types the :class:`Checkpoint` constructor cannot check."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise CheckpointError(f"{path}: header is not valid JSON: {reason}") from None
    if not isinstance(doc, dict) or set(doc) != _JSON_KEYS:
        keys = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise CheckpointError(f"{path}: header must be an object with keys {sorted(_JSON_KEYS)}, got {keys}")
    count = doc["parameter_count"]
    if not _is_int(count) or count < 1:
        raise CheckpointError(f"{path}: parameter_count must be an integer >= 1, got {count!r}")
    if not isinstance(doc["weights_sha256"], str) or not _SHA256_RE.fullmatch(doc["weights_sha256"]):
        raise CheckpointError(f"{path}: weights_sha256 must be 64 lowercase hex digits")
    if not isinstance(doc["device_counters"], dict):
        raise CheckpointError(f"{path}: device_counters must be an object")
    devices = doc["round_devices"]
    if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
        raise CheckpointError(f"{path}: round_devices must be a list of strings")
    if len(set(devices)) != len(devices):
        raise CheckpointError(f"{path}: round_devices lists a device twice")
    if doc["normalisation"] is not None:
        try:
            doc["normalisation"] = Normalisation.from_dict(doc["normalisation"])
        except ManifestError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
    if not isinstance(doc["metadata"], dict):
        raise CheckpointError(f"{path}: metadata must be an object")
    return doc


def load_checkpoint(path: Path | str, max_bytes: int) -> Checkpoint | None:
    """The latest checkpoint, the previous one if the latest is missing or corrupt, or None.

    None means a fresh start: neither file exists. A corrupt latest with a good ``.prev``
    returns the previous checkpoint with ``recovered_from_previous=True`` and a logged warning
    (the last round is redone). Both unusable is a :class:`CheckpointError`, as is a file that
    exists but cannot be read (permissions, I/O): that is not corruption and should be fixed,
    not silently skipped.
    """
    if not _is_int(max_bytes) or max_bytes < HEADER_BYTES:
        raise CheckpointError(f"max_bytes must be an integer >= {HEADER_BYTES}, got {max_bytes!r}")
    path = Path(path)
    prev = previous_path(path)
    try:
        return _read(path, max_bytes)
    except FileNotFoundError:
        latest_problem = None
    except CheckpointError as exc:
        latest_problem = str(exc)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    try:
        checkpoint = _read(prev, max_bytes)
    except FileNotFoundError:
        if latest_problem is None:
            return None
        raise CheckpointError(f"{latest_problem}; no previous checkpoint to fall back on") from None
    except CheckpointError as exc:
        raise CheckpointError(
            f"{latest_problem or f'{path} is missing'}; the previous checkpoint is unusable too: {exc}"
        ) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {prev}: {exc.strerror or exc}") from None
    log.warning(
        "checkpoint %s: %s; recovered the previous checkpoint (model version %d, round %d)",
        path,
        latest_problem or "missing",
        checkpoint.model_version,
        checkpoint.round_number,
    )
    return replace(checkpoint, recovered_from_previous=True)
