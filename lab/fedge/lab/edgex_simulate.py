"""``fedge edgex simulate``: replays a recorded data set as an EdgeX device service would.

Each subject of the smartwatch data set becomes one EdgeX device (``watch-01`` ...) of the
wearable-IMU profile; every reading row becomes six ``Float32`` readings and the ``activity``
label, published on ``{prefix}/events/device/{service}/{profile}/{device}/{source}`` in the
EdgeX 3.x or 4.x wire format with that version's float formatting. Recordings are separated by
a pause (as in real life), so windows never span two recordings. Optionally the same events
are served by a core-data REST double for backfill.

``--csv`` replays a building's own export instead (:func:`simulate_csv`): the CSV is read by
:mod:`fedge.tools.csv_readings` (header, the profile's value types, the time column) and split
into groups (``--split-by day`` or ``column:NAME``); each group is one EdgeX device
``<prefix>-<group>`` (prefix: the profile's name by default) of the given profile, one event per
row holding a reading of every column that is one of the profile's resources, with the row's
time as the origins (without a time column: rows one second apart from now). Values are
encoded as EdgeX carries them (a Bool as ``"true"``/``"false"``).

A test double and demo driver: it stands in for EdgeX, which cannot run here.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fedge.agent.edgex.readings import Event, Reading
from fedge.agent.edgex.wire import FLOAT_STYLE_BY_VERSION, edgex_event_topic, encode_envelope, event_to_dto
from fedge.lab import har_watch
from fedge.protocol.config_source import ConfigError
from fedge.protocol.errors import FedgeError
from fedge.protocol.mqtt_settings import parse_broker_url
from fedge.shell.mqtt import connect_failure_hint, ephemeral_settings, make_client
from fedge.tools.csv_readings import CsvError, CsvTable, group_name, parse_split_by, profile_cell, split_rows

if TYPE_CHECKING:
    from fedge.agent.edgex.profile import DeviceProfile

PROFILE = "Wearable-IMU"  # edgex_profiles/wearable-imu.yaml
SERVICE = "device-imu"
SOURCE = "imu"
ROW_PERIOD_NS = int(1e9 / har_watch.SAMPLE_RATE_HZ)
#: How long the publisher waits for the broker's CONNACK before it gives up.
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class SimulateOptions:
    broker_url: str
    prefix: str = "edgex"
    version: str = "v4"  # "v3" or "v4" wire format
    content_type: str = "application/json"
    speed: float = 0.0  # 0: as fast as the broker takes it; 1: real time; 10: ten times faster
    subjects: tuple[int, ...] = har_watch.TRAIN_SUBJECTS
    batch_rows: int = 50  # rows per event (readings keep their own origins)
    max_rows: int | None = None  # per subject, for short tests
    start_ns: int | None = None
    gap_s: float = 2.0
    mqtt_protocol: int = 5
    qos: int = 1
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None


@dataclass
class SimulationReport:
    events: int = 0
    readings: int = 0
    rows_by_device: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    last_origin_ns: dict[str, int] = field(default_factory=dict)


def device_events(
    subject: int,
    recordings: list[har_watch.Recording],
    start_ns: int,
    batch_rows: int,
    gap_s: float,
    max_rows: int | None = None,
    labelled: bool = True,
) -> Iterator[Event]:
    """One subject's recordings as EdgeX events of ``batch_rows`` rows each, in time order.
    ``labelled=False``: without the label reading, as a building's live sensors send them."""
    device = har_watch.device_id(subject)
    t = start_ns
    emitted = 0
    for rec in recordings:
        rows = rec.readings
        label = har_watch.CLASSES[rec.label]
        for begin in range(0, rows.shape[0], batch_rows):
            chunk = rows[begin : begin + batch_rows]
            if max_rows is not None:
                chunk = chunk[: max(0, max_rows - emitted)]
            if chunk.shape[0] == 0:
                return
            readings: list[Reading] = []
            first_origin = t
            for row in chunk:
                for name, value in zip(har_watch.RESOURCES, row, strict=True):
                    readings.append(Reading(device, name, PROFILE, "Float32", float(value), t))
                if labelled:
                    readings.append(Reading(device, har_watch.LABEL_RESOURCE, PROFILE, "String", label, t))
                t += ROW_PERIOD_NS
            emitted += chunk.shape[0]
            yield Event(str(uuid.uuid4()), device, PROFILE, SOURCE, first_origin, tuple(readings))
        t += int(gap_s * 1e9)


def _interleaved(streams: list[Iterator[Event]]) -> Iterator[Event]:
    """Events of all devices merged by origin: devices stream side by side, as in a building."""
    heads: list[Event | None] = [next(s, None) for s in streams]
    while True:
        live = [(e.origin_ns, i) for i, e in enumerate(heads) if e is not None]
        if not live:
            return
        _, i = min(live)
        event = heads[i]
        assert event is not None
        yield event
        heads[i] = next(streams[i], None)


