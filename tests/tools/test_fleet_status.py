"""``fedge status`` against a real Mosquitto: the fleet view from the retained topics, as the
read-only BMS principal of ``fedge broker config`` (TLS with its lab CA, a password file), and
one-line errors for a broker that is not there or refuses the credentials."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import ssl
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fedge.cli import main
from fedge.lab.broker import ConfiguredMosquitto, MosquittoBroker, free_loopback_port
from fedge.protocol.statuses import offline_will
from fedge.protocol.topics import FleetTopics
from fedge.tools import fleet_status
from fedge.tools.broker_config import BrokerConfigRequest, BrokerLimits, FleetAccess, write_broker_config
from support.mqtt_fixtures import in_ci, require_mosquitto

pytest_plugins = ("support.mqtt_fixtures",)

FLEET = "f1"
T = FleetTopics(FLEET)
NOW = 1_700_000_100.0

AGGREGATOR_STATUS: dict[str, Any] = {
    "schema": "fedge.aggregator-status/1",
    "fleet": FLEET,
    "state": "running",
    "phase": "train",
    "version": 5,
    "generation": 1,
    "round_id": "r0003-v5",
    "completed_rounds": 2,
    "rounds": 20,
    "time": NOW - 4,
}
SUMMARY: dict[str, Any] = {
    "schema": "fedge.fleet/1",
    "fleet": FLEET,
    "time": NOW - 4,
    "devices": {
        "enrolled": 3,
        "online": 1,
        "stale": 0,
        "offline": 1,
        "never_seen": 1,
        "not_ready": 0,
        "stale_after_s": 90.0,
        "stale_ids": [],
        "offline_ids": ["watch-02"],
        "never_seen_ids": ["watch-03"],
        "not_ready_ids": [],
    },
    "last_round": {
        "round_id": "r0002-v4",
        "phase": "train",
        "outcome": "aggregated",
        "selected": 2,
        "participants": 2,
        "metric": "accuracy",
        "value": 0.78181,
        "fed_eval_loss": 1.17397,
    },
    "rejected_total": {"late": 1, "decrypt_failed": 2},
}
DEVICE: dict[str, Any] = {
    "schema": "fedge.device-status/1",
    "device_id": "watch-01",
    "state": "idle",
    "ready": True,
    "model_version": 5,
    "round_id": "r0003-v5",
    "samples": 449,
    "time": NOW - 12,
}
INSIGHT: dict[str, Any] = {
    "schema": "fedge.insight/1",
    "device_id": "watch-01",
    "prediction": {"label": "walking", "class_index": 1, "probabilities": {"walking": 0.93, "sitting": 0.07}},
}

EXPECTED = (
    (
        "fleet f1: aggregator running, phase train, model v5 (generation 1), round r0003-v5, 2/20 rounds, "
        "updated 4s ago\n"
    )
    + """\
devices: 3 enrolled: 1 online, 0 stale, 1 offline, 1 never seen, 0 not ready
  offline: watch-02
last round: r0002-v4 (train, aggregated): 2/2 devices, accuracy 0.7818, fed. eval loss 1.1740
rejected updates: decrypt_failed 2, late 1

