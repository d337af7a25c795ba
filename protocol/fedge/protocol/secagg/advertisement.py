"""Per-round key pairs and their advertisement, signed with the device's enrolled identity key.

Each round, each device makes two fresh X25519 key pairs: the **mask key** (agreed with each
neighbour into the pair's mask seed, :mod:`.prg`) and the **share key** (a NaCl ``Box`` to each
neighbour carries the Shamir shares, :mod:`.share_box`). Fresh keys per round mean a secret
rebuilt for a dropped device in one round says nothing about another round.

The aggregator relays the advertisements, so it could try to hand a device its *own* public
keys in place of a neighbour's (a man in the middle: it would then read the shares and know the
masks). Hence each advertisement is signed with the device's **Ed25519 identity key**
(:func:`sign_advertisement`), and the signed bytes bind the protocol and version, the round
id, the device id and both public keys, each length-prefixed: a signature cannot be replayed
into another round, moved to another device or kept with other keys.

**What integration needs** (not done here): today a device is enrolled with an X25519 ``Box``
key only. Each device must also get an Ed25519 signing key, and its *verify* key must be
enrolled in the operator's registry and distributed to its neighbours (in practice to every
device of the fleet, as the graph changes each round) through a channel the aggregator cannot
alter: signed by the operator's registry key, not by the aggregator's manifest key. If the
aggregator could substitute verify keys, it could substitute round keys, and secure
aggregation would protect nothing against a malicious aggregator.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey
from nacl.utils import random as nacl_random

from fedge.protocol.secagg.encoding import (
    ENVELOPE_BYTES,
    b64,
    b64_len,
    check_device_id,
    check_object,
    decode_object,
    encode,
    get_bytes,
    get_id,
)
from fedge.protocol.secagg.errors import SecAggReason, refusal
from fedge.protocol.secagg.prg import KEY_BYTES, agree, public_from_private
from fedge.protocol.secagg.shamir import RandomBytes

SIGNATURE_BYTES = 64
_DOMAIN = b"fedge-secagg-advertisement-v1"
#: A clamped scalar used only to test public keys: every low-order point times it is zero.
_PROBE_SCALAR = bytes([8]) + bytes(30) + bytes([64])
_FIELDS = {"round_id", "device_id", "mask_public", "share_public", "signature"}


@dataclass(frozen=True, repr=False)
class RoundKeys:
    """A device's two fresh X25519 key pairs for one round (private halves never leave it)."""

    mask_private: bytes
    mask_public: bytes
    share_private: bytes
    share_public: bytes

    @staticmethod
    def generate(random_bytes: RandomBytes = nacl_random) -> RoundKeys:
        mask_private = bytes(random_bytes(KEY_BYTES))
        share_private = bytes(random_bytes(KEY_BYTES))
        return RoundKeys(
            mask_private, public_from_private(mask_private), share_private, public_from_private(share_private)
        )

    def __repr__(self) -> str:
        return f"RoundKeys(mask_public={self.mask_public.hex()[:16]}..., share_public=...)"


@dataclass(frozen=True)
class Advertisement:
    """A device's public round keys and its identity signature over them."""

    round_id: str
    device_id: str
    mask_public: bytes
    share_public: bytes
    signature: bytes

    TYPE = "secagg-advertisement"
    #: Largest encoding of one advertisement (ids at their longest).
    MAX_BYTES = ENVELOPE_BYTES + 2 * b64_len(KEY_BYTES) + b64_len(SIGNATURE_BYTES)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "round_id": self.round_id,
            "device_id": self.device_id,
            "mask_public": b64(self.mask_public),
            "share_public": b64(self.share_public),
            "signature": b64(self.signature),
        }

    def encode(self) -> bytes:
        return encode(self.to_dict())

    @staticmethod
    def from_dict(data: Any) -> Advertisement:
        document = check_object(data, Advertisement.TYPE, _FIELDS)
        return Advertisement(
            round_id=get_id(document, "round_id", "round id"),
            device_id=get_id(document, "device_id"),
            mask_public=get_bytes(document, "mask_public", KEY_BYTES),
            share_public=get_bytes(document, "share_public", KEY_BYTES),
            signature=get_bytes(document, "signature", SIGNATURE_BYTES),
        )

    @staticmethod
    def decode(data: bytes) -> Advertisement:
        return Advertisement.from_dict(
            decode_object(data, Advertisement.MAX_BYTES, Advertisement.TYPE, _FIELDS)
        )


def signed_bytes(round_id: str, device_id: str, mask_public: bytes, share_public: bytes) -> bytes:
    """What the identity key signs: domain, round id, device id and both keys, length-prefixed."""
    parts = (_DOMAIN, round_id.encode(), device_id.encode(), mask_public, share_public)
    return b"".join(len(part).to_bytes(4, "big") + part for part in parts)


def sign_advertisement(
    round_id: str, device_id: str, mask_public: bytes, share_public: bytes, identity_key: SigningKey
) -> Advertisement:
    """The device's signed advertisement of its round keys."""
    check_device_id(round_id, "round_id", "round id")
    check_device_id(device_id, "device_id")
    check_public_key(mask_public, "mask_public")
    check_public_key(share_public, "share_public")
    signature = identity_key.sign(signed_bytes(round_id, device_id, mask_public, share_public)).signature
    return Advertisement(round_id, device_id, mask_public, share_public, bytes(signature))


def verify_advertisement(advertisement: Advertisement, round_id: str, verify_key: VerifyKey) -> Advertisement:
    """``advertisement`` if it is for ``round_id``, its keys are usable and distinct, and the
    device's enrolled ``verify_key`` signed it; else ``wrong_round``, ``bad_key``,
    ``key_reused`` or ``bad_signature``."""
    if advertisement.round_id != round_id:
        raise refusal(
            SecAggReason.WRONG_ROUND,
            f"advertisement of {advertisement.device_id!r} is for another round",
            field="round_id",
            expected=round_id,
            found=advertisement.round_id,
        )
    message = signed_bytes(
        advertisement.round_id, advertisement.device_id, advertisement.mask_public, advertisement.share_public
    )
    try:
        verify_key.verify(message, advertisement.signature)
    except BadSignatureError:
        raise refusal(
            SecAggReason.BAD_SIGNATURE,
            f"advertisement of {advertisement.device_id!r} is not signed by its enrolled key",
            field="signature",
        ) from None
    check_public_key(advertisement.mask_public, "mask_public")
    check_public_key(advertisement.share_public, "share_public")
    if advertisement.mask_public == advertisement.share_public:
        raise refusal(SecAggReason.KEY_REUSED, "the mask and share keys must differ", field="share_public")
    return advertisement


def check_public_key(public: bytes, field: str) -> None:
    """Refuses (``bad_key``) a key that is not 32 bytes or is a low-order point."""
    if len(public) != KEY_BYTES:
        raise refusal(SecAggReason.BAD_KEY, f"{field} must be 32 bytes", field=field, found=len(public))
    agree(_PROBE_SCALAR, public)  # libsodium refuses an all-zero result: a low-order point


def verify_keys_for(trusted: Mapping[str, VerifyKey], device_id: str) -> VerifyKey:
    """The enrolled verify key of ``device_id`` (``unknown_device`` if there is none)."""
    key = trusted.get(device_id)
    if key is None:
        raise refusal(SecAggReason.UNKNOWN_DEVICE, f"no enrolled identity key for {device_id!r}")
    return key
