"""From one device's stream of EdgeX readings to labelled training samples, as a task spec says.

Live readings are messier than a recorded data set: the message bus redelivers, a core-data
backfill overlaps the live stream, events arrive a little out of order, a sensor reports NaN or
a value its own profile says is impossible, a device drops out for a minute. Each of those
would silently bend the model on every device of a building, so :class:`SampleBuilder` applies
one documented policy (``docs/data-quality.md``) and counts every decision by reason in a
:class:`QualityReport`, instead of guessing quietly.

Stages, all streaming and pure (no I/O, no clock: time is the readings' own ``origin``):

1. *Screen* each reading: foreign device or resource (``ignored``), already seen
   (``duplicate``), too old to place (``late``), not a number (``not_numeric``), NaN or
   infinity (``not_finite``), outside the profile's limits (``out_of_range``).
2. *Reorder*: a reading waits in a buffer until no earlier reading can still arrive, i.e.
   until it is older than ``reorder_window_ns`` behind the newest origin seen, so events that
   arrive a little out of order (``reordered``) give exactly the samples in-order arrival gives.
3. *Align* readings into rows, one row per instant: every feature resource and the label,
   origins within ``align_tolerance_ns`` of the row's first. A row missing any of them is
   dropped (``incomplete``); a row whose label is not a class is dropped (``unknown_label``).
   A class label is a class name (String), a class index (integer) or a Bool, mapped to
   classes by :func:`bool_class_indices`; a Bool feature is 0.0 or 1.0.
4. *Window* rows with :func:`fedge.agent.features.extract_features` and label them with
   :func:`fedge.agent.features.window_labels`, exactly as on a recorded contiguous block; windows
   never span a time gap over ``max_gap_ns`` (``gap``).

An unlabelled builder (``labelled=False``) is the same pipeline for live prediction windows:
it reads the feature resources only (a label reading is ``ignored``), a row with every feature
is complete, and its samples carry ``label`` NaN; the windows and features are those of the
labelled builder on the same rows.

Memory is bounded whatever the stream's length: the reorder buffer (by time, and by count
with ``max_pending``), the duplicate-key memory (``recent_keys``) and the rows of the current,
incomplete window.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from itertools import compress, islice, repeat
from operator import add, attrgetter, itemgetter, le, lt, mul, ne
from typing import NamedTuple

import numpy as np

from fedge.agent.edgex.readings import INT_RANGES, Reading, ReadingError, Value
from fedge.agent.edgex.recent_keys import RecentKeys
from fedge.agent.features import extract_features, window_count, window_labels
from fedge.protocol.errors import FedgeError
from fedge.protocol.task import TaskSpec

#: How far (ns) behind the newest origin a reading may arrive and still be placed. One second
#: covers the bus's redelivery and batching jitter, and costs one second of latency.
DEFAULT_REORDER_WINDOW_NS = 1_000_000_000
#: Readings the reorder buffer holds at most; beyond, the oldest rows are closed early
#: (``overflow``), so a flood of distinct timestamps cannot exhaust a gateway's memory.
DEFAULT_MAX_PENDING = 16_384
#: Keys (resource, origin) of already placed readings remembered to recognise redeliveries.
DEFAULT_RECENT_KEYS = 16_384
#: Default gap, in sample periods, beyond which windows are split.
GAP_PERIODS = 3
#: Default alignment tolerance is this fraction of a sample period.
ALIGN_FRACTION = 0.25

#: Reasons counted per reading; every reading gets exactly one of these or is ``accepted``.
READING_REASONS: tuple[str, ...] = (
    "ignored",
    "duplicate",
    "late",
    "not_numeric",
    "not_finite",
    "out_of_range",
)
#: Reasons counted per row (an aligned instant); a row is either kept (``rows``) or one of these.
ROW_REASONS: tuple[str, ...] = ("incomplete", "unknown_label")
#: Class names that name a Bool label's two values, as (false, true); matched ignoring case.
BOOL_CLASS_NAMES: tuple[tuple[str, str], ...] = (("false", "true"), ("0", "1"))
_BOOL_NAMES = frozenset(name for pair in BOOL_CLASS_NAMES for name in pair)
#: How a Bool reading's value may arrive: a bool (EdgeX's "true"/"false", parsed), or, from a
#: hand-made or replayed reading, the text or number itself. Text is matched ignoring case.
_BOOL_VALUES: dict[str, bool] = {"true": True, "false": False, "1": True, "0": False}


def bool_class_indices(classes: Sequence[str]) -> tuple[int, int] | None:
    """The class indices of a Bool label's ``false`` and ``true``, or None if ``classes`` cannot
    label a Bool.

    A Bool label needs exactly two classes. If they name the two values (``["false", "true"]``
    or ``["0", "1"]``, in any order and any letter case), each value is the class that names it,
    as a String label matches its class by name. If neither class names a value
    (``["vacant", "occupied"]``), false is the first class and true the second, as an integer
    label 0 or 1 is a class index. Classes naming one value but not the other
    (``["true", "yes"]``) or mixing spellings (``["0", "true"]``) are refused: they would mean
    one thing by name and another by position.
    """
    if len(classes) != 2:
        return None
    folded = [name.casefold() for name in classes]
    for false_name, true_name in BOOL_CLASS_NAMES:
        if sorted(folded) == sorted((false_name, true_name)):
            return folded.index(false_name), folded.index(true_name)
    if _BOOL_NAMES.intersection(folded):
        return None
    return 0, 1


def bool_value(value: Value) -> bool | None:
    """A Bool reading's value as a bool: True/False, "true"/"false" in any case, 1/0; else None."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return value == 1
    if isinstance(value, str):
        return _BOOL_VALUES.get(value.strip().casefold())
    return None


