"""MQTT: the one paho client fedge makes, how it connects, and how its connection is logged.

Every service (agent, aggregator, the EdgeX bus subscriber), ``fedge edgex tap`` and the lab's
observer and EdgeX publisher build their client here (only the lab broker's one-shot readiness
probes do not: :mod:`fedge.lab.broker` says why), so they agree on what matters for delivery:

- paho 2.x with the version-2 callback API;
- MQTT 5 with a persistent session (``clean_start=False`` and the configured session expiry):
  the broker keeps subscriptions and queued QoS 1 messages across reconnects and its own
  restarts, so nothing published while a device was offline is lost; MQTT 3.1.1 gets the same
  with ``clean_session=False``;
- reconnects with a backoff from 1 s to 30 s (paho's loop does them);
- with ``manual_ack=True`` paho does not acknowledge a QoS 1 message when ``on_message``
  returns: the caller calls ``client.ack(msg.mid, msg.qos)`` once the message is stored, so a
  message lost with a crash before that is delivered again (the session keeps it);
- :func:`watch_connection`: a refused connection is one error line, a lost one a warning, in
  the same words for every service.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fedge.protocol.mqtt_settings import MqttSettings

#: paho's automatic reconnects wait 1 s, then twice as long each time, at most 30 s.
RECONNECT_MIN_DELAY_S = 1
RECONNECT_MAX_DELAY_S = 30


def ephemeral_settings(
    host: str,
    port: int,
    tls: bool,
    name: str,
    *,
    protocol: int = 5,
    username: str | None = None,
    password: str | None = None,
    ca_file: str | None = None,
) -> MqttSettings:
    """Settings for a short-lived client (a tool, a lab observer or publisher): a fresh client
    id ``<name>-<random>``, so it never takes over another client's session, keepalive 30 s,
    and a session that ends with the connection (expiry 0)."""
    return MqttSettings(
        host=host,
        port=port,
        tls=tls,
        protocol=protocol,
        keepalive=30,
        username=username,
        password=password,
        client_id=f"{name}-{uuid.uuid4().hex[:12]}",
        session_expiry_s=0,
        ca_file=ca_file,
    )


def make_client(
    settings: MqttSettings,
    client_id: str | None = None,
    *,
    will: tuple[str, bytes] | None = None,
    manual_ack: bool = False,
    persistent: bool = True,
) -> mqtt.Client:
    """A paho 2.x client for ``settings`` (not connected yet: :func:`connect`).

    ``client_id`` defaults to ``settings.client_id``; ``will``, (topic, payload), is published
    by the broker with QoS 1, retained, when the connection is lost without a DISCONNECT (a
    device's "offline" status). ``manual_ack``: see the module docstring. ``persistent=False``
    is for short-lived lab clients with a random id, which connect themselves with
    ``client.connect`` (a clean start): under MQTT 3.1.1 they ask for a clean session, so the
    broker keeps nothing for them after they leave.
    """
    cid = settings.client_id if client_id is None else client_id
    if settings.protocol == 5:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5, manual_ack=manual_ack
        )
    else:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cid,
            protocol=mqtt.MQTTv311,
            clean_session=not persistent,
            manual_ack=manual_ack,
        )
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password)
    if settings.tls:
        client.tls_set(ca_certs=settings.ca_file, certfile=settings.cert_file, keyfile=settings.key_file)
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True)
    client.reconnect_delay_set(min_delay=RECONNECT_MIN_DELAY_S, max_delay=RECONNECT_MAX_DELAY_S)
    return client


def connect(client: mqtt.Client, settings: MqttSettings) -> None:
    """Starts connecting without blocking (run ``client.loop_start()`` next; paho's loop then
    connects and reconnects). MQTT 5: ``clean_start=False`` with the session expiry, so the
    broker resumes this client's session and delivers what it queued meanwhile."""
    if settings.protocol == 5:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = settings.session_expiry_s
        client.connect_async(
            settings.host, settings.port, settings.keepalive, clean_start=False, properties=props
        )
    else:
        client.connect_async(settings.host, settings.port, settings.keepalive)


def watch_connection(
    client: mqtt.Client,
    log: logging.Logger,
    on_connected: Callable[[mqtt.Client], None],
    on_disconnected: Callable[[], None] | None = None,
    *,
    broker: str = "broker",
) -> None:
    """Installs ``client``'s ``on_connect`` and ``on_disconnect`` with fedge's connection log.

    - A refused connection (a failed CONNACK: bad credentials, a banned client id) logs one
      error, "<broker> refused the connection: <reason>", and nothing else: paho's disconnect
      that follows is not logged again.
    - A lost connection logs a warning, "disconnected from the <broker> (<reason>);
      reconnecting with backoff"; the client's own ``disconnect()`` (reason "Success") logs
      nothing.

    ``on_connected(client)`` runs after each successful CONNACK (subscribe there: a resumed
    session keeps subscriptions, a new one does not); ``on_disconnected()`` after every
    disconnect, refused connections included. Both run in paho's network thread.
    ``broker`` names the broker in the log ("EdgeX broker" for the EdgeX message bus).
    """
    # Whether the last CONNACK succeeded; only paho's network thread reads and writes it.
    up = [False]

    def _on_connect(
        c: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            log.error("%s refused the connection: %s", broker, reason_code)
            return
        up[0] = True
        on_connected(c)

    def _on_disconnect(
        c: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        was_up, up[0] = up[0], False
        if on_disconnected is not None:
            on_disconnected()
        if was_up and reason_code.is_failure:
            log.warning("disconnected from the %s (%s); reconnecting with backoff", broker, reason_code)

    client.on_connect = _on_connect
    client.on_disconnect = _on_disconnect
