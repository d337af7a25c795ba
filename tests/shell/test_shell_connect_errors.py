"""A broker that cannot be reached is logged, with what to check, and rate-limited.

Real sockets and a real Mosquitto (the configuration ``fedge broker config`` generates, TLS with
its lab CA): nothing listening on a loopback port, a CA that did not sign the broker's
certificate, plain MQTT on the TLS port and TLS on a plain port. paho 2.x, with ``connect_async``
and ``loop_start`` as the services run it, calls ``on_connect_fail`` for each failed attempt;
:func:`fedge.shell.mqtt.watch_connection` turns those into warnings. No mocks; every wait is
bounded.
"""

from __future__ import annotations

import logging
import os
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedge.lab.broker import BrokerSettings, ConfiguredMosquitto, MosquittoBroker, free_loopback_port
from fedge.protocol.mqtt_settings import MqttSettings
from fedge.shell.mqtt import FAILURE_LOG_INTERVAL_S, connect, make_client, watch_connection
from fedge.tools.broker_config import BrokerConfigRequest, BrokerLimits, FleetAccess, write_broker_config
from support.mqtt_fixtures import require_mosquitto

pytest_plugins = ("support.mqtt_fixtures",)

LOG = logging.getLogger("fedge.test.connect_errors")
WAIT_S = 15.0


class FakeClock:
    """The monotonic clock watch_connection's rate limit reads; the test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


def settings(port: int, *, tls: bool = False, ca_file: str | None = None) -> MqttSettings:
    return MqttSettings(
        host="127.0.0.1",
        port=port,
        tls=tls,
        protocol=5,
        keepalive=30,
        username=None,
        password=None,
        client_id="dev-connect-errors",
        session_expiry_s=0,
        ca_file=ca_file,
    )


class Client:
    """A service-like client (make_client, watch_connection, connect, loop_start)."""

    def __init__(self, s: MqttSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = s
        self.client = make_client(s)
        self.connected = threading.Event()
        watch_connection(self.client, LOG, lambda c: self.connected.set(), clock=clock)

    def __enter__(self) -> Client:
        connect(self.client, self.settings)
        self.client.loop_start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOG.name]


def wait_for_lines(caplog: pytest.LogCaptureFixture, count: int, what: str) -> list[tuple[int, str]]:
    deadline = time.monotonic() + WAIT_S
    while len(lines(caplog)) < count:
        assert time.monotonic() < deadline, f"timed out waiting for {what}; logged: {lines(caplog)}"
        time.sleep(0.05)
    return lines(caplog)


def test_nothing_listening_is_a_warning_naming_host_port_and_what_to_check_then_rate_limited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_loopback_port()  # nothing listens there
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger=LOG.name), Client(settings(port), clock):
        first = wait_for_lines(caplog, 1, "the first failure")
        # paho retries after 1 s and then 2 s: within the minute, nothing more is logged.
        time.sleep(3.5)
        assert lines(caplog) == first
        clock.advance(FAILURE_LOG_INTERVAL_S)
        second = wait_for_lines(caplog, 2, "the once-a-minute report")
    (level, text), (level2, text2) = second[0], second[1]
    assert level == logging.WARNING
    assert text.startswith(f"cannot connect to the broker at 127.0.0.1:{port}: ")
    assert "Connection refused" in text
    assert (
        "check: nothing accepts connections there: is the broker running, and are host and port right?"
        in text
    )
    assert text.endswith("retrying with backoff")
    assert level2 == logging.WARNING
    assert text2.startswith(f"still cannot connect to the broker at 127.0.0.1:{port}: ")
    attempts = int(text2.split(": ", 1)[1].split(" attempt(s)")[0])
    assert attempts >= 2, text2  # the attempts at 1 s and 3 s at least, counted not logged
    assert "is the broker running" in text2


def test_tls_on_a_plain_port_says_to_check_the_port(
    mosquitto: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger=LOG.name), Client(settings(mosquitto.port, tls=True)):
        (level, text), *_ = wait_for_lines(caplog, 1, "the failed handshake")
    assert level == logging.WARNING
    assert text.startswith(f"cannot connect to the broker at 127.0.0.1:{mosquitto.port}: ")
    assert "check: is TLS on this port?" in text


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConfiguredMosquitto]:
    """The broker ``fedge broker config --tls lab`` configures (TLS, passwords, ACLs)."""
    exe = require_mosquitto()
    tmp = tmp_path_factory.mktemp("tls-broker")
    data_dir = tmp / "data"
    data_dir.mkdir()
    result = write_broker_config(
        BrokerConfigRequest(
            access=FleetAccess(fleet="f1", devices=("dev-a",), aggregator="agg"),
            out_dir=tmp / "broker",
            tls="lab",
            port=free_loopback_port(),
            bind="127.0.0.1",
            data_dir=data_dir,
            run_as="root" if os.geteuid() == 0 else None,
            limits=BrokerLimits.for_fleet(1, 50_000),
        )
    )
    ca = result.out_dir / "credentials" / "ca.crt"
    with ConfiguredMosquitto(
        result.out_dir / "mosquitto.conf",
        port=result.port,
        work_dir=tmp / "run",
        tls_context=ssl.create_default_context(cafile=str(ca)),
        executable=exe,
    ) as broker:
        yield broker


def other_ca(tmp_path: Path) -> Path:
    """A CA certificate that did not sign the broker's certificate."""
    ca = tmp_path / "other-ca.crt"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", str(tmp_path / "other-ca.key"), "-out", str(ca),
            "-subj", "/CN=not the broker's CA", "-days", "1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return ca


