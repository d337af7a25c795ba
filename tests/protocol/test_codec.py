"""Tensor codecs: exact byte layouts, error bounds per codec, and strict decoding of untrusted bodies.

The decoder reads bytes a device sent, so a wrong length or a non-finite value must be a
:class:`CodecError` before anything is aggregated; the encoder refuses what it cannot represent.
"""

from __future__ import annotations

import struct
import warnings
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedge.protocol.codec import (
    Codec,
    CodecError,
    decode_tensors,
    encode_tensors,
    encoded_size,
    encoded_size_range,
    parse_codec,
    topk_counts,
)
from fedge.protocol.codec_names import DEFAULT_TOPK_FRACTION
from fedge.protocol.errors import FedgeError
from fedge.protocol.model_manifest import TensorLayout, mlp_tensor_layout

HAR_LAYOUT = mlp_tensor_layout((48, 64, 32, 7))  # 6 tensors, 5447 parameters
SMALL_LAYOUT = mlp_tensor_layout((3, 4, 2))  # 4 tensors: 12 + 4 + 8 + 2 = 26 parameters
FP16_MAX = 65504.0
FINITE_ERROR = "tensor values must be finite"
PARAMS_ERROR = "int8 quantisation parameters must be finite with scale > 0"
DENSE = [Codec.FP32, Codec.FP16, Codec.INT8]
SPARSE = [Codec.TOPK_FP16, Codec.TOPK_INT8]
KNOWN = "fp32, fp16, int8, topk-fp16, topk-int8"


def _count(layout: tuple[TensorLayout, ...]) -> int:
    return sum(t.size for t in layout)


def _realistic_delta(layout: tuple[TensorLayout, ...], seed: int = 7) -> np.ndarray:
    """A weight delta with a different spread per tensor, as after local training."""
    rng = np.random.default_rng(seed)
    spreads = [0.01, 0.5, 1e-3, 10.0, 0.2, 3.0]
    parts = [rng.normal(0.1, spreads[i % len(spreads)], t.size) for i, t in enumerate(layout)]
    return np.concatenate(parts).astype(np.float32)


def _codec_error(call: Any, *args: Any) -> str:
    with pytest.raises(CodecError) as exc:
        call(*args)
    return str(exc.value)


def _tensor(flat: np.ndarray, t: TensorLayout) -> np.ndarray:
    return flat[t.offset : t.offset + t.size].astype(np.float64)


def _int8_step(part: np.ndarray) -> float:
    """The documented quantisation step of one tensor: (max - min) / 255."""
    return (float(part.max()) - float(part.min())) / 255.0


# --- names and sizes ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fp32", "fp16", "int8"])
def test_parse_codec_accepts_the_three_names(name: str) -> None:
    codec = parse_codec(name)
    assert codec is Codec(name)
    assert codec.value == name


@pytest.mark.parametrize("name", ["", "FP32", "fp64", "int4", " fp32", "fp32\n", "bf16"])
def test_parse_codec_refuses_other_names(name: str) -> None:
    assert _codec_error(parse_codec, name) == f"unknown codec {name!r}; known: {KNOWN}"


@pytest.mark.parametrize("name", [None, 32, ["fp32"]], ids=repr)
def test_parse_codec_refuses_non_strings_with_a_codec_error(name: Any) -> None:
    assert _codec_error(parse_codec, name) == f"unknown codec {name!r}; known: {KNOWN}"


def test_codec_error_is_a_fedge_error() -> None:
    assert issubclass(CodecError, FedgeError)


def test_encoded_size_per_codec() -> None:
    assert encoded_size(HAR_LAYOUT, Codec.FP32) == 4 * 5447
    assert encoded_size(HAR_LAYOUT, Codec.FP16) == 2 * 5447
    assert encoded_size(HAR_LAYOUT, Codec.INT8) == 8 * 6 + 5447
    assert encoded_size(SMALL_LAYOUT, Codec.INT8) == 8 * 4 + 26
    for codec in DENSE:
        assert encoded_size((), codec) == 0


@pytest.mark.parametrize("codec", DENSE)
def test_encoded_bytes_have_exactly_the_encoded_size(codec: Codec) -> None:
    body = encode_tensors(_realistic_delta(HAR_LAYOUT), HAR_LAYOUT, codec)
    assert len(body) == encoded_size(HAR_LAYOUT, codec)


# --- fp32 ------------------------------------------------------------------------------------


