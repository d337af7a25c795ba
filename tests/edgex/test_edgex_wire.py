"""EdgeX wire format: golden messages of every kind, Go's float formats, every refusal, fuzzing.

The golden files in ``tests/golden/edgex/`` are hand-built from the DTO definitions
(go-mod-core-contracts ``dtos/event.go``, ``dtos/reading.go``, ``dtos/requests/event.go``;
go-mod-messaging ``pkg/types/message_envelope.go``):

* ``v3-envelope-json-base64.json`` — EdgeX 3.x: JSON AddEventRequest, base64 in the envelope, ``%e``
  floats; ``.payload.json`` beside it is the exact payload, for reading.
* ``v4-envelope-json-embedded.json`` — EdgeX 4.x: the AddEventRequest embedded as an object,
  shortest floats, every array flavour, a null reading.
* ``v3-envelope-cbor-binary.json``, ``v4-envelope-cbor-binary.json`` — CBOR AddEventRequests with
  binary readings, base64 in a JSON envelope in both generations (``.payload.cbor``: the CBOR).
* ``add-event-request.json``/``.cbor`` — bare AddEventRequests (REST body, NATS "nats" format).
* ``plain-event-mqtt-export.json`` — app-service-configurable's bare Event, hand-written with
  JSON escapes (``\\/``, ``\\u0023``, a surrogate pair), object, object-array, base64 binary and
  null readings, and tags.
* ``error-envelope.json`` — an envelope with ``errorCode`` 1.

Each golden is decoded to exactly the readings listed here, re-encoded byte-for-byte where EdgeX's
own bytes are reproducible, and every event and reading in it is validated against the OpenAPI
schema of its EdgeX version (with EdgeX's documented deviations from those specs patched in).
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from fedge.agent.edgex import wire as wire_module
from fedge.agent.edgex.readings import INT_RANGES, Event, Reading, ReadingError
from fedge.agent.edgex.wire import (
    DEFAULT_MAX_BYTES,
    FLOAT_STYLE_BY_VERSION,
    MAX_DOCUMENT_DEPTH,
    MAX_VALUE_DEPTH,
    MESSAGE_REASONS,
    READING_REASONS,
    DecodeResult,
    decode_message,
    edgex_event_filter,
    edgex_event_filters,
    edgex_event_topic,
    edgex_topic_escape,
    encode_add_event_request,
    encode_envelope,
    encode_plain_event,
    event_to_dto,
    float_style_for,
    format_float,
    format_value,
)

GOLDEN = Path(__file__).resolve().parents[1] / "support" / "golden" / "edgex"
JSON = "application/json"
CBOR = "application/cbor"
FLOAT32_MAX = 3.4028234663852886e38
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000")


def _golden(name: str) -> bytes:
    return (GOLDEN / name).read_bytes()


def _error(payload: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> ReadingError:
    with pytest.raises(ReadingError) as exc:
        decode_message(payload, max_bytes)
    assert exc.value.reason in MESSAGE_REASONS
    return exc.value


# --- the golden messages and exactly what they hold ---------------------------------------------


def _readings(device: str, profile: str, *rows: tuple[Any, ...]) -> tuple[Reading, ...]:
    """Rows of (resource, valueType, value, origin, units, media_type, id)."""
    return tuple(Reading(device, r[0], profile, r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows)


V3_JSON_EVENT = Event(
    "0f3a1c52-8d4e-4b7a-a6b1-2c9d3e4f5a60",
    "Room 2/Sensor #3",
    "HVAC-Sensor",
    "Environment",
    1700000000123456789,
    _readings(
        "Room 2/Sensor #3",
        "HVAC-Sensor",
        (
            "Temperature",
            "Float64",
            23.1,
            1700000000123456789,
            "degC",
            "",
            "3c1d9e27-6a4b-4f8e-b2d1-7e5a9c0f3b18",
        ),
        ("Humidity", "Float32", 45.5, 1700000000123456789, "%RH", "", "9a7e4c10-2b3d-4e5f-8a6b-1c2d3e4f5a6b"),
        ("CO2", "Uint16", 612, 1700000000123456790, "ppm", "", "e1f2a3b4-c5d6-4e7f-9a0b-1c2d3e4f5a6c"),
        ("Occupied", "Bool", True, 1700000000123456790, "", "", "b2c3d4e5-f6a7-4b8c-9d0e-1f2a3b4c5d6e"),
        ("Offset", "Int8", -3, 1700000000123456791, "", "", "c3d4e5f6-a7b8-4c9d-8e0f-2a3b4c5d6e7f"),
        (
            "Label",
            "String",
            "café ☃ <lobby> & hall",
            1700000000123456791,
            "",
            "",
            "d4e5f6a7-b8c9-4d0e-9f1a-3b4c5d6e7f80",
        ),
    ),
)
V4_JSON_EVENT = Event(
    "1e2d3c4b-5a69-4788-9a0b-c1d2e3f4a5b6",
    "AHU-1",
    "Air-Handler",
    "Status",
    1731000000000000001,
    _readings(
        "AHU-1",
        "Air-Handler",
        (
            "SupplyTemp",
            "Float64",
            23.1,
            1731000000000000001,
            "degC",
            "",
            "2f3e4d5c-6b7a-4898-a1b2-c3d4e5f6a7b8",
        ),
        ("FanSpeed", "Float32", 45.5, 1731000000000000001, "%", "", "3a4b5c6d-7e8f-4a0b-b1c2-d3e4f5a6b7c8"),
        (
            "ZoneTemps",
            "Float64Array",
            (23.1, -1e-07, 0.0),
            1731000000000000001,
            "",
            "",
            "4b5c6d7e-8f9a-4b1c-82d3-e4f5a6b7c8d9",
        ),
        (
            "DamperSteps",
            "Int32Array",
            (1, -2, 2147483647),
            1731000000000000001,
            "",
            "",
            "5c6d7e8f-9a0b-4c2d-93e4-f5a6b7c8d9e0",
        ),
        ("Alarms", "BoolArray", (True, False), 1731000000000000002, "", "", ""),
        ("Modes", "StringArray", ("heat", "vent"), 1731000000000000002, "", "", ""),
        ("RunHours", "Uint64", 2**64 - 1, 1731000000000000002, "", "", ""),
        ("Drift", "Int64", -(2**63), 1731000000000000002, "", "", ""),
        ("ReturnTemp", "Float64", None, 1731000000000000003, "degC", "", ""),
    ),
)
V3_CBOR_EVENT = Event(
    "2a3b4c5d-6e7f-4a8b-9c0d-1e2f3a4b5c6d",
    "camera-01",
    "Lobby-Camera",
    "Snapshot",
    1700000500000000000,
    _readings(
        "camera-01",
        "Lobby-Camera",
        (
            "Image",
            "Binary",
            PNG,
            1700000500000000000,
            "",
            "image/png",
            "6e7f8a9b-0c1d-4e2f-a3b4-c5d6e7f8a9b0",
        ),
        ("Lux", "Float64", 312.5, 1700000500000000000, "lx", "", "7f8a9b0c-1d2e-4f3a-b4c5-d6e7f8a9b0c1"),
    ),
)
V4_CBOR_EVENT = Event(
    "3b4c5d6e-7f8a-4b9c-8d1e-2f3a4b5c6d7e",
    "meter-7",
    "Power-Meter",
    "Waveform",
    1731000000500000000,
    _readings(
        "meter-7",
        "Power-Meter",
        (
            "Samples",
            "Binary",
            bytes(range(16)),
            1731000000500000000,
            "",
            "application/octet-stream",
            "8a9b0c1d-2e3f-4a4b-85c6-d7e8f9a0b1c2",
        ),
        ("PowerFactor", "Float32", 0.1, 1731000000500000000, "", "", "9b0c1d2e-3f4a-4b5c-96d7-e8f9a0b1c2d3"),
        (
            "EnergyWh",
            "Int64",
            123456789012,
            1731000000500000000,
            "Wh",
            "",
            "0c1d2e3f-4a5b-4c6d-a7e8-f9a0b1c2d3e4",
        ),
    ),
)
NATS_CBOR_EVENT = Event(
    "4c5d6e7f-8a9b-4c0d-9e1f-2a3b4c5d6e7f",
    "door-12",
    "Access-Reader",
    "Badge",
    1731000001000000000,
    _readings(
        "door-12",
        "Access-Reader",
        (
            "BadgeScan",
            "Binary",
            b"\x04\x12\x9a\xff",
            1731000001000000000,
            "",
            "application/octet-stream",
            "1d2e3f4a-5b6c-4d7e-b8f9-a0b1c2d3e4f5",
        ),
        ("Granted", "Bool", False, 1731000001000000000, "", "", "2e3f4a5b-6c7d-4e8f-89a0-b1c2d3e4f5a6"),
    ),
)
REST_JSON_EVENT = Event(
    "5d6e7f8a-9b0c-4d1e-8f2a-3b4c5d6e7f8a",
    "boiler",
    "Boiler",
    "Pressure",
    1700000900000000000,
    _readings(
        "boiler",
        "Boiler",
        ("Pressure", "Float32", 1.25, 1700000900000000000, "bar", "", "3f4a5b6c-7d8e-4f9a-a0b1-c2d3e4f5a6b7"),
    ),
)
PLAIN_EVENT = Event(
    "6e7f8a9b-0c1d-4e2f-9a3b-4c5d6e7f8a9b",
    "Room 2/Sensor #3",
    "Zone Controller",
    "Lobby \U0001f321 thermo",
    1731000002000000000,
    _readings(
        "Room 2/Sensor #3",
        "Zone Controller",
        (
            "Setpoint °C",
            "Object",
            {"mode": "auto", "schedule": {"days": ["mon", "tue"], "start": "06:00"}, "setpoints": [21.5, 23]},
            1731000002000000000,
            "",
            "",
            "4a5b6c7d-8e9f-4a0b-b1c2-d3e4f5a6b7c8",
        ),
        (
            "Zones",
            "ObjectArray",
            [{"temp": 21.5, "zone": "A"}, {"temp": 22, "zone": "B"}],
            1731000002000000000,
            "",
            "",
            "5b6c7d8e-9f0a-4b1c-82d3-e4f5a6b7c8d9",
        ),
        (
            "Thumbnail",
            "Binary",
            b"\x89PNG\r\n\x1a\n",
            1731000002000000000,
            "",
            "image/png",
            "6c7d8e9f-0a1b-4c2d-93e4-f5a6b7c8d9e0",
        ),
        (
            "Gains",
            "Float32Array",
            (0.1, 2.5),
            1731000002000000001,
            "",
            "",
            "7d8e9f0a-1b2c-4d3e-a4f5-a6b7c8d9e0f1",
        ),
        ("Occupancy", "Uint8", None, 1731000002000000001, "", "", "8e9f0a1b-2c3d-4e4f-b5a6-b7c8d9e0f1a2"),
    ),
    {"building": "HQ", "floor": 2},
)


@dataclass(frozen=True)
class Golden:
    file: str
    kind: str
    content_type: str
    correlation_id: str
    event: Event
    spec_versions: tuple[str, ...]
    #: Rebuilds the file byte-for-byte from ``event``; None where the file is not Go's own spelling.
    encode: Callable[[Event], bytes] | None


GOLDENS = [
    Golden(
        "v3-envelope-json-base64.json",
        "envelope_base64",
        JSON,
        "a8f2d0e4-51c3-4b9e-8d7a-3e6f1c2b9a04",
        V3_JSON_EVENT,
        ("v3.1.1",),
        lambda e: encode_envelope(
            e,
            "v3",
            correlation_id="a8f2d0e4-51c3-4b9e-8d7a-3e6f1c2b9a04",
            request_id="6b4b2c4e-3f7d-4a1e-9c55-8f0e2d1a7b36",
        ),
    ),
    Golden(
        "v4-envelope-json-embedded.json",
        "envelope_object",
        JSON,
        "b9e3f1a5-62d4-4caf-9e8b-4f7a2d3c0b15",
        V4_JSON_EVENT,
        ("v4.0.2",),
        lambda e: encode_envelope(
            e,
            "v4",
            correlation_id="b9e3f1a5-62d4-4caf-9e8b-4f7a2d3c0b15",
            request_id="7c5d3e2f-4a1b-4c9d-8e7f-6a5b4c3d2e1f",
        ),
    ),
    Golden(
        "v3-envelope-cbor-binary.json",
        "envelope_base64",
        CBOR,
        "c0d1e2f3-a4b5-4c6d-8e7f-9a0b1c2d3e4f",
        V3_CBOR_EVENT,
        ("v3.1.1",),
        lambda e: encode_envelope(
            e,
            "v3",
            content_type=CBOR,
            correlation_id="c0d1e2f3-a4b5-4c6d-8e7f-9a0b1c2d3e4f",
            request_id="8d6e4f3a-5b2c-4d1e-9f8a-7b6c5d4e3f2a",
        ),
    ),
    Golden(
        "v4-envelope-cbor-binary.json",
        "envelope_base64",
        CBOR,
        "d1e2f3a4-b5c6-4d7e-8f9a-0b1c2d3e4f5a",
        V4_CBOR_EVENT,
        ("v4.0.2",),
        lambda e: encode_envelope(
            e,
            "v4",
            content_type=CBOR,
            correlation_id="d1e2f3a4-b5c6-4d7e-8f9a-0b1c2d3e4f5a",
            request_id="9e7f5a4b-6c3d-4e2f-8a9b-0c1d2e3f4a5b",
        ),
    ),
    Golden(
        "add-event-request.cbor",
        "add_event_request",
        CBOR,
        "",
        NATS_CBOR_EVENT,
        ("v3.1.1", "v4.0.2"),
        lambda e: encode_add_event_request(
            e, request_id="0a1b2c3d-4e5f-4a6b-8c7d-8e9f0a1b2c3d", content_type=CBOR
        ),
    ),
    Golden(
        "add-event-request.json",
        "add_event_request",
        JSON,
        "",
        REST_JSON_EVENT,
        ("v3.1.1", "v4.0.2"),
        lambda e: encode_add_event_request(
            e, request_id="1b2c3d4e-5f6a-4b7c-8d9e-0f1a2b3c4d5e", float_style="go_e"
        ),
    ),
    Golden("plain-event-mqtt-export.json", "event", JSON, "", PLAIN_EVENT, ("v4.0.2",), None),
]


@pytest.mark.parametrize("golden", GOLDENS, ids=lambda g: g.file)
def test_golden_decodes_to_exactly_its_readings(golden: Golden) -> None:
    result = decode_message(_golden(golden.file))
    assert result == DecodeResult(
        [golden.event],
        [],
        golden.kind,
        golden.content_type,  # type: ignore[arg-type]
        golden.correlation_id,
    )
    for reading in result.events[0].readings:
        assert type(reading.value) is type(
            next(r for r in golden.event.readings if r.resource == reading.resource).value
        )


@pytest.mark.parametrize("golden", [g for g in GOLDENS if g.encode], ids=lambda g: g.file)
def test_encoder_reproduces_the_golden_bytes(golden: Golden) -> None:
    assert golden.encode is not None
    assert golden.encode(golden.event) == _golden(golden.file)


def test_plain_event_golden_reencodes_to_the_same_json_document() -> None:
    """The file spells names with escapes (\\/, \\u0023, a surrogate pair); Go writes them raw."""
    text = _golden("plain-event-mqtt-export.json")
    assert b"\\/" in text and b"\\u0023" in text and b"\\ud83c\\udf21" in text
    assert json.loads(encode_plain_event(PLAIN_EVENT, float_style="shortest")) == json.loads(text)


@pytest.mark.parametrize(
    ("envelope", "payload"),
    [
        ("v3-envelope-json-base64.json", "v3-envelope-json-base64.payload.json"),
        ("v3-envelope-cbor-binary.json", "v3-envelope-cbor-binary.payload.cbor"),
        ("v4-envelope-cbor-binary.json", "v4-envelope-cbor-binary.payload.cbor"),
    ],
)
def test_base64_payload_is_the_file_beside_it(envelope: str, payload: str) -> None:
    assert base64.b64decode(json.loads(_golden(envelope))["payload"], validate=True) == _golden(payload)


def test_envelopes_have_the_go_field_order_and_no_query_params() -> None:
    for name in (
        "v3-envelope-json-base64.json",
        "v4-envelope-json-embedded.json",
        "v4-envelope-cbor-binary.json",
    ):
        assert list(json.loads(_golden(name))) == [
            "apiVersion",
            "receivedTopic",
            "correlationID",
            "requestID",
            "errorCode",
            "payload",
            "contentType",
        ]


def test_4x_cbor_is_base64_in_a_json_envelope_like_3x() -> None:
    """go-mod-messaging v4 turns a CBOR payload into []byte and JSON-marshals the envelope."""
    for name in ("v3-envelope-cbor-binary.json", "v4-envelope-cbor-binary.json"):
        envelope = json.loads(_golden(name))
        assert envelope["contentType"] == CBOR
        assert isinstance(envelope["payload"], str)


def test_error_envelope_golden() -> None:
    err = _error(_golden("error-envelope.json"))
    assert err.reason == "error_envelope"
    assert str(err).startswith("error_envelope: errorCode 1: ")


# --- OpenAPI schemas of the matching EdgeX version ------------------------------------------------


def _openapi_dir() -> Path:
    override = os.environ.get("FEDGE_SHARED_DIR")
    shared = Path(override) if override else Path(__file__).resolve().parents[3] / "shared"
    path = shared / "edgex" / "openapi"
    if not path.is_dir():
        message = f"EdgeX OpenAPI specs not found at {path} (set FEDGE_SHARED_DIR)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def _byte_format_checker() -> FormatChecker:
    checker = FormatChecker()

    @checker.checks("byte", raises=ValueError)
    def is_base64(instance: object) -> bool:  # OpenAPI's "byte": base64 text
        if isinstance(instance, str):
            base64.b64decode(instance, validate=True)
        return True

    return checker


NULL_FIELDS = ("value", "binaryValue", "objectValue")


class EdgeXSpec:
    """core-data's schemas of one EdgeX version, as published and with EdgeX's deviations patched.

    The specs disagree with running EdgeX in three places, and fedge follows EdgeX:
    ``valueType``'s enum omits ``ObjectArray`` (used by device-virtual's object profile and
    accepted by go-mod-core-contracts); ``objectValue`` is declared a base64 string, but EdgeX
    carries the JSON value itself (``ObjectValue any``); and there is no null reading, which
    EdgeX (contracts 3.1+) marshals as ``value``, ``binaryValue`` and ``objectValue`` all null —
    those are checked against the base reading schema with the three null fields set aside.
    """

    def __init__(self, version: str) -> None:
        raw = yaml.safe_load((_openapi_dir() / version / "core-data.yaml").read_text())
        self.version = version
        self.raw = self._validators(raw, f"urn:edgex:core-data:{version}:raw")
        self.patched = self._validators(self._patch(raw), f"urn:edgex:core-data:{version}")
        schemas = raw["components"]["schemas"]
        self.base_reading = "BaseReading" if "BaseReading" in schemas else "Reading"
        self.reading_item = "Event/properties/readings/items" if "BaseReading" in schemas else "Reading"

    @staticmethod
    def _patch(spec: dict[str, Any]) -> dict[str, Any]:
        spec = copy.deepcopy(spec)
        schemas = spec["components"]["schemas"]
        base = schemas.get("BaseReading") or schemas["Reading"]
        assert "ObjectArray" not in base["properties"]["valueType"]["enum"]
        base["properties"]["valueType"]["enum"].append("ObjectArray")
        if "ObjectReading" in schemas:  # v3.1.1: oneOf Simple/Binary/Object readings
            object_props = schemas["ObjectReading"]["allOf"][1]["properties"]
        else:  # v4.0.2: one flat Reading schema
            object_props = schemas["Reading"]["properties"]
        assert object_props["objectValue"]["type"] == "string"
        object_props["objectValue"] = {}
        return spec

    @staticmethod
    def _validators(spec: dict[str, Any], uri: str) -> Callable[[str, Any], list[str]]:
        registry: Registry[Any] = Registry().with_resource(
            uri, Resource.from_contents(spec, default_specification=DRAFT202012)
        )
        checker = _byte_format_checker()

        def errors(schema: str, instance: Any) -> list[str]:
            validator = Draft202012Validator(
                {"$ref": f"{uri}#/components/schemas/{schema}"}, registry=registry, format_checker=checker
            )
            return [
                f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}"
                for e in validator.iter_errors(instance)
            ]

        return errors

    def event_errors(self, event: dict[str, Any]) -> list[str]:
        problems: list[str] = []
        simple = []
        for index, reading in enumerate(event["readings"]):
            if all(field in reading and reading[field] is None for field in NULL_FIELDS):
                base = {k: v for k, v in reading.items() if k not in NULL_FIELDS}
                problems += [f"readings/{index} {p}" for p in self.patched(self.base_reading, base)]
            else:
                problems += [f"readings/{index} {p}" for p in self.patched(self.reading_item, reading)]
                simple.append(reading)
        return problems + self.patched("Event", {**event, "readings": simple})


@functools.cache
def _spec(version: str) -> EdgeXSpec:
    return EdgeXSpec(version)


@pytest.fixture(params=["v3.1.1", "v4.0.2"])
def spec(request: pytest.FixtureRequest) -> EdgeXSpec:
    return _spec(request.param)


def _json_form(value: Any) -> Any:
    """The DTO as it would be in JSON: CBOR byte strings become base64 text."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {k: _json_form(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_form(v) for v in value]
    return value


