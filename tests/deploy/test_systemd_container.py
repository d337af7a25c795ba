"""The shipped fedge-agent.service under a real systemd: a podman container with systemd as PID 1.

The image (docker/systemd-agent.Dockerfile) is a clean Debian bookworm root in which
firmware_scripts/install-agent.sh ran twice at build time, the second run printing
"install-agent: nothing to do": building it is the clean-root, run-twice idempotence test of the
installer (it replaced the opt-in debootstrap chroot test), and it runs in CI.

The container runs with ``--systemd=always --network host`` and talks to a real Mosquitto on a
free host loopback port. Before its first boot the test copies in an enrolled device's files,
made by the real scripts: ``fedge keys aggregator`` -> provision-device.sh -> ``fedge enroll``;
agent.toml goes to /etc/fedge (0644, as the installer installs it) and the device key into the
StateDirectory. The agent then boots exactly as on a board: enabled by the installer, started by
multi-user.target, under DynamicUser= and the unit's whole hardening.

What differs from the shipped unit, for speed only, in a drop-in written by this test
(/etc/systemd/system/fedge-agent.service.d/50-test-speed.conf): WatchdogSec=5 instead of 30,
RestartSec=1 instead of 5, and TimeoutAbortSec=3 (the watchdog's SIGABRT cannot end a SIGSTOPped
process, so systemd escalates to SIGKILL after that long; the unit's default is TimeoutStopSec=30).
No hardening directive is relaxed: on this host (kernel with hybrid cgroups v1, podman 4.3.1,
runc) every one of them works inside the container (see firmware_scripts/README.md).

Scenario, one container:
1. The broker is frozen (SIGSTOP) while the container boots: the agent runs but cannot finish its
   MQTT handshake, so the unit stays ``activating (start)`` with no STATUS: Type=notify waits
   for READY=1. The broker thawed, the unit turns ``active (running)`` and StatusText is the
   agent's status line (the state its retained MQTT status shows).
2. The agent's main PID is frozen (SIGSTOP): no more WATCHDOG=1. systemd logs "Watchdog timeout",
   kills it (Result=watchdog), restarts it (NRestarts=1) and the new process sends READY again.
3. The journal holds the agent's own log lines (native protocol, SYSLOG_IDENTIFIER=fedge-agent)
   from both runs, attributed to the unit.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedge.lab.broker import MosquittoBroker
from fedge.protocol.topics import FleetTopics
from support.mqtt_fixtures import TrafficRecorder
from support.podman_support import build_images, podman, remove_containers, require_podman

pytest_plugins = ("support.mqtt_fixtures",)
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
IMAGE = "localhost/fedge-systemd-agent:test"
DOCKERFILE = "docker/systemd-agent.Dockerfile"
PROVISION = REPO / "firmware_scripts" / "provision-device.sh"
FEDGE = REPO / ".venv" / "bin" / "fedge"
UNIT = "fedge-agent.service"
DEVICE = "gw-0042"
FLEET = "building-a"

#: The test's drop-in: speed only, see the module docstring. Nothing in it touches hardening.
SPEED_DROP_IN = """\
# tests/deploy/test_systemd_container.py: faster watchdog and restart for the test only.
[Service]
WatchdogSec=5
RestartSec=1
TimeoutAbortSec=3
"""


def run(args: list[str | Path], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"{args} failed ({result.returncode}):\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def image() -> str:
    require_podman()
    build_images(f"{DOCKERFILE}={IMAGE}")
    return IMAGE


@pytest.fixture
def container() -> Iterator[str]:
    name = f"fedge-systemd-{uuid.uuid4().hex[:8]}"
    try:
        yield name
    finally:
        remove_containers([name])


def provision_enrolled_device(out: Path, broker_url: str) -> tuple[Path, Path]:
    """The real scripts: aggregator keys, provision-device.sh, then ``fedge enroll``."""
    agg = json.loads(run([FEDGE, "keys", "aggregator", "--out", out / "aggregator", "--json"]).stdout)
    device_dir = out / DEVICE
    record = run(
        [
            PROVISION, "--id", DEVICE, "--fleet", FLEET, "--broker", broker_url,
            "--aggregator-key", agg["public_key"], "--verify-key", agg["verify_key"],
            "--task", "/opt/fedge/tasks/har-watch.toml", "--out", device_dir, "--fedge", FEDGE,
        ]
    ).stdout  # fmt: skip
    (out / "record.toml").write_text(record)
    run([FEDGE, "enroll", "--registry", out / "devices.toml", "--record", out / "record.toml"])
    assert DEVICE in (out / "devices.toml").read_text()
    config, key = device_dir / "agent.toml", device_dir / f"{DEVICE}.box"
    # As install-agent.sh installs it: 0644, the DynamicUser agent must read it.
    config.chmod(0o644)
    assert key.stat().st_mode & 0o777 == 0o600
    return config, key


def exec_in(name: str, *args: str, check: bool = True) -> str:
    return podman("exec", name, *args, check=check, timeout=60).stdout


def unit_state(name: str) -> dict[str, str]:
    """The unit's properties; {} while systemd (PID 1) is still booting and not answering."""
    props = "ActiveState,SubState,StatusText,NRestarts,MainPID,Result"
    result = podman("exec", name, "systemctl", "show", "-p", props, UNIT, check=False, timeout=60)
    if result.returncode != 0:
        return {}
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


