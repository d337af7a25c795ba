"""``fedge demo --buildings B``: the devices split over B building gateways under one campus.

Each tier runs as it would on site: a campus broker and the campus aggregator; per building a
broker of its own (bridged to the campus broker, ``fedge broker config --bridge-to``), a building
aggregator with ``[upstream]`` and its agents. Every broker is locked down like the one-gateway
demo's (TLS with a lab CA, a password per principal, ACLs); on the campus broker each building
is a device. The observer scores every campus global model on the held-out subjects, so the
table, JSON and plot are the one-gateway demo's, with campus rounds (``devices`` = buildings).

Agents load their data directly (``--data direct``): the EdgeX replay feeds one broker.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedge.lab import har_watch
from fedge.lab.demo import (
    DemoOptions,
    DemoSummary,
    _client_creds,
    _spawn,
    _summarise,
    start_locked_broker,
    terminate_processes,
)
from fedge.lab.observer import FleetObserver
from fedge.lab.provision import FleetFiles, create_fleet
from fedge.lab.train_local import build_model_files, train_local
from fedge.protocol.errors import FedgeError
from fedge.protocol.mqtt_settings import parse_broker_url
from fedge.protocol.sealing import key_to_text
from fedge.protocol.signing import signing_key_to_text

CAMPUS = "campus"
#: A building sends the campus the mean of its devices: with one device that would be the
#: device's own update, which must not leave the building.
MIN_DEVICES_PER_BUILDING = 2


def building_names(count: int) -> list[str]:
    return [f"building-{i}" for i in range(1, count + 1)]


def split_devices(subjects: dict[str, int], buildings: list[str]) -> dict[str, dict[str, int]]:
    """Devices dealt round robin over the buildings (watch-01 to building-1, watch-02 to ...)."""
    out: dict[str, dict[str, int]] = {b: {} for b in buildings}
    for i, (device, subject) in enumerate(subjects.items()):
        out[buildings[i % len(buildings)]][device] = subject
    return out


def check_options(options: DemoOptions) -> None:
    b = options.buildings
    if b < 1:
        return
    if b * MIN_DEVICES_PER_BUILDING > options.devices:
        raise FedgeError(
            f"--buildings {b} needs at least {b * MIN_DEVICES_PER_BUILDING} devices (--devices): a building "
            f"sends the campus the mean of its devices, and with fewer than {MIN_DEVICES_PER_BUILDING} that "
            "would be one device's update"
        )
    unsupported = {
        "--data edgex (use --data direct)": options.data_path != "direct",
        "--broker": options.broker_url is not None,
        "--insecure-broker": not options.secure_broker,
        "--secure-aggregation": options.secure_aggregation,
        "--dp-epsilon": options.dp_epsilon is not None,
        "--aggregator-replicas": options.aggregator_replicas > 1,
        "--container-agents": options.container_agents > 0,
        "--train": options.train_csv is not None,
    }
    bad = [name for name, on in unsupported.items() if on]
    if bad:
        raise FedgeError(f"--buildings runs without {', '.join(bad)}")


def _upstream_table(campus: FleetFiles, building: str) -> str:
    key_file = campus.root / "keys" / f"{building}.box"
    return (
        "\n[upstream]\nenabled = true\n"
        f'campus_fleet = "{CAMPUS}"\nbuilding_id = "{building}"\n'
        f'campus_verify_keys = ["{signing_key_to_text(campus.signing_key.verify_key)}"]\n'
        f'campus_public_key = "{key_to_text(campus.box_key.public_key)}"\n'
        f'key_file = "{key_file}"\nmargin_s = 3.0\n'
    )


def run_buildings_demo(
    options: DemoOptions, on_progress: Callable[[FleetObserver], None] | None = None
) -> DemoSummary:
    from fedge.tools.broker_config import Bridge, FleetAccess  # noqa: PLC0415

    check_options(options)
    out = options.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for owned in ("fleet", "broker", "logs", "containers"):
        shutil.rmtree(out / owned, ignore_errors=True)
    start = time.perf_counter()
    model_dir = out / "model"
    build_model_files(options.task, model_dir)
    reference = train_local(options.task, options.reference_epochs, seed=options.seed, model_dir=model_dir)
    x_test, y_test = har_watch.pooled(har_watch.load_devices(options.task, har_watch.TEST_SUBJECTS).values())
    subjects = {har_watch.device_id(s): s for s in har_watch.TRAIN_SUBJECTS[: options.devices]}
    buildings = building_names(options.buildings)
    split = split_devices(subjects, buildings)

    brokers: list[Any] = []
    procs: dict[str, Any] = {}
    exit_codes: dict[str, int | None] = {}
    observer: FleetObserver | None = None
    try:
        campus_access = FleetAccess(CAMPUS, tuple(buildings), aggregator="aggregator", monitors=("observer",))
        campus_broker, campus_url, campus_creds = start_locked_broker(
            out / "broker" / CAMPUS, campus_access, model_dir
        )
        brokers.append(campus_broker)
        _, campus_port, _ = parse_broker_url(campus_url)
        n = len(buildings)
        campus = create_fleet(
            out / "fleet" / CAMPUS,
            CAMPUS,
            model_dir,
            campus_url,
            dict.fromkeys(buildings, 1),
            rounds={
                "rounds": options.rounds,
                "min_devices": options.min_devices or max(1, (n + 1) // 2),
                "round_timeout_s": options.round_timeout_s,
                "server_learning_rate": options.server_learning_rate,
                "weighting": "examples",  # a building weighs as many devices as it holds
                "codec": options.codec,
                "wait_for_devices_s": 0.0,
            },
            mqtt_extra={"aggregator": _mqtt(campus_creds["aggregator"])},
        )
        fleets: dict[str, FleetFiles] = {}
        for building in buildings:
            devices = split[building]
            bridge = Bridge(
                f"localhost:{campus_port}",
                CAMPUS,
                building,
                password=str(campus_creds[building]["password"]),
                cafile=Path(str(campus_creds[building]["ca_file"])),
            )
            access = FleetAccess(
                building, tuple(devices), aggregator="aggregator", upstream=(CAMPUS, building)
            )
            broker, url, creds = start_locked_broker(out / "broker" / building, access, model_dir, bridge)
            brokers.append(broker)
            fleet = create_fleet(
                out / "fleet" / building,
                building,
                model_dir,
                url,
                devices,
                rounds={
                    "rounds": 1_000_000,  # the campus decides when training ends
                    "min_devices": MIN_DEVICES_PER_BUILDING,
                    "round_timeout_s": options.round_timeout_s,
                    "codec": options.codec,
                    "wait_for_devices_s": 60.0,
                },
                mqtt_extra={name: _mqtt(c) for name, c in creds.items() if name in (*devices, "aggregator")},
            )
            with fleet.aggregator_config.open("a", encoding="utf-8") as f:
                f.write(_upstream_table(campus, building))
            fleets[building] = fleet
        host, port, _ = parse_broker_url(campus_url)
        observer = FleetObserver(
            CAMPUS,
            host,
            port,
            campus.signing_key.verify_key,
            (model_dir / "model.tflite").read_bytes(),
            x_test,
            y_test,
            **_client_creds(campus_creds["observer"]),
        )
        observer.start()
        for building, fleet in fleets.items():
            for device, cfg in fleet.agent_configs.items():
                procs[device] = _spawn(["agent", "run", "--config", str(cfg)], out / "logs" / f"{device}.log")
            procs[building] = _spawn(
                ["aggregator", "run", "--config", str(fleet.aggregator_config)],
                out / "logs" / f"{building}.log",
            )
        procs["campus"] = _spawn(
            ["aggregator", "run", "--config", str(campus.aggregator_config)], out / "logs" / "campus.log"
        )
        limit = time.monotonic() + 180 + options.rounds * (options.round_timeout_s + 30)
        while True:
            observer.wait(0.5)
            if on_progress is not None:
                on_progress(observer)
            finals = [e for e in observer.view.evaluations if e.phase == "final"]
            if finals and procs["campus"].poll() is not None:
                break
            dead = [name for name, p in procs.items() if p.poll() not in (None, 0)]
            if dead:
                raise FedgeError(f"{', '.join(dead)} exited; see the logs in {out / 'logs'}")
            if time.monotonic() > limit:
                raise FedgeError(f"the demo did not finish in time; see the logs in {out / 'logs'}")
    finally:
        exit_codes = terminate_processes(procs)
        if observer is not None:
            observer.stop()
        for broker in brokers:
            broker.stop()
    summary = _summarise(
        options, observer, reference.test_accuracy, campus_url, time.perf_counter() - start, exit_codes
    )
    summary.buildings = {b: sorted(devices) for b, devices in split.items()}
    return summary


def _mqtt(creds: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in creds.items() if k in ("username", "password", "ca_file")}