def test_a_wrong_ca_says_to_check_ca_file(
    tls_broker: ConfiguredMosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = other_ca(tmp_path)
    s = settings(tls_broker.port, tls=True, ca_file=str(ca))
    with caplog.at_level(logging.INFO, logger=LOG.name), Client(s):
        (level, text), *_ = wait_for_lines(caplog, 1, "the failed verification")
    assert level == logging.WARNING
    assert text.startswith(f"cannot connect to the broker at 127.0.0.1:{tls_broker.port}: ")
    assert "certificate verify failed" in text
    assert f"check: is ca_file ({ca}) the CA that signed the broker's certificate?" in text


def test_no_ca_file_says_to_set_ca_file(
    tls_broker: ConfiguredMosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger=LOG.name), Client(settings(tls_broker.port, tls=True)):
        (level, text), *_ = wait_for_lines(caplog, 1, "the failed verification")
    assert level == logging.WARNING
    assert "check: ca_file is not set, so only the system's CAs are trusted" in text


def test_plain_mqtt_on_the_tls_port_says_to_check_tls(
    tls_broker: ConfiguredMosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger=LOG.name), Client(settings(tls_broker.port)):
        (level, text), *_ = wait_for_lines(caplog, 1, "the unanswered CONNECT")
    assert level == logging.WARNING
    assert text == (
        f"cannot connect to the broker at 127.0.0.1:{tls_broker.port}: the broker closed the connection "
        "without answering CONNECT; check: does this port expect TLS? (then use mqtts:// and ca_file); "
        "retrying with backoff"
    )


def test_the_connection_that_ends_an_outage_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    exe = require_mosquitto()
    port = free_loopback_port()
    with caplog.at_level(logging.INFO, logger=LOG.name), Client(settings(port)) as client:
        wait_for_lines(caplog, 1, "the first failure")
        with MosquittoBroker(BrokerSettings(data_dir=tmp_path / "mosquitto", port=port), executable=exe):
            assert client.connected.wait(WAIT_S + 30)  # paho's backoff grows to 4-8 s meanwhile
            found = wait_for_lines(caplog, 2, "the recovery")
    assert found[1][0] == logging.INFO
    assert found[1][1].startswith(f"connected to the broker at 127.0.0.1:{port} after ")
