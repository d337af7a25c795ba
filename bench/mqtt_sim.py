"""Light simulated devices and a passive observer for ``bench_rounds.py``, over a real broker.

:class:`SimFleet` opens one MQTT connection per device (like real agents: the broker fans the
manifest out to every device and each device publishes on its own ``update/{device_id}``
topic) and retains an ``idle`` status per device, so the aggregator sees them online. paho's
network threads only queue what arrives; one worker thread does each device's part of a round
in turn: verify the signed manifest with the aggregator's verify key, make a random delta of
the model's size, encode it with the round's codec, seal it with the device's key and publish
it with QoS 1. No training and no blob download: what is left is the protocol's own cost. The
devices' sockets set TCP_NODELAY (see :class:`SimFleet`).

:class:`Observer` is one more client, subscribed to the manifest, the aggregator's status and
the blobs; it timestamps every manifest (the round boundaries) and counts the bytes the
aggregator publishes per round. ``rounds_observer.py`` runs it in a process of its own.

Locks here are only ever held for a few dictionary operations and never across a paho call
(paho runs callbacks under its own mutex).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from nacl.public import PrivateKey, PublicKey
from nacl.signing import VerifyKey
from paho.mqtt.enums import CallbackAPIVersion

from fedge.agent.core import verify_manifest
from fedge.protocol.round_manifest import RoundManifest, round_manifest_from_dict
from fedge.protocol.signing import DocType, key_id, verify_document
from fedge.protocol.topics import FleetTopics
from rounds_common import device_moments, random_delta, sealed_moments, sealed_update

MAX_MANIFEST_BYTES = 8 * 1024 * 1024
_POLL_S = 0.05


class SimError(Exception):
    """The simulation could not connect, or a device failed to do its part."""


def _client(client_id: str, tcp_nodelay: bool = False) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.max_queued_messages_set(0)
    if tcp_nodelay:
        client.on_socket_open = _set_nodelay
    return client


def _set_nodelay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise SimError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(_POLL_S)


@dataclass
class RoundWork:
    """What the simulated devices did for one manifest version."""

    version: int
    round_id: str
    phase: str
    updates: int = 0
    sealed_bytes: int = 0
    busy_s: float = 0.0
    first_arrival: float | None = None
    first_publish: float | None = None
    last_publish: float | None = None
    infos: list[mqtt.MQTTMessageInfo] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "round_id": self.round_id,
            "phase": self.phase,
            "updates": self.updates,
            "mean_sealed_bytes": self.sealed_bytes / self.updates if self.updates else None,
            "devices_busy_s": self.busy_s,
            "all_acknowledged": all(i.is_published() for i in self.infos),
        }


class SimFleet:
    """N simulated devices, one MQTT connection each.

    ``tcp_nodelay``: a simulated device publishes its update a millisecond after it PUBACKed
    the manifest. With Nagle's algorithm on (paho's default), that update then waits for the
    broker's delayed ACK of the PUBACK -- up to 40 ms on Linux, measured here as +30 ms per round
    at N=5. A real device trains for seconds in between and never hits this, so the simulator
    turns Nagle off on its own sockets; the aggregator runs unmodified.
    """

    def __init__(
        self,
        host: str,
        port: int,
        fleet: str,
        device_keys: dict[str, PrivateKey],
        aggregator_public: PublicKey,
        verify_key: VerifyKey,
        parameter_count: int,
        input_dim: int,
        seed: int = 0,
        tcp_nodelay: bool = True,
    ) -> None:
        self.host, self.port = host, port
        self.fleet = fleet
        self.topics = FleetTopics(fleet)
        self.keys = dict(device_keys)
        self.aggregator_public = aggregator_public
        self.trusted = {key_id(verify_key): verify_key}
        self.parameter_count = parameter_count
        self.rng = np.random.default_rng(seed)
        self.moments = {d: device_moments(self.rng, input_dim) for d in self.keys}
        self.counters = dict.fromkeys(self.keys, 0)
        self.seen_version = dict.fromkeys(self.keys, 0)
        self.work: dict[int, RoundWork] = {}
        self._parsed: dict[bytes, RoundManifest] = {}
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._inbox: queue.Queue[tuple[str, bytes, float]] = queue.Queue()
        self._ready: set[str] = set()
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name="sim-devices", daemon=True)
        run = uuid.uuid4().hex[:8]
        self.clients: dict[str, mqtt.Client] = {}
        for d in self.keys:
            c = _client(f"sim-{fleet}-{d}-{run}", tcp_nodelay)
            c.user_data_set(d)
            c.will_set(self.topics.status(d), json.dumps({"device_id": d, "state": "offline"}), 1, True)
            c.on_connect = self._on_connect
            c.on_subscribe = self._on_subscribe
            c.on_message = self._on_message
            self.clients[d] = c

    # --- paho callbacks (network threads: queue and flag only) ----------------------------

    def _on_connect(self, client: mqtt.Client, device: str, flags: Any, reason_code: Any, props: Any) -> None:
        if reason_code.is_failure:
            with self._lock:
                self.errors.append(f"{device}: broker refused the connection: {reason_code}")
            return
        client.subscribe(self.topics.manifest, qos=1)
        status = {"device_id": device, "state": "idle"}
        client.publish(self.topics.status(device), json.dumps(status), qos=1, retain=True)

    def _on_subscribe(self, client: mqtt.Client, device: str, mid: int, codes: Any, props: Any) -> None:
        with self._lock:
            self._ready.add(device)

    def _on_message(self, client: mqtt.Client, device: str, msg: mqtt.MQTTMessage) -> None:
        self._inbox.put((device, bytes(msg.payload), time.monotonic()))

    # --- life cycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        self._worker.start()
        for c in self.clients.values():
            c.connect_async(self.host, self.port, keepalive=60)
            c.loop_start()
        _wait(lambda: len(self._ready) == len(self.clients) or bool(self.errors), timeout,
              f"{len(self.clients)} simulated devices to connect and subscribe")
        if self.errors:
            raise SimError(self.errors[0])

    def stop(self) -> None:
        self._stop.set()
        for d, c in self.clients.items():
            # A clean goodbye: the status goes offline, as a stopping agent leaves it.
            c.publish(self.topics.status(d), b"", qos=0, retain=True)
            c.disconnect()
        for c in self.clients.values():
            c.loop_stop()
        if self._worker.ident is not None:
            self._worker.join(timeout=5.0)

    # --- the devices' work ---------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                device, frame, arrived = self._inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            if not frame:
                continue
            try:
                self._device_round(device, frame, arrived)
            except Exception as exc:  # reported by the benchmark as a failed run, never swallowed
                with self._lock:
                    self.errors.append(f"{device}: {type(exc).__name__}: {exc}")

    def _device_round(self, device: str, frame: bytes, arrived: float) -> None:
        start = time.perf_counter()
        # Every device verifies its own copy's signature, as the device core does. Turning the
        # verified JSON into a RoundManifest (~1-1.5 ms, identical bytes for every device) is
        # done once per manifest: on real devices it runs in parallel, here it would only
        # serialise the simulator.
        digest = hashlib.sha256(frame).digest()

        def parse_once(doc: Any) -> RoundManifest:
            if digest not in self._parsed:
                self._parsed[digest] = round_manifest_from_dict(doc)
            return self._parsed[digest]

        m = verify_manifest(frame, self.trusted, fleet=self.fleet, now=None, parse=parse_once)
        if m.version <= self.seen_version[device]:
            return  # a retained re-delivery of a manifest this device already handled
        self.seen_version[device] = m.version
        work = self.work.get(m.version)
        if work is None:
            work = self.work[m.version] = RoundWork(m.version, m.round_id, m.phase, first_arrival=arrived)
        if m.phase == "final" or not m.is_selected(device):
            work.busy_s += time.perf_counter() - start
            return
        self.counters[device] += 1
        common = {
            "fleet": self.fleet,
            "device_id": device,
            "round_id": m.round_id,
            "version": m.version,
            "counter": self.counters[device],
            "device_key": self.keys[device],
            "aggregator_public": self.aggregator_public,
        }
        if m.phase == "moments":
            sealed = sealed_moments(moments=self.moments[device], **common)
        else:
            sealed = sealed_update(
                delta=random_delta(self.rng, self.parameter_count),
                layout=m.model_manifest.layout,
                codec=m.codec,
                **common,
            )
        info = self.clients[device].publish(self.topics.update(device), sealed, qos=1)
        now = time.monotonic()
        work.infos.append(info)
        work.updates += 1
        work.sealed_bytes += len(sealed)
        work.busy_s += time.perf_counter() - start
        if work.first_publish is None:
            work.first_publish = now
        work.last_publish = now

    def all_acknowledged(self) -> bool:
        return all(i.is_published() for w in list(self.work.values()) for i in list(w.infos))


@dataclass
class ManifestSeen:
    version: int
    round_id: str
    phase: str
    selected: int
    frame_bytes: int
    arrived: float


@dataclass
class RoundTraffic:
    """What the aggregator published while one manifest was current."""

    status_messages: int = 0
    status_bytes: int = 0
    blob_messages: int = 0
    blob_bytes: int = 0
    all_reported_at: float | None = None
    #: The largest backlog the aggregator's statuses showed in its inbox (messages, payload bytes).
    max_inbox_messages: int = 0
    max_inbox_bytes: int = 0


class Observer:
    """Timestamps manifests and counts the aggregator's statuses and blobs (a passive client)."""

    def __init__(self, host: str, port: int, fleet: str, verify_key: VerifyKey) -> None:
        self.host, self.port = host, port
        self.topics = FleetTopics(fleet)
        self.trusted = {key_id(verify_key): verify_key}
        self.manifests: list[ManifestSeen] = []
        self.traffic: dict[int, RoundTraffic] = {}  # keyed by the manifest version then current
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = _client(f"bench-observer-{fleet}-{uuid.uuid4().hex[:8]}")
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, props: Any
    ) -> None:
        if reason_code.is_failure:
            self.errors.append(f"observer: broker refused the connection: {reason_code}")
            return
        client.subscribe(
            [(self.topics.manifest, 1), (self.topics.aggregator_status, 1), (self.topics.blob_filter, 1)]
        )

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        self._subscribed.set()

    def _current(self) -> RoundTraffic:
        version = self.manifests[-1].version if self.manifests else 0
        return self.traffic.setdefault(version, RoundTraffic())

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        payload = bytes(msg.payload)
        try:
            with self.lock:
                if msg.topic == self.topics.manifest and payload:
                    doc, _ = verify_document(
                        payload, DocType.ROUND_MANIFEST, self.trusted, MAX_MANIFEST_BYTES
                    )
                    self.manifests.append(
                        ManifestSeen(
                            int(doc["version"]), str(doc["round_id"]), str(doc["phase"]),
                            len(doc["selected_devices"]), len(payload), now,
                        )
                    )
                elif msg.topic == self.topics.aggregator_status and payload:
                    t = self._current()
                    t.status_messages += 1
                    t.status_bytes += len(payload)
                    status = json.loads(payload)
                    inbox = status.get("inbox") or {}
                    t.max_inbox_messages = max(t.max_inbox_messages, int(inbox.get("messages", 0)))
                    t.max_inbox_bytes = max(t.max_inbox_bytes, int(inbox.get("bytes", 0)))
                    cur = self.manifests[-1] if self.manifests else None
                    if (
                        cur is not None
                        and t.all_reported_at is None
                        and status.get("round_id") == cur.round_id
                        and cur.selected > 0
                        and len(status.get("reported", [])) >= cur.selected
                    ):
                        t.all_reported_at = now
                elif msg.topic.startswith(self.topics.base + "/blob/") and payload:
                    t = self._current()
                    t.blob_messages += 1
                    t.blob_bytes += len(payload)
        except Exception as exc:  # the benchmark fails the run on any observer error
            self.errors.append(f"observer: {type(exc).__name__}: {exc}")

    def start(self, timeout: float = 10.0) -> None:
        self.client.connect_async(self.host, self.port, keepalive=60)
        self.client.loop_start()
        _wait(lambda: self._subscribed.is_set() or bool(self.errors), timeout, "the observer to subscribe")
        if self.errors:
            raise SimError(self.errors[0])

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def final_seen(self) -> bool:
        with self.lock:
            return any(m.phase == "final" for m in self.manifests)
