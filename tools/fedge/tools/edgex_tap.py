"""``fedge edgex tap``: prints the readings the agent parses, one JSON object per reading.

For users debugging their EdgeX set-up: it runs the agent's own subscriber and parser, so what
it prints (or the malformed-message counts it reports at the end) is exactly what an agent
would see. Values are numbers or booleans where the valueType says so.
"""

from __future__ import annotations

import base64
import json
import queue
import sys
import time
from typing import Any, TextIO

from fedge.agent.edgex.bus import EdgeXBusSubscriber
from fedge.agent.edgex.readings import Event, Reading
from fedge.protocol.mqtt_settings import parse_broker_url
from fedge.shell.mqtt import ephemeral_settings


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
) -> dict[str, Any]:
    """Prints readings until ``count`` were printed or ``timeout_s`` passed; returns counters."""
    host, port, tls = parse_broker_url(broker_url)
    settings = ephemeral_settings(host, port, tls, "fedge-tap", protocol=mqtt_protocol)
    events: queue.Queue[list[Event]] = queue.Queue()
    subscriber = EdgeXBusSubscriber(settings, prefix, events.put)
    printed = 0
    until = None if timeout_s is None else time.monotonic() + timeout_s
    subscriber.start()
    try:
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
