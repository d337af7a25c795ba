"""Secure aggregation in the aggregator's rounds: the round engine with ``[privacy]
secure_aggregation`` driven by real device drivers, in memory.

Each selected device runs the agent's own :class:`~fedge.agent.secure_round.DeviceSecureRound`
(real X25519 sealing, Ed25519 signatures, Shamir shares, masks); a tiny in-memory "broker" hands
the engine's signed documents to the devices they name and the devices' sealed frames to
:meth:`RoundEngine.handle`. Time is a float: when nothing is left to deliver and the round is
not due, it jumps to the next phase deadline. After every step the engine's attributes are
walked: no array it holds may be any device's update, quantised or not.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from nacl.public import PrivateKey, PublicKey
from nacl.signing import SigningKey, VerifyKey

from fedge.agent.core import update_payload
from fedge.agent.secure_round import DeviceSecureRound, open_round_config
from fedge.aggregator.config import RoundSettings, load_aggregator_config
from fedge.aggregator.privacy_config import (
    DISTRIBUTED_WITHOUT_SECURE,
    PRIVACY_KEYS,
    SECURE_DP_ADAPTIVE,
    SECURE_DP_BITS,
    SECURE_MIN_DEVICES_MESSAGE,
    SECURE_NEEDS_BOUND,
    SECURE_THRESHOLD_ONE,
    SECURE_WITH_CENTRAL_NOISE,
    SECURE_WITH_EXAMPLES,
    SecureSettings,
    privacy_settings_from_table,
    secure_settings,
)
from fedge.aggregator.round_engine import (
    SECURE_TOO_FEW_DEVICES,
    EngineState,
    Publication,
    RoundEngine,
    RoundRecord,
)
from fedge.aggregator.service import AggregatorService, influence_summary
from fedge.lab.provision import create_fleet
from fedge.protocol.config_source import ConfigError, Table
from fedge.protocol.errors import FedgeError
from fedge.protocol.model_manifest import Normalisation
from fedge.protocol.privacy_announcement import PrivacyAnnouncement
from fedge.protocol.reasons import RejectReason
from fedge.protocol.round_manifest import RoundManifest, round_manifest_from_dict
from fedge.protocol.sealing import SealedHeader, read_header, seal
from fedge.protocol.secagg import choose_parameters
from fedge.protocol.secagg.announcement import SecureAggregationAnnouncement
from fedge.protocol.secagg.prg import modulus_mask
from fedge.protocol.secagg.quantise import clip_to_norm
from fedge.protocol.secagg.wire import Publication as WirePublication
from fedge.protocol.secagg.wire import max_sealed_bytes, trusted_keys
from fedge.protocol.secure_dp import add_noise_share, noise_plan, sum_correction
from fedge.protocol.secure_round_config import round_config_for
from fedge.protocol.signing import DocType, verify_document
from support.engine_helpers import (
    AGGREGATOR_KEY,
    FLEET,
    MODEL_BYTES,
    MODEL_MANIFEST,
    SIGNING_KEY,
    T0,
    TOPICS,
    initial_state,
    settings,
)
from support.memory_walk import vectors_held

pytestmark = pytest.mark.aggregator

P = MODEL_MANIFEST.parameter_count


def _key(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def ids(n: int) -> tuple[str, ...]:
    return tuple(f"sa-{i:02d}" for i in range(n))


def box_key(device: str) -> PrivateKey:
    return PrivateKey(_key(f"box/{device}"))


def identity_key(device: str) -> SigningKey:
    return SigningKey(_key(f"identity/{device}"))


def enrolled(devices: tuple[str, ...]) -> dict[str, VerifyKey]:
    """The identity keys the operator's registry distributes (never the aggregator)."""
    return {d: identity_key(d).verify_key for d in devices}


def registry(devices: tuple[str, ...]) -> dict[str, PublicKey]:
    return {d: box_key(d).public_key for d in devices}


def delta(device: str, scale: float = 0.01, round_number: int = 1) -> npt.NDArray[np.float32]:
    seed = int.from_bytes(_key(f"delta/{device}/{round_number}")[:8], "big")
    return np.random.default_rng(seed).normal(0.0, scale, size=P).astype(np.float32)


def secure_settings_for(**changes: Any) -> RoundSettings:
    return settings(**{"min_devices": 3, **changes})


def secure_engine(
    n: int = 5,
    *,
    threshold: int = 0,
    bits: int = 32,
    state: EngineState | None = None,
    **round_changes: Any,
) -> RoundEngine:
    return RoundEngine(
        FLEET,
        secure_settings_for(**round_changes),
        MODEL_MANIFEST,
        MODEL_BYTES,
        AGGREGATOR_KEY,
        SIGNING_KEY,
        registry(ids(n)),
        state or initial_state(),
        secure=SecureSettings(bits=bits, threshold=threshold),
    )


