"""The aggregator's checkpoint: exact round trips, atomic replacement and corruption handling.

Real files throughout. A damaged latest checkpoint must either be a precise
:class:`CheckpointError` or, when ``.prev`` is intact, a recovery that says so; never a
silently wrong state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.aggregator.checkpoint import (
    HEADER_BYTES,
    MAGIC,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    previous_path,
    save_checkpoint,
)
from fedge.protocol.errors import FedgeError
from fedge.protocol.model_manifest import Normalisation
from fedge.protocol.weights import weights_to_bytes

MAX = 1 << 20
P = 1000


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


def make(version: int = 3, p: int = P, **changes: Any) -> Checkpoint:
    weights = np.random.default_rng(version).normal(0, 1, p).astype(np.float32)
    weights[:4] = [-0.0, np.float32(1e-45), np.finfo(np.float32).max, np.finfo(np.float32).min]
    fields: dict[str, Any] = {
        "weights": weights,
        "model_version": version,
        "round_number": 10 + version,
        "round_id": f"round-{version:04d}",
        "parent_hash": hashlib.sha256(f"v{version - 1}".encode()).hexdigest(),
        "device_counters": {"dev-a": 41, "dev-b": 0, "gebäude-3/ahu-7": 2**63 - 1},
        "round_devices": frozenset({"dev-a", "gebäude-3/ahu-7"}),
        "normalisation": Normalisation((0.1, -2.5, 1e-300), (1.0, 0.3333333333333333, 7e10)),
        "metadata": {"task": "har-watch", "losses": [0.5, 0.25], "nested": {"ok": True, "none": None}},
    }
    fields.update(changes)
    return Checkpoint(**fields)


def raw_file(doc: Any, weights: bytes, declared: int | None = None, magic: bytes = MAGIC) -> bytes:
    text = json.dumps(doc).encode()
    return struct.pack("<8sI", magic, len(text) if declared is None else declared) + text + weights


def valid_doc(weights: bytes) -> dict[str, Any]:
    return {
        "model_version": 1,
        "round_number": 1,
        "round_id": "r1",
        "parent_hash": None,
        "parameter_count": len(weights) // 4,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "device_counters": {},
        "round_devices": [],
        "normalisation": None,
        "metadata": {},
    }


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --- round trip -----------------------------------------------------------------------------


def test_round_trip_returns_exactly_what_was_saved(tmp_path: Path) -> None:
    path = tmp_path / "aggregator.ckpt"
    saved = make()
    save_checkpoint(path, saved)
    loaded = load_checkpoint(path, MAX)
    assert loaded is not None
    assert loaded == saved
    assert loaded.weights.tobytes() == saved.weights.tobytes()  # bit for bit, -0.0 included
    assert np.signbit(loaded.weights[0]) and loaded.weights.dtype == np.float32
    assert loaded.model_version == 3 and loaded.round_number == 13 and loaded.round_id == "round-0003"
    assert loaded.parent_hash == saved.parent_hash
    assert dict(loaded.device_counters) == {"dev-a": 41, "dev-b": 0, "gebäude-3/ahu-7": 2**63 - 1}
    assert loaded.round_devices == frozenset({"dev-a", "gebäude-3/ahu-7"})
    assert loaded.normalisation == saved.normalisation
    assert dict(loaded.metadata) == {
        "task": "har-watch",
        "losses": [0.5, 0.25],
        "nested": {"ok": True, "none": None},
    }
    assert loaded.recovered_from_previous is False
    assert files(tmp_path) == ["aggregator.ckpt"]  # no temp file left behind


def test_minimal_checkpoint_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "c.ckpt"
    saved = Checkpoint(np.zeros(1, np.float32), 0, 0, "genesis", None)
    save_checkpoint(path, saved)
    assert load_checkpoint(path, MAX) == saved


def test_file_layout_is_magic_length_json_weights(tmp_path: Path) -> None:
    path = tmp_path / "c.ckpt"
    cp = make(p=5)
    save_checkpoint(path, cp)
    data = path.read_bytes()
    magic, json_len = struct.unpack("<8sI", data[:HEADER_BYTES])
    assert magic == b"FEDGECK1"
    doc = json.loads(data[HEADER_BYTES : HEADER_BYTES + json_len])
    weights = data[HEADER_BYTES + json_len :]
    assert weights == weights_to_bytes(cp.weights)
    assert doc["weights_sha256"] == hashlib.sha256(weights).hexdigest() == cp.weights_sha256
    assert doc["parameter_count"] == 5 and doc["round_devices"] == ["dev-a", "gebäude-3/ahu-7"]


def test_successive_saves_keep_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "agg.ckpt"
    for version in (1, 2, 3):
        save_checkpoint(path, make(version))
    assert files(tmp_path) == ["agg.ckpt", "agg.prev"]
    assert load_checkpoint(path, MAX) == make(3)
    # .prev is itself a valid checkpoint: the one saved before the latest.
    prev = previous_path(path)
    assert prev == tmp_path / "agg.prev"
    os.replace(prev, tmp_path / "copy.ckpt")
    assert load_checkpoint(tmp_path / "copy.ckpt", MAX) == make(2)


def test_missing_checkpoint_is_none(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path / "nothing.ckpt", MAX) is None
    assert files(tmp_path) == []


def test_checkpoint_is_frozen_and_copies_its_inputs() -> None:
    weights = np.ones(3, np.float32)
    counters = {"d": 1}
    metadata: dict[str, Any] = {"k": [1]}
    cp = Checkpoint(weights, 1, 1, "r", None, device_counters=counters, metadata=metadata)
    weights[0], counters["d"], metadata["k"] = 5.0, 2, [2]
    assert cp.weights[0] == 1.0 and cp.device_counters["d"] == 1 and cp.metadata["k"] == [1]
    with pytest.raises(ValueError, match="read-only"):
        cp.weights[0] = 2.0
    with pytest.raises(TypeError):
        cp.device_counters["d"] = 3  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cp.model_version = 2  # type: ignore[misc]


# --- atomicity ------------------------------------------------------------------------------


def test_stray_temp_file_from_a_crashed_save_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "agg.ckpt"
    save_checkpoint(path, make(1))
    # A crash after writing the temporary file, before the rename: garbage beside the latest.
    (tmp_path / ".agg.ckpt.abc123.tmp").write_bytes(MAGIC + b"\xff" * 40)
    loaded = load_checkpoint(path, MAX)
    assert loaded == make(1) and loaded is not None and not loaded.recovered_from_previous
    save_checkpoint(path, make(2))
    assert load_checkpoint(path, MAX) == make(2)


def test_crash_between_the_two_renames_recovers_from_prev(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "agg.ckpt"
    save_checkpoint(path, make(1))
    os.replace(path, previous_path(path))  # the first rename happened, the second did not
    with caplog.at_level(logging.WARNING, logger="fedge.aggregator.checkpoint"):
        loaded = load_checkpoint(path, MAX)
    assert loaded == dataclasses.replace(make(1), recovered_from_previous=True)
    assert "recovered the previous checkpoint (model version 1, round 11)" in caplog.text
    save_checkpoint(path, make(2))  # and the next save works from that state
    assert files(tmp_path) == ["agg.ckpt", "agg.prev"]
    assert load_checkpoint(path, MAX) == make(2)


@pytest.mark.parametrize("keep", [0, 5, HEADER_BYTES, HEADER_BYTES + 30, -1])
def test_truncated_latest_recovers_from_prev(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, keep: int
) -> None:
    path = tmp_path / "agg.ckpt"
    save_checkpoint(path, make(1))
    save_checkpoint(path, make(2))
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with caplog.at_level(logging.WARNING, logger="fedge.aggregator.checkpoint"):
        loaded = load_checkpoint(path, MAX)
    assert loaded is not None and loaded.recovered_from_previous
    assert loaded == dataclasses.replace(make(1), recovered_from_previous=True)
    assert f"checkpoint {path}:" in caplog.text


def _json_len(path: Path) -> int:
    return int(struct.unpack("<8sI", path.read_bytes()[:HEADER_BYTES])[1])


def test_truncated_latest_without_prev_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "agg.ckpt"
    save_checkpoint(path, make(1))
    data = path.read_bytes()
    json_len = _json_len(path)
    no_prev = "; no previous checkpoint to fall back on"
    cases = {
        5: f"{path}: truncated: 5 bytes, shorter than the header",
        HEADER_BYTES + 10: (
            f"{path}: header declares {json_len} bytes of JSON but only 10 bytes follow "
            "(truncated or corrupt)"
        ),
        len(data) - 1: (
            f"{path}: {4 * P - 1} bytes of weights, expected {4 * P} for {P} float32 parameters "
            "(truncated or corrupt)"
        ),
    }
    for keep, message in cases.items():
        path.write_bytes(data[:keep])
        with pytest.raises(CheckpointError, match=exactly(message + no_prev)):
            load_checkpoint(path, MAX)
        assert path.read_bytes() == data[:keep]  # loading never repairs or deletes anything


def test_flipped_weight_byte_is_detected(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "agg.ckpt"
    save_checkpoint(path, make(1))
    data = bytearray(path.read_bytes())
    expected = hashlib.sha256(data[HEADER_BYTES + _json_len(path) :]).hexdigest()
    data[-7] ^= 0x01
    path.write_bytes(bytes(data))
    actual = hashlib.sha256(data[HEADER_BYTES + _json_len(path) :]).hexdigest()
    message = f"{path}: weights SHA-256 {actual} does not match the recorded {expected}"
    with pytest.raises(CheckpointError, match=exactly(message + "; no previous checkpoint to fall back on")):
        load_checkpoint(path, MAX)
    # With a previous checkpoint, the corrupt latest one is skipped, loudly.
    path = tmp_path / "second.ckpt"
    save_checkpoint(path, make(1))
    save_checkpoint(path, make(2))
    corrupt = bytearray(path.read_bytes())
    corrupt[-1] ^= 0x80
    path.write_bytes(bytes(corrupt))
    with caplog.at_level(logging.WARNING, logger="fedge.aggregator.checkpoint"):
        loaded = load_checkpoint(path, MAX)
    assert loaded == dataclasses.replace(make(1), recovered_from_previous=True)
    assert "does not match the recorded" in caplog.text


def test_both_unusable_is_an_error_naming_both(tmp_path: Path) -> None:
    path = tmp_path / "agg.ckpt"
    save_checkpoint(path, make(1))
    save_checkpoint(path, make(2))
    path.write_bytes(b"garbage!" + bytes(20))
    previous_path(path).write_bytes(b"")
    message = (
        f"{path}: not a fedge checkpoint (magic b'garbage!'); the previous checkpoint is unusable too: "
        f"{previous_path(path)}: truncated: 0 bytes, shorter than the header"
    )
    with pytest.raises(CheckpointError, match=exactly(message)):
        load_checkpoint(path, MAX)


def test_missing_latest_and_corrupt_prev_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    path = tmp_path / "agg.ckpt"
    previous_path(path).write_bytes(b"x")
    message = (
        f"{path} is missing; the previous checkpoint is unusable too: "
        f"{previous_path(path)}: truncated: 1 bytes, shorter than the header"
    )
    with pytest.raises(CheckpointError, match=exactly(message)):
        load_checkpoint(path, MAX)


# --- sizes are checked before anything is allocated -----------------------------------------


def test_huge_declared_json_length_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "agg.ckpt"
    path.write_bytes(raw_file(valid_doc(bytes(4)), bytes(4), declared=0xFFFFFFFF))
    size = path.stat().st_size
    message = (
        f"{path}: header declares {0xFFFFFFFF} bytes of JSON but only {size - HEADER_BYTES} bytes follow "
        "(truncated or corrupt); no previous checkpoint to fall back on"
    )
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=exactly(message)):
            load_checkpoint(path, MAX)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_file_over_max_bytes_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "agg.ckpt"
    with path.open("wb") as f:  # a sparse 4 GiB file: costs no disk, would cost memory to read
        f.write(raw_file(valid_doc(bytes(4)), b"", declared=0xFFFFFFF0))
        f.truncate(1 << 32)
    message = (
        f"{path}: {1 << 32} bytes is over the limit of {MAX} bytes; no previous checkpoint to fall back on"
    )
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=exactly(message)):
            load_checkpoint(path, MAX)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_max_bytes_counts_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "agg.ckpt"
    save_checkpoint(path, make(1))
    size = path.stat().st_size
    assert load_checkpoint(path, size) == make(1)
    with pytest.raises(CheckpointError, match=f"is over the limit of {size - 1} bytes"):
        load_checkpoint(path, size - 1)


# --- malformed content ----------------------------------------------------------------------

W = weights_to_bytes(np.arange(3, dtype=np.float32))
NOT_PLAIN = "checkpoint: metadata must be plain JSON (string keys, lists, finite numbers)"


def _doc(**changes: Any) -> dict[str, Any]:
    doc = valid_doc(W)
    doc.update(changes)
    return doc


def _without(key: str) -> dict[str, Any]:
    doc = valid_doc(W)
    del doc[key]
    return doc


KEYS = sorted(valid_doc(W))
MALFORMED: list[tuple[str, bytes, str]] = [
    ("magic", raw_file(_doc(), W, magic=b"FEDGECK2"), "not a fedge checkpoint (magic b'FEDGECK2')"),
    (
        "not json",
        struct.pack("<8sI", MAGIC, 3) + b"{x}" + W,
        "header is not valid JSON: Expecting property "
        "name enclosed in double quotes: line 1 column 2 (char 1)",
    ),
    (
        "not utf-8",
        struct.pack("<8sI", MAGIC, 2) + b"\xc3\x28" + W,
        "header is not valid JSON: "
        "'utf-8' codec can't decode byte 0xc3 in position 0: invalid continuation byte",
    ),
    (
        "deep",
        struct.pack("<8sI", MAGIC, 200_000) + b"[" * 100_000 + b"]" * 100_000,
        "header is not valid JSON: nested too deeply",
    ),
    ("array", raw_file([], W), f"header must be an object with keys {KEYS}, got list"),
    (
        "missing key",
        raw_file(_without("metadata"), W),
        f"header must be an object with keys {KEYS}, got {sorted(set(KEYS) - {'metadata'})}",
    ),
    (
        "extra key",
        raw_file(_doc(extra=1), W),
        f"header must be an object with keys {KEYS}, got {sorted([*KEYS, 'extra'])}",
    ),
    ("count str", raw_file(_doc(parameter_count="3"), W), "parameter_count must be an integer >= 1, got '3'"),
    ("count 0", raw_file(_doc(parameter_count=0), b""), "parameter_count must be an integer >= 1, got 0"),
    (
        "count mismatch",
        raw_file(_doc(parameter_count=2), W),
        "12 bytes of weights, expected 8 for 2 float32 parameters (truncated or corrupt)",
    ),
    (
        "sha upper",
        raw_file(_doc(weights_sha256="AB" * 32), W),
        "weights_sha256 must be 64 lowercase hex digits",
    ),
    (
        "version bool",
        raw_file(_doc(model_version=True), W),
        "checkpoint: model_version must be an integer >= 0, got True",
    ),
    (
        "version float",
        raw_file(_doc(model_version=1.0), W),
        "checkpoint: model_version must be an integer >= 0, got 1.0",
    ),
    (
        "round negative",
        raw_file(_doc(round_number=-1), W),
        "checkpoint: round_number must be an integer >= 0, got -1",
    ),
    ("round id", raw_file(_doc(round_id=7), W), "checkpoint: round_id must be a non-empty string, got 7"),
    (
        "parent",
        raw_file(_doc(parent_hash="abc"), W),
        "checkpoint: parent_hash must be None or 64 lowercase hex digits",
    ),
    ("counters list", raw_file(_doc(device_counters=[]), W), "device_counters must be an object"),
    (
        "counter str",
        raw_file(_doc(device_counters={"d": "1"}), W),
        "checkpoint: counter of device 'd' must be an integer in 0..2**63-1, got '1'",
    ),
    (
        "counter huge",
        raw_file(_doc(device_counters={"d": 2**63}), W),
        f"checkpoint: counter of device 'd' must be an integer in 0..2**63-1, got {2**63}",
    ),
    (
        "device empty",
        raw_file(_doc(device_counters={"": 1}), W),
        "checkpoint: device ids must be non-empty strings, got ''",
    ),
    ("round devices str", raw_file(_doc(round_devices="dev"), W), "round_devices must be a list of strings"),
    ("round devices int", raw_file(_doc(round_devices=[1]), W), "round_devices must be a list of strings"),
    (
        "round devices twice",
        raw_file(_doc(round_devices=["a", "a"]), W),
        "round_devices lists a device twice",
    ),
    (
        "normalisation",
        raw_file(_doc(normalisation={"mean": [0.0], "std": [0.0]}), W),
        "normalisation[0]: mean must be finite and std finite and > 0, got mean=0.0, std=0.0",
    ),
    (
        "normalisation shape",
        raw_file(_doc(normalisation=[1]), W),
        "normalisation: must be an object with 'mean' and 'std'",
    ),
    ("metadata list", raw_file(_doc(metadata=[]), W), "metadata must be an object"),
]


def _tampered_inf_metadata() -> bytes:
    text = json.dumps(_doc()).replace('"metadata": {}', '"metadata": {"x": 1e999}').encode()
    return struct.pack("<8sI", MAGIC, len(text)) + text + W


def _nan_weights() -> bytes:
    nan = weights_to_bytes(np.array([0, np.nan, 0], np.float32))
    return raw_file(valid_doc(nan), nan)


MALFORMED += [
    ("metadata inf", _tampered_inf_metadata(), NOT_PLAIN),
    ("nan weights", _nan_weights(), "checkpoint: weights contain NaN or infinity"),
]


@pytest.mark.parametrize(("data", "problem"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_checkpoint_is_a_precise_error(tmp_path: Path, data: bytes, problem: str) -> None:
    path = tmp_path / "agg.ckpt"
    path.write_bytes(data)
    message = f"{path}: {problem}; no previous checkpoint to fall back on"
    with pytest.raises(CheckpointError, match=exactly(message)):
        load_checkpoint(path, MAX)
    assert files(tmp_path) == ["agg.ckpt"] and path.read_bytes() == data


def test_hand_built_valid_file_loads(tmp_path: Path) -> None:
    """The malformed cases above are one change away from this file, which is accepted."""
    path = tmp_path / "agg.ckpt"
    path.write_bytes(raw_file(_doc(), W))
    loaded = load_checkpoint(path, MAX)
    assert loaded is not None and loaded.weights.tolist() == [0.0, 1.0, 2.0]


# --- construction and paths -----------------------------------------------------------------

W3 = np.zeros(3, np.float32)
NOT_WEIGHTS = "checkpoint: weights must be a non-empty 1-D float32 array"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": np.zeros(3, np.float64)}, NOT_WEIGHTS),
        ({"weights": np.zeros((1, 3), np.float32)}, NOT_WEIGHTS),
        ({"weights": np.zeros(0, np.float32)}, NOT_WEIGHTS),
        ({"weights": [0.0]}, NOT_WEIGHTS),
        ({"weights": np.array([np.inf], np.float32)}, "checkpoint: weights contain NaN or infinity"),
        ({"model_version": -1}, "checkpoint: model_version must be an integer >= 0, got -1"),
        ({"round_id": ""}, "checkpoint: round_id must be a non-empty string, got ''"),
        ({"parent_hash": "AB" * 32}, "checkpoint: parent_hash must be None or 64 lowercase hex digits"),
        (
            {"device_counters": {"d": -1}},
            "checkpoint: counter of device 'd' must be an integer in 0..2**63-1, got -1",
        ),
        ({"device_counters": {1: 1}}, "checkpoint: device ids must be non-empty strings, got 1"),
        ({"device_counters": [("d", 1)]}, "checkpoint: device_counters must be a mapping"),
        ({"round_devices": "dev-a"}, "checkpoint: round_devices must be a set of device ids"),
        ({"round_devices": ["dev-a"]}, "checkpoint: round_devices must be a set of device ids"),
        ({"round_devices": {""}}, "checkpoint: device ids must be non-empty strings, got ''"),
        (
            {"normalisation": {"mean": [0.0], "std": [1.0]}},
            "checkpoint: normalisation must be a Normalisation or None",
        ),
        ({"metadata": {1: "int key"}}, NOT_PLAIN),
        ({"metadata": {"t": (1, 2)}}, NOT_PLAIN),
        ({"metadata": {"x": float("nan")}}, NOT_PLAIN),
        ({"metadata": {"x": object()}}, NOT_PLAIN),
        ({"metadata": None}, "checkpoint: metadata must be a mapping"),
        ({"recovered_from_previous": 1}, "checkpoint: recovered_from_previous must be a bool"),
    ],
)
def test_checkpoint_validation(kwargs: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {
        "weights": W3,
        "model_version": 1,
        "round_number": 1,
        "round_id": "r",
        "parent_hash": None,
    }
    fields.update(kwargs)
    with pytest.raises(CheckpointError, match=exactly(message)):
        Checkpoint(**fields)


def test_prev_suffix_path_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "agg.prev"
    message = f"checkpoint path {path} cannot have a '.prev' suffix or an empty name"
    with pytest.raises(CheckpointError, match=exactly(message)):
        save_checkpoint(path, make(1))
    with pytest.raises(CheckpointError, match=exactly(message)):
        load_checkpoint(path, MAX)
    assert files(tmp_path) == []


def test_path_without_suffix_keeps_prev_beside_it(tmp_path: Path) -> None:
    path = tmp_path / "state"
    save_checkpoint(path, make(1))
    save_checkpoint(path, make(2))
    assert files(tmp_path) == ["state", "state.prev"]


def test_unwritable_location_is_a_checkpoint_error_and_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "no-such-dir" / "agg.ckpt"
    message = f"cannot write checkpoint {path}: No such file or directory"
    with pytest.raises(CheckpointError, match=exactly(message)):
        save_checkpoint(path, make(1))
    assert files(tmp_path) == []


def test_unreadable_latest_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    path = tmp_path / "agg.ckpt"
    save_checkpoint(path, make(1))
    save_checkpoint(path, make(2))
    path.unlink()
    path.mkdir()  # exists, but cannot be read as a file
    with pytest.raises(CheckpointError, match=exactly(f"cannot read checkpoint {path}: Is a directory")):
        load_checkpoint(path, MAX)


def test_max_bytes_must_hold_a_header(tmp_path: Path) -> None:
    message = f"max_bytes must be an integer >= {HEADER_BYTES}, got 4"
    with pytest.raises(CheckpointError, match=exactly(message)):
        load_checkpoint(tmp_path / "agg.ckpt", 4)


def test_checkpoint_error_is_a_fedge_error() -> None:
    assert issubclass(CheckpointError, FedgeError)
