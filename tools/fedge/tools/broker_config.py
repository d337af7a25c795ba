"""``fedge broker config``: a locked-down Mosquitto 2.0 configuration directory for one fleet.

The broker is the only thing devices, the aggregator and building-management systems (BMS)
share, so it is where a compromised or misconfigured client must be stopped: sealing keeps
updates confidential and signed manifests keep models authentic, but only the broker can stop
device A from *publishing as* device B (the aggregator would reject it, after decoding it), from
reading B's traffic, from flooding retained topics, or a BMS from writing anything at all.

What is written (``OUT`` below; see ``docs/broker-security.md``)::

    OUT/mosquitto.conf          allow_anonymous false, one TLS listener (plain only with --no-tls),
                                limits sized for the fleet and the model, persistence
    OUT/acl                     one `user` block per principal (deny by default)
    OUT/passwd                  PBKDF2-SHA512 hashes (`$7$`), password mode only
    OUT/certs/                  lab CA and server certificate/key (--tls lab)
    OUT/credentials/            mode 0700: <principal>.txt (TOML: broker, username, password or
                                certificate paths, ca_file), <principal>.crt/.key with
                                --client-certs, and ca.crt (the CA clients must trust); each
                                device has two principals, ID and ID.edgex
    OUT/summary.json            what was generated; no secrets

Design choices, each for a reason:

- **Explicit `user` blocks, no `pattern` lines.** A ``pattern`` applies to *every*
  authenticated user (mosquitto.conf(5)): ``pattern write .../status/%u`` would let a BMS user
  write ``status/<its name>`` and, with client certificates, any certificate the CA ever signed
  would get device rights under its CN. Explicit blocks fail closed: a principal the ACL does
  not name can do nothing. The tool regenerates the ACL together with the password file from
  the same device list, so patterns would not save an edit either.
- **The client id is the username** (``use_username_as_clientid``): otherwise any principal
  connecting with another's client id (the aggregator's is ``fedge-aggregator-{fleet}``)
  disconnects it and takes over its persistent session, queued updates included. So every
  connection has its own principal, the agent's EdgeX-bus connection too (``{device}.edgex``).
- **Queues bounded in bytes** as well as messages (``max_queued_bytes``): a device cannot make
  the broker hold max_queued_messages x max_packet_size bytes for an offline aggregator.
- **Passwords hashed here**, not with ``mosquitto_passwd``: the same ``$7$`` format
  (PBKDF2-HMAC-SHA512, 101 iterations, 12-byte salt, base64; what ``mosquitto_passwd`` 2.0
  writes) from :mod:`hashlib`, so generating a fleet needs no mosquitto install and no password
  ever appears on a command line or in a plaintext temporary file. The passwords are 256-bit
  random secrets, so the iteration count is not what protects them.
- **TLS material with the ``openssl`` command**, not the ``cryptography`` package: no new
  dependency; every Debian/Ubuntu machine that can run Mosquitto has it. Keys are EC P-256.
- Everything is built in a staging directory next to ``OUT`` and moved in at the end: a failure
  leaves nothing half-written, and secrets are created with their final modes (never briefly
  world-readable).

Rendering (:func:`render_acl`, :func:`render_conf`, :func:`render_passwd`,
:func:`render_credentials`) is pure; :func:`write_broker_config` does the I/O.

This module imports only the standard library, :mod:`protocol` and :mod:`fedge.shell.files`
(which imports no more) at import time (the CLI stays fast); ``--registry`` imports
:mod:`fedge.aggregator.registry` when used.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import grp
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedge.protocol.errors import FedgeError
from fedge.protocol.home_assistant import DEFAULT_PREFIX as DEFAULT_HA_PREFIX
from fedge.protocol.home_assistant import check_prefix
from fedge.protocol.home_assistant import discovery_topic as ha_discovery_topic
from fedge.protocol.home_assistant import node_id as ha_node_id
from fedge.protocol.model_manifest import INITIAL_WEIGHTS_FILE
from fedge.protocol.topics import ROOT, FleetTopics, TopicError, check_id
from fedge.shell.files import atomic_write

log = logging.getLogger(__name__)

KIB = 1024
MIB = 1024 * KIB
DEFAULT_TLS_PORT = 8883
DEFAULT_PLAIN_PORT = 1883
DEFAULT_AGGREGATOR = "aggregator"
DEFAULT_EDGEX_PREFIX = "edgex"
DEFAULT_HOSTNAMES = ("localhost", "127.0.0.1")
DEFAULT_DATA_DIR = Path("/var/lib/mosquitto")
#: The level under the fleet where the devices' predictions live (``insight/{device}``; BMS and
#: monitors read them, each device writes its own).
INSIGHT_LEVEL = "insight"

#: Largest MQTT packet the protocol can express (remaining length of 268,435,455 bytes).
MQTT_MAX_PACKET_SIZE = 268_435_455
#: Room for the topic, frame headers, sealing overhead and MQTT 5 properties above a blob.
PACKET_HEADROOM = 64 * KIB
#: Without model sizes: what fedge.lab.broker uses for the local broker.
DEFAULT_MAX_PACKET_SIZE = 16 * MIB
#: Queue per device in the aggregator's session: about 1.5 h of 30-s statuses plus updates.
QUEUED_PER_DEVICE = 200
MIN_QUEUED_MESSAGES = 10_000
#: Bytes queued for one client (max_queued_bytes), sized for the aggregator's session while it
#: is away. No round opens without the aggregator, so a device has at most its open round's
#: sealed message (update, moments or evaluation) and one resend outstanding...
QUEUED_SEALED_PER_DEVICE = 2
#: ...and its statuses (QUEUED_PER_DEVICE of them), each well under this (an agent's status is
#: 0.3-1 KB of JSON).
STATUS_BYTES = 2 * KIB
#: Room around the weights in a sealed update (protocol.messages.SEALED_HEADROOM_BYTES): an
#: fp32 update is at most the model's weights (``initial_weights.f32``) plus this.
SEALED_HEADROOM = 4 * KIB
#: Small fleets still get room for a long absence, as with MIN_QUEUED_MESSAGES.
MIN_QUEUED_BYTES = 64 * MIB
DEFAULT_MAX_INFLIGHT = 20
DEFAULT_MAX_KEEPALIVE = 300

#: mosquitto_passwd 2.0's defaults for ``$7$`` (PBKDF2-HMAC-SHA512).
PBKDF2_ITERATIONS = 101
PBKDF2_SALT_BYTES = 12
PASSWORD_BYTES = 32

LAB_CA_DAYS = 3650
DEFAULT_CERT_DAYS = 825
OPENSSL_TIMEOUT_S = 30.0

TlsMode = Literal["lab", "files", "none"]
Role = Literal["aggregator", "aggregator-worker", "bms", "monitor", "edgex", "device", "device-edgex"]
ROLE_TITLES: dict[Role, str] = {
    "aggregator": "aggregator",
    "aggregator-worker": "aggregator worker ([replicas]): a share of the updates in, its partials out",
    "bms": "building-management system (read-only)",
    "monitor": "fleet monitor: reads global models, statuses, predictions, secure rounds (read-only)",
    "edgex": "EdgeX service (its message bus)",
    "device": "device",
    "device-edgex": "device's EdgeX-bus connection (its readings, read-only)",
}
#: The agent's EdgeX-bus connection is principal ``{device}{EDGEX_PRINCIPAL_SUFFIX}``.
EDGEX_PRINCIPAL_SUFFIX = ".edgex"


def edgex_principal(device: str) -> str:
    """The username of ``device``'s EdgeX-bus connection: deterministic, so provisioning
    (``provision-device.sh``, ``fedge demo``) can name it without reading the broker's files."""
    return f"{device}{EDGEX_PRINCIPAL_SUFFIX}"


# Names of what the writer puts into OUT; --force replaces exactly these and nothing else.
CONF_NAME = "mosquitto.conf"
ACL_NAME = "acl"
PASSWD_NAME = "passwd"
SUMMARY_NAME = "summary.json"
CERTS_DIR = "certs"
CREDENTIALS_DIR = "credentials"
GENERATED = (CONF_NAME, ACL_NAME, PASSWD_NAME, SUMMARY_NAME, CERTS_DIR, CREDENTIALS_DIR)

_CONF_VALUE = re.compile(r"[^\s#]+")
_DNS_NAME = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


class BrokerConfigError(FedgeError):
    """The broker configuration cannot be generated from this input; the message says why."""


# --- who may do what -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Principal:
    """One broker user: its MQTT username (a certificate's CN with client certificates).

    ``device``: for a ``device-edgex`` principal, the device whose EdgeX readings it reads.
    """

    name: str
    role: Role
    device: str | None = None