def journal(name: str, *extra: str) -> str:
    return exec_in(name, "journalctl", "--no-pager", "-u", UNIT, *extra, check=False)


def wait_unit(
    name: str, predicate: Callable[[dict[str, str]], bool], timeout: float, what: str
) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    state: dict[str, str] = {}
    while time.monotonic() < deadline:
        state = unit_state(name)
        if predicate(state):
            return state
        time.sleep(0.25)
    raise AssertionError(f"{what}: not within {timeout}s; last {state}\njournal:\n{journal(name)[-6000:]}")


def boot(name: str, image: str, config: Path, key: Path, drop_in: Path) -> None:
    """create, copy the device's files in, start: the files are there before systemd's first
    start of the unit (multi-user.target pulls it in, the installer enabled it)."""
    podman(
        "create", "--name", name, "--systemd=always", "--cap-add", "SYS_ADMIN", "--network", "host",
        "--stop-timeout", "5", image,
    )  # fmt: skip
    podman("cp", str(config), f"{name}:/etc/fedge/agent.toml")
    podman("cp", str(key), f"{name}:/var/lib/private/fedge-agent/{key.name}")
    podman("cp", str(drop_in), f"{name}:/etc/systemd/system/")  # the directory itself
    podman("start", name)


def test_unit_under_real_systemd_ready_status_watchdog_journal(
    tmp_path: Path, image: str, container: str, mosquitto: MosquittoBroker
) -> None:
    config, key = provision_enrolled_device(tmp_path, mosquitto.url)
    drop_in = tmp_path / f"{UNIT}.d"
    drop_in.mkdir()
    (drop_in / "50-test-speed.conf").write_text(SPEED_DROP_IN)

    assert mosquitto.pid is not None
    with TrafficRecorder.for_broker(mosquitto) as recorder:
        # 1. READY only once the broker answers.
        os.kill(mosquitto.pid, signal.SIGSTOP)
        try:
            boot(container, image, config, key, drop_in)
            wait_unit(container, lambda s: s.get("MainPID", "0") != "0", 60, "the agent started")
            time.sleep(4)  # the agent runs (imports, state, TCP connect) but gets no CONNACK
            waiting = unit_state(container)
            assert (waiting["ActiveState"], waiting["SubState"]) == ("activating", "start"), waiting
            assert waiting["StatusText"] == "" and waiting["NRestarts"] == "0"
            assert "Started fedge-agent.service" not in journal(container)
        finally:
            os.kill(mosquitto.pid, signal.SIGCONT)
        ready = wait_unit(
            container, lambda s: s.get("ActiveState") == "active", 90, "READY after the broker answered"
        )
        assert ready["SubState"] == "running" and ready["NRestarts"] == "0", ready
        first_pid = ready["MainPID"]
        # STATUS= is the agent's status line: its state, as in its retained MQTT status.
        status_topic = FleetTopics(FLEET).status(DEVICE)
        recorder.wait_for(lambda ms: any(m.topic == status_topic for m in ms), 30, "agent status")
        published = [json.loads(m.payload) for m in recorder.messages if m.topic == status_topic]
        assert published[-1]["state"] == "online" and published[-1]["device_id"] == DEVICE, published
        assert ready["StatusText"].split(",")[0] == published[-1]["state"], ready
        # The unit's sandbox is in force: the agent runs as the dynamic user, not root, and
        # systemd chowned the StateDirectory (with the key the test copied in as root) to it.
        uid = exec_in(container, "stat", "-c", "%u", f"/proc/{first_pid}")
        assert int(uid) >= 61184, uid  # systemd's DynamicUser range 61184-65519
        key_owner = exec_in(container, "stat", "-c", "%u %a", f"/var/lib/private/fedge-agent/{key.name}")
        assert key_owner.split() == [uid.strip(), "600"]
        heartbeat = exec_in(container, "stat", "-c", "%U", "/var/lib/private/fedge-agent/heartbeat")
        assert heartbeat.strip() == "fedge-agent"  # libnss-systemd resolves the dynamic user

        # 2. A hung agent: the watchdog restarts it, and it comes back READY.
        exec_in(container, "kill", "-STOP", first_pid)
        frozen_at = time.monotonic()
        restarted = wait_unit(
            container,
            lambda s: s["NRestarts"] == "1" and s["ActiveState"] == "active" and s["MainPID"] != first_pid,
            60,
            "the watchdog restart and READY again",
        )
        elapsed = time.monotonic() - frozen_at
        assert restarted["SubState"] == "running" and restarted["StatusText"].startswith("online"), restarted
        # WatchdogSec=5 + TimeoutAbortSec=3 + RestartSec=1 + the agent's start and handshake.
        assert 5 <= elapsed < 45, elapsed
        log = journal(container)
        assert re.search(r"fedge-agent\.service: Watchdog timeout \(limit 5s\)!", log), log[-4000:]
        assert "Failed with result 'watchdog'" in log
        assert "Scheduled restart job, restart counter is at 1" in log

    # 3. journald got the agent's own lines, from both processes, attributed to the unit.
    entries = [
        json.loads(line) for line in journal(container, "-o", "json", "-t", "fedge-agent").splitlines()
    ]
    connected = [e for e in entries if str(e.get("MESSAGE", "")).startswith(f"connected to {mosquitto.url}")]
    assert {e["_PID"] for e in connected} >= {first_pid, restarted["MainPID"]}, [
        e.get("MESSAGE") for e in entries
    ]
    assert all(e["_SYSTEMD_UNIT"] == UNIT and e["PRIORITY"] == "6" for e in connected)
    assert all(e.get("LOGGER") == "fedge.agent" for e in connected), connected[0]


