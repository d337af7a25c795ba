"""Signed documents from the aggregator (Ed25519): round manifests and key rotations.

Frame: ``SIGNED`` frame, header ``{"alg": "ed25519", "key_id": ..., "type": ...}``, body = the
64-byte signature followed by the canonical JSON document. The signature covers the type,
the key id and the document, so a signed status cannot be passed off as a manifest.

Devices pin the aggregator's verify keys at provisioning and look them up by ``key_id`` (the
first 16 hex digits of the key's SHA-256); a document signed by any other key is refused.

The functions take any type name; the ones fedge signs are :class:`DocType`.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from fedge.protocol.bounded_json import BoundedJsonError, loads_bounded
from fedge.protocol.errors import ReasonError
from fedge.protocol.framing import DEFAULT_MAX_BODY_BYTES, FrameError, FrameKind, decode_frame, encode_frame
from fedge.protocol.keyfile import KeyTextError, key_bytes_from_text
from fedge.protocol.reasons import FRAME_PREFIX

SIGNATURE_BYTES = 64
ALG = "ed25519"


class DocType(StrEnum):
    """The document types fedge signs. The type is part of the signed bytes, so a signer and a
    verifier that spell it differently never agree: both sides take it from here."""

    #: The round manifest (:mod:`fedge.protocol.round_manifest`), retained on ``manifest``.
    ROUND_MANIFEST = "round-manifest"
    #: A signing-key rotation (:mod:`fedge.protocol.key_rotation`).
    KEY_ROTATION = "key-rotation"
    #: A secure-aggregation round's config (:mod:`fedge.protocol.secagg.wire`), retained on
    #: ``secagg/{round_id}/config``.
    SECAGG_ROUND = "secagg-round"
    #: A device's neighbours' advertisements, relayed (``secagg/{round_id}/bundle/{device}``).
    SECAGG_BUNDLE = "secagg-bundle"
    #: The share ciphertexts addressed to one device, relayed (``.../delivery/{device}``).
    SECAGG_DELIVERY = "secagg-delivery"
    #: An unmask request to one device (``.../unmask/{device}``).
    SECAGG_UNMASK = "secagg-unmask"
    #: A device's identity key, certified by the fleet operator's key
    #: (:mod:`fedge.protocol.identity`): what secure aggregation's advertisements are signed with.
    IDENTITY_CERTIFICATE = "identity-certificate"
    #: The open round as aggregator workers fold it (``[replicas]``), retained on ``aggregator/work``.
    AGGREGATOR_WORK = "aggregator-work"
    #: A worker's sealed partial aggregate, on ``aggregator/partial/{worker}``.
    AGGREGATOR_PARTIAL = "aggregator-partial"
    #: The leader's answer to a partial, on ``aggregator/verdict/{worker}``.
    PARTIAL_VERDICT = "partial-verdict"


class SignatureError(ReasonError[str]):
    """A signed document is malformed, signed by an unknown key, or altered."""


def key_id(key: VerifyKey) -> str:
    return hashlib.sha256(bytes(key)).hexdigest()[:16]


def canonical_json(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _signed_message(doc_type: str, kid: str, body: bytes) -> bytes:
    return b"fedge-signed-v1\x00" + doc_type.encode() + b"\x00" + kid.encode() + b"\x00" + body


def sign_document(doc_type: str, document: Mapping[str, Any], signing_key: SigningKey) -> bytes:
    kid = key_id(signing_key.verify_key)
    body = canonical_json(document)
    signature = signing_key.sign(_signed_message(doc_type, kid, body)).signature
    return encode_frame(FrameKind.SIGNED, {"alg": ALG, "key_id": kid, "type": doc_type}, signature + body)


def verify_document(
    data: bytes,
    doc_type: str,
    trusted: Mapping[str, VerifyKey],
    max_body: int = DEFAULT_MAX_BODY_BYTES,
) -> tuple[dict[str, Any], str]:
    """Returns ``(document, key_id)`` if a trusted key signed it as ``doc_type``."""
    try:
        frame = decode_frame(data, FrameKind.SIGNED, max_body)
    except FrameError as exc:
        raise SignatureError(FRAME_PREFIX + exc.reason, str(exc)) from None
    header = frame.header
    if header.get("alg") != ALG or header.get("type") != doc_type or set(header) != {"alg", "key_id", "type"}:
        raise SignatureError("bad_header", f"expected an {ALG}-signed {str(doc_type)!r}")
    kid = header["key_id"]
    key = trusted.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise SignatureError("unknown_key", f"signed by key {kid!r}, which is not trusted")
    if len(frame.body) < SIGNATURE_BYTES:
        raise SignatureError("truncated", "no signature")
    signature, body = frame.body[:SIGNATURE_BYTES], frame.body[SIGNATURE_BYTES:]
    try:
        key.verify(_signed_message(doc_type, kid, body), signature)
    except BadSignatureError:
        raise SignatureError("bad_signature", "signature does not verify") from None
    try:
        document = loads_bounded(body, max_bytes=max_body)
    except BoundedJsonError:
        raise SignatureError("bad_document", "signed document is not JSON") from None
    if not isinstance(document, dict):
        raise SignatureError("bad_document", "signed document must be a JSON object")
    return document, kid


def signing_key_from_text(text: str) -> SigningKey:
    """An Ed25519 signing key from the base64 of its 32-byte seed."""
    return SigningKey(_b64(text, 32, "signing key"))


def verify_key_from_text(text: str) -> VerifyKey:
    return VerifyKey(_b64(text, 32, "verify key"))


def signing_key_to_text(key: SigningKey | VerifyKey) -> str:
    return base64.b64encode(bytes(key)).decode()


def _b64(text: str, size: int, what: str) -> bytes:
    try:
        return key_bytes_from_text(text.strip(), size, what)
    except KeyTextError as exc:
        raise SignatureError("bad_key", str(exc)) from None
