"""The device's trust store: which aggregator signing keys it trusts now, and which it retired.

At provisioning a device pins the aggregator's Ed25519 verify keys (``aggregator_verify_keys``
in its config). After that the set of trusted keys changes only through a key rotation
(:mod:`fedge.protocol.key_rotation`): a rotation document signed by a key the device trusts *right
now* vouches for a new key. This module persists the outcome, so it survives restarts.

Choices, and why:

- **The vouching key is retired immediately** when its rotation is accepted, not after a
  grace period. A rotation usually happens because the old key may be exposed (a gateway
  replaced, a backup leaked); with a grace period a thief could keep signing manifests with
  it, or sign a competing rotation to a key of their own, for as long as the period lasts.
  The price is operational: the aggregator must publish the rotation *before* it signs
  manifests with the new key, and stop using the old one at the same time (``fedge keys
  rotate`` switches the key file and writes the rotation document in one step). Other pinned
  keys (a backup key, say) stay trusted.
- **Rotations are strictly ordered**: the store keeps the newest accepted sequence and
  refuses any rotation at or below it, so a recorded old rotation cannot be replayed. A
  retired key is never trusted again, not even when a (correctly signed) rotation names it.
  Re-delivery of the very rotation last accepted (a retained MQTT message after a reconnect)
  is not an attack and not an error: :meth:`TrustStore.accept_rotation` returns False.
- **The file wins over the config.** After a rotation the config still lists the old key;
  re-reading it at start-up would re-trust a retired key. The config's keys are used only
  to create the store. A config that pins a key the store has never seen means the device was
  re-provisioned: that is an error telling the operator to remove the store, never a silent
  merge.
- **Corrupt is an error, never a reset** (resetting would re-trust rotated-out keys). The file
  is one JSON object, replaced atomically (temp file, fsync, rename, fsync of the directory),
  mode 0600.

File format (``format`` 1)::

    {"format": 1, "fleet": "demo",
     "trusted": {"<key id>": "<base64 verify key>", ...},
     "retired": {"<key id>": {"key": "<base64>", "retired_at": 1738315800.0, "sequence": 1}},
     "rotation_sequence": 1, "last_rotation_sha256": "<hex of the frame>" | null}
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacl.signing import VerifyKey

from fedge.protocol.bounded_json import loads_state_file
from fedge.protocol.digests import is_sha256_hex
from fedge.protocol.errors import FedgeError
from fedge.protocol.key_rotation import MAX_SEQUENCE, RotationError, claimed_key_id, verify_rotation
from fedge.protocol.signing import SignatureError, key_id
from fedge.protocol.topics import TopicError, check_id
from fedge.shell.files import atomic_write

FORMAT = 1
TRUST_FILE_MODE = 0o600
#: A trust store is a few hundred bytes; refuse to parse anything absurd.
MAX_TRUST_BYTES = 1024 * 1024
_KEYS = {"format", "fleet", "trusted", "retired", "rotation_sequence", "last_rotation_sha256"}


class TrustError(FedgeError):
    """The trust store cannot be created, read or trusted; the message says what to do."""


@dataclass(frozen=True)
class RetiredKey:
    """A key that was trusted until rotation ``sequence`` replaced it (device time ``retired_at``)."""

    key: VerifyKey
    retired_at: float
    sequence: int


@dataclass(frozen=True)
class TrustState:
    fleet: str
    trusted: dict[str, VerifyKey]
    retired: dict[str, RetiredKey]
    rotation_sequence: int = 0
    last_rotation_sha256: str | None = None


class TrustStore:
    """The persisted trust state of one device; open it with :meth:`open_or_create`."""

    def __init__(self, path: Path, state: TrustState) -> None:
        """Use :meth:`create`, :meth:`open` or :meth:`open_or_create`."""
        self.path = Path(path)
        self._state = state
        self._lock = threading.RLock()

    # --- opening ------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: Path, fleet: str, pinned: Iterable[VerifyKey]) -> TrustStore:
        """A new store trusting ``pinned`` (from provisioning); refuses to replace an existing one."""
        keys = list(pinned)
        try:
            check_id(fleet, "fleet id")
        except TopicError as exc:
            raise TrustError(f"trust store {path}: {exc}") from None
        if not keys or not all(isinstance(k, VerifyKey) for k in keys):
            raise TrustError(f"trust store {path}: at least one pinned verify key is needed")
        state = TrustState(fleet=fleet, trusted={key_id(k): k for k in keys}, retired={})
        _write_atomically(Path(path), _encode(state), replace=False)
        return cls(Path(path), state)

    @classmethod
    def open(cls, path: Path) -> TrustStore:
        """The existing store at ``path``; a missing or corrupt file is a :class:`TrustError`."""
        return cls(Path(path), _load(Path(path)))

    @classmethod
    def open_or_create(cls, path: Path, fleet: str, pinned: Iterable[VerifyKey]) -> TrustStore:
        """What the agent calls at start-up with its config's fleet and pinned keys.

        Creates the store on first start. Afterwards the file wins (see the module docstring);
        a different fleet, or a pinned key the store has never seen, is an error.
        """
        path = Path(path)
        if not os.path.lexists(path):
            return cls.create(path, fleet, pinned)
        store = cls.open(path)
        state = store._state
        if state.fleet != fleet:
            raise TrustError(f"trust store {path} is for fleet {state.fleet!r}, the config says {fleet!r}")
        known = set(state.trusted) | set(state.retired)
        unseen = sorted(kid for kid in (key_id(k) for k in pinned) if kid not in known)
        if unseen:
            raise TrustError(
                f"the config pins verify key(s) {unseen} that trust store {path} has never trusted; "
                "if this device was re-provisioned, remove the trust store so that it is created "
                "again from the config"
            )
        return store

    # --- reading ------------------------------------------------------------------------------

    @property
    def fleet(self) -> str:
        return self._state.fleet

    @property
    def rotation_sequence(self) -> int:
        """The newest accepted rotation's sequence (0: none yet)."""
        return self._state.rotation_sequence

    def trusted_keys(self) -> dict[str, VerifyKey]:
        """key id -> verify key, for :func:`fedge.protocol.signing.verify_document` (a copy)."""
        with self._lock:
            return dict(self._state.trusted)

    def retired_keys(self) -> dict[str, RetiredKey]:
        with self._lock:
            return dict(self._state.retired)

    # --- rotation -----------------------------------------------------------------------------

    def accept_rotation(self, frame: bytes, now: float) -> bool:
        """Trusts the key a rotation vouches for and retires the vouching key; persisted first.

        Returns True if the trust changed, False if ``frame`` is the rotation accepted last
        (a re-delivery). Raises :class:`~protocol.signing.SignatureError` (``unknown_key``,
        ``bad_signature``, ``frame_*`` ...) or :class:`~protocol.key_rotation.RotationError`
        (``retired_key``, ``wrong_fleet``, ``stale_sequence``, ``same_key``, ``bad_document``
        ...); a refused rotation changes nothing. ``now`` (Unix seconds) is only recorded.
        """
        if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now) or now < 0:
            raise TrustError(f"now must be finite Unix seconds, got {now!r}")
        with self._lock:
            state = _load(self.path)  # the file is the truth, not what this object saw earlier
            if state.last_rotation_sha256 == hashlib.sha256(frame).hexdigest():
                self._state = state
                return False
            try:
                rotation = verify_rotation(frame, state.trusted, state.fleet, state.rotation_sequence)
            except SignatureError as exc:
                signer = claimed_key_id(frame) if exc.reason == "unknown_key" else None
                if signer is not None and signer in state.retired:
                    raise RotationError(
                        "retired_key",
                        f"signed by key {signer}, retired by rotation {state.retired[signer].sequence}",
                    ) from None
                raise
            if rotation.new_key_id in state.retired:
                raise RotationError(
                    "retired_key", f"rotation names key {rotation.new_key_id}, which was retired"
                )
            trusted = {kid: k for kid, k in state.trusted.items() if kid != rotation.signed_by}
            trusted[rotation.new_key_id] = rotation.new_key
            retired = dict(state.retired)
            retired[rotation.signed_by] = RetiredKey(
                state.trusted[rotation.signed_by], float(now), rotation.sequence
            )
            new = TrustState(
                fleet=state.fleet,
                trusted=trusted,
                retired=retired,
                rotation_sequence=rotation.sequence,
                last_rotation_sha256=rotation.frame_sha256,
            )
            _write_atomically(self.path, _encode(new), replace=True)
            self._state = new
            return True


