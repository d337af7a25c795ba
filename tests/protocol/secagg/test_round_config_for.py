"""A secure round's config is derived from its signed manifest: both sides get the same one,
and the graph seed follows the chain, the round and the selection, not the aggregator's choice."""

from __future__ import annotations

import dataclasses

import pytest

from fedge.protocol.errors import FedgeError
from fedge.protocol.secagg.announcement import SecureAggregationAnnouncement
from fedge.protocol.secagg.errors import SecAggError
from fedge.protocol.secure_round_config import PHASE_FRACTIONS, graph_seed_for, round_config_for
from support.engine_helpers import DEVICE_IDS, T0, make_engine

pytestmark = pytest.mark.protocol

MANIFEST = make_engine(devices=DEVICE_IDS[:4]).open_round(T0).manifest
SECURE = dataclasses.replace(
    MANIFEST,
    selected_devices=("dev-c", "dev-a", "dev-b", "dev-d"),
    secure_aggregation=SecureAggregationAnnouncement(clip_norm=1.5, bits=32, degree=3, threshold=2),
)


def test_the_config_is_the_manifest_s_selection_model_and_announcement() -> None:
    config = round_config_for(SECURE)
    assert config.round_id == SECURE.round_id
    assert config.device_ids == ("dev-a", "dev-b", "dev-c", "dev-d")
    assert config.vector_length == SECURE.model_manifest.parameter_count == 231
    assert (config.clip_norm, config.bits, config.degree, config.threshold) == (1.5, 32, 3, 2)
    d = config.deadlines
    span = SECURE.deadline - SECURE.issued_at
    assert (d.advertise, d.share, d.masked_input) == tuple(
        SECURE.issued_at + span * f for f in PHASE_FRACTIONS[:3]
    )
    assert d.unmask == SECURE.deadline
    assert round_config_for(SECURE) == config  # deterministic: what a device recomputes


def test_the_graph_seed_follows_the_chain_the_round_and_the_selection() -> None:
    seed = round_config_for(SECURE).graph_seed
    assert seed == graph_seed_for(SECURE.parent_sha256, SECURE.round_id, SECURE.selected_devices)
    assert graph_seed_for(SECURE.parent_sha256, SECURE.round_id, sorted(SECURE.selected_devices)) == seed
    for other in (
        dataclasses.replace(SECURE, parent_sha256="00" * 32),
        dataclasses.replace(SECURE, round_id="r-4"),
        dataclasses.replace(SECURE, selected_devices=("dev-a", "dev-b", "dev-c", "dev-e")),
    ):
        assert round_config_for(other).graph_seed != seed
    # Length-prefixed: moving a character between the round id and a device id changes it.
    assert graph_seed_for("p", "r1", ["a"]) != graph_seed_for("p", "r", ["1a"])


def test_no_announcement_or_impossible_parameters_give_no_config() -> None:
    with pytest.raises(FedgeError, match="announces no secure-aggregation round"):
        round_config_for(MANIFEST)
    too_wide = dataclasses.replace(
        SECURE,
        secure_aggregation=SecureAggregationAnnouncement(clip_norm=1.5, bits=32, degree=8, threshold=5),
    )
    with pytest.raises(SecAggError):
        round_config_for(too_wide)
