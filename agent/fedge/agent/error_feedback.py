"""Error feedback for sparse updates: what a device owes the fleet of the values it did not send.

With a top-k codec (``topk-fp16``, ``topk-int8``: :mod:`fedge.protocol.codec`) an update carries
only each tensor's largest values. Dropping the rest for good biases training; error feedback
(Stich et al. 2018, "Sparsified SGD with memory"; Karimireddy et al. 2019, "Error feedback
fixes SignSGD") keeps them: the device adds its residual to the next delta before choosing the
top k, and keeps as the new residual what that sum held and the update did not carry,

    owed     = delta + residual
    sent     = decode(encode(owed))        (what the aggregator will see, quantisation included)
    residual = owed - sent

so over any number of rounds the sum of what was sent plus the residual is the sum of the
deltas. The core (:class:`fedge.agent.core.DeviceCore`) does the arithmetic; this module holds
the residual's type and its file.

The residual belongs to one model: it is kept with the model's SHA-256 and generation, and a
residual for another model (or another parameter count) is dropped with a log line, not added.
It persists across restarts in ``<state_dir>/residual.bin``, replaced atomically, bounded in
size; a file that cannot be read back is logged and ignored (the residual starts again from
zero: some owed mass is lost, nothing the protocol depends on).

Never with differential privacy or secure aggregation: the aggregator refuses a sparse codec
with either (the residual would carry update mass past the DP clip bound, and the masked sum
needs dense vectors), and a device refuses a manifest that combines them.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedge.protocol.errors import FedgeError
from fedge.shell.files import OversizedFile, read_bounded, replace_or_remove

log = logging.getLogger("fedge.agent")

RESIDUAL_FILE = "residual.bin"
MAGIC = b"FEDGERES"
FORMAT = 1
#: A residual has one float32 per parameter; a model blob is at most 64 MiB
#: (``fedge.agent.core.MAX_BLOB_BYTES``), so no model has more parameters than this.
MAX_PARAMETERS = 16 * 1024 * 1024
MAX_HEADER_BYTES = 1024
_PREFIX = struct.Struct("<8sII")  # magic, format, header length


class ResidualError(FedgeError):
    """The residual file cannot be written, or is not a residual this agent wrote."""


@dataclass(frozen=True)
class Residual:
    """The owed values (float32, one per parameter) of the model ``model_sha256`` at
    ``generation``. Compared by model and generation only (``values`` is an array)."""

    model_sha256: str
    generation: int
    values: np.ndarray = field(compare=False)

    def fits(self, model_sha256: str, generation: int, parameter_count: int) -> bool:
        return (
            self.model_sha256 == model_sha256
            and self.generation == generation
            and self.values.shape == (parameter_count,)
        )


def to_bytes(residual: Residual) -> bytes:
    header = json.dumps(
        {
            "model_sha256": residual.model_sha256,
            "generation": residual.generation,
            "count": int(residual.values.shape[0]),
        },
        sort_keys=True,
    ).encode()
    body = residual.values.astype("<f4").tobytes()
    return _PREFIX.pack(MAGIC, FORMAT, len(header)) + header + body


def from_bytes(raw: bytes) -> Residual:
    """Parses a residual file; every size is checked before the values are read."""
    if len(raw) < _PREFIX.size:
        raise ResidualError("shorter than its prefix")
    magic, fmt, header_len = _PREFIX.unpack_from(raw)
    if magic != MAGIC or fmt != FORMAT:
        raise ResidualError(f"not a format-{FORMAT} residual file")
    if header_len > MAX_HEADER_BYTES or _PREFIX.size + header_len > len(raw):
        raise ResidualError(f"header of {header_len} bytes")
    try:
        header = json.loads(raw[_PREFIX.size : _PREFIX.size + header_len])
    except (ValueError, UnicodeDecodeError) as exc:
        raise ResidualError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict) or set(header) != {"model_sha256", "generation", "count"}:
        raise ResidualError("header must have model_sha256, generation, count")
    sha, generation, count = header["model_sha256"], header["generation"], header["count"]
    if not isinstance(sha, str) or len(sha) != 64:
        raise ResidualError("model_sha256 must be 64 hex digits")
    for name, value in (("generation", generation), ("count", count)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PARAMETERS:
            raise ResidualError(f"{name} must be an integer in 1..{MAX_PARAMETERS}")
    body = raw[_PREFIX.size + header_len :]
    if len(body) != 4 * count:
        raise ResidualError(f"{len(body)} bytes of values for {count} parameters")
    values = np.frombuffer(body, "<f4").astype(np.float32)
    if not np.all(np.isfinite(values)):
        raise ResidualError("values must be finite")
    return Residual(sha, generation, values)


class ResidualStore:
    """``<state_dir>/residual.bin``: the residual, replaced atomically, or no file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> Residual | None:
        """The stored residual; None (logged) when there is none or it cannot be read back."""
        try:
            raw = read_bounded(self.path, _PREFIX.size + MAX_HEADER_BYTES + 4 * MAX_PARAMETERS)
            return None if raw is None else from_bytes(raw)
        except OSError as exc:
            log.warning(
                "error-feedback residual %s not read (%s): starting from zero", self.path, exc.strerror
            )
        except (OversizedFile, ResidualError) as exc:
            log.warning("error-feedback residual %s ignored (%s): starting from zero", self.path, exc)
        return None

    def save(self, residual: Residual | None) -> None:
        """Writes ``residual`` atomically (mode 0600), or removes the file for None.

        When the new residual cannot be written, the old file is removed if it can be: it holds
        values this round's update already carried, and loaded after a restart it would send
        them a second time (starting from zero loses owed mass; a stale residual adds mass)."""
        try:
            replace_or_remove(self.path, None if residual is None else to_bytes(residual))
        except OSError as exc:
            raise ResidualError(f"cannot write error-feedback residual {self.path}: {exc.strerror}") from None
