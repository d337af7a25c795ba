"""Shamir shares encrypted to one neighbour, so the aggregator relays them but cannot read them.

A device sends all its shares in one message to the aggregator, which passes each ciphertext on
to its recipient. Each is a NaCl ``Box`` (X25519 + XSalsa20-Poly1305) from the sender's round
*share* key to the recipient's round share key, both from signed advertisements: only the
recipient can open it, and opening it proves the sender made it (``Box`` authenticates both
ends), so the aggregator can neither read, alter nor forge a share.

The plaintext repeats the round id, sender and recipient: a ciphertext cannot be replayed
into another round or passed off as coming from, or meant for, another device (the keys are
fresh per round, but the binding does not depend on that). Ids are padded to their maximum
length, so every ciphertext has the same size, :data:`CIPHERTEXT_BYTES`.
"""

from __future__ import annotations

from dataclasses import dataclass

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey
from nacl.utils import random as nacl_random

from fedge.protocol.secagg.encoding import MAX_ID_CHARS
from fedge.protocol.secagg.errors import SecAggReason, refusal
from fedge.protocol.secagg.shamir import SHARE_BYTES, RandomBytes, Share

_DOMAIN = b"fedge-secagg-share-v1\x00"
_ID_FIELD = 1 + MAX_ID_CHARS
PLAINTEXT_BYTES = len(_DOMAIN) + 3 * _ID_FIELD + 2 * SHARE_BYTES
CIPHERTEXT_BYTES = Box.NONCE_SIZE + 16 + PLAINTEXT_BYTES


@dataclass(frozen=True, repr=False)
class SharePair:
    """What one device holds of another's secrets: a share of its self-mask secret and a share
    of its mask private key (at most one of them is ever revealed)."""

    self_mask: Share
    mask_key: Share

    def __repr__(self) -> str:
        return f"SharePair(x={self.self_mask.x})"


def _pad_id(value: str) -> bytes:
    raw = value.encode()
    return bytes([len(raw)]) + raw.ljust(MAX_ID_CHARS, b"\x00")


def _box(private: bytes, public: bytes) -> Box:
    try:
        return Box(PrivateKey(private), PublicKey(public))  # libsodium refuses low-order keys
    except CryptoError:
        raise refusal(SecAggReason.BAD_KEY, "share key is a low-order point") from None


def seal_shares(
    pair: SharePair,
    *,
    round_id: str,
    sender: str,
    recipient: str,
    sender_share_private: bytes,
    recipient_share_public: bytes,
    random_bytes: RandomBytes = nacl_random,
) -> bytes:
    """The ciphertext of ``pair`` for ``recipient`` (:data:`CIPHERTEXT_BYTES` bytes)."""
    plaintext = (
        _DOMAIN
        + _pad_id(round_id)
        + _pad_id(sender)
        + _pad_id(recipient)
        + pair.self_mask.to_bytes()
        + pair.mask_key.to_bytes()
    )
    box = _box(sender_share_private, recipient_share_public)
    return bytes(box.encrypt(plaintext, bytes(random_bytes(Box.NONCE_SIZE))))


def open_shares(
    ciphertext: bytes,
    *,
    round_id: str,
    sender: str,
    recipient: str,
    recipient_share_private: bytes,
    sender_share_public: bytes,
    expected_x: int,
) -> SharePair:
    """The shares ``sender`` sent to ``recipient``: ``decrypt_failed`` if the ciphertext is not
    from the sender's share key to ours, ``binding_mismatch`` if it names another round or
    pair, ``bad_share`` if the shares are not at the recipient's x coordinate."""
    if len(ciphertext) != CIPHERTEXT_BYTES:
        raise refusal(
            SecAggReason.DECRYPT_FAILED,
            "share ciphertext of the wrong size",
            expected=CIPHERTEXT_BYTES,
            found=len(ciphertext),
        )
    try:
        plaintext = _box(recipient_share_private, sender_share_public).decrypt(ciphertext)
    except CryptoError:
        raise refusal(SecAggReason.DECRYPT_FAILED, f"shares from {sender!r} do not open") from None
    binding = _DOMAIN + _pad_id(round_id) + _pad_id(sender) + _pad_id(recipient)
    if plaintext[: len(binding)] != binding:
        raise refusal(
            SecAggReason.BINDING_MISMATCH, f"shares from {sender!r} are bound to another round or pair"
        )
    rest = plaintext[len(binding) :]
    pair = SharePair(Share.from_bytes(rest[:SHARE_BYTES]), Share.from_bytes(rest[SHARE_BYTES:]))
    if pair.self_mask.x != expected_x or pair.mask_key.x != expected_x:
        raise refusal(SecAggReason.BAD_SHARE, f"shares from {sender!r} are not at our x", expected=expected_x)
    return pair