def _wire_documents(name: str) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The golden's (AddEventRequest or None, Event) in JSON form."""
    data = _golden(name)
    doc = cbor2.loads(data) if name.endswith(".cbor") else json.loads(data)
    if "payload" in doc:
        payload = doc["payload"]
        if isinstance(payload, str):
            raw = base64.b64decode(payload)
            payload = cbor2.loads(raw) if doc["contentType"] == CBOR else json.loads(raw)
        doc = payload
    doc = _json_form(doc)
    return (doc, doc["event"]) if "event" in doc else (None, doc)


@pytest.mark.parametrize(
    ("golden", "version"),
    [(g, v) for g in GOLDENS for v in g.spec_versions],
    ids=lambda x: x.file if isinstance(x, Golden) else x,
)
def test_every_event_and_reading_of_every_golden_validates_against_its_versions_spec(
    golden: Golden, version: str
) -> None:
    spec = _spec(version)
    request, event = _wire_documents(golden.file)
    assert spec.event_errors(event) == []
    if request is not None:
        assert spec.patched("AddEventRequest", {**request, "event": {**event, "readings": []}}) == []


def test_the_patched_deviations_are_real(spec: EdgeXSpec) -> None:
    """Each patch covers something the published spec really refuses and EdgeX really sends."""
    _, event = _wire_documents("plain-event-mqtt-export.json")
    by_type = {r["valueType"]: r for r in event["readings"]}
    assert any("ObjectArray" in p for p in spec.raw(spec.reading_item, by_type["ObjectArray"]))
    assert spec.raw(spec.reading_item, by_type["Object"]) != []  # objectValue must be a string
    assert spec.raw(spec.reading_item, by_type["Uint8"]) != []  # the null reading
    assert spec.raw(spec.reading_item, by_type["Binary"]) == []
    assert spec.raw(spec.reading_item, by_type["Float32Array"]) == []


