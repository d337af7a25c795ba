"""Device identity keys, certified by the fleet operator: who may sign a device's round keys.

Secure aggregation (``fedge.protocol.secagg``) is only secure against a malicious aggregator if
the aggregator cannot put its own round keys in a device's name: a device's neighbours must
check each advertisement against a key the aggregator could not choose. The device's X25519
box key does not do: it is enrolled in the aggregator's registry, and the aggregator is the
party to guard against. So each device also has an **identity key** (Ed25519), and the fleet's
**operator** (whoever runs ``fedge enroll``, holding a key the aggregator never sees) signs a
certificate binding it to the device id::

    {"fleet": "...", "device_id": "...", "identity_key": "<base64 Ed25519 verify key>",
     "issued_at": <Unix seconds>}

framed and signed like a manifest (``fedge.protocol.signing``, type ``identity-certificate``).
Devices pin the operator's verify key at provisioning (``[agent] operator_verify_keys``), as
they pin the aggregator's, and accept a neighbour's identity key only with a certificate signed
by a pinned operator key, for their fleet and for the id the neighbour speaks for. A device
sends its own certificate with its advertisement; the aggregator relays it, and can neither
forge nor swap one.

What a certificate does not do: expire or be revoked. A revoked device's certificate still
verifies; the aggregator leaves revoked devices out of rounds, but a malicious aggregator could
select one whose key it stole (SECURITY.md). Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from nacl.signing import SigningKey, VerifyKey

from fedge.protocol.errors import FedgeError
from fedge.protocol.signing import (
    DocType,
    SignatureError,
    sign_document,
    signing_key_to_text,
    verify_document,
    verify_key_from_text,
)
from fedge.protocol.topics import TopicError, check_id

DOC_TYPE: Final = DocType.IDENTITY_CERTIFICATE
#: A certificate is about 250 bytes; refuse anything bigger before any crypto.
MAX_CERTIFICATE_BYTES: Final = 2048
_FIELDS: Final = frozenset({"fleet", "device_id", "identity_key", "issued_at"})


class IdentityError(FedgeError):
    """A certificate that does not verify, or does not say what it must; ``reason`` is stable."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class IdentityCertificate:
    """The operator's statement that ``identity_key`` speaks for ``device_id`` in ``fleet``."""

    fleet: str
    device_id: str
    identity_key: VerifyKey
    issued_at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "fleet": self.fleet,
            "device_id": self.device_id,
            "identity_key": signing_key_to_text(self.identity_key),
            "issued_at": self.issued_at,
        }


def certify(
    operator_key: SigningKey, fleet: str, device_id: str, identity_key: VerifyKey, issued_at: float
) -> bytes:
    """The signed certificate frame (what ``fedge enroll`` writes for the device)."""
    cert = IdentityCertificate(check_id(fleet, "fleet id"), check_id(device_id), identity_key, issued_at)
    if not (math.isfinite(issued_at) and issued_at >= 0):
        raise IdentityError("bad_certificate", f"issued_at must be finite and >= 0, not {issued_at!r}")
    return sign_document(DOC_TYPE, cert.to_dict(), operator_key)


def verify_certificate(
    frame: bytes, operator_keys: Mapping[str, VerifyKey], fleet: str, device_id: str
) -> IdentityCertificate:
    """The certificate in ``frame`` if a pinned operator key signed it for ``fleet`` and
    ``device_id``; else :class:`IdentityError` with a stable reason: ``too_large``, the
    signature's reasons (``unknown_key``, ``bad_signature``, ...), ``bad_certificate``,
    ``wrong_fleet``, ``wrong_device``."""
    if not isinstance(frame, bytes | bytearray) or len(frame) > MAX_CERTIFICATE_BYTES:
        raise IdentityError("too_large", f"an identity certificate is at most {MAX_CERTIFICATE_BYTES} bytes")
    try:
        doc, _ = verify_document(bytes(frame), DOC_TYPE, operator_keys, MAX_CERTIFICATE_BYTES)
    except SignatureError as exc:
        raise IdentityError(exc.reason, f"identity certificate: {exc}") from None
    cert = _parse(doc)
    if cert.fleet != fleet:
        raise IdentityError("wrong_fleet", f"identity certificate for fleet {cert.fleet!r}, not {fleet!r}")
    if cert.device_id != device_id:
        raise IdentityError(
            "wrong_device", f"identity certificate for device {cert.device_id!r}, not {device_id!r}"
        )
    return cert


def _parse(doc: dict[str, Any]) -> IdentityCertificate:
    if set(doc) != _FIELDS:
        raise IdentityError(
            "bad_certificate",
            f"identity certificate fields: missing {sorted(_FIELDS - set(doc))}, "
            f"unexpected {sorted(map(str, set(doc) - _FIELDS))}",
        )
    issued = doc["issued_at"]
    number = isinstance(issued, int | float) and not isinstance(issued, bool)
    if not number or not math.isfinite(issued) or issued < 0:
        raise IdentityError("bad_certificate", "identity certificate: issued_at must be finite and >= 0")
    try:
        fleet = check_id(doc["fleet"], "fleet id")
        device = check_id(doc["device_id"])
        key = verify_key_from_text(doc["identity_key"]) if isinstance(doc["identity_key"], str) else None
    except (TopicError, SignatureError) as exc:
        raise IdentityError("bad_certificate", f"identity certificate: {exc}") from None
    if key is None:
        raise IdentityError("bad_certificate", "identity certificate: identity_key must be base64 text")
    return IdentityCertificate(fleet, device, key, float(issued))