class EdgeXPublisher:
    """Publishes events as a device service would, with bounded in-flight messages."""

    def __init__(self, options: SimulateOptions) -> None:
        if options.version not in FLOAT_STYLE_BY_VERSION:
            raise FedgeError(f"EdgeX version must be one of {sorted(FLOAT_STYLE_BY_VERSION)}")
        self.options = options
        self.style = FLOAT_STYLE_BY_VERSION[options.version]
        host, port, tls = parse_broker_url(options.broker_url)
        settings = ephemeral_settings(
            host,
            port,
            tls,
            "fedge-edgex-sim",
            protocol=options.mqtt_protocol,
            username=options.username,
            password=options.password,
            ca_file=options.ca_file,
        )
        self.client_settings = settings
        if options.ca_file is not None and not tls:
            raise FedgeError(
                f"--ca-file is for TLS: the broker URL must start with mqtts://, not {options.broker_url}"
            )
        try:
            self.client = make_client(settings, persistent=False)
        except ConfigError as exc:  # an unreadable --ca-file: the command's input, not a service config
            raise FedgeError(str(exc)) from None
        self.client.max_inflight_messages_set(200)
        # The CONNACK (or the connection closing without one), from paho's thread.
        self._answer: list[str | None] = []
        self._answered = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        try:
            self.client.connect(host, port, settings.keepalive)
        except OSError as exc:
            raise FedgeError(
                f"cannot connect to the broker at {options.broker_url}: {exc}; "
                f"check: {connect_failure_hint(exc, settings)}"
            ) from None
        self.client.loop_start()
        if not self._answered.wait(CONNECT_TIMEOUT_S) or self._answer[0] is not None:
            problem = self._answer[0] if self._answer else f"no CONNACK within {CONNECT_TIMEOUT_S:g} s"
            self.client.disconnect()
            self.client.loop_stop()
            raise FedgeError(f"cannot connect to the broker at {options.broker_url}: {problem}")
        self._pending: list[mqtt.MQTTMessageInfo] = []

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if self._answered.is_set():
            return  # a reconnection: publish() and drain() carry on
        refused = (
            f"the broker refused the connection ({reason_code}); check --username and --password-file"
            if reason_code.is_failure
            else None
        )
        self._answer.append(refused)
        self._answered.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if not self._answered.is_set():  # closed without a CONNACK
            hint = connect_failure_hint(None, self.client_settings)
            self._answer.append(f"the broker closed the connection without answering CONNECT; check: {hint}")
            self._answered.set()

    def publish(self, event: Event) -> None:
        o = self.options
        topic = edgex_event_topic(o.prefix, SERVICE, event.profile, event.device, event.source)
        payload = encode_envelope(
            event, o.version, topic, content_type=o.content_type, float_style=self.style
        )
        self._pending.append(self.client.publish(topic, payload, qos=o.qos))
        if len(self._pending) >= 500:  # bounded in-flight: wait for the broker to take them
            self.drain()

    def drain(self) -> None:
        for info in self._pending:
            info.wait_for_publish(30)
        self._pending.clear()

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self.client.disconnect()
            self.client.loop_stop()

    def __enter__(self) -> EdgeXPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stream_live(
    options: SimulateOptions,
    sources: dict[int, list[har_watch.Recording]],
    start_ns: dict[int, int],
    stop: threading.Event,
) -> SimulationReport:
    """Streams unlabelled readings in real time until ``stop``: each device (a training
    subject) replays ``sources[subject]`` (recordings it never trained on) over and over, its
    origins continuing from ``start_ns[subject]`` (after its training data, so none is late).
    What a building's sensors send once the model is trained: the agents' predictions
    (``insight/{device_id}``) are made from these."""
    report = SimulationReport()
    wall_start = time.monotonic()
    base = min(start_ns.values()) if start_ns else time.time_ns()
    streams = [
        device_events(
            subject,
            list(itertools.islice(itertools.cycle(recordings), 10_000)),
            start_ns[subject],
            options.batch_rows,
            options.gap_s,
            labelled=False,
        )
        for subject, recordings in sources.items()
        if recordings
    ]
    with EdgeXPublisher(options) as publisher:
        for event in _interleaved(streams):
            due = wall_start + (event.origin_ns - base) / 1e9
            while not stop.is_set() and time.monotonic() < due:
                stop.wait(min(0.2, due - time.monotonic()))
            if stop.is_set():
                break
            publisher.publish(event)
            publisher.drain()
            report.events += 1
            report.readings += len(event.readings)
            report.rows_by_device[event.device] = report.rows_by_device.get(event.device, 0) + len(
                event.readings
            ) // len(har_watch.RESOURCES)
            report.last_origin_ns[event.device] = event.readings[-1].origin_ns
    report.seconds = time.monotonic() - wall_start
    return report


def replay_events(options: SimulateOptions) -> tuple[Iterator[Event], int, int]:
    """All subjects' events merged by time, the first origin, and the number of rows."""
    recordings = har_watch.load_recordings()
    start_ns = options.start_ns if options.start_ns is not None else time.time_ns()
    streams = [
        device_events(
            s,
            [r for r in recordings if r.subject == s],
            start_ns,
            options.batch_rows,
            options.gap_s,
            options.max_rows,
        )
        for s in options.subjects
    ]
    total_rows = sum(
        min(sum(r.readings.shape[0] for r in recordings if r.subject == s), options.max_rows or 10**12)
        for s in options.subjects
    )
    return _interleaved(streams), start_ns, total_rows


