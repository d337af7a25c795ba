"""The device side of one round: a sans-I/O state machine that refuses what would expose it.

:class:`DeviceSession` takes messages in and returns messages out; the caller (later, the agent
service) moves them over MQTT and passes the current time. One session per round, never
reused: its keys, self-mask secret and memory of what it revealed belong to that round.

Phases, in order (any refusal listed below raises a :class:`~.errors.SecAggError`, counts its
reason in :attr:`DeviceSession.refusals`, and leaves the state as it was, unless it says the
session ends):

1. :meth:`~DeviceSession.advertise`: fresh round keys, signed with the identity key.
2. :meth:`~DeviceSession.on_advertisements`: checks each neighbour's advertisement (enrolled
   key's signature, this round, usable keys, no duplicate, no substituted or reused key; a bad
   one is counted and skipped), then Shamir-shares its self-mask secret and mask private key
   among the accepted neighbours and encrypts each neighbour's pair to it. With fewer than t
   accepted neighbours it stops (``too_few_neighbours``: it could not be recovered).
3. :meth:`~DeviceSession.on_shares`: opens the shares neighbours sent it. A ciphertext that
   does not open or is bound elsewhere ends the session (the device then counts as dropped after
   sharing and is recovered, rather than masking with a neighbour the aggregator would believe
   it did not mask with).
4. :meth:`~DeviceSession.mask`: the quantised update plus the self-mask plus, for every
   neighbour it holds shares of, the pair's mask with the agreed sign.
5. :meth:`~DeviceSession.on_unmask_request`: the security checks. It refuses a request that

   - names a device as both alive and dropped (``alive_and_dropped``);
   - asks for a share it does not hold: a device outside its neighbourhood, itself, or a
     neighbour it did not exchange shares with (``outside_neighbourhood``);
   - names fewer than t alive neighbours (``too_few_alive``);
   - asks for the self-mask share of a device whose mask-key share it revealed, or the reverse,
     in this or an earlier request of the round (``both_shares_requested``).

   A refused request reveals nothing; an accepted one is remembered before it is answered.

**Integration note**: what the session revealed must be persisted before the response is sent,
or the device must never answer an unmask request for a round it restarted in.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt
from nacl.signing import SigningKey, VerifyKey
from nacl.utils import random as nacl_random

from fedge.protocol.secagg.advertisement import (
    Advertisement,
    RoundKeys,
    sign_advertisement,
    verify_advertisement,
)
from fedge.protocol.secagg.config import RoundConfig
from fedge.protocol.secagg.errors import SecAggError, SecAggReason
from fedge.protocol.secagg.messages import (
    AdvertisementBundle,
    MaskedInput,
    ShareDelivery,
    ShareMessage,
    UnmaskRequest,
    UnmaskResponse,
)
from fedge.protocol.secagg.prg import (
    SEED_BYTES,
    add_mod,
    agree,
    expand_mask,
    mask_sign,
    modulus_mask,
    pairwise_seed,
    self_mask_seed,
)
from fedge.protocol.secagg.shamir import RandomBytes, split_secret
from fedge.protocol.secagg.share_box import SharePair, open_shares, seal_shares


class DevicePhase(StrEnum):
    """What the session waits for next."""

    ADVERTISE = "advertise"  # to advertise its keys
    SHARE = "share"  # its neighbours' advertisements
    COLLECT = "collect"  # the shares its neighbours sent it
    MASK = "mask"  # its quantised update
    UNMASK = "unmask"  # unmask requests (it may get several)
    ABORTED = "aborted"  # it stopped; it answers nothing more this round


class ShareKind(StrEnum):
    """Which of a device's two secrets a revealed share belongs to."""

    SELF_MASK = "self_mask"
    MASK_KEY = "mask_key"


