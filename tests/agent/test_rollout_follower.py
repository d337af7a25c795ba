"""The device's side of the rollout gate: a signed promotion is accepted, its weights fetched (by
size and SHA-256) and handed to predictions; an older decision replayed is refused and counted,
across restarts too; an operator's rollback (a newer decision naming an older version) is taken;
a cleared topic means the newest model again."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
from nacl.signing import SigningKey

from fedge.agent.rollout import RESUBSCRIBE_S, RolloutFollower
from fedge.aggregator.rollout import Candidate, GateState, RolloutGate, RolloutSettings
from fedge.protocol.rollout import RolloutDecision, sign_decision
from fedge.protocol.signing import key_id
from fedge.protocol.topics import FleetTopics
from fedge.protocol.weights import weights_to_bytes

KEY = SigningKey(b"\x05" * 32)
TRUSTED = {key_id(KEY.verify_key): KEY.verify_key}
TOPICS = FleetTopics("fleet-d")
MODEL = "ef" * 32


def blob(version: int) -> bytes:
    return weights_to_bytes(np.full(6, float(version), np.float32))


def candidate(version: int, value: float) -> Candidate:
    b = blob(version)
    return Candidate(version, f"r-v{version}", hashlib.sha256(b).hexdigest(), len(b), 1, MODEL, value)


class Device:
    def __init__(self, state_dir: Path) -> None:
        self.applied: list[tuple[int | None, bytes | None]] = []
        self.asked: list[str] = []
        self.done: list[str] = []
        self.follower = RolloutFollower(state_dir, TOPICS, self.apply)

    def apply(self, decision: RolloutDecision | None, weights: bytes | None) -> None:
        self.applied.append((decision.promoted_version if decision else None, weights))

    def receive(self, frame: bytes) -> None:
        assert self.follower.offer(frame) is None
        self.follower.turn(TRUSTED, self.asked.append)

    def blob_arrives(self, version: int) -> None:
        b = blob(version)
        assert self.follower.offer_blob(hashlib.sha256(b).hexdigest(), b)
        self.follower.turn(TRUSTED, self.asked.append, self.done.append)


def decisions() -> list[RolloutDecision]:
    gate = RolloutGate(RolloutSettings(margin=0.05), "fleet-d", "accuracy", GateState())
    made = [
        gate.judge(candidate(2, 0.6), 1.0),
        gate.judge(candidate(3, 0.4), 2.0),
        gate.judge(candidate(4, 0.7), 3.0),
    ]
    made.append(gate.rollback(2, 1, MODEL, 4.0))
    assert all(d is not None for d in made)
    return [d for d in made if d is not None]


def test_a_promotion_is_applied_once_its_checked_weights_are_in(tmp_path: Path) -> None:
    promote2, _, _, _ = decisions()
    device = Device(tmp_path)
    device.receive(sign_decision(promote2, KEY))
    assert device.asked == [TOPICS.blob(candidate(2, 0.6).weights_sha256)] and device.applied == []
    wrong = blob(9)
    assert not device.follower.offer_blob(candidate(2, 0.6).weights_sha256, wrong)  # another blob's bytes
    assert device.follower.refused == {"bad_weights": 1}
    device.blob_arrives(2)
    assert device.applied == [(2, blob(2))]
    assert device.done == [TOPICS.blob(candidate(2, 0.6).weights_sha256)]  # its subscription dropped
    device.receive(sign_decision(promote2, KEY))  # the retained copy again: nothing new
    assert device.applied == [(2, blob(2))] and "replayed" not in device.follower.refused
    report = device.follower.report(2)
    assert (
        report["sequence"],
        report["action"],
        report["promoted_version"],
        report["predicting_version"],
    ) == (
        1,
        "promote",
        2,
        2,
    )


def test_next_turn_at_is_the_resubscribe_while_the_weights_are_awaited_and_online(tmp_path: Path) -> None:
    """The agent's worker sleeps until then (no polling): the turn that asks again is due."""
    promote2, _, _, _ = decisions()
    device = Device(tmp_path)
    assert device.follower.next_turn_at(connected=True) is None  # nothing awaited
    before = time.monotonic()
    device.receive(sign_decision(promote2, KEY))
    due = device.follower.next_turn_at(connected=True)
    assert due is not None and before + RESUBSCRIBE_S <= due <= time.monotonic() + RESUBSCRIBE_S
    assert device.follower.next_turn_at(connected=False) is None  # offline: the reconnect asks
    device.blob_arrives(2)
    assert device.follower.next_turn_at(connected=True) is None


