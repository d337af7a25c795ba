"""The device's small persisted state: which global model it trusts, and its update counter.

Two values guard the protocol and must never go backwards, not even after a crash or a
power cut:

- the newest accepted global-manifest version (and its SHA-256): an attacker or a stale
  retained MQTT message must not roll the device back to an older global model, and the
  manifest that directly follows it must name it as its parent (the chain);
- the per-device update counter: it is incremented and written to disk *before* an update is
  sealed, so no two updates ever carry the same counter.

The state is one JSON file, replaced atomically (temp file in the same directory, fsync,
``os.replace``, fsync of the directory) and readable only by its owner (mode 0600). A corrupt
or malformed file is an error, never a silent reset to defaults: a reset would reopen both
doors above. One process owns the file; within it, a lock makes read-modify-write safe.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedge.protocol.bounded_json import loads_state_file
from fedge.protocol.errors import FedgeError
from fedge.shell.files import atomic_write
from fedge.shell.storage_faults import StorageFault, storage_fault

FORMAT = 1
#: The state is a few hundred bytes; refuse to parse anything absurd.
MAX_STATE_BYTES = 1024 * 1024
#: Counters travel in signed 64-bit fields.
MAX_COUNTER = 2**63 - 1
_SHA256_RE = re.compile(r"[0-9a-f]{64}")  # used with fullmatch
_PARENT_RE = re.compile(r"(?:[0-9a-f]{64})?")  # the first manifest has no parent: ""
_KEYS = {"format", "manifest_version", "manifest_sha256", "update_counter", "last_round_id", "extra"}


class DeviceStateError(FedgeError):
    """The state file is unreadable, corrupt or malformed, or a new state would break an invariant."""


class DeviceStateStorageFault(DeviceStateError, StorageFault):
    """The state directory is full or read-only: the file on disk is the previous state."""


class ManifestRollbackError(FedgeError):
    """A global manifest older than (or conflicting with) the accepted one was offered."""

    def __init__(self, message: str, stored_version: int, offered_version: int) -> None:
        super().__init__(message)
        self.stored_version = stored_version
        self.offered_version = offered_version


class ManifestChainError(FedgeError):
    """The manifest right after the accepted one does not name it as its parent."""

    def __init__(self, message: str, stored_version: int, offered_version: int) -> None:
        super().__init__(message)
        self.stored_version = stored_version
        self.offered_version = offered_version


@dataclass(frozen=True)
class DeviceState:
    """A snapshot of the persisted state; change it with :func:`dataclasses.replace`.

    ``manifest_version`` and ``manifest_sha256`` are both None until a manifest is accepted.
    ``extra`` holds free-form JSON values (not hashable, so neither is a state).
    """

    manifest_version: int | None = None
    manifest_sha256: str | None = None
    update_counter: int = 0
    last_round_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class DeviceStateStore:
    """Loads and atomically saves one :class:`DeviceState` JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()

    def load(self) -> DeviceState:
        """The stored state; a fresh default if the file does not exist yet."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return DeviceState()
        except OSError as exc:
            raise DeviceStateError(f"cannot read device state {self.path}: {exc.strerror}") from None
        if len(raw) > MAX_STATE_BYTES:
            raise DeviceStateError(f"device state {self.path} is over {MAX_STATE_BYTES} bytes")
        try:
            data = loads_state_file(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise DeviceStateError(f"device state {self.path} is not valid JSON: {exc}") from None
        return _state_from_dict(data, self.path)

    def save(self, state: DeviceState) -> None:
        """Writes ``state`` atomically, refusing to move the counter or the manifest backwards.

        The check against the file on disk catches a caller saving a stale snapshot, which
        would otherwise hand out an already used counter again.
        """
        _validate(state, "device state")
        text = json.dumps(_state_to_dict(state), indent=2, sort_keys=True, allow_nan=False) + "\n"
        with self._lock:
            current = self.load()
            if state.update_counter < current.update_counter:
                raise DeviceStateError(
                    f"device state {self.path}: update counter would go back from "
                    f"{current.update_counter} to {state.update_counter}"
                )
            if state.manifest_version is None or state.manifest_sha256 is None:
                if current.manifest_version is not None:
                    raise DeviceStateError(
                        f"device state {self.path}: cannot forget accepted manifest "
                        f"version {current.manifest_version}"
                    )
            else:
                _check_manifest(current, state.manifest_version, state.manifest_sha256)
            _write_atomically(self.path, text.encode("utf-8"))

    def update(self, change: Callable[[DeviceState], DeviceState]) -> DeviceState:
        """Loads, applies ``change`` and saves, under the store's lock; returns the new state."""
        with self._lock:
            new = change(self.load())
            self.save(new)
            return new

    def next_counter(self) -> int:
        """Reserves the next update counter (1 first) and persists it before returning it."""

        def bump(state: DeviceState) -> DeviceState:
            if state.update_counter >= MAX_COUNTER:
                raise DeviceStateError(f"device state {self.path}: update counter exhausted")
            return replace(state, update_counter=state.update_counter + 1)

        return self.update(bump).update_counter

    def accept_manifest(self, version: int, sha256: str, *, parent_sha256: str) -> bool:
        """Records a newer global manifest; False if it is the one already accepted.

        Raises :class:`ManifestRollbackError` for an older version, or for the accepted
        version with a different hash (two different models under one version number), and
        :class:`ManifestChainError` when ``version`` is exactly the accepted version + 1 but
        ``parent_sha256`` is not the accepted manifest's hash: the aggregator names the
        previous manifest in every new one, so a signed manifest that does not is not the
        successor of the model this device runs.

        Where the chain cannot be checked it is not: the first manifest a device accepts
        (it was provisioned with no history), and a manifest that skips versions (the device
        was offline while the ones between were published; it never saw them, and the
        retained topic only holds the newest). The signature still vouches for those.
        """
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise DeviceStateError(f"manifest version must be an integer >= 0, got {version!r}")
        if not isinstance(sha256, str) or not _SHA256_RE.fullmatch(sha256):
            raise DeviceStateError(f"manifest sha256 must be 64 lowercase hex digits, got {sha256!r}")
        if not isinstance(parent_sha256, str) or not _PARENT_RE.fullmatch(parent_sha256):
            raise DeviceStateError(
                f"manifest parent_sha256 must be empty or 64 lowercase hex digits, got {parent_sha256!r}"
            )
        with self._lock:
            current = self.load()
            if not manifest_is_new(current, version, sha256, parent_sha256=parent_sha256):
                return False
            self.save(replace(current, manifest_version=version, manifest_sha256=sha256))
            return True


