"""EdgeX message-bus payloads: bytes in, :class:`Event` values out; events in, EdgeX's bytes out.

Pure (no I/O, no clock; randomness only for the ids :func:`encode_envelope` makes when it is not
given them): the MQTT shell hands :func:`decode_message` the bytes of one message and counts what
comes back; fedge's EdgeX simulator hands the encoders an event and publishes the bytes.
Everything here follows go-mod-core-contracts (``dtos/event.go``, ``dtos/reading.go``,
``dtos/requests/event.go``) and go-mod-messaging (``pkg/types/message_envelope.go``), not the
OpenAPI specs, where the two disagree.

What can arrive on an EdgeX events topic, and how each is recognised:

* EdgeX 3.x ``MessageEnvelope`` (JSON, ``Payload []byte``): ``payload`` is a base64 string of the
  ``AddEventRequest``, encoded as ``contentType`` says (``application/json`` or, for events with
  binary readings, ``application/cbor``).
* EdgeX 4.x ``MessageEnvelope`` (JSON, ``Payload any``): a JSON ``AddEventRequest`` is embedded as
  an object. **4.x CBOR is not a CBOR envelope.** go-mod-messaging v4's ``NewMessageEnvelope``
  turns the payload into ``[]byte`` (``cbor.Marshal``) whenever ``contentType`` is CBOR (or
  ``EDGEX_MSG_BASE64_PAYLOAD=true``), and the MQTT client always marshals the envelope with
  ``json.Marshal`` — so 4.x CBOR arrives exactly like 3.x CBOR: a JSON envelope whose ``payload``
  is base64 of CBOR bytes. (The NATS "nats" marshaller sends the bare payload with the envelope
  fields in NATS headers; that bare payload is handled below.) A CBOR-encoded envelope is never
  produced by EdgeX and is refused.
* A bare ``AddEventRequest`` (JSON or CBOR): a REST body, a core-data republish body, or a NATS
  message in the "nats" format.
* A bare ``Event`` (JSON or CBOR), as app-service-configurable's ``mqtt-export`` publishes it.

Failures come in two sizes, so a caller can count each rejected thing exactly once:

* A message that cannot be used at all (too large, not JSON/CBOR/base64, an error envelope, a bad
  event header, ...) raises one :class:`ReadingError`; count one rejected message.
* A reading that is malformed while its event is sound is dropped and reported in
  :attr:`DecodeResult.rejected` (one error per dropped reading, in order); the event keeps its
  other readings. An event whose readings are all rejected is dropped too (EdgeX requires at least
  one reading), so ``events`` may be empty while ``rejected`` lists every reading.
"""

from __future__ import annotations

import binascii
import io
import json
import math
import re
import struct
import uuid
from base64 import b64encode
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from itertools import compress, repeat
from operator import not_
from typing import Any, Final, Literal, NoReturn

import cbor2

from fedge.agent.edgex.readings import (
    ARRAY_TYPES,
    FLOAT32_ROUNDS_TO_INF,
    FLOAT_TYPES,
    GO_DECIMAL,
    INT_RANGES,
    VALUE_TYPES,
    Event,
    Reading,
    ReadingError,
    Value,
    new_reading,
    new_readings,
    normalize_value_type,
    parse_value,
)
from fedge.protocol.bounded_json import BoundedJsonError, loads_bounded

FloatStyle = Literal["go_e", "shortest"]
ContentType = Literal["application/json", "application/cbor"]
MessageKind = Literal["envelope_base64", "envelope_object", "add_event_request", "event"]
Publisher = Literal["device", "core"]

DEFAULT_MAX_BYTES: Final = 1024 * 1024
#: The DTO and envelope ``apiVersion``: EdgeX 3.x and 4.x both speak API v3.
API_VERSION: Final = "v3"
CONTENT_TYPE_JSON: Final = "application/json"
CONTENT_TYPE_CBOR: Final = "application/cbor"
DEFAULT_TOPIC_PREFIX: Final = "edgex"
#: Deepest nesting accepted anywhere in a message; guards the parsers and everything after them.
MAX_DOCUMENT_DEPTH: Final = 64
#: Deepest ``objectValue`` or ``tags`` value accepted and produced; well inside the document limit
#: even under an envelope, an AddEventRequest, an event and a reading.
MAX_VALUE_DEPTH: Final = 32

#: Float formatting of go-mod-core-contracts: 3.x and 4.0.0 format with ``fmt.Sprintf("%e")``,
#: 4.0.1 onwards with ``strconv.FormatFloat(v, 'e', -1, bits)`` (see :func:`float_style_for`).
SHORTEST_FLOATS_SINCE: Final = (4, 0, 1)
#: The float style of each EdgeX generation's device services, and the encoders' default: 3.x
#: writes ``%e``; 4.x the shortest form (contracts 4.0.1+; the short-lived 4.0.0 still wrote
#: ``%e``: pass ``float_style_for("4.0.0")`` to imitate it).
FLOAT_STYLE_BY_VERSION: Final[Mapping[str, FloatStyle]] = {"v3": "go_e", "v4": "shortest"}

#: Every ``reason`` :func:`decode_message` can raise for a whole message.
MESSAGE_REASONS: Final = frozenset(
    {
        "too_large",
        "bad_json",
        "bad_cbor",
        "bad_base64",
        "unsupported_content_type",
        "error_envelope",
        "unrecognized_message",
        "missing_field",
        "bad_field_type",
        "bad_field_value",
    }
)
#: Every ``reason`` a rejected reading can carry in :attr:`DecodeResult.rejected`.
READING_REASONS: Final = frozenset(
    {
        "missing_field",
        "bad_field_type",
        "bad_field_value",
        "unknown_value_type",
        "bad_value",
        "out_of_type_range",
        "bad_base64",
    }
)

_OBJECT_TYPES = ("Object", "ObjectArray")
_SURROGATE = re.compile("[\ud800-\udfff]")
#: A JSON escape that can make a surrogate (an escaped backslash before "ud8.." also matches: then
#: the full check runs, which is only slower).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_HEX32 = re.compile(r"[0-9a-fA-F]{32}")
_INT64 = (-(2**63), 2**63 - 1)
_CBOR_INTS = (-(2**64), 2**64 - 1)  # wider integers would need CBOR bignum tags, which fedge refuses
_FLOAT_LAYOUTS = {32: (23, 8, "<f", "<I"), 64: (52, 11, "<d", "<Q")}
# Go's url.PathEscape keeps these besides letters and digits; EdgeX then escapes + - . _ ~ too.
_TOPIC_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789$&:=@")


