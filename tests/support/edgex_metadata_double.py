"""A core-metadata test double: just the endpoints fedge uses, with EdgeX's answers.

A threaded ``http.server`` on a free loopback port with in-memory profiles, devices and device
services. It answers as edgex-go's core-metadata controllers do (``internal/core/metadata/
controller/http``): 201/409 for a profile upload, 200 for its update, 207 with one
``{apiVersion, requestId, statusCode, message|id}`` per device for batch adds and patches (201,
409 for a duplicate name, 400 for an unknown device service, 404 for an unknown profile), 400
for the whole batch when a request DTO is invalid, 401 without the expected bearer token.

Given an openapi-core spec, it validates every request it receives and every response it
sends against it, and records each mismatch in :attr:`MetadataDouble.spec_errors` (a test
asserts the list is empty: assertions in the server thread would be lost).

Use::

    with MetadataDouble(spec) as double:
        provision(double.url, ...)
    assert double.spec_errors == []
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import yaml
from openapi_core import OpenAPI

from support.openapi_specs import SpecMismatch, validate_request, validate_response

API = "/api/v3"


@dataclass(frozen=True)
class Recorded:
    """One request as the double received it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass
class MetadataState:
    """What core-metadata stores, by name."""

    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    profile_yaml: dict[str, str] = field(default_factory=dict)
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    services: set[str] = field(default_factory=set)


