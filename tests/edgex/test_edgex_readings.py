"""EdgeX reading values: every value type in both of EdgeX's float spellings, ranges, and refusals.

Values arrive as strings (go-mod-core-contracts ``dtos/reading.go``); what Go's ``strconv`` parsers
accept is the reference. Known gaps between ``parse_scalar`` and Go are pinned as strict xfails at
the end, so fixing one turns its test red until the marker goes.
"""

from __future__ import annotations

import math

import pytest

from fedge.agent.edgex.readings import (
    ARRAY_TYPES,
    INT_RANGES,
    SCALAR_TYPES,
    VALUE_TYPES,
    Reading,
    ReadingError,
    normalize_value_type,
    parse_value,
)
from fedge.protocol.errors import FedgeError

FLOAT32_MAX = 3.4028234663852886e38


def _error(value_type: str, text: str) -> ReadingError:
    with pytest.raises(ReadingError) as exc:
        parse_value(value_type, text)
    return exc.value


# --- scalars ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value_type", "text", "expected"),
    [
        ("Float64", "2.310000e+01", 23.1),  # EdgeX 3.x / contracts 4.0.0: fmt %e
        ("Float64", "2.31e+01", 23.1),  # contracts 4.0.1+: strconv shortest
        ("Float64", "0.000000e+00", 0.0),
        ("Float64", "0e+00", 0.0),
        ("Float64", "-1.000000e-07", -1e-07),
        ("Float64", "1e+100", 1e100),
        ("Float64", "1.7976931348623157e+308", 1.7976931348623157e308),
        ("Float64", "5e-324", 5e-324),
        ("Float64", "3.0000000000000004e-01", 0.30000000000000004),
        ("Float32", "1e-01", 0.1),
        ("Float32", "1.000000e-01", 0.1),
        ("Float32", "3.402823e+38", 3.402823e38),
        ("Float32", "-4.55e+01", -45.5),
        ("Int8", "-128", -128),
        ("Int8", "127", 127),
        ("Int8", "+5", 5),
        ("Int16", "-32768", -32768),
        ("Int32", "2147483647", 2147483647),
        ("Int64", "-9223372036854775808", -(2**63)),
        ("Uint8", "255", 255),
        ("Uint16", "65535", 65535),
        ("Uint32", "4294967295", 2**32 - 1),
        ("Uint64", "18446744073709551615", 2**64 - 1),
        ("Uint64", "007", 7),
        ("String", "café ☃ <lobby>", "café ☃ <lobby>"),
        ("String", "", ""),
        ("String", " spaced ", " spaced "),
    ],
)
def test_scalar_values_parse_to_their_python_value(value_type: str, text: str, expected: object) -> None:
    value = parse_value(value_type, text)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True),
        ("True", True),
        ("TRUE", True),
        ("t", True),
        ("T", True),
        ("1", True),
        ("false", False),
        ("False", False),
        ("FALSE", False),
        ("f", False),
        ("F", False),
        ("0", False),
    ],
)
def test_bool_accepts_exactly_go_parse_bool_forms(text: str, expected: bool) -> None:
    assert parse_value("Bool", text) is expected


@pytest.mark.parametrize("text", ["yes", "tRUE", "", " true", "2", "on"])
def test_bool_refuses_other_forms(text: str) -> None:
    err = _error("Bool", text)
    assert err.reason == "bad_value"
    assert str(err) == f"bad_value: {text!r} is not a Bool"


def test_nan_is_a_value() -> None:
    assert math.isnan(parse_value("Float64", "NaN"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value_type", "text"),
    [
        ("Int8", "128"),
        ("Int8", "-129"),
        ("Uint8", "256"),
        ("Uint8", "-1"),
        ("Int16", "32768"),
        ("Uint16", "65536"),
        ("Int32", "-2147483649"),
        ("Uint32", "4294967296"),
        ("Int64", "9223372036854775808"),
        ("Uint64", "18446744073709551616"),
        ("Float32", "1e+39"),
        ("Float32", "-3.5e+38"),
    ],
)
def test_values_outside_their_type_are_out_of_type_range(value_type: str, text: str) -> None:
    assert _error(value_type, text).reason == "out_of_type_range"


@pytest.mark.parametrize(
    ("value_type", "text"),
    [
        ("Int8", "1.5"),
        ("Int8", "0x10"),
        ("Int8", ""),
        ("Int8", " 1"),
        ("Int32", "1e3"),
        ("Uint64", "18446744073709551615000"),
        ("Float64", "abc"),
        ("Float64", ""),
        ("Float64", " 1.0"),
        ("Float64", "1" * 65),
    ],
)
def test_values_that_are_not_their_type_are_bad_values(value_type: str, text: str) -> None:
    assert _error(value_type, text).reason == "bad_value"


# --- arrays and the other types ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value_type", "text", "expected"),
    [
        ("Float64Array", "[2.31e+01, -1e-07, 0e+00]", (23.1, -1e-07, 0.0)),
        ("Float64Array", "[2.310000e+01, 1.000000e+00]", (23.1, 1.0)),
        ("Float32Array", "[1e-01, 2.5e+00]", (0.1, 2.5)),
        ("Int8Array", "[1, -2, 127]", (1, -2, 127)),
        ("Int16Array", "[-32768]", (-32768,)),
        ("Int32Array", "[1, 2]", (1, 2)),
        ("Int64Array", "[9223372036854775807]", (2**63 - 1,)),
        ("Uint8Array", "[0, 255]", (0, 255)),
        ("Uint16Array", "[1]", (1,)),
        ("Uint32Array", "[4294967295]", (2**32 - 1,)),
        ("Uint64Array", "[18446744073709551615]", (2**64 - 1,)),
        ("BoolArray", "[true, false]", (True, False)),
        ("StringArray", "[heat, vent]", ("heat", "vent")),
        ("Int32Array", "[]", ()),
        ("StringArray", "[ ]", ()),
    ],
)
def test_array_values_parse_to_tuples(value_type: str, text: str, expected: tuple[object, ...]) -> None:
    assert parse_value(value_type, text) == expected


