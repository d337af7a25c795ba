"""The aggregator's configuration: a TOML file overlaid with ``FEDGE_AGGREGATOR__*`` variables.

Relative paths are resolved against the config file's directory, so a config and its keys can
be moved together (a Kubernetes ConfigMap and Secret, a demo's output directory).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedge.aggregator.leader_config import (
    LEADER_KEYS,
    LEADER_OFF,
    SA_NAMESPACE_FILE,
    LeaderSettings,
    leader_settings_from_table,
)
from fedge.aggregator.privacy_config import (
    PRIVACY_KEYS,
    PRIVACY_OFF,
    PrivacySettings,
    privacy_settings_from_table,
)
from fedge.aggregator.replica_config import (
    REPLICA_KEYS,
    REPLICAS_OFF,
    ReplicaSettings,
    check_replicable,
    replica_settings_from_table,
)
from fedge.aggregator.rollout import (
    ROLLOUT_DEFAULT,
    ROLLOUT_KEYS,
    RolloutSettings,
    rollout_settings_from_table,
)
from fedge.aggregator.upstream_config import (
    UPSTREAM_KEYS,
    UPSTREAM_OFF,
    UpstreamSettings,
    upstream_settings_from_table,
)
from fedge.protocol.chunks import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES
from fedge.protocol.codec import Codec
from fedge.protocol.codec_names import DEFAULT_TOPK_FRACTION, MAX_TOPK_FRACTION, MIN_TOPK_FRACTION
from fedge.protocol.config_source import MAX_CONFIG_BYTES, ConfigError, Table, config_document
from fedge.protocol.metrics_settings import (
    AGGREGATOR_METRICS_PORT,
    METRICS_KEYS,
    METRICS_OFF,
    MetricsSettings,
    metrics_settings_from_table,
)
from fedge.protocol.mqtt_settings import MQTT_KEYS, MqttSettings, mqtt_settings_from_table
from fedge.protocol.round_manifest import MAX_BUFFER_SIZE, MAX_STALENESS
from fedge.protocol.strategy_announcement import ADAPTIVE_OPTIMIZERS, ROBUST_STRATEGIES, STRATEGIES
from fedge.protocol.topics import TopicError, check_id
from fedge.shell.files import read_config_file

ENV_PREFIX = "FEDGE_AGGREGATOR"


log = logging.getLogger("fedge.aggregator")


#: ``[rounds] weighting``: how much each accepted update counts in the mean.
WEIGHTINGS = ("equal", "examples")
#: ``[rounds] aggregation``: synchronous rounds, or buffered asynchronous aggregation (docs/async.md).
AGGREGATIONS = ("sync", "async")
#: ``[rounds] moments_aggregation``: how devices' feature moments become the normalisation.
MOMENTS_AGGREGATIONS = ("robust", "pooled")


@dataclass(frozen=True)
class RoundSettings:
    """The ``[rounds]`` table. The defaults here are the deployment defaults (what a fleet gets
    with an empty table); tests construct ``RoundSettings()`` to get exactly them.

    One device's influence on a round is bounded by default, because a device's key can be
    stolen (SECURITY.md): every accepted update counts once (``weighting = "equal"``), its L2
    norm is clipped to the smallest of three bounds (absolute, relative to the model, relative
    to the previous round's median update), and feature moments are aggregated robustly
    (outlying device means excluded per feature, variances capped).
    """

    rounds: int = 20
    min_devices: int = 2
    devices_per_round: int = 0  # 0 = every enrolled device
    round_timeout_s: float = 60.0
    server_learning_rate: float = 1.0
    codec: Codec = Codec.FP32
    #: With a sparse codec (``topk-fp16``, ``topk-int8``): the share of each tensor's values an
    #: update carries (announced in the manifest); ignored with a dense codec.
    topk_fraction: float = DEFAULT_TOPK_FRACTION
    #: A sanity bound on the example count a device claims (larger claims are rejected).
    max_examples_per_update: int = 1_000_000
    #: Largest sealed message accepted; 0 derives it from the model: the round codec's encoded
    #: size plus room for headers (``fedge.protocol.messages.max_sealed_bytes``), ~26 KB for har-watch.
    max_update_bytes: int = 0
    manifest_ttl_s: float = 24 * 3600.0
    wait_for_devices_s: float = 30.0
    selection_seed: int = 0
    #: "equal": every accepted update counts once, so a device's share of a round is 1/n whatever
    #: it claims. "examples": FedAvg's weighting by claimed example count, each claim capped at
    #: ``example_cap_ratio`` x the median claim of the previous round (equal weights in a round
    #: with no earlier claims).
    weighting: str = "equal"
    example_cap_ratio: float = 1.0
    #: Norm bounds (0 turns one off): an update whose L2 norm exceeds the smallest is clipped to
    #: it. ``max_update_norm`` is absolute; ``update_norm_ratio`` x the larger of the global and
    #: the initial model's norm (never below the ratio itself, so a zeroed model keeps a bound);
    #: ``update_norm_adaptive`` x the median norm of the updates of the previous train round
    #: (honest har-watch updates: 0.05-0.35 x the model's norm, shrinking as training converges).
    max_update_norm: float = 0.0
    update_norm_ratio: float = 0.5
    update_norm_adaptive: float = 1.0
    #: "clip" or "reject" an update over the static bound (absolute or ratio); the adaptive
    #: bound only ever clips (it sits at the median honest norm, so half the updates reach it).
    update_norm_policy: str = "clip"
    moments_aggregation: str = "robust"
    #: How a train round's updates become the next model (docs/strategies.md): "fedavg" (the
    #: mean), a server optimizer on the mean ("fedavgm", "fedadagrad", "fedadam", "fedyogi")
    #: or a robust aggregator ("median", "trimmed_mean", "krum", "multi_krum").
    strategy: str = "fedavg"
    #: FedAvgM: ``m = server_momentum * m + mean``.
    server_momentum: float = 0.9
    #: FedAdagrad/FedAdam/FedYogi: the first moment's decay (``m = b1 m + (1 - b1) mean``).
    server_beta1: float = 0.9
    #: FedAdam/FedYogi: the second moment's decay.
    server_beta2: float = 0.99
    #: FedAdagrad/FedAdam/FedYogi: the adaptivity ``tau`` (``step = lr m / (sqrt(v) + tau)``).
    server_tau: float = 1e-3
    #: "trimmed_mean": the fraction of values dropped from each end, per coordinate.
    trim_fraction: float = 0.1
    #: "krum"/"multi_krum": ``f``, the Byzantine devices assumed among a round's updates.
    byzantine_devices: int = 1
    #: "multi_krum": how many of the best-scored updates are averaged; 0 = ``n - f``.
    multi_krum_select: int = 0
    #: Robust strategies hold every update of a round: at most this many (more are refused,
    #: ``too_many_updates``).
    robust_max_updates: int = 1000
    #: "sync": a round waits for every selected device (or its deadline). "async": buffered
    #: asynchronous aggregation (FedBuff, docs/async.md): updates trained from any of the last
    #: ``max_staleness`` versions are folded as they arrive, weighted down by staleness, and a
    #: new version is published every ``buffer_size`` accepted updates.
    aggregation: str = "sync"
    #: "async": K, the accepted updates that publish a new version.
    buffer_size: int = 3
    #: "async": S, how many versions behind the newest an update's base version may be.
    max_staleness: int = 4

    @property
    def asynchronous(self) -> bool:
        """Buffered asynchronous aggregation (``aggregation = "async"``)."""
        return self.aggregation == "async"

    @property
    def robust(self) -> bool:
        """A robust aggregator: needs every update individually (no DP, no secure aggregation)."""
        return self.strategy in ROBUST_STRATEGIES

    @property
    def norm_unbounded(self) -> bool:
        return (
            self.max_update_norm == 0.0 and self.update_norm_ratio == 0.0 and self.update_norm_adaptive == 0.0
        )


@dataclass(frozen=True)
class AggregatorConfig:
    fleet: str
    model_dir: Path
    state_dir: Path
    registry_file: Path
    box_key_file: Path
    signing_key_file: Path
    exit_when_done: bool
    mqtt: MqttSettings
    rounds: RoundSettings
    # Touched by the main loop (also while a follower waits) so a liveness probe can tell a
    # hung loop from a busy one; None: <state_dir>/heartbeat.
    heartbeat_file: Path | None = None
    leader: LeaderSettings = LEADER_OFF
    #: Bumped by the operator to roll a running fleet to a new model or task (the checkpoint
    #: of the previous generation is continued, not refused): docs/own-data.md.
    model_generation: int = 1
    #: ``[metrics]``: Prometheus metrics and health endpoints (off by default; docs/metrics.md).
    metrics: MetricsSettings = METRICS_OFF
    #: ``[privacy]``: client-level differential privacy (off by default; docs/differential-privacy.md).
    privacy: PrivacySettings = PRIVACY_OFF
    #: ``[replicas]``: a leader and workers sharing the fleet's updates (off by default; docs/scale.md).
    replicas: ReplicaSettings = REPLICAS_OFF
    #: ``[upstream]``: this aggregator is a building gateway under a campus (off by default; docs/scale.md).
    upstream: UpstreamSettings = UPSTREAM_OFF
    #: ``[rollout]``: the gate between a new global model and the devices' predictions (docs/rollout.md).
    rollout: RolloutSettings = ROLLOUT_DEFAULT

    #: Chunked transfers (docs/protocol.md, "Chunked transfers"): a blob over ``chunk_bytes`` is
    #: published in pieces, and a device's update pieces are taken up to that size; at most
    #: ``chunk_transfers_per_device`` updates of one device and ``chunk_budget_bytes`` in all
    #: are put together at once.
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    chunk_transfers_per_device: int = 2
    chunk_budget_bytes: int = 128 * 1024 * 1024

    @property
    def heartbeat_path(self) -> Path:
        return self.heartbeat_file if self.heartbeat_file is not None else self.state_dir / "heartbeat"


ROUND_KEYS = {
    "rounds",
    "min_devices",
    "devices_per_round",
    "round_timeout_s",
    "server_learning_rate",
    "codec",
    "topk_fraction",
    "max_examples_per_update",
    "max_update_bytes",
    "manifest_ttl_s",
    "wait_for_devices_s",
    "selection_seed",
    "weighting",
    "example_cap_ratio",
    "max_update_norm",
    "update_norm_ratio",
    "update_norm_adaptive",
    "update_norm_policy",
    "moments_aggregation",
    "strategy",
    "server_momentum",
    "server_beta1",
    "server_beta2",
    "server_tau",
    "trim_fraction",
    "byzantine_devices",
    "multi_krum_select",
    "robust_max_updates",
    "aggregation",
    "buffer_size",
    "max_staleness",
}
AGGREGATOR_KEYS = {
    "fleet",
    "model_dir",
    "model_generation",
    "state_dir",
    "registry",
    "box_key_file",
    "signing_key_file",
    "exit_when_done",
    "heartbeat_file",
    "chunk_bytes",
    "chunk_transfers_per_device",
    "chunk_budget_bytes",
}
#: Every table of aggregator.toml and the keys it accepts (any other is an error); what
#: docs/configuration.md and ``fedge aggregator config --example`` must list (their tests check it).
AGGREGATOR_TABLES: dict[str, set[str]] = {
    "aggregator": AGGREGATOR_KEYS,
    "leader": LEADER_KEYS,
    "metrics": METRICS_KEYS,
    "mqtt": MQTT_KEYS,
    "privacy": PRIVACY_KEYS,
    "replicas": REPLICA_KEYS,
    "rollout": ROLLOUT_KEYS,
    "rounds": ROUND_KEYS,
    "upstream": UPSTREAM_KEYS,
}


def round_settings_from_table(r: Table) -> RoundSettings:
    """``[rounds]``, every key optional (defaults: :class:`RoundSettings`), every value checked.

    Settings that remove a bound on one device's influence are allowed, but each logs a
    warning naming what a single compromised device can then do.
    """
    d = RoundSettings()
    rounds = RoundSettings(
        rounds=r.integer("rounds", d.rounds, 1, 1_000_000),
        min_devices=r.integer("min_devices", d.min_devices, 1, 1_000_000),
        devices_per_round=r.integer("devices_per_round", d.devices_per_round, 0, 1_000_000),
        round_timeout_s=r.number("round_timeout_s", d.round_timeout_s, 0.1, 7 * 24 * 3600.0),
        server_learning_rate=r.number("server_learning_rate", d.server_learning_rate, 1e-6, 100.0),
        codec=Codec(r.choice("codec", d.codec.value, tuple(c.value for c in Codec))),
        topk_fraction=r.number("topk_fraction", d.topk_fraction, MIN_TOPK_FRACTION, MAX_TOPK_FRACTION),
        max_examples_per_update=r.integer("max_examples_per_update", d.max_examples_per_update, 1, 2**31 - 1),
        max_update_bytes=_zero_or_at_least(
            r,
            "max_update_bytes",
            r.integer("max_update_bytes", d.max_update_bytes, 0, 256 * 1024 * 1024),
            1024,
        ),
        manifest_ttl_s=r.number("manifest_ttl_s", d.manifest_ttl_s, 1.0, 365 * 24 * 3600.0),
        wait_for_devices_s=r.number("wait_for_devices_s", d.wait_for_devices_s, 0.0, 24 * 3600.0),
        selection_seed=r.integer("selection_seed", d.selection_seed, 0, 2**31 - 1),
        weighting=r.choice("weighting", d.weighting, WEIGHTINGS),
        example_cap_ratio=r.number("example_cap_ratio", d.example_cap_ratio, 0.01, 1000.0),
        max_update_norm=r.number("max_update_norm", d.max_update_norm, 0.0, 1e12),
        update_norm_ratio=r.number("update_norm_ratio", d.update_norm_ratio, 0.0, 1e6),
        update_norm_adaptive=r.number("update_norm_adaptive", d.update_norm_adaptive, 0.0, 1e6),
        update_norm_policy=r.choice("update_norm_policy", d.update_norm_policy, ("clip", "reject")),
        moments_aggregation=r.choice("moments_aggregation", d.moments_aggregation, MOMENTS_AGGREGATIONS),
        strategy=r.choice("strategy", d.strategy, STRATEGIES),
        server_momentum=r.number("server_momentum", d.server_momentum, 0.0, 0.999),
        server_beta1=r.number("server_beta1", d.server_beta1, 0.0, 0.999),
        server_beta2=r.number("server_beta2", d.server_beta2, 0.0, 0.999999),
        server_tau=r.number("server_tau", d.server_tau, 1e-9, 10.0),
        trim_fraction=r.number("trim_fraction", d.trim_fraction, 0.0, 0.49),
        byzantine_devices=r.integer("byzantine_devices", d.byzantine_devices, 0, 100_000),
        multi_krum_select=r.integer("multi_krum_select", d.multi_krum_select, 0, 1_000_000),
        robust_max_updates=r.integer("robust_max_updates", d.robust_max_updates, 1, 1_000_000),
        aggregation=r.choice("aggregation", d.aggregation, AGGREGATIONS),
        buffer_size=r.integer("buffer_size", d.buffer_size, 1, MAX_BUFFER_SIZE),
        max_staleness=r.integer("max_staleness", d.max_staleness, 0, MAX_STALENESS),
    )
    _check_strategy(rounds)
    if rounds.asynchronous and rounds.robust:
        raise ConfigError(
            f'[rounds] strategy = "{rounds.strategy}" needs a cohort of updates side by side: use '
            'aggregation = "sync", or strategy "fedavg" or a server optimizer with "async" (docs/async.md)'
        )
    if rounds.asynchronous and rounds.buffer_size < rounds.min_devices:
        raise ConfigError(
            f"[rounds] buffer_size={rounds.buffer_size} is below min_devices={rounds.min_devices}: every "
            "buffer would be aborted (raise buffer_size or lower min_devices)"
        )
    if rounds.norm_unbounded:
        log.warning(
            "[rounds] update norms are unbounded (max_update_norm, update_norm_ratio and "
            "update_norm_adaptive are all 0): one device can replace the global model"
        )
    if rounds.moments_aggregation == "pooled":
        log.warning(
            '[rounds] moments_aggregation = "pooled": one device\'s moments can move the feature '
            'normalisation without bound (use "robust")'
        )
    if 0 < rounds.devices_per_round < rounds.min_devices:
        raise ConfigError(
            f"[rounds] devices_per_round={rounds.devices_per_round} is below min_devices="
            f"{rounds.min_devices}: every round would be aborted"
        )
    return rounds


def _check_strategy(s: RoundSettings) -> None:
    """Refuses a ``[rounds] strategy`` no round could aggregate with; warns about a server
    learning rate an adaptive optimizer is unlikely to train with."""
    name = s.strategy
    if s.robust and s.weighting != "equal":
        raise ConfigError(f'[rounds] strategy = "{name}" counts every update once: set weighting = "equal"')
    if s.robust and s.robust_max_updates < s.min_devices:
        raise ConfigError(
            f"[rounds] robust_max_updates={s.robust_max_updates} is below min_devices={s.min_devices}: "
            "every round would be aborted"
        )
    krum_needs = 2 * s.byzantine_devices + 3
    if name in ("krum", "multi_krum") and s.min_devices < krum_needs:
        raise ConfigError(
            f'[rounds] strategy = "{name}" with byzantine_devices = {s.byzantine_devices} needs '
            f"min_devices >= {krum_needs} (Krum needs n > 2f + 2 updates)"
        )
    if name in ADAPTIVE_OPTIMIZERS and s.server_learning_rate > 0.1:
        log.warning(
            '[rounds] strategy = "%s" with server_learning_rate = %g: an adaptive server optimizer '
            "moves each weight by up to about server_learning_rate per round; 0.01-0.1 is typical "
            "(docs/strategies.md)",
            name,
            s.server_learning_rate,
        )


def check_asynchronous(
    rounds: RoundSettings, privacy: PrivacySettings, replicas: bool, upstream: bool
) -> None:
    """``aggregation = "async"`` runs alone: secure aggregation masks a cohort's updates
    together (no cohort, no mask), differential privacy accounts rounds of sampled devices,
    and replicas and building gateways split or forward a round's cohort (docs/async.md)."""
    if not rounds.asynchronous:
        return
    if privacy.secure_aggregation:
        raise ConfigError(
            '[rounds] aggregation = "async" cannot run with [privacy] secure_aggregation (its masks need '
            'a cohort of devices): use aggregation = "sync" (docs/async.md)'
        )
    if privacy.enabled:
        raise ConfigError(
            '[rounds] aggregation = "async" cannot run with [privacy] differential privacy (its accounting '
            'needs sampled rounds): use aggregation = "sync" (docs/async.md)'
        )
    if replicas or upstream:
        table = "[replicas]" if replicas else "[upstream]"
        raise ConfigError(
            f'[rounds] aggregation = "async" cannot run with {table} (they split or forward a round\'s '
            f'cohort): turn {table} off or use aggregation = "sync" (docs/async.md)'
        )


def _zero_or_at_least(r: Table, key: str, value: int, low: int) -> int:
    if 0 < value < low:
        raise ConfigError(
            f"[{r.name}] {key} must be 0 (derived from the model) or at least {low}, got {value}"
        )
    return value


def load_aggregator_config(
    path: Path, env: Mapping[str, str], sa_namespace_file: Path = SA_NAMESPACE_FILE
) -> AggregatorConfig:
    data = config_document(*read_config_file(path, MAX_CONFIG_BYTES, "config"), path, env, ENV_PREFIX)
    unknown = sorted(set(data) - set(AGGREGATOR_TABLES))
    if unknown:
        raise ConfigError(f"{path}: unknown tables {unknown}; allowed: {', '.join(AGGREGATOR_TABLES)}")
    base = path.parent
    agg = Table(data, "aggregator", AGGREGATOR_KEYS)
    try:
        fleet = check_id(agg.text("fleet"), "fleet id")
    except TopicError as exc:
        raise ConfigError(f"[aggregator] fleet: {exc}") from None
    rounds = round_settings_from_table(Table(data, "rounds", ROUND_KEYS))
    leader = leader_settings_from_table(Table(data, "leader", LEADER_KEYS), env, sa_namespace_file)
    heartbeat = agg.opt_text("heartbeat_file")
    privacy = privacy_settings_from_table(Table(data, "privacy", PRIVACY_KEYS), rounds)
    replicas = replica_settings_from_table(Table(data, "replicas", REPLICA_KEYS), env)
    check_replicable(replicas, rounds.strategy, rounds.robust, privacy.enabled, privacy.secure_aggregation)
    upstream = upstream_settings_from_table(Table(data, "upstream", UPSTREAM_KEYS), base)
    check_asynchronous(rounds, privacy, replicas.enabled, upstream.enabled)
    if upstream.enabled and (replicas.enabled or privacy.secure_aggregation):
        raise ConfigError(
            "[upstream] (a building gateway) runs without [replicas] and without secure_aggregation: "
            "turn those off on the building (docs/scale.md)"
        )
    return AggregatorConfig(
        fleet=fleet,
        model_dir=base / agg.text("model_dir"),
        state_dir=base / agg.text("state_dir"),
        registry_file=base / agg.text("registry"),
        box_key_file=base / agg.text("box_key_file"),
        signing_key_file=base / agg.text("signing_key_file"),
        exit_when_done=agg.flag("exit_when_done", False),
        chunk_bytes=agg.integer("chunk_bytes", DEFAULT_CHUNK_BYTES, MIN_CHUNK_BYTES, MAX_CHUNK_BYTES),
        chunk_transfers_per_device=agg.integer("chunk_transfers_per_device", 2, 1, 64),
        chunk_budget_bytes=agg.integer("chunk_budget_bytes", 128 * 1024 * 1024, 1024 * 1024, 64 * 1024**3),
        mqtt=mqtt_settings_from_table(
            Table(data, "mqtt", MQTT_KEYS), f"fedge-aggregator-{fleet}", str(base), read_config_file
        ),
        rounds=rounds,
        heartbeat_file=base / heartbeat if heartbeat else None,
        leader=leader,
        model_generation=agg.integer("model_generation", 1, 1, 1_000_000),
        metrics=metrics_settings_from_table(Table(data, "metrics", METRICS_KEYS), AGGREGATOR_METRICS_PORT),
        privacy=privacy,
        replicas=replicas,
        upstream=upstream,
        rollout=rollout_settings_from_table(Table(data, "rollout", ROLLOUT_KEYS), base),
    )
