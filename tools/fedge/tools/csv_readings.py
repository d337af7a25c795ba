"""A building's CSV export as EdgeX readings: the reader ``fedge evaluate``, ``fedge train-local
--train`` and ``fedge edgex simulate --csv`` share.

**Header.** The first row names the columns (a UTF-8 byte order mark is allowed, names are
stripped). The columns a command needs must each appear exactly once; others are ignored.
Blank lines are skipped; a row with another number of fields than the header is an error.

**Cells.** A cell is the reading's EdgeX value text. With a profile every column is parsed by
its resource's ``valueType`` (a ``Bool`` as ``true``/``false`` or ``1``/``0``, Go's
``ParseBool``); for a task without one, a feature or a regression label is a number
(``true``/``false`` count as 1 and 0), and a class label is a class name,
``true``/``false``/``1``/``0`` for a Bool-like pair of classes, or a class index. An empty cell
is a missing reading (a device drops its row as ``incomplete``).

**Time.** ``time_column`` names the column holding each row's instant; by default the first
column named ``time``, ``timestamp``, ``date`` or ``datetime`` (any case) is used if there is
one. A time is ISO 8601 (``2025-03-01T08:00:00``, ``2025-03-01 08:00:00.250+01:00``,
``...Z``, a bare date) or epoch seconds (a plain number, ``1740816000.25``). **A time without a
zone is UTC.** The row's readings get that instant as their origin (Unix nanoseconds). Rows
should be in time order: a device drops a reading more than its reorder window (1 s) behind the
newest one as ``late``. Without a time column rows are one sample period apart, in file order.

**Splitting** (``split_by``): ``"day"`` groups rows by the UTC date of their time (it needs a
time column), ``"column:NAME"`` by the distinct values of column ``NAME``. Groups keep the order
in which they first appear. A group's name becomes an EdgeX device-name suffix, so it is
sanitized: every run of characters other than ASCII letters, digits and ``_ ~ . -`` (RFC 3986's
unreserved characters, the ones EdgeX's name rule allows) becomes one ``-``, and leading and
trailing ``-`` are removed. Two values that give the same name, an empty value, or one that
leaves nothing are errors.

The header, time and cell rules are :mod:`fedge.agent.csv_format`'s, which a device reading its
own CSV (``[data] source = "csv"``) shares; this module adds what only the CLI needs (the whole
table, splitting into groups, the readings of a task). No TensorFlow, no numpy at the top level:
the standard library and ``fedge.protocol`` only; the agent's reading types are imported when
readings are built.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedge.agent.csv_format import (
    MAX_FIELD_CHARS,
    TIME_COLUMNS,
    CsvError,
    find_time_column,
    parse_time,
    profile_cell,
    read_header,
    task_cell,
    task_columns,
)
from fedge.protocol.task import TaskSpec

if TYPE_CHECKING:
    from fedge.agent.edgex.profile import DeviceProfile
    from fedge.agent.edgex.readings import Reading

__all__ = [
    "CSV_DEVICE",
    "DEFAULT_PERIOD_NS",
    "MAX_FIELD_CHARS",
    "TIME_COLUMNS",
    "CsvError",
    "CsvRow",
    "CsvTable",
    "group_name",
    "parse_split_by",
    "parse_time",
    "profile_cell",
    "read_header",
    "split_rows",
    "task_cell",
    "task_columns",
    "task_readings",
    "task_table",
    "utc_day",
]

#: Row spacing without a time column when the task gives no ``sample_rate_hz``.
DEFAULT_PERIOD_NS = 1_000_000_000
#: The device name readings built for a task carry when no other is given.
CSV_DEVICE = "csv"

_NOT_UNRESERVED = re.compile(r"[^A-Za-z0-9_~.\-]+")


@dataclass(frozen=True)
class CsvRow:
    """One data row: its line in the file, its instant (Unix ns) and the cells asked for."""

    line: int
    origin_ns: int
    cells: dict[str, str]


class CsvTable:
    """A CSV file's header, its time column, and its data rows (read lazily, as often as asked).

    ``required`` columns must each appear once; ``optional`` ones are read when present.
    """

    def __init__(
        self,
        path: Path,
        required: Sequence[str] = (),
        *,
        optional: Sequence[str] = (),
        time_column: str | None = None,
        period_ns: int = DEFAULT_PERIOD_NS,
        describe: Sequence[str] | None = None,
    ) -> None:
        self.path = path
        self.period_ns = period_ns
        self.header: list[str] = []
        with self._reader() as reader:
            self.header = read_header(path, reader, required, describe)
        if time_column is not None:
            if time_column not in self.header:
                raise CsvError(f"{path}: no time column {time_column!r} in the header")
            self.time_column: str | None = time_column
        else:
            self.time_column = find_time_column(self.header)
        if self.time_column is not None and self.header.count(self.time_column) > 1:
            raise CsvError(f"{path}: the time column {self.time_column!r} appears more than once")
        wanted = [*required, *(n for n in optional if n in self.header)]
        self.columns = [(name, self.header.index(name)) for name in dict.fromkeys(wanted)]

    def _reader(self) -> _Reader:
        return _Reader(self.path)

    def rows(self) -> Iterator[CsvRow]:
        """The data rows in file order (blank lines skipped)."""
        time_index = self.header.index(self.time_column) if self.time_column is not None else None
        width = len(self.header)
        with self._reader() as reader:
            next(reader, None)
            index = 0
            for fields in reader:
                if not fields or all(not cell.strip() for cell in fields):
                    continue
                where = f"{self.path} line {reader.line_num}"
                if len(fields) != width:
                    raise CsvError(f"{where}: {len(fields)} fields, the header has {width}")
                index += 1
                if time_index is None:
                    origin = index * self.period_ns
                else:
                    origin = parse_time(fields[time_index].strip(), f"{where}: column {self.time_column!r}")
                cells = {}
                for name, col in self.columns:
                    text = fields[col].strip()
                    if len(text) > MAX_FIELD_CHARS:
                        raise CsvError(f"{where}: column {name!r}: a value of {len(text)} characters")
                    cells[name] = text
                yield CsvRow(reader.line_num, origin, cells)

    def where(self, row: CsvRow) -> str:
        return f"{self.path} line {row.line}"


class _Reader:
    """``csv.reader`` over the file, every read problem one :class:`CsvError`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: Any = None

    def __enter__(self) -> _Reader:
        try:
            self._file = self.path.open(encoding="utf-8-sig", newline="")
        except OSError as exc:
            raise CsvError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        self._reader = csv.reader(self._file, strict=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    @property
    def line_num(self) -> int:
        return self._reader.line_num

    def __iter__(self) -> Iterator[list[str]]:
        return self

    def __next__(self) -> list[str]:
        try:
            return next(self._reader)
        except OSError as exc:
            raise CsvError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise CsvError(f"{self.path} is not UTF-8 text") from None
        except csv.Error as exc:
            raise CsvError(f"{self.path}: not valid CSV: {exc}") from None


# --- time ---------------------------------------------------------------------------------------


def utc_day(origin_ns: int) -> str:
    """The UTC date (``YYYY-MM-DD``) of an instant."""
    return datetime.fromtimestamp(origin_ns // 1_000_000_000, tz=UTC).date().isoformat()


# --- splitting ----------------------------------------------------------------------------------


def parse_split_by(text: str) -> str | None:
    """``"day"`` gives None; ``"column:NAME"`` gives NAME; anything else is an error."""
    if text == "day":
        return None
    if text.startswith("column:") and text[len("column:") :].strip():
        return text[len("column:") :].strip()
    raise CsvError(f"--split-by must be 'day' or 'column:NAME', not {text!r}")


def group_name(value: str) -> str:
    """``value`` as an EdgeX device-name suffix (module docstring, "Splitting")."""
    return _NOT_UNRESERVED.sub("-", value).strip("-")


def split_rows(table: CsvTable, split_by: str) -> dict[str, list[CsvRow]]:
    """The table's rows grouped by ``split_by`` (``"day"`` or ``"column:NAME"``), in order of
    first appearance; the column must be among the table's columns."""
    column = parse_split_by(split_by)
    if column is None and table.time_column is None:
        raise CsvError(
            f"{table.path}: --split-by day needs a time column ({', '.join(TIME_COLUMNS)}, "
            "or name it with --time-column)"
        )
    if column is not None and column not in table.header:
        raise CsvError(f"{table.path}: no column {column!r} to split by in the header")
    groups: dict[str, list[CsvRow]] = {}
    sources: dict[str, str] = {}
    for row in table.rows():
        value = utc_day(row.origin_ns) if column is None else row.cells[column]
        if not value:
            raise CsvError(f"{table.where(row)}: column {column!r} is empty: the row belongs to no group")
        name = group_name(value)
        if not name:
            raise CsvError(f"{table.where(row)}: {value!r} leaves no device name (letters, digits, _~.-)")
        if sources.setdefault(name, value) != value:
            raise CsvError(
                f"{table.path}: {sources[name]!r} and {value!r} give the same device name {name!r}"
            )
        groups.setdefault(name, []).append(row)
    if not groups:
        raise CsvError(f"{table.path}: no data rows")
    return groups


# --- cells and readings -------------------------------------------------------------------------


def task_table(path: Path, task: TaskSpec, period_ns: int, time_column: str | None = None) -> CsvTable:
    """The table of a task's columns: its features and its label."""
    required = [*task.features.resources, task.label.resource]
    return CsvTable(
        path, required, time_column=time_column, period_ns=period_ns, describe=task_columns(required)
    )


def task_readings(
    path: Path,
    task: TaskSpec,
    profile: DeviceProfile | None,
    period_ns: int,
    time_column: str | None = None,
    device: str = CSV_DEVICE,
) -> Iterator[list[Reading]]:
    """Each data row's readings of the task's columns (a missing cell gives none)."""
    from fedge.agent.edgex.readings import Reading  # noqa: PLC0415

    table = task_table(path, task, period_ns, time_column)
    value_types = {r.name: r.value_type for r in profile.resources} if profile is not None else {}
    profile_name = profile.name if profile is not None else ""
    for row in table.rows():
        where = table.where(row)
        readings: list[Reading] = []
        for name, text in row.cells.items():
            if not text:
                continue
            value_type, value = task_cell(where, name, text, task, value_types.get(name))
            readings.append(Reading(device, name, profile_name, value_type, value, row.origin_ns))
        yield readings
