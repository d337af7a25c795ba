"""The secure-aggregation wire contract: topics, sealed device messages, signed documents, bounds.

Real keys and real crypto throughout. Every refusal is a :class:`WireError` with a stable reason,
and every size is refused before anything is parsed: a document of one round, fleet, config or
device never passes in another, and a message never passes off as another kind.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np
import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey
from secagg_harness import T_ADVERTISE, Fleet, identity_key, make_config

from fedge.protocol.framing import FrameKind, decode_frame, encode_frame
from fedge.protocol.sealing import MESSAGE_KINDS, SealedHeader, seal
from fedge.protocol.secagg import (
    Advertisement,
    AdvertisementBundle,
    MaskedInput,
    RoundConfig,
    ShareDelivery,
    ShareMessage,
    UnmaskRequest,
    UnmaskResponse,
    sign_advertisement,
)
from fedge.protocol.secagg.prg import public_from_private
from fedge.protocol.secagg.shamir import SHARE_BYTES
from fedge.protocol.secagg.share_box import CIPHERTEXT_BYTES
from fedge.protocol.secagg.wire import (
    BUNDLE,
    DELIVERY,
    DEVICE_KINDS,
    UNMASK,
    Publication,
    RoundAnnouncement,
    WireError,
    WireReason,
    config_sha256,
    max_document_bytes,
    max_message_bytes,
    max_sealed_bytes,
    message_publication,
    open_message,
    open_relay_document,
    open_round_document,
    read_sealed,
    relay_document,
    relay_publication,
    round_document,
    seal_message,
    trusted_keys,
)
from fedge.protocol.signing import DocType, key_id, sign_document
from fedge.protocol.topics import FleetTopics, TopicError

pytestmark = pytest.mark.protocol

FLEET = "fleet-1"
TOPICS = FleetTopics(FLEET)
CONFIG = make_config(6, vector_length=40)
AGG_SIGN = SigningKey(b"\x01" * 32)
AGG_BOX = PrivateKey(b"\x02" * 32)
TRUSTED = trusted_keys(AGG_SIGN.verify_key)
DEVICE = CONFIG.device_ids[0]
OTHER = CONFIG.device_ids[1]
BOXES = {d: PrivateKey(hashlib.sha256(d.encode()).digest()) for d in CONFIG.device_ids}
VERSION = 7


def _announcement(config: RoundConfig = CONFIG, fleet: str = FLEET) -> RoundAnnouncement:
    return RoundAnnouncement(fleet, VERSION, config, config_sha256(config))


def _refused(call: Any, reason: str) -> WireError:
    with pytest.raises(WireError) as caught:
        call()
    assert caught.value.reason == reason, caught.value
    return caught.value


def _messages() -> dict[str, Any]:
    """One of each message of a real round of CONFIG (the harness's in-memory fleet)."""
    fleet = Fleet(CONFIG)
    bundles = fleet.advertise()
    ad = fleet.aggregator._ads[DEVICE]
    deliveries = fleet.share(bundles)
    shares = ShareMessage(CONFIG.round_id, DEVICE, {OTHER: b"\x00" * CIPHERTEXT_BYTES})
    requests = fleet.mask(deliveries)
    masked = MaskedInput(
        CONFIG.round_id, DEVICE, tuple(sorted(requests[DEVICE].alive)), fleet.quantised[DEVICE]
    )
    response = fleet.devices[DEVICE].on_unmask_request(requests[DEVICE], T_ADVERTISE + 30)
    return {
        "advertisement": ad,
        "bundle": bundles[DEVICE],
        "shares": shares,
        "delivery": deliveries[DEVICE],
        "masked": masked,
        "request": requests[DEVICE],
        "response": response,
    }


MESSAGES = _messages()


# --- topics and kinds --------------------------------------------------------------------------


def test_the_secagg_topics_live_under_the_fleet_per_round_and_per_device() -> None:
    assert TOPICS.secagg("r-1", "config") == "fedge/v1/fleet-1/secagg/r-1/config"
    assert TOPICS.secagg_device("r-1", "dev-1", "bundle") == "fedge/v1/fleet-1/secagg/r-1/bundle/dev-1"
    assert TOPICS.secagg_device("r-1", "dev-1", "delivery") == "fedge/v1/fleet-1/secagg/r-1/delivery/dev-1"
    assert TOPICS.secagg_device("r-1", "dev-1", "unmask") == "fedge/v1/fleet-1/secagg/r-1/unmask/dev-1"
    assert TOPICS.secagg_config_filter == "fedge/v1/fleet-1/secagg/+/config"
    assert TOPICS.secagg_device_filter("r-1", "dev-1") == "fedge/v1/fleet-1/secagg/r-1/+/dev-1"
    assert TOPICS.secagg_round_filter("r-1") == "fedge/v1/fleet-1/secagg/r-1/#"
    assert TOPICS.secagg_parse("fedge/v1/fleet-1/secagg/r-1/config") == ("r-1", "config", None)
    assert TOPICS.secagg_parse("fedge/v1/fleet-1/secagg/r-1/unmask/dev-1") == ("r-1", "unmask", "dev-1")


@pytest.mark.parametrize(
    "call",
    [
        lambda: TOPICS.secagg("r-1", "bundle"),
        lambda: TOPICS.secagg("r/1", "config"),
        lambda: TOPICS.secagg_device("r-1", "dev-1", "config"),
        lambda: TOPICS.secagg_device("r-1", "+", "bundle"),
        lambda: TOPICS.secagg_parse("fedge/v1/fleet-1/secagg/r-1/config/x"),
        lambda: TOPICS.secagg_parse("fedge/v1/fleet-1/secagg/r-1/bundle"),
        lambda: TOPICS.secagg_parse("fedge/v1/fleet-1/secagg/r-1/other/dev-1"),
        lambda: TOPICS.secagg_parse("fedge/v1/fleet-2/secagg/r-1/config"),
        lambda: TOPICS.secagg_parse("fedge/v1/fleet-1/secagg/r#/config"),
    ],
    ids=[
        "device topic as round topic",
        "slash in round",
        "round topic as device topic",
        "wildcard device",
        "extra level",
        "missing device",
        "unknown what",
        "other fleet",
        "wildcard round",
    ],
)
def test_malformed_secagg_topics_are_refused(call: Any) -> None:
    with pytest.raises(TopicError):
        call()


def test_the_four_device_kinds_are_sealed_message_kinds() -> None:
    assert DEVICE_KINDS == ("secagg_advertise", "secagg_shares", "secagg_masked", "secagg_unmask")
    assert set(DEVICE_KINDS) <= set(MESSAGE_KINDS)
    assert {"update", "moments"} <= set(MESSAGE_KINDS)


def test_the_secagg_document_types_are_distinct() -> None:
    types = [DocType.SECAGG_ROUND, DocType.SECAGG_BUNDLE, DocType.SECAGG_DELIVERY, DocType.SECAGG_UNMASK]
    assert len(set(types) | {DocType.ROUND_MANIFEST, DocType.KEY_ROTATION}) == 6


# --- the round config document -----------------------------------------------------------------


def test_a_round_document_round_trips_and_binds_the_config_hash() -> None:
    payload = round_document(FLEET, CONFIG, VERSION, AGG_SIGN)
    topic = TOPICS.secagg(CONFIG.round_id, "config")
    announcement = open_round_document(payload, topics=TOPICS, trusted=TRUSTED, topic=topic)
    assert announcement == _announcement()
    assert announcement.round_id == CONFIG.round_id
    assert announcement.config_sha256 == hashlib.sha256(CONFIG.encode()).hexdigest()


def test_a_round_document_signed_by_another_key_is_refused() -> None:
    payload = round_document(FLEET, CONFIG, VERSION, SigningKey(b"\x09" * 32))
    _refused(lambda: open_round_document(payload, topics=TOPICS, trusted=TRUSTED), "unknown_key")


def test_a_round_document_of_another_fleet_is_refused() -> None:
    payload = round_document("fleet-2", CONFIG, VERSION, AGG_SIGN)
    _refused(lambda: open_round_document(payload, topics=TOPICS, trusted=TRUSTED), WireReason.WRONG_FLEET)


def test_a_round_document_on_another_rounds_topic_is_refused() -> None:
    payload = round_document(FLEET, CONFIG, VERSION, AGG_SIGN)
    topic = TOPICS.secagg("r-2", "config")
    _refused(
        lambda: open_round_document(payload, topics=TOPICS, trusted=TRUSTED, topic=topic),
        WireReason.WRONG_ROUND,
    )


def test_a_round_document_whose_round_differs_from_its_config_is_refused() -> None:
    document = {"fleet": FLEET, "round_id": "r-2", "model_version": VERSION, "config": CONFIG.to_dict()}
    payload = sign_document(DocType.SECAGG_ROUND, document, AGG_SIGN)
    _refused(lambda: open_round_document(payload, topics=TOPICS, trusted=TRUSTED), WireReason.WRONG_ROUND)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"extra": 1}, WireReason.BAD_DOCUMENT),
        ({"model_version": -1}, WireReason.BAD_DOCUMENT),
        ({"model_version": True}, WireReason.BAD_DOCUMENT),
        ({"fleet": 5}, WireReason.BAD_DOCUMENT),
        ({"config": {"type": "secagg-round"}}, "bad_message"),
        ({"config": "not an object"}, "bad_message"),
        ({"config": {**CONFIG.to_dict(), "threshold": 1}}, "bad_parameters"),
    ],
    ids=[
        "extra field",
        "negative version",
        "bool version",
        "fleet not a string",
        "empty config",
        "string",
        "t=1",
    ],
)
def test_a_malformed_round_document_is_refused(change: dict[str, Any], reason: str) -> None:
    document = {
        "fleet": FLEET,
        "round_id": CONFIG.round_id,
        "model_version": VERSION,
        "config": CONFIG.to_dict(),
    }
    payload = sign_document(DocType.SECAGG_ROUND, {**document, **change}, AGG_SIGN)
    _refused(lambda: open_round_document(payload, topics=TOPICS, trusted=TRUSTED), reason)