def test_the_spec_check_catches_a_bad_golden(spec: EdgeXSpec) -> None:
    _, event = _wire_documents("v4-envelope-json-embedded.json")
    broken = copy.deepcopy(event)
    broken["id"] = "not-a-uuid"
    broken["readings"][0]["origin"] = "1731000000000000001"
    broken["readings"][1]["valueType"] = "Float128"
    problems = spec.event_errors(broken)
    assert any(p.startswith("id:") for p in problems)
    assert any(p.startswith("readings/0") for p in problems)
    assert any(p.startswith("readings/1") for p in problems)


# --- Go's float formats --------------------------------------------------------------------------

# fmt.Sprintf("%e", v): 6 digits after the point, correctly rounded (ties to even), exponent of
# at least two digits. strconv.FormatFloat(v, 'e', -1, bits): fewest digits that parse back to
# the same float32/float64, closest to the exact value; zero is "0e+00". NaN/Inf as Go spells them.
GO_FLOATS = [
    # value, bits, %e, shortest
    (23.1, 64, "2.310000e+01", "2.31e+01"),
    (-23.1, 64, "-2.310000e+01", "-2.31e+01"),
    (0.0, 64, "0.000000e+00", "0e+00"),
    (-0.0, 64, "-0.000000e+00", "-0e+00"),
    (1e-07, 64, "1.000000e-07", "1e-07"),
    (1e100, 64, "1.000000e+100", "1e+100"),
    (-1e-100, 64, "-1.000000e-100", "-1e-100"),
    (100.0, 64, "1.000000e+02", "1e+02"),
    (0.1 + 0.2, 64, "3.000000e-01", "3.0000000000000004e-01"),
    (123456789.0, 64, "1.234568e+08", "1.23456789e+08"),
    (1234567.5, 64, "1.234568e+06", "1.2345675e+06"),  # %e tie, rounded to even
    (0.5, 64, "5.000000e-01", "5e-01"),
    (5e-324, 64, "4.940656e-324", "5e-324"),
    (1.7976931348623157e308, 64, "1.797693e+308", "1.7976931348623157e+308"),
    (0.1, 32, "1.000000e-01", "1e-01"),
    (23.1, 32, "2.310000e+01", "2.31e+01"),
    (-45.5, 32, "-4.550000e+01", "-4.55e+01"),
    (1 / 3, 32, "3.333333e-01", "3.3333334e-01"),
    (0.2, 32, "2.000000e-01", "2e-01"),
    (16777217.0, 32, "1.677722e+07", "1.6777216e+07"),  # rounds to the float32 16777216
    (1e10, 32, "1.000000e+10", "1e+10"),
    (FLOAT32_MAX, 32, "3.402823e+38", "3.4028235e+38"),
    (1e-45, 32, "1.401298e-45", "1e-45"),  # the smallest float32 subnormal
    (0.0, 32, "0.000000e+00", "0e+00"),
    (float("nan"), 64, "NaN", "NaN"),
    (float("inf"), 64, "+Inf", "+Inf"),
    (float("-inf"), 32, "-Inf", "-Inf"),
]


@pytest.mark.parametrize(("value", "bits", "go_e", "shortest"), GO_FLOATS)
def test_format_float_matches_go(value: float, bits: int, go_e: str, shortest: str) -> None:
    assert format_float(value, bits, "go_e") == go_e  # type: ignore[arg-type]
    assert format_float(value, bits, "shortest") == shortest  # type: ignore[arg-type]


def _numpy_shortest(value: float, bits: int) -> str:
    """numpy's Dragon4 in unique mode: an independent shortest-round-trip implementation."""
    number = np.float32(value) if bits == 32 else np.float64(value)
    return np.format_float_scientific(number, unique=True, trim="-", exp_digits=2)


@settings(max_examples=400, deadline=None)
@given(bits=st.sampled_from([32, 64]), data=st.data())
def test_shortest_agrees_with_numpy_and_round_trips(bits: int, data: st.DataObject) -> None:
    value = data.draw(st.floats(width=bits, allow_nan=False, allow_infinity=False))  # type: ignore[arg-type]
    text = format_float(value, bits, "shortest")  # type: ignore[arg-type]
    assert text == _numpy_shortest(value, bits)
    parsed = float(text)
    if bits == 32:
        parsed = float(np.float32(parsed))
    assert parsed == value and math.copysign(1, parsed) == math.copysign(1, value)


@settings(max_examples=300, deadline=None)
@given(bits=st.sampled_from([32, 64]), style=st.sampled_from(["go_e", "shortest"]), data=st.data())
def test_go_spelling_survives_a_decode_and_reencode(bits: int, style: str, data: st.DataObject) -> None:
    """Whatever EdgeX writes, fedge re-encodes to the same bytes (the simulator's replay)."""
    value = data.draw(st.floats(width=bits, allow_nan=False, allow_infinity=False))  # type: ignore[arg-type]
    text = format_float(value, bits, style)  # type: ignore[arg-type]
    assert format_float(float(text), bits, style) == text  # type: ignore[arg-type]


def test_format_float_refuses_what_go_cannot_mean() -> None:
    with pytest.raises(ReadingError) as exc:
        format_float(1e39, 32)
    assert str(exc.value) == "out_of_type_range: 1e+39 does not fit Float32"
    with pytest.raises(ValueError, match="bits must be 32 or 64"):
        format_float(1.0, 16)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown float style"):
        format_float(1.0, 64, "g")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("version", "style"),
    [
        ("3.0.0", "go_e"),
        ("v3.1.1", "go_e"),
        ("4.0.0", "go_e"),
        ("v4.0.0-dev.12", "go_e"),
        ("4.0.1", "shortest"),
        ("v4.0.2", "shortest"),
        ("4.1", "shortest"),
        ("5", "shortest"),
    ],
)
def test_float_style_by_contracts_release(version: str, style: str) -> None:
    assert float_style_for(version) == style


def test_float_style_by_envelope_generation() -> None:
    assert FLOAT_STYLE_BY_VERSION == {"v3": "go_e", "v4": "shortest"}
    with pytest.raises(ValueError, match="not a version"):
        float_style_for("four")


