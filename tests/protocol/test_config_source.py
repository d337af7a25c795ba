"""Loading the services' config files: secrets stay owner-only and out of reprs, password files,
and the agent's EdgeX connection as a principal of its own. Real files with real modes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from fedge.agent.config import load_agent_config
from fedge.agent.config import read_config_file as agent_reader
from fedge.aggregator.config import load_aggregator_config
from fedge.aggregator.config import read_config_file as aggregator_reader
from fedge.lab.provision import render_toml
from fedge.protocol.config_source import MAX_CONFIG_BYTES, ConfigError, FileReader, config_document
from fedge.protocol.sealing import key_to_text
from fedge.protocol.signing import signing_key_to_text

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "k3Jd-secret-value"


#: Each service reads its files itself (``protocol`` does no I/O); both readers obey one rule.
READERS = pytest.mark.parametrize("reader", [agent_reader, aggregator_reader], ids=["agent", "aggregator"])


def load_config_document(
    path: Path, env: dict[str, str], prefix: str, reader: FileReader = agent_reader
) -> dict[str, object]:
    """What both services' loaders do first: read the file, then ``config_document``."""
    return config_document(*reader(path, MAX_CONFIG_BYTES, "config"), path, env, prefix)


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def agent_tables(
    mqtt: dict[str, object], edgex: dict[str, object] | None = None
) -> dict[str, dict[str, object]]:
    return {
        "agent": {
            "device_id": "watch-01",
            "fleet": "demo",
            "state_dir": "state",
            "key_file": "watch-01.box",
            "aggregator_public_key": key_to_text(PrivateKey.generate().public_key),
            "aggregator_verify_keys": [signing_key_to_text(SigningKey.generate().verify_key)],
        },
        "mqtt": {"broker": "mqtts://broker.lan:8883", **mqtt},
        "data": {"source": "edgex", "task": str(REPO / "tasks" / "har-watch.toml")},
        "edgex": {"device": "watch-01", **(edgex or {})},
    }


def agent_config(tmp_path: Path, mqtt: dict[str, object], edgex: dict[str, object] | None = None) -> Path:
    return write(tmp_path / "agent.toml", render_toml(agent_tables(mqtt, edgex)))


def aggregator_config(tmp_path: Path, mqtt: dict[str, object], mode: int = 0o600) -> Path:
    tables: dict[str, dict[str, object]] = {
        "aggregator": {
            "fleet": "demo",
            "model_dir": "model",
            "state_dir": "state",
            "registry": "devices.toml",
            "box_key_file": "aggregator.box",
            "signing_key_file": "aggregator.sign",
        },
        "mqtt": {"broker": "mqtts://broker.lan:8883", "username": "aggregator", **mqtt},
    }
    return write(tmp_path / "aggregator.toml", render_toml(tables), mode)


# --- the document: size, encoding, and who may read a password ----------------------------------


def test_a_readable_config_holding_a_password_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", f'[mqtt]\nusername = "u"\npassword = "{PASSWORD}"\n', 0o644)
    with pytest.raises(ConfigError) as info:
        load_config_document(path, {}, "FEDGE_X")
    assert str(info.value) == (
        f"config {path} holds a password ([mqtt] password) but is accessible by group or others "
        f"(mode 0644): chmod 600 {path}, or move the password to a password_file"
    )
    assert PASSWORD not in str(info.value)
    path.chmod(0o600)
    assert load_config_document(path, {}, "FEDGE_X")["mqtt"]["password"] == PASSWORD


def test_a_password_in_any_table_counts(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", '[mqtt]\nusername = "u"\n\n[edgex]\npassword = "p"\n', 0o640)
    with pytest.raises(ConfigError, match=r"holds a password \(\[edgex\] password\).*mode 0640"):
        load_config_document(path, {}, "FEDGE_X")


def test_a_readable_config_without_a_password_loads_and_env_can_add_one(tmp_path: Path) -> None:
    """The systemd layout: agent.toml 0644 without secrets, the password from agent.env."""
    path = write(tmp_path / "c.toml", '[mqtt]\nusername = "u"\n', 0o644)
    data = load_config_document(path, {"FEDGE_X__MQTT__PASSWORD": PASSWORD}, "FEDGE_X")
    assert data["mqtt"] == {"username": "u", "password": PASSWORD}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe[mqtt]", "not UTF-8 text"),
        (b"[mqtt\n", "not valid TOML"),
        (b"#" * (MAX_CONFIG_BYTES + 1), f"is over {MAX_CONFIG_BYTES} bytes: not a fedge config"),
    ],
)
@READERS
def test_bad_documents_are_named(tmp_path: Path, content: bytes, message: str, reader: FileReader) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_config_document(path, {}, "FEDGE_X", reader)