class SampleError(FedgeError):
    """A sample builder's configuration is invalid (limits, windows, tolerances)."""


@dataclass(frozen=True, eq=False)
class Sample:
    """One training sample: a feature vector, its label, and the origins it spans.

    ``start_ns`` and ``end_ns`` are the origins of the first and last row of the window (the
    same row without a window); ``end_ns`` identifies the sample within a task's stream.
    """

    features: np.ndarray
    label: int | float
    start_ns: int
    end_ns: int


@dataclass
class QualityReport:
    """What the builder did with every reading and row, counted since it was created.

    Reading counts: ``readings == accepted + ignored + duplicate + late + not_numeric +
    not_finite + out_of_range``; ``reordered`` counts accepted readings that arrived after a
    newer one. Row counts: every aligned row is kept (``rows``) or dropped as ``incomplete`` or
    ``unknown_label``. ``gap`` counts splits between consecutive kept rows, ``overflow`` rows
    closed early because the reorder buffer was full, ``samples`` samples emitted.
    """

    readings: int = 0
    accepted: int = 0
    reordered: int = 0
    ignored: int = 0
    duplicate: int = 0
    late: int = 0
    not_numeric: int = 0
    not_finite: int = 0
    out_of_range: int = 0
    rows: int = 0
    incomplete: int = 0
    unknown_label: int = 0
    gap: int = 0
    overflow: int = 0
    samples: int = 0

    def to_dict(self) -> dict[str, int]:
        """The counters as a flat, JSON-ready dict (for logs and the agent's status)."""
        return asdict(self)


class _Row(NamedTuple):
    origin: int
    values: list[float]
    label: float


# A pending reading: (origin, column, value). Column ``len(resources)`` is the label; a value
# of None marks a label that is not a class, kept so that its row is counted once, as such.
_Pending = tuple[int, int, float | None]
_DEVICE = attrgetter("device")
_RESOURCE = attrgetter("resource")
_ORIGIN = attrgetter("origin_ns")
_VALUE_TYPE = attrgetter("value_type")
_VALUE = attrgetter("value")
_FLOAT_TYPES = frozenset(("Float32", "Float64"))
_FIRST = itemgetter(0)
_SECOND = itemgetter(1)
_THIRD = itemgetter(2)
_new_row = tuple.__new__