@dataclass(frozen=True)
class DecodeResult:
    """What one message held: its sound events, and one error per reading dropped from them.

    ``kind`` says how the message was wrapped and ``content_type`` how its event was encoded, so
    counters can tell EdgeX generations and encodings apart; ``correlation_id`` is the envelope's
    (empty without one), for matching fedge's logs with EdgeX's.
    """

    events: list[Event]
    rejected: list[ReadingError]
    kind: MessageKind
    content_type: ContentType
    correlation_id: str = ""


# --- decoding ------------------------------------------------------------------------------------


def decode_message(payload: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> DecodeResult:
    """The events in one EdgeX message-bus payload (any generation, JSON or CBOR, enveloped or not).

    The size is judged before any parsing, so an oversized message costs nothing. Raises
    :class:`ReadingError` (a ``reason`` from :data:`MESSAGE_REASONS`) when the message as a whole
    is unusable; drops and reports individual bad readings (see the module docstring).
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be positive, not {max_bytes}")
    if len(payload) > max_bytes:
        raise ReadingError("too_large", f"{len(payload)} bytes > {max_bytes}")
    data = bytes(payload)
    if _looks_like_cbor(data):
        doc = _load_cbor(data)
        if "payload" in doc or "contentType" in doc:
            raise ReadingError(
                "unsupported_content_type", "a CBOR-encoded envelope; EdgeX always JSON-encodes the envelope"
            )
        return _decode_body(doc, CONTENT_TYPE_CBOR, kind=None)
    doc = _load_json(data)
    if "payload" in doc or "contentType" in doc:
        return _decode_envelope(doc)
    return _decode_body(doc, CONTENT_TYPE_JSON, kind=None)


def _looks_like_cbor(data: bytes) -> bool:
    """A CBOR map starts with major type 5 (0xa0-0xbf); JSON text never does."""
    return bool(data) and 0xA0 <= data[0] <= 0xBF


def _load_json(data: bytes) -> dict[str, Any]:
    """A JSON object as Go's encoding/json would accept it: UTF-8, no NaN/Infinity, finite numbers.

    Nesting is bounded before parsing (:mod:`fedge.protocol.bounded_json`); the size already is, by
    :func:`decode_message` (an envelope's payload is smaller than the envelope).
    """
    try:
        doc = loads_bounded(data, max_bytes=len(data), max_depth=MAX_DOCUMENT_DEPTH)
    except BoundedJsonError as exc:
        if exc.reason == "too_deep":
            raise ReadingError("bad_json", f"nested deeper than {MAX_DOCUMENT_DEPTH} levels") from None
        raise ReadingError("bad_json", f"not UTF-8 JSON: {exc.detail[:120]}") from None
    if not isinstance(doc, dict):
        raise ReadingError("bad_json", "a message must be a JSON object")
    # What json.loads returns holds only dicts with text keys, lists, text, numbers, booleans and
    # None, nested no deeper than loads_bounded allowed: the one thing left to refuse is a lone
    # surrogate, which only a \uD800-\uDFFF escape can make (the bytes were strict UTF-8). The walk
    # over every node is skipped when no such escape is in the bytes: it was half of the decoding
    # cost of an EdgeX event (and every agent decodes every event on the bus).
    if _SURROGATE_ESCAPE.search(data):
        _check_document(doc, "bad_json")
    return doc


def _reject_tag(*_: object) -> NoReturn:
    raise ValueError("CBOR tags are not used by EdgeX")


# cbor2 decodes these tags itself (dates, bignums, shared and cyclic references, regular
# expressions, sets, ...); EdgeX never writes a tag, so every one of them is refused.
_NO_SEMANTIC_TAGS: Final = {
    tag: _reject_tag
    for tag in (*range(6), 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261, 1004, 43000, 55799)
}


def _load_cbor(data: bytes) -> dict[str, Any]:
    """One CBOR map with text keys and no tags, and nothing after it."""
    stream = io.BytesIO(data)
    decoder = cbor2.CBORDecoder(
        stream,
        tag_hook=_reject_tag,
        semantic_decoders=_NO_SEMANTIC_TAGS,
        max_depth=MAX_DOCUMENT_DEPTH,
        strict_hashable_types=True,
    )
    try:
        doc = decoder.decode()
    except cbor2.CBORDecodeEOF:
        raise ReadingError("bad_cbor", "truncated CBOR") from None
    except Exception as exc:  # hostile bytes into a third-party parser: nothing may escape
        raise ReadingError("bad_cbor", f"not CBOR: {str(exc)[:120]}") from None
    if stream.tell() != len(data):
        raise ReadingError("bad_cbor", f"{len(data) - stream.tell()} bytes after the CBOR item")
    if not isinstance(doc, dict):
        raise ReadingError("bad_cbor", "a message must be a CBOR map")
    _check_document(doc, "bad_cbor")
    return doc


def _check_document(doc: dict[str, Any], reason: str) -> None:
    """Refuses deep nesting, non-text keys, lone surrogates and non-JSON CBOR values anywhere.

    Done once, iteratively, so nothing later (validation, equality, re-encoding) can recurse
    dangerously; lone surrogates (``"\\ud800"``) are refused because no EdgeX encoder writes them
    and they cannot be stored as UTF-8.
    """
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > MAX_DOCUMENT_DEPTH:
                raise ReadingError(reason, f"nested deeper than {MAX_DOCUMENT_DEPTH} levels")
            if isinstance(node, dict):
                for key, value in node.items():
                    if not isinstance(key, str):
                        raise ReadingError(reason, "map keys must be text")
                    _check_text(key, reason)
                    stack.append((value, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in node)
        elif isinstance(node, str):
            _check_text(node, reason)
        elif not (node is None or isinstance(node, bool | int | float | bytes)):
            raise ReadingError(reason, f"unsupported {type(node).__name__} value")


def _check_text(text: str, reason: str) -> None:
    if not text.isascii() and _SURROGATE.search(text):
        raise ReadingError(reason, "text holds a lone UTF-16 surrogate")


def _decode_envelope(env: dict[str, Any]) -> DecodeResult:
    """A go-mod-messaging ``MessageEnvelope``: error code, content type, then the payload."""
    for key in ("apiVersion", "receivedTopic", "correlationID", "requestID", "contentType"):
        if env.get(key) is not None and not isinstance(env[key], str):
            raise ReadingError("bad_field_type", f"envelope {key} must be a string")
    query = env.get("queryParams")
    if query is not None and not (
        isinstance(query, dict) and all(isinstance(v, str) for v in query.values())
    ):
        raise ReadingError("bad_field_type", "envelope queryParams must map strings to strings")
    error_code = env.get("errorCode", 0)
    if error_code is None:
        error_code = 0
    if isinstance(error_code, bool) or not isinstance(error_code, int):
        raise ReadingError("bad_field_type", "envelope errorCode must be an integer")
    if error_code != 0:
        raise ReadingError("error_envelope", f"errorCode {error_code}: {str(env.get('payload'))[:120]!r}")
    content_type = env.get("contentType") or ""
    if content_type not in (CONTENT_TYPE_JSON, CONTENT_TYPE_CBOR):
        raise ReadingError("unsupported_content_type", f"contentType {content_type[:64]!r}")
    if "payload" not in env:
        raise ReadingError("missing_field", "envelope has no payload")
    body = env["payload"]
    correlation_id = env.get("correlationID") or ""
    if isinstance(body, dict):  # EdgeX 4.x: the AddEventRequest itself
        return _decode_body(body, CONTENT_TYPE_JSON, "envelope_object", correlation_id)
    if not isinstance(body, str):
        raise ReadingError("bad_field_type", "envelope payload must be base64 text or an object")
    raw = _b64decode(body, "envelope payload")
    if content_type == CONTENT_TYPE_CBOR:
        if not _looks_like_cbor(raw):
            raise ReadingError("bad_cbor", "envelope payload is not a CBOR map")
        return _decode_body(_load_cbor(raw), CONTENT_TYPE_CBOR, "envelope_base64", correlation_id)
    return _decode_body(_load_json(raw), CONTENT_TYPE_JSON, "envelope_base64", correlation_id)


_EVENT_KEYS = ("readings", "sourceName", "deviceName", "profileName")


def _decode_body(
    doc: dict[str, Any],
    content_type: ContentType,
    kind: MessageKind | None,
    correlation_id: str = "",
) -> DecodeResult:
    """An ``AddEventRequest`` (it has ``event``) or a bare ``Event`` (it has event fields)."""
    if "event" in doc:
        for key in ("apiVersion", "requestId"):
            if doc.get(key) is not None and not isinstance(doc[key], str):
                raise ReadingError("bad_field_type", f"AddEventRequest {key} must be a string")
        event_doc = doc["event"]
        if not isinstance(event_doc, dict):
            raise ReadingError("bad_field_type", "AddEventRequest event must be an object")
        kind = kind or "add_event_request"
    elif any(key in doc for key in _EVENT_KEYS):
        event_doc = doc
        kind = kind or "event"
    else:
        raise ReadingError("unrecognized_message", "neither an envelope, an AddEventRequest nor an Event")
    event, rejected = _decode_event(event_doc, binary_as_bytes=content_type == CONTENT_TYPE_CBOR)
    events = [event] if event is not None else []
    return DecodeResult(events, rejected, kind, content_type, correlation_id)


def _decode_event(doc: dict[str, Any], binary_as_bytes: bool) -> tuple[Event | None, list[ReadingError]]:
    """The event header must be sound (else raise); its readings are judged one by one."""
    event_id = _required_str(doc, "id", "event")
    if not _is_uuid(event_id):
        raise ReadingError("bad_field_value", f"event id {event_id[:64]!r} is not a UUID")
    device = _name(doc, "deviceName", "event")
    profile = _name(doc, "profileName", "event")
    source = _name(doc, "sourceName", "event")
    origin = _origin(doc, "event")
    raw_readings = doc.get("readings")
    if raw_readings is None:
        raise ReadingError("missing_field", "event has no readings")
    if not isinstance(raw_readings, list):
        raise ReadingError("bad_field_type", "event readings must be an array")
    if not raw_readings:
        raise ReadingError("bad_field_value", "event has no readings (EdgeX requires at least one)")
    tags = doc.get("tags")
    if tags is None:
        tags = {}
    elif not isinstance(tags, dict):
        raise ReadingError("bad_field_type", "event tags must be an object")
    elif problem := _plain_value_problem(tags):
        raise ReadingError("bad_field_value", f"event tags: {problem}")
    rejected: list[ReadingError] = []
    readings = _decode_simple_readings(raw_readings)
    if readings is not None:
        return Event(event_id, device, profile, source, origin, tuple(readings), tags), rejected
    readings = []
    names: dict[str, str] = {}  # the event's non-blank names
    units_seen: dict[str, str] = {}
    for index, raw in enumerate(raw_readings):
        try:
            fast = _decode_simple_reading(raw, names, units_seen)
            readings.append(fast if fast is not None else _decode_reading(raw, binary_as_bytes))
        except ReadingError as exc:
            detail = str(exc)[len(exc.reason) + 2 :]
            rejected.append(ReadingError(exc.reason, f"event {event_id} reading {index}: {detail}"))
    if not readings:
        return None, rejected
    return Event(event_id, device, profile, source, origin, tuple(readings), tags), rejected


def _is_uuid(text: str) -> bool:
    """What google/uuid.Parse accepts: canonical, ``{canonical}``, ``urn:uuid:canonical``, 32 hex."""
    if len(text) == 38 and text[0] == "{" and text[-1] == "}":
        text = text[1:-1]
    elif len(text) == 45 and text[:9].lower() == "urn:uuid:":
        text = text[9:]
    return bool(_UUID.fullmatch(text) or _HEX32.fullmatch(text))


#: valueType spellings taken as they are by the fast path (others go through normalize_value_type).
_SIMPLE_TYPES: Final = {t: t for t in VALUE_TYPES if t != "Binary" and t not in _OBJECT_TYPES}
#: Float types and the magnitude their values must stay under (readings.parse_scalar's rule).
_FLOAT_LIMITS: Final = {"Float32": FLOAT32_ROUNDS_TO_INF, "Float64": math.inf}
_GO_DECIMAL_FULL: Final = GO_DECIMAL.fullmatch
#: The bytes of Go's decimal syntax and the newline between values (_simple_values).
_DECIMAL_BYTES: Final = b"0123456789+-.eE\n"


def _decode_simple_readings(raws: list[Any]) -> list[Reading] | None:
    """Every reading of an event at once when each is a simple reading that
    :func:`_decode_simple_reading` would take and every float value parses in range; else None
    (then the readings are judged one by one, and the bad ones reported as always).

    Why: an event of the demo carries 350 readings; checking each field as a column (a few C
    loops over the event: ``map``, ``count``, ``sum``, one ``float`` each) instead of reading by
    reading halves the decoder's own cost per reading. The readings are equal to those the one-by-
    one path makes. Anything unusual (a null value, a reading ``id`` on some readings only, a
    field of another type) takes the one-by-one path, which is always right, only slower.
    """
    try:
        # dict.get refuses anything but a dict (TypeError): every reading is an object.
        value_types = _column(raws, "valueType")
        types = set(value_types)  # TypeError: unhashable
        if not types <= _SIMPLE_TYPES.keys():
            return None
        origins = _column(raws, "origin")
        # Integers only: a float makes the sum a float, text or null raise; true/false are
        # refused by value (and so are 0 and 1, which then take the one-by-one path).
        if type(sum(origins)) is not int or True in origins or False in origins:
            return None
        if min(origins) < _INT64[0] or max(origins) > _INT64[1]:
            return None
        names: list[list[str] | Iterator[str]] = []
        for key in ("deviceName", "resourceName", "profileName"):
            column = _column(raws, key)
            distinct = set(column)
            if any(type(name) is not str or not name or name.isspace() for name in distinct):
                return None
            names.append(repeat(column[0]) if len(distinct) == 1 else _shared(column, distinct))
        units = _optional_strings(_column(raws, "units"))
        ids = _optional_strings(_column(raws, "id"))
        if units is None or ids is None or _column(raws, "tags").count(None) != len(raws):
            return None
        values = _simple_values(value_types, types, _column(raws, "value"))
    except (TypeError, ValueError, ReadingError):  # one-by-one says what is wrong, if anything
        return None
    if values is None:
        return None
    return new_readings(
        len(raws),
        (
            *names,
            map(_SIMPLE_TYPES.__getitem__, value_types),
            values,
            origins,
            units,
            repeat(""),
            ids,
        ),
    )


def _column(raws: list[dict[str, Any]], key: str) -> list[Any]:
    """Every reading's ``key`` (None where absent), in order."""
    return list(map(dict.get, raws, repeat(key)))


def _optional_strings(column: list[Any]) -> Iterator[str] | list[str] | None:
    """An optional text field of every reading: all absent (``""`` each), all text (one
    string object per distinct value), or None for anything else."""
    nones = column.count(None)
    if nones == len(column):
        return repeat("")
    if nones:
        return None
    list(map(str.__len__, column))  # TypeError unless every one is text
    return _shared(column, set(column))


def _shared(column: list[str], distinct: set[str]) -> list[str]:
    """``column`` with one string object per distinct value: a queued backlog holds each name
    once per event, not once per reading."""
    one = {name: name for name in distinct}
    return list(map(one.__getitem__, column))


def _simple_values(value_types: list[str], types: set[str], texts: list[Any]) -> list[Value] | None:
    """The values of simple readings, or None when one is not plain: a float type's text must be
    a decimal of at most 64 characters, in range, parsed at once (``float`` accepts nothing
    else made of ``0-9 + - . e E``), a String's is itself; other types go through
    :func:`_parse_simple` (which raises ReadingError for a bad one)."""
    if texts.count(None):
        return None  # a null reading: one by one
    if types <= _FLOAT_LIMITS.keys():
        is_float: list[bool] | None = None
        floats: list[str] = texts
    else:
        is_float = list(map(_FLOAT_LIMITS.__contains__, value_types))
        floats = list(compress(texts, is_float))
    parsed: list[float] = []
    if floats:
        joined = "\n".join(floats)  # TypeError unless all are text
        if (
            joined.count("\n") != len(floats) - 1  # a text holding a newline
            or not joined.isascii()
            or joined.encode("ascii").translate(None, _DECIMAL_BYTES)
            or max(map(len, floats)) > 64
        ):
            return None
        parsed = list(map(float, floats))  # ValueError: not a decimal
        limit = min(_FLOAT_LIMITS[t] for t in types if t in _FLOAT_LIMITS)
        if max(map(abs, parsed)) >= limit:  # infinity, or beyond a float32
            return None
    if is_float is None:
        return list(parsed)
    values: list[Value] = list(texts)
    list(map(values.__setitem__, compress(range(len(texts)), is_float), parsed))
    if not types - _FLOAT_LIMITS.keys() <= {"String"}:
        list(map(str.__len__, texts))  # TypeError unless every one is text
        for i, value_type, text in zip(range(len(texts)), value_types, texts, strict=True):
            if value_type not in _FLOAT_LIMITS and value_type != "String":
                values[i] = _parse_simple(value_type, text)
    else:
        list(map(str.__len__, compress(texts, map(not_, is_float))))  # the Strings are text
    return values


def _decode_simple_reading(
    raw: Any, names: dict[str, str], units_seen: dict[str, str] | None = None
) -> Reading | None:
    """The common reading (a simple value, every field of the right type), or None: then
    :func:`_decode_reading` judges it and reports its first problem in DTO order.

    Why: an agent decodes every reading on the EdgeX bus (1.23 M in the demo's backlog). Checking
    each field once, in place, is several times faster than the general path, and the names every
    reading of an event repeats (device, resource, profile, units) are kept once per event
    (``names``, ``units_seen``), not once per reading: a queued backlog is about a third smaller.
    A float value in range is parsed here; any other value goes through :func:`_parse_simple`, and may still
    raise (its parse is the last check on both paths, so the error is the same).
    """
    if type(raw) is not dict:
        return None
    get = raw.get
    origin = get("origin")
    device = get("deviceName")
    resource = get("resourceName")
    profile = get("profileName")
    value_type = _SIMPLE_TYPES.get(get("valueType"))  # type: ignore[arg-type]
    text = get("value")
    if (
        value_type is None
        or type(origin) is not int
        or not _INT64[0] <= origin <= _INT64[1]
        or origin == 0
        or type(device) is not str
        or type(resource) is not str
        or type(profile) is not str
        or not (text is None or type(text) is str)
    ):
        return None
    # Names: the same few strings in every reading; each checked once per event.
    device = names.get(device) or _new_name(device, names)
    resource = names.get(resource) or _new_name(resource, names)
    profile = names.get(profile) or _new_name(profile, names)
    if device is None or resource is None or profile is None:
        return None
    units = get("units")
    reading_id = get("id")
    if units is not None:
        if type(units) is not str:
            return None
        units = units if units_seen is None else units_seen.setdefault(units, units)
    if reading_id is not None and type(reading_id) is not str:
        return None
    tags = get("tags")
    if tags is not None and type(tags) is not dict:
        return None
    value: Value
    if text is None:
        value = None
    else:
        limit = _FLOAT_LIMITS.get(value_type)
        if limit is not None and len(text) <= 64 and _GO_DECIMAL_FULL(text) is not None:
            value = float(text)
            if not -limit < value < limit:  # infinity, or beyond float32: the general parse says why
                value = _parse_simple(value_type, text)
        else:
            value = _parse_simple(value_type, text)
    return new_reading(
        (device, resource, profile, value_type, value, origin, units or "", "", reading_id or "")
    )


def _new_name(name: str, names: dict[str, str]) -> str | None:
    """A name not yet seen in this event: kept if it is not blank (EdgeX refuses blank names)."""
    if not name or name.isspace():
        return None
    names[name] = name
    return name


def _decode_reading(raw: Any, binary_as_bytes: bool) -> Reading:
    """One ``BaseReading``; fields are checked in DTO order, so the first problem is reported."""
    if not isinstance(raw, dict):
        raise ReadingError("bad_field_type", "a reading must be an object")
    reading_id = _optional_str(raw, "id", "reading")
    origin = _origin(raw, "reading")
    device = _name(raw, "deviceName", "reading")
    resource = _name(raw, "resourceName", "reading")
    profile = _name(raw, "profileName", "reading")
    value_type = normalize_value_type(_required_str(raw, "valueType", "reading"))
    units = _optional_str(raw, "units", "reading")
    # Reading-level tags are valid EdgeX but fedge's Reading has no field for them: checked, dropped.
    if raw.get("tags") is not None and not isinstance(raw["tags"], dict):
        raise ReadingError("bad_field_type", "reading tags must be an object")
    media_type = ""
    value: Value
    if value_type == "Binary":
        # EdgeX 3.0 also wrote "value": "" on binary and object readings; it is ignored.
        media_type = _optional_str(raw, "mediaType", "reading")
        value = _binary_value(raw.get("binaryValue"), binary_as_bytes)
        if value and not media_type:
            raise ReadingError("missing_field", "a binary reading needs a mediaType")
    elif value_type in _OBJECT_TYPES:
        value = raw.get("objectValue")
        if value is not None and (problem := _plain_value_problem(value)):
            raise ReadingError("bad_value", f"objectValue: {problem}")
    else:
        text = raw.get("value")
        if text is not None and not isinstance(text, str):
            raise ReadingError("bad_field_type", f"a {value_type} value must be a string")
        value = None if text is None else _parse_simple(value_type, text)
    # An absent or null value field is EdgeX's null reading (dtos.BaseReading.Unmarshal).
    return Reading(device, resource, profile, value_type, value, origin, units, media_type, reading_id)


def _binary_value(raw: Any, as_bytes: bool) -> bytes | None:
    if raw is None:
        return None
    if as_bytes:
        if not isinstance(raw, bytes):
            raise ReadingError("bad_field_type", "binaryValue must be a CBOR byte string")
        return raw
    if not isinstance(raw, str):
        raise ReadingError("bad_field_type", "binaryValue must be base64 text")
    return _b64decode(raw, "binaryValue")


def _parse_simple(value_type: str, text: str) -> Value:
    """readings.parse_value, with its one leak closed so only ReadingError leaves here.

    ``parse_scalar`` lets ``int()`` raise ValueError on texts such as ``"+-5"`` or ``"²"``
    (``lstrip("+-")`` and ``str.isdigit`` are looser than ``int``).
    """
    try:
        return parse_value(value_type, text)
    except ValueError:
        raise ReadingError("bad_value", f"{text[:64]!r} is not a {value_type}") from None


def _b64decode(text: str, what: str) -> bytes:
    """Strict standard base64 with padding: what Go's encoding/json writes for ``[]byte``."""
    try:
        return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (UnicodeEncodeError, binascii.Error, ValueError) as exc:
        raise ReadingError("bad_base64", f"{what} is not base64: {str(exc)[:80]}") from None


def _required_str(doc: dict[str, Any], key: str, where: str) -> str:
    value = doc.get(key)
    if value is None:  # Go decodes null into a string as "", which "required" refuses
        raise ReadingError("missing_field", f"{where} has no {key}")
    if not isinstance(value, str):
        raise ReadingError("bad_field_type", f"{where} {key} must be a string")
    return value


def _optional_str(doc: dict[str, Any], key: str, where: str) -> str:
    value = doc.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ReadingError("bad_field_type", f"{where} {key} must be a string")
    return value


def _name(doc: dict[str, Any], key: str, where: str) -> str:
    """A name field: EdgeX's ``edgex-dto-none-empty-string`` refuses blank ones."""
    value = _required_str(doc, key, where)
    if not value.strip():
        raise ReadingError("bad_field_value", f"{where} {key} is blank")
    return value


def _origin(doc: dict[str, Any], where: str) -> int:
    """Unix nanoseconds as an int64; ``validate:"required"`` makes 0 invalid."""
    value = doc.get("origin")
    if value is None:
        raise ReadingError("missing_field", f"{where} has no origin")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ReadingError("bad_field_type", f"{where} origin must be an integer")
    if value == 0 or not _INT64[0] <= value <= _INT64[1]:
        raise ReadingError("bad_field_value", f"{where} origin {value} is not a non-zero int64")
    return value


def _plain_value_problem(value: Any) -> str | None:
    """Why ``value`` is not a JSON value fedge can store and send both as JSON and CBOR, or None."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > MAX_VALUE_DEPTH:
                return f"nested deeper than {MAX_VALUE_DEPTH} levels"
            if isinstance(node, dict):
                if not all(isinstance(key, str) for key in node):
                    return "object keys must be strings"
                if any(_SURROGATE.search(key) for key in node if not key.isascii()):
                    return "text holds a lone UTF-16 surrogate"
                stack.extend((item, depth + 1) for item in node.values())
            else:
                stack.extend((item, depth + 1) for item in node)
        elif isinstance(node, str):
            if not node.isascii() and _SURROGATE.search(node):
                return "text holds a lone UTF-16 surrogate"
        elif isinstance(node, float):
            if not math.isfinite(node):
                return f"{node} is not a JSON number"
        elif isinstance(node, int) and not isinstance(node, bool):
            if not _CBOR_INTS[0] <= node <= _CBOR_INTS[1]:
                return f"integer {node} does not fit 64 bits"
        elif not (node is None or isinstance(node, bool)):
            return f"{type(node).__name__} is not a JSON value"
    return None


# --- float formatting ------------------------------------------------------------------------------


def float_style_for(contracts_version: str) -> FloatStyle:
    """The float style a go-mod-core-contracts release writes (``"3.1.1"``, ``"v4.0.2"``, ...).

    Contracts 3.x and 4.0.0 format with ``%e``; 4.0.1 and later with the shortest form.
    """
    parts = contracts_version.removeprefix("v").split("-")[0].split(".")
    try:
        numbers = tuple(int(part) for part in parts)
    except ValueError:
        raise ValueError(f"not a version: {contracts_version!r}") from None
    padded = (*numbers, 0, 0, 0)[:3]
    return "shortest" if padded >= SHORTEST_FLOATS_SINCE else "go_e"


def format_float(value: float, bits: Literal[32, 64] = 64, style: FloatStyle = "shortest") -> str:
    """A float exactly as EdgeX's Go code writes it.

    ``"go_e"`` is ``fmt.Sprintf("%e", v)``: six digits after the point, an exponent of at least two
    digits (``2.310000e+01``). ``"shortest"`` is ``strconv.FormatFloat(v, 'e', -1, bits)``: the
    fewest digits that read back as the same float32 or float64 (``2.31e+01``; float32 0.1 is
    ``1e-01``), closest to the exact value, ties to even — Go's Ryū, recomputed exactly with
    integers. NaN and infinities come out as Go writes them: ``NaN``, ``+Inf``, ``-Inf``.
    """
    if bits not in (32, 64):
        raise ValueError(f"bits must be 32 or 64, not {bits}")
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    number = _to_float32(value) if bits == 32 else float(value)
    if style == "go_e":
        # Python's %e is correctly rounded (ties to even) with a two-digit minimum exponent: Go's.
        return format(number, ".6e")
    if style != "shortest":
        raise ValueError(f"unknown float style {style!r}")
    sign = "-" if math.copysign(1.0, number) < 0 else ""
    if number == 0:
        return sign + "0e+00"
    digits, exponent = _shortest_digits(abs(number), bits)
    mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return f"{sign}{mantissa}e{'-' if exponent < 0 else '+'}{abs(exponent):02d}"


def _to_float32(value: float) -> float:
    """Go's ``float32(v)``: round to nearest float32; fedge refuses values that overflow to Inf."""
    try:
        rounded: float = struct.unpack("<f", struct.pack("<f", value))[0]
    except OverflowError:
        raise ReadingError("out_of_type_range", f"{value!r} does not fit Float32") from None
    return rounded


def _shortest_digits(value: float, bits: int) -> tuple[str, int]:
    """The shortest decimal digits that round to ``value`` in IEEE ``bits``, and the exponent of the
    first digit; ``value`` is positive and finite.

    The float is ``mant * 2**exp2``; every decimal inside its rounding interval (half-way to its
    neighbours, the lower half narrower at a binade's edge, both ends included when ``mant`` is
    even because parsing ties to even) reads back as it. The largest power of ten ``10**p`` with
    a multiple inside the interval gives the fewest digits; the multiple nearest the exact value
    (ties to even) is the one Go picks.
    """
    mant_bits, exp_bits, float_code, int_code = _FLOAT_LAYOUTS[bits]
    raw = struct.unpack(int_code, struct.pack(float_code, value))[0]
    biased = (raw >> mant_bits) & ((1 << exp_bits) - 1)
    fraction = raw & ((1 << mant_bits) - 1)
    bias = (1 << (exp_bits - 1)) - 1
    if biased == 0:
        mant, exp2 = fraction, 1 - bias - mant_bits
    else:
        mant, exp2 = fraction | (1 << mant_bits), biased - bias - mant_bits
    # In units of 2**(exp2 - 2): the value, and the ends of its rounding interval.
    center = 4 * mant
    upper = center + 2
    lower = center - 1 if fraction == 0 and biased > 1 else center - 2
    inclusive = mant % 2 == 0
    shift = exp2 - 2
    power = math.floor(math.log10(value)) + 2
    while True:
        low_k, high_k, den, scale = _multiples_in(lower, upper, shift, power, inclusive)
        if low_k <= high_k:
            break
        power -= 1
    quotient, remainder = divmod(center * scale, den)
    if 2 * remainder > den or (2 * remainder == den and quotient % 2 == 1):
        quotient += 1
    k = min(max(quotient, low_k), high_k)
    text = str(k)
    return text.rstrip("0"), power + len(text) - 1


def _multiples_in(
    lower: int,
    upper: int,
    shift: int,
    power: int,
    inclusive: bool,
) -> tuple[int, int, int, int]:
    """The range of k with ``k * 10**power`` inside ``[lower, upper] * 2**shift``, as exact integers.

    Returns ``(low_k, high_k, den, scale)`` where a unit ``n`` is ``n * scale / den`` multiples.
    """
    scale, den = 1, 1
    if shift >= 0:
        scale <<= shift
    else:
        den <<= -shift
    if power >= 0:
        den *= 10**power
    else:
        scale *= 10**-power
    low, high = lower * scale, upper * scale
    if inclusive:
        return -(-low // den), high // den, den, scale
    return low // den + 1, -(-high // den) - 1, den, scale


# --- encoding ------------------------------------------------------------------------------------


def format_value(value_type: str, value: Value, style: FloatStyle = "shortest") -> str:
    """A simple reading's value string, as go-mod-core-contracts' ``NewSimpleReading`` writes it.

    Bools ``true``/``false``, integers in decimal, floats per ``style``; arrays ``[a, b]`` (Go's
    ``%v`` of the slice with every space turned into ``", "`` — so, as in EdgeX, a StringArray
    element containing a space does not survive).
    """
    value_type = normalize_value_type(value_type)
    if value_type in ARRAY_TYPES:
        if not isinstance(value, tuple | list):
            raise ReadingError("bad_value", f"a {value_type} value must be a sequence")
        element_type = value_type[: -len("Array")]
        parts = [_format_scalar(element_type, item, style) for item in value]
        if element_type in FLOAT_TYPES:
            return "[" + ", ".join(parts) + "]"
        return ("[" + " ".join(parts) + "]").replace(" ", ", ")
    if value_type in ("Binary", *_OBJECT_TYPES):
        raise ReadingError("bad_value", f"{value_type} readings carry binaryValue/objectValue, not value")
    return _format_scalar(value_type, value, style)


def _format_scalar(value_type: str, value: Value, style: FloatStyle) -> str:
    if value_type == "String":
        if not isinstance(value, str):
            raise ReadingError("bad_value", "a String value must be a str")
        return value
    if value_type == "Bool":
        if not isinstance(value, bool):
            raise ReadingError("bad_value", "a Bool value must be a bool")
        return "true" if value else "false"
    if value_type in INT_RANGES:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ReadingError("bad_value", f"a {value_type} value must be an int")
        lo, hi = INT_RANGES[value_type]
        if not lo <= value <= hi:
            raise ReadingError("out_of_type_range", f"{value} does not fit {value_type}")
        return str(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReadingError("bad_value", f"a {value_type} value must be a float")
    try:
        number = float(value)
    except OverflowError:
        raise ReadingError("out_of_type_range", f"{value} does not fit {value_type}") from None
    return format_float(number, 32 if value_type == "Float32" else 64, style)


def event_to_dto(
    event: Event,
    style: FloatStyle = "shortest",
    *,
    content_type: str = CONTENT_TYPE_JSON,
) -> dict[str, Any]:
    """The EdgeX ``Event`` DTO of ``event``, keys in the order Go marshals them.

    Binary values are base64 text for JSON and bytes for CBOR. Refuses (ReadingError, the
    decoder's reasons) anything EdgeX would refuse, so the simulator never publishes what a real
    device service could not.
    """
    event_id = _checked_name(event.id, "event id")
    if not _is_uuid(event_id):
        raise ReadingError("bad_field_value", f"event id {event_id[:64]!r} is not a UUID")
    if not event.readings:
        raise ReadingError("bad_field_value", "event has no readings (EdgeX requires at least one)")
    dto: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "id": event_id,
        "deviceName": _checked_name(event.device, "event deviceName"),
        "profileName": _checked_name(event.profile, "event profileName"),
        "sourceName": _checked_name(event.source, "event sourceName"),
        "origin": _checked_origin(event.origin_ns, "event"),
        "readings": [_reading_to_dto(r, style, _checked_content_type(content_type)) for r in event.readings],
    }
    if event.tags:
        if problem := _plain_value_problem(event.tags):
            raise ReadingError("bad_field_value", f"event tags: {problem}")
        dto["tags"] = _go_sorted(event.tags)
    return dto


def _reading_to_dto(reading: Reading, style: FloatStyle, content_type: ContentType) -> dict[str, Any]:
    """dtos.BaseReading's marshal: optional id and units omitted when empty, one value field."""
    value_type = normalize_value_type(reading.value_type)
    dto: dict[str, Any] = {}
    if reading.id:
        dto["id"] = reading.id
    dto["origin"] = _checked_origin(reading.origin_ns, "reading")
    dto["deviceName"] = _checked_name(reading.device, "reading deviceName")
    dto["resourceName"] = _checked_name(reading.resource, "reading resourceName")
    dto["profileName"] = _checked_name(reading.profile, "reading profileName")
    dto["valueType"] = value_type
    if reading.units:
        dto["units"] = reading.units
    value = reading.value
    if value is None:  # EdgeX's null reading: all three value fields null, no mediaType
        dto.update(value=None, binaryValue=None, objectValue=None)
    elif value_type == "Binary":
        if not isinstance(value, bytes):
            raise ReadingError("bad_value", "a Binary value must be bytes")
        if value and not reading.media_type:
            raise ReadingError("missing_field", "a binary reading needs a mediaType")
        if value:  # omitempty: EdgeX drops an empty binaryValue, which then reads back as null
            dto["binaryValue"] = value if content_type == CONTENT_TYPE_CBOR else b64encode(value).decode()
        if reading.media_type:
            dto["mediaType"] = reading.media_type
    elif value_type in _OBJECT_TYPES:
        if problem := _plain_value_problem(value):
            raise ReadingError("bad_value", f"objectValue: {problem}")
        dto["objectValue"] = _go_sorted(value)
    else:
        dto["value"] = format_value(value_type, value, style)
    return dto


def _checked_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ReadingError("bad_field_value", f"{what} is blank")
    return name


def _checked_origin(origin: int, where: str) -> int:
    if (
        isinstance(origin, bool)
        or not isinstance(origin, int)
        or origin == 0
        or not (_INT64[0] <= origin <= _INT64[1])
    ):
        raise ReadingError("bad_field_value", f"{where} origin {origin!r} is not a non-zero int64")
    return origin


def _go_sorted(value: Any) -> Any:
    """Go's encoding/json writes map keys sorted; depth is already bounded by MAX_VALUE_DEPTH."""
    if isinstance(value, dict):
        return {key: _go_sorted(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_go_sorted(item) for item in value]
    return value


def _checked_content_type(content_type: str) -> ContentType:
    if content_type == CONTENT_TYPE_JSON:
        return CONTENT_TYPE_JSON
    if content_type == CONTENT_TYPE_CBOR:
        return CONTENT_TYPE_CBOR
    raise ValueError(
        f"unsupported content type {content_type!r}; expected {CONTENT_TYPE_JSON} or {CONTENT_TYPE_CBOR}"
    )


def _dumps(document: dict[str, Any], content_type: ContentType) -> bytes:
    return cbor2.dumps(document) if content_type == CONTENT_TYPE_CBOR else _go_json(document)


def _go_json(document: dict[str, Any]) -> bytes:
    """Compact JSON with Go's escaping of ``<``, ``>``, ``&``, U+2028 and U+2029, as UTF-8.

    Strings and the DTOs' own numbers come out byte-for-byte as Go's; floats inside objectValue
    and tags keep Python's spelling (``1e-07`` where Go writes ``1e-7``), the same value.
    """
    text = json.dumps(document, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for char, escape in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, escape)
    return text.encode("utf-8")


def encode_add_event_request(
    event: Event,
    *,
    request_id: str,
    content_type: str = CONTENT_TYPE_JSON,
    float_style: FloatStyle = "shortest",
) -> bytes:
    """``requests.AddEventRequest`` bytes: ``{apiVersion, requestId, event}`` as JSON or CBOR.

    This is a device service's REST body to core-data and the bare payload of EdgeX's NATS format.
    """
    content_type = _checked_content_type(content_type)
    body = {
        "apiVersion": API_VERSION,
        "requestId": request_id,
        "event": event_to_dto(event, float_style, content_type=content_type),
    }
    return _dumps(body, content_type)


def encode_envelope(
    event: Event,
    version: str = "v4",
    topic: str = "",
    *,
    content_type: str = CONTENT_TYPE_JSON,
    correlation_id: str | None = None,
    request_id: str | None = None,
    float_style: FloatStyle | None = None,
) -> bytes:
    """A device service's message-bus message for ``event``, as EdgeX ``version`` publishes it.

    v3: ``payload`` is base64 of the AddEventRequest (JSON or CBOR). v4: a JSON AddEventRequest is
    embedded as an object; CBOR is base64, exactly as in v3. ``float_style`` defaults to
    :data:`FLOAT_STYLE_BY_VERSION` of ``version``.

    ``topic`` is where the message is going; it is checked (a concrete topic, no wildcards) but
    not written: a publishing device service leaves ``receivedTopic`` empty and the receiving
    client fills it in. ``request_id`` becomes the AddEventRequest's ``requestId`` (the envelope's
    own ``requestID`` stays empty, as EdgeX leaves it); both ids are fresh UUIDs when not given,
    as EdgeX makes them — pass them for reproducible bytes.
    """
    if version not in FLOAT_STYLE_BY_VERSION:
        raise ValueError(f"unknown EdgeX envelope version {version!r}; expected v3 or v4")
    if topic and any(c in topic for c in "+#\x00"):
        raise ValueError(f"{topic!r} is not a topic a message can be published on")
    content_type = _checked_content_type(content_type)
    style = float_style or FLOAT_STYLE_BY_VERSION[version]
    correlation_id = str(uuid.uuid4()) if correlation_id is None else correlation_id
    request_id = str(uuid.uuid4()) if request_id is None else request_id
    payload: Any
    if version == "v4" and content_type == CONTENT_TYPE_JSON:
        payload = {
            "apiVersion": API_VERSION,
            "requestId": request_id,
            "event": event_to_dto(event, style, content_type=content_type),
        }
    else:
        body = encode_add_event_request(
            event, request_id=request_id, content_type=content_type, float_style=style
        )
        payload = b64encode(body).decode("ascii")
    envelope = {
        "apiVersion": API_VERSION,
        "receivedTopic": "",
        "correlationID": correlation_id,
        "requestID": "",
        "errorCode": 0,
        "payload": payload,
        "contentType": content_type,
    }
    return _go_json(envelope)


def encode_plain_event(event: Event, *, float_style: FloatStyle = "shortest") -> bytes:
    """The bare Event JSON app-service-configurable's ``mqtt-export`` publishes."""
    return _go_json(event_to_dto(event, float_style))


# --- topics --------------------------------------------------------------------------------------


def edgex_topic_escape(name: str) -> str:
    """A name as EdgeX writes it into a topic with ``EnableNameFieldEscape``.

    go-mod-core-contracts' ``URLEncode``: Go's ``url.PathEscape`` (UTF-8 bytes as ``%XX``, upper
    case) and then ``+ - . _ ~`` escaped too, so only letters, digits and ``$ & : = @`` remain.
    """
    return "".join(chr(b) if b in _TOPIC_SAFE else f"%{b:02X}" for b in name.encode("utf-8"))


def edgex_event_topic(
    prefix: str,
    service: str,
    profile: str,
    device: str,
    source: str,
    *,
    publisher: Publisher = "device",
    escape: bool = False,
) -> str:
    """``{prefix}/events/device/{service}/{profile}/{device}/{source}`` (``events/core/...`` for
    core-data's republish of REST-posted events).

    With ``escape`` the names are escaped as EdgeX's ``EnableNameFieldEscape`` does. Without it a
    name containing ``/``, ``+`` or ``#`` would change the topic's shape or be refused by the
    broker, so it raises ReadingError(``bad_topic_name``).
    """
    names = [service, profile, device, source]
    return "/".join(
        [_checked_prefix(prefix), "events", _publisher(publisher), *(_topic_level(n, escape) for n in names)]
    )


def edgex_event_filter(
    prefix: str = DEFAULT_TOPIC_PREFIX,
    *,
    publisher: Publisher = "device",
    service: str | None = None,
    profile: str | None = None,
    device: str | None = None,
    source: str | None = None,
    escape: bool = False,
) -> str:
    """An MQTT subscription filter for events: unnamed levels are ``+``, trailing ones one ``#``.

    ``edgex_event_filter(device="Room 2")`` is ``edgex/events/device/+/+/Room 2/#``.
    """
    levels: list[str | None] = [service, profile, device, source]
    while levels and levels[-1] is None:
        levels.pop()
    parts = ["+" if name is None else _topic_level(name, escape) for name in levels]
    if len(parts) < 4:
        parts.append("#")
    return "/".join([_checked_prefix(prefix), "events", _publisher(publisher), *parts])


def edgex_event_filters(prefix: str = DEFAULT_TOPIC_PREFIX) -> tuple[str, str]:
    """Both event trees under ``prefix``: device services' events and core-data's republished ones.

    They never carry the same event: core-data republishes only events posted to it over REST.
    """
    return (edgex_event_filter(prefix), edgex_event_filter(prefix, publisher="core"))


def _publisher(publisher: str) -> str:
    if publisher not in ("device", "core"):
        raise ValueError(f"publisher must be 'device' or 'core', not {publisher!r}")
    return publisher


def _checked_prefix(prefix: str) -> str:
    if not prefix or any(c in prefix for c in "+#\x00") or "" in prefix.split("/"):
        raise ValueError(f"bad EdgeX topic prefix {prefix!r}")
    return prefix


def _topic_level(name: str, escape: bool) -> str:
    if not name:
        raise ReadingError("bad_topic_name", "a topic name level is empty")
    if escape:
        return edgex_topic_escape(name)
    if any(c in name for c in "/+#\x00"):
        raise ReadingError("bad_topic_name", f"{name[:64]!r} holds / + # or NUL; publish with escape=True")
    return name
