"""Configuration sources: a TOML document overlaid with environment variables.

Both the agent and the aggregator read a dataclass from a TOML file and let environment
variables override single values (``FEDGE_AGENT__MQTT__BROKER=mqtt://...`` sets
``[mqtt] broker``), the way containers and systemd ``EnvironmentFile`` s configure services.
Pure: the caller reads the file and passes the environment in.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from typing import Any

from protocol.errors import FedgeError


class ConfigError(FedgeError):
    """A configuration value is missing, mistyped or out of range; the message names it."""


def parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None


def overlay_env(data: dict[str, Any], env: Mapping[str, str], prefix: str) -> dict[str, Any]:
    """Copies ``data`` and applies ``{PREFIX}__{TABLE}__{KEY}=value`` overrides.

    Values are parsed as TOML values when possible (numbers, booleans, arrays), else taken as
    strings, so ``FEDGE_AGENT__ROUNDS__CODEC=int8`` and ``...__MIN_DEVICES=3`` both work.
    """
    out: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    marker = prefix + "__"
    for name, raw in env.items():
        if not name.startswith(marker):
            continue
        path = [p.lower() for p in name[len(marker) :].split("__")]
        if len(path) != 2 or not all(path):
            raise ConfigError(f"{name}: expected {marker}TABLE__KEY")
        table, key = path
        section = out.setdefault(table, {})
        if not isinstance(section, dict):
            raise ConfigError(f"{name}: [{table}] is not a table")
        try:
            section[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            section[key] = raw
    return out


class Table:
    """Typed access to one TOML table, naming ``[table] key`` in every error."""

    def __init__(self, data: Mapping[str, Any], name: str, allowed: set[str]) -> None:
        raw = data.get(name, {})
        if not isinstance(raw, Mapping):
            raise ConfigError(f"[{name}] must be a table")
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise ConfigError(f"[{name}] unknown keys {unknown}; allowed: {sorted(allowed)}")
        self.raw = raw
        self.name = name

    def _where(self, key: str) -> str:
        return f"[{self.name}] {key}"

    def text(self, key: str, default: str | None = None) -> str:
        value = self.raw.get(key, default)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{self._where(key)} must be a non-empty string")
        return value

    def opt_text(self, key: str) -> str | None:
        value = self.raw.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise ConfigError(f"{self._where(key)} must be a string")
        return value

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ConfigError(f"{self._where(key)} must be an integer in {lo}..{hi}, got {value!r}")
        return value

    def number(self, key: str, default: float, lo: float, hi: float) -> float:
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            raise ConfigError(f"{self._where(key)} must be a number in {lo}..{hi}, got {value!r}")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self._where(key)} must be true or false")
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.raw.get(key, default)
        if value not in choices:
            raise ConfigError(f"{self._where(key)} must be one of {list(choices)}, got {value!r}")
        return f"{value}"