@dataclass(frozen=True)
class FleetAccess:
    """The principals of one fleet and what the ACL lets each of them do.

    Usernames are fleet-style ids (1-64 of ``A-Z a-z 0-9 _ . -``): they become topic levels
    (a device's username *is* its device id in ``update/{id}``), password-file keys, file names
    and certificate CNs, so nothing in them can be a wildcard, a separator or a path. A name
    may have one role only: a BMS user that is also a device would get the device's rights.
    Device, BMS and EdgeX names are kept sorted, so the rendered files do not depend on the
    order of the input.

    Every connection needs its own principal: the broker uses the username as the client id
    (``use_username_as_clientid``), so two connections with one username would take each
    other's session over. A device agent makes two connections when the EdgeX bus is this
    broker (``device_edgex``, the default): its fleet connection as ``{device}`` and its
    EdgeX-bus connection as ``{device}.edgex``, which alone may read the device's EdgeX
    readings. ``device_edgex=False`` (devices read EdgeX elsewhere) leaves those principals out.
    """

    fleet: str
    devices: tuple[str, ...]
    aggregator: str = DEFAULT_AGGREGATOR
    bms: tuple[str, ...] = ()
    edgex_services: tuple[str, ...] = ()
    edgex_prefix: str = DEFAULT_EDGEX_PREFIX
    monitors: tuple[str, ...] = ()
    #: ``[replicas]`` workers beside the aggregator (their ``worker_id``s, each its own principal:
    #: the username is the client id, and a worker's broker session must be its own).
    workers: tuple[str, ...] = ()
    #: A building gateway under a campus: (campus fleet, this building's id there). The
    #: aggregator then also reads the campus's manifest and blobs (over the bridge) and writes
    #: the building's contribution to the campus.
    upstream: tuple[str, str] | None = None
    device_edgex: bool = True
    #: Home Assistant's discovery prefix with ``--home-assistant`` (None: off): each device may
    #: then write its own discovery config, and BMS principals read ``{prefix}/#``.
    home_assistant_prefix: str | None = None

    def __post_init__(self) -> None:
        _checked(self.fleet, "fleet id")
        if not self.devices:
            raise BrokerConfigError("no devices: give at least one device id (or a registry with one)")
        object.__setattr__(self, "devices", tuple(sorted(self.devices)))
        object.__setattr__(self, "bms", tuple(sorted(self.bms)))
        object.__setattr__(self, "edgex_services", tuple(sorted(self.edgex_services)))
        object.__setattr__(self, "monitors", tuple(sorted(self.monitors)))
        object.__setattr__(self, "workers", tuple(sorted(self.workers)))
        seen: dict[str, Principal] = {}
        for principal in self.principals:
            _checked(principal.name, f"{principal.role} name")
            if principal.name in seen:
                other = seen[principal.name]
                same = "twice" if other.role == principal.role else f"as {other.role} and as {principal.role}"
                owner = next((p.device for p in (other, principal) if p.device is not None), None)
                why = f" ({principal.name!r} is the EdgeX-bus principal of device {owner!r})" if owner else ""
                raise BrokerConfigError(
                    f"principal {principal.name!r} is listed {same}: names must be unique{why}"
                )
            seen[principal.name] = principal
        check_edgex_prefix(self.edgex_prefix)
        if self.home_assistant_prefix is not None:
            self._check_home_assistant()

    def _check_home_assistant(self) -> None:
        """The discovery prefix is a plain topic outside fedge's and EdgeX's trees (EdgeX
        services may write all of theirs), and no two devices share a discovery topic (their
        node ids replace '.' with '_': ``fedge.protocol.home_assistant``)."""
        prefix = self.home_assistant_prefix
        assert prefix is not None
        try:
            check_prefix(prefix)
        except FedgeError as exc:
            raise BrokerConfigError(str(exc)) from None
        if prefix.split("/")[0] == self.edgex_prefix.split("/")[0]:
            raise BrokerConfigError(
                f"Home Assistant discovery prefix {prefix!r} lies in the EdgeX tree {self.edgex_prefix}/, "
                "which EdgeX services may write: choose another (Home Assistant's default is "
                f"{DEFAULT_HA_PREFIX!r})"
            )
        owners: dict[str, str] = {}
        for device in self.devices:
            node = ha_node_id(self.fleet, device)
            if node in owners:
                raise BrokerConfigError(
                    f"devices {owners[node]!r} and {device!r} would share one Home Assistant discovery "
                    f"topic (node id {node!r}: Home Assistant allows no '.'); rename one"
                )
            owners[node] = device

    @property
    def topics(self) -> FleetTopics:
        return FleetTopics(self.fleet)

    def _upstream_rules(self) -> list[tuple[str, str]]:
        if self.upstream is None:
            return []
        campus = FleetTopics(self.upstream[0])
        return [
            ("read", campus.manifest),
            ("read", campus.blob_filter),
            ("write", campus.update(self.upstream[1])),
        ]

    @property
    def principals(self) -> tuple[Principal, ...]:
        """Every principal, in the order of the rendered ACL: aggregator, BMS, monitors, EdgeX
        services, then each device followed by its EdgeX-bus principal."""
        devices: list[Principal] = []
        for device in self.devices:
            devices.append(Principal(device, "device"))
            if self.device_edgex:
                devices.append(Principal(edgex_principal(device), "device-edgex", device))
        return (
            Principal(self.aggregator, "aggregator"),
            *(Principal(n, "aggregator-worker") for n in self.workers),
            *(Principal(n, "bms") for n in self.bms),
            *(Principal(n, "monitor") for n in self.monitors),
            *(Principal(n, "edgex") for n in self.edgex_services),
            *devices,
        )

    def rules(self, principal: Principal) -> list[tuple[str, str]]:
        """``(access, topic filter)`` pairs the ACL grants ``principal``; nothing else is allowed."""
        t = self.topics
        if principal.role == "aggregator":
            return [
                ("read", t.update_filter),
                ("read", t.status_filter),
                ("read", t.insight_filter),  # the dashboard's latest predictions
                ("write", t.manifest),
                ("write", f"{t.base}/blob/#"),
                ("write", t.aggregator_status),
                ("write", t.fleet_summary),
                ("write", t.rotation_filter),
                ("write", t.rollout),  # the rollout gate's signed decisions (docs/rollout.md)
                ("write", t.rollout_decision),
                ("write", f"{t.base}/secagg/#"),  # secure-aggregation rounds' signed documents
                ("read", t.identity_filter),  # devices' operator-signed identity certificates
                # [replicas]: its workers' partials in, the work order and the verdicts out
                ("read", t.partial_filter),
                ("write", t.work),
                ("write", f"{t.base}/aggregator/verdict/+"),
                *self._upstream_rules(),
            ]
        if principal.role == "aggregator-worker":
            # Updates through the shared subscription (mosquitto checks a $share/ subscription's
            # deliveries against the topic itself), the leader's work order, its own verdicts.
            return [
                ("read", t.update_filter),
                ("read", t.work),
                ("read", t.verdict(principal.name)),
                ("write", t.partial(principal.name)),
            ]
        if principal.role == "monitor":
            return [
                ("read", t.manifest),
                ("read", f"{t.base}/blob/#"),
                ("read", t.rollout),
                ("read", t.rollout_decision),
                ("read", t.status_filter),
                ("read", t.aggregator_status),
                ("read", t.fleet_summary),
                ("read", f"{t.base}/{INSIGHT_LEVEL}/#"),
                # Secure rounds' public documents (keys, ciphertexts, who is asked for what):
                # an operator's view of how far a round got.
                ("read", f"{t.base}/secagg/#"),
            ]
        if principal.role == "bms":
            bms = [
                ("read", t.status_filter),
                ("read", t.aggregator_status),
                ("read", t.fleet_summary),
                ("read", f"{t.base}/{INSIGHT_LEVEL}/#"),
            ]
            if self.home_assistant_prefix is not None:  # Home Assistant's discovery configs
                bms.append(("read", f"{self.home_assistant_prefix}/#"))
            return bms
        if principal.role == "edgex":
            return [("readwrite", f"{self.edgex_prefix}/#")]
        if principal.role == "device-edgex":
            assert principal.device is not None  # set by principals
            device = principal.device
            return [
                # Its device's EdgeX readings: device services' events and core-data's
                # republished ones; nothing of fedge's tree, and it publishes nothing.
                ("read", f"{self.edgex_prefix}/events/device/+/+/{device}/#"),
                ("read", f"{self.edgex_prefix}/events/core/+/+/{device}/#"),
            ]
        device = principal.name
        rules = [
            # Its own update, status and insight topics only; the status topic also carries its
            # Last Will, the insight topic its predictions.
            ("write", t.update(device)),
            ("write", t.status(device)),
            ("write", t.insight(device)),
            ("read", t.manifest),
            ("read", f"{t.base}/blob/#"),
            ("read", t.rotation_filter),  # signing-key rotations
            ("read", t.rollout),  # the promoted model its predictions use (docs/rollout.md)
            # Secure aggregation: every round's config, and only what a round sends this device
            # (its neighbours' keys, the shares addressed to it, its unmask request).
            ("read", f"{t.base}/secagg/+/config"),
            ("read", f"{t.base}/secagg/+/+/{device}"),
            # Its own identity certificate (retained), and every device's: its neighbours'.
            ("write", t.identity(device)),
            ("read", t.identity_filter),
        ]
        if self.home_assistant_prefix is not None:  # its own discovery config, no other
            rules.append(("write", ha_discovery_topic(self.home_assistant_prefix, self.fleet, device)))
        return rules