# --- the engine's memory, walked --------------------------------------------------------------------

#: Where the engine may hold a vector: the global model, a server optimizer's state (moments
#: of the aggregated means), the open round's unused plain folds (zeroed accumulators), the
#: driver's running sum of masked inputs and the unmasked sum.
ALLOWED_PREFIXES = (
    "engine.state.weights",
    "engine.state.server_optimizer.",
    "engine.current.folds.",
    "engine.current.secure.session._sum",
    "engine.current.secure.result.total",
)


# --- a round, in memory -------------------------------------------------------------------------------


@dataclass
class SimDevice:
    """One device: its update, its durable counter and records, and its round driver.
    ``stop_after``: the sealed kind after which it goes silent for the rest of the round."""

    device_id: str
    update: npt.NDArray[np.float32]
    stop_after: str | None = None
    quantised: npt.NDArray[np.uint64] | None = None
    round: DeviceSecureRound | None = None
    records: dict[str, dict[str, str]] = field(default_factory=dict)
    sent: list[str] = field(default_factory=list)
    gone: bool = False
    counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    #: Differential privacy: the round's manifest announcement and min_devices (the device adds
    #: its noise share after quantising, as the agent does).
    privacy: tuple[PrivacyAnnouncement, int] | None = None
    #: The noise share this device added (to check the engine never holds it either).
    noise: npt.NDArray[np.uint64] | None = None

    def join(
        self, topic: str, payload: bytes, now: float, fleet_ids: tuple[str, ...]
    ) -> list[WirePublication]:
        announcement = open_round_config(topic, payload, fleet=FLEET, aggregator_keys=SIGNING_KEY.verify_key)
        seed = int.from_bytes(_key(f"rounding/{self.device_id}")[:8], "big")

        def quantised_update(config: Any) -> npt.NDArray[np.uint64]:
            self.quantised = config.quantiser.quantise(self.update, np.random.default_rng(seed))
            if self.privacy is None:
                return self.quantised
            plan = noise_plan(self.privacy[0], config, self.privacy[1])
            noised = add_noise_share(self.quantised, plan, config.bits, random.Random(seed))
            self.noise = (noised - self.quantised) & modulus_mask(config.bits)
            return noised

        def persist(round_id: str, record: dict[str, str]) -> None:
            self.records[round_id] = dict(record)

        self.round = DeviceSecureRound(
            announcement,
            device_id=self.device_id,
            box_key=box_key(self.device_id),
            aggregator_box_key=AGGREGATOR_KEY.public_key,
            identity_key=identity_key(self.device_id),
            neighbour_keys=enrolled(fleet_ids),
            aggregator_keys=SIGNING_KEY.verify_key,
            quantised_update=quantised_update,
            next_counter=lambda: next(self.counter),
            persist_revealed=persist,
            revealed=None,
        )
        return self._sending(self.round.start(now))

    def receive(self, topic: str, payload: bytes, now: float) -> list[WirePublication]:
        if self.gone or self.round is None:
            return []
        return self._sending(self.round.on_message(topic, payload, now))

    def _sending(self, frames: list[WirePublication]) -> list[WirePublication]:
        out = []
        for frame in frames:
            if self.gone:
                break
            kind = read_header(frame.payload)[0].kind
            self.sent.append(kind)
            out.append(frame)
            if kind == self.stop_after:
                self.gone = True
        return out

    @property
    def refusals(self) -> Counter[str]:
        return self.round.refusals if self.round is not None else Counter()


