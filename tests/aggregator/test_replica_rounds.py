"""A round split over a leader and workers (``[replicas]``): the same model, nothing twice.

Each test runs the same fleet twice with real NaCl keys and messages sealed as the agent seals
them: once through one engine, once with the devices' messages spread over a leader and two
workers, every work order, partial and verdict passing through its wire encoding. The split run
must end with the same weights (to float64 summation order), normalisation, counters and round
records, whatever the broker does with redeliveries.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from fedge.aggregator.partial_wire import (
    PartialWireError,
    Verdict,
    decode_partial,
    decode_verdict,
    decode_work_order,
    encode_partial,
    encode_verdict,
    encode_work_order,
    partial_key,
)
from fedge.aggregator.partials import Partial
from fedge.aggregator.replica_round import (
    ReplicaMismatch,
    WorkerBatch,
    absorb,
    follow,
    partial_of,
    take_batch,
    work_order,
)
from fedge.aggregator.round_engine import Outcome, Publication, RoundEngine, RoundRecord
from support.engine_helpers import (
    AGGREGATOR_KEY,
    DEVICE_IDS,
    FLEET,
    N_FEATURES,
    SIGNING_KEY,
    T0,
    Device,
    data_for,
    devices,
    initial_state,
    make_engine,
    settings,
)
from support.engine_helpers import P as PARAMETERS

FIVE = DEVICE_IDS[:5]
BOX = partial_key(AGGREGATOR_KEY)
VERIFY = SIGNING_KEY.verify_key


def wire_partial(partial: Partial) -> Partial:
    """A partial as the leader reads it off the broker."""
    data = encode_partial(partial, BOX, SIGNING_KEY)
    return decode_partial(data, BOX, VERIFY, FLEET, partial.worker, PARAMETERS, N_FEATURES, 100)


def wire_verdict(verdict: Verdict) -> Verdict:
    return decode_verdict(encode_verdict(verdict, SIGNING_KEY), VERIFY, FLEET, verdict.worker)


class Worker:
    """A worker's engine and its batches, driven as the worker shell drives them."""

    def __init__(self, name: str, round_settings: object = None) -> None:
        self.name = name
        self.engine = make_engine(round_settings or settings(), initial_state(normalisation=None), FIVE)  # type: ignore[arg-type]
        self.seq = 0

    def follow(self, leader: RoundEngine) -> None:
        order = work_order(leader)
        assert order is not None
        follow(self.engine, decode_work_order(encode_work_order(order, SIGNING_KEY), VERIFY, FLEET))

    def handle(self, device: Device, payload: bytes, now: float) -> Outcome:
        return self.engine.handle(device.topic, payload, now)

    def flush(self, leader: RoundEngine, now: float) -> Verdict | None:
        """Sends the batch; on a conflict folds it again without those devices and resends."""
        batch = take_batch(self.engine)
        if batch is None:
            return None
        self.seq += 1
        return self.send(leader, batch, now)

    def send(self, leader: RoundEngine, batch: WorkerBatch, now: float) -> Verdict:
        exclude: frozenset[str] = frozenset()
        while True:
            verdict = wire_verdict(
                absorb(
                    leader, wire_partial(partial_of(self.engine, batch, self.name, self.seq, exclude)), now
                )
            )
            if verdict.outcome != "conflict":
                return verdict
            exclude |= frozenset(verdict.conflicts)


def payload_for(device: Device, pub: Publication, i: int) -> bytes:
    m = pub.manifest
    if m.phase == "moments":
        return device.moments(m, data_for(device.device_id, 20 + 10 * i))
    return device.update(m, examples=50 + 10 * i, train_loss=0.1 * (i + 1))


def run_single(round_settings: object, rounds: int) -> tuple[RoundEngine, list[RoundRecord]]:
    engine = make_engine(round_settings, initial_state(normalisation=None), FIVE)  # type: ignore[arg-type]
    devs = devices(FIVE)
    records = []
    now = T0
    for _ in range(rounds + 1):  # moments, then the train rounds
        pub = engine.open_round(now)
        for i, d in enumerate(pub.manifest.selected_devices):
            assert engine.handle(devs[d].topic, payload_for(devs[d], pub, i), now + 1).accepted
        records.append(engine.close_round())
        now += 100
    return engine, records


