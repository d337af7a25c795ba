"""A building gateway's part in two-tier aggregation (``[upstream]``): what it sends its campus,
its round's timing, its settings; and the bridge ``fedge broker config --bridge-to`` writes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedge.aggregator.config import load_aggregator_config
from fedge.aggregator.upstream import building_contribution, local_timeout
from fedge.aggregator.upstream_config import UPSTREAM_OFF
from fedge.protocol.config_source import ConfigError
from fedge.protocol.messages import decode_moments, decode_update
from fedge.protocol.sealing import key_to_text
from fedge.protocol.signing import signing_key_to_text
from fedge.tools.broker_config import Bridge, BrokerConfigError, FleetAccess, render_acl
from support.aggregator_toml import MINIMAL_AGGREGATOR_TOML
from support.engine_helpers import (
    AGGREGATOR_KEY,
    DEVICE_IDS,
    N_FEATURES,
    SIGNING_KEY,
    T0,
    data_for,
    delta_for,
    devices,
    initial_state,
    make_engine,
    plain_fedavg,
)

THREE = DEVICE_IDS[:3]


def test_a_train_round_sends_the_fedavg_mean_of_its_devices_and_their_count() -> None:
    engine = make_engine(plain_fedavg(min_devices=2), initial_state(), THREE)
    devs = devices(THREE)
    pub = engine.open_round(T0)
    for d in THREE:
        # The same claim each: the example-weighted mean is the plain mean.
        assert engine.handle(devs[d].topic, devs[d].update(pub.manifest, examples=40), T0 + 1).accepted
    contribution = building_contribution(engine, pub.manifest)
    assert contribution is not None
    kind, header, body = contribution
    assert kind == "update"
    update = decode_update(header, body, engine.layout, pub.manifest.codec, None)
    expected = np.mean([delta_for(d, pub.manifest.round_number) for d in THREE], axis=0)
    np.testing.assert_allclose(update.delta, expected, rtol=1e-5, atol=1e-7)
    assert update.examples == 3  # the campus weighs the building by its devices


def test_a_moments_round_sends_the_pooled_moments() -> None:
    engine = make_engine(plain_fedavg(min_devices=2), initial_state(normalisation=None), THREE)
    devs = devices(THREE)
    pub = engine.open_round(T0)
    rows = {d: data_for(d, 20 + i) for i, d in enumerate(THREE)}
    for d in THREE:
        assert engine.handle(devs[d].topic, devs[d].moments(pub.manifest, rows[d]), T0 + 1).accepted
    contribution = building_contribution(engine, pub.manifest)
    assert contribution is not None and contribution[0] == "moments"
    moments = decode_moments(contribution[1], contribution[2], N_FEATURES)
    pooled = np.concatenate(list(rows.values()))
    assert moments.count == len(pooled)
    np.testing.assert_allclose(moments.sums, pooled.sum(axis=0), rtol=1e-9)
    np.testing.assert_allclose(moments.sums_sq, (pooled * pooled).sum(axis=0), rtol=1e-9)


def test_fewer_devices_than_min_devices_send_nothing_upstream() -> None:
    engine = make_engine(plain_fedavg(min_devices=2), initial_state(), THREE)
    devs = devices(THREE)
    pub = engine.open_round(T0)
    d = THREE[0]
    assert engine.handle(devs[d].topic, devs[d].update(pub.manifest), T0 + 1).accepted
    assert building_contribution(engine, pub.manifest) is None  # one device's update never leaves


def test_the_building_round_ends_before_the_campus_deadline() -> None:
    engine = make_engine(plain_fedavg(), initial_state(), THREE)
    campus = engine.open_round(T0).manifest  # any manifest: only its deadline matters
    campus = replace(campus, deadline=T0 + 30)
    assert local_timeout(campus, T0, 2.0, 60.0) == 28.0
    assert local_timeout(campus, T0, 2.0, 10.0) == 10.0
    assert local_timeout(campus, T0 + 29, 2.0, 60.0) == 1.0


BASE = MINIMAL_AGGREGATOR_TOML


def upstream_table(**changes: object) -> str:
    values: dict[str, object] = {
        "enabled": "true",
        "campus_fleet": '"campus"',
        "building_id": '"building-1"',
        "campus_verify_keys": f'["{signing_key_to_text(SIGNING_KEY.verify_key)}"]',
        "campus_public_key": f'"{key_to_text(AGGREGATOR_KEY.public_key)}"',
        "key_file": '"keys/building-1.campus.box"',
        **changes,
    }
    return "\n[upstream]\n" + "".join(f"{k} = {v}\n" for k, v in values.items() if v is not None)


def test_upstream_settings(tmp_path: Path) -> None:
    path = tmp_path / "aggregator.toml"
    path.write_text(BASE)
    assert load_aggregator_config(path, {}).upstream == UPSTREAM_OFF
    path.write_text(BASE + upstream_table())
    up = load_aggregator_config(path, {}).upstream
    assert (up.enabled, up.campus_fleet, up.building_id, up.key_file, up.margin_s) == (
        True,
        "campus",
        "building-1",
        tmp_path / "keys" / "building-1.campus.box",
        2.0,
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"campus_public_key": None}, r"\[upstream\] enabled needs campus_public_key"),
        ({"campus_verify_keys": '["not-a-key"]'}, r"\[upstream\]"),
        ({"building_id": '"a/b"'}, r"\[upstream\] invalid building id"),
        ({"enabled": "false", "campus_fleet": '"+"'}, r"\[upstream\] invalid campus fleet id"),
    ],
)
def test_upstream_refuses(tmp_path: Path, changes: dict[str, object], message: str) -> None:
    path = tmp_path / "aggregator.toml"
    path.write_text(BASE + upstream_table(**changes))
    with pytest.raises(ConfigError, match=message):
        load_aggregator_config(path, {})


def test_a_building_refuses_replicas(tmp_path: Path) -> None:
    path = tmp_path / "aggregator.toml"
    path.write_text(BASE + upstream_table() + "\n[replicas]\nenabled = true\n")
    with pytest.raises(ConfigError, match=r"\[upstream\] \(a building gateway\) runs without \[replicas\]"):
        load_aggregator_config(path, {})


def test_the_bridge_carries_the_campus_manifest_and_blobs_in_and_the_building_contribution_out() -> None:
    lines = Bridge(
        "campus.example:8883", "campus", "building-1", "s3cret", Path("/etc/fedge/campus-ca.crt")
    ).lines()
    topics = [line for line in lines if line.startswith("topic ")]
    assert topics == [
        "topic fedge/v1/campus/manifest in 1",
        "topic fedge/v1/campus/blob/+ in 1",
        "topic fedge/v1/campus/update/building-1 out 1",
    ]
    assert {"address campus.example:8883", "remote_username building-1", "remote_password s3cret",
            "cleansession false", "bridge_cafile /etc/fedge/campus-ca.crt"} <= set(lines)  # fmt: skip
    with pytest.raises(BrokerConfigError, match="must be HOST:PORT"):
        Bridge("campus.example", "campus", "building-1")
    access = FleetAccess("building-1", ("watch-01",), aggregator="agg", upstream=("campus", "building-1"))
    acl = render_acl(access)
    agg_block = acl.split("user agg\n", 1)[1].split("\n\n", 1)[0]
    assert "topic read fedge/v1/campus/manifest" in agg_block
    assert "topic read fedge/v1/campus/blob/+" in agg_block
    assert "topic write fedge/v1/campus/update/building-1" in agg_block