def test_fp32_is_little_endian_and_bit_exact() -> None:
    flat = _realistic_delta(SMALL_LAYOUT)
    flat[:6] = [-0.0, 1e-45, -3.4028235e38, 3.4028235e38, 1.17549435e-38, 0.0]  # signed zero, extremes
    body = encode_tensors(flat, SMALL_LAYOUT, Codec.FP32)
    assert body == struct.pack(f"<{flat.size}f", *flat.tolist())
    out = decode_tensors(body, SMALL_LAYOUT, Codec.FP32)
    assert out.dtype == np.float32
    assert np.array_equal(out.view(np.uint32), flat.view(np.uint32))


# --- fp16 ------------------------------------------------------------------------------------


def _fp16_bound(x: np.ndarray) -> np.ndarray:
    """Half a float16 step: 2^-11 relative for normal values, 2^-25 absolute for subnormal ones."""
    return np.maximum(np.abs(x.astype(np.float64)) * 2.0**-11, 2.0**-25)


def test_fp16_is_little_endian_half_precision_within_half_a_step() -> None:
    flat = _realistic_delta(HAR_LAYOUT)
    body = encode_tensors(flat, HAR_LAYOUT, Codec.FP16)
    assert body == flat.astype("<f2").tobytes()
    out = decode_tensors(body, HAR_LAYOUT, Codec.FP16)
    assert out.dtype == np.float32
    err = np.abs(out.astype(np.float64) - flat)
    assert np.all(err <= _fp16_bound(flat))
    assert np.any(err > 0)  # it really is lossy: the bound is what is being checked


def test_fp16_keeps_its_largest_finite_value_exactly() -> None:
    layout = (TensorLayout("t", (3,), 0),)
    flat = np.array([FP16_MAX, -FP16_MAX, 0.0], np.float32)
    assert np.array_equal(decode_tensors(encode_tensors(flat, layout, Codec.FP16), layout, Codec.FP16), flat)


@pytest.mark.parametrize("value", [65505.0, 65520.0, -70000.0, 3.0e38])
def test_fp16_refuses_values_outside_its_range(value: float) -> None:
    layout = (TensorLayout("t", (2,), 0),)
    flat = np.array([0.5, value], np.float32)
    message = _codec_error(encode_tensors, flat, layout, Codec.FP16)
    assert message == "a value exceeds float16's range; use fp32"


# --- int8 ------------------------------------------------------------------------------------


def test_int8_layout_is_lo_and_scale_per_tensor_then_one_code_per_value() -> None:
    flat = _realistic_delta(HAR_LAYOUT)
    body = encode_tensors(flat, HAR_LAYOUT, Codec.INT8)
    assert len(body) == 8 * len(HAR_LAYOUT) + flat.size
    params = np.frombuffer(body[: 8 * len(HAR_LAYOUT)], "<f4").reshape(-1, 2)
    codes = np.frombuffer(body[8 * len(HAR_LAYOUT) :], np.uint8)
    for (lo, scale), t in zip(params, HAR_LAYOUT, strict=True):
        part = _tensor(flat, t)
        assert lo == np.float32(part.min())
        assert scale == np.float32(_int8_step(part))
        seg = codes[t.offset : t.offset + t.size]
        assert seg.min() == 0 and seg.max() == 255  # min and max map to the two end codes


def test_int8_error_is_at_most_half_a_step_per_tensor() -> None:
    flat = _realistic_delta(HAR_LAYOUT)
    out = decode_tensors(encode_tensors(flat, HAR_LAYOUT, Codec.INT8), HAR_LAYOUT, Codec.INT8)
    assert out.dtype == np.float32
    for t in HAR_LAYOUT:
        part, decoded = _tensor(flat, t), _tensor(out, t)
        step = _int8_step(part)
        assert np.max(np.abs(decoded - part)) <= step / 2, t.name
        assert decoded.min() == part.min()  # code 0 decodes to lo exactly
        assert abs(decoded.max() - part.max()) <= np.spacing(np.float32(part.max()))


@pytest.mark.parametrize("value", [0.0, 1.5, -1e30, 3.4028235e38])
def test_int8_of_a_constant_tensor_is_exact(value: float) -> None:
    layout = (TensorLayout("a", (5,), 0), TensorLayout("b", (2,), 5))
    flat = np.array([value] * 5 + [-1.0, 1.0], np.float32)
    body = encode_tensors(flat, layout, Codec.INT8)
    lo, scale = struct.unpack("<2f", body[:8])
    assert (lo, scale) == (np.float32(value), 1.0)
    assert body[16:21] == bytes(5)  # every code of a constant tensor is 0
    out = decode_tensors(body, layout, Codec.INT8)
    assert np.array_equal(out[:5], flat[:5])
    assert np.max(np.abs(out[5:].astype(np.float64) - flat[5:])) <= (2.0 / 255) / 2