def run_split(
    round_settings: object, rounds: int, duplicate: str | None = None
) -> tuple[RoundEngine, list[RoundRecord], list[Verdict]]:
    """Devices a, b to worker 1; c, d to worker 2; e to the leader. ``duplicate``: that device's
    message is delivered to worker 2 as well (a redelivery the broker handed to another member)."""
    leader = make_engine(round_settings, initial_state(normalisation=None), FIVE)  # type: ignore[arg-type]
    leader.partial_grace_s = 2.0
    w1, w2 = Worker("worker-1", round_settings), Worker("worker-2", round_settings)
    route = {"dev-a": w1, "dev-b": w1, "dev-c": w2, "dev-d": w2}
    devs = devices(FIVE)
    records, verdicts = [], []
    now = T0
    for _ in range(rounds + 1):
        pub = leader.open_round(now)
        w1.follow(leader)
        w2.follow(leader)
        for i, d in enumerate(pub.manifest.selected_devices):
            payload = payload_for(devs[d], pub, i)
            target = route.get(d)
            if target is None:
                assert leader.handle(devs[d].topic, payload, now + 1).accepted
            else:
                assert target.handle(devs[d], payload, now + 1).accepted
            if d == duplicate:
                w2.handle(devs[d], payload, now + 1)
        for w in (w1, w2):
            verdict = w.flush(leader, now + 1.5)
            if verdict is not None:
                verdicts.append(verdict)
        assert leader.round_due(now + 2)
        records.append(leader.close_round())
        now += 100
    return leader, records, verdicts


def comparable(record: RoundRecord) -> dict[str, object]:
    d = record.to_dict()
    for key in ("train_loss", "fed_eval_loss", "fed_eval_accuracy", "mean_update_bytes"):
        if d.get(key) is not None:
            d[key] = pytest.approx(d[key], rel=1e-9)
    return d


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_a_split_round_ends_where_one_engine_ends(strategy: str) -> None:
    s = settings(rounds=2, strategy=strategy)
    single, single_records = run_single(s, 2)
    split, split_records, verdicts = run_split(s, 2)
    assert [v.outcome for v in verdicts] == ["accepted"] * 6  # 2 workers x 3 rounds
    np.testing.assert_allclose(split.state.weights, single.state.weights, rtol=1e-6, atol=1e-7)
    assert split.state.normalisation is not None and single.state.normalisation is not None
    np.testing.assert_allclose(split.state.normalisation.mean, single.state.normalisation.mean, rtol=1e-12)
    np.testing.assert_allclose(split.state.normalisation.std, single.state.normalisation.std, rtol=1e-12)
    assert split.state.counters == single.state.counters
    assert split.state.update_norm_median == pytest.approx(single.state.update_norm_median)
    assert split.state.claim_median == single.state.claim_median
    assert [comparable(r) for r in split_records] == [comparable(r) for r in single_records]
    assert all(r.reported == 5 for r in split_records)


def test_an_update_delivered_to_two_workers_counts_once_and_the_batch_is_not_lost() -> None:
    s = settings(rounds=1)
    single, single_records = run_single(s, 1)
    split, split_records, verdicts = run_split(s, 1, duplicate="dev-a")
    # Worker 2's second partial (with dev-a's copy) met a conflict, was folded again without
    # dev-a and accepted: dev-c and dev-d are in the round, dev-a once.
    assert all(v.outcome == "accepted" for v in verdicts)
    np.testing.assert_allclose(split.state.weights, single.state.weights, rtol=1e-6, atol=1e-7)
    assert [r.reported for r in split_records] == [5, 5]
    assert [r.rejected for r in split_records] == [{"duplicate": 1}, {"duplicate": 1}]
    assert split.state.rejected_total == {"duplicate": 2}
    assert single_records[-1].examples == split_records[-1].examples


def test_a_resent_partial_whose_verdict_was_lost_is_answered_not_counted_again() -> None:
    s = settings(rounds=1)
    leader = make_engine(s, initial_state(), FIVE)
    worker = Worker("worker-1", s)
    devs = devices(FIVE)
    pub = leader.open_round(T0)
    worker.follow(leader)
    for i, d in enumerate(("dev-a", "dev-b")):
        assert worker.handle(devs[d], payload_for(devs[d], pub, i), T0 + 1).accepted
    batch = take_batch(worker.engine)
    assert batch is not None
    partial = wire_partial(partial_of(worker.engine, batch, "worker-1", 1))
    assert absorb(leader, partial, T0 + 1).outcome == "accepted"
    assert absorb(leader, partial, T0 + 1).outcome == "accepted"  # the same batch again
    assert leader.current is not None
    assert leader.current.reported == {"dev-a": 1, "dev-b": 1}
    assert leader.current.folds.metrics.examples == 50 + 60
    # A different batch carrying the same devices is a conflict, not a second count.
    again = replace(partial, batch=2)
    verdict = absorb(leader, again, T0 + 1)
    assert (verdict.outcome, verdict.conflicts) == ("conflict", ("dev-a", "dev-b"))
    assert leader.current.folds.metrics.examples == 50 + 60