def _checked(value: str, what: str) -> str:
    try:
        return check_id(value, what)
    except TopicError as exc:
        raise BrokerConfigError(str(exc)) from None


def check_edgex_prefix(prefix: str) -> str:
    """The EdgeX topic prefix, if it is a plain topic (no wildcards, no empty levels) outside
    fedge's own tree: EdgeX services get ``readwrite`` on ``{prefix}/#``, so a prefix of
    ``fedge/...`` would hand them the fleet's topics."""
    levels = prefix.split("/") if isinstance(prefix, str) else [""]
    bad = not prefix or any(c in prefix for c in "+#\x00") or "" in levels or any(c.isspace() for c in prefix)
    if bad or prefix.startswith("$"):
        raise BrokerConfigError(
            f"EdgeX topic prefix {prefix!r}: must be non-empty topic levels without '+', '#', '$', "
            "spaces or empty levels, e.g. 'edgex'"
        )
    root = ROOT.split("/")[0]
    if levels[0] == root:
        raise BrokerConfigError(
            f"EdgeX topic prefix {prefix!r} must not lie inside fedge's topic tree {root}/"
        )
    return prefix


def render_acl(access: FleetAccess) -> str:
    """The ``acl_file`` for ``access`` (pure). Mosquitto denies whatever no line grants."""
    lines = [
        f"# Mosquitto ACL for fedge fleet {access.fleet!r}, written by `fedge broker config`.",
        "# Regenerate it rather than editing it. Everything not granted below is denied.",
        "# One `user` block per principal and no `pattern` lines: a pattern would apply to every",
        "# authenticated user, the aggregator and BMS users included (docs/broker-security.md).",
        "# mosquitto 2.0 grants every SUBSCRIBE; these rules decide what is delivered.",
    ]
    for principal in access.principals:
        lines.append("")
        lines.append(f"# {ROLE_TITLES[principal.role]}: {principal.name}")
        lines.append(f"user {principal.name}")
        lines.extend(f"topic {how} {topic}" for how, topic in access.rules(principal))
    return "\n".join(lines) + "\n"


# --- limits --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerLimits:
    """The broker's resource limits, with the reason for each value kept for the comments.

    Use :meth:`for_fleet` to size them from the fleet and the model; the constructor takes
    explicit values.
    """

    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE
    max_queued_messages: int = MIN_QUEUED_MESSAGES
    max_inflight_messages: int = DEFAULT_MAX_INFLIGHT
    max_keepalive: int = DEFAULT_MAX_KEEPALIVE
    #: The largest blob (model or weights) the sizing was based on, if known.
    largest_blob: int | None = None
    #: Bytes queued per client (0 = no limit). Without it a device could make the broker hold
    #: max_queued_messages x max_packet_size bytes for an offline aggregator.
    max_queued_bytes: int = MIN_QUEUED_BYTES
    #: The largest sealed message of an honest device the sizing was based on, if known.
    update_bytes: int | None = None

    def __post_init__(self) -> None:
        if not 20 <= self.max_packet_size <= MQTT_MAX_PACKET_SIZE:
            raise BrokerConfigError(
                f"max_packet_size must be 20..{MQTT_MAX_PACKET_SIZE} bytes, not {self.max_packet_size}"
            )
        if self.largest_blob is not None:
            if self.largest_blob <= 0:
                raise BrokerConfigError(f"the largest blob must be > 0 bytes, not {self.largest_blob}")
            if self.max_packet_size < self.largest_blob + PACKET_HEADROOM:
                raise BrokerConfigError(
                    f"max_packet_size {self.max_packet_size} is too small for a {self.largest_blob}-byte "
                    f"blob: mosquitto would disconnect the aggregator when it publishes it (need at least "
                    f"{self.largest_blob + PACKET_HEADROOM})"
                )
        if self.max_queued_messages < 0:
            raise BrokerConfigError("max_queued_messages must be >= 0 (0 = unlimited)")
        if self.max_queued_bytes < 0:
            raise BrokerConfigError("max_queued_bytes must be >= 0 (0 = unlimited)")
        if self.update_bytes is not None and self.update_bytes <= 0:
            raise BrokerConfigError(f"the update size must be > 0 bytes, not {self.update_bytes}")
        if not 0 <= self.max_inflight_messages <= 65535:
            raise BrokerConfigError("max_inflight_messages must be 0..65535 (0 = unlimited)")
        if not 10 <= self.max_keepalive <= 65535:
            raise BrokerConfigError(
                "max_keepalive must be 10..65535 seconds (mosquitto: do not set below 10)"
            )

    @classmethod
    def for_fleet(
        cls,
        devices: int,
        largest_blob: int | None = None,
        *,
        max_packet_size: int | None = None,
        max_queued_messages: int | None = None,
        max_inflight_messages: int = DEFAULT_MAX_INFLIGHT,
        max_keepalive: int = DEFAULT_MAX_KEEPALIVE,
        update_bytes: int | None = None,
        max_queued_bytes: int | None = None,
    ) -> BrokerLimits:
        """Limits for ``devices`` devices and a model whose largest blob is ``largest_blob`` bytes.

        ``max_packet_size`` = 2 x the largest blob + 64 KiB: room for the model to grow a bit
        and for topic, headers and properties (mosquitto *disconnects* a client that sends a
        bigger packet, so too small is far worse than too big). ``max_queued_messages`` =
        200 per device, at least 10,000: the aggregator's session must hold every device's
        updates and statuses while it is away (mosquitto's default of 1,000 silently drops the
        rest).

        ``max_queued_bytes`` = devices x (2 x ``update_bytes`` + 200 x 2 KiB), at least 64 MiB:
        the same absence in bytes - each device's open-round sealed message and a resend, and
        its 200 statuses - so that no device can make the broker hold max_queued_messages x
        max_packet_size bytes for an offline aggregator. ``update_bytes`` is the largest sealed
        message an honest device sends: the model's weights + 4 KiB (:func:`update_bytes_in`);
        without it, the largest blob + 4 KiB (the weights are a blob), else max_packet_size.
        Explicit values win.
        """
        if devices < 1:
            raise BrokerConfigError("a fleet needs at least one device")
        if max_packet_size is None:
            if largest_blob is None:
                max_packet_size = DEFAULT_MAX_PACKET_SIZE
            else:
                max_packet_size = min(MQTT_MAX_PACKET_SIZE, 2 * max(largest_blob, 1) + PACKET_HEADROOM)
        if max_queued_messages is None:
            max_queued_messages = max(MIN_QUEUED_MESSAGES, QUEUED_PER_DEVICE * devices)
        if update_bytes is None and largest_blob is not None:
            update_bytes = largest_blob + SEALED_HEADROOM
        if max_queued_bytes is None:
            per_update = update_bytes if update_bytes is not None else max_packet_size
            per_device = QUEUED_SEALED_PER_DEVICE * per_update + QUEUED_PER_DEVICE * STATUS_BYTES
            max_queued_bytes = max(MIN_QUEUED_BYTES, devices * per_device)
        return cls(
            max_packet_size=max_packet_size,
            max_queued_messages=max_queued_messages,
            max_inflight_messages=max_inflight_messages,
            max_keepalive=max_keepalive,
            largest_blob=largest_blob,
            max_queued_bytes=max_queued_bytes,
            update_bytes=update_bytes,
        )


def largest_blob_in(model_dir: Path) -> int:
    """The size of the largest blob ``fedge model build`` wrote into ``model_dir`` (the model
    and its initial weights are what the aggregator publishes as blobs)."""
    sizes = []
    for name in ("model.tflite", INITIAL_WEIGHTS_FILE):
        path = model_dir / name
        with contextlib.suppress(FileNotFoundError):
            sizes.append(path.stat().st_size)
    if not sizes:
        raise BrokerConfigError(
            f"{model_dir}: no model.tflite or {INITIAL_WEIGHTS_FILE} (a directory from 'fedge model build')"
        )
    return max(sizes)


