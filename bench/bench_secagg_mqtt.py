"""Cost of a secure-aggregation round against a plain round over a real Mosquitto broker, at
N = 10, 50 and 100 devices, in one run.

Why this exists: ``bench_secagg.py`` measures SecAgg+ in one process without a network. This
script runs both kinds of round through a real broker (started here, on a free loopback port
with its own config and data directory), with real keys, real sealing and signing, retained
documents and QoS 1, for the default task's model (``tasks/har-watch.toml``: MLP 48-64-32-7,
5,447 parameters):

- **plain**: the aggregator's real :class:`~fedge.aggregator.round_engine.RoundEngine` signs a
  manifest (published retained); each light device verifies it, encodes its random
  ``normal(0, 0.01)`` float32 update with ``fedge.agent.core.update_payload``, seals it with
  ``seal_contribution`` and publishes it (QoS 1); ``RoundEngine.handle`` opens and folds each
  update, ``close_round`` aggregates. A fresh engine per round (so every round is a first
  round: same norm bounds, checked arithmetic), model bytes a placeholder (the engine never
  runs the model, so no TensorFlow here; blobs are not published, devices download nothing);
- **secure**: the aggregator runs a :class:`~fedge.aggregator.secure_round.SecureRoundDriver`
  (signed config, bundles, deliveries, unmask requests, all retained; the sum); each device a
  :class:`~fedge.agent.secure_round.DeviceSecureRound` with its enrolled identity key (the same
  update, clipped to L2 1.0 and quantised by the round's quantiser). Deadlines are generous
  (60 s a phase): every phase closes as soon as everyone answered. The manifest that announces
  a secure round in production is not part of it here (it costs what the plain manifest costs);
- **secure, drop**: one secure round at N = 50 (``--drop-n``) where 10 % of the devices go
  silent after sending their shares (no masked input, no unmask answer): the masked-input phase
  then closes at its deadline, and the survivors' unmask answers carry the shares that rebuild
  the dropped devices' mask keys (recovery). That deadline is set from the no-drop rounds at the
  same N (1.5 x their masked-input close time + 1 s); the time spent waiting for it is reported
  apart, so the round time without it shows the recovery cost itself.

Measured per round: **round time** (wall, from just before the manifest/config is signed and
published to the aggregated result: ``close_round`` returned / the driver's sum is there; the
secure round's clock also covers building the driver, as ``RoundEngine.open_round`` does);
**bytes** each device publishes (payload of its MQTT publishes, mean over devices; the MQTT 5
PUBLISH packet size is reported too) and receives, and what the aggregator publishes (retained
clears of the secure documents counted apart); **CPU seconds**: the aggregator's as
``time.thread_time`` of the thread that runs the engine/driver (every ``handle``, ``tick``,
``close``; its paho network thread and the broker are not in it, their process CPU is reported
apart), each device's as ``time.thread_time`` of the worker thread around all its work on each
message (verify, encode/quantise, mask, seal, publish call), mean over the devices that did
every phase. Parties: the broker (its own process), the aggregator (this process: main thread
plus its paho network thread), the devices in ``--workers`` worker processes (default 2, the
machine's cores), each hosting N/k devices with one paho client (and network thread) per device
and ONE work thread that does its devices' work in turn: on a 2-core machine that serialises the
devices' crypto, so round times include N x device CPU / k -- real devices work in parallel.
Worker process CPU per round is reported too (``device_process_cpu_s``: includes paho threads).
Every round is repeated ``--reps`` times (default 5; plain and secure interleaved); the table
shows medians.

Load: the machine may be shared (CI); each round records the load average and the CPU time the
whole machine spent that was not this bench's (broker, workers, this process), ``foreign_cpu_s``.

Validity (a failure exits 1): the plain round aggregated all N updates and moved the model by
their mean; the secure sum equals the modular sum of the survivors' quantised updates exactly,
the survivors and recovered sets are the expected ones, nothing was rejected or refused.

Usage: ``python bench/bench_secagg_mqtt.py [--out bench/results/secagg_mqtt.json] [--quick]``
(``make bench-secagg-mqtt``); ``--quick``: N = 10 only, one rep, the drop run at N = 10 (a smoke
run, ``secagg_mqtt-quick.json`` unless ``--out``). The plot goes next to the JSON (``.png``).
Exit codes: 0 ran and valid, 1 error or failed validity check, 2 bad options.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import queue
import resource
import socket
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import paho.mqtt.client as mqtt
from nacl.public import PrivateKey
from nacl.signing import SigningKey, VerifyKey
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_training import machine_info  # type: ignore[import-not-found, unused-ignore]  # noqa: E402
from fedge.agent.core import DeviceIdentity, seal_contribution, update_payload, verify_manifest  # noqa: E402
from fedge.agent.secure_round import DeviceSecureRound, open_round_config  # noqa: E402
from fedge.aggregator.round_engine import EngineState, RoundEngine, RoundRecord  # noqa: E402
from fedge.aggregator.secure_round import SecureRoundDriver  # noqa: E402
from fedge.lab.broker import BrokerSettings, MosquittoBroker, find_mosquitto  # noqa: E402
from fedge.protocol.codec import Codec  # noqa: E402
from fedge.protocol.model_manifest import ModelManifest, mlp_tensor_layout  # noqa: E402
from fedge.protocol.sealing import read_header  # noqa: E402
from fedge.protocol.secagg import (  # noqa: E402
    AggregatorPhase,
    Deadlines,
    RoundConfig,
    choose_parameters,
    new_round_config,
)
from fedge.protocol.secagg.wire import Publication, RoundAnnouncement, WireError  # noqa: E402
from fedge.protocol.signing import key_id  # noqa: E402
from fedge.protocol.task import parse_task_spec  # noqa: E402
from fedge.protocol.topics import FleetTopics  # noqa: E402
from fedge.protocol.weights import weights_to_bytes  # noqa: E402
from rounds_common import (  # type: ignore[import-not-found, unused-ignore]  # noqa: E402
    DELTA_SCALE,
    EVALUATION,
    EXAMPLES,
    TRAIN_LOSS,
    round_settings,
    unit_normalisation,
)

DEFAULT_OUT = ROOT / "bench" / "results" / "secagg_mqtt.json"
QUICK_OUT = ROOT / "bench" / "results" / "secagg_mqtt-quick.json"
DEFAULT_TASK = ROOT / "tasks" / "har-watch.toml"

#: L2 clip bound of the secure rounds (as bench_secagg.py): a 5,447-coordinate normal(0, 0.01)
#: delta has norm ~0.74, so nothing is clipped and plain and secure carry the same update.
CLIP_NORM = 1.0
#: Phase length of the rounds in which everyone answers (each phase closes early).
PHASE_S = 60.0
DROP_FRACTION = 0.1
#: The drop round's masked-input deadline: this x the no-drop rounds' masked-input close, + 1 s.
DROP_DEADLINE_FACTOR, DROP_DEADLINE_MARGIN_S = 1.5, 1.0
ROUND_TIMEOUT_S = 180.0
READY_TIMEOUT_S = 90.0
FLUSH_TIMEOUT_S = 20.0
POLL_S = 0.02
MODEL_BYTES = b"bench_secagg_mqtt: a placeholder, the round engine never runs the model"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """Something went wrong that makes the numbers meaningless."""


# --- keys and updates: derived from labels, so the workers need no key transfer ------------------


def _key(label: str) -> bytes:
    return hashlib.sha256(f"fedge-bench-secagg-mqtt/{label}".encode()).digest()


AGG_SIGN = SigningKey(_key("aggregator-signing"))
AGG_BOX = PrivateKey(_key("aggregator-box"))


def device_ids(n: int) -> list[str]:
    return [f"dev-{i:03d}" for i in range(n)]


def box_key(device: str) -> PrivateKey:
    return PrivateKey(_key(f"box/{device}"))


def identity_key(device: str) -> SigningKey:
    return SigningKey(_key(f"identity/{device}"))


def enrolled(ids: Sequence[str]) -> dict[str, VerifyKey]:
    """The identity keys the operator's registry distributes (never the aggregator)."""
    return {d: identity_key(d).verify_key for d in ids}


