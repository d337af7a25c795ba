"""fedge.lab.broker against a real Mosquitto (and the amqtt fallback): no mocks, bounded waits only."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

import fedge.lab.broker as broker_module
from fedge.lab.broker import (
    AmqttBroker,
    BrokerError,
    BrokerSettings,
    MosquittoBroker,
    amqtt_available,
    free_loopback_port,
    local_broker,
    mqtt_ping,
    parse_broker_url,
    render_amqtt_config,
    render_mosquitto_conf,
)
from fedge.protocol.errors import FedgeError
from support.mqtt_fixtures import RecordedMessage, TrafficRecorder, in_ci, require_mosquitto

pytest_plugins = ("support.mqtt_fixtures",)

WAIT_S = 10.0  # upper bound of every wait; a passing test never comes close


class Client:
    """A paho 2.x test client: connects and waits (bounded) for CONNACK, SUBACK and PUBACK."""

    def __init__(
        self,
        broker: broker_module.BrokerProcess,
        client_id: str | None = None,
        protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5,
    ) -> None:
        self.broker = broker
        self.client_id = client_id or f"test-{uuid.uuid4().hex[:10]}"
        self.protocol = protocol
        self.received: list[RecordedMessage] = []
        self.session_present: bool | None = None
        self._cond = threading.Condition()
        self._connack: ReasonCode | None = None
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._mqtt = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=protocol)
        self._mqtt.on_connect = self._on_connect
        self._mqtt.on_subscribe = self._on_subscribe
        self._mqtt.on_message = self._on_message

    def connect(self, *, clean_start: bool = True, session_expiry: int | None = None) -> Client:
        properties = None
        if session_expiry is not None:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho 2.2: untyped
            properties.SessionExpiryInterval = session_expiry
        if self.protocol == MQTTProtocolVersion.MQTTv5:
            self._mqtt.connect(
                self.broker.host, self.broker.port, clean_start=clean_start, properties=properties
            )
        else:
            self._mqtt.connect(self.broker.host, self.broker.port)
        self._mqtt.loop_start()
        self._wait(lambda: self._connack is not None, "CONNACK")
        assert self._connack is not None and not self._connack.is_failure, self._connack
        return self

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        _result, mid = self._mqtt.subscribe(topic_filter, qos)
        assert mid is not None
        self._wait(lambda: mid in self._subacks, f"SUBACK for {topic_filter}")
        assert not any(rc.is_failure for rc in self._subacks[mid]), self._subacks[mid]

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        info = self._mqtt.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout=WAIT_S)  # for QoS 1: until the broker's PUBACK
        assert info.is_published(), f"no PUBACK for {topic} within {WAIT_S} s"

    def wait_for_messages(self, count: int) -> list[RecordedMessage]:
        self._wait(lambda: len(self.received) >= count, f"{count} message(s), got {len(self.received)}")
        with self._cond:
            return list(self.received)

    def disconnect(self) -> None:
        self._mqtt.disconnect()
        self._mqtt.loop_stop()

    def _wait(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        with self._cond:
            while not condition():
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"timed out after {WAIT_S} s waiting for {what}"
                self._cond.wait(min(0.05, remaining))

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._cond:
            self._connack = reason_code
            self.session_present = flags.session_present
            self._cond.notify_all()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._cond:
            self._subacks[mid] = list(reason_codes)
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.received.append(RecordedMessage(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain)))
            self._cond.notify_all()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    """Collects the test's clients and disconnects them when it ends."""
    made: list[Client] = []
    yield made
    for c in made:
        c.disconnect()


def _client(
    made: list[Client],
    broker: broker_module.BrokerProcess,
    client_id: str | None = None,
    protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5,
) -> Client:
    c = Client(broker, client_id=client_id, protocol=protocol)
    made.append(c)
    return c


def _process_gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


# -- configuration ---------------------------------------------------------------------------

GOLDEN_CONF = """\
# Written by fedge.lab.broker for one broker run; rewritten on every start.
per_listener_settings false
listener 18830 127.0.0.1
allow_anonymous true
persistence true
persistence_location /srv/fedge/broker/
persistence_file mosquitto.db
autosave_interval 60
persistent_client_expiration 1d
max_packet_size 16777216
max_queued_messages 10000
max_inflight_messages 20
set_tcp_nodelay true
log_dest file /srv/fedge/broker/mosquitto.log
log_type error
log_type warning
log_type notice
log_type information
log_timestamp_format %Y-%m-%dT%H:%M:%S
connection_messages true
"""