# --- value strings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value_type", "value", "style", "expected"),
    [
        ("Bool", True, "shortest", "true"),
        ("Bool", False, "go_e", "false"),
        ("Int8", -128, "go_e", "-128"),
        ("Uint64", 2**64 - 1, "shortest", "18446744073709551615"),
        ("String", "a b, c", "shortest", "a b, c"),
        ("Float64", 23.1, "go_e", "2.310000e+01"),
        ("Float64", 23, "shortest", "2.3e+01"),
        ("float32", 0.1, "shortest", "1e-01"),
        ("Float64Array", (23.1, -1e-07), "shortest", "[2.31e+01, -1e-07]"),
        ("Float32Array", [0.1, 2.5], "go_e", "[1.000000e-01, 2.500000e+00]"),
        ("Int32Array", (1, -2, 3), "shortest", "[1, -2, 3]"),
        ("BoolArray", (True, False), "shortest", "[true, false]"),
        ("StringArray", ("heat", "vent"), "shortest", "[heat, vent]"),
        ("StringArray", ("a b", "c"), "shortest", "[a, b, c]"),  # Go's %v then " " -> ", ": lossy
        ("Uint8Array", (), "shortest", "[]"),
    ],
)
def test_format_value_writes_what_new_simple_reading_writes(
    value_type: str, value: Any, style: str, expected: str
) -> None:
    assert format_value(value_type, value, style) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value_type", "value", "reason"),
    [
        ("Bool", 1, "bad_value"),
        ("Int8", True, "bad_value"),
        ("Int8", 128, "out_of_type_range"),
        ("Uint8", -1, "out_of_type_range"),
        ("Float32", 1e39, "out_of_type_range"),
        ("Float64", "1.0", "bad_value"),
        ("Float64", 10**400, "out_of_type_range"),
        ("String", 5, "bad_value"),
        ("Int8Array", 5, "bad_value"),
        ("Int8Array", (1, 300), "out_of_type_range"),
        ("Binary", b"x", "bad_value"),
        ("Object", {}, "bad_value"),
        ("Decimal", 1, "unknown_value_type"),
    ],
)
def test_format_value_refuses_values_that_do_not_fit(value_type: str, value: Any, reason: str) -> None:
    with pytest.raises(ReadingError) as exc:
        format_value(value_type, value)
    assert exc.value.reason == reason


# --- documents for the refusal tests ------------------------------------------------------------

EVENT_ID = "0f3a1c52-8d4e-4b7a-a6b1-2c9d3e4f5a60"
DROP = object()


def _reading_doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": "3c1d9e27-6a4b-4f8e-b2d1-7e5a9c0f3b18",
        "origin": 1700000000000000000,
        "deviceName": "dev",
        "resourceName": "Temperature",
        "profileName": "prof",
        "valueType": "Float64",
        "value": "2.31e+01",
    }
    for key, value in changes.items():
        if value is DROP:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def _event_doc(*readings: dict[str, Any], **changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": "v3",
        "id": EVENT_ID,
        "deviceName": "dev",
        "profileName": "prof",
        "sourceName": "src",
        "origin": 1700000000000000000,
        "readings": list(readings) or [_reading_doc()],
    }
    for key, value in changes.items():
        if value is DROP:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def _envelope_doc(payload: Any, **changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": "v3",
        "receivedTopic": "",
        "correlationID": "c",
        "requestID": "",
        "errorCode": 0,
        "payload": payload,
        "contentType": JSON,
    }
    if payload is DROP:
        del doc["payload"]
    for key, value in changes.items():
        if value is DROP:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _json(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def _v3(event_doc: dict[str, Any]) -> bytes:
    request = {"apiVersion": "v3", "requestId": "r", "event": event_doc}
    return _json(_envelope_doc(_b64(_json(request))))


def _decode_one_reading(reading_doc: dict[str, Any]) -> DecodeResult:
    """An event of a sound reading and ``reading_doc``, so a refusal drops only the latter."""
    return decode_message(_json(_event_doc(_reading_doc(resourceName="ok"), reading_doc)))


def _rejected_reason(reading_doc: dict[str, Any]) -> str:
    result = _decode_one_reading(reading_doc)
    assert [r.resource for r in result.events[0].readings] == ["ok"]
    assert len(result.rejected) == 1
    reason = result.rejected[0].reason
    assert reason in READING_REASONS
    assert str(result.rejected[0]).startswith(f"{reason}: event {EVENT_ID} reading 1: ")
    return reason


# --- message-level refusals ---------------------------------------------------------------------


def test_size_is_judged_before_parsing() -> None:
    err = _error(b"{" * 11, max_bytes=10)  # also not JSON: the size wins
    assert str(err) == "too_large: 11 bytes > 10"
    golden = _golden("v4-envelope-json-embedded.json")
    assert _error(golden, max_bytes=len(golden) - 1).reason == "too_large"
    assert decode_message(golden, max_bytes=len(golden)).events == [V4_JSON_EVENT]
    assert _error(b"x" * (DEFAULT_MAX_BYTES + 1)).reason == "too_large"
    with pytest.raises(ValueError, match="max_bytes must be positive"):
        decode_message(b"{}", 0)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"   ",
        b"{",
        b'{"event": ',
        b"not json",
        b"[1, 2]",
        b'"text"',
        b"null",
        b"42",
        b'{"a":1}{"b":2}',
        b"\xef\xbb\xbf{}",
        '{"a":"é"}'.encode("utf-16"),
        b'{"a":"\xff"}',
        b'{"origin": NaN}',
        b'{"origin": Infinity}',
        b'{"origin": 1e999}',
        b'{"origin": ' + b"1" * 5000 + b"}",
        b'{"deviceName": "\\ud800"}',
        b'{"deviceName": "\\udfff x"}',
    ],
    ids=[
        "empty",
        "blank",
        "unclosed",
        "cut",
        "word",
        "array",
        "string",
        "null",
        "number",
        "two objects",
        "bom",
        "utf-16",
        "not utf-8",
        "NaN",
        "Infinity",
        "overflowing float",
        "overlong integer",
        "lone high surrogate",
        "lone low surrogate",
    ],
)
def test_bad_json(payload: bytes) -> None:
    assert _error(payload).reason == "bad_json"


@pytest.mark.parametrize("depth", [MAX_DOCUMENT_DEPTH + 1, 5_000, 200_000])
def test_deep_nesting_is_bad_json_and_never_a_recursion_error(depth: int) -> None:
    assert _error(b"[" * depth + b"]" * depth).reason == "bad_json"
    deep = b'{"a":' * depth + b"1" + b"}" * depth
    assert _error(deep, max_bytes=10 * depth).reason == "bad_json"
    inside = _reading_doc(valueType="Object", value=DROP, objectValue="X")
    doc = _json(_event_doc(inside)).replace(b'"X"', b'{"a":' * depth + b"1" + b"}" * depth)
    assert _error(doc, max_bytes=10 * depth + 1000).reason == "bad_json"


def test_deep_nesting_is_bad_cbor() -> None:
    nested: Any = 1
    for _ in range(MAX_DOCUMENT_DEPTH + 1):
        nested = {"a": nested}
    assert _error(cbor2.dumps(nested)).reason == "bad_cbor"
    assert _error(b"\xa1\x61a" * 100_000 + b"\x01").reason == "bad_cbor"


@pytest.mark.parametrize(
    "payload",
    [
        _json(_envelope_doc("not base64!")),
        _json(_envelope_doc("QQ")),
        _json(_envelope_doc("QQ=")),
        _json(_envelope_doc("é")),
        _json(_envelope_doc("QUJD\nREVG")),
    ],
    ids=["punctuation", "unpadded", "short padding", "non-ascii", "newline"],
)
def test_bad_base64_payload(payload: bytes) -> None:
    assert _error(payload).reason == "bad_base64"


def test_base64_of_bad_json_is_bad_json() -> None:
    assert _error(_json(_envelope_doc(_b64(b'{"event": ')))).reason == "bad_json"
    assert _error(_json(_envelope_doc(_b64(b"[]")))).reason == "bad_json"


CBOR_REQUEST = _golden("add-event-request.cbor")


@pytest.mark.parametrize(
    "payload",
    [
        CBOR_REQUEST[:-1],
        CBOR_REQUEST[:-40],
        CBOR_REQUEST[:1],
        CBOR_REQUEST + b"\x00",
        CBOR_REQUEST + CBOR_REQUEST,
        b"\xa1\x01\x02",
        b"\xa1\x41k\x01",
        b"\xa1\x61k\xc1\x1a\x00\x00\x00\x01",
        b"\xa1\x61k\xc2\x41\x01",
        b"\xa1\x61k\xd8\x1c\x80",
        b"\xa1\x61k\xf7",
        b"\xa1\x61k\xf0",
        b"\xa1\x62\xff\xfe\x01",
        b"\xbf\x61k\x01",
        b"\xb9\xff\xff",
    ],
    ids=[
        "one byte short",
        "forty bytes short",
        "header only",
        "trailing byte",
        "two maps",
        "int key",
        "byte-string key",
        "date tag",
        "bignum tag",
        "shared-reference tag",
        "undefined",
        "simple value",
        "bad utf-8 key",
        "unterminated indefinite map",
        "huge declared map",
    ],
)
def test_bad_cbor(payload: bytes) -> None:
    assert _error(payload).reason == "bad_cbor"


@pytest.mark.parametrize(
    "payload", [b"\x00", b"\x80", b"{}"[:1] + b"\x00"], ids=["int", "array", "brace then NUL"]
)
def test_cbor_payload_that_is_not_a_map(payload: bytes) -> None:
    assert _error(_json(_envelope_doc(_b64(payload), contentType=CBOR))).reason == "bad_cbor"


