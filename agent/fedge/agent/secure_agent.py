"""Secure aggregation in the agent: identity certificates, the round records on disk, and the
driver that runs one :class:`~fedge.agent.secure_round.DeviceSecureRound` per round.

The agent service (``fedge.agent.service``) owns the MQTT client and the worker thread; this
module gives it three pieces, none of which touches the network:

- :class:`SecureIdentity` / :func:`load_secure_identity`: the device's Ed25519 identity key and
  its operator-signed certificate (``[agent] identity_key_file``, ``identity_certificate_file``,
  ``operator_verify_keys``), checked against each other at start: any mismatch is one
  :class:`ConfigError` line naming the fix.
- :class:`IdentityBook`: the fleet's identity keys, from the certificates devices publish
  retained on ``identity/{device}`` (each verified with the pinned operator keys, for this fleet
  and the device its topic names). Bounded; a bad certificate is dropped with a reason.
  Neighbours without one are simply absent (the session leaves them out).
- :class:`SecureRounds`: paho's thread queues the round documents (``secagg/+/config``,
  ``secagg/+/+/{device}``); the worker hands it the :class:`~fedge.agent.core.SecureUpdate` the
  core returns after training, then calls :meth:`SecureRounds.turn` on each of its turns. It
  waits for the round's config document (retained: it may already be there), refuses the round
  unless the document's config is exactly :func:`~fedge.protocol.secure_round_config.round_config_for`
  the manifest, runs the round, and returns what to publish as :class:`~fedge.agent.core.Send`
  actions (the shell puts them in the outbox, which keeps them until PUBACK).

**Persistence.** :class:`RevealedRecords` writes ``secagg-<round_id>.json`` in the state
directory, atomically, before anything the record covers leaves the device
(``DeviceSecureRound``'s rule), and reads it back when a round starts: a device that finds a
record for a round it is about to join restarted in that round and answers nothing of it.
Records of other rounds are removed when a new manifest arrives.

**Counters.** Every sealed frame takes the device's next update counter through
``reserve_counter`` (the core's :meth:`~fedge.agent.core.DeviceCore.reserve_counter`,
persisted by the shell before the frame is sealed), so updates and secure-aggregation
messages never share a counter, across restarts too.

Refusals are counted by reason with the prefix ``secagg_`` (``identity_`` for certificates) in
the status's ``messages_dropped``; nothing here raises for bad input.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import threading
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
from nacl.public import PrivateKey, PublicKey
from nacl.signing import SigningKey, VerifyKey

from fedge.agent.config import AgentConfig
from fedge.agent.core import Action, Note, SecureUpdate, Send, StatusState
from fedge.agent.secure_round import DeviceSecureRound, open_round_config
from fedge.protocol.bounded_json import loads_state_file
from fedge.protocol.config_source import ConfigError
from fedge.protocol.errors import FedgeError
from fedge.protocol.identity import MAX_CERTIFICATE_BYTES, IdentityError, verify_certificate
from fedge.protocol.round_manifest import RoundManifest
from fedge.protocol.sealing import SealError, read_header
from fedge.protocol.secagg import DevicePhase, RoundConfig, SecAggError
from fedge.protocol.secagg.quantise import clip_to_norm
from fedge.protocol.secagg.wire import Publication, WireError, max_document_bytes
from fedge.protocol.secure_dp import NoisePlan, SecureDpError, add_noise_share, noise_plan
from fedge.protocol.secure_round_config import round_config_for
from fedge.protocol.signing import signing_key_to_text
from fedge.protocol.topics import FleetTopics, TopicError
from fedge.shell.files import atomic_write, read_private_key

log = logging.getLogger("fedge.agent")

#: A certificate file: base64 of the signed frame and a newline (``fedge certify`` writes it;
#: the same bound as ``fedge.tools.identity_keys``, which the agent does not import).
MAX_CERTIFICATE_FILE_BYTES: Final = 4096
#: At most this many identity keys are kept (a fleet's devices; more is a flood).
MAX_IDENTITIES: Final = 100_000
#: Round config documents kept while their round may still be joined (the newest rounds).
MAX_ROUND_CONFIGS: Final = 16
#: Per-device documents waiting for the worker (three per round are honest).
MAX_INBOX: Final = 256
#: Rounds remembered as over: their late documents are dropped silently.
MAX_FINISHED_ROUNDS: Final = 64
RECORD_FORMAT: Final = 1
RECORD_PREFIX: Final = "secagg-"
#: A record names at most 2 x the largest degree of devices: far below this.
MAX_RECORD_BYTES: Final = 1024 * 1024

#: Counted reasons of this module (``messages_dropped``); the round's own are ``secagg_<reason>``.
CONFIG_MISMATCH: Final = "secagg_config_mismatch"
#: The round announces differential privacy this device cannot add noise for.
PRIVACY_MISMATCH: Final = "secagg_privacy_mismatch"
NO_CONFIG: Final = "secagg_no_config"
NO_ROUND: Final = "secagg_no_round"
BAD_UPDATE: Final = "secagg_bad_update"
BAD_PARAMETERS: Final = "secagg_bad_parameters"
INBOX_FULL: Final = "secagg_inbox_full"


# --- the device's own identity -----------------------------------------------------------------


@dataclass(frozen=True)
class SecureIdentity:
    """The device's identity key, its certificate frame (published on ``identity/{device}``) and
    the operator keys that certify every device's identity key."""

    signing_key: SigningKey
    certificate: bytes
    operator_keys: dict[str, VerifyKey]