def test_partials_after_the_round_or_past_the_grace_are_refused_and_count_nothing() -> None:
    s = settings(rounds=2)
    leader = make_engine(s, initial_state(), FIVE)
    leader.partial_grace_s = 2.0
    worker = Worker("worker-1", s)
    devs = devices(FIVE)
    pub = leader.open_round(T0)
    worker.follow(leader)
    assert worker.handle(devs["dev-a"], payload_for(devs["dev-a"], pub, 0), T0 + 1).accepted
    batch = take_batch(worker.engine)
    assert batch is not None
    partial = partial_of(worker.engine, batch, "worker-1", 1)
    deadline = pub.manifest.deadline
    late = absorb(leader, partial, deadline + 2.5)
    assert (late.outcome, late.reason) == ("refused", "late")
    assert leader.current is not None and leader.current.reported == {}
    assert not leader.round_due(deadline + 1.9)  # the grace: partials of in-time updates may come
    assert leader.round_due(deadline + 2.0)
    leader.close_round()
    closed = absorb(leader, partial, deadline + 0.5)
    assert (closed.outcome, closed.reason) == ("refused", "round_closed")
    assert leader.state.counters == {}


def test_a_worker_configured_otherwise_refuses_to_fold() -> None:
    leader = make_engine(settings(), initial_state(), FIVE)
    leader.open_round(T0)
    worker = Worker("worker-1", settings(weighting="examples"))
    with pytest.raises(ReplicaMismatch, match=r"weighting 'examples' \(leader: 'equal'\)"):
        worker.follow(leader)


# --- the wire -------------------------------------------------------------------------------


def leader_and_partial() -> tuple[RoundEngine, Partial]:
    """A leader's open round and a worker's partial of dev-a's update in it."""
    leader = make_engine(settings(), initial_state(), FIVE)
    worker = Worker("worker-1")
    devs = devices(FIVE)
    pub = leader.open_round(T0)
    worker.follow(leader)
    worker.handle(devs["dev-a"], payload_for(devs["dev-a"], pub, 0), T0 + 1)
    batch = take_batch(worker.engine)
    assert batch is not None
    return leader, partial_of(worker.engine, batch, "worker-1", 1)


def a_partial() -> Partial:
    return leader_and_partial()[1]


def decode(data: bytes, worker: str = "worker-1", box_key: PrivateKey = AGGREGATOR_KEY) -> Partial:
    return decode_partial(data, partial_key(box_key), VERIFY, FLEET, worker, PARAMETERS, N_FEATURES, 100)


def test_a_partial_round_trips_exactly() -> None:
    partial = a_partial()
    back = decode(encode_partial(partial, BOX, SIGNING_KEY))
    assert back.delta_sum is not None and partial.delta_sum is not None
    np.testing.assert_array_equal(back.delta_sum, partial.delta_sum)
    assert replace(back, delta_sum=None) == replace(partial, delta_sum=None)


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "signature_bad_signature"),
        (lambda d: d[: len(d) // 2], "signature_frame_length_mismatch"),
    ],
)
def test_an_altered_partial_is_refused_by_its_signature(tamper: object, reason: str) -> None:
    data = encode_partial(a_partial(), BOX, SIGNING_KEY)
    with pytest.raises(PartialWireError) as exc:
        decode(tamper(data))  # type: ignore[operator]
    assert exc.value.reason == reason


def test_a_partial_signed_by_another_key_sealed_with_another_key_or_for_another_worker_is_refused() -> None:
    partial = a_partial()
    other = SigningKey.generate()
    with pytest.raises(PartialWireError) as exc:
        decode(encode_partial(partial, BOX, other))
    assert exc.value.reason == "signature_unknown_key"
    with pytest.raises(PartialWireError) as exc:
        decode(encode_partial(partial, partial_key(PrivateKey.generate()), SIGNING_KEY))
    assert exc.value.reason == "bad_seal"
    with pytest.raises(PartialWireError) as exc:
        decode(encode_partial(partial, BOX, SIGNING_KEY), worker="worker-2")
    assert exc.value.reason == "worker_mismatch"


def test_an_oversized_partial_is_refused_before_it_is_parsed() -> None:
    with pytest.raises(PartialWireError) as exc:
        decode_partial(b"x" * 10_000_000, BOX, VERIFY, FLEET, "worker-1", PARAMETERS, N_FEATURES, 100)
    assert exc.value.reason == "too_large"


def test_an_inconsistent_partial_is_refused_and_changes_nothing() -> None:
    leader, partial = leader_and_partial()
    bad = replace(partial, raw_norms=(), clipped=0)  # one update, no norm
    verdict = absorb(leader, bad, T0 + 1)
    assert verdict.outcome == "refused" and verdict.reason.startswith("bad_partial")
    assert leader.current is not None and leader.current.reported == {}
    assert leader.current.folds.metrics.examples == 0
    assert absorb(leader, partial, T0 + 1).outcome == "accepted"