def test_a_tampered_round_document_is_refused() -> None:
    payload = bytearray(round_document(FLEET, CONFIG, VERSION, AGG_SIGN))
    payload[-3] ^= 1
    _refused(lambda: open_round_document(bytes(payload), topics=TOPICS, trusted=TRUSTED), "bad_signature")


def test_another_document_type_passed_off_as_a_round_document_is_refused() -> None:
    document = {
        "fleet": FLEET,
        "round_id": CONFIG.round_id,
        "model_version": VERSION,
        "config": CONFIG.to_dict(),
    }
    payload = sign_document(DocType.ROUND_MANIFEST, document, AGG_SIGN)
    _refused(lambda: open_round_document(payload, topics=TOPICS, trusted=TRUSTED), "bad_header")


def test_a_huge_round_document_is_refused_before_it_is_parsed() -> None:
    payload = b"\xff" * (max_document_bytes("config") + 1)
    error = _refused(
        lambda: open_round_document(payload, topics=TOPICS, trusted=TRUSTED), WireReason.TOO_LARGE
    )
    assert error.found == len(payload)


def test_a_round_document_on_a_device_topic_is_refused() -> None:
    payload = round_document(FLEET, CONFIG, VERSION, AGG_SIGN)
    topic = TOPICS.secagg_device(CONFIG.round_id, DEVICE, "bundle")
    _refused(
        lambda: open_round_document(payload, topics=TOPICS, trusted=TRUSTED, topic=topic),
        WireReason.BAD_TOPIC,
    )


