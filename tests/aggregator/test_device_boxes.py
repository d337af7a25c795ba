"""The round engine's cached Boxes (one X25519 shared key per enrolled device key, made once):
a cache must never let a key that is no longer enrolled open a message."""

from __future__ import annotations

import pytest
from nacl.public import PrivateKey, PublicKey

from fedge.aggregator.device_boxes import DeviceBoxes
from fedge.protocol.reasons import RejectReason
from fedge.protocol.sealing import SealError
from support.engine_helpers import AGGREGATOR_KEY, T0, TOPICS, Device, make_engine, settings


def test_a_device_whose_key_is_replaced_is_refused_with_the_old_key_and_accepted_with_the_new() -> None:
    engine = make_engine(settings(min_devices=1), devices=("dev-a",))
    old = Device("dev-a")
    m1 = engine.open_round(T0).manifest
    assert engine.handle(TOPICS.update("dev-a"), old.update(m1), T0).accepted
    assert old.key.public_key in engine.boxes  # the old key's Box was made and kept
    engine.close_round()

    # Enrolled again under a new key (a replaced device, a rotated key), no revocation between.
    new_key = PrivateKey.generate()
    engine.set_registry({"dev-a": new_key.public_key})
    assert old.key.public_key not in engine.boxes and len(engine.boxes) == 0
    fresh = Device("dev-a")
    fresh.key = new_key
    m2 = engine.open_round(T0 + 100).manifest
    old.counter = 1_000  # a counter the aggregator would take: only the key is wrong
    refused = engine.handle(TOPICS.update("dev-a"), old.update(m2), T0 + 101)
    assert (refused.accepted, refused.reason) == (False, RejectReason.DECRYPT_FAILED)
    assert engine.handle(TOPICS.update("dev-a"), fresh.update(m2), T0 + 101).accepted
    assert new_key.public_key in engine.boxes and len(engine.boxes) == 1
    record = engine.close_round()
    assert (record.outcome, record.reported) == ("aggregated", 1)
    assert record.rejected == {RejectReason.DECRYPT_FAILED: 1}


def test_a_revoked_device_loses_its_box_and_is_refused_before_any_decryption() -> None:
    engine = make_engine(settings(min_devices=1), devices=("dev-a", "dev-b"))
    a, b = Device("dev-a"), Device("dev-b")
    m1 = engine.open_round(T0).manifest
    assert engine.handle(TOPICS.update("dev-a"), a.update(m1), T0).accepted
    assert engine.handle(TOPICS.update("dev-b"), b.update(m1), T0).accepted
    engine.close_round()
    engine.set_registry({"dev-b": b.key.public_key}, {"dev-a"})
    assert a.key.public_key not in engine.boxes and b.key.public_key in engine.boxes
    m2 = engine.open_round(T0 + 100).manifest
    assert engine.handle(TOPICS.update("dev-a"), a.update(m2), T0 + 101).reason == RejectReason.REVOKED_DEVICE
    assert engine.handle(TOPICS.update("dev-b"), b.update(m2), T0 + 101).accepted


def test_the_box_is_made_once_per_key_and_opens_what_that_device_sealed() -> None:
    boxes = DeviceBoxes(AGGREGATOR_KEY)
    device = PrivateKey.generate()
    first = boxes.get(device.public_key)
    assert boxes.get(PublicKey(bytes(device.public_key))) is first  # the key's bytes, not the object
    sealed = first.encrypt(b"hello")  # a Box is symmetric: what the device would seal
    assert boxes.get(device.public_key).decrypt(sealed) == b"hello"
    boxes.retain([])
    assert len(boxes) == 0 and boxes.get(device.public_key) is not first


def test_a_low_order_key_is_bad_key_and_nothing_is_cached() -> None:
    boxes = DeviceBoxes(AGGREGATOR_KEY)
    with pytest.raises(SealError) as err:
        boxes.get(PublicKey(bytes(32)))  # the all-zero point: no shared secret
    assert (err.value.reason, str(err.value)) == (
        RejectReason.BAD_KEY,
        "bad_key: public key is a low-order point",
    )
    assert len(boxes) == 0


def test_a_new_aggregator_key_drops_every_box_of_the_old_one() -> None:
    engine = make_engine(settings(min_devices=1), devices=("dev-a",))
    dev = Device("dev-a")
    m1 = engine.open_round(T0).manifest
    assert engine.handle(TOPICS.update("dev-a"), dev.update(m1), T0).accepted
    engine.close_round()
    new_aggregator_key = PrivateKey.generate()
    engine.box_key = new_aggregator_key
    assert len(engine.boxes) == 0
    m2 = engine.open_round(T0 + 100).manifest
    # Sealed to the old aggregator key: no Box of the old key is left to open it.
    refused = engine.handle(TOPICS.update("dev-a"), dev.update(m2), T0 + 101)
    assert (refused.accepted, refused.reason) == (False, RejectReason.DECRYPT_FAILED)
    sealed_to_new = dev.seal_payload(
        dev.header(m2, "update"), *dev.update_parts(m2), aggregator=new_aggregator_key.public_key
    )
    assert engine.handle(TOPICS.update("dev-a"), sealed_to_new, T0 + 102).accepted
