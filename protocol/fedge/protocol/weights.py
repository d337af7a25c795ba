"""The weights blob: a model's weights as bytes, the one format every side reads and writes.

A blob is the flat weight vector in the model manifest's tensor layout
(:attr:`fedge.protocol.model_manifest.ModelManifest.layout`) as little-endian float32
(:data:`WEIGHTS_DTYPE`) and nothing else: ``4 * parameter_count`` bytes, no header. It is what
a round manifest's ``weights_sha256``/``weights_bytes`` name and devices fetch, what a model
directory keeps as its initial weights and what a checkpoint ends with; the hashes
in manifests and checkpoints are of these exact bytes, so every writer must produce them the
same way and every reader must check the size it was promised before trusting them.

An update's delta is a different thing (:mod:`fedge.protocol.codec`), though its fp32 encoding
uses the same dtype. A model directory keeps its initial blob in
:data:`fedge.protocol.model_manifest.INITIAL_WEIGHTS_FILE`.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fedge.protocol.errors import FieldError

#: Little-endian float32: the dtype of a weights blob (and of an fp32-encoded delta).
WEIGHTS_DTYPE: Final = np.dtype("<f4")


class WeightsError(FieldError):
    """A weights blob (or the vector to write as one) does not have the promised shape."""


def weights_nbytes(parameter_count: int) -> int:
    """The size of the blob of a model with ``parameter_count`` weights."""
    return WEIGHTS_DTYPE.itemsize * parameter_count


def weights_to_bytes(weights: npt.NDArray[Any]) -> bytes:
    """The blob of a flat weight vector (cast to float32 if it is not)."""
    if weights.ndim != 1:
        raise WeightsError(
            f"weights must be a flat vector, got shape {weights.shape}",
            field="weights",
            expected="a 1-D vector",
            found=weights.shape,
        )
    return weights.astype(WEIGHTS_DTYPE, copy=False).tobytes()


def weights_from_bytes(raw: bytes, parameter_count: int) -> npt.NDArray[np.float32]:
    """The weight vector in ``raw``, a writable native float32 copy.

    The size is checked against ``parameter_count`` before anything is allocated, so a
    truncated or padded blob is an error here rather than a misaligned model later.
    """
    expected = weights_nbytes(parameter_count)
    if len(raw) != expected:
        raise WeightsError(
            f"weights blob is {len(raw)} bytes; {parameter_count} float32 parameters need {expected}",
            field="weights_bytes",
            expected=expected,
            found=len(raw),
        )
    return np.frombuffer(raw, WEIGHTS_DTYPE).astype(np.float32)
