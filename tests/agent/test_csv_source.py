"""``[data] source = "csv"``: a device reading its own CSV of readings (``fedge.agent.csv_source``).

Everything is real: a file on disk, the agent's :class:`CsvSource` with its worker thread, the
real sample builder and SQLite sample store. The EdgeX side of the comparison is what a device
service publishes (events encoded in EdgeX's wire format and decoded as the agent's bus
subscriber decodes them) fed into a real :class:`EdgeXIngest`: the same readings as CSV cells
must give the same samples, byte for byte.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from fedge.agent.csv_source import BAD_ROW_REASONS, CURSOR_FILE, MAX_LINE_BYTES, CsvCursor, CsvSource
from fedge.agent.edgex.ingest import BackfillCursor, EdgeXIngest
from fedge.agent.edgex.profile import load_profile
from fedge.agent.edgex.readings import Event, Reading
from fedge.agent.edgex.wire import FLOAT_STYLE_BY_VERSION, decode_message, encode_envelope, event_to_dto
from fedge.agent.features import extract_features
from fedge.agent.sample_store import SampleStore
from fedge.protocol.task import TaskSpec

REPO = Path(__file__).resolve().parents[2]
PROFILE = REPO / "edgex_profiles" / "wearable-imu.yaml"
RESOURCES = ("accel_x", "accel_y", "accel_z", "gyro_x", "gyro_y", "gyro_z")
CLASSES = ("PEN", "ABD", "FEL", "IR", "ER", "TRAP", "ROW")
DEVICE = "watch-01"
PERIOD_NS = 20_000_000  # 50 Hz
START_NS = 1_700_000_000 * 10**9
LOGGER = "fedge.agent.csv"
#: Three recordings of different lengths and exercises, 2 s apart (windows never span a gap).
SEGMENTS = ((260, 0), (180, 3), (333, 6))


def recordings(seed: int = 7) -> list[tuple[int, np.ndarray, int]]:
    """(first origin, readings (n, 6), class index) of each recording; three decimals, which a
    Float32 reading's text carries exactly."""
    rng = np.random.default_rng(seed)
    out = []
    t = START_NS
    for rows, label in SEGMENTS:
        values = np.round(rng.normal(0.0, 3.0, (rows, len(RESOURCES))), 3)
        out.append((t, values, label))
        t += rows * PERIOD_NS + 2_000_000_000
    return out


def edgex_events(recs: list[tuple[int, np.ndarray, int]]) -> list[Event]:
    """What the IMU's device service publishes: 50 rows an event, each row 6 readings and the label."""
    events = []
    for t0, values, label in recs:
        for begin in range(0, values.shape[0], 50):
            readings = []
            for i in range(begin, min(begin + 50, values.shape[0])):
                t = t0 + i * PERIOD_NS
                readings += [
                    Reading(DEVICE, name, "Wearable-IMU", "Float32", float(v), t)
                    for name, v in zip(RESOURCES, values[i], strict=True)
                ]
                readings.append(Reading(DEVICE, "activity", "Wearable-IMU", "String", CLASSES[label], t))
            events.append(
                Event(
                    str(uuid.uuid4()), DEVICE, "Wearable-IMU", "imu", readings[0].origin_ns, tuple(readings)
                )
            )
    return events


def epoch_text(ns: int) -> str:
    return f"{ns // 10**9}.{ns % 10**9:09d}"


def csv_lines(events: list[Event]) -> list[str]:
    """The same readings as a logger's CSV: the time, then each resource's EdgeX value text."""
    lines = []
    for event in events:
        dto = event_to_dto(event, FLOAT_STYLE_BY_VERSION["v4"])
        rows: dict[int, dict[str, str]] = {}
        for reading in dto["readings"]:
            rows.setdefault(reading["origin"], {})[reading["resourceName"]] = reading["value"]
        for origin, cells in rows.items():
            lines.append(",".join([epoch_text(origin), *(cells[n] for n in (*RESOURCES, "activity"))]))
    return lines


HEADER = "time," + ",".join(RESOURCES) + ",activity"


def write_csv(path: Path, lines: list[str], header: str = HEADER) -> None:
    path.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")


