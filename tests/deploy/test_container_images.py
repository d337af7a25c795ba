"""The agent image, built with podman from a local debootstrap base and run for real.

``scripts/container-images.sh`` builds it with ``--pull=never`` (no registry here) and the host's
CA bundle mounted for pip. The tests then check what a board operator relies on: LiteRT and no
TensorFlow, uid 10001, the healthcheck. Container agents taking part in real rounds of
``fedge demo`` (against the demo's locked-down broker on the host) are in tests/e2e/test_demo.py.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest

from fedge.lab.container_agent import STATE_DIR, container_config, podman_run_command, stage_container_agent
from fedge.protocol.errors import FedgeError
from support.podman_support import ROOT, build_agent_image, podman, remove_containers, require_podman

pytestmark = pytest.mark.slow
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture(scope="module")
def agent_image() -> tuple[str, int]:
    require_podman()
    tag, size = build_agent_image()
    assert tag.startswith(f"localhost/fedge-agent:{VERSION}-")
    return tag, size


def test_agent_image_is_litert_only_non_root_and_small(agent_image: tuple[str, int]) -> None:
    tag, size = agent_image
    probe = (
        "import importlib.util, json, os; "
        "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in "
        "('ai_edge_litert', 'tensorflow', 'keras', 'pandas', 'seglearn', 'fedge.agent', 'fedge.protocol',"
        " 'fedge.aggregator', 'fedge.lab')}"
        " | {'uid': os.getuid(), 'gid': os.getgid()}))"
    )
    result = podman("run", "--rm", "--entrypoint", "python", tag, "-c", probe)
    found = json.loads(result.stdout)
    assert found == {
        "ai_edge_litert": True,
        "tensorflow": False,
        "keras": False,
        "pandas": False,
        "seglearn": False,
        "fedge.agent": True,
        "fedge.protocol": True,
        "fedge.aggregator": False,  # a device image carries no server code
        "fedge.lab": False,  # nor the demo's
        "uid": 10001,
        "gid": 10001,
    }
    usage = podman("run", "--rm", tag, "--help")
    assert "--config" in usage.stdout
    # Measured 340 MB (base 161 MB: Debian minbase + python3; the venv is mostly LiteRT + numpy).
    # A guard against TensorFlow or a data-set package sneaking in (each adds 100s of MB).
    assert size < 450_000_000, f"agent image is {size / 1e6:.0f} MB"


def test_agent_image_healthcheck_follows_the_heartbeat(agent_image: tuple[str, int]) -> None:
    """The image's HEALTHCHECK (kept: built in docker format) fails without a fresh heartbeat."""
    tag, _ = agent_image
    config = json.loads(podman("image", "inspect", "--format", "{{json .Config.Healthcheck}}", tag).stdout)
    assert config["Test"][0] == "CMD"
    assert "FEDGE_HEALTH_FILE" in config["Test"][-1]
    name = f"fedge-health-{os.getpid()}"
    try:
        podman("run", "-d", "--name", name, "--entrypoint", "sleep", tag, "120")
        assert podman("healthcheck", "run", name, check=False).returncode != 0
        podman("exec", name, "touch", f"{STATE_DIR}/heartbeat")
        assert podman("healthcheck", "run", name, check=False).returncode == 0
        old = "touch -d '@1' /var/lib/fedge/heartbeat"
        podman("exec", name, "sh", "-c", old)
        assert podman("healthcheck", "run", name, check=False).returncode != 0
    finally:
        remove_containers([name])


# --- the staging of a device's files for its container (no podman needed) ------------------------


def test_container_config_rewrites_every_path_and_lists_the_copies(tmp_path: Path) -> None:
    tables = {
        "agent": {"device_id": "gw-1", "state_dir": "state/gw-1", "key_file": "keys/gw-1.box"},
        "mqtt": {"broker": "mqtts://127.0.0.1:8883", "ca_file": "/etc/ssl/ca.crt", "password": "pw"},
        "data": {"source": "edgex", "task": "../tasks/har.toml"},
        "edgex": {"profile": "/opt/p.yaml"},
    }
    rewritten, copies = container_config(tables, tmp_path)
    assert rewritten["agent"] == {
        "device_id": "gw-1",
        "state_dir": "/var/lib/fedge",
        "key_file": "/etc/fedge/device.box",
    }
    assert rewritten["mqtt"] == {
        "broker": "mqtts://127.0.0.1:8883",
        "ca_file": "/etc/fedge/mqtt-ca.crt",
        "password": "pw",
    }
    assert rewritten["data"]["task"] == "/etc/fedge/task.toml"
    assert rewritten["edgex"]["profile"] == "/etc/fedge/profile.yaml"
    assert copies == {
        "device.box": tmp_path / "keys" / "gw-1.box",
        "mqtt-ca.crt": Path("/etc/ssl/ca.crt"),
        "task.toml": (tmp_path / ".." / "tasks" / "har.toml").resolve(),
        "profile.yaml": Path("/opt/p.yaml"),
    }
    assert tables["agent"]["state_dir"] == "state/gw-1"  # the host config is not modified