def test_int8_decodes_lo_plus_code_times_scale() -> None:
    layout = (TensorLayout("t", (4,), 0),)
    body = struct.pack("<2f", -1.0, 0.5) + bytes([0, 1, 2, 255])
    assert decode_tensors(body, layout, Codec.INT8).tolist() == [-1.0, -0.5, 0.0, 126.5]


# --- decode refuses -------------------------------------------------------------------------


@pytest.mark.parametrize("codec", DENSE)
@pytest.mark.parametrize("delta", [-1, 1, -8, 4])
def test_decode_refuses_a_body_of_the_wrong_length(codec: Codec, delta: int) -> None:
    expected = encoded_size(SMALL_LAYOUT, codec)
    body = bytes(expected + delta)
    assert _codec_error(decode_tensors, body, SMALL_LAYOUT, codec) == (
        f"{codec.value} body is {expected + delta} bytes, the layout needs {expected}"
    )


@pytest.mark.parametrize("codec", DENSE)
def test_decode_refuses_an_empty_body_for_a_non_empty_layout(codec: Codec) -> None:
    expected = encoded_size(SMALL_LAYOUT, codec)
    assert _codec_error(decode_tensors, b"", SMALL_LAYOUT, codec) == (
        f"{codec.value} body is 0 bytes, the layout needs {expected}"
    )


@pytest.mark.parametrize(
    ("codec", "bad"),
    [
        (Codec.FP32, b"\x00\x00\xc0\x7f"),  # NaN
        (Codec.FP32, b"\x00\x00\x80\x7f"),  # +inf
        (Codec.FP32, b"\x00\x00\x80\xff"),  # -inf
        (Codec.FP32, b"\x01\x00\x80\x7f"),  # signalling NaN
        (Codec.FP16, b"\x00\x7e"),  # NaN
        (Codec.FP16, b"\x00\x7c"),  # +inf
        (Codec.FP16, b"\x00\xfc"),  # -inf
    ],
    ids=["fp32 nan", "fp32 inf", "fp32 -inf", "fp32 snan", "fp16 nan", "fp16 inf", "fp16 -inf"],
)
@pytest.mark.parametrize("position", [0, 25], ids=["first value", "last value"])
def test_decode_refuses_non_finite_values(codec: Codec, bad: bytes, position: int) -> None:
    width = len(bad)
    body = bytearray(encode_tensors(_realistic_delta(SMALL_LAYOUT), SMALL_LAYOUT, codec))
    body[position * width : (position + 1) * width] = bad
    assert _codec_error(decode_tensors, bytes(body), SMALL_LAYOUT, codec) == FINITE_ERROR


@pytest.mark.parametrize(
    ("lo", "scale"),
    [
        (float("nan"), 0.1),
        (0.0, float("nan")),
        (float("inf"), 0.1),
        (float("-inf"), 0.1),
        (0.0, float("inf")),
        (0.0, 0.0),
        (0.0, -0.0),
        (0.0, -0.1),
    ],
    ids=[
        "nan lo",
        "nan scale",
        "inf lo",
        "-inf lo",
        "inf scale",
        "zero scale",
        "negative zero scale",
        "negative scale",
    ],
)
@pytest.mark.parametrize("tensor", [0, 3], ids=["first tensor", "last tensor"])
def test_decode_refuses_bad_int8_parameters(lo: float, scale: float, tensor: int) -> None:
    body = bytearray(encode_tensors(_realistic_delta(SMALL_LAYOUT), SMALL_LAYOUT, Codec.INT8))
    body[8 * tensor : 8 * tensor + 8] = struct.pack("<2f", lo, scale)
    assert _codec_error(decode_tensors, bytes(body), SMALL_LAYOUT, Codec.INT8) == PARAMS_ERROR


def test_decode_refuses_int8_parameters_that_overflow_to_infinity() -> None:
    layout = (TensorLayout("t", (2,), 0),)
    body = struct.pack("<2f", 3.0e38, 1.0e37) + bytes([0, 255])  # 3e38 + 255e37 is beyond float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean refusal: no RuntimeWarning from a hostile update
        assert _codec_error(decode_tensors, body, layout, Codec.INT8) == FINITE_ERROR