def _seed(label: str) -> int:
    return int.from_bytes(_key(label)[:8], "big")


def device_update(device: str, parameter_count: int) -> npt.NDArray[np.float32]:
    """The device's update (the same in its plain and secure rounds)."""
    rng = np.random.default_rng(_seed(f"update/{device}"))
    return rng.normal(0.0, DELTA_SCALE, parameter_count).astype(np.float32)


def rounding_rng(device: str, round_id: str) -> np.random.Generator:
    return np.random.default_rng(_seed(f"rounding/{round_id}/{device}"))


def mqtt5_publish_bytes(topic: str, payload_bytes: int) -> int:
    """An MQTT 5 QoS 1 PUBLISH without properties (as bench_rounds.py): its size on the wire."""
    remaining = 2 + len(topic.encode()) + 2 + 1 + payload_bytes  # topic, packet id, properties length
    varint = 1 if remaining < 128 else 2 if remaining < 16_384 else 3 if remaining < 2_097_152 else 4
    return 1 + varint + remaining


def _client(client_id: str) -> mqtt.Client:
    """A paho 2 client (MQTT 5) with TCP_NODELAY: every party answers a message within
    milliseconds, which with Nagle on waits for the broker's delayed ACK (up to 40 ms a hop,
    see bench/mqtt_sim.py); the secure round has four such hops, the plain one one."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
    )
    client.max_queued_messages_set(0)
    client.on_socket_open = _set_nodelay
    return client


def _set_nodelay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(POLL_S)


# --- the devices: worker processes, each hosting N/k devices -------------------------------------


@dataclass
class DeviceRoundStats:
    """What one device did in one round."""

    cpu_s: float = 0.0
    cpu_by_message: dict[str, float] = field(default_factory=dict)
    sent_payload: int = 0
    sent_packets: int = 0
    sent: list[str] = field(default_factory=list)
    received_payload: int = 0
    received: int = 0
    refusals: dict[str, int] = field(default_factory=dict)


@dataclass
class SimDevice:
    device_id: str
    client: mqtt.Client
    update: npt.NDArray[np.float32]
    identity: DeviceIdentity
    counter: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    seen_version: int = 0
    rounds: dict[str, DeviceSecureRound] = field(default_factory=dict)
    records: dict[str, dict[str, str]] = field(default_factory=dict)
    gone: set[str] = field(default_factory=set)
    stats: dict[str, DeviceRoundStats] = field(default_factory=dict)
    infos: list[mqtt.MQTTMessageInfo] = field(default_factory=list)
    subscribed: bool = False


class DeviceWorker:
    """The devices of one worker process: one paho client (network thread) each, one work
    thread for all of them. paho callbacks only queue; the work thread verifies, computes,
    seals and publishes, timing each device's work with ``time.thread_time``."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.fleet: str = spec["fleet"]
        self.topics = FleetTopics(self.fleet)
        self.all_ids: list[str] = spec["all_ids"]
        self.drops: dict[str, set[str]] = {r: set(ds) for r, ds in spec["drops"].items()}
        self.neighbour_keys = enrolled(self.all_ids)
        self.trusted = {key_id(AGG_SIGN.verify_key): AGG_SIGN.verify_key}
        self.inbox: queue.Queue[tuple[str, str, bytes]] = queue.Queue()
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.devices: dict[str, SimDevice] = {}
        for d in spec["device_ids"]:
            client = _client(f"bench-sa-{self.fleet}-{d}")
            client.user_data_set(d)
            client.on_connect = self._on_connect
            client.on_subscribe = self._on_subscribe
            client.on_message = self._on_message
            identity = DeviceIdentity(self.fleet, d, box_key(d), AGG_BOX.public_key)
            update = device_update(d, int(spec["parameter_count"]))
            self.devices[d] = SimDevice(d, client, update, identity)
        self._worker = threading.Thread(target=self._run, name="devices", daemon=True)

    # paho callbacks (network threads) ------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, device: str, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            with self._lock:
                self.errors.append(f"{device}: the broker refused the connection: {reason}")
            return
        client.subscribe([(self.topics.manifest, 1), (self.topics.secagg_config_filter, 1)])

    def _on_subscribe(self, client: mqtt.Client, device: str, mid: int, codes: Any, props: Any) -> None:
        self.devices[device].subscribed = True

    def _on_message(self, client: mqtt.Client, device: str, message: mqtt.MQTTMessage) -> None:
        self.inbox.put((device, message.topic, bytes(message.payload)))

    # life cycle ----------------------------------------------------------------------------------

    def start(self, host: str, port: int) -> None:
        self._worker.start()
        for device in self.devices.values():
            device.client.connect_async(host, port, keepalive=60)
            device.client.loop_start()
        _wait(
            lambda: all(d.subscribed for d in self.devices.values()) or bool(self.errors),
            READY_TIMEOUT_S,
            f"{len(self.devices)} devices to connect and subscribe",
        )

    def stop(self) -> None:
        with contextlib.suppress(BenchError):
            _wait(
                lambda: all(i.is_published() for d in self.devices.values() for i in list(d.infos)),
                FLUSH_TIMEOUT_S,
                "the devices' publications to be acknowledged",
            )
        self._stop.set()
        self._worker.join(timeout=10.0)
        for device in self.devices.values():
            device.client.disconnect()
        for device in self.devices.values():
            device.client.loop_stop()

    def report(self) -> dict[str, Any]:
        return {
            "errors": list(self.errors),
            "stats": {d: {r: vars(s) for r, s in device.stats.items()} for d, device in self.devices.items()},
        }

    # the devices' work (the work thread) ---------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                device_id, topic, payload = self.inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if not payload:
                continue  # a cleared retained document: the round is over
            device = self.devices[device_id]
            started = time.thread_time()
            try:
                round_id, what = self._handle(device, topic, payload)
            except Exception as exc:  # reported as a failed run, never swallowed
                with self._lock:
                    self.errors.append(f"{device_id}: {type(exc).__name__}: {exc}")
                continue
            if round_id is None:
                continue
            stats = device.stats.setdefault(round_id, DeviceRoundStats())
            spent = time.thread_time() - started
            stats.cpu_s += spent
            stats.cpu_by_message[what] = stats.cpu_by_message.get(what, 0.0) + spent
            stats.received += 1
            stats.received_payload += len(payload)

    def _handle(self, device: SimDevice, topic: str, payload: bytes) -> tuple[str | None, str]:
        if topic == self.topics.manifest:
            return self._plain(device, payload)
        if mqtt.topic_matches_sub(self.topics.secagg_config_filter, topic):
            try:
                announcement = open_round_config(
                    topic, payload, fleet=self.fleet, aggregator_keys=AGG_SIGN.verify_key
                )
            except WireError as exc:
                raise BenchError(f"config refused: {exc.reason}") from None
            round_id = announcement.round_id
            if not announcement.config.is_selected(device.device_id) or round_id in device.rounds:
                return None, "config"
            device.rounds[round_id] = self._new_round(device, announcement)
            publications = device.rounds[round_id].start(time.time())
            device.client.subscribe(self.topics.secagg_device_filter(round_id, device.device_id), qos=1)
            self._publish(device, round_id, publications)
            return round_id, "config"
        round_id, what, _ = self.topics.secagg_parse(topic)
        secure = device.rounds.get(round_id)
        if secure is None or round_id in device.gone:
            return None, what
        self._publish(device, round_id, secure.on_message(topic, payload, time.time()))
        device.stats.setdefault(round_id, DeviceRoundStats()).refusals = dict(secure.refusals)
        return round_id, what

    def _plain(self, device: SimDevice, frame: bytes) -> tuple[str | None, str]:
        manifest = verify_manifest(frame, self.trusted, fleet=self.fleet, now=time.time())
        if manifest.version <= device.seen_version:
            return None, "manifest"  # a retained copy of a manifest already answered
        device.seen_version = manifest.version
        if manifest.phase != "train" or not manifest.is_selected(device.device_id):
            return None, "manifest"
        payload = update_payload(manifest, device.update, EXAMPLES, TRAIN_LOSS, EVALUATION)
        sealed = seal_contribution(
            device.identity, manifest.round_id, manifest.version, next(device.counter), "update", payload
        )
        topic = self.topics.update(device.device_id)
        self._publish(device, manifest.round_id, [Publication(topic, sealed, retain=False)])
        return manifest.round_id, "manifest"

    def _new_round(self, device: SimDevice, announcement: RoundAnnouncement) -> DeviceSecureRound:
        round_id = announcement.round_id
        d = device.device_id

        def quantised_update(config: RoundConfig) -> npt.NDArray[np.uint64]:
            return config.quantiser.quantise(device.update, rounding_rng(d, round_id))

        def persist(round_id: str, record: dict[str, str]) -> None:
            device.records[round_id] = dict(record)  # in memory: no disk in this bench

        return DeviceSecureRound(
            announcement,
            device_id=d,
            box_key=device.identity.device_key,
            aggregator_box_key=AGG_BOX.public_key,
            identity_key=identity_key(d),
            neighbour_keys=self.neighbour_keys,
            aggregator_keys=AGG_SIGN.verify_key,
            quantised_update=quantised_update,
            next_counter=lambda: next(device.counter),
            persist_revealed=persist,
            revealed=device.records.get(round_id),
        )

    def _publish(self, device: SimDevice, round_id: str, publications: list[Publication]) -> None:
        stats = device.stats.setdefault(round_id, DeviceRoundStats())
        for p in publications:
            if round_id in device.gone:
                return
            info = device.client.publish(p.topic, p.payload, qos=p.qos, retain=p.retain)
            device.infos.append(info)
            kind = read_header(p.payload)[0].kind
            stats.sent.append(kind)
            stats.sent_payload += len(p.payload)
            stats.sent_packets += mqtt5_publish_bytes(p.topic, len(p.payload))
            if kind == "secagg_shares" and device.device_id in self.drops.get(round_id, ()):
                device.gone.add(round_id)  # silent from now on in this round


