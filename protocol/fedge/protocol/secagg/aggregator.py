"""The aggregator side of one round: relays, sums masked inputs, and removes the masks.

:class:`AggregatorSession` is sans-I/O like :class:`~.device.DeviceSession`: ``on_*`` methods
take one device message each (a refusal raises :class:`~.errors.SecAggError` and is counted in
:attr:`AggregatorSession.refusals`; the state is unchanged), ``close_*`` methods end a phase and
return the messages to send, keyed by recipient. The caller closes a phase when :meth:`due`
says so (its deadline passed, or every device it waits for has answered).

Device sets, as in Bonawitz et al.: U1 advertised, U2 sent shares, U3 sent a masked input (the
*survivors*, whose inputs are in the sum), U4 answered the unmask request. A device in U2 but
not U3 *dropped after sharing*: its pairwise masks are in its neighbours' inputs, so its mask
key is rebuilt from its neighbours' shares and those masks removed. A device in U3 that does
not answer is still in the sum; its self-mask is rebuilt from its neighbours' shares.

What this object stores (a test walks its attributes after every step): public keys,
relayed ciphertexts until they are delivered, which device masked with which, the Shamir
shares devices revealed, and **one** vector -- the running sum of masked inputs, each added and
forgotten as it arrives. It never holds an individual input, masked or not, and never asks
for both secrets of one device, so the only vector it can unmask is the sum over U3.

The round aborts (:class:`~.errors.RoundAborted`) when fewer than ``t + 1`` devices remain in
a phase (each needs t neighbours), when a survivor has fewer than t surviving neighbours, or a
device whose secret is needed has fewer than t neighbours holding shares of it, or when shares
are missing or inconsistent at the end. Robust decoding of shares from malicious devices
(Reed-Solomon error correction) is not done: one wrong share makes the round abort rather than
produce a wrong sum.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt
from nacl.signing import VerifyKey

from fedge.protocol.secagg.advertisement import Advertisement, check_public_key, verify_advertisement
from fedge.protocol.secagg.config import RoundConfig
from fedge.protocol.secagg.errors import RoundAborted, SecAggError, SecAggReason
from fedge.protocol.secagg.messages import (
    AdvertisementBundle,
    MaskedInput,
    ShareDelivery,
    ShareMessage,
    UnmaskRequest,
    UnmaskResponse,
)
from fedge.protocol.secagg.prg import (
    add_mod,
    agree,
    expand_mask,
    mask_sign,
    modulus_mask,
    pairwise_seed,
    public_from_private,
    self_mask_seed,
)
from fedge.protocol.secagg.shamir import Share, reconstruct_secret


class AggregatorPhase(StrEnum):
    """What the session collects now."""

    ADVERTISE = "advertise"
    SHARE = "share"
    MASKED_INPUT = "masked_input"
    UNMASK = "unmask"
    DONE = "done"
    ABORTED = "aborted"


@dataclass(frozen=True, eq=False)
class SecAggResult:
    """The round's outcome: the sum of the survivors' quantised updates, modulo ``2**bits``."""

    round_id: str
    total: npt.NDArray[np.uint64]
    #: U3: the devices whose inputs are in ``total``.
    survivors: tuple[str, ...]
    #: Dropped after sharing; their masks were removed, their inputs are not in the sum.
    recovered: tuple[str, ...]
    #: Selected but never sent shares: not in the sum, no secret of theirs was needed.
    excluded: tuple[str, ...]

    def dequantised(self, config: RoundConfig) -> npt.NDArray[np.float64]:
        """The float sum of the survivors' clipped updates (:meth:`.Quantiser.dequantise_sum`)."""
        return config.quantiser.dequantise_sum(self.total)