@dataclass
class SimRound:
    engine: RoundEngine
    publication: Publication
    devices: dict[str, SimDevice]
    record: RoundRecord | None = None
    now: float = T0
    walks: int = 0
    published: list[WirePublication] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)

    @property
    def manifest(self) -> RoundManifest:
        return self.publication.manifest

    def check_memory(self) -> None:
        """The instrumentation: no array the engine holds is any device's update."""
        self.walks += 1
        held = vectors_held(self.engine, "engine")
        paths = [path for path, _ in held]
        assert all(path.startswith(ALLOWED_PREFIXES) for path in paths), paths
        individual: list[np.ndarray] = []
        for d in self.devices.values():
            individual.append(d.update)
            if d.quantised is not None:
                individual.append(d.quantised)
            if d.noise is not None:
                individual.append(d.noise)
        for path, vector in held:
            assert not any(np.array_equal(vector, v) for v in individual), f"{path} is a device's update"

    def deliver(self, publications: list[WirePublication]) -> list[WirePublication]:
        """The broker: each document to the device its topic names (the config to every one)."""
        self.published += publications
        frames: list[WirePublication] = []
        fleet_ids = tuple(sorted(self.devices))
        for p in publications:
            if not p.payload:
                continue  # a clear
            _round, what, device = TOPICS.secagg_parse(p.topic)
            if what == "config":
                for d in self.devices.values():
                    frames += d.join(p.topic, p.payload, self.now, fleet_ids)
            elif device in self.devices:
                frames += self.devices[device].receive(p.topic, p.payload, self.now)
        return frames

    def run(self) -> RoundRecord:
        """Drives the round to its end and closes it."""
        engine = self.engine
        frames = self.deliver(list(self.publication.secagg))
        while True:
            for frame in frames:
                outcome = engine.handle(frame.topic, frame.payload, self.now)
                self.outcomes[outcome.reason] += 1
                self.check_memory()
            documents = engine.tick(self.now)
            self.check_memory()
            frames = self.deliver(documents)
            if frames or documents:
                continue
            if engine.round_due(self.now):
                break
            self.now = self.next_deadline()
        self.record = engine.close_round()
        self.check_memory()
        self.published += engine.tick(self.now)  # the clears, if close_round ended the driver
        return self.record

    def next_deadline(self) -> float:
        driver = self.engine.current.secure if self.engine.current is not None else None
        times = [self.manifest.deadline]
        if driver is not None:
            d = driver.config.deadlines
            times += [d.advertise, d.share, d.masked_input, d.unmask]
        later = [t for t in times if t > self.now]
        assert later, "the round is past every deadline but not due"
        return min(later)


def open_secure_round(
    engine: RoundEngine,
    updates: dict[str, npt.NDArray[np.float32]] | None = None,
    stop_after: dict[str, str] | None = None,
    now: float = T0,
) -> SimRound:
    publication = engine.open_round(now)
    selected = publication.manifest.selected_devices
    updates = updates or {d: delta(d) for d in selected}
    m = publication.manifest
    privacy = (m.privacy, m.min_devices) if m.privacy is not None else None
    devices = {d: SimDevice(d, updates[d], (stop_after or {}).get(d), privacy=privacy) for d in selected}
    for d, device in devices.items():  # the counter each device persisted, one past its newest
        device.counter = itertools.count(engine.state.counters.get(d, 0) + 1)
    return SimRound(engine, publication, devices, now=now + 1.0)


def expected_weights(
    start: np.ndarray, updates: list[np.ndarray], clip: float, lr: float = 1.0
) -> npt.NDArray[np.float64]:
    clipped = [clip_to_norm(u, clip) for u in updates]
    mean: npt.NDArray[np.float64] = np.mean(clipped, axis=0)
    return start.astype(np.float64) + lr * mean


def check_aggregate(r: SimRound, start: np.ndarray, in_sum: list[str], lr: float = 1.0) -> None:
    announced = r.manifest.secure_aggregation
    assert announced is not None
    config = round_config_for(r.manifest)
    want = expected_weights(start, [r.devices[d].update for d in in_sum], announced.clip_norm, lr)
    # Each coordinate of the sum of m devices is within m(1 + 2^-12)/s; the mean within 1/m of
    # that; float32 rounding of the weights adds at most a few ulps.
    bound = lr * config.quantiser.error_bound(len(in_sum)) / len(in_sum) + 1e-6
    error = np.abs(r.engine.state.weights.astype(np.float64) - want)
    assert float(error.max()) <= bound, (float(error.max()), bound)


# --- the round -----------------------------------------------------------------------------------------


