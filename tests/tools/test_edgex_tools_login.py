"""``fedge edgex tap`` and ``fedge edgex simulate`` against the broker ``fedge broker config``
locks down: TLS with its lab CA, a password per principal, ACLs.

Real subprocesses against a real Mosquitto running the generated configuration unchanged. The
tap reads as the device's EdgeX principal (``watch-01.edgex``), the simulator publishes as an
EdgeX service principal; passwords come from owner-only files (``--password-file``), never
from the command line. A tap that cannot connect fails (exit 2) instead of ending quietly with
nothing printed, and bad options are usage errors before anything connects.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedge.lab import har_watch
from fedge.lab.broker import ConfiguredMosquitto, free_loopback_port
from fedge.tools.broker_config import BrokerConfigRequest, BrokerLimits, FleetAccess, write_broker_config
from support.mqtt_fixtures import require_mosquitto
from support.source_tree import PYTHONPATH

REPO = Path(__file__).resolve().parents[2]
DEVICE = "watch-01"  # subject 1 of the recorded data set
READER = f"{DEVICE}.edgex"  # the device's EdgeX principal: may read its readings
SERVICE = "edgex-core"  # an EdgeX service principal: may publish readings
ROWS = 3
READINGS = ROWS * (len(har_watch.RESOURCES) + 1)


@dataclass
class Broker:
    url: str
    ca: Path
    passwords: dict[str, Path]  # principal -> its 0600 password file


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    exe = require_mosquitto()
    tmp = tmp_path_factory.mktemp("locked-broker")
    data_dir = tmp / "data"
    data_dir.mkdir()
    result = write_broker_config(
        BrokerConfigRequest(
            access=FleetAccess(fleet="f1", devices=(DEVICE,), aggregator="agg", edgex_services=(SERVICE,)),
            out_dir=tmp / "broker",
            tls="lab",
            port=free_loopback_port(),
            bind="127.0.0.1",
            data_dir=data_dir,
            run_as="root" if os.geteuid() == 0 else None,
            limits=BrokerLimits.for_fleet(1, 50_000),
        )
    )
    creds_dir = result.out_dir / "credentials"
    passwords: dict[str, Path] = {}
    url = ""
    for name in (READER, SERVICE):
        creds = tomllib.loads((creds_dir / f"{name}.txt").read_text())
        url = creds["broker"]
        passwords[name] = tmp / f"{name}.password"
        passwords[name].write_text(creds["password"] + "\n")
        passwords[name].chmod(0o600)
    ca = creds_dir / "ca.crt"
    with ConfiguredMosquitto(
        result.out_dir / "mosquitto.conf",
        port=result.port,
        work_dir=tmp / "run",
        tls_context=ssl.create_default_context(cafile=str(ca)),
        executable=exe,
    ):
        yield Broker(url, ca, passwords)


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("FEDGE_")}
    e["PYTHONPATH"] = PYTHONPATH
    return e


def fedge(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedge.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env(),
        timeout=timeout,
        check=False,
    )


def login(b: Broker, name: str) -> list[str]:
    return ["--username", name, "--password-file", str(b.passwords[name]), "--ca-file", str(b.ca)]


def simulate(b: Broker, *login_args: str) -> subprocess.CompletedProcess[str]:
    return fedge(
        "edgex", "simulate", "--broker", b.url, "--subjects", "1", "--rows", str(ROWS), "--json", *login_args
    )


def test_tap_reads_what_simulate_publishes_through_the_locked_down_broker(broker: Broker) -> None:
    tap = subprocess.Popen(
        [sys.executable, "-m", "fedge.cli", "edgex", "tap", "--broker", broker.url, "--json",
         "--count", str(READINGS), "--timeout", "90", *login(broker, READER)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env(),
    )  # fmt: skip
    try:
        assert tap.stderr is not None
        first = tap.stderr.readline()  # once connected and subscribed
        assert first == f"fedge edgex tap: reading edgex/ events at {broker.url}\n", first
        published = simulate(broker, *login(broker, SERVICE))
        assert published.returncode == 0, published.stderr
        assert json.loads(published.stdout)["readings"] == READINGS
        out, err = tap.communicate(timeout=90)
    finally:
        if tap.poll() is None:
            tap.kill()
            tap.wait(timeout=30)
    assert tap.returncode == 0, err
    readings = [json.loads(line) for line in out.splitlines()]
    assert len(readings) == READINGS
    assert {r["device"] for r in readings} == {DEVICE}
    assert '"printed": 21' in err and '"malformed": {}' in err


def test_a_tap_that_cannot_connect_fails_and_says_why(broker: Broker) -> None:
    """Anonymous (what tap did before it took credentials): refused, exit 2, not exit 0."""
    started = time.monotonic()
    proc = fedge("edgex", "tap", "--broker", broker.url, "--ca-file", str(broker.ca), "--timeout", "3")
    assert proc.returncode == 2, proc.stderr
    assert time.monotonic() - started < 60
    assert "EdgeX broker refused the connection: Not authorized" in proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"fedge: error: no connection to the EdgeX broker at {broker.url} within 3 s (the lines above say "
        "why); check the URL, --username, --password-file and --ca-file"
    )
    assert proc.stdout == ""


def test_a_tap_without_the_ca_says_to_check_ca_file(broker: Broker) -> None:
    wrong = ["--username", READER, "--password-file", str(broker.passwords[READER])]
    proc = fedge("edgex", "tap", "--broker", broker.url, "--timeout", "2", *wrong)
    assert proc.returncode == 2, proc.stderr
    assert "certificate verify failed" in proc.stderr
    assert "check: ca_file is not set, so only the system's CAs are trusted" in proc.stderr
    assert "fedge: error: no connection to the EdgeX broker" in proc.stderr


def test_simulate_with_a_wrong_password_fails_with_the_refusal(broker: Broker, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not the password\n")
    wrong.chmod(0o600)
    proc = simulate(broker, "--username", SERVICE, "--password-file", str(wrong), "--ca-file", str(broker.ca))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"fedge: error: cannot connect to the broker at {broker.url}: the broker refused the connection "
        "(Not authorized); check --username and --password-file"
    ]


def test_simulate_with_plain_mqtt_on_the_tls_port_says_to_check_tls(broker: Broker) -> None:
    plain = broker.url.replace("mqtts://", "mqtt://")
    proc = fedge("edgex", "simulate", "--broker", plain, "--subjects", "1", "--rows", "1")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"fedge: error: cannot connect to the broker at {plain}: the broker closed the connection without "
        "answering CONNECT; check: does this port expect TLS? (then use mqtts:// and ca_file)"
    ]


@pytest.mark.parametrize("command", ["tap", "simulate"])
def test_login_options_are_checked_before_connecting(command: str, tmp_path: Path) -> None:
    url = "mqtts://127.0.0.1:1"  # never reached: every case fails before connecting
    readable = tmp_path / "readable.password"
    readable.write_text("secret\n")
    readable.chmod(0o644)
    owner_only = tmp_path / "owner.password"
    owner_only.write_text("secret\n")
    owner_only.chmod(0o600)
    missing_ca = tmp_path / "missing-ca.crt"
    cases = [
        (
            ["--username", "u", "--password-file", str(readable)],
            f"--password-file {readable} is accessible by group or others (mode 0644): chmod 600 {readable}",
        ),
        (
            ["--username", "u", "--password-file", str(tmp_path / "none")],
            f"cannot read --password-file {tmp_path / 'none'}: No such file or directory",
        ),
        (["--password-file", str(owner_only)], "--password-file needs --username"),
        (
            ["--ca-file", str(missing_ca)],
            f"cannot read ca_file {missing_ca} (for {url}): No such file or directory",
        ),
        (
            ["--ca-file", str(missing_ca), "--broker", "mqtt://127.0.0.1:1"],
            "--ca-file is for TLS: the broker URL must start with mqtts://, not mqtt://127.0.0.1:1",
        ),
    ]
    for extra, message in cases:
        proc = fedge("edgex", command, "--broker", url, *extra)
        assert proc.returncode == 2, (extra, proc.stderr)
        assert proc.stderr.startswith(f"fedge: error: {message}"), (extra, proc.stderr)
        assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_tap_timeout_must_be_a_positive_number(value: str) -> None:
    proc = fedge("edgex", "tap", "--broker", "mqtt://127.0.0.1:1", "--timeout", value)
    assert proc.returncode == 2
    shown = repr(value) if value == "soon" else value
    assert f"argument --timeout: must be a positive number of seconds, not {shown}" in proc.stderr
    assert "Traceback" not in proc.stderr
