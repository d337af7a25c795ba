"""``fedge agent config --example`` and ``fedge aggregator config --example``: a complete,
commented config, every key of every table with its default and what it does (as
``telegraf config`` writes one), that the service loads once the files it names exist and the
aggregator's keys are pasted in.

:data:`SERVICES` describes each key once: its kind, its default, its range or choices and one
line of help. The example is rendered from it, and the tests hold it to the code and the docs:

- ``tests/tools/test_config_example.py``: the keys here are exactly the keys the loader accepts
  (``fedge.agent.config.AGENT_TABLES``, ``fedge.aggregator.config.AGGREGATOR_TABLES``); each
  kind, range and choice list is the one the loader enforces; the example, loaded, gives the
  same config as a file holding only the required keys (so every default written is the real one);
- ``tests/tools/test_configuration_doc.py``: ``docs/configuration.md`` documents the same keys
  per table, with these kinds, defaults and ranges.

Standard library only, and no import of either service: the CLI imports this module to build
its parser (``fedge --help`` must stay fast on a board), and a device install has no aggregator.
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

INTEGER = "integer"
NUMBER = "number"
BOOLEAN = "boolean"
STRING = "string"
#: A string naming a file or directory, relative to the config file's directory.
PATH = "path"
STRINGS = "list of strings"
#: An array of tables (``[[table.key]]``), each checked key by key (``[insight] writeback``).
TABLES = "list of tables"
KINDS = (INTEGER, NUMBER, BOOLEAN, STRING, PATH, STRINGS, TABLES)

WIDTH = 100


@dataclass(frozen=True)
class Key:
    """One key of a table.

    ``default``: the value the loader uses when the key is absent, written into the example
    as the key's value; None when there is none (the key is required, unset, or derived from
    other settings: ``default_text`` says from what). ``example``: the value shown for a key
    without a literal default; a required key is written with it, any other commented out.
    """

    name: str
    kind: str
    help: str
    default: object = None
    lo: int | float | None = None
    hi: int | float | None = None
    choices: tuple[str, ...] = ()
    required: bool = False
    example: object = None
    default_text: str = ""
    #: A constraint beyond the range, e.g. ``"not 4"``.
    note: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: unknown kind {self.kind!r}")
        if self.default is None and self.example is None:
            raise ValueError(f"{self.name}: a key without a default needs an example value")
        if self.required and self.default is not None:
            raise ValueError(f"{self.name}: a required key has no default")

    @property
    def range_text(self) -> str:
        """The range or the choices, as docs/configuration.md writes them ("" for neither)."""
        if self.choices:
            return ", ".join(f"`{c}`" for c in self.choices)
        if self.lo is not None and self.hi is not None:
            return f"`{number_text(self.lo)}..{number_text(self.hi)}`"
        return ""

    @property
    def default_cell(self) -> str:
        """The default, as docs/configuration.md writes it: a TOML value in backticks,
        ``required``, or (derived or unset) the text that says what happens."""
        if self.required:
            return "required"
        if self.default is not None:
            return f"`{toml_value(self.default)}`"
        return self.default_text or "not set"


@dataclass(frozen=True)
class Section:
    """One TOML table of a service's config."""

    name: str
    help: str
    keys: tuple[Key, ...]

    def key(self, name: str) -> Key:
        for key in self.keys:
            if key.name == name:
                return key
        raise KeyError(f"[{self.name}] has no key {name!r}")