def test_truncated_cbor_in_an_envelope() -> None:
    envelope = json.loads(_golden("v4-envelope-cbor-binary.json"))
    envelope["payload"] = _b64(_golden("v4-envelope-cbor-binary.payload.cbor")[:-3])
    err = _error(_json(envelope))
    assert str(err) == "bad_cbor: truncated CBOR"


@pytest.mark.parametrize(
    "content_type",
    [
        "application/xml",
        "",
        None,
        "text/plain",
        "application/json; charset=utf-8",
        "APPLICATION/JSON",
        "application/x-protobuf",
    ],
)
def test_unsupported_content_type(content_type: str | None) -> None:
    payload = _b64(_json({"apiVersion": "v3", "requestId": "r", "event": _event_doc()}))
    doc = _envelope_doc(payload, contentType=content_type)
    assert _error(_json(doc)).reason == "unsupported_content_type"
    assert _error(_json(_envelope_doc(payload, contentType=DROP))).reason == "unsupported_content_type"


def test_a_cbor_encoded_envelope_is_refused() -> None:
    """EdgeX never CBOR-encodes the envelope itself (the MQTT client uses json.Marshal)."""
    doc = _envelope_doc(_golden("v4-envelope-cbor-binary.payload.cbor"), contentType=CBOR)
    err = _error(cbor2.dumps(doc))
    assert err.reason == "unsupported_content_type"


@pytest.mark.parametrize(("code", "payload"), [(1, _b64(b"device not found")), (2, "plain text"), (-1, None)])
def test_error_envelope(code: int, payload: Any) -> None:
    err = _error(_json(_envelope_doc(payload, errorCode=code, contentType="text/plain")))
    assert err.reason == "error_envelope"
    assert str(err).startswith(f"error_envelope: errorCode {code}: ")


def test_error_code_is_judged_before_the_content_type_and_payload() -> None:
    assert _error(_json(_envelope_doc(5, errorCode=1, contentType="x"))).reason == "error_envelope"


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        (_envelope_doc(DROP), "missing_field"),
        (_envelope_doc(5), "bad_field_type"),
        (_envelope_doc(None), "bad_field_type"),
        (_envelope_doc(["a"]), "bad_field_type"),
        (_envelope_doc("", errorCode="0"), "bad_field_type"),
        (_envelope_doc("", errorCode=0.0), "bad_field_type"),
        (_envelope_doc("", errorCode=False), "bad_field_type"),
        (_envelope_doc("", correlationID=5), "bad_field_type"),
        (_envelope_doc("", queryParams={"a": 1}), "bad_field_type"),
        (_envelope_doc("", queryParams=["a"]), "bad_field_type"),
        (_envelope_doc({"apiVersion": "v3", "event": "x"}), "bad_field_type"),
        (_envelope_doc({"apiVersion": 3, "event": _event_doc()}), "bad_field_type"),
        (_envelope_doc({"something": "else"}), "unrecognized_message"),
        ({"hello": "world"}, "unrecognized_message"),
        ({}, "unrecognized_message"),
    ],
)
def test_envelope_and_request_shape_errors(doc: dict[str, Any], reason: str) -> None:
    assert _error(_json(doc)).reason == reason


@pytest.mark.parametrize(
    ("changes", "reason", "message"),
    [
        ({"id": DROP}, "missing_field", "missing_field: event has no id"),
        ({"id": None}, "missing_field", "missing_field: event has no id"),
        ({"deviceName": DROP}, "missing_field", "missing_field: event has no deviceName"),
        ({"profileName": DROP}, "missing_field", "missing_field: event has no profileName"),
        ({"sourceName": DROP}, "missing_field", "missing_field: event has no sourceName"),
        ({"origin": DROP}, "missing_field", "missing_field: event has no origin"),
        ({"readings": DROP}, "missing_field", "missing_field: event has no readings"),
        ({"id": 5}, "bad_field_type", "bad_field_type: event id must be a string"),
        ({"deviceName": ["a"]}, "bad_field_type", "bad_field_type: event deviceName must be a string"),
        (
            {"origin": "1700000000000000000"},
            "bad_field_type",
            "bad_field_type: event origin must be an integer",
        ),
        ({"origin": 1.7e18}, "bad_field_type", "bad_field_type: event origin must be an integer"),
        ({"origin": True}, "bad_field_type", "bad_field_type: event origin must be an integer"),
        ({"readings": {"a": 1}}, "bad_field_type", "bad_field_type: event readings must be an array"),
        ({"tags": ["a"]}, "bad_field_type", "bad_field_type: event tags must be an object"),
        ({"id": "not-a-uuid"}, "bad_field_value", "bad_field_value: event id 'not-a-uuid' is not a UUID"),
        (
            {"id": EVENT_ID[:-1]},
            "bad_field_value",
            f"bad_field_value: event id {EVENT_ID[:-1]!r} is not a UUID",
        ),
        ({"deviceName": ""}, "bad_field_value", "bad_field_value: event deviceName is blank"),
        ({"sourceName": " \t"}, "bad_field_value", "bad_field_value: event sourceName is blank"),
        ({"origin": 0}, "bad_field_value", "bad_field_value: event origin 0 is not a non-zero int64"),
        (
            {"origin": 2**63},
            "bad_field_value",
            f"bad_field_value: event origin {2**63} is not a non-zero int64",
        ),
        (
            {"readings": []},
            "bad_field_value",
            "bad_field_value: event has no readings (EdgeX requires at least one)",
        ),
        (
            {"tags": {"a": {"b": 1.5}}, "readings": DROP},
            "missing_field",
            "missing_field: event has no readings",
        ),
    ],
)
def test_event_header_errors_refuse_the_message(changes: dict[str, Any], reason: str, message: str) -> None:
    for payload in (_json(_event_doc(**changes)), _v3(_event_doc(**changes))):
        err = _error(payload)
        assert (err.reason, str(err)) == (reason, message)


def test_event_tags_too_deep_are_a_bad_field_value() -> None:
    tags: Any = "leaf"
    for _ in range(MAX_VALUE_DEPTH + 1):
        tags = {"t": tags}
    assert _error(_json(_event_doc(tags=tags))).reason == "bad_field_value"
    assert decode_message(_json(_event_doc(tags=tags["t"]))).events[0].tags == tags["t"]


@pytest.mark.parametrize(
    "event_id",
    [
        "{0f3a1c52-8d4e-4b7a-a6b1-2c9d3e4f5a60}",
        "urn:uuid:0f3a1c52-8d4e-4b7a-a6b1-2c9d3e4f5a60",
        "URN:UUID:0F3A1C52-8D4E-4B7A-A6B1-2C9D3E4F5A60",
        "0f3a1c528d4e4b7aa6b12c9d3e4f5a60",
    ],
)
def test_event_ids_in_every_form_google_uuid_parses(event_id: str) -> None:
    assert decode_message(_json(_event_doc(id=event_id))).events[0].id == event_id


# --- reading-level refusals: the reading is dropped and counted, its event kept -------------------


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"origin": DROP}, "missing_field"),
        ({"deviceName": DROP}, "missing_field"),
        ({"resourceName": DROP}, "missing_field"),
        ({"resourceName": None}, "missing_field"),
        ({"profileName": DROP}, "missing_field"),
        ({"valueType": DROP}, "missing_field"),
        ({"id": 7}, "bad_field_type"),
        ({"origin": "1"}, "bad_field_type"),
        ({"origin": 1.5}, "bad_field_type"),
        ({"deviceName": 1}, "bad_field_type"),
        ({"valueType": 5}, "bad_field_type"),
        ({"units": 5}, "bad_field_type"),
        ({"tags": "x"}, "bad_field_type"),
        ({"value": 23.1}, "bad_field_type"),  # Go writes every simple value as a string
        ({"value": True}, "bad_field_type"),
        ({"value": ["1"]}, "bad_field_type"),
        ({"origin": 0}, "bad_field_value"),
        ({"origin": -(2**63) - 1}, "bad_field_value"),
        ({"resourceName": "  "}, "bad_field_value"),
        ({"valueType": "Float128"}, "unknown_value_type"),
        ({"valueType": ""}, "unknown_value_type"),
        ({"value": "abc"}, "bad_value"),
        ({"value": "2.31e+01 "}, "bad_value"),
        ({"value": "+Inf"}, "out_of_type_range"),  # Go parses it; no sensor value is infinite
        ({"value": "1e999"}, "out_of_type_range"),  # Go: ErrRange
        ({"value": "-infinity"}, "out_of_type_range"),
        ({"valueType": "Int8", "value": "+-5"}, "bad_value"),  # parse_scalar raises ValueError here
        ({"valueType": "Int32", "value": "²"}, "bad_value"),
        ({"valueType": "Int32", "value": "1.5"}, "bad_value"),
        ({"valueType": "Bool", "value": "maybe"}, "bad_value"),
        ({"valueType": "Int8Array", "value": "[1, x]"}, "bad_value"),
        ({"valueType": "Float64Array", "value": "[1e999]"}, "out_of_type_range"),
        ({"valueType": "Int8Array", "value": "1, 2"}, "bad_value"),
        ({"valueType": "Uint8", "value": "256"}, "out_of_type_range"),
        ({"valueType": "Int8", "value": "-129"}, "out_of_type_range"),
        ({"valueType": "Uint64", "value": "18446744073709551616"}, "out_of_type_range"),
        ({"valueType": "Float32", "value": "1e+39"}, "out_of_type_range"),
        ({"valueType": "Int16Array", "value": "[1, 40000]"}, "out_of_type_range"),
        ({"valueType": "Binary", "value": DROP, "binaryValue": "QUJD"}, "missing_field"),  # no mediaType
        ({"valueType": "Binary", "value": DROP, "binaryValue": "QUJD", "mediaType": 5}, "bad_field_type"),
        ({"valueType": "Binary", "value": DROP, "binaryValue": 5, "mediaType": "a/b"}, "bad_field_type"),
        ({"valueType": "Binary", "value": DROP, "binaryValue": "QUJ", "mediaType": "a/b"}, "bad_base64"),
        ({"valueType": "Binary", "value": DROP, "binaryValue": "Q!JD", "mediaType": "a/b"}, "bad_base64"),
        ({"valueType": "Object", "value": DROP, "objectValue": {"a": {"b": {"c": "X"}}}}, None),
    ],
)
def test_a_bad_reading_is_dropped_and_reported_once(changes: dict[str, Any], reason: str | None) -> None:
    if reason is None:  # the control: a sound object reading is kept
        assert _decode_one_reading(_reading_doc(**changes)).rejected == []
        return
    assert _rejected_reason(_reading_doc(**changes)) == reason


