"""Binary frames: exact layout, round trips, and one precise :class:`FrameError` per malformation.

Frames arrive from the network, so every length is checked against its limit and against the
bytes received before anything is sliced or parsed; arbitrary bytes may only ever produce a
``FrameError`` (or a frame).
"""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.protocol.errors import FedgeError
from fedge.protocol.framing import (
    DEFAULT_MAX_BODY_BYTES,
    FRAME_VERSION,
    MAGIC,
    MAX_HEADER_BYTES,
    PREFIX_BYTES,
    Frame,
    FrameError,
    FrameKind,
    decode_frame,
    encode_frame,
)

HEADER = {"b": [1, 2.5, None, True], "a": "x", "nested": {"z": 1, "y": "é"}}
BODY = bytes(range(256)) * 3


def _prefix(
    magic: bytes = MAGIC,
    version: int = FRAME_VERSION,
    kind: int = 2,
    reserved: int = 0,
    header_len: int = 0,
    body_len: int = 0,
) -> bytes:
    return struct.pack(">4sBBHII", magic, version, kind, reserved, header_len, body_len)


def _raw_frame(raw_header: bytes, body: bytes = b"", kind: int = 2) -> bytes:
    return _prefix(kind=kind, header_len=len(raw_header), body_len=len(body)) + raw_header + body


def _error(
    data: bytes, kind: FrameKind = FrameKind.PAYLOAD, max_body: int = DEFAULT_MAX_BODY_BYTES
) -> FrameError:
    with pytest.raises(FrameError) as exc:
        decode_frame(data, kind, max_body)
    return exc.value


# --- layout and round trips -----------------------------------------------------------------


def test_prefix_is_16_bytes_and_the_constants_are_the_documented_ones() -> None:
    assert PREFIX_BYTES == 16
    assert MAGIC == b"FEDG"
    assert FRAME_VERSION == 1
    assert MAX_HEADER_BYTES == 16 * 1024
    assert [int(k) for k in FrameKind] == [1, 2, 3]
    assert issubclass(FrameError, FedgeError)


def test_encoded_frame_has_the_documented_layout_and_a_canonical_header() -> None:
    data = encode_frame(FrameKind.SIGNED, HEADER, BODY)
    raw_header = json.dumps(HEADER, sort_keys=True, separators=(",", ":")).encode()
    assert data[:4] == b"FEDG"
    assert data[4] == 1
    assert data[5] == 3
    assert data[6:8] == b"\x00\x00"
    assert struct.unpack(">II", data[8:16]) == (len(raw_header), len(BODY))
    assert data[16 : 16 + len(raw_header)] == raw_header
    assert data[16 + len(raw_header) :] == BODY
    assert b" " not in raw_header and raw_header.startswith(b'{"a":"x","b":')


def test_key_order_does_not_change_the_bytes() -> None:
    reordered = dict(reversed(list(HEADER.items())))
    assert encode_frame(FrameKind.PAYLOAD, reordered, b"x") == encode_frame(FrameKind.PAYLOAD, HEADER, b"x")


@pytest.mark.parametrize("kind", list(FrameKind))
@pytest.mark.parametrize("body", [b"", b"\x00", BODY], ids=["empty", "one byte", "768 bytes"])
def test_round_trip(kind: FrameKind, body: bytes) -> None:
    frame = decode_frame(encode_frame(kind, HEADER, body), kind)
    assert frame == Frame(kind, HEADER, body)
    assert isinstance(frame.kind, FrameKind)
    assert type(frame.body) is bytes


def test_decode_accepts_a_bytearray() -> None:
    data = bytearray(encode_frame(FrameKind.PAYLOAD, HEADER, BODY))
    frame = decode_frame(data, FrameKind.PAYLOAD)
    assert frame == Frame(FrameKind.PAYLOAD, HEADER, BODY)
    assert type(frame.body) is bytes


def test_empty_header_object_round_trips() -> None:
    frame = decode_frame(encode_frame(FrameKind.PAYLOAD, {}), FrameKind.PAYLOAD)
    assert frame == Frame(FrameKind.PAYLOAD, {}, b"")


# --- limits ------------------------------------------------------------------------------------


def _header_of_size(size: int) -> dict[str, Any]:
    """A header whose canonical JSON is exactly ``size`` bytes: ``{"p":"..."}``."""
    header = {"p": "x" * (size - len('{"p":""}'))}
    assert len(json.dumps(header, separators=(",", ":"))) == size
    return header


