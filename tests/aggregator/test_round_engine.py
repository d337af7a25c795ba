"""The round engine: which messages count, what a round publishes, and what survives a restart.

The engine is a pure state machine, so every test drives it directly with real NaCl keys,
messages sealed the way the agent seals them (``tests/support/engine_helpers.py``) and a plain float
for the time. The central promise under test: a rejected message is counted once under a
stable reason and leaves the aggregate bit for bit as if it had never arrived. Rejection tests
therefore run the same round twice, with and without the attack, and compare the outcome.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pytest
from nacl.public import PublicKey
from nacl.signing import SigningKey

from fedge.aggregator.config import RoundSettings
from fedge.aggregator.round_engine import Outcome, Publication, RoundEngine, RoundRecord
from fedge.protocol.codec import Codec, decode_tensors, encode_tensors
from fedge.protocol.errors import FedgeError
from fedge.protocol.framing import (
    FRAME_VERSION,
    MAGIC,
    MAX_HEADER_BYTES,
    FrameKind,
    decode_frame,
    encode_frame,
)
from fedge.protocol.messages import Evaluation, encode_moments, max_sealed_bytes
from fedge.protocol.model_manifest import normalisation_from_moments
from fedge.protocol.round_manifest import RoundManifest, round_manifest_from_dict
from fedge.protocol.signing import DocType, SignatureError, key_id, verify_document
from fedge.protocol.weights import weights_to_bytes
from support.engine_helpers import (
    AGGREGATOR_KEY,
    DEVICE_IDS,
    DEVICE_KEYS,
    FLEET,
    INITIAL_WEIGHTS,
    LAYOUT,
    MODEL_BYTES,
    N_FEATURES,
    NORMALISATION,
    OTHER_AGGREGATOR_KEY,
    SIGNING_KEY,
    T0,
    TOPICS,
    Device,
    data_for,
    delta_for,
    devices,
    fedavg_oracle,
    initial_state,
    make_engine,
    plain_fedavg,
    plain_fedavg_engine,
    raw_payload_frame,
    seal_inner,
    settings,
)

THREE = DEVICE_IDS[:3]
FIVE = DEVICE_IDS[:5]
TRUSTED = {key_id(SIGNING_KEY.verify_key): SIGNING_KEY.verify_key}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def send(engine: RoundEngine, device: Device, payload: bytes, now: float) -> Outcome:
    return engine.handle(device.topic, payload, now)


def report_all(engine: RoundEngine, pub: Publication, devs: dict[str, Device], now: float) -> None:
    """Every selected device sends what the agent would: moments or an update."""
    m = pub.manifest
    for i, d in enumerate(m.selected_devices):
        if m.phase == "moments":
            payload = devs[d].moments(m, data_for(d, 20 + 10 * i))
        else:
            payload = devs[d].update(m, examples=50 + 10 * i)
        outcome = send(engine, devs[d], payload, now)
        assert outcome == Outcome(True, "accepted", d, "update" if m.phase == "train" else "moments")


# --- open_round: the signed manifest and its chain ---------------------------------------------


def full_run(rounds: int = 2) -> tuple[RoundEngine, list[Publication], list[RoundRecord]]:
    """moments -> ``rounds`` train rounds -> final, every device reporting every time."""
    engine = make_engine(settings(rounds=rounds), initial_state(normalisation=None))
    devs = devices(THREE)
    pubs, records = [], []
    now = T0
    while True:
        pub = engine.open_round(now)
        pubs.append(pub)
        if pub.manifest.phase == "final":
            return engine, pubs, records
        report_all(engine, pub, devs, now + 1)
        records.append(engine.close_round())
        now += 100


def test_manifest_is_signed_by_the_signing_key_and_parses_as_devices_parse_it() -> None:
    _, pubs, _ = full_run()
    for pub in pubs:
        doc, kid = verify_document(pub.manifest_frame, DocType.ROUND_MANIFEST, TRUSTED)
        assert kid == key_id(SIGNING_KEY.verify_key)
        assert doc == pub.manifest.to_dict()
        assert round_manifest_from_dict(doc) == pub.manifest
    other = SigningKey.generate().verify_key
    with pytest.raises(SignatureError) as excinfo:
        verify_document(pubs[0].manifest_frame, DocType.ROUND_MANIFEST, {key_id(other): other})
    assert excinfo.value.reason == "unknown_key"
    with pytest.raises(SignatureError) as excinfo:
        verify_document(pubs[0].manifest_frame, "aggregator-status", TRUSTED)
    assert excinfo.value.reason == "bad_header"


def test_phases_go_moments_then_train_rounds_then_final() -> None:
    engine, pubs, records = full_run(rounds=2)
    m = [p.manifest for p in pubs]
    assert [x.phase for x in m] == ["moments", "train", "train", "final"]
    assert [x.round_number for x in m] == [1, 1, 2, 2]
    assert [x.round_id for x in m] == ["m-v1", "r0001-v2", "r0002-v3", "final-v4"]
    assert [r.phase for r in records] == ["moments", "train", "train"]
    assert [r.outcome for r in records] == ["aggregated"] * 3
    assert m[0].normalisation is None
    assert m[1].normalisation == m[2].normalisation == m[3].normalisation == engine.state.normalisation
    final = m[3]
    assert final.selected_devices == ()
    assert final.deadline == final.issued_at
    assert final.expires_at == final.issued_at + settings().manifest_ttl_s
    assert engine.current is None and engine.done and engine.phase == "final"
    assert not engine.round_due(T0 + 10_000)
    for x in m[:3]:
        assert x.deadline == x.issued_at + settings().round_timeout_s
        assert x.expires_at == x.deadline + settings().manifest_ttl_s
        assert x.fleet == FLEET and x.min_devices == 2 and x.codec is Codec.FP32


def test_versions_increase_by_one_and_parents_chain_and_round_ids_are_unique() -> None:
    _, pubs, _ = full_run(rounds=3)
    m = [p.manifest for p in pubs]
    assert [x.version for x in m] == list(range(1, len(m) + 1))
    assert m[0].parent_sha256 == ""
    for prev, nxt in itertools.pairwise(m):
        assert nxt.parent_sha256 == prev.sha256()
    assert len({x.round_id for x in m}) == len(m)
    # Opening again after the final manifest still moves the chain forward.
    engine, pubs, _ = full_run(rounds=1)
    again = engine.open_round(T0 + 10_000)
    assert again.manifest.version == pubs[-1].manifest.version + 1
    assert again.manifest.parent_sha256 == pubs[-1].manifest.sha256()
    assert again.manifest.round_id != pubs[-1].manifest.round_id


def test_blobs_are_the_model_and_the_current_weights_under_their_sha256_topics() -> None:
    engine, pubs, _ = full_run(rounds=2)
    weights_seen = []
    for i, pub in enumerate(pubs):
        m = pub.manifest
        # The model blob is retained and never changes: published with the first manifest only.
        model_topic = {TOPICS.blob(sha(MODEL_BYTES))} if i == 0 else set()
        assert set(pub.blobs) == model_topic | {TOPICS.blob(m.weights_sha256)}
        if i == 0:
            assert pub.blobs[TOPICS.blob(sha(MODEL_BYTES))] == MODEL_BYTES
        weights = pub.blobs[TOPICS.blob(m.weights_sha256)]
        assert sha(weights) == m.weights_sha256
        assert len(weights) == m.weights_bytes == 4 * m.model_manifest.parameter_count
        assert m.model_sha256 == sha(MODEL_BYTES) and m.model_bytes == len(MODEL_BYTES)
        weights_seen.append(weights)
    assert weights_seen[0] == weights_seen[1] == weights_to_bytes(INITIAL_WEIGHTS)  # moments: no change
    assert weights_seen[-1] == weights_to_bytes(engine.state.weights)
    assert len(set(weights_seen[1:])) == 3  # every train round changed the model


def test_clear_blobs_names_the_previous_weights_blob_once_the_weights_changed() -> None:
    engine = make_engine(settings(rounds=2), initial_state(normalisation=None))
    devs = devices(THREE)
    p1 = engine.open_round(T0)
    assert p1.clear_blobs == ()
    report_all(engine, p1, devs, T0 + 1)
    engine.close_round()  # moments: the weights stay
    p2 = engine.open_round(T0 + 100)
    assert p2.manifest.weights_sha256 == p1.manifest.weights_sha256
    assert p2.clear_blobs == ()
    report_all(engine, p2, devs, T0 + 101)
    engine.close_round()  # train: new weights
    p3 = engine.open_round(T0 + 200)
    assert p3.manifest.weights_sha256 != p2.manifest.weights_sha256
    assert p3.clear_blobs == (TOPICS.blob(p2.manifest.weights_sha256),)
    assert TOPICS.blob(p3.manifest.weights_sha256) in p3.blobs
    engine.close_round()  # nobody reported: aborted, the weights stay
    p4 = engine.open_round(T0 + 300)
    assert p4.manifest.weights_sha256 == p3.manifest.weights_sha256
    assert p4.clear_blobs == ()


def test_every_enrolled_device_is_selected_when_devices_per_round_is_0_or_at_least_the_fleet() -> None:
    for k in (0, 5, 9):
        engine = make_engine(settings(devices_per_round=k), devices=FIVE)
        assert engine.open_round(T0).manifest.selected_devices == tuple(sorted(FIVE))


def test_a_seeded_subset_is_selected_deterministically_per_version() -> None:
    s = settings(devices_per_round=3)
    a, b = make_engine(s, devices=FIVE), make_engine(s, devices=FIVE)
    other_seed = make_engine(replace(s, selection_seed=8), devices=FIVE)
    picks = [a.select_devices(v) for v in range(1, 41)]
    for v, pick in enumerate(picks, start=1):
        assert len(pick) == 3 and len(set(pick)) == 3
        assert set(pick) <= set(FIVE) and list(pick) == sorted(pick)
        assert b.select_devices(v) == pick  # same seed, same version, same devices
    assert len(set(picks)) > 1  # the choice moves with the version...
    assert set().union(*picks) == set(FIVE)  # ...and every device gets its turn
    assert [other_seed.select_devices(v) for v in range(1, 41)] != picks
    # The published round uses the selection of its own version.
    for _ in range(4):
        pub = a.open_round(T0)
        assert pub.manifest.selected_devices == picks[pub.manifest.version - 1]
        a.close_round()


# --- moments phase ---------------------------------------------------------------------------


def test_moments_give_the_normalisation_of_the_pooled_data() -> None:
    engine = make_engine(settings(moments_aggregation="pooled"), initial_state(normalisation=None))
    devs = devices(THREE)
    pub = engine.open_round(T0)
    assert pub.manifest.phase == "moments"
    xs = {d: data_for(d, n) for d, n in zip(THREE, (17, 40, 93), strict=True)}
    xs["dev-b"][:, 5] = 3.25  # a constant feature everywhere but one device
    for d, x in xs.items():
        assert send(engine, devs[d], devs[d].moments(pub.manifest, x), T0 + 1).accepted
    record = engine.close_round()

    pooled = np.concatenate(list(xs.values()))
    norm = engine.state.normalisation
    assert norm is not None
    np.testing.assert_allclose(norm.mean, pooled.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(norm.std, np.maximum(pooled.std(axis=0), 1e-6), rtol=1e-9)
    oracle = normalisation_from_moments(
        pooled.shape[0], pooled.sum(axis=0).tolist(), (pooled * pooled).sum(axis=0).tolist()
    )
    np.testing.assert_allclose(norm.mean, oracle.mean, rtol=1e-12)
    np.testing.assert_allclose(norm.std, oracle.std, rtol=1e-9)
    assert record.phase == "moments" and record.outcome == "aggregated"
    assert (record.reported, record.selected, record.examples) == (3, 3, 150)
    assert record.train_loss is None and record.fed_eval_loss is None and record.fed_eval_examples == 0
    assert engine.state.completed_rounds == 0
    assert np.array_equal(engine.state.weights, INITIAL_WEIGHTS)
    nxt = engine.open_round(T0 + 100).manifest
    assert nxt.phase == "train" and nxt.normalisation == norm and nxt.round_number == 1


def test_a_constant_feature_gets_the_minimum_std() -> None:
    engine = make_engine(settings(), initial_state(normalisation=None))
    devs = devices(THREE)
    pub = engine.open_round(T0)
    for d in THREE[:2]:
        x = data_for(d, 30)
        x[:, 0] = -7.5
        assert send(engine, devs[d], devs[d].moments(pub.manifest, x), T0 + 1).accepted
    engine.close_round()
    assert engine.state.normalisation is not None
    assert engine.state.normalisation.mean[0] == -7.5
    assert engine.state.normalisation.std[0] == 1e-6


# --- train phase -----------------------------------------------------------------------------


def test_fedavg_is_global_plus_server_lr_times_the_example_weighted_mean_delta() -> None:
    lr = 0.75
    engine = plain_fedavg_engine(server_learning_rate=lr)
    devs = devices(THREE)
    pub = engine.open_round(T0)
    m = pub.manifest
    deltas = [delta_for(d, 1, scale=0.05 * (i + 1)) for i, d in enumerate(THREE)]
    examples = [12, 100, 37]
    losses = [0.9, 0.4, 1.3]
    evaluations = [Evaluation(8, 1.1, 0.5, None), Evaluation(24, 0.6, 0.875, None), None]
    sizes = []
    for d, delta, n, loss, ev in zip(THREE, deltas, examples, losses, evaluations, strict=True):
        payload = devs[d].update(m, delta, examples=n, train_loss=loss, evaluation=ev)
        sizes.append(len(payload))
        assert not engine.round_due(T0 + 1)
        assert send(engine, devs[d], payload, T0 + 1) == Outcome(True, "accepted", d, "update")
    assert engine.round_due(T0 + 1)
    record = engine.close_round()

    expected = fedavg_oracle(INITIAL_WEIGHTS, deltas, examples, lr)
    assert engine.state.weights.dtype == np.float32
    np.testing.assert_allclose(engine.state.weights, expected, rtol=0, atol=1e-6)
    assert not np.array_equal(engine.state.weights, INITIAL_WEIGHTS)
    assert engine.state.completed_rounds == 1
    assert engine.state.counters == {d: 1 for d in THREE}
    assert record == RoundRecord(
        round_number=1,
        round_id=m.round_id,
        phase="train",
        outcome="aggregated",
        version=m.version,
        selected=3,
        reported=3,
        examples=149,
        train_loss=pytest.approx((12 * 0.9 + 100 * 0.4 + 37 * 1.3) / 149, rel=1e-12),
        fed_eval_loss=pytest.approx((8 * 1.1 + 24 * 0.6) / 32, rel=1e-12),
        fed_eval_accuracy=pytest.approx((8 * 0.5 + 24 * 0.875) / 32, rel=1e-12),
        fed_eval_examples=32,
        mean_update_bytes=pytest.approx(sum(sizes) / 3),
        rejected={},
        weighting="examples",
        weight_cap=1000.0 * 1e9,
    )
    assert engine.state.history == [record.to_dict()]
    # The next manifest publishes exactly these weights.
    nxt = engine.open_round(T0 + 100)
    assert nxt.blobs[TOPICS.blob(nxt.manifest.weights_sha256)] == weights_to_bytes(engine.state.weights)
    assert nxt.manifest.round_number == 2


def test_accuracy_is_weighted_only_over_evaluations_that_report_one() -> None:
    engine = make_engine()
    devs = devices(THREE)
    m = engine.open_round(T0).manifest
    evs = [Evaluation(10, 2.0, 0.2, None), Evaluation(30, 1.0, None, 0.5), Evaluation(60, 0.5, 0.9, None)]
    for d, ev in zip(THREE, evs, strict=True):
        assert send(engine, devs[d], devs[d].update(m, evaluation=ev), T0 + 1).accepted
    r = engine.close_round()
    assert r.fed_eval_examples == 100
    assert r.fed_eval_loss == pytest.approx((20 + 30 + 30) / 100, rel=1e-12)
    assert r.fed_eval_accuracy == pytest.approx((10 * 0.2 + 60 * 0.9) / 70, rel=1e-12)


@pytest.mark.parametrize("codec", [Codec.FP16, Codec.INT8])
def test_a_round_that_asks_for_a_compressed_codec_aggregates_the_decoded_deltas(codec: Codec) -> None:
    engine = plain_fedavg_engine(codec=codec)
    devs = devices(THREE)
    m = engine.open_round(T0).manifest
    assert m.codec is codec
    deltas = [delta_for(d, 1, scale=0.02) for d in THREE]
    examples = [5, 50, 500]
    sizes = set()
    for d, delta, n in zip(THREE, deltas, examples, strict=True):
        payload = devs[d].update(m, delta, examples=n)
        sizes.add(len(payload))
        assert send(engine, devs[d], payload, T0 + 1).accepted
    engine.close_round()
    decoded = [decode_tensors(encode_tensors(d, LAYOUT, codec), LAYOUT, codec) for d in deltas]
    np.testing.assert_allclose(
        engine.state.weights, fedavg_oracle(INITIAL_WEIGHTS, decoded, examples, 1.0), atol=1e-6
    )
    # And the compression is what was aggregated (not some fp32 shortcut): the exact fp32
    # result differs by more than float rounding.
    exact = fedavg_oracle(INITIAL_WEIGHTS, deltas, examples, 1.0)
    assert float(np.max(np.abs(engine.state.weights - exact))) > 1e-6
    assert max(sizes) < 4 * m.model_manifest.parameter_count  # smaller than an fp32 delta


def test_the_example_limit_itself_is_accepted() -> None:
    engine = make_engine(settings(max_examples_per_update=1000))
    devs = devices(THREE)
    m = engine.open_round(T0).manifest
    assert send(engine, devs["dev-a"], devs["dev-a"].update(m, examples=1000), T0 + 1).accepted
    assert send(engine, devs["dev-b"], devs["dev-b"].update(m, examples=1), T0 + 1).accepted
    assert engine.close_round().examples == 1001


# --- round_due, deadline and abort -----------------------------------------------------------


def test_round_due_waits_for_every_selected_device_or_the_deadline() -> None:
    engine = make_engine()
    assert not engine.round_due(T0)  # nothing open
    devs = devices(THREE)
    m = engine.open_round(T0).manifest
    deadline = m.deadline
    assert not engine.round_due(T0)
    for d in THREE[:2]:
        assert send(engine, devs[d], devs[d].update(m), T0 + 1).accepted
        assert not engine.round_due(T0 + 1)
    assert not engine.round_due(math.nextafter(deadline, 0.0))
    assert engine.round_due(deadline)
    assert engine.round_due(deadline + 1e6)
    assert send(engine, devs["dev-c"], devs["dev-c"].update(m), T0 + 2).accepted
    assert engine.round_due(T0 + 2)  # everyone reported: no need to wait
    engine.close_round()
    assert not engine.round_due(deadline + 1)


def test_round_due_with_a_subset_counts_only_the_selected_devices() -> None:
    engine = make_engine(settings(devices_per_round=2), devices=FIVE)
    devs = devices(FIVE)
    m = engine.open_round(T0).manifest
    first, second = m.selected_devices
    assert send(engine, devs[first], devs[first].update(m), T0 + 1).accepted
    assert not engine.round_due(T0 + 1)
    assert send(engine, devs[second], devs[second].update(m), T0 + 1).accepted
    assert engine.round_due(T0 + 1)


def test_a_message_at_the_deadline_counts_and_one_just_after_is_late() -> None:
    engine = make_engine()
    devs = devices(THREE)
    m = engine.open_round(T0).manifest
    assert send(engine, devs["dev-a"], devs["dev-a"].update(m), m.deadline).accepted
    late = send(engine, devs["dev-b"], devs["dev-b"].update(m), math.nextafter(m.deadline, math.inf))
    assert late == Outcome(False, "late", "dev-b", "update")


def test_too_few_devices_at_the_deadline_abort_and_the_same_round_is_announced_again() -> None:
    engine = make_engine(settings(min_devices=2))
    devs = devices(THREE)
    pub = engine.open_round(T0)
    m = pub.manifest
    assert send(engine, devs["dev-b"], devs["dev-b"].update(m, examples=80), T0 + 1).accepted
    assert not engine.round_due(T0 + 1)
    assert engine.round_due(m.deadline)
    record = engine.close_round()
    assert record.outcome == "aborted" and record.reported == 1 and record.selected == 3
    assert record.round_number == 1 and record.round_id == m.round_id
    assert engine.state.weights.tobytes() == INITIAL_WEIGHTS.tobytes()
    assert engine.state.completed_rounds == 0
    assert engine.state.counters == {"dev-b": 1}  # an authentic counter is never reusable
    again = engine.open_round(m.deadline + 1)
    a = again.manifest
    assert a.phase == "train" and a.round_number == m.round_number
    assert a.version == m.version + 1 and a.round_id != m.round_id and a.round_id == "r0001-v2"
    assert a.weights_sha256 == m.weights_sha256 and again.clear_blobs == ()
    # The aborted round's messages do not count in the new one.
    old = devs["dev-a"].update(m)
    assert send(engine, devs["dev-a"], old, a.issued_at + 1) == Outcome(
        False, "wrong_round", "dev-a", "update"
    )
    stale = devs["dev-b"].update(a, counter=1)
    assert send(engine, devs["dev-b"], stale, a.issued_at + 1).reason == "replayed_counter"


def test_an_aborted_moments_round_keeps_no_normalisation_and_asks_for_moments_again() -> None:
    engine = make_engine(settings(min_devices=2), initial_state(normalisation=None))
    devs = devices(THREE)
    m = engine.open_round(T0).manifest
    assert send(engine, devs["dev-a"], devs["dev-a"].moments(m, data_for("dev-a", 30)), T0 + 1).accepted
    record = engine.close_round()
    assert record.outcome == "aborted" and record.phase == "moments"
    assert engine.state.normalisation is None
    again = engine.open_round(T0 + 100).manifest
    assert again.phase == "moments" and again.round_id == "m-v2" and again.normalisation is None


# --- rejections: each reason, counted once, without a trace in the aggregate ----------------


@dataclass
class Ctx:
    """The round an attack happens in: two honest devices reported, ``spare`` has not."""

    engine: RoundEngine
    manifest: RoundManifest
    devs: dict[str, Device]
    honest: tuple[str, ...]
    spare: str
    outsider: str | None
    earlier: dict[str, bytes]  # each device's accepted message of the previous round
    sent: dict[str, bytes] = field(default_factory=dict)  # honest messages of this round

    @property
    def now(self) -> float:
        return float(self.manifest.issued_at) + 2.0

    def dev(self, device_id: str) -> Device:
        return self.devs[device_id]

    def send(self, device_id: str, payload: bytes, now: float | None = None) -> Outcome:
        return self.engine.handle(TOPICS.update(device_id), payload, self.now if now is None else now)


Attack = Callable[[Ctx], Outcome]


@dataclass
class Run:
    engine: RoundEngine
    record: RoundRecord
    outcome: Outcome | None


def run_round(
    attack: Attack | None,
    *,
    round_settings: RoundSettings | None = None,
    ids: tuple[str, ...] = THREE,
    moments: bool = False,
) -> Run:
    """Round 1 with every device (train only), then the measured round with two honest
    devices and the attack; returns the engine after closing the measured round."""
    s = round_settings or settings()
    engine = make_engine(s, initial_state(normalisation=None if moments else NORMALISATION), devices=ids)
    devs = devices(ids)
    earlier: dict[str, bytes] = {}
    if not moments:
        m1 = engine.open_round(T0).manifest
        for d in m1.selected_devices:
            earlier[d] = devs[d].update(m1, examples=50)
            assert send(engine, devs[d], earlier[d], T0 + 1).accepted
        assert engine.close_round().outcome == "aggregated"
    m = engine.open_round(T0 + 100).manifest
    honest, spare = m.selected_devices[:2], m.selected_devices[2]
    outsider = next((d for d in ids if d not in m.selected_devices), None)
    ctx = Ctx(engine, m, devs, honest, spare, outsider, earlier)
    for i, d in enumerate(honest):
        if moments:
            payload = devs[d].moments(m, data_for(d, 30 + 20 * i))
        else:
            ev = Evaluation(10 + 10 * i, 0.9 - 0.2 * i, 0.6 + 0.2 * i, None)
            payload = devs[d].update(m, examples=40 + 30 * i, train_loss=0.5 - 0.1 * i, evaluation=ev)
        ctx.sent[d] = payload
        assert send(engine, devs[d], payload, m.issued_at + 1).accepted
    outcome = attack(ctx) if attack else None
    return Run(engine, engine.close_round(), outcome)


def assert_same_aggregate(base: Run, hit: Run) -> None:
    """The attack left no trace in the aggregate. One thing may differ, by design: a message
    that authenticated (opened with the device's key) used up that device's slot in the round,
    so its counter is consumed (``spent``) even though its content was refused."""
    assert hit.engine.state.weights.tobytes() == base.engine.state.weights.tobytes()
    assert hit.engine.state.normalisation == base.engine.state.normalisation
    assert hit.engine.state.completed_rounds == base.engine.state.completed_rounds
    hit_counters = dict(hit.engine.state.counters)
    if hit.record.spent:
        assert hit.record.spent == 1
        (spender,) = [d for d in hit_counters if hit_counters[d] != base.engine.state.counters.get(d)]
        assert hit_counters[spender] > base.engine.state.counters.get(spender, -1)
        if spender in base.engine.state.counters:
            hit_counters[spender] = base.engine.state.counters[spender]
        else:
            del hit_counters[spender]
    assert hit_counters == base.engine.state.counters
    assert hit.engine.state.version == base.engine.state.version
    assert hit.engine.current is None and base.engine.current is None
    b, h = base.record.to_dict(), hit.record.to_dict()
    assert b.pop("rejected") == {}
    h.pop("rejected")
    assert b.pop("spent") == 0
    h.pop("spent")
    assert h == b


def assert_rejected_without_trace(attack: Attack, reason: str, **kw: Any) -> Run:
    base = run_round(None, **kw)
    hit = run_round(attack, **kw)
    assert hit.outcome is not None
    assert (hit.outcome.accepted, hit.outcome.reason) == (False, reason)
    assert_same_aggregate(base, hit)
    assert hit.record.rejected == {reason: 1}
    assert hit.engine.state.rejected_total == {reason: 1}
    assert base.engine.state.rejected_total == {}
    assert base.record.outcome == "aggregated"
    return hit


def test_the_harness_aggregates_the_honest_devices() -> None:
    base = run_round(None)
    assert base.record.reported == 2 and base.record.outcome == "aggregated"
    assert base.record.examples == 40 + 70
    assert not np.array_equal(base.engine.state.weights, INITIAL_WEIGHTS)
    moments = run_round(None, moments=True)
    assert moments.engine.state.normalisation is not None and moments.record.examples == 80


# The bytes of a sealed update from the spare device, built per attack.
def spare_update(ctx: Ctx, **kw: Any) -> bytes:
    return ctx.dev(ctx.spare).update(ctx.manifest, **kw)


def frame_bytes(
    header: bytes = b"{}",
    body: bytes = b"",
    *,
    magic: bytes = MAGIC,
    version: int = FRAME_VERSION,
    kind: int = int(FrameKind.SEALED),
    reserved: int = 0,
    header_len: int | None = None,
    body_len: int | None = None,
) -> bytes:
    hl = len(header) if header_len is None else header_len
    bl = len(body) if body_len is None else body_len
    return struct.pack(">4sBBHII", magic, version, kind, reserved, hl, bl) + header + body


def _spare_header_json(ctx: Ctx) -> bytes:
    return json.dumps(ctx.dev(ctx.spare).header(ctx.manifest, "update").to_dict()).encode()


FRAME_ATTACKS: dict[str, tuple[Callable[[Ctx], bytes], str]] = {
    "empty": (lambda c: b"", "frame_truncated"),
    "short prefix": (lambda c: MAGIC + b"\x01\x01", "frame_truncated"),
    "text": (lambda c: b"GET / HTTP/1.1\r\nHost: example\r\n\r\n", "frame_bad_magic"),
    "random bytes": (lambda c: np.random.default_rng(5).bytes(500), "frame_bad_magic"),
    "frame version 2": (
        lambda c: frame_bytes(_spare_header_json(c), bytes(40), version=2),
        "frame_unsupported_version",
    ),
    "signed frame": (lambda c: frame_bytes(b"{}", bytes(80), kind=int(FrameKind.SIGNED)), "frame_wrong_kind"),
    "payload frame": (lambda c: frame_bytes(b"{}", b"", kind=int(FrameKind.PAYLOAD)), "frame_wrong_kind"),
    "reserved bits": (
        lambda c: frame_bytes(_spare_header_json(c), bytes(40), reserved=1),
        "frame_bad_reserved",
    ),
    "huge header": (lambda c: frame_bytes(b"{}", header_len=MAX_HEADER_BYTES + 1), "frame_header_too_large"),
    "huge body": (lambda c: frame_bytes(b"{}", body_len=2**32 - 1), "frame_body_too_large"),
    "cut short": (lambda c: spare_update(c)[:-1], "frame_length_mismatch"),
    "trailing byte": (lambda c: spare_update(c) + b"\x00", "frame_length_mismatch"),
    "header not json": (lambda c: frame_bytes(b"{not json", bytes(40)), "frame_bad_header"),
    "header a list": (lambda c: frame_bytes(b"[1, 2]", bytes(40)), "frame_bad_header"),
    "header NaN": (lambda c: frame_bytes(b'{"counter": NaN}', bytes(40)), "frame_bad_header"),
    "header not utf-8": (lambda c: frame_bytes(b'{"a": "\xff"}', bytes(40)), "frame_bad_header"),
    "sealed header missing fields": (lambda c: frame_bytes(b'{"fleet": "fleet-1"}', bytes(40)), "bad_header"),
    "sealed header bad device id": (
        lambda c: frame_bytes(_spare_header_json(c).replace(c.spare.encode(), b"dev/+"), bytes(40)),
        "bad_header",
    ),
    "no ciphertext": (lambda c: frame_bytes(_spare_header_json(c), bytes(39)), "truncated"),
}


@pytest.mark.parametrize("name", list(FRAME_ATTACKS))
def test_malformed_frames_are_rejected_with_their_frame_reason(name: str) -> None:
    make, reason = FRAME_ATTACKS[name]
    hit = assert_rejected_without_trace(lambda c: c.send(c.spare, make(c)), reason)
    assert hit.outcome is not None and hit.outcome.device_id == "dev-c"  # named by the topic


@pytest.mark.parametrize("size", ["garbage", "sealed"])
def test_a_message_over_the_size_limit_is_too_large(size: str) -> None:
    limit = make_engine(settings()).max_message_bytes  # derived from the model by default

    def attack(c: Ctx) -> Outcome:
        if size == "garbage":
            payload = bytes(limit + 1)
        else:
            header = c.dev(c.spare).header(c.manifest, "update")
            payload = c.dev(c.spare).seal_payload(header, {"codec": "fp32"}, bytes(limit))
        assert len(payload) > limit
        return c.send(c.spare, payload)

    hit = assert_rejected_without_trace(attack, "too_large")
    assert hit.outcome == Outcome(False, "too_large", None)


@pytest.mark.parametrize(
    "topic",
    [
        "fedge/v1/fleet-2/update/dev-c",
        "fedge/v1/fleet-1/status/dev-c",
        "fedge/v1/fleet-1/update/dev-c/extra",
        "fedge/v1/fleet-1/update/+",
        "fedge/v1/fleet-1/update/",
        "fedge/v1/fleet-1/update/#",
        "fedge/v2/fleet-1/update/dev-c",
        "",
    ],
)
def test_a_message_on_a_topic_that_is_not_an_update_topic_is_bad_topic(topic: str) -> None:
    def attack(c: Ctx) -> Outcome:
        return c.engine.handle(topic, spare_update(c), c.now)

    hit = assert_rejected_without_trace(attack, "bad_topic")
    assert hit.outcome == Outcome(False, "bad_topic", None)


def test_a_header_naming_another_device_than_the_topic_is_device_mismatch() -> None:
    # dev-a's genuine update re-published on dev-c's topic, and the other way round.
    def on_spare_topic(c: Ctx) -> Outcome:
        return c.send(c.spare, c.dev("dev-a").update(c.manifest))

    hit = assert_rejected_without_trace(on_spare_topic, "device_mismatch")
    assert hit.outcome == Outcome(False, "device_mismatch", "dev-c", "update")
    assert_rejected_without_trace(lambda c: c.send("dev-a", spare_update(c)), "device_mismatch")


def test_a_message_for_another_fleet_is_wrong_fleet() -> None:
    assert_rejected_without_trace(lambda c: c.send(c.spare, spare_update(c, fleet="fleet-2")), "wrong_fleet")


def test_a_device_that_is_not_enrolled_is_unknown_device() -> None:
    def attack(c: Ctx) -> Outcome:
        intruder = Device("dev-d")  # a real key, just not in this registry
        return c.send("dev-d", intruder.update(c.manifest))

    hit = assert_rejected_without_trace(attack, "unknown_device")
    assert hit.outcome == Outcome(False, "unknown_device", "dev-d", "update")


@pytest.mark.parametrize("which", ["previous round replayed", "a round that never existed"])
def test_a_message_for_another_round_is_wrong_round(which: str) -> None:
    def attack(c: Ctx) -> Outcome:
        if which == "previous round replayed":
            return c.send(c.spare, c.earlier[c.spare])
        return c.send(c.spare, spare_update(c, round_id="r0009-v9"))

    assert_rejected_without_trace(attack, "wrong_round")


def test_a_message_after_the_deadline_is_late() -> None:
    def attack(c: Ctx) -> Outcome:
        return c.send(c.spare, spare_update(c), now=c.manifest.deadline + 0.001)

    assert_rejected_without_trace(attack, "late")


@pytest.mark.parametrize("offset", [1, -1])
def test_a_message_for_another_model_version_is_wrong_version(offset: int) -> None:
    def attack(c: Ctx) -> Outcome:
        return c.send(c.spare, spare_update(c, model_version=c.manifest.version + offset))

    assert_rejected_without_trace(attack, "wrong_version")


def test_a_device_that_was_not_selected_is_not_selected() -> None:
    def attack(c: Ctx) -> Outcome:
        assert c.outsider is not None
        return c.send(c.outsider, c.dev(c.outsider).update(c.manifest))

    s = settings(devices_per_round=3)
    hit = assert_rejected_without_trace(attack, "not_selected", round_settings=s, ids=FIVE)
    assert hit.record.selected == 3


def test_moments_in_a_train_round_are_wrong_kind() -> None:
    def attack(c: Ctx) -> Outcome:
        return c.send(c.spare, c.dev(c.spare).moments(c.manifest, data_for(c.spare, 10)))

    hit = assert_rejected_without_trace(attack, "wrong_kind")
    assert hit.outcome == Outcome(False, "wrong_kind", "dev-c", "moments")


def test_an_update_in_a_moments_round_is_wrong_kind() -> None:
    assert_rejected_without_trace(lambda c: c.send(c.spare, spare_update(c)), "wrong_kind", moments=True)


@pytest.mark.parametrize("which", ["the same bytes again", "a second, different update"])
def test_a_second_message_from_a_device_in_one_round_is_duplicate(which: str) -> None:
    def attack(c: Ctx) -> Outcome:
        first = c.honest[0]
        if which == "the same bytes again":
            return c.send(first, c.sent[first])
        other = c.dev(first).update(c.manifest, delta_for(first, 77, scale=1.0), examples=5000)
        return c.send(first, other)

    assert_rejected_without_trace(attack, "duplicate")


def test_second_moments_from_a_device_are_duplicate() -> None:
    def attack(c: Ctx) -> Outcome:
        first = c.honest[0]
        return c.send(first, c.dev(first).moments(c.manifest, data_for(first, 500) * 100))

    assert_rejected_without_trace(attack, "duplicate", moments=True)


@pytest.mark.parametrize("counter", [1, 0])
def test_a_counter_not_above_the_last_accepted_one_is_replayed_counter(counter: int) -> None:
    # dev-c's round-1 update was accepted with counter 1; a correctly sealed message for this
    # round that reuses it (or goes lower) is refused before decryption.
    def attack(c: Ctx) -> Outcome:
        assert c.engine.state.counters[c.spare] == 1
        return c.send(c.spare, spare_update(c, counter=counter))

    assert_rejected_without_trace(attack, "replayed_counter")


def _flip_last_byte(payload: bytes) -> bytes:
    return payload[:-1] + bytes([payload[-1] ^ 0x01])


DECRYPT_ATTACKS: dict[str, Callable[[Ctx], bytes]] = {
    # dev-a's key, claiming to be dev-c: Box authenticates the sender, so it cannot open.
    "sealed by another device": lambda c: c.dev(c.spare).seal_payload(
        c.dev(c.spare).header(c.manifest, "update"),
        *c.dev(c.spare).update_parts(c.manifest),
        key=DEVICE_KEYS["dev-a"],
    ),
    "sealed for another aggregator": lambda c: c.dev(c.spare).seal_payload(
        c.dev(c.spare).header(c.manifest, "update"),
        *c.dev(c.spare).update_parts(c.manifest),
        aggregator=OTHER_AGGREGATOR_KEY.public_key,
    ),
    "ciphertext altered": lambda c: _flip_last_byte(spare_update(c)),
}


@pytest.mark.parametrize("name", list(DECRYPT_ATTACKS))
def test_a_message_that_does_not_open_is_decrypt_failed(name: str) -> None:
    assert_rejected_without_trace(lambda c: c.send(c.spare, DECRYPT_ATTACKS[name](c)), "decrypt_failed")


def _edit_outer_header(payload: bytes, **changes: Any) -> bytes:
    frame = decode_frame(payload, FrameKind.SEALED)
    return encode_frame(FrameKind.SEALED, {**frame.header, **changes}, frame.body)


@pytest.mark.parametrize("which", ["counter raised", "previous round relabelled"])
def test_an_edited_outer_header_is_binding_mismatch(which: str) -> None:
    def attack(c: Ctx) -> Outcome:
        if which == "counter raised":
            return c.send(c.spare, _edit_outer_header(spare_update(c), counter=1000))
        # The genuine round-1 update, relabelled for this round (with a fresh-looking counter).
        relabelled = _edit_outer_header(
            c.earlier[c.spare], round_id=c.manifest.round_id, model_version=c.manifest.version, counter=50
        )
        return c.send(c.spare, relabelled)

    assert_rejected_without_trace(attack, "binding_mismatch")


def _sealed_raw(c: Ctx, inner_header_json: bytes, body: bytes) -> bytes:
    """The spare device seals a payload whose JSON header is written by hand."""
    dev = c.dev(c.spare)
    header = dev.header(c.manifest, "update")
    return seal_inner(header, raw_payload_frame(inner_header_json, body, header), dev.key, _agg_public())


def _agg_public() -> PublicKey:
    return AGGREGATOR_KEY.public_key


def test_an_inner_frame_of_the_wrong_kind_is_payload_wrong_kind() -> None:
    def attack(c: Ctx) -> Outcome:
        dev = c.dev(c.spare)
        header = dev.header(c.manifest, "update")
        inner = encode_frame(FrameKind.SIGNED, {"bind": header.to_dict(), "payload": {}}, b"")
        return c.send(c.spare, seal_inner(header, inner, dev.key, _agg_public()))

    assert_rejected_without_trace(attack, "payload_wrong_kind")


@pytest.mark.parametrize("payload_json", [b"[1, 2]", b"null", b'"update"'])
def test_an_inner_payload_that_is_not_an_object_is_bad_payload(payload_json: bytes) -> None:
    assert_rejected_without_trace(lambda c: c.send(c.spare, _sealed_raw(c, payload_json, b"")), "bad_payload")


def _update_with_body(c: Ctx, edit: Callable[[bytearray], bytes], codec: Codec | None = None) -> bytes:
    dev = c.dev(c.spare)
    payload_header, body = dev.update_parts(c.manifest, codec=codec)
    return dev.seal_payload(dev.header(c.manifest, "update"), payload_header, edit(bytearray(body)))


def _nan_at(offset: int, fmt: str, value: float) -> Callable[[bytearray], bytes]:
    def edit(body: bytearray) -> bytes:
        struct.pack_into(fmt, body, offset, value)
        return bytes(body)

    return edit


BAD_TENSORS: dict[str, tuple[Codec, Callable[[bytearray], bytes]]] = {
    "fp32 NaN": (Codec.FP32, _nan_at(4 * 17, "<f", math.nan)),
    "fp32 infinity": (Codec.FP32, _nan_at(0, "<f", -math.inf)),
    "fp32 body 4 bytes short": (Codec.FP32, lambda b: bytes(b[:-4])),
    "fp32 body 1 byte long": (Codec.FP32, lambda b: bytes(b) + b"\x00"),
    "fp16 infinity": (Codec.FP16, _nan_at(2 * 3, "<e", math.inf)),
    "fp16 NaN": (Codec.FP16, _nan_at(2 * 200, "<e", math.nan)),
    "int8 zero scale": (Codec.INT8, _nan_at(4, "<f", 0.0)),
    "int8 NaN offset": (Codec.INT8, _nan_at(8, "<f", math.nan)),
    "int8 overflowing scale": (Codec.INT8, _nan_at(4, "<f", 3.0e38)),
}


@pytest.mark.parametrize("name", list(BAD_TENSORS))
def test_a_delta_that_does_not_decode_to_finite_values_is_bad_tensor(name: str) -> None:
    codec, edit = BAD_TENSORS[name]
    assert_rejected_without_trace(
        lambda c: c.send(c.spare, _update_with_body(c, edit)),
        "bad_tensor",
        round_settings=settings(codec=codec),
    )


@pytest.mark.parametrize(
    ("round_codec", "sent"),
    [(Codec.FP32, Codec.FP16), (Codec.FP32, Codec.INT8), (Codec.INT8, Codec.FP32), (Codec.FP16, Codec.INT8)],
)
def test_an_update_in_another_codec_than_the_round_asked_for_is_wrong_codec(
    round_codec: Codec, sent: Codec
) -> None:
    assert_rejected_without_trace(
        lambda c: c.send(c.spare, spare_update(c, codec=sent)),
        "wrong_codec",
        round_settings=settings(codec=round_codec),
    )


# A float that overflows to infinity is refused where the payload frame's JSON header is read
# (protocol/bounded_json.py: JSON has no infinity, like the NaN the frame already refuses); an
# integer too large for a float gets as far as the metric's check.
NOT_FINITE_HEADERS: dict[str, tuple[bytes, str]] = {
    "train_loss 1e999": (
        b'{"codec":"fp32","evaluation":null,"examples":40,"train_loss":1e999}',
        "payload_bad_header",
    ),
    "train_loss -1e999": (
        b'{"codec":"fp32","evaluation":null,"examples":40,"train_loss":-1e999}',
        "payload_bad_header",
    ),
    "evaluation loss as a 400-digit integer": (
        b'{"codec":"fp32","evaluation":{"accuracy":0.5,"examples":5,"loss":1'
        + b"0" * 400
        + b',"mse":null},"examples":40,"train_loss":0.5}',
        "not_finite",
    ),
}


@pytest.mark.parametrize("name", list(NOT_FINITE_HEADERS))
def test_a_non_finite_metric_is_not_finite(name: str) -> None:
    header, reason = NOT_FINITE_HEADERS[name]

    def attack(c: Ctx) -> Outcome:
        body = encode_tensors(delta_for(c.spare), LAYOUT, Codec.FP32)
        return c.send(c.spare, _sealed_raw(c, header, body))

    assert_rejected_without_trace(attack, reason)


def test_non_finite_moments_are_not_finite() -> None:
    def attack(c: Ctx) -> Outcome:
        dev = c.dev(c.spare)
        x = data_for(c.spare, 20)
        payload_header, body = encode_moments(20, x.sum(axis=0), (x * x).sum(axis=0))
        bad = bytearray(body)
        struct.pack_into("<d", bad, 8 * 3, math.nan)
        return c.send(
            c.spare, dev.seal_payload(dev.header(c.manifest, "moments"), payload_header, bytes(bad))
        )

    assert_rejected_without_trace(attack, "not_finite", moments=True)


@pytest.mark.parametrize(
    "kw",
    [
        {"examples": 0},
        {"examples": -3},
        {"examples": 2**31},
        {"evaluation": Evaluation(0, 0.5, 0.5, None)},
    ],
    ids=["examples 0", "examples negative", "examples 2**31", "evaluation examples 0"],
)
def test_an_impossible_example_count_is_bad_count(kw: dict[str, Any]) -> None:
    assert_rejected_without_trace(lambda c: c.send(c.spare, spare_update(c, **kw)), "bad_count")


def test_moments_over_zero_samples_are_bad_count() -> None:
    def attack(c: Ctx) -> Outcome:
        dev = c.dev(c.spare)
        payload_header, body = encode_moments(0, np.zeros(N_FEATURES), np.zeros(N_FEATURES))
        return c.send(c.spare, dev.seal_payload(dev.header(c.manifest, "moments"), payload_header, body))

    assert_rejected_without_trace(attack, "bad_count", moments=True)


def test_more_examples_than_the_limit_is_too_many_examples() -> None:
    limit = settings().max_examples_per_update
    attack: Attack = lambda c: c.send(c.spare, spare_update(c, examples=limit + 1))  # noqa: E731
    assert_rejected_without_trace(attack, "too_many_examples")


@pytest.mark.parametrize(
    "payload_header",
    [
        {"codec": "fp32", "examples": 40, "train_loss": 0.5, "evaluation": None, "extra": 1},
        {"codec": "fp32", "examples": 40, "train_loss": 0.5},
        {"codec": "fp32", "examples": 40, "train_loss": "0.5", "evaluation": None},
        {"codec": "fp32", "examples": 40, "train_loss": 0.5, "evaluation": {"examples": 5}},
        {
            "codec": "fp32",
            "examples": 40,
            "train_loss": 0.5,
            "evaluation": {"examples": 5, "loss": 0.5, "accuracy": 1.5, "mse": None},
        },
    ],
    ids=["extra key", "missing key", "loss a string", "partial evaluation", "accuracy 1.5"],
)
def test_an_update_header_off_its_schema_is_bad_schema(payload_header: dict[str, Any]) -> None:
    def attack(c: Ctx) -> Outcome:
        dev = c.dev(c.spare)
        body = encode_tensors(delta_for(c.spare), LAYOUT, Codec.FP32)
        return c.send(c.spare, dev.seal_payload(dev.header(c.manifest, "update"), payload_header, body))

    assert_rejected_without_trace(attack, "bad_schema")


def _moments_payload(c: Ctx, count: int, sums: np.ndarray, sums_sq: np.ndarray) -> bytes:
    dev = c.dev(c.spare)
    payload_header, body = encode_moments(count, sums, sums_sq)
    return dev.seal_payload(dev.header(c.manifest, "moments"), payload_header, body)


def test_moments_with_a_negative_sum_of_squares_are_bad_moments() -> None:
    sq = np.full(N_FEATURES, 4.0)
    sq[7] = -1.0
    attack: Attack = lambda c: c.send(c.spare, _moments_payload(c, 10, np.zeros(N_FEATURES), sq))  # noqa: E731
    assert_rejected_without_trace(attack, "bad_moments", moments=True)


IMPOSSIBLE_MOMENTS: dict[str, tuple[Callable[[Ctx], bytes], str]] = {
    # sum**2 = 400 > count * sum_sq = 2: a negative variance, impossible for real samples.
    "negative variance": (
        lambda c: _moments_payload(c, 2, np.full(N_FEATURES, 20.0), np.ones(N_FEATURES)),
        "bad_moments",
    ),
    # Like an update's example count, a moments count over the limit would let one device
    # dominate the mean.
    "count over the limit": (
        lambda c: _moments_payload(
            c, RoundSettings().max_examples_per_update + 1, np.zeros(N_FEATURES), np.ones(N_FEATURES)
        ),
        "too_many_examples",
    ),
}


@pytest.mark.parametrize("name", list(IMPOSSIBLE_MOMENTS))
def test_impossible_moments_are_rejected_once_without_a_trace(name: str) -> None:
    make, _ = IMPOSSIBLE_MOMENTS[name]
    base = run_round(None, moments=True)
    hit = run_round(lambda c: c.send(c.spare, make(c)), moments=True)
    assert hit.outcome is not None and not hit.outcome.accepted
    assert_same_aggregate(base, hit)
    assert hit.engine.state.rejected_total == {hit.outcome.reason: 1}
    assert hit.record.rejected == {hit.outcome.reason: 1}


@pytest.mark.parametrize("name", list(IMPOSSIBLE_MOMENTS))
def test_impossible_moments_have_their_own_reason(name: str) -> None:
    make, reason = IMPOSSIBLE_MOMENTS[name]
    assert_rejected_without_trace(lambda c: c.send(c.spare, make(c)), reason, moments=True)


def test_evaluation_examples_over_the_limit_are_too_many_examples() -> None:
    """One device cannot dominate the federated evaluation by claiming a huge held-out set."""
    assert_rejected_without_trace(
        lambda c: c.send(c.spare, spare_update(c, evaluation=Evaluation(2**31 - 1, 0.5, 0.5, None))),
        "too_many_examples",
    )


@pytest.mark.parametrize(
    "kw",
    [
        {"examples": 2, "train_loss": 1.7e308},
        {"evaluation": Evaluation(2, 1.7e308, 0.5, None)},
    ],
    ids=["train loss overflows", "evaluation loss overflows"],
)
def test_a_metric_that_overflows_the_round_total_is_rejected_without_a_trace(kw: dict[str, Any]) -> None:
    # Each value is finite on its own (so it passes decoding); only the weighted sum overflows.
    hit = assert_rejected_without_trace(
        lambda c: c.send(c.spare, spare_update(c, **kw)), "rejected_by_aggregation"
    )
    assert hit.record.examples == 110


# --- no open round ---------------------------------------------------------------------------


def test_messages_when_no_round_is_open_are_no_open_round() -> None:
    engine = make_engine(settings(rounds=1, min_devices=1))
    early = make_engine(settings(rounds=1, min_devices=1))
    devs = devices(THREE)
    m = engine.open_round(T0).manifest
    # Before the first manifest: a message for the round it would announce gets nowhere.
    assert early.handle(devs["dev-a"].topic, devs["dev-a"].update(m), T0) == Outcome(
        False, "no_open_round", "dev-a", "update"
    )
    assert early.state.rejected_total == {"no_open_round": 1} and early.state.version == 0

    # Between close_round and the next open_round.
    assert send(engine, devs["dev-a"], devs["dev-a"].update(m), T0 + 1).accepted
    engine.close_round()
    weights = engine.state.weights.copy()
    between = send(engine, devs["dev-b"], devs["dev-b"].update(m), T0 + 2)
    assert between == Outcome(False, "no_open_round", "dev-b", "update")

    # After the final manifest: nothing is open any more.
    final = engine.open_round(T0 + 100).manifest
    assert final.phase == "final" and engine.current is None
    after = send(engine, devs["dev-c"], devs["dev-c"].update(final), T0 + 101)
    assert after == Outcome(False, "no_open_round", "dev-c", "update")
    assert engine.state.rejected_total == {"no_open_round": 2}
    assert engine.state.weights.tobytes() == weights.tobytes()
    assert engine.state.completed_rounds == 1
    assert engine.state.counters == {"dev-a": 2}  # counter 1 went to the message `early` refused
    assert engine.state.history[-1]["rejected"] == {}  # not charged to the closed round


def test_rejections_are_counted_per_round_and_in_total() -> None:
    engine = make_engine()
    devs = devices(THREE)
    m = engine.open_round(T0).manifest
    assert send(engine, devs["dev-a"], devs["dev-a"].update(m), T0 + 1).accepted
    for _ in range(3):
        assert send(engine, devs["dev-a"], devs["dev-a"].update(m), T0 + 1).reason == "duplicate"
    assert engine.handle("nope", b"", T0 + 1).reason == "bad_topic"
    assert engine.close_round().rejected == {"duplicate": 3, "bad_topic": 1}
    m2 = engine.open_round(T0 + 100).manifest
    assert send(engine, devs["dev-b"], devs["dev-b"].update(m), T0 + 101).reason == "wrong_round"
    assert engine.close_round().rejected == {"wrong_round": 1}
    assert engine.state.rejected_total == {"duplicate": 3, "bad_topic": 1, "wrong_round": 1}
    assert m2.round_id != m.round_id


# --- close_round robustness ------------------------------------------------------------------


def test_close_round_without_an_open_round_is_an_error() -> None:
    engine = make_engine()
    with pytest.raises(FedgeError, match="no round is open"):
        engine.close_round()


def test_moments_from_a_single_sample_abort_the_round_instead_of_raising() -> None:
    engine = make_engine(settings(min_devices=1), initial_state(normalisation=None))
    dev = Device("dev-a")
    m = engine.open_round(T0).manifest
    assert send(engine, dev, dev.moments(m, data_for("dev-a", 1)), T0 + 1).accepted
    record = engine.close_round()
    assert record.outcome == "aborted"
    assert engine.state.normalisation is None and engine.current is None
    assert engine.state.counters == {"dev-a": 1}


def test_an_update_that_would_overflow_the_model_aborts_the_round_instead_of_raising() -> None:
    # Without norm bounds (by default such an update is clipped: test_influence_bounds.py).
    engine = make_engine(plain_fedavg(min_devices=1, server_learning_rate=2.0))
    dev = Device("dev-a")
    m = engine.open_round(T0).manifest
    huge = np.full(INITIAL_WEIGHTS.shape, 3.0e38, dtype=np.float32)
    assert send(engine, dev, dev.update(m, huge), T0 + 1).accepted
    record = engine.close_round()
    assert record.outcome == "aborted"
    assert engine.state.weights.tobytes() == INITIAL_WEIGHTS.tobytes()
    assert engine.state.completed_rounds == 0 and engine.current is None


def test_settings_under_which_no_round_can_succeed_are_refused() -> None:
    with pytest.raises(FedgeError):
        make_engine(settings(devices_per_round=1, min_devices=2))


# --- restart -----------------------------------------------------------------------------------


def test_a_restart_from_the_snapshot_is_invisible() -> None:
    """An engine rebuilt from ``snapshot()`` after a round behaves exactly like the original."""
    devs_a, devs_b = devices(THREE), devices(THREE)
    a = make_engine()
    m1 = a.open_round(T0).manifest
    first = {d: devs_a[d].update(m1, examples=30 + i) for i, d in enumerate(THREE)}
    for d, payload in first.items():
        assert send(a, devs_a[d], payload, T0 + 1).accepted
    assert a.handle("junk", b"", T0 + 1).reason == "bad_topic"
    a.close_round()
    snap = a.snapshot()
    for d in THREE:
        devs_b[d].counter = devs_a[d].counter  # the devices' own persisted counters
    b = make_engine(state=snap)

    pa, pb = a.open_round(T0 + 100), b.open_round(T0 + 100)
    assert pb.manifest == pa.manifest and pb.manifest_frame == pa.manifest_frame
    assert pb.manifest.version == m1.version + 1  # no regression
    assert pb.manifest.parent_sha256 == m1.sha256()
    assert pb.manifest.round_number == 2
    # A restarted process publishes the model blob again (the broker may have lost it); the
    # weights blob is the same.
    assert pb.blobs == {TOPICS.blob(sha(MODEL_BYTES)): MODEL_BYTES, **pa.blobs}
    assert b.state.counters == {d: 1 for d in THREE}
    assert b.state.rejected_total == {"bad_topic": 1} and len(b.state.history) == 1

    # Round 1's messages are refused by the restarted engine, and nothing counts twice.
    for d, payload in first.items():
        assert send(b, devs_b[d], payload, T0 + 101) == Outcome(False, "wrong_round", d, "update")
    reused = devs_b["dev-a"].update(pb.manifest, counter=1)
    assert send(b, devs_b["dev-a"], reused, T0 + 101).reason == "replayed_counter"
    for i, d in enumerate(THREE[1:]):
        assert send(a, devs_a[d], devs_a[d].update(pa.manifest, examples=60 + i), T0 + 102).accepted
        assert send(b, devs_b[d], devs_b[d].update(pb.manifest, examples=60 + i), T0 + 102).accepted
    ra, rb = a.close_round(), b.close_round()
    assert b.state.weights.tobytes() == a.state.weights.tobytes()
    assert rb.examples == ra.examples == 121 and rb.reported == 2
    assert b.state.completed_rounds == 2 and len(b.state.history) == 2
    assert b.state.rejected_total == {"bad_topic": 1, "wrong_round": 3, "replayed_counter": 1}
    assert b.state.counters == {"dev-a": 1, "dev-b": 2, "dev-c": 2}


def test_a_snapshot_does_not_change_when_the_engine_moves_on() -> None:
    engine = make_engine()
    devs = devices(THREE)
    m = engine.open_round(T0).manifest
    for d in THREE:
        assert send(engine, devs[d], devs[d].update(m), T0 + 1).accepted
    engine.close_round()
    snap = engine.snapshot()
    frozen = (
        snap.version,
        snap.weights.tobytes(),
        dict(snap.counters),
        dict(snap.rejected_total),
        len(snap.history),
    )
    m2 = engine.open_round(T0 + 100).manifest
    for d in THREE:
        assert send(engine, devs[d], devs[d].update(m2), T0 + 101).accepted
    engine.handle("junk", b"", T0 + 101)
    engine.close_round()
    assert (
        snap.version,
        snap.weights.tobytes(),
        snap.counters,
        snap.rejected_total,
        len(snap.history),
    ) == frozen
    assert engine.state.version == 2 and engine.state.completed_rounds == 2


def test_a_restarted_engine_still_clears_the_previous_weights_blob() -> None:
    engine = make_engine()
    devs = devices(THREE)
    m = engine.open_round(T0).manifest
    for d in THREE:
        assert send(engine, devs[d], devs[d].update(m), T0 + 1).accepted
    engine.close_round()
    restarted = make_engine(state=engine.snapshot())
    assert restarted.open_round(T0 + 100).clear_blobs == (TOPICS.blob(m.weights_sha256),)


# --- status ------------------------------------------------------------------------------------


def test_status_reports_the_round_the_reports_and_the_rejections() -> None:
    engine = make_engine(settings(rounds=1))
    devs = devices(THREE)
    fresh = engine.status(T0)
    assert fresh == {
        "fleet": FLEET,
        "state": "running",
        "phase": "train",
        "version": 0,
        "completed_rounds": 0,
        "rounds": 1,
        "round_id": None,
        "deadline": None,
        "selected": 0,
        "reported": [],
        "refused": [],
        "rejected_total": {},
        "limits": {
            "max_message_bytes": max_sealed_bytes(LAYOUT, Codec.FP32, N_FEATURES),
            "weighting": "equal",
            "weight_cap": None,
            "norm_bound": pytest.approx(0.5 * float(np.linalg.norm(INITIAL_WEIGHTS.astype(np.float64)))),
            "norm_bound_hard": pytest.approx(0.5 * float(np.linalg.norm(INITIAL_WEIGHTS.astype(np.float64)))),
            "norm_policy": "clip",
            "moments_aggregation": "robust",
            "secure_aggregation": None,
            "strategy": "fedavg",
        },
        "history": [],
        "eval_metric": "accuracy",
        "privacy": None,
        "time": T0,
    }
    m = engine.open_round(T0).manifest
    for d in ("dev-c", "dev-a"):
        assert send(engine, devs[d], devs[d].update(m), T0 + 1).accepted
    engine.handle("junk", b"", T0 + 1)
    during = engine.status(T0 + 2)
    assert during["phase"] == "train" and during["round_id"] == m.round_id
    assert during["deadline"] == m.deadline and during["selected"] == 3
    assert during["reported"] == ["dev-a", "dev-c"] and during["version"] == 1
    assert during["rejected_total"] == {"bad_topic": 1} and during["state"] == "running"
    assert during["time"] == T0 + 2
    record = engine.close_round()
    closed = engine.status(T0 + 3)
    assert closed["state"] == "done"  # every round is closed (the final manifest comes next)
    assert closed["phase"] == "final" and closed["round_id"] is None and closed["completed_rounds"] == 1
    assert closed["history"] == [record.to_dict()]
    engine.open_round(T0 + 4)
    done = engine.status(T0 + 5)
    assert done["state"] == "done" and done["phase"] == "final" and done["version"] == 2
    json.dumps(done, allow_nan=False)  # the shell publishes it as JSON


def test_status_shows_the_last_five_rounds_and_is_a_copy() -> None:
    engine = make_engine(settings(rounds=10))
    for i in range(7):
        engine.open_round(T0 + 100 * i)
        engine.close_round()  # nobody reported: aborted
    status = engine.status(T0 + 1000)
    assert [h["round_id"] for h in status["history"]] == [f"r0001-v{v}" for v in range(3, 8)]
    assert all(h["outcome"] == "aborted" for h in status["history"])
    status["rejected_total"]["x"] = 1
    assert engine.state.rejected_total == {}


# --- a scaled "model replacement" update has bounded influence -------------------------------


def _train_round(engine: RoundEngine, devs: dict[str, Device], deltas: dict[str, np.ndarray]) -> Publication:
    """Skips to a train round (the initial state has a normalisation) and sends the deltas."""
    pub = engine.open_round(T0)
    assert pub.manifest.phase == "train"
    for d, delta in deltas.items():
        assert send(engine, devs[d], devs[d].update(pub.manifest, delta=delta, examples=100), T0 + 1).accepted
    return pub


def test_an_update_over_the_norm_bound_is_clipped_to_it() -> None:
    weights_norm = float(np.linalg.norm(INITIAL_WEIGHTS.astype(np.float64)))
    engine = make_engine(settings(update_norm_ratio=1.0, min_devices=3))
    devs = devices(THREE)
    honest = {d: delta_for(d, 1) for d in THREE[:2]}
    attack = (delta_for(THREE[2], 1) * np.float32(1e4)).astype(np.float32)  # replaces the model
    assert np.linalg.norm(attack) > 10 * weights_norm
    _train_round(engine, devs, {**honest, THREE[2]: attack})
    record = engine.close_round()
    assert (record.clipped, record.norm_bound) == (1, pytest.approx(weights_norm))
    clipped = attack * np.float32(weights_norm / float(np.linalg.norm(attack.astype(np.float64))))
    expected = INITIAL_WEIGHTS + (honest[THREE[0]] + honest[THREE[1]] + clipped) / 3
    np.testing.assert_allclose(engine.state.weights, expected, atol=1e-5)
    # The attacker moved the model by at most the bound times its share of the examples.
    assert np.linalg.norm(engine.state.weights - INITIAL_WEIGHTS) <= weights_norm / 3 + 0.1


def test_honest_updates_are_not_clipped() -> None:
    engine = make_engine(settings(update_norm_ratio=1.0, min_devices=3))
    devs = devices(THREE)
    deltas = {d: delta_for(d, 1) for d in THREE}
    _train_round(engine, devs, deltas)
    record = engine.close_round()
    assert record.clipped == 0
    np.testing.assert_allclose(engine.state.weights, INITIAL_WEIGHTS + sum(deltas.values()) / 3, atol=1e-6)


def test_with_the_reject_policy_an_update_over_the_bound_is_rejected_and_changes_nothing() -> None:
    engine = make_engine(settings(max_update_norm=0.5, update_norm_policy="reject", min_devices=2))
    devs = devices(THREE)
    pub = engine.open_round(T0)
    big = (delta_for(THREE[0], 1) * np.float32(1000)).astype(np.float32)
    out = send(engine, devs[THREE[0]], devs[THREE[0]].update(pub.manifest, delta=big, examples=100), T0 + 1)
    assert out == Outcome(False, "norm_too_large", THREE[0], "update")
    assert engine.state.rejected_total == {"norm_too_large": 1}
    for d in THREE[1:]:
        assert send(engine, devs[d], devs[d].update(pub.manifest, examples=100), T0 + 1).accepted
    engine.close_round()
    expected = INITIAL_WEIGHTS + (delta_for(THREE[1], 1) + delta_for(THREE[2], 1)) / 2
    np.testing.assert_allclose(engine.state.weights, expected, atol=1e-6)


def test_a_revoked_device_is_refused_from_the_next_round_on() -> None:
    engine = make_engine(settings(min_devices=2))
    devs = devices(THREE)
    pub = engine.open_round(T0)
    report_all(engine, pub, devs, T0 + 1)  # revoked during this round: still counted here
    engine.close_round()
    revoked = THREE[2]
    engine.set_registry({d: devs[d].key.public_key for d in THREE[:2]}, {revoked})
    nxt = engine.open_round(T0 + 100)
    assert revoked not in nxt.manifest.selected_devices
    payload = devs[revoked].update(nxt.manifest)
    assert send(engine, devs[revoked], payload, T0 + 101) == Outcome(
        False, "revoked_device", revoked, "update"
    )
    assert engine.state.rejected_total == {"revoked_device": 1}


def test_devices_that_are_not_ready_are_not_selected_while_enough_others_are() -> None:
    engine = make_engine(devices=DEVICE_IDS[:4])  # min_devices 2 (the tests' settings)
    every = engine.select_devices(5)
    assert every == DEVICE_IDS[:4]  # devices_per_round 0: all
    assert engine.select_devices(5, frozenset({"dev-b"})) == ("dev-a", "dev-c", "dev-d")
    # Too few ready ones left for min_devices: the choice is among all, as before.
    assert engine.select_devices(5, frozenset({"dev-a", "dev-b", "dev-c"})) == every
    pub = engine.open_round(T0, frozenset({"dev-c"}))
    assert pub.manifest.selected_devices == ("dev-a", "dev-b", "dev-d")
