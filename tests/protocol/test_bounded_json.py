"""fedge.protocol.bounded_json: size, UTF-8 and nesting checked before json.loads, exact errors.

The property that matters: whatever the bytes, the answer is a value or a BoundedJsonError
with one of five reasons, never RecursionError or another exception, and the depth check
agrees with a reference count that skips strings the way a JSON parser does.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.protocol.bounded_json import (
    DEFAULT_MAX_DEPTH,
    REASONS,
    BoundedJsonError,
    loads_bounded,
    nesting_depth_exceeds,
)
from fedge.protocol.errors import FedgeError

pytestmark = pytest.mark.adversarial
LIMIT = 1 << 20
_BOM = "Unexpected UTF-8 BOM (decode using utf-8-sig): line 1 column 1 (char 0)"  # not guessed away


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def _error(data: bytes, **limits: int) -> BoundedJsonError:
    with pytest.raises(BoundedJsonError) as caught:
        loads_bounded(data, **{"max_bytes": LIMIT, **limits})
    return caught.value


@pytest.mark.parametrize(
    ("data", "value"),
    [
        (b'{"on": true, "n": [1, 2.5, -3e2, false, null]}', {"on": True, "n": [1, 2.5, -300.0, False, None]}),
        (b'"[[[["', "[[[["),  # brackets in strings do not nest
        (b'["\\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["]', ['"' + "[" * 41]),
        (b"[" * 32 + b"]" * 32, _nested(32)),  # exactly the default limit
        (b' {"a": {}} ', {"a": {}}),
        (b'"\\ud83d\\ude00"', "\U0001f600"),
        (b"12345678901234567890", 12345678901234567890),
    ],
)
def test_json_within_the_bounds_parses_as_json_loads_would(data: bytes, value: Any) -> None:
    assert loads_bounded(data, max_bytes=len(data)) == value


@pytest.mark.parametrize(
    ("data", "limits", "reason", "detail"),
    [
        (b"[1]", {"max_bytes": 2}, "too_large", "3 bytes > 2"),
        (b"[" * 100_000, {"max_bytes": 99_999}, "too_large", "100000 bytes > 99999"),
        (b"\xff{}", {}, "bad_utf8", "not UTF-8 at byte 0"),
        (b'{"a": "\xc3\x28"}', {}, "bad_utf8", "not UTF-8 at byte 7"),
        (b"\xfe\xff\x00{\x00}", {}, "bad_utf8", "not UTF-8 at byte 0"),  # UTF-16 is not guessed
        (b"[" * 100_000, {}, "too_deep", f"nested deeper than {DEFAULT_MAX_DEPTH} levels"),
        (b"[" * 33 + b"]" * 33, {}, "too_deep", "nested deeper than 32 levels"),
        (b'{"a":' * 3 + b"1" + b"}" * 3, {"max_depth": 2}, "too_deep", "nested deeper than 2 levels"),
        (b"NaN", {}, "not_finite", "NaN is not JSON"),
        (b"[-Infinity]", {}, "not_finite", "-Infinity is not JSON"),
        (b'{"x": 1e999}', {}, "not_finite", "number 1e999 is out of range"),
        (b"", {}, "bad_json", "Expecting value: line 1 column 1 (char 0)"),
        (
            b'{"a": 1,}',
            {},
            "bad_json",
            "Expecting property name enclosed in double quotes: line 1 column 9 (char 8)",
        ),
        (b"[1]]", {}, "bad_json", "Extra data: line 1 column 4 (char 3)"),
        (b"\xef\xbb\xbf{}", {}, "bad_json", _BOM),
    ],
)
def test_refusals_carry_their_exact_reason_and_detail(
    data: bytes, limits: dict[str, int], reason: str, detail: str
) -> None:
    err = _error(data, **limits)
    assert (err.reason, err.detail, str(err)) == (reason, detail, f"{reason}: {detail}")
    assert isinstance(err, FedgeError)


def test_an_overlong_integer_is_bad_json_not_a_crash() -> None:
    err = _error(b"9" * 5_000)
    assert err.reason == "bad_json" and "Exceeds the limit (4300 digits)" in err.detail


def test_the_size_is_judged_first() -> None:
    assert _error(b"\xff" + b"[" * 100, max_bytes=50).reason == "too_large"


def test_a_recursion_limit_below_max_depth_is_still_too_deep() -> None:
    """With max_depth above what the interpreter can recurse, json.loads' own RecursionError
    is still reported as too_deep, never raised."""
    deep = b"[" * 5_000 + b"]" * 5_000
    assert _error(deep, max_depth=10_000).reason == "too_deep"


def test_limits_must_be_sensible() -> None:
    with pytest.raises(ValueError, match=r"max_bytes and max_depth must be >= 0, got -1 and 3"):
        loads_bounded(b"1", max_bytes=-1, max_depth=3)


def _reference_depth(data: bytes) -> int:
    """The nesting depth a JSON parser would see, char by char (strings skipped)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        char = chr(byte)
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}" and depth:
            depth -= 1
    return deepest


_TRICKY_TEXT = st.text(alphabet='[]{}"\\ab')  # brackets, quotes and escapes inside strings
_JSON_TEXT = st.recursive(
    st.none() | st.booleans() | st.integers() | _TRICKY_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TRICKY_TEXT, inner, max_size=3),
    max_leaves=30,
).map(lambda value: json.dumps(value).encode())


@settings(max_examples=300)
@given(data=_JSON_TEXT, max_depth=st.integers(0, 8))
def test_the_depth_check_matches_a_parser_on_json(data: bytes, max_depth: int) -> None:
    assert nesting_depth_exceeds(data, max_depth) == (_reference_depth(data) > max_depth)
    if _reference_depth(data) <= max_depth:
        assert loads_bounded(data, max_bytes=len(data), max_depth=max_depth) == json.loads(data)
    else:
        assert _error(data, max_depth=max_depth).reason == "too_deep"


@settings(max_examples=300)
@given(data=st.binary(max_size=512) | st.text(alphabet='[]{}"\\ a1,:', max_size=512).map(str.encode))
def test_any_bytes_give_a_value_or_one_of_the_reasons(data: bytes) -> None:
    try:
        loads_bounded(data, max_bytes=LIMIT, max_depth=4)
    except BoundedJsonError as exc:
        assert exc.reason in REASONS


def test_refusing_hostile_bytes_is_cheap_and_never_recursive() -> None:
    """Linear, whatever the shape: 1 MB of brackets, of escaped quotes in an unterminated string
    (quadratic for a scanner that restarts at each quote), and of both."""
    limit = sys.getrecursionlimit()
    brackets, pairs = b"[" * LIMIT, b"[]" * (LIMIT // 2)
    unterminated = b'"' + b'\\"' * (LIMIT // 2)
    for data in (brackets, pairs, unterminated, b"[" * 40 + unterminated):
        assert _error(data, max_bytes=2 * LIMIT).reason in ("too_deep", "bad_json")
    assert sys.getrecursionlimit() == limit
