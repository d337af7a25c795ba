"""The agent's configuration: a TOML file overlaid with ``FEDGE_AGENT__*`` variables.

The aggregator's keys are pinned here at provisioning: its X25519 public key (updates are
sealed to it) and its Ed25519 verify keys (manifests must be signed by one of them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from nacl.public import PublicKey
from nacl.signing import VerifyKey

from fedge.protocol.chunks import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES
from fedge.protocol.config_source import MAX_CONFIG_BYTES, ConfigError, Table, config_document
from fedge.protocol.errors import FedgeError
from fedge.protocol.home_assistant import check_prefix
from fedge.protocol.metrics_settings import (
    AGENT_METRICS_PORT,
    METRICS_KEYS,
    METRICS_OFF,
    MetricsSettings,
    metrics_settings_from_table,
)
from fedge.protocol.mqtt_settings import MQTT_KEYS, MqttSettings, mqtt_settings_from_table
from fedge.protocol.sealing import public_key_from_text
from fedge.protocol.signing import key_id, verify_key_from_text
from fedge.protocol.topics import check_id
from fedge.shell.files import read_config_file

ENV_PREFIX = "FEDGE_AGENT"


#: ``[data] source``: EdgeX's bus and core-data (the product), a CSV file of readings on the
#: device (``fedge.agent.csv_source``), or the recorded smartwatch data set (lab and tests only).
DATA_SOURCES = ("edgex", "csv", "har-watch")


@dataclass(frozen=True)
class DataSettings:
    source: str  # one of DATA_SOURCES
    subject: int
    holdout_fraction: float
    seed: int
    task_file: Path | None  # the task this device was provisioned for (features, label)
    #: ``source = "csv"``: the file of readings (``docs/own-data.md``), relative to the config.
    csv_file: Path | None = None


@dataclass(frozen=True)
class EdgeXSettings:
    """Where the device's readings come from: EdgeX's message bus, and core-data for backfill."""

    bus: MqttSettings
    prefix: str
    device: str
    profile_file: Path | None
    core_data_url: str | None
    token_file: Path | None
    store_max_samples: int
    store_max_age_s: float  # 0: keep samples of any age (only store_max_samples evicts)
    #: How far back the first core-data backfill reaches (no cursor yet); 0: everything
    #: core-data holds (a historical export loaded into core-data).
    first_backfill_s: float = 24 * 3600.0
    #: core-command's base URL, for ``[[insight.writeback]]`` rules (``docs/edgex.md``,
    #: "Write-back (core-command)"); None: no write-back.
    core_command_url: str | None = None


#: ``[insight] publish``: every window, only when the prediction changes, or never.
INSIGHT_MODES = ("on_change", "every_window", "off")


@dataclass(frozen=True)
class InsightSettings:
    """``[insight]``: live predictions on ``insight/{device_id}`` (``docs/protocol.md``,
    "Predictions (insight)"): the verified global model run on the device's live windows.

    Defaults, and why:

    - ``publish = "on_change"``: the message is retained, so the broker always holds the
      current prediction for a BMS that connects later; a building's state (occupancy, an
      activity, a comfort class) stays the same for minutes to hours, so publishing only
      when the class changes (or a regression value moves by more than ``min_change``, or
      the model changes) carries the same information for a fraction of the traffic.
      ``"every_window"`` publishes each window (still rate-limited); ``"off"`` runs nothing.
    - ``min_interval_s = 60``: at most one publication a minute per device, without exception
      (a change inside the interval is published by the first window after it), which keeps a
      flapping model or a 1 s window step from flooding the broker and the BMS; 0 = no limit.
    - ``min_change = 0``: the units are the task's, so no threshold fits every task; 0 means
      any change of a regression value counts (``min_interval_s`` still bounds the rate).
    - ``stale_after_s = 900``: a window whose end is more than 15 minutes behind the device's
      clock describes the past (a backfill after an outage, a stalled sensor); it is not
      published, so the retained message is never replaced by old news. 0 = never stale,
      for replayed historical data, whose origins are old by design.
    """

    publish: str = "on_change"
    min_interval_s: float = 60.0
    min_change: float = 0.0
    stale_after_s: float = 900.0
    #: Home Assistant MQTT discovery of the prediction (``docs/home-assistant.md``): off by default.
    home_assistant: bool = False
    home_assistant_prefix: str = "homeassistant"
    #: ``[[insight.writeback]]``: write-back rules through core-command (none by default).
    writeback: tuple[WritebackRule, ...] = ()


@dataclass(frozen=True)
class WritebackRule:
    """One ``[[insight.writeback]]`` rule: when a published prediction meets the condition
    (``when_label`` for classification; ``when_above`` and/or ``when_below`` for regression),
    ``PUT`` ``values`` to core-command's ``command`` of EdgeX device ``device``, at most once per
    ``min_interval_s`` (``fedge.agent.writeback`` has the trigger semantics)."""

    device: str
    command: str
    values: tuple[tuple[str, str], ...]
    when_label: str | None = None
    when_above: float | None = None
    when_below: float | None = None
    min_interval_s: float = 300.0

    def describe(self) -> str:
        """``when label = 'occupied' -> PUT hvac-1/setpoint``, for logs."""
        if self.when_label is not None:
            condition = f"label = {self.when_label!r}"
        else:
            parts = [f"value > {self.when_above:g}"] if self.when_above is not None else []
            parts += [f"value < {self.when_below:g}"] if self.when_below is not None else []
            condition = " and ".join(parts)
        return f"when {condition} -> PUT {self.device}/{self.command}"


#: ``[personalisation] epochs``: how many more epochs the personal weights get (1..MAX).
MAX_PERSONAL_EPOCHS = 1000


@dataclass(frozen=True)
class PersonalisationSettings:
    """``[personalisation]``: fine-tune-after-global (``docs/personalisation.md``,
    ``fedge.agent.personal``). After each new global model is installed, and after the device has
    trained its federated update from it, a copy of the global weights gets ``epochs`` more epochs
    on the device's training part; predictions use the result, the federated update never does.

    Off by default: it costs ``epochs`` more epochs of local training per global model, and it
    changes what ``insight/{device_id}`` means (this device's model, not the fleet's), which a
    BMS reading the predictions should opt into knowingly. ``epochs = 5``: a few passes over a
    device's own data move a global model to its room (``docs/personalisation.md`` has the
    measurements) at a cost of about ``5 / local_epochs`` times the round's training.
    """

    enabled: bool = False
    epochs: int = 5


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    fleet: str
    state_dir: Path
    key_file: Path
    aggregator_public_key: PublicKey
    trusted_keys: dict[str, VerifyKey]
    runtime: str
    blob_timeout_s: float
    status_interval_s: float
    mqtt: MqttSettings
    data: DataSettings
    edgex: EdgeXSettings
    insight: InsightSettings = InsightSettings()
    #: ``[metrics]``: Prometheus metrics and health endpoints (off by default; docs/metrics.md).
    metrics: MetricsSettings = METRICS_OFF
    #: Secure aggregation (``docs/secure-aggregation.md``): the device's Ed25519 identity key,
    #: its operator-signed certificate and the operator's pinned verify keys, all three or none
    #: (:func:`_secure_settings`); checked against each other by ``fedge.agent.wiring``.
    identity_key_file: Path | None = None
    identity_certificate_file: Path | None = None
    operator_verify_keys: dict[str, VerifyKey] = field(default_factory=dict)
    #: Never send a plain update: a selected device sits out train rounds without secure aggregation.
    require_secure_aggregation: bool = False
    #: ``[personalisation]``: personal weights for this device's predictions (off by default).
    personalisation: PersonalisationSettings = PersonalisationSettings()
    #: A sealed update larger than this goes out in sealed pieces of this size (docs/protocol.md,
    #: "Chunked transfers"); at most the aggregator's ``chunk_bytes``.
    chunk_bytes: int = DEFAULT_CHUNK_BYTES

    @property
    def secure_aggregation_ready(self) -> bool:
        """Whether the device can take part in secure-aggregation rounds (identity configured)."""
        return self.identity_key_file is not None


#: What identifies a connection to the broker; never shared by the agent's two connections.
IDENTITY_KEYS = ("username", "password", "password_file", "cert_file", "key_file")

AGENT_KEYS = {
    "device_id",
    "fleet",
    "state_dir",
    "key_file",
    "aggregator_public_key",
    "aggregator_verify_keys",
    "runtime",
    "blob_timeout_s",
    "status_interval_s",
    "identity_key_file",
    "identity_certificate_file",
    "operator_verify_keys",
    "require_secure_aggregation",
    "chunk_bytes",
}
#: The ``[agent]`` keys secure aggregation needs, all three or none.
IDENTITY_CONFIG_KEYS = ("identity_key_file", "identity_certificate_file", "operator_verify_keys")
DATA_KEYS = {"source", "subject", "holdout_fraction", "seed", "task", "csv_file"}
EDGEX_KEYS = {
    "broker",
    "protocol",
    "prefix",
    "device",
    "profile",
    "core_data",
    "core_command",
    "token_file",
    "store_max_samples",
    "store_max_age_s",
    "first_backfill_s",
    "username",
    "password",
    "password_file",
    "keepalive",
    "ca_file",
    "cert_file",
    "key_file",
}
INSIGHT_KEYS = {
    "publish",
    "min_interval_s",
    "min_change",
    "stale_after_s",
    "home_assistant",
    "home_assistant_prefix",
    "writeback",
}
PERSONALISATION_KEYS = {"enabled", "epochs"}
#: The keys of one ``[[insight.writeback]]`` rule.
WRITEBACK_KEYS = {"when_label", "when_above", "when_below", "device", "command", "values", "min_interval_s"}
#: Every table of agent.toml and the keys it accepts (any other is an error); what
#: docs/configuration.md and ``fedge agent config --example`` must list (their tests check it).
AGENT_TABLES: dict[str, set[str]] = {
    "agent": AGENT_KEYS,
    "mqtt": MQTT_KEYS,
    "data": DATA_KEYS,
    "edgex": EDGEX_KEYS,
    "insight": INSIGHT_KEYS,
    "metrics": METRICS_KEYS,
    "personalisation": PERSONALISATION_KEYS,
}


def load_agent_config(path: Path, env: Mapping[str, str]) -> AgentConfig:
    data = config_document(*read_config_file(path, MAX_CONFIG_BYTES, "config"), path, env, ENV_PREFIX)
    unknown = sorted(set(data) - set(AGENT_TABLES))
    if unknown:
        raise ConfigError(f"{path}: unknown tables {unknown}; allowed: {', '.join(AGENT_TABLES)}")
    a = Table(data, "agent", AGENT_KEYS)
    try:
        device_id = check_id(a.text("device_id"))
        fleet = check_id(a.text("fleet"), "fleet id")
        aggregator_key = public_key_from_text(a.text("aggregator_public_key"))
        verify_raw = a.raw.get("aggregator_verify_keys")
        if (
            not isinstance(verify_raw, list)
            or not verify_raw
            or not all(isinstance(k, str) for k in verify_raw)
        ):
            raise ConfigError("[agent] aggregator_verify_keys must be a non-empty list of base64 keys")
        trusted = {key_id(k): k for k in (verify_key_from_text(t) for t in verify_raw)}
    except ConfigError:
        raise
    except FedgeError as exc:
        raise ConfigError(f"[agent] {exc}") from None
    d = Table(data, "data", DATA_KEYS)
    base = path.parent
    identity_key_file, certificate_file, operator_keys, require_secure = _secure_settings(a, base, trusted)
    source = d.choice("source", "edgex", DATA_SOURCES)
    task_text = d.opt_text("task")
    if source == "edgex" and not task_text:
        raise ConfigError("[data] task: the task spec this device was provisioned for is required with EdgeX")
    csv_file = _csv_file(d, source, task_text, base)
    mqtt_table = Table(data, "mqtt", MQTT_KEYS)
    mqtt_settings = mqtt_settings_from_table(
        mqtt_table, f"fedge-agent-{device_id}", str(path.parent), read_config_file
    )
    e = Table(data, "edgex", EDGEX_KEYS)
    if source == "edgex" and "broker" not in e.raw:
        check_own_edgex_principal(mqtt_table, e)
    # Without its own broker, the EdgeX bus is the fleet's broker: same TLS trust and keepalive,
    # never the same identity (see check_own_edgex_principal).
    bus_table: dict[str, object] = (
        {}
        if "broker" in e.raw
        else {k: mqtt_table.raw[k] for k in ("keepalive", "ca_file") if k in mqtt_table.raw}
    )
    bus_table.update(
        broker=e.raw.get("broker", mqtt_settings.url),
        protocol=e.raw.get("protocol", mqtt_settings.protocol),
        client_id=f"fedge-agent-{device_id}-edgex",
    )
    for key in (*IDENTITY_KEYS, "keepalive", "ca_file"):
        if key in e.raw:
            bus_table[key] = e.raw[key]
    profile_text = e.opt_text("profile")
    token_text = e.opt_text("token_file")
    edgex = EdgeXSettings(
        bus=mqtt_settings_from_table(
            Table({"edgex": bus_table}, "edgex", MQTT_KEYS),
            f"fedge-{device_id}-edgex",
            str(path.parent),
            read_config_file,
        ),
        prefix=e.text("prefix", "edgex"),
        device=e.text("device", device_id),
        profile_file=base / profile_text if profile_text else None,
        core_data_url=e.opt_text("core_data"),
        token_file=base / token_text if token_text else None,
        store_max_samples=e.integer("store_max_samples", 200_000, 1, 100_000_000),
        store_max_age_s=_store_max_age_s(e),
        first_backfill_s=e.number("first_backfill_s", 24 * 3600.0, 0.0, 10 * 365 * 24 * 3600.0),
        core_command_url=_core_command_url(e),
    )
    return AgentConfig(
        device_id=device_id,
        fleet=fleet,
        state_dir=base / a.text("state_dir"),
        key_file=base / a.text("key_file"),
        aggregator_public_key=aggregator_key,
        trusted_keys=trusted,
        runtime=a.choice("runtime", "auto", ("auto", "ai_edge_litert", "tflite_runtime")),
        blob_timeout_s=a.number("blob_timeout_s", 30.0, 0.1, 3600.0),
        chunk_bytes=a.integer("chunk_bytes", DEFAULT_CHUNK_BYTES, MIN_CHUNK_BYTES, MAX_CHUNK_BYTES),
        status_interval_s=a.number("status_interval_s", 30.0, 0.5, 3600.0),
        mqtt=mqtt_settings,
        data=DataSettings(
            source=source,
            subject=d.integer("subject", 1, 1, 10),
            holdout_fraction=d.number("holdout_fraction", 0.2, 0.0, 0.9),
            seed=d.integer("seed", 0, 0, 2**31 - 1),
            task_file=base / task_text if task_text else None,
            csv_file=csv_file,
        ),
        edgex=edgex,
        insight=_checked_writeback(_insight_settings(Table(data, "insight", INSIGHT_KEYS)), edgex),
        metrics=metrics_settings_from_table(Table(data, "metrics", METRICS_KEYS), AGENT_METRICS_PORT),
        identity_key_file=identity_key_file,
        identity_certificate_file=certificate_file,
        operator_verify_keys=operator_keys,
        require_secure_aggregation=require_secure,
        personalisation=_personalisation_settings(Table(data, "personalisation", PERSONALISATION_KEYS)),
    )


def _csv_file(d: Table, source: str, task_text: str | None, base: Path) -> Path | None:
    """``[data] csv_file``: required with ``source = "csv"`` (with ``task``), refused otherwise."""
    text = d.opt_text("csv_file")
    if source != "csv":
        if text is not None:
            raise ConfigError(f'[data] csv_file goes with source = "csv" (source is {source!r}); remove it')
        return None
    if not text:
        raise ConfigError(
            '[data] csv_file: source = "csv" reads the device\'s readings from a CSV file; set csv_file '
            "to its path (docs/own-data.md has the format)"
        )
    if not task_text:
        raise ConfigError(
            '[data] task: the task spec this device was provisioned for is required with source = "csv"'
        )
    return base / text


def _personalisation_settings(p: Table) -> PersonalisationSettings:
    """``[personalisation]``, every key optional (see :class:`PersonalisationSettings`)."""
    default = PersonalisationSettings()
    return PersonalisationSettings(
        enabled=p.flag("enabled", default.enabled),
        epochs=p.integer("epochs", default.epochs, 1, MAX_PERSONAL_EPOCHS),
    )


def _secure_settings(
    a: Table, base: Path, aggregator_keys: Mapping[str, VerifyKey]
) -> tuple[Path | None, Path | None, dict[str, VerifyKey], bool]:
    """``[agent]``'s secure-aggregation keys: each one's type first, then all three identity
    keys or none, and ``require_secure_aggregation = true`` only with them. The operator's key
    certifies identity keys so that the aggregator cannot: it must not be an aggregator key."""
    paths: dict[str, Path] = {}
    for key in IDENTITY_CONFIG_KEYS[:2]:
        text = a.opt_text(key)
        if text is not None:
            if not text:
                raise ConfigError(f"[agent] {key} must be a non-empty string")
            paths[key] = base / text
    operator_keys: dict[str, VerifyKey] = {}
    raw = a.raw.get("operator_verify_keys")
    if raw is not None:
        if not isinstance(raw, list) or not raw or not all(isinstance(k, str) for k in raw):
            raise ConfigError("[agent] operator_verify_keys must be a non-empty list of base64 keys")
        try:
            operator_keys = {key_id(k): k for k in (verify_key_from_text(t) for t in raw)}
        except FedgeError as exc:
            raise ConfigError(f"[agent] operator_verify_keys: {exc}") from None
    require = a.flag("require_secure_aggregation", False)
    given = [k for k in IDENTITY_CONFIG_KEYS if k in paths or (k == "operator_verify_keys" and operator_keys)]
    if given and len(given) < len(IDENTITY_CONFIG_KEYS):
        missing = [k for k in IDENTITY_CONFIG_KEYS if k not in given]
        raise ConfigError(
            f"[agent] {' and '.join(missing)} missing: secure aggregation needs identity_key_file "
            "(`fedge keys identity`), identity_certificate_file (`fedge certify`) and "
            "operator_verify_keys (`fedge keys operator`) together; set all three or none"
        )
    if require and not given:
        raise ConfigError(
            "[agent] require_secure_aggregation = true needs identity_key_file, "
            "identity_certificate_file and operator_verify_keys (from `fedge keys identity`, "
            "`fedge certify` and `fedge keys operator`), or set it to false"
        )
    shared = sorted(set(operator_keys) & set(aggregator_keys))
    if shared:
        raise ConfigError(
            f"[agent] operator_verify_keys: key {shared[0]} is also in aggregator_verify_keys; the "
            "operator key certifies identity keys the aggregator must not choose: pin the key "
            "`fedge keys operator` printed, never an aggregator key"
        )
    return (
        paths.get("identity_key_file"),
        paths.get("identity_certificate_file"),
        operator_keys,
        require,
    )


#: Longest ``[insight] min_interval_s``: one day.
MAX_INSIGHT_INTERVAL_S = 24 * 3600.0
#: Largest ``[insight] min_change`` (in the label's units).
MAX_INSIGHT_CHANGE = 1e12


def _insight_settings(i: Table) -> InsightSettings:
    """``[insight]``, every key optional (see :class:`InsightSettings` for the defaults)."""
    default = InsightSettings()
    return InsightSettings(
        publish=i.choice("publish", default.publish, INSIGHT_MODES),
        min_interval_s=i.number("min_interval_s", default.min_interval_s, 0.0, MAX_INSIGHT_INTERVAL_S),
        min_change=i.number("min_change", default.min_change, 0.0, MAX_INSIGHT_CHANGE),
        stale_after_s=i.number("stale_after_s", default.stale_after_s, 0.0, MAX_STORE_AGE_S),
        home_assistant=i.flag("home_assistant", default.home_assistant),
        home_assistant_prefix=_home_assistant_prefix(i, default.home_assistant_prefix),
        writeback=_writeback_rules(i),
    )


def _home_assistant_prefix(i: Table, default: str) -> str:
    prefix = i.text("home_assistant_prefix", default)
    try:
        return check_prefix(prefix)
    except FedgeError as exc:
        raise ConfigError(f"[insight] home_assistant_prefix: {exc}") from None


#: Shortest and longest ``min_interval_s`` of a write-back rule: one write a second at most
#: (never a storm), one a day at least.
WRITEBACK_INTERVAL_RANGE = (1.0, 24 * 3600.0)


def _writeback_rules(i: Table) -> tuple[WritebackRule, ...]:
    """``[[insight.writeback]]``: each rule a table of :data:`WRITEBACK_KEYS`, its errors naming
    it ``[insight.writeback[N]]`` (N from 0, in file order)."""
    raw = i.raw.get("writeback", [])
    if not isinstance(raw, list) or not all(isinstance(r, Mapping) for r in raw):
        raise ConfigError(
            f"[insight] writeback must be a list of tables ([[insight.writeback]] rules), got {raw!r}"[:200]
        )
    rules = []
    for n, rule in enumerate(raw):
        name = f"insight.writeback[{n}]"
        t = Table({name: rule}, name, WRITEBACK_KEYS)
        label = t.opt_text("when_label")
        above = _opt_number(t, "when_above")
        below = _opt_number(t, "when_below")
        if label is not None and (above is not None or below is not None):
            raise ConfigError(
                f"[{name}] when_label goes alone: when_above/when_below are for regression tasks"
            )
        if label is None and above is None and below is None:
            raise ConfigError(
                f"[{name}] when_label (classification) or when_above/when_below (regression) is required"
            )
        if label == "":
            raise ConfigError(f"[{name}] when_label must be a non-empty string")
        if above is not None and below is not None and not above < below:
            raise ConfigError(
                f"[{name}] when_above ({above:g}) must be below when_below ({below:g}): the rule "
                "holds for when_above < value < when_below"
            )
        values = t.raw.get("values")
        if (
            not isinstance(values, Mapping)
            or not values
            or not all(isinstance(k, str) and k and isinstance(v, str) for k, v in values.items())
        ):
            raise ConfigError(
                f'[{name}] values must be a non-empty table of resource = "value" strings (what '
                f"core-command writes), got {values!r}"
            )
        rules.append(
            WritebackRule(
                device=t.text("device"),
                command=t.text("command"),
                values=tuple((str(k), str(v)) for k, v in values.items()),
                when_label=label,
                when_above=above,
                when_below=below,
                min_interval_s=t.number("min_interval_s", 300.0, *WRITEBACK_INTERVAL_RANGE),
            )
        )
    return tuple(rules)


def _opt_number(t: Table, key: str) -> float | None:
    if key not in t.raw:
        return None
    return t.number(key, 0.0, -MAX_INSIGHT_CHANGE, MAX_INSIGHT_CHANGE)


def _checked_writeback(insight: InsightSettings, edgex: EdgeXSettings) -> InsightSettings:
    """Write-back rules need core-command's URL, and predictions to act on."""
    if insight.writeback and edgex.core_command_url is None:
        raise ConfigError(
            "[insight] writeback: the rules need [edgex] core_command, core-command's base URL "
            '(e.g. "http://edgex-core-command:59882")'
        )
    if insight.writeback and insight.publish == "off":
        raise ConfigError(
            '[insight] writeback: the rules act on published predictions, but publish = "off"; set '
            'publish = "on_change" (or "every_window")'
        )
    return insight


