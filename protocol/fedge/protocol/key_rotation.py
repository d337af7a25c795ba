"""Rotation of the aggregator's signing key: the old key vouches for the new one.

Devices pin the aggregator's Ed25519 verify keys at provisioning. Re-provisioning every device
to change that key is not an option in a building full of sensors, so the aggregator announces
a new key in a *rotation document* signed with a key the devices already trust::

    {"fleet": "...", "new_key": "<base64 Ed25519 verify key>", "new_key_id": "<16 hex>",
     "issued_at": <Unix seconds>, "sequence": <1, 2, 3, ...>}

framed and signed like a manifest (:func:`fedge.protocol.signing.sign_document`, document type
``key-rotation``). The type is part of the signed bytes, so a round manifest can never be
passed off as a rotation, nor the other way round.

Why each field:

- ``fleet``: a rotation for another fleet (sharing an aggregator key) must not move this one.
- ``new_key_id``: devices look keys up by id; a document whose id does not match its key is
  malformed, not merely odd, so it is refused.
- ``sequence``: strictly increasing per fleet. A device remembers the newest sequence it
  accepted and refuses any rotation at or below it: an old rotation (or one an attacker
  recorded) cannot be replayed to move the device back to a retired key.
- ``issued_at``: informational (device clocks are not trusted for security decisions).

Pure: no I/O, no clock. The device side (persisting the trusted keys, retiring the vouching
key) is :mod:`fedge.agent.trust`; creating a rotation on disk is ``fedge keys rotate``.
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nacl.bindings import crypto_sign_ed25519_pk_to_curve25519
from nacl.signing import SigningKey, VerifyKey

from fedge.protocol.bounded_json import BoundedJsonError, loads_bounded
from fedge.protocol.framing import FrameError, FrameKind, decode_frame
from fedge.protocol.keyfile import KeyTextError, key_bytes_from_text
from fedge.protocol.reasons import FRAME_PREFIX
from fedge.protocol.signing import (
    SIGNATURE_BYTES,
    DocType,
    SignatureError,
    key_id,
    sign_document,
    verify_document,
)
from fedge.protocol.topics import TopicError, check_id

DOC_TYPE = DocType.KEY_ROTATION
#: A rotation document is about 200 bytes; refuse anything bigger before any crypto.
MAX_ROTATION_BODY_BYTES = 4096
MAX_SEQUENCE = 2**63 - 1
_FIELDS = frozenset({"fleet", "new_key", "new_key_id", "issued_at", "sequence"})


class RotationError(SignatureError):
    """A correctly framed rotation that must not be accepted; ``reason`` is a stable code.

    A subclass of :class:`SignatureError` so that one ``except SignatureError`` covers every
    refusal of :func:`verify_rotation`: signature problems (``unknown_key``,
    ``bad_signature``, ``frame_*`` ...) are raised as plain :class:`SignatureError`, document
    problems as :class:`RotationError` with ``bad_document``, ``bad_key``,
    ``key_id_mismatch``, ``same_key``, ``wrong_fleet`` or ``stale_sequence`` (and
    ``retired_key`` from :mod:`fedge.agent.trust`).
    """


@dataclass(frozen=True)
class Rotation:
    """A verified rotation: ``signed_by`` (a trusted key id) vouches for ``new_key``."""

    fleet: str
    new_key: VerifyKey
    new_key_id: str
    issued_at: float
    sequence: int
    signed_by: str
    frame_sha256: str

    def to_document(self) -> dict[str, Any]:
        return rotation_document(self.fleet, self.new_key, self.sequence, self.issued_at)


def rotation_document(fleet: str, new_key: VerifyKey, sequence: int, issued_at: float) -> dict[str, Any]:
    """The document to sign; validated with the same rules devices apply."""
    document: dict[str, Any] = {
        "fleet": fleet,
        "new_key": base64.b64encode(bytes(new_key)).decode(),
        "new_key_id": key_id(new_key),
        "issued_at": issued_at,
        "sequence": sequence,
    }
    _parse_document(document)
    return document


def sign_rotation(
    old_key: SigningKey, new_key: VerifyKey, fleet: str, sequence: int, issued_at: float
) -> bytes:
    """The rotation frame: ``old_key`` (which devices trust) vouches for ``new_key``."""
    if bytes(new_key) == bytes(old_key.verify_key):
        raise RotationError("same_key", "a key cannot vouch for itself")
    return sign_document(DOC_TYPE, rotation_document(fleet, new_key, sequence, issued_at), old_key)


def verify_rotation(
    frame: bytes, trusted_keys: Mapping[str, VerifyKey], fleet: str, last_sequence: int = 0
) -> Rotation:
    """Checks signature (by a key in ``trusted_keys``), fields, fleet and sequence, in that order.

    The signature comes first so that nothing about an unauthenticated frame influences the
    answer beyond "not signed by a key we trust". ``last_sequence`` is the newest sequence the
    caller already accepted (0: none); only a strictly greater one is fresh.
    """
    document, signer = verify_document(frame, DOC_TYPE, trusted_keys, MAX_ROTATION_BODY_BYTES)
    rotation = _rotation(document, signer, frame)
    if rotation.new_key_id == signer:
        raise RotationError("same_key", f"key {signer} vouches for itself")
    if rotation.fleet != fleet:
        raise RotationError("wrong_fleet", f"rotation is for fleet {rotation.fleet!r}, not {fleet!r}")
    if rotation.sequence <= last_sequence:
        raise RotationError(
            "stale_sequence", f"rotation sequence {rotation.sequence} is not newer than {last_sequence}"
        )
    return rotation


def read_rotation_unverified(frame: bytes) -> Rotation:
    """Parses a rotation *without checking its signature*.

    Only for the aggregator's own files (``fedge keys rotate`` reads its previous rotation to
    pick the next sequence and to check that the chain ends at the current key). Never use it
    to decide whether to trust a key: that is :func:`verify_rotation`.
    """
    try:
        decoded = decode_frame(frame, FrameKind.SIGNED, MAX_ROTATION_BODY_BYTES)
    except FrameError as exc:
        raise RotationError(FRAME_PREFIX + exc.reason, str(exc)) from None
    signer = decoded.header.get("key_id")
    if decoded.header.get("type") != DOC_TYPE or not isinstance(signer, str):
        raise RotationError("bad_header", f"not a signed {DOC_TYPE.value!r} document")
    try:
        document = loads_bounded(decoded.body[SIGNATURE_BYTES:], max_bytes=MAX_ROTATION_BODY_BYTES)
    except BoundedJsonError:
        raise RotationError("bad_document", "rotation document is not JSON") from None
    return _rotation(document, signer, frame)


def claimed_key_id(frame: bytes) -> str | None:
    """The key id a signed frame *claims* to be signed by (unverified), or None if unreadable.

    Lets a device explain a refusal ("signed by retired key X" rather than "unknown key").
    """
    try:
        kid = decode_frame(frame, FrameKind.SIGNED, MAX_ROTATION_BODY_BYTES).header.get("key_id")
    except FrameError:
        return None
    return kid if isinstance(kid, str) else None


def _rotation(document: Any, signer: str, frame: bytes) -> Rotation:
    """The rotation ``document`` describes (every field checked), as signed by ``signer`` in
    ``frame``: verified or not, a rotation is read the one way."""
    return Rotation(
        *_parse_document(document), signed_by=signer, frame_sha256=hashlib.sha256(frame).hexdigest()
    )


def _parse_document(document: Any) -> tuple[str, VerifyKey, str, float, int]:
    if not isinstance(document, dict) or set(document) != _FIELDS:
        raise RotationError("bad_document", f"a rotation document has exactly the fields {sorted(_FIELDS)}")
    fleet = document["fleet"]
    try:
        check_id(fleet, "fleet id")
    except TopicError as exc:
        raise RotationError("bad_document", str(exc)) from None
    key_text = document["new_key"]
    if not isinstance(key_text, str):
        raise RotationError("bad_key", "new_key must be a base64 string")
    try:
        raw = key_bytes_from_text(key_text, 32, "new_key")
    except KeyTextError as exc:
        raise RotationError("bad_key", str(exc)) from None
    try:
        # Refuses small-order and off-curve points: a key that can verify nothing (or
        # anything) must never become trusted.
        crypto_sign_ed25519_pk_to_curve25519(raw)
    except RuntimeError:
        raise RotationError("bad_key", "new_key is not a valid Ed25519 public key") from None
    new_key = VerifyKey(raw)
    if document["new_key_id"] != key_id(new_key):
        raise RotationError("key_id_mismatch", "new_key_id is not the key id of new_key")
    issued_at = document["issued_at"]
    if isinstance(issued_at, bool) or not isinstance(issued_at, (int, float)):
        raise RotationError("bad_document", "issued_at must be a number (Unix seconds)")
    try:
        finite = math.isfinite(issued_at)
    except OverflowError:
        finite = False
    if not finite or issued_at < 0:
        raise RotationError("bad_document", "issued_at must be finite and >= 0")
    sequence = document["sequence"]
    if isinstance(sequence, bool) or not isinstance(sequence, int) or not 1 <= sequence <= MAX_SEQUENCE:
        raise RotationError("bad_document", f"sequence must be an integer in 1..{MAX_SEQUENCE}")
    return fleet, new_key, document["new_key_id"], float(issued_at), sequence
