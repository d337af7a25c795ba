"""Tensor codecs for model updates: fp32, fp16 and int8 (per-tensor affine quantisation), dense,
and their sparse top-k forms topk-fp16 and topk-int8.

An update is the flat delta ``local_weights - global_weights`` in the manifest's tensor layout.
Byte layouts (little-endian throughout):

- ``fp32``: P float32 values.
- ``fp16``: P float16 values (encoding refuses values outside float16's finite range).
- ``int8``: for each tensor in layout order, ``lo`` and ``scale`` as float32 (8 bytes per tensor),
  then P uint8 codes; a value decodes as ``lo + code * scale``. With ``scale = (max - min) / 255``
  the rounding error per value is at most ``scale / 2`` plus half a float32 step of the value
  (the decoded value is itself a float32).

- ``topk-fp16`` / ``topk-int8`` (sparse; ``k`` per tensor from the round's ``topk_fraction``,
  :func:`topk_counts`): for each tensor in layout order, one record:

  - ``form`` (uint8): 0 = bitmap, 1 = gaps;
  - the indices of the tensor's ``k`` kept values, strictly increasing: a bitmap of
    ``ceil(size / 8)`` bytes (bit ``i`` of byte ``i // 8``, least significant first, set for a
    kept value; exactly ``k`` bits set, the padding bits 0), or ``k`` unsigned LEB128 varints,
    the first index then each index minus the previous one (so >= 1), minimal (a varint's last
    byte is not 0 unless it is its only byte), at most ``ceil(bits(size - 1) / 7)`` bytes each,
    and in all fewer bytes than the bitmap (the encoder writes whichever is shorter, the bitmap
    on a tie);
  - the values in index order: ``k`` float16 (``topk-fp16``), or ``lo`` and ``scale`` as
    float32 then ``k`` uint8 codes (``topk-int8``, the int8 codec's quantisation over the kept
    values).

  Decoded, an update is dense again: the kept values at their indices, 0 elsewhere. Which
  values are kept is the ``k`` largest magnitudes of each tensor (ties: any of them).

The decoder knows the exact size (dense) or the smallest and largest size (sparse: the index
forms) from the layout and ``k`` and checks it before touching the bytes; a sparse body is
parsed record by record within those bounds, and the dense vector allocated only once every
record is valid.
float32 here is the weights blob's dtype (:data:`fedge.protocol.weights.WEIGHTS_DTYPE`): an fp32
delta has exactly the bytes a weights blob of the same values would have.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedge.protocol.codec_names import MAX_TOPK_FRACTION, MIN_TOPK_FRACTION, Codec
from fedge.protocol.errors import FieldError
from fedge.protocol.model_manifest import TensorLayout
from fedge.protocol.weights import WEIGHTS_DTYPE

__all__ = [
    "Codec",
    "CodecError",
    "check_topk_fraction",
    "decode_tensors",
    "encode_tensors",
    "encoded_size",
    "encoded_size_range",
    "parse_codec",
    "topk_counts",
]

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


_BITMAP = 0
_GAPS = 1


def check_topk_fraction(codec: Codec, topk_fraction: float | None) -> float | None:
    """``topk_fraction`` as the codec needs it: a number in [MIN, MAX]_TOPK_FRACTION for a
    sparse codec, None for a dense one; else :class:`CodecError`."""
    if not codec.sparse:
        if topk_fraction is not None:
            raise CodecError(
                f"topk_fraction is only for the sparse codecs, not {codec.value}",
                field="topk_fraction",
                expected=None,
                found=topk_fraction,
            )
        return None
    if (
        isinstance(topk_fraction, bool)
        or not isinstance(topk_fraction, (int, float))
        or not MIN_TOPK_FRACTION <= float(topk_fraction) <= MAX_TOPK_FRACTION
    ):
        raise CodecError(
            f"{codec.value} needs a topk_fraction in {MIN_TOPK_FRACTION}..{MAX_TOPK_FRACTION}",
            field="topk_fraction",
            expected=f"{MIN_TOPK_FRACTION}..{MAX_TOPK_FRACTION}",
            found=topk_fraction,
        )
    return float(topk_fraction)


def topk_counts(layout: Sequence[TensorLayout], topk_fraction: float) -> tuple[int, ...]:
    """``k`` per tensor: ``fraction x size`` rounded to the nearest integer (halves up), at
    least 1 and at most the size. Plain float64 arithmetic, the same on every device."""
    return tuple(min(t.size, max(1, math.floor(topk_fraction * t.size + 0.5))) for t in layout)


def _value_bytes(codec: Codec, k: int) -> int:
    return 2 * k if codec is Codec.TOPK_FP16 else 8 + k


def _varint_max_len(size: int) -> int:
    return max(1, -(-max(size - 1, 1).bit_length() // 7))


def encoded_size_range(
    layout: Sequence[TensorLayout], codec: Codec, topk_fraction: float | None = None
) -> tuple[int, int]:
    """The smallest and the largest body ``codec`` can give for ``layout`` (equal for a dense
    codec). Sparse: per tensor a form byte, the values, and between ``min(k, bitmap - 1)``
    (every gap one byte) and the bitmap's bytes for the indices."""
    fraction = check_topk_fraction(codec, topk_fraction)
    if fraction is None:
        count = sum(t.size for t in layout)
        if codec is Codec.FP32:
            n = WEIGHTS_DTYPE.itemsize * count
        elif codec is Codec.FP16:
            n = 2 * count
        else:
            n = 8 * len(layout) + count
        return n, n
    lo = hi = 0
    for t, k in zip(layout, topk_counts(layout, fraction), strict=True):
        bitmap = (t.size + 7) // 8
        fixed = 1 + _value_bytes(codec, k)
        lo += fixed + (k if k < bitmap else bitmap)
        hi += fixed + bitmap
    return lo, hi