# --- relay documents ---------------------------------------------------------------------------

RELAYS = {BUNDLE: "bundle", DELIVERY: "delivery", UNMASK: "request"}


def _open_relay(topic: str, payload: bytes, *, announcement: RoundAnnouncement | None = None) -> Any:
    return open_relay_document(
        topic,
        payload,
        announcement=announcement or _announcement(),
        topics=TOPICS,
        trusted=TRUSTED,
        recipient=DEVICE,
    )


@pytest.mark.parametrize("what", [BUNDLE, DELIVERY, UNMASK])
def test_each_relay_document_round_trips_on_its_recipients_retained_topic(what: str) -> None:
    message = MESSAGES[RELAYS[what]]
    publication = relay_publication(TOPICS, config_sha256(CONFIG), message, AGG_SIGN)
    assert publication == Publication(
        TOPICS.secagg_device(CONFIG.round_id, DEVICE, what), publication.payload, retain=True, qos=1
    )
    assert _open_relay(publication.topic, publication.payload) == message


def _relay(what: str = BUNDLE, **change: Any) -> tuple[str, bytes]:
    message = MESSAGES[RELAYS[what]]
    document = {
        "fleet": FLEET,
        "round_id": CONFIG.round_id,
        "config_sha256": config_sha256(CONFIG),
        "recipient": DEVICE,
        "message": message.to_dict(),
        **change,
    }
    doc_type = {
        BUNDLE: DocType.SECAGG_BUNDLE,
        DELIVERY: DocType.SECAGG_DELIVERY,
        UNMASK: DocType.SECAGG_UNMASK,
    }
    return TOPICS.secagg_device(CONFIG.round_id, DEVICE, what), sign_document(
        doc_type[what], document, AGG_SIGN
    )


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"fleet": "fleet-2"}, WireReason.WRONG_FLEET),
        ({"round_id": "r-2"}, WireReason.WRONG_ROUND),
        ({"config_sha256": "00" * 32}, WireReason.WRONG_CONFIG),
        ({"recipient": OTHER}, WireReason.WRONG_RECIPIENT),
        ({"extra": 1}, WireReason.BAD_DOCUMENT),
        ({"round_id": "r/2"}, WireReason.BAD_DOCUMENT),
        ({"message": [1]}, WireReason.BAD_DOCUMENT),
        ({"message": {"type": "secagg-advertisements"}}, "bad_message"),
        ({"message": MESSAGES["request"].to_dict()}, "bad_message"),
    ],
    ids=[
        "other fleet",
        "other round",
        "other config",
        "other recipient",
        "extra field",
        "bad round id",
        "message not an object",
        "empty message",
        "another message type",
    ],
)
def test_a_wrong_relay_document_is_refused(change: dict[str, Any], reason: str) -> None:
    topic, payload = _relay(**change)
    _refused(lambda: _open_relay(topic, payload), reason)