def test_default_conf_matches_the_golden_text() -> None:
    settings = BrokerSettings(data_dir=Path("/srv/fedge/broker"))
    assert render_mosquitto_conf(settings, 18830) == GOLDEN_CONF


def test_conf_renders_every_setting_and_appends_extra_lines_last() -> None:
    settings = BrokerSettings(
        data_dir=Path("/var/lib/fedge/"),
        host="0.0.0.0",
        max_packet_size=1024,
        max_queued_messages=0,
        max_inflight_messages=5,
        persistence=False,
        autosave_interval=5,
        persistent_client_expiration="2w",
        allow_anonymous=False,
        user="mosquitto",
        extra_lines=("password_file /etc/fedge/passwd", "acl_file /etc/fedge/acl"),
    )
    lines = render_mosquitto_conf(settings, 8883).splitlines()
    for expected in (
        "listener 8883 0.0.0.0",
        "allow_anonymous false",
        "persistence false",
        "persistence_location /var/lib/fedge/",
        "autosave_interval 5",
        "persistent_client_expiration 2w",
        "max_packet_size 1024",
        "max_queued_messages 0",
        "max_inflight_messages 5",
        "log_dest file /var/lib/fedge/mosquitto.log",
        "user mosquitto",
    ):
        assert expected in lines
    assert lines[-2:] == ["password_file /etc/fedge/passwd", "acl_file /etc/fedge/acl"]
    # mosquitto 2.0.11 reads one log type per line and ignores the rest of a line.
    assert all(len(line.split()) == 2 for line in lines if line.startswith("log_type"))


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"port": 70000}, "port"),
        ({"port": -1}, "port"),
        ({"max_packet_size": 10}, "max_packet_size"),
        ({"max_packet_size": 300_000_000}, "max_packet_size"),
        ({"max_queued_messages": -1}, "max_queued_messages"),
        ({"max_inflight_messages": 70000}, "max_inflight_messages"),
        ({"persistent_client_expiration": "1 day"}, "persistent_client_expiration"),
        ({"data_dir": Path("/tmp/with space")}, "data_dir"),
        ({"host": "127.0.0.1 # evil"}, "host"),
        ({"extra_lines": ("allow_anonymous true\nlistener 1 0.0.0.0",)}, "single line"),
    ],
)
def test_bad_settings_are_refused_with_the_field_named(changes: dict[str, object], problem: str) -> None:
    kwargs: dict[str, object] = {"data_dir": Path("/srv/b"), **changes}
    with pytest.raises(BrokerError, match=problem):
        BrokerSettings(**kwargs)  # type: ignore[arg-type]


def test_render_rejects_port_zero() -> None:
    with pytest.raises(BrokerError, match=r"1\.\.65535"):
        render_mosquitto_conf(BrokerSettings(data_dir=Path("/srv/b")), 0)


def test_amqtt_config_carries_the_listener_and_anonymous_access() -> None:
    config = json.loads(
        render_amqtt_config(BrokerSettings(data_dir=Path("/srv/b"), allow_anonymous=False), 1884)
    )
    assert config["listeners"]["default"]["bind"] == "127.0.0.1:1884"
    assert config["plugins"]["amqtt.plugins.authentication.AnonymousAuthPlugin"] == {"allow_anonymous": False}


# -- URLs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://127.0.0.1:1883", ("127.0.0.1", 1883)),
        ("mqtt://broker.local", ("broker.local", 1883)),
        ("mqtts://gateway.example", ("gateway.example", 8883)),
        ("mqtts://gateway.example:18883", ("gateway.example", 18883)),
        ("MQTT://Broker.Local:1", ("broker.local", 1)),
        ("mqtt://[::1]:18830", ("::1", 18830)),
        ("mqtt://10.0.0.2:65535/", ("10.0.0.2", 65535)),
    ],
)
def test_parse_broker_url_accepts(url: str, expected: tuple[str, int]) -> None:
    assert parse_broker_url(url) == expected


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("", "non-empty"),
        ("mqtt://host :1883", "whitespace"),
        ("http://host:1883", "mqtt:// or mqtts://"),
        ("tcp://host", "mqtt:// or mqtts://"),
        ("host:1883", "mqtt:// or mqtts://"),
        ("mqtt:host:1883", "mqtt:// or mqtts://"),
        ("mqtt://:1883", "no host"),
        ("mqtt://", "no host"),
        ("mqtt://host:0", "1 to 65535"),
        ("mqtt://host:65536", "1 to 65535"),
        ("mqtt://host:port", "1 to 65535"),
        ("mqtt://host:-1", "1 to 65535"),
        ("mqtt://host:", "port is empty"),
        ("mqtt://user:secret@host", "credentials"),
        ("mqtt://host/fedge/topic", "no path"),
        ("mqtt://host?x=1", "no path"),
    ],
)
def test_parse_broker_url_refuses(url: str, problem: str) -> None:
    with pytest.raises(BrokerError, match=problem) as info:
        parse_broker_url(url)
    assert isinstance(info.value, FedgeError)


