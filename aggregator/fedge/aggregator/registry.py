"""The registry of enrolled devices: device id -> X25519 public key (a TOML file).

::

    [devices]
    "watch-01" = "base64 public key"

    [revoked]
    "watch-02" = { public_key = "base64", revoked_at = 2025-01-31T09:30:00Z, reason = "lost" }

An update is opened only with the key enrolled for the device id it claims, so a device
cannot speak for another one. ``fedge enroll`` / ``fedge revoke`` manage this file.

Why revoked devices stay in the file: a revoked key may be in an attacker's hands (a stolen
sensor). If revoking simply deleted the line, the same key could later be enrolled again by
mistake, under the same id or another one, and the attacker would be back. So ``[revoked]``
keeps every revoked key (``earlier_keys`` holds those of earlier revocations of the same id),
and enrollment refuses:

- a key that is revoked, always (a revoked key is never trusted again; the device makes a new
  key with ``fedge keys device``);
- a key enrolled for another device (Box authenticates the *key*: two ids sharing one key
  could speak for each other);
- a revoked id, unless ``force``: bringing a device back is a deliberate act. It is then
  listed under both tables: active with its new key, and with its revoked keys.

:func:`load_registry` (what the aggregator uses) returns only active devices. Writes take a
``flock`` on a sidecar lock file (``.devices.toml.lock``: the registry itself is replaced by
rename, so a lock on it would guard a file that is about to disappear) and are atomic (temp
file, fsync, rename, fsync of the directory); the file is public data, mode 0644. The
aggregator reads the registry again before every round (``AggregatorService._reload_registry``),
so an enrollment or a revocation takes effect from the next round on, without a restart; a
registry it cannot read is logged and the previous one kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from nacl.public import PublicKey

from fedge.protocol.config_source import ConfigError, parse_toml
from fedge.protocol.errors import FedgeError
from fedge.protocol.sealing import key_to_text, public_key_from_text
from fedge.protocol.topics import check_id
from fedge.shell.files import atomic_write

REGISTRY_MODE = 0o644
MAX_REASON_CHARS = 200
#: A registry of tens of thousands of devices is a few MB; refuse to parse anything absurd.
MAX_REGISTRY_BYTES = 64 * 1024 * 1024
_REVOKED_FIELDS = {"public_key", "revoked_at", "reason"}
_HEADER = (
    "# fedge device registry: device id = X25519 public key (base64).\n"
    "# Managed by `fedge enroll` and `fedge revoke`; [revoked] keeps revoked keys so that they\n"
    "# are never enrolled again.\n"
)

Status = Literal["active", "revoked", "unknown"]


class RegistryError(ConfigError):
    """The registry is unreadable or malformed, or a change to it is refused.

    A :class:`ConfigError`, so callers of :func:`load_registry` that handle configuration
    errors keep working. ``reason`` is a short stable code (``key_revoked``, ``key_in_use``,
    ``revoked_id``, ``id_in_use``, ``not_enrolled``, ``bad_key``, ``bad_id``, ``bad_reason``,
    ``bad_file``).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Revocation:
    """A revoked device: its last key, when and why; ``earlier_keys`` from earlier revocations."""

    device_id: str
    public_key: PublicKey
    revoked_at: datetime
    reason: str
    earlier_keys: tuple[PublicKey, ...] = ()

    def all_keys(self) -> tuple[PublicKey, ...]:
        """Every key ever revoked under this id: none of them may be enrolled again."""
        return (self.public_key, *self.earlier_keys)


@dataclass(frozen=True)
class Registry:
    """Everything in a registry file: active devices and revocations (an id can be in both)."""

    devices: dict[str, PublicKey] = field(default_factory=dict)
    revoked: dict[str, Revocation] = field(default_factory=dict)

    def status(self, device_id: str) -> Status:
        if device_id in self.devices:
            return "active"
        return "revoked" if device_id in self.revoked else "unknown"

    def key_holder(self, key: PublicKey) -> tuple[str, Status] | None:
        """Who uses ``key``: ``(device id, "active")``, ``(device id, "revoked")`` or None."""
        raw = bytes(key)
        for device_id, active in self.devices.items():
            if bytes(active) == raw:
                return device_id, "active"
        for device_id, revocation in self.revoked.items():
            if any(bytes(k) == raw for k in revocation.all_keys()):
                return device_id, "revoked"
        return None