def update_bytes_in(model_dir: Path) -> int | None:
    """The largest sealed message an honest device sends for the model in ``model_dir``: an fp32
    update is the weights (``initial_weights.f32``, float32 like the delta) plus headers; fp16
    and int8 updates and feature moments are smaller. None without the weights file."""
    try:
        return (model_dir / INITIAL_WEIGHTS_FILE).stat().st_size + SEALED_HEADROOM
    except FileNotFoundError:
        return None


# --- mosquitto.conf ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a TLS listener, as the broker will see them."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class Bridge:
    """A building broker's bridge to its campus broker (two-tier aggregation, docs/scale.md).

    Exactly three topics cross: the campus's manifest and blobs come in, this building's
    contribution (``update/{building_id}`` of the campus fleet) goes out. On the campus broker
    the building is a device: ``fedge broker config --device BUILDING_ID`` there gives it those
    rights and its password (``remote_password``, which makes this conf file secret: mode 0600).
    """

    address: str  # host:port of the campus broker
    campus_fleet: str
    building_id: str
    password: str | None = None
    cafile: Path | None = None  # the campus broker's CA: TLS to the campus

    def __post_init__(self) -> None:
        _checked(self.campus_fleet, "campus fleet id")
        _checked(self.building_id, "building id")
        host, _, port = self.address.rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535 or not _CONF_VALUE.fullmatch(host):
            raise BrokerConfigError(f"bridge address {self.address!r} must be HOST:PORT")
        if self.password is not None and not _CONF_VALUE.fullmatch(self.password):
            raise BrokerConfigError("the bridge password must be non-empty without whitespace or '#'")

    def lines(self) -> list[str]:
        campus = FleetTopics(self.campus_fleet)
        out = [
            "",
            f"# Bridge to the campus broker: fleet {self.campus_fleet!r} sees this building as the device",
            f"# {self.building_id!r}. The campus's manifest and blobs come in (retained), this building's",
            "# sealed contribution goes out; nothing else crosses. A persistent session on both sides",
            "# (cleansession false) queues what crosses while the link is down and drains it after.",
            f"connection campus-{self.building_id}",
            f"address {self.address}",
            "bridge_protocol_version mqttv311",
            "cleansession false",
            f"remote_clientid {self.building_id}",
            f"remote_username {self.building_id}",
            "try_private true",
            "notifications false",
            f"topic {campus.manifest} in 1",
            f"topic {campus.blob_filter} in 1",
            f"topic {campus.update(self.building_id)} out 1",
        ]
        if self.password is not None:
            out.insert(
                out.index(f"remote_username {self.building_id}") + 1, f"remote_password {self.password}"
            )
        if self.cafile is not None:
            out.append(f"bridge_cafile {conf_path(self.cafile, 'bridge CA file')}")
            out.append("bridge_tls_version tlsv1.2")
        return out


@dataclass(frozen=True)
class ListenerConf:
    """Everything :func:`render_conf` needs; paths are as the *broker* sees them (absolute).

    ``tls=None`` is the insecure plain listener (``--no-tls``). ``client_certs`` makes the
    listener require a client certificate signed by ``tls.ca`` and use its CN as the username
    (``use_identity_as_username``); then there is no password file.
    """

    fleet: str
    port: int
    acl_file: Path
    password_file: Path | None
    tls: TlsFiles | None
    client_certs: bool = False
    bind: str | None = None
    persistence_dir: Path = DEFAULT_DATA_DIR
    limits: BrokerLimits = field(default_factory=BrokerLimits)
    log_file: Path | None = None
    run_as: str | None = None
    bridge: Bridge | None = None

    def __post_init__(self) -> None:
        _checked(self.fleet, "fleet id")
        if not 1 <= self.port <= 65535:
            raise BrokerConfigError(f"listener port must be 1..65535, not {self.port}")
        if self.client_certs and self.tls is None:
            raise BrokerConfigError("client certificates need TLS: --client-certs cannot go with --no-tls")
        if self.client_certs == (self.password_file is not None):
            raise BrokerConfigError("give a password file, or client certificates, exactly one of them")
        paths = {"acl file": self.acl_file, "persistence directory": self.persistence_dir}
        if self.password_file is not None:
            paths["password file"] = self.password_file
        if self.log_file is not None:
            paths["log file"] = self.log_file
        if self.tls is not None:
            paths.update({"CA file": self.tls.ca, "certificate": self.tls.cert, "key file": self.tls.key})
        for what, path in paths.items():
            conf_path(path, what)
        for what, value in (("bind address", self.bind), ("run-as user", self.run_as)):
            if value is not None and not _CONF_VALUE.fullmatch(value):
                raise BrokerConfigError(f"{what} {value!r} must be non-empty without whitespace or '#'")


def conf_path(path: Path, what: str) -> str:
    """``path`` as mosquitto.conf must hold it: absolute (mosquitto resolves relative paths
    against its working directory, not the file's), without whitespace or '#'."""
    text = str(path)
    if not path.is_absolute():
        raise BrokerConfigError(f"{what} {text!r} must be an absolute path (as the broker sees it)")
    if not _CONF_VALUE.fullmatch(text):
        raise BrokerConfigError(
            f"{what} {text!r} must not contain whitespace or '#' (mosquitto.conf cannot quote it)"
        )
    return text


def _on_off(flag: bool) -> str:
    return "true" if flag else "false"


def render_conf(conf: ListenerConf) -> str:
    """mosquitto 2.0 configuration for ``conf`` (pure), every choice commented for operators."""
    limits = conf.limits
    if limits.largest_blob is not None:
        packet_why = (
            f"# 2 x the largest blob ({limits.largest_blob} bytes) + {PACKET_HEADROOM // KIB} KiB for topic, "
            "headers and properties."
        )
    else:
        packet_why = "# No model size was given: a generous default."
    if limits.update_bytes is not None:
        update_why = f"{limits.update_bytes} bytes"
    else:
        update_why = "max_packet_size (no model size given)"
    lines = [
        f"# Mosquitto 2.0 configuration for fedge fleet {conf.fleet!r}, written by `fedge broker config`.",
        "# Regenerate it rather than editing it (see docs/broker-security.md). Run it with",
        "#   mosquitto -c <this file>",
        "",
        "# Security: every client authenticates; the ACL denies whatever it does not grant. The",
        "# settings below apply to every listener (there is one).",
        "per_listener_settings false",
        "allow_anonymous false",
    ]
    if conf.password_file is not None:
        lines += [
            "# PBKDF2-SHA512 hashes; reloaded on SIGHUP.",
            f"password_file {conf_path(conf.password_file, 'password file')}",
        ]
    lines += [
        "# Reloaded on SIGHUP.",
        f"acl_file {conf_path(conf.acl_file, 'acl file')}",
        "",
        "# Limits.",
        "# Largest MQTT packet a client may send; a bigger one gets the client disconnected.",
        packet_why,
        f"max_packet_size {limits.max_packet_size}",
        "# QoS 1/2 messages queued per client beyond those in flight. The default of 1000 silently",
        "# drops further messages to a slow or offline subscriber: an aggregator that is away for",
        "# a while would lose updates and statuses.",
        f"# Sized {QUEUED_PER_DEVICE} per device, at least {MIN_QUEUED_MESSAGES}.",
        f"max_queued_messages {limits.max_queued_messages}",
        "# The same queue in bytes (a message is queued while the queue is below it): without it a",
        "# device could make the broker hold max_queued_messages x max_packet_size bytes for an",
        f"# offline aggregator. Sized per device: {QUEUED_SEALED_PER_DEVICE} sealed messages of",
        f"# {update_why} + {QUEUED_PER_DEVICE} statuses of {STATUS_BYTES // KIB} KiB; "
        f"at least {MIN_QUEUED_BYTES // MIB} MiB.",
        f"max_queued_bytes {limits.max_queued_bytes}",
        f"max_inflight_messages {limits.max_inflight_messages}",
        "# MQTT 5 clients asking for a longer keepalive are told to use this one, which bounds how long",
        "# a dead device looks connected before its Last Will marks it offline. (mosquitto 2.0.11 does",
        "# not apply it to MQTT 3.1.1 clients.)",
        f"max_keepalive {limits.max_keepalive}",
        "",
        "# Persistence: retained manifests, blobs and statuses, and persistent sessions (queued",
        "# updates) survive a restart.",
        "persistence true",
        f"persistence_location {conf_path(conf.persistence_dir, 'persistence directory').rstrip('/')}/",
        "persistence_file mosquitto.db",
        "autosave_interval 60",
        "# Sessions of MQTT 3.1.1 clients away for longer are dropped (MQTT 5 clients set their own expiry).",
        "persistent_client_expiration 14d",
        "",
        "# Logging: one log_type per line (mosquitto 2.0.11 ignores further words on a line).",
        f"log_dest {'stderr' if conf.log_file is None else 'file ' + conf_path(conf.log_file, 'log file')}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
    ]
    if conf.run_as is not None:
        lines += [
            "",
            "# Started as root, mosquitto drops to this user before it reads the files above.",
            f"user {conf.run_as}",
        ]
    lines.append("")
    listen = f"listener {conf.port}" + (f" {conf.bind}" if conf.bind else "")
    # A listener option (like use_username_as_clientid) above the first `listener` line would
    # configure mosquitto's default listener, which then opens a plain port 1883 as well.
    session = [
        "# Sessions: the client id is the username, so no principal can take over another's",
        "# session. Without it a client connecting with the aggregator's (predictable) client id",
        "# disconnects the aggregator and takes its persistent session, with the updates queued",
        "# for it. With client certificates the username is the certificate's CN. Every connection",
        "# needs its own principal: two connections with one username take each other's session.",
        "# (A listener option: it must follow the listener line. Not reloaded on SIGHUP.)",
        "use_username_as_clientid true",
    ]
    if conf.tls is None:
        lines += [
            "# INSECURE (--no-tls): passwords and every message cross the network in clear text.",
            listen,
            *session,
        ]
    else:
        lines += [
            "# The only listener: TLS 1.2 or newer.",
            listen,
            *session,
            f"cafile {conf_path(conf.tls.ca, 'CA file')}",
            f"certfile {conf_path(conf.tls.cert, 'certificate')}",
            f"keyfile {conf_path(conf.tls.key, 'key file')}",
            "tls_version tlsv1.2",
        ]
        if conf.client_certs:
            lines += [
                "# Clients must present a certificate signed by the CA above; its CN is the username",
                "# the ACL knows them by (no password file).",
                "require_certificate true",
                "use_identity_as_username true",
            ]
        else:
            lines.append("require_certificate false")
    if conf.bridge is not None:
        lines += conf.bridge.lines()
    return "\n".join(lines) + "\n"


