"""The aggregator's ``[replicas]`` table: what a leader and its workers accept, and what they
refuse at start with a one-line error naming the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedge.aggregator.config import load_aggregator_config
from fedge.aggregator.replica_config import REPLICAS_OFF, ReplicaSettings
from fedge.protocol.config_source import ConfigError
from support.aggregator_toml import MINIMAL_AGGREGATOR_TOML

BASE = MINIMAL_AGGREGATOR_TOML


def load(tmp_path: Path, extra: str, env: dict[str, str] | None = None) -> ReplicaSettings:
    path = tmp_path / "aggregator.toml"
    path.write_text(BASE + extra)
    return load_aggregator_config(path, env or {}).replicas


def test_off_by_default_and_a_worker_named_by_its_pod(tmp_path: Path) -> None:
    assert load(tmp_path, "") == REPLICAS_OFF
    worker = load(
        tmp_path,
        "[replicas]\nenabled = true\n",
        {"FEDGE_AGGREGATOR__REPLICAS__ROLE": "worker", "POD_NAME": "fedge-aggregator-worker-1"},
    )
    assert worker == ReplicaSettings(enabled=True, role="worker", worker_id="fedge-aggregator-worker-1")
    assert worker.worker
    assert not load(tmp_path, "[replicas]\nenabled = true\n").worker  # the leader


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            '[replicas]\nenabled = true\n[rounds]\nstrategy = "median"\n',
            'strategy = "median": a robust strategy',
        ),
        (
            "[replicas]\nenabled = true\n[privacy]\nenabled = true\nepsilon_budget = 8.0\n",
            r"\[replicas\] cannot run with \[privacy\] enabled",
        ),
        ('[replicas]\nrole = "worker"\n', 'role = "worker" needs enabled = true'),
        (
            "[replicas]\nenabled = true\nflush_interval_s = 2.0\npartial_grace_s = 1.0\n",
            "partial_grace_s \\(1\\) must be at least twice flush_interval_s",
        ),
        ('[replicas]\nworker_id = "a/b"\n', r"\[replicas\] invalid worker id 'a/b'"),
        ('[replicas]\nshare_group = "+"\n', r"\[replicas\] invalid share group"),
        ("[replicas]\nflush_updates = 0\n", "flush_updates"),
    ],
)
def test_what_replicas_refuse_at_start(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, extra)
