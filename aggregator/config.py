"""The aggregator's configuration: a TOML file overlaid with ``FEDGE_AGGREGATOR__*`` variables.

Relative paths are resolved against the config file's directory, so a config and its keys can
be moved together (a Kubernetes ConfigMap and Secret, a demo's output directory).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from aggregator.leader_config import (
    LEADER_KEYS,
    LEADER_OFF,
    SA_NAMESPACE_FILE,
    LeaderSettings,
    leader_settings_from_table,
)
from protocol.codec import Codec
from protocol.config_source import ConfigError, Table, overlay_env, parse_toml
from protocol.mqtt_settings import MQTT_KEYS, MqttSettings, mqtt_settings_from_table
from protocol.topics import TopicError, check_id

ENV_PREFIX = "FEDGE_AGGREGATOR"
log = logging.getLogger("fedge.aggregator")


@dataclass(frozen=True)
class RoundSettings:
    rounds: int
    min_devices: int
    devices_per_round: int  # 0 = every enrolled device
    round_timeout_s: float
    server_learning_rate: float
    codec: Codec
    max_examples_per_update: int
    max_update_bytes: int
    manifest_ttl_s: float
    wait_for_devices_s: float
    selection_seed: int
    # Bounds one update's influence (a scaled "model replacement" update): an update whose L2
    # norm exceeds the bound is clipped to it, or rejected. The bound is max_update_norm if set,
    # else update_norm_ratio x the global model's norm (honest HAR deltas: 0.1-0.35 x).
    max_update_norm: float = 0.0
    update_norm_ratio: float = 1.0
    update_norm_policy: str = "clip"


@dataclass(frozen=True)
class AggregatorConfig:
    fleet: str
    model_dir: Path
    state_dir: Path
    registry_file: Path
    box_key_file: Path
    signing_key_file: Path
    exit_when_done: bool
    mqtt: MqttSettings
    rounds: RoundSettings
    # Touched by the main loop (also while a follower waits) so a liveness probe can tell a
    # hung loop from a busy one; None: <state_dir>/heartbeat.
    heartbeat_file: Path | None = None
    leader: LeaderSettings = LEADER_OFF

    @property
    def heartbeat_path(self) -> Path:
        return self.heartbeat_file if self.heartbeat_file is not None else self.state_dir / "heartbeat"


def load_aggregator_config(
    path: Path, env: Mapping[str, str], sa_namespace_file: Path = SA_NAMESPACE_FILE
) -> AggregatorConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    data = overlay_env(parse_toml(text, str(path)), env, ENV_PREFIX)
    unknown = sorted(set(data) - {"aggregator", "mqtt", "rounds", "leader"})
    if unknown:
        raise ConfigError(f"{path}: unknown tables {unknown}; allowed: aggregator, leader, mqtt, rounds")
    base = path.parent
    agg = Table(
        data,
        "aggregator",
        {
            "fleet",
            "model_dir",
            "state_dir",
            "registry",
            "box_key_file",
            "signing_key_file",
            "exit_when_done",
            "heartbeat_file",
        },
    )
    try:
        fleet = check_id(agg.text("fleet"), "fleet id")
    except TopicError as exc:
        raise ConfigError(f"[aggregator] fleet: {exc}") from None
    r = Table(
        data,
        "rounds",
        {
            "rounds",
            "min_devices",
            "devices_per_round",
            "round_timeout_s",
            "server_learning_rate",
            "codec",
            "max_examples_per_update",
            "max_update_bytes",
            "manifest_ttl_s",
            "wait_for_devices_s",
            "selection_seed",
            "max_update_norm",
            "update_norm_ratio",
            "update_norm_policy",
        },
    )
    rounds = RoundSettings(
        rounds=r.integer("rounds", 20, 1, 1_000_000),
        min_devices=r.integer("min_devices", 2, 1, 1_000_000),
        devices_per_round=r.integer("devices_per_round", 0, 0, 1_000_000),
        round_timeout_s=r.number("round_timeout_s", 60.0, 0.1, 7 * 24 * 3600.0),
        server_learning_rate=r.number("server_learning_rate", 1.0, 1e-6, 100.0),
        codec=Codec(r.choice("codec", "fp32", tuple(c.value for c in Codec))),
        max_examples_per_update=r.integer("max_examples_per_update", 1_000_000, 1, 2**31 - 1),
        max_update_bytes=r.integer("max_update_bytes", 16 * 1024 * 1024, 1024, 256 * 1024 * 1024),
        manifest_ttl_s=r.number("manifest_ttl_s", 24 * 3600.0, 1.0, 365 * 24 * 3600.0),
        wait_for_devices_s=r.number("wait_for_devices_s", 30.0, 0.0, 24 * 3600.0),
        selection_seed=r.integer("selection_seed", 0, 0, 2**31 - 1),
        max_update_norm=r.number("max_update_norm", 0.0, 0.0, 1e12),
        update_norm_ratio=r.number("update_norm_ratio", 1.0, 0.0, 1e6),
        update_norm_policy=r.choice("update_norm_policy", "clip", ("clip", "reject")),
    )
    if rounds.max_update_norm == 0.0 and rounds.update_norm_ratio == 0.0:
        log.warning("[rounds] update norms are unbounded: one device can replace the global model")
    if 0 < rounds.devices_per_round < rounds.min_devices:
        raise ConfigError(
            f"[rounds] devices_per_round={rounds.devices_per_round} is below min_devices="
            f"{rounds.min_devices}: every round would be aborted"
        )
    leader = leader_settings_from_table(Table(data, "leader", LEADER_KEYS), env, sa_namespace_file)
    heartbeat = agg.opt_text("heartbeat_file")
    return AggregatorConfig(
        fleet=fleet,
        model_dir=base / agg.text("model_dir"),
        state_dir=base / agg.text("state_dir"),
        registry_file=base / agg.text("registry"),
        box_key_file=base / agg.text("box_key_file"),
        signing_key_file=base / agg.text("signing_key_file"),
        exit_when_done=agg.flag("exit_when_done", False),
        mqtt=mqtt_settings_from_table(Table(data, "mqtt", MQTT_KEYS), f"fedge-aggregator-{fleet}", str(base)),
        rounds=rounds,
        heartbeat_file=base / heartbeat if heartbeat else None,
        leader=leader,
    )