@READERS
def test_missing_and_special_files(tmp_path: Path, reader: FileReader) -> None:
    with pytest.raises(ConfigError, match=rf"^cannot read config {tmp_path / 'nope.toml'}: No such file"):
        load_config_document(tmp_path / "nope.toml", {}, "FEDGE_X", reader)
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):  # and no hang on open
        load_config_document(fifo, {}, "FEDGE_X", reader)


def test_the_aggregator_loader_applies_the_same_rule(tmp_path: Path) -> None:
    path = aggregator_config(tmp_path, {"password": PASSWORD}, mode=0o644)
    with pytest.raises(ConfigError, match=r"holds a password \(\[mqtt\] password\)"):
        load_aggregator_config(path, {})
    path.chmod(0o600)
    assert load_aggregator_config(path, {}).mqtt.password == PASSWORD


# --- MqttSettings: the password never in a repr, or from a password file --------------------------


def test_repr_of_mqtt_settings_hides_the_password(tmp_path: Path) -> None:
    settings = load_aggregator_config(aggregator_config(tmp_path, {"password": PASSWORD}), {}).mqtt
    assert settings.password == PASSWORD
    assert PASSWORD not in repr(settings) and "password" not in repr(settings)
    assert "username='aggregator'" in repr(settings)


def test_password_file_relative_to_the_config(tmp_path: Path) -> None:
    write(tmp_path / "mqtt.password", PASSWORD + "\n")
    config = aggregator_config(tmp_path, {"password_file": "mqtt.password"}, mode=0o644)
    assert load_aggregator_config(config, {}).mqtt.password == PASSWORD  # a 0644 config is fine now
    write(tmp_path / "mqtt.password", PASSWORD + "\n\n")  # one trailing newline is stripped, not two
    with pytest.raises(ConfigError, match="holds more than one line"):
        load_aggregator_config(config, {})
    write(tmp_path / "mqtt.password", PASSWORD)  # no newline at all
    assert load_aggregator_config(config, {}).mqtt.password == PASSWORD


def test_password_file_must_be_owner_only(tmp_path: Path) -> None:
    secret = write(tmp_path / "mqtt.password", PASSWORD + "\n", 0o640)
    config = aggregator_config(tmp_path, {"password_file": "mqtt.password"})
    with pytest.raises(ConfigError) as info:
        load_aggregator_config(config, {})
    assert str(info.value) == (
        f"[mqtt] password_file {secret} is accessible by group or others (mode 0640): chmod 600 {secret}"
    )
    secret.chmod(0o400)
    assert load_aggregator_config(config, {}).mqtt.password == PASSWORD


@pytest.mark.parametrize(
    ("mqtt", "secret", "message"),
    [
        (
            {"password": "p", "password_file": "pw"},
            None,
            "[mqtt] password and password_file: give one of them, not both",
        ),
        ({"password_file": "pw"}, "\n", "[mqtt] password_file {pw} is empty"),
        ({"password_file": "pw"}, None, "cannot read [mqtt] password_file {pw}: No such file or directory"),
    ],
)
def test_password_file_errors(
    tmp_path: Path, mqtt: dict[str, object], secret: str | None, message: str
) -> None:
    if secret is not None:
        write(tmp_path / "pw", secret)
    with pytest.raises(ConfigError) as info:
        load_aggregator_config(aggregator_config(tmp_path, mqtt), {})
    assert str(info.value) == message.format(pw=tmp_path / "pw")


# --- the agent's EdgeX connection is a principal of its own ----------------------------------------


def test_edgex_on_the_fleet_broker_needs_its_own_username(tmp_path: Path) -> None:
    config = agent_config(tmp_path, {"username": "watch-01", "password": "p"})
    with pytest.raises(ConfigError) as info:
        load_agent_config(config, {})
    message = str(info.value)
    assert "\n" not in message
    assert message == (
        "[edgex] username: the EdgeX bus is the fleet broker, so the agent's EdgeX connection needs its "
        'own principal: set [edgex] username = "watch-01.edgex" and its password or password_file (from '
        "`fedge broker config`'s credentials/watch-01.edgex.txt), or give [edgex] a broker of its own"
    )


