"""Mask seeds and masks: key agreement, domain-separated seeds, and a ChaCha20 expansion.

Why each step:

- :func:`agree` is X25519 (``crypto_scalarmult``) between one device's mask private key and a
  neighbour's mask public key: both ends get the same 32 bytes, nobody else does. libsodium
  refuses a low-order public key (the result would be all zeros, known to everyone); that is a
  ``bad_key`` refusal here.
- :func:`pairwise_seed` hashes that secret with BLAKE2b-256, a personalisation string (the
  domain), the round id and the two device ids in sorted order. The raw X25519 output is not
  uniform, and without the round and ids one pair's secret would give the same mask in every
  round and for every pair that (by a bug) shared a key. Fields are length-prefixed so no two
  inputs encode alike.
- :func:`self_mask_seed` does the same for the device's fresh 32-byte self-mask secret.
- :func:`expand_mask` runs libsodium's ``randombytes_buf_deterministic`` (ChaCha20 keyed by
  the 32-byte seed) into 8 bytes per coordinate and keeps the low ``bits`` bits. ``2**bits``
  divides ``2**64``, so each coordinate is uniform modulo ``2**bits``: a mask hides a vector
  perfectly, not just computationally-given-the-PRG.
- :func:`mask_sign` fixes the convention that makes pairwise masks cancel: the device whose id
  sorts first adds the pair's mask, the other subtracts it.

Arithmetic is on ``uint64`` arrays, which wrap modulo ``2**64``; reducing with
``& (2**bits - 1)`` afterwards gives the result modulo ``2**bits``.
"""

from __future__ import annotations

import hashlib

import numpy as np
import numpy.typing as npt
from nacl.bindings import crypto_scalarmult, crypto_scalarmult_base
from nacl.exceptions import RuntimeError as NaclRuntimeError
from nacl.utils import randombytes_deterministic

from fedge.protocol.secagg.errors import SecAggReason, refusal

SEED_BYTES = 32
KEY_BYTES = 32
#: Most coordinates one mask may have: 4 Mi (a 32 MiB ChaCha20 stream), far above any fedge
#: model, and small enough that a bad length cannot make a party allocate gigabytes.
MAX_VECTOR_LENGTH = 1 << 22
_PAIR_DOMAIN = b"fedge-sa-pair-v1"  # BLAKE2b personalisation: at most 16 bytes
_SELF_DOMAIN = b"fedge-sa-self-v1"


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def agree(private_key: bytes, public_key: bytes) -> bytes:
    """The X25519 shared secret; a low-order or malformed public key is ``bad_key``."""
    if len(private_key) != KEY_BYTES or len(public_key) != KEY_BYTES:
        raise refusal(SecAggReason.BAD_KEY, "X25519 keys are 32 bytes")
    try:
        return bytes(crypto_scalarmult(private_key, public_key))
    except NaclRuntimeError:
        raise refusal(SecAggReason.BAD_KEY, "public key is a low-order point") from None


def public_from_private(private_key: bytes) -> bytes:
    """The X25519 public key of a private key (to check a rebuilt key against an advertisement)."""
    return bytes(crypto_scalarmult_base(private_key))


def pairwise_seed(shared_secret: bytes, round_id: str, device_a: str, device_b: str) -> bytes:
    """The 256-bit seed of the pair's mask: the same whichever of the two computes it."""
    if device_a == device_b:
        raise ValueError("a device has no pairwise mask with itself")
    first, second = sorted((device_a, device_b))
    digest = hashlib.blake2b(digest_size=SEED_BYTES, person=_PAIR_DOMAIN)
    for part in (round_id.encode(), first.encode(), second.encode(), shared_secret):
        digest.update(_field(part))
    return digest.digest()


def self_mask_seed(secret: bytes, round_id: str, device_id: str) -> bytes:
    """The 256-bit seed of a device's self-mask, from its fresh secret."""
    if len(secret) != SEED_BYTES:
        raise ValueError("a self-mask secret is 32 bytes")
    digest = hashlib.blake2b(digest_size=SEED_BYTES, person=_SELF_DOMAIN)
    for part in (round_id.encode(), device_id.encode(), secret):
        digest.update(_field(part))
    return digest.digest()


def check_bits(bits: int) -> int:
    """``bits`` if the modulus ``2**bits`` is one the protocol allows (8..62)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 8 <= bits <= 62:
        raise refusal(
            SecAggReason.BAD_PARAMETERS, "bits must be an integer in 8..62", field="bits", found=bits
        )
    return bits


def modulus_mask(bits: int) -> np.uint64:
    return np.uint64((1 << check_bits(bits)) - 1)


def expand_mask(seed: bytes, length: int, bits: int) -> npt.NDArray[np.uint64]:
    """``length`` coordinates uniform modulo ``2**bits``, determined by the 32-byte ``seed``."""
    if len(seed) != SEED_BYTES:
        raise ValueError("a mask seed is 32 bytes")
    if not 0 <= length <= MAX_VECTOR_LENGTH:
        raise refusal(
            SecAggReason.TOO_LARGE,
            "vector too long",
            field="length",
            expected=MAX_VECTOR_LENGTH,
            found=length,
        )
    stream = randombytes_deterministic(8 * length, seed)
    values = np.frombuffer(stream, dtype="<u8").astype(np.uint64)
    return values & modulus_mask(bits)


def mask_sign(own_id: str, other_id: str) -> int:
    """+1 if ``own_id`` adds the pair's mask, -1 if it subtracts it (ids sort, first adds)."""
    if own_id == other_id:
        raise ValueError("a device has no pairwise mask with itself")
    return 1 if own_id < other_id else -1


def add_mod(acc: npt.NDArray[np.uint64], term: npt.NDArray[np.uint64], sign: int) -> None:
    """``acc += sign * term`` in place, modulo ``2**64`` (reduce with :func:`modulus_mask`)."""
    if sign > 0:
        np.add(acc, term, out=acc)
    else:
        np.subtract(acc, term, out=acc)
