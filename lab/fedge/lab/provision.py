"""Creates a fleet on disk: keys, the device registry, and aggregator and agent configs.

Used by ``fedge demo`` and the end-to-end tests. Private keys are written with mode 0600 and
never printed; configs refer to key files by relative path, so a fleet directory can move.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path

from nacl.public import PrivateKey
from nacl.signing import SigningKey

from fedge.aggregator.registry import render_registry
from fedge.protocol.identity import certify
from fedge.protocol.sealing import key_to_text
from fedge.protocol.signing import signing_key_to_text
from fedge.shell.files import atomic_write


@dataclass(frozen=True)
class FleetFiles:
    root: Path
    aggregator_config: Path
    agent_configs: dict[str, Path]
    registry: Path
    signing_key: SigningKey
    box_key: PrivateKey
    device_keys: dict[str, PrivateKey]


def write_private(path: Path, text: str) -> None:
    """``text`` and a newline, mode 0600 from the start (:func:`fedge.shell.files.atomic_write`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (text + "\n").encode("ascii"))


def write_config(path: Path, text: str, secret: bool) -> None:
    """A config file; one holding a password is private (0600) from its creation."""
    if secret:
        write_private(path, text.rstrip("\n"))
    else:
        path.write_text(text)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def render_toml(tables: dict[str, dict[str, object]]) -> str:
    out: list[str] = []
    for name, values in tables.items():
        out.append(f"[{name}]")
        out.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
        out.append("")
    return "\n".join(out)


