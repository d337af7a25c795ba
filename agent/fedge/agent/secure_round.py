"""One secure-aggregation round on the device: a pure driver around the SecAgg device session.

:class:`DeviceSecureRound` holds a :class:`~fedge.protocol.secagg.DeviceSession` for one round
and speaks the wire contract of :mod:`fedge.protocol.secagg.wire`: it takes the aggregator's
signed documents (checked against the pinned aggregator key, this fleet, round, config and
device) and returns the sealed frames to publish. It never touches the network, the disk or
the clock: keys, the quantised update, the sealed counter and persistence are callables or
values the agent service passes in; time is passed to every call. No TensorFlow (the agent's
rule), no aggregator code.

How the agent service uses it (a later change wires it in):

1. on a retained document on ``secagg/+/config``: :func:`open_round_config` (refusals have a
   stable ``reason`` to count), then, if the device is selected and has no record for that
   round, ``DeviceSecureRound(...)`` and publish what :meth:`~DeviceSecureRound.start`
   returns; subscribe to ``FleetTopics.secagg_device_filter(round_id, device)``;
2. hand every message on that filter to :meth:`~DeviceSecureRound.on_message`, publish what it
   returns (QoS 1, from a persistent MQTT session);
3. drop the object when the round's config is cleared or its unmask deadline passed.

**Persistence** (what ``docs/secure-aggregation.md`` requires). A device must never reveal both
secrets of one neighbour, across restarts too. So before it advertises it persists an empty
record for the round (``persist_revealed(round_id, {})``: "I joined"), and before it returns an
unmask response it persists every share it revealed (``{device: "self_mask" | "mask_key"}``).
A persist that raises stops the answer (counted ``persist_failed``). A device that restarts in
a round finds the record (``revealed`` at construction, not ``None``): its round keys and shares
died with the process, and the aggregator already holds its old keys, so it takes no further
part in that round: it does not advertise again and refuses every document of the round,
unmask requests included (``restarted_mid_round``). Its neighbours recover it like any device
that dropped.

Counts: :attr:`DeviceSecureRound.refusals` merges the documents refused here (signature,
fleet, round, config, recipient, size: :class:`~fedge.protocol.secagg.wire.WireReason` and the
signing reasons) with the session's own refusals (:class:`~fedge.protocol.secagg.SecAggReason`:
a malicious unmask request, a forged neighbour advertisement, ...). Nothing is raised for bad
input.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Final

import numpy as np
import numpy.typing as npt
from nacl.public import PrivateKey, PublicKey
from nacl.signing import SigningKey, VerifyKey
from nacl.utils import random as nacl_random

from fedge.protocol.secagg import DevicePhase, DeviceSession, RoundConfig, SecAggError
from fedge.protocol.secagg.messages import AdvertisementBundle, ShareDelivery
from fedge.protocol.secagg.shamir import RandomBytes
from fedge.protocol.secagg.wire import (
    BUNDLE,
    DELIVERY,
    UNMASK,
    DeviceMessage,
    Publication,
    RelayMessage,
    RoundAnnouncement,
    WireError,
    message_publication,
    open_relay_document,
    open_round_document,
    trusted_keys,
)
from fedge.protocol.topics import FleetTopics, TopicError

#: The device restarted in this round: it answers nothing more of it.
RESTARTED_MID_ROUND: Final = "restarted_mid_round"
#: ``persist_revealed`` raised: the answer was not sent.
PERSIST_FAILED: Final = "persist_failed"
#: The session phase in which each per-device document is answered, and the phase order: a
#: document for a later phase waits (retained copies can arrive out of order after a
#: reconnect), one for the current or an earlier phase goes to the session, which refuses what
#: does not fit (``wrong_phase``, counted).
_PHASE_OF: Final = {BUNDLE: DevicePhase.SHARE, DELIVERY: DevicePhase.COLLECT, UNMASK: DevicePhase.UNMASK}
_ORDER: Final = (
    DevicePhase.ADVERTISE,
    DevicePhase.SHARE,
    DevicePhase.COLLECT,
    DevicePhase.MASK,
    DevicePhase.UNMASK,
)

QuantisedUpdate = Callable[[RoundConfig], npt.NDArray[np.uint64]]
PersistRevealed = Callable[[str, dict[str, str]], None]


def open_round_config(
    topic: str, payload: bytes, *, fleet: str, aggregator_keys: VerifyKey | Mapping[str, VerifyKey]
) -> RoundAnnouncement:
    """The verified announcement on a ``secagg/{round}/config`` topic; raises
    :class:`~fedge.protocol.secagg.wire.WireError` (count its ``reason``) for anything else."""
    return open_round_document(
        payload, topics=FleetTopics(fleet), trusted=trusted_keys(aggregator_keys), topic=topic
    )


class DeviceSecureRound:
    """One device's part in one round, over signed documents in and sealed frames out."""

    def __init__(
        self,
        announcement: RoundAnnouncement,
        *,
        device_id: str,
        box_key: PrivateKey,
        aggregator_box_key: PublicKey,
        identity_key: SigningKey,
        neighbour_keys: Mapping[str, VerifyKey],
        aggregator_keys: VerifyKey | Mapping[str, VerifyKey],
        quantised_update: QuantisedUpdate,
        next_counter: Callable[[], int],
        persist_revealed: PersistRevealed,
        revealed: Mapping[str, str] | None,
        random_bytes: RandomBytes = nacl_random,
    ) -> None:
        """``announcement``: from :func:`open_round_config`. ``neighbour_keys``: the enrolled
        Ed25519 verify keys of the fleet's devices, from the operator's registry (never from the
        aggregator). ``aggregator_keys``: the pinned aggregator verify key (or ``{key_id: key}``).
        ``quantised_update(config)``: the clipped, quantised update (``config.quantiser``),
        called once, when the device masks. ``next_counter()``: the device's next sealed counter
        (persisted by the caller, shared with its other sealed messages). ``revealed``: the
        record persisted for this round by an earlier run, ``None`` if there is none.

        Raises :class:`~fedge.protocol.secagg.SecAggError` (``unknown_device``) if the device is
        not selected for the round: the caller checks ``config.is_selected`` first."""
        self.announcement = announcement
        self.config = announcement.config
        self.round_id = announcement.round_id
        self.device_id = device_id
        self.topics = FleetTopics(announcement.fleet)
        self.session = DeviceSession(
            self.config, device_id, identity_key, neighbour_keys, random_bytes=random_bytes
        )
        self.document_refusals: Counter[str] = Counter()
        #: Documents delivered again (a retained copy after a reconnect): ignored, not refused.
        self.redelivered = 0
        self.previously_revealed: dict[str, str] | None = dict(revealed) if revealed is not None else None
        self._box_key = box_key
        self._aggregator_box_key = aggregator_box_key
        self._trusted = trusted_keys(aggregator_keys)
        self._update = quantised_update
        self._next_counter = next_counter
        self._persist = persist_revealed
        self._handled: dict[str, set[bytes]] = {}
        self._pending: dict[str, RelayMessage] = {}
        self._started = False

    # --- state ---------------------------------------------------------------------------------

    @property
    def resumed(self) -> bool:
        """True when an earlier run of the agent joined this round (see the module docstring)."""
        return self.previously_revealed is not None

    @property
    def phase(self) -> DevicePhase:
        return self.session.phase

    @property
    def refusals(self) -> Counter[str]:
        """Every refusal, by reason: documents refused here plus the session's own."""
        merged: Counter[str] = Counter({str(k): v for k, v in self.session.refusals.items()})
        merged.update(self.document_refusals)
        return merged

    # --- life cycle ----------------------------------------------------------------------------

    def start(self, now: float) -> list[Publication]:
        """The sealed advertisement, after persisting that the device joined. Once; nothing for
        a resumed round or one whose advertising deadline passed."""
        if self._started:
            return []
        self._started = True
        if self.resumed:
            return []  # its documents are refused (and counted) as they arrive
        if now > self.config.deadlines.advertise:
            self.document_refusals["expired"] += 1
            return []
        if not self._persisted({}):
            return []
        try:
            advertisement = self.session.advertise(now)
        except SecAggError:
            return []  # counted by the session
        return [self._seal(advertisement)]

    def on_message(self, topic: str, payload: bytes, now: float) -> list[Publication]:
        """Handles one message on the round's device topics; returns the frames to publish."""
        if not payload:
            return []  # the aggregator cleared a retained document: the round is over
        try:
            _round, what, _device = self.topics.secagg_parse(topic)
        except TopicError:
            self.document_refusals["bad_topic"] += 1
            return []
        digest = hashlib.sha256(payload).digest()
        if digest in self._handled.get(what, set()):
            self.redelivered += 1
            return []
        if self.resumed:
            self.document_refusals[RESTARTED_MID_ROUND] += 1
            return []
        try:
            message = open_relay_document(
                topic,
                payload,
                announcement=self.announcement,
                topics=self.topics,
                trusted=self._trusted,
                recipient=self.device_id,
            )
        except WireError as exc:
            self.document_refusals[exc.reason] += 1
            return []
        self._handled.setdefault(what, set()).add(digest)
        phase = self.session.phase
        if phase != DevicePhase.ABORTED and _ORDER.index(_PHASE_OF[what]) > _ORDER.index(phase):
            self._pending[what] = message  # early: answered once the session gets there
            return []
        publications = self._answer_refusing(message, now)
        return publications + self._drain(now)

    # --- internals -----------------------------------------------------------------------------

    def _drain(self, now: float) -> list[Publication]:
        """Answers the documents that arrived early, as the session reaches their phases."""
        publications: list[Publication] = []
        while True:
            waiting = [what for what, phase in _PHASE_OF.items() if phase == self.session.phase]
            if not waiting or waiting[0] not in self._pending:
                return publications
            publications += self._answer_refusing(self._pending.pop(waiting[0]), now)

    def _answer_refusing(self, message: RelayMessage, now: float) -> list[Publication]:
        try:
            return self._answer(message, now)
        except SecAggError:
            return []  # the session counted its reason

    def _answer(self, message: RelayMessage, now: float) -> list[Publication]:
        if isinstance(message, AdvertisementBundle):
            return [self._seal(self.session.on_advertisements(message, now))]
        if isinstance(message, ShareDelivery):
            self.session.on_shares(message, now)
            return [self._seal(self.session.mask(self._update(self.config), now))]
        response = self.session.on_unmask_request(message, now)
        # The session now remembers what it reveals; the disk must too, before anything leaves.
        if not self._persisted({device: str(kind) for device, kind in sorted(self.session.revealed.items())}):
            return []
        return [self._seal(response)]

    def _persisted(self, record: dict[str, str]) -> bool:
        try:
            self._persist(self.round_id, record)
        except Exception:  # the caller's storage: any failure means "not persisted", never send
            self.document_refusals[PERSIST_FAILED] += 1
            return False
        return True

    def _seal(self, message: DeviceMessage) -> Publication:
        return message_publication(
            self.topics,
            message,
            announcement=self.announcement,
            counter=self._next_counter(),
            device_key=self._box_key,
            aggregator_key=self._aggregator_box_key,
        )