def test_object_values_deeper_than_the_limit_are_a_bad_value() -> None:
    value: Any = 1
    for _ in range(MAX_VALUE_DEPTH + 1):
        value = [value]
    kept = _decode_one_reading(_reading_doc(valueType="ObjectArray", value=DROP, objectValue=value[0]))
    assert kept.rejected == [] and kept.events[0].readings[1].value == value[0]
    assert (
        _rejected_reason(_reading_doc(valueType="ObjectArray", value=DROP, objectValue=value)) == "bad_value"
    )


def test_json_integers_beyond_64_bits_in_object_values_are_a_bad_value() -> None:
    """CBOR could only carry them as bignum tags, which fedge refuses; so JSON may not either."""
    assert (
        _rejected_reason(_reading_doc(valueType="Object", value=DROP, objectValue={"a": 2**64}))
        == "bad_value"
    )
    kept = _decode_one_reading(_reading_doc(valueType="Object", value=DROP, objectValue={"a": 2**64 - 1}))
    assert kept.rejected == [] and kept.events[0].readings[1].value == {"a": 2**64 - 1}


def test_a_reading_that_is_not_an_object() -> None:
    result = decode_message(_json(_event_doc(_reading_doc(), "reading", 5)))
    assert [r.reason for r in result.rejected] == ["bad_field_type", "bad_field_type"]
    assert len(result.events[0].readings) == 1


def test_every_bad_reading_is_counted_exactly_once_and_the_rest_kept() -> None:
    readings = [
        _reading_doc(resourceName="a"),
        _reading_doc(resourceName="b", value="x"),
        _reading_doc(resourceName="c", valueType="Uint8", value="300"),
        _reading_doc(resourceName="d", valueType="Bool", value="true"),
        _reading_doc(resourceName="e", valueType="Nope"),
    ]
    result = decode_message(_v3(_event_doc(*readings)))
    assert [r.resource for r in result.events[0].readings] == ["a", "d"]
    assert [str(e) for e in result.rejected] == [
        f"bad_value: event {EVENT_ID} reading 1: 'x' is not a Float64",
        f"out_of_type_range: event {EVENT_ID} reading 2: 300 does not fit Uint8",
        f"unknown_value_type: event {EVENT_ID} reading 4: 'Nope' is not an EdgeX value type",
    ]


def test_an_event_whose_readings_are_all_bad_is_dropped_but_each_reading_counted() -> None:
    result = decode_message(_json(_event_doc(_reading_doc(value="x"), _reading_doc(valueType="?"))))
    assert result.events == []
    assert [e.reason for e in result.rejected] == ["bad_value", "unknown_value_type"]


def test_binary_in_cbor_must_be_a_byte_string() -> None:
    doc = cbor2.loads(CBOR_REQUEST)
    doc["event"]["readings"][0]["binaryValue"] = "BBKa/w=="  # base64 text where CBOR carries bytes
    result = decode_message(cbor2.dumps(doc))
    assert [e.reason for e in result.rejected] == ["bad_field_type"]
    assert [r.resource for r in result.events[0].readings] == ["Granted"]


def test_object_values_in_cbor_must_be_json_values() -> None:
    for bad in ({"a": b"bytes"}, {"a": float("nan")}, [float("inf")], {"a": [1, {"b": b""}]}):
        doc = cbor2.loads(CBOR_REQUEST)
        doc["event"]["readings"][1] = {
            **doc["event"]["readings"][1],
            "valueType": "Object",
            "objectValue": bad,
        }
        del doc["event"]["readings"][1]["value"]
        result = decode_message(cbor2.dumps(doc))
        assert [e.reason for e in result.rejected] == ["bad_value"], bad


# --- what EdgeX accepts and fedge therefore reads ----------------------------------------------


def test_value_types_are_matched_without_letter_case_like_edgex() -> None:
    result = _decode_one_reading(_reading_doc(valueType="float64"))
    assert result.events[0].readings[1].value_type == "Float64"


@pytest.mark.parametrize(
    ("changes", "value"),
    [
        ({"value": None}, None),
        ({"value": DROP}, None),
        ({"valueType": "Binary", "value": None, "binaryValue": None, "objectValue": None}, None),
        ({"valueType": "Object", "value": DROP}, None),
        # EdgeX 3.0 also wrote "value": "" on binary and object readings (SimpleReading had no omitempty)
        ({"valueType": "Binary", "value": "", "binaryValue": "QUJD", "mediaType": "text/plain"}, b"ABC"),
        ({"valueType": "Object", "value": "", "objectValue": {"k": [1, "v"]}}, {"k": [1, "v"]}),
        ({"valueType": "Binary", "value": DROP, "binaryValue": ""}, b""),
        ({"valueType": "String", "value": ""}, ""),
    ],
    ids=[
        "null value",
        "absent value",
        "null binary",
        "absent object",
        "3.0 binary",
        "3.0 object",
        "empty binary",
        "empty string",
    ],
)
def test_null_readings_and_older_shapes(changes: dict[str, Any], value: Any) -> None:
    result = _decode_one_reading(_reading_doc(**changes))
    assert result.rejected == []
    assert result.events[0].readings[1].value == value


def test_extension_fields_apiversion_and_reading_tags_are_ignored() -> None:
    reading = _reading_doc(tags={"calibrated": True}, extra=1)
    result = decode_message(_json(_event_doc(reading, apiVersion=DROP, custom={"x": 1})))
    assert result.events[0].readings[0].value == 23.1
    assert result.rejected == []


def test_names_with_slashes_spaces_hashes_and_escapes() -> None:
    payload = (
        b'{"id":"' + EVENT_ID.encode() + b'","deviceName":"a\\/b \\u0023c\\tD",'
        b'"profileName":"\\u00e9t\\u00e9","sourceName":"\\ud83c\\udf21 src","origin":1,"readings":[{'
        b'"origin":1,"deviceName":"a\\/b \\u0023c\\tD","resourceName":"r\\"q\\\\s","profileName":"p",'
        b'"valueType":"String","value":"\\u2028\\u0000\\n"}]}'
    )
    event = decode_message(payload).events[0]
    assert (event.device, event.profile, event.source) == ("a/b #c\tD", "été", "\U0001f321 src")
    assert event.readings[0].resource == 'r"q\\s'
    assert event.readings[0].value == "\u2028\x00\n"
    assert decode_message(encode_plain_event(event)).events == [event]


def test_leading_whitespace_before_json_is_fine() -> None:
    assert decode_message(b" \n\t" + _golden("add-event-request.json")).events == [REST_JSON_EVENT]


def test_a_bytearray_or_memoryview_payload_is_accepted() -> None:
    data = _golden("v3-envelope-cbor-binary.json")
    assert decode_message(bytearray(data)).events == [V3_CBOR_EVENT]
    assert decode_message(memoryview(data)).events == [V3_CBOR_EVENT]  # type: ignore[arg-type]


def test_a_4x_envelope_with_base64_json_payload_decodes_like_3x() -> None:
    """EDGEX_MSG_BASE64_PAYLOAD=true makes 4.x send JSON payloads as base64 too."""
    envelope = json.loads(_golden("v4-envelope-json-embedded.json"))
    envelope["payload"] = _b64(json.dumps(envelope["payload"]).encode())
    result = decode_message(_json(envelope))
    assert (result.events, result.kind) == ([V4_JSON_EVENT], "envelope_base64")


def test_a_bare_event_in_an_envelope_and_in_cbor() -> None:
    event = _event_doc()
    assert decode_message(_json(_envelope_doc(_b64(_json(event))))).kind == "envelope_base64"
    result = decode_message(cbor2.dumps(event))
    assert (result.kind, result.content_type, len(result.events)) == ("event", CBOR, 1)


def test_reasons_are_the_documented_ones() -> None:
    assert {
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
    } == MESSAGE_REASONS
    assert {
        "missing_field",
        "bad_field_type",
        "bad_field_value",
        "unknown_value_type",
        "bad_value",
        "out_of_type_range",
        "bad_base64",
    } == READING_REASONS


# --- encoding --------------------------------------------------------------------------------------


def test_event_dto_has_go_key_order_and_omits_empty_optionals() -> None:
    dto = event_to_dto(V4_JSON_EVENT)
    assert list(dto) == ["apiVersion", "id", "deviceName", "profileName", "sourceName", "origin", "readings"]
    assert list(dto["readings"][0]) == [
        "id",
        "origin",
        "deviceName",
        "resourceName",
        "profileName",
        "valueType",
        "units",
        "value",
    ]
    assert list(dto["readings"][4]) == [
        "origin",
        "deviceName",
        "resourceName",
        "profileName",
        "valueType",
        "value",
    ]
    assert (
        dto["readings"][8]["value"]
        is dto["readings"][8]["binaryValue"]
        is dto["readings"][8]["objectValue"]
        is None
    )
    binary = event_to_dto(V3_CBOR_EVENT)["readings"][0]
    assert (binary["binaryValue"], binary["mediaType"]) == (_b64(PNG), "image/png")
    assert event_to_dto(V3_CBOR_EVENT, content_type=CBOR)["readings"][0]["binaryValue"] == PNG
    assert list(event_to_dto(PLAIN_EVENT))[-1] == "tags"


