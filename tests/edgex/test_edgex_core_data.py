"""EdgeX core-data over REST: CoreDataClient against the simulator's CoreDataServer, real HTTP.

Every test runs once per EdgeX spec (3.1.1 and 4.0.2). The ``harness`` fixture records every
request the client sends (a recording ``requests.Session``) and every exchange the server
serves, and at teardown validates them all with openapi-core against EdgeX's own OpenAPI spec;
it also checks that closing the servers left no thread behind. Waits are bounded, never timed:
the client's ``sleep`` is recorded instead of slept, so backoff is asserted as numbers.

Where the double knowingly departs from the spec (because EdgeX does), the check says so:
- error bodies are one ``ErrorResponse`` object; the specs declare the 400/500 bodies of the
  readings endpoints as arrays, but edgex-go's ``WriteErrorResponse`` writes a single object;
- 401 (auth middleware), 404 (unknown device, opt-in strict mode) and 503 (outage, as from a
  gateway) are not declared for these operations: their bodies are checked against the spec's
  ``ErrorResponse`` schema instead;
- bytes injected with ``override_next`` are deliberately broken and are not validated.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import jsonschema
import pytest
import requests
import yaml
from openapi_core import OpenAPI
from openapi_core.contrib.requests import RequestsOpenAPIRequest
from openapi_core.datatypes import RequestParameters
from openapi_core.validation.request.exceptions import RequestValidationError
from openapi_core.validation.response.exceptions import ResponseValidationError
from werkzeug.datastructures import Headers, ImmutableMultiDict

from fedge.agent.edgex.core_data import MAX_PAGE_LIMIT, CoreDataClient, CoreDataError
from fedge.agent.edgex.readings import Reading
from fedge.lab.edgex_core_data_server import CoreDataServer, Exchange

SPEC_VERSIONS = ("v3.1.1", "v4.0.2")
DEVICE = "Random-Float-Device"
PROFILE = "Random-Float-Device"
BASE_NS = 1_700_000_000_000_000_000
READINGS_PREFIX = "/api/v3/reading/device/name/"
#: Statuses the double serves that the specs do not declare for the operation (see above).
OFF_SPEC_STATUSES = {401, 404, 503}
ERROR_ARRAY_SCHEMA = {"type": "array", "items": {"$ref": "#/components/schemas/ErrorResponse"}}


# -- the specs ---------------------------------------------------------------------------------


def _openapi_dir() -> Path:
    override = os.environ.get("FEDGE_SHARED_DIR")
    shared = Path(override) if override else Path(__file__).resolve().parents[3] / "shared"
    directory = shared / "edgex" / "openapi"
    missing = [v for v in SPEC_VERSIONS if not (directory / v / "core-data.yaml").is_file()]
    if missing:
        message = f"EdgeX core-data specs {missing} not found under {directory} (set FEDGE_SHARED_DIR)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return directory


def _fix_yaml_booleans(node: Any) -> None:
    """v4.0.2 writes the ``numeric`` query parameter as ``type: string, enum: [true, false]``;
    YAML reads those as booleans, which the spec validator rightly rejects. The values on the
    wire are the strings "true"/"false", so that is what the schema must say."""
    if isinstance(node, dict):
        if node.get("type") == "string":
            if isinstance(node.get("enum"), list):
                node["enum"] = [str(v).lower() if isinstance(v, bool) else v for v in node["enum"]]
            if isinstance(node.get("default"), bool):
                node["default"] = str(node["default"]).lower()
        for value in node.values():
            _fix_yaml_booleans(value)
    elif isinstance(node, list):
        for value in node:
            _fix_yaml_booleans(value)


@functools.cache
def _load_spec(version: str) -> tuple[dict[str, Any], OpenAPI]:
    spec = yaml.safe_load((_openapi_dir() / version / "core-data.yaml").read_text())
    _fix_yaml_booleans(spec)
    # The specs name one development server (http://localhost:59880/api/v3); what matters is the
    # path prefix, so match any host.
    spec["servers"] = [{"url": "/api/v3"}]
    return spec, OpenAPI.from_dict(spec)


@functools.cache
def _error_response_validator(version: str) -> jsonschema.Draft202012Validator:
    spec, _ = _load_spec(version)
    schema = {"$ref": "#/components/schemas/ErrorResponse", "components": spec["components"]}
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def _declared_response(spec: dict[str, Any], path: str, status: int) -> dict[str, Any] | None:
    """The spec's response object for GET ``path`` with ``status``, or None if undeclared."""
    for template, item in spec["paths"].items():
        pattern = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape("/api/v3" + template))
        if re.fullmatch(pattern, path) and "get" in item:
            declared: dict[str, Any] | None = item["get"]["responses"].get(str(status))
            return declared
    raise AssertionError(f"no GET operation in the spec matches {path}")


