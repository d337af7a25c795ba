"""fedge.shell.http_endpoint: the bounded HTTP server behind /metrics, /healthz and /readyz.

Real sockets on the loopback interface, port 0 (the kernel's choice): exact routes, 404 for
everything else (no file is ever served), GET only, request bodies never read, a route's
exception answered 500 without ending the server, a bounded number of connections, and a bind
failure that is one ConfigError naming ``[metrics] port``.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from fedge.protocol.config_source import ConfigError, Table
from fedge.protocol.metrics_settings import (
    AGENT_METRICS_PORT,
    AGGREGATOR_METRICS_PORT,
    MetricsSettings,
    metrics_settings_from_table,
)
from fedge.shell import http_endpoint
from fedge.shell.http_endpoint import HttpEndpoint, Response, health_response, json_response, start_endpoint
from fedge.shell.meters import Durations, Traffic

log = logging.getLogger("test.http")


@pytest.fixture
def endpoint() -> Iterator[HttpEndpoint]:
    def boom() -> Response:
        raise RuntimeError("a bug in a route")

    served = HttpEndpoint(
        "127.0.0.1",
        0,
        {
            "/hello": lambda: Response(200, b"hi\n"),
            "/json": lambda: json_response(200, {"a": 1}),
            "/down": lambda: health_response(False, {"reason": "testing"}),
            "/boom": boom,
        },
    )
    yield served
    served.stop()


def request(
    ep: HttpEndpoint, method: str, path: str, body: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", ep.port, timeout=5)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_routes_answer_with_their_status_type_and_body(endpoint: HttpEndpoint) -> None:
    assert endpoint.port > 0 and endpoint.url == f"http://127.0.0.1:{endpoint.port}"
    status, headers, body = request(endpoint, "GET", "/hello")
    assert (status, body) == (200, b"hi\n")
    assert headers["content-type"].startswith("text/plain")
    assert headers["connection"] == "close" and headers["cache-control"] == "no-store"
    status, headers, body = request(endpoint, "GET", "/json?verbose=1")  # a query string is ignored
    assert (status, headers["content-type"], json.loads(body)) == (200, "application/json", {"a": 1})
    status, _, body = request(endpoint, "GET", "/down")
    assert (status, json.loads(body)) == (503, {"ok": False, "reason": "testing"})


@pytest.mark.parametrize("path", ["/", "/hello/", "/HELLO", "/../etc/passwd", "/hello/x", "/metrics"])
def test_any_other_path_is_404_and_no_file_is_served(endpoint: HttpEndpoint, path: str) -> None:
    status, _, body = request(endpoint, "GET", path)
    assert (status, body) == (404, b"not found\n")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
def test_only_get_is_allowed(endpoint: HttpEndpoint, method: str) -> None:
    status, headers, _ = request(endpoint, method, "/hello", body=b"x" * 1000 if method != "HEAD" else None)
    assert status == 405 and headers["allow"] == "GET"


def test_a_huge_request_body_is_never_read(endpoint: HttpEndpoint) -> None:
    """A POST announcing 1 GB is answered 405 at once; the server reads at most 64 KiB of it."""
    with socket.create_connection(("127.0.0.1", endpoint.port), timeout=5) as sock:
        sock.sendall(b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n" + b"x" * 70_000)
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 405 ")


def test_a_failing_route_is_a_500_and_the_server_goes_on(endpoint: HttpEndpoint) -> None:
    status, _, body = request(endpoint, "GET", "/boom")
    assert (status, body) == (500, b"internal error\n")
    assert request(endpoint, "GET", "/hello")[0] == 200


def test_routes_can_be_added_later(endpoint: HttpEndpoint) -> None:
    """How a dashboard page at / and /api/fleet will be added."""
    endpoint.add_route("/", lambda: Response(200, b"<html></html>", "text/html"))
    assert request(endpoint, "GET", "/")[0] == 200
    with pytest.raises(ValueError, match="absolute path"):
        endpoint.add_route("api/fleet", lambda: Response(200, b""))


def test_a_silent_client_is_cut_off_and_connections_are_bounded(
    endpoint: HttpEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Idle connections time out (the handler's socket timeout) and never more than
    MAX_CONNECTIONS are served at once: more are closed unanswered, then served again."""
    assert http_endpoint._Handler.timeout == http_endpoint.SOCKET_TIMEOUT_S
    monkeypatch.setattr(http_endpoint._Handler, "timeout", 2.0)
    idle = [socket.create_connection(("127.0.0.1", endpoint.port), timeout=5) for _ in range(8)]
    try:
        time.sleep(0.3)  # the 8 are accepted and held by their handler threads
        with socket.create_connection(("127.0.0.1", endpoint.port), timeout=5) as extra:
            extra.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            assert extra.recv(4096) == b""  # closed unanswered
        for sock in idle:  # each silent one is cut off after the timeout
            sock.settimeout(5)
            assert sock.recv(4096) == b""
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if request(endpoint, "GET", "/hello")[0] == 200:
                break
        except (ConnectionError, http.client.HTTPException):
            time.sleep(0.05)
    else:
        raise AssertionError("the server did not serve again once the idle connections were gone")