def test_go_json_escapes_html_and_line_separators() -> None:
    reading = Reading("d", "r", "p", "String", "<a> & \u2028\u2029 é", 1)
    event = Event(EVENT_ID, "d", "p", "s", 1, (reading,), {"b": "&", "a": "<"})
    text = encode_plain_event(event)
    assert b'"value":"\\u003ca\\u003e \\u0026 \\u2028\\u2029 \xc3\xa9"' in text
    assert text.endswith(b'"tags":{"a":"\\u003c","b":"\\u0026"}}')  # Go sorts map keys
    assert decode_message(text).events == [event]


def test_an_empty_binary_value_is_omitted_like_go_and_reads_back_as_null() -> None:
    reading = Reading("d", "r", "p", "Binary", b"", 1, media_type="image/png")
    event = Event(EVENT_ID, "d", "p", "s", 1, (reading,))
    dto = event_to_dto(event)["readings"][0]
    assert "binaryValue" not in dto and dto["mediaType"] == "image/png"
    assert decode_message(encode_plain_event(event)).events[0].readings[0].value is None


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (Event(EVENT_ID, "d", "p", "s", 1, ()), "bad_field_value"),
        (Event("nope", "d", "p", "s", 1, (Reading("d", "r", "p", "Bool", True, 1),)), "bad_field_value"),
        (Event(EVENT_ID, " ", "p", "s", 1, (Reading("d", "r", "p", "Bool", True, 1),)), "bad_field_value"),
        (Event(EVENT_ID, "d", "p", "s", 0, (Reading("d", "r", "p", "Bool", True, 1),)), "bad_field_value"),
        (Event(EVENT_ID, "d", "p", "s", 1, (Reading("d", "", "p", "Bool", True, 1),)), "bad_field_value"),
        (
            Event(EVENT_ID, "d", "p", "s", 1, (Reading("d", "r", "p", "Bool", True, 2**63),)),
            "bad_field_value",
        ),
        (Event(EVENT_ID, "d", "p", "s", 1, (Reading("d", "r", "p", "Bool", "yes", 1),)), "bad_value"),
        (Event(EVENT_ID, "d", "p", "s", 1, (Reading("d", "r", "p", "Binary", b"x", 1),)), "missing_field"),
        (
            Event(EVENT_ID, "d", "p", "s", 1, (Reading("d", "r", "p", "Binary", "x", 1, media_type="a/b"),)),
            "bad_value",
        ),
        (
            Event(EVENT_ID, "d", "p", "s", 1, (Reading("d", "r", "p", "Object", {"a": math.nan}, 1),)),
            "bad_value",
        ),
        (Event(EVENT_ID, "d", "p", "s", 1, (Reading("d", "r", "p", "Object", {"a": b"x"}, 1),)), "bad_value"),
        (Event(EVENT_ID, "d", "p", "s", 1, (Reading("d", "r", "p", "Object", {1: "x"}, 1),)), "bad_value"),
        (Event(EVENT_ID, "d", "p", "s", 1, (Reading("d", "r", "p", "Complex", 1, 1),)), "unknown_value_type"),
        (
            Event(EVENT_ID, "d", "p", "s", 1, (Reading("d", "r", "p", "Bool", True, 1),), {"t": math.inf}),
            "bad_field_value",
        ),
    ],
)
def test_encoders_refuse_what_edgex_would_refuse(event: Event, reason: str) -> None:
    with pytest.raises(ReadingError) as exc:
        encode_envelope(event, "v4", correlation_id="c", request_id="r")
    assert exc.value.reason == reason


def test_encode_envelope_arguments() -> None:
    with pytest.raises(ValueError, match="unknown EdgeX envelope version"):
        encode_envelope(V4_JSON_EVENT, "v2")
    with pytest.raises(ValueError, match="unsupported content type"):
        encode_envelope(V4_JSON_EVENT, "v4", content_type="application/xml")
    with pytest.raises(ValueError, match="not a topic"):
        encode_envelope(V4_JSON_EVENT, "v4", "edgex/events/#")
    with pytest.raises(ValueError, match="unsupported content type"):
        encode_add_event_request(V4_JSON_EVENT, request_id="r", content_type="text/plain")


def test_encode_envelope_makes_fresh_ids_when_not_given_and_never_writes_the_topic() -> None:
    topic = edgex_event_topic(
        "edgex", "svc", V4_JSON_EVENT.profile, V4_JSON_EVENT.device, V4_JSON_EVENT.source
    )
    first, second = (json.loads(encode_envelope(V4_JSON_EVENT, "v4", topic)) for _ in range(2))
    assert first["correlationID"] != second["correlationID"]
    assert first["payload"]["requestId"] != second["payload"]["requestId"]
    assert first["receivedTopic"] == "" and first["requestID"] == ""
    assert decode_message(json.dumps(first).encode()).correlation_id == first["correlationID"]


def test_v3_uses_go_e_and_v4_shortest_by_default() -> None:
    v3 = decode_message(encode_envelope(V3_JSON_EVENT, "v3", correlation_id="c", request_id="r"))
    assert v3.events == [V3_JSON_EVENT]
    raw = base64.b64decode(json.loads(encode_envelope(V3_JSON_EVENT, "v3"))["payload"])
    assert b'"value":"2.310000e+01"' in raw
    v4 = encode_envelope(V3_JSON_EVENT, "v4")
    assert b'"value":"2.31e+01"' in v4
    assert b'"value":"4.550000e+01"' in encode_envelope(V3_JSON_EVENT, "v4", float_style="go_e")


# --- round trips (hypothesis) -----------------------------------------------------------------------

_TEXT = st.text(max_size=12)
_NAME = st.text(min_size=1, max_size=12).filter(str.strip)
_ORIGIN = st.integers(-(2**63), 2**63 - 1).filter(bool)
_JSON_VALUE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TEXT,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)
# Array elements that survive Go's "[a, b]" spelling: no commas, spaces or other whitespace.
_ARRAY_STRING = st.text(
    st.characters(blacklist_categories=("Z", "C"), blacklist_characters=","), min_size=1, max_size=8
)


def _canonical_float(bits: int, style: str) -> st.SearchStrategy[float]:
    """Floats as a device service of ``style`` would send them: what its strings parse to."""
    return (
        st.floats(width=bits, allow_nan=False, allow_infinity=False)  # type: ignore[arg-type]
        .map(lambda f: float(format_float(f, bits, style)))  # type: ignore[arg-type]
        # The float32 maximum's own shortest form is refused by parse_scalar (see
        # test_edgex_readings.py::test_float32_max_in_shortest_form_is_accepted).
        .filter(lambda f: bits == 64 or abs(f) <= FLOAT32_MAX)
    )


def _scalar(value_type: str, style: str) -> st.SearchStrategy[Any]:
    if value_type == "Bool":
        return st.booleans()
    if value_type == "String":
        return _TEXT
    if value_type in INT_RANGES:
        return st.integers(*INT_RANGES[value_type])
    return _canonical_float(32 if value_type == "Float32" else 64, style)


@st.composite
def _readings_st(draw: st.DrawFn, style: str) -> Reading:
    value_type = draw(
        st.sampled_from(
            [
                "Bool",
                "String",
                *INT_RANGES,
                "Float32",
                "Float64",
                "BoolArray",
                "StringArray",
                "Int8Array",
                "Uint64Array",
                "Float32Array",
                "Float64Array",
                "Binary",
                "Object",
                "ObjectArray",
            ]
        )
    )
    media_type = ""
    value: Any
    if draw(st.integers(0, 9)) == 0:
        value = None
    elif value_type == "Binary":
        value, media_type = draw(st.binary(min_size=1, max_size=24)), draw(_NAME)
    elif value_type == "Object":
        value = draw(st.dictionaries(st.text(max_size=5), _JSON_VALUE, max_size=3))
    elif value_type == "ObjectArray":
        value = draw(st.lists(st.dictionaries(st.text(max_size=5), _JSON_VALUE, max_size=2), max_size=3))
    elif value_type == "StringArray":
        value = tuple(draw(st.lists(_ARRAY_STRING, max_size=4)))
    elif value_type.endswith("Array"):
        value = tuple(draw(st.lists(_scalar(value_type[: -len("Array")], style), max_size=4)))
    else:
        value = draw(_scalar(value_type, style))
    return Reading(
        draw(_NAME),
        draw(_NAME),
        draw(_NAME),
        value_type,
        value,
        draw(_ORIGIN),
        draw(_TEXT),
        media_type,
        draw(st.just("") | st.uuids().map(str)),
    )


@st.composite
def _events_st(draw: st.DrawFn, style: str) -> Event:
    return Event(
        str(draw(st.uuids())),
        draw(_NAME),
        draw(_NAME),
        draw(_NAME),
        draw(_ORIGIN),
        tuple(draw(st.lists(_readings_st(style), min_size=1, max_size=4))),
        draw(st.dictionaries(st.text(max_size=6), _JSON_VALUE, max_size=3)),
    )


_WIRES = [
    ("envelope", "v3", JSON),
    ("envelope", "v3", CBOR),
    ("envelope", "v4", JSON),
    ("envelope", "v4", CBOR),
    ("request", "", JSON),
    ("request", "", CBOR),
    ("plain", "", JSON),
]


def _encode(event: Event, wire: tuple[str, str, str], style: str) -> bytes:
    shape, version, content_type = wire
    if shape == "envelope":
        return encode_envelope(
            event, version, content_type=content_type, correlation_id="c", request_id="r", float_style=style
        )  # type: ignore[arg-type]
    if shape == "request":
        return encode_add_event_request(event, request_id="r", content_type=content_type, float_style=style)  # type: ignore[arg-type]
    return encode_plain_event(event, float_style=style)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wire=st.sampled_from(_WIRES), style=st.sampled_from(["go_e", "shortest"]), data=st.data())
