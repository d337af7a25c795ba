"""Task spec variants for tests of the task-dependent parts."""

from __future__ import annotations

from typing import Any

from fedge.protocol.task import TaskSpec, task_spec_from_dict


def task_variant(base: TaskSpec, changes: dict[str, Any]) -> TaskSpec:
    """A copy of ``base`` with dotted-path changes; a value of ``None`` removes the key.

    Example: ``task_variant(t, {"training.optimizer": "adam", "training.momentum": None})``.
    """
    data = base.to_dict()
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        node = data
        for p in parents:
            node = node[p]
        if value is None:
            node.pop(key, None)
        else:
            node[key] = value
    return task_spec_from_dict(data)