def append(path: Path, text: str) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(text)


def make_source(
    tmp_path: Path,
    task: TaskSpec,
    csv_file: Path,
    state: str = "state",
    settle_s: float = 0.2,
    poll_s: float = 0.05,
    live: bool = False,
) -> CsvSource:
    profile = load_profile(PROFILE)
    state_dir = tmp_path / state
    state_dir.mkdir(exist_ok=True)
    return CsvSource(
        csv_file,
        DEVICE,
        task,
        SampleStore(state_dir / "samples.sqlite", 200_000, 0),
        {r.name: (r.minimum, r.maximum) for r in profile.resources},
        CsvCursor(state_dir / CURSOR_FILE, csv_file),
        value_types={r.name: r.value_type for r in profile.resources},
        profile_name=profile.name,
        poll_s=poll_s,
        settle_s=settle_s,
        live=live,
    )


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def caught_up(source: CsvSource, rows: int) -> Callable[[], bool]:
    return lambda: source.rows_read >= rows and source.caught_up


@pytest.fixture()
def running() -> Iterator[list[CsvSource]]:
    started: list[CsvSource] = []
    yield started
    for source in started:
        source.stop()


def start(source: CsvSource, running: list[CsvSource]) -> CsvSource:
    source.start()
    running.append(source)
    return source


def edgex_samples(tmp_path: Path, task: TaskSpec, events: list[Event]) -> tuple[np.ndarray, np.ndarray]:
    """The events through the wire format into a real EdgeX ingest and store."""
    profile = load_profile(PROFILE)
    ingest = EdgeXIngest(
        DEVICE,
        task,
        SampleStore(tmp_path / "edgex.sqlite", 200_000, 0),
        {r.name: (r.minimum, r.maximum) for r in profile.resources},
        None,
        "edgex",
        None,
        BackfillCursor(tmp_path / "edgex_cursor.json"),
    )
    for event in events:
        decoded = decode_message(encode_envelope(event, "v4", "edgex/events/device/x"))
        ingest.feed(r for e in decoded.events for r in e.readings)
    ingest._flush()
    return ingest.training_data(task)


def test_csv_rows_give_the_samples_of_the_same_readings_through_edgex_byte_for_byte(
    tmp_path: Path, har_task: TaskSpec, running: list[CsvSource]
) -> None:
    recs = recordings()
    events = edgex_events(recs)
    lines = csv_lines(events)
    csv_file = tmp_path / "readings.csv"
    write_csv(csv_file, lines)
    source = start(make_source(tmp_path, har_task, csv_file), running)
    wait_for(caught_up(source, len(lines)), "the whole file")
    x_csv, y_csv = source.training_data(har_task)
    x_edgex, y_edgex = edgex_samples(tmp_path, har_task, events)
    assert x_csv.shape == (4 + 2 + 5, har_task.input_dim)  # (260-50)//50, (180-50)//50, (333-50)//50
    assert x_csv.tobytes() == x_edgex.tobytes() and y_csv.tobytes() == y_edgex.tobytes()
    # And what the data-set loader computes from each recording on its own.
    expected = np.concatenate([extract_features(v, har_task.features) for _, v, _ in recs])
    assert x_csv.tobytes() == expected.tobytes()
    assert y_csv.tolist() == [0] * 4 + [3] * 2 + [6] * 5
    report = source.report()
    assert report["csv"] == {
        "file": str(csv_file),
        "offset": csv_file.stat().st_size,
        "line": len(lines) + 1,
        "rows_read": len(lines),
        "bad_rows": dict.fromkeys(BAD_ROW_REASONS, 0),
        "last_bad_row": None,
        "restarts": 0,
        "caught_up": True,
    }
    assert report["stored_samples"] == 11 and report["last_error"] is None
    assert "bus" not in report and "bus_connected" not in report