def test_a_secure_round_moves_the_model_by_the_mean_of_the_clipped_deltas() -> None:
    engine = secure_engine(5)
    start = engine.state.weights.copy()
    ids5 = ids(5)
    # Two devices send updates far over the bound: the devices clip them before masking.
    updates = {d: delta(d, scale=0.2 if i < 2 else 0.01) for i, d in enumerate(ids5)}
    r = open_secure_round(engine, updates)
    announced = r.manifest.secure_aggregation
    assert announced is not None
    assert float(np.linalg.norm(updates[ids5[0]])) > announced.clip_norm  # really clipped
    record = r.run()
    assert record.outcome == "aggregated" and record.failure is None
    assert (record.secure_aggregation, record.selected, record.reported, record.dropped) == (True, 5, 5, 0)
    assert record.norm_bound == announced.clip_norm
    assert (record.examples, record.train_loss, record.fed_eval_loss, record.fed_eval_accuracy) == (
        0,
        None,
        None,
        None,
    )
    assert record.fed_eval_mse is None and record.rejected == {}
    assert engine.state.completed_rounds == 1
    check_aggregate(r, start, list(ids5))
    # Every device sent its four messages; the engine's counters are the devices' newest.
    for d in r.devices.values():
        assert d.sent == ["secagg_advertise", "secagg_shares", "secagg_masked", "secagg_unmask"]
        assert d.refusals == Counter()
        assert engine.state.counters[d.device_id] == 4
    assert r.outcomes == Counter({"accepted": 20})
    assert engine.state.history[-1]["secure_aggregation"] is True
    # The round's retained documents were cleared at its end: every topic published once with
    # a document gets an empty payload.
    documents = {p.topic for p in r.published if p.payload}
    cleared = {p.topic for p in r.published if not p.payload}
    assert documents == cleared and all(p.retain and p.qos == 1 for p in r.published)
    assert r.walks > 20


def test_the_next_round_is_secure_too_and_the_server_learning_rate_applies() -> None:
    engine = secure_engine(4, server_learning_rate=0.5)
    open_secure_round(engine).run()
    start = engine.state.weights.copy()
    updates = {d: delta(d, round_number=2) for d in ids(4)}
    r = open_secure_round(engine, updates, now=T0 + 100)
    assert r.manifest.round_number == 2 and r.manifest.secure_aggregation is not None
    assert r.run().outcome == "aggregated"
    check_aggregate(r, start, list(ids(4)), lr=0.5)
    assert engine.state.completed_rounds == 2


def test_the_manifest_announces_the_parameters_and_the_config_is_derived_from_it() -> None:
    engine = secure_engine(5)
    limits = engine.round_limits()
    pub = engine.open_round(T0)
    m = pub.manifest
    chosen = choose_parameters(5)
    assert limits.bounds.hard is not None
    assert m.secure_aggregation == SecureAggregationAnnouncement(
        clip_norm=limits.bounds.hard, bits=32, degree=chosen.degree, threshold=chosen.threshold
    )
    # What devices get: the signed manifest (the announcement survives the round trip) ...
    document, _ = verify_document(
        pub.manifest_frame, DocType.ROUND_MANIFEST, trusted_keys(SIGNING_KEY.verify_key)
    )
    parsed = round_manifest_from_dict(document)
    assert parsed == m
    assert parsed.secure_aggregation == m.secure_aggregation
    # ... and the signed config right after it, which is exactly the one derived from it.
    (config_doc,) = pub.secagg
    assert config_doc.topic == TOPICS.secagg(m.round_id, "config") and config_doc.retain
    announcement = open_round_config(
        config_doc.topic, config_doc.payload, fleet=FLEET, aggregator_keys=SIGNING_KEY.verify_key
    )
    assert engine.current is not None and engine.current.secure is not None
    assert announcement.config == round_config_for(parsed) == engine.current.secure.config
    assert announcement.model_version == m.version
    # The status says the round is secure, and admits its largest message.
    status = engine.status(T0 + 1)
    assert status["limits"]["secure_aggregation"] == {
        "bits": 32,
        "degree": chosen.degree,
        "threshold": chosen.threshold,
        "clip_norm": limits.bounds.hard,
        "phase": "advertise",
    }
    assert status["limits"]["max_message_bytes"] >= max_sealed_bytes(announcement.config)


def test_a_configured_threshold_is_announced_with_the_chosen_degree() -> None:
    engine = secure_engine(7, threshold=4, bits=40)
    m = engine.open_round(T0).manifest
    assert m.secure_aggregation is not None
    assert (m.secure_aggregation.degree, m.secure_aggregation.threshold, m.secure_aggregation.bits) == (
        6,
        4,
        40,
    )
    idle = secure_engine(7, threshold=4).status(T0)["limits"]["secure_aggregation"]
    assert idle == {"bits": 32, "degree": None, "threshold": 4, "clip_norm": None, "phase": None}


def test_moments_rounds_stay_plain() -> None:
    engine = secure_engine(5, state=initial_state(normalisation=None))
    pub = engine.open_round(T0)
    assert pub.manifest.phase == "moments" and pub.manifest.secure_aggregation is None
    assert pub.secagg == () and engine.tick(T0 + 1) == []


