"""``fedge.protocol.sealing.open_into``: the round engine's decryption opens exactly what
``open_sealed`` opens, and refuses (None) exactly what ``Box.decrypt`` refuses."""

from __future__ import annotations

import pytest
from nacl.public import Box, PrivateKey

from fedge.protocol.framing import PREFIX_BYTES, PREFIX_LAYOUT
from fedge.protocol.sealing import (
    SealedHeader,
    box_for,
    open_into,
    open_sealed,
    read_header,
    read_payload,
    seal,
)

DEVICE = PrivateKey.generate()
AGGREGATOR = PrivateKey.generate()
HEADER = SealedHeader("fleet-1", "dev-a", "r0001-v1", 3, "update", 1)


def _sealed(body: bytes = b"\x01\x02\x03" * 1000) -> bytes:
    return seal(HEADER, {"codec": "fp32"}, body, DEVICE, AGGREGATOR.public_key)


def _box_offset(sealed: bytes) -> int:
    return PREFIX_BYTES + PREFIX_LAYOUT.unpack_from(sealed)[4]


def test_it_opens_what_open_sealed_opens() -> None:
    sealed = _sealed()
    header, ciphertext = read_header(sealed)
    box = box_for(AGGREGATOR, DEVICE.public_key)
    inner = open_into(box.shared_key(), sealed, _box_offset(sealed))
    assert inner is not None and bytes(inner) == box.decrypt(ciphertext)
    assert read_payload(header, bytes(inner)) == open_sealed(
        header, ciphertext, AGGREGATOR, DEVICE.public_key
    )


@pytest.mark.parametrize("position", [0, 23, 24, 40, -1])  # nonce, MAC, ciphertext, last byte
def test_an_altered_byte_anywhere_in_the_box_does_not_open(position: int) -> None:
    sealed = bytearray(_sealed())
    offset = _box_offset(bytes(sealed))
    sealed[position if position < 0 else offset + position] ^= 0x80
    assert open_into(box_for(AGGREGATOR, DEVICE.public_key).shared_key(), bytes(sealed), offset) is None


def test_another_device_s_key_does_not_open_it() -> None:
    sealed = _sealed()
    other = Box(AGGREGATOR, PrivateKey.generate().public_key)
    assert open_into(other.shared_key(), sealed, _box_offset(sealed)) is None


def test_a_box_shorter_than_nonce_and_mac_or_a_bad_offset_or_key_is_none() -> None:
    key = box_for(AGGREGATOR, DEVICE.public_key).shared_key()
    sealed = _sealed()
    offset = _box_offset(sealed)
    assert open_into(key, sealed[: offset + 24 + 15], offset) is None
    assert open_into(key, sealed, -1) is None
    assert open_into(key[:31], sealed, offset) is None


def test_an_empty_message_opens_to_nothing() -> None:
    box = Box(DEVICE, AGGREGATOR.public_key)
    nonce = bytes(24)
    sealed = b"prefix" + bytes(box.encrypt(b"", nonce))
    out = open_into(box_for(AGGREGATOR, DEVICE.public_key).shared_key(), sealed, 6)
    assert out is not None and bytes(out) == b""