# --- reading -----------------------------------------------------------------------------------


def load_registry(path: Path) -> dict[str, PublicKey]:
    """The ACTIVE devices (id -> public key): what the aggregator opens updates with."""
    return dict(load_registry_file(path).devices)


def load_registry_file(path: Path) -> Registry:
    """The whole registry, revocations included (for the CLI and status)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_REGISTRY_BYTES + 1)
    except OSError as exc:
        raise RegistryError("bad_file", f"cannot read device registry {path}: {exc.strerror}") from None
    if len(raw) > MAX_REGISTRY_BYTES:
        raise RegistryError("bad_file", f"device registry {path} is over {MAX_REGISTRY_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RegistryError("bad_file", f"device registry {path} is not UTF-8 text") from None
    return parse_registry(text, str(path))


def parse_registry(text: str, source: str) -> Registry:
    """Parses and checks a registry document; every problem names ``source`` and the device."""
    try:
        data = parse_toml(text, source)
    except ConfigError as exc:
        raise RegistryError("bad_file", str(exc)) from None
    devices_raw = data.get("devices", {})
    revoked_raw = data.get("revoked", {})
    if (
        set(data) - {"devices", "revoked"}
        or not isinstance(devices_raw, dict)
        or not isinstance(revoked_raw, dict)
    ):
        raise RegistryError(
            "bad_file",
            f'{source}: expected a [devices] table of id = "public key" and an optional [revoked] table',
        )
    devices: dict[str, PublicKey] = {}
    for device_id, key_text in devices_raw.items():
        where = f"{source}: device {device_id!r}"
        _check_device_id(device_id, where)
        if not isinstance(key_text, str):
            raise RegistryError("bad_file", f"{where}: public key must be a string")
        devices[device_id] = _public_key(key_text, where)
    revoked: dict[str, Revocation] = {}
    for device_id, entry in revoked_raw.items():
        where = f"{source}: revoked device {device_id!r}"
        revoked[device_id] = _revocation_from_toml(device_id, entry, where)
    registry = Registry(devices, revoked)
    _check_unique_keys(registry, source)
    return registry


def _revocation_from_toml(device_id: str, entry: Any, where: str) -> Revocation:
    _check_device_id(device_id, where)
    if not isinstance(entry, dict) or not _REVOKED_FIELDS <= set(entry) <= _REVOKED_FIELDS | {"earlier_keys"}:
        raise RegistryError(
            "bad_file", f"{where}: expected {{public_key, revoked_at, reason[, earlier_keys]}}"
        )
    key_text, revoked_at, reason = entry["public_key"], entry["revoked_at"], entry["reason"]
    if not isinstance(key_text, str):
        raise RegistryError("bad_file", f"{where}: public_key must be a string")
    if not isinstance(revoked_at, datetime) or revoked_at.tzinfo is None:
        raise RegistryError("bad_file", f"{where}: revoked_at must be a date-time with offset (e.g. ...Z)")
    if not isinstance(reason, str):
        raise RegistryError("bad_file", f"{where}: reason must be a string")
    earlier_raw = entry.get("earlier_keys", [])
    if not isinstance(earlier_raw, list) or not all(isinstance(k, str) for k in earlier_raw):
        raise RegistryError("bad_file", f"{where}: earlier_keys must be a list of base64 keys")
    return Revocation(
        device_id=device_id,
        public_key=_public_key(key_text, where),
        revoked_at=revoked_at.astimezone(UTC),
        reason=reason,
        earlier_keys=tuple(_public_key(k, where) for k in earlier_raw),
    )


def _check_unique_keys(registry: Registry, source: str) -> None:
    """Refuses a file where one key has two holders: a hand edit that would undo a revocation."""
    seen: dict[bytes, str] = {}

    def claim(key: PublicKey, holder: str) -> None:
        previous = seen.setdefault(bytes(key), holder)
        if previous != holder:
            raise RegistryError("bad_file", f"{source}: {previous} and {holder} share a public key")

    for device_id, key in registry.devices.items():
        claim(key, f"device {device_id!r}")
    for device_id, revocation in registry.revoked.items():
        for key in revocation.all_keys():
            claim(key, f"revoked device {device_id!r}")


def _check_device_id(device_id: str, where: str) -> None:
    try:
        check_id(device_id)
    except FedgeError as exc:
        raise RegistryError("bad_id", f"{where}: {exc}") from None


def _public_key(text: str, where: str) -> PublicKey:
    try:
        return public_key_from_text(text)
    except FedgeError as exc:
        raise RegistryError("bad_key", f"{where}: {exc}") from None


# --- changes (pure) ------------------------------------------------------------------------------


def with_enrolled(
    registry: Registry, device_id: str, public_key: str, *, force: bool = False
) -> tuple[Registry, bool]:
    """``registry`` with the device enrolled; ``changed`` is False if it already was (same key).

    Refusals are :class:`RegistryError` (see the module docstring for why each one exists).
    """
    _check_device_id(device_id, "enroll")
    key = _public_key(public_key, f"device {device_id!r}")
    holder = registry.key_holder(key)
    if holder is not None:
        other, status = holder
        if status == "revoked":
            revocation = registry.revoked[other]
            raise RegistryError(
                "key_revoked",
                f"this public key was revoked (device {other!r}, {_format_time(revocation.revoked_at)}); "
                "a revoked key is never enrolled again: make a new key with `fedge keys device`",
            )
        if other == device_id:
            return registry, False
        raise RegistryError("key_in_use", f"this public key is already enrolled for device {other!r}")
    if device_id in registry.devices:
        raise RegistryError(
            "id_in_use",
            f"device {device_id!r} is already enrolled with another key; revoke it first "
            "(`fedge revoke`), then enroll the new key with --force",
        )
    if device_id in registry.revoked and not force:
        revocation = registry.revoked[device_id]
        raise RegistryError(
            "revoked_id",
            f"device {device_id!r} was revoked {_format_time(revocation.revoked_at)}"
            f"{_reason_suffix(revocation.reason)}; pass --force to enroll it again with a new key",
        )
    devices = dict(registry.devices)
    devices[device_id] = key
    return Registry(devices, dict(registry.revoked)), True


def with_revoked(registry: Registry, device_id: str, reason: str, at: datetime) -> tuple[Registry, bool]:
    """``registry`` with the device revoked; ``changed`` is False if it already was revoked."""
    _check_device_id(device_id, "revoke")
    check_reason(reason)
    if at.tzinfo is None:
        raise ValueError("revocation time must be timezone-aware")
    if device_id not in registry.devices:
        if device_id in registry.revoked:
            return registry, False
        raise RegistryError("not_enrolled", f"device {device_id!r} is not enrolled")
    devices = dict(registry.devices)
    key = devices.pop(device_id)
    revoked = dict(registry.revoked)
    previous = revoked.get(device_id)
    revoked[device_id] = Revocation(
        device_id=device_id,
        public_key=key,
        revoked_at=at.astimezone(UTC).replace(microsecond=0),
        reason=reason,
        earlier_keys=previous.all_keys() if previous is not None else (),
    )
    return Registry(devices, revoked), True


def check_reason(reason: str) -> str:
    """A revocation reason is one line of printable text: it is shown in listings and logs."""
    if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS:
        raise RegistryError("bad_reason", f"reason must be at most {MAX_REASON_CHARS} characters")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in reason):
        raise RegistryError("bad_reason", "reason must be one line of printable text")
    return reason


# --- writing -----------------------------------------------------------------------------------


def render_registry(devices: dict[str, str]) -> str:
    lines = ["[devices]"] + [f'"{d}" = "{k}"' for d, k in sorted(devices.items())]
    return "\n".join(lines) + "\n"


def render_registry_file(registry: Registry) -> str:
    """The registry as TOML: ``[devices]`` exactly as :func:`render_registry` writes it."""
    text = _HEADER + render_registry({d: key_to_text(k) for d, k in registry.devices.items()})
    if registry.revoked:
        lines = ["", "[revoked]"]
        for device_id, r in sorted(registry.revoked.items()):
            fields = [
                f'public_key = "{key_to_text(r.public_key)}"',
                f"revoked_at = {_format_time(r.revoked_at)}",
                f"reason = {_toml_string(r.reason)}",
            ]
            if r.earlier_keys:
                earlier = ", ".join(f'"{key_to_text(k)}"' for k in r.earlier_keys)
                fields.append(f"earlier_keys = [{earlier}]")
            lines.append(f'"{device_id}" = {{ ' + ", ".join(fields) + " }")
        text += "\n".join(lines) + "\n"
    return text


def enroll_device(path: Path, device_id: str, public_key: str, *, force: bool = False) -> bool:
    """Enrolls a device in the registry file (created if missing); False if already enrolled."""
    with _locked(path):
        registry, changed = with_enrolled(_load_or_empty(path), device_id, public_key, force=force)
        if changed:
            _write(path, render_registry_file(registry))
        return changed


def revoke_device(path: Path, device_id: str, reason: str = "", *, now: datetime | None = None) -> bool:
    """Revokes a device in the registry file; False if it was already revoked."""
    check_reason(reason)
    with _locked(path):
        registry, changed = with_revoked(
            _load_or_empty(path), device_id, reason, now if now is not None else datetime.now(UTC)
        )
        if changed:
            _write(path, render_registry_file(registry))
        return changed


def _load_or_empty(path: Path) -> Registry:
    """The current registry; empty only if the file does not exist (never if it is unreadable)."""
    if not os.path.lexists(path):
        return Registry()
    return load_registry_file(path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``.<name>.lock`` next to ``path``, held for read-modify-write.

    The lock file is left in place: deleting it would let a third writer lock a new inode
    while a second one still waits on the old.
    """
    lock_path = path.with_name(f".{path.name}.lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, REGISTRY_MODE)
    except OSError as exc:
        raise RegistryError("bad_file", f"cannot lock device registry {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write(path: Path, text: str) -> None:
    """:func:`fedge.shell.files.atomic_write` with :data:`REGISTRY_MODE` (0644: public data).

    Readers (the aggregator) see the old registry or the new one, never a half-written file.
    """
    try:
        atomic_write(path, text.encode("utf-8"), REGISTRY_MODE)
    except OSError as exc:
        raise RegistryError("bad_file", f"cannot write device registry {path}: {exc.strerror}") from None


def _format_time(at: datetime) -> str:
    """RFC 3339 UTC to the second: a TOML offset date-time, and readable in messages."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _reason_suffix(reason: str) -> str:
    return f" ({reason})" if reason else ""


def _toml_string(text: str) -> str:
    # check_reason has refused control characters, so escaping \ and " is enough.
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def registry_to_rows(registry: Registry) -> list[dict[str, Any]]:
    """One row per (device, status), sorted: what ``fedge registry list`` shows."""
    rows: list[dict[str, Any]] = []
    for device_id in sorted(set(registry.devices) | set(registry.revoked)):
        if device_id in registry.devices:
            rows.append(
                {
                    "id": device_id,
                    "status": "active",
                    "public_key": key_to_text(registry.devices[device_id]),
                    "revoked_at": None,
                    "reason": None,
                }
            )
        revocation = registry.revoked.get(device_id)
        if revocation is not None:
            rows.append(
                {
                    "id": device_id,
                    "status": "revoked",
                    "public_key": key_to_text(revocation.public_key),
                    "revoked_at": _format_time(revocation.revoked_at),
                    "reason": revocation.reason,
                    "earlier_keys": [key_to_text(k) for k in revocation.earlier_keys],
                }
            )
    return rows
