"""A new model for a running fleet: model generations.

Pure parts first (two real round engines, the real device core), then the aggregator service
with two real model builds: the old checkpoint is refused with the fix named, continued with
``model_generation`` bumped, and never rolled back.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.agent.core import DeviceCore, DeviceIdentity, FetchBlobs, Persist
from fedge.agent.device_state import DeviceState
from fedge.aggregator.checkpoint import save_checkpoint
from fedge.aggregator.config import load_aggregator_config
from fedge.aggregator.round_engine import RoundEngine, start_generation
from fedge.aggregator.service import CHECKPOINT_FILE, AggregatorService, checkpoint_from_state
from fedge.lab.provision import create_fleet
from fedge.protocol.config_source import ConfigError
from fedge.protocol.errors import FedgeError
from fedge.protocol.signing import key_id
from support.engine_helpers import (
    AGGREGATOR_KEY,
    DEVICE_IDS,
    DEVICE_KEYS,
    FLEET,
    MODEL_BYTES,
    MODEL_MANIFEST,
    SIGNING_KEY,
    T0,
    TOPICS,
    P,
    initial_state,
    make_engine,
    registry,
    settings,
)
from support.tasks import task_variant

TRUSTED = {key_id(SIGNING_KEY.verify_key): SIGNING_KEY.verify_key}
NEW_MODEL = MODEL_BYTES + b"/generation-2"
NEW_MANIFEST = replace(
    MODEL_MANIFEST, model_sha256=hashlib.sha256(NEW_MODEL).hexdigest(), model_bytes=len(NEW_MODEL)
)


def second_generation(old: RoundEngine) -> RoundEngine:
    initial = replace(
        initial_state(weights=np.full(P, 0.5, np.float32)), model_sha256=NEW_MANIFEST.model_sha256
    )
    state = start_generation(old.snapshot(), 2, initial)
    return RoundEngine(
        FLEET, settings(), NEW_MANIFEST, NEW_MODEL, AGGREGATOR_KEY, SIGNING_KEY, registry(), state
    )


def test_a_new_generation_continues_the_chain_and_counters_and_starts_the_model_afresh() -> None:
    old = make_engine()
    old.open_round(T0)
    old.state.counters["dev-a"] = 7
    old.state.completed_rounds = 4
    old.state.history.append({"round_id": "r0004"})
    new = second_generation(old)
    s = new.state
    assert (s.version, s.last_manifest_sha256) == (old.state.version, old.state.last_manifest_sha256)
    assert s.counters == {"dev-a": 7} and s.generation == 2
    assert (s.completed_rounds, s.history) == (0, [])
    assert np.array_equal(s.weights, np.full(P, 0.5, np.float32))
    with pytest.raises(FedgeError, match="model generation 2 does not follow generation 2"):
        start_generation(s, 2, s)


def test_devices_accept_the_next_generation_from_their_signer_and_fetch_its_model() -> None:
    old = make_engine()
    first = old.open_round(T0)
    identity = DeviceIdentity(FLEET, DEVICE_IDS[0], DEVICE_KEYS[DEVICE_IDS[0]], AGGREGATOR_KEY.public_key)
    device = DeviceCore(identity, DeviceState())
    device.manifest_arrived(first.manifest_frame, TRUSTED, T0 + 1)
    device.blobs_arrived(
        {sha: first.blobs[TOPICS.blob(sha)] for sha in device.wanted},
        T0 + 1,
    )
    device.model_loaded(first.manifest.model_sha256)
    device.abandon()
    new = second_generation(old)
    pub = new.open_round(T0 + 10)
    assert pub.manifest.version == first.manifest.version + 1
    assert pub.manifest.parent_sha256 == first.manifest.sha256()
    # The signed manifest says which generation it is (what the device's predictions name).
    assert (first.manifest.generation, pub.manifest.generation) == (1, 2)
    assert "generation" not in first.manifest.to_dict() and pub.manifest.to_dict()["generation"] == 2
    actions = device.manifest_arrived(pub.manifest_frame, TRUSTED, T0 + 11)
    assert device.current is None or device.current.generation in (1, 2)
    assert isinstance(actions[0], Persist) and actions[0].state.manifest_version == pub.manifest.version
    assert actions[-1] == FetchBlobs(frozenset({NEW_MANIFEST.model_sha256, pub.manifest.weights_sha256}))


def test_an_update_for_the_previous_generation_is_refused() -> None:
    old = make_engine()
    first = old.open_round(T0)
    identity = DeviceIdentity(FLEET, DEVICE_IDS[0], DEVICE_KEYS[DEVICE_IDS[0]], AGGREGATOR_KEY.public_key)
    device = DeviceCore(identity, DeviceState())
    device.manifest_arrived(first.manifest_frame, TRUSTED, T0 + 1)
    device.blobs_arrived({sha: first.blobs[TOPICS.blob(sha)] for sha in device.wanted}, T0 + 1)
    stale = device.moments_computed(np.ones((10, 48)), T0 + 2) if first.manifest.phase == "moments" else None
    if stale is None:
        stale = device.trained(np.zeros(P, np.float32), 10, 0.1, None, T0 + 2)
    send: Any = stale[1]
    new = second_generation(old)
    new.open_round(T0 + 10)
    outcome = new.handle(send.topic, send.frame, T0 + 11)
    assert not outcome.accepted and outcome.reason == "wrong_round"  # bound to the old round


# --- the service, with two real model builds ------------------------------------------------------


def test_the_aggregator_refuses_another_models_checkpoint_then_rolls_with_model_generation(
    tmp_path: Path, har_model_dir: Path, build_model_dir: Any, har_task: Any
) -> None:
    fleet = create_fleet(
        tmp_path,
        "gen",
        har_model_dir,
        "mqtt://127.0.0.1:9",
        {"watch-01": 1, "watch-02": 2},
        {"min_devices": 2},
    )
    config = load_aggregator_config(fleet.aggregator_config, {})
    first = AggregatorService(config)
    first.engine.open_round(1_700_000_000.0)
    first.engine.state.counters["watch-01"] = 3
    checkpoint = config.state_dir / CHECKPOINT_FILE
    save_checkpoint(checkpoint, checkpoint_from_state(first.engine.snapshot()))
    old = first.engine.snapshot()
    assert (old.generation, old.model_sha256) == (1, first.loaded.manifest.model_sha256)

    other_model = build_model_dir(task_variant(har_task, {"model.hidden": [16]}))
    changed = replace(config, model_dir=other_model)
    with pytest.raises(ConfigError) as refused:
        AggregatorService(changed)
    assert str(refused.value) == (
        f"{checkpoint} is for another model ({old.model_sha256}); to roll the fleet to this model set "
        '[aggregator] model_generation = 2 (docs/own-data.md, "A new model for a running fleet")'
    )

    rolled = AggregatorService(replace(changed, model_generation=2))
    s = rolled.engine.state
    assert (s.generation, s.version, s.last_manifest_sha256) == (2, old.version, old.last_manifest_sha256)
    assert s.counters == {"watch-01": 3} and s.completed_rounds == 0
    assert s.model_sha256 == rolled.loaded.manifest.model_sha256 != old.model_sha256
    assert s.weights.shape != old.weights.shape
    save_checkpoint(checkpoint, checkpoint_from_state(rolled.engine.snapshot()))
    assert AggregatorService(replace(changed, model_generation=2)).engine.state.generation == 2  # resumes

    with pytest.raises(
        ConfigError, match=r"is model generation 2; \[aggregator\] model_generation = 1 would go back"
    ):
        AggregatorService(replace(config, model_generation=1))