# -- a running mosquitto ---------------------------------------------------------------------


def test_start_writes_the_conf_and_serves_mqtt(mosquitto: MosquittoBroker) -> None:
    assert mosquitto.running and mosquitto.pid is not None
    assert mosquitto.host == "127.0.0.1"
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    assert parse_broker_url(mosquitto.url) == (mosquitto.host, mosquitto.port)
    conf = mosquitto.settings.conf_path.read_text()
    assert f"listener {mosquitto.port} 127.0.0.1" in conf
    assert mqtt_ping(mosquitto.host, mosquitto.port)
    assert mqtt_ping(mosquitto.host, mosquitto.port, protocol=MQTTProtocolVersion.MQTTv311)


def test_publish_subscribe_round_trip_with_qos_1(mosquitto: MosquittoBroker, clients: list[Client]) -> None:
    subscriber = _client(clients, mosquitto).connect()
    subscriber.subscribe("fedge/test/+/update", qos=1)
    publisher = _client(clients, mosquitto).connect()
    publisher.publish("fedge/test/device-1/update", b"\x00sealed\xff", qos=1)
    publisher.publish("fedge/test/device-1/other", b"not for the subscriber", qos=1)
    publisher.publish("fedge/test/device-2/update", b"second", qos=1)
    assert subscriber.wait_for_messages(2) == [
        RecordedMessage("fedge/test/device-1/update", b"\x00sealed\xff", 1, False),
        RecordedMessage("fedge/test/device-2/update", b"second", 1, False),
    ]


def test_retained_message_survives_restart(mosquitto: MosquittoBroker, clients: list[Client]) -> None:
    publisher = _client(clients, mosquitto).connect()
    publisher.publish("fedge/test/global-model", b"round 7", qos=1, retain=True)
    publisher.disconnect()  # else paho retries during the restart and loop_stop() waits ~1 s
    clients.remove(publisher)
    port, old_pid = mosquitto.port, mosquitto.pid

    mosquitto.restart()  # SIGTERM: mosquitto writes mosquitto.db, then starts from it

    assert mosquitto.port == port and mosquitto.pid != old_pid
    assert old_pid is not None and _process_gone(old_pid)
    late = _client(clients, mosquitto).connect()
    late.subscribe("fedge/test/#", qos=1)
    assert late.wait_for_messages(1) == [RecordedMessage("fedge/test/global-model", b"round 7", 1, True)]


def test_persistent_v5_session_gets_messages_sent_while_away_and_across_a_restart(
    mosquitto: MosquittoBroker, clients: list[Client]
) -> None:
    # The device's session must be created with clean_start=False. mosquitto 2.0.11 keeps a v5
    # session created with clean_start=True (and a session expiry) across a disconnect, but
    # loses it when the broker restarts. Note paho's default clean_start is
    # MQTT_CLEAN_START_FIRST_ONLY: the first connect is clean_start=True, i.e. that case.
    device = _client(clients, mosquitto, client_id="device-7").connect(clean_start=False, session_expiry=3600)
    assert device.session_present is False
    device.subscribe("fedge/test/models/#", qos=1)
    device.disconnect()

    publisher = _client(clients, mosquitto).connect()
    publisher.publish("fedge/test/models/1", b"while away", qos=1)
    publisher.disconnect()
    clients.remove(publisher)
    mosquitto.restart()
    publisher = _client(clients, mosquitto).connect()
    publisher.publish("fedge/test/models/2", b"after the restart", qos=1)

    back = _client(clients, mosquitto, client_id="device-7").connect(clean_start=False, session_expiry=3600)
    assert back.session_present is True
    assert back.wait_for_messages(2) == [
        RecordedMessage("fedge/test/models/1", b"while away", 1, False),
        RecordedMessage("fedge/test/models/2", b"after the restart", 1, False),
    ]


