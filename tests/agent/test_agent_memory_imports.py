"""What an EdgeX agent does not load (issue 18: device memory), checked in a fresh interpreter
(this one has loaded everything the tests use).

The CSV reader (``[data] source = "csv"``: ``fedge.agent.csv_source`` with ``csv_format`` and
the ``csv`` module, ~0.3 MiB) is imported when a device reads a CSV, not by every agent; its
wiring is exercised by the CSV source's own tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from nacl.public import PrivateKey
from nacl.signing import SigningKey

from fedge.protocol.sealing import key_to_text
from fedge.protocol.signing import signing_key_to_text

REPO = Path(__file__).resolve().parents[2]

_PROBE = r"""
import json, sys
import fedge.cli
fedge.cli.prepare_agent_process()  # what fedge agent run does first
import fedge.agent.config, fedge.agent.service, fedge.agent.wiring  # then its imports
print(json.dumps({m: m in sys.modules for m in sys.argv[1:]}))
"""


def loaded_by_an_agent(*modules: str) -> dict[str, bool]:
    """Which of ``modules`` ``fedge agent run``'s imports load, in a fresh interpreter."""
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *modules], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    loaded: dict[str, bool] = json.loads(proc.stdout.strip().splitlines()[-1])
    return loaded


def test_an_agent_loads_the_csv_reader_only_for_a_csv_source() -> None:
    assert loaded_by_an_agent("csv", "fedge.agent.csv_source", "fedge.agent.csv_format") == {
        "csv": False,
        "fedge.agent.csv_source": False,
        "fedge.agent.csv_format": False,
    }


def test_a_csv_device_still_gets_its_csv_source(tmp_path: Path) -> None:
    """The import moved into ``build_csv_source``: a ``source = "csv"`` config builds the reader."""
    from fedge.agent.config import load_agent_config
    from fedge.agent.csv_source import CsvSource
    from fedge.agent.wiring import build_csv_source

    csv_file = tmp_path / "readings.csv"
    csv_file.write_text("time,accel_x\n", encoding="utf-8")
    config = tmp_path / "agent.toml"
    config.write_text(
        "\n".join(
            [
                "[agent]",
                'device_id = "watch-01"',
                'fleet = "demo"',
                'state_dir = "state"',
                'key_file = "watch-01.box"',
                f'aggregator_public_key = "{key_to_text(PrivateKey.generate().public_key)}"',
                f'aggregator_verify_keys = ["{signing_key_to_text(SigningKey.generate().verify_key)}"]',
                "[mqtt]",
                'broker = "mqtts://broker.lan:8883"',
                "[data]",
                'source = "csv"',
                f'task = "{REPO / "tasks" / "har-watch.toml"}"',
                f'csv_file = "{csv_file}"',
                "[edgex]",
                'device = "watch-01"',
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    config.chmod(0o600)
    (tmp_path / "state").mkdir(mode=0o700)  # the agent's wiring prepares it before the sources
    source = build_csv_source(load_agent_config(config, {}))
    try:
        assert isinstance(source, CsvSource)
        assert source.available() == 0  # an empty store; the file is read once the source starts
    finally:
        source.store.close()


def test_an_agent_loads_what_is_off_by_default_only_when_configured() -> None:
    """Personalisation, secure aggregation, Home Assistant discovery, write-back rules and the
    metrics endpoint are off by default: their modules (and ``http.server``) load when their
    section turns them on (each feature's own tests build it that way)."""
    optional = (
        "fedge.agent.personal",
        "fedge.agent.secure_agent",
        "fedge.agent.home_assistant",
        "fedge.agent.writeback",
        "fedge.agent.edgex.core_command",
        "fedge.shell.http_endpoint",
        "http.server",
    )
    assert loaded_by_an_agent(*optional) == dict.fromkeys(optional, False)


def test_an_agent_loads_urllib_request_and_difflib_only_when_used() -> None:
    """paho imports ``urllib.request`` (with ``http.client`` and ``email``: ~1.5 MiB) for proxies
    it looks up only with PySocks installed; the EdgeX profile's "did you mean" needs difflib
    only for an error message."""
    assert loaded_by_an_agent("http.client", "email", "email.parser", "difflib") == {
        "http.client": False,
        "email": False,
        "email.parser": False,
        "difflib": False,
    }


_USE_PROBE = r"""
import json, sys
import fedge.cli
fedge.cli.prepare_agent_process()
import fedge.agent.config, fedge.agent.service, fedge.agent.wiring, paho.mqtt.client
out = {"stand_in": type(sys.modules["urllib.request"]).__name__}
from urllib.request import getproxies  # the first use
import urllib.request
out["loaded"] = "http.client" in sys.modules
out["module"] = type(sys.modules["urllib.request"]).__name__
out["same"] = urllib.request.getproxies is getproxies and callable(getproxies)
out["parent"] = sys.modules["urllib"].request is sys.modules["urllib.request"]
import requests  # what an agent with EdgeX core-data loads
requests.Session().close()
out["requests"] = requests.utils.getproxies is getproxies
print(json.dumps(out))
"""


def test_urllib_request_works_once_used_in_an_agent_process() -> None:
    proc = subprocess.run([sys.executable, "-c", _USE_PROBE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        "stand_in": "_StandIn",
        "loaded": True,
        "module": "module",
        "same": True,
        "parent": True,
        "requests": True,
    }
