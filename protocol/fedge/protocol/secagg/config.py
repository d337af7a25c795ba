"""The public parameters of one secure-aggregation round, which every party must agree on.

The aggregator announces a :class:`RoundConfig` (the later integration puts it in the signed
round manifest, so devices know it comes from the aggregator and is the same for all). From it
each party derives, without further messages: the neighbour graph (:mod:`.graph`, from
``graph_seed``), each holder's share x coordinate (its 1-based index in the sorted device
list), the quantiser (:mod:`.quantise`, from ``clip_norm``, ``bits`` and the number of devices)
and the limits every message is parsed against.

Times are plain numbers (seconds, on whatever clock the caller uses for ``now``): the state
machines never read a clock, they are given the time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from nacl.utils import random as nacl_random

from fedge.protocol.secagg.encoding import (
    ENVELOPE_BYTES,
    ID_OVERHEAD,
    MAX_ID_CHARS,
    b64,
    check_device_id,
    check_object,
    decode_object,
    encode,
    get_bytes,
    get_float,
    get_id,
    get_id_list,
    get_int,
)
from fedge.protocol.secagg.errors import SecAggReason, refusal
from fedge.protocol.secagg.graph import SEED_BYTES, neighbours_at, ring_order
from fedge.protocol.secagg.params import MAX_DEVICES, SecAggParams, check_parameters, choose_parameters
from fedge.protocol.secagg.prg import MAX_VECTOR_LENGTH
from fedge.protocol.secagg.quantise import Quantiser

DEFAULT_BITS = 32
_FIELDS = {
    "round_id",
    "device_ids",
    "graph_seed",
    "degree",
    "threshold",
    "vector_length",
    "bits",
    "clip_norm",
    "deadlines",
}
_MAX_TIME = 2.0**53


@dataclass(frozen=True)
class Deadlines:
    """When each phase closes: advertisements, shares, masked inputs, unmask responses."""

    advertise: float
    share: float
    masked_input: float
    unmask: float

    def __post_init__(self) -> None:
        times = (self.advertise, self.share, self.masked_input, self.unmask)
        if not all(math.isfinite(t) for t in times) or list(times) != sorted(times):
            raise refusal(
                SecAggReason.BAD_PARAMETERS, "deadlines must be finite and in phase order", found=times
            )

    def to_dict(self) -> dict[str, float]:
        return {
            "advertise": self.advertise,
            "share": self.share,
            "masked_input": self.masked_input,
            "unmask": self.unmask,
        }

    @staticmethod
    def from_dict(data: Any) -> Deadlines:
        fields = {"advertise", "share", "masked_input", "unmask"}
        if not isinstance(data, dict) or set(data) != fields:
            raise refusal(
                SecAggReason.BAD_MESSAGE, f"deadlines must have exactly {sorted(fields)}", field="deadlines"
            )
        return Deadlines(
            *(
                get_float(data, key, 0.0, _MAX_TIME)
                for key in ("advertise", "share", "masked_input", "unmask")
            )
        )

    @staticmethod
    def every(start: float, phase_seconds: float) -> Deadlines:
        """Deadlines ``phase_seconds`` apart from ``start``."""
        return Deadlines(*(start + phase_seconds * i for i in range(1, 5)))


@dataclass(frozen=True)
class RoundConfig:
    """Everything public about one round; validated on construction."""

    round_id: str
    device_ids: tuple[str, ...]
    graph_seed: bytes
    degree: int
    threshold: int
    vector_length: int
    bits: int
    clip_norm: float
    deadlines: Deadlines

    TYPE = "secagg-round"

    def __post_init__(self) -> None:
        check_device_id(self.round_id, "round_id", "round id")
        if list(self.device_ids) != sorted(set(self.device_ids)):
            raise refusal(
                SecAggReason.BAD_PARAMETERS, "device_ids must be sorted and distinct", field="device_ids"
            )
        get_id_list({"device_ids": list(self.device_ids)}, "device_ids", MAX_DEVICES)
        if len(self.graph_seed) != SEED_BYTES:
            raise refusal(SecAggReason.BAD_PARAMETERS, "graph_seed must be 32 bytes", field="graph_seed")
        check_parameters(len(self.device_ids), self.degree, self.threshold)
        if not 1 <= self.vector_length <= MAX_VECTOR_LENGTH:
            raise refusal(
                SecAggReason.BAD_PARAMETERS,
                f"vector_length must be in 1..{MAX_VECTOR_LENGTH}",
                field="vector_length",
                found=self.vector_length,
            )
        _ = self.quantiser  # validates bits and clip_norm against the number of devices

    # --- derived facts ------------------------------------------------------------------------

    @cached_property
    def quantiser(self) -> Quantiser:
        return Quantiser(self.clip_norm, self.bits, len(self.device_ids))

    @cached_property
    def _order(self) -> list[str]:
        return ring_order(self.device_ids, self.graph_seed)

    @cached_property
    def _positions(self) -> dict[str, int]:
        return {device: i for i, device in enumerate(self._order)}

    @cached_property
    def _x(self) -> dict[str, int]:
        return {device: i + 1 for i, device in enumerate(self.device_ids)}

    def is_selected(self, device_id: str) -> bool:
        return device_id in self._x

    def neighbours(self, device_id: str) -> frozenset[str]:
        """The device's neighbours in the round's graph (``unknown_device`` if not selected)."""
        if device_id not in self._positions:
            raise refusal(SecAggReason.UNKNOWN_DEVICE, f"{device_id!r} is not selected for the round")
        return neighbours_at(self._order, self._positions[device_id], self.degree)

    def share_x(self, device_id: str) -> int:
        """The x coordinate of the shares ``device_id`` holds (its 1-based index)."""
        if device_id not in self._x:
            raise refusal(SecAggReason.UNKNOWN_DEVICE, f"{device_id!r} is not selected for the round")
        return self._x[device_id]

    def max_id_list_bytes(self, count: int) -> int:
        """JSON bytes a list (or map keys) of ``count`` ids can take."""
        return count * (MAX_ID_CHARS + ID_OVERHEAD)

    # --- encoding -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "round_id": self.round_id,
            "device_ids": list(self.device_ids),
            "graph_seed": b64(self.graph_seed),
            "degree": self.degree,
            "threshold": self.threshold,
            "vector_length": self.vector_length,
            "bits": self.bits,
            "clip_norm": self.clip_norm,
            "deadlines": self.deadlines.to_dict(),
        }

    def encode(self) -> bytes:
        return encode(self.to_dict())

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> RoundConfig:
        document = check_object(data, RoundConfig.TYPE, _FIELDS)
        return RoundConfig(
            round_id=get_id(document, "round_id", "round id"),
            device_ids=get_id_list(document, "device_ids", MAX_DEVICES),
            graph_seed=get_bytes(document, "graph_seed", SEED_BYTES),
            degree=get_int(document, "degree", 0, MAX_DEVICES),
            threshold=get_int(document, "threshold", 0, MAX_DEVICES),
            vector_length=get_int(document, "vector_length", 1, MAX_VECTOR_LENGTH),
            bits=get_int(document, "bits", 8, 62),
            clip_norm=get_float(document, "clip_norm", 0.0, 1e300),
            deadlines=Deadlines.from_dict(document["deadlines"]),
        )

    @staticmethod
    def decode(data: bytes) -> RoundConfig:
        """Parses an announced config, bounded by the largest device list allowed."""
        max_bytes = ENVELOPE_BYTES * 2 + MAX_DEVICES * (MAX_ID_CHARS + ID_OVERHEAD)
        return RoundConfig.from_dict(decode_object(data, max_bytes, RoundConfig.TYPE, _FIELDS))


def new_round_config(
    round_id: str,
    device_ids: Sequence[str],
    *,
    vector_length: int,
    clip_norm: float,
    deadlines: Deadlines,
    bits: int = DEFAULT_BITS,
    params: SecAggParams | None = None,
    graph_seed: bytes | None = None,
) -> RoundConfig:
    """A config for a new round: parameters from :func:`~.params.choose_parameters` unless
    given, and a fresh random public graph seed unless given (tests pass one)."""
    ids = tuple(sorted(set(device_ids)))
    chosen = params if params is not None else choose_parameters(len(ids))
    return RoundConfig(
        round_id=round_id,
        device_ids=ids,
        graph_seed=graph_seed if graph_seed is not None else nacl_random(SEED_BYTES),
        degree=chosen.degree,
        threshold=chosen.threshold,
        vector_length=vector_length,
        bits=bits,
        clip_norm=clip_norm,
        deadlines=deadlines,
    )