class DeviceSession:
    """One device's part in one round (module docstring: phases and refusals)."""

    def __init__(
        self,
        config: RoundConfig,
        device_id: str,
        identity_key: SigningKey,
        neighbour_keys: Mapping[str, VerifyKey],
        *,
        random_bytes: RandomBytes = nacl_random,
    ) -> None:
        """``neighbour_keys``: enrolled Ed25519 verify keys by device id, from the operator's
        registry (at least the neighbours'; a neighbour without one is refused)."""
        self.config = config
        self.device_id = device_id
        self.neighbours = config.neighbours(device_id)  # unknown_device if not selected
        self._identity_key = identity_key
        self._verify_keys = {n: neighbour_keys[n] for n in self.neighbours if n in neighbour_keys}
        self._random = random_bytes
        self.phase = DevicePhase.ADVERTISE
        self.refusals: Counter[SecAggReason] = Counter()
        self._keys: RoundKeys | None = None
        self._self_secret = b""
        self._accepted: dict[str, Advertisement] = {}
        self._held: dict[str, SharePair] = {}
        self._revealed: dict[str, ShareKind] = {}

    # --- observable state -------------------------------------------------------------------

    @property
    def accepted(self) -> frozenset[str]:
        """Neighbours whose advertisements it accepted (it sent them shares)."""
        return frozenset(self._accepted)

    @property
    def partners(self) -> frozenset[str]:
        """Neighbours it holds shares of (and masks with)."""
        return frozenset(self._held)

    @property
    def revealed(self) -> Mapping[str, ShareKind]:
        """Which share it revealed, per device, this round."""
        return dict(self._revealed)

    # --- phases -------------------------------------------------------------------------------

    def advertise(self, now: float) -> Advertisement:
        """Makes the round's keys and self-mask secret; returns the signed advertisement."""
        self._expect(DevicePhase.ADVERTISE, self.config.round_id, self.device_id, now)
        self._keys = RoundKeys.generate(self._random)
        self._self_secret = bytes(self._random(SEED_BYTES))
        self.phase = DevicePhase.SHARE
        return sign_advertisement(
            self.config.round_id,
            self.device_id,
            self._keys.mask_public,
            self._keys.share_public,
            self._identity_key,
        )

    def on_advertisements(self, bundle: AdvertisementBundle, now: float) -> ShareMessage:
        """Accepts the good advertisements and returns the encrypted shares for them."""
        self._expect(DevicePhase.SHARE, bundle.round_id, bundle.recipient, now)
        for advertisement in bundle.advertisements:
            try:
                self._accept(advertisement)
            except SecAggError as exc:
                self.refusals[exc.reason] += 1
        if len(self._accepted) < self.config.threshold:
            raise self._abort(
                SecAggReason.TOO_FEW_NEIGHBOURS,
                f"{len(self._accepted)} usable neighbours, fewer than the threshold {self.config.threshold}",
            )
        keys = self._round_keys()
        holders = sorted(self._accepted)
        xs = [self.config.share_x(holder) for holder in holders]
        t = self.config.threshold
        self_shares = split_secret(self._self_secret, xs, t, self._random)
        key_shares = split_secret(keys.mask_private, xs, t, self._random)
        ciphertexts = {
            holder: seal_shares(
                SharePair(self_share, key_share),
                round_id=self.config.round_id,
                sender=self.device_id,
                recipient=holder,
                sender_share_private=keys.share_private,
                recipient_share_public=self._accepted[holder].share_public,
                random_bytes=self._random,
            )
            for holder, self_share, key_share in zip(holders, self_shares, key_shares, strict=True)
        }
        self.phase = DevicePhase.COLLECT
        return ShareMessage(self.config.round_id, self.device_id, ciphertexts)

    def on_shares(self, delivery: ShareDelivery, now: float) -> None:
        """Opens and keeps the shares accepted neighbours sent; then waits for the update."""
        self._expect(DevicePhase.COLLECT, delivery.round_id, delivery.device_id, now)
        keys = self._round_keys()
        held: dict[str, SharePair] = {}
        for sender, ciphertext in sorted(delivery.ciphertexts.items()):
            if sender not in self._accepted:  # we sent it nothing either: neither masks
                self.refusals[SecAggReason.NOT_NEIGHBOUR] += 1
                continue
            try:
                held[sender] = open_shares(
                    ciphertext,
                    round_id=self.config.round_id,
                    sender=sender,
                    recipient=self.device_id,
                    recipient_share_private=keys.share_private,
                    sender_share_public=self._accepted[sender].share_public,
                    expected_x=self.config.share_x(self.device_id),
                )
            except SecAggError as exc:
                raise self._abort(exc.reason, str(exc)) from None
        if len(held) < self.config.threshold:
            raise self._abort(
                SecAggReason.TOO_FEW_NEIGHBOURS,
                f"shares from {len(held)} neighbours, fewer than the threshold {self.config.threshold}",
            )
        self._held = held
        self.phase = DevicePhase.MASK

    def mask(self, update: npt.NDArray[np.uint64], now: float) -> MaskedInput:
        """The masked update: ``update`` (quantised, see :mod:`.quantise`) plus all masks."""
        self._expect(DevicePhase.MASK, self.config.round_id, self.device_id, now)
        vector = np.asarray(update)
        if vector.dtype != np.uint64 or vector.shape != (self.config.vector_length,):
            raise self._refuse(
                SecAggReason.BAD_VECTOR,
                f"update must be {self.config.vector_length} uint64 values",
                found=(str(vector.dtype), vector.shape),
            )
        if bool(np.any(vector > modulus_mask(self.config.bits))):
            raise self._refuse(SecAggReason.BAD_VECTOR, f"update holds a value >= 2**{self.config.bits}")
        keys = self._round_keys()
        length, bits, round_id = self.config.vector_length, self.config.bits, self.config.round_id
        masked = vector.copy()
        add_mod(
            masked, expand_mask(self_mask_seed(self._self_secret, round_id, self.device_id), length, bits), 1
        )
        for partner in sorted(self._held):
            secret = agree(keys.mask_private, self._accepted[partner].mask_public)
            seed = pairwise_seed(secret, round_id, self.device_id, partner)
            add_mod(masked, expand_mask(seed, length, bits), mask_sign(self.device_id, partner))
        masked &= modulus_mask(bits)
        self.phase = DevicePhase.UNMASK
        return MaskedInput(round_id, self.device_id, tuple(sorted(self._held)), masked)

    def on_unmask_request(self, request: UnmaskRequest, now: float) -> UnmaskResponse:
        """The shares asked for, unless the request could expose a device (module docstring)."""
        self._expect(DevicePhase.UNMASK, request.round_id, request.recipient, now)
        alive, dropped = set(request.alive), set(request.dropped)
        both = alive & dropped
        if both:
            raise self._refuse(
                SecAggReason.ALIVE_AND_DROPPED,
                f"{sorted(both)} named both alive and dropped",
                found=sorted(both),
            )
        outside = (alive | dropped) - set(self._held)
        if outside:
            raise self._refuse(
                SecAggReason.OUTSIDE_NEIGHBOURHOOD,
                f"asked for shares of {sorted(outside)}, which this device does not hold",
                found=sorted(outside),
            )
        if len(alive) < self.config.threshold:
            raise self._refuse(
                SecAggReason.TOO_FEW_ALIVE,
                f"{len(alive)} alive neighbours named, fewer than the threshold {self.config.threshold}",
                expected=f">= {self.config.threshold}",
                found=len(alive),
            )
        conflicts = {d for d in alive if self._revealed.get(d) == ShareKind.MASK_KEY}
        conflicts |= {d for d in dropped if self._revealed.get(d) == ShareKind.SELF_MASK}
        if conflicts:
            raise self._refuse(
                SecAggReason.BOTH_SHARES_REQUESTED,
                f"the other share of {sorted(conflicts)} was already revealed this round",
                found=sorted(conflicts),
            )
        for device in alive:
            self._revealed[device] = ShareKind.SELF_MASK
        for device in dropped:
            self._revealed[device] = ShareKind.MASK_KEY
        return UnmaskResponse(
            round_id=self.config.round_id,
            device_id=self.device_id,
            self_mask_shares={d: self._held[d].self_mask.to_bytes() for d in sorted(alive)},
            mask_key_shares={d: self._held[d].mask_key.to_bytes() for d in sorted(dropped)},
        )

    # --- helpers ------------------------------------------------------------------------------

    def _accept(self, advertisement: Advertisement) -> None:
        device = advertisement.device_id
        if device == self.device_id or device not in self.neighbours:
            raise SecAggError(SecAggReason.NOT_NEIGHBOUR, f"{device!r} is not a neighbour")
        key = self._verify_keys.get(device)
        if key is None:
            raise SecAggError(SecAggReason.UNKNOWN_DEVICE, f"no enrolled identity key for {device!r}")
        verify_advertisement(advertisement, self.config.round_id, key)
        known = self._accepted.get(device)
        if known is not None:
            if known == advertisement:
                raise SecAggError(SecAggReason.DUPLICATE, f"{device!r} advertised twice")
            raise SecAggError(
                SecAggReason.SUBSTITUTED_KEYS, f"other keys for {device!r} were already accepted"
            )
        keys = self._round_keys()
        seen = {keys.mask_public, keys.share_public}
        for other in self._accepted.values():
            seen |= {other.mask_public, other.share_public}
        if advertisement.mask_public in seen or advertisement.share_public in seen:
            raise SecAggError(SecAggReason.KEY_REUSED, f"{device!r} advertised a key already in use")
        self._accepted[device] = advertisement

    def _round_keys(self) -> RoundKeys:
        if self._keys is None:  # only reachable by a bug: phases guard every call
            raise SecAggError(SecAggReason.WRONG_PHASE, "no round keys yet")
        return self._keys

    def _expect(self, phase: DevicePhase, round_id: str, recipient: str, now: float) -> None:
        if round_id != self.config.round_id:
            raise self._refuse(
                SecAggReason.WRONG_ROUND,
                "message for another round",
                expected=self.config.round_id,
                found=round_id,
            )
        if recipient != self.device_id:
            raise self._refuse(
                SecAggReason.UNKNOWN_DEVICE,
                "message for another device",
                expected=self.device_id,
                found=recipient,
            )
        if now > self.config.deadlines.unmask:
            raise self._refuse(SecAggReason.EXPIRED, "the round is over", found=now)
        if self.phase != phase:
            raise self._refuse(
                SecAggReason.WRONG_PHASE, f"waiting for {self.phase}, not {phase}", found=str(phase)
            )

    def _refuse(self, reason: SecAggReason, detail: str, **fields: Any) -> SecAggError:
        self.refusals[reason] += 1
        return SecAggError(reason, detail, **fields)

    def _abort(self, reason: SecAggReason, detail: str) -> SecAggError:
        self.phase = DevicePhase.ABORTED
        self._self_secret = b""
        return self._refuse(reason, f"device leaves the round: {detail}")
