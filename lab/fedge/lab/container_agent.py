"""Runs a provisioned device's agent in the agent image (podman), as a board would with docker run.

A host agent's config names host paths (its key, the broker's CA, the EdgeX profile, the task).
Inside the image the agent runs as uid 10001 with ``/etc/fedge`` (read-only) and a state volume at
``/var/lib/fedge``, exactly as ``docs/deploy.md`` ("The agent on an ARM board") tells a board
operator. This module lays out that directory for one device (copies of the files it names,
the config rewritten to the container's paths, everything owned by 10001) and builds the
``podman run`` command line.

Pure except :func:`stage_container_agent`, which writes files; no podman call is made here.
"""

from __future__ import annotations

import os
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedge.lab.provision import render_toml, write_config
from fedge.protocol.errors import FedgeError

AGENT_UID = 10001  # the image's fedge user (docker/agent.Dockerfile)
CONFIG_DIR = "/etc/fedge"
STATE_DIR = "/var/lib/fedge"

# (table, key) -> file name inside /etc/fedge for every setting that names a file.
FILE_SETTINGS: dict[tuple[str, str], str] = {
    ("agent", "key_file"): "device.box",
    ("mqtt", "ca_file"): "mqtt-ca.crt",
    ("mqtt", "cert_file"): "mqtt-client.crt",
    ("mqtt", "key_file"): "mqtt-client.key",
    ("mqtt", "password_file"): "mqtt-password",
    ("edgex", "ca_file"): "edgex-ca.crt",
    ("edgex", "cert_file"): "edgex-client.crt",
    ("edgex", "key_file"): "edgex-client.key",
    ("edgex", "password_file"): "edgex-password",
    ("edgex", "profile"): "profile.yaml",
    ("edgex", "token_file"): "edgex-token",
    ("data", "task"): "task.toml",
}
PRIVATE_FILES = {
    "device.box",
    "mqtt-client.key",
    "mqtt-password",
    "edgex-client.key",
    "edgex-password",
    "edgex-token",
}


@dataclass(frozen=True)
class ContainerAgent:
    """One device's container: where its /etc/fedge and state live on the host."""

    device_id: str
    name: str
    config_dir: Path
    state_dir: Path


def container_config(tables: dict[str, Any], source_dir: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """The config rewritten to the container's paths, and {file name in /etc/fedge: host file}.

    Relative paths in the host config are relative to its directory, as the agent reads them.
    """
    rewritten: dict[str, Any] = {name: dict(values) for name, values in tables.items()}
    copies: dict[str, Path] = {}
    agent = rewritten.setdefault("agent", {})
    agent["state_dir"] = STATE_DIR
    for (table, key), file_name in FILE_SETTINGS.items():
        value = rewritten.get(table, {}).get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise FedgeError(f"[{table}] {key} must be a path, not {type(value).__name__}")
        copies[file_name] = (source_dir / value).resolve()
        rewritten[table][key] = f"{CONFIG_DIR}/{file_name}"
    return rewritten, copies


def stage_container_agent(
    config_file: Path, workdir: Path, name_prefix: str = "fedge-agent"
) -> ContainerAgent:
    """Writes ``workdir/etc`` (config + copies) and ``workdir/state`` owned by the image's user.

    Needs root: the files are given to uid 10001, which a rootful podman maps 1:1.
    """
    if os.geteuid() != 0:
        raise FedgeError("container agents need root (rootful podman maps the image's uid 10001 1:1)")
    try:
        tables = tomllib.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise FedgeError(f"cannot read agent config {config_file}: {exc}") from None
    device_id = tables.get("agent", {}).get("device_id")
    if not isinstance(device_id, str) or not device_id:
        raise FedgeError(f"{config_file}: [agent] device_id is missing")
    rewritten, copies = container_config(tables, config_file.parent)
    etc = workdir / "etc"
    state = workdir / "state"
    shutil.rmtree(workdir, ignore_errors=True)
    etc.mkdir(parents=True)
    state.mkdir(mode=0o700)
    for file_name, source in copies.items():
        if not source.is_file():
            raise FedgeError(f"{config_file}: {source} (named in the config) does not exist")
        target = etc / file_name
        shutil.copyfile(source, target)
        target.chmod(0o600 if file_name in PRIVATE_FILES else 0o644)
    secret = any("password" in values for values in rewritten.values() if isinstance(values, dict))
    write_config(etc / "agent.toml", render_toml(rewritten), secret=secret)
    for path in [workdir, etc, state, *etc.iterdir()]:
        os.chown(path, AGENT_UID, AGENT_UID)
    return ContainerAgent(device_id, f"{name_prefix}-{device_id}", etc, state)


def podman_run_command(agent: ContainerAgent, image: str) -> list[str]:
    """``podman run`` for the agent, in the foreground (the caller owns the process).

    Host networking reaches a broker on the host's loopback; the root filesystem is read-only
    (the agent writes only its state volume and /tmp).
    """
    return [
        "podman",
        "run",
        "--rm",
        "--replace",
        "--name",
        agent.name,
        "--network",
        "host",
        "--read-only",
        # podman schedules the image's HEALTHCHECK with systemd timers and only logs errors
        # where it has no systemd; whoever runs the fleet watches the agent's MQTT status.
        "--no-healthcheck",
        "--tmpfs",
        "/tmp",
        "--volume",
        f"{agent.config_dir}:{CONFIG_DIR}:ro",
        "--volume",
        f"{agent.state_dir}:{STATE_DIR}",
        image,
        "--config",
        f"{CONFIG_DIR}/agent.toml",
    ]
