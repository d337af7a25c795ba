"""The neighbour graph (same for every party, k-regular, symmetric) and the choice of k and t."""

from __future__ import annotations

import pytest

from fedge.protocol.secagg import SecAggError, SecAggReason, choose_parameters
from fedge.protocol.secagg.graph import neighbourhoods, ring_order
from fedge.protocol.secagg.params import check_parameters, failure_bounds

IDS = [f"dev-{i:04d}" for i in range(300)]


def test_every_party_computes_the_same_regular_symmetric_graph() -> None:
    seed = b"\x01" * 32
    graph = neighbourhoods(IDS, 12, seed)
    assert graph == neighbourhoods(list(reversed(IDS)), 12, seed)  # input order does not matter
    assert all(len(neighbours) == 12 and device not in neighbours for device, neighbours in graph.items())
    assert all(device in graph[other] for device, neighbours in graph.items() for other in neighbours)
    other = neighbourhoods(IDS, 12, b"\x02" * 32)
    assert other != graph  # another public seed, another graph
    # The order is a permutation, and not the sorted one.
    order = ring_order(IDS, seed)
    assert sorted(order) == IDS and order != IDS


def test_small_fleets_use_the_complete_graph() -> None:
    graph = neighbourhoods(IDS[:6], 5, b"\x01" * 32)
    assert all(neighbours == set(IDS[:6]) - {device} for device, neighbours in graph.items())


def test_parameters_meet_the_targets_with_logarithmic_degree() -> None:
    expected = {200: (104, 73), 1000: (112, 78), 10_000: (124, 86)}
    for n, (degree, threshold) in expected.items():
        params = choose_parameters(n)
        assert (params.degree, params.threshold) == (degree, threshold)
        assert params.meets_targets and not params.complete
        assert params.security_log2 <= -40 and params.correctness_log2 <= -20
        assert 2 * params.threshold > params.degree


def test_small_fleets_get_the_complete_graph_and_a_two_thirds_threshold() -> None:
    for n, threshold in ((3, 2), (5, 3), (10, 7), (40, 27)):
        params = choose_parameters(n)
        assert params.complete and params.degree == n - 1 and params.threshold == threshold
        assert not params.meets_targets  # reported, not hidden
    assert choose_parameters(40, corrupt_fraction=0.0, dropout_rate=0.01).meets_targets


def test_failure_bounds_move_the_right_way() -> None:
    security_low, correctness_low = failure_bounds(1000, 100, 60, 0.1, 0.1)
    security_high, correctness_high = failure_bounds(1000, 100, 80, 0.1, 0.1)
    assert security_high < security_low  # a higher threshold is harder to reach for the adversary
    assert correctness_high > correctness_low  # and easier to miss by dropouts


@pytest.mark.parametrize(
    ("n", "degree", "threshold"),
    [(2, 1, 1), (10, 9, 4), (10, 9, 10), (10, 5, 3), (100, 10, 5), (100, 100, 60), (10, 9, True)],
)
def test_parameters_outside_the_protocol_are_refused(n: int, degree: int, threshold: int) -> None:
    with pytest.raises(SecAggError) as caught:
        check_parameters(n, degree, threshold)
    assert caught.value.reason == SecAggReason.BAD_PARAMETERS


def test_choosing_parameters_refuses_impossible_requests() -> None:
    for kwargs in ({"dropout_rate": 0.5}, {"corrupt_fraction": -0.1}, {"security_bits": 0}):
        with pytest.raises(SecAggError):
            choose_parameters(100, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(SecAggError):
        choose_parameters(2)