# --- JSON --------------------------------------------------------------------------------------


def _encode(state: TrustState) -> bytes:
    data = {
        "format": FORMAT,
        "fleet": state.fleet,
        "trusted": {kid: _key_text(k) for kid, k in sorted(state.trusted.items())},
        "retired": {
            kid: {"key": _key_text(r.key), "retired_at": r.retired_at, "sequence": r.sequence}
            for kid, r in sorted(state.retired.items())
        },
        "rotation_sequence": state.rotation_sequence,
        "last_rotation_sha256": state.last_rotation_sha256,
    }
    return (json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def _load(path: Path) -> TrustState:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_TRUST_BYTES + 1)
    except FileNotFoundError:
        raise TrustError(f"trust store {path} does not exist") from None
    except OSError as exc:
        raise TrustError(f"cannot read trust store {path}: {exc.strerror}") from None
    if len(raw) > MAX_TRUST_BYTES:
        raise _corrupt(path, f"over {MAX_TRUST_BYTES} bytes")
    try:
        data = loads_state_file(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _corrupt(path, "not valid JSON") from None
    try:
        return _state_from_dict(data)
    except (ValueError, TypeError, KeyError) as exc:
        raise _corrupt(path, str(exc)) from None


def _corrupt(path: Path, detail: str) -> TrustError:
    return TrustError(
        f"trust store {path} is corrupt ({detail}); refusing to start: starting over from the "
        "config could trust signing keys that were rotated out. Restore the file from a backup, "
        "or re-provision the device (remove the file; the config's keys are pinned again)"
    )


def _state_from_dict(data: Any) -> TrustState:
    """Checks everything; raises ValueError/TypeError/KeyError with a short description."""
    if not isinstance(data, dict) or set(data) != _KEYS:
        raise ValueError(f"expected an object with exactly the keys {sorted(_KEYS)}")
    if type(data["format"]) is not int or data["format"] != FORMAT:
        raise ValueError(f"format {data['format']!r} is not {FORMAT}")
    fleet = data["fleet"]
    try:
        check_id(fleet, "fleet id")
    except TopicError as exc:
        raise ValueError(str(exc)) from None
    sequence = data["rotation_sequence"]
    if type(sequence) is not int or not 0 <= sequence <= MAX_SEQUENCE:
        raise ValueError("rotation_sequence must be an integer >= 0")
    last = data["last_rotation_sha256"]
    if sequence == 0:
        if last is not None:
            raise ValueError("last_rotation_sha256 must be null before any rotation")
    elif not is_sha256_hex(last):
        raise ValueError("last_rotation_sha256 must be 64 lowercase hex digits")
    if not isinstance(data["trusted"], dict) or not data["trusted"]:
        raise ValueError("trusted must be a non-empty object of key id -> key")
    trusted = {kid: _key_from_text(kid, text) for kid, text in data["trusted"].items()}
    if not isinstance(data["retired"], dict):
        raise ValueError("retired must be an object")
    retired: dict[str, RetiredKey] = {}
    for kid, entry in data["retired"].items():
        if not isinstance(entry, dict) or set(entry) != {"key", "retired_at", "sequence"}:
            raise ValueError(f"retired key {kid}: expected {{key, retired_at, sequence}}")
        at, seq = entry["retired_at"], entry["sequence"]
        if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at) or at < 0:
            raise ValueError(f"retired key {kid}: retired_at must be finite Unix seconds")
        if type(seq) is not int or not 1 <= seq <= sequence:
            raise ValueError(f"retired key {kid}: sequence must be in 1..{sequence}")
        retired[kid] = RetiredKey(_key_from_text(kid, entry["key"]), float(at), seq)
    both = sorted(set(trusted) & set(retired))
    if both:
        raise ValueError(f"keys {both} are both trusted and retired")
    # Every accepted rotation retired exactly one key, the last one at rotation_sequence.
    sequences = [r.sequence for r in retired.values()]
    if len(set(sequences)) != len(sequences) or (sequence > 0 and sequence not in sequences):
        raise ValueError("retired keys do not match the accepted rotations")
    return TrustState(fleet, trusted, retired, sequence, last)


def _key_from_text(kid: Any, text: Any) -> VerifyKey:
    if not isinstance(text, str):
        raise ValueError(f"key {kid!r} must be a base64 string")
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raise ValueError(f"key {kid!r} is not base64") from None
    if len(raw) != 32:
        raise ValueError(f"key {kid!r} must be 32 bytes")
    key = VerifyKey(raw)
    if kid != key_id(key):
        raise ValueError(f"key id {kid!r} does not match its key")
    return key


def _key_text(key: VerifyKey) -> str:
    return base64.b64encode(bytes(key)).decode()



# --- files -------------------------------------------------------------------------------------


def _write_atomically(path: Path, data: bytes, *, replace: bool) -> None:
    """:func:`fedge.shell.files.atomic_write` with :data:`TRUST_FILE_MODE`: renamed over
    ``path``, or linked if ``replace`` is False, so an existing store is never overwritten."""
    try:
        atomic_write(path, data, TRUST_FILE_MODE, replace=replace)
    except FileExistsError:  # only the link of replace=False meets an existing name
        raise TrustError(f"trust store {path} already exists; refusing to replace it") from None
    except OSError as exc:
        raise TrustError(f"cannot write trust store {path}: {exc.strerror}") from None
