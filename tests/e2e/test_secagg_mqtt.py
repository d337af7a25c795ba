"""Secure-aggregation rounds through a real Mosquitto broker, with the standalone drivers.

One paho client per device (each in its own network thread) runs a
:class:`~fedge.agent.secure_round.DeviceSecureRound`; the aggregator's paho client feeds a
:class:`~fedge.aggregator.secure_round.SecureRoundDriver` from the test thread, which publishes
what the driver returns and, after every step, walks the driver's attributes to check that it
never holds an individual vector. Real keys, real sealing and signing, real retained messages
and QoS 1; the updates are random floats of a few hundred parameters.

Scenarios: the unmasked sum equals the plain sum; a device that disappears after its shares and
one whose agent restarts after its masked input (recovered, and in the sum); a malicious
aggregator's inconsistent unmask requests (refused by the devices, through the broker); forged
and substituted advertisements (refused by the aggregator and by the devices); documents signed
by another key or for another round, fleet or config, and sealed frames of the wrong kind or
round, badly sealed or replayed (refused and counted); a broker restart and a device reconnecting
with a new session mid-round (the round completes from retained documents and QoS 1).

Phases that wait for a deadline use short phases (2.5 s); the others close as soon as everyone
answered, so their deadlines are generous and cost nothing.
"""

from __future__ import annotations

import hashlib
import itertools
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import paho.mqtt.client as mqtt
import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey, VerifyKey
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedge.agent.secure_round import DeviceSecureRound, open_round_config
from fedge.aggregator.secure_round import SecureRoundDriver
from fedge.lab.broker import MosquittoBroker
from fedge.protocol.framing import FrameKind, decode_frame, encode_frame
from fedge.protocol.sealing import SealedHeader, read_header, seal
from fedge.protocol.secagg import (
    AdvertisementBundle,
    AggregatorPhase,
    Deadlines,
    RoundConfig,
    UnmaskRequest,
    new_round_config,
    sign_advertisement,
)
from fedge.protocol.secagg.prg import public_from_private
from fedge.protocol.secagg.quantise import clip_to_norm
from fedge.protocol.secagg.wire import (
    Publication,
    RoundAnnouncement,
    WireError,
    config_sha256,
    open_relay_document,
    relay_document,
    round_document,
    trusted_keys,
)
from fedge.protocol.signing import DocType, sign_document
from fedge.protocol.topics import FleetTopics
from support.memory_walk import vectors_held
from support.mqtt_fixtures import TrafficRecorder

pytest_plugins = ("support.mqtt_fixtures",)
pytestmark = pytest.mark.e2e

FLEET = "secagg-fleet"
TOPICS = FleetTopics(FLEET)
ROUND = "sa-1"
VECTOR = 300
CLIP = 5.0
MODEL_VERSION = 3
#: Phase length for rounds that must wait out a deadline (a silent device).
SHORT_PHASE_S = 2.5
#: Phase length for rounds that close every phase early (everyone answers).
LONG_PHASE_S = 15.0
ROUND_TIMEOUT_S = 30.0
SESSION_EXPIRY_S = 300


def _key(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


AGG_SIGN = SigningKey(_key("aggregator-signing"))
AGG_BOX = PrivateKey(_key("aggregator-box"))
TRUSTED = trusted_keys(AGG_SIGN.verify_key)
FORGER = SigningKey(_key("forger"))


def _ids(n: int) -> list[str]:
    return [f"dev-{i:02d}" for i in range(n)]


def box_key(device: str) -> PrivateKey:
    return PrivateKey(_key(f"box/{device}"))


def identity_key(device: str) -> SigningKey:
    return SigningKey(_key(f"identity/{device}"))


def enrolled(ids: list[str]) -> dict[str, VerifyKey]:
    """The identity keys the operator's registry distributes (never the aggregator)."""
    return {d: identity_key(d).verify_key for d in ids}


def _connect(client: mqtt.Client, broker: MosquittoBroker, *, clean: bool) -> None:
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = SESSION_EXPIRY_S
    client.reconnect_delay_set(min_delay=1, max_delay=2)
    client.connect(broker.host, broker.port, keepalive=30, clean_start=clean, properties=properties)
    client.loop_start()


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.02)


# --- a device: a paho client running a DeviceSecureRound ------------------------------------------