class SampleBuilder:
    """Turns one device's readings into samples for ``task``; see the module docstring.

    ``limits`` maps a resource to its profile's ``(minimum, maximum)`` (either may be None);
    limits of resources the task does not use are ignored. ``device`` names the device; if
    None, the builder binds to the device of the first reading it sees. ``labelled=False``:
    prediction windows from the features alone (see the module docstring).
    """

    def __init__(
        self,
        task: TaskSpec,
        limits: Mapping[str, tuple[float | None, float | None]] | None = None,
        *,
        device: str | None = None,
        align_tolerance_ns: int | None = None,
        reorder_window_ns: int = DEFAULT_REORDER_WINDOW_NS,
        max_gap_ns: int | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        recent_keys: int = DEFAULT_RECENT_KEYS,
        labelled: bool = True,
    ) -> None:
        self.task = task
        self.labelled = labelled
        spec = task.features
        self._n_features = len(spec.resources)
        self._label_col = self._n_features
        self._columns: dict[str, int] = {name: i for i, name in enumerate(spec.resources)}
        if labelled:
            self._columns[task.label.resource] = self._label_col
        self._classes: dict[str, int] | None = (
            {name: i for i, name in enumerate(task.label.classes)} if task.label.classes is not None else None
        )
        #: Class indices of a Bool label's false and true (None: a Bool label is no class).
        self._bool_classes = (
            bool_class_indices(task.label.classes) if task.label.classes is not None else None
        )
        self._limits = _check_limits(limits)
        # The limits of each column as float arrays (no limit: infinity), for the batch path;
        # None when a limit is not exactly a float64 (then comparisons in numpy could differ).
        self._bounds: tuple[np.ndarray, np.ndarray] | None = None
        lows = [self._limits.get(name, (None, None))[0] for name in spec.resources]
        highs = [self._limits.get(name, (None, None))[1] for name in spec.resources]
        if labelled:
            lows.append(self._limits.get(task.label.resource, (None, None))[0])
            highs.append(self._limits.get(task.label.resource, (None, None))[1])
        if all(b is None or float(b) == b for b in lows + highs):
            self._bounds = (
                np.array([-math.inf if b is None else float(b) for b in lows]),
                np.array([math.inf if b is None else float(b) for b in highs]),
            )
        #: (origin, column) as one int, ``origin * stride + column``: the keys of the duplicate
        #: checks, a third of the memory of a tuple of two ints.
        self._stride = self._n_features + 1
        #: The columns of a whole row, in order: the features, and the label when labelled.
        self._row_columns = list(range(self._stride if labelled else self._n_features))

        #: Nanoseconds between rows, from ``sample_rate_hz``; None if the task gives no rate.
        self.period_ns: float | None = 1e9 / spec.sample_rate_hz if spec.sample_rate_hz else None
        if align_tolerance_ns is None:
            align_tolerance_ns = round(self.period_ns * ALIGN_FRACTION) if self.period_ns else 0
        if max_gap_ns is None and self.period_ns is not None:
            max_gap_ns = round(self.period_ns * GAP_PERIODS)
        self.align_tolerance_ns = _check_int("align_tolerance_ns", align_tolerance_ns, lo=0)
        self.reorder_window_ns = _check_int("reorder_window_ns", reorder_window_ns, lo=0)
        self.max_gap_ns = None if max_gap_ns is None else _check_int("max_gap_ns", max_gap_ns, lo=1)
        self.max_pending = _check_int("max_pending", max_pending, lo=1)
        self.recent_keys = _check_int("recent_keys", recent_keys, lo=0)
        if device is not None and (not isinstance(device, str) or not device):
            raise SampleError(f"sample builder: device must be a non-empty string, got {device!r}")
        self.device = device

        self._quality = QualityReport()
        self._max_seen: int | None = None  # newest origin seen: drives the reorder window
        self._floor: int | None = None  # readings at or before this origin belong to closed rows
        self._pending: list[_Pending] = []  # heap ordered by (origin, column)
        #: The heap is sorted too (a sorted list is a heap): rows close as slices of it.
        self._sorted = True
        self._pending_keys: set[int] = set()
        # The last ``recent_keys`` placed keys: an OrderedDict of tuples held ~3 MB per builder,
        # a set of ints with a deque ~2.9 MB, column masks per origin ~0.3 MB.
        self._recent = RecentKeys(self.recent_keys)
        self._last_row_ns: int | None = None
        self._window_rows: list[_Row] = []  # rows of the window being filled
        self._skip = 0  # rows to skip before the next window starts (step > size)

    # --- public API ----------------------------------------------------------------------

    def add(self, readings: Iterable[Reading]) -> list[Sample]:
        """Takes readings in arrival order; returns the samples they complete (maybe none)."""
        batch = readings if isinstance(readings, list) else list(readings)
        rows: list[_Row] = []
        if not self._add_in_order(batch, rows):
            for reading in batch:
                self._quality.readings += 1
                self._take(reading, rows)
        return self._emit(rows)

    def _add_in_order(self, batch: list[Reading], rows: list[_Row]) -> bool:
        """The common batch at once, or False (nothing changed) for :meth:`_take`, one by one.

        Common: every reading of this device and task is new (origins in order, after every
        origin seen and every closed row), has a float value within its limits (a class
        label: any value) and fits the reorder buffer. Then :meth:`_take` would count each
        ``accepted`` (none ``reordered``), push it and close the rows the watermark passes;
        closing them once, after the last push, closes the same rows with the same readings
        (a row closes only once every reading that could join it is older than the newest), so
        the counters, rows and samples are the same, for a fraction of the work per reading.
        Foreign devices and resources are ``ignored`` whatever else a batch holds.
        """
        n = len(batch)
        if n == 0:
            return True
        device = self.device if self.device is not None else batch[0].device
        found = list(map(self._columns.get, map(_RESOURCE, batch)))
        kept = batch
        columns: list[int] = found  # type: ignore[assignment]  # no None: checked next
        if None in found or list(map(_DEVICE, batch)).count(device) != n:
            mine = [(r, c) for r, c in zip(batch, found, strict=True) if c is not None and r.device == device]
            kept = [r for r, _ in mine]
            columns = [c for _, c in mine]
        m = len(kept)
        if not m:  # nothing but ignored readings: they change nothing else
            self.device = device
            self._quality.readings += n
            self._quality.ignored += n
            return True
        origins = list(map(_ORIGIN, kept))
        first = origins[0]
        if (
            (self._max_seen is not None and first <= self._max_seen)
            or (self._floor is not None and first <= self._floor)
            or len(self._pending) + m > self.max_pending
            or set(map(type, origins)) != {int}
            or not all(map(le, origins, islice(origins, 1, None)))
        ):
            return False
        keys = list(map(add, map(mul, origins, repeat(self._stride)), columns))
        if len(set(keys)) != m:
            return False
        values = self._batch_values(kept, columns)
        if values is None:
            return False
        q = self._quality
        self.device = device
        q.readings += n
        q.ignored += n - m
        q.accepted += m
        entries = list(zip(origins, columns, values, strict=True))
        if not all(map(le, keys, islice(keys, 1, None))):
            entries.sort(key=lambda e: (e[0], e[1]))
        # Each entry sorts after everything pending (its origin is newer): still a heap.
        self._pending.extend(entries)
        self._pending_keys.update(keys)
        self._max_seen = origins[-1]
        self._close_ready_rows(rows)
        return True

    def _batch_values(self, kept: list[Reading], columns: list[int]) -> list[float | None] | None:
        """Every reading's value as :meth:`_value` gives it, or None when one would be dropped
        (or is not a plain float: :meth:`_value` judges those)."""
        values: list[float | None] = list(map(_VALUE, kept))
        if self.labelled and self._classes is not None:
            is_feature = list(map(ne, columns, repeat(self._label_col)))
            numeric = list(compress(values, is_feature))
            numeric_types = set(compress(map(_VALUE_TYPE, kept), is_feature))
            numeric_columns = list(compress(columns, is_feature))
        else:
            is_feature = None
            numeric = values
            numeric_types = set(map(_VALUE_TYPE, kept))
            numeric_columns = columns
        if numeric:
            if (
                self._bounds is None
                or not numeric_types <= _FLOAT_TYPES
                or set(map(type, numeric)) != {float}
            ):
                return None
            arr = np.array(numeric, dtype=np.float64)
            lo, hi = self._bounds
            at = np.array(numeric_columns)
            # NaN fails both comparisons; infinity is outside (-inf, inf) bounds or beyond a limit.
            if not (np.isfinite(arr).all() and (arr >= lo[at]).all() and (arr <= hi[at]).all()):
                return None
        if is_feature is not None:
            labels = iter([self._class_index(r) for r, f in zip(kept, is_feature, strict=True) if not f])
            values = [v if f else next(labels) for v, f in zip(values, is_feature, strict=True)]
        return values

    def flush(self) -> list[Sample]:
        """Closes every row still waiting for stragglers and returns the samples they complete.

        For shutdown or before training. Readings at or before the last row closed here are
        ``late`` afterwards; a partly filled window stays and continues with later rows.
        """
        rows: list[_Row] = []
        while self._pending:
            self._close_row(rows)
        return self._emit(rows)

    @property
    def quality(self) -> QualityReport:
        """A snapshot of the counters (they persist across :meth:`add` and :meth:`flush`)."""
        return replace(self._quality)

    @property
    def buffered(self) -> dict[str, int]:
        """Sizes of the internal buffers, to show (and test) that memory stays bounded."""
        return {
            "pending": len(self._pending),
            "pending_keys": len(self._pending_keys),
            "recent_keys": len(self._recent),
            "window_rows": len(self._window_rows),
        }

    # --- screening and reordering --------------------------------------------------------

    def _take(self, reading: Reading, rows: list[_Row]) -> None:
        q = self._quality
        if self.device is None:
            self.device = reading.device
        column = self._columns.get(reading.resource)
        if reading.device != self.device or column is None:
            q.ignored += 1
            return
        origin = reading.origin_ns
        key = origin * self._stride + column
        if key in self._pending_keys or self._recent.has(origin, column):
            q.duplicate += 1
            return
        if self._is_late(origin):
            q.late += 1
            return
        value, reason = self._value(reading, column)
        # From here the reading counts as seen: its origin moves the reorder window, and a
        # redelivery of it is a duplicate, whether or not its value was usable.
        reordered = self._max_seen is not None and origin < self._max_seen
        if self._max_seen is None or origin > self._max_seen:
            self._max_seen = origin
        if reason is not None:
            setattr(q, reason, getattr(q, reason) + 1)
            self._recent.add(origin, column)
        else:
            q.accepted += 1
            q.reordered += reordered
            pending = self._pending
            if self._sorted and pending:
                last = pending[-1]
                # Pushed after the last entry, a sorted heap stays sorted; before it, not.
                self._sorted = origin > last[0] or (origin == last[0] and column > last[1])
            heapq.heappush(pending, (origin, column, value))
            self._pending_keys.add(key)
        self._close_ready_rows(rows)

    def _is_late(self, origin: int) -> bool:
        if self._max_seen is not None and origin < self._max_seen - self.reorder_window_ns:
            return True
        return self._floor is not None and origin <= self._floor

    def _value(self, reading: Reading, column: int) -> tuple[float | None, str | None]:
        """The reading's usable value, or the reason it is dropped.

        A classification label yields its class index, or None (not a reason) for a value that
        is not a class: that drops the row, counted once as ``unknown_label``. A Bool feature or
        regression label is 0.0 or 1.0.
        """
        if column == self._label_col and self._classes is not None:
            return self._class_index(reading), None
        try:
            if reading.value_type == "Bool" and reading.value is not None:
                flag = bool_value(reading.value)
                if flag is None:
                    return None, "not_numeric"
                value = float(flag)
            else:
                value = reading.as_float()
        except (ReadingError, TypeError, ValueError):
            return None, "not_numeric"
        except OverflowError:  # an integer beyond float range
            return None, "not_finite"
        if not math.isfinite(value):
            return None, "not_finite"
        lo, hi = self._limits.get(reading.resource, (None, None))
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            return None, "out_of_range"
        return value, None

    def _class_index(self, reading: Reading) -> float | None:
        assert self._classes is not None
        value = reading.value
        if reading.value_type == "String" and isinstance(value, str):
            index = self._classes.get(value)
            return None if index is None else float(index)
        if reading.value_type == "Bool":
            flag = bool_value(value)
            if flag is None or self._bool_classes is None:
                return None
            return float(self._bool_classes[1 if flag else 0])
        if (
            reading.value_type in INT_RANGES
            and isinstance(value, int)
            and not isinstance(value, bool)
            and 0 <= value < len(self._classes)
        ):
            return float(value)
        return None

    # --- alignment -----------------------------------------------------------------------

    def _close_ready_rows(self, rows: list[_Row]) -> None:
        """Closes rows no reading can join any more; closes the oldest early when over capacity."""
        pending = self._pending
        if pending and len(pending) <= self.max_pending:
            assert self._max_seen is not None
            watermark = self._max_seen - self.reorder_window_ns
            if pending[0][0] + self.align_tolerance_ns >= watermark:
                return
            if not self._sorted:
                pending.sort()  # still a heap; keys are unique, so values are never compared
                self._sorted = True
            self._close_sorted(rows, watermark)
            return
        while self._pending:
            over = len(self._pending) > self.max_pending
            if not over:
                assert self._max_seen is not None
                watermark = self._max_seen - self.reorder_window_ns
                # Readings before the watermark are late, so a row whose whole tolerance lies
                # before it is final.
                if self._pending[0][0] + self.align_tolerance_ns >= watermark:
                    return
            else:
                self._quality.overflow += 1
            self._close_row(rows)

    def _close_sorted(self, rows: list[_Row], watermark: int) -> None:
        """:meth:`_close_row` while the watermark has passed the first row, on a sorted heap:
        each row is a slice at its front (the entries heap pops would give, in that order)."""
        pending = self._pending
        tolerance = self.align_tolerance_ns
        end = len(pending)
        whole = i = self._close_whole_rows(rows, watermark)
        floor = self._floor
        while i < end and pending[i][0] + tolerance < watermark:
            origin = pending[i][0]
            limit = origin + tolerance
            row = pending[i : bisect_right(pending, limit, i, end, key=_FIRST)]
            values = {column: value for _, column, value in row}
            if len(values) < len(row):  # a resource repeating: the row ends before its second
                values = {}
                for _, column, value in row:
                    if column in values:
                        break
                    values[column] = value
            i += len(values)
            floor = limit if floor is None else max(floor, limit)
            self._floor = floor
            self._finish_row(origin, values, rows)
        stride = self._stride
        closed = pending[:i]
        del pending[:i]
        self._pending_keys.difference_update([when * stride + column for when, column, _ in closed])
        # Closed keys were pending, so never remembered: remembered now in the order heap pops
        # would give them (whole rows: one group each).
        if whole:
            width = len(self._row_columns)
            self._recent.add_rows(list(map(_FIRST, closed[0:whole:width])), width)
        if i > whole:
            self._recent.add_entries(closed[whole:])

    def _close_whole_rows(self, rows: list[_Row], watermark: int) -> int:
        """The rows to close at once when they are whole (the common stream: each row's readings
        share one origin, every column once, in column order, rows more than the tolerance
        apart, no unknown label), as :meth:`_close_sorted` would close them; returns how many
        entries it closed (0: it closed nothing, the row-by-row loop does it)."""
        pending = self._pending
        tolerance = self.align_tolerance_ns
        width = len(self._row_columns)
        end = bisect_left(pending, watermark - tolerance, key=_FIRST)  # rows the watermark passed
        if end == 0 or end % width:
            return 0
        closing = pending[:end]
        if list(map(_SECOND, closing)) != self._row_columns * (end // width):
            return 0
        origins = list(map(_FIRST, closing))
        firsts = origins[::width]
        if (
            firsts != origins[width - 1 :: width]  # sorted: first == last, the whole row the same
            or not all(map(lt, map(add, firsts, repeat(tolerance)), islice(firsts, 1, None)))
            or (end < len(pending) and pending[end][0] <= firsts[-1] + tolerance)
        ):
            return 0
        values = list(map(_THIRD, closing))
        n = self._n_features
        labels: Iterable[float | None] = values[n::width] if self.labelled else repeat(math.nan)
        if self.labelled and None in labels:
            return 0
        features = [values[i : i + n] for i in range(0, end, width)]
        rows.extend(
            map(_new_row, repeat(_Row), zip(firsts, features, labels, strict=False))
        )  # labels may repeat
        self._quality.rows += len(firsts)
        limit = firsts[-1] + tolerance
        self._floor = limit if self._floor is None else max(self._floor, limit)
        return end

    def _close_row(self, rows: list[_Row]) -> None:
        """Pops the earliest row: readings within the tolerance of its first, no resource twice.

        A resource repeating within the tolerance (data faster than the task's rate) starts the
        next row, so the grouping depends only on the set of readings, not on arrival order.
        """
        pending = self._pending
        origin = pending[0][0]
        limit = origin + self.align_tolerance_ns
        values: dict[int, float | None] = {}
        stride = self._stride
        while pending and pending[0][0] <= limit and pending[0][1] not in values:
            when, column, value = heapq.heappop(pending)
            key = when * stride + column
            self._pending_keys.discard(key)
            self._recent.add(when, column)
            values[column] = value
        self._sorted = not pending  # popping reorders the rest
        self._floor = limit if self._floor is None else max(self._floor, limit)
        self._finish_row(origin, values, rows)

    def _finish_row(self, origin: int, values: dict[int, float | None], rows: list[_Row]) -> None:
        """A closed row: kept (``rows``) or counted as incomplete or of an unknown label."""
        q = self._quality
        if not self.labelled:
            if len(values) < self._n_features:  # the features alone
                q.incomplete += 1
                return
            values[self._label_col] = math.nan
        elif len(values) <= self._n_features:  # features plus label: n_features + 1 columns
            q.incomplete += 1
            return
        label = values[self._label_col]
        if label is None:
            q.unknown_label += 1
            return
        features: list[float] = []
        for column in range(self._n_features):
            value = values[column]
            assert value is not None  # only a label can be None
            features.append(value)
        rows.append(_Row(origin, features, label))
        q.rows += 1

    # --- windowing -----------------------------------------------------------------------

    def _emit(self, rows: list[_Row]) -> list[Sample]:
        samples: list[Sample] = []
        segment: list[_Row] = []
        for row in rows:
            if (
                self._last_row_ns is not None
                and self.max_gap_ns is not None
                and row.origin - self._last_row_ns > self.max_gap_ns
            ):
                self._quality.gap += 1
                samples += self._windows(segment)
                segment = []
                self._window_rows = []
                self._skip = 0
            self._last_row_ns = row.origin
            segment.append(row)
        samples += self._windows(segment)
        self._quality.samples += len(samples)
        return samples

    def _windows(self, new_rows: list[_Row]) -> list[Sample]:
        """Samples from the current window's rows plus ``new_rows`` (one contiguous stretch).

        Each call hands :func:`extract_features` a block that starts on a window boundary, so
        the windows, and their floating-point results, are the ones a single call on the whole
        stretch would give.
        """
        if self._skip:
            dropped = min(self._skip, len(new_rows))
            new_rows = new_rows[dropped:]
            self._skip -= dropped
        block = self._window_rows + new_rows
        if not block:
            return []
        spec = self.task.features
        kind = self.task.model.kind
        window = spec.window
        n_samples = len(block) if window is None else window_count(len(block), window)
        if n_samples == 0:
            self._window_rows = block
            return []
        x = np.array([row.values for row in block], dtype=np.float64)
        features = extract_features(x, spec)
        if self.labelled:
            label_dtype = np.int64 if kind == "classification" else np.float64
            y = np.array([row.label for row in block], dtype=label_dtype)
            labels = window_labels(y, window, kind)
        else:
            labels = np.full(n_samples, np.nan)
        if window is None:
            size, step = 1, 1
        else:
            size, step = window.size, window.step
        consumed = n_samples * step
        self._window_rows = block[consumed:]
        self._skip = max(0, consumed - len(block))
        convert = int if kind == "classification" and self.labelled else float
        return [
            Sample(
                features=features[i].copy(),
                label=convert(labels[i]),
                start_ns=block[i * step].origin,
                end_ns=block[i * step + size - 1].origin,
            )
            for i in range(n_samples)
        ]


def _check_int(name: str, value: object, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise SampleError(f"sample builder: {name} must be an integer >= {lo}, got {value!r}")
    return value


def _check_limits(
    limits: Mapping[str, tuple[float | None, float | None]] | None,
) -> dict[str, tuple[float | None, float | None]]:
    """Validated limits: a typo'd bound would otherwise drop every reading as out of range."""
    checked: dict[str, tuple[float | None, float | None]] = {}
    for resource, pair in (limits or {}).items():
        if not isinstance(resource, str):
            raise SampleError(f"sample builder: limits keys are resource names, got {resource!r}")
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise SampleError(f"sample builder: limits[{resource!r}] must be (minimum, maximum)")
        bounds: list[float | None] = []
        for bound in pair:
            if bound is not None and (
                isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound)
            ):
                raise SampleError(
                    f"sample builder: limits[{resource!r}] bounds must be finite numbers or None, "
                    f"got {bound!r}"
                )
            bounds.append(bound)
        lo, hi = bounds
        if lo is not None and hi is not None and lo > hi:
            raise SampleError(f"sample builder: limits[{resource!r}] minimum {lo} exceeds maximum {hi}")
        checked[resource] = (lo, hi)
    return checked