# --- dropouts ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stop_after", "dropping"),
    [
        ("secagg_shares", 1),
        ("secagg_shares", 2),
        ("secagg_masked", 1),
        ("secagg_masked", 2),
    ],
)
def test_devices_dropping_after_sharing_or_masking_still_aggregate(stop_after: str, dropping: int) -> None:
    engine = secure_engine(7, threshold=4)
    start = engine.state.weights.copy()
    gone = list(ids(7)[2 : 2 + dropping])
    r = open_secure_round(engine, stop_after=dict.fromkeys(gone, stop_after))
    record = r.run()
    assert record.outcome == "aggregated", record.failure
    if stop_after == "secagg_shares":  # recovered: its masks removed, its update not in the sum
        in_sum = [d for d in ids(7) if d not in gone]
        assert (record.reported, record.dropped) == (7 - dropping, dropping)
    else:  # its masked input arrived: it is in the sum, its self-mask rebuilt by its neighbours
        in_sum = list(ids(7))
        assert (record.reported, record.dropped) == (7, 0)
    check_aggregate(r, start, in_sum)
    for d in gone:
        assert r.devices[d].sent[-1] == stop_after
    assert all(d.refusals == Counter() for d in r.devices.values())


def test_too_few_survivors_abort_the_round_with_the_drivers_reason() -> None:
    engine = secure_engine(5)  # k = 4, t = 3
    start = engine.state.weights.copy()
    r = open_secure_round(engine, stop_after=dict.fromkeys(ids(5)[:3], "secagg_advertise"))
    record = r.run()
    driver_reason = record.failure
    assert record.outcome == "aborted" and driver_reason == "too_few_survivors"
    assert (record.reported, record.dropped, record.secure_aggregation) == (0, 5, True)
    assert np.array_equal(engine.state.weights, start) and engine.state.completed_rounds == 0
    # The documents it published are cleared all the same.
    assert {p.topic for p in r.published if p.payload} == {p.topic for p in r.published if not p.payload}


def test_a_sum_of_fewer_than_min_devices_is_not_used() -> None:
    engine = secure_engine(7, threshold=4, min_devices=6)
    start = engine.state.weights.copy()
    r = open_secure_round(engine, stop_after=dict.fromkeys(ids(7)[:2], "secagg_shares"))
    record = r.run()
    assert record.outcome == "aborted"
    assert record.failure == "5 device(s) in the secure sum, fewer than min_devices=6"
    assert np.array_equal(engine.state.weights, start) and engine.state.completed_rounds == 0


def test_a_round_that_times_out_before_its_end_is_closed_at_its_deadline() -> None:
    engine = secure_engine(5)
    r = open_secure_round(engine, stop_after=dict.fromkeys(ids(5), "secagg_advertise"))
    r.deliver(list(r.publication.secagg))  # everyone advertises, then nothing more happens
    m = r.manifest
    assert not engine.round_due(m.deadline - 0.001)
    assert engine.round_due(m.deadline)  # the engine never ticked: close_round ends the driver
    record = engine.close_round()
    assert record.outcome == "aborted" and record.failure is not None
    clears = engine.tick(m.deadline + 1)
    assert clears and all(not p.payload for p in clears)
    assert engine.tick(m.deadline + 2) == []


# --- what a secure round refuses -----------------------------------------------------------------------


def plain_update(device: str, manifest: RoundManifest, counter: int) -> bytes:
    header, body = update_payload(manifest, delta(device), 100, 0.5, None)
    bind = SealedHeader(FLEET, device, manifest.round_id, counter, "update", manifest.version)
    return seal(bind, header, body, box_key(device), AGGREGATOR_KEY.public_key)


def test_a_plain_update_in_a_secure_round_is_refused_and_changes_nothing() -> None:
    engine = secure_engine(5)
    start = engine.state.weights.copy()
    r = open_secure_round(engine)
    device = ids(5)[0]
    before = (dict(engine.state.counters), set(engine.current.masked) if engine.current else None)
    outcome = engine.handle(TOPICS.update(device), plain_update(device, r.manifest, 1000), r.now)
    assert (outcome.accepted, outcome.reason) == (False, RejectReason.WRONG_KIND)
    assert engine.state.rejected_total == {"wrong_kind": 1}
    assert engine.current is not None and engine.current.rejected == Counter({"wrong_kind": 1})
    assert (dict(engine.state.counters), set(engine.current.masked)) == before
    assert engine.current.secure is not None and engine.current.secure.accepted == Counter()
    # The round goes on as if it had never arrived, and the device's real counter 1 still counts.
    record = r.run()
    assert record.outcome == "aggregated" and record.rejected == {"wrong_kind": 1}
    check_aggregate(r, start, list(ids(5)))


