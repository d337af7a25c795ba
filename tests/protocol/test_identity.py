"""Identity certificates: the operator's key, not the aggregator's, says which Ed25519 key speaks
for a device in secure aggregation. Real Ed25519; every refusal has its stable reason."""

from __future__ import annotations

import json

import pytest
from nacl.signing import SigningKey

from fedge.protocol.identity import (
    MAX_CERTIFICATE_BYTES,
    IdentityError,
    certify,
    verify_certificate,
)
from fedge.protocol.signing import DocType, key_id, sign_document, signing_key_to_text

pytestmark = pytest.mark.protocol

OPERATOR = SigningKey.generate()
AGGREGATOR = SigningKey.generate()
TRUSTED = {key_id(OPERATOR.verify_key): OPERATOR.verify_key}
IDENTITY = SigningKey.generate()


def test_a_certificate_binds_the_identity_key_to_the_device_and_fleet() -> None:
    frame = certify(OPERATOR, "fleet-1", "watch-01", IDENTITY.verify_key, 1_700_000_000.0)
    cert = verify_certificate(frame, TRUSTED, "fleet-1", "watch-01")
    assert cert.identity_key == IDENTITY.verify_key
    assert (cert.fleet, cert.device_id, cert.issued_at) == ("fleet-1", "watch-01", 1_700_000_000.0)
    assert len(frame) < 400


@pytest.mark.parametrize(
    ("frame", "fleet", "device", "reason"),
    [
        # The aggregator's key is not the operator's: it cannot certify a key of its choice.
        (
            certify(AGGREGATOR, "fleet-1", "watch-01", SigningKey.generate().verify_key, 0.0),
            "fleet-1",
            "watch-01",
            "unknown_key",
        ),
        (
            certify(OPERATOR, "fleet-2", "watch-01", IDENTITY.verify_key, 0.0),
            "fleet-1",
            "watch-01",
            "wrong_fleet",
        ),
        # Another device's certificate cannot be passed off as this one's.
        (
            certify(OPERATOR, "fleet-1", "watch-02", IDENTITY.verify_key, 0.0),
            "fleet-1",
            "watch-01",
            "wrong_device",
        ),
        (b"\x00" * (MAX_CERTIFICATE_BYTES + 1), "fleet-1", "watch-01", "too_large"),
        (b"not a frame", "fleet-1", "watch-01", "frame_truncated"),
        # A manifest signed by the operator key is not a certificate.
        (
            sign_document(DocType.ROUND_MANIFEST, {"fleet": "fleet-1"}, OPERATOR),
            "fleet-1",
            "watch-01",
            "bad_header",
        ),
    ],
)
def test_what_is_not_a_certificate_for_this_device_is_refused(
    frame: bytes, fleet: str, device: str, reason: str
) -> None:
    with pytest.raises(IdentityError) as refused:
        verify_certificate(frame, TRUSTED, fleet, device)
    assert refused.value.reason == reason


def test_a_tampered_certificate_does_not_verify() -> None:
    frame = certify(OPERATOR, "fleet-1", "watch-01", IDENTITY.verify_key, 0.0)
    other = signing_key_to_text(SigningKey.generate().verify_key).encode()
    tampered = frame.replace(signing_key_to_text(IDENTITY.verify_key).encode(), other)
    assert tampered != frame
    with pytest.raises(IdentityError) as refused:
        verify_certificate(tampered, TRUSTED, "fleet-1", "watch-01")
    assert refused.value.reason == "bad_signature"


@pytest.mark.parametrize(
    "change",
    [
        {"issued_at": -1},
        {"issued_at": True},
        {"identity_key": "short"},
        {"identity_key": 5},
        {"device_id": "a/b"},
        {"extra": 1},
    ],
)
def test_a_signed_but_malformed_certificate_is_refused(change: dict[str, object]) -> None:
    doc = {
        "fleet": "fleet-1",
        "device_id": "watch-01",
        "identity_key": signing_key_to_text(IDENTITY.verify_key),
        "issued_at": 0.0,
        **change,
    }
    frame = sign_document(DocType.IDENTITY_CERTIFICATE, json.loads(json.dumps(doc)), OPERATOR)
    with pytest.raises(IdentityError) as refused:
        verify_certificate(frame, TRUSTED, "fleet-1", "watch-01")
    assert refused.value.reason == "bad_certificate"
