"""``docs/asyncapi.yaml`` is a valid AsyncAPI 3.0.0 document (checked with AsyncAPI's own JSON
Schema, npm ``@asyncapi/specs``), covers every topic of :class:`FleetTopics`, agrees with the
broker's ACL, and its payload schemas accept what the code builds and refuse drift."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from jsonschema import Draft7Validator
from paho.mqtt.client import topic_matches_sub

from fedge.aggregator.fleet_summary import DeviceSeen, build_fleet_summary
from fedge.protocol.statuses import device_status, offline_will
from fedge.protocol.topics import FleetTopics
from fedge.tools.broker_config import FleetAccess, Principal
from support.asyncapi import DOCUMENT, asyncapi_schema, load_document

T = FleetTopics("f1")
SHA = "ab" * 32
APPLICATIONS = {"agent", "aggregator", "aggregator-worker", "bms", "monitor", "edgex-service"}


def test_the_document_is_valid_asyncapi_3() -> None:
    doc = load_document()
    assert doc.raw["asyncapi"] == "3.0.0"
    validator = Draft7Validator(asyncapi_schema("3.0.0"))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc.raw)]
    assert errors == []


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if "$ref" in node else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_every_reference_resolves_and_every_payload_schema_is_a_json_schema() -> None:
    doc = load_document()
    for ref in _refs(doc.raw):
        doc.resolve(ref)  # KeyError names the broken one
    for schema in doc.raw["components"]["schemas"].values():
        Draft7Validator.check_schema(schema)  # SchemaError names the problem


def test_every_fleet_topic_is_exactly_one_channel() -> None:
    doc = load_document()
    topics = {
        "manifest": T.manifest,
        "blob": T.blob(SHA),
        "blobChunk": T.blob_chunk(SHA, 3),
        "keyRotation": T.rotation(1),
        "rollout": T.rollout,
        "rolloutDecision": T.rollout_decision,
        "aggregatorStatus": T.aggregator_status,
        "fleetSummary": T.fleet_summary,
        "update": T.update("watch-01"),
        "deviceStatus": T.status("watch-01"),
        "insight": getattr(T, "insight", lambda d: f"{T.base}/insight/{d}")("watch-01"),
        "secaggConfig": T.secagg("r0003-v7", "config"),
        "secaggRelay": T.secagg_device("r0003-v7", "watch-01", "bundle"),
        "identity": T.identity("watch-01"),
        "aggregatorWork": T.work,
        "aggregatorPartial": T.partial("worker-1"),
        "partialVerdict": T.verdict("worker-1"),
        "edgexDeviceEvents": "edgex/events/device/device-imu/wearable-imu/watch-01/imu",
        "edgexCoreEvents": "edgex/events/core/core-data/wearable-imu/watch-01/imu",
    }
    assert set(topics) == set(doc.channels)
    for key, topic in topics.items():
        channel = doc.channel_for(topic)
        assert channel is not None and channel.key == key, topic
    for what in ("delivery", "unmask"):
        relay = doc.channel_for(T.secagg_device("r0003-v7", "watch-01", what))
        assert relay is not None and relay.key == "secaggRelay", what
    for stray in (
        f"{T.base}/status/a/b",
        f"{T.base}/blob/xyz",
        f"{T.base}/aggregator/other",
        "fedge/v1/f1",
        f"{T.base}/secagg/r0003-v7/other/watch-01",
        f"{T.base}/secagg/r0003-v7/bundle",
    ):
        assert doc.channel_for(stray) is None, stray


def test_operations_name_their_application_and_every_fedge_channel_has_a_sender_and_a_receiver() -> None:
    doc = load_document()
    ops = doc.raw["operations"].values()
    assert {op["x-fedge-application"] for op in ops} <= APPLICATIONS
    for key in doc.channels:
        actions = {op["action"] for op in ops if op["channel"]["$ref"] == f"#/channels/{key}"}
        assert actions == {"send", "receive"}, key
    for op in ops:
        if op["action"] == "send":
            mqtt = op["bindings"]["mqtt"]
            assert {"qos", "retain"} <= set(mqtt), op
    # What docs/protocol.md's table says: everything the fleet publishes is QoS 1, all but
    # updates and the replicas' partials and verdicts retained.
    fedge = {k: c for k, c in doc.channels.items() if not k.startswith("edgex")}
    assert {k: c.send_bindings for k, c in fedge.items() if not c.retained} == {
        "update": frozenset({("agent", 1, False)}),
        "aggregatorPartial": frozenset({("aggregator-worker", 1, False)}),
        "partialVerdict": frozenset({("aggregator", 1, False)}),
    }
    assert all(qos == 1 for c in fedge.values() for _, qos, _ in c.send_bindings)


def _sample(address: str) -> str:
    return (
        address.replace("{fleet}", "f1")
        .replace("{device_id}", "watch-01")
        .replace("{sha256}", SHA)
        .replace("{chunk_index}", "000003")
        .replace("{seq}", "000001")
        .replace("{round_id}", "r0003-v7")
        .replace("{document}", "bundle")
        .replace("{worker_id}", "worker-1")
    )


@pytest.mark.parametrize(
    "application,role",
    [("bms", "bms"), ("aggregator", "aggregator"), ("aggregator-worker", "aggregator-worker")],
)
def test_what_an_application_sends_and_receives_is_what_the_acl_grants_it(
    application: str, role: str
) -> None:
    doc = load_document()
    access = FleetAccess("f1", ("watch-01",), aggregator="agg", bms=("bms-1",), workers=("worker-1",))
    name = {"aggregator": "agg", "bms": "bms-1", "aggregator-worker": "worker-1"}[role]
    rules = access.rules(Principal(name, role))
    fedge = {k: c for k, c in doc.channels.items() if not k.startswith("edgex")}
    for action, access_kind in (("receive", "read"), ("send", "write")):
        documented = {
            op["channel"]["$ref"].rsplit("/", 1)[-1]
            for op in doc.raw["operations"].values()
            if op["x-fedge-application"] == application and op["action"] == action
        }
        granted = {
            key
            for key, channel in fedge.items()
            if any(
                a in (access_kind, "readwrite") and topic_matches_sub(f, _sample(channel.address))
                for a, f in rules
            )
        }
        assert documented == granted, (application, action)


def _channel(key: str) -> Any:
    return load_document().channels[key]


def _values() -> dict[str, Any]:
    return {
        "model_version": 3,
        "round_id": "r-0003",
        "ready": True,
        "samples": 800,
        "holdout_samples": 200,
        "runtime": "ai_edge_litert",
        "outbox_pending": 0,
        "outbox_dropped_total": 0,
        "rejected_manifests": {"expired": 1},
        "messages_dropped": {},
        "last_error": None,
        "data": {"device": "watch-01", "stored_samples": 1000},
        "insights": {"publish": "change", "published": 3, "skipped": {}, "last": None},
        "personalisation": {
            "personal_version": 3,
            "epochs": 5,
            "trained_examples": 800,
            "seconds": 0.02,
            "metric": "accuracy",
            "holdout_samples": 200,
            "global": 0.81,
            "personal": 0.93,
        },
        "rollout": {
            "sequence": 4,
            "action": "promote",
            "promoted_version": 3,
            "predicting_version": 3,
            "refused": {"replayed": 1},
        },
        "time": 1_700_000_000.5,
    }


def test_device_statuses_and_the_last_will_match_and_drift_is_refused() -> None:
    channel = _channel("deviceStatus")
    channel.validate(T.status("watch-01"), offline_will("watch-01"))
    status = device_status("watch-01", "idle", **_values())
    channel.validate(T.status("watch-01"), json.dumps(status).encode())
    for broken in (
        {**status, "predictions": {}},  # a key the schema does not list
        {k: v for k, v in status.items() if k != "samples"},  # a key missing
        {**status, "state": "sleeping"},
        {**status, "schema": "fedge.device-status/2"},
        {**status, "personalisation": {**status["personalisation"], "f1": 0.9}},  # not in the schema
    ):
        with pytest.raises(AssertionError):
            channel.validate(T.status("watch-01"), json.dumps(broken).encode())


AGGREGATOR_STATUS = {
    "schema": "fedge.aggregator-status/1",
    "fleet": "f1",
    "state": "running",
    "phase": "train",
    "version": 4,
    "completed_rounds": 2,
    "rounds": 20,
    "round_id": "r-0003",
    "deadline": 1_700_000_060.0,
    "selected": 2,
    "reported": ["watch-01"],
    "refused": [],
    "rejected_total": {"late": 1},
    "limits": {
        "max_message_bytes": 25884,
        "weighting": "equal",
        "weight_cap": None,
        "norm_bound": 1.5,
        "norm_bound_hard": None,
        "norm_policy": "clip",
        "moments_aggregation": "robust",
    },
    "history": [
        {
            "round_number": 2,
            "round_id": "r-0002",
            "phase": "train",
            "outcome": "aggregated",
            "version": 3,
            "selected": 2,
            "reported": 2,
            "examples": 1600,
            "train_loss": 0.8,
            "fed_eval_loss": 0.9,
            "fed_eval_accuracy": 0.7,
            "fed_eval_examples": 400,
            "fed_eval_mse": None,
            "fed_eval_metric": "accuracy",
            "rejected": {},
        }
    ],
    "eval_metric": "accuracy",
    "privacy": None,
    "time": 1_700_000_001.0,
    "generation": 1,
    "online_devices": ["watch-01", "watch-02"],
    "not_ready_devices": [],
    "inbox_overflow": 0,
    "messages_dropped": {},
    "inbox": {
        "messages": 0,
        "bytes": 0,
        "max_messages": 100000,
        "max_bytes": 67108864,
        "deferred": 0,
        "redeliveries": 0,
    },
    "state_dir": {"problem": None, "failed_writes": {"full": 0, "read_only": 0}},
    "replicas": None,
    "upstream": None,
    "rollout": {
        "gate": True,
        "margin": 0.01,
        "metric": "accuracy",
        "promoted_version": 3,
        "promoted_value": 0.7,
        "promoted_validation": None,
        "validation_examples": None,
        "candidate": 4,
        "sequence": 2,
        "promoted": 1,
        "refused": 1,
        "rolled_back": 0,
        "kept_versions": [3],
        "last_decision": {
            "sequence": 2,
            "action": "refuse",
            "version": 4,
            "value": 0.61,
            "promoted_version": 3,
            "previous_version": 3,
            "issued_at": 1_700_000_000.0,
            "reason": "accuracy 0.61 not >= 0.69 (v3's 0.7, margin 0.01)",
        },
        "request_errors": 0,
    },
}


def test_the_fleet_summary_the_aggregator_builds_matches_its_schema() -> None:
    channel = _channel("fleetSummary")
    seen = {
        "watch-01": DeviceSeen("idle", True, 1_700_000_000.0),
        "watch-02": DeviceSeen("offline", True, 0.0),
    }
    summary = build_fleet_summary(
        AGGREGATOR_STATUS, seen, ["watch-01", "watch-02", "watch-03"], 1_700_000_010.0
    )
    channel.validate(T.fleet_summary, json.dumps(summary).encode())
    channel.validate(
        T.fleet_summary,
        json.dumps(build_fleet_summary({**AGGREGATOR_STATUS, "history": []}, {}, [], 0.0)).encode(),
    )
    with pytest.raises(AssertionError):
        channel.validate(T.fleet_summary, json.dumps({**summary, "extra": 1}).encode())
    _channel("aggregatorStatus").validate(T.aggregator_status, json.dumps(AGGREGATOR_STATUS).encode())
    with pytest.raises(AssertionError):
        _channel("aggregatorStatus").validate(
            T.aggregator_status,
            json.dumps({k: v for k, v in AGGREGATOR_STATUS.items() if k != "schema"}).encode(),
        )


def test_the_status_of_a_fleet_with_differential_privacy_matches_its_schema() -> None:
    """``privacy`` as the engine builds it, after a charged round (not a hand-written copy)."""
    from fedge.aggregator.privacy import AdaptiveClipping, PrivacyConfig
    from fedge.aggregator.round_engine import RoundEngine
    from support.engine_helpers import (
        AGGREGATOR_KEY,
        FLEET,
        MODEL_BYTES,
        MODEL_MANIFEST,
        SIGNING_KEY,
        devices,
        initial_state,
        registry,
        settings,
    )

    dp = PrivacyConfig(noise_multiplier=2.0, adaptive=AdaptiveClipping(clip_count_stddev=2.0))
    engine = RoundEngine(
        FLEET,
        settings(),
        MODEL_MANIFEST,
        MODEL_BYTES,
        AGGREGATOR_KEY,
        SIGNING_KEY,
        registry(),
        initial_state(),
        dp,
    )
    m = engine.open_round(1_700_000_000.0).manifest
    for device in devices().values():
        assert engine.handle(device.topic, device.update(m), 1_700_000_001.0).accepted
    engine.close_round()
    privacy = engine.status(1_700_000_002.0)["privacy"]
    assert privacy["rounds_charged"] == 1 and privacy["epsilon_spent"] > 0
    _channel("aggregatorStatus").validate(
        T.aggregator_status, json.dumps({**AGGREGATOR_STATUS, "privacy": privacy}).encode()
    )
    with pytest.raises(AssertionError):
        _channel("aggregatorStatus").validate(
            T.aggregator_status,
            json.dumps({**AGGREGATOR_STATUS, "privacy": {**privacy, "extra": 1}}).encode(),
        )


def test_the_status_of_a_fleet_with_secure_aggregation_matches_its_schema() -> None:
    """``limits.secure_aggregation`` as the engine builds it, idle and in a round, and a secure
    round's record (not hand-written copies)."""
    from fedge.aggregator.privacy_config import SecureSettings
    from fedge.aggregator.round_engine import RoundEngine
    from support.engine_helpers import (
        AGGREGATOR_KEY,
        FLEET,
        MODEL_BYTES,
        MODEL_MANIFEST,
        SIGNING_KEY,
        initial_state,
        registry,
        settings,
    )

    engine = RoundEngine(
        FLEET,
        settings(min_devices=3),
        MODEL_MANIFEST,
        MODEL_BYTES,
        AGGREGATOR_KEY,
        SIGNING_KEY,
        registry(),
        initial_state(),
        secure=SecureSettings(),
    )
    idle = engine.status(1_700_000_000.0)
    m = engine.open_round(1_700_000_000.0).manifest
    running = engine.status(1_700_000_001.0)
    assert running["limits"]["secure_aggregation"]["phase"] == "advertise"
    engine.close_round()
    record = engine.status(m.deadline)["history"][-1]
    assert record["secure_aggregation"] is True and record["outcome"] == "aborted"
    channel = _channel("aggregatorStatus")
    for status in (idle, running):
        channel.validate(
            T.aggregator_status, json.dumps({**AGGREGATOR_STATUS, "limits": status["limits"]}).encode()
        )
    channel.validate(T.aggregator_status, json.dumps({**AGGREGATOR_STATUS, "history": [record]}).encode())
    broken = {**running["limits"], "secure_aggregation": {**running["limits"]["secure_aggregation"], "x": 1}}
    with pytest.raises(AssertionError):
        channel.validate(T.aggregator_status, json.dumps({**AGGREGATOR_STATUS, "limits": broken}).encode())