@dataclass
class Device:
    """One device: its keys, its update, its durable storage (records, counter) and a client.

    ``stop_after``: the sealed kind after which the device goes silent (it disappears from the
    round without a trace on the broker). ``identity``: the key it signs its advertisement with
    (another than the enrolled one makes it a forger)."""

    broker: MosquittoBroker
    device_id: str
    ids: list[str]
    update: npt.NDArray[np.float64]
    identity: SigningKey | None = None
    stop_after: str | None = None
    quantised: npt.NDArray[np.uint64] | None = None
    round: DeviceSecureRound | None = None
    records: dict[str, dict[str, str]] = field(default_factory=dict)
    config_refusals: Counter[str] = field(default_factory=Counter)
    sent: list[str] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    gone: bool = False
    subscribed: threading.Event = field(default_factory=threading.Event)
    client: mqtt.Client | None = None

    def __post_init__(self) -> None:
        self._counter = itertools.count(1)  # durable: survives an agent restart

    def connect(self, *, clean: bool = False) -> None:
        self.subscribed.clear()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"sa-{self.device_id}", protocol=MQTTProtocolVersion.MQTTv5
        )
        client.on_connect = self._on_connect
        client.on_subscribe = lambda *args: self.subscribed.set()
        client.on_message = self._on_message
        self.client = client
        _connect(client, self.broker, clean=clean)

    def disconnect(self, *, end_session: bool = False) -> None:
        if self.client is None:
            return
        properties = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 0 if end_session else SESSION_EXPIRY_S
        self.client.disconnect(properties=properties)
        self.client.loop_stop()
        self.client = None

    def crash(self) -> None:
        """The agent process dies: its connection, session and round object are gone, its
        storage (records, counter) is not."""
        self.disconnect(end_session=True)
        self.round = None

    # paho callbacks (the client's network thread) ---------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if not flags.session_present:
            client.subscribe(TOPICS.secagg_config_filter, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            self._handle(client, message.topic, bytes(message.payload))
        except BaseException as exc:  # a traceback in paho's thread would kill the client silently
            self.errors.append(exc)

    def _handle(self, client: mqtt.Client, topic: str, payload: bytes) -> None:
        if self.gone or not payload:
            return
        now = time.time()
        if mqtt.topic_matches_sub(TOPICS.secagg_config_filter, topic):
            try:
                announcement = open_round_config(
                    topic, payload, fleet=FLEET, aggregator_keys=AGG_SIGN.verify_key
                )
            except WireError as exc:
                self.config_refusals[exc.reason] += 1
                return
            if not announcement.config.is_selected(self.device_id):
                return
            if self.round is None or self.round.round_id != announcement.round_id:
                self.round = self._new_round(announcement)
                publications = self.round.start(now)
            else:
                publications = []  # a retained copy after a new session: only resubscribe
            client.subscribe(TOPICS.secagg_device_filter(announcement.round_id, self.device_id), qos=1)
        elif self.round is not None:
            publications = self.round.on_message(topic, payload, now)
        else:
            return
        for publication in publications:
            client.publish(
                publication.topic, publication.payload, qos=publication.qos, retain=publication.retain
            )
            kind = read_header(publication.payload)[0].kind
            self.sent.append(kind)
            if kind == self.stop_after:
                self.gone = True

    def _new_round(self, announcement: RoundAnnouncement) -> DeviceSecureRound:
        seed = int.from_bytes(_key(f"rounding/{self.device_id}")[:8], "big")

        def quantised_update(config: RoundConfig) -> npt.NDArray[np.uint64]:
            self.quantised = config.quantiser.quantise(self.update, np.random.default_rng(seed))
            return self.quantised

        def persist(round_id: str, record: dict[str, str]) -> None:
            self.records[round_id] = dict(record)

        return DeviceSecureRound(
            announcement,
            device_id=self.device_id,
            box_key=box_key(self.device_id),
            aggregator_box_key=AGG_BOX.public_key,
            identity_key=self.identity or identity_key(self.device_id),
            neighbour_keys=enrolled(self.ids),
            aggregator_keys=AGG_SIGN.verify_key,
            quantised_update=quantised_update,
            next_counter=lambda: next(self._counter),
            persist_revealed=persist,
            revealed=self.records.get(announcement.round_id),
        )

    @property
    def refusals(self) -> Counter[str]:
        return self.round.refusals if self.round is not None else Counter()


# --- the aggregator: the driver fed from the test thread, instrumented -----------------------------

#: The only places the driver may hold a vector: the running sum of masked inputs, the result.
ALLOWED_VECTORS = {"driver.session._sum", "driver.result.total"}


class Aggregator:
    """The aggregator's MQTT side for the test: a client on ``update/+`` and a driver loop."""

    def __init__(self, broker: MosquittoBroker, driver: SecureRoundDriver) -> None:
        self.driver = driver
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.frames: list[tuple[str, bytes]] = []  # the test's record of what arrived
        self.published: list[Publication] = []
        self._infos: list[mqtt.MQTTMessageInfo] = []
        self.walks = 0
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="sa-aggregator", protocol=MQTTProtocolVersion.MQTTv5
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        _connect(self.client, broker, clean=False)
        assert self._subscribed.wait(10), "the aggregator did not subscribe"

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if not flags.session_present:
            client.subscribe(TOPICS.update_filter, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.inbox.put((message.topic, bytes(message.payload)))

    def publish(self, publication: Publication) -> None:
        info = self.client.publish(
            publication.topic, publication.payload, qos=publication.qos, retain=publication.retain
        )
        self._infos.append(info)
        self.published.append(publication)

    def flush(self, timeout: float = 10.0) -> None:
        """Waits until the broker acknowledged everything published so far (QoS 1). Polls the
        private flag: paho leaves ``rc`` at "not connected" for a message queued while the
        client was disconnected even after it sent it on reconnecting, and then
        ``wait_for_publish`` raises instead of waiting."""
        _wait(lambda: all(info._published for info in self._infos), timeout, "the aggregator's publications")

    def check_no_single_vector(self, quantised: list[npt.NDArray[np.uint64]]) -> None:
        """The instrumentation: walk the driver and its session after every step."""
        self.walks += 1
        held = vectors_held(self.driver, "driver")
        assert {path for path, _ in held} <= ALLOWED_VECTORS, [path for path, _ in held]
        for _, vector in held:
            assert not any(np.array_equal(vector, q) for q in quantised), "an individual update is held"

    def run(
        self,
        *,
        quantised: Callable[[], list[npt.NDArray[np.uint64]]] = list,
        tamper: Callable[[Publication], list[Publication]] = lambda p: [p],
        step: Callable[[], None] = lambda: None,
        timeout: float = ROUND_TIMEOUT_S,
    ) -> None:
        """Starts the round and drives it until it ends (documents cleared) or times out."""
        driver = self.driver
        for publication in driver.start(time.time()):
            self.publish(publication)
        deadline = time.monotonic() + timeout
        while True:
            step()
            try:
                topic, payload = self.inbox.get(timeout=0.05)
            except queue.Empty:
                pass
            else:
                self.frames.append((topic, payload))
                driver.handle(topic, payload, time.time())
                self.check_no_single_vector(quantised())
            publications = driver.tick(time.time())
            self.check_no_single_vector(quantised())
            for publication in publications:
                for sent in tamper(publication) if publication.payload else [publication]:
                    self.publish(sent)
            if driver.done:
                return
            assert time.monotonic() < deadline, (
                f"round still in {driver.phase} after {timeout} s; rejected {dict(driver.rejected)}"
            )

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --- a round ---------------------------------------------------------------------------------------


@dataclass
class Round:
    broker: MosquittoBroker
    n: int
    phase_s: float
    round_id: str = ROUND
    devices: dict[str, Device] = field(init=False)
    config: RoundConfig = field(init=False)
    driver: SecureRoundDriver = field(init=False)
    aggregator: Aggregator = field(init=False)

    def __post_init__(self) -> None:
        ids = _ids(self.n)
        rng = np.random.default_rng(self.n)
        self.devices = {d: Device(self.broker, d, ids, rng.normal(0.0, 0.15, VECTOR)) for d in ids}
        self.config = new_round_config(
            self.round_id,
            ids,
            vector_length=VECTOR,
            clip_norm=CLIP,
            deadlines=Deadlines.every(time.time(), self.phase_s),
        )
        self.driver = SecureRoundDriver(
            fleet=FLEET,
            config=self.config,
            model_version=MODEL_VERSION,
            signing_key=AGG_SIGN,
            box_key=AGG_BOX,
            registry={d: box_key(d).public_key for d in ids},
            identity_keys=enrolled(ids),
        )
        self.aggregator = Aggregator(self.broker, self.driver)

    @property
    def announcement(self) -> RoundAnnouncement:
        return RoundAnnouncement(FLEET, MODEL_VERSION, self.config, config_sha256(self.config))

    def connect_devices(self) -> None:
        for device in self.devices.values():
            device.connect()
        for device in self.devices.values():
            assert device.subscribed.wait(10), f"{device.device_id} did not subscribe"

    def quantised(self) -> list[npt.NDArray[np.uint64]]:
        return [d.quantised for d in self.devices.values() if d.quantised is not None]

    def run(self, *, connect: bool = True, **hooks: Any) -> None:
        if connect:
            self.connect_devices()
        self.aggregator.run(quantised=self.quantised, **hooks)
        self.aggregator.flush()
        for device in self.devices.values():
            assert device.errors == [], (device.device_id, device.errors)

    def check_sum(self, survivors: list[str]) -> None:
        result = self.driver.result
        assert result is not None, self.driver.abort_reason
        assert list(result.survivors) == sorted(survivors)
        expected = np.zeros(VECTOR, dtype=np.uint64)
        for d in survivors:
            quantised = self.devices[d].quantised
            assert quantised is not None
            expected += quantised
        np.testing.assert_array_equal(result.total, expected & np.uint64((1 << self.config.bits) - 1))
        plain = sum(clip_to_norm(self.devices[d].update, CLIP) for d in survivors)
        error = np.abs(result.dequantised(self.config) - plain)
        assert float(error.max()) < self.config.quantiser.error_bound(len(survivors))

    def relayed(self, publication: Publication, recipient: str) -> Any:
        return open_relay_document(
            publication.topic,
            publication.payload,
            announcement=self.announcement,
            topics=TOPICS,
            trusted=TRUSTED,
            recipient=recipient,
        )

    def resign(self, message: AdvertisementBundle | UnmaskRequest) -> bytes:
        """What a malicious aggregator can do: sign anything with its own key."""
        return relay_document(FLEET, config_sha256(self.config), message, AGG_SIGN)

    def stop(self) -> None:
        for device in self.devices.values():
            device.disconnect(end_session=True)
        self.aggregator.stop()


@pytest.fixture
def make_round(mosquitto: MosquittoBroker) -> Iterator[Callable[..., Round]]:
    rounds: list[Round] = []

    def make(n: int, phase_s: float = LONG_PHASE_S, **kwargs: Any) -> Round:
        made = Round(mosquitto, n, phase_s, **kwargs)
        rounds.append(made)
        return made

    yield make
    for made in rounds:
        made.stop()


def _retained_under(broker: MosquittoBroker, topic_filter: str) -> list[str]:
    """The topics holding a retained message under ``topic_filter`` (a fresh subscriber's view)."""
    with TrafficRecorder(broker.host, broker.port, topic_filter=topic_filter) as recorder:
        time.sleep(0.3)  # retained messages arrive right after the SUBACK
        return sorted({m.topic for m in recorder.messages if m.retain})


# --- the tests ------------------------------------------------------------------------------------


def test_the_unmasked_sum_equals_the_plain_sum_and_the_aggregator_never_holds_one_vector(
    make_round: Callable[..., Round], mosquitto: MosquittoBroker
) -> None:
    r = make_round(7)
    with TrafficRecorder.for_broker(mosquitto) as recorder:
        r.run()
        cleared = 1 + 3 * 7
        recorder.wait_for(lambda ms: sum(not m.payload for m in ms) == cleared, 10, "the cleared documents")
    ids = list(r.devices)
    r.check_sum(ids)
    assert r.driver.result is not None
    assert r.driver.result.recovered == () and r.driver.result.excluded == ()
    assert r.driver.rejected == Counter()
    assert r.driver.accepted == Counter(
        {"secagg_advertise": 7, "secagg_shares": 7, "secagg_masked": 7, "secagg_unmask": 7}
    )
    assert r.aggregator.walks > 50
    for device in r.devices.values():
        assert device.refusals == Counter() and device.config_refusals == Counter()
        assert device.sent == ["secagg_advertise", "secagg_shares", "secagg_masked", "secagg_unmask"]
        # Persisted before answering: the self-mask share of every neighbour (complete graph).
        assert device.records == {ROUND: dict.fromkeys(sorted(set(ids) - {device.device_id}), "self_mask")}
    # Device frames are sealed: nothing of the messages is readable on the broker.
    updates = recorder.matching(TOPICS.update_filter)
    assert len(updates) == 28
    assert all(not m.retain and m.qos == 1 for m in updates)
    for marker in (
        b"secagg-advertisement",
        b"secagg-shares",
        b"secagg-masked-input",
        b"config_sha256",
        b"vector",
    ):
        assert not any(marker in m.payload for m in updates)
    # Aggregator documents are retained, one topic per round and phase, and cleared at the end.
    documents = recorder.matching(TOPICS.secagg_round_filter(ROUND))
    live = [m for m in documents if m.payload]
    assert len(live) == 1 + 3 * 7 and all(m.retain for m in live)
    assert sorted(m.topic for m in documents if not m.payload) == sorted({m.topic for m in live})
    assert _retained_under(mosquitto, TOPICS.secagg_round_filter(ROUND)) == []


def test_dropouts_after_sharing_and_after_masking_are_recovered_and_a_restarted_agent_stays_out(
    make_round: Callable[..., Round],
) -> None:
    r = make_round(8, SHORT_PHASE_S)  # k = 7, t = 5: each survivor keeps t responding neighbours
    ids = list(r.devices)
    after_shares, restarted = r.devices[ids[1]], r.devices[ids[4]]
    after_shares.stop_after = "secagg_shares"
    stage: list[str] = []

    def tamper(publication: Publication) -> list[Publication]:
        # The agent of one device that masked dies just before its unmask request is out...
        if publication.topic == TOPICS.secagg_device(ROUND, restarted.device_id, "unmask"):
            restarted.crash()
            stage.append("crashed")
        return [publication]

    def step() -> None:
        # ... and starts again once the request is retained on the broker.
        if stage == ["crashed"]:
            stage.append("restarted")
            r.aggregator.flush()
            restarted.connect(clean=True)

    r.run(tamper=tamper, step=step)
    assert stage == ["crashed", "restarted"]
    result = r.driver.result
    assert result is not None, r.driver.abort_reason
    survivors = [d for d in ids if d != after_shares.device_id]
    r.check_sum(survivors)  # the restarted one masked: it is in the sum, its self-mask rebuilt
    assert result.recovered == (after_shares.device_id,)  # its pairwise masks removed
    assert result.excluded == ()
    assert after_shares.sent == ["secagg_advertise", "secagg_shares"]
    assert restarted.sent == ["secagg_advertise", "secagg_shares", "secagg_masked"]
    # The restarted agent found its record: it answered nothing of the round, not even the
    # retained unmask request, and never advertised new keys.
    assert restarted.round is not None and restarted.round.resumed
    assert restarted.refusals == Counter({"restarted_mid_round": 3})  # bundle, delivery, unmask
    assert restarted.records == {ROUND: {}}
    # The others revealed mask-key shares of the dropped device, self-mask shares of the rest.
    for d in survivors:
        if d != restarted.device_id:
            record = r.devices[d].records[ROUND]
            assert record[after_shares.device_id] == "mask_key"
            assert {k for k, v in record.items() if v == "self_mask"} == set(survivors) - {d}
    assert r.driver.rejected == Counter()


def test_a_malicious_aggregators_inconsistent_unmask_requests_are_refused_through_the_broker(
    make_round: Callable[..., Round],
) -> None:
    r = make_round(6)  # k = 5, t = 4
    ids = list(r.devices)
    both, few = r.devices[ids[0]], r.devices[ids[3]]
    held: dict[str, Publication] = {}

    def tamper(publication: Publication) -> list[Publication]:
        if "/unmask/" not in publication.topic:
            return [publication]
        recipient = publication.topic.rsplit("/", 1)[1]
        request = r.relayed(publication, recipient)
        assert isinstance(request, UnmaskRequest)
        if recipient == both.device_id:  # one neighbour named alive and dropped
            evil = UnmaskRequest(ROUND, recipient, request.alive, (request.alive[0],))
        elif recipient == few.device_id:  # fewer than t alive: would isolate the device
            evil = UnmaskRequest(ROUND, recipient, request.alive[: r.config.threshold - 1], ())
        else:
            return [publication]
        held[recipient] = publication
        return [Publication(publication.topic, r.resign(evil), retain=True)]

    def step() -> None:
        refused = both.refusals["alive_and_dropped"] == 1 and few.refusals["too_few_alive"] == 1
        if held and refused:
            # Refused requests revealed nothing: no answer, nothing persisted beyond "joined".
            assert both.records[ROUND] == {} and few.records[ROUND] == {}
            assert "secagg_unmask" not in both.sent and "secagg_unmask" not in few.sent
            for publication in held.values():  # then the honest requests, which are answered
                r.aggregator.publish(publication)
            held.clear()

    r.run(tamper=tamper, step=step)
    r.check_sum(ids)
    assert both.refusals == Counter({"alive_and_dropped": 1})
    assert few.refusals == Counter({"too_few_alive": 1})
    assert r.driver.rejected == Counter()


def test_forged_and_substituted_advertisements_are_refused(make_round: Callable[..., Round]) -> None:
    r = make_round(8, SHORT_PHASE_S)  # k = 7, t = 5
    ids = list(r.devices)
    forger, victim, impersonated = r.devices[ids[2]], r.devices[ids[5]], r.devices[ids[6]]
    forger.identity = FORGER  # signs with a key other than its enrolled identity key
    keys = (public_from_private(_key("evil-mask")), public_from_private(_key("evil-share")))

    def tamper(publication: Publication) -> list[Publication]:
        """A malicious aggregator hands the victim its own keys in place of a neighbour's."""
        if publication.topic != TOPICS.secagg_device(ROUND, victim.device_id, "bundle"):
            return [publication]
        bundle = r.relayed(publication, victim.device_id)
        assert isinstance(bundle, AdvertisementBundle)
        substitute = sign_advertisement(ROUND, impersonated.device_id, *keys, FORGER)
        ads = tuple(
            substitute if ad.device_id == impersonated.device_id else ad for ad in bundle.advertisements
        )
        forged = AdvertisementBundle(ROUND, victim.device_id, ads)
        return [Publication(publication.topic, r.resign(forged), retain=True)]

    r.run(tamper=tamper)
    survivors = [d for d in ids if d != forger.device_id]
    r.check_sum(survivors)
    result = r.driver.result
    assert result is not None and result.excluded == (forger.device_id,)
    # The aggregator dropped the forger's advertisement (the enrolled key does not verify it).
    assert r.driver.rejected == Counter({"bad_signature": 1})
    assert forger.sent == ["secagg_advertise"]
    # The victim refused the substituted advertisement, left that neighbour out, and ignored the
    # shares the neighbour sent it; the two masked with neither, and the sum is still exact.
    assert victim.refusals == Counter({"bad_signature": 1, "not_neighbour": 1})
    assert impersonated.device_id not in victim.records[ROUND]
    assert victim.device_id not in impersonated.records[ROUND]
    for d in survivors:
        if d not in (victim.device_id,):
            assert r.devices[d].refusals == Counter(), d


def test_documents_and_frames_of_another_key_round_or_fleet_are_refused_and_counted(
    make_round: Callable[..., Round], mosquitto: MosquittoBroker
) -> None:
    r = make_round(5)
    ids = list(r.devices)
    target, victim = ids[1], r.devices[ids[3]]
    attacker = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id="sa-attacker", protocol=MQTTProtocolVersion.MQTTv5
    )
    _connect(attacker, mosquitto, clean=True)
    other_config = new_round_config(
        ROUND, ids, vector_length=VECTOR, clip_norm=CLIP, deadlines=r.config.deadlines
    )

    def attack(topic: str, payload: bytes, retain: bool = False) -> None:
        attacker.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    # Before the devices connect: retained round configs they must refuse.
    attack(TOPICS.secagg("sa-forged", "config"), round_document(FLEET, r.config, MODEL_VERSION, FORGER), True)
    other_fleet = new_round_config(
        "sa-9", ids, vector_length=VECTOR, clip_norm=CLIP, deadlines=r.config.deadlines
    )
    attack(
        TOPICS.secagg("sa-9", "config"), round_document("fleet-2", other_fleet, MODEL_VERSION, AGG_SIGN), True
    )

    def sealed(key: PrivateKey, **header: Any) -> bytes:
        fields: dict[str, Any] = {"fleet": FLEET, "device_id": target, "round_id": ROUND, "counter": 10**6}
        fields |= {"kind": "secagg_advertise", "model_version": MODEL_VERSION, **header}
        return seal(
            SealedHeader(**fields), {"config_sha256": config_sha256(r.config)}, b"{}", key, AGG_BOX.public_key
        )

    held: list[Publication] = []
    stage: list[str] = []

    def tamper(publication: Publication) -> list[Publication]:
        if "/bundle/" in publication.topic and "released" not in stage:
            held.append(publication)  # the round waits until every attack was counted
            return []
        return [publication]

    def victim_documents() -> list[tuple[str, bytes]]:
        topic = TOPICS.secagg_device(ROUND, victim.device_id, "bundle")
        genuine = next(p for p in held if p.topic == topic)
        bundle = r.relayed(genuine, victim.device_id)
        document = {
            "fleet": FLEET,
            "round_id": ROUND,
            "config_sha256": config_sha256(r.config),
            "recipient": victim.device_id,
            "message": bundle.to_dict(),
        }
        tampered = bytearray(genuine.payload)
        tampered[-5] ^= 1
        old_round = dict(document, round_id="sa-0", message={**bundle.to_dict(), "round_id": "sa-0"})
        return [
            (topic, sign_document(DocType.SECAGG_BUNDLE, document, FORGER)),  # unknown_key
            (topic, bytes(tampered)),  # bad_signature
            (topic, sign_document(DocType.SECAGG_BUNDLE, old_round, AGG_SIGN)),  # wrong_round
            (topic, sign_document(DocType.SECAGG_BUNDLE, dict(document, fleet="fleet-2"), AGG_SIGN)),
            (topic, relay_document(FLEET, config_sha256(other_config), bundle, AGG_SIGN)),  # wrong_config
        ]

    def step() -> None:
        if held and not stage:
            stage.append("attacked")
            advertisement = next(p for t, p in r.aggregator.frames if t == TOPICS.update(target))
            for payload in (
                b"garbage, not a frame at all",  # frame_bad_magic
                sealed(PrivateKey(_key("intruder"))),  # decrypt_failed: not the device's key
                sealed(PrivateKey(_key("intruder")), kind="update"),  # wrong_kind
                sealed(PrivateKey(_key("intruder")), round_id="sa-0"),  # wrong_round
                advertisement,  # replayed_counter: the device's own frame, again
            ):
                attack(TOPICS.update(target), payload)
            for topic, payload in victim_documents():
                attack(topic, payload)
        if (
            stage == ["attacked"]
            and sum(r.driver.rejected.values()) == 5
            and sum(victim.refusals.values()) == 5
        ):
            stage.append("released")
            for publication in held:
                r.aggregator.publish(publication)

    try:
        r.run(tamper=tamper, step=step)
    finally:
        attack(TOPICS.secagg("sa-forged", "config"), b"", True)
        attack(TOPICS.secagg("sa-9", "config"), b"", True)
        attacker.disconnect()
        attacker.loop_stop()
    r.check_sum(ids)
    assert r.driver.rejected == Counter(
        {"frame_bad_magic": 1, "decrypt_failed": 1, "wrong_kind": 1, "wrong_round": 1, "replayed_counter": 1}
    )
    assert victim.refusals == Counter(
        {"unknown_key": 1, "bad_signature": 1, "wrong_round": 1, "wrong_fleet": 1, "wrong_config": 1}
    )
    for device in r.devices.values():
        assert device.config_refusals == Counter({"unknown_key": 1, "wrong_fleet": 1})
        if device is not victim:
            assert device.refusals == Counter()


def test_a_broker_restart_and_a_device_reconnecting_mid_round_do_not_stop_the_round(
    make_round: Callable[..., Round], mosquitto: MosquittoBroker
) -> None:
    r = make_round(5)
    ids = list(r.devices)
    rejoining = r.devices[ids[2]]
    held: list[Publication] = []
    stage: list[str] = []

    def tamper(publication: Publication) -> list[Publication]:
        if "/bundle/" in publication.topic and not stage:
            held.append(publication)
            return []
        return [publication]

    def step() -> None:
        if held and not stage:
            stage.append("restarted")
            # One device loses its connection and its session; then the broker restarts while
            # the bundles are published (the aggregator's client queues them: QoS 1).
            rejoining.disconnect(end_session=True)
            mosquitto.restart()
            for publication in held:
                r.aggregator.publish(publication)
        elif (
            stage == ["restarted"]
            and r.driver.phase == AggregatorPhase.SHARE
            # The bundles are retained: the device finds its own when it subscribes again.
            and _retained_under(mosquitto, TOPICS.secagg_device(ROUND, rejoining.device_id, "bundle"))
        ):
            stage.append("rejoined")
            rejoining.connect(clean=True)

    r.run(tamper=tamper, step=step)
    r.check_sum(ids)
    assert stage == ["restarted", "rejoined"]
    assert rejoining.sent == ["secagg_advertise", "secagg_shares", "secagg_masked", "secagg_unmask"]
    # Only QoS 1 resends can have been refused (a frame the aggregator already had).
    assert set(r.driver.rejected) <= {"replayed_counter"}
    for device in r.devices.values():
        assert device.refusals == Counter(), device.device_id


# --- the drivers' own rules, without the broker (microseconds) ---------------------------------------


def _bare_round(n: int = 5) -> tuple[RoundConfig, SecureRoundDriver, RoundAnnouncement]:
    ids = _ids(n)
    config = new_round_config(
        "sa-mem", ids, vector_length=8, clip_norm=CLIP, deadlines=Deadlines.every(time.time(), 60)
    )
    driver = SecureRoundDriver(
        fleet=FLEET,
        config=config,
        model_version=MODEL_VERSION,
        signing_key=AGG_SIGN,
        box_key=AGG_BOX,
        registry={d: box_key(d).public_key for d in ids},
        identity_keys=enrolled(ids),
    )
    return config, driver, RoundAnnouncement(FLEET, MODEL_VERSION, config, config_sha256(config))


def _device_round(
    announcement: RoundAnnouncement, device: str, persist: Callable[[str, dict[str, str]], None]
) -> DeviceSecureRound:
    counter = itertools.count(1)
    return DeviceSecureRound(
        announcement,
        device_id=device,
        box_key=box_key(device),
        aggregator_box_key=AGG_BOX.public_key,
        identity_key=identity_key(device),
        neighbour_keys=enrolled(list(announcement.config.device_ids)),
        aggregator_keys=AGG_SIGN.verify_key,
        quantised_update=lambda config: np.zeros(config.vector_length, dtype=np.uint64),
        next_counter=lambda: next(counter),
        persist_revealed=persist,
        revealed=None,
    )


def test_the_driver_refuses_frames_outside_a_round_and_a_relabelled_counter_spends_nothing() -> None:
    config, driver, announcement = _bare_round()
    device = config.device_ids[0]
    (advertisement,) = _device_round(announcement, device, lambda r, rec: None).start(time.time())
    assert driver.handle(advertisement.topic, advertisement.payload, time.time()).reason == "no_open_round"
    driver.start(time.time())
    # Anyone can rewrite the cleartext counter; the box then opens but the inner header differs.
    frame = decode_frame(advertisement.payload, FrameKind.SEALED)
    relabelled = encode_frame(FrameKind.SEALED, {**frame.header, "counter": 2**62}, frame.body)
    assert driver.handle(advertisement.topic, relabelled, time.time()).reason == "binding_mismatch"
    assert driver.handle(advertisement.topic, advertisement.payload, time.time()).accepted
    assert driver.handle(advertisement.topic, advertisement.payload, time.time()).reason == "replayed_counter"
    assert driver.rejected == Counter({"no_open_round": 1, "binding_mismatch": 1, "replayed_counter": 1})


def test_a_device_that_cannot_persist_never_advertises() -> None:
    _, _, announcement = _bare_round()

    def broken(round_id: str, record: dict[str, str]) -> None:
        raise OSError("disk full")

    device = _device_round(announcement, announcement.config.device_ids[0], broken)
    assert device.start(time.time()) == []
    assert device.refusals == Counter({"persist_failed": 1})
