"""systemd integration without a dependency: sd_notify and the journal's native protocol.

:class:`Notifier` tells systemd when the agent is ready (``Type=notify``), what it is doing
(``STATUS=``, shown by ``systemctl status``), that its worker loop is alive (``WATCHDOG=1``,
for ``WatchdogSec=``) and that it is stopping. It uses ``systemd.daemon.notify`` from
systemd-python when that is installed, else writes the datagrams to ``$NOTIFY_SOCKET`` itself.
Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op, so the agent runs the same way
from a shell, in the demo and in Docker.

:func:`journal_handler` gives a logging handler that sends structured entries (priority,
logger, code location) to journald, or None when there is no journal.

Neither ever raises on a send error: losing a notification must not crash the agent (a
missed watchdog ping is what systemd is there to notice).
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

log = logging.getLogger("fedge.agent.systemd")

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER = "fedge-agent"
#: Longest MESSAGE sent to the journal; a longer one is cut (a datagram has to fit the socket
#: buffer; journald's own limit is far higher).
MAX_JOURNAL_MESSAGE_BYTES = 48 * 1024


def _optional_module(name: str) -> ModuleType | None:
    """``name`` if importable (systemd-python is optional and never a dependency)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def under_systemd(env: Mapping[str, str] | None = None) -> bool:
    """True when systemd started this process (a unit sets INVOCATION_ID, or JOURNAL_STREAM
    when stdout/stderr go to the journal)."""
    e = os.environ if env is None else env
    return bool(e.get("INVOCATION_ID") or e.get("JOURNAL_STREAM"))


def socket_address(name: str) -> str | None:
    """The address to send to for a ``NOTIFY_SOCKET`` value: a path, or ``@name`` for an
    abstract socket (a leading NUL byte). None for anything else (e.g. ``vsock:``)."""
    if name.startswith("/"):
        return name
    if name.startswith("@") and len(name) > 1:
        return "\0" + name[1:]
    return None


def _one_line(text: str) -> str:
    """sd_notify messages are newline-separated assignments: a value must be one line."""
    return " ".join(text.split("\n")).replace("\r", " ")


def _libsystemd_sender(notify: Callable[..., Any]) -> Callable[[str], bool]:
    def send(message: str) -> bool:
        return bool(notify(message))

    return send