INSIGHT: dict[str, Any] = {
    "schema": "fedge.insight/1",
    "device_id": "watch-01",
    "fleet": "f1",
    "window": {"start": 1_700_000_000.0, "end": 1_700_000_002.56},
    "published_at": 1_700_000_002.6,
    "model": {"version": 7, "generation": 1, "round_id": "r-0006", "sha256": SHA},
    "task": {"name": "har-watch", "kind": "classification"},
    "prediction": {"label": "walking", "class_index": 1, "probabilities": {"sitting": 0.05, "walking": 0.95}},
    "source": {"edgex_device": "watch-01", "resources": ["accel_x", "accel_y"]},
}


def test_insights_of_both_task_kinds_match_and_a_broken_one_does_not() -> None:
    channel = _channel("insight")
    topic = f"{T.base}/insight/watch-01"
    channel.validate(topic, json.dumps(INSIGHT).encode())
    regression = copy.deepcopy(INSIGHT)
    regression["task"]["kind"] = "regression"
    regression["prediction"] = {"value": 21.5, "units": "degC"}
    channel.validate(topic, json.dumps(regression).encode())
    channel.validate(topic, json.dumps({**INSIGHT, "future_key": 1}).encode())  # open for now
    broken = copy.deepcopy(INSIGHT)
    del broken["prediction"]["class_index"]
    with pytest.raises(AssertionError):
        channel.validate(topic, json.dumps(broken).encode())


def test_binary_channels_check_frames_and_blob_hashes() -> None:
    import hashlib

    blob = b"\x00\x01weights"
    sha = hashlib.sha256(blob).hexdigest()
    _channel("blob").validate(T.blob(sha), blob)
    _channel("blob").validate(T.blob(sha), b"")  # a cleared retained blob
    with pytest.raises(AssertionError, match="hash"):
        _channel("blob").validate(T.blob(SHA), blob)
    signed = b"FEDG\x01\x03\x00\x00" + bytes(8)
    _channel("manifest").validate(T.manifest, signed)
    with pytest.raises(AssertionError, match="kind"):
        _channel("update").validate(T.update("watch-01"), signed)
    with pytest.raises(AssertionError, match="not a retained channel"):
        _channel("update").validate(T.update("watch-01"), b"")
    assert DOCUMENT.name == "asyncapi.yaml"
