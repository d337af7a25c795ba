"""``fedge edgex simulate --csv``: a building's CSV replayed as EdgeX devices, against a real
Mosquitto. A recorder subscribed to ``edgex/#`` receives the messages, and the agent's own
decoder (:func:`decode_message`) reads them back: device names (one per day, or per value of a
column), values as EdgeX carries them (a Bool as ``"true"``/``"false"``) and the CSV's own times
as origins. Bad input is a one-line error (exit 2) before anything connects.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fedge.agent.edgex.readings import Reading
from fedge.agent.edgex.wire import decode_message
from fedge.cli import main
from fedge.lab.broker import MosquittoBroker
from support.mqtt_fixtures import TrafficRecorder

pytest_plugins = ("support.mqtt_fixtures",)

PROFILE_YAML = """\
name: "Room-Sensor"
deviceResources:
  - name: "temperature"
    properties: { valueType: "Float64", readWrite: "R" }
  - name: "co2"
    properties: { valueType: "Int32", readWrite: "R" }
  - name: "occupied"
    properties: { valueType: "Bool", readWrite: "R" }
deviceCommands:
  - name: "all"
    readWrite: "R"
    resourceOperations:
      - { deviceResource: "temperature" }
      - { deviceResource: "co2" }
      - { deviceResource: "occupied" }
"""
#: time, room (not a resource), three resources; a Bool as true/false and 1/0, a missing cell.
ROWS = [
    ("2025-03-01T23:59:58", "Room 1", "21.5", "410", "true"),
    ("2025-03-01T23:59:59Z", "Room 1", "21.25", "415", "0"),
    ("2025-03-02T00:00:00+00:00", "room/2", "19.0", "", "1"),
    ("1740873601.5", "room/2", "18.75", "500", "false"),  # epoch seconds: 2025-03-02T00:00:01.5Z
]
HEADER = "Time,room,temperature,co2,occupied"


def ns(text: str) -> int:
    if text.replace(".", "").isdigit():
        return int(float(text) * 1000) * 1_000_000
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000) * 1_000_000


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    profile = tmp_path / "room.yaml"
    profile.write_text(PROFILE_YAML)
    data = tmp_path / "export.csv"
    data.write_text("\n".join([HEADER, *(",".join(r) for r in ROWS)]) + "\n")
    return profile, data


def received(recorder: TrafficRecorder, count: int) -> dict[str, list[Reading]]:
    readings: dict[str, list[Reading]] = {}
    for message in recorder.wait_for_count("edgex/#", count, timeout=15):
        result = decode_message(message.payload)
        assert result.rejected == []
        for event in result.events:
            assert event.profile == "Room-Sensor" and event.source == "all"
            readings.setdefault(event.device, []).extend(event.readings)
    return readings


def simulate(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["edgex", "simulate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_days_become_devices_with_the_csv_values_and_times(
    capsys: pytest.CaptureFixture[str], mosquitto: MosquittoBroker, files: tuple[Path, Path]
) -> None:
    profile, data = files
    with TrafficRecorder.for_broker(mosquitto, topic_filter="edgex/#") as recorder:
        code, out, err = simulate(
            capsys,
            "--broker",
            mosquitto.url,
            "--csv",
            str(data),
            "--profile",
            str(profile),
            "--split-by",
            "day",
        )
        assert code == 0, err
        assert out.splitlines()[:2] == [
            "Room-Sensor-2025-03-01: 2 events",
            "Room-Sensor-2025-03-02: 2 events",
        ]
        got = received(recorder, 4)
    assert sorted(got) == ["Room-Sensor-2025-03-01", "Room-Sensor-2025-03-02"]
    day1 = [(r.resource, r.value_type, r.value, r.origin_ns) for r in got["Room-Sensor-2025-03-01"]]
    t0, t1 = ns(ROWS[0][0]), ns(ROWS[1][0])
    assert day1 == [
        ("temperature", "Float64", 21.5, t0),
        ("co2", "Int32", 410, t0),
        ("occupied", "Bool", True, t0),
        ("temperature", "Float64", 21.25, t1),
        ("co2", "Int32", 415, t1),
        ("occupied", "Bool", False, t1),
    ]
    day2 = [(r.resource, r.value, r.origin_ns) for r in got["Room-Sensor-2025-03-02"]]
    t2, t3 = ns(ROWS[2][0]), ns(ROWS[3][0])
    assert t3 - t2 == 1_500_000_000
    assert day2 == [  # the empty co2 cell is no reading
        ("temperature", 19.0, t2),
        ("occupied", True, t2),
        ("temperature", 18.75, t3),
        ("co2", 500, t3),
        ("occupied", False, t3),
    ]


def test_a_column_splits_with_sanitized_names_and_a_prefix(
    capsys: pytest.CaptureFixture[str], mosquitto: MosquittoBroker, files: tuple[Path, Path]
) -> None:
    profile, data = files
    with TrafficRecorder.for_broker(mosquitto, topic_filter="edgex/#") as recorder:
        code, out, err = simulate(
            capsys,
            "--broker",
            mosquitto.url,
            "--csv",
            str(data),
            "--profile",
            str(profile),
            "--split-by",
            "column:room",
            "--time-column",
            "Time",
            "--device-prefix",
            "b7",
            "--json",
        )
        assert code == 0, err
        assert json.loads(out)["rows"] == {"b7-Room-1": 2, "b7-room-2": 2}
        got = received(recorder, 4)
    assert {d: len(r) for d, r in got.items()} == {"b7-Room-1": 6, "b7-room-2": 5}
    # The raw wire value of a Bool is EdgeX's "true"/"false", whatever the CSV wrote.
    raw = [json.loads(m.payload) for m in recorder.messages]
    values = [
        r["value"] for m in raw for r in m["payload"]["event"]["readings"] if r["resourceName"] == "occupied"
    ]
    assert values == ["true", "false", "true", "false"]


def test_bad_input_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], files: tuple[Path, Path], tmp_path: Path
) -> None:
    profile, data = files
    untimed = tmp_path / "untimed.csv"
    untimed.write_text("room,temperature\nA,20.0\n")
    base = ["--broker", "mqtt://127.0.0.1:1", "--profile", str(profile)]
    cases = [
        (
            [*base, "--csv", str(untimed), "--split-by", "day"],
            f"{untimed}: --split-by day needs a time column (time, timestamp, date, datetime, "
            "or name it with --time-column)",
        ),
        (
            [*base, "--csv", str(data), "--split-by", "week"],
            "--split-by must be 'day' or 'column:NAME', not 'week'",
        ),
        (
            [*base, "--csv", str(data), "--split-by", "column:floor"],
            f"{data}: no column 'floor' to split by in the header",
        ),
        ([*base, "--csv", str(data)], "--csv needs --profile PROFILE.yaml and --split-by day|column:NAME"),
        ([*base, "--split-by", "day"], "--profile, --split-by only go with --csv"),
    ]
    for argv, message in cases:
        code, out, err = simulate(capsys, *argv)
        assert (code, out, err) == (2, "", f"fedge: error: {message}\n"), argv
