"""Payloads inside sealed messages, and the JSON statuses devices and the aggregator retain.

``update`` payload: header ``{"codec", "examples", "train_loss", "evaluation"}`` and the
encoded delta (``local - global`` weights, see :mod:`fedge.protocol.codec`) as the body.
``evaluation`` is the device's federated evaluation of the *received* global model on its
local held-out data: ``{"examples", "loss", "accuracy", "mse"}`` or ``null``.

``moments`` payload: header ``{"count", "features"}``, body = per-feature sums then sums of
squares, float64 little-endian (for the federated feature normalisation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedge.protocol.codec import Codec, CodecError, decode_tensors, encode_tensors, encoded_size
from fedge.protocol.errors import ReasonFieldError
from fedge.protocol.model_manifest import TensorLayout
from fedge.protocol.reasons import RejectReason


class MessageError(ReasonFieldError[RejectReason]):
    """A decrypted payload does not follow its schema; ``reason`` is a short stable code."""


#: Room around a payload body in a sealed message: two frame prefixes, the cleartext header and
#: the sealed JSON headers (about 470 bytes as fedge writes them, ~900 with 64-character ids),
#: the nonce and the MAC. Generous, so no honest message comes near it.
SEALED_HEADROOM_BYTES = 4096


def max_sealed_bytes(
    layout: Sequence[TensorLayout], codec: Codec, features: int, topk_fraction: float | None = None
) -> int:
    """The largest sealed message an honest device sends for this model and codec: an update
    (the delta encoded with ``codec``; a sparse codec's largest body for the round's
    ``topk_fraction``) or feature moments, plus :data:`SEALED_HEADROOM_BYTES`.

    Why it exists: a receiver that accepts 16 MiB for a 22 KB update lets one device make it
    read, decrypt and hold 700 times more than any honest message needs. har-watch: 25,884
    bytes for fp32, 14,990 for fp16, 9,591 for int8, 5,375 for topk-int8 at 0.1 (moments:
    768 bytes of body).
    """
    if isinstance(features, bool) or not isinstance(features, int) or features < 1:
        raise ValueError(f"features must be an integer >= 1, got {features!r}")
    return max(encoded_size(layout, codec, topk_fraction), 16 * features) + SEALED_HEADROOM_BYTES


@dataclass(frozen=True)
class Evaluation:
    """Loss and accuracy (classification) or mean squared error (regression) over a data set.

    One type for what the device's trainer measures and what its update reports, so the
    agent hands the one to the other as it is.
    """

    examples: int
    loss: float
    accuracy: float | None
    mse: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"examples": self.examples, "loss": self.loss, "accuracy": self.accuracy, "mse": self.mse}


@dataclass(frozen=True)
class UpdatePayload:
    delta: np.ndarray
    examples: int
    train_loss: float
    evaluation: Evaluation | None
    #: With adaptive DP clipping (``privacy.adaptive_clipping`` in the manifest): ``+1`` if the
    #: device's update was within the clip bound, ``-1`` if it had to be clipped; else None.
    clip_indicator: int | None = None


@dataclass(frozen=True)
class MomentsPayload:
    count: int
    sums: np.ndarray
    sums_sq: np.ndarray


def encode_update(
    delta: np.ndarray,
    layout: Sequence[TensorLayout],
    codec: Codec,
    examples: int,
    train_loss: float,
    evaluation: Evaluation | None,
    clip_indicator: int | None = None,
    *,
    topk_fraction: float | None = None,
) -> tuple[dict[str, Any], bytes]:
    """``clip_indicator`` (``+1``/``-1``) only in rounds with adaptive DP clipping; the header
    has the key only then, so updates of other rounds are what they always were.
    ``topk_fraction``: the round's, for a sparse codec (None for a dense one)."""
    header: dict[str, Any] = {
        "codec": codec.value,
        "examples": int(examples),
        "train_loss": float(train_loss),
        "evaluation": evaluation.to_dict() if evaluation else None,
    }
    if clip_indicator is not None:
        header["clip_indicator"] = int(clip_indicator)
    return header, encode_tensors(delta, layout, codec, topk_fraction)