class MetadataDouble:
    """Core-metadata's profile-upload and device endpoints, in memory, on 127.0.0.1."""

    def __init__(
        self,
        spec: OpenAPI | None = None,
        *,
        token: str | None = None,
        services: Iterable[str] = ("device-virtual",),
    ) -> None:
        self.spec = spec
        self.token = token
        self.state = MetadataState(services=set(services))
        self.requests: list[Recorded] = []
        self.spec_errors: list[str] = []
        #: Called with each recorded request before it is handled; may return
        #: ``(status, body)`` to answer instead (to simulate failures EdgeX can produce).
        self.intercept: Callable[[Recorded], tuple[int, Any] | None] | None = None
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="metadata-double", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> MetadataDouble:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetadataDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- request handling (in server threads, under the lock) ----------------------------------

    def handle(self, rec: Recorded) -> tuple[int, Any]:
        with self._lock:
            self.requests.append(rec)
            if self.token is not None:
                auth = next((v for k, v in rec.headers.items() if k.lower() == "authorization"), "")
                if auth != f"Bearer {self.token}":
                    return 401, _base(401, "unauthorized: missing or invalid JWT")
            if self.intercept is not None:
                answer = self.intercept(rec)
                if answer is not None:
                    return answer
            route = (rec.method, rec.path)
            if route == ("POST", f"{API}/deviceprofile/uploadfile"):
                return self._upload(rec, update=False)
            if route == ("PUT", f"{API}/deviceprofile/uploadfile"):
                return self._upload(rec, update=True)
            if route == ("POST", f"{API}/device"):
                return self._add_devices(rec)
            if route == ("PATCH", f"{API}/device"):
                return self._patch_devices(rec)
            if rec.method == "GET" and rec.path.startswith(f"{API}/deviceprofile/name/"):
                name = unquote(rec.path.rsplit("/", 1)[1])
                if name not in self.state.profiles:
                    return 404, _base(404, f"device profile '{name}' does not exist")
                return 200, {**_base(200), "profile": self.state.profiles[name]}
            if rec.method == "GET" and rec.path.startswith(f"{API}/device/name/"):
                name = unquote(rec.path.rsplit("/", 1)[1])
                if name not in self.state.devices:
                    return 404, _base(404, f"device '{name}' does not exist")
                return 200, {**_base(200), "device": self.state.devices[name]}
            return 404, {"message": "Not Found"}  # echo's answer for an unknown route

    def _upload(self, rec: Recorded, update: bool) -> tuple[int, Any]:
        content = _form_file(rec)
        if content is None:
            return 400, _base(400, "missing yaml file")
        try:
            profile = yaml.load(content, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        except yaml.YAMLError as exc:
            return 400, _base(400, f"failed to unmarshal request body as YAML. {exc}")
        name = profile.get("name") if isinstance(profile, dict) else None
        if not isinstance(name, str) or not name.strip():
            return 400, _base(400, "Invalid DeviceProfile. DeviceProfile.Name field is required")
        exists = name in self.state.profiles
        if update and not exists:
            return 404, _base(404, f"device profile '{name}' does not exist")
        if not update and exists:
            return 409, _base(409, f"device profile name '{name}' exists")
        stored = {**profile, "id": self.state.profiles.get(name, {}).get("id") or str(uuid.uuid4())}
        self.state.profiles[name] = stored
        self.state.profile_yaml[name] = content
        if update:
            return 200, _base(200)
        return 201, {**_base(201), "id": stored["id"]}

    def _json_array(
        self, rec: Recorded, key: str, check: Callable[[dict[str, Any]], str]
    ) -> tuple[list[dict[str, Any]] | None, str]:
        try:
            data = json.loads(rec.body)
        except ValueError as exc:
            return None, f"Failed to unmarshal request body as JSON. {exc}"
        if not isinstance(data, list):
            return None, "Failed to unmarshal request body as JSON."
        for item in data:
            if not isinstance(item, dict) or not isinstance(item.get(key), dict):
                return None, f"{key} field is required"
            problem = check(item[key])
            if problem:
                return None, problem
        return data, ""

    def _add_devices(self, rec: Recorded) -> tuple[int, Any]:
        items, problem = self._json_array(rec, "device", _check_create)
        if items is None:
            return 400, _base(400, problem)
        answers = []
        for item in items:
            dev = item["device"]
            rid = item.get("requestId", "")
            if dev["serviceName"] not in self.state.services:
                answers.append(_base(400, f"device service '{dev['serviceName']}' does not exists", rid))
            elif dev["profileName"] not in self.state.profiles:
                answers.append(_base(404, f"device profile '{dev['profileName']}' does not exists", rid))
            elif dev["name"] in self.state.devices:
                answers.append(_base(409, f"device name {dev['name']} already exists", rid))
            else:
                stored = {**dev, "id": str(uuid.uuid4())}
                self.state.devices[dev["name"]] = stored
                answers.append({**_base(201, request_id=rid), "id": stored["id"]})
        return 207, answers

    def _patch_devices(self, rec: Recorded) -> tuple[int, Any]:
        items, problem = self._json_array(rec, "device", _check_update)
        if items is None:
            return 400, _base(400, problem)
        answers = []
        for item in items:
            dev = item["device"]
            rid = item.get("requestId", "")
            name = dev.get("name")
            if name not in self.state.devices:
                answers.append(_base(404, f"device '{name}' does not exist", rid))
            elif "serviceName" in dev and dev["serviceName"] not in self.state.services:
                answers.append(_base(400, f"device service '{dev['serviceName']}' does not exists", rid))
            elif "profileName" in dev and dev["profileName"] not in self.state.profiles:
                answers.append(_base(404, f"device profile '{dev['profileName']}' does not exists", rid))
            else:
                stored = self.state.devices[name]
                stored.update({k: v for k, v in dev.items() if v is not None and k != "id"})
                answers.append(_base(200, request_id=rid))
        return 207, answers

    def check(self, kind: str, action: Callable[[], None]) -> None:
        """Runs a spec validation, recording a mismatch instead of raising."""
        try:
            action()
        except SpecMismatch as exc:
            with self._lock:
                self.spec_errors.append(f"{kind}: {exc}")


def _base(status: int, message: str = "", request_id: str = "") -> dict[str, Any]:
    # commonDTO.BaseResponse: requestId and message are omitted when empty.
    out: dict[str, Any] = {"apiVersion": "v3", "statusCode": status}
    if request_id:
        out["requestId"] = request_id
    if message:
        out["message"] = message
    return out


def _check_create(dev: dict[str, Any]) -> str:
    # The DTO checks of dtos.Device (required fields, enums) that fail the whole request.
    for key in ("name", "serviceName", "profileName"):
        if not isinstance(dev.get(key), str) or not dev[key].strip():
            return f"AddDeviceRequest.Device.{key[0].upper()}{key[1:]} field is required"
    if dev.get("adminState") not in ("LOCKED", "UNLOCKED"):
        return "AddDeviceRequest.Device.AdminState field should be one of LOCKED UNLOCKED"
    if dev.get("operatingState") not in ("UP", "DOWN", "UNKNOWN"):
        return "AddDeviceRequest.Device.OperatingState field should be one of UP DOWN UNKNOWN"
    if not isinstance(dev.get("protocols"), dict) or not dev["protocols"]:
        return "AddDeviceRequest.Device.Protocols field should greater than 0"
    return _check_auto_events(dev)


def _check_update(dev: dict[str, Any]) -> str:
    if not isinstance(dev.get("name"), str) and not isinstance(dev.get("id"), str):
        return "UpdateDeviceRequest.Device.Name field is required if the Id is not present"
    return _check_auto_events(dev)


def _check_auto_events(dev: dict[str, Any]) -> str:
    for event in dev.get("autoEvents") or []:
        if not event.get("interval") or not event.get("sourceName"):
            return "AutoEvent.Interval and AutoEvent.SourceName fields are required"
    return ""


def _form_file(rec: Recorded) -> str | None:
    """The text of the multipart form field ``file`` (what r.FormFile("file") reads)."""
    content_type = next((v for k, v in rec.headers.items() if k.lower() == "content-type"), "")
    if not content_type.startswith("multipart/form-data"):
        return None
    message: Message = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + rec.body
    )
    if not message.is_multipart():
        return None
    for part in message.iter_parts():  # type: ignore[attr-defined]
        if part.get_param("name", header="content-disposition") == "file":
            payload = part.get_payload(decode=True)
            return payload.decode("utf-8", "replace") if isinstance(payload, bytes) else None
    return None


def _handler_class(double: MetadataDouble) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # One write per response without Nagle: keep-alive clients otherwise wait for delayed ACKs.
        wbufsize = -1
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _serve(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k: v for k, v in self.headers.items()}
            rec = Recorded(self.command, parts.path, dict(parse_qsl(parts.query)), headers, body)
            url = f"{double.url}{self.path}"
            if double.spec is not None:
                spec = double.spec
                double.check("request", lambda: validate_request(spec, self.command, url, body, headers))
            status, answer = double.handle(rec)
            payload = json.dumps(answer).encode()
            out_headers = {
                "Content-Type": "application/json",
                "X-Correlation-ID": headers.get("X-Correlation-ID") or str(uuid.uuid4()),
            }
            if double.spec is not None and status != 401:
                # The specs document no 401 (secure mode's answer without a valid JWT): such
                # responses cannot be validated; tests assert on them directly.
                spec = double.spec
                double.check(
                    "response",
                    lambda: validate_response(spec, self.command, url, status, payload, out_headers, headers),
                )
            self.send_response(status)
            for key, value in out_headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

    return Handler