def test_header_of_exactly_the_limit_round_trips() -> None:
    header = _header_of_size(MAX_HEADER_BYTES)
    assert decode_frame(encode_frame(FrameKind.PAYLOAD, header), FrameKind.PAYLOAD).header == header


def test_encode_refuses_a_header_over_the_limit() -> None:
    with pytest.raises(FrameError) as exc:
        encode_frame(FrameKind.PAYLOAD, _header_of_size(MAX_HEADER_BYTES + 1))
    assert exc.value.reason == "header_too_large"
    assert str(exc.value) == f"header_too_large: {MAX_HEADER_BYTES + 1} bytes > {MAX_HEADER_BYTES}"


def test_body_of_exactly_max_body_is_accepted_and_one_more_byte_is_not() -> None:
    frame = decode_frame(encode_frame(FrameKind.PAYLOAD, {}, b"x" * 10), FrameKind.PAYLOAD, max_body=10)
    assert frame.body == b"x" * 10
    err = _error(encode_frame(FrameKind.PAYLOAD, {}, b"x" * 11), max_body=10)
    assert err.reason == "body_too_large"
    assert str(err) == "body_too_large: declares a 11-byte body > 10"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_encode_refuses_non_finite_numbers_in_the_header(value: float) -> None:
    with pytest.raises(FrameError, match=r"^bad_header: header cannot be encoded: Out of range") as exc:
        encode_frame(FrameKind.PAYLOAD, {"loss": value})
    assert exc.value.reason == "bad_header"


# --- every decoding failure, by reason -------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 15])
def test_truncated_prefix(size: int) -> None:
    err = _error(encode_frame(FrameKind.PAYLOAD, HEADER, BODY)[:size])
    assert err.reason == "truncated"
    assert str(err) == f"truncated: {size} bytes is shorter than the 16-byte prefix"


@pytest.mark.parametrize("magic", [b"FEDH", b"fedg", b"\x00\x00\x00\x00", b"GDEF"])
def test_bad_magic(magic: bytes) -> None:
    err = _error(magic + encode_frame(FrameKind.PAYLOAD, HEADER)[4:])
    assert err.reason == "bad_magic"
    assert str(err) == f"bad_magic: not a fedge frame (magic {magic!r})"


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unsupported_version(version: int) -> None:
    data = bytearray(encode_frame(FrameKind.PAYLOAD, HEADER))
    data[4] = version
    err = _error(bytes(data))
    assert err.reason == "unsupported_version"
    assert str(err) == f"unsupported_version: frame version {version}, this fedge reads 1"


@pytest.mark.parametrize(
    ("actual", "expected"),
    [
        (FrameKind.SEALED, FrameKind.PAYLOAD),
        (FrameKind.SIGNED, FrameKind.SEALED),
        (FrameKind.PAYLOAD, FrameKind.SIGNED),
    ],
)
def test_wrong_kind(actual: FrameKind, expected: FrameKind) -> None:
    err = _error(encode_frame(actual, HEADER, BODY), expected)
    assert err.reason == "wrong_kind"
    assert str(err) == f"wrong_kind: frame kind {int(actual)}, expected {int(expected)}"


@pytest.mark.parametrize("kind", [0, 4, 255])
def test_unknown_kind_is_a_wrong_kind(kind: int) -> None:
    err = _error(_raw_frame(b"{}", kind=kind))
    assert err.reason == "wrong_kind"
    assert str(err) == f"wrong_kind: frame kind {kind}, expected 2"


@pytest.mark.parametrize("reserved", [1, 0x0100, 0xFFFF])
def test_bad_reserved(reserved: int) -> None:
    data = _prefix(reserved=reserved, header_len=2) + b"{}"
    err = _error(data)
    assert err.reason == "bad_reserved"
    assert str(err) == "bad_reserved: reserved bytes must be zero"


@pytest.mark.parametrize("declared", [MAX_HEADER_BYTES + 1, 2**31, 2**32 - 1])
def test_header_too_large_is_judged_on_the_declared_size_before_reading(declared: int) -> None:
    """16 bytes declaring a huge header and no data at all: the limit, not the length, fails."""
    err = _error(_prefix(header_len=declared))
    assert err.reason == "header_too_large"
    assert str(err) == f"header_too_large: declares a {declared}-byte header > {MAX_HEADER_BYTES}"


