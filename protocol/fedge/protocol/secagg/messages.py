"""The messages of one secure-aggregation round, in the order they flow.

=====================  ===================  ================================================
message                direction            what it carries
=====================  ===================  ================================================
:class:`Advertisement` device -> aggregator  the device's signed public round keys
:class:`AdvertisementBundle` aggregator -> device  its neighbours' advertisements, relayed
:class:`ShareMessage`  device -> aggregator  a share ciphertext for each neighbour
:class:`ShareDelivery` aggregator -> device  the ciphertexts neighbours sent it, relayed
:class:`MaskedInput`   device -> aggregator  its masked, quantised update, and whom it masked with
:class:`UnmaskRequest` aggregator -> device  which neighbours survived and which dropped
:class:`UnmaskResponse` device -> aggregator self-mask shares of survivors, mask-key shares of
                                             dropped devices
=====================  ===================  ================================================

Each is a canonical JSON object (``encode``) with a ``"type"``; ``decode(data, config)`` parses
one with every size bounded by the round's :class:`~.config.RoundConfig` *before* allocating:
the byte length before ``json.loads``, list and map sizes before walking them (at most the
graph degree), base64 lengths before decoding (keys, ciphertexts and shares have fixed sizes,
the vector ``vector_length`` coordinates of ``ceil(bits / 8)`` bytes). None is pickled. The
later MQTT integration seals the device-to-aggregator ones (:mod:`fedge.protocol.sealing`) and
signs or seals the aggregator-to-device ones; the protocol's security does not rest on that
(advertisements are signed by devices, shares are boxed between devices, and a device checks
every unmask request itself), but it keeps outsiders from injecting noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedge.protocol.secagg.advertisement import Advertisement
from fedge.protocol.secagg.config import RoundConfig
from fedge.protocol.secagg.encoding import (
    ENVELOPE_BYTES,
    ID_OVERHEAD,
    MAX_ID_CHARS,
    b64,
    b64_len,
    decode_b64,
    decode_object,
    encode,
    get_bytes_map,
    get_id,
    get_id_list,
    pack_vector,
    unpack_vector,
    vector_width,
)
from fedge.protocol.secagg.errors import SecAggReason, refusal
from fedge.protocol.secagg.shamir import SHARE_BYTES
from fedge.protocol.secagg.share_box import CIPHERTEXT_BYTES

_ID_BYTES = MAX_ID_CHARS + ID_OVERHEAD


def _map_bytes(count: int, value_bytes: int) -> int:
    return count * (_ID_BYTES + b64_len(value_bytes))


@dataclass(frozen=True)
class AdvertisementBundle:
    """The advertisements of ``recipient``'s neighbours (those that advertised)."""

    round_id: str
    recipient: str
    advertisements: tuple[Advertisement, ...]

    TYPE = "secagg-advertisements"
    FIELDS = frozenset({"round_id", "recipient", "advertisements"})

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "round_id": self.round_id,
            "recipient": self.recipient,
            "advertisements": [ad.to_dict() for ad in self.advertisements],
        }

    def encode(self) -> bytes:
        return encode(self.to_dict())

    @staticmethod
    def decode(data: bytes, config: RoundConfig) -> AdvertisementBundle:
        max_bytes = ENVELOPE_BYTES + config.degree * (Advertisement.MAX_BYTES + ID_OVERHEAD)
        document = decode_object(data, max_bytes, AdvertisementBundle.TYPE, set(AdvertisementBundle.FIELDS))
        items = document["advertisements"]
        if not isinstance(items, list):
            raise refusal(SecAggReason.BAD_MESSAGE, "advertisements must be a list", field="advertisements")
        if len(items) > config.degree:
            raise refusal(
                SecAggReason.TOO_LARGE,
                "more advertisements than neighbours",
                field="advertisements",
                expected=config.degree,
                found=len(items),
            )
        return AdvertisementBundle(
            round_id=get_id(document, "round_id", "round id"),
            recipient=get_id(document, "recipient"),
            advertisements=tuple(Advertisement.from_dict(item) for item in items),
        )


@dataclass(frozen=True)
class _CiphertextMap:
    """Shared shape of :class:`ShareMessage` and :class:`ShareDelivery`: ids to ciphertexts."""

    round_id: str
    device_id: str
    ciphertexts: dict[str, bytes]

    TYPE = ""
    ID_FIELD = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "round_id": self.round_id,
            self.ID_FIELD: self.device_id,
            "ciphertexts": {device: b64(ct) for device, ct in sorted(self.ciphertexts.items())},
        }

    def encode(self) -> bytes:
        return encode(self.to_dict())

    @classmethod
    def _decode(cls, data: bytes, config: RoundConfig) -> tuple[str, str, dict[str, bytes]]:
        max_bytes = ENVELOPE_BYTES + _map_bytes(config.degree, CIPHERTEXT_BYTES)
        document = decode_object(data, max_bytes, cls.TYPE, {"round_id", cls.ID_FIELD, "ciphertexts"})
        return (
            get_id(document, "round_id", "round id"),
            get_id(document, cls.ID_FIELD),
            get_bytes_map(document, "ciphertexts", CIPHERTEXT_BYTES, config.degree),
        )


