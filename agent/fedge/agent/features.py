"""From aligned sensor readings to feature vectors, as a task spec's ``[features]`` says.

Pure numpy, no I/O: the HAR loader feeds it recorded data, the EdgeX path feeds it live
readings, and both get byte-identical features. Windowed features are resource-major:
``[r0.stat0, r0.stat1, ..., r1.stat0, ...]``, matching :attr:`FeatureSpec.names`. Raw windows
(``statistics = ["raw"]``) are channel-major too: ``x[c * size + t]`` is reading ``t`` (oldest
first) of resource ``c``, ``[r0[0], ..., r0[size-1], r1[0], ...]``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from fedge.protocol.errors import FedgeError
from fedge.protocol.task import FeatureSpec, ModelKind, WindowSpec


class FeatureError(FedgeError):
    """Readings cannot be turned into features (wrong shape, too short, NaN)."""


# Each statistic reduces windows of shape (n_windows, channels, size) over the last axis.
_STATS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": lambda w: w.mean(axis=-1),
    "std": lambda w: w.std(axis=-1),
    "min": lambda w: w.min(axis=-1),
    "max": lambda w: w.max(axis=-1),
    "median": lambda w: np.median(w, axis=-1),
    "rms": lambda w: np.sqrt(np.mean(w * w, axis=-1)),
    "range": lambda w: w.max(axis=-1) - w.min(axis=-1),
    "p10": lambda w: np.percentile(w, 10, axis=-1),
    "p25": lambda w: np.percentile(w, 25, axis=-1),
    "p75": lambda w: np.percentile(w, 75, axis=-1),
    "p90": lambda w: np.percentile(w, 90, axis=-1),
    "mad": lambda w: np.mean(np.abs(w - w.mean(axis=-1, keepdims=True)), axis=-1),
}


def window_count(n_readings: int, window: WindowSpec) -> int:
    """How many complete windows ``n_readings`` aligned readings give."""
    if n_readings < window.size:
        return 0
    return 1 + (n_readings - window.size) // window.step


def _windows(signal: np.ndarray, window: WindowSpec) -> np.ndarray:
    # (n, ch) -> (n_windows, ch, size); a view, no copy of the readings.
    view = sliding_window_view(signal, window.size, axis=0)
    return view[:: window.step]


def extract_features(readings: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """Feature vectors from readings of shape ``(n, len(spec.resources))`` in time order.

    Without a window, each reading row is one sample. With one, each complete window is one
    sample; readings after the last complete window are left for the next call. A raw window's
    features are its readings cast to float32, channel-major (see the module docstring).
    """
    arr = np.asarray(readings, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != len(spec.resources):
        raise FeatureError(f"readings must have shape (n, {len(spec.resources)}), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise FeatureError("readings contain NaN or infinity")
    if spec.window is None:
        return arr.astype(np.float32)
    n_win = window_count(arr.shape[0], spec.window)
    if n_win == 0:
        return np.empty((0, spec.input_dim), np.float32)
    win = _windows(arr, spec.window)[:n_win]
    if spec.window.raw:
        # The (n_windows, ch, size) view copied once, straight to a C-ordered float32 array (the
        # result itself: no float64 copy of the windows); its rows are then x[c * size + t].
        raw: np.ndarray = np.ascontiguousarray(win, dtype=np.float32).reshape(n_win, spec.input_dim)
        return raw
    stats = np.stack([_STATS[s](win) for s in spec.window.statistics], axis=-1)  # (n, ch, stats)
    features: np.ndarray = stats.reshape(n_win, -1).astype(np.float32)
    return features


def window_labels(labels: np.ndarray, window: WindowSpec | None, kind: ModelKind) -> np.ndarray:
    """One label per sample: the majority class (ties: smallest index) or the window mean."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise FeatureError(f"labels must be one-dimensional, got shape {arr.shape}")
    if kind == "classification" and arr.size and arr.min() < 0:
        raise FeatureError("class indices must be >= 0")
    if window is None:
        return arr.astype(np.int32 if kind == "classification" else np.float32)
    n_win = window_count(arr.shape[0], window)
    if n_win == 0:
        return np.empty((0,), np.int32 if kind == "classification" else np.float32)
    win = sliding_window_view(arr, window.size)[:: window.step][:n_win]
    if kind == "regression":
        means: np.ndarray = win.astype(np.float64).mean(axis=1).astype(np.float32)
        return means
    # Each window's class counts with one bincount: window i's classes shifted by i * classes
    # (np.apply_along_axis, a bincount a window, cost a Python call per window).
    classes = int(arr.max()) + 1
    shifted = win.astype(np.int64) + (np.arange(n_win, dtype=np.int64) * classes)[:, None]
    counts = np.bincount(shifted.ravel(), minlength=n_win * classes).reshape(n_win, classes)
    majority: np.ndarray = counts.argmax(axis=1).astype(np.int32)  # ties: the smaller index
    return majority
