"""``fedge aggregator retire``: take a fleet off the broker for good.

An aggregator leaves retained messages behind: the signed round manifest, the model and weights
blobs, its status, the fleet summary and the key-rotation documents. A retired fleet must not
keep serving them (a device provisioned by mistake would train the old model; a building-management system
would show a fleet that no longer runs). Retiring clears each of them with an empty retained
message, through the aggregator's own broker account (the only one allowed to write there),
and moves the checkpoint (and its previous copy) aside, so an aggregator started again with
the same config does not resume the fleet. A retired fleet's name is not reused: devices accept
only newer manifest versions, so a new fleet gets a new name (``fedge keys``, docs/own-data.md).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt

from fedge.aggregator.checkpoint import load_checkpoint, previous_path
from fedge.aggregator.config import AggregatorConfig
from fedge.aggregator.rollout import read_gate_state
from fedge.aggregator.service import CHECKPOINT_FILE, MAX_CHECKPOINT_BYTES, ROTATION_FILE_PREFIX, load_model
from fedge.protocol.config_source import ConfigError
from fedge.protocol.errors import FedgeError
from fedge.protocol.topics import FleetTopics
from fedge.shell.mqtt import connect, make_client

RETIRED_SUFFIX = ".retired"


@dataclass(frozen=True)
class Retirement:
    """What a retirement did: the retained topics it cleared and where the checkpoint went."""

    cleared: tuple[str, ...]
    checkpoint: Path | None


def retained_topics(config: AggregatorConfig) -> list[str]:
    """Every retained topic this fleet's aggregator may have published: manifest, status, fleet
    summary, the model blob, the checkpoint's current weights blob, the rollout gate's decisions and
    kept weights blobs, and every rotation document beside the signing key."""
    topics = FleetTopics(config.fleet)
    found = [
        topics.manifest,
        topics.aggregator_status,
        topics.fleet_summary,
        topics.blob(load_model(config.model_dir).manifest.model_sha256),
    ]
    ck = load_checkpoint(config.state_dir / CHECKPOINT_FILE, MAX_CHECKPOINT_BYTES)
    if ck is not None:
        weights = ck.metadata.get("published_weights_sha256")
        model = ck.metadata.get("model_sha256")
        found += [topics.blob(sha) for sha in (weights, model) if isinstance(sha, str)]
    # The rollout gate's decisions and every promoted weights blob it may have kept retained.
    found += [topics.rollout, topics.rollout_decision]
    try:
        gate = read_gate_state(config.state_dir)
    except FedgeError:
        gate = None  # unreadable: the promoted blobs it named cannot be found (the topics still go)
    found += [topics.blob(p.weights_sha256) for p in gate.history] if gate is not None else []
    for path in sorted(config.signing_key_file.parent.glob(f"{ROTATION_FILE_PREFIX}[0-9]*")):
        suffix = path.name[len(ROTATION_FILE_PREFIX) :]
        if suffix.isdigit():
            found.append(topics.rotation(int(suffix)))
    return list(dict.fromkeys(found))


def retire_fleet(config: AggregatorConfig, timeout_s: float = 30.0) -> Retirement:
    """Clears the fleet's retained messages (each acknowledged by the broker), then renames the
    checkpoint to ``checkpoint.bin.retired``. Stop every aggregator replica first."""
    topics = retained_topics(config)
    connected = threading.Event()
    refused: list[str] = []

    def on_connect(
        client: mqtt.Client, userdata: object, flags: object, reason: object, props: object
    ) -> None:
        if getattr(reason, "is_failure", False):
            refused.append(str(reason))
        connected.set()

    client = make_client(config.mqtt, f"fedge-retire-{config.fleet}", persistent=False)
    client.on_connect = on_connect
    connect(client, config.mqtt)
    client.loop_start()
    try:
        if not connected.wait(timeout_s) or refused:
            why = f"refused: {refused[0]}" if refused else f"no answer within {timeout_s:.0f} s"
            raise ConfigError(
                f"cannot reach the broker {config.mqtt.url} ({why}); check [mqtt] in the "
                "aggregator's config (the retirement must use the aggregator's account)"
            )
        infos = [client.publish(topic, b"", qos=1, retain=True) for topic in topics]
        deadline = time.monotonic() + timeout_s
        for info in infos:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            if not info.is_published():
                raise FedgeError(
                    f"the broker did not acknowledge clearing the fleet within {timeout_s:.0f} s"
                )
    finally:
        client.disconnect()
        client.loop_stop()
    checkpoint = config.state_dir / CHECKPOINT_FILE
    moved: Path | None = None
    # Both files: with the latest gone, load_checkpoint would resume from the previous one.
    for path in (previous_path(checkpoint), checkpoint):
        if path.exists():
            target = path.with_name(path.name + RETIRED_SUFFIX)
            path.replace(target)
            moved = target if path == checkpoint else moved
    return Retirement(tuple(topics), moved)