# --- encode refuses -------------------------------------------------------------------------


@pytest.mark.parametrize("codec", DENSE)
@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32, np.int8])
def test_encode_refuses_other_dtypes(codec: Codec, dtype: Any) -> None:
    flat = _realistic_delta(SMALL_LAYOUT).astype(dtype)
    assert _codec_error(encode_tensors, flat, SMALL_LAYOUT, codec) == (
        f"expected float32 of shape (26,), got {np.dtype(dtype)} (26,)"
    )


@pytest.mark.parametrize("codec", DENSE)
@pytest.mark.parametrize("shape", [(25,), (27,), (0,), (1, 26), (26, 1), (2, 13), ()], ids=str)
def test_encode_refuses_the_wrong_shape(codec: Codec, shape: tuple[int, ...]) -> None:
    flat = np.zeros(shape, np.float32)
    assert _codec_error(encode_tensors, flat, SMALL_LAYOUT, codec) == (
        f"expected float32 of shape (26,), got float32 {shape}"
    )


@pytest.mark.parametrize("codec", DENSE)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_encode_refuses_non_finite_values(codec: Codec, value: float) -> None:
    flat = _realistic_delta(SMALL_LAYOUT)
    flat[13] = value
    assert _codec_error(encode_tensors, flat, SMALL_LAYOUT, codec) == FINITE_ERROR


# --- properties ---------------------------------------------------------------------------------


@st.composite
def _layout_and_values(draw: st.DrawFn, elements: st.SearchStrategy[float]) -> tuple[Any, np.ndarray]:
    sizes = draw(st.lists(st.integers(1, 6), min_size=2, max_size=4))
    layout = mlp_tensor_layout(sizes)
    flat = draw(hnp.arrays(np.float32, _count(layout), elements=elements))
    return layout, flat


_ANY_FINITE = st.floats(allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=100, deadline=None)
@given(case=_layout_and_values(_ANY_FINITE))
def test_fp32_round_trips_any_finite_vector_bit_exactly(case: tuple[Any, np.ndarray]) -> None:
    layout, flat = case
    out = decode_tensors(encode_tensors(flat, layout, Codec.FP32), layout, Codec.FP32)
    assert np.array_equal(out.view(np.uint32), flat.view(np.uint32))


@settings(max_examples=100, deadline=None)
@given(case=_layout_and_values(st.floats(-FP16_MAX, FP16_MAX, width=32)))
def test_fp16_round_trips_any_vector_in_range_within_half_a_step(case: tuple[Any, np.ndarray]) -> None:
    layout, flat = case
    out = decode_tensors(encode_tensors(flat, layout, Codec.FP16), layout, Codec.FP16)
    assert np.all(np.abs(out.astype(np.float64) - flat) <= _fp16_bound(flat))


# Magnitudes 0 or about 1e-6..1e4: steps stay normal float32 numbers (see the xfail tests below).
_TINY = float(np.float32(1e-6))
_INT8_VALUES = st.one_of(
    st.just(0.0),
    st.floats(_TINY, 1e4, width=32),
    st.floats(-1e4, -_TINY, width=32),
)


@settings(max_examples=120, deadline=None)
@given(case=_layout_and_values(_INT8_VALUES))
def test_int8_round_trips_within_half_a_step_plus_the_float32_rounding(case: tuple[Any, np.ndarray]) -> None:
    """The decoder's final cast to float32 adds up to half a float32 ulp to the half step."""
    layout, flat = case
    out = decode_tensors(encode_tensors(flat, layout, Codec.INT8), layout, Codec.INT8)
    for t in layout:
        part, decoded = _tensor(flat, t), _tensor(out, t)
        ulp = np.spacing(np.maximum(np.abs(part), np.abs(decoded)).astype(np.float32)).astype(np.float64)
        bound = _int8_step(part) / 2 * (1 + 2.0**-20) + ulp / 2
        assert np.all(np.abs(decoded - part) <= bound), t.name
        assert decoded.min() == part.min()