def test_refusals_are_not_served_and_an_old_promotion_replayed_is_refused_and_counted(tmp_path: Path) -> None:
    promote2, refuse3, promote4, rollback2 = decisions()
    device = Device(tmp_path)
    device.receive(sign_decision(refuse3, KEY))  # a refusal on the serving topic: not acted on
    assert device.follower.refused == {"not_serving": 1} and device.follower.sequence == 0
    device.receive(sign_decision(promote4, KEY))
    device.blob_arrives(4)
    device.receive(sign_decision(promote2, KEY))  # recorded earlier, published again: a replay
    assert device.follower.refused["replayed"] == 1
    assert device.applied == [(4, blob(4))] and device.follower.decision == promote4
    # After a restart, the replay is still refused (the sequence is on disk).
    again = Device(tmp_path)
    again.receive(sign_decision(promote2, KEY))
    assert again.follower.refused == {"replayed": 1} and again.follower.decision == promote4
    # The operator's rollback to v2 is a newer decision: accepted, v2's weights fetched again.
    again.receive(sign_decision(rollback2, KEY))
    again.blob_arrives(2)
    assert again.applied == [(2, blob(2))] and again.follower.report(2)["action"] == "rollback"


def test_forged_or_foreign_decisions_are_refused_by_reason(tmp_path: Path) -> None:
    promote2 = decisions()[0]
    device = Device(tmp_path)
    device.receive(sign_decision(promote2, SigningKey(b"\x06" * 32)))
    device.receive(b"not a frame")
    assert device.follower.offer(b"x" * 9000) == ("rollout_too_large", "9000 bytes > 8192")
    assert set(device.follower.refused) == {"unknown_key", "frame_truncated"}
    assert device.follower.sequence == 0 and device.applied == []


def test_a_cleared_topic_means_the_newest_model_again(tmp_path: Path) -> None:
    promote2 = decisions()[0]
    device = Device(tmp_path)
    device.receive(sign_decision(promote2, KEY))
    device.blob_arrives(2)
    device.receive(b"")
    assert device.applied == [(2, blob(2)), (None, None)] and device.follower.decision is None
    # The sequence stays: the old promotion cannot come back.
    device.receive(sign_decision(promote2, KEY))
    assert device.follower.refused == {"replayed": 1}


def test_on_change_publishes_the_first_prediction_after_a_rollback_even_if_unchanged() -> None:
    from fedge.agent.config import InsightSettings
    from fedge.agent.insight import InsightPolicy, Prediction

    policy = InsightPolicy(InsightSettings())
    walking = Prediction(label="walking", class_index=0, probabilities={"walking": 1.0})
    policy.published(1.0, 0.5, walking, 12, None, 11)  # installed v12, predicting with promoted v11
    assert policy.after_inference(walking, 12, None, 11) == "unchanged"
    assert policy.after_inference(walking, 12, None, 9) is None  # rolled back to v9: news
    assert policy.after_inference(walking, 12, None, None) is None  # the gate cleared: news


def test_a_decision_the_state_dir_cannot_record_is_not_taken(tmp_path: Path) -> None:
    promote2 = decisions()[0]
    blocker = tmp_path / "rollout.json"
    blocker.mkdir()  # the file cannot be written (as on a full or read-only state directory)
    device = Device(tmp_path)
    device.receive(sign_decision(promote2, KEY))
    assert device.follower.refused == {"state_dir": 1} and device.follower.sequence == 0
    assert device.asked == [] and device.applied == []
    blocker.rmdir()
    device.receive(sign_decision(promote2, KEY))  # the retained copy, once it can be recorded
    assert device.follower.sequence == 1 and len(device.asked) == 1