@pytest.mark.parametrize("declared", [DEFAULT_MAX_BODY_BYTES + 1, 2**32 - 1])
def test_body_too_large_is_judged_on_the_declared_size_before_reading(declared: int) -> None:
    err = _error(_prefix(header_len=2, body_len=declared) + b"{}" + b"tiny")
    assert err.reason == "body_too_large"
    assert str(err) == f"body_too_large: declares a {declared}-byte body > {DEFAULT_MAX_BODY_BYTES}"


@pytest.mark.parametrize(
    ("change", "actual_delta"),
    [(b"x", 1), (b"xyz", 3)],
    ids=["one extra byte", "three extra bytes"],
)
def test_length_mismatch_on_extra_bytes(change: bytes, actual_delta: int) -> None:
    data = encode_frame(FrameKind.PAYLOAD, HEADER, BODY)
    err = _error(data + change)
    assert err.reason == "length_mismatch"
    assert str(err) == f"length_mismatch: declares {len(data)} bytes, got {len(data) + actual_delta}"


@pytest.mark.parametrize("missing", [1, len(BODY), len(BODY) + 5])
def test_length_mismatch_on_missing_bytes(missing: int) -> None:
    data = encode_frame(FrameKind.PAYLOAD, HEADER, BODY)
    err = _error(data[:-missing])
    assert err.reason == "length_mismatch"
    assert str(err) == f"length_mismatch: declares {len(data)} bytes, got {len(data) - missing}"


@pytest.mark.parametrize(
    "raw_header",
    [
        b"",
        b"{",
        b"not json",
        b'{"a":1,}',
        b"{'a':1}",
        b'{"a":1}{"b":2}',
        b"[" * 10_000,
        b'{"a":' + b"1" * 5000 + b"}",
    ],
    ids=[
        "empty",
        "unclosed",
        "trailing comma",
        "word",
        "single quotes",
        "two objects",
        "deep nesting",
        "overlong integer",
    ],
)
def test_bad_header_that_is_not_json(raw_header: bytes) -> None:
    err = _error(_raw_frame(raw_header, b"body"))
    assert err.reason == "bad_header"
    assert str(err) == "bad_header: header is not UTF-8 JSON"


@pytest.mark.parametrize(
    "raw_header",
    [b'{"a":"\xc3\x28"}', b'{"a":"\xff"}', b'{"a":"\xc0\xaf"}', b'{"a":"\xe2\x82"}'],
    ids=["bad continuation", "0xff", "overlong slash", "truncated sequence"],
)
def test_bad_header_that_is_not_utf8(raw_header: bytes) -> None:
    err = _error(_raw_frame(raw_header))
    assert err.reason == "bad_header"
    assert str(err) == "bad_header: header is not UTF-8 JSON"


@pytest.mark.parametrize("raw_header", [b"[]", b"[{}]", b"null", b"42", b'"text"', b"true"])
def test_bad_header_that_is_not_an_object(raw_header: bytes) -> None:
    err = _error(_raw_frame(raw_header))
    assert err.reason == "bad_header"
    assert str(err) == "bad_header: header must be a JSON object"


def test_checks_run_in_the_documented_order() -> None:
    """Bad magic wins over everything after it; the declared sizes win over the actual length."""
    everything_wrong = _prefix(magic=b"XXXX", version=9, kind=9, reserved=1, header_len=2**32 - 1)
    assert _error(everything_wrong).reason == "bad_magic"
    assert _error(_prefix(version=9, kind=9, reserved=1)).reason == "unsupported_version"
    assert _error(_prefix(kind=9, reserved=1)).reason == "wrong_kind"
    assert _error(_prefix(reserved=1, header_len=2**32 - 1)).reason == "bad_reserved"
    assert _error(_prefix(header_len=2**32 - 1, body_len=2**32 - 1)).reason == "header_too_large"
    assert _error(_prefix(body_len=2**32 - 1)).reason == "body_too_large"


# --- known deviations from the documented format ---------------------------------------------


