"""Robust aggregation against 2 malicious devices of 7, through a real broker (issue 15,
"Robustness"): held-out accuracy per strategy and attack, against each strategy's clean run and
plain FedAvg's, in one run.

Everything is the product but the devices' shell: a real Mosquitto broker (started here on a
free loopback port), the real aggregator process (``fedge aggregator run``, through
``rounds_worker.py`` so its CPU and peak RSS are reported) with the deployment's ``[rounds]``
defaults plus ``strategy = X``, and 7 devices, one MQTT connection each (subjects 1-7 of the
real smartwatch data, ``fedge.lab.har_watch``). Each device does what the agent does: verifies
the signed manifest, sends its feature moments in the moments round, fetches the model and
weights blobs the manifest names (each device its own copy, hash checked), trains with the
LiteRT interpreter on its own data (the agent's seeded 80/20 split, the task's local epochs,
rng seeded by the manifest version), evaluates on its hold-out, encodes its delta in the round's
codec, seals it with its own key and publishes it (QoS 1). A passive observer
(``fedge.lab.observer.FleetObserver``) scores every published global model on subjects 8-10.

Attackers: the devices of subjects 6 and 7 (``ATTACKERS``), in every train round (their moments
are honest: the moments attack is ``bench_poisoning.py``'s). Each trains honestly and then sends

- ``sign_flip``: ``-5 x`` its honest delta (``SIGN_FLIP_SCALE``);
- ``scaled``: ``10 x`` its honest delta (``SCALE_FACTOR``);
- ``label_flip``: the honestly encoded delta of training on labels ``y -> (y + 1) mod 7`` (its
  hold-out relabelled too: the device's data is mislabelled, its code is the agent's).

The aggregator's default norm bounds apply in front of every strategy: an update is clipped to
the smallest of 0.5 x the model's norm and 1.0 x the previous train round's median update norm
(``RoundSettings``; the first train round has only the first). So from the second round on a
10x or -5x update arrives at most at the median norm: ``scaled`` then points where an honest
update points, and ``sign_flip`` is an honest-sized step backwards.

Strategies (``STRATEGIES``): ``fedavg`` (the baseline of every comparison); ``fedavg_nobounds``
(FedAvg with ``update_norm_ratio = update_norm_adaptive = 0``: what the attacks do once nothing
clips them, i.e. what the bounds are worth); ``median``; ``trimmed_mean`` with ``trim_fraction =
0.3`` (``floor(0.3 x 7) = 2`` values dropped at each end of each coordinate: the middle 3 of 7
averaged); ``krum`` and ``multi_krum`` with ``byzantine_devices = 2`` (``n > 2f + 2 = 6``: all 7
must report; Multi-Krum averages the ``n - f = 5`` best-scored). ``weighting = "equal"`` (the
deployment default, and required by the robust strategies) in every run, FedAvg's too, so only
the aggregation differs. ``min_devices = 7`` in every run (Krum refuses less with f = 2): every
device reports in every round, so it only matters if one stops; every other ``[rounds]`` key is
the deployment default (``server_learning_rate = 1.0``, norm bounds, ``round_timeout_s = 60``).
Each strategy runs clean (no attacker) and under each attack, from the same initial model.

A run that can no longer finish -- the model diverged so that a device's training fails (a NaN:
the agent sends nothing and, with ``min_devices = 7``, no round can aggregate), or one round
aborted twice in a row -- is stopped there: the fleet is stuck with its last model, which is the
run's final one (``stalled_after_round``).

Reported per strategy x attack: the final model's held-out accuracy (after ``--rounds`` train
rounds), the mean of the last 5 rounds', the difference from the strategy's own clean run and
from FedAvg's clean run, and whether a robust strategy stays within 5 points (``TOLERANCE``) of
its clean run (the issue's claim) and of FedAvg's clean run; the updates clipped, rounds
aborted, updates rejected. Validity (a failure exits 1): every run reaches its final model (or
stalls, as above), every train round aggregated all 7 updates, nothing was rejected, the
observer scored every model.

Usage: ``python bench/bench_robust_mqtt.py [--out bench/results/robust_mqtt.json] [--rounds 20]
[--quick]`` (``make bench-robust-mqtt``); ``--quick``: 5 rounds, fedavg and trimmed_mean only,
written to ``robust_mqtt-quick.json`` unless ``--out``. The plot goes next to the JSON (``.png``).
Exit codes: 0 ran and valid (a missed 5-point target is a result, not an error), 1 error or
failed validity check, 2 bad options.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from nacl.public import PrivateKey, PublicKey
from nacl.signing import VerifyKey
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_rounds import (  # type: ignore[import-not-found, unused-ignore]  # noqa: E402
    BenchError,
    build_model_dir,
    finish_worker,
    mosquitto_version,
    start_worker,
    stop_worker,
)
from bench_training import machine_info  # type: ignore[import-not-found, unused-ignore]  # noqa: E402
from fedge.agent.core import (  # noqa: E402
    DeviceIdentity,
    check_blob,
    moments_payload,
    seal_contribution,
    update_payload,
    verify_manifest,
)
from fedge.agent.service import LocalData, split_holdout  # noqa: E402
from fedge.agent.trainer import LiteRTTrainer  # noqa: E402
from fedge.aggregator.checkpoint import load_checkpoint  # noqa: E402
from fedge.aggregator.service import (  # noqa: E402
    CHECKPOINT_FILE,
    MAX_CHECKPOINT_BYTES,
    load_model,
    state_from_checkpoint,
)
from fedge.lab import har_watch  # noqa: E402
from fedge.lab.broker import BrokerSettings, MosquittoBroker, find_mosquitto  # noqa: E402
from fedge.lab.observer import FleetObserver  # noqa: E402
from fedge.lab.provision import create_fleet  # noqa: E402
from fedge.protocol.errors import FedgeError  # noqa: E402
from fedge.protocol.round_manifest import RoundManifest  # noqa: E402
from fedge.protocol.signing import key_id  # noqa: E402
from fedge.protocol.task import parse_task_spec  # noqa: E402
from fedge.protocol.topics import FleetTopics  # noqa: E402
from fedge.protocol.weights import weights_from_bytes  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "robust_mqtt.json"
QUICK_OUT = ROOT / "bench" / "results" / "robust_mqtt-quick.json"
DEFAULT_TASK = ROOT / "tasks" / "har-watch.toml"

#: The malicious devices' subjects (2 of the 7 training subjects).
ATTACKERS = (6, 7)
ATTACKS = ("sign_flip", "scaled", "label_flip")
SIGN_FLIP_SCALE = 5.0
SCALE_FACTOR = 10.0
#: A robust strategy "keeps" accuracy if it drops by at most this much (5 points).
TOLERANCE = 0.05
#: Each strategy's ``[rounds]`` changes from the deployment defaults (besides rounds, min_devices).
STRATEGIES: dict[str, dict[str, Any]] = {
    "fedavg": {"strategy": "fedavg"},
    "fedavg_nobounds": {"strategy": "fedavg", "update_norm_ratio": 0.0, "update_norm_adaptive": 0.0},
    "median": {"strategy": "median"},
    "trimmed_mean": {"strategy": "trimmed_mean", "trim_fraction": 0.3},
    "krum": {"strategy": "krum", "byzantine_devices": 2},
    "multi_krum": {"strategy": "multi_krum", "byzantine_devices": 2},
}
ROBUST = ("median", "trimmed_mean", "krum", "multi_krum")
QUICK_STRATEGIES = ("fedavg", "trimmed_mean")
#: The agent's defaults (``[data] holdout_fraction``, ``seed``).
HOLDOUT_FRACTION, DATA_SEED = 0.2, 0
LAST_K = 5
READY_TIMEOUT_S = 30.0
#: A run's bound: this plus 70 s per round (the default 60 s round timeout and room).
RUN_TIMEOUT_BASE_S = 120.0
FINAL_EVAL_TIMEOUT_S = 30.0
POLL_S = 0.05
#: A train round announced this many times in a row (each earlier attempt aborted) stalls the run.
STALL_ANNOUNCEMENTS = 3


# --- the devices ------------------------------------------------------------------------------


def _set_nodelay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """As bench/mqtt_sim.py: a device's update must not wait for the broker's delayed ACK."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(POLL_S)


