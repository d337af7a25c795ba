"""firmware_scripts/install-agent.sh and provision-device.sh, run for real as subprocesses.

The installer runs into a ``--root`` staging directory with ``--no-apt``. Fast tests install a
tiny stub wheel named ``fedge`` (built here, no network, no build backend) through
``--source``; one slow test installs the real ``fedge[agent]`` from this repository (needs the
package index: set FEDGE_SLOW_INSTALL=1 to run it, pip takes minutes for LiteRT and numpy).
The clean-Debian-root test builds docker/systemd-agent.Dockerfile (podman, in CI too): the
installer runs twice in a debootstrap bookworm root; tests/deploy/test_systemd_container.py then boots it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
import zipfile
from pathlib import Path

import pytest

from fedge.agent.config import load_agent_config
from fedge.protocol.config_source import ConfigError
from support.podman_support import build_images, podman, require_podman

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "firmware_scripts"
INSTALL = SCRIPTS / "install-agent.sh"
PROVISION = SCRIPTS / "provision-device.sh"
UNIT = SCRIPTS / "systemd" / "fedge-agent.service"
FEDGE = REPO / ".venv" / "bin" / "fedge"
IS_ROOT = os.geteuid() == 0


def run(args: list[str | Path], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, **kw)  # type: ignore[call-overload, no-any-return]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path below ``root`` with its mtime and mode: what a no-op run must not change."""
    out = {str(p.relative_to(root)): (p.lstat().st_mtime_ns, p.lstat().st_mode) for p in root.rglob("*")}
    out["."] = (root.stat().st_mtime_ns, root.stat().st_mode)
    return out


# --- a stub "fedge" wheel ------------------------------------------------------------------------


def build_stub_wheel(directory: Path, version: str = "0.1.0") -> Path:
    """A minimal valid wheel ``fedge-VERSION-py3-none-any.whl`` with an ``agent`` extra and a
    ``fedge`` console script: pip installs it offline in about a second."""
    dist = f"fedge-{version}.dist-info"
    files = {
        "fedge_stub/__init__.py": "def main():\n    print('fedge stub')\n",
        f"{dist}/METADATA": (
            f"Metadata-Version: 2.1\nName: fedge\nVersion: {version}\nProvides-Extra: agent\n"
        ),
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist}/entry_points.txt": "[console_scripts]\nfedge = fedge_stub:main\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"fedge-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return wheel


# --- provisioning ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aggregator_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("agg")
    result = run([FEDGE, "keys", "aggregator", "--out", out / "keys", "--json"])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def provision(
    out: Path, keys: dict[str, str], *extra: str, device: str = "gw-0042"
) -> subprocess.CompletedProcess[str]:
    return run(
        [
            PROVISION,
            "--id", device,
            "--fleet", "building-a",
            "--broker", "mqtts://broker.lan:8883",
            "--aggregator-key", keys["public_key"],
            "--verify-key", keys["verify_key"],
            "--edgex-device", "gw-0042-imu",
            "--task", "/opt/fedge/tasks/har-watch.toml",
            "--out", out,
            "--fedge", FEDGE,
            *extra,
        ]
    )  # fmt: skip


def test_provision_twice_keeps_the_key_and_prints_the_record(
    tmp_path: Path, aggregator_keys: dict[str, str]
) -> None:
    out = tmp_path / "gw-0042"
    first = provision(out, aggregator_keys)
    assert first.returncode == 0, first.stderr
    key, config = out / "gw-0042.box", out / "agent.toml"
    assert mode(key) == 0o600 and mode(config) == 0o600 and mode(out) == 0o700
    key_bytes, before = key.read_bytes(), snapshot(out)
    # stdout is the record alone, ready for `fedge enroll --record`.
    assert first.stdout.count("\n") == 1 and first.stdout.startswith('"gw-0042" = "')

    second = provision(out, aggregator_keys)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    assert "keeping existing key" in second.stderr and "up to date" in second.stderr
    assert key.read_bytes() == key_bytes and snapshot(out) == before

    as_json = provision(out, aggregator_keys, "--json")
    assert json.loads(as_json.stdout)["public_key"] == first.stdout.split('"')[3]

    # The agent loads the config; the record enrolls.
    cfg = load_agent_config(config, {})
    assert (cfg.device_id, cfg.fleet, cfg.edgex.device) == ("gw-0042", "building-a", "gw-0042-imu")
    assert cfg.key_file == Path("/var/lib/fedge-agent/gw-0042.box")
    assert cfg.mqtt.url == "mqtts://broker.lan:8883"
    # Two connections, two principals of `fedge broker config`: the device and its EdgeX bus.
    assert (cfg.mqtt.username, cfg.edgex.bus.username) == ("gw-0042", "gw-0042.edgex")
    assert cfg.edgex.bus.url == cfg.mqtt.url
    # The passwords come from agent.env, one per principal; the EdgeX one cannot be forgotten.
    env = {"FEDGE_AGENT__MQTT__PASSWORD": "device-secret"}
    with pytest.raises(ConfigError, match=r"^\[edgex\] password: the EdgeX connection as 'gw-0042.edgex'"):
        load_agent_config(config, env)
    cfg = load_agent_config(config, {**env, "FEDGE_AGENT__EDGEX__PASSWORD": "bus-secret"})
    assert (cfg.mqtt.password, cfg.edgex.bus.password) == ("device-secret", "bus-secret")
    record = tmp_path / "record.toml"
    record.write_text(first.stdout)
    registry = tmp_path / "devices.toml"
    enrolled = run([FEDGE, "enroll", "--registry", registry, "--record", record])
    assert enrolled.returncode == 0, enrolled.stderr


