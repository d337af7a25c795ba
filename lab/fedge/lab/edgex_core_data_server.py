"""The simulator's EdgeX core-data REST side: the endpoints fedge's client uses, served from memory.

Why a double and not the real service: tests and benchmarks need core-data's REST behaviour
(paging, bounds, errors, outages, secure mode) on a laptop without Docker, with faults on demand.
It serves exactly what :class:`fedge.agent.edgex.core_data.CoreDataClient` calls, shaped as EdgeX
shapes it (go-mod-core-contracts DTOs, edgex-go's controllers), for the ``/api/v3`` API that
EdgeX 3.x and 4.x both expose:

- ``GET /api/v3/ping`` -> ``PingResponse`` (never needs a token, as in EdgeX).
- ``GET /api/v3/reading/device/name/{name}/start/{start}/end/{end}?offset=&limit=`` ->
  ``MultiReadingsResponse``: bounds inclusive, newest first, ``totalCount`` of the window,
  ``limit`` default 20, ``-1`` meaning ``max_result_count`` and anything above it a 400,
  ``end < start`` a 400, ``offset > totalCount`` a 416 (edgex-go ``utils.CheckCountRange``).
- Error bodies are one ``BaseResponse`` object (``apiVersion``, ``message``, ``statusCode``),
  which is what EdgeX writes, although the specs declare some of them as arrays.

An unknown device gets a 200 with no readings, as from core-data (which never asks
core-metadata); ``known_devices`` switches on a 404 instead, for clients that must cope with a
stricter store or a gateway. ``token`` switches on secure mode (401 ``{"message":
"Unauthorized"}`` without ``Authorization: Bearer <token>``, as go-mod-bootstrap's echo
middleware answers). Faults for tests: :meth:`set_available` (connection refused, or 503),
:meth:`fail_next` (the next N requests fail), :meth:`override_next` (serve raw bytes).

Every exchange is recorded (:attr:`CoreDataServer.exchanges`) so tests can validate each request
and response against the OpenAPI specs. The store is thread-safe; the simulator appends with
:meth:`add_event` / :meth:`add_readings` while clients read.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import dataclasses
import email.utils
import json
import re
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

API_VERSION = "v3"
DEFAULT_MAX_RESULT_COUNT = 1024
DEFAULT_LIMIT = 20  # go-mod-core-contracts common.DefaultLimit
MAX_INT32 = 2**31 - 1
MAX_INT64 = 2**63 - 1
_READINGS_PATH = re.compile(r"^/api/v3/reading/device/name/([^/]+)/start/([^/]+)/end/([^/]+)$")

OutageMode = Literal["refuse", "503"]
FailMode = Literal["drop", "500", "502", "503", "504"]


@dataclass(frozen=True)
class Exchange:
    """One request as received and the response as written (``status`` None: dropped)."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    status: int | None
    response_headers: dict[str, str]
    response_body: bytes
    #: Why the response is what it is: "" (served by the API), "outage", "fault", "override",
    #: "unauthorized", "dropped".
    note: str = ""
    #: The client hung up before the whole response was written (e.g. it refused the size).
    aborted: bool = False


@dataclass
class _Override:
    status: int
    body: bytes
    content_type: str
    chunked: bool


@dataclass
class _DeviceReadings:
    keys: list[tuple[int, int]] = field(default_factory=list)  # (origin, arrival) ascending
    dtos: list[dict[str, Any]] = field(default_factory=list)


class _Store:
    """Readings per device, kept sorted by (origin, arrival) so a window is two bisections."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._devices: dict[str, _DeviceReadings] = {}
        self._arrivals = 0

    def add(self, dtos: list[dict[str, Any]]) -> None:
        with self._lock:
            for dto in dtos:
                bucket = self._devices.setdefault(dto["deviceName"], _DeviceReadings())
                self._arrivals += 1
                key = (dto["origin"], self._arrivals)
                at = bisect.bisect_right(bucket.keys, key)
                bucket.keys.insert(at, key)
                bucket.dtos.insert(at, dto)

    def window(self, device: str, start: int, end: int) -> list[dict[str, Any]]:
        """The device's readings with start <= origin <= end, newest first (latest arrival first on ties)."""
        with self._lock:
            bucket = self._devices.get(device)
            if bucket is None:
                return []
            lo = bisect.bisect_left(bucket.keys, (start, -1))
            hi = bisect.bisect_right(bucket.keys, (end, MAX_INT64))
            return bucket.dtos[lo:hi][::-1]

    def count(self, device: str | None = None) -> int:
        with self._lock:
            if device is not None:
                bucket = self._devices.get(device)
                return 0 if bucket is None else len(bucket.dtos)
            return sum(len(b.dtos) for b in self._devices.values())


