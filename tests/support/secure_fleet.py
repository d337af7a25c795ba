"""A fleet behind the broker configuration ``fedge broker config`` generates, for e2e tests.

Mosquitto runs the generated ``mosquitto.conf`` unchanged (TLS with a lab CA, a password per
principal, per-principal ACLs, no anonymous access, the username as client id). The fleet's
configs (:class:`fleet_harness.Fleet`, so ``fedge aggregator run`` / ``fedge agent run``
processes) each carry their own principal's username, password and the lab CA.

Principals: every device (``watch-01`` ...; plus the ``watch-01.edgex`` ... principals the
generator adds for devices' EdgeX-bus connections), ``aggregator``, and the read-only monitors
``monitor`` and ``monitor-2`` (manifest, blobs, ``status/+``, ``aggregator/status``).

**One connection per principal at a time.** The broker takes the client id from the username,
so a second connection with a username already connected takes the first one's session over
and disconnects it. A test that acts as a device whose agent is running does exactly that: do
it only on purpose. Use ``monitor`` and ``monitor-2`` for two independent observers.

API (everything else is internal)::

    with SecureFleet(tmp_path, har_model_dir, devices=2, rounds={"rounds": 2}) as sf:
        sf.fleet                      # fleet_harness.Fleet: start_aggregator(), start_agent(id),
                                      #   wait_exit(name, timeout), log(name), spawn(), manifests()
        sf.devices                    # ("watch-01", "watch-02")
        sf.creds["watch-01"]          # {"broker", "username", "password", "ca_file"}
        sf.broker                     # the running fedge.lab.broker.ConfiguredMosquitto
        with sf.client("watch-01") as c:               # connected paho client (MQTT 5, TLS)
            ...
        rc = sf.publish("watch-01", topic, payload, retain=True)   # PUBACK reason code
        with sf.recorder("monitor") as rec:            # mqtt_fixtures.TrafficRecorder
            ...

Leaving the ``with`` block stops every process the fleet started, then the broker. Every wait
is bounded (``timeout`` arguments, default :data:`WAIT_S`).
"""

from __future__ import annotations

import os
import ssl
import threading
import tomllib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from fedge.lab.broker import ConfiguredMosquitto, free_loopback_port
from fedge.protocol.mqtt_settings import parse_broker_url
from fedge.tools.broker_config import (
    BrokerConfigRequest,
    BrokerLimits,
    FleetAccess,
    largest_blob_in,
    update_bytes_in,
    write_broker_config,
)
from support.fleet_harness import FLEET, Fleet, device_subjects
from support.mqtt_fixtures import TrafficRecorder, require_mosquitto

WAIT_S = 10.0
AGGREGATOR = "aggregator"
MONITORS = ("monitor", "monitor-2")
#: What a fleet config's ``[mqtt]`` table takes from a principal's credentials file.
_CONFIG_KEYS = ("username", "password", "ca_file")


