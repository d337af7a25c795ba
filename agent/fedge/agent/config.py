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

from fedge.protocol.config_source import MAX_CONFIG_BYTES, ConfigError, Table, config_document
from fedge.protocol.errors import FedgeError
from fedge.protocol.mqtt_settings import MQTT_KEYS, MqttSettings, mqtt_settings_from_table
from fedge.protocol.sealing import public_key_from_text
from fedge.protocol.signing import key_id, verify_key_from_text
from fedge.protocol.topics import check_id
from fedge.shell.files import read_config_file

ENV_PREFIX = "FEDGE_AGENT"


@dataclass(frozen=True)
class DataSettings:
    source: str  # "edgex" (readings from EdgeX) or "har-watch" (a recorded data set, for tests)
    subject: int
    holdout_fraction: float
    seed: int
    task_file: Path | None  # the task this device was provisioned for (features, label)


@dataclass(frozen=True)
class EdgeXSettings:
    """Where the device's readings come from: EdgeX's message bus, and core-data for backfill."""

    bus: MqttSettings
    prefix: str
    device: str
    profile_file: Path | None
    core_data_url: str | None
    token_file: Path | None
    store_max_samples: int
    store_max_age_s: float  # 0: keep samples of any age (only store_max_samples evicts)
    #: How far back the first core-data backfill reaches (no cursor yet); 0: everything
    #: core-data holds (a historical export loaded into core-data).
    first_backfill_s: float = 24 * 3600.0


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
    edgex: EdgeXSettings


#: What identifies a connection to the broker; never shared by the agent's two connections.
IDENTITY_KEYS = ("username", "password", "password_file", "cert_file", "key_file")

AGENT_KEYS = {
    "device_id",
    "fleet",
    "state_dir",
    "key_file",
    "aggregator_public_key",
    "aggregator_verify_keys",
    "runtime",
    "blob_timeout_s",
    "status_interval_s",
}
DATA_KEYS = {"source", "subject", "holdout_fraction", "seed", "task"}
EDGEX_KEYS = {
    "broker",
    "protocol",
    "prefix",
    "device",
    "profile",
    "core_data",
    "token_file",
    "store_max_samples",
    "store_max_age_s",
    "first_backfill_s",
    "username",
    "password",
    "password_file",
    "keepalive",
    "ca_file",
    "cert_file",
    "key_file",
}
#: Every table of agent.toml and the keys it accepts (any other is an error); what
#: docs/configuration.md and ``fedge agent config --example`` must list (their tests check it).
AGENT_TABLES: dict[str, set[str]] = {
    "agent": AGENT_KEYS,
    "mqtt": MQTT_KEYS,
    "data": DATA_KEYS,
    "edgex": EDGEX_KEYS,
}


def load_agent_config(path: Path, env: Mapping[str, str]) -> AgentConfig:
    data = config_document(*read_config_file(path, MAX_CONFIG_BYTES, "config"), path, env, ENV_PREFIX)
    unknown = sorted(set(data) - set(AGENT_TABLES))
    if unknown:
        raise ConfigError(f"{path}: unknown tables {unknown}; allowed: {', '.join(AGENT_TABLES)}")
    a = Table(data, "agent", AGENT_KEYS)
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
    d = Table(data, "data", DATA_KEYS)
    base = path.parent
    source = d.choice("source", "edgex", ("edgex", "har-watch"))
    task_text = d.opt_text("task")
    if source == "edgex" and not task_text:
        raise ConfigError("[data] task: the task spec this device was provisioned for is required with EdgeX")
    mqtt_table = Table(data, "mqtt", MQTT_KEYS)
    mqtt_settings = mqtt_settings_from_table(
        mqtt_table, f"fedge-agent-{device_id}", str(path.parent), read_config_file
    )
    e = Table(data, "edgex", EDGEX_KEYS)
    if source == "edgex" and "broker" not in e.raw:
        check_own_edgex_principal(mqtt_table, e)
    # Without its own broker, the EdgeX bus is the fleet's broker: same TLS trust and keepalive,
    # never the same identity (see check_own_edgex_principal).
    bus_table: dict[str, object] = (
        {}
        if "broker" in e.raw
        else {k: mqtt_table.raw[k] for k in ("keepalive", "ca_file") if k in mqtt_table.raw}
    )
    bus_table.update(
        broker=e.raw.get("broker", mqtt_settings.url),
        protocol=e.raw.get("protocol", mqtt_settings.protocol),
        client_id=f"fedge-agent-{device_id}-edgex",
    )
    for key in (*IDENTITY_KEYS, "keepalive", "ca_file"):
        if key in e.raw:
            bus_table[key] = e.raw[key]
    profile_text = e.opt_text("profile")
    token_text = e.opt_text("token_file")
    edgex = EdgeXSettings(
        bus=mqtt_settings_from_table(
            Table({"edgex": bus_table}, "edgex", MQTT_KEYS),
            f"fedge-{device_id}-edgex",
            str(path.parent),
            read_config_file,
        ),
        prefix=e.text("prefix", "edgex"),
        device=e.text("device", device_id),
        profile_file=base / profile_text if profile_text else None,
        core_data_url=e.opt_text("core_data"),
        token_file=base / token_text if token_text else None,
        store_max_samples=e.integer("store_max_samples", 200_000, 1, 100_000_000),
        store_max_age_s=_store_max_age_s(e),
        first_backfill_s=e.number("first_backfill_s", 24 * 3600.0, 0.0, 10 * 365 * 24 * 3600.0),
    )
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
        mqtt=mqtt_settings,
        data=DataSettings(
            source=source,
            subject=d.integer("subject", 1, 1, 10),
            holdout_fraction=d.number("holdout_fraction", 0.2, 0.0, 0.9),
            seed=d.integer("seed", 0, 0, 2**31 - 1),
            task_file=base / task_text if task_text else None,
        ),
        edgex=edgex,
    )


