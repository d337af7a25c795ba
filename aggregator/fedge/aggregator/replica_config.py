"""The aggregator's ``[replicas]`` table: a leader and workers sharing one fleet's updates.

With ``enabled``, the leader subscribes to ``update/+`` through the MQTT shared subscription
``$share/{share_group}/...`` (Mosquitto 2, EMQX, HiveMQ and VerneMQ serve it), and so does every
process started with ``role = "worker"``: the broker hands each update to one member. Workers
fold what they get and send the leader partial aggregates (:mod:`fedge.aggregator.partials`);
the leader alone checkpoints, aggregates and publishes (docs/scale.md).

Kept apart from :mod:`fedge.aggregator.config` because the worker id comes from the pod's or
host's name, which the rest of the config never looks at.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from fedge.protocol.config_source import ConfigError, Table
from fedge.protocol.topics import TopicError, check_id

REPLICA_KEYS = {
    "enabled",
    "role",
    "worker_id",
    "share_group",
    "flush_updates",
    "flush_interval_s",
    "partial_grace_s",
}
ROLES = ("leader", "worker")
DEFAULT_SHARE_GROUP = "fedge-aggregators"


@dataclass(frozen=True)
class ReplicaSettings:
    enabled: bool = False
    #: ``leader``: runs the rounds (and, with election on, campaigns for them); ``worker``:
    #: folds a share of the updates and sends partials to the leader.
    role: str = "leader"
    #: A worker's name on ``aggregator/partial/{worker_id}`` and in its MQTT client id, which
    #: must be stable across restarts (a StatefulSet's pod name): a restarted worker resumes its
    #: broker session and gets back the updates it had not acknowledged.
    worker_id: str = ""
    share_group: str = DEFAULT_SHARE_GROUP
    #: A worker sends a partial once it folded this many updates ...
    flush_updates: int = 64
    #: ... or this long after the first update of the batch, whichever comes first.
    flush_interval_s: float = 0.2
    #: How long past a round's deadline the leader waits for partials of updates its workers
    #: accepted in time.
    partial_grace_s: float = 2.0

    @property
    def worker(self) -> bool:
        return self.enabled and self.role == "worker"


REPLICAS_OFF = ReplicaSettings()


def replica_settings_from_table(
    t: Table, env: Mapping[str, str], hostname: Callable[[], str] = socket.gethostname
) -> ReplicaSettings:
    """Parses and validates ``[replicas]``; every key is checked even when it is off."""
    enabled = t.flag("enabled", False)
    role = t.choice("role", "leader", ROLES)
    group = t.text("share_group", DEFAULT_SHARE_GROUP)
    flush_updates = t.integer("flush_updates", 64, 1, 10_000)
    flush_interval = t.number("flush_interval_s", 0.2, 0.01, 60.0)
    grace = t.number("partial_grace_s", 2.0, 0.0, 600.0)
    worker_id = t.opt_text("worker_id") or env.get("POD_NAME") or hostname()
    try:
        check_id(group, "share group")
        check_id(worker_id, "worker id")
    except TopicError as exc:
        raise ConfigError(f"[replicas] {exc}") from None
    if role == "worker" and not enabled:
        raise ConfigError('[replicas] role = "worker" needs enabled = true')
    if enabled and grace < 2 * flush_interval:
        raise ConfigError(
            f"[replicas] partial_grace_s ({grace:g}) must be at least twice flush_interval_s "
            f"({flush_interval:g}): a worker's last partial of a round must reach the leader in it"
        )
    if not enabled:
        return REPLICAS_OFF
    return ReplicaSettings(
        enabled=enabled,
        role=role,
        worker_id=worker_id,
        share_group=group,
        flush_updates=flush_updates,
        flush_interval_s=flush_interval,
        partial_grace_s=grace,
    )


def check_replicable(
    replicas: ReplicaSettings, strategy: str, robust: bool, privacy: bool, secure: bool
) -> None:
    """Replicas run FedAvg and the server optimizers in plain rounds (their folds are sums that
    add up across processes); anything else is a one-line ``ConfigError`` with the fix."""
    if not replicas.enabled:
        return
    if robust:
        raise ConfigError(
            f'[replicas] cannot run [rounds] strategy = "{strategy}": a robust strategy needs every update '
            "in one process; use fedavg or a server optimizer, or turn [replicas] off"
        )
    if secure:
        raise ConfigError(
            "[replicas] cannot run with [privacy] secure_aggregation: one process runs a secure round's "
            "unmasking; turn one of them off"
        )
    if privacy:
        raise ConfigError(
            "[replicas] cannot run with [privacy] enabled: differential privacy's noise and accountant "
            "belong to one process; turn one of them off"
        )