def test_concurrent_requests_are_all_answered(endpoint: HttpEndpoint) -> None:
    results: list[int] = []

    def get() -> None:
        results.append(request(endpoint, "GET", "/json")[0])

    threads = [threading.Thread(target=get) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [200] * 6


def test_a_port_in_use_is_one_config_error_naming_the_setting(endpoint: HttpEndpoint) -> None:
    settings = MetricsSettings(enabled=True, bind="127.0.0.1", port=endpoint.port)
    with pytest.raises(
        ConfigError, match=r"\[metrics\] on 127\.0\.0\.1 port \d+: .*\[metrics\] port"
    ) as info:
        start_endpoint(settings, {}, log)
    assert "\n" not in str(info.value)


def test_start_endpoint_logs_the_bound_port(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "test.http")
    ep = start_endpoint(MetricsSettings(enabled=True, port=0), {"/healthz": lambda: Response(200, b"")}, log)
    try:
        assert f"http://127.0.0.1:{ep.port}" in caplog.text and "/healthz" in caplog.text
    finally:
        ep.stop()


def test_ipv6_loopback(endpoint: HttpEndpoint) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        ep = HttpEndpoint("::1", 0, {"/x": lambda: Response(200, b"6")})
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        assert ep.url == f"http://[::1]:{ep.port}"
        conn = http.client.HTTPConnection("::1", ep.port, timeout=5)
        conn.request("GET", "/x")
        assert conn.getresponse().read() == b"6"
        conn.close()
    finally:
        ep.stop()


def test_metrics_settings_defaults_and_checks() -> None:
    def parse(raw: dict[str, object], port: int = AGENT_METRICS_PORT) -> MetricsSettings:
        return metrics_settings_from_table(
            Table({"metrics": raw}, "metrics", {"enabled", "bind", "port"}), port
        )

    assert parse({}) == MetricsSettings(False, "127.0.0.1", AGENT_METRICS_PORT)
    assert parse({}, AGGREGATOR_METRICS_PORT).port == 9465
    assert parse({"enabled": True, "bind": "0.0.0.0", "port": 0}) == MetricsSettings(True, "0.0.0.0", 0)
    assert parse({"bind": "::"}).bind == "::"
    with pytest.raises(ConfigError, match=r"\[metrics\] bind must be an IP address"):
        parse({"bind": "localhost"})
    with pytest.raises(ConfigError, match=r"\[metrics\] port must be an integer in 0\.\.65535"):
        parse({"port": 70000})


def test_meters() -> None:
    traffic = Traffic("fedge/v1/f")
    traffic.inbound("fedge/v1/f/update/d1", 10)
    traffic.inbound("fedge/v1/f/update/d2", 5)
    traffic.inbound("fedge/v1/f/zzz/d2", 1)
    traffic.outbound("elsewhere/x", 3)
    assert traffic.received.snapshot() == {"update": 15, "other": 1}
    assert traffic.sent.snapshot() == {"other": 3}
    durations = Durations((1.0, 10.0))
    for seconds in (0.5, 1.0, 3.0, 30.0):
        durations.observe(seconds)
    snap = durations.snapshot()
    assert snap.buckets == [(1.0, 2), (10.0, 3), (float("inf"), 4)]
    assert (snap.sum, snap.count) == (34.5, 4)
    with pytest.raises(ValueError):
        Durations((2.0, 1.0))