def check_own_edgex_principal(mqtt_table: Table, edgex_table: Table) -> None:
    """When the EdgeX bus is the fleet broker, the agent's EdgeX connection must be a principal
    of its own (``fedge broker config`` makes ``{device}.edgex``).

    Why: the generated broker config uses the username as the MQTT client id, so a second
    connection with the device's username would take the device's session over (and the two
    connections would knock each other off in turn); and only the ``.edgex`` principal may read
    the device's EdgeX readings, the device's own may not (least privilege). An anonymous fleet
    broker (no username, no client certificate) needs nothing.
    """
    fleet, bus = mqtt_table.raw, edgex_table.raw
    if "username" not in fleet and "cert_file" not in fleet:
        return
    fleet_user = fleet.get("username")
    suggested = f"{fleet_user}.edgex" if isinstance(fleet_user, str) and fleet_user else "DEVICE.edgex"
    fix = (
        f'set [edgex] username = "{suggested}" and its password or password_file (from '
        f"`fedge broker config`'s credentials/{suggested}.txt), or give [edgex] a broker of its own"
    )
    user = bus.get("username")
    if not isinstance(user, str) or not user:
        raise ConfigError(
            "[edgex] username: the EdgeX bus is the fleet broker, so the agent's EdgeX connection "
            f"needs its own principal: {fix}"
        )
    if user == fleet_user:
        raise ConfigError(
            f"[edgex] username {user!r} is also [mqtt] username: the agent's EdgeX connection needs "
            f"its own principal: {fix}"
        )
    if "cert_file" in fleet:
        if "cert_file" not in bus or "key_file" not in bus:
            raise ConfigError(
                "[edgex] cert_file and key_file: the fleet connection authenticates with a client "
                f"certificate, so the EdgeX connection needs its own (CN {user!r}) from `fedge broker "
                f"config`'s credentials/{user}.crt and .key"
            )
    elif _has_password(fleet) and not _has_password(bus):
        raise ConfigError(
            f"[edgex] password: the EdgeX connection as {user!r} needs its own password: set [edgex] "
            f"password or password_file (from `fedge broker config`'s credentials/{user}.txt)"
        )


#: Longest ``[edgex] store_max_age_s`` short of 0 (any age): ten years.
MAX_STORE_AGE_S = 10 * 365 * 24 * 3600.0


def _store_max_age_s(e: Table) -> float:
    """``[edgex] store_max_age_s``: 1 s to ten years (default 30 days), or 0 to keep samples of
    any age, e.g. a building's historical export replayed through EdgeX."""
    value = e.raw.get("store_max_age_s", 30 * 24 * 3600.0)
    if (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and (value == 0 or 1.0 <= value <= MAX_STORE_AGE_S)
    ):
        return float(value)
    raise ConfigError(
        "[edgex] store_max_age_s must be 0 (keep samples of any age) or a number of seconds in "
        f"1.0..{MAX_STORE_AGE_S}, got {value!r}"
    )


def _has_password(table: Mapping[str, object]) -> bool:
    return "password" in table or "password_file" in table