def test_every_array_type_is_covered_above() -> None:
    assert len(ARRAY_TYPES) == len(SCALAR_TYPES) == 12


@pytest.mark.parametrize(
    ("value_type", "text", "reason"),
    [
        ("Int8Array", "1, 2", "bad_value"),
        ("Int8Array", "[1, 2", "bad_value"),
        ("Int8Array", "[1, x]", "bad_value"),
        ("Int8Array", "[1, 300]", "out_of_type_range"),
        ("BoolArray", "[true, maybe]", "bad_value"),
        ("Float32Array", "[1e+39]", "out_of_type_range"),
        ("Float64Array", "[", "bad_value"),
    ],
)
def test_array_element_errors(value_type: str, text: str, reason: str) -> None:
    assert _error(value_type, text).reason == reason


@pytest.mark.parametrize("value_type", ["Binary", "Object", "ObjectArray"])
def test_binary_and_object_values_do_not_come_as_strings(value_type: str) -> None:
    err = _error(value_type, "x")
    assert str(err) == f"bad_value: {value_type} readings carry binaryValue/objectValue, not value"


@pytest.mark.parametrize("value_type", ["float64", "Decimal", "", "Int128", "FLOAT"])
def test_unknown_value_types(value_type: str) -> None:
    assert _error(value_type, "1").reason == "unknown_value_type"


# --- value-type names ------------------------------------------------------------------------------


@pytest.mark.parametrize("value_type", VALUE_TYPES)
def test_normalize_value_type_matches_any_letter_case_like_go_equal_fold(value_type: str) -> None:
    assert normalize_value_type(value_type) == value_type
    assert normalize_value_type(value_type.lower()) == value_type
    assert normalize_value_type(value_type.upper()) == value_type


def test_value_types_include_object_array_which_the_openapi_enum_omits() -> None:
    assert {"Object", "ObjectArray", "Binary"} <= set(VALUE_TYPES)
    assert len(VALUE_TYPES) == 27  # common/constants.go: 12 scalars, 12 arrays, Binary, Object(Array)


@pytest.mark.parametrize("value_type", ["", "Float", "Float64 ", "Int", "Objects"])
def test_normalize_value_type_refuses_unknown_names(value_type: str) -> None:
    with pytest.raises(ReadingError) as exc:
        normalize_value_type(value_type)
    assert exc.value.reason == "unknown_value_type"
    assert str(exc.value) == f"unknown_value_type: {value_type!r} is not an EdgeX value type"


# --- Reading.as_float --------------------------------------------------------------------------------


def _reading(value_type: str, value: object) -> Reading:
    return Reading("dev", "res", "prof", value_type, value, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value_type", "value", "expected"),
    [("Float64", 23.1, 23.1), ("Int8", -3, -3.0), ("Bool", True, 1.0), ("Uint64", 2**64 - 1, 2.0**64)],
)
def test_as_float_of_numeric_readings(value_type: str, value: object, expected: float) -> None:
    assert _reading(value_type, value).as_float() == expected


@pytest.mark.parametrize(
    ("value_type", "value", "reason"),
    [
        ("String", "x", "not_numeric"),
        ("Float64Array", (1.0,), "not_numeric"),
        ("Binary", b"x", "not_numeric"),
        ("Object", {"a": 1}, "not_numeric"),
        ("Float64", None, "null_value"),
    ],
)
def test_as_float_refuses_what_is_not_a_number(value_type: str, value: object, reason: str) -> None:
    with pytest.raises(ReadingError) as exc:
        _reading(value_type, value).as_float()
    assert exc.value.reason == reason
    assert isinstance(exc.value, FedgeError)


def test_int_ranges_are_the_go_types() -> None:
    assert INT_RANGES["Int8"] == (-128, 127)
    assert INT_RANGES["Uint64"] == (0, 2**64 - 1)


# --- known gaps between parse_scalar and Go's strconv (reported; strict so a fix is noticed) -------


def test_float32_max_in_shortest_form_is_accepted() -> None:
    assert parse_value("Float32", "3.4028235e+38") == pytest.approx(FLOAT32_MAX, rel=1e-7)


def test_doubled_sign_is_a_bad_value() -> None:
    assert _error("Int8", "+-5").reason == "bad_value"


def test_superscript_digit_is_a_bad_value() -> None:
    assert _error("Int32", "²").reason == "bad_value"


@pytest.mark.parametrize(
    "text", ["1e999", "-1e999", "-infinity", "+infinity", "1e+39", "inf", "+Inf", "Infinity"]
)
def test_infinite_float64_values_are_out_of_type_range(text: str) -> None:
    """Go's ParseFloat reports ErrRange for 1e999; fedge refuses every infinity."""
    value_type = "Float32" if text == "1e+39" else "Float64"
    assert _error(value_type, text).reason == "out_of_type_range"


@pytest.mark.parametrize(("value_type", "text"), [("Int32", "٣"), ("Float64", "1_000.5"), ("Float64", "٣.٥")])
def test_python_only_number_spellings_are_refused(value_type: str, text: str) -> None:
    assert _error(value_type, text).reason == "bad_value"
