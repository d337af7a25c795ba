"""The fleet dashboard in a real browser, from a running fleet.

A real Mosquitto, a real aggregator process with ``[metrics] enabled`` (the dashboard's port)
that keeps running after its last round, and three real agent processes that train and then
publish predictions from live windows. Headless Chromium (Debian's package) loads the page and
runs its script; the DOM it ends with must show the fleet's round, its devices and their
predictions, and the JSON the page reads must agree. A screenshot is taken (and, with
``FEDGE_UPDATE_SCREENSHOT=1``, kept as ``docs/dashboard.png``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedge.lab.broker import MosquittoBroker, free_loopback_port
from support.fleet_harness import Fleet, latest_status, wait_status
from support.mqtt_fixtures import TrafficRecorder, in_ci

pytest_plugins = ("support.mqtt_fixtures",)
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DEVICES = 3
ROUNDS = 3


def chromium() -> str:
    """Debian's chromium; skips without it (fails on CI, where scripts/system-deps.sh installs it)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if in_ci():
            pytest.fail("chromium is not installed (scripts/system-deps.sh installs it)")
        pytest.skip("chromium is not installed")
    return exe


def headless(exe: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Chromium as the workplace runs it: no sandbox (root), no background networking."""
    command = [
        exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture()
def recorder(mosquitto: MosquittoBroker) -> Iterator[TrafficRecorder]:
    with TrafficRecorder.for_broker(mosquitto) as rec:
        yield rec


def fetch_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as answer:
        document = json.loads(answer.read())
    assert isinstance(document, dict)
    return document


def cells(dom: str, tbody: str) -> list[list[str]]:
    """The text of each row of ``<tbody id=tbody>`` in a dumped DOM."""
    match = re.search(rf'<tbody id="{tbody}">(.*?)</tbody>', dom, re.S)
    assert match, f"no tbody {tbody!r} in the page"
    return [
        re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr[^>]*>(.*?)</tr>", match[1], re.S)
    ]


def text_of(dom: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', dom)
    assert match, f"no element {element_id!r} in the page"
    return match[1]


def test_the_dashboard_shows_a_running_fleet(
    tmp_path: Path, mosquitto: MosquittoBroker, recorder: TrafficRecorder, har_model_dir: Path
) -> None:
    exe = chromium()
    fleet = Fleet(
        tmp_path / "fleet", mosquitto.url, har_model_dir, DEVICES, {"rounds": ROUNDS, "min_devices": DEVICES}
    )
    port = free_loopback_port()
    url = f"http://127.0.0.1:{port}"
    try:
        for device in fleet.files.agent_configs:
            fleet.start_agent(device)
        fleet.spawn(
            "aggregator",
            ["aggregator", "run", "--config", str(fleet.files.aggregator_config)],
            {
                "FEDGE_AGGREGATOR__AGGREGATOR__EXIT_WHEN_DONE": "false",  # keeps serving the page
                "FEDGE_AGGREGATOR__METRICS__ENABLED": "true",
                "FEDGE_AGGREGATOR__METRICS__PORT": str(port),
            },
        )
        wait_status(
            recorder, fleet, lambda s: s.get("state") == "done" and s.get("completed_rounds") == ROUNDS, 180,
            "the fleet's last round",
        )  # fmt: skip
        devices = sorted(fleet.files.agent_configs)
        deadline = time.monotonic() + 90
        while True:  # every device's prediction, as the dashboard's view has it
            view = fetch_json(url + "/api/fleet")
            if {p["device_id"] for p in view["predictions"]} == set(devices):
                break
            assert time.monotonic() < deadline, f"predictions on the dashboard: {view['predictions']}"
            time.sleep(1)
        assert view["round"]["completed"] == ROUNDS and view["round"]["planned"] == ROUNDS
        assert [d["device_id"] for d in view["devices"]] == devices
        assert [p["round"] for p in view["history"]] == list(range(1, ROUNDS + 1))

        # The view follows the devices' statuses (rebuilt at most once a second): wait until it
        # shows each device's last one, then load the page.
        deadline = time.monotonic() + 20
        while True:
            states = {
                d: latest_status(recorder.messages, fleet.topics.status(d)).get("state") for d in devices
            }
            if {d["device_id"]: d["state"] for d in fetch_json(url + "/api/fleet")["devices"]} == states:
                break
            assert time.monotonic() < deadline, f"the view's device states never matched {states}"
            time.sleep(0.5)
        dom = headless(exe, tmp_path / "chromium-1", "--dump-dom", url + "/").stdout
        assert 'data-loaded="true"' in dom, dom[-2000:]
        assert text_of(dom, "fleet") == "e2e"
        assert text_of(dom, "round") == f"{ROUNDS} / {ROUNDS}"
        assert text_of(dom, "phase") == "done"
        assert text_of(dom, "devices-total") == str(DEVICES)
        assert text_of(dom, "online") == str(DEVICES)
        assert [row[0] for row in cells(dom, "devices")] == devices
        assert {row[1] for row in cells(dom, "devices")} == {"online"}
        assert {row[0]: row[2] for row in cells(dom, "devices")} == states  # each device's last status
        predictions = cells(dom, "predictions")
        assert sorted(row[0] for row in predictions) == devices
        by_device = {p["device_id"]: p["prediction"] for p in view["predictions"]}
        assert {row[0]: row[2] for row in predictions} == by_device  # the page shows the view's labels
        assert set(by_device.values()) <= {
            "PEN",
            "ABD",
            "FEL",
            "IR",
            "ER",
            "TRAP",
            "ROW",
        }  # the task's classes
        assert f'data-points="{ROUNDS}"' in dom  # one chart point per aggregated round
        assert cells(dom, "rejected") == []

        shot = tmp_path / "dashboard.png"
        headless(
            exe,
            tmp_path / "chromium-2",
            "--window-size=1280,800",
            "--hide-scrollbars",
            f"--screenshot={shot}",
            url + "/",
        )
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
        if os.environ.get("FEDGE_UPDATE_SCREENSHOT") == "1":
            shutil.copyfile(shot, REPO / "docs" / "dashboard.png")
    finally:
        fleet.stop_all()
