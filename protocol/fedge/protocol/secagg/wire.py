"""How a secure-aggregation round travels over MQTT: topics, sealing, signing, bounds. Pure.

The state machines (:mod:`.device`, :mod:`.aggregator`) say *what* the parties send; this module
says *how* it goes on the wire, so the agent's and the aggregator's drivers
(``fedge.agent.secure_round``, ``fedge.aggregator.secure_round``) and their tests agree byte for
byte. No I/O, no clock: functions take bytes and return bytes or refuse with a
:class:`WireError` whose ``reason`` is a short stable code.

**Device -> aggregator.** Each of the device's four messages is sealed exactly like a model
update (:func:`fedge.protocol.sealing.seal`): the cleartext :class:`~fedge.protocol.sealing.SealedHeader`
names fleet, device, round, counter, kind and model version, and goes on the device's existing
``update/{device}`` topic (QoS 1, not retained), so the broker's ACL does not change. One sealed
kind per message (:data:`DEVICE_KINDS`): ``secagg_advertise`` (:class:`~.advertisement.Advertisement`),
``secagg_shares`` (:class:`~.messages.ShareMessage`), ``secagg_masked``
(:class:`~.messages.MaskedInput`), ``secagg_unmask`` (:class:`~.messages.UnmaskResponse`). The
payload header is ``{"config_sha256": ...}`` (the round config's hash, so a message cannot be
moved to another round that reuses the id) and the payload body is the message's canonical JSON:
in the body, not the header, because a masked vector outgrows the frame header's 16 KiB.

**Aggregator -> devices.** Signed documents (:func:`fedge.protocol.signing.sign_document`, the
aggregator's Ed25519 key, one :class:`~fedge.protocol.signing.DocType` each), on topics under
``fedge/v1/{fleet}/secagg/{round_id}/`` (:class:`~fedge.protocol.topics.FleetTopics`):

=====================================  ==================  ===========================================
topic                                  document type       content
=====================================  ==================  ===========================================
``secagg/{round}/config``              ``secagg-round``    fleet, round id, model version, RoundConfig
``secagg/{round}/bundle/{device}``     ``secagg-bundle``   the device's neighbours' advertisements
``secagg/{round}/delivery/{device}``   ``secagg-delivery`` the share ciphertexts addressed to it
``secagg/{round}/unmask/{device}``     ``secagg-unmask``   its unmask request
=====================================  ==================  ===========================================

Every relay document binds ``fleet``, ``round_id``, ``config_sha256`` (SHA-256 of the config's
canonical JSON) and ``recipient``, and a device checks all four and the topic's round and device
against them, so a document of one round, fleet or device is refused in another even when the
same aggregator key signed both. The relayed message is nested as a JSON object and decoded with
its own bounds once the signature verified.

**Retained, QoS 1.** Every aggregator document is published retained on its own per-round,
per-phase topic: a device that reconnects mid-round (a broker restart, a flaky link, a new
clean session) gets the config and whatever its phase needs from the broker as soon as it
subscribes, without the aggregator tracking who was online. Per-round topics keep a new round
from overwriting one that is still running; per-phase topics keep a later phase from replacing
an earlier one a slow device still needs. The aggregator clears them all (an empty retained
payload) when the round ends or aborts, so nothing of a finished round lingers on the broker.
A device ignores an empty payload and a document it already handled (a retained copy delivered
again after a reconnect), and its own messages are QoS 1 from a persistent MQTT session, so the
client resends what the broker did not acknowledge; a resend the aggregator already had is
refused as ``replayed_counter`` and changes nothing.

**Bounds.** Every decoder checks the byte length before parsing anything: a sealed message
against :func:`max_sealed_bytes` (the largest its kind can be under the round's
:class:`~.config.RoundConfig`: degree, vector length and bits), a document against
:func:`max_document_bytes`; the nested message is then decoded by :mod:`.messages` with the same
config-derived bounds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from nacl.public import Box, PrivateKey, PublicKey
from nacl.signing import SigningKey, VerifyKey

from fedge.protocol.errors import ReasonFieldError
from fedge.protocol.framing import PREFIX_BYTES
from fedge.protocol.sealing import (
    MAC_BYTES,
    NONCE_BYTES,
    SealedHeader,
    SealError,
    open_sealed,
    read_header,
    seal,
)
from fedge.protocol.secagg.advertisement import Advertisement
from fedge.protocol.secagg.config import RoundConfig
from fedge.protocol.secagg.encoding import (
    ENVELOPE_BYTES,
    ID_OVERHEAD,
    MAX_ID_CHARS,
    b64_len,
    check_device_id,
    encode,
    vector_width,
)
from fedge.protocol.secagg.errors import SecAggError
from fedge.protocol.secagg.messages import (
    AdvertisementBundle,
    MaskedInput,
    ShareDelivery,
    ShareMessage,
    UnmaskRequest,
    UnmaskResponse,
)
from fedge.protocol.secagg.params import MAX_DEVICES
from fedge.protocol.secagg.shamir import SHARE_BYTES
from fedge.protocol.secagg.share_box import CIPHERTEXT_BYTES
from fedge.protocol.signing import (
    SIGNATURE_BYTES,
    DocType,
    SignatureError,
    key_id,
    sign_document,
    verify_document,
)
from fedge.protocol.topics import FleetTopics, TopicError

#: The sealed kinds of the device's messages, in phase order.
KIND_ADVERTISE: Final = "secagg_advertise"
KIND_SHARES: Final = "secagg_shares"
KIND_MASKED: Final = "secagg_masked"
KIND_UNMASK: Final = "secagg_unmask"
DEVICE_KINDS: Final = (KIND_ADVERTISE, KIND_SHARES, KIND_MASKED, KIND_UNMASK)

#: Per-device topics of a round (:meth:`FleetTopics.secagg_device`), in phase order.
BUNDLE: Final = "bundle"
DELIVERY: Final = "delivery"
UNMASK: Final = "unmask"

#: Generous room for a cleartext sealed header or a payload frame's ``bind`` + payload header
#: (ids are at most 64 characters, counters 19 digits): what a sealed frame adds to a message.
_HEADER_ROOM = 1024
SEALED_OVERHEAD_BYTES: Final = 2 * PREFIX_BYTES + NONCE_BYTES + MAC_BYTES + 2 * _HEADER_ROOM
_ID_BYTES = MAX_ID_CHARS + ID_OVERHEAD
#: The JSON a relay document adds around its message (fleet, round, hash, recipient, keys).
_DOCUMENT_ROOM = ENVELOPE_BYTES + 4 * _ID_BYTES + 128
_RELAY_FIELDS = frozenset({"fleet", "round_id", "config_sha256", "recipient", "message"})
_ROUND_FIELDS = frozenset({"fleet", "round_id", "model_version", "config"})
_MAX_MODEL_VERSION = 2**63 - 1

DeviceMessage = Advertisement | ShareMessage | MaskedInput | UnmaskResponse
RelayMessage = AdvertisementBundle | ShareDelivery | UnmaskRequest


class WireReason(StrEnum):
    """Refusals of this module's own checks (others pass through: see :class:`WireError`)."""

    #: More bytes than the largest honest message or document of its kind; refused unparsed.
    TOO_LARGE = "too_large"
    #: Not a topic this message or document can arrive on.
    BAD_TOPIC = "bad_topic"
    #: A signed document with missing, extra or mistyped fields.
    BAD_DOCUMENT = "bad_document"
    #: A sealed payload header that is not ``{"config_sha256": <hex>}``.
    BAD_PAYLOAD = "bad_payload"
    #: A sealed kind that is not a secure-aggregation message.
    WRONG_KIND = "wrong_kind"
    #: The message or document names another fleet.
    WRONG_FLEET = "wrong_fleet"
    #: The message, document or topic names another round.
    WRONG_ROUND = "wrong_round"
    #: Bound to another round config (same round id, different parameters).
    WRONG_CONFIG = "wrong_config"
    #: Sealed for another model version than the round announced.
    WRONG_VERSION = "wrong_version"
    #: The sealing device is not selected for the round.
    NOT_SELECTED = "not_selected"
    #: A document addressed to another device (in its body or its topic).
    WRONG_RECIPIENT = "wrong_recipient"
    #: The topic, the sealed header and the message do not name the same device.
    DEVICE_MISMATCH = "device_mismatch"