def encoded_size(layout: Sequence[TensorLayout], codec: Codec, topk_fraction: float | None = None) -> int:
    """The body's size for a dense codec; for a sparse one the largest it can be."""
    return encoded_size_range(layout, codec, topk_fraction)[1]


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


def _check_fp16(values: np.ndarray) -> None:
    largest = float(np.max(np.abs(values), initial=0.0))
    if largest > _FP16_MAX:
        raise CodecError(
            "a value exceeds float16's range; use fp32",
            field="delta",
            expected=f"|value| <= {_FP16_MAX}",
            found=largest,
        )


def _quantise(values: np.ndarray) -> tuple[float, float, np.ndarray]:
    """The int8 codec's ``lo``, ``scale`` and codes for ``values`` (float64)."""
    lo32, scale32 = _int8_params(float(values.min()), float(values.max()))
    # Round with the float32 parameters the decoder will use, so decode(encode(x)) is exact
    # to within half a step (plus float32 rounding of the result).
    codes = np.clip(np.rint((values - lo32) / scale32), 0, 255).astype(np.uint8)
    return lo32, scale32, codes


def _varints(values: np.ndarray) -> bytes:
    """Unsigned LEB128 of non-negative int64 ``values``, minimal, concatenated."""
    if values.size == 0:
        return b""
    v = values.astype(np.uint64)
    widest = max(1, -(-int(v.max()).bit_length() // 7))
    groups = np.stack([(v >> np.uint64(7 * j)) & np.uint64(0x7F) for j in range(widest)], axis=1)
    lengths = np.maximum(1, -(-_bit_lengths(v) // 7))
    used = np.arange(widest)[None, :] < lengths[:, None]
    more = np.arange(widest)[None, :] < (lengths - 1)[:, None]
    out: np.ndarray = (groups | np.where(more, np.uint64(0x80), np.uint64(0))).astype(np.uint8)
    return bytes(out[used].tobytes())


def _bit_lengths(v: np.ndarray) -> np.ndarray:
    """Bit length of each uint64 (0 for 0)."""
    n = np.zeros(v.shape, np.int64)
    rest = v.copy()
    while np.any(rest):
        nz = rest != 0
        n[nz] += 1
        rest >>= np.uint64(1)
    return n


def _encode_sparse(flat: np.ndarray, layout: Sequence[TensorLayout], codec: Codec, fraction: float) -> bytes:
    parts: list[bytes] = []
    for t, k in zip(layout, topk_counts(layout, fraction), strict=True):
        part = flat[t.offset : t.offset + t.size]
        if k == t.size:
            idx = np.arange(t.size, dtype=np.int64)
        else:
            idx = np.sort(np.argpartition(-np.abs(part), k - 1)[:k]).astype(np.int64)
        values = part[idx]
        bitmap_len = (t.size + 7) // 8
        gaps = _varints(np.diff(idx, prepend=0))
        if len(gaps) < bitmap_len:
            parts += [bytes([_GAPS]), gaps]
        else:
            bits = np.zeros(bitmap_len * 8, np.uint8)
            bits[idx] = 1
            parts += [bytes([_BITMAP]), np.packbits(bits, bitorder="little").tobytes()]
        if codec is Codec.TOPK_FP16:
            _check_fp16(values)
            parts.append(values.astype("<f2").tobytes())
        else:
            lo32, scale32, codes = _quantise(values.astype(np.float64))
            parts += [np.array([lo32, scale32], WEIGHTS_DTYPE).tobytes(), codes.tobytes()]
    return b"".join(parts)


def encode_tensors(
    flat: np.ndarray, layout: Sequence[TensorLayout], codec: Codec, topk_fraction: float | None = None
) -> bytes:
    """``flat`` (float32, the layout's parameter count) encoded with ``codec``; a sparse codec
    needs the round's ``topk_fraction``."""
    fraction = check_topk_fraction(codec, topk_fraction)
    _check_flat(flat, layout)
    if fraction is not None:
        return _encode_sparse(flat, layout, codec, fraction)
    if codec is Codec.FP32:
        return flat.astype(WEIGHTS_DTYPE).tobytes()
    if codec is Codec.FP16:
        _check_fp16(flat)
        return flat.astype("<f2").tobytes()
    params = np.empty((len(layout), 2), WEIGHTS_DTYPE)
    codes = np.empty(flat.shape[0], np.uint8)
    for i, t in enumerate(layout):
        lo32, scale32, part_codes = _quantise(flat[t.offset : t.offset + t.size].astype(np.float64))
        params[i] = (lo32, scale32)
        codes[t.offset : t.offset + t.size] = part_codes
    return params.tobytes() + codes.tobytes()


def decode_tensors(
    body: bytes, layout: Sequence[TensorLayout], codec: Codec, topk_fraction: float | None = None
) -> np.ndarray:
    """Decodes to a float32 vector; sizes and finiteness are checked first. A sparse codec needs
    the round's ``topk_fraction`` and decodes to the dense vector (0 where nothing was sent)."""
    fraction = check_topk_fraction(codec, topk_fraction)
    lo_size, hi_size = encoded_size_range(layout, codec, fraction)
    if not lo_size <= len(body) <= hi_size:
        expected: int | str = lo_size if lo_size == hi_size else f"{lo_size}..{hi_size}"
        raise CodecError(
            f"{codec.value} body is {len(body)} bytes, the layout needs {expected}",
            field=f"{codec.value} body",
            expected=expected,
            found=len(body),
        )
    if fraction is not None:
        out = _decode_sparse(body, layout, codec, fraction)
    elif codec is Codec.FP32:
        # A read-only view of ``body`` where float32 is little-endian (no copy); converted
        # where it is not.
        out = np.frombuffer(body, WEIGHTS_DTYPE).astype(np.float32, copy=False)
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
        codes = np.frombuffer(body, np.uint8, offset=n_params)
        out = _dequantise(codes, params, layout)
    if not np.isfinite(out).all():  # the method: np.all() would add a microsecond of dispatch
        raise CodecError(
            "tensor values must be finite", field=f"{codec.value} body", expected="finite values"
        )
    return out


def _dequantise(codes: np.ndarray, params: np.ndarray, layout: Sequence[TensorLayout]) -> np.ndarray:
    """int8 codes to float32: ``float32(lo + code * scale)`` in float64, each tensor with its own
    ``lo`` and ``scale``. One pass over the whole vector when the layout's tensors follow one
    another from offset 0 (every layout fedge builds), with each value's ``lo`` and ``scale``
    repeated to it: the same float64 operations on the same values as the loop over tensors,
    so the same floats to the bit, without a round of numpy calls per tensor."""
    sizes = [t.size for t in layout]
    offsets = [t.offset for t in layout]
    contiguous = offsets == [sum(sizes[:i]) for i in range(len(sizes))] and sum(sizes) == codes.shape[0]
    with np.errstate(over="ignore"):  # overflow becomes inf, refused by the caller
        if contiguous:
            p64 = params.astype(np.float64)
            values = codes.astype(np.float64)
            values *= np.repeat(p64[:, 1], sizes)
            values += np.repeat(p64[:, 0], sizes)  # code * scale + lo: lo + code * scale, to the bit
            out: np.ndarray = values.astype(np.float32)
            return out
        out = np.empty(codes.shape[0], np.float32)
        for (t_lo, t_scale), t in zip(params, layout, strict=True):
            seg = codes[t.offset : t.offset + t.size].astype(np.float64)
            out[t.offset : t.offset + t.size] = (float(t_lo) + seg * float(t_scale)).astype(np.float32)
        return out


def _sparse_error(t: TensorLayout, message: str, expected: object = None, found: object = None) -> CodecError:
    return CodecError(f"{t.name}: {message}", field=f"indices of {t.name}", expected=expected, found=found)


def _gap_indices(window: np.ndarray, t: TensorLayout, k: int) -> tuple[np.ndarray, int]:
    """The ``k`` indices in a gaps section at the start of ``window``, and its length."""
    ends = np.flatnonzero(window < 0x80)
    if ends.shape[0] < k:
        raise _sparse_error(
            t, f"the gaps section holds fewer than {k} varints in fewer bytes than the bitmap", k
        )
    ends = ends[:k]
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if int(lengths.max()) > _varint_max_len(t.size):
        raise _sparse_error(t, "a varint is longer than the tensor's size needs", _varint_max_len(t.size))
    section = window[: int(ends[-1]) + 1]
    if np.any((lengths > 1) & (section[ends] == 0)):
        raise _sparse_error(t, "a varint is not minimal (ends in a zero byte)")
    shifts = 7 * (np.arange(section.shape[0]) - np.repeat(starts, lengths))
    groups = (section & 0x7F).astype(np.uint64) << shifts.astype(np.uint64)
    gaps = np.add.reduceat(groups, starts)
    if int(gaps.max()) >= t.size:  # also keeps the sum below k * size
        raise _sparse_error(t, "an index is out of range", f"< {t.size}", int(gaps.max()))
    gaps = gaps.astype(np.int64)
    if k > 1 and int(gaps[1:].min()) < 1:
        raise _sparse_error(t, "indices must be strictly increasing (a gap of 0 repeats one)", ">= 1", 0)
    indices = np.cumsum(gaps)
    if int(indices[-1]) >= t.size:
        raise _sparse_error(t, "an index is out of range", f"< {t.size}", int(indices[-1]))
    return indices, section.shape[0]


def _bitmap_indices(window: np.ndarray, t: TensorLayout, k: int) -> np.ndarray:
    bits = np.unpackbits(window, bitorder="little")
    if np.any(bits[t.size :]):
        raise _sparse_error(t, "a padding bit of the bitmap is set (an index out of range)", 0)
    indices = np.flatnonzero(bits[: t.size])
    if indices.shape[0] != k:
        raise _sparse_error(
            t, f"the bitmap sets {indices.shape[0]} bits, the round's k is {k}", k, indices.shape[0]
        )
    return indices


def _decode_sparse(body: bytes, layout: Sequence[TensorLayout], codec: Codec, fraction: float) -> np.ndarray:
    raw = np.frombuffer(body, np.uint8)
    pos = 0
    records: list[tuple[TensorLayout, np.ndarray, np.ndarray]] = []

    def take(n: int, t: TensorLayout, what: str) -> np.ndarray:
        nonlocal pos
        if pos + n > raw.shape[0]:
            raise CodecError(
                f"{t.name}: the body ends inside its {what}",
                field=f"{codec.value} body",
                expected=pos + n,
                found=raw.shape[0],
            )
        part = raw[pos : pos + n]
        pos += n
        return part

    for t, k in zip(layout, topk_counts(layout, fraction), strict=True):
        form = int(take(1, t, "index form")[0])
        bitmap_len = (t.size + 7) // 8
        if form == _BITMAP:
            indices = _bitmap_indices(take(bitmap_len, t, "bitmap"), t, k)
        elif form == _GAPS:
            window = raw[pos : pos + min(bitmap_len - 1, raw.shape[0] - pos)]
            indices, used = _gap_indices(window, t, k)
            pos += used
        else:
            raise _sparse_error(t, "unknown index form", [_BITMAP, _GAPS], form)
        if codec is Codec.TOPK_FP16:
            values = take(2 * k, t, "values").view("<f2").astype(np.float32)
        else:
            lo, scale = (float(v) for v in take(8, t, "lo/scale").view(WEIGHTS_DTYPE))
            if not (math.isfinite(lo) and math.isfinite(scale) and scale > 0):
                raise CodecError(
                    "int8 quantisation parameters must be finite with scale > 0",
                    field=f"lo/scale of {t.name}",
                    expected="finite, scale > 0",
                    found=(lo, scale),
                )
            codes = take(k, t, "codes").astype(np.float64)
            with np.errstate(over="ignore"):  # overflow becomes inf, refused by the caller
                values = (lo + codes * scale).astype(np.float32)
        records.append((t, indices, values))
    if pos != raw.shape[0]:
        raise CodecError(
            f"{codec.value} body has {raw.shape[0] - pos} bytes after its last tensor",
            field=f"{codec.value} body",
            expected=pos,
            found=raw.shape[0],
        )
    out = np.zeros(sum(t.size for t in layout), np.float32)
    for t, indices, values in records:
        out[t.offset + indices] = values
    return out
