"""The int8 decoder's one-pass dequantisation gives the per-tensor loop's floats to the bit
(issue 18: the loop was most of an int8 update's handling)."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.protocol.codec import Codec, CodecError, decode_tensors, encode_tensors
from fedge.protocol.model_manifest import TensorLayout
from support.engine_helpers import LAYOUT, P


def _loop(
    codes: np.ndarray, params: np.ndarray, layout: list[TensorLayout] | tuple[TensorLayout, ...]
) -> np.ndarray:
    """The decoder as it was: one tensor at a time."""
    out = np.empty(codes.shape[0], np.float32)
    for (lo, scale), t in zip(params, layout, strict=True):
        seg = codes[t.offset : t.offset + t.size].astype(np.float64)
        with np.errstate(over="ignore"):
            out[t.offset : t.offset + t.size] = (float(lo) + seg * float(scale)).astype(np.float32)
    return out


def _body(params: np.ndarray, codes: np.ndarray) -> bytes:
    return params.astype("<f4").tobytes() + codes.astype(np.uint8).tobytes()


@pytest.mark.parametrize("seed", range(5))
def test_random_codes_and_parameters_decode_to_the_loop_s_floats(seed: int) -> None:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, P, dtype=np.uint8)
    lo = rng.normal(0.0, 10.0 ** rng.integers(-30, 30, len(LAYOUT)), len(LAYOUT))
    scale = np.abs(rng.normal(0.0, 10.0 ** rng.integers(-30, 30, len(LAYOUT)), len(LAYOUT))) + 1e-38
    params = np.stack([lo, scale], axis=1).astype(np.float32)
    out = decode_tensors(_body(params, codes), LAYOUT, Codec.INT8)
    assert out.dtype == np.float32 and out.tobytes() == _loop(codes, params, LAYOUT).tobytes()


def test_an_encoded_update_decodes_as_before() -> None:
    delta = np.random.default_rng(9).normal(0.0, 0.05, P).astype(np.float32)
    body = encode_tensors(delta, LAYOUT, Codec.INT8)
    n = 8 * len(LAYOUT)
    params = np.frombuffer(body[:n], "<f4").reshape(len(LAYOUT), 2)
    expected = _loop(np.frombuffer(body[n:], np.uint8), params, LAYOUT)
    assert decode_tensors(body, LAYOUT, Codec.INT8).tobytes() == expected.tobytes()


def test_a_value_that_overflows_float32_is_still_refused() -> None:
    params = np.tile(np.array([[3e38, 1e37]], np.float32), (len(LAYOUT), 1))
    codes = np.full(P, 255, np.uint8)
    with pytest.raises(CodecError, match="tensor values must be finite"):
        decode_tensors(_body(params, codes), LAYOUT, Codec.INT8)