class WireError(ReasonFieldError[str]):
    """A secure-aggregation message or document refused on the wire.

    ``reason`` is a :class:`WireReason`; a :class:`~fedge.protocol.sealing.SealError` reason
    (``decrypt_failed``, ``binding_mismatch``, ``frame_bad_magic``, ...); a
    :class:`~fedge.protocol.signing.SignatureError` reason (``unknown_key``, ``bad_signature``,
    ``bad_header``, ``truncated``, ``bad_document``, ``frame_...``); or a
    :class:`~.errors.SecAggReason` from decoding the message itself (``bad_message``,
    ``too_large``, ``bad_vector``, ...). All are stable codes a caller counts.
    """


@dataclass(frozen=True)
class Publication:
    """One MQTT publish a driver asks its caller to make (the drivers never touch a socket)."""

    topic: str
    payload: bytes
    retain: bool
    qos: int = 1


def config_sha256(config: RoundConfig) -> str:
    """The hash every relay document and sealed message binds: SHA-256 of the canonical config."""
    return hashlib.sha256(config.encode()).hexdigest()


def trusted_keys(keys: VerifyKey | Mapping[str, VerifyKey]) -> dict[str, VerifyKey]:
    """``{key_id: key}`` from one pinned aggregator key or an existing trust map."""
    if isinstance(keys, VerifyKey):
        return {key_id(keys): keys}
    return dict(keys)


