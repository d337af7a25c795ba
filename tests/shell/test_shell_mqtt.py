"""fedge.shell.mqtt against a real Mosquitto: persistent sessions (MQTT 5 and 3.1.1), manual
acknowledgement, and the connection log. No mocks; every wait is bounded."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from fedge.lab.broker import BrokerSettings, MosquittoBroker
from fedge.protocol.mqtt_settings import MqttSettings
from fedge.shell.mqtt import connect, ephemeral_settings, make_client, publish_queued, watch_connection
from fedge.tools.broker_config import hash_password
from support.mqtt_fixtures import require_mosquitto

pytest_plugins = ("support.mqtt_fixtures",)

LOG = logging.getLogger("fedge.test.shell_mqtt")
WAIT_S = 15.0


def settings_for(
    broker: MosquittoBroker,
    client_id: str,
    protocol: int = 5,
    username: str | None = None,
    password: str | None = None,
) -> MqttSettings:
    return MqttSettings(
        host=broker.host,
        port=broker.port,
        tls=False,
        protocol=protocol,
        keepalive=30,
        username=username,
        password=password,
        client_id=client_id,
        session_expiry_s=300,
    )


class Peer:
    """A service-like client: make_client, watch_connection, connect; records what arrives."""

    def __init__(
        self, settings: MqttSettings, subscribe: str | None = None, manual_ack: bool = False
    ) -> None:
        self.settings = settings
        self.subscribe = subscribe
        self.client = make_client(settings, manual_ack=manual_ack)
        self.messages: list[mqtt.MQTTMessage] = []
        self.connects = 0
        self.disconnects = 0
        self.subscribed = False
        self._changed = threading.Condition()
        watch_connection(self.client, LOG, self._connected, self._disconnected)
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def start(self) -> Peer:
        connect(self.client, self.settings)
        self.client.loop_start()
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def wait(self, condition: Callable[[], bool], what: str) -> None:
        with self._changed:
            assert self._changed.wait_for(condition, WAIT_S), f"timed out waiting for {what}"

    def payloads(self) -> list[bytes]:
        with self._changed:
            return [bytes(m.payload) for m in self.messages]

    def _connected(self, client: mqtt.Client) -> None:
        if self.subscribe is not None:
            client.subscribe(self.subscribe, qos=1)
        with self._changed:
            self.connects += 1
            self._changed.notify_all()

    def _disconnected(self) -> None:
        with self._changed:
            self.disconnects += 1
            self._changed.notify_all()

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, rcs: Any, props: Any) -> None:
        with self._changed:
            self.subscribed = True
            self._changed.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._changed:
            self.messages.append(msg)
            self._changed.notify_all()


def publish(broker: MosquittoBroker, topic: str, payload: bytes) -> None:
    """QoS 1 from a throwaway client; returns once the broker acknowledged (PUBACK)."""
    client = make_client(ephemeral_settings(broker.host, broker.port, False, "publisher"), persistent=False)
    client.connect(broker.host, broker.port, 30)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=1)
        info.wait_for_publish(WAIT_S)
        assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def subscribed_then_offline(broker: MosquittoBroker, settings: MqttSettings, topic: str) -> None:
    """A session with a QoS 1 subscription to ``topic``, whose client then leaves (DISCONNECT)."""
    peer = Peer(settings, subscribe=topic).start()
    try:
        peer.wait(lambda: peer.subscribed, "the subscription")
    finally:
        peer.stop()


@pytest.mark.parametrize("protocol", [5, 3], ids=["mqtt5", "mqtt311"])
def test_the_session_keeps_a_qos1_message_published_while_the_client_was_offline(
    mosquitto: MosquittoBroker, protocol: int
) -> None:
    topic, cid = f"shell/{uuid.uuid4().hex}", f"dev-{uuid.uuid4().hex[:8]}"
    settings = settings_for(mosquitto, cid, protocol)
    subscribed_then_offline(mosquitto, settings, topic)
    publish(mosquitto, topic, b"while offline")
    # Back with the same id and no subscribe of its own: the session has both.
    back = Peer(settings).start()
    try:
        back.wait(lambda: bool(back.messages), "the queued message")
        assert back.payloads() == [b"while offline"]
        assert (back.messages[0].topic, back.messages[0].qos) == (topic, 1)
    finally:
        back.stop()


def test_a_message_not_acknowledged_comes_again_and_an_acknowledged_one_does_not(
    mosquitto: MosquittoBroker,
) -> None:
    topic, cid = f"shell/{uuid.uuid4().hex}", f"dev-{uuid.uuid4().hex[:8]}"
    settings = settings_for(mosquitto, cid)
    first = Peer(settings, subscribe=topic, manual_ack=True).start()
    try:
        first.wait(lambda: first.subscribed, "the subscription")
        publish(mosquitto, topic, b"m1")
        first.wait(lambda: bool(first.messages), "m1")
    finally:
        first.stop()  # left without acknowledging m1 (a crash before it was stored)

    second = Peer(settings, manual_ack=True).start()
    try:
        second.wait(lambda: bool(second.messages), "m1 again")
        again = second.messages[0]
        assert (bytes(again.payload), again.dup) == (b"m1", True)
        second.client.ack(again.mid, again.qos)  # stored now
    finally:
        second.stop()

    third = Peer(settings).start()
    try:
        third.wait(lambda: third.connects == 1, "the connection")
        publish(mosquitto, topic, b"m2")
        third.wait(lambda: bool(third.messages), "m2")
        # m1 would have come first (a resumed session resends what is in flight at once).
        assert third.payloads() == [b"m2"]
    finally:
        third.stop()


def test_without_manual_ack_paho_acknowledges_when_on_message_returns(mosquitto: MosquittoBroker) -> None:
    topic, cid = f"shell/{uuid.uuid4().hex}", f"dev-{uuid.uuid4().hex[:8]}"
    settings = settings_for(mosquitto, cid)
    first = Peer(settings, subscribe=topic).start()
    try:
        first.wait(lambda: first.subscribed, "the subscription")
        publish(mosquitto, topic, b"m1")
        first.wait(lambda: bool(first.messages), "m1")
    finally:
        first.stop()
    second = Peer(settings).start()
    try:
        second.wait(lambda: second.connects == 1, "the connection")
        publish(mosquitto, topic, b"m2")
        second.wait(lambda: bool(second.messages), "m2")
        assert second.payloads() == [b"m2"]
    finally:
        second.stop()


def test_a_lost_connection_is_one_warning_and_the_client_reconnects(
    mosquitto: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    peer = Peer(settings_for(mosquitto, f"dev-{uuid.uuid4().hex[:8]}"))
    with caplog.at_level(logging.INFO, logger=LOG.name):
        peer.start()
        try:
            peer.wait(lambda: peer.connects == 1, "the connection")
            mosquitto.restart()  # the broker goes away and comes back on the same port
            peer.wait(lambda: peer.connects == 2, "the reconnection")
        finally:
            peer.stop()  # our own disconnect: logged by nobody
        assert peer.disconnects == 2
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOG.name]
    assert len(lines) == 1, lines
    level, text = lines[0]
    assert level == logging.WARNING
    assert text.startswith("disconnected from the broker (") and text.endswith("); reconnecting with backoff")


def test_a_message_published_while_the_broker_is_down_is_queued_and_delivered_after_the_reconnect(
    mosquitto: MosquittoBroker,
) -> None:
    topic = f"shell/{uuid.uuid4().hex}"
    receiver = Peer(settings_for(mosquitto, f"rx-{uuid.uuid4().hex[:8]}"), subscribe=topic).start()
    sender = Peer(settings_for(mosquitto, f"tx-{uuid.uuid4().hex[:8]}")).start()
    try:
        receiver.wait(lambda: receiver.subscribed, "the subscription")
        sender.wait(lambda: sender.connects == 1, "the sender's connection")
        mosquitto.stop()
        sender.wait(lambda: sender.disconnects == 1, "the sender to see the broker gone")
        plain = sender.client.publish(topic, b"plain", qos=1)
        assert plain.rc == mqtt.MQTT_ERR_NO_CONN  # what paho's own publish leaves, for ever
        info = publish_queued(sender.client, topic, b"queued", qos=1)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS and not info.is_published()  # queued, not raised
        mosquitto.start()
        info.wait_for_publish(WAIT_S)
        assert info.is_published()  # the broker's PUBACK after the reconnect
        receiver.wait(lambda: b"queued" in receiver.payloads(), "the queued message")
        assert sorted(receiver.payloads()) == [b"plain", b"queued"]  # both sent, once each
        with pytest.raises(RuntimeError, match="not currently connected"):
            plain.is_published()
    finally:
        sender.stop()
        receiver.stop()


@pytest.fixture
def password_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """Mosquitto with a password file: anonymous clients pass (the readiness probe is one), a
    client that gives a username must give its password."""
    exe = require_mosquitto()
    passwd = tmp_path / "passwd"
    passwd.write_text(f"device:{hash_password('right password')}\n")
    passwd.chmod(0o600)
    settings = BrokerSettings(data_dir=tmp_path / "mosquitto", extra_lines=(f"password_file {passwd}",))
    with MosquittoBroker(settings, executable=exe) as broker:
        yield broker


@pytest.mark.parametrize("protocol", [5, 3], ids=["mqtt5", "mqtt311"])
def test_a_refused_connection_is_one_error_line(
    password_broker: MosquittoBroker, caplog: pytest.LogCaptureFixture, protocol: int
) -> None:
    cid = f"dev-{uuid.uuid4().hex[:8]}"
    good = Peer(settings_for(password_broker, cid, protocol, "device", "right password")).start()
    try:
        good.wait(lambda: good.connects == 1, "the connection with the right password")
    finally:
        good.stop()
    bad = Peer(settings_for(password_broker, cid, protocol, "device", "wrong password"))
    with caplog.at_level(logging.INFO, logger=LOG.name):
        bad.start()
        try:
            bad.wait(lambda: bad.disconnects >= 1, "the refusal")
        finally:
            bad.client.loop_stop()  # before paho's next attempt (1 s later)
    assert bad.connects == 0
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOG.name]
    assert lines == [(logging.ERROR, "broker refused the connection: Not authorized")]


def test_a_will_is_published_retained_when_the_client_vanishes(mosquitto: MosquittoBroker) -> None:
    topic = f"shell/{uuid.uuid4().hex}/status"
    watcher = Peer(settings_for(mosquitto, f"watcher-{uuid.uuid4().hex[:8]}"), subscribe=topic).start()
    late: Peer | None = None
    try:
        watcher.wait(lambda: watcher.subscribed, "the subscription")
        dying = make_client(settings_for(mosquitto, f"dev-{uuid.uuid4().hex[:8]}"), will=(topic, b"offline"))
        dying.connect(mosquitto.host, mosquitto.port, 30)
        deadline = time.monotonic() + WAIT_S
        while not dying.is_connected() and time.monotonic() < deadline:
            dying.loop(timeout=0.1)  # CONNECT out, CONNACK in
        assert dying.is_connected()
        sock = dying.socket()
        assert sock is not None
        sock.close()  # gone without a DISCONNECT: the broker publishes the will
        watcher.wait(lambda: bool(watcher.messages), "the will")
        assert (watcher.payloads(), watcher.messages[0].qos) == ([b"offline"], 1)
        late = Peer(settings_for(mosquitto, f"late-{uuid.uuid4().hex[:8]}"), subscribe=topic).start()
        late.wait(lambda: bool(late.messages), "the retained will")
        assert (late.payloads(), late.messages[0].retain) == ([b"offline"], True)
    finally:
        watcher.stop()
        if late is not None:
            late.stop()
