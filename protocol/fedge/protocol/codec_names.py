"""The codec names alone, without numpy: what the CLI's ``--codec`` choices and config parsing
need, so that ``fedge --help`` does not load numpy. The codecs themselves are in
:mod:`fedge.protocol.codec`, which re-exports :class:`Codec`."""

from __future__ import annotations

from enum import StrEnum


class Codec(StrEnum):
    """How an update's delta is encoded; the round manifest names one per round."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
