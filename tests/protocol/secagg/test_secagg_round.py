"""Whole rounds in memory, real crypto: the unmasked sum is exactly the survivors' quantised sum.

Every message goes through its wire encoding and bounded decoding. Dropouts at each phase end
as the protocol says: excluded (before sharing), recovered (after sharing), still in the sum
(after the masked input), or an abort with a clear reason when too few are left.
"""

from __future__ import annotations

import numpy as np
import pytest
from secagg_harness import T_INPUT, T_SHARE, T_UNMASK, Fleet, arrays_in, make_config

from fedge.protocol.secagg import AggregatorPhase, RoundAborted, SecAggError, SecAggReason
from fedge.protocol.secagg.quantise import clip_to_norm


@pytest.mark.parametrize(
    ("n", "degree", "threshold"),
    [(5, None, None), (10, None, None), (40, None, None), (40, 10, 6)],
    ids=["n5-complete", "n10-complete", "n40-complete", "n40-sparse-k10"],
)
def test_a_whole_round_sums_exactly(n: int, degree: int | None, threshold: int | None) -> None:
    fleet = Fleet(make_config(n, degree=degree, threshold=threshold))
    result = fleet.run()
    ids = list(fleet.config.device_ids)
    assert result.survivors == tuple(ids)
    assert result.recovered == () and result.excluded == ()
    np.testing.assert_array_equal(result.total, fleet.expected_total(ids))
    float_sum = sum(clip_to_norm(fleet.updates[d], fleet.config.clip_norm) for d in ids)
    error = np.abs(result.dequantised(fleet.config) - float_sum)
    assert float(error.max()) < fleet.config.quantiser.error_bound(len(ids))
    assert fleet.aggregator.phase == AggregatorPhase.DONE


def test_the_sparse_graph_really_is_sparse() -> None:
    config = make_config(40, degree=10, threshold=6)
    assert all(len(config.neighbours(d)) == 10 for d in config.device_ids)


@pytest.mark.parametrize(
    ("n", "degree", "threshold"), [(10, 9, 5), (40, 12, 8)], ids=["n10-t5", "n40-k12-t8"]
)
def test_dropouts_at_every_phase_end_as_the_protocol_says(n: int, degree: int, threshold: int) -> None:
    """One device drops before each phase; with t = 5 of 9 (or 8 of 12) all four are survivable."""
    fleet = Fleet(make_config(n, degree=degree, threshold=threshold), seed=3)
    ids = list(fleet.config.device_ids)
    before_advertise, before_sharing, before_input, before_unmask = ids[0], ids[3], ids[5], ids[7]
    result = fleet.run(
        drop_before_advertise={before_advertise},
        drop_before_sharing={before_sharing},
        drop_before_input={before_input},
        drop_before_unmask={before_unmask},
    )
    survivors = [d for d in ids if d not in {before_advertise, before_sharing, before_input}]
    # The one that left after its masked input is still in the sum (its self-mask was rebuilt).
    assert before_unmask in result.survivors
    assert list(result.survivors) == survivors
    # The one that left after sharing was recovered: its pairwise masks were removed.
    assert result.recovered == (before_input,)
    # The ones that left before sharing were never in anyone's masks.
    assert result.excluded == tuple(sorted({before_advertise, before_sharing}))
    np.testing.assert_array_equal(result.total, fleet.expected_total(survivors))
    float_sum = sum(clip_to_norm(fleet.updates[d], fleet.config.clip_norm) for d in survivors)
    error = np.abs(result.dequantised(fleet.config) - float_sum)
    assert float(error.max()) < fleet.config.quantiser.error_bound(len(survivors))


def test_many_dropouts_after_sharing_are_recovered_while_t_neighbours_remain() -> None:
    fleet = Fleet(make_config(10))  # complete graph, k = 9, t = 7: two may drop
    ids = list(fleet.config.device_ids)
    result = fleet.run(drop_before_input=set(ids[:2]))
    assert result.recovered == tuple(ids[:2])
    np.testing.assert_array_equal(result.total, fleet.expected_total(ids[2:]))


def test_the_round_aborts_when_fewer_than_t_neighbours_survive() -> None:
    fleet = Fleet(make_config(10))  # t = 7: three dropped after sharing leave 6 survivors
    ids = list(fleet.config.device_ids)
    with pytest.raises(RoundAborted) as caught:
        fleet.run(drop_before_input=set(ids[:4]))
    assert caught.value.reason == SecAggReason.TOO_FEW_SURVIVORS
    assert "threshold" in str(caught.value)
    assert fleet.aggregator.phase == AggregatorPhase.ABORTED


def test_the_round_aborts_when_too_few_advertise() -> None:
    fleet = Fleet(make_config(5))  # t = 3: two advertisers are too few
    with pytest.raises(RoundAborted) as caught:
        fleet.run(drop_before_advertise=set(fleet.config.device_ids[:3]))
    assert caught.value.reason == SecAggReason.TOO_FEW_SURVIVORS


def test_the_round_aborts_when_too_few_answer_the_unmask_request() -> None:
    fleet = Fleet(make_config(10))  # t = 7: four silent at unmask leave 6 holders per secret
    ids = list(fleet.config.device_ids)
    with pytest.raises(RoundAborted) as caught:
        fleet.run(drop_before_unmask=set(ids[:4]))
    assert caught.value.reason == SecAggReason.TOO_FEW_SHARES


def test_the_aggregator_never_holds_an_individual_vector() -> None:
    """Instrumented: after every step, the only vector the aggregator holds is the running sum
    of masked inputs, which differs from every individual quantised input (and from the sum of
    any survivors until the very end)."""
    fleet = Fleet(make_config(10), seed=5)
    agg = fleet.aggregator
    inputs_seen: list[str] = []
    singles = [q for q in fleet.quantised.values()]

    def observe(step: str) -> None:
        arrays = [a for a in arrays_in(agg) if a.size > 1]
        assert len(arrays) <= 1, step
        for array in arrays:
            assert array is agg._sum
            for single in singles:
                assert not np.array_equal(array, single), step
        if step == "masked_input":
            inputs_seen.append(step)

    fleet.run(observe=observe, drop_before_input={fleet.config.device_ids[0]})
    assert len(inputs_seen) == 9


def test_a_late_message_is_refused_and_the_phase_is_due_by_its_deadline() -> None:
    fleet = Fleet(make_config(5))
    agg, device = fleet.aggregator, fleet.devices["dev-000"]
    assert not agg.due(T_SHARE - 5)
    ad = device.advertise(T_SHARE - 5)
    with pytest.raises(SecAggError) as caught:
        agg.on_advertisement(ad, T_SHARE + 1)  # past the advertise deadline
    assert caught.value.reason == SecAggReason.EXPIRED
    assert agg.refusals[SecAggReason.EXPIRED] == 1
    assert agg.due(T_SHARE)
    other = fleet.devices["dev-001"]
    with pytest.raises(SecAggError) as caught:
        other.advertise(T_UNMASK + 100)  # after the round's last deadline
    assert caught.value.reason == SecAggReason.EXPIRED


def test_every_phase_is_due_once_everyone_answered() -> None:
    fleet = Fleet(make_config(5))
    agg = fleet.aggregator
    for device in fleet.devices.values():
        assert not agg.due(T_INPUT - 25)
        agg.on_advertisement(device.advertise(T_INPUT - 25), T_INPUT - 25)
    assert agg.due(T_INPUT - 25)
