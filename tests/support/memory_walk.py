"""What an object holds: every numpy array reachable from it, for tests that prove the
aggregator never keeps an individual device's vector (secure aggregation)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def vectors_held(obj: object, path: str, seen: set[int] | None = None) -> list[tuple[str, np.ndarray]]:
    """Every numpy array reachable from ``obj`` (attributes, mappings, sequences), with its path."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, str | bytes | int | float | type) or callable(obj):
        return []
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return [(path, obj)]
    found: list[tuple[str, np.ndarray]] = []
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            found += vectors_held(value, f"{path}[{key!r}]", seen)
    elif isinstance(obj, list | tuple | set | frozenset):
        for i, item in enumerate(obj):
            found += vectors_held(item, f"{path}[{i}]", seen)
    elif hasattr(obj, "__dict__"):
        for name, value in vars(obj).items():
            found += vectors_held(value, f"{path}.{name}", seen)
    return found
