"""Sparse rounds on the aggregator: a round engine whose ``[rounds] codec`` is ``topk-int8``.

The updates are built on the device's own path (``fedge.agent.core.sparse_update_payload`` with
an error-feedback residual, sealed with ``seal_contribution``), so what is under test is the
pair: the manifest announces ``topk_fraction``, the engine decodes with it and aggregates the
sparse deltas, its message limit is derived from the sparse codec, and a device that keeps a
different number of values than the round's ``k`` is refused without a trace. Sizes are
measured on the real har-watch layout (no TensorFlow: the engine never runs the model).
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.agent.core import DeviceIdentity, seal_contribution, sparse_update_payload, update_payload
from fedge.aggregator.config import load_aggregator_config
from fedge.aggregator.privacy_config import sparse_refused
from fedge.aggregator.round_engine import Outcome, RoundEngine
from fedge.protocol.codec import Codec, decode_tensors, encode_tensors, topk_counts
from fedge.protocol.codec_names import DEFAULT_TOPK_FRACTION
from fedge.protocol.config_source import ConfigError
from fedge.protocol.messages import max_sealed_bytes
from fedge.protocol.model_manifest import ModelManifest, mlp_tensor_layout
from fedge.protocol.round_manifest import RoundManifest
from fedge.protocol.signing import DocType, key_id, verify_document
from fedge.protocol.task import parse_task_spec
from fedge.protocol.weights import weights_to_bytes
from support.aggregator_toml import MINIMAL_AGGREGATOR_TOML
from support.engine_helpers import (
    AGGREGATOR_KEY,
    DEVICE_IDS,
    DEVICE_KEYS,
    FLEET,
    INITIAL_WEIGHTS,
    LAYOUT,
    MODEL_BYTES,
    N_FEATURES,
    REPO,
    SIGNING_KEY,
    T0,
    TOPICS,
    P,
    delta_for,
    fedavg_oracle,
    initial_state,
    make_engine,
    plain_fedavg,
    registry,
    settings,
)

THREE = DEVICE_IDS[:3]
TOPK = Codec.TOPK_INT8


def identity(device: str) -> DeviceIdentity:
    return DeviceIdentity(FLEET, device, DEVICE_KEYS[device], AGGREGATOR_KEY.public_key)


def sealed(
    manifest: RoundManifest, device: str, payload: tuple[dict[str, Any], bytes], counter: int = 1
) -> bytes:
    """``payload`` sealed as the device core seals it for ``manifest``."""
    return seal_contribution(
        identity(device), manifest.round_id, manifest.version, counter, "update", payload
    )


def residual_for(device: str) -> np.ndarray:
    """What a device still owes from earlier sparse rounds (float32, like the agent's)."""
    return np.random.default_rng([DEVICE_IDS.index(device), 99]).normal(0.0, 0.01, P).astype(np.float32)


# --- the manifest and the aggregate ---------------------------------------------------------------


def test_a_topk_int8_round_announces_topk_fraction_and_aggregates_the_decoded_sparse_deltas() -> None:
    engine = make_engine(plain_fedavg(codec=TOPK), initial_state(claim_median=1e9))
    assert engine.settings.topk_fraction == DEFAULT_TOPK_FRACTION == 0.1
    pub = engine.open_round(T0)
    m = pub.manifest
    assert (m.codec, m.topk_fraction) == (TOPK, 0.1)
    # Signed: what a device verifies and parses carries it too.
    doc, _ = verify_document(
        pub.manifest_frame,
        DocType.ROUND_MANIFEST,
        {key_id(SIGNING_KEY.verify_key): SIGNING_KEY.verify_key},
        1 << 20,
    )
    assert (doc["codec"], doc["topk_fraction"]) == ("topk-int8", 0.1)

    decoded = []
    for d in THREE:
        payload, owed = sparse_update_payload(
            m, delta_for(d, 1, scale=0.02), residual_for(d), examples=80, train_loss=0.4, evaluation=None
        )
        header, body = payload
        assert header["codec"] == "topk-int8"
        sent = decode_tensors(body, LAYOUT, TOPK, 0.1)
        # Sparse: at most the round's k per tensor (a kept value can quantise to exactly 0).
        for t, k in zip(LAYOUT, topk_counts(LAYOUT, 0.1), strict=True):
            assert 0 < np.count_nonzero(sent[t.offset : t.offset + t.size]) <= k
        # The device's error feedback: what it did not send is what it still owes.
        np.testing.assert_allclose(sent + owed, delta_for(d, 1, scale=0.02) + residual_for(d), atol=1e-6)
        decoded.append(sent)
        assert engine.handle(TOPICS.update(d), sealed(m, d, payload), T0 + 1) == Outcome(
            True, "accepted", d, "update"
        )
    record = engine.close_round()
    assert record.outcome == "aggregated" and record.reported == 3
    lr = engine.settings.server_learning_rate
    np.testing.assert_allclose(
        engine.state.weights, fedavg_oracle(INITIAL_WEIGHTS, decoded, [80] * 3, lr), rtol=0, atol=1e-6
    )
    # The mean of sparse deltas moved only the coordinates some device sent.
    moved = engine.state.weights != INITIAL_WEIGHTS
    assert moved.sum() <= 3 * sum(topk_counts(LAYOUT, 0.1)) and moved.any()


def test_a_dense_round_announces_no_topk_fraction() -> None:
    for codec in (Codec.FP32, Codec.FP16, Codec.INT8):
        m = make_engine(settings(codec=codec)).open_round(T0).manifest
        assert m.topk_fraction is None and "topk_fraction" not in m.to_dict()


# --- sizes ------------------------------------------------------------------------------------------


def har_watch_engine(codec: Codec) -> RoundEngine:
    """An engine for the real har-watch model's layout (48 -> 64 -> 32 -> 7: 5,447 weights)."""
    task = parse_task_spec((REPO / "tasks" / "har-watch.toml").read_text())
    weights = (
        np.random.default_rng(5)
        .normal(0.0, 0.1, sum(t.size for t in mlp_tensor_layout(task.layer_sizes)))
        .astype(np.float32)
    )
    manifest = ModelManifest(
        task=task,
        model_file="model.tflite",
        model_sha256=hashlib.sha256(MODEL_BYTES).hexdigest(),
        model_bytes=len(MODEL_BYTES),
        initial_weights_sha256=hashlib.sha256(weights_to_bytes(weights)).hexdigest(),
        normalisation=None,
        tensorflow_version="none (test)",
    )
    return RoundEngine(
        FLEET,
        settings(codec=codec),
        manifest,
        MODEL_BYTES,
        AGGREGATOR_KEY,
        SIGNING_KEY,
        registry(THREE),
        initial_state(weights=weights),
    )


def test_a_topk_int8_update_is_at_most_a_tenth_of_the_fp32_one_for_har_watch() -> None:
    device = THREE[0]
    sizes = {}
    for codec in (Codec.FP32, TOPK):
        engine = har_watch_engine(codec)
        m = engine.open_round(T0).manifest
        count = m.model_manifest.parameter_count
        assert count == 5447
        delta = np.random.default_rng(11).normal(0.0, 0.02, count).astype(np.float32)
        if codec.sparse:
            payload, _ = sparse_update_payload(m, delta, None, 100, 0.5, None)
        else:
            payload = update_payload(m, delta, 100, 0.5, None)
        frame = sealed(m, device, payload)
        assert engine.handle(TOPICS.update(device), frame, T0 + 1).accepted  # a real, accepted update
        assert len(frame) <= engine.max_message_bytes
        sizes[codec] = len(frame)
    # Measured: fp32 about 22.2 kB sealed, topk-int8 about 1.6 kB.
    assert sizes[TOPK] <= 0.1 * sizes[Codec.FP32], sizes
    assert 21_788 < sizes[Codec.FP32] < 21_788 + 1_000
    assert 1_142 < sizes[TOPK] < 1_279 + 1_000


def test_the_message_limit_of_a_topk_int8_round_is_derived_from_the_sparse_codec() -> None:
    engine = make_engine(settings(codec=TOPK))
    assert engine.max_message_bytes == max_sealed_bytes(LAYOUT, TOPK, N_FEATURES, 0.1)
    assert engine.limits()["max_message_bytes"] == engine.max_message_bytes
    # har-watch's, as docs/protocol.md gives them: the sparse limit is far below the dense ones.
    limits = {c: har_watch_engine(c).max_message_bytes for c in (Codec.FP32, Codec.INT8, TOPK)}
    assert limits == {Codec.FP32: 25_884, Codec.INT8: 9_591, TOPK: 5_375}


# --- refusals ---------------------------------------------------------------------------------------


def _round(engine: RoundEngine) -> RoundManifest:
    m = engine.open_round(T0).manifest
    for d in THREE[:2]:
        payload, _ = sparse_update_payload(m, delta_for(d), None, 50, 0.5, None)
        assert engine.handle(TOPICS.update(d), sealed(m, d, payload), T0 + 1).accepted
    return m


def test_a_padded_sparse_update_over_the_limit_is_too_large_and_changes_nothing() -> None:
    base, hit = make_engine(settings(codec=TOPK)), make_engine(settings(codec=TOPK))
    _round(base)
    m = _round(hit)
    spare = THREE[2]
    header, body = sparse_update_payload(m, delta_for(spare), None, 50, 0.5, None)[0]
    honest = sealed(m, spare, (header, body))
    padded = sealed(m, spare, (header, body + bytes(hit.max_message_bytes - len(honest) + 1)))
    assert len(padded) == hit.max_message_bytes + 1
    assert hit.handle(TOPICS.update(spare), padded, T0 + 2) == Outcome(False, "too_large", None)
    assert hit.state.rejected_total == {"too_large": 1}
    _same_round_as(base, hit)


def _wrong_k_extra_bitmap_bit(m: RoundManifest, delta: np.ndarray) -> bytes:
    """The honest body with one more index set in dense0/bias's bitmap (k = 1 of 4: 2 bits)."""
    body = sparse_update_payload(m, delta, None, 50, 0.5, None)[0][1]
    first = len(encode_tensors(delta[: LAYOUT[0].size], LAYOUT[:1], TOPK, 0.1))
    assert LAYOUT[1].name == "dense0/bias" and LAYOUT[1].offset == LAYOUT[0].size
    assert body[first] == 0  # the bitmap form
    bitmap = body[first + 1]
    assert bin(bitmap).count("1") == 1
    extra = next(bit for bit in range(LAYOUT[1].size) if not bitmap >> bit & 1)
    edited = bytearray(body)
    edited[first + 1] = bitmap | 1 << extra  # same length: only the count of kept values differs
    return bytes(edited)


@pytest.mark.parametrize("how", ["an extra bitmap bit", "encoded at another fraction"])
def test_an_update_with_another_number_of_kept_values_is_bad_tensor_and_nothing_is_folded(how: str) -> None:
    base, hit = make_engine(settings(codec=TOPK)), make_engine(settings(codec=TOPK))
    _round(base)
    m = _round(hit)
    spare = THREE[2]
    delta = delta_for(spare)
    header = sparse_update_payload(m, delta, None, 50, 0.5, None)[0][0]
    if how == "an extra bitmap bit":
        body = _wrong_k_extra_bitmap_bit(m, delta)
    else:
        other = replace(m, topk_fraction=0.15)
        assert topk_counts(LAYOUT, 0.15) != topk_counts(LAYOUT, 0.1)
        header, body = update_payload(other, delta, 50, 0.5, None)
    out = hit.handle(TOPICS.update(spare), sealed(m, spare, (header, body)), T0 + 2)
    assert out == Outcome(False, "bad_tensor", spare, "update")
    assert hit.state.rejected_total == {"bad_tensor": 1}
    assert hit.status(T0 + 2)["rejected_total"] == {"bad_tensor": 1}
    assert hit.status(T0 + 2)["refused"] == [spare] and hit.status(T0 + 2)["reported"] == sorted(THREE[:2])
    # Its one message for the round: the honest one after it is a duplicate, not a second chance.
    honest = sealed(m, spare, sparse_update_payload(m, delta, None, 50, 0.5, None)[0], counter=2)
    assert hit.handle(TOPICS.update(spare), honest, T0 + 3).reason == "duplicate"
    _same_round_as(base, hit, rejected={"bad_tensor": 1, "duplicate": 1})


def _same_round_as(base: RoundEngine, hit: RoundEngine, rejected: dict[str, int] | None = None) -> None:
    """Both rounds close to the same aggregate: the rejected message left no trace."""
    b, h = base.close_round(), hit.close_round()
    assert hit.state.weights.tobytes() == base.state.weights.tobytes()
    assert h.reported == b.reported == 2 and h.outcome == b.outcome == "aggregated"
    if rejected is not None:
        assert h.rejected == rejected


# --- the config ---------------------------------------------------------------------------------------

BASE = MINIMAL_AGGREGATOR_TOML


def test_the_config_takes_a_sparse_codec_and_its_fraction(tmp_path: Path) -> None:
    path = tmp_path / "aggregator.toml"
    path.write_text(BASE + '[rounds]\ncodec = "topk-fp16"\ntopk_fraction = 0.05\n')
    rounds = load_aggregator_config(path, {}).rounds
    assert (rounds.codec, rounds.topk_fraction) == (Codec.TOPK_FP16, 0.05)
    path.write_text(BASE + '[rounds]\ncodec = "topk-int8"\n')
    assert load_aggregator_config(path, {}).rounds.topk_fraction == 0.1
    for bad in ("0.0005", "0.6"):
        path.write_text(BASE + f'[rounds]\ncodec = "topk-int8"\ntopk_fraction = {bad}\n')
        with pytest.raises(ConfigError, match="topk_fraction"):
            load_aggregator_config(path, {})


@pytest.mark.parametrize(
    ("privacy", "what"),
    [
        ("enabled = true", "enabled"),
        ("secure_aggregation = true", "secure_aggregation"),
        (
            'enabled = true\nsecure_aggregation = true\nnoise = "distributed_discrete_gaussian"',
            "secure_aggregation",
        ),
    ],
)
@pytest.mark.parametrize("codec", ["topk-int8", "topk-fp16"])
def test_a_sparse_codec_with_privacy_or_secure_aggregation_is_refused(
    tmp_path: Path, privacy: str, what: str, codec: str
) -> None:
    path = tmp_path / "aggregator.toml"
    path.write_text(BASE + f'[rounds]\ncodec = "{codec}"\n[privacy]\n{privacy}\n')
    with pytest.raises(ConfigError) as caught:
        load_aggregator_config(path, {})
    assert str(caught.value) == sparse_refused(codec, what)
    # The same codec through the environment is refused the same way.
    path.write_text(BASE + f"[privacy]\n{privacy}\n")
    with pytest.raises(ConfigError) as caught:
        load_aggregator_config(path, {"FEDGE_AGGREGATOR__ROUNDS__CODEC": codec})
    assert str(caught.value) == sparse_refused(codec, what)