def test_a_secagg_message_outside_a_secure_round_is_refused() -> None:
    """A plain engine keeps its rules: a ``secagg_*`` frame is ``wrong_kind`` there."""
    engine = RoundEngine(
        FLEET,
        secure_settings_for(),
        MODEL_MANIFEST,
        MODEL_BYTES,
        AGGREGATOR_KEY,
        SIGNING_KEY,
        registry(ids(5)),
        initial_state(),
    )
    m = engine.open_round(T0).manifest
    assert m.secure_aggregation is None
    bind = SealedHeader(FLEET, ids(5)[0], m.round_id, 1, "secagg_advertise", m.version)
    frame = seal(bind, {"config_sha256": "0" * 64}, b"{}", box_key(ids(5)[0]), AGGREGATOR_KEY.public_key)
    assert engine.handle(TOPICS.update(ids(5)[0]), frame, T0 + 1).reason == RejectReason.WRONG_KIND


def test_the_message_bound_admits_the_largest_secure_message() -> None:
    # A masked input of 231 parameters in 32 bits is about 1.3 KB: over this configured bound.
    engine = secure_engine(4, max_update_bytes=1024)
    assert engine.message_limit() == 1024
    start = engine.state.weights.copy()
    r = open_secure_round(engine)
    assert engine.current is not None and engine.current.secure is not None
    assert engine.message_limit() == max_sealed_bytes(engine.current.secure.config) > 1024
    assert r.run().outcome == "aggregated"
    check_aggregate(r, start, list(ids(4)))
    assert engine.message_limit() == 1024  # between rounds: the configured bound again


def test_a_round_with_too_few_devices_opens_with_nobody_and_aborts_at_its_deadline() -> None:
    engine = secure_engine(2)  # enrolled < min_devices: every enrolled device would be selected
    pub = engine.open_round(T0)
    m = pub.manifest
    # Never a plain round: nobody is asked for an update.
    assert (m.phase, m.selected_devices, m.secure_aggregation, pub.secagg) == ("train", (), None, ())
    assert not engine.round_due(T0 + 1)  # the next round opens later, not in a loop
    assert engine.round_due(m.deadline)
    record = engine.close_round()
    assert (record.outcome, record.failure, record.secure_aggregation) == (
        "aborted",
        SECURE_TOO_FEW_DEVICES,
        True,
    )
    assert SECURE_TOO_FEW_DEVICES == "secure aggregation needs at least 3 selected devices"
    assert engine.state.completed_rounds == 0


def test_a_threshold_the_protocol_does_not_allow_for_the_selection_aborts_the_round() -> None:
    engine = secure_engine(5, threshold=9)  # 5 devices: degree 4, so t <= 4
    m = engine.open_round(T0).manifest
    assert m.selected_devices == () and m.secure_aggregation is None
    record = engine.close_round()
    assert record.outcome == "aborted"
    assert record.failure == (
        "secure aggregation cannot open with 5 selected devices: bad_parameters: threshold must be "
        "> degree / 2, >= 2 and <= degree"
    )


def test_a_restarted_engine_clears_what_a_lost_secure_round_left_retained() -> None:
    first = secure_engine(4)
    lost = first.open_round(T0).manifest  # the process dies mid-round
    restarted = secure_engine(4, state=first.snapshot())
    pub = restarted.open_round(T0 + 10)
    clears = [p for p in pub.secagg if not p.payload]
    assert {p.topic for p in clears} == {TOPICS.secagg(lost.round_id, "config")} | {
        TOPICS.secagg_device(lost.round_id, d, what)
        for d in ids(4)
        for what in ("bundle", "delivery", "unmask")
    }
    assert pub.secagg[-1].topic == TOPICS.secagg(pub.manifest.round_id, "config")  # then the new round
    assert pub.manifest.version == lost.version + 1


def test_secure_aggregation_with_adaptive_clipping_is_refused_by_the_engine() -> None:
    from fedge.aggregator.privacy import AdaptiveClipping, PrivacyConfig

    with pytest.raises(FedgeError, match="adaptive clipping cannot run under secure aggregation"):
        RoundEngine(
            FLEET,
            secure_settings_for(),
            MODEL_MANIFEST,
            MODEL_BYTES,
            AGGREGATOR_KEY,
            SIGNING_KEY,
            registry(ids(5)),
            initial_state(),
            privacy=PrivacyConfig(noise_multiplier=1.0, adaptive=AdaptiveClipping(clip_count_stddev=1.0)),
            secure=SecureSettings(),
        )


# --- the [privacy] keys --------------------------------------------------------------------------------


def load(privacy: dict[str, Any], **rounds: Any) -> Any:
    round_settings = replace(RoundSettings(), **{"min_devices": 3, **rounds})
    return privacy_settings_from_table(Table({"privacy": privacy}, "privacy", PRIVACY_KEYS), round_settings)