def _core_command_url(e: Table) -> str | None:
    url = e.opt_text("core_command")
    if url is not None and not url.startswith(("http://", "https://")):
        raise ConfigError(f"[edgex] core_command must be an http:// or https:// URL, got {url!r}")
    return url


def check_own_edgex_principal(mqtt_table: Table, edgex_table: Table) -> None:
    """When the EdgeX bus is the fleet broker, the agent's EdgeX connection must be a principal
    of its own (``fedge broker config`` makes ``{device}.edgex``).

    Why: the generated broker config uses the username as the MQTT client id, so a second
    connection with the device's username would take the device's session over (and the two
    connections would knock each other off in turn); and only the ``.edgex`` principal may read
    the device's EdgeX readings, the device's own may not (least privilege). An anonymous fleet
    broker (no username, no client certificate) needs nothing.
    """
    fleet, bus = mqtt_table.raw, edgex_table.raw
    if "username" not in fleet and "cert_file" not in fleet:
        return
    fleet_user = fleet.get("username")
    suggested = f"{fleet_user}.edgex" if isinstance(fleet_user, str) and fleet_user else "DEVICE.edgex"
    fix = (
        f'set [edgex] username = "{suggested}" and its password or password_file (from '
        f"`fedge broker config`'s credentials/{suggested}.txt), or give [edgex] a broker of its own"
    )
    user = bus.get("username")
    if not isinstance(user, str) or not user:
        raise ConfigError(
            "[edgex] username: the EdgeX bus is the fleet broker, so the agent's EdgeX connection "
            f"needs its own principal: {fix}"
        )
    if user == fleet_user:
        raise ConfigError(
            f"[edgex] username {user!r} is also [mqtt] username: the agent's EdgeX connection needs "
            f"its own principal: {fix}"
        )
    if "cert_file" in fleet:
        if "cert_file" not in bus or "key_file" not in bus:
            raise ConfigError(
                "[edgex] cert_file and key_file: the fleet connection authenticates with a client "
                f"certificate, so the EdgeX connection needs its own (CN {user!r}) from `fedge broker "
                f"config`'s credentials/{user}.crt and .key"
            )
    elif _has_password(fleet) and not _has_password(bus):
        raise ConfigError(
            f"[edgex] password: the EdgeX connection as {user!r} needs its own password: set [edgex] "
            f"password or password_file (from `fedge broker config`'s credentials/{user}.txt)"
        )


#: Longest ``[edgex] store_max_age_s`` short of 0 (any age): ten years.
MAX_STORE_AGE_S = 10 * 365 * 24 * 3600.0


def _store_max_age_s(e: Table) -> float:
    """``[edgex] store_max_age_s``: 1 s to ten years (default 30 days), or 0 to keep samples of
    any age, e.g. a building's historical export replayed through EdgeX."""
    value = e.raw.get("store_max_age_s", 30 * 24 * 3600.0)
    if (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and (value == 0 or 1.0 <= value <= MAX_STORE_AGE_S)
    ):
        return float(value)
    raise ConfigError(
        "[edgex] store_max_age_s must be 0 (keep samples of any age) or a number of seconds in "
        f"1.0..{MAX_STORE_AGE_S}, got {value!r}"
    )


def _has_password(table: Mapping[str, object]) -> bool:
    return "password" in table or "password_file" in table
