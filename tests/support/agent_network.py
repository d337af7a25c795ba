"""One device agent on a real Mosquitto, seen from the test: its config file, a stubbed data source,
the test's MQTT client and the agent's run in a thread.

Shared by the agent service tests (``test_agent_wakeups``, ``test_sparse_agent_service``,
``test_secure_agent_service``; ``wait_for`` and ``run_in_thread`` also by
``test_personalised_agent``) so that the config they write and the client they watch the broker
with are one piece of code: a new required config key or a change of the update topics is made
here once. The device is ``DEVICE`` (the first of ``support.engine_helpers.DEVICE_IDS``), keyed
with that module's fleet keys, so a ``make_engine`` aggregator accepts what it sends.
"""

from __future__ import annotations

import base64
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fedge.agent.service import AgentService
from fedge.lab.broker import MosquittoBroker
from fedge.protocol.signing import signing_key_to_text
from fedge.protocol.task import TaskSpec
from fedge.shell.files import atomic_write
from support.engine_helpers import AGGREGATOR_KEY, DEVICE_IDS, DEVICE_KEYS, FLEET, SIGNING_KEY, TOPICS

DEVICE = DEVICE_IDS[0]
#: How long a test waits for the agent: long for a loaded machine, short of a hung test.
WAIT_S = 20.0


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = WAIT_S, poll_s: float = 0.02) -> Any:
    """``predicate``'s first truthy result, polled every ``poll_s``; an AssertionError naming
    ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def write_agent_config(
    directory: Path, broker: MosquittoBroker, status_interval_s: float = 0.5, extra_agent_lines: str = ""
) -> Path:
    """``directory/agent.toml`` (created with the device's box key file) for ``DEVICE`` on
    ``broker``, reading the har-watch source. ``extra_agent_lines`` (whole TOML lines, each
    ending in a newline) go into ``[agent]``; files they name the caller writes into
    ``directory``, which exists once this returns."""
    directory.mkdir()
    atomic_write(directory / f"{DEVICE}.box", (b64(bytes(DEVICE_KEYS[DEVICE])) + "\n").encode())
    path = directory / "agent.toml"
    path.write_text(
        f'[agent]\ndevice_id = "{DEVICE}"\nfleet = "{FLEET}"\nstate_dir = "state"\n'
        f'key_file = "{DEVICE}.box"\n'
        f'aggregator_public_key = "{b64(bytes(AGGREGATOR_KEY.public_key))}"\n'
        f'aggregator_verify_keys = ["{signing_key_to_text(SIGNING_KEY.verify_key)}"]\n'
        f"{extra_agent_lines}"
        f"status_interval_s = {status_interval_s}\n"
        f'[mqtt]\nbroker = "{broker.url}"\n[data]\nsource = "har-watch"\n'
    )
    path.chmod(0o600)
    return path


def no_data(task: TaskSpec) -> tuple[np.ndarray, np.ndarray]:  # the trainer is stubbed
    return np.empty((0, task.input_dim), np.float32), np.empty((0,), np.int32)


class Network:
    """The test's MQTT client: publishes (retained unless told), collects every ``update/+`` frame
    in ``frames`` and, with ``statuses=True``, ``DEVICE``'s status payloads in ``statuses``.
    ``seen`` is the test's own record of the frames it took and handled."""

    def __init__(self, broker: MosquittoBroker, statuses: bool = False) -> None:
        self.frames: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.statuses: queue.Queue[bytes] = queue.Queue()
        self.seen: list[tuple[str, bytes]] = []
        self._status_topic = TOPICS.status(DEVICE) if statuses else None
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        topics = [(TOPICS.update_filter, 1)]
        if self._status_topic is not None:
            topics.append((self._status_topic, 1))
        self.client.subscribe(topics)
        assert subscribed.wait(10)

    def _on_message(self, client: mqtt.Client, userdata: object, m: mqtt.MQTTMessage) -> None:
        if m.topic == self._status_topic:
            self.statuses.put(bytes(m.payload))
        else:
            self.frames.put((m.topic, bytes(m.payload)))

    def publish(self, topic: str, payload: bytes, retain: bool = True) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextmanager
def run_in_thread(
    target: Callable[[], Any], stop: Callable[[], None], what: str = "the agent"
) -> Iterator[threading.Thread]:
    """``target`` (a service's ``run``) in a daemon thread, as the process's main thread runs it
    in service; ``stop`` (its ``request_stop``, what SIGTERM calls) when the block ends, and an
    AssertionError if ``what`` has not stopped 20 s later."""
    runner = threading.Thread(target=target, daemon=True)
    runner.start()
    try:
        yield runner
    finally:
        stop()
        runner.join(20)
    assert not runner.is_alive(), f"{what} did not stop"


def running(agent: AgentService, result: list[int] | None = None) -> AbstractContextManager[threading.Thread]:
    """``agent.run`` in a thread (``run_in_thread``); its exit status appended to ``result``."""

    def run() -> None:
        status = agent.run()
        if result is not None:
            result.append(status)

    return run_in_thread(run, agent.request_stop)