class Notifier:
    """sd_notify for one process. Thread-safe: the worker pings, the main thread reports.

    Build it with :meth:`from_env`; all methods return True if a datagram was sent.
    """

    def __init__(
        self,
        address: str | None,
        watchdog_interval_s: float | None = None,
        *,
        send: Callable[[str], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.address = address
        self.watchdog_interval_s = watchdog_interval_s if address is not None else None
        self._send_override = send
        self._clock = clock
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._last_watchdog: float | None = None

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        pid: int | None = None,
        *,
        use_libsystemd: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> Notifier:
        """Reads ``NOTIFY_SOCKET`` and ``WATCHDOG_USEC``/``WATCHDOG_PID`` like sd_watchdog_enabled:
        the watchdog applies only if WATCHDOG_PID is unset or this process's PID."""
        e = os.environ if env is None else env
        raw_socket = e.get("NOTIFY_SOCKET", "")
        address = socket_address(raw_socket) if raw_socket else None
        if raw_socket and address is None:
            log.warning("NOTIFY_SOCKET=%r is not supported; not notifying systemd", raw_socket)
        interval: float | None = None
        try:
            usec = int(e.get("WATCHDOG_USEC", ""))
        except ValueError:
            usec = 0
        watchdog_pid = e.get("WATCHDOG_PID", "")
        own_pid = os.getpid() if pid is None else pid
        if usec > 0 and (not watchdog_pid or watchdog_pid == str(own_pid)):
            interval = usec / 1_000_000
        send: Callable[[str], bool] | None = None
        if address is not None and use_libsystemd and env is None:
            # libsystemd reads the same os.environ; only used when we read it too.
            daemon = _optional_module("systemd.daemon")
            if daemon is not None:
                send = _libsystemd_sender(daemon.notify)
        return cls(address, interval, send=send, clock=clock)

    @property
    def enabled(self) -> bool:
        """True under a ``Type=notify`` unit."""
        return self.address is not None

    def notify(self, message: str) -> bool:
        """Sends one raw sd_notify message (newline-separated ``KEY=value`` lines)."""
        if self.address is None:
            return False
        if self._send_override is not None:
            try:
                return self._send_override(message)
            except Exception as exc:  # a notification must never crash the agent
                log.debug("sd_notify failed: %s", exc)
                return False
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(message.encode("utf-8"), self.address)
                return True
            except OSError as exc:
                log.debug("sd_notify to %r failed: %s", self.address, exc)
                return False

    def ready(self, status: str | None = None) -> bool:
        """``READY=1`` (optionally with a STATUS): systemd considers the unit started."""
        return self.notify("READY=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))

    def status(self, text: str) -> bool:
        """``STATUS=text``: the one line ``systemctl status`` shows."""
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """``WATCHDOG=1``, at most once per half watchdog interval (call it as often as you like).

        A no-op when the unit has no ``WatchdogSec=``."""
        if self.watchdog_interval_s is None:
            return False
        now = self._clock()
        with self._lock:
            if self._last_watchdog is not None and now - self._last_watchdog < self.watchdog_interval_s / 2:
                return False
            self._last_watchdog = now
        return self.notify("WATCHDOG=1")

    def watchdog_due_at(self) -> float | None:
        """When (on this notifier's clock) :meth:`watchdog` sends its next ``WATCHDOG=1``: half
        a watchdog interval after the last one (now if none went yet); None without a watchdog.
        A loop that sleeps until there is work wakes by then, so systemd sees it alive."""
        if self.watchdog_interval_s is None:
            return None
        with self._lock:
            last = self._last_watchdog
        return self._clock() if last is None else last + self.watchdog_interval_s / 2

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: the agent is shutting down (publishing its offline status)."""
        return self.notify("STOPPING=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def status_line(status: Mapping[str, Any]) -> str:
    """A STATUS text from :meth:`AgentService.status`: state, round, model version, samples."""
    parts = [str(status.get("state", "?"))]
    if status.get("round_id") is not None:
        parts.append(f"round {status['round_id']}")
    if status.get("model_version") is not None:
        parts.append(f"model v{status['model_version']}")
    if status.get("samples") is not None:
        parts.append(f"{status['samples']} samples")
    if status.get("outbox_pending"):
        parts.append(f"{status['outbox_pending']} queued")
    if status.get("last_error"):
        parts.append(f"last error: {status['last_error']}")
    return _one_line(", ".join(parts))


# --- the journal ----------------------------------------------------------------------------------

#: logging level -> syslog priority (journal PRIORITY=).
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def syslog_priority(levelno: int) -> int:
    for level, priority in _PRIORITIES:
        if levelno >= level:
            return priority
    return 7


def encode_journal_fields(fields: Mapping[str, str]) -> bytes:
    """The journal's native protocol: ``KEY=value\\n``, or for a value with a newline
    ``KEY\\n`` + little-endian 64-bit length + value + ``\\n``."""
    out = bytearray()
    for key, value in fields.items():
        raw = value.encode("utf-8", "replace")
        if b"\n" in raw:
            out += key.encode("ascii") + b"\n" + struct.pack("<Q", len(raw)) + raw + b"\n"
        else:
            out += key.encode("ascii") + b"=" + raw + b"\n"
    return bytes(out)


class JournalDatagramHandler(logging.Handler):
    """Sends each record as one native-protocol datagram to journald's socket."""

    def __init__(
        self, path: str = JOURNAL_SOCKET, identifier: str = SYSLOG_IDENTIFIER, level: int = logging.NOTSET
    ) -> None:
        super().__init__(level)
        self.path = path
        self.identifier = identifier
        self._sock: socket.socket | None = socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
        )

    def fields(self, record: logging.LogRecord) -> dict[str, str]:
        message = self.format(record)
        raw = message.encode("utf-8", "replace")
        if len(raw) > MAX_JOURNAL_MESSAGE_BYTES:
            message = raw[:MAX_JOURNAL_MESSAGE_BYTES].decode("utf-8", "ignore") + " [truncated]"
        fields: dict[str, str | None] = {
            "MESSAGE": message,
            "PRIORITY": str(syslog_priority(record.levelno)),
            "SYSLOG_IDENTIFIER": self.identifier,
            "CODE_FILE": record.pathname,
            "CODE_LINE": str(record.lineno),
            "CODE_FUNC": record.funcName,  # None for a LogRecord built by hand
            "LOGGER": record.name,
            "THREAD_NAME": record.threadName,
        }
        return {k: v for k, v in fields.items() if v}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            datagram = encode_journal_fields(self.fields(record))
            if self._sock is not None:  # handle() holds the handler's lock around emit()
                self._sock.sendto(datagram, self.path)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.acquire()
        try:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
        finally:
            self.release()
        super().close()


def journal_handler(
    socket_path: str = JOURNAL_SOCKET, *, use_libsystemd: bool = True
) -> logging.Handler | None:
    """A handler logging to the journal: systemd-python's JournalHandler if installed, else
    :class:`JournalDatagramHandler` if journald's socket exists, else None.

    Its formatter is ``%(message)s`` (plus a traceback): the level and the logger travel as
    PRIORITY= and LOGGER=. Set here, so ``logging.basicConfig(handlers=[...])``, which gives
    every handler without a formatter its ``LEVEL:logger:message`` one, leaves it alone."""
    journal = _optional_module("systemd.journal") if use_libsystemd else None
    handler: logging.Handler
    if journal is not None:
        handler = journal.JournalHandler(SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER)
    else:
        try:
            is_socket = stat.S_ISSOCK(os.stat(socket_path).st_mode)
        except OSError:
            is_socket = False
        if not is_socket:
            return None
        handler = JournalDatagramHandler(socket_path)
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler
