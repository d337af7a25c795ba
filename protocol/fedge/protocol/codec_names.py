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
    #: Sparse: per tensor the ``k`` largest-magnitude values (``k`` from the manifest's
    #: ``topk_fraction``), their indices and the values in float16 or int8.
    TOPK_FP16 = "topk-fp16"
    TOPK_INT8 = "topk-int8"

    @property
    def sparse(self) -> bool:
        """A top-k codec: the round manifest must announce ``topk_fraction``."""
        return self in (Codec.TOPK_FP16, Codec.TOPK_INT8)


#: ``topk_fraction`` (``[rounds] topk_fraction``, the manifest's field): the share of each
#: tensor's values a sparse update carries. The default keeps a har-watch update under a tenth
#: of its fp32 size with int8 values (docs/protocol.md, tensor codecs).
DEFAULT_TOPK_FRACTION = 0.1
MIN_TOPK_FRACTION = 0.001
#: Beyond half, a bitmap and the values cost about as much as the dense int8 codec.
MAX_TOPK_FRACTION = 0.5
