"""The shared CSV reader (:mod:`fedge.tools.csv_readings`): times, the default time column,
splitting into device-name groups, and profile-typed cells. Real files, no doubles."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedge.tools.csv_readings import CsvError, CsvTable, group_name, parse_time, profile_cell, split_rows

T0 = 1_740_873_600_000_000_000  # 2025-03-02T00:00:00Z in ns


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-03-02T00:00:00", T0),  # no zone: UTC
        ("2025-03-02 00:00:00", T0),
        ("2025-03-02T00:00:00Z", T0),
        ("2025-03-02T01:00:00+01:00", T0),
        ("2025-03-02T00:00:00.250", T0 + 250_000_000),
        ("2025-03-02", T0),
        ("1740873600", T0),
        ("1740873600.000000001", T0 + 1),
    ],
)
def test_times_are_iso_8601_or_epoch_seconds(text: str, expected: int) -> None:
    assert parse_time(text) == expected


def test_a_bad_time_is_an_error() -> None:
    with pytest.raises(CsvError, match="'yesterday' is not a time"):
        parse_time("yesterday", "f.csv line 2: column 'time'")


def test_time_column_default_and_named(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("v,TimeStamp\n1,2025-03-02T00:00:00\n2,2025-03-02T00:00:05\n")
    table = CsvTable(path, ["v"])
    assert table.time_column == "TimeStamp"
    assert [r.origin_ns for r in table.rows()] == [T0, T0 + 5_000_000_000]
    untimed = tmp_path / "b.csv"
    untimed.write_text("v,when\n1,x\n2,y\n")
    assert [r.origin_ns for r in CsvTable(untimed, ["v"], period_ns=7).rows()] == [7, 14]
    with pytest.raises(CsvError, match="no time column 'at'"):
        CsvTable(untimed, ["v"], time_column="at")


def test_split_by_day_and_by_column_with_sanitized_names(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text(
        "time,room,v\n"
        "2025-03-01T23:00:00-02:00,Room 1/a,1\n"  # 2025-03-02 in UTC
        "2025-03-01T23:00:00Z,Room 1/a,2\n"
        "2025-03-02T10:00:00Z,café,3\n"
    )
    table = CsvTable(path, ["v"], optional=["room"])
    by_day = split_rows(table, "day")
    assert {k: [r.cells["v"] for r in v] for k, v in by_day.items()} == {
        "2025-03-02": ["1", "3"],
        "2025-03-01": ["2"],
    }
    by_room = split_rows(table, "column:room")
    assert list(by_room) == ["Room-1-a", "caf"]
    assert group_name("  a..b~c__d ") == "a..b~c__d"
    clash = tmp_path / "b.csv"
    clash.write_text("room,v\na b,1\na/b,2\n")
    with pytest.raises(CsvError, match="'a b' and 'a/b' give the same device name 'a-b'"):
        split_rows(CsvTable(clash, ["v"], optional=["room"]), "column:room")
    with pytest.raises(CsvError, match="needs a time column"):
        split_rows(CsvTable(clash, ["v"]), "day")


def test_profile_cells_bool_as_words_or_digits() -> None:
    assert [profile_cell("w", "b", t, "Bool") for t in ("true", "false", "1", "0")] == [
        True,
        False,
        True,
        False,
    ]
    assert profile_cell("w", "n", "17", "Int16") == 17
    with pytest.raises(CsvError, match=r"column 'b': .* \(the profile's valueType\)"):
        profile_cell("w", "b", "yes", "Bool")
