"""The fleet's current signed global model, fetched from the broker as a device fetches it.

``fedge evaluate --global BROKER_URL --fleet FLEET --verify-key FILE`` scores the model the
aggregator last published: the retained round manifest on ``fedge/{fleet}/manifest``, verified
with the device core's own :func:`~fedge.agent.core.verify_manifest` against the aggregator's
verify key(s), then the retained model and weights blobs it names (``blob/<sha256>``), each
checked with :func:`~fedge.agent.core.check_blob` and against the manifest's sizes.

Unlike a device, expiry is not checked (``now=None``): the last manifest of a finished fleet
(phase ``final``) has expired, and scoring it is the point. Everything else a device refuses
(``unknown_key``, ``bad_signature``, another fleet's manifest, ...) is refused here, naming the
reason, as is a blob of the wrong hash or size. Nothing arriving in time is a one-line error too.
"""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from nacl.signing import VerifyKey
from paho.mqtt.reasoncodes import ReasonCode

from fedge.agent.core import ManifestRejected, check_blob, verify_manifest
from fedge.protocol.config_source import ConfigError, parse_toml
from fedge.protocol.errors import FedgeError
from fedge.protocol.mqtt_settings import MqttSettings
from fedge.protocol.round_manifest import RoundManifest
from fedge.protocol.signing import key_id, verify_key_from_text
from fedge.protocol.topics import FleetTopics
from fedge.shell.files import read_config_file
from fedge.shell.mqtt import make_client

#: How long ``fedge evaluate --global`` waits for the manifest and its blobs by default.
DEFAULT_TIMEOUT_S = 30.0
#: A verify key file is a key, a ``fedge keys aggregator`` output or an agent config.
MAX_VERIFY_KEY_FILE_BYTES = 1024 * 1024
#: The aggregator's private signing key, as ``fedge keys aggregator`` names it.
SIGNING_KEY_FILE = "aggregator.sign"


class GlobalModelError(FedgeError):
    """The global model cannot be fetched or trusted; the message says which and why."""


@dataclass(frozen=True)
class GlobalModel:
    """A verified manifest and the blobs it names (both checked by hash and size)."""

    manifest: RoundManifest
    model: bytes
    weights: bytes

    def describe(self) -> dict[str, Any]:
        """What was scored, for the report."""
        m = self.manifest
        return {
            "fleet": m.fleet,
            "version": m.version,
            "round_number": m.round_number,
            "round_id": m.round_id,
            "phase": m.phase,
            "issued_at": m.issued_at,
            "manifest_sha256": m.sha256(),
            "weights_sha256": m.weights_sha256,
        }


# --- the trusted verify key ---------------------------------------------------------------------


