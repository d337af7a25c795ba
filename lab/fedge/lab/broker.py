"""A real MQTT broker on the loopback interface, for tests and for ``fedge demo``.

:class:`MosquittoBroker` writes a ``mosquitto.conf`` into a data directory, runs the
``mosquitto`` executable in its own process group and waits until it answers an MQTT CONNECT
with a CONNACK. It can be stopped (SIGTERM: mosquitto saves its database, so retained messages
and persistent sessions survive :meth:`~BrokerProcess.restart`), killed (SIGKILL, for chaos
tests) and restarted on the same port with the same persistence directory.

When mosquitto is not installed, :func:`local_broker` falls back to :class:`AmqttBroker`, an
embedded Python broker (``amqtt``, MQTT 3.1.1 only, no persistence) run in a subprocess.

Files in the data directory: ``mosquitto.conf``, ``mosquitto.log`` (mosquitto's own log),
``mosquitto.out`` (its stdout/stderr), ``mosquitto.db`` (the persistence database).

mosquitto 2.0.11 facts this module relies on (checked against the Debian package):

- ``log_type`` takes one type per line; further words on the line are silently ignored.
- Started as root, mosquitto drops privileges to the ``mosquitto`` user unless ``user root``
  is configured, and then cannot write a data directory that root created.
- An MQTT v5 session created with ``clean_start=True`` (and a session expiry interval) is
  kept across a disconnect but lost when the broker restarts; one created with
  ``clean_start=False`` survives the restart.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fedge.protocol import mqtt_settings
from fedge.protocol.config_source import ConfigError
from fedge.protocol.errors import FedgeError

log = logging.getLogger(__name__)

MIB = 1024 * 1024
DEFAULT_MQTT_PORT = 1883
DEFAULT_MQTTS_PORT = 8883
LOOPBACK = "127.0.0.1"
MOSQUITTO_FALLBACK_PATH = Path("/usr/sbin/mosquitto")
STARTUP_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
# The largest MQTT packet the protocol can express (remaining length of 268,435,455 bytes).
MQTT_MAX_PACKET_SIZE = 268_435_455
_POLL_S = 0.02
_START_ATTEMPTS = 3  # with an automatically chosen port, a lost race for it is retried


class BrokerError(FedgeError):
    """The broker could not be configured, started or reached; the message says why."""


def find_mosquitto() -> Path | None:
    """The ``mosquitto`` executable: first on ``PATH``, then ``/usr/sbin/mosquitto``
    (Debian installs it there, which is not on a normal user's ``PATH``)."""
    found = shutil.which("mosquitto")
    if found is not None:
        return Path(found)
    if MOSQUITTO_FALLBACK_PATH.is_file() and os.access(MOSQUITTO_FALLBACK_PATH, os.X_OK):
        return MOSQUITTO_FALLBACK_PATH
    return None


def amqtt_available() -> bool:
    """Whether the embedded fallback broker (the ``amqtt`` package) is installed."""
    return importlib.util.find_spec("amqtt") is not None


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


_SAFE_VALUE = re.compile(r"[^\s#]+")


@dataclass(frozen=True)
class BrokerSettings:
    """How to run a local broker. ``port=0`` picks a free port on the first start; restarts
    keep it.

    ``max_queued_messages`` defaults to 10,000 because mosquitto's default of 1,000 silently
    drops QoS 1/2 messages to a slow or offline subscriber. ``extra_lines`` are appended to the
    rendered mosquitto.conf verbatim (TLS listeners, ACL and password files come that way).
    ``user`` becomes mosquitto's ``user`` option; ``None`` means ``root`` when running as root
    (so mosquitto keeps access to ``data_dir``) and no option otherwise.
    """

    data_dir: Path
    host: str = LOOPBACK
    port: int = 0
    max_packet_size: int = 16 * MIB
    max_queued_messages: int = 10_000
    max_inflight_messages: int = 20
    persistence: bool = True
    autosave_interval: int = 60
    persistent_client_expiration: str = "1d"
    allow_anonymous: bool = True
    user: str | None = None
    extra_lines: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise BrokerError(
                f"broker settings: port must be 0 (pick a free one) or 1..65535, not {self.port}"
            )
        if not 20 <= self.max_packet_size <= MQTT_MAX_PACKET_SIZE:
            raise BrokerError(
                f"broker settings: max_packet_size must be 20..{MQTT_MAX_PACKET_SIZE} bytes, "
                f"not {self.max_packet_size}"
            )
        if self.max_queued_messages < 0:
            raise BrokerError("broker settings: max_queued_messages must be >= 0 (0 = unlimited)")
        if not 0 <= self.max_inflight_messages <= 65535:
            raise BrokerError("broker settings: max_inflight_messages must be 0..65535 (0 = unlimited)")
        if self.autosave_interval < 0:
            raise BrokerError("broker settings: autosave_interval must be >= 0 seconds")
        if not re.fullmatch(r"\d+[hdwmy]", self.persistent_client_expiration):
            raise BrokerError(
                "broker settings: persistent_client_expiration must look like 1d, 12h, 2w, 1m or 1y, "
                f"not {self.persistent_client_expiration!r}"
            )
        values = {"host": self.host, "data_dir": str(self.data_dir)}
        if self.user is not None:
            values["user"] = self.user
        for name, value in values.items():
            if not _SAFE_VALUE.fullmatch(value):
                raise BrokerError(
                    f"broker settings: {name} {value!r} must be non-empty without whitespace or '#' "
                    "(mosquitto.conf cannot quote it)"
                )
        for line in self.extra_lines:
            if "\n" in line or "\r" in line:
                raise BrokerError(f"broker settings: extra line {line!r} must be a single line")

    @property
    def conf_path(self) -> Path:
        return self.data_dir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        """mosquitto's own log (``log_dest file``)."""
        return self.data_dir / "mosquitto.log"

    @property
    def output_path(self) -> Path:
        """The broker process's stdout and stderr."""
        return self.data_dir / "mosquitto.out"


def _on_off(flag: bool) -> str:
    return "true" if flag else "false"


def render_mosquitto_conf(settings: BrokerSettings, port: int) -> str:
    """mosquitto 2.0 configuration for ``settings`` listening on ``port`` (pure)."""
    if not 1 <= port <= 65535:
        raise BrokerError(f"broker settings: listener port must be 1..65535, not {port}")
    lines = [
        "# Written by fedge.lab.broker for one broker run; rewritten on every start.",
        "per_listener_settings false",
        f"listener {port} {settings.host}",
        f"allow_anonymous {_on_off(settings.allow_anonymous)}",
        f"persistence {_on_off(settings.persistence)}",
        f"persistence_location {str(settings.data_dir).rstrip('/')}/",
        "persistence_file mosquitto.db",
        f"autosave_interval {settings.autosave_interval}",
        f"persistent_client_expiration {settings.persistent_client_expiration}",
        f"max_packet_size {settings.max_packet_size}",
        f"max_queued_messages {settings.max_queued_messages}",
        f"max_inflight_messages {settings.max_inflight_messages}",
        "set_tcp_nodelay true",
        f"log_dest file {settings.log_path}",
        # One type per line: mosquitto 2.0.11 ignores every word after the first.
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        "connection_messages true",
    ]
    if settings.user is not None:
        lines.append(f"user {settings.user}")
    lines.extend(settings.extra_lines)
    return "\n".join(lines) + "\n"


def parse_broker_url(url: str) -> tuple[str, int]:
    """``mqtt://host[:port]`` or ``mqtts://host[:port]`` to ``(host, port)``; see
    :func:`fedge.protocol.mqtt_settings.parse_broker_url`, which agents and the aggregator use too."""
    try:
        host, port, _ = mqtt_settings.parse_broker_url(url)
    except ConfigError as exc:
        raise BrokerError(str(exc)) from None
    return host, port


def mqtt_ping(
    host: str,
    port: int,
    *,
    timeout: float = 1.0,
    protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5,
) -> bool:
    """Whether an MQTT broker at ``host:port`` answers CONNECT with a successful CONNACK.

    Connects with a fresh client id and a clean start, so no session is left behind.
    """
    answer = _connack(host, port, timeout, protocol, None)
    return answer is not None and not answer.is_failure


def mqtt_answers(
    host: str,
    port: int,
    *,
    timeout: float = 1.0,
    tls_context: ssl.SSLContext | None = None,
    protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5,
) -> bool:
    """Whether an MQTT broker at ``host:port`` answers CONNECT with a CONNACK, *even a refusal*.

    :func:`mqtt_ping` wants a successful CONNACK, which a broker with ``allow_anonymous false``
    never gives an anonymous probe; its "Not authorized" still proves that it is up and parsed
    its configuration, which is all a readiness check needs. No credentials are sent. With
    ``tls_context`` the probe speaks TLS (a listener with ``require_certificate true`` needs a
    context holding a client certificate, or the handshake fails and this returns ``False``).
    """
    return _connack(host, port, timeout, protocol, tls_context) is not None


def _connack(
    host: str,
    port: int,
    timeout: float,
    protocol: MQTTProtocolVersion,
    tls_context: ssl.SSLContext | None,
) -> ReasonCode | None:
    """The CONNACK a broker at ``host:port`` answers one CONNECT with, or ``None`` (no
    connection, or no answer within ``timeout``): the probe of :func:`mqtt_ping` and
    :func:`mqtt_answers`.

    Not a :func:`fedge.shell.mqtt.make_client` client: a probe takes any MQTT version paho
    speaks, a ready-made TLS context and no credentials, and must not reconnect, not even to
    retry MQTT 3.1 after a refused 3.1.1 (``reconnect_on_failure=False``). A fresh client id
    and a clean start leave no session behind.
    """
    answers: list[ReasonCode] = []

    def on_connect(
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        answers.append(reason_code)

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"fedge-probe-{uuid.uuid4().hex[:12]}",
        protocol=protocol,
        reconnect_on_failure=False,
    )
    client.connect_timeout = timeout
    client.on_connect = on_connect
    # Refused, or (over TLS) a failed handshake: ssl.SSLError is an OSError, and a TLS
    # connection can fail with ValueError too.
    no_connection = (OSError,) if tls_context is None else (OSError, ValueError)
    if tls_context is not None:
        client.tls_set_context(tls_context)
    deadline = time.monotonic() + timeout
    try:
        try:
            client.connect(host, port, keepalive=10)
        except no_connection:
            return None
        while not answers and time.monotonic() < deadline:
            if client.loop(timeout=_POLL_S) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
        if answers and not answers[0].is_failure:
            client.disconnect()
        return answers[0] if answers else None
    finally:
        sock = client.socket()
        if sock is not None:
            sock.close()


class _PortInUse(BrokerError):
    """The broker exited because its port is taken (retried when the port was our pick)."""


class BrokerProcess:
    """A broker running as a child process on a loopback port; a context manager.

    Subclasses say which command to run and which configuration to write. ``start()`` returns
    only once the broker answers MQTT; ``stop()`` always leaves no process (and no zombie).
    """

    #: the MQTT version used to check that the broker answers
    probe_protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5
    #: what this broker is called in messages
    name: str = "broker"

    def __init__(self, settings: BrokerSettings, *, startup_timeout: float = STARTUP_TIMEOUT_S) -> None:
        self._settings = settings
        self._startup_timeout = startup_timeout
        self._port: int | None = settings.port or None
        self._proc: subprocess.Popen[bytes] | None = None
        # Where each log file ended when the current run started: errors quote this run only.
        self._log_offsets: dict[Path, int] = {}

    # -- what subclasses provide -------------------------------------------------------------

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _write_config(self, port: int) -> None:
        raise NotImplementedError

    @property
    def output_path(self) -> Path:
        """Where the process's stdout and stderr go."""
        return self._settings.output_path

    def _log_paths(self) -> list[Path]:
        return [self.output_path]

    def _answers(self, port: int, timeout: float) -> bool:
        """The readiness probe of :meth:`start`: whether the broker answers on ``port`` yet."""
        return mqtt_ping(self.host, port, timeout=timeout, protocol=self.probe_protocol)

    # -- properties --------------------------------------------------------------------------

    @property
    def settings(self) -> BrokerSettings:
        return self._settings

    @property
    def host(self) -> str:
        return self._settings.host

    @property
    def port(self) -> int:
        if self._port is None:
            raise BrokerError(f"{self.name}: no port yet; start() picks one")
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The broker process's id while it runs (or has died unreaped), else ``None``."""
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> Self:
        """Start the broker and wait (bounded) until it answers MQTT on its port."""
        if self.running:
            raise BrokerError(f"{self.name} is already running on {self.host}:{self.port} (pid {self.pid})")
        self._proc = None
        self._settings.data_dir.mkdir(parents=True, exist_ok=True)
        chosen_here = self._port is None
        for attempt in range(1, _START_ATTEMPTS + 1):
            if self._port is None:
                self._port = free_loopback_port()
            try:
                self._spawn_and_wait(self._port)
                return self
            except _PortInUse as exc:
                # Another process took the free port between our look and mosquitto's bind.
                if chosen_here and attempt < _START_ATTEMPTS:
                    log.info("%s: port %d was taken meanwhile; trying another", self.name, self._port)
                    self._port = None
                    continue
                raise BrokerError(str(exc)) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (mosquitto saves its database), wait, SIGKILL if it hangs. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            _signal(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning(
                    "%s (pid %d) ignored SIGTERM for %.1f s; killing it", self.name, proc.pid, timeout
                )
                _signal(proc, signal.SIGKILL)
                proc.wait()
        else:
            proc.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would: nothing since the last autosave is saved."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            _signal(proc, signal.SIGKILL)
        proc.wait()

    def restart(self) -> None:
        """Stop (if running) and start again on the same port with the same data directory."""
        self.stop()
        self.start()

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the current (or last) run wrote to the broker's logs."""
        tails: list[str] = []
        for path in self._log_paths():
            try:
                with path.open("rb") as f:
                    f.seek(self._log_offsets.get(path, 0))
                    text = f.read().decode(errors="replace")
            except OSError:
                continue
            kept = [line for line in text.splitlines() if line.strip()][-lines:]
            if kept:
                tails.append(f"--- {path.name} ---\n" + "\n".join(kept))
        return "\n".join(tails) if tails else "(no log output)"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        where = f"{self.host}:{self._port}" if self._port else self.host
        return f"<{type(self).__name__} {where} {state}>"

    # -- internals ---------------------------------------------------------------------------

    def _spawn_and_wait(self, port: int) -> None:
        self._write_config(port)
        self._log_offsets = {path: _size(path) for path in self._log_paths()}
        with self.output_path.open("ab") as out:
            proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self._settings.data_dir,
                start_new_session=True,  # own process group: a terminal's Ctrl-C goes to us only
            )
        self._proc = proc
        try:
            self._wait_until_ready(proc, port)
        except BaseException:
            self.kill()
            raise

    def _wait_until_ready(self, proc: subprocess.Popen[bytes], port: int) -> None:
        deadline = time.monotonic() + self._startup_timeout
        where = f"{self.host}:{port}"
        while True:
            code = proc.poll()
            if code is not None:
                tail = self.log_tail()
                if "Address already in use" in tail or "address already in use" in tail:
                    raise _PortInUse(
                        f"{self.name} could not listen on {where}: port {port} is already in use\n{tail}"
                    )
                raise BrokerError(f"{self.name} exited with code {code} while starting on {where}\n{tail}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(
                    f"{self.name} (pid {proc.pid}) did not answer MQTT on {where} within "
                    f"{self._startup_timeout:.0f} s\n{self.log_tail()}"
                )
            answered = self._answers(port, min(1.0, remaining))
            if answered and proc.poll() is None:
                log.debug("%s ready on %s (pid %d)", self.name, where, proc.pid)
                return
            time.sleep(_POLL_S)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _signal(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)  # the broker leads its own process group
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


class MosquittoBroker(BrokerProcess):
    """A real Mosquitto broker (MQTT 3.1, 3.1.1 and 5.0) configured by :class:`BrokerSettings`."""

    name = "mosquitto"

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        executable: Path | None = None,
        startup_timeout: float = STARTUP_TIMEOUT_S,
    ) -> None:
        super().__init__(settings, startup_timeout=startup_timeout)
        self._executable = executable

    @property
    def executable(self) -> Path:
        exe = self._executable or find_mosquitto()
        if exe is None:
            raise BrokerError(
                "mosquitto is not installed: apt-get install mosquitto (or run scripts/system-deps.sh)"
            )
        return exe

    def _effective_settings(self) -> BrokerSettings:
        if self._settings.user is None and os.geteuid() == 0:
            # Otherwise mosquitto drops to the 'mosquitto' user and cannot write data_dir.
            return replace(self._settings, user="root")
        return self._settings

    def _command(self) -> list[str]:
        return [str(self.executable), "-c", str(self._settings.conf_path)]

    def _write_config(self, port: int) -> None:
        self.executable  # noqa: B018 - fail with a clear message before writing anything
        self._settings.conf_path.write_text(render_mosquitto_conf(self._effective_settings(), port))

    def _log_paths(self) -> list[Path]:
        return [self._settings.log_path, self.output_path]


