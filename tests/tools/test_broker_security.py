"""``fedge broker config`` against a real Mosquitto: authentication, TLS and the ACL, proven.

Every broker here runs the generated ``mosquitto.conf`` unchanged (``ConfiguredMosquitto``) on a
free loopback port, with the lab CA and the generated passwords or client certificates; the
clients are paho 2.x, configured from the generated ``credentials/*.txt`` files the way agents
and the aggregator will be. No mocks; every wait is bounded.

What "denied" looks like with mosquitto 2.0.11 (checked here, see docs/broker-security.md):

- CONNECT without or with wrong credentials: CONNACK 0x87 "Not authorized" (MQTT 5) or return
  code 5 (MQTT 3.1.1); never 0x86 "Bad user name or password".
- PUBLISH to a topic the ACL does not grant: dropped; an MQTT 5 client gets PUBACK 0x87, an
  MQTT 3.1.1 client a plain PUBACK (it cannot tell).
- SUBSCRIBE is always granted (SUBACK "Granted QoS 1"); the ACL filters what is *delivered*.
- A Last Will on a topic the client may not write is accepted at CONNECT and dropped when
  it would fire.

"Never delivered" is proven without sleeping: after the forbidden message, an allowed one (a
sentinel) goes the same way; mosquitto handles one client's packets in order, so once the
sentinel has arrived, the forbidden message would have arrived before it.
"""

from __future__ import annotations

import argparse
import base64
import grp
import json
import logging
import os
import pwd
import re
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fedge.lab.broker import ConfiguredMosquitto, free_loopback_port
from fedge.protocol.errors import FedgeError
from fedge.protocol.topics import FleetTopics
from fedge.tools.broker_config import (
    PACKET_HEADROOM,
    BrokerConfigError,
    BrokerConfigRequest,
    BrokerConfigResult,
    BrokerLimits,
    FleetAccess,
    ListenerConf,
    TlsFiles,
    _OpenSSL,
    add_broker_parser,
    hash_password,
    render_acl,
    render_conf,
    verify_password,
    write_broker_config,
)
from support.mqtt_fixtures import require_mosquitto
from support.source_tree import PYTHONPATH as SOURCE_PYTHONPATH

WAIT_S = 10.0  # upper bound of every wait; a passing test never comes close
FLEET = "f1"
T = FleetTopics(FLEET)
AGG = "agg"
BMS = "bms-1"
EDGEX = "edgex-core"
DEV_A, DEV_B = "dev-a", "dev-b"
V5, V311 = MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311
NOT_AUTHORIZED = 0x87
BLOB = T.blob("ab" * 32)


def access() -> FleetAccess:
    return FleetAccess(
        fleet=FLEET, devices=(DEV_B, DEV_A), aggregator=AGG, bms=(BMS,), edgex_services=(EDGEX,)
    )


def request(tmp: Path, **changes: Any) -> BrokerConfigRequest:
    """A request for a broker on a free loopback port, its files and persistence in ``tmp``."""
    data_dir = tmp / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    values: dict[str, Any] = {
        "access": access(),
        "out_dir": tmp / "broker",
        "tls": "lab",
        "port": free_loopback_port(),
        "bind": "127.0.0.1",
        "data_dir": data_dir,
        # Started as root, mosquitto would drop to the 'mosquitto' user, which cannot read our 0600 files.
        "run_as": "root" if os.geteuid() == 0 else None,
        "limits": BrokerLimits.for_fleet(2, 50_000),
    }
    values.update(changes)
    return BrokerConfigRequest(**values)


# --- a broker running the generated configuration, and clients configured from credentials -------


