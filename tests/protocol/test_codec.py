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

from fedge.protocol.codec import Codec, CodecError, decode_tensors, encode_tensors, encoded_size, parse_codec
from fedge.protocol.errors import FedgeError
from fedge.protocol.model_manifest import TensorLayout, mlp_tensor_layout

HAR_LAYOUT = mlp_tensor_layout((48, 64, 32, 7))  # 6 tensors, 5447 parameters
SMALL_LAYOUT = mlp_tensor_layout((3, 4, 2))  # 4 tensors: 12 + 4 + 8 + 2 = 26 parameters
FP16_MAX = 65504.0
FINITE_ERROR = "tensor values must be finite"
PARAMS_ERROR = "int8 quantisation parameters must be finite with scale > 0"


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
    assert _codec_error(parse_codec, name) == f"unknown codec {name!r}; known: fp32, fp16, int8"


@pytest.mark.parametrize("name", [None, 32, ["fp32"]], ids=repr)
def test_parse_codec_refuses_non_strings_with_a_codec_error(name: Any) -> None:
    assert _codec_error(parse_codec, name) == f"unknown codec {name!r}; known: fp32, fp16, int8"


def test_codec_error_is_a_fedge_error() -> None:
    assert issubclass(CodecError, FedgeError)


def test_encoded_size_per_codec() -> None:
    assert encoded_size(HAR_LAYOUT, Codec.FP32) == 4 * 5447
    assert encoded_size(HAR_LAYOUT, Codec.FP16) == 2 * 5447
    assert encoded_size(HAR_LAYOUT, Codec.INT8) == 8 * 6 + 5447
    assert encoded_size(SMALL_LAYOUT, Codec.INT8) == 8 * 4 + 26
    for codec in Codec:
        assert encoded_size((), codec) == 0


@pytest.mark.parametrize("codec", list(Codec))
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


@pytest.mark.parametrize("codec", list(Codec))
@pytest.mark.parametrize("delta", [-1, 1, -8, 4])
def test_decode_refuses_a_body_of_the_wrong_length(codec: Codec, delta: int) -> None:
    expected = encoded_size(SMALL_LAYOUT, codec)
    body = bytes(expected + delta)
    assert _codec_error(decode_tensors, body, SMALL_LAYOUT, codec) == (
        f"{codec.value} body is {expected + delta} bytes, the layout needs {expected}"
    )


@pytest.mark.parametrize("codec", list(Codec))
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


@pytest.mark.parametrize("codec", list(Codec))
@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32, np.int8])
def test_encode_refuses_other_dtypes(codec: Codec, dtype: Any) -> None:
    flat = _realistic_delta(SMALL_LAYOUT).astype(dtype)
    assert _codec_error(encode_tensors, flat, SMALL_LAYOUT, codec) == (
        f"expected float32 of shape (26,), got {np.dtype(dtype)} (26,)"
    )


@pytest.mark.parametrize("codec", list(Codec))
@pytest.mark.parametrize("shape", [(25,), (27,), (0,), (1, 26), (26, 1), (2, 13), ()], ids=str)
def test_encode_refuses_the_wrong_shape(codec: Codec, shape: tuple[int, ...]) -> None:
    flat = np.zeros(shape, np.float32)
    assert _codec_error(encode_tensors, flat, SMALL_LAYOUT, codec) == (
        f"expected float32 of shape (26,), got float32 {shape}"
    )


@pytest.mark.parametrize("codec", list(Codec))
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