class ConfiguredMosquitto(MosquittoBroker):
    """Mosquitto run with a ``mosquitto.conf`` written elsewhere (``fedge broker config``), as is.

    The configuration decides listeners, TLS, authentication and ACLs; nothing is rendered or
    rewritten, so what runs is exactly what would be deployed. This class only has to know
    where the broker listens (``port``: the configuration's listener port; there is no free-port
    pick, the port is in the file) and how to probe it: the readiness probe is
    :func:`mqtt_answers` (any CONNACK counts, since such a broker rightly refuses the probe's
    anonymous CONNECT), over TLS when ``tls_context`` is given. ``work_dir`` is the process's
    working directory and receives its stdout/stderr (``mosquitto.out``), where a configuration
    without ``log_dest file`` logs.
    """

    def __init__(
        self,
        conf_path: Path,
        *,
        port: int,
        work_dir: Path,
        host: str = LOOPBACK,
        tls_context: ssl.SSLContext | None = None,
        executable: Path | None = None,
        startup_timeout: float = STARTUP_TIMEOUT_S,
    ) -> None:
        if not 1 <= port <= 65535:
            raise BrokerError(
                f"configured mosquitto: port must be the configuration's listener port, not {port}"
            )
        super().__init__(
            BrokerSettings(data_dir=work_dir, host=host, port=port),
            executable=executable,
            startup_timeout=startup_timeout,
        )
        self._conf_path = conf_path
        self._tls_context = tls_context

    @property
    def conf_path(self) -> Path:
        return self._conf_path

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self._tls_context is not None else 'mqtt'}://{host}:{self.port}"

    def _command(self) -> list[str]:
        return [str(self.executable), "-c", str(self._conf_path)]

    def _write_config(self, port: int) -> None:
        self.executable  # noqa: B018 - fail with a clear message before starting anything
        if not self._conf_path.is_file():
            raise BrokerError(f"mosquitto configuration {self._conf_path} does not exist")

    def _answers(self, port: int, timeout: float) -> bool:
        return mqtt_answers(
            self.host, port, timeout=timeout, tls_context=self._tls_context, protocol=self.probe_protocol
        )