class SecureFleet:
    """The generated, locked-down broker and a :class:`~fleet_harness.Fleet` using it.

    ``devices``, ``rounds`` and ``mqtt_protocol`` are :class:`~fleet_harness.Fleet`'s. Nothing
    starts before :meth:`start` (or ``with``).
    """

    def __init__(
        self, root: Path, model_dir: Path, devices: int, rounds: dict[str, object], *, mqtt_protocol: int = 5
    ) -> None:
        self.root = root
        self.model_dir = model_dir
        self.devices: tuple[str, ...] = tuple(device_subjects(devices))
        self._rounds = dict(rounds)
        self._mqtt_protocol = mqtt_protocol
        self.creds: dict[str, dict[str, Any]] = {}
        self._broker: ConfiguredMosquitto | None = None
        self._fleet: Fleet | None = None

    # --- life cycle ----------------------------------------------------------------------------

    def start(self) -> Self:
        """Writes the broker configuration and the fleet, and starts Mosquitto."""
        exe = require_mosquitto()
        access = FleetAccess(FLEET, self.devices, aggregator=AGGREGATOR, monitors=MONITORS)
        data_dir = self.root / "broker" / "data"
        data_dir.mkdir(parents=True)
        result = write_broker_config(
            BrokerConfigRequest(
                access=access,
                out_dir=self.root / "broker" / "config",
                tls="lab",
                port=free_loopback_port(),
                bind="127.0.0.1",
                data_dir=data_dir,
                # Started as root, mosquitto would drop to 'mosquitto', which cannot read 0600 files.
                run_as="root" if os.geteuid() == 0 else None,
                limits=BrokerLimits.for_fleet(
                    len(self.devices),
                    largest_blob_in(self.model_dir),
                    update_bytes=update_bytes_in(self.model_dir),
                ),
            )
        )
        for principal in result.principals:
            path = result.out_dir / principal.credentials
            data = tomllib.loads(path.read_text())
            if data.get("ca_file"):
                data["ca_file"] = str((path.parent / str(data["ca_file"])).resolve())
            self.creds[principal.name] = data
        self._broker = ConfiguredMosquitto(
            result.out_dir / "mosquitto.conf",
            port=result.port,
            work_dir=self.root / "broker" / "run",
            tls_context=ssl.create_default_context(cafile=self.creds[AGGREGATOR]["ca_file"]),
            executable=exe,
        ).start()
        extra = {
            name: {k: v for k, v in self.creds[name].items() if k in _CONFIG_KEYS}
            for name in (*self.devices, AGGREGATOR)
        }
        self._fleet = Fleet(
            self.root / "fleet",
            result.broker_url,
            self.model_dir,
            len(self.devices),
            self._rounds,
            mqtt_protocol=self._mqtt_protocol,
            mqtt_extra=extra,
        )
        return self

    def close(self) -> None:
        """Stops the fleet's processes, then the broker. Idempotent."""
        if self._fleet is not None:
            self._fleet.stop_all()
        if self._broker is not None:
            self._broker.stop()
            self._broker = None

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def fleet(self) -> Fleet:
        if self._fleet is None:
            raise RuntimeError("SecureFleet is not started")
        return self._fleet

    @property
    def broker(self) -> ConfiguredMosquitto:
        if self._broker is None:
            raise RuntimeError("SecureFleet is not started")
        return self._broker

    # --- clients as a principal ----------------------------------------------------------------

    @contextmanager
    def client(
        self, principal: str, *, client_id: str | None = None, timeout: float = WAIT_S
    ) -> Iterator[mqtt.Client]:
        """A paho 2.x client (MQTT 5, TLS with the lab CA) connected as ``principal``, its
        network loop running; disconnected when the block ends. ``client_id`` is what the
        client sends (the broker replaces it with the username). Raises AssertionError if the
        broker refuses the connection or does not answer within ``timeout``."""
        c = self.creds[principal]
        host, port, _ = parse_broker_url(str(c["broker"]))
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id if client_id is not None else f"{principal}-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,
        )
        client.username_pw_set(str(c["username"]), c.get("password"))
        client.tls_set(ca_certs=str(c["ca_file"]))
        connack: list[ReasonCode] = []
        done = threading.Event()

        def on_connect(cl: mqtt.Client, u: object, flags: object, rc: ReasonCode, props: object) -> None:
            connack.append(rc)
            done.set()

        client.on_connect = on_connect
        client.connect(host, port, keepalive=30)
        client.loop_start()
        try:
            if not done.wait(timeout):
                raise AssertionError(f"no CONNACK for {principal!r} within {timeout} s")
            if connack[0].is_failure:
                raise AssertionError(f"the broker refused {principal!r}: {connack[0]}")
            yield client
        finally:
            client.disconnect()
            client.loop_stop()

    def publish(
        self,
        principal: str,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        qos: int = 1,
        timeout: float = WAIT_S,
    ) -> ReasonCode:
        """Publishes once as ``principal`` (connect, publish, PUBACK, disconnect) and returns
        the PUBACK's reason code (0x87 "Not authorized" when the ACL denies the topic). QoS 1."""
        if qos != 1:
            raise ValueError("publish() waits for a PUBACK: QoS 1 only")
        acks: dict[int, ReasonCode] = {}
        acked = threading.Condition()

        def on_publish(cl: mqtt.Client, u: object, mid: int, rc: ReasonCode, props: object) -> None:
            with acked:
                acks[mid] = rc
                acked.notify_all()

        with self.client(principal, timeout=timeout) as client:
            client.on_publish = on_publish
            info = client.publish(topic, payload, qos=1, retain=retain)
            with acked:
                if not acked.wait_for(lambda: info.mid in acks, timeout):
                    raise AssertionError(f"no PUBACK for {principal!r} on {topic!r} within {timeout} s")
                return acks[info.mid]

    def recorder(self, principal: str = MONITORS[0], *, topic_filter: str = "#") -> TrafficRecorder:
        """A (not yet started) :class:`~mqtt_fixtures.TrafficRecorder` connected as
        ``principal``: use ``with sf.recorder() as rec``. It sees what the ACL lets that
        principal read (for a monitor: manifest, blobs, statuses, aggregator status)."""
        c = self.creds[principal]
        host, port, _ = parse_broker_url(str(c["broker"]))
        return TrafficRecorder(
            host,
            port,
            topic_filter=topic_filter,
            client_id=principal,
            username=str(c["username"]),
            password=c.get("password"),
            ca_file=str(c["ca_file"]),
        )