class AggregatorSession:
    """The aggregator's part in one round (module docstring: sets, storage, aborts)."""

    def __init__(self, config: RoundConfig, verify_keys: Mapping[str, VerifyKey] | None = None) -> None:
        """``verify_keys``: the enrolled identity keys, to drop forged advertisements early
        (devices check them anyway, so this only saves them the work)."""
        self.config = config
        self._verify_keys = dict(verify_keys) if verify_keys is not None else None
        self._graph = {device: config.neighbours(device) for device in config.device_ids}
        self.phase = AggregatorPhase.ADVERTISE
        self.refusals: Counter[SecAggReason] = Counter()
        self._ads: dict[str, Advertisement] = {}
        self._ciphertexts: dict[str, dict[str, bytes]] = {}  # sender -> recipient -> ciphertext
        self._delivered: dict[str, frozenset[str]] = {}  # recipient -> senders relayed to it
        self._partners: dict[str, frozenset[str]] = {}  # U3: device -> whom it masked with
        self._sum: npt.NDArray[np.uint64] | None = None
        self._requests: dict[str, UnmaskRequest] = {}
        self._recovered: tuple[str, ...] = ()
        self._self_shares: dict[str, dict[str, Share]] = {}  # owner -> holder -> share
        self._key_shares: dict[str, dict[str, Share]] = {}
        self._responders: set[str] = set()

    # --- scheduling ---------------------------------------------------------------------------

    def due(self, now: float) -> bool:
        """True when the current phase should be closed: its deadline passed or all answered."""
        deadlines = self.config.deadlines
        if self.phase == AggregatorPhase.ADVERTISE:
            return now >= deadlines.advertise or len(self._ads) == len(self.config.device_ids)
        if self.phase == AggregatorPhase.SHARE:
            return now >= deadlines.share or set(self._ciphertexts) == set(self._ads)
        if self.phase == AggregatorPhase.MASKED_INPUT:
            return now >= deadlines.masked_input or set(self._partners) == set(self._delivered)
        if self.phase == AggregatorPhase.UNMASK:
            return now >= deadlines.unmask or self._responders == set(self._requests)
        return False

    # --- phase 1: advertisements --------------------------------------------------------------

    def on_advertisement(self, advertisement: Advertisement, now: float) -> None:
        device = advertisement.device_id
        self._expect(
            AggregatorPhase.ADVERTISE, advertisement.round_id, device, now, self.config.deadlines.advertise
        )
        if self._verify_keys is not None:
            key = self._verify_keys.get(device)
            if key is None:
                raise self._refuse(SecAggReason.UNKNOWN_DEVICE, f"no enrolled identity key for {device!r}")
            try:
                verify_advertisement(advertisement, self.config.round_id, key)
            except SecAggError as exc:
                raise self._refuse(exc.reason, str(exc)) from None
        else:
            try:
                check_public_key(advertisement.mask_public, "mask_public")
                check_public_key(advertisement.share_public, "share_public")
            except SecAggError as exc:
                raise self._refuse(exc.reason, str(exc)) from None
        known = self._ads.get(device)
        if known is not None:
            reason = SecAggReason.DUPLICATE if known == advertisement else SecAggReason.SUBSTITUTED_KEYS
            raise self._refuse(reason, f"{device!r} already advertised")
        in_use = {key for ad in self._ads.values() for key in (ad.mask_public, ad.share_public)}
        if {advertisement.mask_public, advertisement.share_public} & in_use or (
            advertisement.mask_public == advertisement.share_public
        ):
            raise self._refuse(SecAggReason.KEY_REUSED, f"{device!r} advertised a key already in use")
        self._ads[device] = advertisement

    def close_advertising(self, now: float) -> dict[str, AdvertisementBundle]:
        """Ends phase 1: each advertiser gets its advertised neighbours' advertisements."""
        self._expect_phase(AggregatorPhase.ADVERTISE)
        self._require_enough(self._ads, "advertised")
        bundles = {
            device: AdvertisementBundle(
                self.config.round_id,
                device,
                tuple(self._ads[n] for n in sorted(self._graph[device]) if n in self._ads),
            )
            for device in sorted(self._ads)
        }
        self.phase = AggregatorPhase.SHARE
        return bundles

    # --- phase 2: shares ----------------------------------------------------------------------

    def on_shares(self, message: ShareMessage, now: float) -> None:
        sender = message.device_id
        self._expect(AggregatorPhase.SHARE, message.round_id, sender, now, self.config.deadlines.share)
        if sender not in self._ads:
            raise self._refuse(SecAggReason.UNKNOWN_DEVICE, f"{sender!r} did not advertise")
        if sender in self._ciphertexts:
            raise self._refuse(SecAggReason.DUPLICATE, f"{sender!r} already sent shares")
        strangers = set(message.ciphertexts) - (self._graph[sender] & set(self._ads))
        if strangers:
            raise self._refuse(SecAggReason.NOT_NEIGHBOUR, f"shares for non-neighbours {sorted(strangers)}")
        if len(message.ciphertexts) < self.config.threshold:
            raise self._refuse(SecAggReason.TOO_FEW_NEIGHBOURS, f"{sender!r} shared with too few neighbours")
        self._ciphertexts[sender] = dict(message.ciphertexts)

    def close_sharing(self, now: float) -> dict[str, ShareDelivery]:
        """Ends phase 2: each sender gets the ciphertexts other senders addressed to it."""
        self._expect_phase(AggregatorPhase.SHARE)
        self._require_enough(self._ciphertexts, "sent shares")
        deliveries: dict[str, ShareDelivery] = {}
        for recipient in sorted(self._ciphertexts):
            relayed = {
                sender: cts[recipient] for sender, cts in self._ciphertexts.items() if recipient in cts
            }
            deliveries[recipient] = ShareDelivery(self.config.round_id, recipient, relayed)
            self._delivered[recipient] = frozenset(relayed)
        self._ciphertexts.clear()  # relayed; nothing here can read them anyway
        self.phase = AggregatorPhase.MASKED_INPUT
        return deliveries

    # --- phase 3: masked inputs ---------------------------------------------------------------

    def on_masked_input(self, message: MaskedInput, now: float) -> None:
        device = message.device_id
        self._expect(
            AggregatorPhase.MASKED_INPUT, message.round_id, device, now, self.config.deadlines.masked_input
        )
        if device not in self._delivered:
            raise self._refuse(
                SecAggReason.UNKNOWN_DEVICE, f"{device!r} is not among the devices that shared"
            )
        if device in self._partners:
            raise self._refuse(SecAggReason.DUPLICATE, f"{device!r} already sent its masked input")
        partners = frozenset(message.partners)
        if not partners <= self._delivered[device]:
            raise self._refuse(
                SecAggReason.NOT_NEIGHBOUR, f"{device!r} claims partners it got no shares from"
            )
        if len(partners) < self.config.threshold:
            raise self._refuse(SecAggReason.TOO_FEW_NEIGHBOURS, f"{device!r} masked with too few neighbours")
        vector = message.vector
        if (
            vector.dtype != np.uint64
            or vector.shape != (self.config.vector_length,)
            or bool(np.any(vector > modulus_mask(self.config.bits)))
        ):
            raise self._refuse(SecAggReason.BAD_VECTOR, f"{device!r} sent a vector off the round's shape")
        if self._sum is None:
            self._sum = np.zeros(self.config.vector_length, dtype=np.uint64)
        add_mod(self._sum, vector, 1)
        self._sum &= modulus_mask(self.config.bits)
        self._partners[device] = partners

    def close_masked_input(self, now: float) -> dict[str, UnmaskRequest]:
        """Ends phase 3: checks recovery is possible, then asks each survivor for shares."""
        self._expect_phase(AggregatorPhase.MASKED_INPUT)
        survivors = set(self._partners)
        self._require_enough(survivors, "sent a masked input")
        for device in sorted(survivors):
            for partner in self._partners[device] & survivors:
                if device not in self._partners[partner]:
                    raise self._abort(
                        SecAggReason.ASYMMETRIC_MASKS,
                        f"{device!r} masked with {partner!r} but not the reverse",
                    )
            if len(self._partners[device] & survivors) < self.config.threshold:
                raise self._abort(
                    SecAggReason.TOO_FEW_SURVIVORS,
                    f"survivor {device!r} has fewer than {self.config.threshold} surviving neighbours",
                )
        recovered = sorted(
            d for d in set(self._delivered) - survivors if any(d in self._partners[v] for v in survivors)
        )
        for dropped in recovered:
            holders = [v for v in survivors if dropped in self._partners[v]]
            if len(holders) < self.config.threshold:
                raise self._abort(
                    SecAggReason.TOO_FEW_SURVIVORS,
                    f"dropped {dropped!r} has fewer than {self.config.threshold} surviving neighbours",
                )
        self._recovered = tuple(recovered)
        self._requests = {
            device: UnmaskRequest(
                self.config.round_id,
                device,
                alive=tuple(sorted(self._partners[device] & survivors)),
                dropped=tuple(sorted(self._partners[device] & set(recovered))),
            )
            for device in sorted(survivors)
        }
        self.phase = AggregatorPhase.UNMASK
        return dict(self._requests)

    # --- phase 4: unmasking -------------------------------------------------------------------

    def on_unmask_response(self, message: UnmaskResponse, now: float) -> None:
        device = message.device_id
        self._expect(AggregatorPhase.UNMASK, message.round_id, device, now, self.config.deadlines.unmask)
        request = self._requests.get(device)
        if request is None:
            raise self._refuse(SecAggReason.UNKNOWN_DEVICE, f"{device!r} was not asked for shares")
        if device in self._responders:
            raise self._refuse(SecAggReason.DUPLICATE, f"{device!r} already answered")
        if not set(message.self_mask_shares) <= set(request.alive) or not set(message.mask_key_shares) <= set(
            request.dropped
        ):
            raise self._refuse(SecAggReason.BAD_SHARE, f"{device!r} sent shares that were not asked for")
        x = self.config.share_x(device)
        try:
            self_shares = {owner: Share.from_bytes(raw) for owner, raw in message.self_mask_shares.items()}
            key_shares = {owner: Share.from_bytes(raw) for owner, raw in message.mask_key_shares.items()}
        except SecAggError as exc:
            raise self._refuse(exc.reason, str(exc)) from None
        if any(share.x != x for share in (*self_shares.values(), *key_shares.values())):
            raise self._refuse(SecAggReason.BAD_SHARE, f"{device!r} sent shares at another holder's x")
        for owner, share in self_shares.items():
            self._self_shares.setdefault(owner, {})[device] = share
        for owner, share in key_shares.items():
            self._key_shares.setdefault(owner, {})[device] = share
        self._responders.add(device)

    def finish(self, now: float) -> SecAggResult:
        """Ends the round: removes every self-mask and the dropped devices' pairwise masks."""
        self._expect_phase(AggregatorPhase.UNMASK)
        if self._sum is None:  # unreachable: phase 3 needed more than t inputs to get here
            raise SecAggError(SecAggReason.WRONG_PHASE, "no masked input was summed")
        length, bits, round_id = self.config.vector_length, self.config.bits, self.config.round_id
        total = self._sum.copy()
        for device in sorted(self._partners):
            secret = self._rebuild(self._self_shares.get(device, {}), device, "self-mask secret")
            add_mod(total, expand_mask(self_mask_seed(secret, round_id, device), length, bits), -1)
        for dropped in self._recovered:
            private = self._rebuild(self._key_shares.get(dropped, {}), dropped, "mask key")
            if public_from_private(private) != self._ads[dropped].mask_public:
                raise self._abort(
                    SecAggReason.KEY_MISMATCH, f"the rebuilt mask key of {dropped!r} is not its own"
                )
            for survivor in sorted(v for v in self._partners if dropped in self._partners[v]):
                secret = agree(private, self._ads[survivor].mask_public)
                mask = expand_mask(pairwise_seed(secret, round_id, dropped, survivor), length, bits)
                add_mod(total, mask, -mask_sign(survivor, dropped))
        total &= modulus_mask(bits)
        self.phase = AggregatorPhase.DONE
        survivors = tuple(sorted(self._partners))
        excluded = tuple(sorted(set(self.config.device_ids) - set(survivors) - set(self._recovered)))
        return SecAggResult(round_id, total, survivors, self._recovered, excluded)

    # --- helpers ------------------------------------------------------------------------------

    def _rebuild(self, shares: Mapping[str, Share], owner: str, what: str) -> bytes:
        try:
            return reconstruct_secret([shares[holder] for holder in sorted(shares)], self.config.threshold)
        except SecAggError as exc:
            raise self._abort(exc.reason, f"cannot rebuild the {what} of {owner!r}: {exc}") from None

    def _require_enough(self, devices: Iterable[str], what: str) -> None:
        count = len(set(devices))
        if count <= self.config.threshold:
            raise self._abort(
                SecAggReason.TOO_FEW_SURVIVORS,
                f"only {count} devices {what}; threshold + 1 = {self.config.threshold + 1} are needed",
            )

    def _expect_phase(self, phase: AggregatorPhase) -> None:
        if self.phase != phase:
            raise SecAggError(SecAggReason.WRONG_PHASE, f"the session is in {self.phase}, not {phase}")

    def _expect(
        self, phase: AggregatorPhase, round_id: str, device: str, now: float, deadline: float
    ) -> None:
        if round_id != self.config.round_id:
            raise self._refuse(SecAggReason.WRONG_ROUND, "message for another round", found=round_id)
        if not self.config.is_selected(device):
            raise self._refuse(SecAggReason.UNKNOWN_DEVICE, f"{device!r} is not selected for the round")
        if self.phase != phase:
            raise self._refuse(SecAggReason.WRONG_PHASE, f"the session is in {self.phase}, not {phase}")
        if now > deadline:
            raise self._refuse(SecAggReason.EXPIRED, f"arrived after the {phase} deadline", found=now)

    def _refuse(self, reason: SecAggReason, detail: str, **fields: Any) -> SecAggError:
        self.refusals[reason] += 1
        return SecAggError(reason, detail, **fields)

    def _abort(self, reason: SecAggReason, detail: str) -> RoundAborted:
        self.phase = AggregatorPhase.ABORTED
        self._sum = None
        return RoundAborted(reason, detail)
