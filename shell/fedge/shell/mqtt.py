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
- :func:`start_loop`: paho's network thread wakes for traffic, for a publish from another
  thread (paho's socketpair) and otherwise every quarter keepalive (:data:`KEEPALIVE_WAKES`),
  not every second: an idle service's connection costs four wake-ups a keepalive, and the ping
  still goes out before the broker's 1.5 x keepalive limit;
- with ``manual_ack=True`` paho does not acknowledge a QoS 1 message when ``on_message``
  returns: the caller calls ``client.ack(msg.mid, msg.qos)`` once the message is stored, so a
  message lost with a crash before that is delivered again (the session keeps it);
- :func:`watch_connection`: a refused connection is one error line, a lost one a warning, in
  the same words for every service; a broker that cannot be reached (nothing listening, a
  wrong CA, TLS on the wrong port) is a warning naming ``host:port`` and what to check, at
  once and then at most once a minute with the number of failed attempts.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
import sys
import time
import uuid
import weakref
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fedge.protocol.config_source import ConfigError
from fedge.protocol.mqtt_settings import MqttSettings
from fedge.shell.threads import name_current_thread

#: paho's automatic reconnects wait 1 s, then twice as long each time, at most 30 s.
RECONNECT_MIN_DELAY_S = 1
RECONNECT_MAX_DELAY_S = 30
#: A broker that cannot be reached is logged at once, then at most this often (with a count).
FAILURE_LOG_INTERVAL_S = 60.0

#: :func:`start_loop`'s network thread waits for traffic at most keepalive / KEEPALIVE_WAKES:
#: paho sends its PINGREQ from that wake-up once keepalive has passed since the last packet out,
#: so it goes out at most 1.25 x keepalive after it (the broker waits 1.5 x keepalive).
KEEPALIVE_WAKES = 4

# The settings each client was made with (make_client), for watch_connection's hints.
_SETTINGS: weakref.WeakKeyDictionary[mqtt.Client, MqttSettings] = weakref.WeakKeyDictionary()


class _Client(mqtt.Client):
    """paho's client whose network thread (``loop_start``) waits ``network_wait_s`` in its
    select instead of paho's fixed 1 s, and names itself for the kernel. Everything that needs
    the thread sooner wakes it: incoming bytes, and paho's socketpair, written by every
    publish, subscribe and disconnect from another thread."""

    network_wait_s: float = 1.0
    thread_comm: str | None = None

    def _thread_main(self) -> None:  # paho 2.x: the body of loop_start's thread
        if self.thread_comm:
            name_current_thread(self.thread_comm)
        try:
            self.loop_forever(timeout=self.network_wait_s, retry_first_connection=True)
        finally:
            self._thread = None


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

    With TLS, a ``ca_file``, ``cert_file`` or ``key_file`` that cannot be read or used is a
    one-line :class:`ConfigError` naming the file and the fix (:func:`check_tls_files`): the
    services build their clients before they start anything, so that is exit code 78.
    """
    cid = settings.client_id if client_id is None else client_id
    client: mqtt.Client
    if settings.protocol == 5:
        client = _Client(
            CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5, manual_ack=manual_ack
        )
    else:
        client = _Client(
            CallbackAPIVersion.VERSION2,
            client_id=cid,
            protocol=mqtt.MQTTv311,
            clean_session=not persistent,
            manual_ack=manual_ack,
        )
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password)
    if settings.tls:
        check_tls_files(settings)
        try:
            client.tls_set(ca_certs=settings.ca_file, certfile=settings.cert_file, keyfile=settings.key_file)
        except ssl.SSLError as exc:
            files = ", ".join(f"{key} {path}" for key, path in _tls_files(settings))
            raise ConfigError(
                f"TLS files for {settings.url} ({files}) are not usable: {exc.reason or exc}; ca_file must "
                "be a PEM CA certificate, cert_file and key_file a PEM certificate and its key"
            ) from None
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True)
    client.reconnect_delay_set(min_delay=RECONNECT_MIN_DELAY_S, max_delay=RECONNECT_MAX_DELAY_S)
    _SETTINGS[client] = settings
    return client


_TLS_FILE_FIXES = {
    "ca_file": "the CA certificate that signed the broker's certificate (credentials/ca.crt of "
    "fedge broker config)",
    "cert_file": "the client certificate (credentials/NAME.crt of fedge broker config --client-certs)",
    "key_file": "the client certificate's key (credentials/NAME.key of fedge broker config --client-certs)",
}


def _tls_files(settings: MqttSettings) -> list[tuple[str, str]]:
    named = (
        ("ca_file", settings.ca_file),
        ("cert_file", settings.cert_file),
        ("key_file", settings.key_file),
    )
    return [(key, path) for key, path in named if path is not None]


def check_tls_files(settings: MqttSettings) -> None:
    """A ``ca_file``, ``cert_file`` or ``key_file`` that cannot be read is a one-line
    :class:`ConfigError` naming the file and what it must be (not an ``OSError`` traceback
    from deep in paho's ``tls_set``). Paths in a config are relative to the config file."""
    for key, path in _tls_files(settings):
        try:
            # O_NONBLOCK: a FIFO does not hang the check (ssl refuses it next).
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
            problem = os.strerror(errno.EISDIR) if os.path.isdir(path) else None
        except OSError as exc:
            problem = exc.strerror
        if problem is not None:
            raise ConfigError(
                f"cannot read {key} {path} (for {settings.url}): {problem}; "
                f"set {key} to {_TLS_FILE_FIXES[key]}"
            )


def connect(client: mqtt.Client, settings: MqttSettings, receive_maximum: int | None = None) -> None:
    """Starts connecting without blocking (run :func:`start_loop` next; paho's loop then
    connects and reconnects). MQTT 5: ``clean_start=False`` with the session expiry, so the
    broker resumes this client's session and delivers what it queued meanwhile.
    ``receive_maximum`` (MQTT 5): the most QoS 1 messages the broker may have sent this client
    unacknowledged, which bounds what a ``manual_ack`` client holds in memory."""
    if settings.protocol == 5:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = settings.session_expiry_s
        if receive_maximum is not None:
            props.ReceiveMaximum = receive_maximum
        client.connect_async(
            settings.host, settings.port, settings.keepalive, clean_start=False, properties=props
        )
    else:
        client.connect_async(settings.host, settings.port, settings.keepalive)


def start_loop(client: mqtt.Client, thread_name: str) -> None:
    """``client.loop_start()``, its thread named ``thread_name`` (``/proc``'s comm: at most 15
    bytes) and waking every keepalive / :data:`KEEPALIVE_WAKES` when nothing happens (a client
    :func:`make_client` did not make: paho's own loop). Stop it with :func:`stop_loop`."""
    if isinstance(client, _Client):
        settings = _SETTINGS.get(client)
        keepalive = settings.keepalive if settings is not None else 0
        client.network_wait_s = keepalive / KEEPALIVE_WAKES if keepalive > 0 else 1.0
        client.thread_comm = thread_name
    client.loop_start()


def stop_loop(client: mqtt.Client) -> None:
    """Disconnects and ends the network thread. ``disconnect`` first: its packet wakes the
    thread's select (paho's socketpair), which then sees the connection closing and ends at
    once; ``loop_stop`` alone would wait for the select's timeout."""
    client.disconnect()
    client.loop_stop()


def publish_queued(
    client: mqtt.Client, topic: str, payload: bytes, qos: int, retain: bool = False
) -> mqtt.MQTTMessageInfo:
    """``client.publish``, where a QoS 1 or 2 message published while the connection is down
    counts as queued, as it is: paho keeps it and sends it after the reconnect. paho marks it
    ``MQTT_ERR_NO_CONN`` for ever, so ``is_published()`` would raise on it even once the broker
    has acknowledged it; the chaos loop's broker kill crashed the aggregator that way
    (tests/e2e/test_chaos.py)."""
    info = client.publish(topic, payload, qos=qos, retain=retain)
    if qos > 0 and info.rc == mqtt.MQTT_ERR_NO_CONN:
        info.rc = mqtt.MQTT_ERR_SUCCESS
    return info


def connect_failure_hint(error: BaseException | None, settings: MqttSettings | None) -> str:
    """What to check when a connection attempt failed before the broker's CONNACK (pure).

    ``error`` is what paho's attempt raised (an ``OSError``: refused, unreachable, a TLS
    handshake that failed), None when the broker closed the connection without answering the
    CONNECT; ``settings`` (None: unknown) tell whether the client uses TLS and which CA.
    """
    tls = settings is not None and settings.tls
    ca_file = settings.ca_file if settings is not None else None
    if isinstance(error, ssl.SSLCertVerificationError):
        if error.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
            return (
                "the broker's certificate does not name this host: connect with a name it holds "
                "(fedge broker config --hostname)"
            )
        if ca_file:
            return (
                f"is ca_file ({ca_file}) the CA that signed the broker's certificate? "
                "(fedge broker config writes it as credentials/ca.crt)"
            )
        return (
            "ca_file is not set, so only the system's CAs are trusted: set ca_file to the CA that "
            "signed the broker's certificate (credentials/ca.crt of fedge broker config)"
        )
    if isinstance(error, ssl.SSLError) or (tls and isinstance(error, ConnectionResetError | BrokenPipeError)):
        return (
            "is TLS on this port? mqtts:// needs the broker's TLS listener (usually 8883), "
            "mqtt:// its plain one (usually 1883)"
        )
    if error is None:
        if tls:
            return "does the broker want a client certificate (cert_file, key_file)? is this its MQTT port?"
        return "does this port expect TLS? (then use mqtts:// and ca_file)"
    if isinstance(error, ConnectionRefusedError):
        return "nothing accepts connections there: is the broker running, and are host and port right?"
    if isinstance(error, socket.gaierror):
        return "the host name does not resolve: is the host right?"
    return "is the host reachable from here (network, firewall), and is the port right?"


class _Unreachable:
    """Failed connection attempts (no CONNACK), logged at once, then at most every
    :data:`FAILURE_LOG_INTERVAL_S` with the number of attempts in between; or sooner when
    the hint changes. Used from paho's network thread only."""

    def __init__(self, log: logging.Logger, broker: str, clock: Callable[[], float]) -> None:
        self.log = log
        self.broker = broker
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        self.since_line = 0  # attempts failed since the last line
        self.total = 0  # attempts failed in this outage
        self.line_at: float | None = None
        self.hint: str | None = None  # of the last line
        self.warned = False

    def lost(self) -> None:
        """The connection was lost: that warning stands for the first line of the outage."""
        self.reset()
        self.line_at = self.clock()

    def failed(self, where: str, error: BaseException | None, hint: str) -> None:
        self.since_line += 1
        self.total += 1
        now = self.clock()
        due = (
            self.line_at is None
            or now - self.line_at >= FAILURE_LOG_INTERVAL_S
            or (self.hint is not None and hint != self.hint)
        )
        if not due:
            return
        what = "the broker closed the connection without answering CONNECT" if error is None else str(error)
        if self.warned:
            self.log.warning(
                "still cannot connect to the %s at %s: %d attempt(s) failed since the last report "
                "(last: %s); check: %s; retrying with backoff",
                self.broker,
                where,
                self.since_line,
                what,
                hint,
            )
        else:
            self.log.warning(
                "cannot connect to the %s at %s: %s; check: %s; retrying with backoff",
                self.broker,
                where,
                what,
                hint,
            )
        self.since_line, self.line_at, self.hint, self.warned = 0, now, hint, True

    def connected(self, where: str) -> None:
        if self.warned:
            self.log.info(
                "connected to the %s at %s after %d failed attempt(s)", self.broker, where, self.total
            )
        self.reset()


def _where(client: mqtt.Client) -> str:
    host = client.host
    return f"[{host}]:{client.port}" if ":" in host else f"{host}:{client.port}"


def watch_connection(
    client: mqtt.Client,
    log: logging.Logger,
    on_connected: Callable[[mqtt.Client], None],
    on_disconnected: Callable[[], None] | None = None,
    *,
    broker: str = "broker",
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Installs ``client``'s ``on_connect`` and ``on_disconnect`` with fedge's connection log.

    - A refused connection (a failed CONNACK: bad credentials, a banned client id) logs one
      error, "<broker> refused the connection: <reason>", and nothing else: paho's disconnect
      that follows is not logged again.
    - A lost connection logs a warning, "disconnected from the <broker> (<reason>);
      reconnecting with backoff"; the client's own ``disconnect()`` (reason "Success") logs
      nothing.
    - An attempt that gets no CONNACK (nothing listens, the TLS handshake fails, the broker
      closes the connection unanswered) logs a warning, "cannot connect to the <broker> at
      host:port: <error>; check: <hint>; retrying with backoff", with a hint from
      :func:`connect_failure_hint` (the client's settings come from :func:`make_client`). The
      first failure is logged at once (after a lost connection, that warning counts as the
      first), then at most once a minute ("still cannot connect ...", with the number of
      attempts; ``clock`` is the monotonic clock that decides), or at once when the hint
      changes; the connection that ends such an outage is logged at INFO.

    ``on_connected(client)`` runs after each successful CONNACK (subscribe there: a resumed
    session keeps subscriptions, a new one does not); ``on_disconnected()`` after every
    disconnect, refused connections included. Both run in paho's network thread.
    ``broker`` names the broker in the log ("EdgeX broker" for the EdgeX message bus).
    """
    # Whether the last CONNACK succeeded, and whether the current attempt got a CONNACK at all;
    # only paho's network thread reads and writes them.
    up = [False]
    answered = [False]
    unreachable = _Unreachable(log, broker, clock)
    settings = _SETTINGS.get(client)

    def _on_connect(
        c: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        answered[0] = True
        if reason_code.is_failure:
            unreachable.reset()  # reachable: the refusal is the news
            log.error("%s refused the connection: %s", broker, reason_code)
            return
        up[0] = True
        unreachable.connected(_where(c))
        on_connected(c)

    def _on_connect_fail(c: mqtt.Client, userdata: object) -> None:
        # paho calls this inside its ``except OSError`` around the attempt: the error is the
        # exception being handled.
        error = sys.exc_info()[1]
        unreachable.failed(_where(c), error, connect_failure_hint(error, settings))

    def _on_disconnect(
        c: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        was_up, up[0] = up[0], False
        was_answered, answered[0] = answered[0], False
        if on_disconnected is not None:
            on_disconnected()
        if was_up and reason_code.is_failure:
            log.warning("disconnected from the %s (%s); reconnecting with backoff", broker, reason_code)
            unreachable.lost()
        elif not was_answered and reason_code.is_failure:
            # Connected at the socket level, then closed without a CONNACK (plain MQTT on a
            # TLS port, a client certificate the broker wanted).
            unreachable.failed(_where(c), None, connect_failure_hint(None, settings))

    client.on_connect = _on_connect
    client.on_connect_fail = _on_connect_fail
    client.on_disconnect = _on_disconnect
