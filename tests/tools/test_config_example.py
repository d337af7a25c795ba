"""``fedge agent config --example`` and ``fedge aggregator config --example``: the example is TOML,
names every key the loader accepts, and loads, against a real fleet's files, into the very
config an empty table gives. The key descriptions it is written from
(``fedge.tools.config_example.SERVICES``) are held to the loaders by probing them: each kind,
range and choice list below is the one the loader enforces."""

from __future__ import annotations

import argparse
import ast
import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest
from nacl.public import PrivateKey

from fedge.agent.config import AGENT_TABLES, load_agent_config
from fedge.aggregator.config import AGGREGATOR_TABLES, load_aggregator_config
from fedge.aggregator.registry import load_registry
from fedge.lab.provision import FleetFiles, create_fleet
from fedge.protocol.config_source import ConfigError
from fedge.protocol.sealing import key_to_text
from fedge.protocol.signing import signing_key_to_text
from fedge.protocol.task import parse_task_spec
from fedge.shell.files import read_private_key
from fedge.tools.config_example import (
    BOOLEAN,
    INTEGER,
    NUMBER,
    PATH,
    SERVICES,
    STRING,
    STRINGS,
    TABLES,
    Key,
    add_config_commands,
    example_config,
    toml_value,
)

REPO = Path(__file__).resolve().parents[2]
CODE_TABLES = {"agent": AGENT_TABLES, "aggregator": AGGREGATOR_TABLES}
LOADERS = {"agent": load_agent_config, "aggregator": load_aggregator_config}
#: Inside a pod, so that [leader] is enabled and its settings are read into the config too.
POD_ENV = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "POD_NAMESPACE": "fedge", "POD_NAME": "fedge-aggregator-0"}
DEVICE, FLEET = "watch-01", "building-1"  # the example's own ids


def render(doc: dict[str, Any]) -> str:
    return "".join(
        f"[{table}]\n" + "".join(f"{key} = {toml_value(value)}\n" for key, value in keys.items()) + "\n"
        for table, keys in doc.items()
    )


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def keys_of(files: FleetFiles) -> dict[str, dict[str, object]]:
    """The agent's only values that are no file: the aggregator's public keys, as pasted."""
    return {
        "agent": {
            "aggregator_public_key": key_to_text(files.box_key.public_key),
            "aggregator_verify_keys": [signing_key_to_text(files.signing_key.verify_key)],
        }
    }


@pytest.fixture
def fleet(tmp_path: Path) -> FleetFiles:
    """A real fleet laid out as the example names it: keys/, devices.toml, model/, tasks/."""
    files = create_fleet(tmp_path, FLEET, tmp_path / "model", "mqtt://127.0.0.1:1883", {DEVICE: 1}, {})
    (tmp_path / "model").mkdir()
    (tmp_path / "tasks").mkdir()
    shutil.copy(REPO / "tasks" / "har-watch.toml", tmp_path / "tasks" / "har-watch.toml")
    return files


def example_doc(service: str, files: FleetFiles) -> dict[str, Any]:
    values = keys_of(files) if service == "agent" else {}
    return tomllib.loads(example_config(service, values))


def load(service: str, path: Path, env: dict[str, str] | None = None) -> Any:
    return LOADERS[service](path, POD_ENV if env is None and service == "aggregator" else env or {})


def listed_keys(text: str) -> dict[str, set[str]]:
    """table -> the keys the example writes, set or commented out (``# key = ...``)."""
    tables: dict[str, set[str]] = {}
    current: set[str] = set()
    for line in text.splitlines():
        if header := re.fullmatch(r"\[(\w+)\]", line):
            current = tables.setdefault(header[1], set())
        elif key := re.match(r"(?:# )?(\w+) = ", line):
            current.add(key[1])
    return tables


@pytest.mark.parametrize("service", SERVICES)
def test_the_example_is_toml_and_so_is_every_commented_out_key(service: str) -> None:
    text = example_config(service)
    doc = tomllib.loads(text)
    assert list(doc) == [s.name for s in SERVICES[service]]
    uncommented = tomllib.loads(re.sub(r"(?m)^# (\w+ = )", r"\1", text))
    for section in SERVICES[service]:
        assert list(uncommented[section.name]) == [k.name for k in section.keys], "every key, in order"
        for key in section.keys:
            shown = key.default if key.default is not None else key.example
            assert uncommented[section.name][key.name] == shown


@pytest.mark.parametrize("service", SERVICES)
def test_the_example_names_every_key_the_loader_accepts(service: str) -> None:
    code = CODE_TABLES[service]
    assert listed_keys(example_config(service)) == code
    assert {s.name: {k.name for k in s.keys} for s in SERVICES[service]} == code


@pytest.mark.parametrize("service", SERVICES)
def test_the_example_loads_against_a_real_fleet_with_the_files_it_names(
    service: str, fleet: FleetFiles, tmp_path: Path
) -> None:
    values = keys_of(fleet) if service == "agent" else {}
    path = tmp_path / f"{service}.example.toml"
    path.write_text(example_config(service, values))  # mode 0644: the example holds no password
    config = load(service, path)
    if service == "agent":
        assert (config.device_id, config.fleet) == (DEVICE, FLEET)
        key = read_private_key(config.key_file, "box", what="device key")
        assert PrivateKey(key).public_key == fleet.device_keys[DEVICE].public_key
        assert config.data.task_file is not None
        assert parse_task_spec(config.data.task_file.read_text()).name
        assert set(config.trusted_keys.values()) == {fleet.signing_key.verify_key}
        assert config.aggregator_public_key == fleet.box_key.public_key
    else:
        assert config.fleet == FLEET and config.model_dir.is_dir()
        assert set(load_registry(config.registry_file)) == {DEVICE}
        assert read_private_key(config.box_key_file, "box") == bytes(fleet.box_key)
        assert read_private_key(config.signing_key_file, "signing") == bytes(fleet.signing_key)
        assert config.leader.enabled and config.leader.namespace == "fedge"