def test_a_relay_whose_inner_message_names_another_device_is_refused() -> None:
    other_bundle = dataclasses.replace(MESSAGES["bundle"], recipient=OTHER)
    topic, payload = _relay(message=other_bundle.to_dict())
    _refused(lambda: _open_relay(topic, payload), WireReason.WRONG_RECIPIENT)


def test_a_relay_document_of_another_round_with_the_same_id_is_refused() -> None:
    """Same round id, other parameters (a replayed document of an aborted round's retry)."""
    other = dataclasses.replace(CONFIG, graph_seed=b"\x08" * 32)
    payload = relay_document(FLEET, config_sha256(other), MESSAGES["bundle"], AGG_SIGN)
    topic = TOPICS.secagg_device(CONFIG.round_id, DEVICE, BUNDLE)
    _refused(lambda: _open_relay(topic, payload), WireReason.WRONG_CONFIG)


def test_a_relay_document_signed_by_another_key_is_refused() -> None:
    payload = relay_document(FLEET, config_sha256(CONFIG), MESSAGES["bundle"], SigningKey(b"\x09" * 32))
    _refused(
        lambda: _open_relay(TOPICS.secagg_device(CONFIG.round_id, DEVICE, BUNDLE), payload), "unknown_key"
    )


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        (TOPICS.secagg_device(CONFIG.round_id, OTHER, BUNDLE), WireReason.WRONG_RECIPIENT),
        (TOPICS.secagg_device("r-2", DEVICE, BUNDLE), WireReason.WRONG_ROUND),
        (TOPICS.secagg_device(CONFIG.round_id, DEVICE, DELIVERY), "bad_header"),
        (TOPICS.secagg(CONFIG.round_id, "config"), WireReason.BAD_TOPIC),
        (TOPICS.update(DEVICE), WireReason.BAD_TOPIC),
    ],
    ids=["other device's topic", "other round's topic", "delivery topic", "config topic", "update topic"],
)
def test_a_relay_document_on_the_wrong_topic_is_refused(topic: str, reason: str) -> None:
    _, payload = _relay()
    _refused(lambda: _open_relay(topic, payload), reason)


