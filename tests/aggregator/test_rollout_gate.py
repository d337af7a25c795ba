"""The rollout gate (issue 19, part 3): a candidate is promoted only when it is not worse than the
promoted model by more than the margin; every decision is signed and numbered; a rollback is an
explicit, newer decision; the state and the promoted weights survive a restart."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from nacl.signing import SigningKey

from fedge.aggregator.rollout import (
    REQUEST_FILE,
    ROLLOUT_DIR,
    Candidate,
    GateState,
    Rollout,
    RolloutGate,
    RolloutSettings,
    not_worse,
    read_gate_state,
    request_rollback,
)
from fedge.aggregator.rollout_validation import ValidationSet
from fedge.protocol.config_source import ConfigError
from fedge.protocol.errors import FedgeError
from fedge.protocol.model_manifest import Normalisation
from fedge.protocol.rollout import (
    RolloutError,
    decision_from_dict,
    sign_decision,
    sign_rollback_request,
    verify_decision,
)
from fedge.protocol.signing import key_id
from fedge.protocol.task import TaskSpec
from fedge.protocol.topics import FleetTopics
from fedge.protocol.weights import weights_to_bytes

KEY = SigningKey(b"\x07" * 32)
TRUSTED = {key_id(KEY.verify_key): KEY.verify_key}
TOPICS = FleetTopics("fleet-r")
MODEL = "ab" * 32


def weights(version: int) -> bytes:
    return weights_to_bytes(np.full(8, float(version), np.float32))


def candidate(version: int, value: float | None, generation: int = 1, model: str = MODEL) -> Candidate:
    blob = weights(version)
    sha = hashlib.sha256(blob).hexdigest()
    return Candidate(version, f"r{version:04d}-v{version}", sha, len(blob), generation, model, value)


# --- the rule --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metric", "value", "promoted", "margin", "expected"),
    [
        ("accuracy", 0.80, 0.80, 0.0, True),  # equal is not worse
        ("accuracy", 0.79, 0.80, 0.01, True),  # exactly at the margin's edge
        ("accuracy", 0.7899, 0.80, 0.01, False),  # just beyond it
        ("accuracy", 0.95, 0.80, 0.0, True),
        ("mse", 0.101, 0.100, 0.01, True),  # 1 % worse with a 1 % margin
        ("mse", 0.1011, 0.100, 0.01, False),
        ("mse", 0.05, 0.100, 0.0, True),  # lower MSE is better
        ("mse", 0.100001, 0.100, 0.0, False),
    ],
)
def test_not_worse_is_the_documented_rule(
    metric: str, value: float, promoted: float, margin: float, expected: bool
) -> None:
    assert not_worse(metric, value, promoted, margin) is expected


def test_first_evaluated_candidate_is_promoted_then_worse_refused_and_better_promoted() -> None:
    gate = RolloutGate(RolloutSettings(margin=0.01), "fleet-r", "accuracy", GateState())
    assert gate.judge(candidate(2, None), 10.0) is None  # not evaluated: nothing decided
    first = gate.judge(candidate(2, 0.60), 11.0)
    assert first is not None and (first.action, first.sequence, first.promoted_version) == ("promote", 1, 2)
    assert first.previous_version is None
    refused = gate.judge(candidate(3, 0.55), 12.0)
    assert refused is not None and (refused.action, refused.sequence, refused.version) == ("refuse", 2, 3)
    assert refused.promoted_version == 2 and refused.weights_sha256 == candidate(2, 0.6).weights_sha256
    assert "0.55 not >= 0.59" in refused.reason
    better = gate.judge(candidate(4, 0.595), 13.0)  # within the margin of v2's 0.60
    assert better is not None and (better.action, better.promoted_version, better.previous_version) == (
        "promote",
        4,
        2,
    )
    status = gate.status(5)
    counts = (status["promoted_version"], status["promoted"], status["refused"], status["candidate"])
    assert counts == (4, 2, 1, 5)
    assert status["kept_versions"] == [2, 4]


def test_mse_gate_compares_relative_and_the_same_weights_again_decide_nothing() -> None:
    gate = RolloutGate(RolloutSettings(margin=0.1), "fleet-r", "mse", GateState())
    assert gate.judge(candidate(2, 1.0), 1.0) is not None
    assert gate.judge(candidate(2, 5.0), 2.0) is None  # an aborted round's retry: the same weights
    refused = gate.judge(candidate(3, 1.11), 3.0)
    assert refused is not None and refused.action == "refuse"
    promoted = gate.judge(candidate(4, 1.1), 4.0)
    assert promoted is not None and promoted.action == "promote"


def test_a_new_generation_starts_afresh_and_old_versions_cannot_be_rolled_back_to() -> None:
    gate = RolloutGate(RolloutSettings(), "fleet-r", "accuracy", GateState())
    gate.judge(candidate(2, 0.9), 1.0)
    new_model = "cd" * 32
    d = gate.judge(candidate(9, 0.2, generation=2, model=new_model), 2.0)
    assert d is not None and d.action == "promote"
    assert d.reason == "the first evaluated model of its generation"
    with pytest.raises(FedgeError, match="cannot roll back to v2: it belongs to model generation 1"):
        gate.rollback(2, 2, new_model, 3.0)


def test_history_is_bounded_by_keep_and_rollback_needs_a_kept_version() -> None:
    gate = RolloutGate(RolloutSettings(margin=1.0, keep=2), "fleet-r", "accuracy", GateState())
    for v in (2, 3, 4):
        gate.judge(candidate(v, 0.5), float(v))
    assert [p.version for p in gate.state.history] == [3, 4]
    with pytest.raises(
        FedgeError, match=r"cannot roll back to v2: it is not one of the kept promoted versions \(v3"
    ):
        gate.rollback(2, 1, MODEL, 9.0)
    with pytest.raises(FedgeError, match="v4 is already the promoted version"):
        gate.rollback(4, 1, MODEL, 9.0)
    d = gate.rollback(3, 1, MODEL, 9.0)
    assert (d.action, d.sequence, d.version) == ("rollback", 4, 3)
    assert (d.promoted_version, d.previous_version) == (3, 4)


# --- the shell: files, signatures, publications -------------------------------------------------------


def make_rollout(state_dir: Path, settings: RolloutSettings | None = None) -> Rollout:
    return Rollout(settings or RolloutSettings(), state_dir, TOPICS, KEY, "accuracy")


def test_decisions_are_signed_published_and_survive_a_restart(tmp_path: Path) -> None:
    r = make_rollout(tmp_path)
    c2 = candidate(2, 0.7)
    pub = r.judge(c2, weights(2), c2.weights_sha256, 1.0)
    assert pub is not None
    topics = [t for t, _ in pub.items]
    assert topics == [TOPICS.blob(c2.weights_sha256), TOPICS.rollout, TOPICS.rollout_decision]
    decision = verify_decision(pub.items[1][1], TRUSTED, "fleet-r")
    assert (decision.action, decision.promoted_version) == ("promote", 2)
    assert decision.weights_sha256 == c2.weights_sha256
    assert r.kept_blob_topic() == TOPICS.blob(c2.weights_sha256)
    c3 = candidate(3, 0.1)
    refused = r.judge(c3, weights(3), c3.weights_sha256, 2.0)
    assert refused is not None and [t for t, _ in refused.items] == [TOPICS.rollout_decision]
    assert verify_decision(refused.items[0][1], TRUSTED, "fleet-r").action == "refuse"
    # A restart: the same sequence, the same promoted version, the same frames republished.
    again = make_rollout(tmp_path)
    assert again.gate.state.sequence == 2 and again.gate.state.promoted is not None
    assert [p for _, p in again.retained().items] == [weights(2), pub.items[1][1], refused.items[0][1]]
    # A better candidate moves the promotion on and clears the old promoted weights' blob.
    c4 = candidate(4, 0.8)
    moved = again.judge(c4, weights(4), c4.weights_sha256, 3.0)
    assert moved is not None
    assert (TOPICS.blob(c2.weights_sha256), b"") in moved.items
    assert sorted(p.name for p in (tmp_path / ROLLOUT_DIR).glob("weights-*.bin")) == sorted(
        f"weights-{c.weights_sha256}.bin" for c in (c2, c4)
    )


def test_weights_that_do_not_match_the_candidate_promote_nothing(tmp_path: Path) -> None:
    r = make_rollout(tmp_path)
    c2 = candidate(2, 0.7)
    assert r.judge(c2, weights(99), None, 1.0) is None
    assert r.judge(c2, None, None, 1.0) is None
    assert r.gate.state.sequence == 0


def test_gate_off_decides_nothing_and_clears_the_topics(tmp_path: Path) -> None:
    r = make_rollout(tmp_path, RolloutSettings(gate=False))
    c2 = candidate(2, 0.7)
    assert r.judge(c2, weights(2), None, 1.0) is None
    assert r.kept_blob_topic() is None
    assert r.retained().items == ((TOPICS.rollout, b""), (TOPICS.rollout_decision, b""))


def test_rollback_request_is_carried_out_signed_and_numbered(tmp_path: Path) -> None:
    r = make_rollout(tmp_path, RolloutSettings(margin=1.0))
    for v in (2, 3):
        c = candidate(v, 0.5)
        r.judge(c, weights(v), c.weights_sha256, float(v))
    (tmp_path / ROLLOUT_DIR / REQUEST_FILE).write_bytes(sign_rollback_request("fleet-r", 2, 5.0, KEY))
    pub = r.take_request(1, MODEL, candidate(3, 0.5).weights_sha256, 6.0)
    assert pub is not None and not (tmp_path / ROLLOUT_DIR / REQUEST_FILE).exists()
    frames = dict(pub.items)
    d = verify_decision(frames[TOPICS.rollout], TRUSTED, "fleet-r")
    assert (d.action, d.sequence, d.promoted_version, d.previous_version) == ("rollback", 3, 2, 3)
    assert frames[TOPICS.blob(candidate(2, 0.5).weights_sha256)] == weights(2)


def test_a_rollback_request_signed_by_another_key_is_refused_and_counted(tmp_path: Path) -> None:
    r = make_rollout(tmp_path)
    c = candidate(2, 0.5)
    r.judge(c, weights(2), c.weights_sha256, 1.0)
    other = SigningKey(b"\x09" * 32)
    (tmp_path / ROLLOUT_DIR / REQUEST_FILE).write_bytes(sign_rollback_request("fleet-r", 2, 5.0, other))
    assert r.take_request(1, MODEL, None, 6.0) is None
    assert r.status(None)["request_errors"] == 1
    assert r.gate.state.sequence == 1
    saved = read_gate_state(tmp_path)
    assert saved is not None and saved.last_decision is not None
    assert saved.last_decision["action"] == "rollback_refused"
    assert "which is not trusted" in saved.last_decision["reason"]


def test_request_rollback_refuses_an_unknown_version_with_the_kept_ones(tmp_path: Path) -> None:
    r = make_rollout(tmp_path)
    c = candidate(2, 0.5)
    r.judge(c, weights(2), c.weights_sha256, 1.0)
    with pytest.raises(FedgeError, match=r"cannot roll back to v7: the kept promoted versions are v2"):
        request_rollback(tmp_path, "fleet-r", KEY, 7, 0.0, 2.0)
    assert not (tmp_path / ROLLOUT_DIR / REQUEST_FILE).exists()


def test_request_rollback_without_a_running_aggregator_says_the_request_waits(tmp_path: Path) -> None:
    r = make_rollout(tmp_path, RolloutSettings(margin=1.0))
    for v in (2, 3):
        c = candidate(v, 0.5)
        r.judge(c, weights(v), c.weights_sha256, float(v))
    with pytest.raises(FedgeError, match="no answer from the aggregator within 0 s: the request waits in"):
        request_rollback(tmp_path, "fleet-r", KEY, 2, 0.0, 10.0)
    assert (tmp_path / ROLLOUT_DIR / REQUEST_FILE).exists()
    pub = r.take_request(1, MODEL, None, 11.0)  # the aggregator, when it runs
    assert pub is not None and read_gate_state(tmp_path) is not None


# --- the document ------------------------------------------------------------------------------------


def test_a_decision_document_is_refused_when_altered_or_incomplete() -> None:
    gate = RolloutGate(RolloutSettings(), "fleet-r", "accuracy", GateState())
    d = gate.judge(candidate(2, 0.5), 1.0)
    assert d is not None
    doc = d.to_dict()
    assert decision_from_dict(doc) == d
    with pytest.raises(RolloutError, match="unknown \\['extra'\\]"):
        decision_from_dict(doc | {"extra": 1})
    with pytest.raises(RolloutError, match="action must be one of"):
        decision_from_dict(doc | {"action": "install"})
    with pytest.raises(RolloutError, match="a promote decision must name the promoted version and weights"):
        decision_from_dict(doc | {"promoted_version": None, "weights_sha256": None})
    frame = bytearray(KEY.sign(b"x").signature)  # not a frame at all
    with pytest.raises(RolloutError):
        verify_decision(bytes(frame), TRUSTED, "fleet-r")
    with pytest.raises(RolloutError, match="a decision for fleet 'fleet-r', not 'other'"):
        verify_decision(sign_decision(d, KEY), TRUSTED, "other")
    with pytest.raises(RolloutError, match="not trusted"):
        verify_decision(sign_decision(d, SigningKey(b"\x01" * 32)), TRUSTED, "fleet-r")
    assert json.loads(json.dumps(doc)) == doc


# --- [rollout] validation_file ---------------------------------------------------------------------


def test_a_candidate_must_not_be_worse_on_the_validation_set_either() -> None:
    gate = RolloutGate(RolloutSettings(margin=0.01), "fleet-r", "accuracy", GateState())
    first = gate.judge(replace(candidate(2, 0.60), validation=0.70), 1.0)
    assert first is not None and (first.validation, first.promoted_validation) == (0.70, 0.70)
    # Better on the fleet, worse on the operator's set: refused, and the reason says where.
    refused = gate.judge(replace(candidate(3, 0.65), validation=0.50), 2.0)
    assert refused is not None and refused.action == "refuse"
    assert refused.reason == (
        "accuracy 0.65 >= 0.59 (v2's 0.6, margin 0.01); "
        "validation accuracy 0.5 not >= 0.69 (v2's 0.7, margin 0.01)"
    )
    # A round without a fleet evaluation (e.g. secure aggregation) is judged on the set alone.
    alone = gate.judge(replace(candidate(4, None), validation=0.72), 3.0)
    assert alone is not None and alone.action == "promote" and alone.promoted_value is None


def test_the_validation_set_scores_a_candidate_as_the_devices_litert_evaluation_does(
    tmp_path: Path, har_model_dir: Path, har_task: TaskSpec
) -> None:
    from fedge.agent.trainer import LiteRTTrainer, load_model_dir
    from fedge.lab import har_watch

    data = har_watch.load_devices(har_task, [8])[8]
    path = tmp_path / "validation.npz"
    np.savez(path, x=data.x, y=data.y)
    model, manifest = load_model_dir(har_model_dir)
    x = data.x.astype(np.float64)
    normalisation = Normalisation(tuple(x.mean(axis=0)), tuple(np.maximum(x.std(axis=0), 1e-6)))
    rng = np.random.default_rng(3)
    weights = (rng.normal(0, 0.3, manifest.parameter_count)).astype(np.float32)
    validation = ValidationSet(path, model, manifest)
    score = validation.evaluate(weights_to_bytes(weights), normalisation)
    oracle = LiteRTTrainer(model, manifest)
    oracle.normalisation = normalisation
    oracle.set_weights(weights)
    expected = oracle.evaluate(data.x, data.y).accuracy
    assert (
        expected is not None
        and score == pytest.approx(expected, abs=1e-9)
        and validation.size == data.x.shape[0]
    )
    # The shell: a candidate's score is in the signed decision and the status.
    r = Rollout(
        RolloutSettings(validation_file=path), tmp_path / "state", TOPICS, KEY, "accuracy", (model, manifest)
    )
    assert r.status(None)["validation_examples"] == data.x.shape[0]


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (
            {"x": np.zeros((3, 48)), "labels": np.zeros(3)},
            "must hold exactly the arrays x and y, not ['labels', 'x']",
        ),
        ({"x": np.zeros((3, 5)), "y": np.zeros(3, np.int64)}, "x must have shape (n >= 1, 48), not (3, 5)"),
        ({"x": np.full((3, 48), np.nan), "y": np.zeros(3, np.int64)}, "x must hold finite numbers"),
        ({"x": np.zeros((3, 48)), "y": np.zeros(2, np.int64)}, "y must have shape (3,), not (2,)"),
        ({"x": np.zeros((3, 48)), "y": np.array([0, 1, 7])}, "y must hold class indices 0..6"),
    ],
)
def test_a_bad_validation_file_is_one_line_naming_the_fix(
    tmp_path: Path, har_model_dir: Path, arrays: dict[str, np.ndarray], message: str
) -> None:
    from fedge.agent.trainer import load_model_dir

    path = tmp_path / "validation.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    model, manifest = load_model_dir(har_model_dir)
    with pytest.raises(ConfigError) as exc:
        ValidationSet(path, model, manifest)
    assert str(exc.value) == f"[rollout] validation_file {path}: {message}"
    assert "\n" not in str(exc.value)


def test_a_validation_file_that_is_not_an_npz_is_refused(tmp_path: Path, har_model_dir: Path) -> None:
    from fedge.agent.trainer import load_model_dir

    path = tmp_path / "validation.npz"
    path.write_text("x,y\n1,2\n")
    model, manifest = load_model_dir(har_model_dir)
    with pytest.raises(ConfigError, match=r"cannot be read as a \.npz of x and y"):
        ValidationSet(path, model, manifest)


def test_a_replica_that_wins_the_lease_continues_the_sequence_the_leader_left(tmp_path: Path) -> None:
    follower = make_rollout(tmp_path)  # started while another replica led (shared state_dir)
    leader = make_rollout(tmp_path)
    c2 = candidate(2, 0.7)
    leader.judge(c2, weights(2), c2.weights_sha256, 1.0)
    assert follower.gate.state.sequence == 0
    republished = follower.retained()  # what _run_rounds does first once it leads
    assert follower.gate.state.sequence == 1 and TOPICS.rollout in dict(republished.items)
    c3 = candidate(3, 0.8)
    d = follower.judge(c3, weights(3), c3.weights_sha256, 2.0)
    assert d is not None and verify_decision(dict(d.items)[TOPICS.rollout], TRUSTED, "fleet-r").sequence == 2