# --- passwords and credentials -------------------------------------------------------------------


def new_password() -> str:
    """A random password: 256 bits, URL-safe base64 (no quoting needed in TOML or shells)."""
    return secrets.token_urlsafe(PASSWORD_BYTES)


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """Mosquitto 2.0's ``$7$`` password hash: ``$7$<iterations>$<b64 salt>$<b64 PBKDF2-HMAC-SHA512>``.

    Byte for byte what ``mosquitto_passwd`` 2.0 writes (same defaults), so the broker and
    ``mosquitto_passwd`` can both use and update the file.
    """
    if salt is None:
        salt = secrets.token_bytes(PBKDF2_SALT_BYTES)
    if iterations < 1:
        raise BrokerConfigError("PBKDF2 iterations must be >= 1")
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches a ``$7$`` hash (as mosquitto checks it; constant time)."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[0] != "" or parts[1] != "7" or not parts[2].isdigit():
        raise BrokerConfigError(f"not a mosquitto $7$ password hash: {encoded[:12]!r}...")
    salt = base64.b64decode(parts[3], validate=True)
    expected = base64.b64decode(parts[4], validate=True)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, int(parts[2]))
    return hmac.compare_digest(digest, expected)


def render_passwd(hashes: Iterable[tuple[str, str]]) -> str:
    """The ``password_file``: ``username:hash`` lines (pure; comments are not allowed there)."""
    return "".join(f"{_checked(user, 'username')}:{hashed}\n" for user, hashed in hashes)


def _toml_string(text: str) -> str:
    return json.dumps(text)  # a JSON string of printable text is a TOML basic string


def render_credentials(
    principal: Principal,
    fleet: str,
    broker_url: str,
    *,
    password: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    ca_file: str | None = None,
) -> str:
    """``credentials/<principal>.txt``: TOML keys for the principal's ``[mqtt]`` table (pure).

    ``broker``, ``username`` and ``password`` are the keys agent and aggregator configs
    already read; ``ca_file``, ``cert_file`` and ``key_file`` name files next to this one
    (paths relative to the file, like every path in fedge's configs).
    """
    lines = [
        f"# fedge MQTT credentials of {ROLE_TITLES[principal.role]} {principal.name!r}, fleet {fleet!r}.",
        "# Secret: keep it mode 0600. Paths are relative to this file.",
        f"broker = {_toml_string(broker_url)}",
    ]
    if cert_file is not None:
        lines.append("# With client certificates the broker takes the username from the certificate's CN.")
    lines.append(f"username = {_toml_string(principal.name)}")
    if password is not None:
        lines.append(f"password = {_toml_string(password)}")
    for key, value in (("ca_file", ca_file), ("cert_file", cert_file), ("key_file", key_file)):
        if value is not None:
            lines.append(f"{key} = {_toml_string(value)}")
    return "\n".join(lines) + "\n"


def broker_url(host: str, port: int, tls: bool) -> str:
    """``mqtts://host:port`` (``mqtt://`` without TLS), IPv6 hosts in brackets."""
    shown = f"[{host}]" if ":" in host else host
    return f"{'mqtts' if tls else 'mqtt'}://{shown}:{port}"


def check_hostname(name: str) -> str:
    """A DNS name or an IP address (what a server certificate's subjectAltName can hold)."""
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(name)
        return name
    if not isinstance(name, str) or not _DNS_NAME.fullmatch(name):
        raise BrokerConfigError(
            f"hostname {name!r}: must be a DNS name (letters, digits, '-', '.') or an IP address"
        )
    return name


# --- TLS with the openssl command ----------------------------------------------------------------


class _OpenSSL:
    """Runs the ``openssl`` command; every failure is a :class:`BrokerConfigError` with its stderr."""

    def __init__(self, work: Path) -> None:
        exe = shutil.which("openssl")
        if exe is None:
            raise BrokerConfigError("--tls lab needs the openssl command: apt-get install openssl")
        self.exe = exe
        self.work = work

    def run(self, *args: str) -> None:
        try:
            proc = subprocess.run(
                [self.exe, *args],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=OPENSSL_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise BrokerConfigError(
                f"openssl {args[0]} did not finish within {OPENSSL_TIMEOUT_S:g} s"
            ) from None
        if proc.returncode != 0:
            detail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
            raise BrokerConfigError(f"openssl {args[0]} failed: {' / '.join(detail)}")

    def new_key(self, path: Path) -> None:
        self.run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))
        os.chmod(path, 0o600)

    def _signed(
        self,
        subject: str,
        key: Path,
        cert: Path,
        extensions: list[str],
        days: int,
        issuer: tuple[Path, Path] | None,
    ) -> None:
        stem = cert.name.removesuffix(".crt")
        csr = self.work / f"{stem}.csr"
        ext = self.work / f"{stem}.ext"
        ext.write_text("\n".join(extensions) + "\n", encoding="ascii")
        self.run("req", "-new", "-key", str(key), "-subj", subject, "-out", str(csr))
        serial = f"0x{secrets.randbits(127):x}"
        signer = (
            ["-signkey", str(key)] if issuer is None else ["-CA", str(issuer[0]), "-CAkey", str(issuer[1])]
        )
        self.run(
            "x509", "-req", "-in", str(csr), *signer, "-set_serial", serial, "-days", str(days),
            "-sha256", "-extfile", str(ext), "-out", str(cert),
        )  # fmt: skip
        os.chmod(cert, 0o644)

    def lab_ca(self, key: Path, cert: Path, fleet: str) -> None:
        """A self-signed CA that can sign leaf certificates only (pathlen 0)."""
        self.new_key(key)
        self._signed(
            f"/O=fedge lab/CN=fedge lab CA {fleet}",
            key,
            cert,
            [
                "basicConstraints = critical, CA:TRUE, pathlen:0",
                "keyUsage = critical, keyCertSign, cRLSign",
                "subjectKeyIdentifier = hash",
            ],
            LAB_CA_DAYS,
            None,
        )

    def leaf(
        self,
        ca: tuple[Path, Path],
        key: Path,
        cert: Path,
        common_name: str,
        *,
        server_names: Sequence[str] = (),
        days: int,
    ) -> None:
        """A server certificate (``server_names`` in subjectAltName) or, without names, a
        client certificate whose CN is the principal's username."""
        self.new_key(key)
        extensions = [
            "basicConstraints = critical, CA:FALSE",
            "keyUsage = critical, digitalSignature",
            f"extendedKeyUsage = {'serverAuth' if server_names else 'clientAuth'}",
            "subjectKeyIdentifier = hash",
            "authorityKeyIdentifier = keyid",
        ]
        if server_names:
            alt = ", ".join(_san(n) for n in server_names)
            extensions.append(f"subjectAltName = {alt}")
        self._signed(f"/O=fedge/CN={common_name}", key, cert, extensions, days, ca)


def _san(name: str) -> str:
    try:
        return f"IP:{ipaddress.ip_address(name)}"
    except ValueError:
        return f"DNS:{name}"


