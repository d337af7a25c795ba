"""The systemd unit (systemd-analyze verify) and agent/systemd_notify.py (sd_notify, journal)."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import struct
import subprocess
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedge.agent import systemd_notify as sn
from fedge.agent.systemd_notify import JournalDatagramHandler, Notifier, journal_handler, status_line
from fedge.cli import EXIT_CONFIG

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "firmware_scripts" / "systemd" / "fedge-agent.service"
ENV_EXAMPLE = ROOT / "firmware_scripts" / "systemd" / "fedge-agent.env.example"


# --- the unit -------------------------------------------------------------------------------------


def unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_unit_verifies_cleanly(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
    if not Path(analyze).exists():
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart's binary exists; /opt/fedge/venv is not installed here, so the
    # copy runs /bin/true instead. Nothing else in the unit is changed.
    text = UNIT.read_text()
    exec_line = "ExecStart=/opt/fedge/venv/bin/fedge agent run --config /etc/fedge/agent.toml"
    assert exec_line in text
    copy = tmp_path / "fedge-agent.service"
    copy.write_text(text.replace("ExecStart=/opt/fedge/venv/bin/fedge", "ExecStart=/bin/true"))
    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=30, check=False
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_unit_has_the_required_settings() -> None:
    s = unit_settings()
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "RestartSec": "5",
        "RestartPreventExitStatus": str(EXIT_CONFIG),  # a bad config is not restarted in a loop
        "DynamicUser": "yes",
        "StateDirectory": "fedge-agent",
        "ConfigurationDirectory": "fedge",
        "EnvironmentFile": "-/etc/fedge/agent.env",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "SystemCallFilter": "@system-service",
        "UMask": "0077",
        "MemoryMax": "256M",
    }
    assert {k: s.get(k, [None])[-1] for k in expected} == expected
    assert "MemoryDenyWriteExecute" not in s  # off on purpose (LiteRT/XNNPACK), see the comment
    assert s["Environment"][0] == "FEDGE_AGENT__AGENT__STATE_DIR=/var/lib/fedge-agent"


def test_env_example_only_holds_comments_or_assignments() -> None:
    for line in ENV_EXAMPLE.read_text().splitlines():
        body = line.lstrip("#").strip() if line.startswith("#") else line
        assert not line or line.startswith("#") or "=" in body
        if line.startswith("#FEDGE_AGENT__"):
            name = line[1:].partition("=")[0]
            assert len(name.split("__")) == 3  # FEDGE_AGENT__TABLE__KEY


# --- sd_notify ------------------------------------------------------------------------------------


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(2)
    yield sock, path
    sock.close()


def received(sock: socket.socket) -> list[bytes]:
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(65536))
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(2)


def test_messages_reach_the_notify_socket(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    n = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"})
    assert n.enabled and n.watchdog_interval_s == 30.0
    assert n.ready()
    assert n.status("round r3, model v3, 120 samples")
    assert n.watchdog()
    assert n.status("two\nlines")  # a newline would start a new assignment
    assert n.ready("idle")
    assert n.stopping()
    n.close()
    assert received(sock) == [
        b"READY=1",
        b"STATUS=round r3, model v3, 120 samples",
        b"WATCHDOG=1",
        b"STATUS=two lines",
        b"READY=1\nSTATUS=idle",
        b"STOPPING=1",
    ]


def test_abstract_socket_names() -> None:
    name = f"fedge-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert n.address == "\0" + name
        assert n.ready()
        sock.settimeout(2)
        assert sock.recv(100) == b"READY=1"
        n.close()
    finally:
        sock.close()


def test_socket_addresses() -> None:
    assert sn.socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert sn.socket_address("@x") == "\0x"
    assert sn.socket_address("@") is None
    assert sn.socket_address("vsock:2:1234") is None
    assert not Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled


def test_watchdog_is_rate_limited_to_half_the_interval(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    now = [100.0]
    n = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"}, clock=lambda: now[0])
    sent = []
    for t in (100.0, 100.5, 114.9, 115.0, 120.0, 129.9, 130.0, 160.0):
        now[0] = t
        sent.append(n.watchdog())
    assert sent == [True, False, False, True, False, False, True, True]
    assert received(sock) == [b"WATCHDOG=1"] * 4
    n.close()


def test_watchdog_due_at_says_when_a_sleeping_loop_must_wake_to_ping(
    receiver: tuple[socket.socket, str],
) -> None:
    """The agent's worker sleeps until this (or sooner): half an interval after the last ping,
    exactly when :meth:`Notifier.watchdog` sends again."""
    sock, path = receiver
    now = [100.0]
    n = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"}, clock=lambda: now[0])
    assert n.watchdog_due_at() == 100.0  # none sent yet: now
    assert n.watchdog()
    assert n.watchdog_due_at() == 115.0
    now[0] = n.watchdog_due_at() or 0.0
    assert n.watchdog()  # woken at that time, it pings
    assert n.watchdog_due_at() == 130.0
    assert received(sock) == [b"WATCHDOG=1"] * 2
    assert Notifier.from_env({"NOTIFY_SOCKET": path}).watchdog_due_at() is None  # no WatchdogSec
    n.close()


def test_watchdog_follows_watchdog_usec_and_pid(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    assert Notifier.from_env({"NOTIFY_SOCKET": path}).watchdog_interval_s is None
    assert Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "junk"}).watchdog_interval_s is None
    other = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "5000000", "WATCHDOG_PID": "1"}
    assert Notifier.from_env(other, pid=4242).watchdog_interval_s is None
    assert not Notifier.from_env(other, pid=4242).watchdog()
    assert Notifier.from_env(other, pid=1).watchdog_interval_s == 5.0
    assert received(sock) == []


def test_no_op_without_notify_socket() -> None:
    n = Notifier.from_env({"WATCHDOG_USEC": "30000000", "INVOCATION_ID": "abc"})
    assert not n.enabled and n.watchdog_interval_s is None
    assert [n.ready(), n.status("x"), n.watchdog(), n.stopping()] == [False] * 4


def test_a_dead_socket_never_raises(tmp_path: Path) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens"), "WATCHDOG_USEC": "1"})
    assert n.enabled
    assert not n.ready()
    assert not n.watchdog()
    n.close()


def test_libsystemd_is_used_when_installed(
    monkeypatch: pytest.MonkeyPatch, receiver: tuple[socket.socket, str]
) -> None:
    sock, path = receiver
    calls: list[str] = []

    def notify(message: str) -> bool:
        calls.append(message)
        return True

    fake = types.SimpleNamespace(notify=notify)
    monkeypatch.setattr(sn, "_optional_module", lambda name: fake if name == "systemd.daemon" else None)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    n = Notifier.from_env()
    assert n.ready() and n.status("ok")
    assert calls == ["READY=1", "STATUS=ok"]
    assert received(sock) == []  # went through libsystemd, not our socket


def test_under_systemd() -> None:
    assert not sn.under_systemd({})
    assert sn.under_systemd({"INVOCATION_ID": "0123abcd"})
    assert sn.under_systemd({"JOURNAL_STREAM": "8:12345"})


def test_status_line() -> None:
    status: dict[str, Any] = {
        "state": "training",
        "round_id": "r7",
        "model_version": 7,
        "samples": 340,
        "outbox_pending": 1,
        "last_error": None,
    }
    assert status_line(status) == "training, round r7, model v7, 340 samples, 1 queued"
    assert status_line({"state": "online", "last_error": "a\nb"}) == "online, last error: a b"


# --- the journal ----------------------------------------------------------------------------------


def parse_journal_datagram(data: bytes) -> dict[str, str]:
    """A strict parser of journald's native protocol (what journald-native.c accepts)."""
    fields: dict[str, str] = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            i = nl + 1
        else:
            key = line
            (size,) = struct.unpack("<Q", data[nl + 1 : nl + 9])
            value = data[nl + 9 : nl + 9 + size]
            assert data[nl + 9 + size : nl + 10 + size] == b"\n"
            i = nl + 10 + size
        name = key.decode("ascii")
        assert name and name[0] != "_" and all(c.isupper() or c.isdigit() or c == "_" for c in name)
        fields[name] = value.decode("utf-8")
    return fields


