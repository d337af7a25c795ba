"""``fedge demo``: a broker, an aggregator and N agents training on real data, in one command.

Everything runs as it would in a building: the aggregator and each agent are separate
processes (``fedge aggregator run`` / ``fedge agent run``) that talk only through the MQTT
broker; updates are sealed, manifests signed. The demo itself only provisions the fleet,
starts the processes, and watches from outside like a building-management system would,
evaluating every global model on the held-out subjects.

With ``--data direct`` no EdgeX is involved: each device's readings (its subject's recordings,
labels included) are written to a CSV in the device's directory, the way a logger on the device
would have them, and the agent reads it (``[data] source = "csv"``); the held-out subjects'
readings are then appended to it in real time, without labels, for the agents' predictions. The
agents never import the data set's packages (seglearn, pandas): only this process does.

With a building's own data (``--train``, :class:`OwnData`) the task, the EdgeX profile and the
CSVs are the user's: each group of the training CSV (``--split-by``) is one device, fed
through EdgeX events by the CSV replay of ``fedge edgex simulate --csv``; the centralized
reference is ``fedge train-local --train --test`` on the same files, and every global model is
scored on the test CSV's samples (accuracy, or MSE for a regression task).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedge.lab import har_watch
from fedge.lab.container_agent import podman_run_command, stage_container_agent
from fedge.lab.dropouts import Dropouts
from fedge.lab.observer import FleetObserver
from fedge.lab.pacer import Pacer
from fedge.lab.provision import create_fleet
from fedge.lab.train_local import build_model_files, train_local, train_local_csv
from fedge.protocol.codec import Codec
from fedge.protocol.errors import FedgeError
from fedge.protocol.mqtt_settings import parse_broker_url
from fedge.protocol.task import TaskSpec
from fedge.shell.mqtt import ephemeral_settings
from fedge.tools import bundled
from fedge.tools.broker_config import edgex_principal

if TYPE_CHECKING:
    import numpy as np

    from fedge.agent.edgex.profile import DeviceProfile
    from fedge.agent.edgex.readings import Event
    from fedge.lab.edgex_simulate import CsvReplay

FLEET = "demo"
log = logging.getLogger("fedge.lab.demo")
#: After its training data, each device's live (unlabelled) readings start this much later.
LIVE_GAP_NS = 2_000_000_000
#: How long the end of a run waits for every device's first prediction.
PREDICTION_WAIT_S = 30.0
MAX_DEVICES = len(har_watch.TRAIN_SUBJECTS)
#: ``--data direct``: each device's readings file, in its directory ``fleet/devices/ID/``.
DEVICE_CSV = "readings.csv"
#: Rows 50 Hz apart; recordings 2 s apart, so that no window spans two (as the EdgeX replay).
ROW_PERIOD_NS = int(1e9 / har_watch.SAMPLE_RATE_HZ)
RECORDING_GAP_NS = 2_000_000_000
#: ``--aggregator-replicas``: a leader and up to 7 workers (more gain nothing on one machine).
MAX_AGGREGATOR_REPLICAS = 8


@dataclass(frozen=True)
class DemoOptions:
    task: TaskSpec
    out: Path
    devices: int = 7
    rounds: int = 20
    codec: str = Codec.FP32.value
    broker_url: str | None = None
    round_timeout_s: float = 60.0
    min_devices: int | None = None
    mqtt_protocol: int = 5
    reference_epochs: int = 20
    data_path: str = "edgex"  # "edgex": simulator -> broker -> agents; "direct": a CSV per device
    edgex_version: str = "v4"
    task_file: Path | None = None
    # FedAvg's averaged step over non-IID devices is shorter than each device's own step; a
    # server learning rate > 1 compensates (the "server optimizer" view of FedAvg). With the
    # default influence bounds every update is clipped to the previous round's median norm,
    # which shortens the step again. Measured on the HAR task after 20 rounds (fp32 and int8):
    # 0.799 at 1.5 and 0.808 at 2.0, steady over the last 8 rounds (0.80-0.81); without the
    # bounds 2.0 oscillated (0.78 <-> 0.82) and 1.5 gave 0.817.
    server_learning_rate: float = 2.0
    # With no --broker, the demo's own broker is locked down like a real fleet's (TLS, per-device
    # credentials, ACLs); secure_broker=False (--insecure-broker) starts an anonymous one.
    secure_broker: bool = True
    broker_credentials: dict[str, str] | None = None  # for --broker: username, password, ca_file
    # The first `container_agents` devices run in the agent image (podman, host network) instead
    # of as host processes: what a board running `docker run` does, in the same fleet.
    container_agents: int = 0
    agent_image: str | None = None
    # A building's own data instead of the smartwatch set: the training CSV's groups
    # (split_by: "day" or "column:NAME") are the devices (not `devices`), each an EdgeX device
    # <profile name>-<group> of `profile_file`; every global model is scored on `test_csv`.
    # `seed` seeds the centralized reference's shuffling (fedge train-local --seed).
    train_csv: Path | None = None
    test_csv: Path | None = None
    profile_file: Path | None = None
    split_by: str = "day"
    time_column: str | None = None
    seed: int = 0
    # Differential privacy (the aggregator's [privacy]): None = off; else the epsilon budget
    # for the whole run at dp_delta, the noise multiplier derived from it and `rounds`.
    dp_epsilon: float | None = None
    dp_delta: float = 1e-5
    # The first clip bound (adaptive clipping moves it to the median update norm, at most
    # about 10 % a round): near the har-watch demo's update norms, 1-3.
    dp_clip_bound: float = 1.0
    # Secure aggregation (the aggregator's [privacy] secure_aggregation, identity keys and
    # certificates for every device); drop_devices: that many of each round's devices are
    # frozen (SIGSTOP) once their neighbours' keys are relayed, and thawed at the next manifest.
    secure_aggregation: bool = False
    drop_devices: int = 0
    # Aggregator processes sharing the fleet's updates ([replicas], docs/scale.md): 1 is the
    # lone aggregator; N starts a leader and N - 1 workers on one shared subscription.
    aggregator_replicas: int = 1
    # Two-tier aggregation (docs/scale.md): 0 is one gateway; B splits the devices over B
    # building gateways, each with its own broker bridged to a campus broker and aggregator.
    buildings: int = 0
    # Buffered asynchronous aggregation (the aggregator's [rounds] aggregation, docs/async.md):
    # "sync" or "async"; with "async", buffer_size None is max(min_devices, a third of the
    # devices) and min_devices defaults to a third of the devices.
    aggregation: str = "sync"
    buffer_size: int | None = None
    max_staleness: int = 4
    # Devices of mixed speed (fedge.lab.pacer): slow_devices run slow_factor times slower (None:
    # a third of the devices with "async", none with "sync"); offline_devices are frozen for
    # offline_s out of every offline_every_s seconds. Host-process agents only.
    slow_devices: int | None = None
    slow_factor: float = 5.0
    offline_devices: int = 0
    offline_s: float = 0.0
    offline_every_s: float = 0.0


@dataclass
class DemoSummary:
    task: str
    devices: int
    rounds_requested: int
    rounds_completed: int
    codec: str
    broker: str
    seconds: float
    centralized_accuracy: float | None
    final_accuracy: float | None
    accuracy_vs_centralized: float | None
    mean_update_bytes: float | None
    rejected: dict[str, int]
    per_round: list[dict[str, Any]] = field(default_factory=list)
    processes: dict[str, int | None] = field(default_factory=dict)
    metric: str = "accuracy"  # the task's held-out metric: "accuracy", or "mse" for a regression
    centralized_mse: float | None = None
    final_mse: float | None = None
    data: dict[str, Any] | None = None  # with --train: the CSVs, the split and each device's rows
    #: Predictions (``insight/{device_id}``) seen per device, and each device's latest one.
    predictions: dict[str, Any] = field(default_factory=dict)
    #: Secure aggregation: every train round's updates were masked (``--secure-aggregation``).
    secure_aggregation: bool = False
    #: Device-rounds left out of the sum: the devices the demo froze mid-round
    #: (``--drop-devices``), as the aggregator's round records count them.
    dropped: int = 0
    #: Differential privacy: the epsilon spent over the run at ``delta`` (None without DP).
    epsilon_spent: float | None = None
    delta: float | None = None
    #: Aggregator processes (``--aggregator-replicas``): 1, or a leader and its workers.
    aggregator_replicas: int = 1
    #: With replicas: each worker's partials and the updates they counted, from the leader's
    #: status (``replicas.workers``).
    workers: dict[str, Any] = field(default_factory=dict)
    #: With ``--buildings``: each building gateway's devices (the rounds are the campus's).
    buildings: dict[str, list[str]] = field(default_factory=dict)
    #: ``[rounds] aggregation``: "sync" or "async" (docs/async.md).
    aggregation: str = "sync"
    #: The devices run slower (``slow_factor`` x) or intermittently offline (fedge.lab.pacer).
    slow_devices: list[str] = field(default_factory=list)
    offline_devices: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _spawn(
    args: list[str], log_path: Path, env_overrides: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env_overrides or {}))
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "fedge.cli", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _spawn_container(command: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """``podman run`` in the foreground: SIGTERM to it reaches the agent (podman's sig-proxy)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        try:
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        except FileNotFoundError:
            raise FedgeError("--container-agents needs podman (apt-get install podman)") from None


def _remove_containers(names: list[str]) -> None:
    """A killed ``podman run`` client leaves its container behind: remove it for sure."""
    for name in names:
        command = ["podman", "rm", "--force", "--time", "5", name]
        subprocess.run(command, capture_output=True, check=False, timeout=60)


def terminate_processes(
    procs: dict[str, subprocess.Popen[bytes]], timeout: float = 10.0
) -> dict[str, int | None]:
    """SIGTERM to each process still running, SIGKILL to any still there after ``timeout`` in
    all; their exit codes (the demo's and the fleet benchmarks' shutdown)."""
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    until = time.monotonic() + timeout
    for p in procs.values():
        try:
            p.wait(max(0.1, until - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return {name: p.returncode for name, p in procs.items()}


def _wait(
    condition: Callable[[], bool],
    observer: FleetObserver,
    timeout: float,
    what: str,
    procs: dict[str, subprocess.Popen[bytes]],
) -> None:
    until = time.monotonic() + timeout
    while not condition():
        dead = [name for name, p in procs.items() if p.poll() is not None]
        if dead:
            raise FedgeError(f"{', '.join(dead)} exited while waiting for {what}; see the logs")
        if time.monotonic() > until:
            raise FedgeError(f"timed out after {timeout:.0f}s waiting for {what}")
        observer.wait(0.2)


def _client_creds(c: dict[str, Any] | None) -> dict[str, Any]:
    if not c:
        return {}
    return {"username": c.get("username"), "password": c.get("password"), "ca_file": c.get("ca_file")}


def _start_secure_broker(
    out: Path, devices: list[str], model_dir: Path, workers: tuple[str, ...] = ()
) -> tuple[Any, str, dict[str, dict[str, Any]]]:
    """Mosquitto with the configuration ``fedge broker config`` generates: TLS with a lab CA,
    a password per principal, ACLs (a device reaches only its own topics), no anonymous access.

    Every connection is a principal of its own (the broker takes the client id from the
    username): each device, each device's EdgeX-bus connection (``{device}.edgex``), the
    aggregator, the observer and the EdgeX simulator. ``creds`` maps each name to its
    credentials file's values. ``workers``: aggregator workers ([replicas]), one principal each."""
    from fedge.tools.broker_config import FleetAccess  # noqa: PLC0415

    access = FleetAccess(
        FLEET,
        tuple(devices),
        aggregator="aggregator",
        monitors=("observer", "dropouts"),
        edgex_services=("simulator",),
        workers=workers,
    )
    return start_locked_broker(out / "broker", access, model_dir)


def start_locked_broker(
    root: Path, access: Any, model_dir: Path, bridge: Any = None
) -> tuple[Any, str, dict[str, dict[str, Any]]]:
    """Mosquitto for ``access`` (a ``FleetAccess``) as ``fedge broker config`` writes it, under
    ``root`` (config, data, run); ``bridge``: a building broker's ``Bridge`` to its campus.
    Returns the running broker, its URL and each principal's credentials."""
    import ssl  # noqa: PLC0415
    import tomllib  # noqa: PLC0415

    from fedge.lab.broker import ConfiguredMosquitto, free_loopback_port  # noqa: PLC0415
    from fedge.tools.broker_config import (  # noqa: PLC0415
        BrokerConfigRequest,
        BrokerLimits,
        largest_blob_in,
        update_bytes_in,
        write_broker_config,
    )

    data_dir = root / "data"
    data_dir.mkdir(parents=True)
    result = write_broker_config(
        BrokerConfigRequest(
            access=access,
            out_dir=root / "config",
            tls="lab",
            port=free_loopback_port(),
            bind="127.0.0.1",
            data_dir=data_dir,
            run_as="root" if os.geteuid() == 0 else None,
            limits=BrokerLimits.for_fleet(
                len(access.devices), largest_blob_in(model_dir), update_bytes=update_bytes_in(model_dir)
            ),
            bridge=bridge,
        )
    )
    creds: dict[str, dict[str, Any]] = {}
    for principal in result.principals:
        path = result.out_dir / principal.credentials
        data = tomllib.loads(path.read_text())
        if data.get("ca_file"):
            data["ca_file"] = str((path.parent / str(data["ca_file"])).resolve())
        creds[principal.name] = data
    ca = creds[access.aggregator]["ca_file"]
    broker = ConfiguredMosquitto(
        result.out_dir / "mosquitto.conf",
        port=result.port,
        work_dir=root / "run",
        tls_context=ssl.create_default_context(cafile=ca),
    ).start()
    return broker, result.broker_url, creds


def _wait_for_predictions(
    observer: FleetObserver, devices: list[str], live_thread: threading.Thread | None
) -> None:
    """With live sensor data, waits (bounded) until every device has published a prediction,
    so the run shows what a BMS reads. A device publishes its first prediction as soon as it
    holds a trained model; later ones at most every ``[insight] min_interval_s`` (60 s)."""
    if live_thread is None:
        return
    deadline = time.monotonic() + PREDICTION_WAIT_S
    while time.monotonic() < deadline and live_thread.is_alive():
        if all(d in observer.view.insights for d in devices):
            return
        observer.wait(0.5)


def _feed_through_edgex(
    options: DemoOptions,
    observer: FleetObserver,
    subjects: dict[str, int],
    broker_url: str,
    mqtt_protocol: int,
    procs: dict[str, subprocess.Popen[bytes]],
    progress: Callable[[int, int], None] | None,
    simulator_creds: dict[str, Any] | None = None,
) -> dict[str, int]:
    """Replays each device's recordings as EdgeX events and waits until every agent stored them."""
    from fedge.lab.edgex_simulate import ROW_PERIOD_NS, SimulateOptions, simulate  # noqa: PLC0415

    def data(device: str) -> dict[str, Any]:
        status = observer.view.device_status.get(device, {})
        report = status.get("data") if isinstance(status, dict) else None
        return report if isinstance(report, dict) else {}

    _wait(
        lambda: all(data(d).get("bus_connected") for d in subjects),
        observer,
        120,
        "the agents to subscribe to EdgeX",
        procs,
    )
    loaded = har_watch.load_devices(options.task, subjects.values())
    expected = {har_watch.device_id(s): d.x.shape[0] for s, d in loaded.items()}
    # The recordings are placed so that they end now: the readings a building's sensors sent
    # before the fleet started, and the live stream after them carries the wall-clock time.
    recordings = har_watch.load_recordings()
    gap_s = SimulateOptions.gap_s
    span_ns = max(
        sum(r.readings.shape[0] * ROW_PERIOD_NS + int(gap_s * 1e9) for r in recordings if r.subject == s)
        for s in subjects.values()
    )
    report = simulate(
        SimulateOptions(
            start_ns=time.time_ns() - span_ns,
            broker_url=broker_url,
            version=options.edgex_version,
            subjects=tuple(subjects.values()),
            mqtt_protocol=mqtt_protocol,
            **_client_creds(simulator_creds),
        ),
        progress=progress,
    )
    _wait(
        lambda: all(data(d).get("stored_samples", 0) >= expected[d] for d in subjects),
        observer,
        180,
        "every agent to store its samples",
        procs,
    )
    return report.last_origin_ns


def _start_live_stream(
    options: DemoOptions,
    subjects: dict[str, int],
    last_origin_ns: dict[str, int],
    broker_url: str,
    mqtt_protocol: int,
    simulator_creds: dict[str, Any] | None,
    stop: threading.Event,
) -> threading.Thread:
    """After the training data, each device's sensors keep sending (without a label): the
    held-out subjects' recordings, in real time, from which the agents publish predictions
    (``insight/{device_id}``) once they hold a trained global model."""
    from fedge.lab.edgex_simulate import SimulateOptions, stream_live  # noqa: PLC0415

    recordings = har_watch.load_recordings()
    held_out = har_watch.TEST_SUBJECTS
    sources = {
        subject: [r for r in recordings if r.subject == held_out[i % len(held_out)]]
        for i, subject in enumerate(subjects.values())
    }
    start = {
        subject: last_origin_ns.get(device, time.time_ns()) + LIVE_GAP_NS
        for device, subject in subjects.items()
    }
    live = SimulateOptions(
        broker_url=broker_url,
        version=options.edgex_version,
        mqtt_protocol=mqtt_protocol,
        **_client_creds(simulator_creds),
    )

    def run() -> None:
        try:
            stream_live(live, sources, start, stop)
        except FedgeError as exc:  # the demo goes on; its summary says no predictions came
            log.warning("live EdgeX stream ended: %s", exc)

    thread = threading.Thread(target=run, name="fedge-demo-live", daemon=True)
    thread.start()
    return thread


@dataclass(frozen=True)
class DirectData:
    """``--data direct``: each device's CSV, the samples its agent builds from it, and the
    origin of its last row (the live rows follow it)."""

    files: dict[str, Path]
    expected: dict[str, int]
    last_origin_ns: dict[str, int]


def write_task_file(task: TaskSpec, path: Path) -> Path:
    """The task as a task-spec TOML file (for options without ``task_file``); checked to parse
    back to the same task."""
    from fedge.protocol.task import parse_task_spec  # noqa: PLC0415

    spec = task.to_dict()
    tables: dict[str, dict[str, Any]] = {"task": {k: v for k, v in spec.items() if not isinstance(v, dict)}}
    lines: list[str] = []

    def table(name: str, values: dict[str, Any]) -> None:
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in values.items() if not isinstance(v, dict))
        lines.append("")
        for k, v in values.items():
            if isinstance(v, dict):
                table(f"{name}.{k}", v)

    for name, values in {**tables, **{k: v for k, v in spec.items() if isinstance(v, dict)}}.items():
        table(name, values)
    text = "\n".join(lines)
    if parse_task_spec(text).sha256() != task.sha256():
        raise FedgeError(f"the task {task.name!r} does not round-trip as TOML; pass its file (--task)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _epoch_text(ns: int) -> str:
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


def _csv_row(origin_ns: int, readings: Any, label: str) -> str:
    # repr: the shortest text that reads back as the same float64, so the agent's features are
    # byte for byte the data-set loader's.
    return ",".join([_epoch_text(origin_ns), *(repr(float(v)) for v in readings), label]) + "\n"


def write_device_csvs(root: Path, task: TaskSpec, subjects: dict[str, int]) -> DirectData:
    """Each device's subject's recordings (labels included) as the CSV a logger on the device
    writes (``docs/own-data.md``'s format: ``time``, the six IMU resources, ``activity``), placed
    so that they end now; written row by row, never held whole."""
    recordings = har_watch.load_recordings()
    expected = {
        har_watch.device_id(s): d.x.shape[0]
        for s, d in har_watch.load_devices(task, subjects.values()).items()
    }
    header = ",".join(("time", *har_watch.RESOURCES, har_watch.LABEL_RESOURCE)) + "\n"
    now = time.time_ns()
    files: dict[str, Path] = {}
    last: dict[str, int] = {}
    for device, subject in subjects.items():
        mine = [r for r in recordings if r.subject == subject]
        span = sum(r.readings.shape[0] * ROW_PERIOD_NS + RECORDING_GAP_NS for r in mine)
        t = now - span
        path = root / device / DEVICE_CSV
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8", newline="") as f:
            f.write(header)
            for rec in mine:
                label = har_watch.CLASSES[rec.label]
                for row in rec.readings:
                    f.write(_csv_row(t, row, label))
                    last[device] = t
                    t += ROW_PERIOD_NS
                t += RECORDING_GAP_NS
        files[device] = path
    return DirectData(files, expected, last)


def _wait_for_csv_samples(
    observer: FleetObserver, direct: DirectData, procs: dict[str, subprocess.Popen[bytes]]
) -> None:
    """Until every agent reports the samples of its whole CSV (its status, ``data.stored_samples``)."""

    def stored(device: str) -> int:
        status = observer.view.device_status.get(device, {})
        report = status.get("data") if isinstance(status, dict) else None
        value = report.get("stored_samples", 0) if isinstance(report, dict) else 0
        return value if isinstance(value, int) else 0

    _wait(
        lambda: all(stored(d) >= n for d, n in direct.expected.items()),
        observer,
        180,
        "every agent to read its CSV",
        procs,
    )


def _start_live_csv(direct: DirectData, subjects: dict[str, int], stop: threading.Event) -> threading.Thread:
    """After the training rows, each device's logger keeps writing: the held-out subjects'
    readings, without a label (an empty cell), appended in real time (50 rows a second), from
    which the agents publish predictions once they hold a trained global model."""
    recordings = har_watch.load_recordings()
    held_out = har_watch.TEST_SUBJECTS
    rows = {
        device: [row for r in recordings if r.subject == held_out[i % len(held_out)] for row in r.readings]
        for i, device in enumerate(subjects)
    }
    start_ns = max(time.time_ns(), max(direct.last_origin_ns.values(), default=0) + LIVE_GAP_NS)
    written = dict.fromkeys(subjects, 0)

    def run() -> None:
        while not stop.wait(0.5):
            due = (time.time_ns() - start_ns) // ROW_PERIOD_NS + 1
            for device, path in direct.files.items():
                source = rows[device]
                if not source or due <= written[device]:
                    continue
                with path.open("a", encoding="utf-8", newline="") as f:
                    for i in range(written[device], due):
                        f.write(_csv_row(start_ns + i * ROW_PERIOD_NS, source[i % len(source)], ""))
                written[device] = due

    thread = threading.Thread(target=run, name="fedge-demo-live-csv", daemon=True)
    thread.start()
    return thread


@dataclass(frozen=True)
class OwnData:
    """A building's own data, read and checked before anything starts: the replay of the training
    CSV, each device's events, and how many samples each device's builder makes of them."""

    replay: CsvReplay
    profile: DeviceProfile
    events: dict[str, list[Event]]  # device id (= EdgeX device name) -> its events
    expected: dict[str, int]  # device id -> samples its sample builder stores
    x_test: np.ndarray  # the test CSV's samples, built as a device builds them
    y_test: np.ndarray

    @property
    def devices(self) -> dict[str, int]:
        """Device id -> its index (``create_fleet``'s subjects; unused by an EdgeX fleet)."""
        return {device: index for index, device in enumerate(self.events, start=1)}


def _own_data(options: DemoOptions) -> OwnData:
    """Reads the profile and the training CSV as ``fedge edgex simulate --csv`` does, and counts
    the samples each device's builder makes (the device's own limits and screening)."""
    from fedge.agent.edgex.profile import check_task_against_profile, load_profile  # noqa: PLC0415
    from fedge.agent.edgex.samples import SampleBuilder  # noqa: PLC0415
    from fedge.lab.edgex_simulate import CsvReplay, csv_device_events  # noqa: PLC0415
    from fedge.protocol.topics import check_id  # noqa: PLC0415
    from fedge.tools.evaluate import csv_samples  # noqa: PLC0415

    if options.train_csv is None or options.test_csv is None or options.profile_file is None:
        raise FedgeError("--train needs --test and --profile")
    if options.task_file is None:
        raise FedgeError("--train needs --task (the file the devices are provisioned with)")
    if options.data_path != "edgex":
        raise FedgeError("--train feeds the devices through EdgeX; --data direct is for the smartwatch set")
    profile = load_profile(options.profile_file)
    check_task_against_profile(options.task, profile)
    replay = CsvReplay(options.train_csv, profile, options.split_by, options.time_column)
    events = csv_device_events(replay)
    if len(events) > 256:
        raise FedgeError(f"{options.train_csv}: {len(events)} groups; the demo runs at most 256 devices")
    limits = {r.name: (r.minimum, r.maximum) for r in profile.resources}
    expected: dict[str, int] = {}
    for device, device_events in events.items():
        check_id(device)  # the device's fleet id, and its EdgeX-bus principal's
        builder = SampleBuilder(options.task, limits, device=device)
        samples = builder.add([r for e in device_events for r in e.readings])
        expected[device] = len(samples) + len(builder.flush())
        if expected[device] < 2:
            raise FedgeError(
                f"{options.train_csv}: device {device} gets {expected[device]} sample(s) of task "
                f"{options.task.name!r}; a device needs at least 2 (fedge evaluate shows what is dropped)"
            )
    test = csv_samples(options.test_csv, options.task, profile, options.time_column)
    return OwnData(replay, profile, events, expected, test.x, test.y)


def _device_data(observer: FleetObserver, device: str) -> dict[str, Any]:
    status = observer.view.device_status.get(device, {})
    report = status.get("data") if isinstance(status, dict) else None
    return report if isinstance(report, dict) else {}


def _feed_csv_through_edgex(
    options: DemoOptions,
    own: OwnData,
    observer: FleetObserver,
    broker_url: str,
    mqtt_protocol: int,
    procs: dict[str, subprocess.Popen[bytes]],
    progress: Callable[[int, int], None] | None,
    simulator_creds: dict[str, Any] | None = None,
) -> None:
    """Replays the training CSV as EdgeX events (``fedge edgex simulate --csv``) and waits until
    every agent stored its samples."""
    from fedge.lab.edgex_simulate import SimulateOptions, simulate_csv  # noqa: PLC0415

    _wait(
        lambda: all(_device_data(observer, d).get("bus_connected") for d in own.events),
        observer,
        120,
        "the agents to subscribe to EdgeX",
        procs,
    )
    total = sum(len(e) for e in own.events.values())
    done = 0

    def on_event(event: Event, dto: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    simulate_csv(
        SimulateOptions(
            broker_url=broker_url,
            version=options.edgex_version,
            mqtt_protocol=mqtt_protocol,
            **_client_creds(simulator_creds),
        ),
        own.replay,
        on_event=on_event,
    )
    _wait(
        lambda: all(_device_data(observer, d).get("stored_samples", 0) >= n for d, n in own.expected.items()),
        observer,
        180,
        "every agent to store its samples",
        procs,
    )


def run_demo(
    options: DemoOptions,
    on_progress: Callable[[FleetObserver], None] | None = None,
    on_data_progress: Callable[[int, int], None] | None = None,
) -> DemoSummary:
    asynchronous = _check_aggregation(options)  # before --buildings, which it cannot run with
    if options.buildings > 0:  # devices under building gateways under one campus
        from fedge.lab.demo_buildings import run_buildings_demo  # noqa: PLC0415

        return run_buildings_demo(options, on_progress)
    own = _own_data(options) if options.train_csv is not None else None  # checked before anything starts
    if own is None and not 1 <= options.devices <= MAX_DEVICES:
        raise FedgeError(f"--devices must be 1..{MAX_DEVICES} (subjects 1-7; 8-10 are held out for testing)")
    n_devices = len(own.events) if own is not None else options.devices
    third = max(1, (n_devices + 2) // 3)
    min_devices = options.min_devices or (third if asynchronous else max(1, (n_devices + 1) // 2))
    if options.secure_aggregation and options.min_devices is None:
        min_devices = max(min_devices, 3)  # the protocol's least: with 2, one sum reveals the other
    elif options.secure_aggregation and min_devices < 3:
        raise FedgeError("--secure-aggregation needs --min-devices 3 or more")
    if min_devices > n_devices:
        what = f"the {n_devices} devices (groups of --train)" if own is not None else f"--devices {n_devices}"
        raise FedgeError(f"--min-devices {min_devices} exceeds {what}")
    if not 0 <= options.container_agents <= n_devices:
        raise FedgeError(f"--container-agents must be 0..{n_devices} (the number of devices)")
    if options.container_agents and not options.agent_image:
        raise FedgeError("--container-agents needs --agent-image (built by make images)")
    threshold = _secure_threshold(options, n_devices, min_devices)
    buffer_size = options.buffer_size or max(min_devices, third)
    if asynchronous and buffer_size < min_devices:
        raise FedgeError(f"--buffer-size {buffer_size} is below --min-devices {min_devices}")
    workers = _worker_names(options)
    out = options.out.resolve()  # the broker's configuration names absolute paths
    out.mkdir(parents=True, exist_ok=True)
    # A demo is a fresh fleet: new keys, no checkpoint, no broker state from an earlier run
    # (a retained manifest signed with an old key would only be rejected by the new agents).
    for owned in ("fleet", "broker", "logs", "containers"):
        shutil.rmtree(out / owned, ignore_errors=True)
    start = time.perf_counter()
    model_dir = out / "model"
    build_model_files(options.task, model_dir)
    centralized_mse: float | None = None
    if own is not None:
        assert options.test_csv is not None  # checked by _own_data
        # fedge train-local --train --test: the same files, the same model, the same seed.
        reference_csv = train_local_csv(
            options.task,
            own.replay.csv,
            options.test_csv,
            options.reference_epochs,
            seed=options.seed,
            profile=own.profile,
            model_dir=model_dir,
            time_column=options.time_column,
        )
        centralized, centralized_mse = reference_csv.accuracy, reference_csv.mse
        x_test, y_test = own.x_test, own.y_test
        subjects = own.devices
    else:
        reference = train_local(
            options.task, options.reference_epochs, seed=options.seed, model_dir=model_dir
        )
        centralized = reference.test_accuracy
        devices = har_watch.load_devices(options.task, har_watch.TEST_SUBJECTS)
        x_test, y_test = har_watch.pooled(devices.values())
        subjects = {har_watch.device_id(s): s for s in har_watch.TRAIN_SUBJECTS[: options.devices]}

    broker: Any = None
    mqtt_protocol = options.mqtt_protocol
    creds: dict[str, dict[str, Any]] = {}
    if options.broker_url is None and options.secure_broker:
        broker, broker_url, creds = _start_secure_broker(out, list(subjects), model_dir, workers)
    elif options.broker_url is None:
        from fedge.lab.broker import AmqttBroker, BrokerSettings, local_broker  # noqa: PLC0415

        log.warning("starting an anonymous broker without TLS (--insecure-broker)")
        (out / "broker").mkdir(parents=True)
        broker = local_broker(BrokerSettings(data_dir=out / "broker")).start()
        if isinstance(broker, AmqttBroker):
            mqtt_protocol = 3  # the embedded fallback speaks MQTT 3.1.1 only
        broker_url = broker.url
    else:
        broker_url = options.broker_url
        if options.broker_credentials:
            shared = dict(options.broker_credentials)
            creds = {name: shared for name in [*subjects, "aggregator", "observer", "simulator"]}
    host, port, _ = parse_broker_url(broker_url)
    edgex: dict[str, object] | None = None
    edgex_creds: dict[str, dict[str, object]] | None = None
    task_file = options.task_file
    direct: DirectData | None = None
    if own is None and options.data_path == "direct":
        if task_file is None:
            task_file = write_task_file(options.task, out / "fleet" / "task.toml")
        direct = write_device_csvs(out / "fleet" / "devices", options.task, subjects)
        # The device's profile types and bounds its readings, as on the EdgeX path.
        edgex = {"profile": str(bundled.profiles_dir() / "wearable-imu.yaml")}
    if options.data_path == "edgex":
        profile = bundled.profiles_dir() / "wearable-imu.yaml"
        edgex = {"prefix": "edgex", "profile": str(profile)}
        if own is not None and options.profile_file is not None:
            # A replayed export is old: keep samples of any age (docs/own-data.md).
            edgex = {"prefix": "edgex", "profile": str(options.profile_file.resolve()), "store_max_age_s": 0}
        if options.broker_url is None and options.secure_broker:
            # The EdgeX bus is the fleet's broker, and each agent's EdgeX connection is the
            # device's own EdgeX principal (the device's principal may not read EdgeX topics).
            edgex_creds = {
                d: {k: v for k, v in creds[edgex_principal(d)].items() if k in ("username", "password")}
                for d in subjects
            }
        elif creds:
            # --broker with one set of credentials for everyone: name the bus explicitly (a
            # broker "of its own" to the agent), since it cannot have a principal of its own.
            edgex.update(broker=broker_url, **creds["simulator"])
    fleet = create_fleet(
        out / "fleet",
        FLEET,
        model_dir,
        broker_url,
        subjects,
        rounds={
            "rounds": options.rounds,
            "min_devices": min_devices,
            "round_timeout_s": options.round_timeout_s,
            "codec": options.codec,
            "server_learning_rate": options.server_learning_rate,
            "wait_for_devices_s": 60.0,
            **(
                {"aggregation": "async", "buffer_size": buffer_size, "max_staleness": options.max_staleness}
                if asynchronous
                else {}
            ),
        },
        privacy=_privacy_table(options, threshold),
        secure_aggregation=options.secure_aggregation,
        replicas={"enabled": True} if workers else None,
        mqtt_protocol=mqtt_protocol,
        edgex=edgex,
        task_file=task_file,
        csv_files=direct.files if direct is not None else None,
        mqtt_extra={
            name: {k: v for k, v in c.items() if k in ("username", "password", "ca_file")}
            for name, c in creds.items()
        },
        edgex_extra=edgex_creds,
    )
    observer = FleetObserver(
        FLEET,
        host,
        port,
        fleet.signing_key.verify_key,
        (model_dir / "model.tflite").read_bytes(),
        x_test,
        y_test,
        mqtt_protocol=mqtt_protocol,
        **_client_creds(creds.get("observer")),
    )
    procs: dict[str, subprocess.Popen[bytes]] = {}
    exit_codes: dict[str, int | None] = {}
    containers: list[str] = []
    live_stop = threading.Event()
    live_thread: threading.Thread | None = None
    dropouts: Dropouts | None = None
    pacer: Pacer | None = None
    slow, offline = _paced_devices(options, list(fleet.agent_configs), asynchronous)
    try:
        observer.start()
        for index, (device_id, cfg) in enumerate(fleet.agent_configs.items()):
            log_path = out / "logs" / f"{device_id}.log"
            if index < options.container_agents and options.agent_image:
                agent = stage_container_agent(cfg, out / "containers" / device_id, name_prefix="fedge-demo")
                containers.append(agent.name)
                procs[device_id] = _spawn_container(podman_run_command(agent, options.agent_image), log_path)
            else:
                procs[device_id] = _spawn(["agent", "run", "--config", str(cfg)], log_path)
        if own is not None:
            _feed_csv_through_edgex(
                options,
                own,
                observer,
                broker_url,
                mqtt_protocol,
                procs,
                on_data_progress,
                creds.get("simulator"),
            )
        elif options.data_path == "edgex":
            last_origins = _feed_through_edgex(
                options,
                observer,
                subjects,
                broker_url,
                mqtt_protocol,
                procs,
                on_data_progress,
                creds.get("simulator"),
            )
            live_thread = _start_live_stream(
                options, subjects, last_origins, broker_url, mqtt_protocol, creds.get("simulator"), live_stop
            )
        elif direct is not None:
            _wait_for_csv_samples(observer, direct, procs)
            live_thread = _start_live_csv(direct, subjects, live_stop)
        if options.drop_devices:
            dropouts = Dropouts(
                FLEET,
                ephemeral_settings(
                    host,
                    port,
                    creds.get("dropouts", {}).get("ca_file") is not None,
                    "fedge-dropouts",
                    protocol=mqtt_protocol,
                    **_client_creds(creds.get("dropouts")),
                ),
                host,
                port,
                {d: procs[d].pid for d in fleet.agent_configs},
                options.drop_devices,
                fleet.signing_key.verify_key,
                seed=options.seed,
            )
            dropouts.start()
        if slow or offline:  # mixed speeds from here on (the data is in)
            pacer = Pacer(
                {d: procs[d].pid for d in slow},
                options.slow_factor,
                intermittent={d: procs[d].pid for d in offline},
                outage_s=options.offline_s,
                outage_every_s=options.offline_every_s,
            )
            pacer.start()
        for worker in workers:  # before the leader, so that each has joined the shared subscription
            procs[worker] = _spawn(
                ["aggregator", "run", "--config", str(fleet.aggregator_config)],
                out / "logs" / f"{worker}.log",
                _worker_env(worker, creds.get(worker)),
            )
        procs["aggregator"] = _spawn(
            ["aggregator", "run", "--config", str(fleet.aggregator_config)], out / "logs" / "aggregator.log"
        )
        limit = time.monotonic() + 120 + options.rounds * (options.round_timeout_s + 30)
        while True:
            observer.wait(0.5)
            if on_progress is not None:
                on_progress(observer)
            finals = [e for e in observer.view.evaluations if e.phase == "final"]
            if finals and procs["aggregator"].poll() is not None:
                _wait_for_predictions(observer, list(fleet.agent_configs), live_thread)
                break
            code = procs["aggregator"].poll()
            if code is not None and not finals:
                raise FedgeError(
                    f"the aggregator exited with code {code}; see {out / 'logs' / 'aggregator.log'}"
                )
            if time.monotonic() > limit:
                raise FedgeError(f"the demo did not finish in time; see the logs in {out / 'logs'}")
    finally:
        if pacer is not None:
            pacer.stop()  # thaws every paced agent, so that it can be terminated
        if dropouts is not None:
            dropouts.stop()
        live_stop.set()
        if live_thread is not None:
            live_thread.join(timeout=10)
        exit_codes = terminate_processes(procs)
        _remove_containers(containers)
        observer.stop()
        if broker is not None:
            broker.stop()
    summary = _summarise(
        options,
        observer,
        centralized,
        broker_url,
        time.perf_counter() - start,
        exit_codes,
        centralized_mse=centralized_mse,
        own=own,
    )
    summary.aggregation = options.aggregation
    summary.slow_devices, summary.offline_devices = slow, offline
    return summary


def _check_aggregation(options: DemoOptions) -> bool:
    """``--aggregation``: True for "async", after refusing what it cannot run with (the
    aggregator's config would refuse it too, but only once its process starts)."""
    if options.aggregation not in ("sync", "async"):
        raise FedgeError(f'--aggregation must be "sync" or "async", got {options.aggregation!r}')
    if options.aggregation == "sync":
        return False
    for on, flag in (
        (options.secure_aggregation, "--secure-aggregation"),
        (options.dp_epsilon is not None, "--dp-epsilon"),
        (options.aggregator_replicas > 1, "--aggregator-replicas"),
        (options.buildings > 0, "--buildings"),
    ):
        if on:
            raise FedgeError(
                f"--aggregation async cannot run with {flag}: use --aggregation sync (docs/async.md)"
            )
    return True


def _paced_devices(
    options: DemoOptions, device_ids: list[str], asynchronous: bool
) -> tuple[list[str], list[str]]:
    """Which host-process agents run slow and which go offline at times: the last devices (the
    first ``container_agents`` run in containers, which the pacer cannot freeze), slow ones
    last, offline ones before them."""
    hosts = sorted(device_ids)[options.container_agents :]
    n_slow = options.slow_devices
    if n_slow is None:
        n_slow = max(1, len(device_ids) // 3) if asynchronous else 0
    if n_slow < 0 or options.offline_devices < 0 or n_slow + options.offline_devices > len(hosts):
        raise FedgeError(
            f"--slow-devices {n_slow} and --offline-devices {options.offline_devices} must fit in the "
            f"{len(hosts)} host-process agents"
        )
    slow = hosts[len(hosts) - n_slow :] if n_slow else []
    rest = hosts[: len(hosts) - n_slow]
    offline = rest[len(rest) - options.offline_devices :] if options.offline_devices else []
    return slow, offline


def _worker_names(options: DemoOptions) -> tuple[str, ...]:
    """``--aggregator-replicas N``: the N - 1 workers' ids (and broker usernames); refuses what
    replicas cannot run (``fedge.aggregator.replica_config.check_replicable``)."""
    n = options.aggregator_replicas
    if not 1 <= n <= MAX_AGGREGATOR_REPLICAS:
        raise FedgeError(f"--aggregator-replicas must be 1..{MAX_AGGREGATOR_REPLICAS}")
    if n > 1 and (options.secure_aggregation or options.dp_epsilon is not None):
        raise FedgeError(
            "--aggregator-replicas above 1 cannot run with --secure-aggregation or --dp-epsilon: one process "
            "runs a secure round's unmasking and the DP accountant (docs/scale.md)"
        )
    return tuple(f"aggregator-worker-{i}" for i in range(1, n))


def _worker_env(worker: str, creds: dict[str, Any] | None) -> dict[str, str]:
    """A worker runs the leader's config with its role, its id and its own broker principal."""
    env = {
        "FEDGE_AGGREGATOR__REPLICAS__ROLE": "worker",
        "FEDGE_AGGREGATOR__REPLICAS__WORKER_ID": worker,
    }
    if creds and creds.get("username"):
        env["FEDGE_AGGREGATOR__MQTT__USERNAME"] = str(creds["username"])
        env["FEDGE_AGGREGATOR__MQTT__PASSWORD"] = str(creds["password"])
    return env


def _summarise(
    options: DemoOptions,
    observer: FleetObserver,
    centralized: float | None,
    broker_url: str,
    seconds: float,
    exit_codes: dict[str, int | None],
    centralized_mse: float | None = None,
    own: OwnData | None = None,
) -> DemoSummary:
    view = observer.view
    by_round: dict[int, Any] = {}
    for ev in view.evaluations:
        by_round[ev.after_round] = ev  # the last evaluation of a round's result wins (retries)
    records = {
        r["round_number"]: r
        for r in view.rounds.values()
        if r["phase"] == "train" and r["outcome"] == "aggregated"
    }
    per_round = []
    for n in sorted(k for k in by_round if k >= 1):
        rec = records.get(n, {})
        per_round.append(
            {
                "round": n,
                "test_accuracy": by_round[n].accuracy,
                "test_loss": by_round[n].loss,
                "test_mse": by_round[n].mse,
                "train_loss": rec.get("train_loss"),
                "fed_eval_accuracy": rec.get("fed_eval_accuracy"),  # of the model sent out in that round
                "fed_eval_mse": rec.get("fed_eval_mse"),  # the same, for a regression task
                "fed_eval_loss": rec.get("fed_eval_loss"),
                "reported": rec.get("reported"),
                "selected": rec.get("selected"),
                "dropped": rec.get("dropped", 0),
                "mean_update_bytes": rec.get("mean_update_bytes"),
            }
        )
    final = per_round[-1]["test_accuracy"] if per_round else None
    final_mse = per_round[-1]["test_mse"] if per_round else None
    sizes = [r["mean_update_bytes"] for r in per_round if r["mean_update_bytes"]]
    return DemoSummary(
        task=options.task.name,
        devices=len(own.events) if own is not None else options.devices,
        rounds_requested=options.rounds,
        rounds_completed=len(per_round),
        codec=options.codec,
        broker=broker_url,
        seconds=seconds,
        centralized_accuracy=centralized,
        final_accuracy=final,
        accuracy_vs_centralized=(final / centralized) if final is not None and centralized else None,
        mean_update_bytes=sum(sizes) / len(sizes) if sizes else None,
        rejected=dict(view.aggregator_status.get("rejected_total", {})),
        per_round=per_round,
        processes=exit_codes,
        metric="accuracy" if options.task.model.kind == "classification" else "mse",
        centralized_mse=centralized_mse,
        final_mse=final_mse,
        data=_own_summary(options, own) if own is not None else None,
        predictions={
            "published": dict(view.insight_counts),
            "latest": {device: doc.get("prediction") for device, doc in view.insights.items()},
        },
        epsilon_spent=_epsilon_spent(view.aggregator_status),
        secure_aggregation=options.secure_aggregation,
        dropped=sum(int(r["dropped"] or 0) for r in per_round),
        delta=options.dp_delta if options.dp_epsilon is not None else None,
        aggregator_replicas=options.aggregator_replicas,
        workers=dict((view.aggregator_status.get("replicas") or {}).get("workers", {})),
    )


def _secure_threshold(options: DemoOptions, n_devices: int, min_devices: int) -> int | None:
    """The Shamir threshold for ``--drop-devices K``: the graph's degree less K, so that every
    survivor keeps enough surviving neighbours; None lets the aggregator choose. Refuses what
    cannot work, before anything starts."""
    k = options.drop_devices
    if not options.secure_aggregation:
        if k:
            raise FedgeError("--drop-devices goes with --secure-aggregation")
        return None
    if n_devices < 3:
        raise FedgeError("--secure-aggregation needs at least 3 devices")
    if not k:
        return None
    if options.container_agents:
        raise FedgeError("--drop-devices freezes host processes: it does not go with --container-agents")
    from fedge.protocol.secagg import choose_parameters  # noqa: PLC0415

    degree = choose_parameters(n_devices).degree
    threshold, lowest = degree - k, max(2, degree // 2 + 1)
    if threshold < lowest:
        raise FedgeError(
            f"--drop-devices {k} leaves too few of each device's {degree} neighbours for the secret "
            f"sharing (needs a threshold above {degree // 2}): drop at most {degree - lowest}"
        )
    if n_devices - k < min_devices:
        raise FedgeError(f"--drop-devices {k} leaves fewer than --min-devices {min_devices} in each round")
    return threshold


def _privacy_table(options: DemoOptions, threshold: int | None) -> dict[str, object] | None:
    """The aggregator's ``[privacy]`` table for the demo's options (None: all off)."""
    table: dict[str, object] = {}
    if options.dp_epsilon is not None:
        table.update(
            enabled=True,
            epsilon_budget=options.dp_epsilon,
            target_delta=options.dp_delta,
            clip_bound=options.dp_clip_bound,
        )
    if options.secure_aggregation:
        table["secure_aggregation"] = True
        if threshold is not None:
            table["secure_aggregation_threshold"] = threshold
        if options.dp_epsilon is not None:  # each device adds its noise share before masking
            table.update(
                noise="distributed_discrete_gaussian", adaptive_clipping=False, secure_aggregation_bits=62
            )
    return table or None


def _epsilon_spent(status: dict[str, Any]) -> float | None:
    """The epsilon the aggregator's last status says the fleet spent (None without DP)."""
    privacy = status.get("privacy")
    if not isinstance(privacy, dict):
        return None
    spent = privacy.get("epsilon_spent")
    return float(spent) if isinstance(spent, int | float) and not isinstance(spent, bool) else None


def _own_summary(options: DemoOptions, own: OwnData) -> dict[str, Any]:
    """What a run on own data read: the files, the split, and each device's rows and samples."""
    return {
        "train_csv": str(own.replay.csv),
        "test_csv": str(options.test_csv),
        "profile": str(options.profile_file),
        "split_by": own.replay.split_by,
        "time_column": own.replay.time_column,
        "seed": options.seed,
        "groups": {device: len(events) for device, events in own.events.items()},
        "samples": dict(own.expected),
        "test_examples": int(own.x_test.shape[0]),
    }


def write_outputs(summary: DemoSummary, out: Path) -> tuple[Path, Path | None]:
    path = out / "summary.json"
    path.write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    plot: Path | None = None
    if summary.per_round:
        from fedge.lab.plots import plot_history  # noqa: PLC0415

        rows = summary.per_round
        # A regression's metric is its loss (MSE): the plot shows the losses only.
        c_acc, c_mse = summary.centralized_accuracy, summary.centralized_mse
        reference_text = (
            f"{c_acc:.3f}" if c_acc is not None else f"MSE {c_mse:.4f}" if c_mse is not None else "-"
        )
        plot = plot_history(
            out / "rounds.png",
            f"fedge demo: {summary.devices} devices, {summary.codec} updates (centralized {reference_text})",
            [r["round"] for r in rows],
            [r["train_loss"] if r["train_loss"] is not None else float("nan") for r in rows],
            [r["test_loss"] for r in rows],
            [r["test_accuracy"] for r in rows],
            step_name="round",
            reference=summary.centralized_accuracy,
            second_metric=[r["fed_eval_accuracy"] for r in rows],
            second_metric_name="federated evaluation (devices' held-out)",
        )
    return path, plot


def render_table(summary: DemoSummary) -> str:
    mse = summary.metric == "mse"
    held_out = "held-out MSE" if mse else "held-out acc"
    fed_name = "fed. eval MSE" if mse else "fed. eval acc"
    lines = [
        f"{'round':>5} {held_out:>12} {fed_name:>13} {'train loss':>10} {'devices':>7} {'bytes/update':>12}"
    ]
    for r in summary.per_round:
        fed_value = r.get("fed_eval_mse") if mse else r["fed_eval_accuracy"]
        fed = "-" if fed_value is None else (f"{fed_value:.4f}" if mse else f"{fed_value:.3f}")
        tl = f"{r['train_loss']:.4f}" if r["train_loss"] is not None else "-"
        dev = f"{r['reported']}/{r['selected']}" if r["reported"] is not None else "-"
        size = f"{r['mean_update_bytes']:.0f}" if r["mean_update_bytes"] else "-"
        held = f"{r['test_mse']:.4f}" if mse else f"{r['test_accuracy']:.3f}"
        lines.append(f"{r['round']:>5} {held:>12} {fed:>13} {tl:>10} {dev:>7} {size:>12}")
    c = summary.centralized_accuracy
    f = summary.final_accuracy
    lines.append("")
    if mse:
        cm, fm = summary.centralized_mse, summary.final_mse
        lines.append(
            f"centralized reference MSE (fedge train-local): {cm:.4f}" if cm is not None else "centralized: -"
        )
        if fm is not None:
            lines.append(f"federated MSE after {summary.rounds_completed} rounds: {fm:.4f}")
        lines.append(f"rejected updates: {summary.rejected or 'none'}; took {summary.seconds:.0f}s")
        return "\n".join(lines)
    lines.append(f"centralized reference (fedge train-local): {c:.3f}" if c is not None else "centralized: -")
    if f is not None and c:
        lines.append(
            f"federated after {summary.rounds_completed} rounds: {f:.3f} ({100 * f / c:.1f}% of centralized)"
        )
    lines.append(f"rejected updates: {summary.rejected or 'none'}; took {summary.seconds:.0f}s")
    if summary.secure_aggregation:
        lines.append(
            f"secure aggregation: the aggregator saw only sums; {summary.dropped} device-round(s) "
            "dropped out of the sum"
        )
    if summary.epsilon_spent is not None:
        lines.append(
            f"differential privacy: epsilon {summary.epsilon_spent:.3f} spent at delta {summary.delta:g} "
            "(per device, whole run)"
        )
    if summary.buildings:
        lines.append(
            f"buildings: {len(summary.buildings)} gateways under one campus aggregator (devices = buildings "
            "above); " + "; ".join(f"{b}: {', '.join(d)}" for b, d in sorted(summary.buildings.items()))
        )
    if summary.aggregator_replicas > 1:
        shares = ", ".join(
            f"{name} {w.get('updates', 0)} updates in {w.get('partials', 0)} partials"
            for name, w in sorted(summary.workers.items())
        )
        lines.append(
            f"aggregator replicas: a leader and {summary.aggregator_replicas - 1} worker(s) on one shared "
            f"subscription; {shares or 'no worker heard from'}"
        )
    published = summary.predictions.get("published", {})
    if published:
        lines.append(
            f"predictions: {len(published)} of {summary.devices} devices published "
            f"({sum(published.values())} in all) on fedge/v1/{FLEET}/insight/+"
        )
    return "\n".join(lines)