def _norm(v: np.ndarray) -> float:
    return float(np.linalg.norm(v.astype(np.float64)))  # float64: no overflow for any float32


def flip_labels(data: LocalData, classes: int) -> LocalData:
    """The label-flipping attacker's data: every label moved to the next class."""
    return LocalData(
        data.x_train, (data.y_train + 1) % classes, data.x_holdout, (data.y_holdout + 1) % classes
    )


@dataclass
class Device:
    """One device of the fleet: its data, key, MQTT client and round in hand."""

    device_id: str
    subject: int
    data: LocalData
    identity: DeviceIdentity
    attack: str | None
    client: mqtt.Client
    counter: int = 0
    seen_version: int = 0
    subscribed: bool = False
    trainer: LiteRTTrainer | None = None
    model_sha256: str | None = None
    pending: RoundManifest | None = None
    wanted: set[str] = field(default_factory=set)
    blobs: dict[str, bytes] = field(default_factory=dict)
    updates: int = 0
    moments: int = 0
    diverged: int = 0
    sent_norms: list[float] = field(default_factory=list)
    honest_norms: list[float] = field(default_factory=list)
    infos: list[mqtt.MQTTMessageInfo] = field(default_factory=list)


class RobustFleet:
    """7 devices over MQTT, one connection each; paho's network threads only queue, one work
    thread does every device's part in turn (10 ms of LiteRT training each: nothing to gain from
    more threads on a shared 2-core machine)."""

    def __init__(
        self,
        host: str,
        port: int,
        fleet: str,
        local: dict[int, LocalData],
        device_keys: dict[str, PrivateKey],
        aggregator_public: PublicKey,
        verify_key: VerifyKey,
        attack: str | None,
        classes: int,
    ) -> None:
        self.host, self.port, self.fleet = host, port, fleet
        self.topics = FleetTopics(fleet)
        self.trusted = {key_id(verify_key): verify_key}
        self.errors: list[str] = []
        self.busy_s = 0.0
        #: Trainings that failed (a NaN: the model diverged), by manifest version.
        self.diverged_by_version: dict[int, int] = {}
        self._inbox: queue.Queue[tuple[str, str, bytes]] = queue.Queue()
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name="robust-devices", daemon=True)
        tag = uuid.uuid4().hex[:6]
        self.devices: dict[str, Device] = {}
        for subject, data in local.items():
            d = har_watch.device_id(subject)
            bad = attack if subject in ATTACKERS else None
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2, client_id=f"robust-{d}-{tag}", protocol=mqtt.MQTTv5
            )
            client.max_queued_messages_set(0)
            client.on_socket_open = _set_nodelay
            client.user_data_set(d)
            client.will_set(self.topics.status(d), json.dumps({"device_id": d, "state": "offline"}), 1, True)
            client.on_connect = self._on_connect
            client.on_subscribe = self._on_subscribe
            client.on_message = self._on_message
            own = flip_labels(data, classes) if bad == "label_flip" else data
            identity = DeviceIdentity(fleet, d, device_keys[d], aggregator_public)
            self.devices[d] = Device(d, subject, own, identity, bad, client)

    # paho callbacks (network threads: queue and flag only) ----------------------------------------

    def _on_connect(self, client: mqtt.Client, device: str, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self.errors.append(f"{device}: the broker refused the connection: {reason}")
            return
        client.subscribe(self.topics.manifest, qos=1)
        # Online and ready, as the agent's retained status says: the aggregator starts at once.
        client.publish(
            self.topics.status(device), json.dumps({"device_id": device, "state": "idle"}), 1, True
        )

    def _on_subscribe(self, client: mqtt.Client, device: str, mid: int, codes: Any, props: Any) -> None:
        self.devices[device].subscribed = True

    def _on_message(self, client: mqtt.Client, device: str, msg: mqtt.MQTTMessage) -> None:
        self._inbox.put((device, msg.topic, bytes(msg.payload)))

    # life cycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._worker.start()
        for dev in self.devices.values():
            dev.client.connect_async(self.host, self.port, keepalive=60)
            dev.client.loop_start()
        _wait(
            lambda: all(d.subscribed for d in self.devices.values()) or bool(self.errors),
            READY_TIMEOUT_S,
            "the devices to connect and subscribe",
        )
        if self.errors:
            raise BenchError(self.errors[0])

    def stop(self) -> None:
        with contextlib.suppress(BenchError):
            _wait(self.all_acknowledged, 10.0, "the devices' publications to be acknowledged")
        self._stop.set()
        for dev in self.devices.values():
            dev.client.publish(self.topics.status(dev.device_id), b"", qos=1, retain=True)
            dev.client.disconnect()
            dev.client.loop_stop()
        if self._worker.ident is not None:
            self._worker.join(timeout=10.0)

    def all_acknowledged(self) -> bool:
        return all(i.is_published() for d in self.devices.values() for i in list(d.infos))

    # the devices' work (the work thread) ---------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                device, topic, payload = self._inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            if not payload:
                continue  # a retained message cleared (an old weights blob, a status)
            start = time.perf_counter()
            try:
                dev = self.devices[device]
                if topic == self.topics.manifest:
                    self._manifest(dev, payload)
                else:
                    self._blob(dev, topic.rsplit("/", 1)[-1], payload)
            except Exception as exc:  # reported as a failed run, never swallowed
                self.errors.append(f"{device}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            self.busy_s += time.perf_counter() - start

    def _manifest(self, dev: Device, frame: bytes) -> None:
        m = verify_manifest(frame, self.trusted, fleet=self.fleet, now=time.time())
        if m.version <= dev.seen_version:
            return  # a retained re-delivery
        dev.seen_version = m.version
        for sha in dev.wanted:  # a round left unfinished: stop fetching its blobs
            dev.client.unsubscribe(self.topics.blob(sha))
        dev.pending, dev.wanted, dev.blobs = None, set(), {}
        if m.phase == "final" or not m.is_selected(dev.device_id):
            return
        if m.phase == "moments":
            self._publish(dev, m, "moments", moments_payload(dev.data.x_train))
            dev.moments += 1
            return
        dev.pending = m
        dev.wanted = {m.weights_sha256}
        if dev.trainer is None or dev.model_sha256 != m.model_sha256:
            dev.wanted.add(m.model_sha256)
        for sha in sorted(dev.wanted):
            dev.client.subscribe(self.topics.blob(sha), qos=1)

    def _blob(self, dev: Device, sha: str, payload: bytes) -> None:
        if dev.pending is None or check_blob(sha, payload, dev.wanted) is not None:
            return  # not one this device is fetching (or not what its topic says: dropped)
        dev.blobs[sha] = payload
        dev.wanted.discard(sha)
        dev.client.unsubscribe(self.topics.blob(sha))
        if not dev.wanted:
            m, dev.pending = dev.pending, None
            self._train(dev, m)

    def _train(self, dev: Device, m: RoundManifest) -> None:
        """The agent's ``_load`` and ``_train``, then the attack (if any) on the delta."""
        if m.model_sha256 in dev.blobs:
            dev.trainer = LiteRTTrainer(dev.blobs[m.model_sha256], m.model_manifest)
            dev.model_sha256 = m.model_sha256
        trainer = dev.trainer
        assert trainer is not None
        trainer.normalisation = m.normalisation
        trainer.set_weights(weights_from_bytes(dev.blobs[m.weights_sha256], m.model_manifest.parameter_count))
        dev.blobs = {}
        data = dev.data
        global_weights = trainer.get_weights()
        evaluation = trainer.evaluate(data.x_holdout, data.y_holdout)
        try:
            losses = trainer.fit(
                data.x_train, data.y_train, rng=np.random.default_rng([DATA_SEED, m.version])
            )
        except FedgeError:  # diverged (NaN): the agent abandons the round and sends nothing
            dev.diverged += 1
            self.diverged_by_version[m.version] = self.diverged_by_version.get(m.version, 0) + 1
            return
        delta = trainer.get_weights() - global_weights
        dev.honest_norms.append(_norm(delta))
        if dev.attack == "sign_flip":
            delta = -SIGN_FLIP_SCALE * delta
        elif dev.attack == "scaled":
            delta = SCALE_FACTOR * delta
        dev.sent_norms.append(_norm(delta))
        payload = update_payload(m, delta, int(data.x_train.shape[0]), losses[-1], evaluation)
        self._publish(dev, m, "update", payload)
        dev.updates += 1

    def _publish(
        self, dev: Device, m: RoundManifest, kind: str, payload: tuple[dict[str, Any], bytes]
    ) -> None:
        dev.counter += 1
        sealed = seal_contribution(dev.identity, m.round_id, m.version, dev.counter, kind, payload)
        dev.infos.append(dev.client.publish(self.topics.update(dev.device_id), sealed, qos=1))


# --- one run ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """What every run shares: the model build, the data."""

    model_dir: Path
    model_bytes: bytes
    classes: int
    local: dict[int, LocalData]
    x_test: np.ndarray
    y_test: np.ndarray


def rounds_table(strategy: str, rounds: int) -> dict[str, Any]:
    return {"rounds": rounds, "min_devices": len(har_watch.TRAIN_SUBJECTS), **STRATEGIES[strategy]}


def run(
    world: World, broker: MosquittoBroker, strategy: str, attack: str | None, rounds: int, work: Path
) -> dict[str, Any]:
    """One federated run: fleet files, observer, devices, then the aggregator process."""
    name = f"{strategy}-{attack or 'clean'}"
    fleet = f"robust-{name.replace('_', '-')}-{uuid.uuid4().hex[:6]}"  # retained topics never match
    ids = {har_watch.device_id(s): s for s in har_watch.TRAIN_SUBJECTS}
    files = create_fleet(
        work / name, fleet, world.model_dir, broker.url, ids, rounds=rounds_table(strategy, rounds)
    )
    verify = files.signing_key.verify_key
    observer = FleetObserver(
        fleet, broker.host, broker.port, verify, world.model_bytes, world.x_test, world.y_test
    )
    observed = threading.Event()
    observer.client.on_subscribe = lambda *_: observed.set()
    devices = RobustFleet(
        broker.host,
        broker.port,
        fleet,
        world.local,
        files.device_keys,
        files.box_key.public_key,
        verify,
        attack,
        world.classes,
    )
    log = work / f"aggregator-{name}.log"
    proc: subprocess.Popen[str] | None = None
    stalled: tuple[int, str] | None = None
    started = time.perf_counter()
    try:
        observer.start()
        _wait(observed.is_set, READY_TIMEOUT_S, "the observer to subscribe")
        devices.start()
        proc = start_worker(["aggregator", "--config", str(files.aggregator_config)], log)
        deadline = time.monotonic() + RUN_TIMEOUT_BASE_S + 70.0 * (rounds + 1)
        min_devices = int(rounds_table(strategy, rounds)["min_devices"])
        while proc.poll() is None:  # exit_when_done: the aggregator exits after the final manifest
            if devices.errors:
                raise BenchError(f"{name}: {devices.errors[0]}")
            if time.monotonic() >= deadline:
                raise BenchError(f"{name}: the aggregator did not finish in time; log tail:\n{_tail(log)}")
            stalled = stall(devices, observer, min_devices)
            if stalled is not None:
                break
            time.sleep(POLL_S)
        if stalled is None:
            agg = finish_worker(proc, f"aggregator {name}", 10.0, log)
            _wait(
                lambda: (
                    any(e.phase == "final" for e in observer.view.evaluations) or bool(observer.view.errors)
                ),
                FINAL_EVAL_TIMEOUT_S,
                f"{name}: the observer to score the final model",
            )
        else:  # the fleet is stuck with the model it cannot train: score it, then stop the aggregator
            after = stalled[0]
            _wait(
                lambda: (
                    any(e.after_round == after for e in observer.view.evaluations)
                    or bool(observer.view.errors)
                ),
                FINAL_EVAL_TIMEOUT_S,
                f"{name}: the observer to score the model the fleet is stuck with",
            )
            agg = terminate_aggregator(proc, name, log)
        seconds = time.perf_counter() - started
    finally:
        if proc is not None:
            stop_worker(proc)
        devices.stop()
        observer.stop()
    if devices.errors:
        raise BenchError(f"{name}: {devices.errors[0]}")
    ck = load_checkpoint(files.root / "state" / "aggregator" / CHECKPOINT_FILE, MAX_CHECKPOINT_BYTES)
    if ck is None:
        raise BenchError(f"{name}: the aggregator left no checkpoint")
    state = state_from_checkpoint(ck)
    return summarise(name, strategy, attack, rounds, observer, devices, state, agg, seconds, stalled)


def stall(devices: RobustFleet, observer: FleetObserver, min_devices: int) -> tuple[int, str] | None:
    """``(train rounds completed, why)`` once the run can no longer finish: the model diverged so
    far that too many devices' training fails (a NaN; the agent then sends nothing) for the round
    to reach ``min_devices``, or the current round was announced ``STALL_ANNOUNCEMENTS`` times
    (every attempt aborted). The aggregator would retry forever: the fleet is stuck with its model."""
    train = [m for m in list(observer.view.manifests) if m.phase == "train"]
    if not train:
        return None
    cur = train[-1]
    failed = devices.diverged_by_version.get(cur.version, 0)
    n = len(devices.devices)
    if failed > n - min_devices:
        why = f"training diverged (NaN) on {failed} of {n} devices in round {cur.round_number}"
        return cur.round_number - 1, why
    recent = {m.round_number for m in train[-STALL_ANNOUNCEMENTS:]}
    if len(train) >= STALL_ANNOUNCEMENTS and len(recent) == 1:
        return cur.round_number - 1, f"round {cur.round_number} aborted {STALL_ANNOUNCEMENTS - 1} times"
    return None


def terminate_aggregator(proc: subprocess.Popen[str], name: str, log: Path) -> dict[str, Any]:
    """SIGTERM to the aggregator alone (the launcher's child, which this bench started): it stops
    cleanly and the launcher passes its JSON on."""
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    except OSError:
        children = []
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGTERM)
    try:
        result: dict[str, Any] = finish_worker(proc, f"aggregator {name}", 30.0, log)
    except BenchError as exc:
        return {"exit_code": None, "stop_error": str(exc)}
    return result


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def summarise(
    name: str,
    strategy: str,
    attack: str | None,
    rounds: int,
    observer: FleetObserver,
    devices: RobustFleet,
    state: Any,
    agg: dict[str, Any],
    seconds: float,
    stalled: tuple[int, str] | None,
) -> dict[str, Any]:
    """The run's accuracies (by train rounds gone into the model), the aggregator's records,
    and what is wrong with the run, if anything (``problems``)."""
    evals = {e.after_round: e for e in sorted(observer.view.evaluations, key=lambda e: e.version)}
    accuracy = [float(evals[k].accuracy or 0.0) if k in evals else None for k in range(rounds + 1)]
    reached = rounds if stalled is None else stalled[0]  # the last model the fleet got
    history = [h for h in state.history if h.get("phase") == "train"]
    problems: list[str] = []
    missing = [k for k, a in enumerate(accuracy[: reached + 1]) if a is None]
    if missing:
        problems.append(f"the observer scored no model after rounds {missing}")
    if observer.view.errors:
        problems.append(f"observer errors: {observer.view.errors[:3]}")
    if state.completed_rounds != reached:
        problems.append(f"{state.completed_rounds} train rounds completed, expected {reached}")
    aborted = [h for h in history if h.get("outcome") != "aggregated"]
    short = [h["round_id"] for h in history if h.get("reported") != len(devices.devices)]
    if short and stalled is None:  # a stalled run's aborted rounds are its result
        problems.append(f"rounds without all {len(devices.devices)} updates: {short}")
    if state.rejected_total:
        problems.append(f"rejected updates: {dict(state.rejected_total)}")
    if agg.get("exit_code") != 0 and stalled is None:
        problems.append(f"aggregator exit code {agg.get('exit_code')}")
    last = accuracy[reached]
    final = last if last is not None else 0.0
    tail = [a for a in accuracy[: reached + 1][-LAST_K:] if a is not None]
    attackers = [d for d in devices.devices.values() if d.attack is not None]
    honest = [d for d in devices.devices.values() if d.attack is None]
    return {
        "run": name,
        "strategy": strategy,
        "attack": attack or "clean",
        "final_accuracy": round(final, 4),
        f"mean_last_{LAST_K}": round(statistics.fmean(tail), 4) if tail else None,
        "accuracy_per_round": [None if a is None else round(a, 4) for a in accuracy],
        "completed_rounds": state.completed_rounds,
        "stalled_after_round": None if stalled is None else stalled[0],
        "stalled_because": None if stalled is None else stalled[1],
        "aborted_rounds": len(aborted),
        "clipped_updates": sum(int(h.get("clipped", 0)) for h in history),
        "norm_bound_per_round": [h.get("norm_bound") for h in history],
        "rejected": dict(state.rejected_total),
        "updates_sent": sum(d.updates for d in devices.devices.values()),
        "diverged_trainings": sum(d.diverged for d in devices.devices.values()),
        "honest_delta_norm_median": _median(n for d in honest for n in d.honest_norms),
        "attacker_sent_norm_median": _median(n for d in attackers for n in d.sent_norms),
        "devices_busy_s": round(devices.busy_s, 2),
        "aggregator_cpu_s": round(float(agg.get("cpu_s", 0.0)), 2),
        "aggregator_peak_rss_mb": round(agg["peak_rss_bytes"] / 1e6, 1)
        if agg.get("peak_rss_bytes")
        else None,
        "seconds": round(seconds, 1),
        "problems": problems,
    }


def _median(values: Any) -> float | None:
    v = list(values)
    return round(statistics.median(v), 4) if v else None


# --- the report -------------------------------------------------------------------------------------


def compare(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Adds each run's differences from its strategy's clean run and FedAvg's; the verdicts."""
    base = results.get("fedavg", {}).get("clean", {}).get("final_accuracy")
    verdicts: dict[str, Any] = {}
    for strategy, runs in results.items():
        own = runs["clean"]["final_accuracy"]
        for r in runs.values():
            r["drop_vs_own_clean"] = round(own - r["final_accuracy"], 4)
            r["drop_vs_fedavg_clean"] = round(base - r["final_accuracy"], 4) if base is not None else None
            r["within_5_of_own_clean"] = r["drop_vs_own_clean"] <= TOLERANCE
            r["within_5_of_fedavg_clean"] = (
                r["drop_vs_fedavg_clean"] <= TOLERANCE if r["drop_vs_fedavg_clean"] is not None else None
            )
        attacked = [r for a, r in runs.items() if a != "clean"]
        worst = max(attacked, key=lambda r: r["drop_vs_own_clean"]) if attacked else None
        verdicts[strategy] = {
            "robust": strategy in ROBUST,
            "clean_accuracy": own,
            "worst_attack": worst["attack"] if worst else None,
            "worst_drop_vs_own_clean": worst["drop_vs_own_clean"] if worst else None,
            "within_5_of_own_clean_under_every_attack": all(r["within_5_of_own_clean"] for r in attacked),
            "within_5_of_fedavg_clean_under_every_attack": all(
                r["within_5_of_fedavg_clean"] for r in attacked
            ),
        }
    return verdicts


def _diff(drop: float | None) -> str:
    """A drop as the signed accuracy difference (no "-0.000")."""
    return "-" if drop is None else f"{0.0 - drop:+.3f}"


def render(results: dict[str, dict[str, dict[str, Any]]], verdicts: dict[str, Any], rounds: int) -> list[str]:
    lines = [
        f"held-out accuracy (subjects 8-10) after {rounds} rounds; attackers: subjects "
        f"{ATTACKERS[0]} and {ATTACKERS[1]} of 7",
        "",
        f"strategy | attack | final acc | mean last {LAST_K} | vs own clean | vs fedavg clean | "
        "within 5 pts (own / fedavg clean) | clipped | aborted | attacker norm sent / honest | s",
        "--- | --- | --- | --- | --- | --- | --- | --- | --- | --- | ---",
    ]

    def yes(flag: bool | None) -> str:
        return "-" if flag is None else "yes" if flag else "NO"

    for strategy, runs in results.items():
        for attack, r in runs.items():
            sent, honest = r["attacker_sent_norm_median"], r["honest_delta_norm_median"]
            norms = f"{sent:.3f} / {honest:.3f}" if sent is not None and honest is not None else "-"
            within = (
                "-"
                if attack == "clean"
                else f"{yes(r['within_5_of_own_clean'])} / {yes(r['within_5_of_fedavg_clean'])}"
            )
            final = f"{r['final_accuracy']:.3f}"
            if r["stalled_after_round"] is not None:
                final += f" (stuck after round {r['stalled_after_round']})"
            lines.append(
                f"{strategy} | {attack} | {final} | {r[f'mean_last_{LAST_K}']:.3f} | "
                f"{_diff(r['drop_vs_own_clean'])} | {_diff(r['drop_vs_fedavg_clean'])} | {within} | "
                f"{r['clipped_updates']} | {r['aborted_rounds']} | {norms} | {r['seconds']:.1f}"
            )
    lines.append("")
    for strategy, v in verdicts.items():
        kind = "robust" if v["robust"] else "baseline"
        lines.append(
            f"{strategy} ({kind}): clean {v['clean_accuracy']:.3f}; worst attack {v['worst_attack']} "
            f"({_diff(v['worst_drop_vs_own_clean'])} vs own clean); within 5 points of own clean under "
            f"every attack: {yes(v['within_5_of_own_clean_under_every_attack'])}; of fedavg clean: "
            f"{yes(v['within_5_of_fedavg_clean_under_every_attack'])}"
        )
    return lines


def plot(path: Path, results: dict[str, dict[str, dict[str, Any]]], rounds: int) -> None:
    """Held-out accuracy per round: one panel per strategy, one line per attack (headless)."""
    import matplotlib  # optional, demo-only dependency (fedge[demo])

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"clean": "black", "sign_flip": "tab:red", "scaled": "tab:orange", "label_flip": "tab:purple"}
    cols = min(3, len(results))
    rows = -(-len(results) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows + 0.5), dpi=100, squeeze=False)
    flat = list(axes.flat)
    for ax in flat[len(results) :]:
        ax.set_visible(False)
    base = results.get("fedavg", {}).get("clean")
    for ax, (strategy, runs) in zip(flat, results.items(), strict=False):
        if base is not None and strategy != "fedavg":
            acc = [np.nan if a is None else a for a in base["accuracy_per_round"]]
            ax.plot(range(len(acc)), acc, color="tab:gray", linestyle="--", label="fedavg clean")
        for attack, r in runs.items():
            acc = [np.nan if a is None else a for a in r["accuracy_per_round"]]
            ax.plot(
                range(len(acc)),
                acc,
                color=colors.get(attack),
                marker=".",
                markersize=3,
                label=f"{attack} ({r['final_accuracy']:.3f})",
            )
        ax.set_title(strategy)
        ax.set_xlabel("train rounds")
        ax.set_ylim(0.0, 1.0)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=7)
    for row in axes:
        row[0].set_ylabel("held-out accuracy (subjects 8-10)")
    fig.suptitle(
        f"2 of 7 devices malicious (subjects {ATTACKERS[0]}, {ATTACKERS[1]}), real broker, {rounds} rounds"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# --- main --------------------------------------------------------------------------------------------


def load_world(task_path: Path, work: Path, model_dir: Path | None) -> World:
    task = parse_task_spec(task_path.read_text(encoding="utf-8"))
    if model_dir is None:
        model_dir = work / "model"
        build_model_dir(task_path, model_dir, work)  # fedge model build, in a subprocess (TensorFlow)
    loaded = load_model(model_dir)
    devices = har_watch.load_devices(task, har_watch.SUBJECTS)
    x_test, y_test = har_watch.pooled([devices[s] for s in har_watch.TEST_SUBJECTS])
    local = {
        s: split_holdout(devices[s].x, devices[s].y, HOLDOUT_FRACTION, DATA_SEED)
        for s in har_watch.TRAIN_SUBJECTS
    }
    return World(model_dir, loaded.model, task.output_dim, local, x_test, y_test)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help=f"JSON (default {DEFAULT_OUT})")
    parser.add_argument(
        "--rounds", type=int, default=None, help="train rounds per run (default 20; --quick 5)"
    )
    parser.add_argument("--task", type=Path, default=DEFAULT_TASK, help="task spec (default har-watch)")
    parser.add_argument(
        "--strategies", default=None, help=f"comma-separated, of {', '.join(STRATEGIES)} (default all)"
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="a `fedge model build` of --task to reuse (default: build one)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 5 rounds, fedavg and trimmed_mean")
    cfg = parser.parse_args(argv)
    rounds = cfg.rounds or (5 if cfg.quick else 20)
    if rounds < LAST_K:
        parser.error(f"--rounds must be >= {LAST_K}")
    names = (
        tuple(cfg.strategies.split(","))
        if cfg.strategies
        else QUICK_STRATEGIES
        if cfg.quick
        else tuple(STRATEGIES)
    )
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown:
        parser.error(f"unknown strategies {unknown}; known: {', '.join(STRATEGIES)}")
    if "fedavg" not in names:
        names = ("fedavg", *names)  # the baseline of every comparison
    out: Path = cfg.out or (QUICK_OUT if cfg.quick else DEFAULT_OUT)
    exe = find_mosquitto()
    if exe is None:
        print(
            "mosquitto is not installed (apt-get install mosquitto, or scripts/system-deps.sh)",
            file=sys.stderr,
        )
        return 1
    start = time.perf_counter()
    results: dict[str, dict[str, dict[str, Any]]] = {}
    # A SIGTERM (timeout, CI cancel) unwinds like an error: the aggregator and broker are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        with tempfile.TemporaryDirectory(prefix="fedge-bench-robust-") as tmp_s:
            tmp = Path(tmp_s)
            print("building the model (fedge model build, subprocess) and loading the data ...", flush=True)
            world = load_world(cfg.task, tmp, cfg.model_dir)
            with MosquittoBroker(BrokerSettings(data_dir=tmp / "mosquitto"), executable=exe) as broker:
                for strategy in names:
                    results[strategy] = {}
                    for attack in (None, *ATTACKS):
                        r = run(world, broker, strategy, attack, rounds, tmp)
                        results[strategy][r["attack"]] = r
                        print(
                            f"  {r['run']:24s} final {r['final_accuracy']:.3f}  last {LAST_K} "
                            f"{r[f'mean_last_{LAST_K}']:.3f}  clipped {r['clipped_updates']:3d}  "
                            f"{r['seconds']:.1f} s"
                            + (f"  PROBLEMS {r['problems']}" if r["problems"] else ""),
                            flush=True,
                        )
    except (BenchError, FedgeError) as exc:
        print(f"bench_robust_mqtt: {exc}", file=sys.stderr)
        return 1
    verdicts = compare(results)
    print("\n" + "\n".join(render(results, verdicts, rounds)))
    problems = {r["run"]: r["problems"] for runs in results.values() for r in runs.values() if r["problems"]}
    report = {
        "benchmark": "robust_mqtt",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "mosquitto": mosquitto_version(exe),
        "config": {
            "task": str(cfg.task.relative_to(ROOT) if cfg.task.is_relative_to(ROOT) else cfg.task),
            "rounds": rounds,
            "quick": cfg.quick,
            "devices": len(har_watch.TRAIN_SUBJECTS),
            "attackers": list(ATTACKERS),
            "attacks": {
                "sign_flip": f"-{SIGN_FLIP_SCALE:g} x the honest delta",
                "scaled": f"{SCALE_FACTOR:g} x the honest delta",
                "label_flip": "honest training on labels (y + 1) mod classes",
            },
            "rounds_tables": {s: rounds_table(s, rounds) for s in names},
            "note": 'every other [rounds] key is the deployment default (weighting = "equal", '
            "server_learning_rate 1.0, update_norm_ratio 0.5, update_norm_adaptive 1.0)",
            "tolerance": TOLERANCE,
            "test_subjects": list(har_watch.TEST_SUBJECTS),
        },
        "results": results,
        "verdicts": verdicts,
        "problems": problems,
        "seconds": round(time.perf_counter() - start, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    png = out.with_suffix(".png")
    plot(png, results, rounds)
    print(f"\nwrote {out} and {png} ({report['seconds']:.0f} s)")
    if problems:
        print(f"validity check failed: {problems}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
