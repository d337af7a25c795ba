"""Errors of the contract carry the field, what was expected and what was found.

The messages are asserted word for word by each module's own tests; here, that the same checks
fill in ``field``/``expected``/``found``, so a caller can act on them without parsing text.
"""

from __future__ import annotations

import copy
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.protocol.codec import Codec, CodecError, decode_tensors, parse_codec
from fedge.protocol.errors import FedgeError, FieldError, ManifestError, TaskSpecError
from fedge.protocol.framing import FRAME_VERSION, MAGIC, FrameError, FrameKind, decode_frame, encode_frame
from fedge.protocol.messages import MessageError, decode_moments, decode_update
from fedge.protocol.model_manifest import ModelManifest, manifest_from_json, mlp_tensor_layout
from fedge.protocol.reasons import RejectReason
from fedge.protocol.round_manifest import RoundManifest, RoundManifestError, round_manifest_from_dict
from fedge.protocol.sealing import SealedHeader, SealError, read_header
from fedge.protocol.task import parse_task_spec, task_spec_from_dict

TASK = parse_task_spec((Path(__file__).resolve().parents[2] / "tasks" / "har-watch.toml").read_text())
LAYOUT = mlp_tensor_layout((2, 3))  # 9 parameters
MODEL_MANIFEST = ModelManifest(TASK, "model.tflite", "ab" * 32, 1000, "cd" * 32, None, "2.21.0")
ROUND = RoundManifest(
    fleet="fleet-1",
    version=1,
    parent_sha256="",
    phase="moments",
    round_number=0,
    round_id="r-0",
    issued_at=0.0,
    deadline=1.0,
    expires_at=2.0,
    selected_devices=("d1",),
    min_devices=1,
    codec=Codec.FP32,
    model_sha256="ab" * 32,
    model_bytes=1000,
    weights_sha256="ef" * 32,
    weights_bytes=4 * MODEL_MANIFEST.parameter_count,
    model_manifest=MODEL_MANIFEST,
    normalisation=None,
)
UPDATE_HEADER = {"codec": "fp32", "examples": 5, "train_loss": 0.5, "evaluation": None}


def _round(**changes: Any) -> dict[str, Any]:
    data = json.loads(json.dumps(ROUND.to_dict()))
    data.update(changes)
    return data


def _model(**changes: Any) -> str:
    data = copy.deepcopy(MODEL_MANIFEST.to_dict())
    data.update(changes)
    return json.dumps(data)


def _task(**training: Any) -> dict[str, Any]:
    data = TASK.to_dict()
    data["training"].update(training)
    return data


def _sealed() -> dict[str, Any]:
    return SealedHeader("fleet-1", "d1", "r-0", 1, "update", 1).to_dict()


def _frame(version: int = FRAME_VERSION, reserved: int = 0) -> bytes:
    return struct.pack(">4sBBHII", MAGIC, version, int(FrameKind.SEALED), reserved, 2, 0) + b"{}"


