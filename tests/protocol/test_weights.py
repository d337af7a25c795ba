"""The weights blob: its byte format pinned here, once, so every other test may use the helpers."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.protocol.errors import FedgeError, FieldError
from fedge.protocol.model_manifest import INITIAL_WEIGHTS_FILE
from fedge.protocol.weights import (
    WEIGHTS_DTYPE,
    WeightsError,
    weights_from_bytes,
    weights_nbytes,
    weights_to_bytes,
)


def test_a_blob_is_little_endian_float32_and_nothing_else() -> None:
    assert WEIGHTS_DTYPE.str == "<f4"
    blob = weights_to_bytes(np.array([1.0, -2.0, 0.5], np.float32))
    assert blob == bytes.fromhex("0000803f 000000c0 0000003f")
    assert weights_nbytes(3) == len(blob) == 12
    assert INITIAL_WEIGHTS_FILE == "initial_weights.f32"


def test_round_trip_is_exact_and_gives_a_writable_native_float32_copy() -> None:
    w = np.random.default_rng(0).normal(0, 1, 257).astype(np.float32)
    w[:3] = [-0.0, np.finfo(np.float32).max, np.float32(1e-45)]
    raw = weights_to_bytes(w)
    back = weights_from_bytes(raw, w.size)
    assert back.tobytes() == w.tobytes() and back.dtype == np.float32 and np.signbit(back[0])
    back[0] = 1.0  # a copy, not a view of the bytes
    assert weights_from_bytes(raw, w.size)[0] == 0.0


def test_a_big_endian_or_float64_vector_is_written_as_little_endian_float32() -> None:
    w = np.array([1.5, -3.0], ">f4")
    little = np.array([1.5, -3.0], "<f4").tobytes()
    assert weights_to_bytes(w) == weights_to_bytes(w.astype(np.float64)) == little


@pytest.mark.parametrize("size", [0, 11, 13, 16])
def test_a_blob_of_the_wrong_size_is_refused_naming_both_sizes(size: int) -> None:
    with pytest.raises(WeightsError) as exc:
        weights_from_bytes(b"\0" * size, 3)
    assert str(exc.value) == f"weights blob is {size} bytes; 3 float32 parameters need 12"
    assert (exc.value.field, exc.value.expected, exc.value.found) == ("weights_bytes", 12, size)
    assert isinstance(exc.value, FieldError) and isinstance(exc.value, FedgeError)


def test_only_a_flat_vector_is_a_blob() -> None:
    with pytest.raises(WeightsError) as exc:
        weights_to_bytes(np.zeros((2, 2), np.float32))
    assert str(exc.value) == "weights must be a flat vector, got shape (2, 2)"
    assert (exc.value.field, exc.value.found) == ("weights", (2, 2))