# --- bounds ------------------------------------------------------------------------------------


def max_message_bytes(kind: str, config: RoundConfig) -> int:
    """The largest canonical JSON of a device message of sealed ``kind`` under ``config``:
    the same bounds :mod:`.messages` parses with (ids at their longest, every list full)."""
    degree = config.degree
    if kind == KIND_ADVERTISE:
        return Advertisement.MAX_BYTES
    if kind == KIND_SHARES:
        return ENVELOPE_BYTES + degree * (_ID_BYTES + b64_len(CIPHERTEXT_BYTES))
    if kind == KIND_MASKED:
        vector = config.vector_length * vector_width(config.bits)
        return ENVELOPE_BYTES + degree * _ID_BYTES + b64_len(vector)
    if kind == KIND_UNMASK:
        return ENVELOPE_BYTES + 2 * degree * (_ID_BYTES + b64_len(SHARE_BYTES))
    raise WireError(WireReason.WRONG_KIND, f"{kind!r} is not a secure-aggregation message", found=kind)


def max_sealed_bytes(config: RoundConfig, kind: str | None = None) -> int:
    """The largest sealed frame of ``kind`` (or of any secure-aggregation kind) under ``config``."""
    kinds = DEVICE_KINDS if kind is None else (kind,)
    return SEALED_OVERHEAD_BYTES + max(max_message_bytes(k, config) for k in kinds)


def max_relay_bytes(what: str, config: RoundConfig) -> int:
    """The largest JSON of the message a relay document carries to one device."""
    degree = config.degree
    if what == BUNDLE:
        return ENVELOPE_BYTES + degree * (Advertisement.MAX_BYTES + ID_OVERHEAD)
    if what == DELIVERY:
        return ENVELOPE_BYTES + degree * (_ID_BYTES + b64_len(CIPHERTEXT_BYTES))
    if what == UNMASK:
        return ENVELOPE_BYTES + 2 * degree * _ID_BYTES
    raise WireError(WireReason.BAD_TOPIC, f"{what!r} is not a relay document", found=what)


def max_document_bytes(what: str, config: RoundConfig | None = None) -> int:
    """The largest signed frame of a document: ``"config"`` (any config: the largest device
    list allowed) or a relay (``bundle``, ``delivery``, ``unmask``, under ``config``)."""
    if what == "config":
        config_bytes = 2 * ENVELOPE_BYTES + MAX_DEVICES * _ID_BYTES
        return PREFIX_BYTES + _HEADER_ROOM + SIGNATURE_BYTES + _DOCUMENT_ROOM + config_bytes
    if config is None:
        raise WireError(WireReason.BAD_TOPIC, f"the bound of a {what!r} document needs the round config")
    return PREFIX_BYTES + _HEADER_ROOM + SIGNATURE_BYTES + _DOCUMENT_ROOM + max_relay_bytes(what, config)


def _check_size(data: bytes, limit: int, what: str) -> None:
    if len(data) > limit:
        raise WireError(
            WireReason.TOO_LARGE,
            f"{what} of {len(data)} bytes",
            field=what,
            expected=f"<= {limit}",
            found=len(data),
        )


# --- the round config document -----------------------------------------------------------------


@dataclass(frozen=True)
class RoundAnnouncement:
    """A verified round config document: what a device joins a round with."""

    fleet: str
    model_version: int
    config: RoundConfig
    config_sha256: str

    @property
    def round_id(self) -> str:
        return self.config.round_id


def round_document(fleet: str, config: RoundConfig, model_version: int, signing_key: SigningKey) -> bytes:
    """The signed config document (retained on ``secagg/{round}/config``)."""
    document = {
        "fleet": fleet,
        "round_id": config.round_id,
        "model_version": model_version,
        "config": config.to_dict(),
    }
    return sign_document(DocType.SECAGG_ROUND, document, signing_key)


def open_round_document(
    payload: bytes, *, topics: FleetTopics, trusted: Mapping[str, VerifyKey], topic: str | None = None
) -> RoundAnnouncement:
    """The announcement in a config document, if a trusted key signed it for this fleet (and,
    given ``topic``, for the round that topic names)."""
    _check_size(payload, max_document_bytes("config"), "config document")
    topic_round = None
    if topic is not None:
        topic_round = _parse_topic(topics, topic, expect="config")[0]
    document = _verify(payload, DocType.SECAGG_ROUND, trusted, max_document_bytes("config"))
    _exact_fields(document, _ROUND_FIELDS, "config document")
    if document["fleet"] != topics.fleet:
        raise WireError(
            WireReason.WRONG_FLEET,
            "config of another fleet",
            expected=topics.fleet,
            found=str(document["fleet"])[:80],
        )
    try:
        config = RoundConfig.from_dict(document["config"])
    except SecAggError as exc:
        raise _passed_on(exc) from None
    except (KeyError, TypeError):
        raise WireError(
            WireReason.BAD_DOCUMENT, "config is not a round config object", field="config"
        ) from None
    if document["round_id"] != config.round_id or (
        topic_round is not None and topic_round != config.round_id
    ):
        raise WireError(
            WireReason.WRONG_ROUND,
            "the document, its config and its topic name different rounds",
            expected=config.round_id,
            found=[str(document["round_id"])[:80], topic_round],
        )
    version = document["model_version"]
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= _MAX_MODEL_VERSION:
        raise WireError(
            WireReason.BAD_DOCUMENT, "model_version must be an integer in 0..2^63-1", field="model_version"
        )
    return RoundAnnouncement(topics.fleet, version, config, config_sha256(config))


# --- relay documents (aggregator -> one device) ---------------------------------------------------

_RELAYS: dict[str, tuple[DocType, type[AdvertisementBundle] | type[ShareDelivery] | type[UnmaskRequest]]] = {
    BUNDLE: (DocType.SECAGG_BUNDLE, AdvertisementBundle),
    DELIVERY: (DocType.SECAGG_DELIVERY, ShareDelivery),
    UNMASK: (DocType.SECAGG_UNMASK, UnmaskRequest),
}


def relay_what(message: RelayMessage) -> str:
    """The per-device topic a relayed message goes on (``bundle``, ``delivery``, ``unmask``)."""
    if isinstance(message, AdvertisementBundle):
        return BUNDLE
    if isinstance(message, ShareDelivery):
        return DELIVERY
    return UNMASK


def relay_recipient(message: RelayMessage) -> str:
    return (
        message.recipient if isinstance(message, AdvertisementBundle | UnmaskRequest) else message.device_id
    )


def relay_document(fleet: str, config_hash: str, message: RelayMessage, signing_key: SigningKey) -> bytes:
    """The signed document carrying ``message`` to its recipient."""
    doc_type = _RELAYS[relay_what(message)][0]
    document = {
        "fleet": fleet,
        "round_id": message.round_id,
        "config_sha256": config_hash,
        "recipient": relay_recipient(message),
        "message": message.to_dict(),
    }
    return sign_document(doc_type, document, signing_key)


def relay_publication(
    topics: FleetTopics, config_hash: str, message: RelayMessage, signing_key: SigningKey
) -> Publication:
    """``message`` signed and addressed: retained on its recipient's per-phase topic."""
    topic = topics.secagg_device(message.round_id, relay_recipient(message), relay_what(message))
    return Publication(topic, relay_document(topics.fleet, config_hash, message, signing_key), retain=True)


