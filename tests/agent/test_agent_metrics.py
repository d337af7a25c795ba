"""The agent's ``[metrics]`` endpoint, on a real agent, a real aggregator and a real Mosquitto.

The agent runs (``AgentService.run`` on a thread) with ``[metrics] enabled`` on port 0 and the
real LiteRT trainer on a subject of the smartwatch data; an in-process aggregator runs one
federated round with it. The test scrapes ``/metrics`` over HTTP, parses it with
prometheus-client's parser and checks what happened: the health endpoints before and after
the broker is there, one local training timed, the manifests and blobs received and the
sealed messages sent in bytes, the verified model's version, a junk manifest counted under
its reject reason, the data source's report (samples stored, dropped by reason) and the
predictions published. Off by default: nothing listens.
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

from fedge.agent.config import load_agent_config
from fedge.agent.edgex.samples import QualityReport
from fedge.agent.metrics import AgentCollector
from fedge.agent.service import AgentService
from fedge.agent.wiring import ProvidedData, build_agent
from fedge.aggregator.config import load_aggregator_config
from fedge.aggregator.service import AggregatorService
from fedge.lab.broker import MosquittoBroker
from fedge.lab.har_watch import load_devices
from fedge.lab.provision import FleetFiles, create_fleet
from fedge.protocol.metrics_settings import AGENT_METRICS_PORT
from fedge.protocol.task import TaskSpec
from fedge.protocol.topics import FleetTopics
from fedge.shell.meters import Durations, Traffic

pytest_plugins = ("support.mqtt_fixtures",)

FLEET = "agent-metrics"
DEVICE = "watch-01"
T = FleetTopics(FLEET)
METRICS_ON = {"FEDGE_AGENT__METRICS__ENABLED": "true", "FEDGE_AGENT__METRICS__PORT": "0"}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def parse(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(port: int) -> Samples:
    status, body = get(port, "/metrics")
    assert status == 200
    return parse(body.decode())


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


class ReportingData(ProvidedData):
    """A subject of the smartwatch data, with a report shaped like the EdgeX source's
    (``EdgeXIngest.report``: ``stored_samples``, ``stored_this_run``, ``quality``, ``store``)."""

    def report(self) -> dict[str, Any] | None:
        quality = QualityReport(readings=1000, accepted=990, duplicate=4, late=3, out_of_range=3, samples=97)
        quality.incomplete = 2
        return {
            "device": DEVICE,
            "bus_connected": True,
            "stored_samples": 95,
            "stored_this_run": 97,
            "quality": quality.to_dict(),
            "store": {"duplicate": 2, "expired": 0, "evicted_age": 0, "evicted_count": 0, "store_error": 0},
        }


def subject_data() -> ReportingData:
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def provider(task: TaskSpec) -> tuple[np.ndarray, np.ndarray]:
        if task.sha256() not in cache:
            subject = load_devices(task, [1])[1]
            cache[task.sha256()] = (subject.x, subject.y)
        return cache[task.sha256()]

    return ReportingData(provider)


@pytest.fixture()
def fleet(tmp_path: Path, mosquitto: MosquittoBroker, har_model_dir: Path) -> FleetFiles:
    rounds = {"rounds": 1, "min_devices": 1, "wait_for_devices_s": 5.0, "round_timeout_s": 60.0}
    return create_fleet(tmp_path / "fleet", FLEET, har_model_dir, mosquitto.url, {DEVICE: 1}, rounds)


@contextmanager
def running(target: Callable[[], int], stop: Callable[[], None]) -> Iterator[None]:
    runner = threading.Thread(target=target, daemon=True)
    runner.start()
    try:
        yield
    finally:
        stop()
        runner.join(20)
    assert not runner.is_alive(), "the service did not stop"


def publish(broker: MosquittoBroker, topic: str, payload: bytes) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def test_health_and_metrics_reflect_a_round(fleet: FleetFiles, mosquitto: MosquittoBroker) -> None:
    mosquitto.stop()  # away when the agent starts: alive, but not ready
    agent = AgentService(
        build_agent(load_agent_config(fleet.agent_configs[DEVICE], METRICS_ON), subject_data())
    )
    with running(agent.run, agent.request_stop):
        port = wait_for("the endpoint", lambda: agent.endpoint).port
        assert port != AGENT_METRICS_PORT
        wait_for("/healthz 200", lambda: get(port, "/healthz")[0] == 200)
        status, body = get(port, "/readyz")
        ready = json.loads(body)
        assert status == 503 and ready["ok"] is False and ready["connected"] is False
        assert ready["reason"] == "not connected to the broker" and ready["trusted_keys"] == 1
        assert ready["model_version"] is None
        before = scrape(port)
        assert value(before, "fedge_agent_broker_connected") == 0.0
        assert value(before, "fedge_agent_training_seconds_count") == 0.0
        assert value(before, "fedge_agent_model_version") is None  # no verified manifest yet
        assert (value(before, "process_resident_memory_bytes") or 0) > 10_000_000

        mosquitto.start()
        wait_for("/readyz 200", lambda: get(port, "/readyz")[0] == 200, 60)
        aggregator = AggregatorService(load_aggregator_config(fleet.aggregator_config, {}))
        with running(aggregator.run, aggregator.request_stop):
            # moments (v1), one training round (v2), the final model (v3)
            wait_for("the final model", lambda: agent.state.load().manifest_version == 3, 120)
            wait_for("the outbox emptied", lambda: value(scrape(port), "fedge_agent_outbox_pending") == 0.0)
        after = scrape(port)
        assert value(after, "fedge_agent_broker_connected") == 1.0
        assert value(after, "fedge_agent_model_version") == 3.0
        assert value(after, "fedge_agent_ready") == 1.0
        assert value(after, "fedge_agent_training_seconds_count") == 1.0  # one local training
        training = value(after, "fedge_agent_training_seconds_sum")
        assert training is not None and 0 < training < 120
        assert value(after, "fedge_agent_training_seconds_bucket", le="+Inf") == 1.0
        assert (value(after, "fedge_agent_training_samples") or 0) > 50
        # In: three manifests and the model and weights blobs; out: moments, the update, statuses.
        assert (value(after, "fedge_agent_mqtt_received_bytes_total", topic="manifest") or 0) > 0
        assert (value(after, "fedge_agent_mqtt_received_bytes_total", topic="blob") or 0) > 10_000
        sent_updates = value(after, "fedge_agent_mqtt_sent_bytes_total", topic="update") or 0
        assert 10_000 < sent_updates < 200_000  # sealed moments + one sealed fp32 update
        assert (value(after, "fedge_agent_mqtt_sent_bytes_total", topic="status") or 0) > 0
        # The source's report: samples stored and dropped by reason, readings and rows dropped.
        assert value(after, "fedge_agent_samples_in_store") == 95.0
        assert value(after, "fedge_agent_samples_stored_total") == 97.0
        assert value(after, "fedge_agent_samples_dropped_total", reason="duplicate") == 2.0
        assert value(after, "fedge_agent_samples_dropped_total", reason="evicted_count") == 0.0
        assert value(after, "fedge_agent_readings_total") == 1000.0
        assert value(after, "fedge_agent_readings_dropped_total", reason="late") == 3.0
        assert value(after, "fedge_agent_readings_dropped_total", reason="not_finite") == 0.0
        assert value(after, "fedge_agent_rows_dropped_total", reason="incomplete") == 2.0
        assert value(after, "fedge_agent_edgex_connected") == 1.0
        assert value(after, "fedge_agent_manifests_rejected_total", reason="bad_signature") is None

        # A junk manifest: refused, and counted under its reason.
        publish(mosquitto, T.manifest, b"junk")
        rejected = wait_for(
            "the junk manifest counted",
            lambda: {
                labels: v
                for (name, labels), v in scrape(port).items()
                if name == "fedge_agent_manifests_rejected_total"
            },
        )
        assert rejected == {(("reason", "frame_truncated"),): 1.0}  # 4 bytes: not even a frame header
        assert agent.rejected_manifests == {"frame_truncated": 1}
        status, body = get(port, "/readyz")
        assert status == 200 and json.loads(body)["model_version"] == 3


def test_predictions_published_are_read_from_the_status_when_it_has_them() -> None:
    """``status()["insights"]["published"]`` (the live predictions) is a counter when present;
    a status without it (or with anything else there) simply lacks the metric."""

    class Stub:
        connected = threading.Event()
        alive_at = None
        traffic = Traffic(T.base)
        training_durations = Durations((1.0,))

        def __init__(self, status: dict[str, Any]) -> None:
            self.status = status

        def status_now(self) -> dict[str, Any]:
            return self.status

    def collect(status: dict[str, Any]) -> Samples:
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry()
        registry.register(AgentCollector(Stub(status)))  # type: ignore[arg-type]
        return parse(generate_latest(registry).decode())

    base = {"state": "idle", "ready": True, "model_version": 3, "data": None}
    assert (
        value(collect({**base, "insights": {"published": 12}}), "fedge_agent_predictions_published_total")
        == 12
    )
    for insights in (None, {}, {"published": "12"}, [1]):
        samples = collect({**base, "insights": insights})
        assert value(samples, "fedge_agent_predictions_published_total") is None
        assert value(samples, "fedge_agent_state", state="idle") == 1.0


def test_metrics_are_off_by_default(fleet: FleetFiles) -> None:
    config = load_agent_config(fleet.agent_configs[DEVICE], {})
    assert not config.metrics.enabled
    assert (config.metrics.bind, config.metrics.port) == ("127.0.0.1", AGENT_METRICS_PORT)
    free = not listening(AGENT_METRICS_PORT)
    agent = AgentService(build_agent(config, subject_data()))
    with running(agent.run, agent.request_stop):
        wait_for("the connection", agent.connected.is_set)
        assert agent.endpoint is None
        assert not [t for t in threading.enumerate() if t.name == "fedge-http"]
        assert not (free and listening(AGENT_METRICS_PORT))


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True
