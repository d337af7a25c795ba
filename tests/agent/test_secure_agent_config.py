"""``[agent]``'s secure-aggregation keys: ``identity_key_file``, ``identity_certificate_file``,
``operator_verify_keys`` (all three or none) and ``require_secure_aggregation``; and the check at
start that the certificate is the operator's, for this fleet and device, of this identity key.

Keys and certificates are made with the very functions ``fedge keys identity``, ``fedge keys
operator`` and ``fedge certify`` run."""

from __future__ import annotations

from pathlib import Path

import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from fedge.agent.config import AgentConfig, load_agent_config
from fedge.agent.secure_agent import load_secure_identity, read_certificate
from fedge.protocol.config_source import ConfigError
from fedge.protocol.sealing import key_to_text
from fedge.protocol.signing import key_id, signing_key_to_text
from fedge.tools.identity_keys import create_identity_key, create_operator_key, write_certificate

DEVICE, FLEET = "room-101", "demo"
AGGREGATOR_SIGN = SigningKey.generate()


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    """An operator key, the device's identity key and its certificate, as provisioning makes them."""
    operator_file, operator_key, _ = create_operator_key(tmp_path / "operator")
    identity_file, identity_key = create_identity_key(tmp_path / "keys", DEVICE)
    cert = write_certificate(operator_file, FLEET, DEVICE, identity_key, tmp_path / "keys" / f"{DEVICE}.cert")
    return {
        "operator_file": str(operator_file),
        "operator_key": operator_key,
        "identity_key": identity_key,
        "identity_key_file": str(identity_file.relative_to(tmp_path)),
        "identity_certificate_file": str(cert.relative_to(tmp_path)),
    }


def config_with(tmp_path: Path, *agent_lines: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        "[agent]\n"
        f'device_id = "{DEVICE}"\nfleet = "{FLEET}"\nstate_dir = "state"\nkey_file = "{DEVICE}.box"\n'
        f'aggregator_public_key = "{key_to_text(PrivateKey.generate().public_key)}"\n'
        f'aggregator_verify_keys = ["{signing_key_to_text(AGGREGATOR_SIGN.verify_key)}"]\n'
        + "".join(f"{line}\n" for line in agent_lines)
        + '[mqtt]\nbroker = "mqtt://broker.lan:1883"\n[data]\nsource = "har-watch"\n'
    )
    path.chmod(0o600)
    return path


def lines(keys: dict[str, str], *names: str) -> list[str]:
    values = {
        "identity_key_file": f'identity_key_file = "{keys["identity_key_file"]}"',
        "identity_certificate_file": f'identity_certificate_file = "{keys["identity_certificate_file"]}"',
        "operator_verify_keys": f'operator_verify_keys = ["{keys["operator_key"]}"]',
    }
    return [values[n] for n in names]


ALL = ("identity_key_file", "identity_certificate_file", "operator_verify_keys")


def load(tmp_path: Path, *agent_lines: str) -> AgentConfig:
    return load_agent_config(config_with(tmp_path, *agent_lines), {})


def test_without_the_keys_there_is_no_secure_aggregation(tmp_path: Path) -> None:
    config = load(tmp_path)
    assert config.identity_key_file is None and config.identity_certificate_file is None
    assert config.operator_verify_keys == {} and config.require_secure_aggregation is False
    assert not config.secure_aggregation_ready
    assert load_secure_identity(config) is None


def test_the_three_keys_give_a_verified_identity(tmp_path: Path, keys: dict[str, str]) -> None:
    config = load(tmp_path, *lines(keys, *ALL), "require_secure_aggregation = true")
    assert config.identity_key_file == tmp_path / keys["identity_key_file"]
    assert config.identity_certificate_file == tmp_path / keys["identity_certificate_file"]
    (operator,) = config.operator_verify_keys.values()
    assert signing_key_to_text(operator) == keys["operator_key"]
    assert list(config.operator_verify_keys) == [key_id(operator)]
    assert config.require_secure_aggregation and config.secure_aggregation_ready
    identity = load_secure_identity(config)
    assert identity is not None
    assert signing_key_to_text(identity.signing_key.verify_key) == keys["identity_key"]
    assert identity.certificate == read_certificate(tmp_path / keys["identity_certificate_file"])
    assert identity.operator_keys == config.operator_verify_keys