def test_container_config_refuses_a_non_path(tmp_path: Path) -> None:
    with pytest.raises(FedgeError, match=r"^\[agent\] key_file must be a path, not int$"):
        container_config({"agent": {"key_file": 3}}, tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="staging gives the files to uid 10001 (root only)")
def test_stage_container_agent_gives_private_copies_to_the_image_user(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    key = tmp_path / "keys" / "gw-1.box"
    key.write_text("secret")
    key.chmod(0o600)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        '[agent]\ndevice_id = "gw-1"\nstate_dir = "s"\nkey_file = "keys/gw-1.box"\n[mqtt]\npassword = "pw"\n'
    )
    agent = stage_container_agent(cfg, tmp_path / "box")
    assert agent.name == "fedge-agent-gw-1"
    copied = agent.config_dir / "device.box"
    assert copied.read_text() == "secret"
    assert (copied.stat().st_mode & 0o777, copied.stat().st_uid) == (0o600, 10001)
    written = agent.config_dir / "agent.toml"
    assert written.stat().st_mode & 0o777 == 0o600  # it holds the MQTT password
    assert tomllib.loads(written.read_text())["agent"]["key_file"] == "/etc/fedge/device.box"
    assert (agent.state_dir.stat().st_mode & 0o777, agent.state_dir.stat().st_uid) == (0o700, 10001)
    command = podman_run_command(agent, "localhost/fedge-agent:x")
    assert command[-3:] == ["localhost/fedge-agent:x", "--config", "/etc/fedge/agent.toml"]
    assert f"{agent.config_dir}:/etc/fedge:ro" in command and "--read-only" in command


@pytest.mark.skipif(os.geteuid() != 0, reason="staging runs as root")
def test_stage_container_agent_names_a_missing_file(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[agent]\ndevice_id = "gw-1"\nkey_file = "nope.box"\n')
    with pytest.raises(FedgeError, match=r"nope\.box \(named in the config\) does not exist$"):
        stage_container_agent(cfg, tmp_path / "box")


@pytest.mark.skipif(os.geteuid() != 0, reason="staging gives the files to uid 10001 (root only)")
def test_password_files_are_staged_as_private_copies(tmp_path: Path) -> None:
    """A config that keeps its passwords in password files (readable config, secrets apart)
    gets both files copied 0600 for the image's user, and a config that is not secret."""
    for name, secret in (("mqtt.pw", "device-secret"), ("edgex.pw", "bus-secret")):
        (tmp_path / name).write_text(secret + "\n")
        (tmp_path / name).chmod(0o600)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        '[agent]\ndevice_id = "gw-1"\nstate_dir = "s"\n'
        '[mqtt]\nusername = "gw-1"\npassword_file = "mqtt.pw"\n'
        '[edgex]\nusername = "gw-1.edgex"\npassword_file = "edgex.pw"\n'
    )
    agent = stage_container_agent(cfg, tmp_path / "box")
    tables = tomllib.loads((agent.config_dir / "agent.toml").read_text())
    assert tables["mqtt"]["password_file"] == "/etc/fedge/mqtt-password"
    assert tables["edgex"]["password_file"] == "/etc/fedge/edgex-password"
    for name, secret in (("mqtt-password", "device-secret"), ("edgex-password", "bus-secret")):
        copy = agent.config_dir / name
        assert copy.read_text() == secret + "\n"
        assert (copy.stat().st_mode & 0o777, copy.stat().st_uid) == (0o600, 10001)
    assert (agent.config_dir / "agent.toml").stat().st_mode & 0o777 == 0o644  # no secret in it