def simulate(
    options: SimulateOptions,
    on_event: Callable[[Event, dict[str, Any]], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SimulationReport:
    """Publishes the replay; ``on_event`` also receives each event's DTO (e.g. for core-data)."""
    if options.batch_rows < 1:
        raise FedgeError("batch_rows must be >= 1")
    events, start_ns, total_rows = replay_events(options)
    report = SimulationReport()
    wall_start = time.monotonic()
    rows_done = 0
    with EdgeXPublisher(options) as publisher:
        for event in events:
            if options.speed > 0:
                due = wall_start + (event.origin_ns - start_ns) / 1e9 / options.speed
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            publisher.publish(event)
            if on_event is not None:
                on_event(event, event_to_dto(event, publisher.style))
            rows = len(event.readings) // (len(har_watch.RESOURCES) + 1)
            rows_done += rows
            report.events += 1
            report.readings += len(event.readings)
            report.rows_by_device[event.device] = report.rows_by_device.get(event.device, 0) + rows
            report.last_origin_ns[event.device] = event.readings[-1].origin_ns
            if progress is not None:
                progress(rows_done, total_rows)
    report.seconds = time.monotonic() - wall_start
    return report


# --- a building's own CSV ----------------------------------------------------------------------


@dataclass(frozen=True)
class CsvReplay:
    """What ``--csv`` replays: the file, its devices' profile, and how rows become devices."""

    csv: Path
    profile: DeviceProfile
    split_by: str  # "day" or "column:NAME"
    time_column: str | None = None
    device_prefix: str | None = None


def csv_device_events(replay: CsvReplay, start_ns: int | None = None) -> dict[str, list[Event]]:
    """Each group's events (device name -> events in file order), all checked before anything
    is published: every problem is one :class:`CsvError`."""
    profile = replay.profile
    prefix = replay.device_prefix if replay.device_prefix is not None else profile.name
    if not prefix or group_name(prefix) != prefix:
        raise CsvError(f"--device-prefix {prefix!r}: use letters, digits and _ ~ . - only")
    split_column = parse_split_by(replay.split_by)
    value_types = {r.name: r.value_type for r in profile.resources if "R" in r.read_write}
    optional = [*value_types, *([split_column] if split_column is not None else [])]
    table = CsvTable(replay.csv, optional=optional, time_column=replay.time_column)
    resources = [n for n in value_types if n in table.header and n != table.time_column]
    if not resources:
        raise CsvError(
            f"{replay.csv}: no column is a resource of profile {profile.name!r} ({', '.join(value_types)})"
        )
    source = _source(profile, resources)
    offset = 0 if table.time_column is not None else (start_ns if start_ns is not None else time.time_ns())
    events: dict[str, list[Event]] = {}
    for group, rows in split_rows(table, replay.split_by).items():
        device = f"{prefix}-{group}"
        out = events.setdefault(device, [])
        for row in rows:
            origin = row.origin_ns + offset
            if origin <= 0:
                raise CsvError(f"{table.where(row)}: EdgeX origins are after 1970-01-01")
            readings = tuple(
                Reading(
                    device,
                    name,
                    profile.name,
                    value_types[name],
                    profile_cell(table.where(row), name, row.cells[name], value_types[name]),
                    origin,
                )
                for name in resources
                if row.cells[name]
            )
            if readings:
                out.append(Event(str(uuid.uuid4()), device, profile.name, source, origin, readings))
    return events


def _source(profile: DeviceProfile, resources: list[str]) -> str:
    """The event's sourceName: a readable command reading all of ``resources``, else the one
    resource, else the profile's name."""
    for command in profile.commands:
        if command.readable and set(resources) <= set(command.resources):
            return command.name
    return resources[0] if len(resources) == 1 else profile.name


def simulate_csv(
    options: SimulateOptions,
    replay: CsvReplay,
    on_event: Callable[[Event, dict[str, Any]], None] | None = None,
) -> SimulationReport:
    """Publishes the CSV's groups as EdgeX devices; the report counts events per device
    (``rows_by_device``: one event per row with a value)."""
    groups = csv_device_events(replay, options.start_ns)
    report = SimulationReport(rows_by_device={device: 0 for device in groups})
    heads = [e[0].origin_ns for e in groups.values() if e]
    first_ns = min(heads) if heads else 0
    wall_start = time.monotonic()
    with EdgeXPublisher(options) as publisher:
        for event in _interleaved([iter(e) for e in groups.values()]):
            if options.speed > 0:
                delay = wall_start + (event.origin_ns - first_ns) / 1e9 / options.speed - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            publisher.publish(event)
            if on_event is not None:
                on_event(event, event_to_dto(event, publisher.style))
            report.events += 1
            report.readings += len(event.readings)
            report.rows_by_device[event.device] += 1
            report.last_origin_ns[event.device] = event.origin_ns
    report.seconds = time.monotonic() - wall_start
    return report
