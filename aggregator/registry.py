"""The registry of enrolled devices: device id -> X25519 public key (a TOML file).

::

    [devices]
    watch-01 = "base64 public key"

An update is opened only with the key enrolled for the device id it claims, so a device
cannot speak for another one. ``fedge enroll``/``fedge revoke`` manage this file (trust issue).
"""

from __future__ import annotations

from pathlib import Path

from nacl.public import PublicKey

from protocol.config_source import ConfigError, parse_toml
from protocol.errors import FedgeError
from protocol.sealing import public_key_from_text
from protocol.topics import check_id


def load_registry(path: Path) -> dict[str, PublicKey]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read device registry {path}: {exc}") from None
    data = parse_toml(text, str(path))
    devices = data.get("devices", {})
    if not isinstance(devices, dict) or set(data) - {"devices"}:
        raise ConfigError(f'{path}: expected one [devices] table of id = "public key"')
    registry: dict[str, PublicKey] = {}
    seen: dict[bytes, str] = {}
    for device_id, key_text in devices.items():
        try:
            check_id(device_id)
            if not isinstance(key_text, str):
                raise ConfigError("public key must be a string")
            key = public_key_from_text(key_text)
        except FedgeError as exc:
            raise ConfigError(f"{path}: device {device_id!r}: {exc}") from None
        if bytes(key) in seen:
            raise ConfigError(f"{path}: devices {seen[bytes(key)]!r} and {device_id!r} share a public key")
        seen[bytes(key)] = device_id
        registry[device_id] = key
    return registry


def render_registry(devices: dict[str, str]) -> str:
    lines = ["[devices]"] + [f'"{d}" = "{k}"' for d, k in sorted(devices.items())]
    return "\n".join(lines) + "\n"
