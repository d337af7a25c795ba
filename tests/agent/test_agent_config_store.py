"""``[edgex] store_max_age_s``: 1 s to ten years, or 0 to keep samples of any age."""

from __future__ import annotations

from pathlib import Path

import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from fedge.agent.config import load_agent_config
from fedge.protocol.config_source import ConfigError
from fedge.protocol.sealing import key_to_text
from fedge.protocol.signing import signing_key_to_text

REPO = Path(__file__).resolve().parents[2]


def config_with(tmp_path: Path, edgex_line: str) -> Path:
    """An agent config on an anonymous broker, with one extra ``[edgex]`` line."""
    path = tmp_path / "agent.toml"
    path.write_text(
        "[agent]\n"
        'device_id = "room-101"\nfleet = "demo"\nstate_dir = "state"\nkey_file = "room-101.box"\n'
        f'aggregator_public_key = "{key_to_text(PrivateKey.generate().public_key)}"\n'
        f'aggregator_verify_keys = ["{signing_key_to_text(SigningKey.generate().verify_key)}"]\n'
        '[mqtt]\nbroker = "mqtt://broker.lan:1883"\n'
        f'[data]\nsource = "edgex"\ntask = "{REPO / "tasks" / "har-watch.toml"}"\n'
        f'[edgex]\ndevice = "room-101"\n{edgex_line}\n'
    )
    path.chmod(0o600)
    return path


@pytest.mark.parametrize(
    ("line", "max_age_s"),
    [
        ("", 30 * 24 * 3600.0),  # the default: 30 days
        ("store_max_age_s = 0", 0.0),  # any age: a replayed historical export is kept
        ("store_max_age_s = 0.0", 0.0),
        ("store_max_age_s = 1", 1.0),
        ("store_max_age_s = 315360000", 315360000.0),  # ten years
    ],
)
def test_store_max_age_s_is_a_positive_age_or_0_for_any_age(
    tmp_path: Path, line: str, max_age_s: float
) -> None:
    assert load_agent_config(config_with(tmp_path, line), {}).edgex.store_max_age_s == max_age_s


@pytest.mark.parametrize("value", ["0.5", "-1", "315360001", "true", '"30d"', "nan"])
def test_other_store_max_age_s_values_are_refused_with_the_range(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_agent_config(config_with(tmp_path, f"store_max_age_s = {value}"), {})
    assert str(info.value).startswith(
        "[edgex] store_max_age_s must be 0 (keep samples of any age) or a number of seconds in "
        "1.0..315360000.0, got "
    )