def manifest_is_new(current: DeviceState, version: int, sha256: str, *, parent_sha256: str) -> bool:
    """True if the manifest (version, sha256, parent) moves ``current`` forward, False if it is
    the accepted one; raises :class:`ManifestRollbackError` or :class:`ManifestChainError` (the
    rules of :meth:`DeviceStateStore.accept_manifest`, on a snapshot: ``fedge.agent.core``)."""
    if _check_manifest(current, version, sha256):
        return False
    _check_chain(current, version, parent_sha256)
    return True


def _check_manifest(current: DeviceState, version: int, sha256: str) -> bool:
    """True if (version, sha256) is the accepted manifest, False if newer; raises if a rollback."""
    stored = current.manifest_version
    if stored is None:
        return False
    if version < stored:
        raise ManifestRollbackError(
            f"refusing global manifest version {version}: version {stored} is already accepted",
            stored,
            version,
        )
    if version == stored:
        if sha256 != current.manifest_sha256:
            raise ManifestRollbackError(
                f"refusing global manifest version {version} with SHA-256 {sha256}: that version "
                f"was accepted with SHA-256 {current.manifest_sha256}",
                stored,
                version,
            )
        return True
    return False


def _check_chain(current: DeviceState, version: int, parent_sha256: str) -> None:
    """Raises if ``version`` directly follows the accepted manifest but names another parent."""
    stored = current.manifest_version
    if stored is None or version != stored + 1 or parent_sha256 == current.manifest_sha256:
        return
    raise ManifestChainError(
        f"refusing global manifest version {version}: its parent is {parent_sha256 or 'none'}, "
        f"not version {stored} ({current.manifest_sha256}), which this device accepted",
        stored,
        version,
    )


