"""MQTT connection settings shared by agents and the aggregator (parsing only, no sockets)."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from fedge.protocol.config_source import MAX_SECRET_FILE_BYTES, ConfigError, FileReader, Table, secret_text

MQTT_KEYS = {
    "broker",
    "protocol",
    "keepalive",
    "username",
    "password",
    "password_file",
    "client_id",
    "session_expiry_s",
    "ca_file",
    "cert_file",
    "key_file",
}


@dataclass(frozen=True)
class MqttSettings:
    host: str
    port: int
    tls: bool
    protocol: int  # 5 (MQTT 5, default) or 3 (MQTT 3.1.1)
    keepalive: int
    username: str | None
    # Never in a repr: settings end up in logs and tracebacks. From ``password`` or read from
    # ``password_file`` when the config is loaded.
    password: str | None = field(repr=False)
    client_id: str
    session_expiry_s: int
    # TLS: the CA that signed the broker's certificate (None: the system's CAs), and a client
    # certificate and key where the broker authenticates clients by certificate.
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> tuple[str, int, bool]:
    """``mqtt://host[:port]`` or ``mqtts://host[:port]`` -> (host, port, tls).

    The port defaults to 1883 (mqtt) or 8883 (mqtts). IPv6 hosts are written in brackets
    (``mqtt://[::1]:1883``) and returned without them. Credentials never go in the URL (they
    would end up in logs and process lists): use the ``username``/``password`` settings.
    """
    if not url or any(ch.isspace() for ch in url):
        raise ConfigError(f"broker URL {url!r} must be non-empty without whitespace")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("mqtt", "mqtts") or "://" not in url:
        raise ConfigError(f"broker URL {url!r}: must start with mqtt:// or mqtts://")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"broker URL {url!r}: credentials do not belong in the URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"broker URL {url!r}: must be scheme://host[:port] with no path, query or fragment")
    host = parts.hostname
    if not host:
        raise ConfigError(f"broker URL {url!r}: has no host")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"broker URL {url!r}: port must be a number from 1 to 65535") from None
    tls = scheme == "mqtts"
    if port is None:
        if parts.netloc.endswith(":"):
            raise ConfigError(f"broker URL {url!r}: port is empty")
        port = 8883 if tls else 1883
    if not 1 <= port <= 65535:
        raise ConfigError(f"broker URL {url!r}: port must be a number from 1 to 65535")
    return host, port, tls


def mqtt_settings_from_table(
    table: Table, default_client_id: str, base_dir: str = "", read_file: FileReader | None = None
) -> MqttSettings:
    """``base_dir``: the config file's directory, against which relative TLS and password-file
    paths resolve; ``read_file``: how the service reads a ``password_file``."""
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
        password=password_from_table(table, base_dir, read_file),
        client_id=table.text("client_id", default_client_id),
        session_expiry_s=table.integer("session_expiry_s", 7 * 24 * 3600, 0, 2**32 - 1),
        ca_file=_path(table.opt_text("ca_file"), base_dir),
        cert_file=_path(table.opt_text("cert_file"), base_dir),
        key_file=_path(table.opt_text("key_file"), base_dir),
    )


def password_from_table(table: Table, base_dir: str, read_file: FileReader | None) -> str | None:
    """``password``, or the content of ``password_file`` (relative to ``base_dir``), read now.

    A password file keeps the secret out of a config that must be readable (an agent.toml of
    mode 0644 under systemd's DynamicUser, a Kubernetes ConfigMap); it must itself be
    owner-only. Giving both is an error: which one wins would be a guess.
    """
    password = table.opt_text("password")
    password_file = _path(table.opt_text("password_file"), base_dir)
    if password is not None and password_file is not None:
        raise ConfigError(f"[{table.name}] password and password_file: give one of them, not both")
    if password_file is None:
        return password
    what = f"[{table.name}] password_file"
    if read_file is None:
        raise ConfigError(f"{what}: not supported here; give the password itself")
    path = Path(password_file)
    return secret_text(*read_file(path, MAX_SECRET_FILE_BYTES, what), path, what)


def _path(value: str | None, base_dir: str) -> str | None:
    return None if not value else posixpath.join(base_dir, value) if base_dir else value
