"""Configuration sources: a TOML document overlaid with environment variables.

Both the agent and the aggregator read a dataclass from a TOML file and let environment
variables override single values (``FEDGE_AGENT__MQTT__BROKER=mqtt://...`` sets
``[mqtt] broker``), the way containers and systemd ``EnvironmentFile`` s configure services.

The rules for a config that holds a secret - size-bounded, owner-only if it holds a password -
must be the same for both services, so they are here (:func:`config_document`,
:func:`secret_text`). Pure, like all of ``protocol``: each service reads the bytes and the
file's mode with its own :data:`FileReader` and passes them in, with the environment.
"""

from __future__ import annotations

import stat
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedge.protocol.errors import FedgeError

#: A config file is a few KB; anything far bigger is not one (and must not be read whole).
MAX_CONFIG_BYTES = 1024 * 1024
#: A password file holds one line.
MAX_SECRET_FILE_BYTES = 4096

#: ``read(path, limit, what) -> (content, st_mode)``: a regular file's bytes (a ConfigError
#: naming ``what`` if it is unreadable, not a regular file, or over ``limit`` bytes) and the
#: mode of the very file read. The I/O the services do for :func:`config_document` and
#: ``password_file``; ``fedge.agent.config`` and ``fedge.aggregator.config`` each have one.
FileReader = Callable[[Path, int, str], tuple[bytes, int]]


class ConfigError(FedgeError):
    """A configuration value is missing, mistyped or out of range; the message names it."""


def _password_tables(data: Mapping[str, Any], where: str = "") -> list[str]:
    """The tables of a parsed document that hold a ``password`` key (nested ones too)."""
    found = [where or "(top level)"] if "password" in data else []
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        for table in value if isinstance(value, list) else [value]:
            if isinstance(table, Mapping):
                found += _password_tables(table, name)
    return found


def config_document(
    raw: bytes, st_mode: int, path: Path, env: Mapping[str, str], prefix: str
) -> dict[str, Any]:
    """The TOML document ``raw`` (the file ``path``, of mode ``st_mode``) overlaid with
    ``{prefix}__TABLE__KEY`` variables of ``env``.

    It must be UTF-8 TOML (the reader bounded its size: :data:`MAX_CONFIG_BYTES`). A file that
    holds a ``password`` in any table must be readable by its owner alone, as private keys
    must (no group or other permission bits): a 0644 config would hand the broker password
    to every local user. (Passwords from ``env`` are not in the file, so they are not judged
    here; a ``password_file`` is checked when it is read.)
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read config {path}: not UTF-8 text") from None
    data = parse_toml(text, str(path))
    mode = stat.S_IMODE(st_mode)
    holders = _password_tables(data)
    if mode & 0o077 and holders:
        raise ConfigError(
            f"config {path} holds a password ([{holders[0]}] password) but is accessible by group or "
            f"others (mode {mode:04o}): chmod 600 {path}, or move the password to a password_file"
        )
    return overlay_env(data, env, prefix)


def secret_text(raw: bytes, st_mode: int, path: Path, what: str) -> str:
    """The secret in ``raw`` (the file ``path`` of mode ``st_mode``): one line of UTF-8 text,
    one trailing newline stripped.

    The file must be readable by its owner alone (mode 0600 or 0400), the rule for private
    keys; an empty secret is refused (it would silently mean "no password").
    """
    mode = stat.S_IMODE(st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"{what} {path} is accessible by group or others (mode {mode:04o}): chmod 600 {path}"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not UTF-8 text") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise ConfigError(f"{what} {path} is empty")
    if "\n" in text or "\r" in text:
        raise ConfigError(f"{what} {path} holds more than one line")
    return text


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