def test_a_config_error_stops_the_unit_without_restarts(
    tmp_path: Path, image: str, container: str, mosquitto: MosquittoBroker
) -> None:
    """An operator puts the MQTT password into the 0644 agent.toml: the agent refuses it with
    exit 78 (EX_CONFIG) and the fix, and systemd does not restart it (RestartPreventExitStatus=78)
    - with the test's RestartSec=1 it would otherwise have restarted several times by now."""
    config, key = provision_enrolled_device(tmp_path, mosquitto.url)
    text = config.read_text()
    assert "\n[mqtt]\n" in text
    config.write_text(text.replace("\n[mqtt]\n", '\n[mqtt]\npassword = "in-the-wrong-place"\n', 1))
    config.chmod(0o644)
    drop_in = tmp_path / f"{UNIT}.d"
    drop_in.mkdir()
    (drop_in / "50-test-speed.conf").write_text(SPEED_DROP_IN)
    boot(container, image, config, key, drop_in)
    failed = wait_unit(container, lambda s: s.get("ActiveState") == "failed", 60, "the unit failed")
    time.sleep(3)  # three RestartSec=1 periods: a restarting unit would show NRestarts > 0
    assert unit_state(container)["NRestarts"] == "0", unit_state(container)
    assert failed["Result"] == "exit-code", failed
    status = exec_in(container, "systemctl", "show", "-p", "ExecMainStatus", UNIT)
    assert status.strip() == "ExecMainStatus=78"
    log = journal(container)
    assert "holds a password ([mqtt] password) but is accessible by group or others (mode 0644)" in log
    assert "in-the-wrong-place" not in log
