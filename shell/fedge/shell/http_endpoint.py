"""A small, bounded HTTP server for a service's read-only endpoints (``/metrics``, ``/healthz``,
``/readyz``; later a dashboard page and ``/api/fleet``).

Standard library only (:class:`http.server.ThreadingHTTPServer`), deliberately narrow:

- a route table: exact paths (a query string is ignored), each a function that returns a
  :class:`Response`; anything else is 404, no file or directory is ever served;
- GET only (405 with ``Allow: GET`` for any other method); a request body is never read;
- bounded: at most :data:`MAX_CONNECTIONS` requests at once (more are closed unanswered), a
  socket timeout per connection (a slow client cannot hold a thread), one request per
  connection (``Connection: close``), request lines and headers bounded by ``http.server``;
- a route that raises answers 500 and is logged, and never ends the server.

Routes are called from the server's threads: they must read the service's state thread-safely.
:func:`start_endpoint` binds and starts it; a bind failure is a :class:`ConfigError` that names
``[metrics]``, so ``fedge agent run`` / ``fedge aggregator run`` exit 78 with one line.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fedge.protocol.config_source import ConfigError
from fedge.protocol.metrics_settings import MetricsSettings

log = logging.getLogger("fedge.shell.http")

#: Requests served at once; a scraper and two probes need three.
MAX_CONNECTIONS = 8
#: Seconds a connection may take to send its request (and to take the answer).
SOCKET_TIMEOUT_S = 5.0
JSON_TYPE = "application/json"
#: Of a refused request's body, at most this much is read (and thrown away) before answering.
MAX_DISCARD_BYTES = 64 * 1024


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: Mapping[str, str] = field(default_factory=dict)


Route = Callable[[], Response]


def json_response(status: int, body: Mapping[str, Any]) -> Response:
    """A small JSON document (health endpoints, API routes)."""
    return Response(status, json.dumps(body, sort_keys=True).encode() + b"\n", JSON_TYPE)


def health_response(ok: bool, body: Mapping[str, Any]) -> Response:
    """200 if ``ok``, else 503, with ``"ok"`` first in the body: what probes and people read."""
    return json_response(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, {"ok": ok, **body})


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = SOCKET_TIMEOUT_S
    protocol_version = "HTTP/1.1"
    server_version = "fedge"
    sys_version = ""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].split("#", 1)[0]
        route = self.server.routes.get(path)
        if route is None:
            self._send(Response(HTTPStatus.NOT_FOUND, b"not found\n"))
            return
        try:
            response = route()
        except Exception:  # one request never ends the server
            log.exception("HTTP route %s failed", path)
            response = Response(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error\n")
        self._send(response)

    def _not_allowed(self) -> None:
        # The body is not read, only a bounded part of it discarded: closing a socket with
        # unread data resets the connection, and the client would miss the answer.
        try:
            length = min(int(self.headers.get("Content-Length") or 0), MAX_DISCARD_BYTES)
            if length > 0:
                self.rfile.read(length)
        except (ValueError, OSError):
            pass
        self._send(Response(HTTPStatus.METHOD_NOT_ALLOWED, b"method not allowed\n", headers={"Allow": "GET"}))

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed

    def _send(self, response: Response) -> None:
        self.close_connection = True  # one request per connection; a body is never read
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(
        self, address: tuple[str, int], family: socket.AddressFamily, routes: dict[str, Route]
    ) -> None:
        self.address_family = family
        self.routes = routes
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):  # too many at once: closed unanswered
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class HttpEndpoint:
    """The server, bound and serving on a daemon thread until :meth:`stop`.

    ``routes`` is the table (path -> function); :meth:`add_route` adds one later."""

    def __init__(self, bind: str, port: int, routes: Mapping[str, Route]) -> None:
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        self.routes: dict[str, Route] = dict(routes)
        self._server = _Server((bind, port), family, self.routes)
        self.bind = bind
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="fedge-http", daemon=True
        )
        self._thread.start()

    def add_route(self, path: str, route: Route) -> None:
        if not path.startswith("/"):
            raise ValueError(f"a route is an absolute path, not {path!r}")
        self.routes[path] = route

    @property
    def url(self) -> str:
        host = f"[{self.bind}]" if ":" in self.bind else self.bind
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_endpoint(
    settings: MetricsSettings, routes: Mapping[str, Route], who: logging.Logger
) -> HttpEndpoint:
    """Binds ``[metrics] bind``:``port`` and serves ``routes``; logs the bound address (with
    ``port = 0``, the port the kernel chose). A port in use or an address not on this host is
    a :class:`ConfigError` naming the setting."""
    try:
        endpoint = HttpEndpoint(settings.bind, settings.port, routes)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve [metrics] on {settings.bind} port {settings.port}: {exc.strerror or exc}; "
            "set [metrics] port to a free port (0: any) or bind to an address of this host, "
            "or [metrics] enabled = false"
        ) from None
    who.info("serving %s on %s", ", ".join(sorted(endpoint.routes)), endpoint.url)
    return endpoint
