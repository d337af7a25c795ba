"""``fedge demo --drop-devices K``: K devices of every secure round vanish mid-round, for real.

No hook in the agent: the demo freezes the agent *process* (``SIGSTOP``) the moment the
aggregator relays that device's neighbours' round keys (``secagg/{round}/bundle/{device}``,
which this lab client reads with the fleet's monitor credentials), and thaws it (``SIGCONT``)
once the next manifest is out. A frozen agent sends nothing more in the round, exactly like a
board that lost power after it advertised: its round keys are in its neighbours' bundles and,
if it got that far, its shares in theirs, but no masked input of it reaches the sum, so the
aggregator must recover (or exclude) it. Which devices: K of the round's selected ones, drawn
with a seeded generator per round, so a run is repeatable.

Lab code: it runs in the demo's process and signals processes the demo started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from nacl.signing import VerifyKey

from fedge.protocol.errors import FedgeError
from fedge.protocol.mqtt_settings import MqttSettings
from fedge.protocol.round_manifest import round_manifest_from_dict
from fedge.protocol.signing import DocType, key_id, verify_document
from fedge.protocol.topics import FleetTopics
from fedge.shell.mqtt import make_client

log = logging.getLogger("fedge.lab.dropouts")


class Dropouts:
    """Freezes ``count`` selected agents per secure round once their bundle is published."""

    def __init__(
        self,
        fleet: str,
        settings: MqttSettings,
        host: str,
        port: int,
        pids: Mapping[str, int],
        count: int,
        verify_key: VerifyKey,
        seed: int = 0,
    ) -> None:
        self.topics = FleetTopics(fleet)
        self.trusted = {key_id(verify_key): verify_key}
        self.settings = settings
        self.host, self.port = host, port
        self.pids = dict(pids)
        self.count = count
        self.seed = seed
        self._lock = threading.Lock()
        self._targets: dict[str, frozenset[str]] = {}  # round id -> devices to freeze
        self._frozen: set[str] = set()
        #: round id -> devices frozen in it (the demo's summary reports them).
        self.dropped: dict[str, list[str]] = {}
        self.client = make_client(settings, persistent=False)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message

    def start(self) -> None:
        self.client.connect(self.host, self.port, self.settings.keepalive)
        self.client.loop_start()

    def stop(self) -> None:
        """Thaws every frozen agent (so it can be terminated cleanly) and disconnects."""
        self.thaw()
        self.client.disconnect()
        self.client.loop_stop()

    def plan(self, round_id: str, round_number: int, selected: tuple[str, ...]) -> frozenset[str]:
        """The devices to freeze in a round (called when its manifest is seen): thaws the last
        round's, then draws ``count`` of ``selected`` with a per-round seed."""
        self.thaw()
        rng = np.random.default_rng([self.seed, round_number])
        chosen = frozenset(rng.choice(sorted(selected), size=min(self.count, len(selected)), replace=False))
        with self._lock:
            self._targets = {round_id: chosen}
        return chosen

    def thaw(self) -> None:
        with self._lock:
            frozen, self._frozen = self._frozen, set()
        for device in sorted(frozen):
            _signal(self.pids[device], signal.SIGCONT)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        client.subscribe([(self.topics.manifest, 1), (f"{self.topics.base}/secagg/+/bundle/+", 1)])

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """Never raises (paho would end its thread): what it cannot read is ignored."""
        try:
            if not msg.payload:
                return
            if msg.topic == self.topics.manifest:
                doc, _ = verify_document(bytes(msg.payload), DocType.ROUND_MANIFEST, self.trusted)
                m = round_manifest_from_dict(doc)
                if m.secure_aggregation is not None and m.round_id not in self._targets:
                    chosen = self.plan(m.round_id, m.round_number, m.selected_devices)
                    log.info("round %s: will freeze %s", m.round_id, ", ".join(sorted(chosen)))
                elif m.secure_aggregation is None:
                    self.thaw()
                return
            round_id, _, device = self.topics.secagg_parse(msg.topic)
        except (FedgeError, ValueError):
            return
        with self._lock:
            wanted = device is not None and device in self._targets.get(round_id, frozenset())
            if not wanted or device in self._frozen or device not in self.pids:
                return
            self._frozen.add(device)
            self.dropped.setdefault(round_id, []).append(device)
        _signal(self.pids[device], signal.SIGSTOP)
        log.info("round %s: froze %s after its neighbours' keys were relayed", round_id, device)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # it already exited: nothing to freeze or thaw
        os.kill(pid, sig)