DEVICE    STATE    READY  MODEL  ROUND     SAMPLES  UPDATED  INSIGHT
watch-01  idle     yes    v5     r0003-v5  449      12s ago  walking (0.93)
watch-02  offline  -      -      -         -        -        -
"""
)


def retain(host: str, port: int, messages: dict[str, bytes], **login: Any) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    if "username" in login:
        client.username_pw_set(login["username"], login["password"])
    if "ca_file" in login:
        client.tls_set(ca_certs=login["ca_file"])
    client.connect(host, port)
    client.loop_start()
    try:
        for topic, payload in messages.items():
            client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def fleet_messages() -> dict[str, bytes]:
    return {
        T.aggregator_status: json.dumps(AGGREGATOR_STATUS).encode(),
        T.fleet_summary: json.dumps(SUMMARY).encode(),
        T.status("watch-01"): json.dumps(DEVICE).encode(),
        T.status("watch-02"): offline_will("watch-02"),  # the Last Will: every value empty
        f"{T.base}/insight/watch-01": json.dumps(INSIGHT).encode(),
    }


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleet_status, "_now", lambda: NOW)


def test_status_prints_the_fleet_from_the_retained_topics(
    mosquitto: MosquittoBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    retain(mosquitto.host, mosquitto.port, fleet_messages())
    retain(mosquitto.host, mosquitto.port, {"fedge/v1/other/status/x": b'{"state": "idle"}'})  # another fleet
    assert main(["status", "--broker", mosquitto.url, "--fleet", FLEET]) == 0
    out, err = capsys.readouterr()
    assert (out, err) == (EXPECTED, "")


def test_status_json_is_the_retained_documents(
    mosquitto: MosquittoBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    retain(mosquitto.host, mosquitto.port, fleet_messages())
    assert main(["status", "--broker", mosquitto.url, "--fleet", FLEET, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "fleet": FLEET,
        "aggregator_status": AGGREGATOR_STATUS,
        "fleet_summary": SUMMARY,
        "devices": {"watch-01": DEVICE, "watch-02": json.loads(offline_will("watch-02"))},
        "insights": {"watch-01": INSIGHT},
        "unreadable": [],
    }


def test_an_empty_fleet_and_an_unreachable_broker_are_one_line_errors(
    mosquitto: MosquittoBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "--broker", mosquitto.url, "--fleet", "nobody", "--timeout", "5"]) == 2
    assert capsys.readouterr().err == (
        "fedge: error: nothing retained under fedge/v1/nobody/ that this principal may read: check "
        "--fleet (and that --username is a BMS principal of this fleet)\n"
    )
    port = free_loopback_port()
    assert main(["status", "--broker", f"mqtt://127.0.0.1:{port}", "--fleet", FLEET, "--timeout", "5"]) == 2
    assert capsys.readouterr().err == (
        f"fedge: error: cannot connect to the broker at mqtt://127.0.0.1:{port}: [Errno 111] Connection "
        "refused; check: nothing accepts connections there: is the broker running, and are host and port "
        "right?\n"
    )


@dataclass
class Locked:
    url: str
    ca: str
    host: str
    port: int
    creds: dict[str, dict[str, str]]
    password_files: dict[str, Path]
    creds_dir: Path


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Locked]:
    """The broker ``fedge broker config`` writes (TLS, lab CA, passwords, ACL) with a BMS user."""
    exe = require_mosquitto()
    tmp = tmp_path_factory.mktemp("status-broker")
    (tmp / "data").mkdir()
    result = write_broker_config(
        BrokerConfigRequest(
            access=FleetAccess(
                fleet=FLEET, devices=("watch-01", "watch-02"), aggregator="agg", bms=("bms-1",)
            ),
            out_dir=tmp / "broker",
            tls="lab",
            port=free_loopback_port(),
            bind="127.0.0.1",
            data_dir=tmp / "data",
            run_as="root" if os.geteuid() == 0 else None,
            limits=BrokerLimits.for_fleet(2, 50_000),
        )
    )
    creds: dict[str, dict[str, str]] = {}
    files: dict[str, Path] = {}
    for name in ("agg", "bms-1", "watch-01", "watch-02"):
        path = result.out_dir / "credentials" / f"{name}.txt"
        creds[name] = tomllib.loads(path.read_text())
        creds[name]["ca_file"] = str(path.parent / creds[name]["ca_file"])
        files[name] = tmp / f"{name}.password"
        files[name].write_text(creds[name]["password"] + "\n")
        files[name].chmod(0o600)
    ca = creds["agg"]["ca_file"]
    with ConfiguredMosquitto(
        result.out_dir / "mosquitto.conf",
        port=result.port,
        work_dir=tmp / "run",
        tls_context=ssl.create_default_context(cafile=ca),
        executable=exe,
    ) as broker:
        yield Locked(
            creds["agg"]["broker"], ca, "localhost", broker.port, creds, files, result.out_dir / "credentials"
        )


def _login(locked: Locked, name: str) -> dict[str, str]:
    c = locked.creds[name]
    return {"username": c["username"], "password": c["password"], "ca_file": locked.ca}


def test_the_bms_principal_reads_the_fleet_through_the_locked_down_broker(
    locked: Locked, capsys: pytest.CaptureFixture[str]
) -> None:
    aggregator_part = {t: p for t, p in fleet_messages().items() if "/aggregator/" in t}
    retain(locked.host, locked.port, aggregator_part, **_login(locked, "agg"))
    retain(
        locked.host,
        locked.port,
        {
            T.status("watch-01"): json.dumps(DEVICE).encode(),
            T.insight("watch-01"): json.dumps(INSIGHT).encode(),
        },
        **_login(locked, "watch-01"),
    )
    retain(
        locked.host,
        locked.port,
        {T.status("watch-02"): offline_will("watch-02")},
        **_login(locked, "watch-02"),
    )
    args = ["status", "--broker", locked.url, "--fleet", FLEET, "--username", "bms-1"]
    args += ["--password-file", str(locked.password_files["bms-1"]), "--ca-file", locked.ca]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert (out, err) == (EXPECTED, "")  # the device's own prediction, through its own ACL


def test_the_mosquitto_sub_line_of_docs_bms_md_shows_statuses_and_predictions(
    locked: Locked, tmp_path: Path
) -> None:
    """The documented command, as written, against the broker fedge broker config locks down."""
    exe = shutil.which("mosquitto_sub")
    if exe is None:
        if in_ci():
            pytest.fail("mosquitto_sub is not installed (scripts/system-deps.sh installs mosquitto-clients)")
        pytest.skip("mosquitto_sub is not installed")
    block = re.search(r"## mosquitto_sub\n\n```sh\n(.*?)```", BMS_DOC.read_text(), re.S)
    assert block
    command = block[1].replace("\\\n", " ").replace("-h broker.lan -p 8883", f"-h localhost -p {locked.port}")
    command = command.replace("fedge/v1/demo/", f"fedge/v1/{FLEET}/")
    retain(
        locked.host,
        locked.port,
        {
            T.status("watch-01"): json.dumps(DEVICE).encode(),
            T.insight("watch-01"): json.dumps(INSIGHT).encode(),
        },
        **_login(locked, "watch-01"),
    )
    done = subprocess.run(
        ["bash", "-c", f"{command.strip()} -W 3"],  # every retained message, then a timeout
        cwd=locked.creds_dir.parent,  # where credentials/ lies, as the bundle is handed over
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 27, done.stderr  # mosquitto_sub's exit code after -W's timeout
    received = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert {T.insight("watch-01"), T.status("watch-01")} <= set(received)
    assert all(topic.startswith(f"fedge/v1/{FLEET}/") for topic in received)
    assert json.loads(received[T.insight("watch-01")]) == INSIGHT
    assert json.loads(received[T.status("watch-01")]) == DEVICE


def test_wrong_credentials_are_a_one_line_error(locked: Locked, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["status", "--broker", locked.url, "--fleet", FLEET, "--username", "bms-1"]
    args += ["--password-file", str(locked.password_files["agg"]), "--ca-file", locked.ca, "--timeout", "5"]
    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"fedge: error: the broker at {locked.url} refused the connection: Not authorized (check --username "
        "and --password-file: a BMS principal of fedge broker config --bms)\n"
    )


BMS_DOC = Path(__file__).resolve().parents[2] / "docs" / "bms.md"


def test_the_python_subscriber_of_docs_bms_md_runs_against_the_locked_down_broker(
    locked: Locked, tmp_path: Path
) -> None:
    blocks = re.findall(r"```python\n(.*?)```", BMS_DOC.read_text(), re.S)
    assert len(blocks) == 1
    script = tmp_path / "bms_subscriber.py"
    script.write_text(blocks[0])
    retain(locked.host, locked.port, {T.fleet_summary: json.dumps(SUMMARY).encode()}, **_login(locked, "agg"))
    retain(
        locked.host,
        locked.port,
        {T.status("watch-02"): offline_will("watch-02")},
        **_login(locked, "watch-02"),
    )
    # The bundle as fedge broker config wrote it: credentials/bms-1.txt next to ca.crt.
    proc = subprocess.Popen(
        [sys.executable, str(script), str(locked.creds_dir / "bms-1.txt"), FLEET],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Lines are read by a thread into a queue: waiting on the pipe itself (select) misses lines
    # already read ahead into the file object's buffer.
    lines_q: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    reader = threading.Thread(
        target=lambda: [lines_q.put(line.rstrip("\n")) for line in proc.stdout or ()], daemon=True
    )
    reader.start()

    def read_until(wanted: set[str], timeout: float) -> set[str]:
        seen: set[str] = set()
        deadline = time.monotonic() + timeout
        while not wanted <= seen and time.monotonic() < deadline:
            try:
                seen.add(lines_q.get(timeout=0.5))
            except queue.Empty:
                if proc.poll() is not None:
                    break
        return seen

    try:
        wanted = {
            f"{T.fleet_summary} fedge.fleet/1 ",
            f"{T.status('watch-02')} fedge.device-status/1 offline",
        }
        lines = read_until(wanted, 20)
        assert wanted <= lines, (lines, proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        # Live changes arrive too, not only the retained state.
        retain(
            locked.host,
            locked.port,
            {T.status("watch-02"): json.dumps(DEVICE | {"device_id": "watch-02"}).encode()},
            **_login(locked, "watch-02"),
        )
        live = f"{T.status('watch-02')} fedge.device-status/1 idle"
        assert live in read_until({live}, 20)
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_example_payloads_of_docs_bms_md_match_the_asyncapi_document() -> None:
    from support.asyncapi import load_document

    doc = load_document()
    examples = re.findall(r"<!-- channel: (\w+) -->\n```json\n(.*?)```", BMS_DOC.read_text(), re.S)
    assert sorted(k for k, _ in examples) == ["aggregatorStatus", "deviceStatus", "fleetSummary", "insight"]
    for key, text in examples:
        channel = doc.channels[key]
        topic = channel.address.replace("{fleet}", "demo").replace("{device_id}", "watch-01")
        channel.validate(topic, text.encode())