def test_the_secure_aggregation_keys_and_their_defaults() -> None:
    off = load({})
    assert (off.secure_aggregation, off.secure_aggregation_bits, off.secure_aggregation_threshold) == (
        False,
        32,
        0,
    )
    assert secure_settings(off) is None
    on = load({"secure_aggregation": True, "secure_aggregation_bits": 48, "secure_aggregation_threshold": 5})
    assert secure_settings(on) == SecureSettings(bits=48, threshold=5)
    assert secure_settings(load({"secure_aggregation": True})) == SecureSettings(bits=32, threshold=0)
    for bits in (15, 63):
        with pytest.raises(ConfigError, match=r"secure_aggregation_bits must be an integer in 16\.\.62"):
            load({"secure_aggregation": True, "secure_aggregation_bits": bits})


@pytest.mark.parametrize(
    ("privacy", "rounds", "message"),
    [
        ({"enabled": True}, {}, SECURE_WITH_CENTRAL_NOISE),
        (
            {"enabled": True, "noise": "distributed_discrete_gaussian", "secure_aggregation_bits": 62},
            {},
            SECURE_DP_ADAPTIVE,
        ),
        (
            {"enabled": True, "noise": "distributed_discrete_gaussian", "adaptive_clipping": False},
            {},
            SECURE_DP_BITS,
        ),
        ({}, {"weighting": "examples"}, SECURE_WITH_EXAMPLES),
        ({}, {"min_devices": 2}, SECURE_MIN_DEVICES_MESSAGE),
        ({}, {"max_update_norm": 0.0, "update_norm_ratio": 0.0}, SECURE_NEEDS_BOUND),
        ({"secure_aggregation_threshold": 1}, {}, SECURE_THRESHOLD_ONE),
    ],
)
def test_what_secure_aggregation_cannot_do_is_refused_with_the_fix(
    privacy: dict[str, Any], rounds: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        load({"secure_aggregation": True, **privacy}, **rounds)
    assert str(refused.value) == message
    if privacy.get("noise") != "distributed_discrete_gaussian":
        load(privacy, **rounds)  # the same without secure aggregation loads
    else:
        with pytest.raises(ConfigError) as plain:
            load(privacy, **rounds)
        assert str(plain.value) == DISTRIBUTED_WITHOUT_SECURE


def test_the_refusal_messages_are_the_documented_ones() -> None:
    assert SECURE_WITH_CENTRAL_NOISE == (
        '[privacy] enabled with secure_aggregation needs noise = "distributed_discrete_gaussian": each '
        'device adds its share before masking (with "central" the aggregator would see the sum un-noised)'
    )
    assert "weighting" in SECURE_WITH_EXAMPLES and "each update counts once" in SECURE_WITH_EXAMPLES
    assert "min_devices >= 3" in SECURE_MIN_DEVICES_MESSAGE and "3" in SECURE_MIN_DEVICES_MESSAGE


def test_a_threshold_that_cannot_fit_a_fixed_selection_is_refused_at_load() -> None:
    with pytest.raises(ConfigError, match=r"devices_per_round = 5 devices: bad_parameters: threshold"):
        load({"secure_aggregation": True, "secure_aggregation_threshold": 5}, devices_per_round=5)
    assert load({"secure_aggregation": True, "secure_aggregation_threshold": 4}, devices_per_round=5)
    # Too narrow a modulus for the fleet: no headroom for the sum.
    with pytest.raises(ConfigError, match="headroom"):
        load({"secure_aggregation": True, "secure_aggregation_bits": 16}, devices_per_round=20_000)


# --- the service -----------------------------------------------------------------------------------------


def test_the_service_publishes_the_secure_documents_retained_after_the_manifest(
    tmp_path: Path, har_model_dir: Path
) -> None:
    """The MQTT shell, without a broker: its publish is recorded."""
    fleet = create_fleet(
        tmp_path,
        "sa",
        har_model_dir,
        "mqtt://127.0.0.1:9",
        {"watch-01": 1, "watch-02": 2, "watch-03": 3},
        {"min_devices": 3},
        privacy={"secure_aggregation": True, "secure_aggregation_bits": 40},
    )
    service = AggregatorService(load_aggregator_config(fleet.aggregator_config, {}))
    assert service.secure == SecureSettings(bits=40, threshold=0) and service.engine.secure == service.secure
    published: list[tuple[str, bytes, bool]] = []
    service._publish = lambda topic, payload, retain: published.append((topic, payload, retain))  # type: ignore[method-assign]
    if service.engine.state.normalisation is None:  # start in the train phase
        dim = service.engine.model_manifest.task.input_dim
        service.engine.state.normalisation = Normalisation((0.0,) * dim, (1.0,) * dim)
    now = 1_700_000_000.0
    service.clock = lambda: now
    pub = service.engine.open_round(now)
    service._announce(pub)
    m = pub.manifest
    assert m.secure_aggregation is not None and m.secure_aggregation.bits == 40
    topics = [topic for topic, _, _ in published]
    config_topic = service.topics.secagg(m.round_id, "config")
    assert topics.index(config_topic) == topics.index(service.topics.manifest) + 1
    assert all(retain for _, _, retain in published)
    # Nobody advertises: at the round's deadline the loop's tick ends the round and clears it.
    published.clear()
    now = m.deadline
    service._tick()
    assert published == [(config_topic, b"", True)]
    assert service.engine.round_due(now)
    record = service.engine.close_round()
    assert record.outcome == "aborted" and record.failure == "too_few_survivors"
    summary = influence_summary(record)
    assert "secure aggregation: 0 update(s) in the sum, 3 selected device(s) not in it" in summary


# --- differential privacy under secure aggregation ------------------------------------------------


def test_with_differential_privacy_devices_add_the_noise_and_the_aggregator_never_sees_it_alone() -> None:
    """Distributed discrete Gaussian: each device adds its share before masking, so the unmasked
    sum is already noised; the mean divides by the selected count; the accountant charges it."""
    from fedge.aggregator.privacy import PrivacyConfig, compute_epsilon

    n, z, clip = 7, 2.0, 0.05
    engine = RoundEngine(
        FLEET,
        secure_settings_for(min_devices=4),
        MODEL_MANIFEST,
        MODEL_BYTES,
        AGGREGATOR_KEY,
        SIGNING_KEY,
        registry(ids(n)),
        initial_state(),
        privacy=PrivacyConfig(noise_multiplier=z, clip_bound=clip, epsilon_budget=100.0),
        secure=SecureSettings(bits=62),
    )
    start = engine.state.weights.copy()
    updates = {d: delta(d, scale=0.01) for d in ids(n)}
    r = open_secure_round(engine, updates, stop_after={ids(n)[0]: "secagg_shares"})  # one drops
    m = r.manifest
    assert m.privacy is not None and m.secure_aggregation is not None
    assert (m.privacy.noise, m.privacy.clip_bound, m.secure_aggregation.clip_norm) == (
        "distributed_discrete_gaussian",
        clip,
        clip,
    )
    record = r.run()
    assert record.outcome == "aggregated" and (record.reported, record.dropped) == (6, 1)
    assert record.epsilon_spent == pytest.approx(compute_epsilon(z, 1.0, 1, 1e-5))
    assert engine.accountant is not None and engine.accountant.rounds == 1
    # What the weights moved by, against the clean mean over the selected count: the noise of
    # six shares (each min_devices' part of the planned variance), over 7, in float units.
    config = round_config_for(m)
    plan = noise_plan(m.privacy, config, m.min_devices)
    clean = sum(clip_to_norm(updates[d], clip) for d in ids(n)[1:]) / n
    noise = engine.state.weights.astype(np.float64) - start - clean
    expected_std = plan.float_stddev * math.sqrt(6 / 4) / n
    assert float(np.std(noise)) == pytest.approx(expected_std, rel=0.15)
    assert abs(float(np.mean(noise))) < 4 * expected_std / math.sqrt(P)
    assert sum_correction(plan) < 1e-300


def test_the_modulus_must_hold_the_noise_or_the_round_does_not_open() -> None:
    from fedge.aggregator.privacy import PrivacyConfig

    engine = RoundEngine(
        FLEET,
        secure_settings_for(),
        MODEL_MANIFEST,
        MODEL_BYTES,
        AGGREGATOR_KEY,
        SIGNING_KEY,
        registry(ids(5)),
        initial_state(),
        privacy=PrivacyConfig(noise_multiplier=2.0, clip_bound=0.05, epsilon_budget=100.0),
        secure=SecureSettings(bits=32),
    )
    pub = engine.open_round(T0)
    assert pub.manifest.selected_devices == () and pub.manifest.secure_aggregation is None
    assert engine.round_due(pub.manifest.deadline)
    record = engine.close_round()
    assert record.outcome == "aborted" and record.failure is not None
    assert record.failure.endswith("(secure_aggregation_bits = 62)")
    assert engine.accountant is not None and engine.accountant.rounds == 0  # nothing released