def read_verify_keys(path: Path) -> dict[str, VerifyKey]:
    """The aggregator verify key(s) in ``path``, by key id. The file may hold:

    - the base64 verify key alone (one line);
    - what ``fedge keys aggregator`` prints: its TOML line ``aggregator_verify_keys = [...]``
      (also an agent config, whose ``[agent]`` table has it) or its ``--json`` object
      (``verify_key``).

    The private signing key (``aggregator.sign``) is refused: it never leaves the aggregator.
    """
    if path.name == SIGNING_KEY_FILE:
        raise GlobalModelError(
            f"{path} is the aggregator's private signing key; pass its verify key (the "
            "aggregator_verify_keys line fedge keys aggregator printed, or the base64 key alone)"
        )
    try:
        raw, _ = read_config_file(path, MAX_VERIFY_KEY_FILE_BYTES, "--verify-key")
        text = raw.decode("utf-8").strip()
    except ConfigError as exc:
        raise GlobalModelError(str(exc)) from None
    except UnicodeDecodeError:
        raise GlobalModelError(f"--verify-key {path} is not UTF-8 text") from None
    texts = _key_texts(text, path)
    try:
        keys = [verify_key_from_text(t) for t in texts]
    except FedgeError as exc:
        raise GlobalModelError(f"--verify-key {path}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise GlobalModelError(f"--verify-key {path}: not a verify key: {exc}") from None
    return {key_id(k): k for k in keys}


def _key_texts(text: str, path: Path) -> list[str]:
    if not text:
        raise GlobalModelError(f"--verify-key {path} is empty")
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            raise GlobalModelError(f"--verify-key {path} is not valid JSON") from None
        found = data.get("verify_key") if isinstance(data, dict) else None
        if not isinstance(found, str):
            raise GlobalModelError(f'--verify-key {path}: expected {{"verify_key": "..."}}')
        return [found]
    if "\n" not in text and "=" not in text.rstrip("="):  # base64 ends in '=' padding
        return [text]
    try:
        data = parse_toml(text, str(path))
    except ConfigError as exc:
        raise GlobalModelError(f"--verify-key {exc}") from None
    agent = data.get("agent")
    found = data.get(
        "aggregator_verify_keys", agent.get("aggregator_verify_keys") if isinstance(agent, dict) else None
    )
    if not isinstance(found, list) or not found or not all(isinstance(k, str) for k in found):
        raise GlobalModelError(
            f'--verify-key {path}: no aggregator_verify_keys = ["..."] (a list of base64 keys)'
        )
    return list(found)


# --- fetching -----------------------------------------------------------------------------------


def fetch_global_model(
    settings: MqttSettings,
    fleet: str,
    trusted: Mapping[str, VerifyKey],
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> GlobalModel:
    """The fleet's current global model: the retained manifest (verified, expiry not checked)
    and its blobs. Raises :class:`GlobalModelError` naming the problem: no connection, no
    manifest or no blobs within ``timeout_s``, a refused manifest (its reason), a bad blob."""
    topics = FleetTopics(fleet)
    events: queue.Queue[tuple[str, Any, bytes]] = queue.Queue()

    def on_connect(c: mqtt.Client, u: object, f: object, reason: ReasonCode, p: object = None) -> None:
        events.put(("connect", reason, b""))

    def on_message(c: mqtt.Client, u: object, message: mqtt.MQTTMessage) -> None:
        events.put(("message", message.topic, bytes(message.payload)))

    try:
        client = make_client(settings, persistent=False)
    except ConfigError as exc:  # an unreadable --ca-file: the command's input
        raise GlobalModelError(str(exc)) from None
    client.on_connect = on_connect
    client.on_message = on_message
    until = time.monotonic() + timeout_s
    connected = False
    refused: str | None = None
    manifest: RoundManifest | None = None
    blobs: dict[str, bytes] = {}
    client.connect_async(settings.host, settings.port, settings.keepalive)
    client.loop_start()
    try:
        while True:
            if manifest is not None and {manifest.model_sha256, manifest.weights_sha256} <= set(blobs):
                return GlobalModel(manifest, blobs[manifest.model_sha256], blobs[manifest.weights_sha256])
            remaining = until - time.monotonic()
            if remaining <= 0:
                raise GlobalModelError(
                    _timeout_message(settings, topics, timeout_s, connected, refused, manifest, blobs)
                )
            try:
                kind, what, payload = events.get(timeout=min(0.2, remaining))
            except queue.Empty:
                continue
            if kind == "connect":
                if what.is_failure:
                    refused = str(what)
                    continue
                connected = True
                client.subscribe(topics.manifest, qos=1)
                if manifest is not None:
                    _subscribe_blobs(client, topics, manifest)
            elif what == topics.manifest:
                if not payload:  # a cleared retained manifest: nothing to score (yet)
                    continue
                newer = _verified(payload, trusted, fleet)
                if manifest is None or newer.version > manifest.version:
                    manifest = newer
                    _subscribe_blobs(client, topics, manifest)
            elif manifest is not None:
                _keep_blob(what, payload, manifest, topics, blobs)
    finally:
        client.loop_stop()
        client.disconnect()


def _verified(frame: bytes, trusted: Mapping[str, VerifyKey], fleet: str) -> RoundManifest:
    try:
        return verify_manifest(frame, trusted, fleet=fleet, now=None)
    except ManifestRejected as exc:
        hint = (
            " (is --verify-key the fleet's aggregator verify key?)"
            if exc.reason in ("unknown_key", "bad_signature")
            else ""
        )
        raise GlobalModelError(
            f"the round manifest of fleet {fleet} was refused: {exc.reason}: {exc.detail}{hint}"
        ) from None


def _subscribe_blobs(client: mqtt.Client, topics: FleetTopics, manifest: RoundManifest) -> None:
    for sha in (manifest.model_sha256, manifest.weights_sha256):
        client.subscribe(topics.blob(sha), qos=1)


def _keep_blob(
    topic: str, payload: bytes, manifest: RoundManifest, topics: FleetTopics, blobs: dict[str, bytes]
) -> None:
    sizes = {manifest.model_sha256: manifest.model_bytes, manifest.weights_sha256: manifest.weights_bytes}
    sha = next((s for s in sizes if topics.blob(s) == topic), None)
    if sha is None or not payload:  # an older manifest's blob, or a cleared one
        return
    problem = check_blob(sha, payload, set(sizes))
    if problem is None and len(payload) != sizes[sha]:
        problem = ("blob_size_mismatch", f"{len(payload)} bytes, the manifest says {sizes[sha]}")
    if problem is not None:
        raise GlobalModelError(
            f"blob {sha[:16]} of manifest v{manifest.version} was refused: {problem[0]}: {problem[1]}"
        )
    blobs[sha] = payload


def _timeout_message(
    settings: MqttSettings,
    topics: FleetTopics,
    timeout_s: float,
    connected: bool,
    refused: str | None,
    manifest: RoundManifest | None,
    blobs: Mapping[str, bytes],
) -> str:
    if not connected:
        why = (
            f"the broker refused it: {refused}"
            if refused
            else "check the URL, --username, --password-file and --ca-file"
        )
        return f"no connection to the broker at {settings.url} within {timeout_s:g} s ({why})"
    if manifest is None:
        return (
            f"no round manifest on {topics.manifest} within {timeout_s:g} s: check --fleet, and that "
            "the aggregator has published a round"
        )
    missing = [s[:16] for s in (manifest.model_sha256, manifest.weights_sha256) if s not in blobs]
    return (
        f"manifest v{manifest.version} (round {manifest.round_number}, {manifest.round_id}) names "
        f"blob(s) {', '.join(missing)} that did not arrive within {timeout_s:g} s"
    )
