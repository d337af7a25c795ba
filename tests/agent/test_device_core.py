"""The sans-I/O device core (``fedge.agent.core``) against the real, pure round engine.

Manifests, blobs and the sealed frames are genuine: the engine signs and publishes, the core
verifies, decides and seals, and the engine opens what the core sealed. No broker, no files.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from nacl.signing import SigningKey

from fedge.agent.core import (
    MAX_BLOB_BYTES,
    PLAIN_ROUND_REFUSED,
    SECAGG_NOT_CONFIGURED,
    TRANSITIONS,
    DeviceCore,
    DeviceCoreError,
    DeviceIdentity,
    DropOtherRounds,
    FetchBlobs,
    Load,
    ManifestRejected,
    Note,
    Outcome,
    Persist,
    Phase,
    RefuseRound,
    Reject,
    SecureUpdate,
    Send,
    StatusState,
    Train,
    check_blob,
    verify_manifest,
)
from fedge.agent.device_state import DeviceState
from fedge.aggregator.round_engine import Publication, RoundEngine
from fedge.protocol.round_manifest import RoundManifest
from fedge.protocol.secagg.announcement import SecureAggregationAnnouncement
from fedge.protocol.signing import DocType, key_id, sign_document
from support.engine_helpers import (
    AGGREGATOR_KEY,
    DEVICE_IDS,
    DEVICE_KEYS,
    FLEET,
    MODEL_BYTES,
    SIGNING_KEY,
    T0,
    TOPICS,
    P,
    data_for,
    initial_state,
    make_engine,
    settings,
)

DEVICE = DEVICE_IDS[0]
TRUSTED = {key_id(SIGNING_KEY.verify_key): SIGNING_KEY.verify_key}


def core(state: DeviceState | None = None, device: str = DEVICE) -> DeviceCore:
    identity = DeviceIdentity(FLEET, device, DEVICE_KEYS[device], AGGREGATOR_KEY.public_key)
    return DeviceCore(identity, state or DeviceState())


def moments_engine() -> tuple[RoundEngine, Publication]:
    engine = make_engine(settings(), initial_state(normalisation=None))
    return engine, engine.open_round(T0)


def train_engine() -> tuple[RoundEngine, Publication]:
    engine = make_engine()
    return engine, engine.open_round(T0)


def blob(pub: Publication, sha: str) -> bytes:
    """A blob of a publication (which keys them by topic), as the device receives it."""
    return pub.blobs[TOPICS.blob(sha)]


def types(actions: list[Any]) -> list[type]:
    return [type(a) for a in actions]


def fetch_and_load(c: DeviceCore, pub: Publication, now: float = T0 + 1) -> list[Any]:
    actions = c.manifest_arrived(pub.manifest_frame, TRUSTED, now)
    fetch = actions[-1]
    assert isinstance(fetch, FetchBlobs)
    return c.blobs_arrived({sha: blob(pub, sha) for sha in fetch.wanted}, now)


# --- the happy path, through the real engine ----------------------------------------------------


def test_an_accepted_manifest_is_persisted_then_stale_rounds_dropped_then_its_blobs_fetched() -> None:
    _, pub = train_engine()
    c = core()
    actions = c.manifest_arrived(pub.manifest_frame, TRUSTED, T0 + 1)
    m = pub.manifest
    assert actions == [
        Persist(DeviceState(manifest_version=m.version, manifest_sha256=m.sha256())),
        DropOtherRounds(m.round_id),
        FetchBlobs(frozenset({m.model_sha256, m.weights_sha256})),
    ]
    assert c.phase is Phase.FETCHING and c.pending == m and c.current is None


def test_a_selected_device_loads_then_trains_and_its_sealed_update_is_accepted_by_the_engine() -> None:
    engine, pub = train_engine()
    c = core()
    actions = fetch_and_load(c, pub)
    m = pub.manifest
    assert actions == [
        Load(m, MODEL_BYTES, blob(pub, m.weights_sha256)),
        StatusState("training"),
        Train(m, "update"),
    ]
    assert c.phase is Phase.TRAINING and c.current == m
    delta = np.full(P, 0.001, np.float32)
    sent = c.trained(delta, 120, 0.5, None, T0 + 2)
    assert types(sent) == [Persist, Send, Persist, StatusState]
    reserve, send, done, idle = sent
    assert isinstance(reserve, Persist) and isinstance(send, Send) and isinstance(done, Persist)
    # The counter is persisted before the frame that uses it is handed out.
    assert reserve.state.update_counter == send.counter == 1 and reserve.state.last_round_id is None
    assert done.state == replace(reserve.state, last_round_id=m.round_id)
    assert idle == StatusState("idle")
    assert (send.topic, send.round_id, send.kind) == (TOPICS.update(DEVICE), m.round_id, "update")
    outcome = engine.handle(send.topic, send.frame, T0 + 3)
    assert outcome.accepted, outcome
    assert c.phase is Phase.WAITING and c.pending is None


def test_moments_are_sealed_from_the_raw_training_features() -> None:
    engine, pub = moments_engine()
    assert pub.manifest.phase == "moments"
    c = core()
    assert fetch_and_load(c, pub)[-1] == Train(pub.manifest, "moments")
    sent = c.moments_computed(data_for(DEVICE, 50), T0 + 2)
    send = sent[1]
    assert isinstance(send, Send) and send.kind == "moments"
    assert engine.handle(send.topic, send.frame, T0 + 3).accepted


def test_counters_go_up_across_rounds_and_a_loaded_model_is_not_fetched_again() -> None:
    engine, pub = train_engine()
    c = core()
    fetch_and_load(c, pub)
    c.model_loaded(pub.manifest.model_sha256)  # what the shell reports after loading it
    first = c.trained(np.zeros(P, np.float32), 10, 0.1, None, T0 + 2)[1]
    for device in DEVICE_IDS[1:3]:  # the others answer too, so the round aggregates
        other = core(device=device)
        fetch_and_load(other, pub)
        engine.handle(
            TOPICS.update(device),
            other.trained(np.zeros(P, np.float32), 10, 0.1, None, T0 + 2)[1].frame,
            T0 + 2,
        )  # type: ignore[union-attr]
    assert engine.handle(first.topic, first.frame, T0 + 3).accepted  # type: ignore[union-attr]
    engine.close_round()
    nxt = engine.open_round(T0 + 10)
    actions = c.manifest_arrived(nxt.manifest_frame, TRUSTED, T0 + 11)
    assert actions[-1] == FetchBlobs(frozenset({nxt.manifest.weights_sha256}))
    loaded = c.blobs_arrived({nxt.manifest.weights_sha256: blob(nxt, nxt.manifest.weights_sha256)}, T0 + 11)
    assert loaded[0] == Load(nxt.manifest, None, blob(nxt, nxt.manifest.weights_sha256))
    second = c.trained(np.zeros(P, np.float32), 10, 0.1, None, T0 + 12)[1]
    assert isinstance(second, Send) and second.counter == 2
    assert engine.handle(second.topic, second.frame, T0 + 13).accepted


# --- not taking part ------------------------------------------------------------------------------


def test_a_device_not_selected_loads_the_model_and_goes_idle() -> None:
    engine = make_engine(settings(devices_per_round=2, min_devices=2))
    pub = engine.open_round(T0)
    device = next(d for d in DEVICE_IDS[:3] if not pub.manifest.is_selected(d))
    c = core(device=device)
    actions = fetch_and_load(c, pub)
    assert types(actions) == [Load, StatusState] and actions[1] == StatusState("idle")
    assert c.phase is Phase.WAITING


def test_a_round_already_answered_before_a_restart_is_not_answered_again() -> None:
    _, pub = train_engine()
    c = core(DeviceState(update_counter=4, last_round_id=pub.manifest.round_id))
    assert types(fetch_and_load(c, pub)) == [Load]
    assert c.phase is Phase.WAITING and c.state.update_counter == 4


def test_a_round_past_its_deadline_is_not_trained_and_a_late_result_is_not_sent() -> None:
    _, pub = train_engine()
    late = pub.manifest.deadline + 1
    c = core()
    actions = fetch_and_load(c, pub, now=late)
    assert types(actions) == [Load, Note]
    c2 = core()
    fetch_and_load(c2, pub)
    sent = c2.trained(np.zeros(P, np.float32), 10, 0.1, None, late)
    assert types(sent) == [Note, StatusState]
    assert "closed while training" in sent[0].text  # type: ignore[union-attr]
    assert c2.state.update_counter == 0  # no counter spent on an update never sent


# --- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("other_key", "unknown_key"),
        ("tampered", "bad_signature"),
        ("expired", "expired"),
        ("oversized", "too_large"),
    ],
)
def test_a_manifest_that_is_not_genuine_or_current_is_rejected_and_nothing_persisted(
    change: str, reason: str
) -> None:
    _, pub = train_engine()
    frame, now = pub.manifest_frame, T0 + 1
    trusted = TRUSTED
    if change == "other_key":
        other = SigningKey.generate().verify_key
        trusted = {key_id(other): other}
    elif change == "tampered":
        frame = frame[:-3] + bytes([frame[-3] ^ 1]) + frame[-2:]
    elif change == "expired":
        now = pub.manifest.expires_at + 1
    elif change == "oversized":
        frame = frame + b" " * (8 * 1024 * 1024)
    c = core()
    actions = c.manifest_arrived(frame, trusted, now)
    assert len(actions) == 1 and isinstance(actions[0], Reject)
    assert actions[0].reason == reason
    assert (actions[0].frame is not None) == (reason == "unknown_key")  # parked for a rotation
    assert c.state == DeviceState() and c.phase is Phase.WAITING


def test_another_fleets_manifest_is_refused_by_name() -> None:
    _, pub = train_engine()
    with pytest.raises(ManifestRejected) as info:
        verify_manifest(pub.manifest_frame, TRUSTED, fleet="other-fleet", now=None)
    assert info.value.reason == "wrong_fleet"


def test_an_older_manifest_is_a_rollback_and_a_repeat_of_the_current_one_is_ignored() -> None:
    engine, first = moments_engine()
    c = core()
    fetch_and_load(c, first)
    c.model_loaded(first.manifest.model_sha256)
    c.abandon()  # (the moments answer does not matter here)
    for device in DEVICE_IDS[:3]:
        d = core(device=device)
        fetch_and_load(d, first)
        send = d.moments_computed(data_for(device, 30), T0 + 1)[1]
        engine.handle(send.topic, send.frame, T0 + 1)  # type: ignore[union-attr]
    engine.close_round()
    second = engine.open_round(T0 + 5)
    fetch_and_load(c, second, now=T0 + 6)
    c.abandon()
    assert c.manifest_arrived(second.manifest_frame, TRUSTED, T0 + 7) == []  # retained re-delivery
    rejected = c.manifest_arrived(first.manifest_frame, TRUSTED, T0 + 7)
    assert types(rejected) == [Reject] and rejected[0].reason == "rollback"  # type: ignore[union-attr]
    assert c.state.manifest_version == second.manifest.version


def test_a_successor_that_names_another_parent_breaks_the_chain() -> None:
    _, pub = train_engine()
    m = pub.manifest
    c = core(DeviceState(manifest_version=m.version - 1, manifest_sha256="ab" * 32))
    actions = c.manifest_arrived(pub.manifest_frame, TRUSTED, T0 + 1)
    assert types(actions) == [Reject] and actions[0].reason == "broken_chain"  # type: ignore[union-attr]


def test_a_weights_blob_of_the_wrong_size_is_a_bad_blob() -> None:
    _, pub = train_engine()
    c = core()
    fetch = c.manifest_arrived(pub.manifest_frame, TRUSTED, T0 + 1)[-1]
    assert isinstance(fetch, FetchBlobs)
    blobs = {sha: blob(pub, sha) for sha in fetch.wanted}
    blobs[pub.manifest.weights_sha256] = blobs[pub.manifest.weights_sha256][:-4]
    assert c.blobs_arrived(blobs, T0 + 1) == [Reject("bad_blob", "weights blob has the wrong size")]
    assert c.phase is Phase.WAITING


def test_blobs_are_kept_only_when_wanted_whole_and_matching_their_topic() -> None:
    data = b"weights"
    sha = hashlib.sha256(data).hexdigest()
    assert check_blob(sha, data, {sha}) is None
    assert check_blob(sha, data, set()) == ("blob_unwanted", "no manifest being fetched names it")
    assert check_blob(sha, data + b"!", {sha}) == (
        "blob_hash_mismatch",
        "its SHA-256 is not the one in its topic",
    )
    big = b"\0" * (MAX_BLOB_BYTES + 1)
    big_sha = hashlib.sha256(big).hexdigest()
    assert check_blob(big_sha, big, {big_sha}) == ("blob_too_large", f"{len(big)} bytes > {MAX_BLOB_BYTES}")


# --- the state table ------------------------------------------------------------------------------


def test_events_a_phase_does_not_expect_are_errors_not_other_paths() -> None:
    _, pub = train_engine()
    c = core()
    with pytest.raises(DeviceCoreError, match="no round in hand in phase waiting"):
        c.blobs_arrived({}, T0)
    with pytest.raises(DeviceCoreError, match="no round in hand in phase waiting"):
        c.moments_computed(np.zeros((2, 48)), T0)
    fetch = c.manifest_arrived(pub.manifest_frame, TRUSTED, T0 + 1)[-1]
    assert isinstance(fetch, FetchBlobs)
    with pytest.raises(DeviceCoreError, match="still missing"):
        c.blobs_arrived({}, T0 + 1)
    with pytest.raises(DeviceCoreError, match="manifest_accepted is not expected in phase fetching"):
        c.manifest_arrived(pub.manifest_frame, TRUSTED, T0 + 1)
    assert c.superseded() == [] and c.phase is Phase.WAITING


def test_abandoning_a_round_in_training_waits_for_the_next_manifest() -> None:
    _, pub = train_engine()
    c = core()
    fetch_and_load(c, pub)
    assert c.abandon() is Phase.TRAINING
    assert c.phase is Phase.WAITING and c.pending is None
    assert c.blobs_missing.__doc__  # a documented event, like every other
    with pytest.raises(DeviceCoreError):
        c.trained(np.zeros(P, np.float32), 1, 0.0, None, T0 + 2)


def test_the_table_leads_back_to_waiting_from_every_phase() -> None:
    reachable = {Phase.WAITING}
    while True:
        more = {dst for (src, _), dst in TRANSITIONS.items() if src in reachable} - reachable
        if not more:
            break
        reachable |= more
    assert reachable == set(Phase)
    for phase in Phase:
        assert TRANSITIONS[(phase, Outcome.ABANDONED)] is Phase.WAITING
    forward = {k: v for k, v in TRANSITIONS.items() if v is not Phase.WAITING}
    assert forward == {
        (Phase.WAITING, Outcome.MANIFEST_ACCEPTED): Phase.FETCHING,
        (Phase.FETCHING, Outcome.TAKING_PART): Phase.TRAINING,
        (Phase.TRAINING, Outcome.NOT_ENOUGH_DATA): Phase.WAITING_FOR_DATA,
        (Phase.WAITING_FOR_DATA, Outcome.DATA_RETRY): Phase.TRAINING,
    }


# --- too few local samples ------------------------------------------------------------------------


def test_a_device_without_enough_data_keeps_the_round_and_trains_when_data_arrives() -> None:
    engine, pub = train_engine()
    c = core()
    assert fetch_and_load(c, pub)[-1] == Train(pub.manifest, "update")
    waiting = c.not_enough_data(1, 2)
    assert types(waiting) == [StatusState, Note] and waiting[0] == StatusState("not_ready")
    assert waiting[1].problem and "1 local sample(s), 2 needed" in waiting[1].text  # type: ignore[union-attr]
    assert c.phase is Phase.WAITING_FOR_DATA and c.state.update_counter == 0
    assert c.retry_data(T0 + 5) == [Train(pub.manifest, "update")]
    send = c.trained(np.zeros(P, np.float32), 10, 0.1, None, T0 + 6)[1]
    assert isinstance(send, Send) and send.counter == 1
    assert engine.handle(send.topic, send.frame, T0 + 7).accepted


def test_a_round_that_closes_while_waiting_for_data_is_given_up_and_a_new_manifest_replaces_it() -> None:
    _, pub = train_engine()
    c = core()
    fetch_and_load(c, pub)
    c.not_enough_data(0, 2)
    late = c.retry_data(pub.manifest.deadline + 1)
    assert types(late) == [Note, StatusState] and late[1] == StatusState("idle")
    assert c.phase is Phase.WAITING and c.state.update_counter == 0
    c2 = core()
    fetch_and_load(c2, pub)
    c2.not_enough_data(0, 2)
    with pytest.raises(DeviceCoreError, match="manifest_rejected is not expected in phase waiting_for_data"):
        c2.manifest_arrived(b"junk", TRUSTED, T0 + 2)
    assert c2.superseded() == [] and c2.phase is Phase.WAITING


# --- secure aggregation -------------------------------------------------------------------------

SECURE = SecureAggregationAnnouncement(clip_norm=1.0, bits=32, degree=4, threshold=3)


def secure_core(*, secure: bool = True, require: bool = False) -> DeviceCore:
    identity = DeviceIdentity(FLEET, DEVICE, DEVICE_KEYS[DEVICE], AGGREGATOR_KEY.public_key)
    return DeviceCore(identity, DeviceState(), secure_aggregation=secure, require_secure_aggregation=require)


def secure_round(pub: Publication) -> tuple[Publication, RoundManifest]:
    """The engine's round, announced as a secure one (re-signed with the aggregator's key)."""
    manifest = replace(pub.manifest, secure_aggregation=SECURE)
    frame = sign_document(DocType.ROUND_MANIFEST, manifest.to_dict(), SIGNING_KEY)
    return replace(pub, manifest=manifest, manifest_frame=frame), manifest


def test_a_secure_round_hands_the_delta_over_and_never_seals_a_plain_update() -> None:
    pub, m = secure_round(train_engine()[1])
    c = secure_core()
    assert fetch_and_load(c, pub)[-2:] == [StatusState("training"), Train(m, "update")]
    delta = np.full(P, 0.001, np.float32)
    actions = c.trained(delta, 120, 0.5, None, T0 + 2)
    assert types(actions) == [Persist, SecureUpdate]
    done, update = actions
    assert isinstance(done, Persist) and isinstance(update, SecureUpdate)
    # Handed over: a restart does not train for the round again; no counter spent, nothing sealed.
    assert done.state.last_round_id == m.round_id and done.state.update_counter == 0
    assert update.manifest == m and update.delta is delta
    assert not any(isinstance(a, Send) for a in actions)
    # The status stays "training" (the secure round runs on): the shell says when it is over.
    assert not any(isinstance(a, StatusState) for a in actions)
    assert c.phase is Phase.WAITING and c.pending is None


def test_a_secure_round_closed_while_training_hands_nothing_over() -> None:
    pub, m = secure_round(train_engine()[1])
    c = secure_core()
    fetch_and_load(c, pub)
    late = c.trained(np.zeros(P, np.float32), 1, 0.1, None, m.deadline + 1)
    assert types(late) == [Note, StatusState] and c.phase is Phase.WAITING


def test_a_device_without_an_identity_key_sits_a_secure_round_out_and_counts_it() -> None:
    pub, m = secure_round(train_engine()[1])
    c = secure_core(secure=False)
    actions = fetch_and_load(c, pub)
    assert types(actions) == [Load, RefuseRound, Note, StatusState]
    refused = actions[1]
    assert isinstance(refused, RefuseRound)
    assert (refused.round_id, refused.reason) == (m.round_id, SECAGG_NOT_CONFIGURED)
    assert "identity_key_file" in refused.detail
    assert actions[-1] == StatusState("idle") and c.phase is Phase.WAITING
    assert c.current == m  # the model is installed for predictions all the same


def test_require_secure_aggregation_refuses_a_plain_train_round_but_installs_its_model() -> None:
    _, pub = train_engine()
    c = secure_core(require=True)
    actions = fetch_and_load(c, pub)
    assert types(actions) == [Load, RefuseRound, Note, StatusState]
    refused = actions[1]
    assert isinstance(refused, RefuseRound) and refused.reason == PLAIN_ROUND_REFUSED == "plain_round_refused"
    note = actions[2]
    assert isinstance(note, Note) and note.problem and "require_secure_aggregation" in note.text
    assert c.phase is Phase.WAITING and c.current == pub.manifest
    assert c.state.update_counter == 0 and c.state.last_round_id is None


def test_require_secure_aggregation_takes_part_in_secure_rounds_and_moments_rounds() -> None:
    pub, m = secure_round(train_engine()[1])
    c = secure_core(require=True)
    assert fetch_and_load(c, pub)[-1] == Train(m, "update")
    assert types(c.trained(np.zeros(P, np.float32), 1, 0.1, None, T0 + 2)) == [Persist, SecureUpdate]
    # A moments round carries no update: it is not a plain round to refuse.
    _, moments = moments_engine()
    c = secure_core(require=True)
    assert fetch_and_load(c, moments)[-1] == Train(moments.manifest, "moments")


def test_requiring_secure_aggregation_without_an_identity_is_a_bug_of_the_caller() -> None:
    with pytest.raises(DeviceCoreError, match="identity key"):
        secure_core(secure=False, require=True)


def test_reserved_counters_are_persisted_first_and_shared_with_updates() -> None:
    engine, pub = train_engine()
    c = secure_core()
    reserved = [c.reserve_counter() for _ in range(4)]  # a secure round's four frames
    assert [p.state.update_counter for p in reserved] == [1, 2, 3, 4]
    assert c.state.update_counter == 4
    fetch_and_load(c, pub)
    send = c.trained(np.full(P, 0.001, np.float32), 10, 0.5, None, T0 + 2)[1]
    assert isinstance(send, Send) and send.counter == 5
    assert engine.handle(send.topic, send.frame, T0 + 3).accepted