def number_text(value: int | float) -> str:
    """A number as TOML (and docs/configuration.md) write it: digits grouped by ``_``
    (``604_800.0``), very large or small floats with an exponent (``1e+12``, ``1e-06``)."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} has no TOML form here")
        if value != 0 and not 1e-4 <= abs(value) < 1e9:
            return f"{value:g}"
    return f"{value:_}"


def toml_value(value: object) -> str:
    """``value`` as a TOML value (booleans, numbers, strings, lists of them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return number_text(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in escaped):
            raise ValueError(f"{value!r}: control characters are not written here")
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _mqtt_keys(principal: str, client_id: str) -> tuple[Key, ...]:
    """The ``[mqtt]`` table of both services (``fedge.protocol.mqtt_settings.MQTT_KEYS``)."""
    return (
        Key(
            "broker",
            STRING,
            "The fleet's broker: mqtt://host[:port] (port 1883) or mqtts://host[:port] (TLS, port 8883); "
            "no credentials in the URL.",
            default="mqtt://127.0.0.1:1883",
        ),
        Key(
            "protocol",
            INTEGER,
            "5 (MQTT 5) or 3 (MQTT 3.1.1).",
            default=5,
            lo=3,
            hi=5,
            note="not 4",
        ),
        Key("keepalive", INTEGER, "MQTT keepalive, in seconds.", default=30, lo=5, hi=3600),
        Key(
            "username",
            STRING,
            "The principal, as `fedge broker config` names it (the device id, or `aggregator`).",
            example=principal,
            default_text="none (anonymous)",
        ),
        Key(
            "password",
            STRING,
            "Its password. A config file holding one must be mode 0600 (or use password_file, "
            "or the environment variable).",
            example="CHANGE-ME",
            default_text="none",
        ),
        Key(
            "password_file",
            PATH,
            "Instead of password: a file (mode 0600) holding the password on one line, read at start. "
            "Not both.",
            example="mqtt.password",
            default_text="none",
        ),
        Key(
            "client_id",
            STRING,
            "The MQTT client id (the generated broker config uses the username instead).",
            example=client_id,
            default_text=f"`{toml_value(client_id)}`",
        ),
        Key(
            "session_expiry_s",
            INTEGER,
            "MQTT 5 session expiry, in seconds: how long the broker keeps the session and queues "
            "messages for an offline client (7 days).",
            default=7 * 24 * 3600,
            lo=0,
            hi=2**32 - 1,
        ),
        Key(
            "ca_file",
            PATH,
            "The CA that signed the broker's certificate (`fedge broker config`: credentials/ca.crt).",
            example="ca.crt",
            default_text="the system's CAs",
        ),
        Key(
            "cert_file",
            PATH,
            "A client certificate, where the broker authenticates clients by certificate (its CN "
            "is the username).",
            example=f"{principal}.crt",
            default_text="none",
        ),
        Key(
            "key_file",
            PATH,
            "The client certificate's private key (mode 0600).",
            example=f"{principal}.key",
            default_text="none",
        ),
    )


def _metrics_section(port: int, names: str) -> Section:
    """The ``[metrics]`` table of both services (``fedge.protocol.metrics_settings``); only the
    default port differs (docs/metrics.md)."""
    return Section(
        "metrics",
        f"Prometheus metrics ({names}, process_*) on /metrics, and the health endpoints /healthz "
        "and /readyz (docs/metrics.md). Off by default.",
        (
            Key("enabled", BOOLEAN, "Serve /metrics, /healthz and /readyz.", default=False),
            Key(
                "bind",
                STRING,
                'The IP address to listen on: the loopback interface by default; "0.0.0.0" where a '
                "scraper or the kubelet connects from elsewhere (a pod).",
                default="127.0.0.1",
            ),
            Key(
                "port",
                INTEGER,
                "The TCP port (0: any free port, logged at start). A port in use stops the service "
                "(exit 78).",
                default=port,
                lo=0,
                hi=65535,
            ),
        ),
    )


AGENT_SECTIONS = (
    Section(
        "agent",
        "Who this device is, the fleet it trains for, and the aggregator keys it trusts (pinned at "
        "provisioning).",
        (
            Key(
                "device_id",
                STRING,
                "This device's id as enrolled in the fleet's registry: 1-64 letters, digits, '_', '.', '-'.",
                required=True,
                example="watch-01",
            ),
            Key(
                "fleet",
                STRING,
                "The fleet id (the topic prefix fedge/v1/FLEET/).",
                required=True,
                example="building-1",
            ),
            Key(
                "state_dir",
                PATH,
                "Where the agent keeps its state: device state, outbox, trust store, sample store, "
                "heartbeat.",
                required=True,
                example="state",
            ),
            Key(
                "key_file",
                PATH,
                "The device's private box key (mode 0600; `fedge keys device`).",
                required=True,
                example="keys/watch-01.box",
            ),
            Key(
                "aggregator_public_key",
                STRING,
                "The aggregator's X25519 public key (base64), to which updates are sealed: the "
                "aggregator_public_key line `fedge keys aggregator` prints.",
                required=True,
                example="PASTE-FROM-fedge-keys-aggregator",
            ),
            Key(
                "aggregator_verify_keys",
                STRINGS,
                "The aggregator's Ed25519 verify keys (base64): manifests must be signed by one of "
                "them; later moved only by signed key rotations.",
                required=True,
                example=["PASTE-FROM-fedge-keys-aggregator"],
            ),
            Key(
                "runtime",
                STRING,
                "The TFLite interpreter: auto (ai_edge_litert, else tflite_runtime) or one of them.",
                default="auto",
                choices=("auto", "ai_edge_litert", "tflite_runtime"),
            ),
            Key(
                "blob_timeout_s",
                NUMBER,
                "How long to wait for a round's model and weights blobs before giving the round up, "
                "in seconds.",
                default=30.0,
                lo=0.1,
                hi=3600.0,
            ),
            Key(
                "chunk_bytes",
                INTEGER,
                "A sealed update larger than this goes out as sealed pieces of this size: keep it "
                "under the broker's max_packet_size and at most the aggregator's chunk_bytes.",
                default=256 * 1024,  # fedge.protocol.chunks.DEFAULT_CHUNK_BYTES (a test keeps them equal)
                lo=1024,
                hi=64 * 1024 * 1024,
            ),
            Key(
                "status_interval_s",
                NUMBER,
                "How often the retained status is republished, in seconds.",
                default=30.0,
                lo=0.5,
                hi=3600.0,
            ),
            Key(
                "identity_key_file",
                PATH,
                "Secure aggregation: the device's Ed25519 identity key (mode 0600; `fedge keys "
                "identity`). With identity_certificate_file and operator_verify_keys, or none of them.",
                example="keys/watch-01.identity",
                default_text="not set: no secure aggregation",
            ),
            Key(
                "identity_certificate_file",
                PATH,
                "Secure aggregation: the operator's certificate of the identity key (`fedge certify`); "
                "published on identity/DEVICE.",
                example="keys/watch-01.cert",
                default_text="not set: no secure aggregation",
            ),
            Key(
                "operator_verify_keys",
                STRINGS,
                "Secure aggregation: the operator's Ed25519 verify keys (base64; `fedge keys "
                "operator`), which certify every device's identity key. Never an aggregator key.",
                example=["PASTE-FROM-fedge-keys-operator"],
                default_text="not set: no secure aggregation",
            ),
            Key(
                "require_secure_aggregation",
                BOOLEAN,
                "Never send a plain update: sit out train rounds without secure aggregation (needs "
                "the three keys above).",
                default=False,
            ),
        ),
    ),
    Section(
        "mqtt",
        "The connection to the fleet's broker.",
        _mqtt_keys("watch-01", "fedge-agent-watch-01"),
    ),
    Section(
        "data",
        "Where the training data comes from, and the part held out to evaluate each global model.",
        (
            Key(
                "source",
                STRING,
                "edgex: readings from EdgeX (the product); csv: a CSV file of readings on the device "
                "(csv_file; docs/own-data.md); har-watch: the recorded smartwatch data set (needs "
                "fedge's lab part; tests).",
                default="edgex",
                choices=("edgex", "csv", "har-watch"),
            ),
            Key(
                "csv_file",
                PATH,
                "With source = csv (required there, refused otherwise): the CSV of readings a "
                "logger or an EdgeX export writes, a header naming the task's resources and a time "
                "column, one row per instant; rows appended later are read too. [edgex] profile, "
                "device, store_max_samples and store_max_age_s apply as for EdgeX.",
                example="/var/lib/fedge-agent/readings.csv",
            ),
            Key(
                "subject",
                INTEGER,
                "With source = har-watch: the data set's subject this device plays.",
                default=1,
                lo=1,
                hi=10,
            ),
            Key(
                "holdout_fraction",
                NUMBER,
                "The share of local samples held out to evaluate each received global model "
                "(not trained on).",
                default=0.2,
                lo=0.0,
                hi=0.9,
            ),
            Key(
                "seed",
                INTEGER,
                "Seed of the holdout split and of local training's shuffling.",
                default=0,
                lo=0,
                hi=2**31 - 1,
            ),
            Key(
                "task",
                PATH,
                "The task spec this device was provisioned for (features, label); required with "
                "source = edgex or csv. The agent image ships them in /opt/fedge/tasks/.",
                required=True,
                example="tasks/har-watch.toml",
            ),
        ),
    ),
    Section(
        "edgex",
        "EdgeX: the message bus carrying this device's readings, core-data for backfill after an "
        "outage, and the local sample store. Without a broker of its own the bus is the fleet's "
        "broker, reached as a principal of its own (ID.edgex) when [mqtt] has credentials.",
        (
            Key(
                "broker",
                STRING,
                "The EdgeX message bus, mqtt://host[:port] or mqtts://host[:port].",
                example="mqtt://edgex-bus:1883",
                default_text="the `[mqtt]` broker",
            ),
            Key(
                "protocol",
                INTEGER,
                "5 (MQTT 5) or 3 (MQTT 3.1.1) on the bus.",
                lo=3,
                hi=5,
                note="not 4",
                example=5,
                default_text="`[mqtt]` protocol",
            ),
            Key("prefix", STRING, "EdgeX's topic prefix.", default="edgex"),
            Key(
                "device",
                STRING,
                "The EdgeX device name whose readings are this device's.",
                example="watch-01",
                default_text="`[agent]` device_id",
            ),
            Key(
                "profile",
                PATH,
                "The EdgeX device profile: its min/max drive the quality policy, and rounds are "
                "checked against its resources.",
                example="edgex_profiles/wearable-imu.yaml",
                default_text="none",
            ),
            Key(
                "core_data",
                STRING,
                "core-data's base URL, to backfill the readings missed while disconnected.",
                example="http://edgex-core-data:59880",
                default_text="none (no backfill)",
            ),
            Key(
                "core_command",
                STRING,
                "core-command's base URL, for the [[insight.writeback]] rules (token_file's JWT in "
                "secure mode).",
                example="http://edgex-core-command:59882",
                default_text="none (no write-back)",
            ),
            Key(
                "token_file",
                PATH,
                "A file holding the JWT for core-data in EdgeX's secure mode.",
                example="edgex.jwt",
                default_text="none",
            ),
            Key(
                "store_max_samples",
                INTEGER,
                "The sample store keeps at most this many samples (the oldest go first).",
                default=200_000,
                lo=1,
                hi=100_000_000,
            ),
            Key(
                "store_max_age_s",
                NUMBER,
                "Samples older than this many seconds are dropped from the store (30 days).",
                default=30 * 24 * 3600.0,
                lo=1.0,
                hi=10 * 365 * 24 * 3600.0,
                note="or 0: keep samples of any age",
            ),
            Key(
                "first_backfill_s",
                NUMBER,
                "How far back the first core-data backfill (no cursor yet) reaches, in seconds.",
                default=24 * 3600.0,
                lo=0.0,
                hi=10 * 365 * 24 * 3600.0,
                note="0: everything core-data holds",
            ),
            Key(
                "username",
                STRING,
                "The bus connection's own principal (`fedge broker config` makes ID.edgex); required "
                "when the bus is the fleet's broker and [mqtt] has credentials.",
                example="watch-01.edgex",
                default_text="none",
            ),
            Key(
                "password",
                STRING,
                "Its password (a config holding one must be mode 0600).",
                example="CHANGE-ME",
                default_text="none",
            ),
            Key(
                "password_file",
                PATH,
                "Instead of password: a file (mode 0600) holding it.",
                example="edgex.password",
                default_text="none",
            ),
            Key(
                "keepalive",
                INTEGER,
                "MQTT keepalive on the bus, in seconds.",
                lo=5,
                hi=3600,
                example=30,
                default_text="`[mqtt]` keepalive without a broker of its own, else `30`",
            ),
            Key(
                "ca_file",
                PATH,
                "The CA of the bus's broker certificate.",
                example="ca.crt",
                default_text="`[mqtt]` ca_file without a broker of its own, else the system's CAs",
            ),
            Key(
                "cert_file",
                PATH,
                "The bus connection's client certificate (never [mqtt]'s).",
                example="watch-01.edgex.crt",
                default_text="none",
            ),
            Key(
                "key_file",
                PATH,
                "Its private key (mode 0600).",
                example="watch-01.edgex.key",
                default_text="none",
            ),
        ),
    ),
    Section(
        "insight",
        "Live predictions for building-management systems: the verified global model run on the "
        "device's live windows, published retained (QoS 1) on fedge/v1/FLEET/insight/DEVICE.",
        (
            Key(
                "publish",
                STRING,
                "on_change: only when the predicted class changes (regression: the value moves by more "
                "than min_change) or the model does; every_window: each window; off: no predictions.",
                default="on_change",
                choices=("on_change", "every_window", "off"),
            ),
            Key(
                "min_interval_s",
                NUMBER,
                "At most one prediction published per this many seconds (0: no limit).",
                default=60.0,
                lo=0.0,
                hi=24 * 3600.0,
            ),
            Key(
                "min_change",
                NUMBER,
                "Regression with publish = on_change: the smallest change of the value, in the label's "
                "units, that is published (0: any change).",
                default=0.0,
                lo=0.0,
                hi=1e12,
            ),
            Key(
                "stale_after_s",
                NUMBER,
                "Nothing is published while the newest window ended more than this many seconds "
                "before the device's clock (0: never stale, for replayed historical data).",
                default=900.0,
                lo=0.0,
                hi=10 * 365 * 24 * 3600.0,
            ),
            Key(
                "home_assistant",
                BOOLEAN,
                "Publish a Home Assistant MQTT discovery config (retained) so that Home Assistant shows "
                "the prediction as a sensor (docs/home-assistant.md; `fedge broker config "
                "--home-assistant`).",
                default=False,
            ),
            Key(
                "home_assistant_prefix",
                STRING,
                "Home Assistant's discovery prefix: the config goes to "
                "PREFIX/sensor/fedge_FLEET_DEVICE/prediction/config.",
                default="homeassistant",
            ),
            Key(
                "writeback",
                TABLES,
                "Write-back rules through EdgeX core-command (needs [edgex] core_command), one "
                '[[insight.writeback]] table each: when_label = "occupied" (classification) or '
                "when_above / when_below = NUMBER (regression: when_above < value < when_below); "
                'device = "EdgeX device"; command = "its command"; values = { resource = '
                '"value" } (strings, as core-command takes them); min_interval_s = 300.0 '
                "(1.0..86_400.0). Edge-triggered: one write when the condition starts to hold, at most "
                'one per min_interval_s (docs/edgex.md, "Write-back (core-command)").',
                default=[],
            ),
        ),
    ),
    Section(
        "personalisation",
        "Personal weights for this device's predictions (docs/personalisation.md): after each new global "
        "model, and after the federated update is trained from it, a copy of the global weights is "
        "fine-tuned on the device's own training samples; insight/DEVICE then predicts with it (marked "
        "personal), the federated update never carries it.",
        (
            Key(
                "enabled",
                BOOLEAN,
                "Keep personal weights and predict with them (costs `epochs` more epochs of local "
                "training per global model).",
                default=False,
            ),
            Key(
                "epochs",
                INTEGER,
                "Epochs of fine-tuning per global model, on the training part of [data] (the held-out "
                "part scores the personal and the global weights in the status).",
                default=5,
                lo=1,
                hi=1000,
            ),
        ),
    ),
    _metrics_section(9464, "fedge_agent_*"),
)

AGGREGATOR_SECTIONS = (
    Section(
        "aggregator",
        "The fleet, the model, and the files the aggregator reads and writes.",
        (
            Key(
                "fleet",
                STRING,
                "The fleet id (the topic prefix fedge/v1/FLEET/).",
                required=True,
                example="building-1",
            ),
            Key(
                "model_dir",
                PATH,
                "The model directory `fedge model build` writes (manifest.json, model.tflite, initial "
                "weights).",
                required=True,
                example="model",
            ),
            Key(
                "model_generation",
                INTEGER,
                "Raise it by one to roll a running fleet to a new model or task in model_dir: the "
                "checkpoint of the previous generation is continued, not refused; never lower it.",
                default=1,
                lo=1,
                hi=1_000_000,
            ),
            Key(
                "state_dir",
                PATH,
                "Where the checkpoint is written (shared by replicas under leader election).",
                required=True,
                example="state",
            ),
            Key(
                "registry",
                PATH,
                "The device registry (`fedge enroll`), reloaded between rounds.",
                required=True,
                example="devices.toml",
            ),
            Key(
                "box_key_file",
                PATH,
                "The aggregator's private box key (mode 0600; `fedge keys aggregator`).",
                required=True,
                example="keys/aggregator.box",
            ),
            Key(
                "signing_key_file",
                PATH,
                "The aggregator's private signing key (mode 0600; `fedge keys aggregator`).",
                required=True,
                example="keys/aggregator.sign",
            ),
            Key(
                "exit_when_done",
                BOOLEAN,
                "Exit (code 0) once the final model is published, instead of serving it until stopped.",
                default=False,
            ),
            Key(
                "heartbeat_file",
                PATH,
                "The file the round loop touches, for a liveness probe.",
                example="/tmp/fedge-aggregator.heartbeat",
                default_text="`<state_dir>/heartbeat`",
            ),
            Key(
                "chunk_bytes",
                INTEGER,
                "A blob larger than this is published in retained pieces of this size, and device "
                "update pieces are taken up to it: keep it under the broker's max_packet_size.",
                default=256 * 1024,  # fedge.protocol.chunks.DEFAULT_CHUNK_BYTES (a test keeps them equal)
                lo=1024,
                hi=64 * 1024 * 1024,
            ),
            Key(
                "chunk_transfers_per_device",
                INTEGER,
                "How many chunked updates of one device are put together at once.",
                default=2,
                lo=1,
                hi=64,
            ),
            Key(
                "chunk_budget_bytes",
                INTEGER,
                "The most memory all chunked updates being put together may take, in bytes.",
                default=128 * 1024 * 1024,
                lo=1024 * 1024,
                hi=64 * 1024**3,
            ),
        ),
    ),
    Section(
        "mqtt",
        "The connection to the fleet's broker.",
        _mqtt_keys("aggregator", "fedge-aggregator-building-1"),
    ),
    Section(
        "rounds",
        "How rounds run, and what bounds one device's influence on a round. Every key optional: "
        "these are the deployment defaults.",
        (
            Key(
                "rounds",
                INTEGER,
                "Training rounds before the final model is published.",
                default=20,
                lo=1,
                hi=1_000_000,
            ),
            Key(
                "min_devices",
                INTEGER,
                "A round aggregates only with at least this many accepted updates, else it is "
                "aborted and retried under a new version.",
                default=2,
                lo=1,
                hi=1_000_000,
            ),
            Key(
                "devices_per_round",
                INTEGER,
                "Devices selected per round (a seeded random sample); 0 = every enrolled device. "
                "Not below min_devices.",
                default=0,
                lo=0,
                hi=1_000_000,
            ),
            Key(
                "round_timeout_s",
                NUMBER,
                "A round closes when every selected device reported, or after this many seconds.",
                default=60.0,
                lo=0.1,
                hi=7 * 24 * 3600.0,
            ),
            Key(
                "server_learning_rate",
                NUMBER,
                "The new model is global + server_learning_rate x mean delta (x the server "
                "optimizer's step with a server optimizer: fedadagrad, fedadam and fedyogi want "
                "0.01-0.1).",
                default=1.0,
                lo=1e-6,
                hi=100.0,
            ),
            Key(
                "codec",
                STRING,
                "How devices encode their deltas: dense (fp32, fp16, int8) or sparse, each tensor's "
                "largest values only with error feedback on the device (topk-fp16, topk-int8; not "
                "with [privacy] enabled or secure_aggregation).",
                default="fp32",
                choices=("fp32", "fp16", "int8", "topk-fp16", "topk-int8"),
            ),
            Key(
                "topk_fraction",
                NUMBER,
                "With a sparse codec: the share of each tensor's values an update carries (0.1 keeps "
                "a har-watch topk-int8 update under a tenth of fp32). Ignored by the dense codecs.",
                default=0.1,
                lo=0.001,
                hi=0.5,
            ),
            Key(
                "max_examples_per_update",
                INTEGER,
                "An update claiming more examples than this is rejected (a sanity bound).",
                default=1_000_000,
                lo=1,
                hi=2**31 - 1,
            ),
            Key(
                "max_update_bytes",
                INTEGER,
                "The largest message accepted on update/+; 0 derives it from the model and the codec.",
                default=0,
                lo=0,
                hi=256 * 1024 * 1024,
                note="0, or at least 1_024",
            ),
            Key(
                "manifest_ttl_s",
                NUMBER,
                "Devices refuse a manifest this many seconds after its round's deadline (1 day).",
                default=24 * 3600.0,
                lo=1.0,
                hi=365 * 24 * 3600.0,
            ),
            Key(
                "wait_for_devices_s",
                NUMBER,
                "Before the first round, wait up to this many seconds for the enrolled devices to "
                "come online and report ready.",
                default=30.0,
                lo=0.0,
                hi=24 * 3600.0,
            ),
            Key(
                "selection_seed",
                INTEGER,
                "Seed of the per-round device sample.",
                default=0,
                lo=0,
                hi=2**31 - 1,
            ),
            Key(
                "weighting",
                STRING,
                "equal: every accepted update counts once; examples: by its claimed example count, "
                "capped at example_cap_ratio x the previous round's median claim.",
                default="equal",
                choices=("equal", "examples"),
            ),
            Key(
                "example_cap_ratio",
                NUMBER,
                'With weighting = "examples": the cap on one update\'s weight, relative to the '
                "previous round's median claim.",
                default=1.0,
                lo=0.01,
                hi=1000.0,
            ),
            Key(
                "max_update_norm",
                NUMBER,
                "Absolute bound on an update's L2 norm; 0 = not set.",
                default=0.0,
                lo=0.0,
                hi=1e12,
            ),
            Key(
                "update_norm_ratio",
                NUMBER,
                "Bound on an update's L2 norm relative to the larger of the global and the initial "
                "model's norm; 0 = off.",
                default=0.5,
                lo=0.0,
                hi=1e6,
            ),
            Key(
                "update_norm_adaptive",
                NUMBER,
                "Bound relative to the median norm of the previous train round's updates; 0 = off.",
                default=1.0,
                lo=0.0,
                hi=1e6,
            ),
            Key(
                "update_norm_policy",
                STRING,
                "An update over the absolute or ratio bound is clipped to it, or rejected; the "
                "adaptive bound always clips.",
                default="clip",
                choices=("clip", "reject"),
            ),
            Key(
                "moments_aggregation",
                STRING,
                "robust: outlying device means excluded and variances capped; pooled: the exact "
                "pooled statistics (one device can move the normalisation).",
                default="robust",
                choices=("robust", "pooled"),
            ),
            Key(
                "strategy",
                STRING,
                "How a train round's updates become the next model (docs/strategies.md): fedavg "
                "(the mean); a server optimizer on the mean (fedavgm, fedadagrad, fedadam, "
                "fedyogi); a robust aggregator holding every update (median, trimmed_mean, krum, "
                "multi_krum; not with [privacy] enabled or secure_aggregation).",
                default="fedavg",
                choices=(
                    "fedavg",
                    "fedavgm",
                    "fedadagrad",
                    "fedadam",
                    "fedyogi",
                    "median",
                    "trimmed_mean",
                    "krum",
                    "multi_krum",
                ),
            ),
            Key(
                "server_momentum",
                NUMBER,
                "fedavgm: m = server_momentum x m + mean delta.",
                default=0.9,
                lo=0.0,
                hi=0.999,
            ),
            Key(
                "server_beta1",
                NUMBER,
                "fedadagrad, fedadam, fedyogi: decay of the first moment m.",
                default=0.9,
                lo=0.0,
                hi=0.999,
            ),
            Key(
                "server_beta2",
                NUMBER,
                "fedadam, fedyogi: decay of the second moment v.",
                default=0.99,
                lo=0.0,
                hi=0.999999,
            ),
            Key(
                "server_tau",
                NUMBER,
                "fedadagrad, fedadam, fedyogi: the adaptivity, step = lr x m / (sqrt(v) + tau).",
                default=1e-3,
                lo=1e-9,
                hi=10.0,
            ),
            Key(
                "trim_fraction",
                NUMBER,
                "trimmed_mean: the fraction of values dropped from each end, per coordinate.",
                default=0.1,
                lo=0.0,
                hi=0.49,
            ),
            Key(
                "byzantine_devices",
                INTEGER,
                "krum, multi_krum: f, the compromised devices assumed per round (min_devices must "
                "be at least 2f + 3).",
                default=1,
                lo=0,
                hi=100_000,
            ),
            Key(
                "multi_krum_select",
                INTEGER,
                "multi_krum: how many best-scored updates are averaged; 0 = n - f.",
                default=0,
                lo=0,
                hi=1_000_000,
            ),
            Key(
                "robust_max_updates",
                INTEGER,
                "Robust strategies hold a round's updates in memory: at most this many (more are "
                "rejected, too_many_updates). Not below min_devices.",
                default=1000,
                lo=1,
                hi=1_000_000,
            ),
            Key(
                "aggregation",
                STRING,
                "sync: a round waits for every selected device or its deadline; async: buffered "
                "asynchronous aggregation (FedBuff, docs/async.md), a new version every buffer_size "
                "accepted updates, stale updates weighted 1/sqrt(1+staleness). async: fedavg or a "
                "server optimizer, without [privacy], [replicas] or [upstream].",
                default="sync",
                choices=("sync", "async"),
            ),
            Key(
                "buffer_size",
                INTEGER,
                "async: K, the accepted updates that publish a new version (not below min_devices).",
                default=3,
                lo=1,
                hi=100_000,
            ),
            Key(
                "max_staleness",
                INTEGER,
                "async: S, how many versions behind the newest an update's base may be (older: "
                "refused, stale).",
                default=4,
                lo=0,
                hi=1000,
            ),
        ),
    ),
    Section(
        "privacy",
        "Client-level differential privacy (docs/differential-privacy.md). Off by default: it "
        "costs accuracy, and a fleet opts in. With it on, devices clip their updates to the bound "
        "the signed manifest announces, the aggregator adds Gaussian noise to the sum, and "
        'training stops before the epsilon budget is overspent; needs [rounds] weighting = "equal".',
        (
            Key("enabled", BOOLEAN, "Differentially private rounds.", default=False),
            Key(
                "noise",
                STRING,
                "central: the aggregator adds the noise to the sum of clipped updates; "
                "distributed_discrete_gaussian (with secure_aggregation): each device adds its share "
                "before masking, so no one sees the sum un-noised.",
                default="central",
                choices=("central", "distributed_discrete_gaussian"),
            ),
            Key(
                "epsilon_budget",
                NUMBER,
                "The most epsilon (per device, whole training) the fleet may spend; training "
                "stops before a round would exceed it.",
                default=8.0,
                lo=1e-3,
                hi=1e6,
            ),
            Key(
                "target_delta",
                NUMBER,
                "The delta epsilon is computed at; keep it well below 1 / number of devices.",
                default=1e-5,
                lo=1e-12,
                hi=0.1,
            ),
            Key(
                "noise_multiplier",
                NUMBER,
                "Noise standard deviation over the clip bound; 0 derives the smallest that fits "
                "[rounds] rounds in epsilon_budget.",
                default=0.0,
                lo=0.0,
                hi=1e4,
            ),
            Key(
                "clip_bound",
                NUMBER,
                "The L2 bound devices clip their update to (the first one, with adaptive clipping).",
                default=0.1,
                lo=1e-9,
                hi=1e9,
            ),
            Key(
                "adaptive_clipping",
                BOOLEAN,
                "Move the bound towards the target_quantile of the update norms each round "
                "(Andrew et al. 2021), from a noised count.",
                default=True,
            ),
            Key(
                "target_quantile",
                NUMBER,
                "Adaptive clipping: the fraction of updates meant to fit within the bound.",
                default=0.5,
                lo=0.0,
                hi=1.0,
            ),
            Key(
                "clip_learning_rate",
                NUMBER,
                "Adaptive clipping: how fast the bound moves (the paper's eta).",
                default=0.2,
                lo=1e-6,
                hi=10.0,
            ),
            Key(
                "clip_count_stddev",
                NUMBER,
                "Adaptive clipping: the noise on the count of unclipped updates, in devices; 0 "
                "uses the noise multiplier.",
                default=0.0,
                lo=0.0,
                hi=1e6,
            ),
            Key(
                "sampling_rate",
                NUMBER,
                "The chance a device takes part in a round, for the accountant; below 1 only holds "
                "with secret, random selection (a warning says so).",
                default=1.0,
                lo=1e-6,
                hi=1.0,
            ),
            Key(
                "accountant",
                STRING,
                "rdp (fast, standard) or pld (tighter), from Google's dp-accounting.",
                default="rdp",
                choices=("rdp", "pld"),
            ),
            Key(
                "secure_aggregation",
                BOOLEAN,
                "Secure aggregation (SecAgg+, docs/secure-aggregation.md): the aggregator sees only "
                "the sum of each train round's updates; devices clip to the [rounds] norm bound "
                'before masking. Not with enabled = true yet; needs weighting = "equal", '
                "min_devices >= 3 and max_update_norm or update_norm_ratio.",
                default=False,
            ),
            Key(
                "secure_aggregation_bits",
                INTEGER,
                "Secure aggregation: the masked sum is modulo 2**bits (fewer bits: coarser "
                "quantisation of the updates).",
                default=32,
                lo=16,
                hi=62,
            ),
            Key(
                "secure_aggregation_threshold",
                INTEGER,
                "Secure aggregation: the Shamir threshold t (> half the graph degree); 0 chooses "
                "it per round for the selected devices. A round it does not fit is aborted.",
                default=0,
                lo=0,
                hi=1000,
                note="0, or at least 2",
            ),
        ),
    ),
    Section(
        "leader",
        "Leader election between aggregator replicas through a Kubernetes Lease "
        "(retry_period_s < renew_deadline_s < lease_duration_s).",
        (
            Key(
                "mode",
                STRING,
                "auto: on exactly inside a Kubernetes pod (KUBERNETES_SERVICE_HOST set); on; off.",
                default="auto",
                choices=("auto", "on", "off"),
            ),
            Key(
                "lease_name",
                STRING,
                "The Lease (k8s/base/rbac.yaml grants exactly this name).",
                default="fedge-aggregator-leader",
            ),
            Key(
                "namespace",
                STRING,
                "Where the Lease and the status ConfigMap live.",
                example="fedge",
                default_text="`POD_NAMESPACE`, else the service account's namespace file",
            ),
            Key(
                "identity",
                STRING,
                "This replica's name in the Lease (holderIdentity).",
                example="fedge-aggregator-0",
                default_text="`POD_NAME`, else the hostname",
            ),
            Key(
                "lease_duration_s",
                INTEGER,
                "Another replica may take the Lease this many seconds after the leader's last renew.",
                default=15,
                lo=2,
                hi=3600,
            ),
            Key(
                "renew_deadline_s",
                NUMBER,
                "A leader that could not renew for this many seconds steps down (exit code 75).",
                default=10.0,
                lo=0.1,
                hi=3600.0,
            ),
            Key(
                "retry_period_s",
                NUMBER,
                "Seconds between attempts to acquire or renew the Lease.",
                default=2.0,
                lo=0.05,
                hi=3600.0,
            ),
            Key(
                "status_configmap",
                STRING,
                'The ConfigMap the leader keeps its status in; "" for none.',
                default="fedge-aggregator-status",
            ),
            Key(
                "status_interval_s",
                NUMBER,
                "At most one status ConfigMap update per this many seconds.",
                default=10.0,
                lo=0.1,
                hi=24 * 3600.0,
            ),
            Key(
                "api_url",
                STRING,
                "The Kubernetes API, e.g. http://127.0.0.1:8001 from `kubectl proxy` (needed with "
                'mode = "on" outside a pod).',
                example="http://127.0.0.1:8001",
                default_text="the in-cluster service account",
            ),
        ),
    ),
    Section(
        "replicas",
        "A leader and workers sharing the fleet's updates through an MQTT shared subscription "
        "(docs/scale.md): each worker folds its share and sends the leader sealed partials. FedAvg "
        "and the server optimizers only, plain rounds only (no robust strategy, no [privacy]).",
        (
            Key(
                "enabled",
                BOOLEAN,
                "Subscribe to update/+ through $share/{share_group}/ and take workers' partials "
                "(the leader); needed by workers too.",
                default=False,
            ),
            Key(
                "role",
                STRING,
                "leader: runs the rounds; worker: folds a share of the updates and sends partials.",
                default="leader",
                choices=("leader", "worker"),
            ),
            Key(
                "worker_id",
                STRING,
                "A worker's name in aggregator/partial/{worker_id} and its MQTT client id: stable "
                "across restarts (a StatefulSet pod name), so a restarted worker resumes its session.",
                example="fedge-aggregator-worker-0",
                default_text="`POD_NAME`, else the hostname",
            ),
            Key(
                "share_group",
                STRING,
                "The shared subscription's group: the leader and its workers.",
                default="fedge-aggregators",
            ),
            Key(
                "flush_updates",
                INTEGER,
                "A worker sends a partial once it handled this many updates ...",
                default=64,
                lo=1,
                hi=10_000,
            ),
            Key(
                "flush_interval_s",
                NUMBER,
                "... or this many seconds after the first of them.",
                default=0.2,
                lo=0.01,
                hi=60.0,
            ),
            Key(
                "partial_grace_s",
                NUMBER,
                "How long past a round's deadline the leader waits for partials of updates its "
                "workers accepted in time (at least twice flush_interval_s).",
                default=2.0,
                lo=0.0,
                hi=600.0,
            ),
        ),
    ),
    Section(
        "upstream",
        "A building gateway under a campus aggregator (two-tier aggregation, docs/scale.md): rounds "
        "follow the campus's, whose manifests and weights come over the building broker's bridge "
        "(fedge broker config --bridge-to); each closed round sends the campus one sealed contribution.",
        (
            Key("enabled", BOOLEAN, "This aggregator is a building gateway under a campus.", default=False),
            Key("campus_fleet", STRING, "The campus aggregator's fleet id.", example="campus"),
            Key(
                "building_id", STRING, "This building's device id in the campus fleet.", example="building-1"
            ),
            Key(
                "campus_verify_keys",
                STRINGS,
                "The campus aggregator's signing keys (fedge keys show), as devices pin theirs.",
                example=["<base64 Ed25519 verify key>"],
            ),
            Key(
                "campus_public_key",
                STRING,
                "The campus aggregator's box public key, which contributions are sealed to.",
                example="<base64 X25519 public key>",
            ),
            Key(
                "key_file",
                PATH,
                "The building's own box private key for the campus (enrolled in the campus registry).",
                example="keys/building-1.campus.box",
            ),
            Key(
                "margin_s",
                NUMBER,
                "The building's round closes at least this long before the campus deadline.",
                default=2.0,
                lo=0.0,
                hi=3600.0,
            ),
        ),
    ),
    Section(
        "rollout",
        "The rollout gate (docs/rollout.md): training follows every new global model, but devices "
        "predict with a new one only once the fleet's federated evaluation shows it is not worse than "
        "the one they predict with (promotions and refusals are signed; fedge model rollback goes back).",
        (
            Key(
                "gate",
                BOOLEAN,
                "Promote a new global model to the devices' predictions only when it is not worse than "
                "the promoted one by more than margin (false: predictions follow every new model).",
                default=True,
            ),
            Key(
                "margin",
                NUMBER,
                "How much worse a candidate may score and still be promoted: accuracy points (0.01 = one "
                "point) or, for regression, a relative MSE increase (0.01 = 1 %).",
                default=0.01,
                lo=0.0,
                hi=1.0,
            ),
            Key(
                "keep",
                INTEGER,
                "Promoted versions whose weights are kept for fedge model rollback.",
                default=5,
                lo=1,
                hi=100,
            ),
            Key(
                "validation_file",
                PATH,
                "The operator's own labelled set (.npz of x: raw window features, y: class indices or "
                "values): candidates must not be worse there either (docs/rollout.md).",
                example="validation.npz",
            ),
        ),
    ),
    _metrics_section(9465, "fedge_aggregator_*"),
)

#: Each service's tables, in the order the example writes them.
SERVICES: dict[str, tuple[Section, ...]] = {"agent": AGENT_SECTIONS, "aggregator": AGGREGATOR_SECTIONS}

#: The example's opening comment, paragraph by paragraph (wrapped when written).
_HEADER = (
    "fedge {service} configuration ({service}.toml): every key, with its default and what it does. "
    "Written by `fedge {service} config --example`; reference: docs/configuration.md. Start the "
    "service with `fedge {service} run --config {service}.toml`.",
    "Relative paths are resolved against this file's directory. Any key can also be set by an "
    "environment variable {env}__TABLE__KEY (e.g. {env}__MQTT__PASSWORD), whose value is read as "
    "TOML when it parses, else as a string. Unknown tables and keys are errors. A file that holds "
    "a password must be mode 0600.",
    'A key written out holds its default, or, marked "required", a value to replace with your own. '
    'A commented-out key ("# key = ...") is unset or derived from other settings until you set it.',
)


def _comment(text: str, prefix: str = "## ") -> list[str]:
    return textwrap.wrap(text, WIDTH - len(prefix), initial_indent=prefix, subsequent_indent=prefix)


def _facts(key: Key) -> str:
    kind = f"{key.kind} (relative to this file)" if key.kind == PATH else key.kind
    if key.choices:
        kind += ": one of " + ", ".join(key.choices)
    elif key.lo is not None and key.hi is not None:
        kind += f" in {number_text(key.lo)}..{number_text(key.hi)}"
    if key.note:
        kind += f" ({key.note})"
    if key.required:
        state = "required"
    elif key.default is not None:
        state = f"default {toml_value(key.default)}"
    else:
        state = "default: " + (key.default_text or "not set").replace("`", "")
    return f"{kind}; {state}"


def example_config(service: str, values: Mapping[str, Mapping[str, object]] | None = None) -> str:
    """The example config of ``service`` ("agent" or "aggregator") as TOML text.

    ``values`` (table -> key -> value) sets keys to values of one's own, written out (not
    commented): the aggregator keys of an agent's config, for instance.
    """
    try:
        sections = SERVICES[service]
    except KeyError:
        raise ValueError(f"unknown service {service!r}; known: {', '.join(SERVICES)}") from None
    chosen = {table: dict(keys) for table, keys in (values or {}).items()}
    names = {s.name: s for s in sections}
    for table, keys in chosen.items():
        if table not in names:
            raise ValueError(f"{service} has no table [{table}]")
        for name in keys:
            names[table].key(name)  # KeyError for an unknown key
    env = f"FEDGE_{service.upper()}"
    lines: list[str] = []
    for paragraph in _HEADER:
        lines += [*(["#"] if lines else []), *_comment(paragraph.format(service=service, env=env), "# ")]
    for section in sections:
        lines += ["", "", f"[{section.name}]", *_comment(section.help)]
        own = chosen.get(section.name, {})
        for key in section.keys:
            lines += ["", *_comment(key.help), *_comment(_facts(key))]
            if key.name in own:
                lines.append(f"{key.name} = {toml_value(own[key.name])}")
            elif key.default is not None:
                lines.append(f"{key.name} = {toml_value(key.default)}")
            elif key.required:
                lines.append(f"{key.name} = {toml_value(key.example)}")
            else:
                lines.append(f"# {key.name} = {toml_value(key.example)}")
    return "\n".join(lines) + "\n"


def cmd_config(args: argparse.Namespace) -> int:
    sys.stdout.write(example_config(args.config_service))
    return 0


def add_config_commands(agent_sub: Any, aggregator_sub: Any) -> None:
    """Adds ``config --example`` to the subparsers of ``fedge agent`` and ``fedge aggregator``
    (next to their ``run``)."""
    for service, sub in (("agent", agent_sub), ("aggregator", aggregator_sub)):
        config = sub.add_parser(
            "config",
            help=f"print a complete, commented example {service}.toml",
            description=f"Prints an example {service}.toml: every table and key, with its default, "
            "range and what it does (docs/configuration.md).",
        )
        config.add_argument(
            "--example",
            action="store_true",
            required=True,
            help="print the example config on stdout",
        )
        config.set_defaults(func=cmd_config, config_service=service)