# --- int8 bugs --------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize(
    "values",
    [[0.0, 1e-44], [1.17549435e-38, 1.1754945e-38]],
    ids=["subnormal range", "two adjacent normal floats"],
)
def test_int8_output_of_a_tiny_range_tensor_decodes(values: list[float]) -> None:
    layout = (TensorLayout("t", (2,), 0),)
    flat = np.array(values, np.float32)
    assert flat[0] != flat[1]
    out = decode_tensors(encode_tensors(flat, layout, Codec.INT8), layout, Codec.INT8)
    assert np.max(np.abs(out.astype(np.float64) - flat)) <= float(flat[1]) - float(flat[0])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_int8_output_of_a_huge_range_tensor_decodes() -> None:
    layout = (TensorLayout("t", (2,), 0),)
    flat = np.array([-1e38, np.finfo(np.float32).max], np.float32)
    out = decode_tensors(encode_tensors(flat, layout, Codec.INT8), layout, Codec.INT8)
    step = _int8_step(flat.astype(np.float64))
    assert np.max(np.abs(out.astype(np.float64) - flat)) <= step / 2


def test_int8_error_bound_includes_float32_rounding_of_the_result() -> None:
    """At 1024 a float32 step is 2^-13: the decoded value's own rounding adds to scale/2."""
    ulp = float(np.spacing(np.float32(1024.0)))
    layout = (TensorLayout("t", (3,), 0),)
    flat = np.array([1024.0, 1024.0 + 128 * ulp, 1024.0 + 256 * ulp], np.float32)
    out = decode_tensors(encode_tensors(flat, layout, Codec.INT8), layout, Codec.INT8)
    step = _int8_step(flat.astype(np.float64))
    assert np.max(np.abs(out.astype(np.float64) - flat)) <= step / 2 + ulp / 2


# --- sparse: topk-fp16 and topk-int8 --------------------------------------------------------------
#
# A sparse body is, per tensor: a form byte (0 bitmap, 1 gaps), the indices, the values. The
# helpers below write such records by hand, so each malformed case is exactly one defect.

ONE = (TensorLayout("w", (100,), 0),)  # with fraction 0.05: k = 5, a 13-byte bitmap
ONE_K = 5


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _gaps(*gaps: int) -> bytes:
    return b"\x01" + b"".join(_varint(g) for g in gaps)


