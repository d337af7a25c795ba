"""``fedge.agent.secure_agent`` without a broker: the identity book, the round records on disk,
and :class:`SecureRounds`' refusals (a config that is not the manifest's, one signed by another
key, none at all, a round the device restarted in, documents of other rounds)."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from nacl.signing import SigningKey

from fedge.agent.core import Note, SecureUpdate, Send, StatusState
from fedge.agent.secure_agent import (
    IdentityBook,
    RevealedRecords,
    SecureIdentity,
    SecureRounds,
)
from fedge.protocol.identity import certify
from fedge.protocol.round_manifest import RoundManifest
from fedge.protocol.secagg.announcement import SecureAggregationAnnouncement
from fedge.protocol.secagg.wire import round_document
from fedge.protocol.secure_round_config import round_config_for
from fedge.protocol.signing import key_id
from support.engine_helpers import (
    AGGREGATOR_KEY,
    DEVICE_IDS,
    DEVICE_KEYS,
    FLEET,
    SIGNING_KEY,
    T0,
    TOPICS,
    P,
    make_engine,
)

DEVICE = DEVICE_IDS[0]
OPERATOR = SigningKey.generate()
OPERATORS = {key_id(OPERATOR.verify_key): OPERATOR.verify_key}
IDENTITY = {d: SigningKey.generate() for d in DEVICE_IDS}
SECURE = SecureAggregationAnnouncement(clip_norm=1.0, bits=32, degree=4, threshold=3)


def cert(
    device: str, key: SigningKey | None = None, operator: SigningKey = OPERATOR, fleet: str = FLEET
) -> bytes:
    return certify(operator, fleet, device, (key or IDENTITY[device]).verify_key, T0)


def secure_manifest() -> RoundManifest:
    base = make_engine(devices=DEVICE_IDS).open_round(T0).manifest
    return replace(
        base, issued_at=T0, deadline=T0 + 100, selected_devices=tuple(DEVICE_IDS), secure_aggregation=SECURE
    )


class Rounds:
    """A :class:`SecureRounds` with its counts, counters and records in ``tmp_path``."""

    def __init__(self, tmp_path: Path) -> None:
        self.counts: Counter[str] = Counter()
        self.counter = itertools.count(1)
        self.records = RevealedRecords(tmp_path)
        self.rounds = SecureRounds(
            fleet=FLEET,
            device_id=DEVICE,
            identity=SecureIdentity(IDENTITY[DEVICE], cert(DEVICE), OPERATORS),
            box_key=DEVICE_KEYS[DEVICE],
            aggregator_box_key=AGGREGATOR_KEY.public_key,
            aggregator_keys=lambda: {key_id(SIGNING_KEY.verify_key): SIGNING_KEY.verify_key},
            reserve_counter=lambda: next(self.counter),
            records=self.records,
            count=lambda reason, topic, detail: self.counts.update([reason]),
        )
        for d in DEVICE_IDS:
            assert self.rounds.offer(TOPICS.identity(d), cert(d)) is None

    def config(self, manifest: RoundManifest, key: SigningKey = SIGNING_KEY, **changes: object) -> None:
        config = replace(round_config_for(manifest), **changes)  # type: ignore[arg-type]
        document = round_document(FLEET, config, manifest.version, key)
        assert self.rounds.offer(TOPICS.secagg(manifest.round_id, "config"), document) is None


@pytest.fixture
def r(tmp_path: Path) -> Rounds:
    return Rounds(tmp_path)


def update(manifest: RoundManifest) -> SecureUpdate:
    return SecureUpdate(manifest, np.random.default_rng(1).normal(0, 0.1, P))


def test_the_config_already_retained_lets_the_device_advertise_at_once(r: Rounds, tmp_path: Path) -> None:
    m = secure_manifest()
    r.config(m)
    actions = r.rounds.begin(update(m), T0 + 10)
    sends = [a for a in actions if isinstance(a, Send)]
    assert [(s.kind, s.counter, s.round_id, s.topic) for s in sends] == [
        ("secagg_advertise", 1, m.round_id, TOPICS.update(DEVICE))
    ]
    assert r.rounds.round is not None and r.rounds.round_id == m.round_id
    # "Joined" is on disk before the advertisement left.
    assert json.loads((tmp_path / f"secagg-{m.round_id}.json").read_text())["revealed"] == {}
    assert r.counts == Counter()


def test_a_config_that_is_not_the_manifests_is_refused_and_counted(r: Rounds) -> None:
    m = secure_manifest()
    r.config(m, threshold=4)  # the aggregator bends one parameter the manifest fixed
    actions = r.rounds.begin(update(m), T0 + 10)
    assert not any(isinstance(a, Send) for a in actions)
    assert StatusState("idle") in actions and any(isinstance(a, Note) and a.problem for a in actions)
    assert r.counts == Counter({"secagg_config_mismatch": 1})
    assert r.rounds.round_id is None


def test_a_config_signed_by_another_key_is_counted_and_the_genuine_one_still_joins(r: Rounds) -> None:
    m = secure_manifest()
    r.config(m, key=SigningKey.generate())
    assert r.rounds.begin(update(m), T0 + 10) == []
    assert r.counts == Counter({"secagg_config_unknown_key": 1})
    r.config(m)
    assert r.rounds.has_work()
    assert [a.kind for a in r.rounds.turn(T0 + 11) if isinstance(a, Send)] == ["secagg_advertise"]


def test_without_a_config_before_the_advertising_deadline_the_round_is_given_up(r: Rounds) -> None:
    m = secure_manifest()
    assert r.rounds.begin(update(m), T0 + 10) == []
    assert r.rounds.turn(T0 + 39) == []
    actions = r.rounds.turn(T0 + 41)  # 40 % of the round: round_config_for's advertising deadline
    assert StatusState("idle") in actions and r.counts == Counter({"secagg_no_config": 1})


def test_a_round_the_device_restarted_in_is_not_answered(r: Rounds) -> None:
    m = secure_manifest()
    r.records.save(m.round_id, {})  # an earlier run joined it
    r.config(m)
    actions = r.rounds.begin(update(m), T0 + 10)
    assert not any(isinstance(a, Send) for a in actions)
    assert r.rounds.round is not None and r.rounds.round.resumed
    bundle = TOPICS.secagg_device(m.round_id, DEVICE, "bundle")
    assert r.rounds.offer(bundle, b"any document of the round") is None
    assert not any(isinstance(a, Send) for a in r.rounds.turn(T0 + 11, m.round_id))
    assert r.counts == Counter({"secagg_restarted_mid_round": 1})


def test_documents_of_other_rounds_are_dropped_silently_when_stale_and_counted_otherwise(r: Rounds) -> None:
    m = secure_manifest()
    old = TOPICS.secagg_device("r-old", DEVICE, "unmask")
    assert r.rounds.offer(old, b"late") is None
    assert r.rounds.turn(T0, current_round=m.round_id) == []
    assert r.counts == Counter()  # a later round is current: stale, silent
    assert r.rounds.offer(TOPICS.secagg_device(m.round_id, DEVICE, "bundle"), b"x") is None
    r.rounds.turn(T0, current_round=m.round_id)
    assert r.counts == Counter({"secagg_no_round": 1})  # its round, but the device is not in it
    other = TOPICS.secagg_device(m.round_id, "dev-b", "bundle")
    assert r.rounds.offer(other, b"x") == ("secagg_wrong_recipient", "a bundle document for dev-b")


def test_a_new_manifest_ends_the_round_and_removes_other_records(r: Rounds, tmp_path: Path) -> None:
    m = secure_manifest()
    r.config(m)
    r.rounds.begin(update(m), T0 + 10)
    r.records.save("r-older", {"dev-b": "self_mask"})
    assert r.rounds.drop_other_rounds(m.round_id) == []  # the same round: it goes on
    assert sorted(p.name for p in tmp_path.glob("secagg-*")) == [f"secagg-{m.round_id}.json"]
    actions = r.rounds.drop_other_rounds("r-next")
    assert StatusState("idle") in actions and r.rounds.round_id is None
    assert list(tmp_path.glob("secagg-*")) == []


def test_the_cleared_config_ends_the_round(r: Rounds) -> None:
    m = secure_manifest()
    r.config(m)
    r.rounds.begin(update(m), T0 + 10)
    assert r.rounds.offer(TOPICS.secagg(m.round_id, "config"), b"") is None
    assert StatusState("idle") in r.rounds.turn(T0 + 12)
    assert r.rounds.round_id is None


# --- the identity book -------------------------------------------------------------------------


def why(dropped: tuple[str, str] | None) -> str | None:
    return dropped[0] if dropped is not None else None


def test_the_identity_book_keeps_only_certificates_that_verify() -> None:
    book = IdentityBook(FLEET, OPERATORS, limit=3)
    assert book.offer(TOPICS.identity("dev-a"), cert("dev-a")) is None
    assert why(book.offer(TOPICS.identity("dev-c"), cert("dev-b"))) == "identity_wrong_device"
    assert why(book.offer(TOPICS.identity("dev-b"), cert("dev-b", fleet="fleet-2"))) == "identity_wrong_fleet"
    forger = SigningKey.generate()
    assert why(book.offer(TOPICS.identity("dev-b"), cert("dev-b", operator=forger))) == "identity_unknown_key"
    assert why(book.offer(TOPICS.identity("dev-b"), b"x" * 4096)) == "identity_too_large"
    assert why(book.offer(f"{TOPICS.base}/identity/a/b", cert("dev-b"))) == "identity_bad_topic"
    assert book.keys_for(DEVICE_IDS) == {"dev-a": IDENTITY["dev-a"].verify_key}
    # A bad certificate never replaces a good one; an empty payload removes it.
    assert book.offer(TOPICS.identity("dev-a"), cert("dev-a", operator=forger)) is not None
    assert book.keys_for(["dev-a"]) == {"dev-a": IDENTITY["dev-a"].verify_key}
    assert book.offer(TOPICS.identity("dev-a"), b"") is None and len(book) == 0
    for d in ("dev-a", "dev-b", "dev-c"):
        assert book.offer(TOPICS.identity(d), cert(d)) is None
    assert why(book.offer(TOPICS.identity("dev-d"), cert("dev-d"))) == "identity_too_many"
    assert book.offer(TOPICS.identity("dev-a"), cert("dev-a")) is None  # a known device: still fine


def test_a_record_that_cannot_be_read_means_the_round_is_not_answered(tmp_path: Path) -> None:
    records = RevealedRecords(tmp_path)
    assert records.load("r-1") is None
    records.save("r-1", {"dev-b": "mask_key"})
    assert records.load("r-1") == {"dev-b": "mask_key"}
    assert (tmp_path / "secagg-r-1.json").stat().st_mode & 0o777 == 0o600
    (tmp_path / "secagg-r-1.json").write_text("{not json")
    assert records.load("r-1") == {}
    (tmp_path / "secagg-r-1.json").write_text(json.dumps({"format": 1, "round_id": "r-2", "revealed": {}}))
    assert records.load("r-1") == {}