def test_decode_of_encode_is_the_event_for_every_version_and_content_type(
    wire: tuple[str, str, str], style: str, data: st.DataObject
) -> None:
    event = data.draw(_events_st(style))
    result = decode_message(_encode(event, wire, style), max_bytes=10 * DEFAULT_MAX_BYTES)
    assert result.events == [event]
    assert result.rejected == []
    assert result.content_type == wire[2]


def test_nan_round_trips_as_nan() -> None:
    reading = Reading("d", "r", "p", "Float64Array", (math.nan, 1.0), 1)
    event = Event(EVENT_ID, "d", "p", "s", 1, (reading,))
    for style in ("go_e", "shortest"):
        value = decode_message(encode_plain_event(event, float_style=style)).events[0].readings[0].value  # type: ignore[arg-type]
        assert isinstance(value, tuple) and math.isnan(value[0]) and value[1] == 1.0


# --- fuzzing: only ReadingError or a DecodeResult, whatever arrives -----------------------------


def _decode_or_reading_error(data: bytes) -> None:
    try:
        result = decode_message(data, max_bytes=4096)
    except ReadingError as exc:
        assert exc.reason in MESSAGE_REASONS
        assert str(exc).startswith(exc.reason + ": ")
        return
    assert isinstance(result, DecodeResult)
    assert len(result.events) <= 1
    assert all(e.reason in READING_REASONS for e in result.rejected)
    for event in result.events:
        assert event.readings


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_only_raise_reading_error(data: bytes) -> None:
    _decode_or_reading_error(data)


@settings(max_examples=300, deadline=None)
@given(
    prefix=st.sampled_from([b"{", b"\xa1", b"\xa3", b"\xbf", b'{"payload":"', b'{"event":{']),
    data=st.binary(max_size=120),
)
def test_bytes_that_start_like_a_message_only_raise_reading_error(prefix: bytes, data: bytes) -> None:
    _decode_or_reading_error(prefix + data)


_KEYS = [
    "apiVersion",
    "payload",
    "contentType",
    "errorCode",
    "correlationID",
    "event",
    "id",
    "deviceName",
    "profileName",
    "sourceName",
    "origin",
    "readings",
    "resourceName",
    "valueType",
    "value",
    "binaryValue",
    "mediaType",
    "objectValue",
    "units",
    "tags",
    "requestId",
]
_FIELD_VALUES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**65), 2**65)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(
        [
            JSON,
            CBOR,
            EVENT_ID,
            "Float64",
            "Binary",
            "Object",
            "Int8Array",
            "2.31e+01",
            "[1, 2]",
            "QUJD",
            "",
            " ",
        ]
    )
    | st.text(max_size=8)
)
_DOCS = st.recursive(
    _FIELD_VALUES,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(_KEYS), children, max_size=6)
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(
    doc=st.dictionaries(st.sampled_from(_KEYS), _DOCS, max_size=7),
    as_cbor=st.booleans(),
    wrap=st.sampled_from(["none", "json", "cbor"]),
)
def test_arbitrary_documents_with_edgex_keys_only_raise_reading_error(
    doc: dict[str, Any], as_cbor: bool, wrap: str
) -> None:
    body = cbor2.dumps(doc) if as_cbor else _json(doc)
    if wrap != "none":
        body = _json(_envelope_doc(_b64(body), contentType=CBOR if wrap == "cbor" else JSON))
    _decode_or_reading_error(body)


@settings(max_examples=300, deadline=None)
@given(golden=st.sampled_from([g.file for g in GOLDENS] + ["error-envelope.json"]), data=st.data())
def test_any_byte_flip_of_a_golden_only_raises_reading_error(golden: str, data: st.DataObject) -> None:
    raw = bytearray(_golden(golden))
    position = data.draw(st.integers(0, len(raw) - 1))
    raw[position] ^= 1 << data.draw(st.integers(0, 7))
    _decode_or_reading_error(bytes(raw))


@settings(max_examples=200, deadline=None)
@given(
    value_type=st.sampled_from(["Int8", "Uint64", "Float32", "Float64", "Bool", "Int8Array", "Float32Array"]),
    text=st.text(max_size=24),
)
def test_arbitrary_value_strings_are_a_value_or_a_counted_refusal(value_type: str, text: str) -> None:
    result = _decode_one_reading(_reading_doc(valueType=value_type, value=text))
    assert len(result.events[0].readings) + len(result.rejected) == 2


# --- topics ---------------------------------------------------------------------------------------


def test_event_topics() -> None:
    assert edgex_event_topic(
        "edgex", "device-virtual", "Random-Float-Device", "Random-Float-Device", "Float32"
    ) == ("edgex/events/device/device-virtual/Random-Float-Device/Random-Float-Device/Float32")
    assert edgex_event_topic("site-1/edgex", "s", "p", "d", "src", publisher="core") == (
        "site-1/edgex/events/core/s/p/d/src"
    )
    assert edgex_event_topic("edgex", "s", "p", "Room 2", "src") == "edgex/events/device/s/p/Room 2/src"


def test_topic_escape_is_edgex_url_encode() -> None:
    assert edgex_topic_escape("Room 2/Sensor #3") == "Room%202%2FSensor%20%233"
    assert edgex_topic_escape("a+b-c.d_e~f") == "a%2Bb%2Dc%2Ed%5Fe%7Ef"
    assert edgex_topic_escape("$&:=@Az09") == "$&:=@Az09"
    assert edgex_topic_escape("é?,;") == "%C3%A9%3F%2C%3B"
    assert edgex_event_topic("edgex", "s", "p", "Room 2/Sensor #3", "T+1", escape=True) == (
        "edgex/events/device/s/p/Room%202%2FSensor%20%233/T%2B1"
    )


@pytest.mark.parametrize("name", ["a/b", "a+b", "a#b", "a\x00b", ""])
def test_names_that_would_break_a_topic_need_escaping(name: str) -> None:
    with pytest.raises(ReadingError) as exc:
        edgex_event_topic("edgex", "s", "p", name, "src")
    assert exc.value.reason == "bad_topic_name"
    if name:
        assert "/" not in edgex_event_topic("edgex", "s", "p", name, "src", escape=True).split("/p/")[1][:-4]


@pytest.mark.parametrize("prefix", ["", "edgex/", "/edgex", "edgex/#", "a//b", "+"])
def test_bad_prefixes(prefix: str) -> None:
    with pytest.raises(ValueError, match="bad EdgeX topic prefix"):
        edgex_event_topic(prefix, "s", "p", "d", "src")
    with pytest.raises(ValueError, match="bad EdgeX topic prefix"):
        edgex_event_filters(prefix)


def test_subscription_filters() -> None:
    assert edgex_event_filters() == ("edgex/events/device/#", "edgex/events/core/#")
    assert edgex_event_filters("site-1/edgex") == (
        "site-1/edgex/events/device/#",
        "site-1/edgex/events/core/#",
    )
    assert edgex_event_filter(device="Room 2") == "edgex/events/device/+/+/Room 2/#"
    assert edgex_event_filter(service="svc") == "edgex/events/device/svc/#"
    assert (
        edgex_event_filter(service="s", profile="p", device="d", source="x") == "edgex/events/device/s/p/d/x"
    )
    assert edgex_event_filter(publisher="core", source="T+1", escape=True) == "edgex/events/core/+/+/+/T%2B1"
    with pytest.raises(ValueError, match="publisher"):
        edgex_event_filter(publisher="app")  # type: ignore[arg-type]


_FIELD_VALUES: dict[str, list[Any]] = {
    "id": [DROP, None, "r-1", "", 7],
    "origin": [1700000000000000000, 1700000000000000001, 0, -5, 2**63, True, 1.5, None, DROP],
    "deviceName": ["dev", "dev2", "", "  ", None, 3, DROP],
    "resourceName": ["Temperature", "Humidity", "", None, ["x"], DROP],
    "profileName": ["prof", " ", None, DROP],
    "valueType": [
        "Float64",
        "Float32",
        "String",
        "Int16",
        "Bool",
        "float64",
        "Float32Array",
        "Binary",
        None,
        DROP,
    ],
    "value": [
        "2.31e+01",
        "-0",
        "1e39",
        "3.4028235e+38",
        "1e999",
        "NaN",
        "x",
        "1\n2",
        "7",
        "true",
        "[1, 2]",
        "",
        None,
        5,
        DROP,
    ],
    "units": [DROP, None, "degC", "", 1],
    "tags": [DROP, None, {"a": "b"}, "t"],
}


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.just({}),
            st.fixed_dictionaries({}, optional={k: st.sampled_from(v) for k, v in _FIELD_VALUES.items()}),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_an_event_decoded_at_once_equals_one_decoded_reading_by_reading(
    changes: list[dict[str, Any]],
) -> None:
    """The decoder takes an event's readings at once when every one is simple; else one by one.
    Both give the same readings, and the same rejections with the same messages, whatever the
    readings hold."""
    raw = _json(_event_doc(*(_reading_doc(**c) for c in changes)))
    at_once = decode_message(raw)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(wire_module, "_decode_simple_readings", lambda raws: None)
        one_by_one = decode_message(raw)
    # repr: a NaN value is equal in repr only
    assert repr(at_once.events) == repr(one_by_one.events)
    assert [(e.reason, str(e)) for e in at_once.rejected] == [(e.reason, str(e)) for e in one_by_one.rejected]


def test_the_demo_event_is_decoded_at_once() -> None:
    """The demo's events (floats and a class name) take the batch path, and give the readings
    the one-by-one path gives."""
    readings = [
        _reading_doc(resourceName=f"r{i % 7}", value=f"{i / 7:.6e}", valueType="Float32") for i in range(60)
    ]
    readings += [_reading_doc(resourceName="activity", valueType="String", value="PEN")]
    raws = json.loads(_json(_event_doc(*readings)))["readings"]
    fast = wire_module._decode_simple_readings(raws)
    assert fast is not None
    names: dict[str, str] = {}
    assert fast == [wire_module._decode_simple_reading(r, names, {}) for r in raws]