def test_every_bad_row_is_counted_by_reason_logged_once_and_the_good_rows_are_kept(
    tmp_path: Path, har_task: TaskSpec, running: list[CsvSource], caplog: pytest.LogCaptureFixture
) -> None:
    recs = recordings()
    lines = csv_lines(edgex_events(recs))
    good = list(lines)
    bad = {
        "fields": "1700000000.5,1,2",
        "time": "yesterday," + ",".join(["1.0"] * 6) + ",PEN",
        "value": lines[3].rsplit(",", 7)[0] + ",abc," + ",".join(["1.0"] * 5) + ",PEN",
        "syntax": '1700000000.6,"1.0,2,3,4,5,6,PEN',
    }
    # Bad rows between recordings (inside the 2 s gap), so the good rows' windows are untouched.
    gap = SEGMENTS[0][0]
    mixed = [*good[:gap], bad["fields"], bad["time"], bad["value"], bad["syntax"], *good[gap:]]
    csv_file = tmp_path / "readings.csv"
    write_csv(csv_file, mixed)
    with csv_file.open("ab") as f:  # a row that is not UTF-8, and a line far over the limit
        f.write(b"1700000100.0,\xff\xfe,1,1,1,1,1,PEN\n" + b"9" * (3 * MAX_LINE_BYTES) + b"\n")
    append(csv_file, "\n")  # a blank line is no row and no error
    caplog.set_level(logging.WARNING, LOGGER)
    source = start(make_source(tmp_path, har_task, csv_file), running)
    total = len(mixed) + 3
    wait_for(lambda: source.caught_up and source.report()["csv"]["line"] == total + 1, "the whole file")
    report = source.report()
    assert report["csv"]["bad_rows"] == {
        "too_long": 1,
        "encoding": 1,
        "syntax": 1,
        "fields": 1,
        "time": 1,
        "value": 1,
    }
    x, _ = source.training_data(har_task)
    assert x.tobytes() == edgex_samples(tmp_path, har_task, edgex_events(recs))[0].tobytes()  # nothing lost
    f = str(csv_file)
    first_bad = gap + 2
    assert [r.getMessage() for r in caplog.records if r.name == LOGGER] == [
        f"{f} line {first_bad}: 3 fields, the header has 8; row skipped (fields): give every row one cell "
        "per header column (an empty cell for a missing reading)",
        f"{f} line {first_bad + 1}: column 'time': 'yesterday' is not a time (ISO 8601, e.g. "
        "2025-03-01T08:00:00Z, or epoch seconds); row skipped (time): give every row its time (ISO 8601, "
        "e.g. 2025-03-01T08:00:00Z, or epoch seconds)",
        f"{f} line {first_bad + 2}: column 'accel_x': 'abc' is not a Float32 (the profile's valueType); row "
        "skipped (value): fix the cell, or leave it empty for a missing reading",
        f"{f} line {first_bad + 3}: not valid CSV: unexpected end of data; row skipped (syntax): fix the "
        "row's quoting (a cell with a comma is quoted, a quote inside it doubled)",
        f"{f} line {len(mixed) + 2}: not UTF-8 text; row skipped (encoding): save the file as UTF-8",
        f"{f} line {len(mixed) + 3}: a line of more than {MAX_LINE_BYTES} bytes; row skipped (too_long): a "
        f"row of readings is one line of at most {MAX_LINE_BYTES} bytes; fix the logger's output",
    ]
    assert report["csv"]["last_bad_row"] == {
        "line": len(mixed) + 3,
        "reason": "too_long",
        "error": caplog.records[-1].getMessage(),
    }


def test_rows_a_logger_appends_are_read_from_the_offset_and_a_half_written_row_waits(
    tmp_path: Path, har_task: TaskSpec, running: list[CsvSource]
) -> None:
    events = edgex_events(recordings())
    lines = csv_lines(events)
    csv_file = tmp_path / "readings.csv"
    write_csv(csv_file, lines[:300])
    source = start(make_source(tmp_path, har_task, csv_file, settle_s=3600.0), running)
    wait_for(caught_up(source, 300), "the first 300 rows")
    first = source.report()["stored_samples"]
    append(csv_file, "\n".join(lines[300:-1]) + "\n")
    append(csv_file, lines[-1][:10])  # the logger is writing the last row
    wait_for(caught_up(source, len(lines) - 1), "the appended rows")
    assert source.rows_read == len(lines) - 1  # the half-written row waits for its newline
    append(csv_file, lines[-1][10:] + "\n")  # ... and finishes it
    wait_for(caught_up(source, len(lines)), "the last row")
    report = source.report()
    assert report["csv"]["rows_read"] == len(lines)  # no row read twice
    assert report["csv"]["bad_rows"] == dict.fromkeys(BAD_ROW_REASONS, 0)
    assert first < report["stored_samples"] == 11
    assert report["store"]["duplicate"] == 0
    x, y = source.training_data(har_task)
    x_edgex, y_edgex = edgex_samples(tmp_path, har_task, events)
    assert x.tobytes() == x_edgex.tobytes() and y.tobytes() == y_edgex.tobytes()


