"""The agent's configuration: a TOML file overlaid with ``FEDGE_AGENT__*`` variables.

The aggregator's keys are pinned here at provisioning: its X25519 public key (updates are
sealed to it) and its Ed25519 verify keys (manifests must be signed by one of them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from nacl.public import PublicKey
from nacl.signing import VerifyKey

from protocol.config_source import ConfigError, Table, overlay_env, parse_toml
from protocol.errors import FedgeError
from protocol.mqtt_settings import MQTT_KEYS, MqttSettings, mqtt_settings_from_table
from protocol.sealing import public_key_from_text
from protocol.signing import key_id, verify_key_from_text
from protocol.topics import check_id

ENV_PREFIX = "FEDGE_AGENT"


@dataclass(frozen=True)
class DataSettings:
    source: str  # "har-watch" (issue 4 adds "edgex")
    subject: int
    holdout_fraction: float
    seed: int


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    fleet: str
    state_dir: Path
    key_file: Path
    aggregator_public_key: PublicKey
    trusted_keys: dict[str, VerifyKey]
    runtime: str
    blob_timeout_s: float
    status_interval_s: float
    mqtt: MqttSettings
    data: DataSettings


def load_agent_config(path: Path, env: Mapping[str, str]) -> AgentConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    data = overlay_env(parse_toml(text, str(path)), env, ENV_PREFIX)
    unknown = sorted(set(data) - {"agent", "mqtt", "data"})
    if unknown:
        raise ConfigError(f"{path}: unknown tables {unknown}; allowed: agent, mqtt, data")
    a = Table(
        data,
        "agent",
        {
            "device_id",
            "fleet",
            "state_dir",
            "key_file",
            "aggregator_public_key",
            "aggregator_verify_keys",
            "runtime",
            "blob_timeout_s",
            "status_interval_s",
        },
    )
    try:
        device_id = check_id(a.text("device_id"))
        fleet = check_id(a.text("fleet"), "fleet id")
        aggregator_key = public_key_from_text(a.text("aggregator_public_key"))
        verify_raw = a.raw.get("aggregator_verify_keys")
        if (
            not isinstance(verify_raw, list)
            or not verify_raw
            or not all(isinstance(k, str) for k in verify_raw)
        ):
            raise ConfigError("[agent] aggregator_verify_keys must be a non-empty list of base64 keys")
        trusted = {key_id(k): k for k in (verify_key_from_text(t) for t in verify_raw)}
    except ConfigError:
        raise
    except FedgeError as exc:
        raise ConfigError(f"[agent] {exc}") from None
    d = Table(data, "data", {"source", "subject", "holdout_fraction", "seed"})
    base = path.parent
    return AgentConfig(
        device_id=device_id,
        fleet=fleet,
        state_dir=base / a.text("state_dir"),
        key_file=base / a.text("key_file"),
        aggregator_public_key=aggregator_key,
        trusted_keys=trusted,
        runtime=a.choice("runtime", "auto", ("auto", "ai_edge_litert", "tflite_runtime")),
        blob_timeout_s=a.number("blob_timeout_s", 30.0, 0.1, 3600.0),
        status_interval_s=a.number("status_interval_s", 30.0, 0.5, 3600.0),
        mqtt=mqtt_settings_from_table(Table(data, "mqtt", MQTT_KEYS), f"fedge-agent-{device_id}"),
        data=DataSettings(
            source=d.choice("source", "har-watch", ("har-watch",)),
            subject=d.integer("subject", 1, 1, 10),
            holdout_fraction=d.number("holdout_fraction", 0.2, 0.0, 0.9),
            seed=d.integer("seed", 0, 0, 2**31 - 1),
        ),
    )