def create_fleet(
    root: Path,
    fleet: str,
    model_dir: Path,
    broker_url: str,
    subjects: dict[str, int],
    rounds: dict[str, object],
    mqtt_protocol: int = 5,
    agent_overrides: dict[str, object] | None = None,
    edgex: dict[str, object] | None = None,
    task_file: Path | None = None,
    mqtt_extra: dict[str, dict[str, object]] | None = None,
    edgex_extra: dict[str, dict[str, object]] | None = None,
    privacy: dict[str, object] | None = None,
    secure_aggregation: bool = False,
    replicas: dict[str, object] | None = None,
    csv_files: dict[str, Path] | None = None,
) -> FleetFiles:
    """Writes everything a fleet needs under ``root``; ``subjects`` maps device id -> subject.

    ``mqtt_extra``: per principal (device id or "aggregator"), extra ``[mqtt]`` settings such
    as credentials and the broker's CA. ``edgex_extra``: per device id, extra ``[edgex]``
    settings: with EdgeX on the fleet's broker, the credentials of the device's own EdgeX-bus
    principal (``{device}.edgex`` of ``fedge broker config``), which the agent requires when its
    fleet connection has credentials. Configs holding a password are written mode 0600.
    ``privacy``: the aggregator's ``[privacy]`` table (differential privacy, secure aggregation),
    if any. ``secure_aggregation``: every device also gets an Ed25519 identity key and a
    certificate signed by an operator key of the fleet (``keys/operator.sign``, which the
    aggregator never reads), pins that operator key, and requires secure rounds.
    ``replicas``: the aggregator's ``[replicas]`` table (a leader and workers), if any.
    ``csv_files``: per device id, the CSV of readings it reads (``[data] source = "csv"``, with
    ``task_file``; ``edgex`` then only gives ``[edgex]`` settings such as the profile). Without
    it or ``edgex``, devices play their subject of the recorded data set (``"har-watch"``).
    """
    extra = mqtt_extra or {}
    edgex_settings = edgex_extra or {}
    root.mkdir(parents=True, exist_ok=True)
    keys = root / "keys"
    signing = SigningKey.generate()
    box = PrivateKey.generate()
    write_private(keys / "aggregator.sign", signing_key_to_text(signing))
    write_private(keys / "aggregator.box", key_to_text(box))
    device_keys: dict[str, PrivateKey] = {}
    agent_configs: dict[str, Path] = {}
    operator = SigningKey.generate() if secure_aggregation else None
    if operator is not None:
        write_private(keys / "operator.sign", signing_key_to_text(operator))
    for device_id, subject in subjects.items():
        key = PrivateKey.generate()
        device_keys[device_id] = key
        write_private(keys / f"{device_id}.box", key_to_text(key))
        agent_tables: dict[str, dict[str, object]] = {
            "agent": {
                "device_id": device_id,
                "fleet": fleet,
                "state_dir": f"state/{device_id}",
                "key_file": f"keys/{device_id}.box",
                "aggregator_public_key": key_to_text(box.public_key),
                "aggregator_verify_keys": [signing_key_to_text(signing.verify_key)],
                "status_interval_s": 5.0,
                **(agent_overrides or {}),
            },
            "mqtt": {"broker": broker_url, "protocol": mqtt_protocol, **extra.get(device_id, {})},
            "data": {"source": "har-watch", "subject": subject},
        }
        if csv_files is not None:
            # Readings from a CSV file on the device, as a logger writes them.
            if task_file is None:
                raise ValueError("a CSV fleet needs the task file its devices are provisioned for")
            agent_tables["data"] = {
                "source": "csv",
                "task": str(task_file.resolve()),
                "csv_file": str(csv_files[device_id].resolve()),
            }
            if edgex is not None:
                agent_tables["edgex"] = {"device": device_id, **edgex}
        elif edgex is not None:
            # Readings come from EdgeX; the device knows the task it was provisioned for.
            if task_file is None:
                raise ValueError("an EdgeX fleet needs the task file its devices are provisioned for")
            agent_tables["data"] = {"source": "edgex", "task": str(task_file.resolve())}
            agent_tables["edgex"] = {"device": device_id, **edgex, **edgex_settings.get(device_id, {})}
        elif device_id in edgex_settings:
            raise ValueError("EdgeX credentials for a fleet whose devices do not read EdgeX")
        if operator is not None:  # the identity its secure-aggregation round keys are signed with
            identity = SigningKey.generate()
            write_private(keys / f"{device_id}.identity", signing_key_to_text(identity))
            cert = certify(operator, fleet, device_id, identity.verify_key, 0.0)
            atomic_write(keys / f"{device_id}.cert", base64.b64encode(cert) + b"\n", 0o644)
            agent_tables["agent"].update(
                identity_key_file=f"keys/{device_id}.identity",
                identity_certificate_file=f"keys/{device_id}.cert",
                operator_verify_keys=[signing_key_to_text(operator.verify_key)],
                require_secure_aggregation=True,
            )
        path = root / f"agent-{device_id}.toml"
        secret = any("password" in table for table in agent_tables.values())
        write_config(path, render_toml(agent_tables), secret=secret)
        agent_configs[device_id] = path
    registry = root / "devices.toml"
    registry.write_text(render_registry({d: key_to_text(k.public_key) for d, k in device_keys.items()}))
    aggregator_config = root / "aggregator.toml"
    write_config(
        aggregator_config,
        render_toml(
            {
                "aggregator": {
                    "fleet": fleet,
                    "model_dir": os.path.relpath(model_dir.resolve(), root.resolve()),
                    "state_dir": "state/aggregator",
                    "registry": "devices.toml",
                    "box_key_file": "keys/aggregator.box",
                    "signing_key_file": "keys/aggregator.sign",
                    "exit_when_done": True,
                },
                "mqtt": {"broker": broker_url, "protocol": mqtt_protocol, **extra.get("aggregator", {})},
                "rounds": dict(rounds),
                **({"privacy": dict(privacy)} if privacy else {}),
                **({"replicas": dict(replicas)} if replicas else {}),
            }
        ),
        secret="password" in extra.get("aggregator", {}),
    )
    return FleetFiles(root, aggregator_config, agent_configs, registry, signing, box, device_keys)