def test_a_last_row_without_its_newline_is_read_once_it_settles(
    tmp_path: Path, har_task: TaskSpec, running: list[CsvSource]
) -> None:
    events = edgex_events(recordings())
    lines = csv_lines(events)
    csv_file = tmp_path / "readings.csv"
    csv_file.write_text("\n".join([HEADER, *lines]), encoding="utf-8")  # an export without a final newline
    source = start(make_source(tmp_path, har_task, csv_file, settle_s=0.2), running)
    wait_for(caught_up(source, len(lines)), "the whole file")
    x, _ = source.training_data(har_task)
    assert x.tobytes() == edgex_samples(tmp_path, har_task, events)[0].tobytes()
    assert source.report()["csv"]["bad_rows"] == dict.fromkeys(BAD_ROW_REASONS, 0)


def test_a_restart_resumes_at_the_next_unstored_window_and_gives_the_samples_of_one_run(
    tmp_path: Path, har_task: TaskSpec, running: list[CsvSource]
) -> None:
    events = edgex_events(recordings())
    lines = csv_lines(events)
    csv_file = tmp_path / "readings.csv"
    write_csv(csv_file, lines[:230])  # inside the first recording: 3 windows, the 4th half-read
    source = start(make_source(tmp_path, har_task, csv_file), running)
    wait_for(caught_up(source, 230), "the first 230 rows")
    source.stop()
    running.remove(source)
    # The next window starts at row 150 (line 152 of the file): the cursor points there.
    cursor = CsvCursor(tmp_path / "state" / CURSOR_FILE, csv_file).load()
    assert cursor is not None and cursor.line == 151
    append(csv_file, "\n".join(lines[230:]) + "\n")
    again = start(make_source(tmp_path, har_task, csv_file), running)
    wait_for(caught_up(again, len(lines) - 150), "the rest")
    report = again.report()
    assert report["csv"]["rows_read"] == len(lines) - 150
    assert report["store"]["duplicate"] == 0  # it starts with window 4 (rows 150-249): none made twice
    x, y = again.training_data(har_task)
    x_edgex, y_edgex = edgex_samples(tmp_path, har_task, events)
    assert x.tobytes() == x_edgex.tobytes() and y.tobytes() == y_edgex.tobytes()


def test_a_replaced_file_is_read_from_its_start_and_a_missing_one_waited_for(
    tmp_path: Path, har_task: TaskSpec, running: list[CsvSource], caplog: pytest.LogCaptureFixture
) -> None:
    lines = csv_lines(edgex_events(recordings()))
    csv_file = tmp_path / "readings.csv"
    caplog.set_level(logging.INFO, LOGGER)
    source = start(make_source(tmp_path, har_task, csv_file), running)
    missing = f"[data] csv_file {csv_file}: no such file (yet); the agent reads it once it exists"
    wait_for(lambda: source.report()["last_error"] == missing, "the missing file reported")
    write_csv(csv_file, lines[:200], header="time,accel_x")
    wait_for(lambda: source.report()["last_error"] != missing, "the bad header reported")
    assert source.report()["last_error"] == (
        f"[data] csv_file {csv_file}: no column 'accel_y', 'accel_z', 'gyro_x', 'gyro_y', 'gyro_z', "
        "'activity' in the header; the task reads accel_x, accel_y, accel_z, gyro_x, gyro_y, gyro_z, "
        "activity (label)"
    )
    replacement = tmp_path / "new.csv"
    write_csv(replacement, lines[:200])
    os.replace(replacement, csv_file)
    wait_for(caught_up(source, 200), "the file")
    assert source.report()["last_error"] is None
    write_csv(replacement, lines)  # the logger rotates: a new file under the same name
    os.replace(replacement, csv_file)
    wait_for(caught_up(source, 200 + len(lines)), "the replaced file")
    report = source.report()
    assert report["csv"]["restarts"] == 1
    # The builder knows the rows it read before: their readings are duplicates, nothing stored twice.
    assert report["quality"]["duplicate"] == 200 * 7 and report["store"]["duplicate"] == 0
    assert report["stored_samples"] == 11
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert messages.count(missing) == 1  # logged once while it lasts
    assert f"{csv_file} was replaced or shrank: reading it again from its start" in messages