def test_provision_refuses_a_different_config_and_force_replaces_the_key(
    tmp_path: Path, aggregator_keys: dict[str, str]
) -> None:
    out = tmp_path / "dev"
    first = provision(out, aggregator_keys)
    assert first.returncode == 0, first.stderr
    config_before = (out / "agent.toml").read_text()

    changed = run([*provision_args(out, aggregator_keys), "--fleet", "other-fleet"])
    assert changed.returncode == 1
    assert "refusing to overwrite" in changed.stderr
    assert (out / "agent.toml").read_text() == config_before

    forced = provision(out, aggregator_keys, "--force")
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout != first.stdout  # a new key
    assert mode(out / "gw-0042.box") == 0o600


def provision_args(out: Path, keys: dict[str, str]) -> list[str | Path]:
    return [
        PROVISION, "--id", "gw-0042", "--broker", "mqtts://broker.lan:8883",
        "--aggregator-key", keys["public_key"], "--verify-key", keys["verify_key"],
        "--edgex-device", "gw-0042-imu", "--task", "/opt/fedge/tasks/har-watch.toml",
        "--out", out, "--fedge", FEDGE,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--id", "../evil"], "invalid device id"),
        (["--broker", "http://x"], "--broker must be"),
        (["--task", 'a"b'], "quote"),
        (["--edgex-username", "gw-0042"], "--edgex-username must differ from --username"),
        (["--username", "a b"], "invalid username 'a b'"),
    ],
)
def test_provision_refuses_bad_input(
    tmp_path: Path, aggregator_keys: dict[str, str], args: list[str], message: str
) -> None:
    result = run([*provision_args(tmp_path / "d", aggregator_keys), "--fleet", "f", *args])
    assert result.returncode == 1 and message in result.stderr
    assert not (tmp_path / "d").exists()


def test_provision_needs_its_arguments(tmp_path: Path) -> None:
    result = run([PROVISION, "--id", "gw-1", "--out", tmp_path / "d"])
    assert result.returncode == 1 and "missing --fleet --broker" in result.stderr


# --- the installer -------------------------------------------------------------------------------


@pytest.fixture
def device_files(tmp_path: Path, aggregator_keys: dict[str, str]) -> Path:
    out = tmp_path / "provisioned"
    assert provision(out, aggregator_keys).returncode == 0
    return out


def install(root: Path, source: Path, *extra: str | Path) -> subprocess.CompletedProcess[str]:
    return run([INSTALL, "--root", root, "--no-apt", "--source", source, *extra])