def _bitmap(indices: list[int], size: int = 100) -> bytes:
    bits = np.zeros((size + 7) // 8 * 8, np.uint8)
    bits[indices] = 1
    return b"\x00" + np.packbits(bits, bitorder="little").tobytes()


def _fp16_values(n: int = ONE_K) -> bytes:
    return np.linspace(-1.0, 1.0, n).astype("<f2").tobytes()


def _int8_values(lo: float = -1.0, scale: float = 0.01, n: int = ONE_K) -> bytes:
    return struct.pack("<ff", lo, scale) + bytes(range(n))


def _decode_one(body: bytes, codec: Codec = Codec.TOPK_FP16, fraction: float = 0.05) -> np.ndarray:
    return decode_tensors(body, ONE, codec, fraction)


def _sparse_expected(flat: np.ndarray, layout: tuple[TensorLayout, ...], fraction: float) -> np.ndarray:
    """The dense vector a top-k update stands for: each tensor's k largest magnitudes, 0 elsewhere."""
    out = np.zeros_like(flat)
    for t, k in zip(layout, topk_counts(layout, fraction), strict=True):
        part = flat[t.offset : t.offset + t.size]
        keep = np.argsort(-np.abs(part), kind="stable")[:k]
        out[t.offset + keep] = part[keep]
    return out


def test_parse_codec_accepts_the_sparse_names() -> None:
    assert parse_codec("topk-fp16") is Codec.TOPK_FP16
    assert parse_codec("topk-int8") is Codec.TOPK_INT8
    assert [c.sparse for c in Codec] == [False, False, False, True, True]


def test_topk_counts_round_to_nearest_at_least_one_at_most_the_size() -> None:
    assert topk_counts(HAR_LAYOUT, 0.1) == (307, 6, 205, 3, 22, 1)
    assert sum(topk_counts(HAR_LAYOUT, 0.1)) == 544
    assert topk_counts((TensorLayout("t", (100,), 0),), 0.07) == (7,)  # 7.000000000000001 -> 7
    assert topk_counts((TensorLayout("t", (3,), 0),), 0.001) == (1,)
    assert topk_counts((TensorLayout("t", (1,), 0),), 0.5) == (1,)


@pytest.mark.parametrize("codec", SPARSE)
def test_sparse_codecs_need_the_fraction_and_dense_ones_refuse_it(codec: Codec) -> None:
    flat = _realistic_delta(SMALL_LAYOUT)
    assert "needs a topk_fraction" in _codec_error(encode_tensors, flat, SMALL_LAYOUT, codec)
    assert "needs a topk_fraction" in _codec_error(decode_tensors, b"", SMALL_LAYOUT, codec, None)
    for bad in (0.0, 0.0009, 0.51, 1.0, float("nan"), True, "0.1"):
        assert "needs a topk_fraction" in _codec_error(encode_tensors, flat, SMALL_LAYOUT, codec, bad)
    assert "only for the sparse codecs" in _codec_error(encode_tensors, flat, SMALL_LAYOUT, Codec.INT8, 0.1)


def test_sparse_size_range_per_tensor() -> None:
    """Per tensor: 1 form byte + values + indices between min(k, bitmap) and the bitmap."""
    assert encoded_size_range(ONE, Codec.TOPK_FP16, 0.05) == (1 + 5 + 10, 1 + 13 + 10)
    assert encoded_size_range(ONE, Codec.TOPK_INT8, 0.05) == (1 + 5 + 8 + 5, 1 + 13 + 8 + 5)
    # k = 20 >= the 13-byte bitmap: only the bitmap can be written.
    assert encoded_size_range(ONE, Codec.TOPK_INT8, 0.2) == (1 + 13 + 8 + 20,) * 2
    lo, hi = encoded_size_range(HAR_LAYOUT, Codec.TOPK_INT8, 0.1)
    assert (lo, hi) == (1142, 1279)
    assert encoded_size(HAR_LAYOUT, Codec.TOPK_INT8, 0.1) == hi


@pytest.mark.parametrize("codec", SPARSE)
@pytest.mark.parametrize("fraction", [0.001, 0.05, 0.1, 0.3, 0.5])
def test_sparse_round_trip_keeps_each_tensors_top_k_and_zeros_the_rest(codec: Codec, fraction: float) -> None:
    flat = _realistic_delta(HAR_LAYOUT)
    body = encode_tensors(flat, HAR_LAYOUT, codec, fraction)
    lo, hi = encoded_size_range(HAR_LAYOUT, codec, fraction)
    assert lo <= len(body) <= hi
    out = decode_tensors(body, HAR_LAYOUT, codec, fraction)
    expected = _sparse_expected(flat, HAR_LAYOUT, fraction)
    assert np.array_equal(out != 0, expected != 0)
    for t in HAR_LAYOUT:
        kept = _tensor(expected, t)[_tensor(expected, t) != 0]
        got = _tensor(out, t)[_tensor(expected, t) != 0]
        if codec is Codec.TOPK_FP16:
            assert np.all(np.abs(got - kept) <= _fp16_bound(kept.astype(np.float32))), t.name
        else:
            bound = _int8_step(kept) / 2 * (1 + 2.0**-20) + np.spacing(np.abs(kept).astype(np.float32)) / 2
            assert np.all(np.abs(got - kept) <= bound), t.name


def test_sparse_writes_gaps_when_shorter_and_the_bitmap_otherwise() -> None:
    flat = _realistic_delta(ONE)
    sparse = encode_tensors(flat, ONE, Codec.TOPK_FP16, 0.05)  # 5 one-byte gaps < 13 bytes
    dense = encode_tensors(flat, ONE, Codec.TOPK_FP16, 0.2)  # 20 indices: the bitmap
    assert sparse[0] == 1 and len(sparse) == 1 + 5 + 2 * 5
    assert dense[0] == 0 and len(dense) == 1 + 13 + 2 * 20
    keep = np.sort(np.argsort(-np.abs(flat), kind="stable")[:20])
    assert dense[1:14] == _bitmap(list(keep))[1:]


def test_sparse_gaps_are_the_first_index_then_differences() -> None:
    flat = np.zeros(100, np.float32)
    flat[[3, 4, 50, 98, 99]] = [1.0, -2.0, 3.0, -4.0, 5.0]
    body = encode_tensors(flat, ONE, Codec.TOPK_FP16, 0.05)
    assert body == _gaps(3, 1, 46, 48, 1) + np.array([1.0, -2.0, 3.0, -4.0, 5.0], "<f2").tobytes()
    assert np.array_equal(_decode_one(body), flat)


def test_sparse_multi_byte_varints_round_trip() -> None:
    layout = (TensorLayout("big", (20_000,), 0),)  # k = 20 at 0.001; indices need up to 3 bytes
    flat = np.zeros(20_000, np.float32)
    where = [0, 127, 255, 16_639, *range(16_640, 16_656)]  # gaps 127, 128 (2 bytes), 16_384 (3)
    flat[where] = np.arange(1, 21, dtype=np.float32)
    body = encode_tensors(flat, layout, Codec.TOPK_FP16, 0.001)
    assert body[:8] == b"\x01\x00\x7f\x80\x01\x80\x80\x01"
    assert len(body) == 1 + (1 + 1 + 2 + 3 + 16) + 2 * 20
    assert np.array_equal(decode_tensors(body, layout, Codec.TOPK_FP16, 0.001), flat)


def test_sparse_decode_refuses_a_non_minimal_varint() -> None:
    """0x83 0x00 is 3 written in two bytes: one value, one encoding."""
    layout = (TensorLayout("w", (1000,), 0),)  # k = 5 at 0.005, varints of up to 2 bytes
    body = b"\x01\x83\x00" + b"\x01" * 4 + _fp16_values()
    assert "not minimal" in _codec_error(decode_tensors, body, layout, Codec.TOPK_FP16, 0.005)
    fine = b"\x01\x83\x01" + b"\x01" * 4 + _fp16_values()
    assert np.flatnonzero(decode_tensors(fine, layout, Codec.TOPK_FP16, 0.005)).tolist()[0] == 131


def test_sparse_int8_has_lo_and_scale_per_tensor_over_the_kept_values() -> None:
    flat = np.zeros(100, np.float32)
    flat[[10, 20, 30, 40, 50]] = [-2.0, -1.0, 0.5, 1.0, 3.0]
    body = encode_tensors(flat, ONE, Codec.TOPK_INT8, 0.05)
    index_end = 1 + 5
    lo, scale = struct.unpack_from("<ff", body, index_end)
    assert lo == -2.0 and scale == pytest.approx(5.0 / 255, rel=1e-6)
    codes = body[index_end + 8 :]
    assert codes[0] == 0 and codes[-1] == 255
    out = _decode_one(body, Codec.TOPK_INT8)
    assert np.all(np.abs(out - flat) <= scale / 2 + 1e-7)
    assert np.count_nonzero(out) == 5


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (_gaps(3, 0, 2, 2, 2) + _fp16_values(), "strictly increasing"),  # a duplicate index
        (_gaps(90, 5, 5, 1, 1) + _fp16_values(), "out of range"),  # 90+5+5+1+1 = 102
        (_gaps(3, 2, 2, 2, 100) + _fp16_values(), "out of range"),  # one gap alone too big
        (_gaps(50, 2, 99, 1, 1) + _fp16_values(), "out of range"),  # 52 then "back to 51": wrapped
        (b"\x01\x81\x80\x00\x01\x01\x01" + _fp16_values(), "longer than"),
        (_bitmap([1, 2, 3, 4]) + _fp16_values(), "sets 4 bits"),  # k - 1
        (_bitmap([1, 2, 3, 4, 5, 6]) + _fp16_values(), "sets 6 bits"),  # k + 1
        (_bitmap([1, 2, 3, 4, 101], 104) + _fp16_values(), "padding bit"),  # index 101 of 100
        (b"\x02" + b"\x00" * 13 + _fp16_values(), "unknown index form"),
        (_gaps(1, 1, 1, 1, 1) + _fp16_values() + b"\x00", "after its last tensor"),
    ],
    ids=[
        "duplicate",
        "sum out of range",
        "gap out of range",
        "unsorted (wrapped)",
        "overlong varint",
        "too few bits",
        "too many bits",
        "padding bit",
        "unknown form",
        "trailing byte",
    ],
)
def test_sparse_decode_refuses_malformed_indices(body: bytes, message: str) -> None:
    """The index forms cannot say "unsorted": gaps are unsigned and a bitmap has no order, so a
    list going backwards can only arrive as a huge gap, which is out of range."""
    assert message in _codec_error(_decode_one, body)