# --- JSON ----------------------------------------------------------------------------------


def _state_to_dict(state: DeviceState) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "manifest_version": state.manifest_version,
        "manifest_sha256": state.manifest_sha256,
        "update_counter": state.update_counter,
        "last_round_id": state.last_round_id,
        "extra": state.extra,
    }


def _state_from_dict(data: Any, path: Path) -> DeviceState:
    where = f"device state {path}"
    if not isinstance(data, dict):
        raise DeviceStateError(f"{where}: expected a JSON object, got {type(data).__name__}")
    missing = sorted(_KEYS - data.keys())
    unknown = sorted(data.keys() - _KEYS)
    if missing or unknown:
        raise DeviceStateError(f"{where}: missing keys {missing}, unknown keys {unknown}")
    if type(data["format"]) is not int or data["format"] != FORMAT:
        raise DeviceStateError(f"{where}: format {data['format']!r} is not {FORMAT}")
    state = DeviceState(
        manifest_version=data["manifest_version"],
        manifest_sha256=data["manifest_sha256"],
        update_counter=data["update_counter"],
        last_round_id=data["last_round_id"],
        extra=data["extra"],
    )
    _validate(state, where)
    return state


def _validate(state: DeviceState, where: str) -> None:
    """Checks types and ranges; JSON gives no guarantees and a caller may pass anything."""

    def is_int(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    v, sha = state.manifest_version, state.manifest_sha256
    if v is not None and not (is_int(v) and v >= 0):
        raise DeviceStateError(f"{where}: manifest_version must be an integer >= 0 or null, got {v!r}")
    if sha is not None and not (isinstance(sha, str) and _SHA256_RE.fullmatch(sha)):
        raise DeviceStateError(f"{where}: manifest_sha256 must be 64 lowercase hex digits, got {sha!r}")
    if (v is None) != (sha is None):
        raise DeviceStateError(f"{where}: manifest_version and manifest_sha256 must be set together")
    c = state.update_counter
    if not (is_int(c) and 0 <= c <= MAX_COUNTER):
        raise DeviceStateError(f"{where}: update_counter must be an integer in 0..{MAX_COUNTER}, got {c!r}")
    r = state.last_round_id
    if r is not None and not isinstance(r, str):
        raise DeviceStateError(f"{where}: last_round_id must be a string or null, got {r!r}")
    if not isinstance(state.extra, dict) or not all(isinstance(k, str) for k in state.extra):
        raise DeviceStateError(f"{where}: extra must be a JSON object with string keys")
    try:
        json.dumps(state.extra, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise DeviceStateError(f"{where}: extra is not plain JSON: {exc}") from None


# --- files ---------------------------------------------------------------------------------


def _write_atomically(path: Path, data: bytes) -> None:
    """:func:`fedge.shell.files.atomic_write` (mode 0600), its errors worded for this file.

    A crash at any point leaves either the old file or the new one, never a mix; at worst a
    stray ``.<name>.*.tmp`` file, which :meth:`DeviceStateStore.load` ignores.
    """
    try:
        atomic_write(path, data)
    except OSError as exc:
        found = storage_fault(exc)
        if found is not None:
            raise DeviceStateStorageFault("device state", path, *found) from None
        raise DeviceStateError(f"cannot write device state {path}: {exc.strerror}") from None
