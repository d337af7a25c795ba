"""What a malicious aggregator (or a forging relay) asks for, and what the devices refuse.

Each refusal carries its own counted reason and reveals nothing. The last tests play the
attack the refusals exist for: splitting a device's neighbours so some reveal its self-mask
share and others its mask-key share; with ``t > k / 2`` the aggregator gets t of neither.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from nacl.signing import SigningKey
from secagg_harness import T_INPUT, T_SHARE, T_UNMASK, Fleet, identity_key, make_config

from fedge.protocol.secagg import (
    Advertisement,
    AdvertisementBundle,
    DevicePhase,
    MaskedInput,
    RoundKeys,
    SecAggError,
    SecAggReason,
    ShareDelivery,
    ShareKind,
    ShareMessage,
    UnmaskRequest,
    UnmaskResponse,
    sign_advertisement,
    verify_advertisement,
)
from fedge.protocol.secagg.advertisement import signed_bytes
from fedge.protocol.secagg.shamir import Share, reconstruct_secret


def _at_unmask(n: int = 10, **config: int) -> tuple[Fleet, dict[str, UnmaskRequest]]:
    fleet = Fleet(make_config(n, **config))
    requests = fleet.mask(fleet.share(fleet.advertise()))
    return fleet, requests


def _refused(call: object, reason: SecAggReason) -> SecAggError:
    assert callable(call)
    with pytest.raises(SecAggError) as caught:
        call()
    assert caught.value.reason == reason, caught.value
    return caught.value


# --- unmask requests -------------------------------------------------------------------------


def test_a_request_naming_a_device_alive_and_dropped_is_refused() -> None:
    fleet, requests = _at_unmask()
    device_id, honest = next(iter(requests.items()))
    device = fleet.devices[device_id]
    evil = replace(honest, dropped=(honest.alive[0],))
    _refused(lambda: device.on_unmask_request(evil, T_UNMASK), SecAggReason.ALIVE_AND_DROPPED)
    assert device.refusals[SecAggReason.ALIVE_AND_DROPPED] == 1
    assert device.revealed == {}


def test_a_request_naming_fewer_than_t_alive_neighbours_is_refused() -> None:
    fleet, requests = _at_unmask()
    device_id, honest = next(iter(requests.items()))
    t = fleet.config.threshold
    evil = replace(honest, alive=honest.alive[: t - 1])
    _refused(lambda: fleet.devices[device_id].on_unmask_request(evil, T_UNMASK), SecAggReason.TOO_FEW_ALIVE)
    # Declaring the others dropped instead does not help: still too few alive.
    evil = replace(honest, alive=honest.alive[: t - 1], dropped=honest.alive[t - 1 :])
    _refused(lambda: fleet.devices[device_id].on_unmask_request(evil, T_UNMASK), SecAggReason.TOO_FEW_ALIVE)
    assert fleet.devices[device_id].refusals[SecAggReason.TOO_FEW_ALIVE] == 2
    assert fleet.devices[device_id].revealed == {}


def test_a_request_for_a_share_outside_the_neighbourhood_is_refused() -> None:
    fleet, requests = _at_unmask(40, degree=10, threshold=6)
    device_id, honest = next(iter(requests.items()))
    device = fleet.devices[device_id]
    stranger = next(d for d in fleet.config.device_ids if d not in device.neighbours and d != device_id)
    for evil in (
        replace(honest, dropped=(stranger,)),
        replace(honest, alive=(*honest.alive, stranger)),
        replace(honest, dropped=(device_id,)),  # its own secret: it holds no share of it
    ):
        _refused(
            lambda evil=evil: device.on_unmask_request(evil, T_UNMASK), SecAggReason.OUTSIDE_NEIGHBOURHOOD
        )
    assert device.refusals[SecAggReason.OUTSIDE_NEIGHBOURHOOD] == 3
    assert device.revealed == {}


def test_a_device_never_reveals_both_shares_of_one_device() -> None:
    fleet, requests = _at_unmask()
    device_id, honest = next(iter(requests.items()))
    device = fleet.devices[device_id]
    response = device.on_unmask_request(honest, T_UNMASK)
    assert set(response.self_mask_shares) == set(honest.alive) and response.mask_key_shares == {}
    assert all(kind == ShareKind.SELF_MASK for kind in device.revealed.values())
    target = honest.alive[0]
    # A second request now calls the target dropped, to get its mask-key share as well.
    evil = replace(honest, alive=honest.alive[1:], dropped=(target,))
    _refused(lambda: device.on_unmask_request(evil, T_UNMASK), SecAggReason.BOTH_SHARES_REQUESTED)
    assert device.revealed[target] == ShareKind.SELF_MASK
    # The same request again is answered the same way (a lost response can be asked for again).
    again = device.on_unmask_request(honest, T_UNMASK)
    assert again == response


def test_the_reverse_order_is_refused_too() -> None:
    fleet, requests = _at_unmask()
    device_id, honest = next(iter(requests.items()))
    device = fleet.devices[device_id]
    target = honest.alive[0]
    first = replace(honest, alive=honest.alive[1:], dropped=(target,))
    assert set(device.on_unmask_request(first, T_UNMASK).mask_key_shares) == {target}
    _refused(lambda: device.on_unmask_request(honest, T_UNMASK), SecAggReason.BOTH_SHARES_REQUESTED)
    assert device.refusals[SecAggReason.BOTH_SHARES_REQUESTED] == 1


def test_splitting_the_neighbours_never_yields_t_shares_of_both_secrets() -> None:
    """The attack: ask half of the target's neighbours for its self-mask share (alive) and the
    other half for its mask-key share (dropped). Every neighbour answers one kind only, and with
    t > k / 2 the aggregator ends with fewer than t of at least one kind."""
    fleet, requests = _at_unmask()
    target = fleet.config.device_ids[0]
    holders = sorted(d for d, r in requests.items() if target in r.alive)
    t = fleet.config.threshold
    self_shares: list[Share] = []
    key_shares: list[Share] = []
    for i, holder in enumerate(holders):
        honest = requests[holder]
        others = tuple(d for d in honest.alive if d != target)
        request = honest if i < len(holders) // 2 else replace(honest, alive=others, dropped=(target,))
        try:
            response = fleet.devices[holder].on_unmask_request(request, T_UNMASK)
        except SecAggError:
            continue
        if target in response.self_mask_shares:
            self_shares.append(Share.from_bytes(response.self_mask_shares[target]))
        if target in response.mask_key_shares:
            key_shares.append(Share.from_bytes(response.mask_key_shares[target]))
        # Then asking each holder for the other kind is refused.
        flipped = replace(honest, alive=others, dropped=(target,)) if request is honest else honest
        _refused(
            lambda h=holder, f=flipped: fleet.devices[h].on_unmask_request(f, T_UNMASK),
            SecAggReason.BOTH_SHARES_REQUESTED,
        )
    assert len(self_shares) + len(key_shares) == len(holders)
    assert min(len(self_shares), len(key_shares)) < t


def test_an_unmask_request_before_masking_or_for_another_round_is_refused() -> None:
    fleet = Fleet(make_config(5))
    device = fleet.devices["dev-000"]
    request = UnmaskRequest("r-1", "dev-000", ("dev-001", "dev-002", "dev-003"), ())
    _refused(lambda: device.on_unmask_request(request, T_UNMASK), SecAggReason.WRONG_PHASE)
    _refused(
        lambda: device.on_unmask_request(replace(request, round_id="r-2"), T_UNMASK), SecAggReason.WRONG_ROUND
    )
    _refused(
        lambda: device.on_unmask_request(replace(request, recipient="dev-001"), T_UNMASK),
        SecAggReason.UNKNOWN_DEVICE,
    )


# --- advertisements ------------------------------------------------------------------------------


def _bundle_for(fleet: Fleet, device_id: str) -> tuple[dict[str, Advertisement], AdvertisementBundle]:
    ads = {d: dev.advertise(T_SHARE - 5) for d, dev in fleet.devices.items()}
    neighbours = sorted(fleet.config.neighbours(device_id))
    return ads, AdvertisementBundle("r-1", device_id, tuple(ads[n] for n in neighbours))


def test_a_forged_advertisement_is_refused_and_that_neighbour_left_out() -> None:
    fleet = Fleet(make_config(10))
    _, bundle = _bundle_for(fleet, "dev-000")
    victim = "dev-001"
    # The aggregator substitutes its own keys, signed with a key of its own.
    own = RoundKeys.generate()
    forged = sign_advertisement("r-1", victim, own.mask_public, own.share_public, SigningKey.generate())
    ads_list = [forged if ad.device_id == victim else ad for ad in bundle.advertisements]
    device = fleet.devices["dev-000"]
    shares = device.on_advertisements(replace(bundle, advertisements=tuple(ads_list)), T_SHARE)
    assert device.refusals[SecAggReason.BAD_SIGNATURE] == 1
    assert victim not in shares.ciphertexts and victim not in device.accepted
    assert len(shares.ciphertexts) == fleet.config.degree - 1


def test_advertisements_for_another_round_or_with_substituted_or_reused_keys_are_refused() -> None:
    fleet = Fleet(make_config(10))
    ads, bundle = _bundle_for(fleet, "dev-000")
    key_1 = identity_key("dev-001")
    replayed = sign_advertisement("r-0", "dev-001", *_keys(), key_1)  # validly signed, other round
    equivocation = sign_advertisement("r-1", "dev-001", *_keys(), key_1)  # dev-001 signs other keys
    copied = sign_advertisement(
        "r-1", "dev-002", ads["dev-003"].mask_public, _keys()[1], identity_key("dev-002")
    )
    rest = tuple(ad for ad in bundle.advertisements if ad.device_id not in {"dev-001", "dev-002", "dev-003"})
    evil = (replayed, ads["dev-001"], ads["dev-001"], equivocation, copied, ads["dev-003"], *rest)
    device = fleet.devices["dev-000"]
    device.on_advertisements(replace(bundle, advertisements=evil), T_SHARE)
    assert device.refusals[SecAggReason.WRONG_ROUND] == 1
    assert device.refusals[SecAggReason.DUPLICATE] == 1
    assert device.refusals[SecAggReason.SUBSTITUTED_KEYS] == 1
    # dev-002 copied dev-003's mask key; whichever comes second is refused, so no key is ever
    # used for two devices.
    assert device.refusals[SecAggReason.KEY_REUSED] == 1
    assert "dev-003" not in device.accepted
    assert device._accepted["dev-001"] == ads["dev-001"]  # the first, properly signed one


def _keys() -> tuple[bytes, bytes]:
    keys = RoundKeys.generate()
    return keys.mask_public, keys.share_public


def test_advertisements_of_strangers_unknown_devices_or_low_order_keys_are_refused() -> None:
    fleet = Fleet(make_config(40, degree=10, threshold=6))
    device_id = "dev-000"
    device = fleet.devices[device_id]
    stranger = next(d for d in fleet.config.device_ids if d not in device.neighbours and d != device_id)
    ads, bundle = _bundle_for(fleet, device_id)
    low_order = bytes(32)
    bad_key = Advertisement("r-1", bundle.advertisements[0].device_id, low_order, _keys()[1], bytes(64))
    outsider = sign_advertisement("r-1", "intruder", *_keys(), SigningKey.generate())
    evil = (ads[stranger], ads[device_id], outsider, bad_key, *bundle.advertisements)
    device.on_advertisements(replace(bundle, advertisements=evil), T_SHARE)
    assert device.refusals[SecAggReason.NOT_NEIGHBOUR] == 3  # a stranger, itself, an outsider
    assert device.refusals[SecAggReason.BAD_SIGNATURE] == 1  # the low-order key's ad is unsigned
    assert device.accepted == device.neighbours


def test_a_low_order_key_is_refused_even_when_signed() -> None:
    key = identity_key("dev-001")
    message = Advertisement("r-1", "dev-001", bytes(32), _keys()[1], bytes(64))
    signature = key.sign(signed_bytes("r-1", "dev-001", bytes(32), message.share_public)).signature
    signed = replace(message, signature=bytes(signature))
    _refused(lambda: verify_advertisement(signed, "r-1", key.verify_key), SecAggReason.BAD_KEY)
    with pytest.raises(SecAggError):
        sign_advertisement("r-1", "dev-001", bytes(32), message.share_public, key)


def test_the_signature_binds_round_device_and_both_keys() -> None:
    key = identity_key("dev-001")
    ad = sign_advertisement("r-1", "dev-001", *_keys(), key)
    assert verify_advertisement(ad, "r-1", key.verify_key) is ad
    mask_2, share_2 = _keys()
    for altered in (
        replace(ad, device_id="dev-002"),
        replace(ad, mask_public=mask_2),
        replace(ad, share_public=share_2),
        replace(ad, signature=bytes(64)),
    ):
        _refused(lambda a=altered: verify_advertisement(a, "r-1", key.verify_key), SecAggReason.BAD_SIGNATURE)
    moved = replace(ad, round_id="r-2")
    _refused(lambda: verify_advertisement(moved, "r-2", key.verify_key), SecAggReason.BAD_SIGNATURE)
    _refused(lambda: verify_advertisement(ad, "r-2", key.verify_key), SecAggReason.WRONG_ROUND)


def test_a_device_with_fewer_than_t_good_neighbours_leaves_the_round() -> None:
    fleet = Fleet(make_config(5))
    _, bundle = _bundle_for(fleet, "dev-000")
    device = fleet.devices["dev-000"]
    error = _refused(
        lambda: device.on_advertisements(replace(bundle, advertisements=bundle.advertisements[:2]), T_SHARE),
        SecAggReason.TOO_FEW_NEIGHBOURS,
    )
    assert "threshold" in str(error)
    assert device.phase == DevicePhase.ABORTED


def test_the_aggregator_refuses_forged_duplicate_and_substituted_advertisements() -> None:
    fleet = Fleet(make_config(5))
    agg = fleet.aggregator
    ad = fleet.devices["dev-000"].advertise(T_SHARE - 5)
    forged = sign_advertisement("r-1", "dev-001", *_keys(), SigningKey.generate())
    _refused(lambda: agg.on_advertisement(forged, T_SHARE - 5), SecAggReason.BAD_SIGNATURE)
    agg.on_advertisement(ad, T_SHARE - 5)
    _refused(lambda: agg.on_advertisement(ad, T_SHARE - 5), SecAggReason.DUPLICATE)
    other = sign_advertisement("r-1", "dev-000", *_keys(), identity_key("dev-000"))
    _refused(lambda: agg.on_advertisement(other, T_SHARE - 5), SecAggReason.SUBSTITUTED_KEYS)
    copy = sign_advertisement("r-1", "dev-002", ad.mask_public, _keys()[1], identity_key("dev-002"))
    _refused(lambda: agg.on_advertisement(copy, T_SHARE - 5), SecAggReason.KEY_REUSED)
    stranger = sign_advertisement("r-1", "dev-999", *_keys(), identity_key("dev-999"))
    _refused(lambda: agg.on_advertisement(stranger, T_SHARE - 5), SecAggReason.UNKNOWN_DEVICE)
    assert sum(agg.refusals.values()) == 5


# --- shares and inputs ---------------------------------------------------------------------------


def test_a_tampered_share_ciphertext_makes_the_device_leave_and_it_is_recovered() -> None:
    fleet = Fleet(make_config(10))
    victim = "dev-004"

    def flip(delivery: ShareDelivery) -> ShareDelivery:
        if delivery.device_id != victim:
            return delivery
        sender, ciphertext = next(iter(delivery.ciphertexts.items()))
        bad = ciphertext[:-1] + bytes([ciphertext[-1] ^ 1])
        return replace(delivery, ciphertexts={**delivery.ciphertexts, sender: bad})

    result = fleet.run(tamper=flip)
    assert fleet.devices[victim].refusals[SecAggReason.DECRYPT_FAILED] == 1
    assert fleet.devices[victim].phase == DevicePhase.ABORTED
    assert result.recovered == (victim,)
    survivors = [d for d in fleet.config.device_ids if d != victim]
    np.testing.assert_array_equal(result.total, fleet.expected_total(survivors))


def test_a_ciphertext_relayed_to_the_wrong_device_does_not_open() -> None:
    fleet = Fleet(make_config(5))
    deliveries = fleet.share(fleet.advertise())
    a, b = "dev-000", "dev-001"
    stolen = next(ct for sender, ct in deliveries[b].ciphertexts.items() if sender != a)
    sender = next(s for s, ct in deliveries[b].ciphertexts.items() if ct == stolen)
    evil = replace(deliveries[a], ciphertexts={**deliveries[a].ciphertexts, sender: stolen})
    _refused(lambda: fleet.devices[a].on_shares(evil, T_INPUT), SecAggReason.DECRYPT_FAILED)


def test_the_aggregator_refuses_bad_shares_inputs_and_responses() -> None:
    fleet = Fleet(make_config(10))
    agg = fleet.aggregator
    bundles = fleet.advertise()
    shares = fleet.devices["dev-000"].on_advertisements(bundles["dev-000"], T_SHARE)
    too_few = replace(shares, ciphertexts=dict(list(shares.ciphertexts.items())[:2]))
    _refused(lambda: agg.on_shares(too_few, T_SHARE), SecAggReason.TOO_FEW_NEIGHBOURS)
    agg.on_shares(shares, T_SHARE)
    _refused(lambda: agg.on_shares(shares, T_SHARE), SecAggReason.DUPLICATE)
    _refused(
        lambda: agg.on_shares(ShareMessage("r-1", "dev-001", {"dev-001": b""}), T_SHARE),
        SecAggReason.NOT_NEIGHBOUR,
    )
    for device_id in fleet.config.device_ids[1:]:
        agg.on_shares(fleet.devices[device_id].on_advertisements(bundles[device_id], T_SHARE), T_SHARE)
    deliveries = agg.close_sharing(T_INPUT)
    device = fleet.devices["dev-000"]
    device.on_shares(deliveries["dev-000"], T_INPUT)
    masked = device.mask(fleet.quantised["dev-000"], T_INPUT)
    wrong_length = replace(masked, vector=masked.vector[:-1])
    _refused(lambda: agg.on_masked_input(wrong_length, T_INPUT), SecAggReason.BAD_VECTOR)
    overflow = replace(masked, vector=masked.vector | np.uint64(1 << 40))
    _refused(lambda: agg.on_masked_input(overflow, T_INPUT), SecAggReason.BAD_VECTOR)
    _refused(
        lambda: agg.on_masked_input(replace(masked, partners=(*masked.partners, "dev-000")), T_INPUT),
        SecAggReason.NOT_NEIGHBOUR,
    )
    agg.on_masked_input(masked, T_INPUT)
    _refused(lambda: agg.on_masked_input(masked, T_INPUT), SecAggReason.DUPLICATE)
    for device_id in fleet.config.device_ids[1:]:
        dev = fleet.devices[device_id]
        dev.on_shares(deliveries[device_id], T_INPUT)
        agg.on_masked_input(dev.mask(fleet.quantised[device_id], T_INPUT), T_INPUT)
    requests = agg.close_masked_input(T_UNMASK)
    response = device.on_unmask_request(requests["dev-000"], T_UNMASK)
    unasked = replace(response, mask_key_shares={"dev-001": next(iter(response.self_mask_shares.values()))})
    _refused(lambda: agg.on_unmask_response(unasked, T_UNMASK), SecAggReason.BAD_SHARE)
    # dev-001's share passed off as dev-000's: the x coordinate gives it away.
    other = fleet.devices["dev-001"].on_unmask_request(requests["dev-001"], T_UNMASK)
    owner = next(o for o in other.self_mask_shares if o in response.self_mask_shares)
    moved = replace(
        response, self_mask_shares={**response.self_mask_shares, owner: other.self_mask_shares[owner]}
    )
    _refused(lambda: agg.on_unmask_response(moved, T_UNMASK), SecAggReason.BAD_SHARE)
    agg.on_unmask_response(response, T_UNMASK)
    _refused(lambda: agg.on_unmask_response(response, T_UNMASK), SecAggReason.DUPLICATE)
    assert isinstance(masked, MaskedInput) and isinstance(response, UnmaskResponse)


def test_a_wrong_share_from_a_device_aborts_instead_of_giving_a_wrong_sum() -> None:
    fleet, requests = _at_unmask()
    agg = fleet.aggregator
    for i, (device_id, request) in enumerate(requests.items()):
        response = fleet.devices[device_id].on_unmask_request(request, T_UNMASK)
        if i == 0:
            owner, raw = next(iter(response.self_mask_shares.items()))
            share = Share.from_bytes(raw)
            lie = Share(share.x, (share.y + 1) % (2**521 - 1)).to_bytes()
            response = replace(response, self_mask_shares={**response.self_mask_shares, owner: lie})
        agg.on_unmask_response(response, T_UNMASK)
    with pytest.raises(SecAggError) as caught:
        agg.finish(T_UNMASK + 1)
    assert caught.value.reason == SecAggReason.INCONSISTENT_SHARES
    assert reconstruct_secret  # the share module is what detected it