def test_a_huge_relay_document_is_refused_before_it_is_parsed() -> None:
    topic = TOPICS.secagg_device(CONFIG.round_id, DEVICE, UNMASK)
    payload = b"\x00" * (max_document_bytes(UNMASK, CONFIG) + 1)
    _refused(lambda: _open_relay(topic, payload), WireReason.TOO_LARGE)


# --- sealed device messages ----------------------------------------------------------------------

DEVICE_MESSAGES = {
    "secagg_advertise": "advertisement",
    "secagg_shares": "shares",
    "secagg_masked": "masked",
    "secagg_unmask": "response",
}


def _sealed(message: Any, counter: int = 1, *, announcement: RoundAnnouncement | None = None) -> Publication:
    return message_publication(
        TOPICS,
        message,
        announcement=announcement or _announcement(),
        counter=counter,
        device_key=BOXES[DEVICE],
        aggregator_key=AGG_BOX.public_key,
    )


def _open(topic: str, payload: bytes, *, device: str = DEVICE, config: RoundConfig = CONFIG) -> Any:
    header, ciphertext = read_sealed(topic, payload, topics=TOPICS, config=config, model_version=VERSION)
    return open_message(
        header,
        ciphertext,
        config=config,
        config_hash=config_sha256(CONFIG),
        aggregator_key=AGG_BOX,
        device_public=BOXES[device].public_key,
    )


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, MaskedInput):
        return bool(a.to_dict(CONFIG.bits) == b.to_dict(CONFIG.bits))
    return bool(a == b)


@pytest.mark.parametrize("kind", DEVICE_KINDS)
def test_each_device_message_is_sealed_on_its_update_topic_and_opens(kind: str) -> None:
    message = MESSAGES[DEVICE_MESSAGES[kind]]
    publication = _sealed(message, counter=5)
    assert (publication.topic, publication.retain, publication.qos) == (TOPICS.update(DEVICE), False, 1)
    header, _ = read_sealed(
        publication.topic, publication.payload, topics=TOPICS, config=CONFIG, model_version=VERSION
    )
    assert header == SealedHeader(FLEET, DEVICE, CONFIG.round_id, 5, kind, VERSION)
    assert _equal(_open(publication.topic, publication.payload), message)
    assert len(publication.payload) <= max_sealed_bytes(CONFIG, kind)


def test_the_masked_vector_is_not_readable_on_the_wire() -> None:
    masked = MESSAGES["masked"]
    payload = _sealed(masked).payload
    assert masked.encode(CONFIG.bits) not in payload
    assert b"secagg-masked-input" not in payload and b"config_sha256" not in payload


def _foreign_seal(kind: str = "secagg_advertise", **change: Any) -> bytes:
    fields = {
        "fleet": FLEET,
        "device_id": DEVICE,
        "round_id": CONFIG.round_id,
        "counter": 1,
        "kind": kind,
        "model_version": VERSION,
        **change,
    }
    body = MESSAGES["advertisement"].encode()
    return seal(
        SealedHeader(**fields),
        {"config_sha256": config_sha256(CONFIG)},
        body,
        BOXES[DEVICE],
        AGG_BOX.public_key,
    )


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (_foreign_seal(fleet="fleet-2"), WireReason.WRONG_FLEET),
        (_foreign_seal(kind="update"), WireReason.WRONG_KIND),
        (_foreign_seal(round_id="r-9"), WireReason.WRONG_ROUND),
        (_foreign_seal(model_version=VERSION + 1), WireReason.WRONG_VERSION),
        (_foreign_seal(device_id=OTHER), WireReason.DEVICE_MISMATCH),
        (b"short", "frame_truncated"),
        (b"XXXX" + b"\x00" * 40, "frame_bad_magic"),
    ],
    ids=[
        "other fleet",
        "plain update kind",
        "other round",
        "other version",
        "other device",
        "garbage",
        "magic",
    ],
)
def test_a_wrong_sealed_header_is_refused_before_any_crypto(payload: bytes, reason: str) -> None:
    _refused(lambda: _open(TOPICS.update(DEVICE), payload), reason)