def open_relay_document(
    topic: str,
    payload: bytes,
    *,
    announcement: RoundAnnouncement,
    topics: FleetTopics,
    trusted: Mapping[str, VerifyKey],
    recipient: str,
) -> RelayMessage:
    """The relayed message in a document on ``topic``, if a trusted key signed it for this
    fleet, round, config and recipient, and the topic says the same."""
    config = announcement.config
    round_id, what, device = _parse_topic(topics, topic, expect="relay")
    if round_id != config.round_id:
        raise WireError(
            WireReason.WRONG_ROUND, "topic of another round", expected=config.round_id, found=round_id
        )
    if device != recipient:
        raise WireError(
            WireReason.WRONG_RECIPIENT, "topic of another device", expected=recipient, found=device
        )
    doc_type, cls = _RELAYS[what]
    limit = max_document_bytes(what, config)
    _check_size(payload, limit, f"{what} document")
    document = _verify(payload, doc_type, trusted, limit)
    _exact_fields(document, _RELAY_FIELDS, f"{what} document")
    if document["fleet"] != topics.fleet:
        raise WireError(
            WireReason.WRONG_FLEET,
            f"{what} of another fleet",
            expected=topics.fleet,
            found=str(document["fleet"])[:80],
        )
    if document["round_id"] != config.round_id:
        raise WireError(
            WireReason.WRONG_ROUND,
            f"{what} of another round",
            expected=config.round_id,
            found=str(document["round_id"])[:80],
        )
    if document["config_sha256"] != announcement.config_sha256:
        raise WireError(
            WireReason.WRONG_CONFIG, f"{what} bound to another round config", field="config_sha256"
        )
    if document["recipient"] != recipient:
        raise WireError(
            WireReason.WRONG_RECIPIENT,
            f"{what} for another device",
            expected=recipient,
            found=str(document["recipient"])[:80],
        )
    if not isinstance(document["message"], dict):
        raise WireError(WireReason.BAD_DOCUMENT, "message must be an object", field="message")
    try:
        message: RelayMessage = cls.decode(encode(document["message"]), config)
    except SecAggError as exc:
        raise _passed_on(exc) from None
    if message.round_id != config.round_id or relay_recipient(message) != recipient:
        raise WireError(WireReason.WRONG_RECIPIENT, f"the {what} inside names another round or device")
    return message


# --- sealed device messages (device -> aggregator) ------------------------------------------------


def device_kind(message: DeviceMessage) -> str:
    """The sealed kind of a device message."""
    if isinstance(message, Advertisement):
        return KIND_ADVERTISE
    if isinstance(message, ShareMessage):
        return KIND_SHARES
    if isinstance(message, MaskedInput):
        return KIND_MASKED
    return KIND_UNMASK


def seal_message(
    message: DeviceMessage,
    *,
    announcement: RoundAnnouncement,
    counter: int,
    device_key: PrivateKey,
    aggregator_key: PublicKey,
) -> bytes:
    """``message`` sealed for the aggregator under the announced round (fleet, version, config)."""
    body = message.encode(announcement.config.bits) if isinstance(message, MaskedInput) else message.encode()
    header = SealedHeader(
        fleet=announcement.fleet,
        device_id=message.device_id,
        round_id=announcement.round_id,
        counter=counter,
        kind=device_kind(message),
        model_version=announcement.model_version,
    )
    return seal(header, {"config_sha256": announcement.config_sha256}, body, device_key, aggregator_key)


def message_publication(
    topics: FleetTopics,
    message: DeviceMessage,
    *,
    announcement: RoundAnnouncement,
    counter: int,
    device_key: PrivateKey,
    aggregator_key: PublicKey,
) -> Publication:
    """``message`` sealed, on the device's ``update`` topic (QoS 1, not retained)."""
    frame = seal_message(
        message,
        announcement=announcement,
        counter=counter,
        device_key=device_key,
        aggregator_key=aggregator_key,
    )
    return Publication(topics.update(message.device_id), frame, retain=False)


def read_sealed(
    topic: str, payload: bytes, *, topics: FleetTopics, config: RoundConfig, model_version: int
) -> tuple[SealedHeader, bytes]:
    """The cheap checks before any crypto: size, topic, cleartext header (fleet, kind, round,
    version, selected device). Returns the header and the ciphertext to open."""
    _check_size(payload, max_sealed_bytes(config), "sealed message")
    try:
        topic_device = topics.device_of(topic, "update")
    except TopicError as exc:
        raise WireError(WireReason.BAD_TOPIC, str(exc)) from None
    try:
        header, ciphertext = read_header(payload, max_sealed_bytes(config))
    except SealError as exc:
        raise _passed_on(exc) from None
    if header.device_id != topic_device:
        raise WireError(WireReason.DEVICE_MISMATCH, "sealed by another device than the topic names")
    if header.fleet != topics.fleet:
        raise WireError(WireReason.WRONG_FLEET, "sealed for another fleet", found=header.fleet)
    if header.kind not in DEVICE_KINDS:
        raise WireError(
            WireReason.WRONG_KIND, f"{header.kind!r} is not a secure-aggregation message", found=header.kind
        )
    if header.round_id != config.round_id:
        raise WireError(
            WireReason.WRONG_ROUND,
            "sealed for another round",
            expected=config.round_id,
            found=header.round_id,
        )
    if header.model_version != model_version:
        raise WireError(
            WireReason.WRONG_VERSION, "sealed for another model version", found=header.model_version
        )
    if not config.is_selected(header.device_id):
        raise WireError(WireReason.NOT_SELECTED, f"{header.device_id!r} is not selected for the round")
    _check_size(payload, max_sealed_bytes(config, header.kind), f"{header.kind} message")
    return header, ciphertext