class Peer:
    """A paho 2.x client that records CONNACK, SUBACKs, PUBACKs and messages; waits are bounded."""

    def __init__(
        self,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        ca: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        tls: bool = True,
        protocol: MQTTProtocolVersion = V5,
        will: str | None = None,
        client_id: str | None = None,
        session_expiry_s: int | None = None,
    ) -> None:
        self.port = port
        self.protocol = protocol
        self.session_expiry_s = session_expiry_s
        self.connack: ReasonCode | None = None
        self.session_present: bool | None = None
        self.closed = False
        self.disconnect_reason: ReasonCode | None = None
        self.messages: list[tuple[str, bytes]] = []
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._pubacks: dict[int, ReasonCode] = {}
        self._cond = threading.Condition()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id if client_id is not None else f"t-{uuid.uuid4().hex[:10]}",
            protocol=protocol,
            reconnect_on_failure=False,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls:
            self.client.tls_set(
                ca_certs=None if ca is None else str(ca),
                certfile=None if cert is None else str(cert),
                keyfile=None if key is None else str(key),
            )
        if will is not None:
            self.client.will_set(will, b'{"state": "offline"}', qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message

    def connect(self, clean_start: bool = True) -> ReasonCode | None:
        """Connects; returns the CONNACK's reason code, or None if the broker closed first.

        With ``session_expiry_s`` the session outlives the connection (MQTT 5), as the
        aggregator's and the agents' do; ``clean_start=False`` resumes it."""
        properties = None
        if self.session_expiry_s is not None:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self.session_expiry_s
        if self.protocol == V5:
            self.client.connect(
                "127.0.0.1", self.port, keepalive=30, clean_start=clean_start, properties=properties
            )
        else:
            self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        self._wait(lambda: self.connack is not None or self.closed, "CONNACK")
        return self.connack

    def connected(self, clean_start: bool = True) -> Peer:
        rc = self.connect(clean_start)
        assert rc is not None and not rc.is_failure, f"CONNACK {rc}"
        return self

    def reconnect(self, clean_start: bool = False) -> Peer:
        """Connects again after :meth:`close`, by default resuming the session."""
        with self._cond:
            self.connack, self.session_present, self.closed = None, None, False
        return self.connected(clean_start)

    def subscribe(self, *filters: str) -> list[ReasonCode]:
        _, mid = self.client.subscribe([(f, 1) for f in filters])
        assert mid is not None
        self._wait(lambda: mid in self._subacks, f"SUBACK for {filters}")
        return self._subacks[mid]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> ReasonCode:
        """QoS 1 publish; returns the PUBACK's reason code."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        self._wait(lambda: info.mid in self._pubacks, f"PUBACK for {topic}")
        return self._pubacks[info.mid]

    def send(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """QoS 1 publish that the broker must accept (PUBACK success or "No matching subscribers")."""
        rc = self.publish(topic, payload, retain)
        assert not rc.is_failure, f"PUBACK {rc} for {topic}"

    def wait_for(self, topic: str, payload: bytes) -> None:
        self._wait(lambda: (topic, payload) in self.messages, f"{payload!r} on {topic}")

    def wait_for_or_closed(self, topic: str, payload: bytes) -> None:
        """Until ``payload`` arrives on ``topic`` or the broker closes the connection."""
        self._wait(lambda: (topic, payload) in self.messages or self.closed, f"{payload!r} on {topic}")

    def got(self, payload: bytes) -> list[str]:
        """The topics ``payload`` arrived on."""
        with self._cond:
            return [t for t, p in self.messages if p == payload]

    def disconnect_with_will(self) -> None:
        """MQTT 5 DISCONNECT 0x04: the broker publishes the Will as if the link had died."""
        self.client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message"))
        self._wait(lambda: self.closed, "the broker to close the connection")
        self.client.loop_stop()

    def close(self) -> None:
        if self.client.is_connected():
            self.client.disconnect()
        self.client.loop_stop()

    def _wait(self, condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not condition():
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"timed out after {timeout} s waiting for {what}"
                self._cond.wait(min(0.05, remaining))

    def last_json(self, topic: str) -> dict[str, Any]:
        """The newest JSON object received on ``topic`` ({} before any)."""
        with self._cond:
            payloads = [p for t, p in self.messages if t == topic and p]
        return json.loads(payloads[-1]) if payloads else {}

    def _on_connect(self, c: mqtt.Client, u: object, f: mqtt.ConnectFlags, rc: ReasonCode, p: Any) -> None:
        with self._cond:
            self.connack = rc
            self.session_present = f.session_present
            self._cond.notify_all()

    def _on_disconnect(self, c: mqtt.Client, u: object, f: Any, rc: ReasonCode, p: Any) -> None:
        with self._cond:
            self.closed = True
            self.disconnect_reason = rc
            self._cond.notify_all()

    def _on_subscribe(self, c: mqtt.Client, u: object, mid: int, rcs: list[ReasonCode], p: Any) -> None:
        with self._cond:
            self._subacks[mid] = rcs
            self._cond.notify_all()

    def _on_publish(self, c: mqtt.Client, u: object, mid: int, rc: ReasonCode, p: Any) -> None:
        with self._cond:
            self._pubacks[mid] = rc
            self._cond.notify_all()

    def _on_message(self, c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self._cond.notify_all()


@dataclass
class Deployment:
    """A generated configuration directory and the broker running it."""

    result: BrokerConfigResult
    broker: ConfiguredMosquitto
    peers: list[Peer]

    @property
    def out(self) -> Path:
        return self.result.out_dir

    def credentials(self, name: str) -> dict[str, Any]:
        with (self.out / "credentials" / f"{name}.txt").open("rb") as f:
            return tomllib.load(f)

    def peer(self, name: str, **kwargs: Any) -> Peer:
        """A client configured only from ``credentials/<name>.txt``, as an agent would be."""
        creds = self.credentials(name)
        base = self.out / "credentials"
        assert creds["broker"] == f"mqtts://localhost:{self.broker.port}"
        options: dict[str, Any] = {"ca": base / creds["ca_file"]}
        if "cert_file" in creds:
            options.update(cert=base / creds["cert_file"], key=base / creds["key_file"])
        else:
            options.update(username=creds["username"], password=creds["password"])
        options.update(kwargs)
        return self.new_peer(**options)

    def new_peer(self, **kwargs: Any) -> Peer:
        peer = Peer(self.broker.port, **kwargs)
        self.peers.append(peer)
        return peer

    def close_peers(self) -> None:
        for peer in self.peers:
            peer.close()
        self.peers.clear()


def listening_ports(d: Deployment) -> set[int]:
    """The ports the running broker says it opened (its log, mosquitto.out)."""
    log = d.broker.output_path.read_text()
    return {int(port) for port in re.findall(r"Opening ipv[46] listen socket on port (\d+)\.", log)}


def client_context(creds_dir: Path, name: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(creds_dir / "ca.crt"))
    if name is not None:
        context.load_cert_chain(creds_dir / f"{name}.crt", creds_dir / f"{name}.key")
    return context


def deploy(tmp: Path, **changes: Any) -> Iterator[Deployment]:
    """Generates a configuration, starts mosquitto with it, and always stops it again."""
    exe = require_mosquitto()
    result = write_broker_config(request(tmp, **changes))
    creds = result.out_dir / "credentials"
    probe_identity = AGG if result.auth == "client-cert" else None
    broker = ConfiguredMosquitto(
        result.out_dir / "mosquitto.conf",
        port=result.port,
        work_dir=tmp / "run",
        tls_context=client_context(creds, probe_identity) if result.tls != "none" else None,
        executable=exe,
    )
    deployment = Deployment(result, broker, [])
    with broker:
        try:
            yield deployment
        finally:
            deployment.close_peers()


@pytest.fixture(scope="module")
def passwords(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """TLS with the lab CA, password authentication: one broker for the module."""
    yield from deploy(tmp_path_factory.mktemp("passwords"))


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """TLS with the lab CA, client certificates (CN = username): one broker for the module."""
    yield from deploy(tmp_path_factory.mktemp("certificates"), client_certs=True)


@pytest.fixture
def pw(passwords: Deployment) -> Iterator[Deployment]:
    """The password broker; the test's clients are disconnected when it ends."""
    yield passwords
    passwords.close_peers()


@pytest.fixture
def certs(certificates: Deployment) -> Iterator[Deployment]:
    yield certificates
    certificates.close_peers()


def token(what: str) -> bytes:
    return f"{what}-{uuid.uuid4().hex[:8]}".encode()


def aggregator_listening(d: Deployment, **kwargs: Any) -> Peer:
    agg = d.peer(AGG, **kwargs).connected()
    assert not any(rc.is_failure for rc in agg.subscribe(T.update_filter, T.status_filter))
    return agg


# --- authentication and TLS ---------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [V5, V311], ids=["mqtt5", "mqtt311"])
def test_anonymous_client_is_refused(pw: Deployment, protocol: MQTTProtocolVersion) -> None:
    rc = pw.new_peer(ca=pw.out / "credentials" / "ca.crt", protocol=protocol).connect()
    assert rc is not None and rc.is_failure
    assert rc.value == NOT_AUTHORIZED, rc  # 2.0.11: "Not authorized" (v3.1.1: return code 5)


@pytest.mark.parametrize("protocol", [V5, V311], ids=["mqtt5", "mqtt311"])
def test_wrong_password_and_unknown_user_are_refused(pw: Deployment, protocol: MQTTProtocolVersion) -> None:
    good = pw.credentials(DEV_A)["password"]
    for username, password in ((DEV_A, good[:-1] + ("A" if good[-1] != "A" else "B")), ("nobody", good)):
        rc = pw.peer(DEV_A, username=username, password=password, protocol=protocol).connect()
        assert rc is not None and rc.is_failure, (username, rc)
        assert rc.value in (0x86, NOT_AUTHORIZED), rc  # 2.0.11 sends 0x87, never 0x86
    assert pw.peer(DEV_A, protocol=protocol).connect() == 0


def test_tls_connects_only_with_the_lab_ca(pw: Deployment) -> None:
    # The system's CAs do not know the lab CA: the handshake fails before any MQTT.
    no_ca = pw.peer(DEV_A, ca=None)
    with pytest.raises(ssl.SSLCertVerificationError):
        no_ca.connect()
    # Plain MQTT on the TLS port: mosquitto never answers it with a CONNACK.
    plain = pw.peer(DEV_A, tls=False)
    rc = plain.connect()
    assert rc is None and plain.closed
    # There is no plain listener on 1883 on our behalf either: the conf has exactly one listener,
    # and the broker opened only that one (a listener option above it would open 1883 too).
    assert (pw.out / "mosquitto.conf").read_text().count("\nlistener ") == 1
    assert listening_ports(pw) == {pw.broker.port}


def test_the_server_certificate_names_the_hostnames(pw: Deployment) -> None:
    with socket.create_connection(("127.0.0.1", pw.broker.port), timeout=WAIT_S) as raw:
        context = client_context(pw.out / "credentials", None)
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            cert = tls.getpeercert()
    assert cert is not None
    names = {value for _kind, value in cert["subjectAltName"]}
    assert names == {"localhost", "127.0.0.1"}


# --- the ACL -------------------------------------------------------------------------------------


def test_device_cannot_publish_as_another_device_or_the_aggregator(pw: Deployment) -> None:
    agg = aggregator_listening(pw)
    bms = pw.peer(BMS).connected()
    bms.subscribe(T.status_filter, T.aggregator_status, f"{T.base}/insight/#")
    device = pw.peer(DEV_A).connected()
    forged = token("forged")
    for topic, retain in (
        (T.update(DEV_B), False),
        (T.status(DEV_B), True),
        (T.manifest, True),
        (BLOB, True),
        (T.aggregator_status, True),
        (T.insight(DEV_B), True),
        ("edgex/events/device/svc/prof/dev-b/src", False),
    ):
        rc = device.publish(topic, forged, retain=retain)
        assert rc.value == NOT_AUTHORIZED, (topic, rc)  # MQTT 5: PUBACK 0x87 Not authorized
    sentinel = token("own")
    device.send(T.update(DEV_A), sentinel)
    device.send(T.status(DEV_A), sentinel, retain=True)
    device.send(T.insight(DEV_A), sentinel, retain=True)  # its own predictions
    agg.wait_for(T.update(DEV_A), sentinel)
    agg.wait_for(T.status(DEV_A), sentinel)
    bms.wait_for(T.status(DEV_A), sentinel)
    bms.wait_for(T.insight(DEV_A), sentinel)
    assert agg.got(forged) == [] and bms.got(forged) == []
    # Nothing forged was retained either: a newcomer sees only dev-a's own status.
    late = pw.peer(AGG).connected()
    late.subscribe(f"{T.base}/#")
    late.wait_for(T.status(DEV_A), sentinel)
    assert late.got(forged) == []


def test_mqtt311_device_gets_a_plain_puback_but_the_message_is_dropped(pw: Deployment) -> None:
    agg = aggregator_listening(pw)
    device = pw.peer(DEV_A, protocol=V311).connected()
    forged, sentinel = token("forged"), token("own")
    assert device.publish(T.update(DEV_B), forged) == 0  # MQTT 3.1.1 has no way to say no
    device.send(T.update(DEV_A), sentinel)
    agg.wait_for(T.update(DEV_A), sentinel)
    assert agg.got(forged) == []


def test_device_cannot_read_another_devices_updates_or_statuses(pw: Deployment) -> None:
    spy = pw.peer(DEV_A).connected()
    # mosquitto 2.0 grants every subscription; the ACL is applied to each delivery.
    for rc in spy.subscribe(T.update_filter, T.update(DEV_B), T.status_filter, f"{T.base}/#", "#"):
        assert not rc.is_failure, rc
    victim = pw.peer(DEV_B).connected()
    secret = token("secret")
    victim.send(T.update(DEV_B), secret)
    victim.send(T.status(DEV_B), secret, retain=True)
    sentinel = token("manifest")
    pw.peer(AGG).connected().send(T.manifest, sentinel, retain=True)
    spy.wait_for(T.manifest, sentinel)
    assert spy.got(secret) == []
    # The aggregator, on the other hand, got both.
    agg = aggregator_listening(pw)  # retained status arrives on subscribe
    agg.wait_for(T.status(DEV_B), secret)


def test_device_reads_manifest_and_blobs_and_writes_its_own_topics(pw: Deployment) -> None:
    agg = aggregator_listening(pw)
    manifest, blob = token("manifest"), token("blob")
    agg.send(BLOB, blob, retain=True)
    agg.send(T.manifest, manifest, retain=True)
    device = pw.peer(DEV_B).connected()
    device.subscribe(T.manifest, T.blob_filter)
    device.wait_for(T.manifest, manifest)
    device.wait_for(BLOB, blob)
    update, status = token("update"), token("status")
    device.send(T.update(DEV_B), update)
    device.send(T.status(DEV_B), status, retain=True)
    agg.wait_for(T.update(DEV_B), update)
    agg.wait_for(T.status(DEV_B), status)


def test_aggregator_publishes_the_model_but_cannot_speak_for_devices(pw: Deployment) -> None:
    agg = aggregator_listening(pw)
    for topic in (T.manifest, BLOB, T.aggregator_status):
        agg.send(topic, token("ok"), retain=True)
    forged = token("forged")
    for topic in (T.update(DEV_A), T.status(DEV_A), f"{T.base}/insight/x", "edgex/events/device/s/p/dev-a/r"):
        assert agg.publish(topic, forged).value == NOT_AUTHORIZED, topic
    sentinel = token("own")
    device = pw.peer(DEV_A).connected()
    device.send(T.update(DEV_A), sentinel)
    agg.wait_for(T.update(DEV_A), sentinel)
    assert agg.got(forged) == []


def test_bms_reads_statuses_but_publishes_nothing(pw: Deployment) -> None:
    bms = pw.peer(BMS).connected()
    bms.subscribe(T.status_filter, T.aggregator_status, f"{T.base}/insight/#", T.update_filter, T.manifest)
    forged = token("bms")
    for topic in (
        T.status(BMS),
        T.status(DEV_A),
        T.update(BMS),
        T.update(DEV_A),
        T.aggregator_status,
        T.manifest,
        BLOB,
        f"{T.base}/insight/room-1",
        "edgex/events/device/s/p/dev-a/r",
    ):
        assert bms.publish(topic, forged, retain=True).value == NOT_AUTHORIZED, topic
    status, agg_status, update = token("status"), token("agg-status"), token("update")
    device = pw.peer(DEV_A).connected()
    device.send(T.update(DEV_A), update)
    device.send(T.status(DEV_A), status, retain=True)
    pw.peer(AGG).connected().send(T.aggregator_status, agg_status, retain=True)
    bms.wait_for(T.status(DEV_A), status)
    bms.wait_for(T.aggregator_status, agg_status)
    assert bms.got(forged) == [] and bms.got(update) == []  # not the (sealed) updates either


def test_last_will_fires_on_the_devices_own_status_only(pw: Deployment) -> None:
    agg = aggregator_listening(pw)
    # 2.0.11 accepts a Will on a forbidden topic at CONNECT and drops it when it fires.
    liar = pw.peer(DEV_A, will=T.status(DEV_B)).connected()
    liar.disconnect_with_will()
    honest = pw.peer(DEV_A, will=T.status(DEV_A)).connected()
    honest.disconnect_with_will()
    agg.wait_for(T.status(DEV_A), b'{"state": "offline"}')
    assert T.status(DEV_B) not in agg.got(b'{"state": "offline"}')


def test_edgex_readings_reach_only_their_devices_edgex_principal(pw: Deployment) -> None:
    edgex = pw.peer(EDGEX).connected()
    reader = pw.peer(f"{DEV_A}.edgex").connected()
    device = pw.peer(DEV_A).connected()
    # What the agent's EdgeX connection does: the whole event tree; the ACL narrows it.
    reader.subscribe("edgex/events/#")
    device.subscribe("edgex/events/#", T.manifest)
    other, own = token("reading-b"), token("reading-a")
    edgex.send(f"edgex/events/device/device-virtual/Wearable-IMU/{DEV_B}/imu", other)
    edgex.send(f"edgex/events/core/device-virtual/Wearable-IMU/{DEV_B}/imu", other)
    edgex.send(f"edgex/events/device/device-virtual/Wearable-IMU/{DEV_A}/imu", own)
    edgex.send(f"edgex/events/core/device-virtual/Wearable-IMU/{DEV_A}/imu", own)
    reader.wait_for(f"edgex/events/core/device-virtual/Wearable-IMU/{DEV_A}/imu", own)
    assert len(reader.got(own)) == 2 and reader.got(other) == []
    # The device's own principal reads no EdgeX topic any more (least privilege): the manifest
    # that follows the readings arrives, the readings never do.
    sentinel = token("manifest")
    pw.peer(AGG).connected().send(T.manifest, sentinel)
    device.wait_for(T.manifest, sentinel)
    assert device.got(own) == [] and device.got(other) == []
    # The EdgeX service cannot touch the fleet's topics.
    assert edgex.publish(T.update(DEV_A), token("x")).value == NOT_AUTHORIZED


def test_the_edgex_principal_reads_its_devices_edgex_topics_and_nothing_of_fedge(pw: Deployment) -> None:
    reader = pw.peer(f"{DEV_A}.edgex").connected()
    reader.subscribe("#")  # everything it may be given, retained messages included
    agg = pw.peer(AGG).connected()
    for topic in (T.manifest, BLOB, T.aggregator_status, T.rotation(1)):
        agg.send(topic, token("fleet"), retain=True)
    device_b = pw.peer(DEV_B).connected()
    device_b.send(T.update(DEV_B), token("fleet"))
    device_b.send(T.status(DEV_B), token("fleet"), retain=True)
    edgex = pw.peer(EDGEX).connected()
    for topic in (
        f"edgex/events/device/svc/prof/{DEV_B}/imu",
        f"edgex/events/core/svc/prof/{DEV_B}/imu",
        "edgex/core-command/request/x",
        f"edgex/events/other/svc/prof/{DEV_A}/imu",
    ):
        edgex.send(topic, token("not-for-a"))
    own = token("own")
    edgex.send(f"edgex/events/core/svc/prof/{DEV_A}/imu", own)
    reader.wait_for(f"edgex/events/core/svc/prof/{DEV_A}/imu", own)
    assert [t for t, _ in reader.messages] == [f"edgex/events/core/svc/prof/{DEV_A}/imu"]
    # It publishes nothing: not as its device, not on the bus.
    for topic in (T.update(DEV_A), T.status(DEV_A), f"edgex/events/device/svc/prof/{DEV_A}/imu"):
        assert reader.publish(topic, token("forged")).value == NOT_AUTHORIZED, topic


def test_acl_reload_revokes_a_connected_device_at_once(tmp_path: Path) -> None:
    """Revoking = regenerating + SIGHUP: the reloaded ACL applies to connected clients too."""
    deployments = deploy(tmp_path)
    d = next(deployments)
    try:
        device = d.peer(DEV_B).connected()
        device.send(T.update(DEV_B), b"before")
        without_b = FleetAccess(
            fleet=FLEET, devices=(DEV_A,), aggregator=AGG, bms=(BMS,), edgex_services=(EDGEX,)
        )
        (d.out / "acl").write_text(render_acl(without_b))
        assert d.broker.pid is not None
        os.kill(d.broker.pid, signal.SIGHUP)
        deadline = time.monotonic() + WAIT_S
        while device.publish(T.update(DEV_B), b"after").value != NOT_AUTHORIZED:
            assert time.monotonic() < deadline, "the reloaded ACL never applied to the connected device"
            time.sleep(0.05)
        assert device.client.is_connected()  # still connected, but can no longer do anything
    finally:
        deployments.close()


# --- sessions: no principal can take over another's -----------------------------------------------

# The client ids the services use by default (aggregator/config.py, agent/config.py): predictable.
AGG_CLIENT_ID = f"fedge-aggregator-{FLEET}"
SESSION_S = 3600


@pytest.fixture(params=["passwords", "certificates"])
def either(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    """Each module broker in turn: password and client-certificate authentication."""
    d: Deployment = request.getfixturevalue(request.param)
    yield d
    d.close_peers()


def test_a_device_cannot_disconnect_the_aggregator_with_its_client_id(either: Deployment) -> None:
    agg = either.peer(AGG, client_id=AGG_CLIENT_ID, session_expiry_s=SESSION_S).connected()
    agg.subscribe(T.update_filter)
    attacker = either.peer(DEV_B, client_id=AGG_CLIENT_ID).connected()
    # Without use_username_as_clientid the broker has now closed the aggregator's connection
    # ("Session taken over"); with it, the attacker merely connected as DEV_B.
    sentinel = token("after-attack")
    either.peer(DEV_A).connected().send(T.update(DEV_A), sentinel)
    agg.wait_for_or_closed(T.update(DEV_A), sentinel)
    assert not agg.closed, f"the aggregator was disconnected: {agg.disconnect_reason}"
    assert agg.got(sentinel) == [T.update(DEV_A)]
    assert attacker.client.is_connected()  # the attacker is connected, as itself


def test_updates_queued_for_the_offline_aggregator_survive_a_takeover_attempt(either: Deployment) -> None:
    agg = either.peer(AGG, client_id=AGG_CLIENT_ID, session_expiry_s=SESSION_S).connected()
    agg.subscribe(T.update_filter)
    agg.close()  # offline; its session (and subscription) stays on the broker
    queued = token("queued")
    rc = either.peer(DEV_A).connected().publish(T.update(DEV_A), queued)
    assert rc == 0, rc  # not 0x10 "No matching subscribers": queued in the aggregator's session
    # The attack: DEV_B connects with the aggregator's client id and a clean start, which would
    # take the aggregator's session over and discard it with the queued update.
    either.peer(DEV_B, client_id=AGG_CLIENT_ID, session_expiry_s=0).connected(clean_start=True)
    agg.reconnect(clean_start=False)
    assert agg.session_present
    agg.wait_for(T.update(DEV_A), queued)


def test_a_device_cannot_take_over_another_devices_session(either: Deployment) -> None:
    victim = either.peer(DEV_A, client_id=f"fedge-agent-{DEV_A}", session_expiry_s=SESSION_S).connected()
    victim.subscribe(T.manifest)
    attacker = either.peer(DEV_B, client_id=f"fedge-agent-{DEV_A}").connected()
    agg = either.peer(AGG).connected()
    online = token("manifest-online")
    agg.send(T.manifest, online)
    victim.wait_for_or_closed(T.manifest, online)
    assert not victim.closed, f"the device was disconnected: {victim.disconnect_reason}"
    assert attacker.client.is_connected()
    # Offline, the victim's session keeps what the aggregator publishes, attack or not.
    victim.close()
    offline = token("manifest-offline")
    assert agg.publish(T.manifest, offline) == 0
    either.peer(DEV_B, client_id=f"fedge-agent-{DEV_A}", session_expiry_s=0).connected(clean_start=True)
    victim.reconnect(clean_start=False)
    victim.wait_for(T.manifest, offline)


def test_max_queued_bytes_bounds_an_offline_sessions_queue(tmp_path: Path) -> None:
    """A device flooding an offline aggregator makes the broker hold at most max_queued_bytes
    for it (mosquitto queues a message while the queue is below the limit), not
    max_queued_messages x max_packet_size."""
    limit, size, sent = 10_000, 1_000, 40
    deployments = deploy(tmp_path, limits=BrokerLimits.for_fleet(2, 50_000, max_queued_bytes=limit))
    d = next(deployments)
    try:
        assert f"\nmax_queued_bytes {limit}\n" in (d.out / "mosquitto.conf").read_text()
        agg = d.peer(AGG, session_expiry_s=SESSION_S).connected()
        agg.subscribe(T.update_filter)
        agg.close()
        device = d.peer(DEV_A).connected()
        flood = [f"{i:04d}".encode() * (size // 4) for i in range(sent)]
        for payload in flood:
            device.publish(T.update(DEV_A), payload)  # PUBACKed whether queued or dropped
        agg.reconnect(clean_start=False)
        sentinel = token("sentinel")
        device.send(T.update(DEV_A), sentinel)
        agg.wait_for(T.update(DEV_A), sentinel)
        delivered = [p for _, p in agg.messages if p in flood]
        assert delivered == flood[: len(delivered)]  # the oldest were kept, in order
        assert len(delivered) == limit // size  # queued while the queue held < limit bytes
    finally:
        deployments.close()


def test_a_provisioned_agent_reads_edgex_through_its_own_principal(tmp_path: Path) -> None:
    """The whole chain with the generated config: create_fleet gives the agent the device's and
    the device's EdgeX principal's credentials (as fedge demo does), a real `fedge agent run`
    connects twice - as watch-01 and as watch-01.edgex - and stores the readings an EdgeX
    service publishes; neither connection knocks the other off."""
    from fedge.lab.edgex_simulate import SimulateOptions, simulate
    from fedge.lab.provision import create_fleet

    device, agent_wait_s = "watch-01", 120.0  # an agent starting on a loaded 2-core machine
    fleet_access = FleetAccess(fleet=FLEET, devices=(device,), aggregator=AGG, edgex_services=(EDGEX,))
    deployments = deploy(tmp_path, access=fleet_access)
    d = next(deployments)
    ca = str(d.out / "credentials" / "ca.crt")

    def creds(name: str) -> dict[str, object]:
        return {"username": name, "password": d.credentials(name)["password"]}

    repo = Path(__file__).resolve().parents[2]
    profile = str(repo / "edgex_profiles" / "wearable-imu.yaml")
    fleet = create_fleet(
        tmp_path / "fleet", FLEET, tmp_path / "model", d.credentials(device)["broker"], {device: 1},
        {"rounds": 1}, edgex={"prefix": "edgex", "profile": profile},
        task_file=repo / "tasks" / "har-watch.toml", mqtt_extra={device: {**creds(device), "ca_file": ca}},
        edgex_extra={device: creds(f"{device}.edgex")},
    )  # fmt: skip
    config = fleet.agent_configs[device]
    assert mode(config) == 0o600  # it holds two passwords
    agg = d.peer(AGG).connected()
    agg.subscribe(T.status_filter)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGE_")}
    env["PYTHONPATH"] = SOURCE_PYTHONPATH
    with (tmp_path / "agent.log").open("wb") as log:
        agent = subprocess.Popen(
            [sys.executable, "-m", "fedge.cli", "agent", "run", "--config", str(config)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:

        def data() -> dict[str, Any]:
            report = agg.last_json(T.status(device)).get("data")
            return report if isinstance(report, dict) else {}

        agg._wait(lambda: data().get("bus_connected") is True, "the agent's EdgeX connection", agent_wait_s)
        simulate(
            SimulateOptions(
                broker_url=d.credentials(EDGEX)["broker"],
                subjects=(1,),
                max_rows=400,
                username=EDGEX,
                password=d.credentials(EDGEX)["password"],
                ca_file=ca,
            )
        )
        agg._wait(lambda: data().get("stored_samples", 0) > 0, "samples from EdgeX", agent_wait_s)
        assert agent.poll() is None
        # The two connections coexist: the broker never closed one for the other's sake.
        assert "already connected" not in d.broker.output_path.read_text()
        assert data()["bus_connected"] is True
    finally:
        agent.terminate()
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(timeout=30)
        deployments.close()


# --- client certificates --------------------------------------------------------------------------


def test_client_certificate_cn_is_the_username(certs: Deployment) -> None:
    assert "password" not in certs.credentials(DEV_A)
    assert not (certs.out / "passwd").exists()
    agg = aggregator_listening(certs)
    device = certs.peer(DEV_A).connected()
    own, forged = token("own"), token("forged")
    assert device.publish(T.update(DEV_B), forged).value == NOT_AUTHORIZED
    device.send(T.update(DEV_A), own)
    agg.wait_for(T.update(DEV_A), own)
    # A username in CONNECT changes nothing: the certificate says who the client is.
    claims_b = certs.peer(DEV_A, username=DEV_B, password="x").connected()
    assert claims_b.publish(T.update(DEV_B), forged).value == NOT_AUTHORIZED
    claims_b.send(T.update(DEV_A), own + b"2")
    agg.wait_for(T.update(DEV_A), own + b"2")
    assert agg.got(forged) == []


def test_client_certificate_is_required(certs: Deployment) -> None:
    creds = certs.out / "credentials"
    no_cert = certs.new_peer(ca=creds / "ca.crt", username=DEV_A, password="x")
    try:
        rc = no_cert.connect()
    except (ssl.SSLError, ConnectionError):
        return  # TLS 1.2: the handshake fails
    assert rc is None and no_cert.closed  # TLS 1.3: the server's alert arrives after the handshake


def test_a_certificate_the_acl_does_not_name_gets_nothing(certs: Deployment, tmp_path: Path) -> None:
    # Any certificate the CA signs authenticates; without an ACL block it can do nothing.
    ca = (certs.out / "certs" / "ca.crt", certs.out / "certs" / "ca.key")
    _OpenSSL(tmp_path).leaf(ca, tmp_path / "intruder.key", tmp_path / "intruder.crt", "intruder", days=1)
    intruder = certs.new_peer(
        ca=certs.out / "credentials" / "ca.crt", cert=tmp_path / "intruder.crt", key=tmp_path / "intruder.key"
    ).connected()
    intruder.subscribe("#")
    forged = token("intruder")
    for topic in (T.update("intruder"), T.status("intruder"), T.update(DEV_A), T.manifest):
        assert intruder.publish(topic, forged).value == NOT_AUTHORIZED, topic
    sentinel = token("manifest")
    agg = aggregator_listening(certs)
    agg.send(T.manifest, sentinel, retain=True)
    device = certs.peer(DEV_A).connected()
    device.subscribe(T.manifest)
    device.wait_for(T.manifest, sentinel)  # delivered to the device, so it was routed...
    assert intruder.messages == []  # ...but never to the intruder


# --- the insecure mode, and real certificate files -------------------------------------------------


def test_no_tls_is_explicit_and_still_authenticates(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fedge.tools.broker_config"):
        deployments = deploy(tmp_path, tls="none")
        d = next(deployments)
    try:
        assert any("WITHOUT TLS" in r.message for r in caplog.records)
        conf = (d.out / "mosquitto.conf").read_text()
        assert "INSECURE" in conf and "cafile" not in conf and not (d.out / "certs").exists()
        creds = d.credentials(DEV_A)
        assert creds["broker"].startswith("mqtt://") and "ca_file" not in creds
        assert d.result.to_dict()["warnings"]
        assert d.new_peer(tls=False).connect() == NOT_AUTHORIZED
        assert listening_ports(d) == {d.broker.port}
        device = d.new_peer(tls=False, username=DEV_A, password=creds["password"]).connected()
        assert device.publish(T.update(DEV_B), b"x").value == NOT_AUTHORIZED
    finally:
        deployments.close()


def test_real_certificate_files_are_used_where_they_are(tmp_path: Path) -> None:
    pki = write_broker_config(request(tmp_path / "pki"))  # stands in for a real PKI's files
    files = TlsFiles(
        ca=pki.out_dir / "certs" / "ca.crt",
        cert=pki.out_dir / "certs" / "server.crt",
        key=pki.out_dir / "certs" / "server.key",
    )
    deployments = deploy(tmp_path / "real", tls="files", tls_files=files)
    d = next(deployments)
    try:
        conf = (d.out / "mosquitto.conf").read_text()
        assert f"certfile {files.cert}" in conf and f"keyfile {files.key}" in conf
        assert not (d.out / "certs").exists()
        assert (d.out / "credentials" / "ca.crt").read_bytes() == files.ca.read_bytes()
        d.peer(DEV_A).connected()
    finally:
        deployments.close()


# --- pure rendering --------------------------------------------------------------------------------

GOLDEN_ACL = """\
# Mosquitto ACL for fedge fleet 'f1', written by `fedge broker config`.
# Regenerate it rather than editing it. Everything not granted below is denied.
# One `user` block per principal and no `pattern` lines: a pattern would apply to every
# authenticated user, the aggregator and BMS users included (docs/broker-security.md).
# mosquitto 2.0 grants every SUBSCRIBE; these rules decide what is delivered.

# aggregator: agg
user agg
topic read fedge/v1/f1/update/+
topic read fedge/v1/f1/status/+
topic read fedge/v1/f1/insight/+
topic write fedge/v1/f1/manifest
topic write fedge/v1/f1/blob/#
topic write fedge/v1/f1/aggregator/status
topic write fedge/v1/f1/aggregator/fleet
topic write fedge/v1/f1/keys/rotation/+
topic write fedge/v1/f1/rollout
topic write fedge/v1/f1/rollout/decision
topic write fedge/v1/f1/secagg/#
topic read fedge/v1/f1/identity/+
topic read fedge/v1/f1/aggregator/partial/+
topic write fedge/v1/f1/aggregator/work
topic write fedge/v1/f1/aggregator/verdict/+

# aggregator worker ([replicas]): a share of the updates in, its partials out: agg-worker-1
user agg-worker-1
topic read fedge/v1/f1/update/+
topic read fedge/v1/f1/aggregator/work
topic read fedge/v1/f1/aggregator/verdict/agg-worker-1
topic write fedge/v1/f1/aggregator/partial/agg-worker-1

# building-management system (read-only): bms-1
user bms-1
topic read fedge/v1/f1/status/+
topic read fedge/v1/f1/aggregator/status
topic read fedge/v1/f1/aggregator/fleet
topic read fedge/v1/f1/insight/#

# EdgeX service (its message bus): edgex-core
user edgex-core
topic readwrite site-7/edgex/#

# device: dev-a
user dev-a
topic write fedge/v1/f1/update/dev-a
topic write fedge/v1/f1/status/dev-a
topic write fedge/v1/f1/insight/dev-a
topic read fedge/v1/f1/manifest
topic read fedge/v1/f1/blob/#
topic read fedge/v1/f1/keys/rotation/+
topic read fedge/v1/f1/rollout
topic read fedge/v1/f1/secagg/+/config
topic read fedge/v1/f1/secagg/+/+/dev-a
topic write fedge/v1/f1/identity/dev-a
topic read fedge/v1/f1/identity/+

# device's EdgeX-bus connection (its readings, read-only): dev-a.edgex
user dev-a.edgex
topic read site-7/edgex/events/device/+/+/dev-a/#
topic read site-7/edgex/events/core/+/+/dev-a/#

# device: dev-b
user dev-b
topic write fedge/v1/f1/update/dev-b
topic write fedge/v1/f1/status/dev-b
topic write fedge/v1/f1/insight/dev-b
topic read fedge/v1/f1/manifest
topic read fedge/v1/f1/blob/#
topic read fedge/v1/f1/keys/rotation/+
topic read fedge/v1/f1/rollout
topic read fedge/v1/f1/secagg/+/config
topic read fedge/v1/f1/secagg/+/+/dev-b
topic write fedge/v1/f1/identity/dev-b
topic read fedge/v1/f1/identity/+

# device's EdgeX-bus connection (its readings, read-only): dev-b.edgex
user dev-b.edgex
topic read site-7/edgex/events/device/+/+/dev-b/#
topic read site-7/edgex/events/core/+/+/dev-b/#
"""


def test_rendered_acl_is_golden() -> None:
    fleet = FleetAccess(
        fleet=FLEET,
        devices=(DEV_B, DEV_A),  # sorted on the way in: the order of the input does not matter
        aggregator=AGG,
        bms=(BMS,),
        edgex_services=(EDGEX,),
        edgex_prefix="site-7/edgex",
        workers=("agg-worker-1",),
    )
    assert render_acl(fleet) == GOLDEN_ACL
    # Devices that read EdgeX from a broker of their own get no EdgeX principals here.
    elsewhere = FleetAccess(fleet=FLEET, devices=(DEV_A,), aggregator=AGG, device_edgex=False)
    assert [p.name for p in elsewhere.principals] == [AGG, DEV_A]
    assert "edgex" not in render_acl(elsewhere)
    assert "pattern" not in "\n".join(line for line in GOLDEN_ACL.splitlines() if not line.startswith("#"))


def test_the_documented_acl_example_is_what_render_acl_writes() -> None:
    """docs/broker-security.md shows a whole generated ACL; it must stay exactly true."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "broker-security.md").read_text()
    intro = "The generated ACL for fleet `f1` with the aggregator `agg`"
    assert doc.count(intro) == 1
    example = doc.split(intro, 1)[1].split("```\n", 2)[1]
    fleet = FleetAccess(
        fleet="f1", devices=("dev-a",), aggregator="agg", bms=("bms-1",), edgex_services=("edgex-core",)
    )
    assert example == render_acl(fleet)


def listener(**changes: Any) -> ListenerConf:
    values: dict[str, Any] = {
        "fleet": FLEET,
        "port": 8883,
        "acl_file": Path("/etc/fedge-broker/acl"),
        "password_file": Path("/etc/fedge-broker/passwd"),
        "tls": TlsFiles(Path("/etc/fb/ca.crt"), Path("/etc/fb/server.crt"), Path("/etc/fb/server.key")),
    }
    values.update(changes)
    return ListenerConf(**values)


def directives(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_rendered_conf_tls_passwords() -> None:
    lines = directives(render_conf(listener(limits=BrokerLimits.for_fleet(1000, 22_258), bind="10.0.0.2")))
    for expected in (
        "per_listener_settings false",
        "allow_anonymous false",
        "password_file /etc/fedge-broker/passwd",
        "acl_file /etc/fedge-broker/acl",
        f"max_packet_size {2 * 22_258 + PACKET_HEADROOM}",
        "max_queued_messages 200000",
        f"max_queued_bytes {1000 * (2 * (22_258 + 4096) + 200 * 2048)}",
        "max_inflight_messages 20",
        "max_keepalive 300",
        "persistence true",
        "persistence_location /var/lib/mosquitto/",
        "listener 8883 10.0.0.2",
        "cafile /etc/fb/ca.crt",
        "tls_version tlsv1.2",
        "require_certificate false",
    ):
        assert expected in lines, expected
    assert [line for line in lines if line.startswith("listener")] == ["listener 8883 10.0.0.2"]
    # A listener option: above the listener line it would open a default listener on 1883.
    assert lines.index("use_username_as_clientid true") > lines.index("listener 8883 10.0.0.2")
    assert "use_identity_as_username true" not in lines and not any(
        line.startswith("user ") for line in lines
    )


def test_rendered_conf_client_certs_and_plain() -> None:
    lines = directives(render_conf(listener(password_file=None, client_certs=True, run_as="mosquitto")))
    assert "require_certificate true" in lines and "use_identity_as_username true" in lines
    assert not any(line.startswith("password_file") for line in lines)
    assert "user mosquitto" in lines
    plain = directives(render_conf(listener(tls=None, port=1883)))
    assert [line for line in plain if line.startswith("listener")] == ["listener 1883"]
    assert plain.index("use_username_as_clientid true") > plain.index("listener 1883")
    assert not any(line.startswith(("cafile", "certfile", "keyfile", "tls_")) for line in plain)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tls": None, "client_certs": True, "password_file": None}, "client certificates need TLS"),
        ({"client_certs": True}, "exactly one of them"),
        ({"password_file": None}, "exactly one of them"),
        ({"acl_file": Path("acl")}, "must be an absolute path"),
        ({"persistence_dir": Path("/var/lib/my broker")}, "whitespace"),
        ({"port": 0}, "1..65535"),
        ({"bind": "0.0.0.0 # all"}, "bind address"),
    ],
)
def test_listener_conf_refuses_bad_input(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(BrokerConfigError, match=message):
        listener(**changes)


def test_limits_are_sized_from_the_fleet_and_the_model() -> None:
    small = BrokerLimits.for_fleet(7)
    assert small.max_packet_size == 16 * 1024 * 1024 and small.max_queued_messages == 10_000
    big = BrokerLimits.for_fleet(5000, 1_000_000, max_inflight_messages=50)
    assert big.max_packet_size == 2_000_000 + PACKET_HEADROOM and big.max_queued_messages == 1_000_000
    assert big.max_inflight_messages == 50
    with pytest.raises(BrokerConfigError, match="would disconnect the aggregator"):
        BrokerLimits.for_fleet(7, 1_000_000, max_packet_size=1_000_000)
    with pytest.raises(BrokerConfigError, match="max_keepalive"):
        BrokerLimits.for_fleet(7, max_keepalive=5)


def test_max_queued_bytes_is_sized_from_the_fleet_and_the_model() -> None:
    """devices x (2 sealed updates + 200 statuses of 2 KiB), at least 64 MiB."""
    har = 21_788 + 4096  # har-watch: initial_weights.f32 + sealing headroom
    per_device = 2 * har + 200 * 2048
    assert per_device == 461_368
    assert BrokerLimits.for_fleet(7, 77_444, update_bytes=har).max_queued_bytes == 64 * 1024 * 1024
    assert BrokerLimits.for_fleet(10_000, 77_444, update_bytes=har).max_queued_bytes == 4_613_680_000
    # Without the weights' size, the largest blob bounds an update; without any size, a packet.
    assert BrokerLimits.for_fleet(1000, 77_444).max_queued_bytes == 1000 * (2 * (77_444 + 4096) + 200 * 2048)
    assert BrokerLimits.for_fleet(7).max_queued_bytes == 7 * (2 * 16 * 1024 * 1024 + 200 * 2048)
    assert BrokerLimits.for_fleet(7, max_queued_bytes=0).max_queued_bytes == 0  # explicit: unlimited
    with pytest.raises(BrokerConfigError, match=r"max_queued_bytes must be >= 0 \(0 = unlimited\)"):
        BrokerLimits.for_fleet(7, max_queued_bytes=-1)


def test_password_hashes_are_mosquitto_passwd_compatible(tmp_path: Path) -> None:
    hashed = hash_password("s3cret", salt=b"0123456789ab")
    assert hashed.startswith("$7$101$MDEyMzQ1Njc4OWFi$")
    assert verify_password("s3cret", hashed) and not verify_password("s3cret!", hashed)
    exe = Path("/usr/bin/mosquitto_passwd")
    if not exe.exists():
        pytest.skip("mosquitto_passwd is not installed (the broker tests prove the hashes anyway)")
    pwfile = tmp_path / "pw"
    pwfile.write_text("")
    subprocess.run([str(exe), "-b", str(pwfile), "u", "s3cret"], check=True, capture_output=True, timeout=10)
    theirs = pwfile.read_text().strip().split(":", 1)[1]
    assert verify_password("s3cret", theirs)
    salt = base64.b64decode(theirs.split("$")[3])
    assert hash_password("s3cret", salt=salt) == theirs  # byte for byte the same format


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"fleet": "f/1"}, "invalid fleet id"),
        ({"devices": ("dev-a", "dev+b")}, "invalid device name"),
        ({"devices": ("dev-a", "#")}, "invalid device name"),
        ({"devices": ()}, "no devices"),
        ({"devices": ("dev-a", "dev-a")}, "listed twice"),
        ({"bms": ("dev-a",)}, "as bms and as device"),
        ({"aggregator": "dev-b"}, "as aggregator and as device"),
        (
            {"devices": ("dev-a", "dev-a.edgex")},
            r"principal 'dev-a.edgex' is listed as device-edgex and as device: names must be unique "
            r"\('dev-a.edgex' is the EdgeX-bus principal of device 'dev-a'\)",
        ),
        ({"bms": ("dev-b.edgex",)}, "'dev-b.edgex' is listed as bms and as device-edgex"),
        ({"devices": ("d" * 60,)}, "invalid device-edgex name"),
        ({"aggregator": "agg gregator"}, "invalid aggregator name"),
        ({"edgex_prefix": "fedge/v1/f1"}, "must not lie inside"),
        ({"edgex_prefix": "edgex/#"}, "EdgeX topic prefix"),
        ({"edgex_prefix": "edgex//x"}, "EdgeX topic prefix"),
    ],
)
def test_fleet_access_refuses_bad_input(changes: dict[str, Any], message: str) -> None:
    values: dict[str, Any] = {"fleet": FLEET, "devices": (DEV_A, DEV_B), "aggregator": AGG, "bms": (BMS,)}
    values.update(changes)
    with pytest.raises(BrokerConfigError, match=message) as info:
        FleetAccess(**values)
    assert isinstance(info.value, FedgeError)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"client_certs": True, "tls": "none"}, "use it with --tls lab"),
        ({"tls": "files"}, "certificate files go with"),
        ({"hostnames": ("broker.example.com", "bad_host!")}, "hostname 'bad_host!'"),
        ({"hostnames": ()}, "at least one hostname"),
        ({"cert_days": 0}, "validity"),
        ({"port": 70000}, "1..65535"),
        ({"install_dir": Path("etc/broker")}, "must be an absolute path"),
    ],
)
def test_request_refuses_bad_input(tmp_path: Path, changes: dict[str, Any], message: str) -> None:
    with pytest.raises(BrokerConfigError, match=message):
        request(tmp_path, **changes)


def test_missing_certificate_files_are_named_and_nothing_is_written(tmp_path: Path) -> None:
    files = TlsFiles(tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server-key.pem")
    with pytest.raises(BrokerConfigError, match=r"--tls-ca .*ca\.pem: no such file"):
        write_broker_config(request(tmp_path, tls="files", tls_files=files))
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    (tmp_path / "server.pem").write_text("not a certificate\n")
    with pytest.raises(BrokerConfigError, match=r"--tls-cert .*server\.pem: not a PEM file"):
        write_broker_config(request(tmp_path, tls="files", tls_files=files))
    assert not (tmp_path / "broker").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


# --- what is written ---------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_modes_and_no_secrets_in_the_summary(tmp_path: Path) -> None:
    result = write_broker_config(request(tmp_path))
    out = result.out_dir
    creds = out / "credentials"
    assert mode(creds) == 0o700
    for name in (AGG, BMS, EDGEX, DEV_A, DEV_B, f"{DEV_A}.edgex", f"{DEV_B}.edgex"):
        assert mode(creds / f"{name}.txt") == 0o600, name
    for secret in (out / "passwd", out / "certs" / "ca.key", out / "certs" / "server.key"):
        assert mode(secret) == 0o600, secret
    assert mode(out / "acl") == 0o644 and mode(out / "certs" / "ca.crt") == 0o644
    summary_text = (out / "summary.json").read_text()
    summary = json.loads(summary_text)
    assert summary == result.to_dict()
    assert {p["name"]: p["role"] for p in summary["principals"]} == {
        AGG: "aggregator", BMS: "bms", EDGEX: "edgex", DEV_A: "device", DEV_B: "device",
        f"{DEV_A}.edgex": "device-edgex", f"{DEV_B}.edgex": "device-edgex",
    }  # fmt: skip
    names = (AGG, DEV_A, f"{DEV_A}.edgex")
    passwords = [tomllib.loads((creds / f"{n}.txt").read_text())["password"] for n in names]
    passwd = (out / "passwd").read_text()
    for password in passwords:
        assert len(password) >= 43 and password not in summary_text and password not in passwd
    assert sorted(line.split(":")[0] for line in passwd.splitlines()) == sorted(
        [AGG, BMS, EDGEX, DEV_A, DEV_B, f"{DEV_A}.edgex", f"{DEV_B}.edgex"]
    )
    assert len(set(passwords)) == len(passwords)


def test_a_non_empty_directory_needs_force_which_replaces_only_generated_files(tmp_path: Path) -> None:
    first = write_broker_config(request(tmp_path))
    old_password = tomllib.loads((first.out_dir / "credentials" / "dev-a.txt").read_text())["password"]
    keep = first.out_dir / "README.operator"
    keep.write_text("mine\n")
    with pytest.raises(BrokerConfigError, match="not empty: use --force"):
        write_broker_config(request(tmp_path))
    second = write_broker_config(request(tmp_path, force=True, client_certs=True))
    out = second.out_dir
    assert keep.read_text() == "mine\n"
    assert not (out / "passwd").exists()  # the password mode's file went with --force
    assert (out / "credentials" / "dev-a.crt").exists() and mode(out / "credentials" / "dev-a.key") == 0o600
    assert old_password not in (out / "credentials" / "dev-a.txt").read_text()


def test_broker_group_makes_broker_files_group_readable(tmp_path: Path) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    out = write_broker_config(request(tmp_path, broker_group=group)).out_dir
    for path, expected in ((out / "passwd", 0o640), (out / "certs" / "server.key", 0o640), (out, 0o750)):
        assert (mode(path), path.stat().st_gid) == (expected, os.getgid()), path
    assert mode(out / "certs" / "ca.key") == 0o600 and mode(out / "credentials") == 0o700
    with pytest.raises(BrokerConfigError, match="no such group"):
        write_broker_config(request(tmp_path / "x", broker_group="no-such-group-fedge"))


def test_root_started_broker_reads_files_shared_with_its_group(tmp_path: Path) -> None:
    """The Debian way: started as root, mosquitto drops to its own user *before* reading the
    password file, ACL and TLS key; --broker-group mosquitto makes them readable to it."""
    exe = require_mosquitto()
    try:
        mosquitto_uid = pwd.getpwnam("mosquitto").pw_uid
        grp.getgrnam("mosquitto")
    except KeyError:
        pytest.skip("no 'mosquitto' user and group")
    if os.geteuid() != 0:
        pytest.skip("needs root: only root can start mosquitto so that it drops privileges")
    # pytest's tmp_path lies under a 0700 directory the mosquitto user cannot traverse.
    with tempfile.TemporaryDirectory(dir="/tmp") as shared:
        root = Path(shared)
        root.chmod(0o755)
        data = root / "data"
        data.mkdir()
        os.chown(data, mosquitto_uid, -1)
        result = write_broker_config(request(root, broker_group="mosquitto", run_as=None, data_dir=data))
        broker = ConfiguredMosquitto(
            result.out_dir / "mosquitto.conf",
            port=result.port,
            work_dir=tmp_path,
            tls_context=client_context(result.out_dir / "credentials", None),
            executable=exe,
        )
        with broker:
            d = Deployment(result, broker, [])
            try:
                d.peer(DEV_A).connected().send(T.update(DEV_A), b"x")
            finally:
                d.close_peers()


# --- the command line --------------------------------------------------------------------------------


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="fedge")
    sub = parser.add_subparsers(dest="command", required=True)
    add_broker_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli_with_a_device_registry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nacl.public import PrivateKey

    from fedge.aggregator.registry import render_registry
    from fedge.protocol.sealing import key_to_text

    registry = tmp_path / "devices.toml"
    keys = {d: key_to_text(PrivateKey.generate().public_key) for d in ("watch-01", "watch-02")}
    registry.write_text(render_registry(keys))
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.tflite").write_bytes(b"\0" * 70_000)
    (model / "initial_weights.f32").write_bytes(b"\0" * 21_788)
    out = tmp_path / "broker"
    code = run_cli(
        "broker", "config", "--fleet", "demo", "--registry", str(registry), "--bms", "bms-a,bms-b",
        "--out", str(out), "--tls", "lab", "--hostname", "broker.lan", "--hostname", "10.0.0.5",
        "--model-dir", str(model), "--install-dir", "/etc/fedge-broker", "--json",
    )  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["broker_url"] == "mqtts://broker.lan:8883"
    assert [p["name"] for p in summary["principals"]] == [
        "aggregator",
        "bms-a",
        "bms-b",
        "watch-01",
        "watch-01.edgex",
        "watch-02",
        "watch-02.edgex",
    ]
    assert summary["limits"]["max_packet_size"] == 2 * 70_000 + PACKET_HEADROOM
    # The weights file sizes the updates: 21,788 + 4 KiB; 2 devices are under the 64 MiB floor.
    assert summary["limits"]["update_bytes"] == 21_788 + 4096
    assert summary["limits"]["max_queued_bytes"] == 64 * 1024 * 1024
    conf = (out / "mosquitto.conf").read_text()
    assert "acl_file /etc/fedge-broker/acl" in conf and "certfile /etc/fedge-broker/certs/server.crt" in conf
    assert "listener 8883\n" in conf  # all interfaces
    cert = subprocess.run(
        ["openssl", "x509", "-in", str(out / "certs" / "server.crt"), "-noout", "-ext", "subjectAltName"],
        capture_output=True, text=True, check=True, timeout=10,
    ).stdout  # fmt: skip
    assert "DNS:broker.lan" in cert and "IP Address:10.0.0.5" in cert


def test_cli_errors_are_fedge_errors(tmp_path: Path) -> None:
    out = str(tmp_path / "o")
    with pytest.raises(BrokerConfigError, match="--tls-cert needs --tls-key and --tls-ca"):
        run_cli("broker", "config", "--fleet", "f", "--device", "d", "--out", out, "--tls-cert", "x.pem")
    with pytest.raises(BrokerConfigError, match="go with --tls-cert"):
        run_cli(
            "broker", "config", "--fleet", "f", "--device", "d", "--out", out, "--no-tls", "--tls-ca", "c"
        )
    with pytest.raises(FedgeError, match="cannot read device registry"):
        run_cli("broker", "config", "--fleet", "f", "--registry", out + ".toml", "--out", out, "--no-tls")
    with pytest.raises(BrokerConfigError, match=r"no model\.tflite"):
        run_cli(
            "broker", "config", "--fleet", "f", "--device", "d", "--out", out, "--no-tls", "--model-dir", out
        )
    with pytest.raises(SystemExit):  # argparse: exactly one of --tls lab, --tls-cert, --no-tls
        run_cli("broker", "config", "--fleet", "f", "--device", "d", "--out", out)
    assert not Path(out).exists()


# --- Home Assistant discovery (--home-assistant; docs/home-assistant.md) ---------------------------


def ha_access(**changes: Any) -> FleetAccess:
    values: dict[str, Any] = {
        "fleet": FLEET,
        "devices": (DEV_B, DEV_A),
        "aggregator": AGG,
        "bms": (BMS,),
        "edgex_services": (EDGEX,),
        "home_assistant_prefix": "homeassistant",
    }
    values.update(changes)
    return FleetAccess(**values)


def test_home_assistant_is_off_by_default_and_adds_two_rules_when_on() -> None:
    assert "homeassistant" not in render_acl(access())
    acl = render_acl(ha_access())
    assert acl.count("homeassistant/") == 3
    own = "topic write homeassistant/sensor/fedge_f1_dev-a/prediction/config"
    assert f"user {DEV_A}\n" in acl and own in acl
    assert f"user {BMS}\ntopic read {T.status_filter}" in acl and "topic read homeassistant/#" in acl


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"home_assistant_prefix": "fedge/ha"}, "inside fedge's topic tree"),
        ({"home_assistant_prefix": "ha/#"}, "without '\\+', '#'"),
        ({"home_assistant_prefix": "edgex/ha"}, "lies in the EdgeX tree"),
        ({"devices": ("room.1", "room_1")}, "would share one Home Assistant discovery topic"),
    ],
)
def test_home_assistant_refuses_a_prefix_it_cannot_confine_and_colliding_devices(
    changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(BrokerConfigError, match=message):
        ha_access(**changes)


def test_a_device_writes_its_own_discovery_config_only_and_bms_reads_them(tmp_path: Path) -> None:
    """Against mosquitto running the generated config: dev-a may publish (retained) its own config
    topic and no other (dev-b's, another object, the prefix's status topic), the aggregator none,
    and the BMS (Home Assistant) reads the configs but writes nothing under the prefix."""
    for d in deploy(tmp_path, access=ha_access()):
        prefix = "homeassistant"
        own = f"{prefix}/sensor/fedge_f1_dev-a/prediction/config"
        other = f"{prefix}/sensor/fedge_f1_dev-b/prediction/config"
        bms = d.peer(BMS).connected()
        bms.subscribe(f"{prefix}/#")
        device = d.peer(DEV_A).connected()
        forged = token("forged")
        wrong_object = f"{prefix}/sensor/fedge_f1_dev-a/other/config"
        for topic in (other, wrong_object, f"{prefix}/status", f"{prefix}/x"):
            assert device.publish(topic, forged, retain=True).value == NOT_AUTHORIZED, topic
        assert d.peer(AGG).connected().publish(own, forged, retain=True).value == NOT_AUTHORIZED
        assert bms.publish(other, forged, retain=True).value == NOT_AUTHORIZED
        config = token("config")
        device.send(own, config, retain=True)
        bms.wait_for(own, config)
        assert bms.got(forged) == []
        # Retained: a Home Assistant that connects later finds it, and nothing forged.
        late = d.peer(BMS).connected()
        late.subscribe(f"{prefix}/#")
        late.wait_for(own, config)
        assert late.got(forged) == []


def test_the_cli_flag_sets_the_prefix(tmp_path: Path) -> None:
    from fedge.tools.broker_config import request_from_args

    parser = argparse.ArgumentParser()
    add_broker_parser(parser.add_subparsers(dest="command"))
    base = ["broker", "config", "--fleet", FLEET, "--device", DEV_A, "--bms", BMS, "--no-tls"]
    base += ["--out", str(tmp_path)]
    assert request_from_args(parser.parse_args(base)).access.home_assistant_prefix is None
    on = parser.parse_args([*base, "--home-assistant", "--home-assistant-prefix", "site/ha"])
    assert request_from_args(on).access.home_assistant_prefix == "site/ha"


def test_aggregator_workers_get_their_share_of_updates_and_only_their_own_topics(tmp_path: Path) -> None:
    """Against mosquitto running the generated config with two ``--aggregator-worker``s: both
    workers and the aggregator share update/+ through ``$share/``; a worker reads the work order
    and its own verdicts, writes its own partial topic, and nothing else; a device can write none
    of the replicas' topics."""
    workers = ("w-1", "w-2")
    fleet = FleetAccess(fleet=FLEET, devices=(DEV_A,), aggregator=AGG, bms=(BMS,), workers=workers)
    for d in deploy(tmp_path, access=fleet):
        shared = f"$share/fedge-aggregators/{T.update_filter}"
        members = [d.peer(name).connected() for name in (AGG, *workers)]
        for member in members:
            assert all(code.value < 0x80 for code in member.subscribe(shared))
        device = d.peer(DEV_A).connected()
        sent = [token(f"update-{i}") for i in range(6)]
        for payload in sent:
            device.send(T.update(DEV_A), payload)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum(len(m.got(p)) for m in members for p in sent) < len(sent):
            time.sleep(0.05)
        # Each update went to exactly one member of the group, and every worker got some.
        assert [sum(len(m.got(p)) for m in members) for p in sent] == [1] * len(sent)
        assert all(any(m.got(p) for p in sent) for m in members[1:])
        w1, w2 = members[1], members[2]
        forged = token("forged")
        assert w1.publish(T.partial("w-2"), forged).value == NOT_AUTHORIZED
        assert w1.publish(T.verdict("w-1"), forged).value == NOT_AUTHORIZED
        assert w1.publish(T.work, forged, retain=True).value == NOT_AUTHORIZED
        assert w1.publish(T.manifest, forged, retain=True).value == NOT_AUTHORIZED
        assert device.publish(T.partial("w-1"), forged).value == NOT_AUTHORIZED
        assert device.publish(T.work, forged, retain=True).value == NOT_AUTHORIZED
        leader = members[0]
        leader.subscribe(T.partial_filter)
        w2.subscribe(T.verdict("w-1"), T.work)
        w1.subscribe(T.verdict("w-1"), T.work)
        partial, verdict, work = token("partial"), token("verdict"), token("work")
        w1.send(T.partial("w-1"), partial)
        leader.wait_for(T.partial("w-1"), partial)
        leader.send(T.verdict("w-1"), verdict)
        leader.send(T.work, work, retain=True)
        w1.wait_for(T.verdict("w-1"), verdict)
        w1.wait_for(T.work, work)
        w2.wait_for(T.work, work)
        assert w2.got(verdict) == []  # another worker's verdict is not delivered to it


def test_the_cli_flag_adds_aggregator_workers(tmp_path: Path) -> None:
    from fedge.tools.broker_config import request_from_args

    parser = argparse.ArgumentParser()
    add_broker_parser(parser.add_subparsers(dest="command"))
    args = ["broker", "config", "--fleet", FLEET, "--device", DEV_A, "--no-tls", "--out", str(tmp_path)]
    args += ["--aggregator-worker", "w-2,w-1"]
    access = request_from_args(parser.parse_args(args)).access
    assert access.workers == ("w-1", "w-2")
    assert [p.role for p in access.principals][:3] == ["aggregator", "aggregator-worker", "aggregator-worker"]


def test_bridge_to_a_campus_writes_the_bridge_and_keeps_its_password_secret(tmp_path: Path) -> None:
    from fedge.tools.broker_config import request_from_args

    parser = argparse.ArgumentParser()
    add_broker_parser(parser.add_subparsers(dest="command"))
    secret = tmp_path / "bridge.password"
    secret.write_text("campus-pass\n")
    base = ["broker", "config", "--fleet", "building-1", "--device", DEV_A, "--no-tls"]
    base += ["--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data"), "--port", "18883"]
    args = [*base, "--bridge-to", "127.0.0.1:28883", "--campus-fleet", "campus"]
    args += ["--building-id", "building-1", "--bridge-password-file", str(secret)]
    result = write_broker_config(request_from_args(parser.parse_args(args)))
    conf = result.out_dir / "mosquitto.conf"
    text = conf.read_text()
    assert "connection campus-building-1\naddress 127.0.0.1:28883\n" in text
    assert "remote_password campus-pass\n" in text
    assert conf.stat().st_mode & 0o777 == 0o600
    assert "topic write fedge/v1/campus/update/building-1" in (result.out_dir / "acl").read_text()
    with pytest.raises(BrokerConfigError, match="--bridge-to needs --campus-fleet and --building-id"):
        request_from_args(parser.parse_args([*base, "--bridge-to", "127.0.0.1:28883"]))