@pytest.mark.parametrize(
    "raw_header",
    [
        '{"a":1}'.encode("utf-16-le"),
        '{"a":1}'.encode("utf-16"),
        '{"a":1}'.encode("utf-32"),
        b'\xef\xbb\xbf{"a":1}',
        b'{"a":"\xed\xa0\x80"}',
    ],
    ids=["utf-16-le", "utf-16 bom", "utf-32", "utf-8 bom", "utf-8 encoded lone surrogate"],
)
def test_header_in_another_encoding_is_refused(raw_header: bytes) -> None:
    err = _error(_raw_frame(raw_header))
    assert err.reason == "bad_header"


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_header_with_a_non_finite_literal_is_refused(literal: bytes) -> None:
    err = _error(_raw_frame(b'{"loss":' + literal + b"}"))
    assert err.reason == "bad_header"


# --- bit flips and fuzzing ---------------------------------------------------------------------

_VALID = encode_frame(FrameKind.PAYLOAD, HEADER, BODY)


def _reason_for_prefix_flip(byte: int, flipped: bytes) -> str:
    _, _, _, _, header_len, body_len = struct.unpack(">4sBBHII", flipped[:16])
    if byte < 4:
        return "bad_magic"
    if byte == 4:
        return "unsupported_version"
    if byte == 5:
        return "wrong_kind"
    if byte < 8:
        return "bad_reserved"
    if header_len > MAX_HEADER_BYTES:
        return "header_too_large"
    if body_len > DEFAULT_MAX_BODY_BYTES:
        return "body_too_large"
    return "length_mismatch"


def test_every_single_bit_flip_in_the_prefix_is_a_frame_error_with_the_right_reason() -> None:
    seen: set[str] = set()
    for bit in range(PREFIX_BYTES * 8):
        data = bytearray(_VALID)
        data[bit // 8] ^= 1 << (bit % 8)
        expected = _reason_for_prefix_flip(bit // 8, bytes(data))
        err = _error(bytes(data))
        assert err.reason == expected, f"bit {bit}"
        seen.add(err.reason)
    assert seen == {
        "bad_magic",
        "unsupported_version",
        "wrong_kind",
        "bad_reserved",
        "header_too_large",
        "body_too_large",
        "length_mismatch",
    }


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=100, deadline=None)
@given(
    header=st.dictionaries(st.text(max_size=8), _JSON, max_size=4),
    body=st.binary(max_size=64),
    kind=st.sampled_from(list(FrameKind)),
    bit=st.integers(0, PREFIX_BYTES * 8 - 1),
)
def test_any_bit_flip_in_the_prefix_of_any_valid_frame_is_a_frame_error(
    header: dict[str, Any], body: bytes, kind: FrameKind, bit: int
) -> None:
    data = encode_frame(kind, header, body)
    assert decode_frame(data, kind) == Frame(kind, header, body)
    flipped = bytearray(data)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(FrameError) as exc:
        decode_frame(bytes(flipped), kind)
    assert exc.value.reason == _reason_for_prefix_flip(bit // 8, bytes(flipped))


def _decode_or_frame_error(data: bytes, kind: FrameKind) -> None:
    try:
        frame = decode_frame(data, kind, max_body=1024)
    except FrameError as exc:
        assert exc.reason in {
            "truncated",
            "bad_magic",
            "unsupported_version",
            "wrong_kind",
            "bad_reserved",
            "header_too_large",
            "body_too_large",
            "length_mismatch",
            "bad_header",
        }
        assert str(exc).startswith(exc.reason + ": ")
        return
    assert frame.kind is kind
    assert isinstance(frame.header, dict)
    assert PREFIX_BYTES + len(frame.body) <= len(data)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200), kind=st.sampled_from(list(FrameKind)))
def test_arbitrary_bytes_only_raise_frame_error(data: bytes, kind: FrameKind) -> None:
    _decode_or_frame_error(data, kind)


@settings(max_examples=200, deadline=None)
@given(
    raw_header=st.binary(max_size=64),
    body=st.binary(max_size=32),
    slack=st.sampled_from([-1, 0, 0, 0, 1]),
)
def test_arbitrary_headers_behind_a_valid_prefix_only_raise_frame_error(
    raw_header: bytes, body: bytes, slack: int
) -> None:
    """Reaches the JSON parser: a well-formed prefix with random header bytes."""
    data = _prefix(header_len=len(raw_header), body_len=len(body)) + raw_header + body
    data = data + b"!" if slack > 0 else data[: len(data) + slack] if slack < 0 else data
    _decode_or_frame_error(data, FrameKind.PAYLOAD)