def test_edgex_username_must_differ_from_the_devices(tmp_path: Path) -> None:
    config = agent_config(
        tmp_path, {"username": "watch-01", "password": "p"}, {"username": "watch-01", "password": "p"}
    )
    with pytest.raises(ConfigError, match=r"^\[edgex\] username 'watch-01' is also \[mqtt\] username: "):
        load_agent_config(config, {})


def test_edgex_principal_needs_its_own_password(tmp_path: Path) -> None:
    config = agent_config(tmp_path, {"username": "watch-01", "password": "p"}, {"username": "watch-01.edgex"})
    with pytest.raises(ConfigError) as info:
        load_agent_config(config, {})
    assert str(info.value) == (
        "[edgex] password: the EdgeX connection as 'watch-01.edgex' needs its own password: set [edgex] "
        "password or password_file (from `fedge broker config`'s credentials/watch-01.edgex.txt)"
    )


def test_edgex_principal_with_a_client_certificate_needs_its_own(tmp_path: Path) -> None:
    fleet = {"username": "watch-01", "cert_file": "watch-01.crt", "key_file": "watch-01.key"}
    config = agent_config(tmp_path, fleet, {"username": "watch-01.edgex"})
    with pytest.raises(
        ConfigError, match=r"^\[edgex\] cert_file and key_file: .*credentials/watch-01\.edgex\.crt"
    ):
        load_agent_config(config, {})
    own = {"username": "watch-01.edgex", "cert_file": "e.crt", "key_file": "e.key"}
    bus = load_agent_config(agent_config(tmp_path, fleet, own), {}).edgex.bus
    assert (bus.cert_file, bus.key_file) == (str(tmp_path / "e.crt"), str(tmp_path / "e.key"))


def test_edgex_principal_credentials_are_used_and_nothing_of_the_devices(tmp_path: Path) -> None:
    write(tmp_path / "edgex.password", "bus-secret\n")
    config = agent_config(
        tmp_path,
        {"username": "watch-01", "password": "fleet-secret", "ca_file": "ca.crt", "keepalive": 20},
        {"username": "watch-01.edgex", "password_file": "edgex.password"},
    )
    cfg = load_agent_config(config, {})
    assert (cfg.mqtt.username, cfg.mqtt.password) == ("watch-01", "fleet-secret")
    bus = cfg.edgex.bus
    assert (bus.username, bus.password) == ("watch-01.edgex", "bus-secret")
    # The same broker, TLS trust and keepalive; never the device's identity.
    assert (bus.url, bus.ca_file, bus.keepalive) == (cfg.mqtt.url, str(tmp_path / "ca.crt"), 20)


def test_env_supplies_the_edgex_principal_as_systemd_does(tmp_path: Path) -> None:
    """provision-device.sh writes the usernames; agent.env holds both passwords."""
    path = agent_config(tmp_path, {"username": "watch-01"}, {"username": "watch-01.edgex"})
    path.chmod(0o644)
    env = {"FEDGE_AGENT__MQTT__PASSWORD": "a"}
    with pytest.raises(ConfigError, match=r"^\[edgex\] password: "):
        load_agent_config(path, env)
    cfg = load_agent_config(path, {**env, "FEDGE_AGENT__EDGEX__PASSWORD": "b"})
    assert (cfg.edgex.bus.username, cfg.edgex.bus.password) == ("watch-01.edgex", "b")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_no_edgex_principal_needed_without_fleet_credentials_or_with_an_own_broker(tmp_path: Path) -> None:
    assert load_agent_config(agent_config(tmp_path, {}), {}).edgex.bus.username is None  # anonymous broker
    own_bus = {"broker": "mqtt://edgex-bus:1883", "username": "svc"}
    bus = load_agent_config(
        agent_config(tmp_path, {"username": "watch-01", "password": "p"}, own_bus), {}
    ).edgex.bus
    assert (bus.host, bus.username, bus.password) == ("edgex-bus", "svc", None)
    # A device trained on recorded data has no EdgeX connection at all.
    tables = agent_tables({"username": "watch-01", "password": "p"})
    tables["data"] = {"source": "har-watch", "subject": 1}
    load_agent_config(write(tmp_path / "direct.toml", render_toml(tables)), {})