def device_worker(conn: Connection, spec: dict[str, Any]) -> None:
    """A worker process's body: start the devices, say ready, serve until told to stop."""
    worker: DeviceWorker | None = None
    try:
        worker = DeviceWorker(spec)
        worker.start(spec["host"], int(spec["port"]))
        conn.send(("ready", os.getpid()))
        command = conn.recv()
        if command != "stop":
            raise BenchError(f"unexpected command {command!r}")
        worker.stop()
        conn.send(("result", worker.report()))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        if worker is not None:
            with contextlib.suppress(Exception):
                worker.stop()
    finally:
        conn.close()


class Workers:
    """The worker processes of one fleet size (spawned, so no paho thread is forked)."""

    def __init__(self, specs: list[dict[str, Any]]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for spec in specs:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=device_worker, args=(child, spec), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        try:
            self.pids: list[int] = [self._expect(conn, "ready", READY_TIMEOUT_S + 30) for conn in self.conns]
        except BaseException:
            self.kill()
            raise

    @staticmethod
    def _expect(conn: Connection, what: str, timeout: float) -> Any:
        if not conn.poll(timeout):
            raise BenchError(f"a device worker did not answer {what!r} within {timeout:.0f} s")
        tag, value = conn.recv()
        if tag != what:
            raise BenchError(f"a device worker failed: {value}")
        return value

    def cpu_s(self) -> float:
        return sum(process_cpu_s(pid) for pid in self.pids)

    def stop(self) -> list[dict[str, Any]]:
        for conn in self.conns:
            conn.send("stop")
        results = [self._expect(conn, "result", FLUSH_TIMEOUT_S + 30) for conn in self.conns]
        for proc in self.procs:
            proc.join(timeout=10.0)
        return results

    def kill(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5.0)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5.0)


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process (fields 14 and 15 of /proc/<pid>/stat; 10 ms ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_busy_s() -> float:
    """CPU seconds every core of the machine spent busy since boot (/proc/stat: not idle, not
    waiting for I/O)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / CLOCK_TICKS


# --- the aggregator side ---------------------------------------------------------------------------


class AggregatorClient:
    """The aggregator's MQTT side: a client on ``update/+`` queueing to the driving thread."""

    def __init__(self, broker: MosquittoBroker, fleet: str) -> None:
        self.topics = FleetTopics(fleet)
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.infos: list[mqtt.MQTTMessageInfo] = []
        self._subscribed = threading.Event()
        self.client = _client(f"bench-sa-aggregator-{fleet}")
        self.client.on_connect = lambda c, *_: c.subscribe(self.topics.update_filter, qos=1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, keepalive=60)
        self.client.loop_start()
        if not self._subscribed.wait(READY_TIMEOUT_S):
            raise BenchError("the aggregator's client did not subscribe")

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.inbox.put((message.topic, bytes(message.payload)))

    def publish(self, topic: str, payload: bytes, retain: bool) -> None:
        self.infos.append(self.client.publish(topic, payload, qos=1, retain=retain))

    def flush(self) -> None:
        _wait(
            lambda: all(i.is_published() for i in self.infos),
            FLUSH_TIMEOUT_S,
            "the aggregator's publications",
        )

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Meter:
    """Wall time, the driving thread's CPU, the processes' CPU and the machine's, over a round."""

    workers: Workers
    broker_pid: int
    start: dict[str, float] = field(default_factory=dict)

    def _read(self) -> dict[str, float]:
        return {
            "wall": time.perf_counter(),
            "thread": time.thread_time(),
            "self": self_cpu_s(),
            "workers": self.workers.cpu_s(),
            "broker": process_cpu_s(self.broker_pid),
            "machine_busy": machine_busy_s(),
        }

    def begin(self) -> None:
        self.start = self._read()
        self.start["load"] = os.getloadavg()[0]

    def end(self) -> dict[str, Any]:
        now = self._read()
        d = {k: now[k] - self.start[k] for k in now}
        ours = d["self"] + d["workers"] + d["broker"]
        return {
            "round_s": d["wall"],
            "aggregator_cpu_s": d["thread"],
            "aggregator_process_cpu_s": d["self"],
            "workers_process_cpu_s": d["workers"],
            "broker_cpu_s": d["broker"],
            "foreign_cpu_s": max(0.0, d["machine_busy"] - ours),
            "loadavg_1m_before": self.start["load"],
            "loadavg_1m_after": os.getloadavg()[0],
        }


def plain_round(
    agg: AggregatorClient,
    meter: Meter,
    n: int,
    version_base: int,
    model: tuple[ModelManifest, bytes, npt.NDArray[np.float32]],
) -> tuple[dict[str, Any], RoundRecord, str, npt.NDArray[np.float64]]:
    """One plain round through a fresh engine (manifest version ``version_base + 1``)."""
    manifest, model_bytes, weights = model
    ids = device_ids(n)
    state = EngineState(
        version=version_base,
        last_manifest_sha256="",
        completed_rounds=0,
        weights=weights.copy(),
        normalisation=unit_normalisation(manifest),
        counters={},
    )
    registry = {d: box_key(d).public_key for d in ids}
    engine = RoundEngine(
        agg.topics.fleet,
        round_settings(n, Codec.FP32),
        manifest,
        model_bytes,
        AGG_BOX,
        AGG_SIGN,
        registry,
        state,
    )
    received = 0
    meter.begin()
    publication = engine.open_round(time.time())
    agg.publish(agg.topics.manifest, publication.manifest_frame, retain=True)
    deadline = time.monotonic() + ROUND_TIMEOUT_S
    while True:
        try:
            topic, payload = agg.inbox.get(timeout=POLL_S)
        except queue.Empty:
            pass
        else:
            received += len(payload)
            engine.handle(topic, payload, time.time())
        if engine.round_due(time.time()):
            record = engine.close_round()
            break
        if time.monotonic() > deadline:
            raise BenchError(f"N={n}: the plain round did not close within {ROUND_TIMEOUT_S:.0f} s")
    measured = meter.end()
    frame = publication.manifest_frame
    measured |= {
        "aggregator_sent_payload": len(frame),
        "aggregator_sent_packets": mqtt5_publish_bytes(agg.topics.manifest, len(frame)),
        "aggregator_sent_messages": 1,
        "aggregator_sent_by_document": {"manifest": len(frame)},
        "aggregator_received_payload": received,
    }
    moved = np.asarray(engine.state.weights, np.float64) - weights.astype(np.float64)
    return measured, record, publication.manifest.round_id, moved


def secure_round(
    agg: AggregatorClient,
    meter: Meter,
    n: int,
    round_id: str,
    parameter_count: int,
    mask_deadline_s: float | None = None,
) -> tuple[dict[str, Any], SecureRoundDriver]:
    """One secure round; ``mask_deadline_s``: the masked-input phase closes that long after the
    start at the latest (the drop round); None: every phase gets ``PHASE_S``."""
    ids = device_ids(n)
    meter.begin()
    now = time.time()
    if mask_deadline_s is None:
        deadlines = Deadlines.every(now, PHASE_S)
    else:  # advertising and sharing close early anyway (everyone answers them)
        close = now + mask_deadline_s
        deadlines = Deadlines(close, close, close, close + PHASE_S)
    config = new_round_config(
        round_id, ids, vector_length=parameter_count, clip_norm=CLIP_NORM, deadlines=deadlines
    )
    driver = SecureRoundDriver(
        fleet=agg.topics.fleet,
        config=config,
        model_version=1,
        signing_key=AGG_SIGN,
        box_key=AGG_BOX,
        registry={d: box_key(d).public_key for d in ids},
        identity_keys=enrolled(ids),
    )
    started = time.perf_counter()
    sent: Counter[str] = Counter()
    messages = 0
    packets = 0
    received = 0
    last_masked = 0.0
    phases: dict[str, float] = {}
    clears: list[Publication] = []

    def publish(publications: list[Publication]) -> None:
        nonlocal packets, messages
        for p in publications:
            if not p.payload:
                clears.append(p)
                continue
            agg.publish(p.topic, p.payload, p.retain)
            sent[agg.topics.secagg_parse(p.topic)[1]] += len(p.payload)
            packets += mqtt5_publish_bytes(p.topic, len(p.payload))
            messages += 1

    publish(driver.start(time.time()))
    phase = driver.phase
    deadline = time.monotonic() + ROUND_TIMEOUT_S
    while True:
        try:
            topic, payload = agg.inbox.get(timeout=POLL_S)
        except queue.Empty:
            pass
        else:
            received += len(payload)
            outcome = driver.handle(topic, payload, time.time())
            if outcome.kind == "secagg_masked" and outcome.accepted:
                last_masked = time.perf_counter() - started
        publish(driver.tick(time.time()))
        if driver.phase != phase:
            phases[str(phase)] = time.perf_counter() - started  # when that phase closed
            phase = driver.phase
        if driver.done:
            break
        if time.monotonic() > deadline:
            raise BenchError(f"N={n}: secure round still in {driver.phase} after {ROUND_TIMEOUT_S:.0f} s")
    measured = meter.end()
    for p in clears:  # after the clock: the round's documents are cleared from the broker
        agg.publish(p.topic, p.payload, p.retain)
    mask_closed = phases.get(str(AggregatorPhase.MASKED_INPUT), 0.0)
    measured |= {
        "aggregator_sent_payload": sum(sent.values()),
        "aggregator_sent_packets": packets,
        "aggregator_sent_messages": messages,
        "aggregator_sent_by_document": dict(sent),
        "aggregator_clears": len(clears),
        "aggregator_clear_packets": sum(mqtt5_publish_bytes(p.topic, 0) for p in clears),
        "aggregator_received_payload": received,
        "phase_closed_at_s": phases,
        "last_masked_input_at_s": last_masked,
        "deadline_wait_s": max(0.0, mask_closed - last_masked) if mask_deadline_s is not None else 0.0,
        "masked_input_deadline_s": mask_deadline_s,
        "k": config.degree,
        "t": config.threshold,
        "bits": config.bits,
    }
    measured["round_s_without_wait"] = measured["round_s"] - measured["deadline_wait_s"]
    return measured, driver


# --- combining the two sides ------------------------------------------------------------------------


def device_side(reports: list[dict[str, Any]], round_id: str, gone: set[str]) -> dict[str, Any]:
    """Means over the devices that did every phase (the dropped ones apart)."""
    stats = {d: per[round_id] for r in reports for d, per in r["stats"].items() if round_id in per}
    full = [s for d, s in stats.items() if d not in gone]
    dropped = [s for d, s in stats.items() if d in gone]
    if not full:
        raise BenchError(f"round {round_id}: no device statistics")
    kinds = sorted({m for s in full for m in s["cpu_by_message"]})
    refusals: Counter[str] = Counter()
    for s in stats.values():
        refusals.update(s["refusals"])
    out = {
        "devices_reporting": len(stats),
        "device_cpu_s": statistics.fmean(s["cpu_s"] for s in full),
        "device_cpu_s_max": max(s["cpu_s"] for s in full),
        "device_cpu_s_by_message": {
            k: statistics.fmean(s["cpu_by_message"].get(k, 0.0) for s in full) for k in kinds
        },
        "device_cpu_s_sum": sum(s["cpu_s"] for s in stats.values()),
        "device_sent_payload": statistics.fmean(s["sent_payload"] for s in full),
        "device_sent_packets": statistics.fmean(s["sent_packets"] for s in full),
        "device_sent_messages": statistics.fmean(len(s["sent"]) for s in full),
        "device_received_payload": statistics.fmean(s["received_payload"] for s in full),
        "device_received_messages": statistics.fmean(s["received"] for s in full),
        "device_refusals": dict(refusals),
        "device_kinds_sent": sorted(Counter(k for s in full for k in s["sent"]).items()),
    }
    if dropped:
        out["dropped_device_sent_payload"] = statistics.fmean(s["sent_payload"] for s in dropped)
        out["dropped_device_cpu_s"] = statistics.fmean(s["cpu_s"] for s in dropped)
    return out


def check_plain(
    n: int, record: RoundRecord, moved: npt.NDArray[np.float64], parameter_count: int
) -> list[str]:
    failures = []
    if record.outcome != "aggregated" or record.reported != n or record.rejected:
        failures.append(
            f"plain N={n}: {record.outcome}, {record.reported} reported, rejected {record.rejected}"
        )
    mean = np.mean([device_update(d, parameter_count).astype(np.float64) for d in device_ids(n)], axis=0)
    error = float(np.max(np.abs(moved - mean)))
    if error > 1e-6:
        failures.append(f"plain N={n}: the model moved by something else than the mean update ({error:.3g})")
    return failures


def check_secure(n: int, driver: SecureRoundDriver, gone: set[str], parameter_count: int) -> list[str]:
    result = driver.result
    if result is None:
        return [f"secure N={n}: no sum ({driver.abort_reason})"]
    failures = []
    survivors = sorted(set(device_ids(n)) - gone)
    if list(result.survivors) != survivors or sorted(result.recovered) != sorted(gone):
        failures.append(
            f"secure N={n}: survivors {len(result.survivors)}, recovered {sorted(result.recovered)}"
        )
    if driver.rejected:
        failures.append(f"secure N={n}: rejected {dict(driver.rejected)}")
    config = driver.config
    expected = np.zeros(parameter_count, dtype=np.uint64)
    for d in survivors:
        update = device_update(d, parameter_count)
        expected += config.quantiser.quantise(update, rounding_rng(d, config.round_id))
    expected &= np.uint64((1 << config.bits) - 1)
    if not np.array_equal(result.total, expected):
        failures.append(f"secure N={n}: the unmasked sum is not the sum of the survivors' quantised updates")
    return failures


# --- the run ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    task_path: Path
    out: Path
    ns: tuple[int, ...]
    reps: int
    workers: int
    drop_n: int
    quick: bool


def build_model(task_path: Path) -> tuple[ModelManifest, bytes, npt.NDArray[np.float32]]:
    """The har-watch model's manifest and initial weights, without TensorFlow (see the docstring)."""
    task = parse_task_spec(task_path.read_text(encoding="utf-8"))
    count = sum(t.size for t in mlp_tensor_layout(task.layer_sizes))
    weights = np.random.default_rng(0).normal(0.0, 0.1, count).astype(np.float32)
    manifest = ModelManifest(
        task=task,
        model_file="model.tflite",
        model_sha256=hashlib.sha256(MODEL_BYTES).hexdigest(),
        model_bytes=len(MODEL_BYTES),
        initial_weights_sha256=hashlib.sha256(weights_to_bytes(weights)).hexdigest(),
        normalisation=None,
        tensorflow_version="none (bench)",
    )
    return manifest, MODEL_BYTES, weights


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every numeric scalar the median over the runs; the rest from the first run."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in runs)
    out["reps"] = len(runs)
    return out


def run_n(
    cfg: Config, broker: MosquittoBroker, n: int, model: tuple[ModelManifest, bytes, npt.NDArray[np.float32]]
) -> tuple[dict[str, Any], list[str]]:
    manifest = model[0]
    parameter_count = manifest.parameter_count
    fleet = f"bench-sa-{n}"
    ids = device_ids(n)
    drop = n == cfg.drop_n
    gone: set[str] = set()
    if drop:
        count = max(1, round(n * DROP_FRACTION))
        rng = np.random.default_rng(_seed(f"drop/{n}"))
        gone = {str(d) for d in rng.choice(ids, size=count, replace=False)}
    k = max(1, min(cfg.workers, n))
    specs: list[dict[str, Any]] = [
        {
            "fleet": fleet,
            "host": broker.host,
            "port": broker.port,
            "all_ids": ids,
            "device_ids": ids[i::k],
            "parameter_count": parameter_count,
            "drops": {"sa-drop": sorted(gone)},
        }
        for i in range(k)
    ]
    failures: list[str] = []
    print(f"[N={n}] starting {k} worker processes ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    workers = Workers(specs)
    agg: AggregatorClient | None = None
    try:
        agg = AggregatorClient(broker, fleet)
        if broker.pid is None:
            raise BenchError("the broker is not running")
        meter = Meter(workers, broker.pid)
        setup_s = time.perf_counter() - started
        plain_runs: list[dict[str, Any]] = []
        secure_runs: list[dict[str, Any]] = []
        plain_ids: list[str] = []
        secure_ids: list[str] = []
        drivers: dict[str, SecureRoundDriver] = {}
        for rep in range(cfg.reps):
            print(f"[N={n}] plain round {rep + 1}/{cfg.reps} ...", file=sys.stderr, flush=True)
            measured, record, round_id, moved = plain_round(agg, meter, n, 10 * rep, model)
            failures += check_plain(n, record, moved, parameter_count)
            plain_runs.append(measured)
            plain_ids.append(round_id)
            agg.flush()
            print(f"[N={n}] secure round {rep + 1}/{cfg.reps} ...", file=sys.stderr, flush=True)
            round_id = f"sa-{rep + 1}"
            measured, driver = secure_round(agg, meter, n, round_id, parameter_count)
            failures += check_secure(n, driver, set(), parameter_count)
            secure_runs.append(measured)
            secure_ids.append(round_id)
            drivers[round_id] = driver
            agg.flush()
        agg.publish(agg.topics.manifest, b"", retain=True)  # clear the last plain manifest
        drop_run: dict[str, Any] | None = None
        if drop:
            mask_closes = [r["phase_closed_at_s"][str(AggregatorPhase.MASKED_INPUT)] for r in secure_runs]
            wait = DROP_DEADLINE_FACTOR * statistics.median(mask_closes) + DROP_DEADLINE_MARGIN_S
            what = f"[N={n}] secure round, {len(gone)} dropping after their shares"
            print(f"{what} ...", file=sys.stderr, flush=True)
            drop_run, driver = secure_round(agg, meter, n, "sa-drop", parameter_count, mask_deadline_s=wait)
            failures += check_secure(n, driver, gone, parameter_count)
            drop_run["dropped"] = sorted(gone)
            drop_run["recovered"] = len(driver.result.recovered) if driver.result else None
        agg.flush()
        agg.stop()
        agg = None
        reports = workers.stop()
    except BaseException:
        workers.kill()
        raise
    finally:
        if agg is not None:
            agg.stop()
    for report in reports:
        failures += [f"N={n}: device error: {e}" for e in report["errors"]]
    for runs, round_ids in ((plain_runs, plain_ids), (secure_runs, secure_ids)):
        for run, round_id in zip(runs, round_ids, strict=True):
            run |= device_side(reports, round_id, set())
            serial(run, n, k)
            if run["device_refusals"]:
                failures.append(f"N={n} {round_id}: devices refused {run['device_refusals']}")
    if drop_run is not None:
        drop_run |= device_side(reports, "sa-drop", gone)
        serial(drop_run, n, k)
        if drop_run["device_refusals"]:
            failures.append(f"N={n} sa-drop: devices refused {drop_run['device_refusals']}")
    params = choose_parameters(n)
    plain, secure = median_of(plain_runs), median_of(secure_runs)
    entry: dict[str, Any] = {
        "n": n,
        "workers": k,
        "devices_per_worker": [len(s["device_ids"]) for s in specs],
        "setup_s": setup_s,
        "parameters": {"k": params.degree, "t": params.threshold, "complete_graph": params.complete},
        "plain": plain,
        "secure": secure,
        "ratios": ratios(plain, secure),
        "plain_runs": plain_runs,
        "secure_runs": secure_runs,
    }
    if drop_run is not None:
        entry["secure_drop"] = drop_run
        entry["drop_vs_secure"] = {
            "round": drop_run["round_s"] / secure["round_s"],
            "round_without_wait": drop_run["round_s_without_wait"] / secure["round_s"],
            "aggregator_cpu": drop_run["aggregator_cpu_s"] / secure["aggregator_cpu_s"],
            "device_cpu": drop_run["device_cpu_s"] / secure["device_cpu_s"],
            "device_bytes": drop_run["device_sent_payload"] / secure["device_sent_payload"],
        }
    return entry, failures


def serial(run: dict[str, Any], n: int, workers: int) -> None:
    """What simulating N devices on ``workers`` work threads adds to the round: their CPU in
    turn (``devices_serialised_s``), and the round time had every device its own core
    (``round_s_parallel_devices_est``: minus that, plus the slowest device; a rough estimate,
    it assumes device work is on the critical path, which it is in every phase)."""
    run["device_process_cpu_s"] = run["workers_process_cpu_s"] / n
    run["devices_serialised_s"] = run["device_cpu_s_sum"] / workers
    run["round_s_parallel_devices_est"] = max(
        0.0, run["round_s"] - run["devices_serialised_s"] + run["device_cpu_s_max"]
    )


def ratios(plain: dict[str, Any], secure: dict[str, Any]) -> dict[str, float]:
    """secure / plain."""
    return {
        "round": secure["round_s"] / plain["round_s"],
        "device_bytes_sent": secure["device_sent_payload"] / plain["device_sent_payload"],
        "device_bytes_received": secure["device_received_payload"] / plain["device_received_payload"],
        "aggregator_bytes_sent": secure["aggregator_sent_payload"] / plain["aggregator_sent_payload"],
        "device_cpu": secure["device_cpu_s"] / plain["device_cpu_s"],
        "aggregator_cpu": secure["aggregator_cpu_s"] / plain["aggregator_cpu_s"],
    }


def run(cfg: Config) -> tuple[dict[str, Any], list[str]]:
    exe = find_mosquitto()
    if exe is None:
        raise BenchError("mosquitto is not installed (apt-get install mosquitto, or scripts/system-deps.sh)")
    model = build_model(cfg.task_path)
    results: dict[str, Any] = {}
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fedge-secagg-mqtt-") as tmp:
        settings = BrokerSettings(data_dir=Path(tmp) / "mosquitto")
        with MosquittoBroker(settings, executable=exe) as broker:
            for n in cfg.ns:
                entry, found = run_n(cfg, broker, n, model)
                results[str(n)] = entry
                failures += found
            broker_info = {"host": broker.host, "port": broker.port, "mosquitto": str(exe)}
    manifest = model[0]
    report = {
        "benchmark": "secagg_mqtt",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "broker": broker_info,
        "task": str(cfg.task_path.relative_to(ROOT) if cfg.task_path.is_relative_to(ROOT) else cfg.task_path),
        "layer_sizes": list(manifest.task.layer_sizes),
        "parameter_count": manifest.parameter_count,
        "config": {
            "ns": list(cfg.ns),
            "reps": cfg.reps,
            "workers": cfg.workers,
            "drop_n": cfg.drop_n,
            "drop_fraction": DROP_FRACTION,
            "clip_norm": CLIP_NORM,
            "phase_s": PHASE_S,
            "quick": cfg.quick,
        },
        "measurement": {
            "round_s": "wall, from just before the manifest (plain) / round config (secure) is signed "
            "and published to the result (close_round returned / the driver's sum is there)",
            "aggregator_cpu_s": "time.thread_time of the thread driving the RoundEngine / "
            "SecureRoundDriver (its paho network thread not included: aggregator_process_cpu_s is "
            "this whole process, which hosts nothing else)",
            "device_cpu_s": "time.thread_time of the worker thread around each device's work on "
            "each message, summed per device, mean over the devices that did every phase",
            "device_process_cpu_s": "the worker processes' CPU over the round / N (paho threads included)",
            "bytes": "payload bytes of MQTT publishes; *_packets: MQTT 5 PUBLISH packet sizes",
            "foreign_cpu_s": "machine busy CPU seconds during the round minus this bench's "
            "processes (this one, the workers, the broker)",
            "devices": "light: no training, no blob download; one work thread per worker process "
            "serialises its devices' crypto (round times include N x device CPU / workers)",
            "secure_without_manifest": "a production secure round is announced by a manifest too "
            "(the plain round's manifest bytes and verify cost come on top)",
        },
        "results": results,
    }
    return report, failures


# --- output --------------------------------------------------------------------------------------------


def kb(value: float) -> str:
    return f"{value / 1000:,.1f}"


def ms(value: float) -> str:
    return f"{value * 1000:,.1f}"


def table(report: dict[str, Any]) -> list[str]:
    head = (
        f"{'N':>4} {'round':<13} {'round s':>8} {'x':>6} {'dev kB out':>10} {'x':>6} {'dev kB in':>9} "
        f"{'agg kB out':>10} {'x':>6} {'dev ms':>8} {'x':>6} {'agg ms':>9} {'x':>6} {'load':>5}"
    )
    lines = [head, "-" * len(head)]
    for n, e in report["results"].items():
        p, s, r = e["plain"], e["secure"], e["ratios"]

        def row(name: str, x: dict[str, Any], rt: dict[str, Any] | None, n: str = n) -> str:
            def ratio(key: str) -> str:
                if rt is None:
                    return f"{'':>6}"
                return f"{rt[key]:>5.1f}x" if rt[key] < 100 else f"{rt[key]:>5.0f}x"

            return (
                f"{n:>4} {name:<13} {x['round_s']:>8.3f} {ratio('round')} {kb(x['device_sent_payload']):>10} "
                f"{ratio('device_bytes_sent')} {kb(x['device_received_payload']):>9} "
                f"{kb(x['aggregator_sent_payload']):>10} {ratio('aggregator_bytes_sent')} "
                f"{ms(x['device_cpu_s']):>8} {ratio('device_cpu')} {ms(x['aggregator_cpu_s']):>9} "
                f"{ratio('aggregator_cpu')} {x['loadavg_1m_before']:>5.2f}"
            )

        lines.append(row("plain", p, None))
        lines.append(row(f"secure k={e['parameters']['k']}", s, r))
        if "secure_drop" in e:
            d = e["secure_drop"]
            v = {
                "round": d["round_s"] / p["round_s"],
                "device_bytes_sent": d["device_sent_payload"] / p["device_sent_payload"],
                "aggregator_bytes_sent": d["aggregator_sent_payload"] / p["aggregator_sent_payload"],
                "device_cpu": d["device_cpu_s"] / p["device_cpu_s"],
                "aggregator_cpu": d["aggregator_cpu_s"] / p["aggregator_cpu_s"],
            }
            lines.append(row(f"secure -{len(d['dropped'])}", d, v))
    lines.append("")
    lines.append("x = secure / plain (medians over reps); dev kB = payload published / received by one")
    lines.append("device (mean); agg kB out = what the aggregator published; ms = CPU of the party's thread")
    for n, e in report["results"].items():
        s = e["secure"]
        phases = ", ".join(f"{k} {v:.3f}" for k, v in s["phase_closed_at_s"].items())
        lines.append(f"N={n} secure: phases closed at (s) {phases}; broker CPU {s['broker_cpu_s']:.2f} s")
        lines.append(
            f"N={n} devices' crypto in turn on {e['workers']} work threads: "
            f"{s['devices_serialised_s']:.3f} s "
            f"of the secure round ({e['plain']['devices_serialised_s']:.3f} s of the plain); had each device "
            f"its own core: secure ~{s['round_s_parallel_devices_est']:.3f} s, "
            f"plain ~{e['plain']['round_s_parallel_devices_est']:.3f} s (estimate)"
        )
        if "secure_drop" in e:
            d, v = e["secure_drop"], e["drop_vs_secure"]
            lines.append(
                f"N={n} drop {len(d['dropped'])}: round {d['round_s']:.3f} s, of which deadline wait "
                f"{d['deadline_wait_s']:.3f} s (masked-input deadline {d['masked_input_deadline_s']:.2f} s); "
                f"without the wait {d['round_s_without_wait']:.3f} s = {v['round_without_wait']:.2f}x the "
                f"no-drop round; aggregator CPU {v['aggregator_cpu']:.2f}x, device CPU {v['device_cpu']:.2f}x"
            )
    foreign = [
        x["foreign_cpu_s"] / x["round_s"]
        for e in report["results"].values()
        for x in [*e["plain_runs"], *e["secure_runs"], *([e["secure_drop"]] if "secure_drop" in e else [])]
    ]
    loads = [
        x[k]
        for e in report["results"].values()
        for x in [*e["plain_runs"], *e["secure_runs"]]
        for k in ("loadavg_1m_before", "loadavg_1m_after")
    ]
    lines.append(
        f"load: 1-min load average {min(loads):.2f}..{max(loads):.2f} ({report['load']['cores']} cores); "
        f"CPU used by other processes: during the rounds {min(foreign):.2f}..{max(foreign):.2f} cores "
        f"(mean {statistics.fmean(foreign):.2f}), over the whole run "
        f"{report['load']['foreign_cores_mean']:.2f}"
    )
    return lines


def plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib  # optional, demo-only dependency (fedge[demo])

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    ns = [int(n) for n in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    for mode, color in (("plain", "tab:gray"), ("secure", "tab:blue")):
        left.plot(ns, [results[str(n)][mode]["round_s"] for n in ns], marker="o", color=color, label=mode)
        right.plot(
            ns,
            [results[str(n)][mode]["device_sent_payload"] / 1000 for n in ns],
            marker="o",
            color=color,
            label=f"{mode}: published",
        )
        right.plot(
            ns,
            [results[str(n)][mode]["device_received_payload"] / 1000 for n in ns],
            marker="s",
            linestyle="--",
            color=color,
            label=f"{mode}: received",
        )
    for n in ns:
        drop = results[str(n)].get("secure_drop")
        if drop is not None:
            gone = len(drop["dropped"])
            left.plot(
                [n],
                [drop["round_s"]],
                marker="v",
                color="tab:red",
                linestyle="",
                label=f"secure, {gone} drop",
            )
            left.plot(
                [n],
                [drop["round_s_without_wait"]],
                marker="^",
                color="tab:orange",
                linestyle="",
                label=f"secure, {gone} drop, minus deadline wait",
            )
    left.set_yscale("log")
    left.set_xlabel("devices N")
    left.set_ylabel("round time (s, log)")
    left.set_title("round time over Mosquitto (median)")
    right.set_xlabel("devices N")
    right.set_ylabel("kB per device per round")
    right.set_title("bytes per device (MQTT payload)")
    for ax in (left, right):
        ax.set_xticks(ns)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(
        f"har-watch ({report['parameter_count']:,} parameters): secure aggregation vs plain rounds, "
        f"{report['config']['workers']} device worker processes"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def parse_ns(text: str) -> tuple[int, ...]:
    try:
        ns = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not ns or any(n < 3 or n > 500 for n in ns):
        raise argparse.ArgumentTypeError("each N must be in 3..500")
    return ns


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help=f"JSON results (default {DEFAULT_OUT})")
    parser.add_argument("--task", type=Path, default=DEFAULT_TASK)
    parser.add_argument("--ns", type=parse_ns, default=None, help="fleet sizes (default 10,50,100)")
    parser.add_argument("--reps", type=int, default=None, help="rounds per N and kind (default 5; --quick 1)")
    parser.add_argument("--workers", type=int, default=2, help="device worker processes (default 2)")
    parser.add_argument("--drop-n", type=int, default=None, help="N of the drop round (default 50)")
    parser.add_argument("--quick", action="store_true", help="smoke run: N = 10, one rep, drop round at 10")
    args = parser.parse_args(argv)
    ns = args.ns or ((10,) if args.quick else (10, 50, 100))
    reps = args.reps or (1 if args.quick else 5)
    drop_n = args.drop_n or (10 if args.quick else 50)
    if reps < 1 or args.workers < 1:
        parser.error("--reps and --workers must be >= 1")
    out: Path = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    cfg = Config(args.task.resolve(), out, ns, reps, args.workers, drop_n, args.quick)
    started = time.perf_counter()
    load_before, busy_before = os.getloadavg(), machine_busy_s()
    ours_before = self_cpu_s() + _children_cpu_s()
    try:
        report, failures = run(cfg)
    except Exception:  # any failure makes the numbers meaningless
        traceback.print_exc()
        return 1
    wall = time.perf_counter() - started
    report["bench_wall_s"] = wall
    # Every process of the bench is reaped by now (workers joined, broker waited for).
    ours = self_cpu_s() + _children_cpu_s() - ours_before
    report["load"] = {
        "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()),
        "bench_cpu_s": ours,
        "machine_busy_cpu_s": machine_busy_s() - busy_before,
        "foreign_cores_mean": max(0.0, machine_busy_s() - busy_before - ours) / wall,
        "cores": os.cpu_count(),
    }
    report["validity_failures"] = failures
    report["passed"] = not failures
    lines = table(report)
    report["table"] = lines
    print("\n".join(lines))
    png = out.with_suffix(".png")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        plot(png, report)
    except OSError as exc:
        print(f"cannot write {out}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out} and {png} ({report['bench_wall_s']:.0f} s)")
    for failure in failures:
        print(f"VALIDITY FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
