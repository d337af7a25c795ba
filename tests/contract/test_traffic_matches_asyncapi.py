"""A real fleet speaks exactly the contract in ``docs/asyncapi.yaml``.

``fedge demo --rounds 2 --devices 2`` (the real aggregator and agents as processes, the EdgeX
simulator feeding them over MQTT) runs against a Mosquitto broker while a recorder subscribed to
``#`` captures every message the broker routes, with the QoS and retain flag its publisher used.
Every topic must be on a channel of the document (a topic no channel lists fails the test),
every JSON payload must match its channel's schema, every binary one must be the frame (or the
blob) the channel names, and QoS/retain must be those of the channel's send operation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from fedge.lab.broker import BrokerSettings, MosquittoBroker
from support.asyncapi import load_document
from support.mqtt_fixtures import RecordedMessage, TrafficRecorder, require_mosquitto

pytest_plugins = ("support.mqtt_fixtures",)

#: Channels a short demo run must have used: the contract test is only as good as its traffic.
#: keyRotation is not in it (the demo rotates no keys).
EXPECTED_CHANNELS = {
    "manifest",
    "blob",
    "aggregatorStatus",
    "fleetSummary",
    "update",
    "deviceStatus",
    "edgexDeviceEvents",
}
#: The demo's agents publish predictions (``insight/{device_id}``): a run without any fails.
REQUIRE_INSIGHTS = True
DEMO_TIMEOUT_S = 600


#: What a secure round adds (``--secure-aggregation``): the round's signed documents and the
#: devices' identity certificates.
SECURE_CHANNELS = {"secaggConfig", "secaggRelay", "identity", "update", "manifest"}


def run_and_record(tmp: Path, *demo_args: str) -> list[RecordedMessage]:
    """Every message a ``fedge demo`` run with ``demo_args`` sends through a recorded broker."""
    exe = require_mosquitto()
    with (
        MosquittoBroker(BrokerSettings(data_dir=tmp / "mosquitto"), executable=exe) as broker,
        TrafficRecorder.for_broker(broker) as recorder,
    ):
        command = [
            sys.executable,
            "-m",
            "fedge.cli",
            "demo",
            "--broker",
            broker.url,
            *demo_args,
            "--out",
            str(tmp / "demo"),
            "--no-progress",
            "--json",
        ]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        done = subprocess.run(command, capture_output=True, text=True, timeout=DEMO_TIMEOUT_S, env=env)
        assert done.returncode == 0, done.stderr[-4000:]
        time.sleep(1.0)  # the agents' last statuses, published as they stop
        return recorder.messages


@pytest.fixture(scope="module")
def captured(tmp_path_factory: pytest.TempPathFactory) -> list[RecordedMessage]:
    return run_and_record(
        tmp_path_factory.mktemp("contract-demo"), "--rounds", "2", "--devices", "2", "--round-timeout", "30"
    )


@pytest.fixture(scope="module")
def captured_secure(tmp_path_factory: pytest.TempPathFactory) -> list[RecordedMessage]:
    return run_and_record(
        tmp_path_factory.mktemp("contract-secure"),
        "--rounds",
        "1",
        "--devices",
        "3",
        "--data",
        "direct",
        "--round-timeout",
        "30",
        "--secure-aggregation",
    )


def check_against_the_contract(captured: list[RecordedMessage]) -> Counter[str]:
    """Every message on a documented channel, matching its schema, frame, QoS and retain flag;
    returns how many messages each channel carried."""
    doc = load_document()
    undocumented = sorted({m.topic for m in captured if doc.channel_for(m.topic) is None})
    assert undocumented == [], f"topics no channel of docs/asyncapi.yaml lists: {undocumented}"
    seen: Counter[str] = Counter()
    problems: list[str] = []
    for message in captured:
        channel = doc.channel_for(message.topic)
        assert channel is not None
        seen[channel.key] += 1
        try:
            channel.validate(message.topic, message.payload)
        except AssertionError as exc:
            problems.append(str(exc))
        if not channel.key.startswith("edgex"):  # EdgeX's QoS is its services' setting
            flags = {(qos, retain) for _, qos, retain in channel.send_bindings}
            if (message.qos, message.retain) not in flags:
                got = f"QoS {message.qos} retain {message.retain}"
                problems.append(f"{message.topic}: {got}, the contract says {sorted(flags)}")
        if channel.binary and message.payload[:1] == b"{":
            problems.append(f"{message.topic}: JSON on a binary channel")
    assert problems[:10] == [], f"{len(problems)} message(s) break the contract"
    return seen


@pytest.mark.slow
def test_every_message_of_a_real_fleet_is_on_a_documented_channel_and_matches_it(
    captured: list[RecordedMessage],
) -> None:
    seen = check_against_the_contract(captured)
    assert set(seen) >= EXPECTED_CHANNELS, f"channels without traffic: {EXPECTED_CHANNELS - set(seen)}"
    if REQUIRE_INSIGHTS:
        assert seen["insight"] > 0, "no insight/{device_id} message in the run"


@pytest.mark.slow
def test_a_secure_round_speaks_the_contract_too(captured_secure: list[RecordedMessage]) -> None:
    """Its signed documents, sealed secagg messages and identity certificates are all documented."""
    seen = check_against_the_contract(captured_secure)
    assert set(seen) >= SECURE_CHANNELS, f"channels without traffic: {SECURE_CHANNELS - set(seen)}"
    assert seen["identity"] >= 3  # each device's certificate (retained, again on each connect)


@pytest.mark.slow
def test_the_captured_statuses_carry_their_schema_and_the_fleet_summary_counts_the_devices(
    captured: list[RecordedMessage],
) -> None:
    def last(suffix: str) -> dict[str, object]:
        payloads = [m.payload for m in captured if m.topic.endswith(suffix) and m.payload]
        assert payloads, suffix
        document: dict[str, object] = json.loads(payloads[-1])
        return document

    summary = last("/aggregator/fleet")
    status = last("/aggregator/status")
    assert (summary["schema"], status["schema"]) == ("fedge.fleet/1", "fedge.aggregator-status/1")
    assert summary["model"] == {"version": status["version"], "generation": status["generation"]}
    devices = summary["devices"]
    assert isinstance(devices, dict) and devices["enrolled"] == 2
    last_round = summary["last_round"]
    assert isinstance(last_round, dict)
    assert (last_round["phase"], last_round["metric"], last_round["participants"]) == ("train", "accuracy", 2)
    assert last("/status/watch-01")["schema"] == "fedge.device-status/1"
