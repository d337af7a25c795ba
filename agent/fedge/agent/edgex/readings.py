"""EdgeX readings and events as fedge sees them, and the typed parsing of reading values.

EdgeX ships every simple value as a string (``"2.31e+01"``, ``"true"``, ``"[1, 2, 3]"``); this
module turns one into the Python value its ``valueType`` says, and refuses anything else with a
:class:`ReadingError` naming the reason. Pure: no I/O.

Value types are EdgeX's (go-mod-core-contracts ``common/constants.go``). The OpenAPI specs'
``valueType`` enum omits ``Object`` and ``ObjectArray``, which EdgeX's own device-virtual
profile uses and real services accept: fedge follows EdgeX's behaviour and accepts both.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from itertools import repeat
from typing import Any

from fedge.protocol.errors import ReasonError

INT_RANGES: dict[str, tuple[int, int]] = {
    "Int8": (-(2**7), 2**7 - 1),
    "Int16": (-(2**15), 2**15 - 1),
    "Int32": (-(2**31), 2**31 - 1),
    "Int64": (-(2**63), 2**63 - 1),
    "Uint8": (0, 2**8 - 1),
    "Uint16": (0, 2**16 - 1),
    "Uint32": (0, 2**32 - 1),
    "Uint64": (0, 2**64 - 1),
}
FLOAT_TYPES = ("Float32", "Float64")
SCALAR_TYPES: tuple[str, ...] = ("Bool", "String", *INT_RANGES, *FLOAT_TYPES)
ARRAY_TYPES: tuple[str, ...] = tuple(f"{t}Array" for t in SCALAR_TYPES)
OTHER_TYPES = ("Binary", "Object", "ObjectArray")
VALUE_TYPES: tuple[str, ...] = SCALAR_TYPES + ARRAY_TYPES + OTHER_TYPES
#: Types whose values can be features or numeric labels.
NUMERIC_TYPES: tuple[str, ...] = ("Bool", *INT_RANGES, *FLOAT_TYPES)

_GO_INT = re.compile(r"[+-]?[0-9]+", re.ASCII)
GO_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
#: Half-way between float32's largest finite value and the next power: from here on, rounding
#: to float32 gives infinity.
FLOAT32_ROUNDS_TO_INF = 3.4028235677973366e38
_GO_SPECIALS = ("nan", "inf", "infinity")  # strconv.ParseFloat's spellings, any case

Value = bool | int | float | str | bytes | tuple[Any, ...] | dict[str, Any] | list[Any] | None


class ReadingError(ReasonError[str]):
    """A reading or event is malformed; ``reason`` is a short stable code for counters."""


@dataclass(frozen=True, slots=True)
class Reading:
    """One reading: which device and resource, its typed value, and when (Unix nanoseconds).

    With slots: an agent makes one per reading on its EdgeX bus (1.2 M in the demo's backlog).
    The frozen ``__init__`` (nine ``object.__setattr__`` calls) costs 3 us a reading; the
    decoder builds them with :func:`new_readings` (0.4 us) and :func:`new_reading` instead.
    """

    device: str
    resource: str
    profile: str
    value_type: str
    value: Value
    origin_ns: int
    units: str = ""
    media_type: str = ""
    id: str = ""

    def as_float(self) -> float:
        """The value as a float for features; refuses non-numeric types."""
        if self.value_type not in NUMERIC_TYPES or isinstance(self.value, (str, bytes, tuple, dict, list)):
            raise ReadingError("not_numeric", f"{self.resource} is {self.value_type}, not a number")
        if self.value is None:
            raise ReadingError("null_value", f"{self.resource} has no value")
        return float(self.value)


# Each field's slot setter: sets it on a new Reading without the frozen __setattr__ (which refuses).
_SETTERS: tuple[Callable[[Reading, Any], None], ...] = tuple(
    Reading.__dict__[f.name].__set__ for f in fields(Reading)
)
_new = object.__new__


def new_readings(count: int, columns: Sequence[Iterable[Any]]) -> list[Reading]:
    """``count`` readings from one iterable per field, in field order (device, resource, profile,
    value_type, value, origin_ns, units, media_type, id): what ``Reading(...)`` makes, without a
    Python call a reading. The caller has checked every value (the decoder's fast path)."""
    readings: list[Reading] = list(map(_new, repeat(Reading, count)))
    for setter, column in zip(_SETTERS, columns, strict=True):
        deque(map(setter, readings, column), maxlen=0)
    return readings


def new_reading(values: tuple[Any, ...]) -> Reading:
    """One reading from all nine fields, in order (see :func:`new_readings`)."""
    reading: Reading = _new(Reading)
    for setter, value in zip(_SETTERS, values, strict=True):
        setter(reading, value)
    return reading


@dataclass(frozen=True)
class Event:
    """One EdgeX event: a device's readings from one source (a resource or a command)."""

    id: str
    device: str
    profile: str
    source: str
    origin_ns: int
    readings: tuple[Reading, ...]
    tags: dict[str, Any] = field(default_factory=dict)


def parse_scalar(value_type: str, text: str) -> bool | int | float | str:
    """One scalar from EdgeX's string form, checked against its type's range."""
    if value_type == "String":
        return text
    if value_type == "Bool":
        # Go's strconv.ParseBool: 1, t, T, TRUE, true, True and the false forms.
        if text in ("1", "t", "T", "TRUE", "true", "True"):
            return True
        if text in ("0", "f", "F", "FALSE", "false", "False"):
            return False
        raise ReadingError("bad_value", f"{text!r} is not a Bool")
    if value_type in INT_RANGES:
        lo, hi = INT_RANGES[value_type]
        # Go's strconv.ParseInt syntax, ASCII only (Python's int() also takes "²", "٣", "1_0").
        if len(text) > 21 or not _GO_INT.fullmatch(text):
            raise ReadingError("bad_value", f"{text[:32]!r} is not an {value_type}")
        number = int(text)
        if not lo <= number <= hi:
            raise ReadingError("out_of_type_range", f"{number} does not fit {value_type}")
        return number
    if value_type in FLOAT_TYPES:
        # Both Go formats parse: %e ("2.310000e+01", EdgeX 3.x, contracts 4.0.0) and the
        # shortest 'e' form ("2.31e+01", contracts 4.0.1+); also plain decimals.
        if len(text) > 64 or not (GO_DECIMAL.fullmatch(text) or text.lower().lstrip("+-") in _GO_SPECIALS):
            raise ReadingError("bad_value", f"{text[:64]!r} is not a {value_type}")
        real = float(text)
        if math.isnan(real):
            return real  # NaN is a value EdgeX can send; the sample policy decides
        # Float32: what rounds to a finite float32 fits (its max prints as 3.4028235e+38).
        limit = FLOAT32_ROUNDS_TO_INF if value_type == "Float32" else math.inf
        if math.isinf(real) or abs(real) >= limit:
            raise ReadingError("out_of_type_range", f"{text} does not fit {value_type}")
        return real
    raise ReadingError("unknown_value_type", f"{value_type!r} is not a scalar value type")


def parse_value(value_type: str, text: str) -> Value:
    """A simple reading's value: a scalar, or a tuple for ``...Array`` types (``"[1, 2]"``)."""
    if value_type in SCALAR_TYPES:
        return parse_scalar(value_type, text)
    if value_type in ARRAY_TYPES:
        if len(text) < 2 or text[0] != "[" or text[-1] != "]":
            raise ReadingError("bad_value", f"{value_type} value must look like [a, b, ...]")
        inner = text[1:-1].strip()
        if not inner:
            return ()
        element_type = value_type[: -len("Array")]
        return tuple(parse_scalar(element_type, part.strip()) for part in inner.split(","))
    if value_type in OTHER_TYPES:
        raise ReadingError("bad_value", f"{value_type} readings carry binaryValue/objectValue, not value")
    raise ReadingError("unknown_value_type", f"{value_type!r} is not an EdgeX value type")


_VALUE_TYPES_BY_FOLDED: dict[str, str] = {t.casefold(): t for t in VALUE_TYPES}


def normalize_value_type(value_type: str) -> str:
    """EdgeX's canonical spelling of a ``valueType``, matched without regard to letter case.

    go-mod-core-contracts validates ``valueType`` with ``strings.EqualFold`` and rewrites it with
    ``NormalizeValueType`` before use, so ``"float64"`` in a hand-written profile is a Float64
    everywhere in EdgeX; fedge must read it the same way or it would drop valid readings.
    """
    canonical = _VALUE_TYPES_BY_FOLDED.get(value_type.casefold())
    if canonical is None:
        raise ReadingError("unknown_value_type", f"{value_type[:64]!r} is not an EdgeX value type")
    return canonical