@pytest.mark.parametrize(
    ("given", "missing"),
    [
        (("identity_key_file",), "identity_certificate_file and operator_verify_keys"),
        (("identity_certificate_file",), "identity_key_file and operator_verify_keys"),
        (("operator_verify_keys",), "identity_key_file and identity_certificate_file"),
        (("identity_key_file", "identity_certificate_file"), "operator_verify_keys"),
        (("identity_key_file", "operator_verify_keys"), "identity_certificate_file"),
        (("identity_certificate_file", "operator_verify_keys"), "identity_key_file"),
    ],
)
def test_the_identity_keys_go_together(
    tmp_path: Path, keys: dict[str, str], given: tuple[str, ...], missing: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        load(tmp_path, *lines(keys, *given))
    assert str(refused.value) == (
        f"[agent] {missing} missing: secure aggregation needs identity_key_file (`fedge keys "
        "identity`), identity_certificate_file (`fedge certify`) and operator_verify_keys (`fedge "
        "keys operator`) together; set all three or none"
    )


def test_requiring_secure_aggregation_needs_the_identity_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        load(tmp_path, "require_secure_aggregation = true")
    assert str(refused.value) == (
        "[agent] require_secure_aggregation = true needs identity_key_file, identity_certificate_file "
        "and operator_verify_keys (from `fedge keys identity`, `fedge certify` and `fedge keys "
        "operator`), or set it to false"
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('identity_key_file = ""', "[agent] identity_key_file must be a non-empty string"),
        ("identity_certificate_file = 7", "[agent] identity_certificate_file must be a string"),
        ("operator_verify_keys = []", "[agent] operator_verify_keys must be a non-empty list of base64 keys"),
        (
            'operator_verify_keys = "abc"',
            "[agent] operator_verify_keys must be a non-empty list of base64 keys",
        ),
        ('require_secure_aggregation = "yes"', "[agent] require_secure_aggregation must be true or false"),
    ],
)
def test_bad_values_are_refused_by_name(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load(tmp_path, line)
    assert str(refused.value) == message


def test_an_operator_key_that_is_not_a_key_is_refused(tmp_path: Path, keys: dict[str, str]) -> None:
    bad = [*lines(keys, "identity_key_file", "identity_certificate_file"), 'operator_verify_keys = ["bm9w"]']
    with pytest.raises(ConfigError, match=r"^\[agent\] operator_verify_keys: "):
        load(tmp_path, *bad)


def test_the_aggregators_key_is_never_an_operator_key(tmp_path: Path, keys: dict[str, str]) -> None:
    aggregator = signing_key_to_text(AGGREGATOR_SIGN.verify_key)
    agent_lines = [*lines(keys, "identity_key_file", "identity_certificate_file")]
    agent_lines.append(f'operator_verify_keys = ["{keys["operator_key"]}", "{aggregator}"]')
    with pytest.raises(ConfigError) as refused:
        load(tmp_path, *agent_lines)
    assert str(refused.value) == (
        f"[agent] operator_verify_keys: key {key_id(AGGREGATOR_SIGN.verify_key)} is also in "
        "aggregator_verify_keys; the operator key certifies identity keys the aggregator must not "
        "choose: pin the key `fedge keys operator` printed, never an aggregator key"
    )


# --- the check at start -------------------------------------------------------------------------


def test_a_certificate_of_another_key_is_refused_with_the_fix(tmp_path: Path, keys: dict[str, str]) -> None:
    other = signing_key_to_text(SigningKey.generate().verify_key)
    write_certificate(
        Path(keys["operator_file"]),
        FLEET,
        DEVICE,
        other,
        tmp_path / keys["identity_certificate_file"],
        force=True,
    )
    config = load(tmp_path, *lines(keys, *ALL))
    with pytest.raises(ConfigError) as refused:
        load_secure_identity(config)
    assert str(refused.value) == (
        f"[agent] identity_certificate_file {config.identity_certificate_file} certifies another key "
        f"than identity_key_file {config.identity_key_file}: certify this one (fedge certify --fleet "
        f"{FLEET} --id {DEVICE} --identity-key {keys['identity_key']}) or point identity_key_file at "
        "the key it certifies"
    )


@pytest.mark.parametrize(
    ("fleet", "device", "reason"),
    [
        ("other-fleet", DEVICE, "wrong_fleet"),
        (FLEET, "room-102", "wrong_device"),
        (None, None, "unknown_key"),
    ],
)
def test_a_certificate_for_another_fleet_device_or_operator_is_refused(
    tmp_path: Path, keys: dict[str, str], fleet: str | None, device: str | None, reason: str
) -> None:
    operator = Path(keys["operator_file"])
    if fleet is None:  # signed by an operator key the device does not pin
        operator = create_operator_key(tmp_path / "other-operator")[0]
    write_certificate(
        operator,
        fleet or FLEET,
        device or DEVICE,
        keys["identity_key"],
        tmp_path / keys["identity_certificate_file"],
        force=True,
    )
    config = load(tmp_path, *lines(keys, *ALL))
    with pytest.raises(ConfigError) as refused:
        load_secure_identity(config)
    message = str(refused.value)
    assert message.startswith(
        f"[agent] identity_certificate_file {config.identity_certificate_file} does not verify ({reason}): "
    )
    assert message.endswith(
        "certify this device with the operator key whose verify key is in operator_verify_keys: "
        f"fedge certify --fleet {FLEET} --id {DEVICE} --identity-key {keys['identity_key']}"
    )
    assert "\n" not in message


def test_unreadable_key_and_certificate_files_are_one_line_errors(
    tmp_path: Path, keys: dict[str, str]
) -> None:
    config = load(tmp_path, *lines(keys, *ALL))
    assert config.identity_certificate_file is not None and config.identity_key_file is not None
    config.identity_certificate_file.write_text("not base64!\n")
    with pytest.raises(ConfigError) as refused:
        load_secure_identity(config)
    assert str(refused.value) == (
        f"[agent] identity_certificate_file {config.identity_certificate_file} is not base64 (write it "
        "with fedge certify)"
    )
    config.identity_certificate_file.unlink()
    with pytest.raises(
        ConfigError, match=r"^cannot read \[agent\] identity_certificate_file .*: No such file"
    ):
        load_secure_identity(config)
    config.identity_key_file.chmod(0o644)  # a key others can read is a leaked key
    with pytest.raises(ConfigError, match=r"\.identity is accessible by group or others .*chmod 600"):
        load_secure_identity(config)