@pytest.fixture
def fake_journal(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "journal.sock")
    sock.bind(path)
    sock.settimeout(2)
    yield sock, path
    sock.close()


def test_journal_fallback_sends_native_protocol(fake_journal: tuple[socket.socket, str]) -> None:
    sock, path = fake_journal
    handler = journal_handler(path, use_libsystemd=False)
    assert isinstance(handler, JournalDatagramHandler)
    logger = logging.getLogger("fedge.test.journal")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        logger.warning("round %s closed", "r9")
        try:
            raise ValueError("bad blob")
        except ValueError:
            logger.exception("worker failed")
        logger.debug("détail")
    finally:
        logger.removeHandler(handler)
        handler.close()
    first = parse_journal_datagram(sock.recv(65536))
    assert first["MESSAGE"] == "round r9 closed"
    assert first["PRIORITY"] == "4"
    assert first["SYSLOG_IDENTIFIER"] == "fedge-agent"
    assert first["CODE_FILE"] == __file__
    source = Path(__file__).read_text().splitlines()
    assert source[int(first["CODE_LINE"]) - 1].strip() == 'logger.warning("round %s closed", "r9")'
    assert first["CODE_FUNC"] == "test_journal_fallback_sends_native_protocol"
    assert first["LOGGER"] == "fedge.test.journal"
    raw = sock.recv(65536)
    assert b"MESSAGE\n" in raw  # a traceback has newlines: the binary length-prefixed form
    second = parse_journal_datagram(raw)
    assert second["MESSAGE"].startswith("worker failed\nTraceback")
    assert "ValueError: bad blob" in second["MESSAGE"]
    assert second["PRIORITY"] == "3"
    third = parse_journal_datagram(sock.recv(65536))
    assert (third["MESSAGE"], third["PRIORITY"]) == ("détail", "7")