def open_message(
    header: SealedHeader,
    ciphertext: bytes,
    *,
    config: RoundConfig,
    config_hash: str,
    aggregator_key: PrivateKey,
    device_public: PublicKey,
    box: Box | None = None,
) -> DeviceMessage:
    """Opens a sealed message (after :func:`read_sealed`) and decodes it with the round's bounds;
    it must be bound to ``config_hash`` and name the device that sealed it."""
    limit = max_sealed_bytes(config, header.kind)
    try:
        payload_header, body = open_sealed(header, ciphertext, aggregator_key, device_public, limit, box=box)
    except SealError as exc:
        raise _passed_on(exc) from None
    if set(payload_header) != {"config_sha256"} or not isinstance(payload_header["config_sha256"], str):
        raise WireError(
            WireReason.BAD_PAYLOAD, "payload header must be {'config_sha256': <hex>}", field="payload"
        )
    if payload_header["config_sha256"] != config_hash:
        raise WireError(WireReason.WRONG_CONFIG, "sealed under another round config", field="config_sha256")
    try:
        message = _decode_device_message(header.kind, body, config)
    except SecAggError as exc:
        raise _passed_on(exc) from None
    if message.device_id != header.device_id:
        raise WireError(WireReason.DEVICE_MISMATCH, "the message names another device than its seal")
    return message


def _decode_device_message(kind: str, body: bytes, config: RoundConfig) -> DeviceMessage:
    if kind == KIND_ADVERTISE:
        return Advertisement.decode(body)
    if kind == KIND_SHARES:
        return ShareMessage.decode(body, config)
    if kind == KIND_MASKED:
        return MaskedInput.decode(body, config)
    return UnmaskResponse.decode(body, config)


# --- helpers -----------------------------------------------------------------------------------


def _verify(
    payload: bytes, doc_type: DocType, trusted: Mapping[str, VerifyKey], limit: int
) -> dict[str, Any]:
    try:
        document, _kid = verify_document(payload, doc_type, trusted, limit)
    except SignatureError as exc:
        raise _passed_on(exc) from None
    return document


def _passed_on(exc: SealError | SignatureError | SecAggError) -> WireError:
    """A refusal of the layer below as a :class:`WireError` with the same reason and fields."""
    detail = str(exc).removeprefix(f"{exc.reason}: ")
    fields = exc if isinstance(exc, ReasonFieldError) else None
    return WireError(
        exc.reason,
        detail,
        field=fields.field if fields else None,
        expected=fields.expected if fields else None,
        found=fields.found if fields else None,
    )


def _exact_fields(document: dict[str, Any], fields: frozenset[str], what: str) -> None:
    if set(document) != fields:
        raise WireError(
            WireReason.BAD_DOCUMENT,
            f"{what} must have exactly {sorted(fields)}",
            field=what,
            expected=sorted(fields),
            found=sorted(document)[:16],
        )
    for key in ("fleet", "round_id", "recipient", "config_sha256"):
        if key in fields and not isinstance(document[key], str):
            raise WireError(WireReason.BAD_DOCUMENT, f"{key} must be a string", field=key)
    if "round_id" in fields:
        try:
            check_device_id(document["round_id"], "round_id", "round id")
        except SecAggError:
            raise WireError(WireReason.BAD_DOCUMENT, "round_id is not a valid id", field="round_id") from None


def _parse_topic(topics: FleetTopics, topic: str, *, expect: str) -> tuple[str, str, str | None]:
    try:
        round_id, what, device = topics.secagg_parse(topic)
    except TopicError as exc:
        raise WireError(WireReason.BAD_TOPIC, str(exc)) from None
    if (expect == "config") != (device is None):
        raise WireError(WireReason.BAD_TOPIC, f"{topic!r} is not a {expect} topic")
    return round_id, what, device
