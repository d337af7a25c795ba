"""What a building gateway (``[upstream]``) does with the campus's manifests from its bridge.

Each campus manifest is verified before the building follows it; one it cannot follow is
refused with a counted reason and a log line that names the fix, and the building keeps the
campus round it had. Real keys, a real model, manifests signed as the campus signs them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from fedge.aggregator.building import BuildingService
from fedge.aggregator.config import load_aggregator_config
from fedge.aggregator.service import AggregatorService
from fedge.lab.provision import FleetFiles, create_fleet
from fedge.protocol.model_manifest import Normalisation
from fedge.protocol.round_manifest import RoundManifest
from fedge.protocol.sealing import key_to_text
from fedge.protocol.secagg.announcement import SecureAggregationAnnouncement
from fedge.protocol.signing import DocType, sign_document, signing_key_to_text
from fedge.tools.keys import write_private_key_file

ROUNDS = {"rounds": 3, "min_devices": 2, "wait_for_devices_s": 0.0}
SECURE = SecureAggregationAnnouncement(clip_norm=1.0, bits=32, degree=2, threshold=2)


@pytest.fixture(scope="module")
def campus(tmp_path_factory: pytest.TempPathFactory, har_model_dir: Path) -> FleetFiles:
    root = tmp_path_factory.mktemp("campus")
    return create_fleet(
        root, "campus", har_model_dir, "mqtt://127.0.0.1:9", {"building-1": 1, "b2": 2}, ROUNDS
    )


@pytest.fixture(scope="module")
def campus_manifest(campus: FleetFiles) -> RoundManifest:
    """The campus's first round, as its aggregator announces it."""
    service = AggregatorService(load_aggregator_config(campus.aggregator_config, {}))
    return service.engine.open_round(0.0).manifest


@pytest.fixture
def building(tmp_path: Path, campus: FleetFiles, har_model_dir: Path) -> BuildingService:
    files = create_fleet(
        tmp_path, "building-1", har_model_dir, "mqtt://127.0.0.1:9", {"d1": 1, "d2": 2}, ROUNDS
    )
    key_file = tmp_path / "keys" / "building-1.campus.box"
    write_private_key_file(key_file, key_to_text(PrivateKey.generate()))
    with files.aggregator_config.open("a") as f:
        f.write(
            "\n[upstream]\nenabled = true\n"
            'campus_fleet = "campus"\nbuilding_id = "building-1"\n'
            f'campus_verify_keys = ["{signing_key_to_text(campus.signing_key.verify_key)}"]\n'
            f'campus_public_key = "{key_to_text(campus.box_key.public_key)}"\n'
            f'key_file = "{key_file}"\n'
        )
    return BuildingService(load_aggregator_config(files.aggregator_config, {}))


def signed(manifest: RoundManifest, key: SigningKey) -> bytes:
    return sign_document(DocType.ROUND_MANIFEST, manifest.to_dict(), key)


def test_a_verified_campus_manifest_is_followed(
    building: BuildingService, campus: FleetFiles, campus_manifest: RoundManifest
) -> None:
    building._handle(building.campus_topics.manifest, signed(campus_manifest, campus.signing_key))
    assert building.campus == campus_manifest
    assert building.messages_dropped == {}


@pytest.mark.parametrize(
    ("change", "reason", "detail"),
    [
        (
            {"secure_aggregation": SECURE},
            "upstream_secure_round",
            "is a secure-aggregation round, which a building cannot take part in: turn [privacy] "
            "secure_aggregation off at the campus (docs/scale.md)",
        ),
        ({"fleet": "other-campus"}, "upstream_manifest_refused", "fleet 'other-campus'"),
        (
            {"model_sha256": "ab" * 32},
            "upstream_model_mismatch",
            "the campus runs model abababababab, this building",
        ),
        ({"key": SigningKey.generate()}, "upstream_manifest_refused", ""),
    ],
    ids=["secure-round", "other-fleet", "other-model", "unknown-signer"],
)
def test_a_campus_manifest_the_building_cannot_follow_is_refused_counted_and_logged(
    building: BuildingService,
    campus: FleetFiles,
    campus_manifest: RoundManifest,
    caplog: pytest.LogCaptureFixture,
    change: dict[str, object],
    reason: str,
    detail: str,
) -> None:
    changes = dict(change)
    key = changes.pop("key", campus.signing_key)
    assert isinstance(key, SigningKey)
    if "secure_aggregation" in changes:  # announced in train rounds only, which normalise
        features = campus_manifest.model_manifest.task.input_dim
        changes["phase"] = "train"
        changes["normalisation"] = Normalisation((0.0,) * features, (1.0,) * features)
    if "model_sha256" in changes:  # the round names the model its embedded manifest describes
        model = dataclasses.replace(campus_manifest.model_manifest, model_sha256=changes["model_sha256"])
        changes["model_manifest"] = model
    manifest = dataclasses.replace(campus_manifest, **changes)
    building._handle(building.campus_topics.manifest, signed(manifest, key))
    building._handle(building.campus_topics.manifest, signed(manifest, key))  # again: counted, logged once
    assert building.campus is None  # nothing followed
    assert building.messages_dropped == {reason: 2}
    assert building.status()["messages_dropped"] == {reason: 2}
    logged = [r.getMessage() for r in caplog.records if f"({reason})" in r.getMessage()]
    assert len(logged) == 1 and detail in logged[0]
