"""Each enrolled device's NaCl ``Box`` with the aggregator, made once and kept.

Why: a ``Box`` is an X25519 scalar multiplication (the shared key) plus its precomputation for
XSalsa20-Poly1305. Making one per message cost more than decrypting a 22 kB update with it
(docs/benchmarks.md: ~50 us against ~17 us), so the round engine keeps one per device key.

The cache is keyed by the device's *public key*, not its id: a device enrolled again under a new
key (after a revocation, a lost device replaced, a key rotated) finds no Box for the new key and
gets a fresh one, and nothing sealed with the old key can open with it. The engine drops the
Boxes of keys no longer enrolled whenever it loads the registry (:meth:`DeviceBoxes.retain`), so
the cache holds at most one Box per enrolled device and a retired key's shared secret does not
outlive its enrollment in memory.
"""

from __future__ import annotations

from collections.abc import Iterable

from nacl.public import Box, PrivateKey, PublicKey

from fedge.protocol.sealing import box_for

__all__ = ["DeviceBoxes"]


class DeviceBoxes:
    """``Box(aggregator_key, device_key)`` per device public key, computed on first use."""

    def __init__(self, aggregator_key: PrivateKey) -> None:
        self._aggregator_key = aggregator_key
        self._boxes: dict[bytes, Box] = {}

    def get(self, device_key: PublicKey) -> Box:
        """The Box for ``device_key``; a low-order key is a ``SealError`` (``bad_key``) and is
        not cached."""
        raw = bytes(device_key)
        box = self._boxes.get(raw)
        if box is None:
            box = self._boxes[raw] = box_for(self._aggregator_key, device_key)
        return box

    def retain(self, device_keys: Iterable[PublicKey]) -> None:
        """Forgets the Box of every key not in ``device_keys`` (the enrolled devices' keys)."""
        keep = {bytes(key) for key in device_keys}
        for raw in [raw for raw in self._boxes if raw not in keep]:
            del self._boxes[raw]

    def __len__(self) -> int:
        return len(self._boxes)

    def __contains__(self, device_key: object) -> bool:
        return isinstance(device_key, PublicKey) and bytes(device_key) in self._boxes