def test_sparse_decode_refuses_too_few_gaps() -> None:
    """Four varints then the values: the fifth "varint" is read from the values, and the record
    no longer fits the body."""
    with pytest.raises(CodecError):
        _decode_one(_gaps(1, 1, 1, 1) + _fp16_values())


def test_sparse_decode_refuses_gaps_not_shorter_than_the_bitmap() -> None:
    """k = 20 varints need 20 bytes, more than the 13-byte bitmap: only the bitmap is valid (a
    gaps record of the bitmap's length holds at most 12)."""
    body = b"\x01" + b"\x01" * 13 + _int8_values(n=20)
    assert "fewer bytes than the bitmap" in _codec_error(_decode_one, body, Codec.TOPK_INT8, 0.2)


@pytest.mark.parametrize("codec", SPARSE)
def test_sparse_decode_refuses_every_truncation(codec: Codec) -> None:
    flat = _realistic_delta(HAR_LAYOUT)
    body = encode_tensors(flat, HAR_LAYOUT, codec, 0.1)
    for n in range(len(body)):
        with pytest.raises(CodecError):
            decode_tensors(body[:n], HAR_LAYOUT, codec, 0.1)


def test_sparse_decode_checks_the_size_bounds_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedge.protocol.codec as codec_module

    def never(*_: Any) -> np.ndarray:
        raise AssertionError("parsed a body outside the size bounds")

    monkeypatch.setattr(codec_module, "_decode_sparse", never)
    lo, hi = encoded_size_range(HAR_LAYOUT, Codec.TOPK_INT8, 0.1)
    for size in (0, lo - 1, hi + 1, 16 * 1024 * 1024):
        message = _codec_error(decode_tensors, bytes(size), HAR_LAYOUT, Codec.TOPK_INT8, 0.1)
        assert message == f"topk-int8 body is {size} bytes, the layout needs {lo}..{hi}"


