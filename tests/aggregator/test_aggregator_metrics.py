"""The aggregator's ``[metrics]`` endpoint, on a real service and a real Mosquitto broker.

The service runs (``AggregatorService.run`` on a thread) with ``[metrics] enabled`` on port 0;
the test scrapes ``/metrics`` over HTTP and parses it with prometheus-client's own parser.
What it checks is what happened: the health endpoints before and after the broker is there,
a junk message counted under its reject reason, a sealed moments message accepted, the round
it closed counted by outcome with its duration, the MQTT bytes in and out by topic, the
devices online and ready from their statuses, the process's memory. Off by default: nothing
listens.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from fedge.agent.core import moments_payload
from fedge.aggregator.config import load_aggregator_config
from fedge.aggregator.service import AggregatorService
from fedge.lab.broker import MosquittoBroker
from fedge.lab.provision import FleetFiles, create_fleet
from fedge.protocol.metrics_settings import AGGREGATOR_METRICS_PORT
from fedge.protocol.sealing import SealedHeader, seal
from fedge.protocol.topics import FleetTopics

pytest_plugins = ("support.mqtt_fixtures",)

FLEET = "metrics"
T = FleetTopics(FLEET)
DEVICES = {"watch-01": 1, "watch-02": 2}
METRICS_ON = {
    "FEDGE_AGGREGATOR__METRICS__ENABLED": "true",
    "FEDGE_AGGREGATOR__METRICS__PORT": "0",
    "FEDGE_AGGREGATOR__AGGREGATOR__EXIT_WHEN_DONE": "false",
}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def scrape(port: int) -> Samples:
    """name + sorted labels -> value, for every sample of /metrics."""
    status, body = get(port, "/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def publish(broker: MosquittoBroker, messages: list[tuple[str, bytes, bool]]) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        for topic, payload, retain in messages:
            client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.fixture()
def fleet(tmp_path: Path, mosquitto: MosquittoBroker, har_model_dir: Path) -> FleetFiles:
    rounds = {"rounds": 3, "min_devices": 1, "wait_for_devices_s": 0.0, "round_timeout_s": 3.0}
    return create_fleet(tmp_path / "fleet", FLEET, har_model_dir, mosquitto.url, DEVICES, rounds)


@contextmanager
def running(service: AggregatorService) -> Iterator[AggregatorService]:
    runner = threading.Thread(target=service.run, daemon=True)
    runner.start()
    try:
        yield service
    finally:
        service.request_stop()
        runner.join(15)
    assert not runner.is_alive(), "the aggregator did not stop"


def test_health_and_metrics_reflect_what_happened(fleet: FleetFiles, mosquitto: MosquittoBroker) -> None:
    # The broker is away when the service starts: alive, but not ready.
    mosquitto.stop()
    with running(AggregatorService(load_aggregator_config(fleet.aggregator_config, METRICS_ON))) as service:
        check_health_and_metrics(service, fleet, mosquitto)


def check_health_and_metrics(
    service: AggregatorService, fleet: FleetFiles, mosquitto: MosquittoBroker
) -> None:
    endpoint = wait_for("the endpoint", lambda: service.endpoint)
    port = endpoint.port
    assert port != AGGREGATOR_METRICS_PORT and endpoint.bind == "127.0.0.1"
    status, body = get(port, "/healthz")
    assert status == 200 and json.loads(body)["ok"] is True
    status, body = wait_for("/readyz 503", lambda: (r := get(port, "/readyz"))[0] == 503 and r)
    ready = json.loads(body)
    assert ready["ok"] is False and ready["role"] == "leader" and ready["connected"] is False
    assert ready["reason"] == "not connected to the broker"
    before = scrape(port)
    assert value(before, "fedge_aggregator_broker_connected") == 0.0
    assert value(before, "fedge_aggregator_leader") == 1.0
    assert value(before, "fedge_aggregator_rounds_total", outcome="aggregated") == 0.0
    assert value(before, "fedge_aggregator_round_duration_seconds_count") == 0.0
    assert (value(before, "process_resident_memory_bytes") or 0) > 10_000_000

    # The broker is back: connected, ready, and the first round is announced.
    mosquitto.start()
    wait_for("/readyz 200", lambda: get(port, "/readyz")[0] == 200, 60)
    assert json.loads(get(port, "/readyz")[1]) == {
        "ok": True,
        "role": "leader",
        "leading": True,
        "connected": True,
        "loop_age_s": pytest.approx(0.5, abs=1.0),
    }
    current = wait_for("the first round", lambda: service.engine.current)
    manifest = current.manifest
    assert manifest.phase == "moments"

    # watch-01 answers with sealed moments, someone publishes junk on watch-02's topic, and both
    # devices say how they are (watch-02 has too few samples).
    header = SealedHeader(FLEET, "watch-01", manifest.round_id, 1, "moments", manifest.version)
    task = manifest.model_manifest.task
    x = np.random.default_rng(0).normal(size=(50, task.input_dim)).astype(np.float32)
    sealed = seal(header, *moments_payload(x), fleet.device_keys["watch-01"], fleet.box_key.public_key)
    junk = b"junk" * 8
    statuses = [
        (
            T.status("watch-01"),
            json.dumps({"device_id": "watch-01", "state": "idle", "ready": True}).encode(),
        ),
        (
            T.status("watch-02"),
            json.dumps({"device_id": "watch-02", "state": "idle", "ready": False}).encode(),
        ),
    ]
    publish(mosquitto, [(T.update("watch-02"), junk, False), (T.update("watch-01"), sealed, False)])
    publish(mosquitto, [(topic, payload, True) for topic, payload in statuses])

    # The moments round closes at its deadline with one of two selected devices (min_devices 1).
    def round_closed() -> Samples | None:
        samples = scrape(port)
        closed = value(samples, "fedge_aggregator_rounds_total", outcome="aggregated") == 1
        # The status-derived values follow within STATUS_INTERVAL_S: the next round's version.
        return samples if closed and (value(samples, "fedge_aggregator_model_version") or 0) >= 2 else None

    after = wait_for("the moments round aggregated", round_closed, 30)
    assert value(after, "fedge_aggregator_broker_connected") == 1.0
    assert value(after, "fedge_aggregator_updates_accepted_total", kind="moments") == 1.0
    assert value(after, "fedge_aggregator_updates_accepted_total", kind="update") == 0.0
    assert value(after, "fedge_aggregator_updates_rejected_total", reason="frame_bad_magic") == 1.0
    assert value(after, "fedge_aggregator_round_duration_seconds_count") == 1.0
    duration = value(after, "fedge_aggregator_round_duration_seconds_sum")
    assert duration is not None and 2.5 <= duration <= 20
    assert value(after, "fedge_aggregator_round_duration_seconds_bucket", le="1.0") == 0.0
    assert value(after, "fedge_aggregator_round_duration_seconds_bucket", le="+Inf") == 1.0
    # What came in on update/+ is exactly the two payloads; manifests and blobs went out.
    assert value(after, "fedge_aggregator_mqtt_received_bytes_total", topic="update") == len(junk) + len(
        sealed
    )
    assert (value(after, "fedge_aggregator_mqtt_received_bytes_total", topic="status") or 0) >= sum(
        len(p) for _, p in statuses
    )
    assert (value(after, "fedge_aggregator_mqtt_sent_bytes_total", topic="manifest") or 0) > 0
    assert (value(after, "fedge_aggregator_mqtt_sent_bytes_total", topic="blob") or 0) > 10_000  # the model
    assert (value(after, "fedge_aggregator_mqtt_sent_bytes_total", topic="aggregator") or 0) > 0  # statuses
    assert value(after, "fedge_aggregator_devices", state="online") == 2.0
    assert value(after, "fedge_aggregator_devices", state="ready") == 1.0
    assert (value(after, "fedge_aggregator_model_version") or 0) >= 2
    assert value(after, "fedge_aggregator_model_generation") == 1.0
    assert value(after, "fedge_aggregator_rounds_planned") == 3.0
    assert value(after, "fedge_aggregator_done") == 0.0
    assert value(after, "fedge_aggregator_inbox_messages") is not None
    assert (value(after, "process_resident_memory_bytes") or 0) > 10_000_000
    # A moments round is not a training round: completed_rounds counts training rounds.
    assert value(after, "fedge_aggregator_completed_rounds_total") == 0.0

    # The next (train) round gets no update: it is aborted at its deadline, and counted so.
    wait_for(
        "an aborted round",
        lambda: (value(scrape(port), "fedge_aggregator_rounds_total", outcome="aborted") or 0) >= 1,
        30,
    )


def test_metrics_are_off_by_default(fleet: FleetFiles) -> None:
    """Without [metrics] the service serves nothing: no endpoint, no server thread, nothing
    on the default port (when nothing else had it)."""
    config = load_aggregator_config(fleet.aggregator_config, {})
    assert not config.metrics.enabled
    assert (config.metrics.bind, config.metrics.port) == ("127.0.0.1", AGGREGATOR_METRICS_PORT)
    free = not listening(AGGREGATOR_METRICS_PORT)
    with running(AggregatorService(config)) as service:
        wait_for("the connection", service.connected.is_set)
        assert service.endpoint is None
        assert not [t for t in threading.enumerate() if t.name == "fedge-http"]
        assert not (free and listening(AGGREGATOR_METRICS_PORT))


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_a_port_in_use_stops_the_service_with_a_config_error(fleet: FleetFiles) -> None:
    """``fedge aggregator run`` exits 78 with this one line (fedge.cli: ConfigError)."""
    from fedge.protocol.config_source import ConfigError
    from fedge.shell.http_endpoint import HttpEndpoint

    taken = HttpEndpoint("127.0.0.1", 0, {})
    try:
        env = {**METRICS_ON, "FEDGE_AGGREGATOR__METRICS__PORT": str(taken.port)}
        service = AggregatorService(load_aggregator_config(fleet.aggregator_config, env))
        with pytest.raises(ConfigError, match=r"\[metrics\] port"):
            service.run()
        assert not service.connected.is_set()
    finally:
        taken.stop()