def test_a_file_without_a_time_column_is_one_error_naming_the_fix(
    tmp_path: Path, har_task: TaskSpec, running: list[CsvSource]
) -> None:
    csv_file = tmp_path / "readings.csv"
    write_csv(csv_file, ["1,2,3,4,5,6,PEN"], header=",".join(RESOURCES) + ",activity")
    source = start(make_source(tmp_path, har_task, csv_file), running)
    wait_for(lambda: source.report()["last_error"] is not None, "the error")
    assert source.report()["last_error"] == (
        f"[data] csv_file {csv_file}: no time column in the header; a device places its readings in time: "
        "name one of the columns time, timestamp, date, datetime (ISO 8601 or epoch seconds)"
    )
    assert source.report()["csv"]["rows_read"] == 0


def fleet_config(tmp_path: Path, data: dict[str, object]) -> Path:
    """A real agent config from ``create_fleet`` with its ``[data]`` table replaced."""
    import tomllib

    from fedge.lab.provision import create_fleet, render_toml

    files = create_fleet(
        tmp_path / "fleet",
        "csv",
        tmp_path / "model",
        "mqtt://127.0.0.1:9",
        {DEVICE: 1},
        {"rounds": 1},
    )
    path = files.agent_configs[DEVICE]
    doc = tomllib.loads(path.read_text())
    doc["data"] = data
    path.write_text(render_toml(doc))
    return path


def test_csv_file_is_required_with_source_csv_and_refused_with_another(tmp_path: Path) -> None:
    from fedge.agent.config import load_agent_config
    from fedge.protocol.config_source import ConfigError

    task = str(REPO / "tasks" / "har-watch.toml")
    config = load_agent_config(
        fleet_config(tmp_path, {"source": "csv", "task": task, "csv_file": "devices/readings.csv"}), {}
    )
    assert config.data.source == "csv"
    assert config.data.csv_file == tmp_path / "fleet" / "devices" / "readings.csv"  # relative to the config
    refusals = {
        "without csv_file": (
            {"source": "csv", "task": task},
            '[data] csv_file: source = "csv" reads the device\'s readings from a CSV file; set csv_file to '
            "its path (docs/own-data.md has the format)",
        ),
        "without task": (
            {"source": "csv", "csv_file": "r.csv"},
            '[data] task: the task spec this device was provisioned for is required with source = "csv"',
        ),
        "with edgex": (
            {"source": "edgex", "task": task, "csv_file": "r.csv"},
            "[data] csv_file goes with source = \"csv\" (source is 'edgex'); remove it",
        ),
    }
    for name, (data, message) in refusals.items():
        with pytest.raises(ConfigError) as refused:
            load_agent_config(fleet_config(tmp_path / name.replace(" ", "-"), data), {})
        assert str(refused.value) == message, name


