"""Signed aggregator documents: Ed25519 over type, key id and canonical JSON, with pinned keys.

Real Ed25519 keys throughout. A document signed by an untrusted key, altered in any byte, or
signed as another type must be refused with a :class:`SignatureError` and a stable reason.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey, VerifyKey

from fedge.protocol.errors import FedgeError
from fedge.protocol.framing import FrameKind, decode_frame, encode_frame
from fedge.protocol.signing import (
    ALG,
    SIGNATURE_BYTES,
    SignatureError,
    canonical_json,
    key_id,
    sign_document,
    verify_document,
)

KEY = SigningKey.generate()
OTHER_KEY = SigningKey.generate()
KID = key_id(KEY.verify_key)
TRUSTED = {KID: KEY.verify_key}
DOCUMENT = {
    "version": 3,
    "round_id": "r-7",
    "selected": ["a", "b"],
    "nested": {"z": 1.5, "a": None},
    "é": "ü",
}


def _signed_message(doc_type: str, kid: str, body: bytes) -> bytes:
    """The documented signed bytes: a domain tag, the type, the key id and the document."""
    return b"fedge-signed-v1\x00" + doc_type.encode() + b"\x00" + kid.encode() + b"\x00" + body


def _frame(signature: bytes, body: bytes, header: dict[str, Any] | None = None) -> bytes:
    return encode_frame(
        FrameKind.SIGNED, header or {"alg": ALG, "key_id": KID, "type": "manifest"}, signature + body
    )


def _verify_error(
    data: bytes, doc_type: str = "manifest", trusted: Any = None, max_body: int | None = None
) -> str:
    kwargs = {} if max_body is None else {"max_body": max_body}
    with pytest.raises(SignatureError) as exc:
        verify_document(data, doc_type, TRUSTED if trusted is None else trusted, **kwargs)
    assert str(exc.value).startswith(exc.value.reason + ": ")
    return exc.value.reason


# --- round trip and format ---------------------------------------------------------------------


def test_sign_verify_round_trip() -> None:
    data = sign_document("manifest", DOCUMENT, KEY)
    document, kid = verify_document(data, "manifest", TRUSTED)
    assert document == DOCUMENT
    assert kid == KID


def test_signed_frame_layout() -> None:
    data = sign_document("manifest", DOCUMENT, KEY)
    frame = decode_frame(data, FrameKind.SIGNED)
    assert frame.header == {"alg": "ed25519", "key_id": KID, "type": "manifest"}
    signature, body = frame.body[:SIGNATURE_BYTES], frame.body[SIGNATURE_BYTES:]
    assert SIGNATURE_BYTES == 64
    assert body == canonical_json(DOCUMENT)
    KEY.verify_key.verify(_signed_message("manifest", KID, body), signature)  # raises if not


def test_canonical_json_is_sorted_compact_and_refuses_nan() -> None:
    assert canonical_json({"b": 1, "a": [1.5, None], "c": "é"}) == b'{"a":[1.5,null],"b":1,"c":"\\u00e9"}'
    with pytest.raises(ValueError, match=r"^Out of range float values are not JSON compliant"):
        canonical_json({"x": float("nan")})


def test_signing_is_deterministic() -> None:
    reordered = dict(reversed(DOCUMENT.items()))
    assert sign_document("manifest", DOCUMENT, KEY) == sign_document("manifest", reordered, KEY)


def test_key_id_is_the_first_16_hex_digits_of_the_keys_sha256() -> None:
    assert hashlib.sha256(bytes(KEY.verify_key)).hexdigest()[:16] == KID
    assert len(KID) == 16 and all(c in "0123456789abcdef" for c in KID)
    assert key_id(OTHER_KEY.verify_key) != KID
    assert key_id(VerifyKey(bytes(KEY.verify_key))) == KID


def test_any_of_several_trusted_keys_verifies_and_reports_its_id() -> None:
    trusted = {**TRUSTED, key_id(OTHER_KEY.verify_key): OTHER_KEY.verify_key}
    assert verify_document(sign_document("manifest", DOCUMENT, OTHER_KEY), "manifest", trusted) == (
        DOCUMENT,
        key_id(OTHER_KEY.verify_key),
    )


def test_the_max_body_limit_applies() -> None:
    data = sign_document("manifest", DOCUMENT, KEY)
    size = SIGNATURE_BYTES + len(canonical_json(DOCUMENT))
    assert verify_document(data, "manifest", TRUSTED, max_body=size)[0] == DOCUMENT
    assert _verify_error(data, max_body=size - 1) == "frame_body_too_large"


# --- refusals --------------------------------------------------------------------------------


def test_unknown_key_is_refused() -> None:
    data = sign_document("manifest", DOCUMENT, OTHER_KEY)
    with pytest.raises(SignatureError) as exc:
        verify_document(data, "manifest", TRUSTED)
    assert exc.value.reason == "unknown_key"
    other_kid = key_id(OTHER_KEY.verify_key)
    assert str(exc.value) == f"unknown_key: signed by key {other_kid!r}, which is not trusted"


def test_no_trusted_keys_refuses_everything() -> None:
    assert _verify_error(sign_document("manifest", DOCUMENT, KEY), trusted={}) == "unknown_key"


@pytest.mark.parametrize("kid", [5, None, ["x"], {"k": 1}, KID.upper(), ""], ids=repr)
def test_a_key_id_that_is_not_a_trusted_string_is_unknown(kid: Any) -> None:
    data = _frame(bytes(64), canonical_json(DOCUMENT), {"alg": ALG, "key_id": kid, "type": "manifest"})
    assert _verify_error(data) == "unknown_key"


def test_another_keys_signature_under_a_spoofed_key_id_is_refused() -> None:
    """The attacker signs exactly what the verifier checks, but with its own key."""
    body = canonical_json(DOCUMENT)
    signature = OTHER_KEY.sign(_signed_message("manifest", KID, body)).signature
    with pytest.raises(SignatureError) as exc:
        verify_document(_frame(signature, body), "manifest", TRUSTED)
    assert exc.value.reason == "bad_signature"
    assert str(exc.value) == "bad_signature: signature does not verify"


def test_a_key_id_swapped_in_the_header_is_refused() -> None:
    """The key id is part of the signed bytes: a frame relabelled with another trusted id fails."""
    other_kid = key_id(OTHER_KEY.verify_key)
    trusted = {**TRUSTED, other_kid: OTHER_KEY.verify_key}
    frame = decode_frame(sign_document("manifest", DOCUMENT, KEY), FrameKind.SIGNED)
    relabelled = encode_frame(FrameKind.SIGNED, {**frame.header, "key_id": other_kid}, frame.body)
    assert _verify_error(relabelled, trusted=trusted) == "bad_signature"


def test_every_single_byte_change_of_the_signature_or_document_is_refused() -> None:
    data = sign_document("manifest", DOCUMENT, KEY)
    body_start = len(data) - SIGNATURE_BYTES - len(canonical_json(DOCUMENT))
    for position in range(body_start, len(data)):
        for mask in (0x01, 0x80):
            mutated = bytearray(data)
            mutated[position] ^= mask
            assert _verify_error(bytes(mutated)) == "bad_signature", position


def test_an_appended_document_byte_is_refused() -> None:
    frame = decode_frame(sign_document("manifest", DOCUMENT, KEY), FrameKind.SIGNED)
    assert _verify_error(encode_frame(FrameKind.SIGNED, frame.header, frame.body + b" ")) == "bad_signature"


def test_a_status_is_not_accepted_as_a_manifest() -> None:
    data = sign_document("status", DOCUMENT, KEY)
    assert verify_document(data, "status", TRUSTED)[0] == DOCUMENT
    with pytest.raises(SignatureError) as exc:
        verify_document(data, "manifest", TRUSTED)
    assert exc.value.reason == "bad_header"
    assert str(exc.value) == "bad_header: expected an ed25519-signed 'manifest'"


def test_the_type_is_covered_by_the_signature() -> None:
    """Relabelling a signed status as a manifest in the (unsigned) header does not verify."""
    frame = decode_frame(sign_document("status", DOCUMENT, KEY), FrameKind.SIGNED)
    relabelled = encode_frame(FrameKind.SIGNED, {**frame.header, "type": "manifest"}, frame.body)
    assert _verify_error(relabelled) == "bad_signature"


@pytest.mark.parametrize(
    "header",
    [
        {"alg": ALG, "key_id": KID, "type": "manifest", "extra": 1},
        {"alg": "ed448", "key_id": KID, "type": "manifest"},
        {"alg": "ED25519", "key_id": KID, "type": "manifest"},
        {"key_id": KID, "type": "manifest"},
        {"alg": ALG, "type": "manifest"},
        {"alg": ALG, "key_id": KID},
        {},
    ],
    ids=["extra field", "other alg", "upper-case alg", "no alg", "no key id", "no type", "empty"],
)
def test_a_malformed_header_is_refused(header: dict[str, Any]) -> None:
    frame = decode_frame(sign_document("manifest", DOCUMENT, KEY), FrameKind.SIGNED)
    assert _verify_error(encode_frame(FrameKind.SIGNED, header, frame.body)) == "bad_header"


@pytest.mark.parametrize("size", [0, 1, SIGNATURE_BYTES - 1])
def test_a_body_shorter_than_a_signature_is_truncated(size: int) -> None:
    data = _frame(b"", bytes(size))
    with pytest.raises(SignatureError) as exc:
        verify_document(data, "manifest", TRUSTED)
    assert exc.value.reason == "truncated"
    assert str(exc.value) == "truncated: no signature"


def test_an_empty_document_after_a_valid_signature_is_not_json() -> None:
    signature = KEY.sign(_signed_message("manifest", KID, b"")).signature
    assert _verify_error(_frame(signature, b"")) == "bad_document"
    assert _signed_document_error(b"") == "bad_document: signed document is not JSON"


def _signed_document_error(body: bytes) -> str:
    signature = KEY.sign(_signed_message("manifest", KID, body)).signature
    with pytest.raises(SignatureError) as exc:
        verify_document(_frame(signature, body), "manifest", TRUSTED)
    assert exc.value.reason == "bad_document"
    return str(exc.value)


@pytest.mark.parametrize("body", [b"[1, 2]", b"null", b"42", b'"text"', b"[{}]"])
def test_a_validly_signed_document_that_is_not_an_object_is_refused(body: bytes) -> None:
    assert _signed_document_error(body) == "bad_document: signed document must be a JSON object"


@pytest.mark.parametrize("body", [b"not json", b'{"a":', b"\xff", b'{"a":"\xc3\x28"}', b"[" * 100_000])
def test_a_validly_signed_document_that_is_not_json_is_refused(body: bytes) -> None:
    assert _signed_document_error(body) == "bad_document: signed document is not JSON"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "frame_truncated"),
        (b"XXXX" + bytes(12), "frame_bad_magic"),
        (
            encode_frame(FrameKind.SEALED, {"alg": ALG, "key_id": KID, "type": "manifest"}, bytes(70)),
            "frame_wrong_kind",
        ),
    ],
    ids=["empty", "bad magic", "sealed kind"],
)
def test_frame_errors_carry_a_frame_prefix(data: bytes, reason: str) -> None:
    assert _verify_error(data) == reason


def test_signature_error_is_a_fedge_error() -> None:
    assert issubclass(SignatureError, FedgeError)


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_only_raise_signature_error(data: bytes) -> None:
    with pytest.raises(SignatureError):
        verify_document(data, "manifest", TRUSTED)


@settings(max_examples=100, deadline=None)
@given(
    document=st.dictionaries(
        st.text(max_size=6), st.integers(-(2**70), 2**70) | st.text(max_size=6) | st.none(), max_size=5
    )
)
def test_any_document_round_trips(document: dict[str, Any]) -> None:
    data = sign_document("manifest", document, KEY)
    assert verify_document(data, "manifest", TRUSTED) == (document, KID)
    assert json.loads(decode_frame(data, FrameKind.SIGNED).body[SIGNATURE_BYTES:]) == document
