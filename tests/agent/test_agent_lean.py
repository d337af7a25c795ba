"""The agent's memory and CPU savings (issue 18) keep its behaviour.

- The agent's modules load neither ``requests`` (with urllib3) nor PyYAML until an HTTP call is
  made or a profile is parsed (checked in a fresh interpreter: this one has loaded them).
- The fast path of the EdgeX reading decoder gives exactly what the general path gives, and
  hands every reading it cannot judge itself to that path, so each refusal keeps its words; the
  names an event's readings repeat are held once.
- A JSON message skips the node walk only when it cannot hold a lone surrogate.
- Every SQLite file of the agent opens with the small page cache.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedge.agent.edgex import wire
from fedge.agent.edgex.readings import ReadingError
from fedge.agent.outbox import Outbox
from fedge.agent.sqlite_file import CACHE_KIB

READING: dict[str, Any] = {
    "id": "3c1d9e27-6a4b-4f8e-b2d1-7e5a9c0f3b18",
    "origin": 1700000000000000000,
    "deviceName": "dev",
    "resourceName": "Temperature",
    "profileName": "prof",
    "valueType": "Float64",
    "value": "2.31e+01",
    "units": "degC",
}
DROP = object()


def reading(**changes: Any) -> dict[str, Any]:
    doc = dict(READING)
    for key, value in changes.items():
        if value is DROP:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def envelope(*readings: dict[str, Any]) -> bytes:
    event = {
        "apiVersion": "v3",
        "id": "0f3a1c52-8d4e-4b7a-a6b1-2c9d3e4f5a60",
        "deviceName": "dev",
        "profileName": "prof",
        "sourceName": "src",
        "origin": 1700000000000000000,
        "readings": list(readings),
    }
    body = {"apiVersion": "v3", "event": event}
    return json.dumps({"apiVersion": "v3", "payload": body, "contentType": "application/json"}).encode()


def test_the_agent_loads_neither_requests_nor_yaml_at_import() -> None:
    code = (
        "import sys, fedge.agent.wiring, fedge.agent.service, fedge.agent.writeback\n"
        "from fedge.agent.edgex.core_data import CoreDataClient\n"
        "from fedge.agent.edgex.core_command import CoreCommandClient\n"
        "CoreDataClient('http://127.0.0.1:1').close(); CoreCommandClient('http://127.0.0.1:1').close()\n"
        "print(sorted(m for m in ('requests', 'urllib3', 'yaml') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"


def test_yaml_loads_with_the_first_profile_parsed() -> None:
    code = (
        "import sys\nfrom fedge.agent.edgex.profile import load_profile\nfrom fedge.tools import bundled\n"
        "before = 'yaml' in sys.modules\n"
        "p = load_profile(bundled.profiles_dir() / 'wearable-imu.yaml')\n"
        "print(before, 'yaml' in sys.modules, p.name)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == ["False", "True", "Wearable-IMU"]


GOOD = [
    reading(),
    reading(id=DROP),
    reading(id=None),
    reading(units=DROP),
    reading(value=DROP),
    reading(value=None),
    reading(tags={"floor": "3"}),
    reading(valueType="Int16", value="-12"),
    reading(valueType="Bool", value="true"),
    reading(valueType="String", value="on"),
    reading(valueType="Float32Array", value="[1.5, 2]"),
]
#: Each of these is refused by the general path: the fast path must hand it over untouched.
BAD = [
    "not a reading",
    reading(id=7),
    reading(origin=DROP),
    reading(origin=0),
    reading(origin=True),
    reading(origin=2**63),
    reading(origin="1"),
    reading(deviceName=" "),
    reading(deviceName=""),
    reading(resourceName=DROP),
    reading(profileName=5),
    reading(valueType="float64"),  # a valid spelling the fast path leaves to normalize_value_type
    reading(valueType="Nope"),
    reading(valueType=None),
    reading(units=3),
    reading(tags=[1]),
    reading(value=1.5),
    reading(value="abc"),
    reading(valueType="Int8", value="300"),
    reading(valueType="Binary", value=DROP, binaryValue="AQI=", mediaType="x"),
    reading(valueType="Object", value=DROP, objectValue={"a": 1}),
]


@pytest.mark.parametrize("doc", GOOD, ids=range(len(GOOD)))
def test_fast_path_gives_what_the_general_path_gives(doc: dict[str, Any]) -> None:
    fast = wire._decode_simple_reading(doc, {})
    assert fast is not None
    assert fast == wire._decode_reading(doc, binary_as_bytes=False)


@pytest.mark.parametrize("doc", BAD, ids=range(len(BAD)))
def test_fast_path_leaves_every_doubtful_reading_to_the_general_path(doc: Any) -> None:
    try:
        expected: Any = wire._decode_reading(doc, binary_as_bytes=False)
    except ReadingError as exc:
        expected = (exc.reason, str(exc))
    try:
        got: Any = wire._decode_simple_reading(doc, {})
    except ReadingError as exc:  # only the value's parse may raise, with the same error
        got = (exc.reason, str(exc))
        assert got == expected
        return
    assert got is None or got == expected
    if got is None:  # and decoding the whole message reports exactly the general path's verdict
        result = wire.decode_message(envelope(reading(), doc))
        kept = result.events[0].readings
        if isinstance(expected, tuple):
            reason, words = expected
            event = "event 0f3a1c52-8d4e-4b7a-a6b1-2c9d3e4f5a60 reading 1"
            assert len(kept) == 1
            assert [(e.reason, str(e)) for e in result.rejected] == [
                (reason, f"{reason}: {event}: {words[len(reason) + 2 :]}")
            ]
        else:
            assert kept[1] == expected and not result.rejected


def test_an_events_readings_share_their_names() -> None:
    result = wire.decode_message(
        envelope(reading(), reading(value="2.4e+01"), reading(resourceName="Humidity"))
    )
    first, second, third = result.events[0].readings
    assert first.device is second.device is third.device
    assert first.profile is third.profile and first.units is second.units
    assert first.resource is second.resource and third.resource == "Humidity"
    assert [r.value for r in (first, second)] == [23.1, 24.0]


def test_a_lone_surrogate_is_still_refused_and_an_escaped_backslash_is_not_one() -> None:
    lone = envelope(reading()).replace(b'"degC"', b'"\\ud800"')
    with pytest.raises(ReadingError) as info:
        wire.decode_message(lone)
    assert (info.value.reason, str(info.value)) == (
        "bad_json",
        "bad_json: text holds a lone UTF-16 surrogate",
    )
    text = envelope(reading()).replace(b'"degC"', b'"\\\\ud800"')  # the text \ud800, no surrogate
    assert wire.decode_message(text).events[0].readings[0].units == "\\ud800"
    pair = envelope(reading()).replace(b'"degC"', b'"\\ud83d\\ude00"')  # a proper pair: one character
    assert wire.decode_message(pair).events[0].readings[0].units == "\U0001f600"


def test_agent_sqlite_files_open_with_a_small_page_cache(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    try:
        with outbox._lock:
            assert outbox._conn is not None
            assert outbox._conn.execute("PRAGMA cache_size").fetchone() == (-CACHE_KIB,)
    finally:
        outbox.close()
