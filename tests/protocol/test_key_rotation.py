"""Signing-key rotation documents: the old key vouches for the new one (pure, real Ed25519 keys).

A rotation must be refused when anything about it is off: an untrusted or forged signature,
another fleet, an old sequence, a malformed or invalid new key, or a key vouching for itself.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest
from nacl.signing import SigningKey, VerifyKey

from fedge.protocol.framing import FrameKind, decode_frame, encode_frame
from fedge.protocol.key_rotation import (
    DOC_TYPE,
    MAX_ROTATION_BODY_BYTES,
    RotationError,
    claimed_key_id,
    read_rotation_unverified,
    rotation_document,
    sign_rotation,
    verify_rotation,
)
from fedge.protocol.signing import DocType, SignatureError, key_id, sign_document

OLD = SigningKey.generate()
NEW = SigningKey.generate()
OTHER = SigningKey.generate()
TRUSTED = {key_id(OLD.verify_key): OLD.verify_key}
#: An Ed25519 point of order 8 (a "weak" public key that verifies forged signatures).
LOW_ORDER_ED25519 = bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a")


def _document(**changes: Any) -> dict[str, Any]:
    doc = rotation_document("demo", NEW.verify_key, 1, 1_700_000_000.5)
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not None}


def _reason(frame: bytes, trusted: Any = None, fleet: str = "demo", last: int = 0) -> str:
    with pytest.raises(SignatureError) as exc:
        verify_rotation(frame, TRUSTED if trusted is None else trusted, fleet, last)
    return exc.value.reason


def test_round_trip() -> None:
    frame = sign_rotation(OLD, NEW.verify_key, "demo", 3, 1_700_000_000.5)
    rotation = verify_rotation(frame, TRUSTED, "demo", last_sequence=2)
    assert rotation.fleet == "demo"
    assert bytes(rotation.new_key) == bytes(NEW.verify_key)
    assert rotation.new_key_id == key_id(NEW.verify_key)
    assert rotation.sequence == 3
    assert rotation.issued_at == 1_700_000_000.5
    assert rotation.signed_by == key_id(OLD.verify_key)
    assert rotation.frame_sha256 == hashlib.sha256(frame).hexdigest()
    assert rotation.to_document() == {
        "fleet": "demo",
        "new_key": base64.b64encode(bytes(NEW.verify_key)).decode(),
        "new_key_id": key_id(NEW.verify_key),
        "issued_at": 1_700_000_000.5,
        "sequence": 3,
    }
    # Framed like every signed document, with its own type.
    header = decode_frame(frame, FrameKind.SIGNED).header
    assert header == {"alg": "ed25519", "key_id": key_id(OLD.verify_key), "type": DOC_TYPE}
    assert claimed_key_id(frame) == key_id(OLD.verify_key)
    assert read_rotation_unverified(frame) == rotation


def test_signed_by_an_untrusted_key_is_unknown_key() -> None:
    frame = sign_rotation(OTHER, NEW.verify_key, "demo", 1, 0)
    assert _reason(frame) == "unknown_key"
    # A trusted key id in the header with another key's signature: bad_signature.
    forged = sign_document(DOC_TYPE, _document(), OTHER)
    decoded = decode_frame(forged, FrameKind.SIGNED)
    relabelled = encode_frame(
        FrameKind.SIGNED, {**decoded.header, "key_id": key_id(OLD.verify_key)}, decoded.body
    )
    assert _reason(relabelled) == "bad_signature"


def test_any_altered_byte_is_refused() -> None:
    frame = sign_rotation(OLD, NEW.verify_key, "demo", 1, 0)
    for i in range(len(frame)):
        altered = bytearray(frame)
        altered[i] ^= 0x01
        with pytest.raises(SignatureError):
            verify_rotation(bytes(altered), TRUSTED, "demo")


def test_other_document_types_cannot_pass_as_a_rotation() -> None:
    manifest = sign_document(DocType.ROUND_MANIFEST, _document(), OLD)
    assert _reason(manifest) == "bad_header"


def test_wrong_fleet_and_stale_sequence() -> None:
    frame = sign_rotation(OLD, NEW.verify_key, "other-fleet", 5, 0)
    assert _reason(frame) == "wrong_fleet"
    frame = sign_rotation(OLD, NEW.verify_key, "demo", 5, 0)
    assert _reason(frame, last=5) == "stale_sequence"
    assert _reason(frame, last=9) == "stale_sequence"
    assert verify_rotation(frame, TRUSTED, "demo", 4).sequence == 5


def test_a_key_cannot_vouch_for_itself() -> None:
    with pytest.raises(RotationError) as exc:
        sign_rotation(OLD, OLD.verify_key, "demo", 1, 0)
    assert exc.value.reason == "same_key"
    frame = sign_document(DOC_TYPE, rotation_document("demo", OLD.verify_key, 1, 0), OLD)
    assert _reason(frame) == "same_key"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"new_key_id": "0123456789abcdef"}, "key_id_mismatch"),
        ({"new_key": "not base64!"}, "bad_key"),
        ({"new_key": base64.b64encode(bytes(31)).decode()}, "bad_key"),
        ({"new_key": 7}, "bad_key"),
        (
            {
                "new_key": base64.b64encode(LOW_ORDER_ED25519).decode(),
                "new_key_id": key_id(VerifyKey(LOW_ORDER_ED25519)),
            },
            "bad_key",
        ),
        ({"sequence": 0}, "bad_document"),
        ({"sequence": True}, "bad_document"),
        ({"sequence": 2**63}, "bad_document"),
        ({"sequence": 1.0}, "bad_document"),
        ({"issued_at": -1}, "bad_document"),
        ({"issued_at": "2025-01-01"}, "bad_document"),
        ({"issued_at": 10**400}, "bad_document"),
        ({"fleet": "a/b"}, "bad_document"),
        ({"extra": 1}, "bad_document"),
        ({"fleet": None}, "bad_document"),
    ],
)
def test_malformed_documents_are_refused(changes: dict[str, Any], reason: str) -> None:
    frame = sign_document(DOC_TYPE, _document(**changes), OLD)
    with pytest.raises(RotationError) as exc:
        verify_rotation(frame, TRUSTED, "demo")
    assert exc.value.reason == reason
    assert str(exc.value).startswith(reason + ": ")


def test_building_a_bad_document_fails_early() -> None:
    with pytest.raises(RotationError):
        rotation_document("demo", NEW.verify_key, 0, 0)
    with pytest.raises(RotationError):
        rotation_document("bad fleet", NEW.verify_key, 1, 0)


def test_oversized_and_unreadable_frames() -> None:
    huge = encode_frame(
        FrameKind.SIGNED,
        {"alg": "ed25519", "key_id": key_id(OLD.verify_key), "type": DOC_TYPE},
        bytes(MAX_ROTATION_BODY_BYTES + 1),
    )
    assert _reason(huge) == "frame_body_too_large"
    assert _reason(b"garbage") == "frame_truncated"
    assert claimed_key_id(b"garbage") is None
    with pytest.raises(RotationError):
        read_rotation_unverified(b"garbage")


def test_rotation_errors_are_signature_errors() -> None:
    # One `except SignatureError` covers every refusal.
    assert issubclass(RotationError, SignatureError)
