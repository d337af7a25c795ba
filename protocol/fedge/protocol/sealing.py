"""Sealed device messages: end-to-end encrypted and authenticated with NaCl ``Box``.

A device seals with its own X25519 key and the aggregator's pinned public key, so only the
aggregator can open the message, and opening succeeds only with the *sending device's*
enrolled public key (Box authenticates both ends). The cleartext header (fleet, device id,
round id, counter, kind, model version) lets the aggregator run cheap checks before any
crypto; the same header is repeated inside the ciphertext, and the aggregator accepts a
message only when both agree, which binds the message to its device, round and counter: it
cannot be replayed into another round or claimed by another device.

Frame: ``SEALED`` frame, header = :class:`SealedHeader`, body = 24-byte nonce + Box ciphertext
of a ``PAYLOAD`` frame whose header is ``{"bind": <SealedHeader>, "payload": {...}}``.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from nacl._sodium import ffi as _ffi  # type: ignore[import-not-found]  # PyNaCl's cffi libsodium
from nacl._sodium import lib as _lib
from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey
from nacl.utils import random as nacl_random

from fedge.protocol.errors import ReasonFieldError
from fedge.protocol.framing import DEFAULT_MAX_BODY_BYTES, FrameError, FrameKind, decode_frame, encode_frame
from fedge.protocol.keyfile import KeyTextError, key_bytes_from_text
from fedge.protocol.reasons import FRAME_PREFIX, PAYLOAD_PREFIX, RejectReason
from fedge.protocol.topics import TopicError, check_id

#: ``update`` and ``moments`` are the plain rounds' messages; the ``secagg_*`` kinds carry one
#: secure-aggregation message each (:mod:`fedge.protocol.secagg.wire`), on the same topic;
#: ``chunk`` is one piece of a larger sealed message (:mod:`fedge.protocol.chunks`).
MESSAGE_KINDS = (
    "update",
    "moments",
    "secagg_advertise",
    "secagg_shares",
    "secagg_masked",
    "secagg_unmask",
    "chunk",
)
NONCE_BYTES = Box.NONCE_SIZE
MAC_BYTES = 16  # Poly1305 tag (crypto_box_MACBYTES)
_MAX_COUNTER = 2**63 - 1


class SealError(ReasonFieldError[str]):
    """A sealed message cannot be read, opened or trusted; ``reason`` is a short stable code.

    ``reason`` is a :class:`~fedge.protocol.reasons.RejectReason`, or a frame reason with
    :data:`~fedge.protocol.reasons.FRAME_PREFIX` (the sealed frame) or
    :data:`~fedge.protocol.reasons.PAYLOAD_PREFIX` (the payload frame inside the box).
    """


@dataclass(frozen=True)
class SealedHeader:
    """What a sealed message claims about itself, readable without a key."""

    fleet: str
    device_id: str
    round_id: str
    counter: int
    kind: str
    model_version: int

    def to_dict(self) -> dict[str, Any]:
        # Spelled out rather than dataclasses.asdict, which deep-copies every field: the
        # aggregator compares it with the sealed binding of every message it opens, and asdict
        # was a tenth of RoundEngine.handle's time (a test keeps this equal to asdict).
        return {
            "fleet": self.fleet,
            "device_id": self.device_id,
            "round_id": self.round_id,
            "counter": self.counter,
            "kind": self.kind,
            "model_version": self.model_version,
        }

    @staticmethod
    def from_dict(data: Any) -> SealedHeader:
        fields = {"fleet", "device_id", "round_id", "counter", "kind", "model_version"}
        if not isinstance(data, dict) or set(data) != fields:
            raise _bad_header(f"sealed header must have exactly {sorted(fields)}", "header")
        for key in ("fleet", "device_id", "round_id", "kind"):
            if not isinstance(data[key], str):
                raise _bad_header(f"{key} must be a string", key, "a string")
        for key in ("counter", "model_version"):
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_COUNTER:
                raise _bad_header(
                    f"{key} must be an integer in 0..2^63-1", key, "an integer in 0..2^63-1", value
                )
        try:
            check_id(data["fleet"], "fleet id")
            check_id(data["device_id"])
            check_id(data["round_id"], "round id")
        except TopicError as exc:
            raise _bad_header(str(exc)) from None
        if data["kind"] not in MESSAGE_KINDS:
            raise _bad_header(f"kind must be one of {MESSAGE_KINDS}", "kind", MESSAGE_KINDS, data["kind"])
        return SealedHeader(**data)


def _bad_header(detail: str, field: str | None = None, expected: Any = None, found: Any = None) -> SealError:
    """A cleartext header the contract does not allow: always ``bad_header``, whatever the field."""
    return SealError(RejectReason.BAD_HEADER, detail, field=field, expected=expected, found=found)


def seal(
    header: SealedHeader,
    payload_header: dict[str, Any],
    payload_body: bytes,
    device_key: PrivateKey,
    aggregator_key: PublicKey,
    nonce: bytes | None = None,
) -> bytes:
    """Seals a payload for the aggregator; ``nonce`` only for reproducible tests."""
    SealedHeader.from_dict(header.to_dict())  # validate what we are about to claim
    inner = encode_frame(
        FrameKind.PAYLOAD, {"bind": header.to_dict(), "payload": payload_header}, payload_body
    )
    box = _box(device_key, aggregator_key)
    encrypted = box.encrypt(inner, nonce if nonce is not None else nacl_random(NONCE_BYTES))
    return encode_frame(FrameKind.SEALED, header.to_dict(), bytes(encrypted))


def read_header(data: bytes, max_body: int = DEFAULT_MAX_BODY_BYTES) -> tuple[SealedHeader, bytes]:
    """Parses the cleartext part only: the cheap first step, before any crypto."""
    try:
        frame = decode_frame(data, FrameKind.SEALED, max_body)
    except FrameError as exc:
        raise SealError(
            FRAME_PREFIX + exc.reason, str(exc), field=exc.field, expected=exc.expected, found=exc.found
        ) from None
    header = SealedHeader.from_dict(frame.header)
    if len(frame.body) < NONCE_BYTES + MAC_BYTES:
        raise SealError(
            RejectReason.TRUNCATED,
            "ciphertext shorter than nonce + MAC",
            field="ciphertext length",
            expected=f">= {NONCE_BYTES + MAC_BYTES}",
            found=len(frame.body),
        )
    return header, frame.body


def open_sealed(
    header: SealedHeader,
    ciphertext: bytes,
    aggregator_key: PrivateKey,
    device_public: PublicKey,
    max_body: int = DEFAULT_MAX_BODY_BYTES,
    box: Box | None = None,
) -> tuple[dict[str, Any], bytes]:
    """Decrypts with the device's enrolled key and checks the inner binding; returns the payload.

    ``box``: a cached ``box_for(aggregator_key, device_public)`` (saves an X25519 per message).
    """
    try:
        inner = (box if box is not None else _box(aggregator_key, device_public)).decrypt(ciphertext)
    except CryptoError:
        raise SealError(
            RejectReason.DECRYPT_FAILED, "not sealed by this device for this aggregator, or altered"
        ) from None
    return read_payload(header, inner, max_body)


def read_payload(
    header: SealedHeader, inner: bytes, max_body: int = DEFAULT_MAX_BODY_BYTES
) -> tuple[dict[str, Any], bytes]:
    """The checks :func:`open_sealed` runs on the decrypted ``PAYLOAD`` frame ``inner``: the
    frame, the binding to ``header``, the payload header's shape. Separate so that a caller that
    decrypted on its own (the round engine's fast path, :func:`open_into`) gets exactly the same
    refusals."""
    try:
        frame = decode_frame(inner, FrameKind.PAYLOAD, max_body)
    except FrameError as exc:
        raise SealError(
            PAYLOAD_PREFIX + exc.reason, str(exc), field=exc.field, expected=exc.expected, found=exc.found
        ) from None
    if frame.header.get("bind") != header.to_dict():
        raise SealError(
            RejectReason.BINDING_MISMATCH, "the sealed header differs from the cleartext header", field="bind"
        )
    payload = frame.header.get("payload")
    if not isinstance(payload, dict) or set(frame.header) != {"bind", "payload"}:
        raise SealError(RejectReason.BAD_PAYLOAD, "payload header must be an object", field="payload")
    return payload, frame.body


def open_into(shared_key: bytes, sealed: bytes, offset: int, align: int = 0) -> memoryview | None:
    """Decrypts the box at ``sealed[offset:]`` (24-byte nonce, then the Box ciphertext, at least
    the MAC) with a Box's precomputed ``shared_key``, into a new buffer; None if it does not
    open (what ``Box.decrypt`` refuses with ``CryptoError``).

    The same libsodium call as ``Box.decrypt`` (``crypto_box_open_easy_afternm``), without its
    three copies of the message (nonce split, ciphertext slice, result copy), about 2 us of a
    22 kB update on the aggregator, which decrypts every one. The buffer is the caller's alone,
    so views of it (a decoded fp32 update) need no copy either. ``align``: the offset in the
    plaintext that should start on a 16-byte boundary (where the caller expects its float32
    body: numpy reads aligned floats faster); any value is safe.
    """
    clen = len(sealed) - offset - NONCE_BYTES
    if offset < 0 or clen < MAC_BYTES or len(shared_key) != 32:
        return None
    size = clen - MAC_BYTES
    out = bytearray(size + 16)  # room to start the plaintext where ``align`` lands aligned
    out_ptr = _ffi.from_buffer(out, require_writable=True)
    start = -(int(_ffi.cast("uintptr_t", out_ptr)) + align) % 16
    sealed_ptr = _ffi.from_buffer(sealed)  # no copy: pointers into the message for nonce and box
    rc = _lib.crypto_box_open_easy_afternm(
        out_ptr + start, sealed_ptr + (offset + NONCE_BYTES), clen, sealed_ptr + offset, shared_key
    )
    if rc != 0:
        return None
    return memoryview(out)[start : start + size]


# --- keys as text ------------------------------------------------------------------------------


def public_key_from_text(text: str) -> PublicKey:
    """An X25519 public key from base64; refuses wrong lengths and all-zero keys."""
    raw = _b64(text, 32, "public key")
    if raw == bytes(32):
        raise SealError(RejectReason.BAD_KEY, "public key is all zeros")
    key = PublicKey(raw)
    _box(PrivateKey.generate(), key)  # refuses low-order points: no shared secret can be made
    return key


def box_for(private: PrivateKey, public: PublicKey) -> Box:
    """The Box of a key pair; a low-order public key is a :class:`SealError` (``bad_key``)."""
    return _box(private, public)


def _box(private: PrivateKey, public: PublicKey) -> Box:
    """``Box``, with libsodium's refusal of a low-order public key as a :class:`SealError`."""
    try:
        return Box(private, public)
    except CryptoError:
        raise SealError(RejectReason.BAD_KEY, "public key is a low-order point") from None


def private_key_from_text(text: str) -> PrivateKey:
    return PrivateKey(_b64(text, 32, "private key"))


def key_to_text(key: PublicKey | PrivateKey) -> str:
    return base64.b64encode(bytes(key)).decode()


def _b64(text: str, size: int, what: str) -> bytes:
    try:
        return key_bytes_from_text(text.strip(), size, what)
    except KeyTextError as exc:
        raise SealError(
            RejectReason.BAD_KEY, str(exc), field=exc.field, expected=exc.expected, found=exc.found
        ) from None
