"""Subscribes to EdgeX's MQTT message bus and hands decoded events to a callback.

The only network code of the EdgeX path: paho moves bytes, :mod:`fedge.agent.edgex.wire` decodes
them. Malformed messages and readings are counted by reason and logged (rate-limited), never
raised into paho's thread and never silently dropped. That holds for anything one message can
cause: paho 2.x re-raises a callback's exception, which would end its network thread and with
it the device's EdgeX feed, so an unexpected exception (in decoding: ``handler_error:<type>``;
in ``on_events``, e.g. the sample store: ``events_error:<type>``) is counted too, under
``errors`` in :meth:`EdgeXBusSubscriber.report` (and so in the device's status).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from fedge.agent.edgex.readings import Event, ReadingError
from fedge.agent.edgex.wire import decode_message, edgex_event_filters
from fedge.protocol.mqtt_settings import MqttSettings
from fedge.shell.mqtt import connect, make_client, start_loop, stop_loop, watch_connection

log = logging.getLogger("fedge.agent.edgex")
MAX_MESSAGE_BYTES = 1024 * 1024


class EdgeXBusSubscriber:
    """Connects to the EdgeX bus, decodes every message, and calls ``on_events`` with events."""

    def __init__(
        self,
        settings: MqttSettings,
        prefix: str,
        on_events: Callable[[list[Event]], None],
        on_connect: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.prefix = prefix
        self.on_events = on_events
        self.on_connect_cb = on_connect
        self.malformed: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.messages = 0
        self.connected = threading.Event()
        self._lock = threading.Lock()
        # Acknowledged by paho when _on_message returns, not by hand once stored (make_client's
        # manual_ack): on_events only queues the events (EdgeXIngest stores them later, in its
        # own thread), so there is no "stored" moment here to acknowledge at. A crash loses
        # what that queue held; the core-data backfill, where configured, reads it again.
        self.client = make_client(settings)
        watch_connection(self.client, log, self._on_connect, self.connected.clear, broker="EdgeX broker")
        self.client.on_message = self._on_message

    def start(self) -> None:
        """Connects in paho's network thread (named ``fedge-edgex-bus``), which wakes for
        messages and otherwise every quarter keepalive (:func:`fedge.shell.mqtt.start_loop`)."""
        connect(self.client, self.settings)
        start_loop(self.client, "fedge-edgex-bus")

    def stop(self) -> None:
        stop_loop(self.client)

    def report(self) -> dict[str, Any]:
        with self._lock:
            return {"messages": self.messages, "malformed": dict(self.malformed), "errors": dict(self.errors)}

    def _on_connect(self, client: mqtt.Client) -> None:
        # Device-service events and core-data's republished events under the prefix.
        client.subscribe([(f, 1) for f in edgex_event_filters(self.prefix)])
        self.connected.set()
        log.info("subscribed to EdgeX events under %r at %s", self.prefix, self.settings.url)
        if self.on_connect_cb is not None:
            self.on_connect_cb()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """Decodes one message and hands its events on. Never raises (see the module doc)."""
        topic = "?"
        try:
            topic = msg.topic
            result = decode_message(bytes(msg.payload), MAX_MESSAGE_BYTES)
        except ReadingError as exc:
            self._count(exc.reason, topic, str(exc))
            return
        except Exception as exc:  # one message never ends the feed
            self._error(f"handler_error:{type(exc).__name__}", topic, exc)
            return
        for rejected in result.rejected:
            self._count(rejected.reason, topic, str(rejected))
        with self._lock:
            self.messages += 1
        if not result.events:
            return
        try:
            self.on_events(result.events)
        except Exception as exc:  # e.g. the sample store failing: counted, the feed goes on
            self._error(f"events_error:{type(exc).__name__}", topic, exc)

    def _count(self, reason: str, topic: str, detail: str) -> None:
        with self._lock:
            self.malformed[reason] += 1
            first = self.malformed[reason] == 1
        # The first of each reason is logged with its detail; the rest only counted (status).
        if first:
            log.warning("malformed EdgeX message on %s: %s", topic, detail)

    def _error(self, reason: str, topic: str, exc: Exception) -> None:
        """An exception one message caused: counted, the first of each reason logged in full."""
        with self._lock:
            self.errors[reason] += 1
            first = self.errors[reason] == 1
        if first:
            where = "storing its events" if reason.startswith("events_error") else "decoding it"
            log.error(
                "EdgeX message on %s not handled (%s) while %s: %r. A bug or a failing sample "
                "store (disk full?): the message was skipped; further ones are only counted "
                "(errors in the device status' EdgeX bus report).",
                topic,
                reason,
                where,
                exc,
                exc_info=exc,
            )