# --- the writer ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerConfigRequest:
    """Everything ``fedge broker config`` needs; validated on construction (no I/O).

    ``tls``: ``"lab"`` makes a CA and a server certificate for ``hostnames``; ``"files"`` uses
    ``tls_files`` (real certificates, referenced where they are, so renewals keep working);
    ``"none"`` is the explicit insecure choice. ``install_dir`` is where the broker will see
    ``out_dir`` (default: ``out_dir`` itself), for generating on one machine and deploying on
    another. ``hostnames[0]`` is the host in the credentials' broker URL.
    """

    access: FleetAccess
    out_dir: Path
    tls: TlsMode
    hostnames: tuple[str, ...] = DEFAULT_HOSTNAMES
    tls_files: TlsFiles | None = None
    client_certs: bool = False
    port: int | None = None
    bind: str | None = None
    install_dir: Path | None = None
    data_dir: Path = DEFAULT_DATA_DIR
    limits: BrokerLimits = field(default_factory=BrokerLimits)
    log_file: Path | None = None
    run_as: str | None = None
    broker_group: str | None = None
    cert_days: int = DEFAULT_CERT_DAYS
    force: bool = False
    #: A building broker's bridge to its campus broker (two-tier aggregation).
    bridge: Bridge | None = None

    def __post_init__(self) -> None:
        if self.tls not in ("lab", "files", "none"):
            raise BrokerConfigError(f"TLS mode must be lab, files or none, not {self.tls!r}")
        if (self.tls == "files") != (self.tls_files is not None):
            raise BrokerConfigError(
                "certificate files go with TLS mode 'files' (--tls-cert/--tls-key/--tls-ca) only"
            )
        if self.client_certs and self.tls != "lab":
            raise BrokerConfigError(
                "--client-certs issues client certificates from the lab CA: use it with --tls lab "
                "(with your own PKI, issue certificates whose CN is the username yourself)"
            )
        if not self.hostnames:
            raise BrokerConfigError("give at least one hostname or IP address the broker is reached at")
        for name in self.hostnames:
            check_hostname(name)
        if self.port is not None and not 1 <= self.port <= 65535:
            raise BrokerConfigError(f"port must be 1..65535, not {self.port}")
        if not 1 <= self.cert_days <= LAB_CA_DAYS:
            raise BrokerConfigError(
                f"certificate validity must be 1..{LAB_CA_DAYS} days, not {self.cert_days}"
            )
        if self.install_dir is not None and not self.install_dir.is_absolute():
            raise BrokerConfigError(f"--install-dir {self.install_dir} must be an absolute path")
        if self.broker_group is not None and not _CONF_VALUE.fullmatch(self.broker_group):
            raise BrokerConfigError(f"broker group {self.broker_group!r} is not a group name")

    @property
    def listener_port(self) -> int:
        if self.port is not None:
            return self.port
        return DEFAULT_PLAIN_PORT if self.tls == "none" else DEFAULT_TLS_PORT

    @property
    def broker_dir(self) -> Path:
        """Where the broker sees the output directory."""
        return self.install_dir if self.install_dir is not None else self.out_dir.resolve()


@dataclass(frozen=True)
class PrincipalFiles:
    """What one principal receives (paths relative to the output directory)."""

    name: str
    role: Role
    credentials: str
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class BrokerConfigResult:
    """What :func:`write_broker_config` wrote; :meth:`to_dict` is ``summary.json`` (no secrets)."""

    out_dir: Path
    fleet: str
    tls: TlsMode
    auth: Literal["password", "client-cert"]
    port: int
    bind: str | None
    broker_url: str
    conf: ListenerConf
    principals: tuple[PrincipalFiles, ...]
    files: dict[str, str]
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        limits = self.conf.limits
        return {
            "fleet": self.fleet,
            "out_dir": str(self.out_dir),
            "tls": self.tls,
            "auth": self.auth,
            "listener": {"port": self.port, "bind": self.bind, "tls": self.tls != "none"},
            "broker_url": self.broker_url,
            "files": dict(self.files),
            "limits": {
                "max_packet_size": limits.max_packet_size,
                "max_queued_messages": limits.max_queued_messages,
                "max_inflight_messages": limits.max_inflight_messages,
                "max_keepalive": limits.max_keepalive,
                "max_queued_bytes": limits.max_queued_bytes,
                "largest_blob": limits.largest_blob,
                "update_bytes": limits.update_bytes,
            },
            "principals": [{k: v for k, v in vars(p).items() if v is not None} for p in self.principals],
            "warnings": list(self.warnings),
        }


def write_broker_config(request: BrokerConfigRequest) -> BrokerConfigResult:
    """Generates the configuration directory ``request.out_dir``; returns what it wrote.

    Refuses a non-empty ``out_dir`` unless ``force`` (then it replaces only the entries it
    generates, :data:`GENERATED`, and leaves anything else alone). Nothing is written unless
    everything succeeded.
    """
    out = request.out_dir
    _check_out_dir(out, request.force)
    tls_files = _checked_tls_files(request.tls_files) if request.tls_files is not None else None
    warnings: list[str] = []
    if request.tls == "none":
        message = (
            "--no-tls: the broker listens WITHOUT TLS; passwords and all traffic cross the network in "
            "clear text. Use it on an isolated lab network only."
        )
        log.warning(message)
        warnings.append(message)
    gid = _group_id(request.broker_group) if request.broker_group is not None else None
    out.parent.mkdir(parents=True, exist_ok=True)
    with _staging(out) as stage:
        result = _generate(request, stage, tls_files, tuple(warnings))
        if gid is not None:
            _share_with_group(stage, gid, result)
        _move_into(stage, out, request.force)
    if gid is not None:
        _give_to_group(out, gid, 0o750)
    return result


def _generate(
    request: BrokerConfigRequest, stage: Path, tls_files: TlsFiles | None, warnings: tuple[str, ...]
) -> BrokerConfigResult:
    access = request.access
    home = request.broker_dir
    client_certs = request.client_certs
    url = broker_url(request.hostnames[0], request.listener_port, request.tls != "none")
    creds = stage / CREDENTIALS_DIR
    creds.mkdir(mode=0o700)
    files: dict[str, str] = {"conf": CONF_NAME, "acl": ACL_NAME, "summary": SUMMARY_NAME}
    principals: list[PrincipalFiles] = []
    broker_tls: TlsFiles | None = None
    ca_copy: str | None = None
    with tempfile.TemporaryDirectory(prefix="fedge-openssl-") as work:
        openssl = _OpenSSL(Path(work)) if request.tls == "lab" else None
        if openssl is not None:
            certs = stage / CERTS_DIR
            certs.mkdir(mode=0o755)
            ca = (certs / "ca.crt", certs / "ca.key")
            openssl.lab_ca(ca[1], ca[0], access.fleet)
            openssl.leaf(
                ca,
                certs / "server.key",
                certs / "server.crt",
                "fedge-broker",
                server_names=request.hostnames,
                days=request.cert_days,
            )
            names = {
                "ca": "ca.crt",
                "ca_key": "ca.key",
                "server_cert": "server.crt",
                "server_key": "server.key",
            }
            files.update({k: f"{CERTS_DIR}/{v}" for k, v in names.items()})
            broker_tls = TlsFiles(
                home / CERTS_DIR / "ca.crt", home / CERTS_DIR / "server.crt", home / CERTS_DIR / "server.key"
            )
            shutil.copyfile(ca[0], creds / "ca.crt")
        elif tls_files is not None:
            broker_tls = tls_files
            files.update(
                {
                    "ca": str(tls_files.ca),
                    "server_cert": str(tls_files.cert),
                    "server_key": str(tls_files.key),
                }
            )
            shutil.copyfile(tls_files.ca, creds / "ca.crt")
        if broker_tls is not None:
            os.chmod(creds / "ca.crt", 0o644)
            files["client_ca"] = f"{CREDENTIALS_DIR}/ca.crt"
            ca_copy = "ca.crt"

        hashes: list[tuple[str, str]] = []
        for principal in access.principals:
            cred_name = f"{CREDENTIALS_DIR}/{principal.name}.txt"
            if client_certs:
                assert openssl is not None  # client certificates need the lab CA (request checks)
                openssl.leaf(
                    (stage / CERTS_DIR / "ca.crt", stage / CERTS_DIR / "ca.key"),
                    creds / f"{principal.name}.key",
                    creds / f"{principal.name}.crt",
                    principal.name,
                    days=request.cert_days,
                )
                text = render_credentials(
                    principal,
                    access.fleet,
                    url,
                    cert_file=f"{principal.name}.crt",
                    key_file=f"{principal.name}.key",
                    ca_file=ca_copy,
                )
                principals.append(
                    PrincipalFiles(
                        principal.name,
                        principal.role,
                        cred_name,
                        f"{CREDENTIALS_DIR}/{principal.name}.crt",
                        f"{CREDENTIALS_DIR}/{principal.name}.key",
                    )
                )
            else:
                password = new_password()
                hashes.append((principal.name, hash_password(password)))
                text = render_credentials(principal, access.fleet, url, password=password, ca_file=ca_copy)
                principals.append(PrincipalFiles(principal.name, principal.role, cred_name))
            _write_new(stage / cred_name, text, 0o600)

    password_file: Path | None = None
    if not client_certs:
        _write_new(stage / PASSWD_NAME, render_passwd(hashes), 0o600)
        files["passwd"] = PASSWD_NAME
        password_file = home / PASSWD_NAME
    conf = ListenerConf(
        fleet=access.fleet,
        port=request.listener_port,
        acl_file=home / ACL_NAME,
        password_file=password_file,
        tls=broker_tls,
        client_certs=client_certs,
        bind=request.bind,
        persistence_dir=request.data_dir,
        limits=request.limits,
        log_file=request.log_file,
        run_as=request.run_as,
        bridge=request.bridge,
    )
    _write_new(stage / ACL_NAME, render_acl(access), 0o644)
    # A bridge's remote_password makes the configuration a secret.
    secret = request.bridge is not None and request.bridge.password is not None
    _write_new(stage / CONF_NAME, render_conf(conf), 0o600 if secret else 0o644)
    result = BrokerConfigResult(
        out_dir=request.out_dir,
        fleet=access.fleet,
        tls=request.tls,
        auth="client-cert" if client_certs else "password",
        port=request.listener_port,
        bind=request.bind,
        broker_url=url,
        conf=conf,
        principals=tuple(principals),
        files=files,
        warnings=warnings,
    )
    _write_new(stage / SUMMARY_NAME, json.dumps(result.to_dict(), indent=2) + "\n", 0o644)
    return result


