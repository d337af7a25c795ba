"""The aggregator's ``[leader]`` table, the status ConfigMap's data and the heartbeat file:
the pure parts of leader election wiring (the processes are in test_aggregator_leader_service)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedge.aggregator.config import load_aggregator_config
from fedge.aggregator.heartbeat import Heartbeat, heartbeat_age_s
from fedge.aggregator.leader_config import LEADER_KEYS, LEADER_OFF, LeaderSettings, leader_settings_from_table
from fedge.aggregator.leadership import status_data
from fedge.protocol.config_source import ConfigError, Table
from support.aggregator_toml import MINIMAL_AGGREGATOR_TOML

BASE = MINIMAL_AGGREGATOR_TOML
IN_CLUSTER = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "POD_NAME": "fedge-aggregator-7d9-x2"}


def parse(table: dict[str, object], env: dict[str, str], sa_file: Path | None = None) -> LeaderSettings:
    return leader_settings_from_table(
        Table({"leader": table}, "leader", LEADER_KEYS),
        env,
        sa_file or Path("/nonexistent/namespace"),
        hostname=lambda: "gateway-1",
    )


def test_existing_configs_keep_working_outside_a_cluster(tmp_path: Path) -> None:
    path = tmp_path / "aggregator.toml"
    path.write_text(BASE)
    cfg = load_aggregator_config(path, {})
    assert cfg.leader == LEADER_OFF
    assert cfg.heartbeat_path == tmp_path / "state" / "heartbeat"
    path.write_text(BASE.replace('state_dir = "state"', 'state_dir = "state"\nheartbeat_file = "/tmp/hb"'))
    assert load_aggregator_config(path, {}).heartbeat_path == Path("/tmp/hb")


def test_auto_is_on_exactly_in_a_cluster(tmp_path: Path) -> None:
    sa = tmp_path / "namespace"
    sa.write_text("fedge\n")
    assert parse({}, {}, sa) == LEADER_OFF
    assert parse({"mode": "off"}, IN_CLUSTER, sa) == LEADER_OFF
    on = parse({}, IN_CLUSTER, sa)
    assert on == LeaderSettings(enabled=True, namespace="fedge", identity="fedge-aggregator-7d9-x2")
    # POD_NAMESPACE (downward API) before the service-account file; the hostname without POD_NAME.
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "POD_NAMESPACE": "other"}
    assert (parse({}, env, sa).namespace, parse({}, env, sa).identity) == ("other", "gateway-1")
    explicit = parse({"namespace": "ns1", "identity": "me", "lease_name": "l1"}, IN_CLUSTER, sa)
    assert (explicit.namespace, explicit.identity, explicit.lease_name) == ("ns1", "me", "l1")
    proxied = parse({"mode": "on", "api_url": "http://127.0.0.1:8001", "namespace": "fedge"}, {})
    assert proxied.enabled and proxied.api_url == "http://127.0.0.1:8001" and proxied.identity == "gateway-1"


@pytest.mark.parametrize(
    ("table", "env", "message"),
    [
        (
            {"lease_duration_s": 10, "renew_deadline_s": 10},
            {},
            "[leader] renew_deadline_s (10) must be shorter than lease_duration_s (10): a leader must "
            "step down before another replica may take the lease over",
        ),
        (
            {"renew_deadline_s": 2, "retry_period_s": 2.5},
            {},
            "[leader] retry_period_s (2.5) must be shorter than renew_deadline_s (2): a leader needs "
            "more than one renew attempt per deadline",
        ),
        ({"mode": "sometimes"}, {}, "[leader] mode must be one of ['auto', 'on', 'off'], got 'sometimes'"),
        ({"lease_duration_s": 1}, {}, "[leader] lease_duration_s must be an integer in 2..3600, got 1"),
        (
            {"lease_nmae": "x"},
            {},
            "[leader] unknown keys ['lease_nmae']; allowed: ['api_url', 'identity', "
            "'lease_duration_s', 'lease_name', 'mode', 'namespace', 'renew_deadline_s', 'retry_period_s', "
            "'status_configmap', 'status_interval_s']",
        ),
        (
            {"lease_name": "Leader_1"},
            {},
            "[leader] lease_name 'Leader_1' is not a valid Kubernetes object name",
        ),
        (
            {"status_configmap": "a b"},
            {},
            "[leader] status_configmap 'a b' is not a valid Kubernetes object name (or \"\" for none)",
        ),
        (
            {"api_url": "127.0.0.1:8001"},
            {},
            "[leader] api_url '127.0.0.1:8001' must start with http:// or https://",
        ),
        (
            {"mode": "on"},
            {},
            '[leader] mode = "on" outside a Kubernetes pod (KUBERNETES_SERVICE_HOST is not set) needs '
            "api_url, e.g. http://127.0.0.1:8001 from `kubectl proxy`",
        ),
        (
            {},
            IN_CLUSTER,
            "[leader] namespace is not set and neither POD_NAMESPACE nor /nonexistent/namespace gives one",
        ),
        (
            {"namespace": "Fedge"},
            IN_CLUSTER,
            "[leader] namespace 'Fedge' is not a valid Kubernetes namespace",
        ),
    ],
)
def test_bad_leader_config_is_named(table: dict[str, object], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(table, env)
    assert str(caught.value) == message


def test_bad_leader_config_from_the_environment_overlay(tmp_path: Path) -> None:
    path = tmp_path / "aggregator.toml"
    path.write_text(BASE + "\n[leader]\nlease_duration_s = 15\n")
    env = {"FEDGE_AGGREGATOR__LEADER__RENEW_DEADLINE_S": "20"}
    with pytest.raises(ConfigError, match=r"^\[leader\] renew_deadline_s \(20\) must be shorter than"):
        load_aggregator_config(path, env)
    path.write_text(BASE + "\n[leaders]\n")
    with pytest.raises(
        ConfigError, match=r"unknown tables \['leaders'\]; allowed: aggregator, leader, metrics, mqtt"
    ):
        load_aggregator_config(path, {})


def test_status_data_is_strings_for_kubectl() -> None:
    status = {"state": "running", "phase": "train", "version": 7, "completed_rounds": 3, "round_id": "r4"}
    assert status_data(status, "pod-a", 1735732800.0) == {
        "leader": "pod-a",
        "model_version": "7",
        "completed_rounds": "3",
        "round": "r4",
        "round_status": "running/train",
        "updated_at": "2025-01-01T12:00:00Z",
    }
    done = {"state": "done", "phase": None, "version": 9, "completed_rounds": 5, "round_id": None}
    data = status_data(done, "pod-a", 0.0)
    assert (data["round"], data["round_status"]) == ("", "done")


def test_heartbeat_is_touched_throttled_and_survives_a_bad_path(tmp_path: Path) -> None:
    t = [100.0]
    path = tmp_path / "sub" / "heartbeat"
    beat = Heartbeat(path, interval_s=1.0, clock=lambda: t[0])
    assert heartbeat_age_s(path) is None
    beat.beat()
    os.utime(path, (1000.0, 1000.0))
    t[0] += 0.5
    beat.beat()  # throttled: no touch
    assert path.stat().st_mtime == 1000.0
    t[0] += 0.6
    beat.beat()
    age = heartbeat_age_s(path)
    assert age is not None and 0 <= age < 5
    blocked = tmp_path / "file"
    blocked.write_text("")
    Heartbeat(blocked / "heartbeat").beat()  # parent is a file: logged, not raised


def test_an_aggregator_without_leader_election_never_imports_the_kubernetes_client() -> None:
    """The client costs ~48 MB of the pod's memory; a single replica does not pay for it."""
    import os
    import subprocess
    import sys

    from support.source_tree import PYTHONPATH

    probe = "import sys, fedge.aggregator.service; print('kubernetes' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": PYTHONPATH},
        check=True,
    )
    assert out.stdout.strip() == "False"
