"""``run_demo``'s aggregation options: what ``aggregation = "async"`` cannot run with is refused
before anything starts (no broker, no process, no output directory), with the flag to change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedge.lab.demo import DemoOptions, run_demo
from fedge.protocol.errors import FedgeError
from fedge.protocol.task import parse_task_spec

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"aggregation": "fast"}, '--aggregation must be "sync" or "async", got \'fast\''),
        ({"buildings": 2}, "--aggregation async cannot run with --buildings: use --aggregation sync"),
        ({"secure_aggregation": True}, "--aggregation async cannot run with --secure-aggregation"),
        ({"dp_epsilon": 8.0}, "--aggregation async cannot run with --dp-epsilon"),
        ({"aggregator_replicas": 2}, "--aggregation async cannot run with --aggregator-replicas"),
    ],
)
def test_what_async_demo_refuses_before_it_starts(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    task = parse_task_spec((REPO / "tasks" / "har-watch.toml").read_text())
    options = DemoOptions(task=task, out=tmp_path / "out", **{"aggregation": "async", **changes})
    with pytest.raises(FedgeError) as err:
        run_demo(options)
    assert str(err.value).startswith(message)
    assert not (tmp_path / "out").exists()