def decode_update(
    header: dict[str, Any],
    body: bytes,
    layout: Sequence[TensorLayout],
    codec: Codec,
    topk_fraction: float | None = None,
) -> UpdatePayload:
    """Checks the schema, the codec the round asked for, and every value's finiteness. A sparse
    codec's update (the round's ``topk_fraction``) comes back dense: 0 where nothing was sent."""
    fields = {"codec", "examples", "train_loss", "evaluation"}
    if set(header) - {"clip_indicator"} != fields:
        raise MessageError(
            RejectReason.BAD_SCHEMA,
            "update header must have codec, examples, train_loss, evaluation",
            field="update header",
            expected=sorted(fields),
            found=sorted(map(str, header)),
        )
    if header["codec"] != codec.value:
        raise MessageError(
            RejectReason.WRONG_CODEC,
            f"update uses {header['codec']!r}, the round asked for {codec.value!r}",
            field="codec",
            expected=codec.value,
            found=header["codec"],
        )
    examples = _count(header["examples"], "examples")
    train_loss = _finite(header["train_loss"], "train_loss")
    evaluation = None if header["evaluation"] is None else _evaluation(header["evaluation"])
    indicator = header.get("clip_indicator")
    if "clip_indicator" in header and (isinstance(indicator, bool) or indicator not in (1, -1)):
        raise MessageError(
            RejectReason.BAD_SCHEMA,
            "clip_indicator must be 1 or -1",
            field="clip_indicator",
            expected=[1, -1],
            found=indicator,
        )
    try:
        delta = decode_tensors(body, layout, codec, topk_fraction)
    except CodecError as exc:
        raise MessageError(
            RejectReason.BAD_TENSOR, str(exc), field=exc.field, expected=exc.expected, found=exc.found
        ) from None
    return UpdatePayload(delta, examples, train_loss, evaluation, indicator)


def encode_moments(count: int, sums: np.ndarray, sums_sq: np.ndarray) -> tuple[dict[str, Any], bytes]:
    return (
        {"count": int(count), "features": int(sums.shape[0])},
        sums.astype("<f8").tobytes() + sums_sq.astype("<f8").tobytes(),
    )


def decode_moments(header: dict[str, Any], body: bytes, features: int) -> MomentsPayload:
    if set(header) != {"count", "features"}:
        raise MessageError(
            RejectReason.BAD_SCHEMA,
            "moments header must have count and features",
            field="moments header",
            expected=["count", "features"],
            found=sorted(map(str, header)),
        )
    count = _count(header["count"], "count")
    if isinstance(header["features"], bool) or header["features"] != features:
        raise MessageError(
            RejectReason.BAD_SHAPE,
            f"moments for {header['features']} features, the task has {features}",
            field="features",
            expected=features,
            found=header["features"],
        )
    if len(body) != 16 * features:
        raise MessageError(
            RejectReason.BAD_SHAPE,
            f"moments body is {len(body)} bytes, expected {16 * features}",
            field="moments body",
            expected=16 * features,
            found=len(body),
        )
    values = np.frombuffer(body, "<f8").astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise MessageError(
            RejectReason.NOT_FINITE, "moments must be finite", field="moments body", expected="finite values"
        )
    if np.any(values[features:] < 0):
        raise MessageError(
            RejectReason.BAD_MOMENTS, "sums of squares must be >= 0", field="sums_sq", expected=">= 0"
        )
    return MomentsPayload(count, values[:features].copy(), values[features:].copy())


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value >= 2**31:
        raise MessageError(
            RejectReason.BAD_COUNT,
            f"{name} must be a positive integer",
            field=name,
            expected="an integer in 1..2^31-1",
            found=value,
        )
    return value


def _finite(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MessageError(
            RejectReason.BAD_SCHEMA, f"{name} must be a number", field=name, expected="a number", found=value
        )
    try:
        result = float(value)
    except OverflowError:
        result = math.inf
    if not math.isfinite(result):
        raise MessageError(
            RejectReason.NOT_FINITE,
            f"{name} must be finite",
            field=name,
            expected="a finite number",
            found=value,
        )
    return result


def _evaluation(data: Any) -> Evaluation:
    if not isinstance(data, dict) or set(data) != {"examples", "loss", "accuracy", "mse"}:
        raise MessageError(
            RejectReason.BAD_SCHEMA,
            "evaluation must have examples, loss, accuracy, mse",
            field="evaluation",
            expected=["accuracy", "examples", "loss", "mse"],
        )
    accuracy = None if data["accuracy"] is None else _finite(data["accuracy"], "evaluation.accuracy")
    if accuracy is not None and not 0.0 <= accuracy <= 1.0:
        raise MessageError(
            RejectReason.BAD_SCHEMA,
            "evaluation.accuracy must be in [0, 1]",
            field="evaluation.accuracy",
            expected="a number in [0, 1]",
            found=accuracy,
        )
    mse = None if data["mse"] is None else _finite(data["mse"], "evaluation.mse")
    if mse is not None and mse < 0.0:  # a negative error would pull the fleet's figure down
        raise MessageError(
            RejectReason.BAD_SCHEMA,
            "evaluation.mse must be >= 0",
            field="evaluation.mse",
            expected="a number >= 0",
            found=mse,
        )
    return Evaluation(
        _count(data["examples"], "evaluation.examples"),
        _finite(data["loss"], "evaluation.loss"),
        accuracy,
        mse,
    )
