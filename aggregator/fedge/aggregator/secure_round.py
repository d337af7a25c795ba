"""One secure-aggregation round on the aggregator side: a pure driver around the SecAgg core.

:class:`SecureRoundDriver` is to :class:`~fedge.protocol.secagg.AggregatorSession` what
:class:`~fedge.aggregator.round_engine.RoundEngine` is to the folds: it owns the rules about
messages on the wire (which sealed frame counts, from whom, for which round) and leaves the
protocol to the session. Like the engine it never touches the network, the disk or the clock:
the MQTT shell hands it every message on ``update/+`` with the current time, calls :meth:`tick`
regularly (and after each message), and publishes what it returns. So every rule is testable
in microseconds and identical in production and tests; ``tests/e2e/test_secagg_mqtt.py`` runs
it through a real broker.

Life of a round: :meth:`start` returns the signed config document (retained) -> :meth:`handle`
accepts or rejects each sealed message, cheapest check first (size, topic, cleartext header,
enrolled device, counter, then the box, then the message against the session); a rejection is
counted by reason in :attr:`rejected` and never raised -> :meth:`tick` closes each phase when the
session says it is due and returns the signed per-device documents of the next phase (bundles,
deliveries, unmask requests; retained) -> at the end :attr:`result` holds the sum
(:class:`~fedge.protocol.secagg.SecAggResult`) or :attr:`abort_reason` why there is none, and the
last :meth:`tick` returns the empty retained payloads that clear every document of the round.

What it stores: the session (public keys, the running sum of masked inputs, revealed shares;
see :mod:`fedge.protocol.secagg.aggregator`), one cached ``Box`` per device, the newest counter
per device, the topics it published (to clear them) and counts. It decodes a masked input only
to add it to the running sum and keeps no frame, so it never holds an individual vector.

A leader change or a restart loses the session: the round aborts (devices start a new round with
fresh keys); nothing of it is checkpointed, on purpose (``docs/secure-aggregation.md``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from nacl.public import Box, PrivateKey, PublicKey
from nacl.signing import SigningKey, VerifyKey

from fedge.protocol.reasons import PAYLOAD_PREFIX, RejectReason
from fedge.protocol.sealing import SealError, box_for
from fedge.protocol.secagg import (
    AggregatorPhase,
    AggregatorSession,
    RoundAborted,
    RoundConfig,
    SecAggError,
    SecAggResult,
)
from fedge.protocol.secagg.advertisement import Advertisement
from fedge.protocol.secagg.messages import MaskedInput, ShareMessage, UnmaskResponse
from fedge.protocol.secagg.wire import (
    DeviceMessage,
    Publication,
    RelayMessage,
    WireError,
    config_sha256,
    open_message,
    read_sealed,
    relay_publication,
    round_document,
)
from fedge.protocol.topics import FleetTopics

#: Why :meth:`SecureRoundDriver.handle` refused a message while no round was running.
NO_OPEN_ROUND = RejectReason.NO_OPEN_ROUND


@dataclass(frozen=True)
class Outcome:
    """What happened to one message: accepted, or rejected with a stable reason code."""

    accepted: bool
    reason: str
    device_id: str | None = None
    kind: str | None = None


class SecureRoundDriver:
    """The aggregator's part of one secure-aggregation round, over sealed and signed frames."""

    def __init__(
        self,
        *,
        fleet: str,
        config: RoundConfig,
        model_version: int,
        signing_key: SigningKey,
        box_key: PrivateKey,
        registry: Mapping[str, PublicKey],
        identity_keys: Mapping[str, VerifyKey] | None = None,
        counters: MutableMapping[str, int] | None = None,
    ) -> None:
        """``registry``: the enrolled X25519 keys the devices seal with; ``identity_keys``: their
        enrolled Ed25519 keys (forged advertisements are then dropped here already; devices check
        them anyway); ``counters``: the newest sealed counter accepted per device, shared with the
        round engine in production so a frame of a plain round cannot be replayed here either."""
        self.topics = FleetTopics(fleet)
        self.config = config
        self.model_version = model_version
        self.config_sha256 = config_sha256(config)
        self.session = AggregatorSession(config, identity_keys)
        self.rejected: Counter[str] = Counter()
        self.accepted: Counter[str] = Counter()
        self.result: SecAggResult | None = None
        self.abort_reason: str | None = None
        self._signing_key = signing_key
        self._box_key = box_key
        self._registry = registry
        self._counters: MutableMapping[str, int] = counters if counters is not None else {}
        self._boxes: dict[str, Box] = {}
        self._published: list[str] = []
        self._started = False
        self._cleared = False

    # --- state ---------------------------------------------------------------------------------

    @property
    def phase(self) -> AggregatorPhase:
        return self.session.phase

    @property
    def done(self) -> bool:
        """True once the round produced a sum or aborted (its documents may still need clearing)."""
        return self.result is not None or self.abort_reason is not None

    # --- life cycle ----------------------------------------------------------------------------

    def start(self, now: float) -> list[Publication]:
        """The signed round config, retained on ``secagg/{round}/config``. Once."""
        del now  # the config carries its own deadlines; kept for the shell's uniform calls
        if self._started:
            return []
        self._started = True
        payload = round_document(self.topics.fleet, self.config, self.model_version, self._signing_key)
        return [self._retain(self.topics.secagg(self.config.round_id, "config"), payload)]

    def handle(self, topic: str, payload: bytes, now: float) -> Outcome:
        """Accepts or rejects one message from ``update/+``; every rejection is counted."""
        outcome = self._check(topic, payload, now)
        if outcome.accepted:
            self.accepted[outcome.kind or ""] += 1
        else:
            self.rejected[outcome.reason] += 1
        return outcome

    def tick(self, now: float) -> list[Publication]:
        """Closes every phase that is due; returns what to publish (documents, or the clears)."""
        publications: list[Publication] = []
        while self._started and not self.done and self.session.due(now):
            try:
                publications += self._close_phase(now)
            except RoundAborted as exc:
                self.abort_reason = str(exc.reason)
            except SecAggError as exc:  # only a bug can get here: phases guard every call
                self.abort_reason = str(exc.reason)
        if self.done and not self._cleared:
            self._cleared = True
            publications += [Publication(topic, b"", retain=True) for topic in reversed(self._published)]
        return publications

    # --- internals -----------------------------------------------------------------------------

    def _close_phase(self, now: float) -> list[Publication]:
        phase = self.session.phase
        relayed: list[RelayMessage]
        if phase == AggregatorPhase.ADVERTISE:
            relayed = list(self.session.close_advertising(now).values())
        elif phase == AggregatorPhase.SHARE:
            relayed = list(self.session.close_sharing(now).values())
        elif phase == AggregatorPhase.MASKED_INPUT:
            relayed = list(self.session.close_masked_input(now).values())
        else:
            self.result = self.session.finish(now)
            return []
        return [
            self._retain(p.topic, p.payload)
            for p in (
                relay_publication(self.topics, self.config_sha256, m, self._signing_key) for m in relayed
            )
        ]

    def _retain(self, topic: str, payload: bytes) -> Publication:
        self._published.append(topic)
        return Publication(topic, payload, retain=True)

    def _check(self, topic: str, payload: bytes, now: float) -> Outcome:
        if not self._started or self.done:
            return Outcome(False, NO_OPEN_ROUND)
        try:
            header, ciphertext = read_sealed(
                topic, payload, topics=self.topics, config=self.config, model_version=self.model_version
            )
        except WireError as exc:
            return Outcome(False, exc.reason)
        device, kind = header.device_id, header.kind
        device_key = self._registry.get(device)
        if device_key is None:
            return Outcome(False, RejectReason.UNKNOWN_DEVICE, device, kind)
        if header.counter <= self._counters.get(device, -1):
            return Outcome(False, RejectReason.REPLAYED_COUNTER, device, kind)
        box = self._boxes.get(device)
        if box is None:
            try:
                box = self._boxes[device] = box_for(self._box_key, device_key)
            except SealError as exc:
                return Outcome(False, exc.reason, device, kind)
        try:
            message = open_message(
                header,
                ciphertext,
                config=self.config,
                config_hash=self.config_sha256,
                aggregator_key=self._box_key,
                device_public=device_key,
                box=box,
            )
        except WireError as exc:
            if _opened(exc.reason):
                self._counters[device] = header.counter  # authentic: this counter is spent
            return Outcome(False, exc.reason, device, kind)
        self._counters[device] = header.counter
        try:
            self._feed(message, now)
        except SecAggError as exc:
            return Outcome(False, str(exc.reason), device, kind)
        return Outcome(True, "accepted", device, kind)

    def _feed(self, message: DeviceMessage, now: float) -> None:
        """Hands an authentic, decoded message to the session (which refuses by reason)."""
        if isinstance(message, Advertisement):
            self.session.on_advertisement(message, now)
        elif isinstance(message, ShareMessage):
            self.session.on_shares(message, now)
        elif isinstance(message, MaskedInput):
            self.session.on_masked_input(message, now)
        elif isinstance(message, UnmaskResponse):
            self.session.on_unmask_response(message, now)


def _opened(reason: str) -> bool:
    """Whether a refusal came after the box opened with the device's key and the inner header
    matched the cleartext one: only then is the cleartext counter the device's own and spent.
    A relabelled counter (``binding_mismatch``) must never spend one, or anyone could burn a
    device's counters up to the maximum and lock it out."""
    return reason not in (RejectReason.DECRYPT_FAILED, RejectReason.BINDING_MISMATCH) and not (
        reason.startswith(PAYLOAD_PREFIX)
    )