def thread_switches(source: CsvSource) -> int:
    """How often the source's thread has slept and woken (context switches, from /proc)."""
    counts = 0
    for line in Path(f"/proc/self/task/{source._thread.native_id}/status").read_text().splitlines():
        if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
            counts += int(line.split()[1])
    return counts


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="inotify and /proc: Linux")
def test_with_inotify_the_source_sleeps_until_the_file_changes_and_misses_nothing(
    tmp_path: Path, har_task: TaskSpec, running: list[CsvSource], caplog: pytest.LogCaptureFixture
) -> None:
    """A poll of an hour: only the directory's inotify events (and the source's own deadlines:
    a half-written row settling, the reorder flush) can wake it, so appended rows, a half-written
    last row, a rotation and stop are all seen without polling, and an unchanged file costs no
    wake-ups."""
    events = edgex_events(recordings())
    lines = csv_lines(events)
    csv_file = tmp_path / "readings.csv"
    write_csv(csv_file, lines[:300])
    caplog.set_level(logging.INFO, LOGGER)
    source = start(make_source(tmp_path, har_task, csv_file, settle_s=0.2, poll_s=3600.0), running)
    wait_for(caught_up(source, 300), "the first 300 rows")
    time.sleep(0.5)  # the reorder flush (IDLE_FLUSH_S after the last rows) may still be due
    wait_for(lambda: source.report()["csv"]["caught_up"], "the flush")
    before = thread_switches(source)
    time.sleep(1.0)  # nothing changes: the thread sleeps (it polled 20 times a second before)
    assert thread_switches(source) - before <= 2
    append(csv_file, "\n".join(lines[300:-1]) + "\n")
    append(csv_file, lines[-1][:10])  # half-written: read once it settles (a deadline, not an event)
    wait_for(caught_up(source, len(lines)), "the appended rows and the settled last row")
    assert source.report()["csv"]["rows_read"] == len(lines)
    replacement = tmp_path / "new.csv"
    write_csv(replacement, lines)
    os.replace(replacement, csv_file)  # the logger rotates
    wait_for(caught_up(source, 2 * len(lines)), "the replaced file")
    report = source.report()
    assert report["csv"]["restarts"] == 1 and report["store"]["duplicate"] == 0
    assert report["stored_samples"] == 11
    assert not any("instead" in r.getMessage() for r in caplog.records if r.name == LOGGER)  # no polling
    source.stop()
    running.remove(source)
    assert not source._thread.is_alive()  # stop woke the watch: it did not wait for an event


def test_without_a_directory_to_watch_the_source_polls_says_so_once_and_reads_the_file_later(
    tmp_path: Path, har_task: TaskSpec, running: list[CsvSource], caplog: pytest.LogCaptureFixture
) -> None:
    lines = csv_lines(edgex_events(recordings()))
    directory = tmp_path / "logger"
    csv_file = directory / "readings.csv"
    caplog.set_level(logging.INFO, LOGGER)
    source = start(make_source(tmp_path, har_task, csv_file), running)
    polling = (
        f"{csv_file}: cannot watch {directory}: No such file or directory; looking for new rows "
        "every 0.05 s instead"
    )
    wait_for(lambda: any(r.getMessage() == polling for r in caplog.records), "the fallback logged")
    time.sleep(0.3)  # several polls
    directory.mkdir()
    write_csv(csv_file, lines)
    wait_for(caught_up(source, len(lines)), "the file, once it exists")
    assert [r.getMessage() for r in caplog.records].count(polling) == 1
    assert source.report()["stored_samples"] == 11


def test_new_live_windows_are_announced_to_the_listener_so_the_worker_need_not_ask(
    tmp_path: Path, har_task: TaskSpec, running: list[CsvSource]
) -> None:
    """The agent's worker sleeps until the source calls its listener (``set_live_listener``)."""
    lines = csv_lines(edgex_events(recordings()))
    csv_file = tmp_path / "readings.csv"
    window = har_task.features.window
    assert window is not None and window.size > 60
    write_csv(csv_file, lines[:60])  # not a window yet
    source = make_source(tmp_path, har_task, csv_file, live=True)
    announced: list[int] = []
    source.set_live_listener(lambda: announced.append(len(source.live)))
    start(source, running)
    wait_for(caught_up(source, 60), "the first rows")
    assert announced == [] and source.live_windows(None).windows == ()
    append(csv_file, "\n".join(lines[60:260]) + "\n")
    wait_for(caught_up(source, 260), "the rest of the first recording")
    assert announced and all(n > 0 for n in announced)  # called once windows were there to take
    assert len(source.live_windows(None).windows) == (260 - window.size) // window.step + 1
