"""The shortcuts taken on ``RoundEngine.handle``'s path for speed (issue 18) compute exactly what
the plain versions did: same values to the bit, same refusals, nothing changed on a refusal."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedge.aggregator.fedavg import AggregationError, StreamingFedAvg, WeightedMeanAccumulator
from fedge.aggregator.strategies.clipping import l2
from fedge.protocol.codec import Codec, decode_tensors, encode_tensors
from fedge.protocol.sealing import SealedHeader
from support.engine_helpers import LAYOUT, P


def test_the_sealed_header_dict_is_what_dataclasses_asdict_gives() -> None:
    header = SealedHeader("fleet-1", "dev-a", "r0003-v7", 12, "update", 7)
    assert header.to_dict() == dataclasses.asdict(header)
    assert list(header.to_dict()) == [f.name for f in dataclasses.fields(SealedHeader)]


def test_an_fp32_update_decodes_to_a_read_only_view_of_its_bytes() -> None:
    delta = np.random.default_rng(3).normal(0.0, 0.1, P).astype(np.float32)
    body = encode_tensors(delta, LAYOUT, Codec.FP32)
    out = decode_tensors(body, LAYOUT, Codec.FP32)
    assert out.dtype == np.float32 and np.array_equal(out, delta)
    assert not out.flags.writeable  # nobody downstream can change the message's bytes
    with pytest.raises(ValueError, match="read-only"):
        out[0] = 1.0


def test_the_norm_is_numpy_s_float64_norm_to_the_bit() -> None:
    rng = np.random.default_rng(4)
    for scale in (1e-3, 1.0, 1e18, 1e37):
        v = (rng.normal(0.0, 1.0, P) * scale).astype(np.float32)
        assert l2(v) == float(np.linalg.norm(v.astype(np.float64)))


@pytest.mark.parametrize("weight", [1.0, 2.5, 1e-3])
def test_the_streaming_sum_is_the_casting_multiply_to_the_bit(weight: float) -> None:
    rng = np.random.default_rng(5)
    deltas = [rng.normal(0.0, 0.01, P).astype(np.float32) for _ in range(7)]
    fold = StreamingFedAvg(P, 1000)
    expected = np.zeros(P, np.float64)
    for d in deltas:
        fold.add(d, 10, weight)
        expected += np.multiply(d, weight, dtype=np.float64)
    assert np.array_equal(fold.parts()[0], expected)
    assert fold.total_weight == pytest.approx(7 * weight)


def test_a_delta_with_nan_changes_nothing_in_the_sum() -> None:
    fold = StreamingFedAvg(P, 1000)
    fold.add(np.full(P, 0.5, np.float32), 10, 1.0)
    bad = np.full(P, 0.5, np.float32)
    bad[17] = np.nan
    with pytest.raises(AggregationError, match="delta contains NaN or infinity"):
        fold.add(bad, 10, 1.0)
    assert fold.count == 1 and np.array_equal(fold.parts()[0], np.full(P, 0.5))


def test_plus_returns_a_new_accumulator_and_leaves_this_one_as_it_was() -> None:
    acc = WeightedMeanAccumulator()
    acc.add(2.0, 1.0)
    more = acc.plus(4.0, 3.0)
    assert (acc.count, acc.mean) == (1, 2.0)
    assert (more.count, more.mean, more.total_weight) == (2, 3.5, 4.0)
    with pytest.raises(AggregationError, match="the weighted sum overflows"):
        more.plus(1e308, 1e10)
    with pytest.raises(AggregationError, match=r"weight must be > 0, got 0\.0"):
        more.plus(1.0, 0.0)
    assert (more.count, more.mean) == (2, 3.5)