P = MODEL_MANIFEST.parameter_count
CASES: list[tuple[str, Callable[[], object], type[FieldError], str, Any, Any]] = [
    (
        "codec name",
        lambda: parse_codec("fp64"),
        CodecError,
        "codec",
        ("fp32", "fp16", "int8", "topk-fp16", "topk-int8"),
        "fp64",
    ),
    ("codec body", lambda: decode_tensors(b"\0" * 35, LAYOUT, Codec.FP32), CodecError, "fp32 body", 36, 35),
    ("frame prefix", lambda: decode_frame(b"FEDG", FrameKind.SEALED), FrameError, "frame length", ">= 16", 4),
    ("frame version", lambda: decode_frame(_frame(version=9), FrameKind.SEALED), FrameError, "version", 1, 9),
    (
        "frame kind",
        lambda: decode_frame(encode_frame(FrameKind.SIGNED, {}), FrameKind.SEALED),
        FrameError,
        "kind",
        1,
        3,
    ),
    (
        "frame reserved",
        lambda: decode_frame(_frame(reserved=1), FrameKind.SEALED),
        FrameError,
        "reserved",
        0,
        1,
    ),
    (
        "frame length",
        lambda: decode_frame(_frame() + b"x", FrameKind.SEALED),
        FrameError,
        "frame length",
        18,
        19,
    ),
    (
        "update codec",
        lambda: decode_update({**UPDATE_HEADER, "codec": "int8"}, b"", LAYOUT, Codec.FP32),
        MessageError,
        "codec",
        "fp32",
        "int8",
    ),
    (
        "update examples",
        lambda: decode_update({**UPDATE_HEADER, "examples": 0}, b"", LAYOUT, Codec.FP32),
        MessageError,
        "examples",
        "an integer in 1..2^31-1",
        0,
    ),
    (
        "update tensor",
        lambda: decode_update(UPDATE_HEADER, b"\0" * 4, LAYOUT, Codec.FP32),
        MessageError,
        "fp32 body",
        36,
        4,
    ),
    (
        "moments features",
        lambda: decode_moments({"count": 2, "features": 3}, b"", 4),
        MessageError,
        "features",
        4,
        3,
    ),
    (
        "sealed kind",
        lambda: SealedHeader.from_dict({**_sealed(), "kind": "status"}),
        SealError,
        "kind",
        ("update", "moments", "secagg_advertise", "secagg_shares", "secagg_masked", "secagg_unmask", "chunk"),
        "status",
    ),
    (
        "round weights_bytes",
        lambda: round_manifest_from_dict(_round(weights_bytes=8)),
        RoundManifestError,
        "weights_bytes",
        4 * P,
        8,
    ),
    (
        "round phase",
        lambda: round_manifest_from_dict(_round(phase="done")),
        RoundManifestError,
        "phase",
        ("moments", "train", "final"),
        "done",
    ),
    (
        "round codec",
        lambda: round_manifest_from_dict(_round(codec="fp64")),
        RoundManifestError,
        "codec",
        ("fp32", "fp16", "int8", "topk-fp16", "topk-int8"),
        "fp64",
    ),
    (
        "model format",
        lambda: manifest_from_json(_model(format="x")),
        ManifestError,
        "format",
        "fedge-model/1",
        "x",
    ),
    (
        "model parameter_count",
        lambda: manifest_from_json(_model(parameter_count=P + 1)),
        ManifestError,
        "parameter_count",
        P,
        P + 1,
    ),
    (
        "model task",
        lambda: manifest_from_json(_model(task=_task(batch_size=0))),
        ManifestError,
        "task.training.batch_size",
        "1..65536",
        0,
    ),
    (
        "task range",
        lambda: task_spec_from_dict(_task(learning_rate=-1.0)),
        TaskSpecError,
        "training.learning_rate",
        "> 0",
        -1.0,
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "field", "expected", "found"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_errors_name_field_expected_and_found(
    call: Callable[[], object], error: type[FieldError], field: str, expected: Any, found: Any
) -> None:
    with pytest.raises(error) as exc:
        call()
    assert (exc.value.field, exc.value.expected, exc.value.found) == (field, expected, found)
    assert isinstance(exc.value, FieldError) and isinstance(exc.value, FedgeError)


def test_a_prefixed_frame_reason_keeps_the_frame_fields() -> None:
    with pytest.raises(SealError) as exc:
        read_header(b"FEDG")
    assert exc.value.reason == "frame_truncated"
    assert (exc.value.field, exc.value.expected, exc.value.found) == ("frame length", ">= 16", 4)


def test_the_reason_of_a_protocol_error_is_a_member() -> None:
    with pytest.raises(MessageError) as exc:
        decode_moments({"count": 2, "features": 1}, np.array([1.0, -1.0], "<f8").tobytes(), 1)
    assert exc.value.reason is RejectReason.BAD_MOMENTS and str(exc.value).startswith("bad_moments: ")


def test_without_a_message_the_three_make_one() -> None:
    err = FieldError(field="phase", expected=("moments", "train"), found="done")
    assert str(err) == "phase: expected ('moments', 'train'), found 'done'"
    assert FieldError("as written", field="x").args == ("as written",)
    assert (FieldError("m").field, FieldError("m").expected, FieldError("m").found) == (None, None, None)