def _check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BrokerConfigError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise BrokerConfigError(
            f"output directory {out} is not empty: use --force to replace the generated files"
        )


def _checked_tls_files(files: TlsFiles) -> TlsFiles:
    """The certificate files, made absolute, if each exists and looks like PEM."""
    checked = []
    for what, path, marker in (
        ("--tls-ca", files.ca, b"-----BEGIN CERTIFICATE-----"),
        ("--tls-cert", files.cert, b"-----BEGIN CERTIFICATE-----"),
        ("--tls-key", files.key, b"PRIVATE KEY-----"),
    ):
        try:
            head = path.read_bytes()[: 1 << 16]
        except FileNotFoundError:
            raise BrokerConfigError(f"{what} {path}: no such file") from None
        except OSError as exc:
            raise BrokerConfigError(f"{what} {path}: cannot read it ({exc.strerror})") from None
        if marker not in head:
            raise BrokerConfigError(f"{what} {path}: not a PEM file (no {marker.decode().strip('-')} block)")
        checked.append(path.resolve())
    return TlsFiles(*checked)


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A private (0700) directory next to ``out``, removed afterwards whatever happens."""
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _move_into(stage: Path, out: Path, force: bool) -> None:
    out.mkdir(mode=0o755, exist_ok=True)
    if force:
        for name in GENERATED:
            old = out / name
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            elif old.exists() or old.is_symlink():
                old.unlink()
    for entry in sorted(stage.iterdir()):
        os.replace(entry, out / entry.name)


def _write_new(path: Path, text: str, mode: int) -> None:
    """Creates ``path`` with ``mode`` whatever the umask, never over an existing file, and a
    secret is never briefly readable by others (:func:`fedge.shell.files.atomic_write`)."""
    atomic_write(path, text.encode("utf-8"), mode, replace=False)


def _group_id(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise BrokerConfigError(f"--broker-group {group!r}: no such group") from None


def _share_with_group(stage: Path, gid: int, result: BrokerConfigResult) -> None:
    """Makes what the broker reads readable by the group ``gid`` (0640, directories 0750).

    Started as root, mosquitto 2.0 drops to its own user *before* it reads the password file,
    the ACL and the TLS key, so those must be readable by that user. The CA key and the
    credentials stay owner-only.
    """
    shared = [(stage / result.files[key], 0o640) for key in ("conf", "acl", "passwd") if key in result.files]
    if result.tls == "lab":
        shared += [
            (stage / CERTS_DIR, 0o750),
            (stage / CERTS_DIR / "ca.crt", 0o644),
            (stage / CERTS_DIR / "server.crt", 0o644),
            (stage / CERTS_DIR / "server.key", 0o640),
        ]
    for path, mode in shared:
        _give_to_group(path, gid, mode)


def _give_to_group(path: Path, gid: int, mode: int) -> None:
    try:
        os.chown(path, -1, gid)
    except PermissionError:
        raise BrokerConfigError(
            f"--broker-group: not allowed to give {path} to group {gid} (run as root or as a member of it)"
        ) from None
    os.chmod(path, mode)


def load_device_ids(registry: Path) -> tuple[str, ...]:
    """The active devices of a device registry (``[devices] id = "public key"``), validated
    exactly as the aggregator validates it; revoked devices get no broker credentials."""
    from fedge.aggregator.registry import load_registry  # noqa: PLC0415 - pulls in PyNaCl: only when used

    return tuple(load_registry(registry))


# --- command line --------------------------------------------------------------------------------


def _split_names(values: Sequence[str] | None) -> tuple[str, ...]:
    names: list[str] = []
    for value in values or ():
        names.extend(part.strip() for part in value.split(",") if part.strip())
    return tuple(names)


def add_broker_parser(sub: Any) -> Any:
    """Adds ``fedge broker config`` to the subparsers ``sub`` of ``fedge``'s parser; returns the
    ``broker`` subparsers so further ``fedge broker`` commands can join it."""
    broker = sub.add_parser("broker", help="the MQTT broker: generate a secured Mosquitto configuration")
    broker_sub = broker.add_subparsers(dest="broker_command", metavar="SUBCOMMAND", required=True)
    cfg = broker_sub.add_parser(
        "config",
        help="write mosquitto.conf, ACL, password file, certificates and credentials for a fleet",
        description="Generates a Mosquitto 2.0 configuration directory for one fleet: TLS, one "
        "principal per connection (each device, its EdgeX-bus connection ID.edgex, the aggregator, "
        "BMS users), the client id tied to the username, and an ACL that lets each do only its "
        "part. See docs/broker-security.md.",
    )
    cfg.add_argument("--fleet", required=True, help="fleet id")
    devices = cfg.add_mutually_exclusive_group(required=True)
    devices.add_argument(
        "--device", action="append", metavar="ID", help="a device id (repeat, or comma-separated)"
    )
    devices.add_argument(
        "--registry", type=Path, metavar="FILE", help='device registry TOML ([devices] id = "public key")'
    )
    cfg.add_argument(
        "--aggregator", default=DEFAULT_AGGREGATOR, metavar="NAME",
        help=f"the aggregator's username (default {DEFAULT_AGGREGATOR})",
    )  # fmt: skip
    cfg.add_argument(
        "--bms", action="append", metavar="NAME", help="a read-only building-management-system user (repeat)"
    )
    cfg.add_argument(
        "--aggregator-worker", action="append", metavar="NAME",
        help="an aggregator worker's username = its [replicas] worker_id (repeat; docs/scale.md)",
    )  # fmt: skip
    cfg.add_argument(
        "--edgex-service", action="append", metavar="NAME",
        help="a user for EdgeX services sharing this broker: readwrite on PREFIX/# (repeat)",
    )  # fmt: skip
    cfg.add_argument(
        "--edgex-prefix", default=DEFAULT_EDGEX_PREFIX, metavar="PREFIX",
        help=f"EdgeX message-bus topic prefix (default {DEFAULT_EDGEX_PREFIX})",
    )  # fmt: skip
    cfg.add_argument(
        "--no-device-edgex", action="store_true",
        help=f"devices read EdgeX from another broker: no per-device ID{EDGEX_PRINCIPAL_SUFFIX} principals "
        "(by default each device's EdgeX-bus connection gets one, which alone reads its readings)",
    )  # fmt: skip
    cfg.add_argument(
        "--home-assistant", action="store_true",
        help="Home Assistant MQTT discovery (docs/home-assistant.md): each device may write its own "
        "discovery config, BMS users (--bms) read PREFIX/#",
    )  # fmt: skip
    cfg.add_argument(
        "--home-assistant-prefix", default=DEFAULT_HA_PREFIX, metavar="PREFIX",
        help=f"Home Assistant's discovery prefix (default {DEFAULT_HA_PREFIX})",
    )  # fmt: skip
    cfg.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    cfg.add_argument("--force", action="store_true", help="replace generated files in a non-empty DIR")
    tls = cfg.add_mutually_exclusive_group(required=True)
    tls.add_argument(
        "--tls", choices=["lab"], help="lab: make a CA and a server certificate (openssl) for --hostname"
    )
    tls.add_argument(
        "--tls-cert", type=Path, metavar="PEM", help="server certificate (with --tls-key, --tls-ca)"
    )
    tls.add_argument(
        "--no-tls",
        action="store_true",
        help="INSECURE: a plain listener; passwords cross the network in clear",
    )
    cfg.add_argument("--tls-key", type=Path, metavar="PEM", help="server private key (with --tls-cert)")
    cfg.add_argument(
        "--tls-ca", type=Path, metavar="PEM", help="CA certificate clients trust (with --tls-cert)"
    )
    cfg.add_argument(
        "--hostname", action="append", metavar="NAME",
        help="DNS name or IP clients use (repeat; lab: all go into the certificate; first one in URLs; "
        "default localhost and 127.0.0.1)",
    )  # fmt: skip
    cfg.add_argument(
        "--client-certs", action="store_true",
        help="authenticate with client certificates from the lab CA (CN = username) instead of passwords",
    )  # fmt: skip
    cfg.add_argument("--port", type=int, help="listener port (default 8883, or 1883 with --no-tls)")
    cfg.add_argument("--bind", metavar="ADDR", help="listen on this address only (default: all)")
    cfg.add_argument(
        "--install-dir", type=Path, metavar="DIR",
        help="where the broker will see DIR, if it is deployed elsewhere (default: DIR itself)",
    )  # fmt: skip
    cfg.add_argument(
        "--data-dir", type=Path, default=DEFAULT_DATA_DIR, metavar="DIR",
        help=f"mosquitto's persistence directory (default {DEFAULT_DATA_DIR})",
    )  # fmt: skip
    size = cfg.add_mutually_exclusive_group()
    size.add_argument(
        "--model-dir", type=Path, metavar="DIR", help="size limits from 'fedge model build' output"
    )
    size.add_argument("--max-blob-bytes", type=int, metavar="N", help="size limits from the largest blob")
    cfg.add_argument(
        "--max-packet-size", type=int, metavar="BYTES", help="override: 2 x largest blob + 64 KiB"
    )
    cfg.add_argument(
        "--max-queued-messages", type=int, metavar="N",
        help=f"override: {QUEUED_PER_DEVICE} per device, at least {MIN_QUEUED_MESSAGES}",
    )  # fmt: skip
    cfg.add_argument(
        "--max-queued-bytes", type=int, metavar="BYTES",
        help=f"override: per device {QUEUED_SEALED_PER_DEVICE} updates + {QUEUED_PER_DEVICE} statuses, "
        f"at least {MIN_QUEUED_BYTES // MIB} MiB (0 = unlimited)",
    )  # fmt: skip
    cfg.add_argument("--max-inflight-messages", type=int, default=DEFAULT_MAX_INFLIGHT, metavar="N")
    cfg.add_argument("--max-keepalive", type=int, default=DEFAULT_MAX_KEEPALIVE, metavar="SECONDS")
    cfg.add_argument("--cert-days", type=int, default=DEFAULT_CERT_DAYS, help="lab certificate validity")
    cfg.add_argument("--log-file", type=Path, metavar="PATH", help="mosquitto log file (default: stderr)")
    cfg.add_argument("--run-as", metavar="USER", help="mosquitto's `user` option (default: mosquitto's own)")
    cfg.add_argument(
        "--broker-group", metavar="GROUP",
        help="make the files mosquitto reads readable by GROUP (e.g. mosquitto), mode 0640",
    )  # fmt: skip
    bridge = cfg.add_argument_group(
        "two-tier aggregation: this building broker's bridge to its campus broker"
    )
    bridge.add_argument("--bridge-to", metavar="HOST:PORT", help="the campus broker (docs/scale.md)")
    bridge.add_argument("--campus-fleet", metavar="ID", help="the campus aggregator's fleet id")
    bridge.add_argument("--building-id", metavar="ID", help="this building's device id in the campus fleet")
    bridge.add_argument(
        "--bridge-password-file", type=Path, metavar="FILE",
        help="the building's password on the campus broker (its credentials file there)",
    )  # fmt: skip
    bridge.add_argument("--bridge-ca", type=Path, metavar="FILE", help="the campus broker's CA: TLS to it")
    cfg.add_argument("--json", action="store_true", help="print the summary as JSON")
    cfg.set_defaults(func=cmd_broker_config)
    return broker_sub


def _bridge_from_args(args: argparse.Namespace) -> Bridge | None:
    named = (args.campus_fleet, args.building_id, args.bridge_password_file, args.bridge_ca)
    if args.bridge_to is None:
        if any(v is not None for v in named):
            raise BrokerConfigError(
                "--campus-fleet, --building-id, --bridge-password-file and --bridge-ca go with --bridge-to"
            )
        return None
    if args.campus_fleet is None or args.building_id is None:
        raise BrokerConfigError("--bridge-to needs --campus-fleet and --building-id")
    password = None
    if args.bridge_password_file is not None:
        try:
            password = args.bridge_password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise BrokerConfigError(
                f"cannot read --bridge-password-file {args.bridge_password_file}: {exc.strerror}"
            ) from None
    ca = args.bridge_ca.resolve() if args.bridge_ca is not None else None
    return Bridge(args.bridge_to, args.campus_fleet, args.building_id, password, ca)


def request_from_args(args: argparse.Namespace) -> BrokerConfigRequest:
    """The :class:`BrokerConfigRequest` of parsed ``fedge broker config`` arguments."""
    device_ids = load_device_ids(args.registry) if args.registry is not None else _split_names(args.device)
    access = FleetAccess(
        fleet=args.fleet,
        devices=device_ids,
        aggregator=args.aggregator,
        bms=_split_names(args.bms),
        workers=_split_names(args.aggregator_worker),
        edgex_services=_split_names(args.edgex_service),
        edgex_prefix=args.edgex_prefix,
        device_edgex=not args.no_device_edgex,
        home_assistant_prefix=args.home_assistant_prefix if args.home_assistant else None,
        upstream=(args.campus_fleet, args.building_id) if args.bridge_to else None,
    )
    tls_files: TlsFiles | None = None
    if args.tls_cert is not None:
        if args.tls_key is None or args.tls_ca is None:
            raise BrokerConfigError("--tls-cert needs --tls-key and --tls-ca")
        tls_files = TlsFiles(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)
        mode: TlsMode = "files"
    elif args.tls_key is not None or args.tls_ca is not None:
        raise BrokerConfigError("--tls-key and --tls-ca go with --tls-cert")
    else:
        mode = "none" if args.no_tls else "lab"
    largest = largest_blob_in(args.model_dir) if args.model_dir is not None else args.max_blob_bytes
    limits = BrokerLimits.for_fleet(
        len(access.devices),
        largest,
        max_packet_size=args.max_packet_size,
        max_queued_messages=args.max_queued_messages,
        max_inflight_messages=args.max_inflight_messages,
        max_keepalive=args.max_keepalive,
        update_bytes=update_bytes_in(args.model_dir) if args.model_dir is not None else None,
        max_queued_bytes=args.max_queued_bytes,
    )
    return BrokerConfigRequest(
        bridge=_bridge_from_args(args),
        access=access,
        out_dir=args.out,
        tls=mode,
        hostnames=_split_names(args.hostname) or DEFAULT_HOSTNAMES,
        tls_files=tls_files,
        client_certs=args.client_certs,
        port=args.port,
        bind=args.bind,
        install_dir=args.install_dir,
        data_dir=args.data_dir,
        limits=limits,
        log_file=args.log_file,
        run_as=args.run_as,
        broker_group=args.broker_group,
        cert_days=args.cert_days,
        force=args.force,
    )


def render_summary(result: BrokerConfigResult) -> str:
    """A few lines for people: where things are and who got what (no secrets)."""
    lines = [
        f"broker configuration for fleet {result.fleet!r} in {result.out_dir}",
        f"  listener: {result.broker_url} ({'TLS ' + result.tls if result.tls != 'none' else 'NO TLS'}, "
        f"{result.auth} authentication)",
        f"  run:      mosquitto -c {result.conf.acl_file.parent / CONF_NAME}",
    ]
    for p in result.principals:
        lines.append(f"  {p.role:<12} {p.name:<24} {p.credentials}")
    lines.extend(f"warning: {w}" for w in result.warnings)
    return "\n".join(lines)


def cmd_broker_config(args: argparse.Namespace) -> int:
    """``fedge broker config``: 0 on success; bad input raises :class:`BrokerConfigError`."""
    result = write_broker_config(request_from_args(args))
    print(json.dumps(result.to_dict()) if args.json else render_summary(result))
    return 0