def test_kill_then_restart(mosquitto: MosquittoBroker) -> None:
    pid = mosquitto.pid
    assert pid is not None
    mosquitto.kill()
    assert not mosquitto.running and mosquitto.pid is None
    assert _process_gone(pid)  # killed and reaped: no zombie
    assert not mqtt_ping(mosquitto.host, mosquitto.port, timeout=0.5)
    mosquitto.kill()  # idempotent
    mosquitto.restart()
    assert mosquitto.running and mosquitto.pid != pid
    assert mqtt_ping(mosquitto.host, mosquitto.port)


def test_stop_is_idempotent_and_leaves_no_process(tmp_path: Path) -> None:
    exe = require_mosquitto()
    broker = MosquittoBroker(BrokerSettings(data_dir=tmp_path), executable=exe)
    with pytest.raises(BrokerError, match="no port yet"):
        _ = broker.port
    broker.stop()  # never started: nothing to do
    with broker:
        pid = broker.pid
        with pytest.raises(BrokerError, match="already running"):
            broker.start()
    assert pid is not None and _process_gone(pid)
    assert not broker.running
    broker.stop()
    log = (tmp_path / "mosquitto.log").read_text()
    assert "Saving in-memory database" in log and "terminating" in log


def test_context_manager_stops_the_broker_when_the_body_fails(tmp_path: Path) -> None:
    exe = require_mosquitto()
    pid = None
    with (
        pytest.raises(RuntimeError, match="test body failed"),
        MosquittoBroker(BrokerSettings(data_dir=tmp_path), executable=exe) as broker,
    ):
        pid = broker.pid
        raise RuntimeError("test body failed")
    assert pid is not None and _process_gone(pid)


def test_two_brokers_run_side_by_side_on_different_ports(tmp_path: Path, clients: list[Client]) -> None:
    exe = require_mosquitto()
    with (
        MosquittoBroker(BrokerSettings(data_dir=tmp_path / "a"), executable=exe) as a,
        MosquittoBroker(BrokerSettings(data_dir=tmp_path / "b"), executable=exe) as b,
    ):
        assert a.port != b.port and a.pid != b.pid
        on_a = _client(clients, a).connect()
        on_a.subscribe("fedge/test/#")
        on_b = _client(clients, b).connect()
        on_b.subscribe("fedge/test/#")
        _client(clients, a).connect().publish("fedge/test/x", b"to a")
        _client(clients, b).connect().publish("fedge/test/x", b"to b")
        assert [m.payload for m in on_a.wait_for_messages(1)] == [b"to a"]
        assert [m.payload for m in on_b.wait_for_messages(1)] == [b"to b"]
        clients.clear()  # disconnect before the brokers go (paho would start reconnecting)
        for c in (on_a, on_b):
            c.disconnect()


def test_a_taken_port_fails_with_broker_error_naming_it(tmp_path: Path) -> None:
    exe = require_mosquitto()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))  # bound, not even listening: mosquitto still can't bind
        port = squatter.getsockname()[1]
        broker = MosquittoBroker(BrokerSettings(data_dir=tmp_path, port=port), executable=exe)
        with pytest.raises(BrokerError, match=rf"port {port} is already in use") as info:
            broker.start()
    assert "Address already in use" in str(info.value)  # the tail of mosquitto's log
    assert broker.pid is None and not broker.running


def test_a_broker_that_exits_early_reports_its_log(tmp_path: Path) -> None:
    exe = require_mosquitto()
    settings = BrokerSettings(data_dir=tmp_path, extra_lines=("no_such_option 1",))
    broker = MosquittoBroker(settings, executable=exe)
    with pytest.raises(BrokerError, match="exited with code") as info:
        broker.start()
    assert "no_such_option" in str(info.value)
    assert broker.pid is None


def test_free_loopback_port_is_bindable() -> None:
    port = free_loopback_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


def test_mqtt_ping_is_false_where_nothing_listens() -> None:
    assert not mqtt_ping("127.0.0.1", free_loopback_port(), timeout=0.5)


# -- the traffic recorder --------------------------------------------------------------------