class _HTTPServer(ThreadingHTTPServer):
    """Joins its handler threads on close, and can cut every open connection to get there."""

    daemon_threads = False
    block_on_close = True
    owner: CoreDataServer

    def __init__(self, address: tuple[str, int], owner: CoreDataServer) -> None:
        self.owner = owner
        self._conn_lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conn_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conn_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def cut_connections(self) -> None:
        """Unblocks handlers idling on keep-alive connections so their threads end."""
        with self._conn_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"  # keep-alive, like Go's net/http
    # Headers and body go out in separate writes; with Nagle on, the body would wait for the
    # client's delayed ACK (40 ms per request on Linux).
    disable_nagle_algorithm = True
    timeout = 30  # a backstop: close() cuts idle connections long before this

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read :attr:`CoreDataServer.exchanges` instead of stderr."""

    def do_GET(self) -> None:
        self.server.owner._handle(self)

    def write_response(self, status: int, headers: dict[str, str], body: bytes, *, chunked: bool) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if chunked:
            for at in range(0, len(body), 65536):
                piece = body[at : at + 65536]
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.wfile.write(body)
        self.wfile.flush()


class CoreDataServer:
    """A threaded HTTP server on loopback speaking core-data's REST API from an in-memory store.

    ``port=0`` picks a free port; :attr:`url` is the base URL to give the client. Use it as a
    context manager (or call :meth:`close`): closing joins every thread it started.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        max_result_count: int = DEFAULT_MAX_RESULT_COUNT,
        known_devices: Iterable[str] | None = None,
        service_name: str = "core-data",
    ) -> None:
        if host not in ("127.0.0.1", "localhost"):  # IPv4 loopback: the server is AF_INET
            raise ValueError(f"the core-data double only listens on loopback, not {host!r}")
        if max_result_count < 1:
            raise ValueError("max_result_count must be positive")
        self._host = host
        self._token = token
        self._max_result_count = max_result_count
        self._known_devices = None if known_devices is None else frozenset(known_devices)
        self._service_name = service_name
        self._store = _Store()
        self._lock = threading.Lock()
        self._exchanges: list[Exchange] = []
        self._listeners: list[Callable[[Exchange], None]] = []
        self._errors: list[BaseException] = []
        self._available = True
        self._outage_mode: OutageMode = "refuse"
        self._fail_queue: list[FailMode] = []
        self._overrides: list[_Override] = []
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._port = port
        self._closed = False
        self._start()

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    def __enter__(self) -> CoreDataServer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stops serving and joins the serving thread and every connection thread. Idempotent."""
        with self._lock:
            self._closed = True
        self._stop()

    def _start(self) -> None:
        httpd = _HTTPServer((self._host, self._port), self)
        self._port = httpd.server_address[1]
        # Daemon, so a forgotten close() cannot hang the interpreter's exit; close() joins it.
        thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.01},
            name=f"core-data-{self._port}",
            daemon=True,
        )
        self._httpd, self._thread = httpd, thread
        thread.start()

    def _stop(self) -> None:
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is None or thread is None:
            return
        httpd.shutdown()
        thread.join()
        httpd.socket.close()  # refuse new connections before waiting for the open ones
        httpd.cut_connections()
        httpd.server_close()  # joins the handler threads (block_on_close)

    # -- store --------------------------------------------------------------------------------

    def add_event(self, event: Mapping[str, Any]) -> None:
        """Stores an ``Event`` DTO's readings; they inherit device, profile and origin from it.

        4.x marshals a reading's ``deviceName``, ``profileName`` and ``origin`` with
        ``omitempty``, so readings inside an event may lack them; the stored readings always
        carry them, as core-data's do.
        """
        if not isinstance(event, Mapping):
            raise ValueError("an event is a JSON object")
        for name in ("deviceName", "profileName", "sourceName"):
            if not isinstance(event.get(name), str) or not event[name]:
                raise ValueError(f"event.{name} must be a non-empty string")
        origin = event.get("origin")
        if isinstance(origin, bool) or not isinstance(origin, int):
            raise ValueError("event.origin must be an int (Unix nanoseconds)")
        readings = event.get("readings")
        if not isinstance(readings, list) or not readings:
            raise ValueError("event.readings must be a non-empty list")
        merged = []
        for reading in readings:
            if not isinstance(reading, Mapping):
                raise ValueError("each reading is a JSON object")
            dto = {"deviceName": event["deviceName"], "profileName": event["profileName"], "origin": origin}
            dto.update(reading)
            merged.append(dto)
        self.add_readings(merged)

    def add_readings(self, readings: Iterable[Mapping[str, Any]]) -> None:
        """Stores reading DTOs as given (a deep copy), checking the fields the store indexes on."""
        dtos: list[dict[str, Any]] = []
        for reading in readings:
            dto = copy.deepcopy(dict(reading))
            for name in ("deviceName", "resourceName", "valueType"):
                if not isinstance(dto.get(name), str) or not dto[name]:
                    raise ValueError(f"reading.{name} must be a non-empty string")
            origin = dto.get("origin")
            if isinstance(origin, bool) or not isinstance(origin, int) or not 0 <= origin <= MAX_INT64:
                raise ValueError(f"reading.origin must be Unix nanoseconds, got {origin!r}")
            json.dumps(dto)  # refuse what could not be served
            dtos.append(dto)
        self._store.add(dtos)

    def reading_count(self, device: str | None = None) -> int:
        return self._store.count(device)

    # -- faults -------------------------------------------------------------------------------

    def set_available(self, available: bool, *, mode: OutageMode = "refuse") -> None:
        """Switches an outage on or off: ``"refuse"`` closes the port (connection refused),
        ``"503"`` keeps it open and answers every request 503, as a gateway with no upstream.

        Coming back from ``"refuse"`` binds the same port again.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("the core-data double is closed")
            was_refusing = not self._available and self._outage_mode == "refuse"
            self._available = available
            self._outage_mode = mode
        if not available and mode == "refuse":
            self._stop()
        elif was_refusing:
            self._start()

    def fail_next(self, count: int, mode: FailMode = "503") -> None:
        """The next ``count`` requests fail: a 5xx answer, or ``"drop"`` (connection closed unanswered)."""
        with self._lock:
            self._fail_queue.extend([mode] * count)

    def override_next(
        self, body: bytes, *, status: int = 200, content_type: str = "application/json", chunked: bool = False
    ) -> None:
        """The next request (after any :meth:`fail_next`) gets exactly these bytes."""
        with self._lock:
            self._overrides.append(_Override(status, body, content_type, chunked))

    def add_listener(self, listener: Callable[[Exchange], None]) -> None:
        """Calls ``listener`` with each exchange just before its response is written, on the
        handler thread (errors land in :attr:`errors`). It may change the store or queue faults;
        it must not call :meth:`close` or ``set_available(False)``, which wait for this thread."""
        with self._lock:
            self._listeners.append(listener)

    @property
    def exchanges(self) -> list[Exchange]:
        with self._lock:
            return list(self._exchanges)

    @property
    def errors(self) -> list[BaseException]:
        """Exceptions raised by listeners or handlers; tests should assert this stays empty."""
        with self._lock:
            return list(self._errors)

    # -- serving ------------------------------------------------------------------------------

    def _handle(self, handler: _Handler) -> None:
        try:
            self._serve(handler)
        except Exception as exc:  # recorded for the test to see, never swallowed silently
            with self._lock:
                self._errors.append(exc)
            raise

    def _serve(self, handler: _Handler) -> None:
        split = urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        request_body = handler.rfile.read(length) if length > 0 else b""
        request_headers = {name: value for name, value in handler.headers.items()}
        correlation = request_headers.get("X-Correlation-ID", "")

        with self._lock:
            failure = self._fail_queue.pop(0) if self._fail_queue else None
            outage = not self._available and self._outage_mode == "503"
            override = self._overrides.pop(0) if failure is None and not outage and self._overrides else None

        status: int | None
        response_headers: dict[str, str] = {}
        chunked = False
        if failure == "drop":
            status, payload, note = None, b"", "dropped"
        else:
            if failure is not None:
                status, payload, note = int(failure), _error_body(int(failure), "injected failure"), "fault"
            elif outage:
                status, payload, note = 503, _error_body(503, "Service Unavailable"), "outage"
            elif override is not None:
                status, payload, note = override.status, override.body, "override"
                chunked = override.chunked
            else:
                status, payload, note = self._route(split.path, split.query, request_headers)
            response_headers = {
                "Content-Type": override.content_type if override is not None else "application/json",
                "X-Correlation-ID": correlation or str(uuid.uuid4()),
            }
            if chunked:
                response_headers["Transfer-Encoding"] = "chunked"
            else:
                response_headers["Content-Length"] = str(len(payload))

        # Recorded and announced before the response goes out: whoever sees the response can
        # rely on the exchange being in `exchanges`, and a listener's changes to the store are
        # in place before this connection's next request is read.
        exchange = Exchange(
            method=handler.command,
            path=split.path,
            query=split.query,
            headers=request_headers,
            body=request_body,
            status=status,
            response_headers=response_headers,
            response_body=payload,
            note=note,
        )
        with self._lock:
            self._exchanges.append(exchange)
            index = len(self._exchanges) - 1
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(exchange)
            except Exception as exc:
                with self._lock:
                    self._errors.append(exc)

        if status is None:
            handler.close_connection = True
            with contextlib.suppress(OSError):
                handler.connection.shutdown(socket.SHUT_RDWR)
            return
        try:
            handler.write_response(status, response_headers, payload, chunked=chunked)
        except (BrokenPipeError, ConnectionResetError):
            handler.close_connection = True
            with self._lock:
                self._exchanges[index] = dataclasses.replace(exchange, aborted=True)

    def _route(self, path: str, query: str, headers: Mapping[str, str]) -> tuple[int, bytes, str]:
        if path == "/api/v3/ping":
            body = {
                "apiVersion": API_VERSION,
                "timestamp": email.utils.formatdate(usegmt=True),
                "serviceName": self._service_name,
            }
            return 200, _json(body), ""
        if self._token is not None and headers.get("Authorization") != f"Bearer {self._token}":
            return 401, _json({"message": "Unauthorized"}), "unauthorized"
        match = _READINGS_PATH.match(path)
        if match is None:
            return 404, _error_body(404, f"no route for {path}"), ""
        return self._readings(unquote(match[1]), match[2], match[3], query)

    def _readings(self, device: str, start_text: str, end_text: str, query: str) -> tuple[int, bytes, str]:
        try:
            start = _int_param("start", start_text, 0, MAX_INT64)
            end = _int_param("end", end_text, 0, MAX_INT64)
            if end < start:
                # edgex-go's own wording, swapped names and all
                message = f"end's value {end} is not allowed to be greater than start's value {start}"
                raise _BadRequest(message)
            params = parse_qs(query, keep_blank_values=True)
            offset = _int_param("offset", params.get("offset", [None])[0], 0, MAX_INT32, default=0)
            limit_text = params.get("limit", [None])[0]
            limit = _int_param("limit", limit_text, -1, self._max_result_count, default=DEFAULT_LIMIT)
        except _BadRequest as exc:
            return 400, _error_body(400, str(exc)), ""
        if limit == -1:
            limit = self._max_result_count
        if self._known_devices is not None and device not in self._known_devices:
            return 404, _error_body(404, f"device '{device}' does not exist"), ""
        window = self._store.window(device, start, end)
        total = len(window)
        if limit == 0 or total == 0:
            page: list[dict[str, Any]] = []
        elif offset > total:
            message = f"query objects bounds out of range. length:{total} offset:{offset}"
            return 416, _error_body(416, message), ""
        else:
            page = window[offset : offset + limit]
        body = {"apiVersion": API_VERSION, "statusCode": 200, "totalCount": total, "readings": page}
        return 200, _json(body), ""


class _BadRequest(Exception):
    pass


def _int_param(name: str, text: str | None, low: int, high: int, *, default: int | None = None) -> int:
    if text is None and default is not None:
        return default
    try:
        value = int(text or "")
    except ValueError:
        raise _BadRequest(f"failed to parse {name} '{text}' as an integer") from None
    if not low <= value <= high:
        raise _BadRequest(f"querystring {name}'s value {value} is out of min {low} ~ max {high} range.")
    return value


def _json(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def _error_body(status: int, message: str) -> bytes:
    """EdgeX's error body: one ``BaseResponse`` (``requestId`` is omitted when empty, as in Go)."""
    return _json({"apiVersion": API_VERSION, "message": message, "statusCode": status})
