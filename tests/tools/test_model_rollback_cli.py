"""``fedge model rollback`` as an operator runs it: a version that cannot be rolled back to is one
line naming the ones that can, and nothing is left for the aggregator; without a running
aggregator the request waits, and the command says where."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from fedge.aggregator.config import load_aggregator_config
from fedge.aggregator.rollout import REQUEST_FILE, ROLLOUT_DIR, Candidate, Rollout
from fedge.lab.provision import create_fleet
from fedge.protocol.topics import FleetTopics
from fedge.protocol.weights import weights_to_bytes
from support.cli import fedge

EXIT_USAGE = 2


def _fleet_with_promotions(tmp_path: Path, har_model_dir: Path) -> Path:
    files = create_fleet(tmp_path / "fleet", "cli-r", har_model_dir, "mqtt://127.0.0.1:1", {"d1": 1}, {})
    config = load_aggregator_config(files.aggregator_config, {})
    rollout = Rollout(config.rollout, config.state_dir, FleetTopics("cli-r"), files.signing_key, "accuracy")
    for version, value in ((2, 0.5), (3, 0.6)):
        blob = weights_to_bytes(np.full(4, float(version), np.float32))
        sha = hashlib.sha256(blob).hexdigest()
        candidate = Candidate(version, f"r-v{version}", sha, len(blob), 1, "ab" * 32, value)
        assert rollout.judge(candidate, blob, sha, float(version)) is not None
    return files.aggregator_config


def test_an_unknown_version_is_one_line_naming_the_kept_ones(tmp_path: Path, har_model_dir: Path) -> None:
    config = _fleet_with_promotions(tmp_path, har_model_dir)
    done = fedge("model", "rollback", "--config", str(config), "--to", "7", "--wait-s", "0")
    assert done.returncode == EXIT_USAGE, done.stderr
    assert done.stderr == (
        "fedge: error: cannot roll back to v7: the kept promoted versions are v2, v3 "
        "(aggregator/status rollout.kept_versions)\n"
    )
    rollout_dir = load_aggregator_config(config, {}).state_dir / ROLLOUT_DIR
    assert rollout_dir.is_dir() and not (rollout_dir / REQUEST_FILE).exists()


def test_without_a_running_aggregator_the_signed_request_waits(tmp_path: Path, har_model_dir: Path) -> None:
    config = _fleet_with_promotions(tmp_path, har_model_dir)
    done = fedge("model", "rollback", "--config", str(config), "--to", "2", "--wait-s", "0.5")
    assert done.returncode == EXIT_USAGE and done.stdout == ""
    assert "no answer from the aggregator within 0.5 s: the request waits in" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    state_dir = load_aggregator_config(config, {}).state_dir
    assert (state_dir / ROLLOUT_DIR / REQUEST_FILE).stat().st_size > 0
