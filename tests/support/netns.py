"""A device behind its own network link, on this host: a network namespace joined to the host by
a veth pair, with the link's faults set by the kernel (no proxy, no mock).

- ``rate_limit(kbit)``: a token bucket (``tc qdisc ... tbf``) on both ends (or the device's
  alone), so the device's uplink and downlink each carry ``kbit`` kbit/s;
- ``loss(fraction)``: that fraction of the link's packets dropped at random each way (iptables'
  ``statistic`` match on the device's interface: netem is not built into every kernel, this
  one's included; the namespace's loopback is never touched);
- ``partition()`` / ``heal()``: every packet on the link dropped each way while partitioned (the TCP
  connection stays open; what is sent meanwhile waits in the sender's socket or outbox).

A process runs inside with ``prefix`` (``ip netns exec NAME``); :func:`broker_on` is a Mosquitto
it reaches (listening on loopback and on the host's end of each link). Needs root, ``ip``
(iproute2) and ``iptables``; :func:`netns_unavailable` says why not, for a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from fedge.lab.broker import BrokerSettings, MosquittoBroker, free_loopback_port
from support.mqtt_fixtures import require_mosquitto

#: 10.231.<index>.0/30 per link: .1 the host's end, .2 the device's.
SUBNET = "10.231"


def _run(*args: str) -> None:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")


def netns_unavailable() -> str | None:
    """Why a network namespace with a veth link cannot be made here, or None if it can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/system-deps.sh installs iproute2 and iptables)"
    probe = f"fx-probe-{uuid.uuid4().hex[:6]}"
    try:
        _run("ip", "netns", "add", probe)
    except RuntimeError as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        _run("ip", "netns", "exec", probe, "iptables", "-L", "INPUT", "-n")
    except RuntimeError as exc:
        return f"iptables does not work in a network namespace: {exc}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


class DeviceLink:
    """One device's network: namespace ``name``, host address ``host_ip``, device ``device_ip``."""

    def __init__(self, index: int) -> None:
        if not 0 <= index <= 255:
            raise ValueError("link index must be 0..255")
        tag = uuid.uuid4().hex[:6]
        self.name = f"fedge-{tag}-{index}"
        self.host_if = f"fh{tag}{index}"[:15]
        self.device_if = f"fd{tag}{index}"[:15]
        self.host_ip = f"{SUBNET}.{index}.1"
        self.device_ip = f"{SUBNET}.{index}.2"
        self._up = False
        self._downlink_limited = False

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def __enter__(self) -> DeviceLink:
        _run("ip", "netns", "add", self.name)
        self._up = True
        try:
            _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.device_if)
            _run("ip", "link", "set", self.device_if, "netns", self.name)
            _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
            _run("ip", "link", "set", self.host_if, "up")
            self._in_ns("ip", "addr", "add", f"{self.device_ip}/30", "dev", self.device_if)
            self._in_ns("ip", "link", "set", self.device_if, "up")
            self._in_ns("ip", "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if not self._up:
            return
        self._up = False
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)

    def _in_ns(self, *args: str) -> None:
        _run(*self.prefix, *args)

    # --- faults -------------------------------------------------------------------------------

    def rate_limit(self, kbit: int, downlink: bool = True) -> None:
        """``kbit`` kbit/s: tbf on the device's end (its uplink) and, with ``downlink``, on the
        host's end too."""
        spec = ["tbf", "rate", f"{kbit}kbit", "burst", "4kb", "latency", "2s"]
        self._in_ns("tc", "qdisc", "replace", "dev", self.device_if, "root", *spec)
        if downlink:
            _run("tc", "qdisc", "replace", "dev", self.host_if, "root", *spec)
        self._downlink_limited = downlink

    def unlimit(self) -> None:
        """Back to the veth's full speed."""
        self._in_ns("tc", "qdisc", "del", "dev", self.device_if, "root")
        if self._downlink_limited:
            _run("tc", "qdisc", "del", "dev", self.host_if, "root")

    def loss(self, fraction: float) -> None:
        """Drops ``fraction`` of the packets each way on the link, at random.

        On the link's interface only: a namespace-wide rule also dropped loopback packets, and
        paho's client makes its wake-up socket pair over 127.0.0.1 in ``loop_start``, so an agent
        could wait minutes in ``accept`` before its first log line (no real link loses loopback)."""
        p = f"{fraction:.3f}"
        for chain, direction in (("INPUT", "-i"), ("OUTPUT", "-o")):
            self._in_ns(
                "iptables",
                "-A",
                chain,
                direction,
                self.device_if,
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                p,
                "-j",
                "DROP",
            )

    def partition(self) -> None:
        """Every packet on the link dropped each way (inserted first: it wins over any loss rule);
        the namespace's loopback keeps working, as a device's does when its network is cut."""
        for chain, direction in (("INPUT", "-i"), ("OUTPUT", "-o")):
            self._in_ns("iptables", "-I", chain, "1", direction, self.device_if, "-j", "DROP")

    def heal(self) -> None:
        for chain in ("INPUT", "OUTPUT"):
            self._in_ns("iptables", "-D", chain, "1")


def broker_on(tmp_path: Path, links: Sequence[DeviceLink]) -> MosquittoBroker:
    """Mosquitto (not started yet: a context manager) on loopback and on the host's end of every
    link, one port for all (``broker.port``), persistence in ``tmp_path / "mosquitto"``: the
    test's own clients use loopback, a device in a namespace ``mqtt://<link.host_ip>:<port>``.
    Skips the test without mosquitto (:func:`~support.mqtt_fixtures.require_mosquitto`)."""
    port = free_loopback_port()
    extra = tuple(f"listener {port} {link.host_ip}" for link in links)
    settings = BrokerSettings(data_dir=tmp_path / "mosquitto", port=port, extra_lines=extra)
    return MosquittoBroker(settings, executable=require_mosquitto())


__all__ = ["DeviceLink", "broker_on", "netns_unavailable"]
