"""MQTT test fixtures: a real Mosquitto broker and a recorder of everything it routes.

Use from a test module or conftest with ``pytest_plugins = ("support.mqtt_fixtures",)`` (``tests/`` is
on ``sys.path`` when pytest runs). Fixtures:

- ``mosquitto``: a started :class:`~fedge.lab.broker.MosquittoBroker` in the test's ``tmp_path``,
  stopped when the test ends, whether it passed or failed.
- ``mosquitto_session``: one broker for the whole session (use unique topics per test).
- ``traffic_recorder``: a started :class:`TrafficRecorder` on ``mosquitto``.

Without mosquitto the fixtures skip locally and FAIL when the ``CI`` environment variable is
set, so CI cannot go green without running the broker tests.

PYTEST_DONT_REWRITE: test modules import helpers from here before pytest registers the
plugin; the marker spares them a warning (this module raises its AssertionErrors itself).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import NamedTuple, Self

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from fedge.lab.broker import BrokerProcess, BrokerSettings, MosquittoBroker, find_mosquitto

# The longest a waiting loop blocks between two checks of its condition.
POLL_S = 0.05


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_mosquitto() -> Path:
    """The mosquitto executable; skips the test without it (fails it on CI)."""
    exe = find_mosquitto()
    if exe is None:
        message = "mosquitto is not installed (apt-get install mosquitto, or bash scripts/system-deps.sh)"
        if in_ci():
            pytest.fail(f"{message}; CI must run the MQTT tests", pytrace=False)
        pytest.skip(message)
    return exe


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A running Mosquitto broker on a free loopback port, persistence in ``tmp_path``."""
    exe = require_mosquitto()
    with MosquittoBroker(BrokerSettings(data_dir=tmp_path / "mosquitto"), executable=exe) as broker:
        yield broker


@pytest.fixture(scope="session")
def mosquitto_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """One Mosquitto broker shared by every test of the session; tests must not restart it."""
    exe = require_mosquitto()
    data_dir = tmp_path_factory.mktemp("mosquitto-session")
    with MosquittoBroker(BrokerSettings(data_dir=data_dir), executable=exe) as broker:
        yield broker


@pytest.fixture
def traffic_recorder(mosquitto: MosquittoBroker) -> Iterator[TrafficRecorder]:
    """A recorder subscribed to ``#`` on the ``mosquitto`` fixture's broker."""
    with TrafficRecorder.for_broker(mosquitto) as recorder:
        yield recorder


class RecordedMessage(NamedTuple):
    topic: str
    payload: bytes
    qos: int
    retain: bool