def test_a_device_outside_the_round_is_refused() -> None:
    payload = _foreign_seal(device_id="stranger")
    _refused(lambda: _open(TOPICS.update("stranger"), payload), WireReason.NOT_SELECTED)


def test_a_message_on_another_topic_is_refused() -> None:
    publication = _sealed(MESSAGES["advertisement"])
    _refused(lambda: _open(TOPICS.status(DEVICE), publication.payload), WireReason.BAD_TOPIC)


def test_a_huge_sealed_message_is_refused_before_it_is_parsed() -> None:
    payload = b"\x00" * (max_sealed_bytes(CONFIG) + 1)
    _refused(lambda: _open(TOPICS.update(DEVICE), payload), WireReason.TOO_LARGE)


def test_a_sealed_advertisement_the_size_of_a_masked_input_is_refused() -> None:
    """Each kind has its own bound: padding a small kind up to the largest one does not pass."""
    header = SealedHeader(FLEET, DEVICE, CONFIG.round_id, 1, "secagg_advertise", VERSION)
    body = b" " * (max_sealed_bytes(CONFIG, "secagg_advertise"))
    payload = seal(header, {"config_sha256": config_sha256(CONFIG)}, body, BOXES[DEVICE], AGG_BOX.public_key)
    assert len(payload) <= max_sealed_bytes(CONFIG)
    _refused(lambda: _open(TOPICS.update(DEVICE), payload), WireReason.TOO_LARGE)


def test_a_message_sealed_by_another_device_key_does_not_open() -> None:
    publication = _sealed(MESSAGES["advertisement"])
    _refused(lambda: _open(publication.topic, publication.payload, device=OTHER), "decrypt_failed")


def test_a_relabelled_counter_is_a_binding_mismatch() -> None:
    payload = _sealed(MESSAGES["advertisement"], counter=3).payload
    frame = decode_frame(payload, FrameKind.SEALED)
    relabelled = encode_frame(FrameKind.SEALED, {**frame.header, "counter": 2**62}, frame.body)
    _refused(lambda: _open(TOPICS.update(DEVICE), relabelled), "binding_mismatch")


def test_a_message_sealed_under_another_config_is_refused() -> None:
    other = dataclasses.replace(CONFIG, graph_seed=b"\x08" * 32)
    publication = _sealed(MESSAGES["advertisement"], announcement=_announcement(other))
    _refused(lambda: _open(publication.topic, publication.payload), WireReason.WRONG_CONFIG)


def test_a_message_of_another_kind_than_its_seal_says_is_refused() -> None:
    header = SealedHeader(FLEET, DEVICE, CONFIG.round_id, 1, "secagg_masked", VERSION)
    body = MESSAGES["shares"].encode()
    payload = seal(header, {"config_sha256": config_sha256(CONFIG)}, body, BOXES[DEVICE], AGG_BOX.public_key)
    _refused(lambda: _open(TOPICS.update(DEVICE), payload), "bad_message")


def test_a_message_naming_another_device_than_its_seal_is_refused() -> None:
    other_ad = MESSAGES["advertisement"]
    forged = dataclasses.replace(other_ad, device_id=OTHER)
    header = SealedHeader(FLEET, DEVICE, CONFIG.round_id, 1, "secagg_advertise", VERSION)
    payload = seal(
        header, {"config_sha256": config_sha256(CONFIG)}, forged.encode(), BOXES[DEVICE], AGG_BOX.public_key
    )
    _refused(lambda: _open(TOPICS.update(DEVICE), payload), WireReason.DEVICE_MISMATCH)


@pytest.mark.parametrize("payload_header", [{}, {"config_sha256": 5}, {"config_sha256": "x", "more": 1}])
def test_a_bad_sealed_payload_header_is_refused(payload_header: dict[str, Any]) -> None:
    header = SealedHeader(FLEET, DEVICE, CONFIG.round_id, 1, "secagg_advertise", VERSION)
    payload = seal(
        header, payload_header, MESSAGES["advertisement"].encode(), BOXES[DEVICE], AGG_BOX.public_key
    )
    _refused(lambda: _open(TOPICS.update(DEVICE), payload), WireReason.BAD_PAYLOAD)