def test_install_twice_into_a_staging_root(tmp_path: Path, device_files: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    wheel = build_stub_wheel(tmp_path / "wheels")
    args = ("--config", device_files / "agent.toml", "--key", device_files / "gw-0042.box")

    first = install(root, wheel, *args)
    assert first.returncode == 0, first.stderr
    assert "installed fedge 0.1.0" in first.stdout and "done (" in first.stdout
    assert "not calling systemctl" in first.stderr

    unit = root / "etc/systemd/system/fedge-agent.service"
    config = root / "etc/fedge/agent.toml"
    key = root / "var/lib/fedge-agent/gw-0042.box"
    assert unit.read_bytes() == UNIT.read_bytes() and mode(unit) == 0o644
    assert mode(root / "etc/fedge") == 0o755
    # 0644: the DynamicUser agent is not root and must read it (no secrets in agent.toml).
    assert config.read_bytes() == (device_files / "agent.toml").read_bytes() and mode(config) == 0o644
    # DynamicUser='s layout, so systemd never has to move the directory (EXDEV on overlayfs).
    assert os.readlink(root / "var/lib/fedge-agent") == "private/fedge-agent"
    assert mode(root / "var/lib/private") == 0o700 and mode(root / "var/lib/private/fedge-agent") == 0o700
    assert key.read_bytes() == (device_files / "gw-0042.box").read_bytes() and mode(key) == 0o600
    assert key.resolve() == (root / "var/lib/private/fedge-agent/gw-0042.box").resolve()
    # The task specs provision-device.sh's --task names.
    task = root / "opt/fedge/tasks/har-watch.toml"
    assert task.read_bytes() == (REPO / "tasks/har-watch.toml").read_bytes() and mode(task) == 0o644
    for path in (unit, config, key, task, root / "etc/fedge", root / "opt/fedge/venv"):
        assert path.stat().st_uid == os.geteuid()
    fedge = root / "opt/fedge/venv/bin/fedge"
    assert run([fedge]).stdout == "fedge stub\n"

    before = snapshot(root)
    second = install(root, wheel, *args)
    assert second.returncode == 0, second.stderr
    assert second.stdout == "install-agent: nothing to do\n"
    assert snapshot(root) == before


def test_install_never_overwrites_config_or_key_and_upgrades_on_a_new_version(
    tmp_path: Path, device_files: Path
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    wheels = tmp_path / "wheels"
    args = ("--config", device_files / "agent.toml", "--key", device_files / "gw-0042.box")
    assert install(root, build_stub_wheel(wheels, "0.1.0"), *args).returncode == 0

    config = root / "etc/fedge/agent.toml"
    key = root / "var/lib/fedge-agent/gw-0042.box"
    config.write_text("# edited on the device\n")
    key.write_text("local key\n")
    other = tmp_path / "other.toml"
    other.write_text("[agent]\n")

    new_wheel = build_stub_wheel(wheels, "0.2.0")
    result = install(root, new_wheel, "--config", other, "--key", device_files / "gw-0042.box")
    assert result.returncode == 0, result.stderr
    assert "installed fedge 0.2.0 into" in result.stdout and "(was: 0.1.0)" in result.stdout
    assert "keeping existing" in result.stderr
    assert config.read_text() == "# edited on the device\n" and key.read_text() == "local key\n"

    # An installed config makes --config optional.
    again = install(root, new_wheel)
    assert again.returncode == 0 and again.stdout == "install-agent: nothing to do\n"


def test_install_keeps_a_plain_state_directory_of_an_older_install(
    tmp_path: Path, device_files: Path
) -> None:
    """Before the DynamicUser= layout, /var/lib/fedge-agent was a plain directory: it is kept
    (systemd moves it into /var/lib/private itself) and the key still goes into it."""
    root = tmp_path / "root"
    (root / "var/lib/fedge-agent").mkdir(parents=True, mode=0o700)
    wheel = build_stub_wheel(tmp_path / "wheels")
    args = ("--config", device_files / "agent.toml", "--key", device_files / "gw-0042.box")
    result = install(root, wheel, *args)
    assert result.returncode == 0, result.stderr
    assert "is a plain directory" in result.stderr
    assert not (root / "var/lib/private").exists()
    assert mode(root / "var/lib/fedge-agent/gw-0042.box") == 0o600
    assert install(root, wheel, *args).stdout == "install-agent: nothing to do\n"


def test_install_refuses_a_state_symlink_elsewhere(tmp_path: Path, device_files: Path) -> None:
    root = tmp_path / "root"
    (root / "var/lib").mkdir(parents=True)
    (root / "var/lib/fedge-agent").symlink_to("/somewhere/else")
    wheel = build_stub_wheel(tmp_path / "wheels")
    result = install(
        root, wheel, "--config", device_files / "agent.toml", "--key", device_files / "gw-0042.box"
    )
    assert result.returncode == 1 and "not private/fedge-agent" in result.stderr


def test_install_refuses_without_config(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    wheel = build_stub_wheel(tmp_path / "wheels")
    result = install(root, wheel)
    assert result.returncode == 1 and "no config" in result.stderr
    missing = install(root, wheel, "--config", tmp_path / "nope.toml")
    assert missing.returncode == 1 and "is not a file" in missing.stderr
    assert list(root.iterdir()) == []  # refused before changing anything


def test_install_refuses_a_bad_source(tmp_path: Path, device_files: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    bogus = tmp_path / "thing.zip"
    bogus.write_text("")
    result = install(root, bogus, "--config", device_files / "agent.toml")
    assert result.returncode == 1 and "expected a wheel" in result.stderr
    assert list(root.iterdir()) == []


def test_install_refuses_non_root_without_root_dir(tmp_path: Path) -> None:
    cmd = [str(INSTALL), "--no-apt"]
    if IS_ROOT:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and setpriv (util-linux) is missing")
        # The unprivileged user must be able to reach the script wherever the checkout lives
        # (a clone in a 0700 directory would fail with "Permission denied" before the check).
        public = Path(tempfile.mkdtemp(prefix="fedge-install-"))
        try:
            public.chmod(0o755)
            script = public / INSTALL.name
            shutil.copy2(INSTALL, script)
            script.chmod(0o755)
            cmd = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", str(script), "--no-apt"]
            result = run(cmd, cwd="/")
        finally:
            shutil.rmtree(public)
    else:
        result = run(cmd, cwd="/")
    assert result.returncode == 1
    assert "must run as root" in result.stderr


def test_scripts_are_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = run([shellcheck, INSTALL, PROVISION])
    assert result.returncode == 0, result.stdout


def test_scripts_are_executable_bash_with_strict_mode() -> None:
    for script in (INSTALL, PROVISION):
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
        assert mode(script) & 0o111 == 0o111


# --- the real thing ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("FEDGE_SLOW_INSTALL") != "1",
    reason="installs fedge[agent] from the package index (minutes); set FEDGE_SLOW_INSTALL=1",
)
def test_real_install_of_this_repository(tmp_path: Path, device_files: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    args = ("--config", device_files / "agent.toml", "--key", device_files / "gw-0042.box")
    first = install(root, REPO, *args)
    assert first.returncode == 0, first.stderr
    fedge = root / "opt/fedge/venv/bin/fedge"
    assert run([fedge, "--help"]).returncode == 0
    probe = run(
        [root / "opt/fedge/venv/bin/python", "-c", "import ai_edge_litert, paho.mqtt, nacl, fedge.agent"]
    )
    assert probe.returncode == 0, probe.stderr
    before = snapshot(root)
    second = install(root, REPO, *args)
    assert second.stdout == "install-agent: nothing to do\n"
    assert snapshot(root) == before


SYSTEMD_IMAGE = "localhost/fedge-systemd-agent:test"


@pytest.mark.slow
def test_install_twice_in_a_clean_debian_root() -> None:
    """A clean Debian bookworm root (debootstrap --variant=minbase, then systemd from apt): the
    build of docker/systemd-agent.Dockerfile runs install-agent.sh in it as on a board, real pip
    install of fedge[agent] included, then again, and fails unless the second run prints
    exactly "install-agent: nothing to do" (its RUN step greps for it). Here: what that left in
    the root, and a third run in a fresh container from the image still has nothing to do.
    tests/deploy/test_systemd_container.py boots the same image with systemd as PID 1."""
    require_podman()
    build_images(f"docker/systemd-agent.Dockerfile={SYSTEMD_IMAGE}")
    probe = r"""
set -euo pipefail
stat -c '%n %a %U' /etc/fedge /etc/fedge/agent.toml /var/lib/private /var/lib/private/fedge-agent \
    /var/lib/private/fedge-agent/placeholder.box /opt/fedge/tasks/har-watch.toml \
    /etc/systemd/system/fedge-agent.service
echo "link $(readlink /var/lib/fedge-agent)"
echo "enabled $(systemctl is-enabled fedge-agent)"
/opt/fedge/venv/bin/python -I -c \
    'import ai_edge_litert, paho.mqtt, nacl, fedge.agent.service; print("imports ok")'
cmp /src/firmware_scripts/systemd/fedge-agent.service /etc/systemd/system/fedge-agent.service
cd /src
firmware_scripts/install-agent.sh --source /src
"""
    result = podman("run", "--rm", "--network", "none", SYSTEMD_IMAGE, "/bin/bash", "-c", probe)
    lines = result.stdout.splitlines()
    assert lines[:7] == [
        "/etc/fedge 755 root",
        "/etc/fedge/agent.toml 644 root",
        "/var/lib/private 700 root",
        "/var/lib/private/fedge-agent 700 root",
        "/var/lib/private/fedge-agent/placeholder.box 600 root",
        "/opt/fedge/tasks/har-watch.toml 644 root",
        "/etc/systemd/system/fedge-agent.service 644 root",
    ], result.stdout
    assert lines[7:10] == ["link private/fedge-agent", "enabled enabled", "imports ok"], result.stdout
    # Offline (--network none) and with the installed config: a third run changes nothing.
    assert lines[-1] == "install-agent: nothing to do", result.stdout + result.stderr
    assert "systemd is not running" in result.stderr
