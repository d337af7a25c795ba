"""MQTT connection settings shared by agents and the aggregator (parsing only, no sockets)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from protocol.config_source import ConfigError, Table

MQTT_KEYS = {"broker", "protocol", "keepalive", "username", "password", "client_id", "session_expiry_s"}


@dataclass(frozen=True)
class MqttSettings:
    host: str
    port: int
    tls: bool
    protocol: int  # 5 (MQTT 5, default) or 3 (MQTT 3.1.1)
    keepalive: int
    username: str | None
    password: str | None
    client_id: str
    session_expiry_s: int

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> tuple[str, int, bool]:
    """``mqtt://host[:port]`` or ``mqtts://host[:port]`` -> (host, port, tls)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"broker URL {url!r}: {exc}") from None
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ConfigError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise ConfigError(f"broker URL {url!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"broker URL {url!r}: must not have a path, query or fragment")
    tls = parts.scheme == "mqtts"
    return parts.hostname, port if port is not None else (8883 if tls else 1883), tls


def mqtt_settings_from_table(table: Table, default_client_id: str) -> MqttSettings:
    host, port, tls = parse_broker_url(table.text("broker", "mqtt://127.0.0.1:1883"))
    protocol = table.integer("protocol", 5, 3, 5)
    if protocol == 4:
        raise ConfigError(f"[{table.name}] protocol must be 5 (MQTT 5) or 3 (MQTT 3.1.1)")
    return MqttSettings(
        host=host,
        port=port,
        tls=tls,
        protocol=protocol,
        keepalive=table.integer("keepalive", 30, 5, 3600),
        username=table.opt_text("username"),
        password=table.opt_text("password"),
        client_id=table.text("client_id", default_client_id),
        session_expiry_s=table.integer("session_expiry_s", 7 * 24 * 3600, 0, 2**32 - 1),
    )
