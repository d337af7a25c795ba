"""The CSV readings format fedge documents for a building's own data (``docs/own-data.md``), as
far as a device needs it: the header, the time column, and the typing of a cell.

A device reading its logger's CSV (``[data] source = "csv"``, :mod:`fedge.agent.csv_source`) and
the CLI's commands on a CSV export (``fedge evaluate``, ``fedge train-local``, ``fedge edgex
simulate --csv``, :mod:`fedge.tools.csv_readings`) read the same format through these
functions, so a row means the same reading on a device as on the operator's laptop. It lives
in the agent so that a device install needs neither ``tools/`` nor ``lab/``.

**Header.** The first row names the columns (a UTF-8 byte order mark is allowed, names are
stripped). The columns a task needs must each appear exactly once; others are ignored.

**Cells.** A cell is the reading's EdgeX value text. With a profile every column is parsed by
its resource's ``valueType`` (a ``Bool`` as ``true``/``false`` or ``1``/``0``, Go's
``ParseBool``); for a task without one, a feature or a regression label is a number
(``true``/``false`` count as 1 and 0), and a class label is a class name,
``true``/``false``/``1``/``0`` for a Bool-like pair of classes, or a class index. An empty cell
is a missing reading (its row is dropped as ``incomplete``).

**Time.** A column named ``time``, ``timestamp``, ``date`` or ``datetime`` (any case; the first
one) unless another is named. A time is ISO 8601 (``2025-03-01T08:00:00``, ``2025-03-01
08:00:00.250+01:00``, ``...Z``, a bare date) or epoch seconds (``1740816000.25``). **A time
without a zone is UTC.** It becomes the row's readings' origin (Unix nanoseconds).

Standard library and ``fedge.protocol`` at the top level; the reading types are imported when
a cell is typed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING

from fedge.protocol.errors import FedgeError
from fedge.protocol.task import TaskSpec

if TYPE_CHECKING:
    from fedge.agent.edgex.readings import Value

#: Columns taken as the time column when none is named (compared case-insensitively).
TIME_COLUMNS = ("time", "timestamp", "date", "datetime")
#: A CSV field longer than this is not a reading (csv's own default limit is 128 KiB).
MAX_FIELD_CHARS = 4096

_EPOCH = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class CsvError(FedgeError):
    """The CSV cannot be read as readings; the message names the file (and line) and why."""


def read_header(
    path: Path, reader: Iterator[list[str]], required: Sequence[str], describe: Sequence[str] | None = None
) -> list[str]:
    """The header's names; each of ``required`` once. ``describe`` lists the columns in the
    error when one is missing (default: ``required``)."""
    return check_header(path, next(reader, []), required, describe)


def check_header(
    path: Path, fields: Sequence[str], required: Sequence[str], describe: Sequence[str] | None = None
) -> list[str]:
    """The header row's names (stripped); each of ``required`` once (see :func:`read_header`)."""
    listing = ", ".join(describe if describe is not None else required)
    header = [name.strip() for name in fields]
    if not any(header):
        raise CsvError(f"{path}: no header row (it names the columns: {', '.join(required) or listing})")
    for name in required:
        if header.count(name) > 1:
            raise CsvError(f"{path}: column {name!r} appears {header.count(name)} times in the header")
    missing = [name for name in required if name not in header]
    if missing:
        listed = ", ".join(repr(m) for m in missing)
        needs = f"the task reads {listing}" if describe is not None else f"it needs {listing}"
        raise CsvError(f"{path}: no column {listed} in the header; {needs}")
    return header


def find_time_column(header: Sequence[str]) -> str | None:
    """The first column named like a time (:data:`TIME_COLUMNS`, any case), or None."""
    return next((n for n in header if n.casefold() in TIME_COLUMNS), None)


def task_columns(required: Sequence[str]) -> list[str]:
    """The columns a task's CSV needs: its features, then ``label`` marked as such."""
    return [*required[:-1], f"{required[-1]} (label)"]


def parse_time(text: str, where: str = "time") -> int:
    """Unix nanoseconds of an ISO 8601 time (no zone: UTC) or of epoch seconds."""
    if not text:
        raise CsvError(f"{where}: no time")
    if _EPOCH.fullmatch(text):
        try:
            ns = int((Decimal(text) * 1_000_000_000).to_integral_value())
        except InvalidOperation:
            raise CsvError(f"{where}: {text!r} is not a time") from None
    else:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise CsvError(
                f"{where}: {text!r} is not a time (ISO 8601, e.g. 2025-03-01T08:00:00Z, or epoch seconds)"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        delta = moment - _UNIX_EPOCH
        ns = (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000
    if not -(2**63) <= ns < 2**63:
        raise CsvError(f"{where}: {text!r} is out of range")
    return ns


def profile_cell(where: str, name: str, text: str, value_type: str) -> Value:
    """A cell parsed by the profile's ``valueType``, as EdgeX sends it."""
    from fedge.agent.edgex.readings import ReadingError, parse_value  # noqa: PLC0415

    try:
        return parse_value(value_type, text)
    except ReadingError as exc:
        detail = str(exc).removeprefix(f"{exc.reason}: ")
        raise CsvError(f"{where}: column {name!r}: {detail} (the profile's valueType)") from None


def task_cell(where: str, name: str, text: str, task: TaskSpec, value_type: str | None) -> tuple[str, Value]:
    """The EdgeX value type and value of one cell of a task's column (module docstring)."""
    from fedge.agent.edgex.readings import ReadingError, parse_scalar  # noqa: PLC0415
    from fedge.agent.edgex.samples import bool_class_indices, bool_value  # noqa: PLC0415

    if len(text) > MAX_FIELD_CHARS:
        raise CsvError(f"{where}: column {name!r}: a value of {len(text)} characters")
    if value_type is not None:
        return value_type, profile_cell(where, name, text, value_type)
    classes = task.label.classes
    if name == task.label.resource and classes is not None:
        if text in classes:
            return "String", text
        flag = bool_value(text)
        if flag is not None and bool_class_indices(classes) is not None:
            return "Bool", flag
        if text.isascii() and text.lstrip("+-").isdigit():
            return "Int64", int(text)
        return "String", text  # not a class: the builder drops its row (unknown_label)
    flag = bool_value(text) if text.casefold() in ("true", "false") else None
    if flag is not None:
        return "Bool", flag
    try:
        return "Float64", parse_scalar("Float64", text)
    except ReadingError:
        raise CsvError(f"{where}: column {name!r}: {text!r} is not a number") from None