def test_journal_message_is_the_bare_message_after_basic_config(
    fake_journal: tuple[socket.socket, str],
) -> None:
    """Regression: the agent's CLI installs the handler with logging.basicConfig(handlers=...),
    which used to give it the ``LEVEL:logger:message`` format, so the journal showed
    "INFO:fedge.agent:connected to ..." (found under a real systemd, test_systemd_container.py)."""
    sock, path = fake_journal
    handler = journal_handler(path, use_libsystemd=False)
    assert handler is not None
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
        logging.getLogger("fedge.agent").info("connected to %s", "mqtt://b:1883")
    finally:
        root.removeHandler(handler)
        handler.close()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    fields = parse_journal_datagram(sock.recv(65536))
    assert fields["MESSAGE"] == "connected to mqtt://b:1883"
    assert (fields["PRIORITY"], fields["LOGGER"]) == ("6", "fedge.agent")


def test_journal_message_is_truncated(fake_journal: tuple[socket.socket, str]) -> None:
    sock, path = fake_journal
    handler = JournalDatagramHandler(path)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "é" * 100_000, None, None)
    handler.handle(record)
    handler.close()
    fields = parse_journal_datagram(sock.recv(300_000))
    assert fields["MESSAGE"].endswith(" [truncated]")
    assert len(fields["MESSAGE"].encode()) <= sn.MAX_JOURNAL_MESSAGE_BYTES + len(" [truncated]")


def test_no_journal_handler_without_a_journal(tmp_path: Path) -> None:
    assert journal_handler(str(tmp_path / "missing"), use_libsystemd=False) is None
    regular = tmp_path / "file"
    regular.write_text("")
    assert journal_handler(str(regular), use_libsystemd=False) is None


def test_journal_handler_prefers_systemd_python(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    made: list[dict[str, str]] = []

    class FakeJournalHandler(logging.Handler):
        def __init__(self, **fields: str) -> None:
            super().__init__()
            made.append(fields)

    fake = types.SimpleNamespace(JournalHandler=FakeJournalHandler)
    monkeypatch.setattr(sn, "_optional_module", lambda name: fake if name == "systemd.journal" else None)
    handler = journal_handler(str(tmp_path / "missing"))
    assert isinstance(handler, FakeJournalHandler)
    assert made == [{"SYSLOG_IDENTIFIER": "fedge-agent"}]
    record = logging.LogRecord("fedge.agent", logging.INFO, __file__, 1, "up %d", (1,), None)
    assert handler.format(record) == "up 1"  # no "INFO:fedge.agent:" prefix


def test_priorities() -> None:
    levels = [logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG, 0]
    assert [sn.syslog_priority(lv) for lv in levels] == [2, 3, 4, 6, 7, 7]
    assert os.path.basename(sn.JOURNAL_SOCKET) == "socket"
