"""``fedge edgex tap``: prints the readings the agent parses, one JSON object per reading.

For users debugging their EdgeX set-up: it runs the agent's own subscriber and parser, so what
it prints (or the malformed-message counts it reports at the end) is exactly what an agent
would see. Values are numbers or booleans where the valueType says so.

Against the broker ``fedge broker config`` locks down it connects as a principal allowed to
read the readings (a device's ``ID.edgex``), with ``username``, a password read from a file
(:func:`read_password_file`: the rules of a config's ``password_file``) and ``ca_file``. A tap
that gets no connection within :data:`CONNECT_TIMEOUT_S` (or its ``timeout_s``) fails with a
:class:`FedgeError`, instead of ending quietly with nothing printed.
"""

from __future__ import annotations

import base64
import json
import queue
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from fedge.agent.edgex.bus import EdgeXBusSubscriber
from fedge.agent.edgex.readings import Event, Reading
from fedge.protocol.config_source import MAX_SECRET_FILE_BYTES, ConfigError, secret_text
from fedge.protocol.errors import FedgeError
from fedge.protocol.mqtt_settings import MqttSettings, parse_broker_url
from fedge.shell.files import read_config_file
from fedge.shell.mqtt import ephemeral_settings

#: How long a tap waits for its connection before it gives up (at most its own timeout).
CONNECT_TIMEOUT_S = 10.0


def read_password_file(path: Path, what: str = "--password-file") -> str:
    """The password in ``path``, by the rules of a config's ``password_file``: one line,
    readable by its owner alone (0600 or 0400). A password never goes on a command line,
    where ``ps`` and the shell's history show it. Problems are a :class:`FedgeError` (exit 2)."""
    try:
        return secret_text(*read_config_file(path, MAX_SECRET_FILE_BYTES, what), path, what)
    except ConfigError as exc:
        raise FedgeError(str(exc)) from None


def client_settings(
    broker_url: str,
    name: str,
    *,
    protocol: int = 5,
    username: str | None = None,
    password: str | None = None,
    ca_file: str | None = None,
) -> MqttSettings:
    """A tool's short-lived client settings, with its credentials checked against the URL."""
    host, port, tls = parse_broker_url(broker_url)
    if ca_file is not None and not tls:
        raise FedgeError(f"--ca-file is for TLS: the broker URL must start with mqtts://, not {broker_url}")
    if password is not None and username is None:
        raise FedgeError("--password-file needs --username (the principal the password is for)")
    return ephemeral_settings(
        host, port, tls, name, protocol=protocol, username=username, password=password, ca_file=ca_file
    )


def reading_to_json(reading: Reading) -> dict[str, Any]:
    value: Any = reading.value
    if isinstance(value, bytes):
        value = base64.b64encode(value).decode()
    elif isinstance(value, tuple):
        value = list(value)
    elif isinstance(value, float) and value != value:  # NaN has no JSON form
        value = "NaN"
    return {
        "device": reading.device,
        "resource": reading.resource,
        "profile": reading.profile,
        "valueType": reading.value_type,
        "value": value,
        "origin": reading.origin_ns,
    }


def tap(
    broker_url: str,
    prefix: str = "edgex",
    count: int | None = None,
    as_json: bool = True,
    timeout_s: float | None = None,
    mqtt_protocol: int = 5,
    out: TextIO = sys.stdout,
    *,
    username: str | None = None,
    password: str | None = None,
    ca_file: str | None = None,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
) -> dict[str, Any]:
    """Prints readings until ``count`` were printed or ``timeout_s`` passed; returns counters.

    Raises :class:`FedgeError` when the broker was not connected within ``connect_timeout_s``
    (or ``timeout_s``, if shorter); why is in the connection log (``fedge.agent.edgex``).
    """
    settings = client_settings(
        broker_url, "fedge-tap", protocol=mqtt_protocol, username=username, password=password, ca_file=ca_file
    )
    events: queue.Queue[list[Event]] = queue.Queue()
    try:
        subscriber = EdgeXBusSubscriber(settings, prefix, events.put)
    except ConfigError as exc:  # an unreadable --ca-file: the command's input, not a service config
        raise FedgeError(str(exc)) from None
    printed = 0
    window = connect_timeout_s if timeout_s is None else min(connect_timeout_s, timeout_s)
    until = None if timeout_s is None else time.monotonic() + timeout_s
    subscriber.start()
    try:
        if not subscriber.connected.wait(window):
            raise FedgeError(
                f"no connection to the EdgeX broker at {settings.url} within {window:g} s (the lines "
                "above say why); check the URL, --username, --password-file and --ca-file"
            )
        print(f"fedge edgex tap: reading {prefix}/ events at {settings.url}", file=sys.stderr, flush=True)
        while count is None or printed < count:
            remaining = None if until is None else until - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            try:
                batch = events.get(timeout=0.2 if remaining is None else min(0.2, remaining))
            except queue.Empty:
                continue
            for event in batch:
                for reading in event.readings:
                    if count is not None and printed >= count:
                        break
                    data = reading_to_json(reading)
                    if as_json:
                        out.write(json.dumps(data) + "\n")
                    else:
                        out.write(
                            f"{data['device']:<16} {data['resource']:<16} {data['valueType']:<10} "
                            f"{data['value']!s:<24} {data['origin']}\n"
                        )
                    printed += 1
            out.flush()
    finally:
        subscriber.stop()
    return {"printed": printed, **subscriber.report()}