def read_certificate(path: Path) -> bytes:
    """The certificate frame from a file ``fedge certify`` wrote (base64 text); ConfigError
    naming the file otherwise. The agent's twin of ``fedge.tools.identity_keys.read_certificate_file``."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CERTIFICATE_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read [agent] identity_certificate_file {path}: {exc.strerror}") from None
    if len(raw) > MAX_CERTIFICATE_FILE_BYTES:
        raise ConfigError(
            f"[agent] identity_certificate_file {path} is over {MAX_CERTIFICATE_FILE_BYTES} bytes: "
            "not a certificate (write it with fedge certify)"
        )
    try:
        return base64.b64decode(raw.strip(), validate=True)
    except ValueError:
        raise ConfigError(
            f"[agent] identity_certificate_file {path} is not base64 (write it with fedge certify)"
        ) from None


def load_secure_identity(config: AgentConfig) -> SecureIdentity | None:
    """The device's identity, verified: its certificate signed by a pinned operator key for its
    fleet and id, and certifying its own identity key. None when not configured."""
    key_file, cert_file = config.identity_key_file, config.identity_certificate_file
    if key_file is None or cert_file is None or not config.operator_verify_keys:
        return None
    key = SigningKey(read_private_key(key_file, "signing", what="[agent] identity_key_file"))
    frame = read_certificate(cert_file)
    own = signing_key_to_text(key.verify_key)
    try:
        cert = verify_certificate(frame, config.operator_verify_keys, config.fleet, config.device_id)
    except IdentityError as exc:
        raise ConfigError(
            f"[agent] identity_certificate_file {cert_file} does not verify ({exc.reason}): {exc}; "
            f"certify this device with the operator key whose verify key is in operator_verify_keys: "
            f"fedge certify --fleet {config.fleet} --id {config.device_id} --identity-key {own}"
        ) from None
    if bytes(cert.identity_key) != bytes(key.verify_key):
        raise ConfigError(
            f"[agent] identity_certificate_file {cert_file} certifies another key than "
            f"identity_key_file {key_file}: certify this one (fedge certify --fleet {config.fleet} "
            f"--id {config.device_id} --identity-key {own}) or point identity_key_file at the key "
            "it certifies"
        )
    return SecureIdentity(key, frame, dict(config.operator_verify_keys))


# --- the fleet's identity keys -----------------------------------------------------------------


class IdentityBook:
    """device id -> identity verify key, from verified certificates (thread-safe, bounded)."""

    def __init__(
        self, fleet: str, operator_keys: Mapping[str, VerifyKey], limit: int = MAX_IDENTITIES
    ) -> None:
        self.topics = FleetTopics(fleet)
        self._operator_keys = dict(operator_keys)
        self._limit = limit
        self._keys: dict[str, VerifyKey] = {}
        self._lock = threading.Lock()

    def offer(self, topic: str, payload: bytes) -> tuple[str, str] | None:
        """A message on ``identity/{device}``; ``(reason, detail)`` if it is dropped. An empty
        payload (a cleared retained certificate) removes the device's key. A certificate that
        does not verify leaves an earlier good one in place."""
        try:
            device = self.topics.device_of(topic, "identity")
        except TopicError as exc:
            return "identity_bad_topic", str(exc)
        if not payload:
            with self._lock:
                self._keys.pop(device, None)
            return None
        if len(payload) > MAX_CERTIFICATE_BYTES:
            return "identity_too_large", f"{len(payload)} bytes > {MAX_CERTIFICATE_BYTES}"
        try:
            cert = verify_certificate(payload, self._operator_keys, self.topics.fleet, device)
        except IdentityError as exc:
            return f"identity_{exc.reason}", str(exc)
        with self._lock:
            if device not in self._keys and len(self._keys) >= self._limit:
                return "identity_too_many", f"already {self._limit} identity keys"
            self._keys[device] = cert.identity_key
        return None

    def keys_for(self, device_ids: Iterable[str]) -> dict[str, VerifyKey]:
        """The known identity keys of these devices (devices without one are left out)."""
        with self._lock:
            return {d: self._keys[d] for d in device_ids if d in self._keys}

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)


# --- what the device revealed, on disk ---------------------------------------------------------


class RevealedRecords:
    """``secagg-<round_id>.json`` files in the state directory (mode 0600, atomic)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def path(self, round_id: str) -> Path:
        # Round ids are checked ids (letters, digits, '_', '.', '-', never starting with '.'):
        # no path separators.
        return self.state_dir / f"{RECORD_PREFIX}{round_id}.json"

    def save(self, round_id: str, record: dict[str, str]) -> None:
        """Raises OSError: the round then sends nothing the record would have covered."""
        document = {"format": RECORD_FORMAT, "round_id": round_id, "revealed": dict(sorted(record.items()))}
        atomic_write(self.path(round_id), (json.dumps(document, sort_keys=True) + "\n").encode())

    def load(self, round_id: str) -> dict[str, str] | None:
        """The record of an earlier run, None if there is none. A record that cannot be read is
        taken as "joined, revealed unknown" (``{}``): the device then answers nothing of the
        round, the safe side."""
        path = self.path(round_id)
        try:
            with path.open("rb") as f:
                raw = f.read(MAX_RECORD_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("cannot read %s (%s): taking no further part in round %s", path, exc.strerror, round_id)
            return {}
        try:
            document = loads_state_file(raw)
            revealed = document["revealed"]
            if (
                len(raw) > MAX_RECORD_BYTES
                or document.get("round_id") != round_id
                or not isinstance(revealed, dict)
                or not all(isinstance(k, str) and isinstance(v, str) for k, v in revealed.items())
            ):
                raise ValueError("not a secure-aggregation record")
        except (ValueError, TypeError, KeyError, UnicodeDecodeError, RecursionError) as exc:
            log.error("%s is corrupt (%s): taking no further part in round %s", path, exc, round_id)
            return {}
        return dict(revealed)

    def clean(self, keep: str | None) -> int:
        """Removes the records of every round but ``keep``; returns how many."""
        removed = 0
        keep_name = self.path(keep).name if keep is not None else None
        for path in self.state_dir.glob(f"{RECORD_PREFIX}*.json"):
            if path.name == keep_name:
                continue
            try:
                path.unlink()
                removed += 1
            except OSError as exc:
                log.warning("cannot remove %s: %s", path, exc.strerror)
        return removed


# --- the rounds --------------------------------------------------------------------------------


@dataclass
class _Waiting:
    """A trained delta waiting for its round's config document."""

    manifest: RoundManifest
    delta: npt.NDArray[np.float64]
    expected: RoundConfig


Count = Callable[[str, str, str], None]


class SecureRounds:
    """The secure-aggregation rounds of one device (see the module docstring).

    Thread use: :meth:`offer` from paho's network thread (it only queues); everything else from
    the agent's worker, which also carries out the returned actions."""

    def __init__(
        self,
        *,
        fleet: str,
        device_id: str,
        identity: SecureIdentity,
        box_key: PrivateKey,
        aggregator_box_key: PublicKey,
        aggregator_keys: Callable[[], Mapping[str, VerifyKey]],
        reserve_counter: Callable[[], int],
        records: RevealedRecords,
        count: Count,
        book: IdentityBook | None = None,
    ) -> None:
        """``aggregator_keys()``: the trusted aggregator verify keys now (the trust store's, the
        ones manifests are checked with). ``reserve_counter()``: the next sealed counter,
        persisted before it returns. ``count(reason, topic, detail)``: one dropped message."""
        self.fleet = fleet
        self.device_id = device_id
        self.topics = FleetTopics(fleet)
        self.identity = identity
        self.book = book or IdentityBook(fleet, identity.operator_keys)
        self.records = records
        self._box_key = box_key
        self._aggregator_box_key = aggregator_box_key
        self._aggregator_keys = aggregator_keys
        self._reserve_counter = reserve_counter
        self._count = count
        self._lock = threading.Lock()
        self._configs: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        #: Rounds whose config the aggregator cleared (the round is over), newest last.
        self._cleared: OrderedDict[str, None] = OrderedDict()
        self._inbox: deque[tuple[str, bytes]] = deque()
        self._waiting: _Waiting | None = None
        #: The round this device is in.
        self.round: DeviceSecureRound | None = None
        self._counted: Counter[str] = Counter()
        self._finished: deque[str] = deque(maxlen=MAX_FINISHED_ROUNDS)

    # --- MQTT (paho's thread) ----------------------------------------------------------------

    @property
    def subscriptions(self) -> list[tuple[str, int]]:
        """What to subscribe to on every connect (QoS 1)."""
        return [
            (self.topics.identity_filter, 1),
            (self.topics.secagg_config_filter, 1),
            (f"{self.topics.base}/secagg/+/+/{self.device_id}", 1),
        ]

    def identity_publication(self) -> Publication:
        """The device's own certificate, retained on ``identity/{device}`` (on every connect)."""
        return Publication(self.topics.identity(self.device_id), self.identity.certificate, retain=True)

    def handles(self, topic: str) -> bool:
        return topic.startswith((f"{self.topics.base}/secagg/", f"{self.topics.base}/identity/"))

    def offer(self, topic: str, payload: bytes) -> tuple[str, str] | None:
        """Queues one message of :attr:`subscriptions`; ``(reason, detail)`` if it is dropped."""
        if topic.startswith(f"{self.topics.base}/identity/"):
            return self.book.offer(topic, payload)
        try:
            round_id, what, device = self.topics.secagg_parse(topic)
        except TopicError as exc:
            return "secagg_bad_topic", str(exc)
        with self._lock:
            if device is None:  # a round's config
                if not payload:
                    self._configs.pop(round_id, None)
                    self._cleared[round_id] = None
                    while len(self._cleared) > MAX_FINISHED_ROUNDS:
                        self._cleared.popitem(last=False)
                    return None
                if len(payload) > max_document_bytes("config"):
                    return "secagg_too_large", f"config document of {len(payload)} bytes"
                self._configs[round_id] = (topic, payload)
                self._configs.move_to_end(round_id)
                self._cleared.pop(round_id, None)
                while len(self._configs) > MAX_ROUND_CONFIGS:
                    self._configs.popitem(last=False)
                return None
            if device != self.device_id:
                return "secagg_wrong_recipient", f"a {what} document for {device}"
            if len(self._inbox) >= MAX_INBOX:
                return INBOX_FULL, f"{MAX_INBOX} documents already wait for the worker"
            self._inbox.append((topic, payload))
        return None

    def has_work(self) -> bool:
        """Whether :meth:`turn` has documents to handle."""
        waiting = self._waiting
        with self._lock:
            return bool(self._inbox) or (waiting is not None and waiting.manifest.round_id in self._configs)

    # --- the worker --------------------------------------------------------------------------

    @property
    def round_id(self) -> str | None:
        """The round the device is in or waiting for."""
        if self.round is not None:
            return self.round.round_id
        return self._waiting.manifest.round_id if self._waiting is not None else None

    def begin(self, update: SecureUpdate, now: float) -> list[Action]:
        """The core handed over a trained delta: wait for the round's config (see :meth:`turn`)."""
        manifest = update.manifest
        ended = self._end("a new secure round started") if self.round_id is not None else []
        try:
            expected = round_config_for(manifest)
        except (SecAggError, FedgeError) as exc:
            return [*ended, *self._refuse(BAD_PARAMETERS, manifest.round_id, str(exc))]
        if not expected.is_selected(self.device_id):  # the core checked: cannot happen
            return [*ended, *self._refuse(NO_ROUND, manifest.round_id, "this device is not selected")]
        delta = np.asarray(update.delta, dtype=np.float64).reshape(-1)
        if delta.size != expected.vector_length or not bool(np.all(np.isfinite(delta))):
            detail = f"{delta.size} values for {expected.vector_length} parameters, or not all finite"
            return [*ended, *self._refuse(BAD_UPDATE, manifest.round_id, detail)]
        self._waiting = _Waiting(manifest, delta, expected)
        return [*ended, *self.turn(now)]

    def turn(self, now: float, current_round: str | None = None) -> list[Action]:
        """Handles what arrived; returns what to do. ``current_round``: the round of the
        newest manifest (documents of other rounds then are stale, dropped silently)."""
        actions = self._join(now)
        with self._lock:
            inbox, self._inbox = list(self._inbox), deque()
            cleared = self.round is not None and self.round.round_id in self._cleared
        for topic, payload in inbox:
            actions += self._deliver(topic, payload, now, current_round)
        if self.round is not None:
            over = (
                cleared or now > self.round.config.deadlines.unmask or self.round.phase is DevicePhase.ABORTED
            )
            if over:
                actions += self._end("the round is over" if not cleared else "the aggregator closed it")
        return actions

    def drop_other_rounds(self, round_id: str) -> list[Action]:
        """A manifest of ``round_id`` arrived: any other round is over; its record goes."""
        actions: list[Action] = []
        if self.round_id is not None and self.round_id != round_id:
            actions = self._end(f"round {round_id} started")
        removed = self.records.clean(keep=round_id)
        if removed:
            log.info("removed %d secure-aggregation record(s) of rounds that are over", removed)
        return actions

    # --- internals ---------------------------------------------------------------------------

    def _join(self, now: float) -> list[Action]:
        waiting = self._waiting
        if waiting is None:
            return []
        round_id = waiting.manifest.round_id
        with self._lock:
            document = self._configs.pop(round_id, None)
            cleared = round_id in self._cleared
        if document is None:
            if cleared or now > waiting.expected.deadlines.advertise:
                why = "the aggregator closed it" if cleared else "its advertising deadline passed"
                return self._refuse(NO_CONFIG, round_id, f"no round config arrived before {why}")
            return []
        topic, payload = document
        try:
            announcement = open_round_config(
                topic, payload, fleet=self.fleet, aggregator_keys=self._aggregator_keys()
            )
        except WireError as exc:
            self._count(f"secagg_config_{exc.reason}", topic, str(exc))
            return []  # a genuine document may still replace it
        if announcement.config != waiting.expected:
            return self._refuse(
                CONFIG_MISMATCH,
                round_id,
                "the round config document is not the one its signed manifest implies "
                f"(manifest v{waiting.manifest.version}): refusing the round",
            )
        privacy = waiting.manifest.privacy
        plan: NoisePlan | None = None
        if privacy is not None:  # differential privacy: this device adds its share of the noise
            try:
                plan = noise_plan(privacy, announcement.config, waiting.manifest.min_devices)
            except SecureDpError as exc:
                return self._refuse(PRIVACY_MISMATCH, round_id, f"refusing the round: {exc}")
        self._waiting = None
        delta, records = waiting.delta, self.records
        neighbours = announcement.config.neighbours(self.device_id)
        keys = self.book.keys_for(announcement.config.device_ids)
        self.round = DeviceSecureRound(
            announcement,
            device_id=self.device_id,
            box_key=self._box_key,
            aggregator_box_key=self._aggregator_box_key,
            identity_key=self.identity.signing_key,
            neighbour_keys=keys,
            aggregator_keys=dict(self._aggregator_keys()),
            quantised_update=lambda config: _quantised(delta, config, plan),
            next_counter=self._reserve_counter,
            persist_revealed=records.save,
            revealed=records.load(round_id),
        )
        self._counted = Counter()
        joined = Note(
            f"secure round {round_id}: joined with the identity keys of {len(neighbours & set(keys))} "
            f"of {len(neighbours)} neighbours"
            if not self.round.resumed
            else f"secure round {round_id}: this device restarted in it and takes no further part"
        )
        return [joined, *self._published(self.round.start(now), topic)]

    def _deliver(self, topic: str, payload: bytes, now: float, current_round: str | None) -> list[Action]:
        if not payload:
            return []  # a cleared retained document
        try:
            round_id = self.topics.secagg_parse(topic)[0]
        except TopicError:
            return []  # checked when queued
        if self.round is not None and round_id == self.round.round_id:
            return self._published(self.round.on_message(topic, payload, now), topic)
        stale = round_id in self._finished or (current_round is not None and round_id != current_round)
        if not stale:
            self._count(NO_ROUND, topic, f"a document of round {round_id}, which this device is not in")
        return []

    def _published(self, publications: list[Publication], topic: str) -> list[Action]:
        """The round's frames as Send actions, after counting its new refusals."""
        actions: list[Action] = []
        for publication in publications:
            try:
                header = read_header(publication.payload)[0]
            except SealError:  # our own frame: cannot happen
                continue
            actions.append(
                Send(publication.topic, publication.payload, header.round_id, header.kind, header.counter)
            )
        if self.round is not None:
            refusals = self.round.refusals
            for reason, total in refusals.items():
                for _ in range(total - self._counted[reason]):
                    self._count(f"secagg_{reason}", topic, f"round {self.round.round_id}: {reason}")
            self._counted = Counter(refusals)
        return actions

    def _refuse(self, reason: str, round_id: str, detail: str) -> list[Action]:
        self._waiting = None
        self._remember(round_id)
        self._count(reason, self.topics.secagg(round_id, "config"), detail)
        return [Note(f"secure round {round_id}: {detail}", problem=True), StatusState("idle")]

    def _end(self, why: str) -> list[Action]:
        round_id = self.round_id
        self.round, self._waiting = None, None
        if round_id is None:
            return []
        self._remember(round_id)
        return [Note(f"secure round {round_id}: done ({why})"), StatusState("idle")]

    def _remember(self, round_id: str) -> None:
        if round_id not in self._finished:
            self._finished.append(round_id)
        with self._lock:
            self._cleared.pop(round_id, None)


def _quantised(delta: np.ndarray, config: RoundConfig, plan: NoisePlan | None) -> npt.NDArray[np.uint64]:
    """The device's vector for the masked sum: its delta clipped to the round's bound and
    quantised (fresh randomness), plus, with differential privacy, its share of the noise
    (``fedge.protocol.secure_dp``: exact discrete Gaussian from the OS's randomness)."""
    quantised = config.quantiser.quantise(
        clip_to_norm(delta, config.clip_norm), np.random.default_rng(secrets.randbits(128))
    )
    if plan is None:
        return quantised
    return add_noise_share(quantised, plan, config.bits, secrets.SystemRandom())
