"""Tensor codecs for model updates: fp32, fp16 and int8 (per-tensor affine quantisation).

An update is the flat delta ``local_weights - global_weights`` in the manifest's tensor layout.
Byte layouts (little-endian throughout):

- ``fp32``: P float32 values.
- ``fp16``: P float16 values (encoding refuses values outside float16's finite range).
- ``int8``: for each tensor in layout order, ``lo`` and ``scale`` as float32 (8 bytes per tensor),
  then P uint8 codes; a value decodes as ``lo + code * scale``. With ``scale = (max - min) / 255``
  the rounding error per value is at most ``scale / 2`` plus half a float32 step of the value
  (the decoded value is itself a float32).

The decoder knows the exact size from the layout and checks it before touching the bytes.
float32 here is the weights blob's dtype (:data:`fedge.protocol.weights.WEIGHTS_DTYPE`): an fp32
delta has exactly the bytes a weights blob of the same values would have.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedge.protocol.codec_names import Codec
from fedge.protocol.errors import FieldError
from fedge.protocol.model_manifest import TensorLayout
from fedge.protocol.weights import WEIGHTS_DTYPE

__all__ = ["Codec", "CodecError", "decode_tensors", "encode_tensors", "encoded_size", "parse_codec"]

_FP16_MAX = float(np.finfo(np.float16).max)


class CodecError(FieldError):
    """Tensor bytes do not match the layout or hold non-finite values."""


def parse_codec(name: str) -> Codec:
    try:
        return Codec(name)
    except ValueError:
        known = tuple(Codec)
        raise CodecError(
            f"unknown codec {name!r}; known: {', '.join(known)}", field="codec", expected=known, found=name
        ) from None


def encoded_size(layout: Sequence[TensorLayout], codec: Codec) -> int:
    count = sum(t.size for t in layout)
    if codec is Codec.FP32:
        return WEIGHTS_DTYPE.itemsize * count
    if codec is Codec.FP16:
        return 2 * count
    return 8 * len(layout) + count


def _check_flat(flat: np.ndarray, layout: Sequence[TensorLayout]) -> None:
    count = sum(t.size for t in layout)
    if flat.dtype != np.float32 or flat.shape != (count,):
        raise CodecError(
            f"expected float32 of shape ({count},), got {flat.dtype} {flat.shape}",
            field="delta",
            expected=f"float32 ({count},)",
            found=f"{flat.dtype} {flat.shape}",
        )
    if not np.all(np.isfinite(flat)):
        raise CodecError("tensor values must be finite", field="delta", expected="finite values")


def _int8_params(lo: float, hi: float) -> tuple[float, float]:
    """float32 ``lo`` and ``scale`` the decoder can use: scale > 0 and ``lo + 255*scale`` finite.

    A range below float32's smallest step would round the scale to 0, and a range near
    float32's limit could overflow at the top code; both are nudged to the nearest safe value.
    """
    lo32 = np.float32(lo)
    scale32 = np.float32((hi - lo) / 255.0) if hi > lo else np.float32(1.0)
    scale32 = max(scale32, np.finfo(np.float32).smallest_subnormal)
    # The decoder computes lo + code * scale in float64 and rounds to float32 once.
    with np.errstate(over="ignore"):
        while not np.isfinite(np.float32(float(lo32) + 255.0 * float(scale32))):
            scale32 = np.nextafter(scale32, np.float32(0.0))
    return float(lo32), float(scale32)


def encode_tensors(flat: np.ndarray, layout: Sequence[TensorLayout], codec: Codec) -> bytes:
    _check_flat(flat, layout)
    if codec is Codec.FP32:
        return flat.astype(WEIGHTS_DTYPE).tobytes()
    if codec is Codec.FP16:
        largest = float(np.max(np.abs(flat), initial=0.0))
        if largest > _FP16_MAX:
            raise CodecError(
                "a value exceeds float16's range; use fp32",
                field="delta",
                expected=f"|value| <= {_FP16_MAX}",
                found=largest,
            )
        return flat.astype("<f2").tobytes()
    params = np.empty((len(layout), 2), WEIGHTS_DTYPE)
    codes = np.empty(flat.shape[0], np.uint8)
    for i, t in enumerate(layout):
        part = flat[t.offset : t.offset + t.size].astype(np.float64)
        lo, hi = float(part.min()), float(part.max())
        lo32, scale32 = _int8_params(lo, hi)
        params[i] = (lo32, scale32)
        # Round with the float32 parameters the decoder will use, so decode(encode(x)) is exact
        # to within half a step (plus float32 rounding of the result).
        codes[t.offset : t.offset + t.size] = np.clip(np.rint((part - lo32) / scale32), 0, 255)
    return params.tobytes() + codes.tobytes()


def decode_tensors(body: bytes, layout: Sequence[TensorLayout], codec: Codec) -> np.ndarray:
    """Decodes to a float32 vector; sizes and finiteness are checked first."""
    expected = encoded_size(layout, codec)
    if len(body) != expected:
        raise CodecError(
            f"{codec.value} body is {len(body)} bytes, the layout needs {expected}",
            field=f"{codec.value} body",
            expected=expected,
            found=len(body),
        )
    if codec is Codec.FP32:
        out = np.frombuffer(body, WEIGHTS_DTYPE).astype(np.float32)
    elif codec is Codec.FP16:
        out = np.frombuffer(body, "<f2").astype(np.float32)
    else:
        n_params = 8 * len(layout)
        params = np.frombuffer(body[:n_params], WEIGHTS_DTYPE).reshape(len(layout), 2)
        if not np.all(np.isfinite(params)) or np.any(params[:, 1] <= 0):
            raise CodecError(
                "int8 quantisation parameters must be finite with scale > 0",
                field="int8 lo/scale",
                expected="finite, scale > 0",
            )
        codes = np.frombuffer(body[n_params:], np.uint8)
        out = np.empty(codes.shape[0], np.float32)
        for (lo, scale), t in zip(params, layout, strict=True):
            seg = codes[t.offset : t.offset + t.size].astype(np.float64)
            with np.errstate(over="ignore"):  # overflow becomes inf, refused just below
                out[t.offset : t.offset + t.size] = (float(lo) + seg * float(scale)).astype(np.float32)
    if not np.all(np.isfinite(out)):
        raise CodecError(
            "tensor values must be finite", field=f"{codec.value} body", expected="finite values"
        )
    return out