def test_recorder_sees_topic_payload_qos_and_retain_of_every_message(
    mosquitto: MosquittoBroker, traffic_recorder: TrafficRecorder, clients: list[Client]
) -> None:
    publisher = _client(clients, mosquitto).connect()
    publisher.publish("fedge/a", b"q0", qos=0)
    publisher.publish("fedge/b/c", b"q1", qos=1)
    publisher.publish("fedge/b/d", b"q2 retained", qos=2, retain=True)
    messages = traffic_recorder.wait_for(lambda ms: len(ms) >= 3, what="3 messages")
    assert sorted(messages) == [
        RecordedMessage("fedge/a", b"q0", 0, False),
        RecordedMessage("fedge/b/c", b"q1", 1, False),
        RecordedMessage("fedge/b/d", b"q2 retained", 2, True),
    ]
    assert [m.topic for m in traffic_recorder.matching("fedge/b/+")] == ["fedge/b/c", "fedge/b/d"]
    traffic_recorder.clear()
    assert traffic_recorder.messages == []
    with pytest.raises(AssertionError, match=r"timed out .* 1 message\(s\) on 'nothing/#'"):
        traffic_recorder.wait_for_count("nothing/#", 1, timeout=0.2)


def test_recorder_keeps_recording_across_a_broker_restart(
    mosquitto: MosquittoBroker, clients: list[Client]
) -> None:
    with TrafficRecorder.for_broker(mosquitto) as recorder:
        mosquitto.restart()
        # Published before the recorder has reconnected: queued in its persistent session.
        publisher = _client(clients, mosquitto).connect()
        publisher.publish("fedge/after-restart", b"still seen", qos=1)
        recorded = recorder.wait_for_count("fedge/after-restart", 1)
    assert recorded == [RecordedMessage("fedge/after-restart", b"still seen", 1, False)]


# -- the amqtt fallback ----------------------------------------------------------------------


def _require_amqtt() -> None:
    if not amqtt_available():
        message = "amqtt is not installed (pip install -e '.[demo]')"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


def test_amqtt_fallback_serves_mqtt_3_1_1_only(tmp_path: Path, clients: list[Client]) -> None:
    _require_amqtt()
    with AmqttBroker(BrokerSettings(data_dir=tmp_path)) as broker:
        assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
        assert not mqtt_ping(broker.host, broker.port, timeout=1.0)  # MQTT v5 is refused
        subscriber = _client(clients, broker, protocol=MQTTProtocolVersion.MQTTv311).connect()
        subscriber.subscribe("fedge/#", qos=1)
        publisher = _client(clients, broker, protocol=MQTTProtocolVersion.MQTTv311).connect()
        publisher.publish("fedge/x", b"via amqtt", qos=1)
        assert subscriber.wait_for_messages(1) == [RecordedMessage("fedge/x", b"via amqtt", 1, False)]
        pid = broker.pid
        for c in clients:
            c.disconnect()
        clients.clear()
    assert pid is not None and _process_gone(pid)


def test_amqtt_fallback_reports_a_taken_port(tmp_path: Path) -> None:
    _require_amqtt()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        port = squatter.getsockname()[1]
        broker = AmqttBroker(BrokerSettings(data_dir=tmp_path, port=port))
        with pytest.raises(BrokerError, match=rf"port {port} is already in use"):
            broker.start()
    assert broker.pid is None


def test_local_broker_prefers_mosquitto_and_falls_back_to_amqtt_with_a_notice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    require_mosquitto()
    settings = BrokerSettings(data_dir=tmp_path)
    assert isinstance(local_broker(settings), MosquittoBroker)

    # A machine without mosquitto: an empty PATH and no /usr/sbin/mosquitto.
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(broker_module, "MOSQUITTO_FALLBACK_PATH", tmp_path / "mosquitto")
    assert broker_module.find_mosquitto() is None
    with pytest.raises(BrokerError, match="mosquitto is not installed"):
        local_broker(settings, allow_fallback=False)
    if amqtt_available():
        with caplog.at_level(logging.WARNING, logger="fedge.lab.broker"):
            assert isinstance(local_broker(settings), AmqttBroker)
        assert "using the embedded amqtt broker" in caplog.text
    with pytest.raises(BrokerError, match="mosquitto is not installed"):
        MosquittoBroker(settings).start()
    assert not os.listdir(tmp_path)  # refused before writing anything