@dataclass(frozen=True)
class ShareMessage(_CiphertextMap):
    """From ``device_id`` (the sender): ``{recipient: ciphertext}`` for its neighbours."""

    TYPE = "secagg-shares"
    ID_FIELD = "sender"

    @staticmethod
    def decode(data: bytes, config: RoundConfig) -> ShareMessage:
        return ShareMessage(*ShareMessage._decode(data, config))


@dataclass(frozen=True)
class ShareDelivery(_CiphertextMap):
    """To ``device_id`` (the recipient): ``{sender: ciphertext}`` from its neighbours."""

    TYPE = "secagg-share-delivery"
    ID_FIELD = "recipient"

    @staticmethod
    def decode(data: bytes, config: RoundConfig) -> ShareDelivery:
        return ShareDelivery(*ShareDelivery._decode(data, config))


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """A device's masked update (``vector_length`` integers modulo ``2**bits``) and the
    neighbours it added pairwise masks with (public: the aggregator relayed their shares)."""

    round_id: str
    device_id: str
    partners: tuple[str, ...]
    vector: npt.NDArray[np.uint64]

    TYPE = "secagg-masked-input"
    FIELDS = frozenset({"round_id", "device_id", "partners", "vector"})

    def to_dict(self, bits: int) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "round_id": self.round_id,
            "device_id": self.device_id,
            "partners": sorted(self.partners),
            "vector": b64(pack_vector(self.vector, bits)),
        }

    def encode(self, bits: int) -> bytes:
        return encode(self.to_dict(bits))

    @staticmethod
    def decode(data: bytes, config: RoundConfig) -> MaskedInput:
        vector_bytes = config.vector_length * vector_width(config.bits)
        max_bytes = ENVELOPE_BYTES + config.degree * _ID_BYTES + b64_len(vector_bytes)
        document = decode_object(data, max_bytes, MaskedInput.TYPE, set(MaskedInput.FIELDS))
        raw = decode_b64(document["vector"], "vector", vector_bytes)
        return MaskedInput(
            round_id=get_id(document, "round_id", "round id"),
            device_id=get_id(document, "device_id"),
            partners=get_id_list(document, "partners", config.degree),
            vector=unpack_vector(raw, config.vector_length, config.bits),
        )


@dataclass(frozen=True)
class UnmaskRequest:
    """To ``recipient``: of its neighbours, which survived (send their self-mask shares) and
    which dropped after sharing (send their mask-key shares)."""

    round_id: str
    recipient: str
    alive: tuple[str, ...]
    dropped: tuple[str, ...]

    TYPE = "secagg-unmask-request"
    FIELDS = frozenset({"round_id", "recipient", "alive", "dropped"})

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "round_id": self.round_id,
            "recipient": self.recipient,
            "alive": sorted(self.alive),
            "dropped": sorted(self.dropped),
        }

    def encode(self) -> bytes:
        return encode(self.to_dict())

    @staticmethod
    def decode(data: bytes, config: RoundConfig) -> UnmaskRequest:
        max_bytes = ENVELOPE_BYTES + 2 * config.degree * _ID_BYTES
        document = decode_object(data, max_bytes, UnmaskRequest.TYPE, set(UnmaskRequest.FIELDS))
        return UnmaskRequest(
            round_id=get_id(document, "round_id", "round id"),
            recipient=get_id(document, "recipient"),
            alive=get_id_list(document, "alive", config.degree),
            dropped=get_id_list(document, "dropped", config.degree),
        )


@dataclass(frozen=True)
class UnmaskResponse:
    """From ``device_id``: encoded Shamir shares (:data:`~.shamir.SHARE_BYTES` each) by owner."""

    round_id: str
    device_id: str
    self_mask_shares: dict[str, bytes]
    mask_key_shares: dict[str, bytes]

    TYPE = "secagg-unmask-response"
    FIELDS = frozenset({"round_id", "device_id", "self_mask_shares", "mask_key_shares"})

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "round_id": self.round_id,
            "device_id": self.device_id,
            "self_mask_shares": {k: b64(v) for k, v in sorted(self.self_mask_shares.items())},
            "mask_key_shares": {k: b64(v) for k, v in sorted(self.mask_key_shares.items())},
        }

    def encode(self) -> bytes:
        return encode(self.to_dict())

    @staticmethod
    def decode(data: bytes, config: RoundConfig) -> UnmaskResponse:
        max_bytes = ENVELOPE_BYTES + 2 * _map_bytes(config.degree, SHARE_BYTES)
        document = decode_object(data, max_bytes, UnmaskResponse.TYPE, set(UnmaskResponse.FIELDS))
        return UnmaskResponse(
            round_id=get_id(document, "round_id", "round id"),
            device_id=get_id(document, "device_id"),
            self_mask_shares=get_bytes_map(document, "self_mask_shares", SHARE_BYTES, config.degree),
            mask_key_shares=get_bytes_map(document, "mask_key_shares", SHARE_BYTES, config.degree),
        )