@pytest.mark.parametrize(
    ("lo", "scale"),
    [(0.0, 0.0), (0.0, -0.01), (float("nan"), 0.01), (0.0, float("inf")), (float("-inf"), 0.01)],
)
def test_sparse_decode_refuses_bad_int8_parameters(lo: float, scale: float) -> None:
    body = _gaps(1, 1, 1, 1, 1) + _int8_values(lo, scale)
    assert PARAMS_ERROR in _codec_error(_decode_one, body, Codec.TOPK_INT8)


def test_sparse_decode_refuses_non_finite_values() -> None:
    values = np.array([0.0, np.inf, 0.0, 0.0, 0.0], "<f2").tobytes()
    assert FINITE_ERROR in _codec_error(_decode_one, _gaps(1, 1, 1, 1, 1) + values)
    overflow = _gaps(1, 1, 1, 1, 1) + _int8_values(3e38, 3e37)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert FINITE_ERROR in _codec_error(_decode_one, overflow, Codec.TOPK_INT8)


def test_sparse_fp16_refuses_kept_values_outside_its_range() -> None:
    flat = np.zeros(100, np.float32)
    flat[7] = 1e6
    assert "float16's range" in _codec_error(encode_tensors, flat, ONE, Codec.TOPK_FP16, 0.05)


@settings(max_examples=80, deadline=None)
@given(
    case=_layout_and_values(st.floats(-1e4, 1e4, width=32)),
    fraction=st.sampled_from([0.001, 0.1, 0.25, 0.5]),
)
def test_sparse_fp16_round_trips_the_top_k_of_any_vector(
    case: tuple[Any, np.ndarray], fraction: float
) -> None:
    layout, flat = case
    out = decode_tensors(
        encode_tensors(flat, layout, Codec.TOPK_FP16, fraction), layout, Codec.TOPK_FP16, fraction
    )
    for t, k in zip(layout, topk_counts(layout, fraction), strict=True):
        part, got = _tensor(flat, t), _tensor(out, t)
        sent = np.flatnonzero(got != 0)
        assert len(sent) <= k
        dropped = np.setdiff1d(np.arange(t.size), sent)
        if len(dropped) and len(sent):  # every dropped value is no larger than every kept one
            assert np.abs(part[dropped]).max() <= np.abs(part[sent]).min()
        assert np.all(np.abs(got[sent] - part[sent]) <= _fp16_bound(part[sent].astype(np.float32)))


def test_sparse_bytes_per_update_on_the_default_model() -> None:
    """har-watch (5,447 parameters): topk-int8 at the default fraction is under a tenth of fp32."""
    flat = _realistic_delta(HAR_LAYOUT)
    fp32 = len(encode_tensors(flat, HAR_LAYOUT, Codec.FP32))
    topk = len(encode_tensors(flat, HAR_LAYOUT, Codec.TOPK_INT8, DEFAULT_TOPK_FRACTION))
    assert fp32 == 21_788
    assert topk <= encoded_size(HAR_LAYOUT, Codec.TOPK_INT8, DEFAULT_TOPK_FRACTION) == 1279
    assert topk <= fp32 / 10