def test_seal_message_puts_the_announced_round_in_the_header() -> None:
    payload = seal_message(
        MESSAGES["response"],
        announcement=_announcement(),
        counter=9,
        device_key=BOXES[DEVICE],
        aggregator_key=AGG_BOX.public_key,
    )
    header, _ = read_sealed(
        TOPICS.update(DEVICE), payload, topics=TOPICS, config=CONFIG, model_version=VERSION
    )
    assert (header.kind, header.counter, header.model_version) == ("secagg_unmask", 9, VERSION)


# --- bounds: the largest honest messages fit -------------------------------------------------------


def _long_id(i: int) -> str:
    return f"{i:04d}" + "x" * 60


def test_the_largest_honest_messages_fit_their_bounds() -> None:
    """Ids at 64 characters and every list full: what the bounds must still let through."""
    n = 12
    ids = tuple(sorted(_long_id(i) for i in range(n)))
    config = dataclasses.replace(
        make_config(n, vector_length=300, bits=62), device_ids=ids, round_id="r" * 64
    )
    degree = config.degree
    me, others = ids[0], ids[1 : degree + 1]
    key = identity_key(me)
    ads = tuple(
        sign_advertisement(
            config.round_id,
            d,
            public_from_private(bytes([i + 1]) * 32),
            public_from_private(bytes([i + 100]) * 32),
            key,
        )
        for i, d in enumerate(others)
    )
    messages: dict[str, Any] = {
        "secagg_advertise": ads[0],
        "secagg_shares": ShareMessage(config.round_id, me, dict.fromkeys(others, b"\xff" * CIPHERTEXT_BYTES)),
        "secagg_masked": MaskedInput(
            config.round_id, me, others, np.full(config.vector_length, 2**62 - 1, dtype=np.uint64)
        ),
        "secagg_unmask": UnmaskResponse(
            config.round_id,
            me,
            dict.fromkeys(others, b"\xff" * SHARE_BYTES),
            dict.fromkeys(others, b"\xff" * SHARE_BYTES),
        ),
    }
    for kind, message in messages.items():
        body = message.encode(config.bits) if isinstance(message, MaskedInput) else message.encode()
        assert len(body) <= max_message_bytes(kind, config), kind
    relays: dict[str, Any] = {
        BUNDLE: AdvertisementBundle(config.round_id, me, ads),
        DELIVERY: ShareDelivery(config.round_id, me, dict.fromkeys(others, b"\xff" * CIPHERTEXT_BYTES)),
        UNMASK: UnmaskRequest(config.round_id, me, others, others),
    }
    long_fleet = "f" * 64
    for what, message in relays.items():
        payload = relay_document(long_fleet, config_sha256(config), message, AGG_SIGN)
        assert len(payload) <= max_document_bytes(what, config), what
    assert len(round_document(long_fleet, config, 2**63 - 1, AGG_SIGN)) <= max_document_bytes("config")
    # Every id in the sealed header at its longest, too.
    announcement = RoundAnnouncement(long_fleet, 2**63 - 1, config, config_sha256(config))
    for kind, message in messages.items():
        frame = seal_message(
            message,
            announcement=announcement,
            counter=2**63 - 1,
            device_key=BOXES[DEVICE],
            aggregator_key=AGG_BOX.public_key,
        )
        assert len(frame) <= max_sealed_bytes(config, kind), kind


def test_bounds_of_unknown_kinds_are_refused() -> None:
    _refused(lambda: max_message_bytes("update", CONFIG), WireReason.WRONG_KIND)
    _refused(lambda: max_document_bytes("other", CONFIG), WireReason.BAD_TOPIC)
    _refused(lambda: max_document_bytes(BUNDLE), WireReason.BAD_TOPIC)


def test_trusted_keys_accepts_one_key_or_a_map() -> None:
    assert trusted_keys(AGG_SIGN.verify_key) == {key_id(AGG_SIGN.verify_key): AGG_SIGN.verify_key}
    assert trusted_keys(TRUSTED) == TRUSTED


def test_advertisement_type_is_what_the_kind_table_says() -> None:
    assert isinstance(MESSAGES["advertisement"], Advertisement)
