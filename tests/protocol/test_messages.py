"""Payloads inside sealed messages: model updates and feature moments.

A payload was decrypted from a device, so its schema, counts, finiteness and tensor bytes are all
checked; every refusal is a :class:`MessageError` with a stable ``reason``.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np
import pytest

from fedge.protocol.codec import Codec, encode_tensors, encoded_size
from fedge.protocol.errors import FedgeError
from fedge.protocol.messages import (
    SEALED_HEADROOM_BYTES,
    Evaluation,
    MessageError,
    MomentsPayload,
    decode_moments,
    decode_update,
    encode_moments,
    encode_update,
    max_sealed_bytes,
)
from fedge.protocol.model_manifest import mlp_tensor_layout

LAYOUT = mlp_tensor_layout((4, 3, 2))  # 12 + 3 + 6 + 2 = 23 parameters
P = 23
DELTA = np.linspace(-0.5, 0.75, P, dtype=np.float32)
EVALUATION = Evaluation(examples=40, loss=0.6931, accuracy=0.625, mse=None)


def _wire(header: dict[str, Any]) -> dict[str, Any]:
    """The header as the aggregator sees it: JSON on the wire (inside a sealed frame)."""
    return json.loads(json.dumps(header, allow_nan=False))


def _update(codec: Codec = Codec.FP32, /, **changes: Any) -> tuple[dict[str, Any], bytes]:
    header, body = encode_update(DELTA, LAYOUT, codec, 120, 0.25, EVALUATION)
    return {**_wire(header), **changes}, body


def _update_error(header: dict[str, Any], body: bytes, codec: Codec = Codec.FP32) -> MessageError:
    with pytest.raises(MessageError) as exc:
        decode_update(header, body, LAYOUT, codec)
    assert str(exc.value).startswith(exc.value.reason + ": ")
    return exc.value


def _evaluation(**changes: Any) -> dict[str, Any]:
    return {**EVALUATION.to_dict(), **changes}


# --- update round trips ---------------------------------------------------------------------

DENSE = [Codec.FP32, Codec.FP16, Codec.INT8]
_TOLERANCE = {
    Codec.FP32: 0.0,
    Codec.FP16: 0.75 * 2.0**-11,  # half a float16 step at |x| <= 0.75
    Codec.INT8: (1.25 / 255) / 2 + 1e-7,  # half an int8 step of the widest tensor (range <= 1.25)
}


@pytest.mark.parametrize("codec", DENSE)
@pytest.mark.parametrize(
    "evaluation",
    [EVALUATION, Evaluation(3, 0.1, None, 0.02), Evaluation(1, 0.0, 1.0, 0.0), None],
    ids=["classification", "regression", "perfect", "none"],
)
def test_update_round_trip(codec: Codec, evaluation: Evaluation | None) -> None:
    header, body = encode_update(DELTA, LAYOUT, codec, 120, 0.25, evaluation)
    assert header == {
        "codec": codec.value,
        "examples": 120,
        "train_loss": 0.25,
        "evaluation": None if evaluation is None else evaluation.to_dict(),
    }
    assert body == encode_tensors(DELTA, LAYOUT, codec)
    update = decode_update(_wire(header), body, LAYOUT, codec)
    assert (update.examples, update.train_loss, update.evaluation) == (120, 0.25, evaluation)
    assert update.delta.dtype == np.float32
    assert update.delta.shape == (P,)
    assert np.max(np.abs(update.delta.astype(np.float64) - DELTA)) <= _TOLERANCE[codec]


def test_encode_update_normalises_numpy_scalars_to_json_types() -> None:
    header, _ = encode_update(DELTA, LAYOUT, Codec.FP32, np.int64(7), np.float32(0.5), None)
    assert type(header["examples"]) is int and type(header["train_loss"]) is float
    assert json.dumps(header, sort_keys=True) == (
        '{"codec": "fp32", "evaluation": null, "examples": 7, "train_loss": 0.5}'
    )


def test_integer_losses_are_accepted_as_floats() -> None:
    header, body = _update(train_loss=2, evaluation=_evaluation(loss=0, accuracy=1, mse=3))
    update = decode_update(header, body, LAYOUT, Codec.FP32)
    assert update.train_loss == 2.0 and type(update.train_loss) is float
    assert update.evaluation == Evaluation(40, 0.0, 1.0, 3.0)


def test_largest_count_is_accepted() -> None:
    header, body = _update(examples=2**31 - 1)
    assert decode_update(header, body, LAYOUT, Codec.FP32).examples == 2**31 - 1


# --- update refusals --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "round_codec"),
    [(Codec.FP16, Codec.FP32), (Codec.FP32, Codec.INT8), (Codec.INT8, Codec.FP16)],
)
def test_an_update_in_another_codec_is_refused(sent: Codec, round_codec: Codec) -> None:
    header, body = _update(sent)
    err = _update_error(header, body, round_codec)
    assert err.reason == "wrong_codec"
    assert str(err) == f"wrong_codec: update uses {sent.value!r}, the round asked for {round_codec.value!r}"


@pytest.mark.parametrize("codec", ["FP32", "", None, 32], ids=repr)
def test_an_unknown_codec_name_is_a_wrong_codec(codec: Any) -> None:
    header, body = _update(codec=codec)
    assert _update_error(header, body).reason == "wrong_codec"


@pytest.mark.parametrize("missing", ["codec", "examples", "train_loss", "evaluation"])
def test_an_update_header_missing_a_key_is_refused(missing: str) -> None:
    header, body = _update()
    del header[missing]
    err = _update_error(header, body)
    assert err.reason == "bad_schema"
    assert str(err) == "bad_schema: update header must have codec, examples, train_loss, evaluation"


def test_an_update_header_with_an_extra_key_is_refused() -> None:
    header, body = _update(device_id="watch-01")
    assert _update_error(header, body).reason == "bad_schema"


@pytest.mark.parametrize(
    "examples",
    [0, -1, -(2**40), True, False, 2**31, 10**30, 1.0, 1.5, "12", None],
    ids=repr,
)
def test_a_bad_example_count_is_refused(examples: Any) -> None:
    header, body = _update(examples=examples)
    err = _update_error(header, body)
    assert err.reason == "bad_count"
    assert str(err) == "bad_count: examples must be a positive integer"


@pytest.mark.parametrize(
    "loss", [math.nan, math.inf, -math.inf, 10**400], ids=["nan", "inf", "-inf", "int beyond float"]
)
def test_a_non_finite_train_loss_is_refused(loss: Any) -> None:
    header, body = _update(train_loss=loss)
    err = _update_error(header, body)
    assert err.reason == "not_finite"
    assert str(err) == "not_finite: train_loss must be finite"


@pytest.mark.parametrize("loss", ["0.25", None, True, [0.25]], ids=repr)
def test_a_train_loss_that_is_not_a_number_is_refused(loss: Any) -> None:
    header, body = _update(train_loss=loss)
    err = _update_error(header, body)
    assert err.reason == "bad_schema"
    assert str(err) == "bad_schema: train_loss must be a number"


@pytest.mark.parametrize("accuracy", [-0.01, 1.0001, 2, -1, 100.0], ids=repr)
def test_an_accuracy_outside_the_unit_interval_is_refused(accuracy: float) -> None:
    header, body = _update(evaluation=_evaluation(accuracy=accuracy))
    err = _update_error(header, body)
    assert err.reason == "bad_schema"
    assert str(err) == "bad_schema: evaluation.accuracy must be in [0, 1]"


@pytest.mark.parametrize("mse", [-1e-9, -0.5, -100])
def test_a_negative_mse_is_refused(mse: float) -> None:
    header, body = _update(evaluation=_evaluation(accuracy=None, mse=mse))
    err = _update_error(header, body)
    assert err.reason == "bad_schema"
    assert str(err) == "bad_schema: evaluation.mse must be >= 0"


@pytest.mark.parametrize("accuracy", [0, 0.0, 1, 1.0, 0.5])
def test_accuracy_bounds_are_inclusive(accuracy: float) -> None:
    header, body = _update(evaluation=_evaluation(accuracy=accuracy))
    evaluation = decode_update(header, body, LAYOUT, Codec.FP32).evaluation
    assert evaluation is not None and evaluation.accuracy == accuracy


@pytest.mark.parametrize(
    ("changes", "reason", "message"),
    [
        ({"accuracy": math.nan}, "not_finite", "evaluation.accuracy must be finite"),
        ({"loss": math.nan}, "not_finite", "evaluation.loss must be finite"),
        ({"loss": math.inf}, "not_finite", "evaluation.loss must be finite"),
        ({"mse": -math.inf}, "not_finite", "evaluation.mse must be finite"),
        ({"loss": None}, "bad_schema", "evaluation.loss must be a number"),
        ({"accuracy": True}, "bad_schema", "evaluation.accuracy must be a number"),
        ({"mse": "0.1"}, "bad_schema", "evaluation.mse must be a number"),
        ({"examples": 0}, "bad_count", "evaluation.examples must be a positive integer"),
        ({"examples": True}, "bad_count", "evaluation.examples must be a positive integer"),
        ({"examples": 2**31}, "bad_count", "evaluation.examples must be a positive integer"),
    ],
    ids=[
        "nan accuracy",
        "nan loss",
        "inf loss",
        "-inf mse",
        "null loss",
        "bool accuracy",
        "string mse",
        "zero examples",
        "bool examples",
        "huge examples",
    ],
)
def test_a_bad_evaluation_value_is_refused(changes: dict[str, Any], reason: str, message: str) -> None:
    header, body = _update(evaluation=_evaluation(**changes))
    err = _update_error(header, body)
    assert err.reason == reason
    assert str(err) == f"{reason}: {message}"


@pytest.mark.parametrize(
    "evaluation",
    [{}, {"examples": 1, "loss": 0.1, "accuracy": None}, {**EVALUATION.to_dict(), "f1": 0.5}, [], "ok", 0],
    ids=["empty", "no mse", "extra key", "list", "string", "zero"],
)
def test_a_malformed_evaluation_object_is_refused(evaluation: Any) -> None:
    header, body = _update(evaluation=evaluation)
    err = _update_error(header, body)
    assert err.reason == "bad_schema"
    assert str(err) == "bad_schema: evaluation must have examples, loss, accuracy, mse"


@pytest.mark.parametrize("codec", DENSE)
@pytest.mark.parametrize("delta", [-1, 1], ids=["one byte short", "one byte long"])
def test_an_update_body_of_the_wrong_length_is_a_bad_tensor(codec: Codec, delta: int) -> None:
    header, body = _update(codec)
    bad = body[:delta] if delta < 0 else body + b"\x00"
    err = _update_error(header, bad, codec)
    assert err.reason == "bad_tensor"
    assert str(err) == f"bad_tensor: {codec.value} body is {len(bad)} bytes, the layout needs {len(body)}"


def test_an_update_body_with_nan_is_a_bad_tensor() -> None:
    header, body = _update()
    bad = body[:8] + struct.pack("<f", math.nan) + body[12:]
    err = _update_error(header, bad)
    assert err.reason == "bad_tensor"
    assert str(err) == "bad_tensor: tensor values must be finite"


def test_int8_parameters_with_zero_scale_are_a_bad_tensor() -> None:
    header, body = _update(Codec.INT8)
    bad = struct.pack("<2f", 0.0, 0.0) + body[8:]
    err = _update_error(header, bad, Codec.INT8)
    assert err.reason == "bad_tensor"
    assert str(err) == "bad_tensor: int8 quantisation parameters must be finite with scale > 0"


def test_the_header_is_checked_before_the_tensor_bytes() -> None:
    header, _ = _update(examples=0)
    assert _update_error(header, b"").reason == "bad_count"


def test_message_error_is_a_fedge_error() -> None:
    assert issubclass(MessageError, FedgeError)


# --- moments ----------------------------------------------------------------------------------

SUMS = np.array([1.5, -2.25, 1e300, 0.0, 3.0, -7.0])
SUMS_SQ = np.array([10.0, 20.5, 1e308, 0.0, 9.0, 49.0])


def test_moments_round_trip_exactly() -> None:
    header, body = encode_moments(5, SUMS, SUMS_SQ)
    assert header == {"count": 5, "features": 6}
    assert body == struct.pack("<12d", *SUMS.tolist(), *SUMS_SQ.tolist())
    moments = decode_moments(_wire(header), body, 6)
    assert isinstance(moments, MomentsPayload)
    assert moments.count == 5
    assert moments.sums.dtype == np.float64 and moments.sums_sq.dtype == np.float64
    assert np.array_equal(moments.sums, SUMS)
    assert np.array_equal(moments.sums_sq, SUMS_SQ)


def test_decoded_moments_are_independent_writable_copies() -> None:
    header, body = encode_moments(5, SUMS, SUMS_SQ)
    moments = decode_moments(header, body, 6)
    np.add(moments.sums, 1.0, out=moments.sums)  # the aggregator may accumulate in place
    assert np.array_equal(moments.sums, SUMS + 1.0)
    assert np.array_equal(moments.sums_sq, SUMS_SQ)


def test_moments_from_float32_inputs_are_widened_to_float64() -> None:
    sums, sums_sq = np.array([0.1, -2.5], np.float32), np.array([0.01, 6.25], np.float32)
    header, body = encode_moments(2, sums, sums_sq)
    assert len(body) == 32
    moments = decode_moments(header, body, 2)
    assert moments.sums.tolist() == [float(np.float32(0.1)), -2.5]
    assert moments.sums_sq.tolist() == [float(np.float32(0.01)), 6.25]


@pytest.mark.parametrize("features", [5, 7, 0, 48])
def test_moments_for_another_feature_count_are_refused(features: int) -> None:
    header, body = encode_moments(5, SUMS, SUMS_SQ)
    with pytest.raises(MessageError) as exc:
        decode_moments(header, body, features)
    assert exc.value.reason == "bad_shape"
    assert str(exc.value) == f"bad_shape: moments for 6 features, the task has {features}"


@pytest.mark.parametrize("cut", [-1, -8, -48, 8, 1], ids=["-1", "-8", "-48", "+8", "+1"])
def test_a_moments_body_of_the_wrong_length_is_refused(cut: int) -> None:
    header, body = encode_moments(5, SUMS, SUMS_SQ)
    bad = body[:cut] if cut < 0 else body + bytes(cut)
    with pytest.raises(MessageError) as exc:
        decode_moments(header, bad, 6)
    assert exc.value.reason == "bad_shape"
    assert str(exc.value) == f"bad_shape: moments body is {len(bad)} bytes, expected 96"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("index", [0, 5, 6, 11], ids=["first sum", "last sum", "first square", "last square"])
def test_non_finite_moments_are_refused(value: float, index: int) -> None:
    values = np.concatenate([SUMS, SUMS_SQ])
    values[index] = value
    header, body = encode_moments(5, values[:6], values[6:])
    with pytest.raises(MessageError) as exc:
        decode_moments(header, body, 6)
    assert exc.value.reason == "not_finite"
    assert str(exc.value) == "not_finite: moments must be finite"


@pytest.mark.parametrize("count", [0, -1, True, 2**31, 2.0, "5", None], ids=repr)
def test_a_bad_moments_count_is_refused(count: Any) -> None:
    _, body = encode_moments(5, SUMS, SUMS_SQ)
    with pytest.raises(MessageError) as exc:
        decode_moments({"count": count, "features": 6}, body, 6)
    assert exc.value.reason == "bad_count"
    assert str(exc.value) == "bad_count: count must be a positive integer"


@pytest.mark.parametrize(
    "header",
    [{"count": 5}, {"features": 6}, {"count": 5, "features": 6, "device": "d"}, {}],
    ids=["no features", "no count", "extra key", "empty"],
)
def test_a_moments_header_with_the_wrong_keys_is_refused(header: dict[str, Any]) -> None:
    _, body = encode_moments(5, SUMS, SUMS_SQ)
    with pytest.raises(MessageError) as exc:
        decode_moments(header, body, 6)
    assert exc.value.reason == "bad_schema"
    assert str(exc.value) == "bad_schema: moments header must have count and features"


def test_the_clip_indicator_is_in_the_header_only_when_given_and_only_plus_or_minus_one() -> None:
    delta = np.linspace(-1, 1, 23).astype(np.float32)
    plain_header, body = encode_update(delta, LAYOUT, Codec.FP32, 10, 0.5, None)
    assert "clip_indicator" not in plain_header
    assert decode_update(plain_header, body, LAYOUT, Codec.FP32).clip_indicator is None
    for indicator in (1, -1):
        header, body = encode_update(delta, LAYOUT, Codec.FP32, 10, 0.5, None, indicator)
        assert header["clip_indicator"] == indicator
        assert decode_update(header, body, LAYOUT, Codec.FP32).clip_indicator == indicator
    for bad in (0, 2, True, "1", None, 1.0 + 1e-9):
        with pytest.raises(MessageError) as refused:
            decode_update({**plain_header, "clip_indicator": bad}, body, LAYOUT, Codec.FP32)
        assert (refused.value.reason, refused.value.field) == ("bad_schema", "clip_indicator")


# --- sparse updates -------------------------------------------------------------------------


@pytest.mark.parametrize("codec", [Codec.TOPK_FP16, Codec.TOPK_INT8])
def test_a_sparse_update_decodes_dense_with_zeros_where_nothing_was_sent(codec: Codec) -> None:
    header, body = encode_update(DELTA, LAYOUT, codec, 120, 0.25, None, topk_fraction=0.25)
    assert header["codec"] == codec.value
    update = decode_update(_wire(header), body, LAYOUT, codec, 0.25)
    assert update.delta.shape == (P,) and update.delta.dtype == np.float32
    kept = update.delta != 0
    assert 0 < int(kept.sum()) <= int(0.25 * P) + len(LAYOUT)
    assert np.max(np.abs(update.delta[kept] - DELTA[kept])) <= 1.25 / 255
    for bad_body, fraction in ((body[:-1], 0.25), (body, 0.1)):  # the round's fraction decides k
        with pytest.raises(MessageError) as err:
            decode_update(_wire(header), bad_body, LAYOUT, codec, fraction)
        assert err.value.reason == "bad_tensor"


def test_max_sealed_bytes_of_a_sparse_codec_is_its_largest_body_plus_the_headroom() -> None:
    har = mlp_tensor_layout((48, 64, 32, 7))
    assert max_sealed_bytes(har, Codec.FP32, 48) == 25_884
    assert max_sealed_bytes(har, Codec.TOPK_INT8, 48, 0.1) == 1279 + SEALED_HEADROOM_BYTES == 5375
    assert max_sealed_bytes(har, Codec.TOPK_FP16, 48, 0.1) == 1775 + SEALED_HEADROOM_BYTES
    assert max_sealed_bytes(har, Codec.TOPK_INT8, 48, 0.5) == encoded_size(har, Codec.TOPK_INT8, 0.5) + 4096