class TrafficRecorder:
    """Sees what the broker sees: subscribes to ``#`` and records every message it routes.

    A paho 2.x client (callback API version 2, MQTT v5). The subscription asks for QoS 2 with
    *retain as published*, so each record carries the QoS and retain flag the publisher used
    (a QoS 1 subscription would downgrade QoS 2 messages, and without retain-as-published
    mosquitto clears the retain flag on live messages). ``#`` does not match ``$SYS/...``.

    The client id is unique and its session persistent (``clean_start=False`` with a session
    expiry interval), so it also gets what was published across a broker ``restart()`` before
    it reconnected (paho reconnects after 1-2 s). ``stop()`` ends the session on the broker.

    Against a locked-down broker (``fedge broker config``) give ``username``/``password`` of a
    principal allowed to read (a monitor) and ``ca_file`` (TLS with that CA); the ACL then
    decides what ``#`` delivers. Such a broker uses the username as the client id, so one
    recorder per principal at a time.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        topic_filter: str = "#",
        client_id: str | None = None,
        session_expiry_s: int = 300,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | Path | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.topic_filter = topic_filter
        self.client_id = client_id or f"traffic-recorder-{uuid.uuid4().hex[:12]}"
        self._session_expiry_s = session_expiry_s
        self._messages: list[RecordedMessage] = []
        self._changed = threading.Condition()
        self._subscribed = False
        self._connect_error: str | None = None
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        if username is not None:
            self._client.username_pw_set(username, password)
        if ca_file is not None:
            self._client.tls_set(ca_certs=str(ca_file))
        self._client.reconnect_delay_set(min_delay=1, max_delay=2)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._started = False

    @classmethod
    def for_broker(
        cls, broker: BrokerProcess, *, topic_filter: str = "#", client_id: str | None = None
    ) -> TrafficRecorder:
        return cls(broker.host, broker.port, topic_filter=topic_filter, client_id=client_id)

    # -- life cycle --------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> Self:
        """Connect and subscribe; returns once the broker has acknowledged the subscription."""
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho 2.2: untyped
        properties.SessionExpiryInterval = self._session_expiry_s
        # clean_start=False from the first connect: the id is new, so the session starts empty,
        # and (unlike a clean_start=True session in mosquitto 2.0.11) survives a broker restart.
        self._client.connect(self.host, self.port, keepalive=30, clean_start=False, properties=properties)
        self._client.loop_start()
        self._started = True
        try:
            self._wait(lambda: self._subscribed or self._connect_error is not None, timeout)
        except AssertionError:
            self.stop()
            raise AssertionError(
                f"recorder did not subscribe to {self.topic_filter!r} on {self.host}:{self.port} "
                f"within {timeout} s"
            ) from None
        if self._connect_error is not None:
            self.stop()
            raise AssertionError(f"recorder could not connect or subscribe: {self._connect_error}")
        return self

    def stop(self) -> None:
        """Disconnect, ending the recorder's session on the broker (expiry 0). Idempotent."""
        if not self._started:
            return
        self._started = False
        if self._client.is_connected():
            properties = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]  # paho 2.2: untyped
            properties.SessionExpiryInterval = 0
            self._client.disconnect(properties=properties)
        self._client.loop_stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- what was recorded -------------------------------------------------------------------

    @property
    def messages(self) -> list[RecordedMessage]:
        """A snapshot of every message recorded so far, in arrival order."""
        with self._changed:
            return list(self._messages)

    def matching(self, topic_filter: str) -> list[RecordedMessage]:
        """The recorded messages whose topic matches an MQTT filter (``+`` and ``#`` allowed)."""
        return [m for m in self.messages if mqtt.topic_matches_sub(topic_filter, m.topic)]

    def clear(self) -> None:
        with self._changed:
            self._messages.clear()

    def wait_for(
        self,
        predicate: Callable[[list[RecordedMessage]], bool],
        timeout: float = 10.0,
        what: str = "the expected messages",
    ) -> list[RecordedMessage]:
        """Wait (bounded; wakes on every message, checks at least every 50 ms) until
        ``predicate(messages)`` holds; returns the messages then. Raises AssertionError naming
        ``what`` and what was seen on timeout."""
        try:
            self._wait(lambda: predicate(list(self._messages)), timeout)
        except AssertionError:
            seen = self.messages
            topics = ", ".join(sorted({m.topic for m in seen})[:20]) or "none"
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what}; recorded {len(seen)} message(s) "
                f"on topics: {topics}"
            ) from None
        return self.messages

    def wait_for_count(self, topic_filter: str, count: int, timeout: float = 10.0) -> list[RecordedMessage]:
        """Wait until at least ``count`` messages matching ``topic_filter`` were recorded."""
        self.wait_for(
            lambda ms: sum(mqtt.topic_matches_sub(topic_filter, m.topic) for m in ms) >= count,
            timeout,
            what=f"{count} message(s) on {topic_filter!r}",
        )
        return self.matching(topic_filter)

    # -- internals ---------------------------------------------------------------------------

    def _wait(self, condition: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not condition():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError("timed out")
                self._changed.wait(min(POLL_S, remaining))

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            with self._changed:
                self._connect_error = f"CONNACK {reason_code}"
                self._changed.notify_all()
            return
        if not flags.session_present:
            # A new session (first connect, or the broker lost ours): subscribe (again).
            options = SubscribeOptions(qos=2, retainAsPublished=True)
            result, _mid = client.subscribe(self.topic_filter, options=options)
            if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
                with self._changed:
                    self._connect_error = f"SUBSCRIBE failed: {mqtt.error_string(result)}"
                    self._changed.notify_all()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._changed:
            if any(rc.is_failure for rc in reason_codes):
                self._connect_error = f"SUBACK {[str(rc) for rc in reason_codes]}"
            else:
                self._subscribed = True
            self._changed.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        record = RecordedMessage(message.topic, bytes(message.payload), message.qos, bool(message.retain))
        with self._changed:
            self._messages.append(record)
            self._changed.notify_all()