class _CapturedRequest:
    """openapi-core's Request protocol over a request as the server received it."""

    def __init__(self, exchange: Exchange) -> None:
        self.host_url = "http://core-data"  # servers are matched on the path only (see above)
        self.path = exchange.path
        self.method = exchange.method.lower()
        self.body = exchange.body or None
        self.content_type = exchange.headers.get("Content-Type", "")
        self.parameters = RequestParameters(
            query=ImmutableMultiDict(parse_qsl(exchange.query, keep_blank_values=True)),
            header=Headers(exchange.headers),
            cookie=ImmutableMultiDict(),
        )


class _CapturedResponse:
    """openapi-core's Response protocol over a response as the server wrote it."""

    def __init__(self, exchange: Exchange) -> None:
        assert exchange.status is not None
        self.status_code = exchange.status
        self.content_type = exchange.response_headers.get("Content-Type", "")
        self.headers = Headers(exchange.response_headers)
        self.data = exchange.response_body


# -- the harness -------------------------------------------------------------------------------


class RecordingSession(requests.Session):
    """A session that remembers every request it sends, refused connections included."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[requests.PreparedRequest] = []

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        self.sent.append(request)
        return super().send(request, **kwargs)


@dataclass
class Harness:
    version: str
    spec: dict[str, Any]
    api: OpenAPI
    servers: list[CoreDataServer] = field(default_factory=list)
    sessions: list[RecordingSession] = field(default_factory=list)
    sleeps: list[float] = field(default_factory=list)
    on_sleep: Callable[[int], None] | None = None
    _raw: RecordingSession | None = None

    def server(self, **kwargs: Any) -> CoreDataServer:
        server = CoreDataServer(**kwargs)
        self.servers.append(server)
        return server

    def client(self, server: CoreDataServer, **kwargs: Any) -> CoreDataClient:
        session = RecordingSession()
        self.sessions.append(session)

        def sleep(seconds: float) -> None:
            self.sleeps.append(seconds)
            if self.on_sleep is not None:
                self.on_sleep(len(self.sleeps))

        kwargs.setdefault("backoff_s", 0.01)
        return CoreDataClient(server.url, session=session, sleep=sleep, **kwargs)

    def raw_get(self, server: CoreDataServer, path: str, **params: Any) -> requests.Response:
        """A hand-made request (validated like the client's) for server behaviour tests.

        One keep-alive session for all of them, so a listener runs before the next request."""
        if self._raw is None:
            self._raw = RecordingSession()
            self.sessions.append(self._raw)
        session = self._raw
        headers = {"X-Correlation-ID": str(uuid.uuid4())}
        return session.get(server.url + path, params=params, headers=headers, timeout=5)

    def validate_everything(self) -> int:
        checked = 0
        for session in self.sessions:
            for prepared in session.sent:
                self.api.validate_request(RequestsOpenAPIRequest(prepared))
                checked += 1
        for server in self.servers:
            for exchange in server.exchanges:
                self._validate_exchange(exchange)
                checked += 1
        return checked

    def _validate_exchange(self, exchange: Exchange) -> None:
        request = _CapturedRequest(exchange)
        self.api.validate_request(request)
        if exchange.status is None or exchange.note == "override":
            return
        declared = _declared_response(self.spec, exchange.path, exchange.status)
        body = json.loads(exchange.response_body)
        if declared is None:
            assert exchange.status in OFF_SPEC_STATUSES, f"{exchange.status} for {exchange.path}"
            _error_response_validator(self.version).validate(body)
        elif declared["content"]["application/json"]["schema"] == ERROR_ARRAY_SCHEMA and isinstance(
            body, dict
        ):
            _error_response_validator(self.version).validate(body)  # EdgeX writes one object
        else:
            self.api.validate_response(request, _CapturedResponse(exchange))


@pytest.fixture(params=SPEC_VERSIONS)
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    spec, api = _load_spec(request.param)
    threads_before = set(threading.enumerate())
    h = Harness(request.param, spec, api)
    yield h
    for server in h.servers:
        server.close()
    for session in h.sessions:
        session.close()
    leftover = [t.name for t in threading.enumerate() if t not in threads_before and t.is_alive()]
    assert leftover == [], "threads left running after close()"
    for server in h.servers:
        assert server.errors == []
    if h.servers or h.sessions:
        assert h.validate_everything() > 0


# -- data --------------------------------------------------------------------------------------


def reading_dto(
    n: int,
    origin: int,
    *,
    resource: str = "Float32",
    value_type: str = "Float32",
    value: str = "2.310000e+01",
    device: str = DEVICE,
    with_id: bool = True,
) -> dict[str, Any]:
    dto: dict[str, Any] = {
        "deviceName": device,
        "profileName": PROFILE,
        "resourceName": resource,
        "origin": origin,
        "valueType": value_type,
        "value": value,
    }
    if with_id:
        dto["id"] = str(uuid.UUID(int=n + 1))
    return dto


def go_e(value: float) -> str:
    """Go's ``%e`` (EdgeX 3.x, contracts 4.0.0): ``2.310000e+01``."""
    return f"{value:e}"


def go_shortest_e(value: float) -> str:
    """Go's ``FormatFloat(v, 'e', -1, 64)`` (contracts 4.0.1+) for short decimals: ``2.31e+01``."""
    return re.sub(r"\.?0+e", "e", f"{value:e}")


def ids(readings: list[Reading]) -> list[str]:
    return [r.id for r in readings]


def readings_requests(server: CoreDataServer) -> list[Exchange]:
    return [e for e in server.exchanges if e.path.startswith(READINGS_PREFIX)]


# -- tests: the happy path ---------------------------------------------------------------------


def test_ping_is_a_health_check(harness: Harness) -> None:
    server = harness.server()
    client = harness.client(server)
    assert client.ping() is True
    server.set_available(False, mode="503")
    assert client.ping() is False
    server.set_available(False, mode="refuse")
    assert client.ping() is False
    server.set_available(True)
    assert client.ping() is True
    assert harness.sleeps == []  # a health check reports the present: no retries


def test_backfills_2500_readings_once_each_in_origin_order(harness: Harness) -> None:
    server = harness.server()
    # Pairs share an origin (two resources sampled together), so ties straddle page edges;
    # values alternate between Go's two float formats.
    dtos = []
    for n in range(2500):
        value = n + 0.5
        dtos.append(
            reading_dto(
                n,
                BASE_NS + (n // 2) * 1_000_000,
                resource="Float64" if n % 2 else "Float32",
                value_type="Float64" if n % 2 else "Float32",
                value=go_shortest_e(value) if n % 3 else go_e(value),
            )
        )
    server.add_readings(reversed(dtos))
    client = harness.client(server)

    got = list(client.readings_for_device(DEVICE, BASE_NS, BASE_NS + 10**12, page_limit=1024))

    expected = sorted(dtos, key=lambda d: (d["origin"], d["resourceName"], d["id"]))
    assert len(got) == 2500 == len(set(ids(got)))
    assert ids(got) == [d["id"] for d in expected]
    assert [r.origin_ns for r in got] == sorted(r.origin_ns for r in got)
    assert all(r.value == int(uuid.UUID(r.id)) - 1 + 0.5 for r in got)
    pages = readings_requests(server)
    assert len(pages) == 3
    assert all("limit=1024" in e.query for e in pages)

    newest = list(client.readings_for_device(DEVICE, BASE_NS, BASE_NS + 10**12, newest_first=True))
    assert sorted(ids(newest)) == sorted(ids(got))
    assert [r.origin_ns for r in newest] == sorted((r.origin_ns for r in newest), reverse=True)


def test_time_range_is_inclusive_at_both_ends(harness: Harness) -> None:
    # edgex-go: Postgres `origin >= start AND origin <= end`, Redis ZREVRANGEBYSCORE end start.
    server = harness.server()
    start, end = BASE_NS + 1000, BASE_NS + 2000
    origins = [start - 1, start, start + 1, end - 1, end, end + 1]
    server.add_readings(reading_dto(n, o) for n, o in enumerate(origins))
    client = harness.client(server)
    got = list(client.readings_for_device(DEVICE, start, end))
    assert [r.origin_ns for r in got] == [start, start + 1, end - 1, end]
    assert list(client.readings_for_device(DEVICE, start, start)) == got[:1]


def test_pages_that_shift_while_paging_lose_nothing_and_repeat_nothing(harness: Harness) -> None:
    start, end = BASE_NS, BASE_NS + 10**10
    originals = [reading_dto(n, BASE_NS + n * 1000) for n in range(2500)]
    appended: list[dict[str, Any]] = []

    def grow(server: CoreDataServer) -> Callable[[Exchange], None]:
        """After each of the first two pages, add readings all over the range (and outside)."""
        served = 0

        def listener(exchange: Exchange) -> None:
            nonlocal served
            if not exchange.path.startswith(READINGS_PREFIX) or exchange.status != 200 or served >= 2:
                return
            served += 1
            page = json.loads(exchange.response_body)["readings"]
            boundary = min(r["origin"] for r in page)
            batch = [
                *(reading_dto(10_000 + served * 100 + k, BASE_NS + 3_000_000 + k) for k in range(5)),
                reading_dto(10_000 + served * 100 + 10, BASE_NS + 2_400_500),  # already paged
                reading_dto(10_000 + served * 100 + 11, BASE_NS + 500 + served),  # not yet paged
                reading_dto(10_000 + served * 100 + 12, boundary, resource="Float64"),  # the edge
                reading_dto(10_000 + served * 100 + 13, end + 1),  # outside the range
            ]
            appended.extend(batch)
            server.add_readings(batch)

        return listener

    server = harness.server()
    server.add_readings(originals)
    server.add_listener(grow(server))
    client = harness.client(server)

    got = list(client.readings_for_device(DEVICE, start, end))

    got_ids = ids(got)
    assert len(got_ids) == len(set(got_ids)), "a reading was yielded twice"
    assert {d["id"] for d in originals} <= set(got_ids), "a reading in the range was lost"
    assert set(got_ids) <= {d["id"] for d in originals + appended}
    assert all(start <= r.origin_ns <= end for r in got)
    assert [r.origin_ns for r in got] == sorted(r.origin_ns for r in got)
    older = {d["id"] for d in appended if d["origin"] < BASE_NS + 1000}
    assert older and older <= set(got_ids), "readings added to the unread part were missed"

    # The same growth under plain offset paging repeats readings: the scenario does bite.
    naive_server = harness.server()
    naive_server.add_readings(originals)
    appended.clear()
    naive_server.add_listener(grow(naive_server))
    naive: list[str] = []
    for offset in range(0, 2500, 1024):
        path = f"{READINGS_PREFIX}{DEVICE}/start/{start}/end/{end}"
        naive += [
            r["id"] for r in harness.raw_get(naive_server, path, offset=offset, limit=1024).json()["readings"]
        ]
    assert len(naive) > len(set(naive))


def test_a_tie_group_larger_than_a_page_is_stepped_through(harness: Harness) -> None:
    server = harness.server()
    tie = BASE_NS + 50_000
    dtos = [reading_dto(n, BASE_NS + 60_000 + n) for n in range(5)]
    dtos += [reading_dto(100 + n, tie, resource=f"R{n}") for n in range(25)]
    dtos += [reading_dto(200 + n, BASE_NS + n) for n in range(10)]
    server.add_readings(dtos)
    client = harness.client(server)
    got = list(client.readings_for_device(DEVICE, BASE_NS, BASE_NS + 10**9, page_limit=10))
    assert sorted(ids(got)) == sorted(d["id"] for d in dtos)
    assert [r.origin_ns for r in got] == sorted(d["origin"] for d in dtos)


@pytest.mark.parametrize("page_limit", [1, MAX_PAGE_LIMIT])
def test_duplicates_are_yielded_once_by_id_or_by_resource_and_origin(
    harness: Harness, page_limit: int
) -> None:
    server = harness.server()
    twice = reading_dto(1, BASE_NS + 10)
    server.add_readings([twice, reading_dto(2, BASE_NS + 20), twice])
    anonymous = reading_dto(0, BASE_NS + 30, with_id=False)
    server.add_readings(
        [anonymous, anonymous, {**anonymous, "resourceName": "Float64", "valueType": "Float64"}]
    )
    client = harness.client(server)
    for newest_first in (False, True):
        got = list(
            client.readings_for_device(DEVICE, BASE_NS, BASE_NS + 100, page_limit, newest_first=newest_first)
        )
        keys = sorted((r.id, r.resource, r.origin_ns) for r in got)
        assert keys == [
            ("", "Float32", BASE_NS + 30),
            ("", "Float64", BASE_NS + 30),
            (twice["id"], "Float32", BASE_NS + 10),
            (str(uuid.UUID(int=3)), "Float32", BASE_NS + 20),
        ]


def test_values_parse_by_value_type_in_both_go_float_formats(harness: Harness) -> None:
    server = harness.server()
    cases: list[tuple[str, str, Any]] = [
        ("Float32", "2.310000e+01", 23.1),  # Go %e: EdgeX 3.x and contracts 4.0.0
        ("Float64", "2.31e+01", 23.1),  # shortest form: contracts 4.0.1+
        ("Float64", "-1.5e-07", -1.5e-07),
        ("Int16", "-7", -7),
        ("Uint64", str(2**64 - 1), 2**64 - 1),
        ("Bool", "true", True),
        ("String", "hello", "hello"),
        ("Float64Array", "[1.5e+00, 2.500000e+00]", (1.5, 2.5)),
    ]
    dtos = [
        reading_dto(n, BASE_NS + n, resource=f"R{n}", value_type=t, value=v)
        for n, (t, v, _) in enumerate(cases)
    ]
    binary = reading_dto(99, BASE_NS + 99, resource="Image", value_type="Binary")
    del binary["value"]
    binary.update(binaryValue=base64.b64encode(b"\x00\x01png").decode(), mediaType="image/png")
    server.add_readings([*dtos, binary])
    got = list(harness.client(server).readings_for_device(DEVICE, BASE_NS, BASE_NS + 100))
    assert [(r.value_type, r.value) for r in got[:-1]] == [(t, expected) for t, _, expected in cases]
    assert (got[-1].value, got[-1].media_type) == (b"\x00\x01png", "image/png")
    assert got[0].as_float() == pytest.approx(23.1)
    assert {r.device for r in got} == {DEVICE} and {r.profile for r in got} == {PROFILE}


# -- tests: failures ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["503", "drop", "refuse"])
def test_an_outage_is_retried_with_exponential_backoff(harness: Harness, mode: str) -> None:
    server = harness.server()
    server.add_readings(reading_dto(n, BASE_NS + n) for n in range(10))
    if mode == "refuse":
        server.set_available(False)  # connection refused until the client has waited twice
        harness.on_sleep = lambda waits: server.set_available(True) if waits == 2 else None
    else:
        server.fail_next(2, mode)  # type: ignore[arg-type]
    client = harness.client(server, retries=3, backoff_s=0.25)
    got = list(client.readings_for_device(DEVICE, BASE_NS, BASE_NS + 100))
    assert len(got) == 10
    assert harness.sleeps == [0.25, 0.5]
    if mode != "refuse":
        failed = "dropped" if mode == "drop" else "fault"
        assert [e.note for e in server.exchanges] == [failed, failed, ""]


def test_a_failure_in_the_middle_of_paging_is_retried(harness: Harness) -> None:
    server = harness.server()
    server.add_readings(reading_dto(n, BASE_NS + n) for n in range(30))
    first = True

    def break_once(exchange: Exchange) -> None:
        nonlocal first
        if first:
            first = False
            server.fail_next(1, "500")

    server.add_listener(break_once)
    got = list(harness.client(server).readings_for_device(DEVICE, BASE_NS, BASE_NS + 100, page_limit=10))
    assert len(got) == len(set(ids(got))) == 30
    assert harness.sleeps == [0.01]
    assert [e.status for e in server.exchanges][:3] == [200, 500, 200]


@pytest.mark.parametrize(("mode", "reason"), [("503", "server_error"), ("refuse", "unreachable")])
def test_a_permanent_outage_fails_clearly_after_the_retries(harness: Harness, mode: str, reason: str) -> None:
    server = harness.server()
    server.set_available(False, mode=mode)  # type: ignore[arg-type]
    client = harness.client(server, retries=3, backoff_s=0.01, max_backoff_s=0.025)
    with pytest.raises(CoreDataError) as caught:
        list(client.readings_for_device(DEVICE, BASE_NS, BASE_NS + 100))
    assert caught.value.reason == reason
    assert "after 4 attempts" in str(caught.value)
    assert harness.sleeps == [0.01, 0.02, 0.025]  # doubling, capped at max_backoff_s
    assert len(harness.sessions[-1].sent) == 4
    if mode == "503":
        assert caught.value.status == 503
        assert [e.note for e in server.exchanges] == ["outage"] * 4


def test_secure_mode_wants_the_bearer_token_and_4xx_is_not_retried(harness: Harness) -> None:
    server = harness.server(token="jwt-123")
    server.add_readings([reading_dto(0, BASE_NS)])
    anonymous = harness.client(server)
    assert anonymous.ping() is True  # /ping needs no token in EdgeX
    for client in (anonymous, harness.client(server, token="wrong")):
        with pytest.raises(CoreDataError) as caught:
            list(client.readings_for_device(DEVICE, BASE_NS, BASE_NS + 1))
        assert (caught.value.reason, caught.value.status) == ("unauthorized", 401)
    assert harness.sleeps == []
    assert [e.status for e in readings_requests(server)] == [401, 401]

    got = list(harness.client(server, token="jwt-123").readings_for_device(DEVICE, BASE_NS, BASE_NS + 1))
    assert len(got) == 1
    assert readings_requests(server)[-1].headers["Authorization"] == "Bearer jwt-123"


def test_an_unknown_device(harness: Harness) -> None:
    # Real core-data never asks core-metadata: an unknown device simply has no readings.
    edgex = harness.server()
    assert list(harness.client(edgex).readings_for_device("no-such-device", 0, BASE_NS)) == []
    # A store (or gateway) that does know its devices answers 404: a clear error, not retried.
    strict = harness.server(known_devices=[DEVICE])
    with pytest.raises(CoreDataError, match="no-such-device") as caught:
        list(harness.client(strict).readings_for_device("no-such-device", 0, BASE_NS))
    assert (caught.value.reason, caught.value.status) == ("unknown_device", 404)
    assert len(strict.exchanges) == 1 and harness.sleeps == []


def _page(*readings: dict[str, Any], total: int | None = None) -> bytes:
    body = {"apiVersion": "v3", "statusCode": 200, "totalCount": len(readings) if total is None else total}
    body["readings"] = list(readings)  # type: ignore[assignment]
    return json.dumps(body).encode()


def _without(key: str) -> dict[str, Any]:
    dto = reading_dto(0, BASE_NS)
    del dto[key]
    return dto


MALFORMED: dict[str, tuple[bytes, str]] = {
    "not json": (b"<html>gateway error</html>", "bad_json"),
    "NaN literal": (b'{"totalCount": NaN, "readings": []}', "bad_json"),
    "a list": (b"[1, 2]", "bad_shape"),
    "no readings": (b'{"apiVersion": "v3", "totalCount": 1}', "missing_field"),
    "no totalCount": (b'{"apiVersion": "v3", "readings": []}', "missing_field"),
    "readings not a list": (b'{"totalCount": 1, "readings": "x"}', "bad_shape"),
    "negative totalCount": (_page(total=-1), "bad_shape"),
    "more than limit": (_page(*(reading_dto(n, BASE_NS) for n in range(3))), "bad_shape"),
    "reading without origin": (_page(_without("origin")), "missing_field"),
    "reading without resourceName": (_page(_without("resourceName")), "missing_field"),
    "reading without valueType": (_page(_without("valueType")), "missing_field"),
    "origin a string": (_page({**reading_dto(0, BASE_NS), "origin": "1"}), "bad_shape"),
    "value not a Float32": (_page(reading_dto(0, BASE_NS, value="abc")), "bad_reading"),
    "Int8 out of range": (_page(reading_dto(0, BASE_NS, value_type="Int8", value="300")), "bad_reading"),
    "unknown valueType": (_page(reading_dto(0, BASE_NS, value_type="Quaternion")), "bad_reading"),
    "another device": (_page(reading_dto(0, BASE_NS, device="other")), "bad_shape"),
    "origin out of range": (_page(reading_dto(0, BASE_NS + 10**9)), "out_of_range"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_response_is_refused_with_a_reason(harness: Harness, case: str) -> None:
    body, reason = MALFORMED[case]
    server = harness.server()
    server.override_next(body)
    client = harness.client(server)
    with pytest.raises(CoreDataError) as caught:
        list(client.readings_for_device(DEVICE, BASE_NS, BASE_NS + 100, page_limit=2))
    assert caught.value.reason == reason, str(caught.value)
    assert len(server.exchanges) == 1  # garbage is not retried


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_oversized_response_is_refused(harness: Harness, chunked: bool) -> None:
    limit = 64 * 1024
    server = harness.server()
    big = _page(*(reading_dto(n, BASE_NS + n) for n in range(1000)))
    assert len(big) > limit
    server.override_next(big, chunked=chunked)
    client = harness.client(server, max_response_bytes=limit)
    with pytest.raises(CoreDataError) as caught:
        list(client.readings_for_device(DEVICE, BASE_NS, BASE_NS + 10**6))
    assert caught.value.reason == "response_too_large"
    assert len(server.exchanges) == 1

    exact = _page(reading_dto(0, BASE_NS))
    server.override_next(exact + b" " * (limit - len(exact)), chunked=chunked)
    assert len(list(client.readings_for_device(DEVICE, BASE_NS, BASE_NS + 10**6))) == 1


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        (("", 0, 1), {}),
        ((DEVICE, -1, 1), {}),
        ((DEVICE, 5, 4), {}),
        ((DEVICE, 0, 2**63), {}),
        ((DEVICE, True, 4), {}),
        ((DEVICE, 0, 1, 0), {}),
        ((DEVICE, 0, 1, MAX_PAGE_LIMIT + 1), {}),
    ],
)
def test_bad_arguments_are_refused_before_any_request(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    session = RecordingSession()
    client = CoreDataClient("http://127.0.0.1:9", session=session)
    with pytest.raises(CoreDataError) as caught:
        client.readings_for_device(*args, **kwargs)
    assert caught.value.reason == "invalid_argument"
    assert session.sent == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base_url": "localhost:59880"},
        {"retries": -1},
        {"timeout_s": 0},
        {"token": "a\nb"},
        {"max_readings": 0},
    ],
)
def test_bad_client_settings_are_refused(kwargs: dict[str, Any]) -> None:
    settings: dict[str, Any] = {"base_url": "http://localhost:59880", **kwargs}
    with pytest.raises(CoreDataError, match="invalid_argument"):
        CoreDataClient(**settings)


def test_a_416_mid_paging_ends_the_backfill(harness: Harness) -> None:
    # offset > totalCount happens only inside a tie group whose readings were purged meanwhile;
    # retention purges oldest first, so nothing older is left: what was read is the backfill.
    server = harness.server()
    server.add_readings(reading_dto(n, BASE_NS + 7) for n in range(4))
    client = harness.client(server)
    first = True

    def purge(exchange: Exchange) -> None:
        nonlocal first
        if first:
            first = False
            body = {"apiVersion": "v3", "message": "query objects bounds out of range.", "statusCode": 416}
            server.override_next(json.dumps(body).encode(), status=416)

    server.add_listener(purge)
    got = list(client.readings_for_device(DEVICE, BASE_NS, BASE_NS + 7, page_limit=2))
    assert len(got) == 2
    assert [(e.status, e.query) for e in server.exchanges] == [
        (200, "offset=0&limit=2"),
        (416, "offset=2&limit=2"),
    ]


def test_a_backfill_larger_than_max_readings_is_refused(harness: Harness) -> None:
    server = harness.server()
    server.add_readings(reading_dto(n, BASE_NS + n) for n in range(11))
    client = harness.client(server, max_readings=10)
    with pytest.raises(CoreDataError, match="too_many_readings"):
        list(client.readings_for_device(DEVICE, BASE_NS, BASE_NS + 100))
    assert len(list(client.readings_for_device(DEVICE, BASE_NS, BASE_NS + 100, newest_first=True))) == 11


# -- tests: the double behaves like core-data -------------------------------------------------


def test_the_spec_check_is_not_vacuous(harness: Harness) -> None:
    """The teardown validation does reject what the spec forbids, in both versions."""
    server = harness.server()
    server.add_readings([reading_dto(0, BASE_NS)])
    harness.raw_get(server, f"{READINGS_PREFIX}{DEVICE}/start/{BASE_NS}/end/{BASE_NS}", limit=1)
    good = server.exchanges[-1]
    harness._validate_exchange(good)
    body = json.loads(good.response_body)
    del body["readings"][0]["valueType"]  # required by BaseReading (3.1.1) and Reading (4.0.2)
    with pytest.raises(ResponseValidationError):
        harness._validate_exchange(dataclasses.replace(good, response_body=json.dumps(body).encode()))
    with pytest.raises(RequestValidationError):
        harness._validate_exchange(dataclasses.replace(good, query="offset=0&limit=-5"))
    with pytest.raises(RequestValidationError):
        harness._validate_exchange(dataclasses.replace(good, path=f"{READINGS_PREFIX}{DEVICE}/start/x/end/1"))


def test_the_server_pages_like_core_data(harness: Harness) -> None:
    server = harness.server()
    server.add_readings(reading_dto(n, BASE_NS + n) for n in range(1500))
    path = f"{READINGS_PREFIX}{DEVICE}/start/{BASE_NS}/end/{BASE_NS + 10**6}"

    default = harness.raw_get(server, path).json()
    assert (default["totalCount"], len(default["readings"])) == (1500, 20)  # default limit 20
    assert default["readings"][0]["origin"] == BASE_NS + 1499  # newest first
    assert len(harness.raw_get(server, path, limit=-1).json()["readings"]) == 1024  # -1: MaxResultCount
    assert harness.raw_get(server, path, limit=1025).status_code == 400
    assert harness.raw_get(server, path, offset=1500).json()["readings"] == []
    out_of_bounds = harness.raw_get(server, path, offset=1501)
    assert out_of_bounds.status_code == 416
    assert out_of_bounds.json()["message"] == "query objects bounds out of range. length:1500 offset:1501"
    backwards = harness.raw_get(server, f"{READINGS_PREFIX}{DEVICE}/start/10/end/9")
    assert (backwards.status_code, backwards.json()["statusCode"]) == (400, 400)
    ping = harness.raw_get(server, "/api/v3/ping").json()
    assert (ping["apiVersion"], ping["serviceName"]) == ("v3", "core-data")


def test_events_added_by_the_simulator_are_served_as_readings(harness: Harness) -> None:
    server = harness.server()
    server.add_event(
        {
            "apiVersion": "v3",
            "id": str(uuid.uuid4()),
            "deviceName": DEVICE,
            "profileName": PROFILE,
            "sourceName": "Float32",
            "origin": BASE_NS,
            # 4.x omits a reading's deviceName/profileName/origin when empty: inherit them.
            "readings": [
                {"id": str(uuid.uuid4()), "resourceName": "Float32", "valueType": "Float32", "value": "1e+00"}
            ],
        }
    )
    (reading,) = list(harness.client(server).readings_for_device(DEVICE, BASE_NS, BASE_NS))
    assert (reading.device, reading.profile, reading.origin_ns, reading.value) == (
        DEVICE,
        PROFILE,
        BASE_NS,
        1.0,
    )
    with pytest.raises(ValueError, match="deviceName"):
        server.add_event({"profileName": PROFILE, "sourceName": "x", "origin": 1, "readings": [{}]})


def test_closing_ends_every_thread_even_with_idle_keep_alive_connections() -> None:
    before = set(threading.enumerate())
    with requests.Session() as session:
        with CoreDataServer() as server:
            for _ in range(3):  # one keep-alive connection, left idle when the server closes
                assert session.get(server.url + "/api/v3/ping", timeout=5).status_code == 200
            url = server.url
        assert [t for t in threading.enumerate() if t not in before and t.is_alive()] == []
    assert [t for t in threading.enumerate() if t not in before and t.is_alive()] == []
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/api/v3/ping", timeout=5)