def render_amqtt_config(settings: BrokerSettings, port: int) -> str:
    """amqtt broker configuration (JSON) for ``settings`` listening on ``port`` (pure).

    amqtt has no persistence and no packet or queue limits to set; only the listener and
    anonymous access carry over.
    """
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{settings.host}:{port}", "max_connections": 0}},
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": settings.allow_anonymous},
        },
    }
    return json.dumps(config, indent=2) + "\n"


# Runs amqtt's broker until SIGTERM/SIGINT. Unlike the `amqtt` command, it exits (code 3) when
# the broker cannot start, e.g. because its port is taken, instead of idling without a listener.
_AMQTT_RUNNER = """
import asyncio, json, logging, signal, sys
from amqtt.broker import Broker
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
logging.getLogger("transitions").setLevel(logging.WARNING)
async def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        config = json.load(f)
    broker = Broker(config, loop=asyncio.get_running_loop())
    try:
        await broker.start()
    except Exception as exc:
        print(f"amqtt broker could not start: {exc}", file=sys.stderr, flush=True)
        sys.exit(3)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await broker.shutdown()
asyncio.run(main())
"""


class AmqttBroker(BrokerProcess):
    """The embedded fallback: amqtt's broker in a subprocess of this Python.

    MQTT 3.1.1 only (an MQTT v5 CONNECT is refused), no persistence: a restart loses retained
    messages and sessions. ``extra_lines`` and the mosquitto limits do not apply.
    """

    name = "amqtt"
    probe_protocol = MQTTProtocolVersion.MQTTv311

    @property
    def output_path(self) -> Path:
        return self._settings.data_dir / "amqtt.log"

    @property
    def config_path(self) -> Path:
        return self._settings.data_dir / "amqtt.json"

    def _command(self) -> list[str]:
        return [sys.executable, "-c", _AMQTT_RUNNER, str(self.config_path)]

    def _write_config(self, port: int) -> None:
        if not amqtt_available():
            raise BrokerError("the fallback broker needs amqtt: pip install 'fedge[demo]'")
        self.config_path.write_text(render_amqtt_config(self._settings, port))


def local_broker(settings: BrokerSettings, *, allow_fallback: bool = True) -> BrokerProcess:
    """An unstarted local broker: mosquitto when installed, else (with a logged notice) amqtt."""
    if find_mosquitto() is not None:
        return MosquittoBroker(settings)
    if allow_fallback and amqtt_available():
        log.warning(
            "mosquitto is not installed; using the embedded amqtt broker instead "
            "(MQTT 3.1.1 only, no persistence). Install mosquitto for the real thing."
        )
        return AmqttBroker(settings)
    hint = " (or pip install amqtt for the MQTT 3.1.1 fallback)" if allow_fallback else ""
    raise BrokerError(
        f"mosquitto is not installed: apt-get install mosquitto or run scripts/system-deps.sh{hint}"
    )