def test_the_agent_example_as_printed_is_refused_until_the_aggregator_keys_are_pasted(
    fleet: FleetFiles, tmp_path: Path
) -> None:
    """Placeholders, never sample keys: a device must not trust a key somebody else holds."""
    path = write(tmp_path / "agent.example.toml", example_config("agent"))
    with pytest.raises(ConfigError, match=r"^\[agent\] .*key"):
        load("agent", path)


@pytest.mark.parametrize("service", SERVICES)
def test_every_default_written_is_the_loaders_default(
    service: str, fleet: FleetFiles, tmp_path: Path
) -> None:
    """The example, loaded, is the same config as a file with only the required keys."""
    doc = example_doc(service, fleet)
    required = {s.name: {k.name for k in s.keys if k.required} for s in SERVICES[service]}
    minimal = {table: {k: v for k, v in keys.items() if k in required[table]} for table, keys in doc.items()}
    full = load(service, write(tmp_path / "full.toml", render(doc)))
    assert full == load(service, write(tmp_path / "minimal.toml", render(minimal)))


def _keys() -> list[Any]:
    return [
        pytest.param(service, section.name, key, id=f"{service}-{section.name}-{key.name}")
        for service, sections in SERVICES.items()
        for section in sections
        for key in section.keys
    ]


@pytest.mark.parametrize(("service", "table", "key"), _keys())
def test_each_kind_range_and_choice_list_is_the_loaders(
    service: str, table: str, key: Key, fleet: FleetFiles, tmp_path: Path
) -> None:
    """A value of the wrong type makes the loader say what it wants: that is what the key says."""
    doc = example_doc(service, fleet)
    doc[table][key.name] = 7 if key.kind in (STRING, PATH) and not key.choices else "probe"
    with pytest.raises(ConfigError) as refused:
        load(service, write(tmp_path / "probe.toml", render(doc)))
    message = str(refused.value)
    assert message.startswith(f"[{table}] {key.name} must be "), message
    if key.choices:
        listed = re.search(r"must be one of (\[.*?\]), got", message)
        assert listed and ast.literal_eval(listed[1]) == list(key.choices), message
    elif key.kind in (INTEGER, NUMBER):
        article = "an integer" if key.kind == INTEGER else "a number"
        bounds = re.search(rf"\b{article}\b.*? in (\S+?)\.\.(\S+?), got", message)
        assert bounds, message
        parse = int if key.kind == INTEGER else float
        assert (parse(bounds[1]), parse(bounds[2])) == (key.lo, key.hi), message
    elif key.kind == BOOLEAN:
        assert "must be true or false" in message
    elif key.kind == STRINGS:
        assert "must be a non-empty list" in message
    elif key.kind == TABLES:
        assert "must be a list of tables" in message
    else:
        assert re.search(r"must be a (non-empty )?string", message), message


@pytest.mark.parametrize(("service", "table", "key"), [p for p in _keys() if p.values[2].required])
def test_each_required_key_is_required(
    service: str, table: str, key: Key, fleet: FleetFiles, tmp_path: Path
) -> None:
    doc = example_doc(service, fleet)
    del doc[table][key.name]
    with pytest.raises(ConfigError, match=re.escape(f"[{table}] {key.name}")):
        load(service, write(tmp_path / "without.toml", render(doc)))


def test_own_values_are_checked_and_written_out() -> None:
    text = example_config("aggregator", {"mqtt": {"username": "aggregator"}, "rounds": {"codec": "int8"}})
    doc = tomllib.loads(text)
    assert doc["mqtt"]["username"] == "aggregator" and doc["rounds"]["codec"] == "int8"
    with pytest.raises(ValueError, match="no table"):
        example_config("agent", {"rounds": {}})
    with pytest.raises(KeyError, match="no key"):
        example_config("agent", {"agent": {"device": "x"}})
    with pytest.raises(ValueError, match="unknown service"):
        example_config("broker")


def test_config_example_is_a_subcommand_of_both_services(capsys: pytest.CaptureFixture[str]) -> None:
    """What ``fedge.cli.build_parser`` wires: ``fedge agent|aggregator config --example``."""
    parser = argparse.ArgumentParser(prog="fedge")
    sub = parser.add_subparsers(dest="command", required=True)
    services = {}
    for name in ("agent", "aggregator"):
        services[name] = sub.add_parser(name).add_subparsers(dest=f"{name}_command", required=True)
        services[name].add_parser("run")
    add_config_commands(services["agent"], services["aggregator"])
    for name in ("agent", "aggregator"):
        args = parser.parse_args([name, "config", "--example"])
        assert args.func(args) == 0
        assert capsys.readouterr().out == example_config(name)
        with pytest.raises(SystemExit) as usage:
            parser.parse_args([name, "config"])
        assert usage.value.code == 2
        assert "--example" in capsys.readouterr().err


def test_the_fedge_command_prints_both_examples() -> None:
    import os
    import subprocess
    import sys

    from support.source_tree import PYTHONPATH

    for service in ("agent", "aggregator"):
        out = subprocess.run(
            [sys.executable, "-m", "fedge.cli", service, "config", "--example"],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": PYTHONPATH},
            check=True,
        )
        assert out.stdout == example_config(service)  # type: ignore[arg-type]
