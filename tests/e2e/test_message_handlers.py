"""One message must never end a service: every message handler of both services, fed arbitrary
and adversarial bytes.

For each handler, whatever one message holds: no exception escapes, exactly one reason is
counted (or the message is used as it should be: a status tracked, a rotation queued), and
nothing else changes (engine state, rejection totals, device state, outbox, trust).

The parts are real: an ``AggregatorService`` and ``AgentService``s built from a real fleet
(``create_fleet``: real keys and files, the session's real model), real paho ``MQTTMessage``s,
the real EdgeX bus subscriber, a real HTTP core-data double. Nothing connects: the aggregator
connects only in ``run()``, so messages go through its paho callback into its inbox and
``_drain(0)`` handles them; the agent's callback is called directly and its worker turned once
(``_work_once()``). Where a test needs a handler to fail in a way no input can cause (a bug),
it injects that fault explicitly and says so.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedge.agent.config import load_agent_config
from fedge.agent.edgex.bus import EdgeXBusSubscriber
from fedge.agent.edgex.core_data import CoreDataClient, CoreDataError, _parse_json, _status_error
from fedge.agent.edgex.ingest import task_key
from fedge.agent.edgex.readings import Event, Reading
from fedge.agent.edgex.samples import SampleBuilder
from fedge.agent.edgex.wire import MESSAGE_REASONS, READING_REASONS, encode_plain_event
from fedge.agent.sample_store import SampleStore
from fedge.agent.service import AgentService
from fedge.agent.wiring import ProvidedData, build_agent
from fedge.aggregator.config import load_aggregator_config
from fedge.aggregator.round_engine import Publication
from fedge.aggregator.service import MAX_STATUS_BYTES, AggregatorService, LeadershipLost
from fedge.lab.edgex_core_data_server import CoreDataServer
from fedge.lab.observer import FleetObserver
from fedge.lab.provision import FleetFiles, create_fleet
from fedge.protocol.config_source import Table
from fedge.protocol.framing import FrameKind, encode_frame
from fedge.protocol.mqtt_settings import MQTT_KEYS, mqtt_settings_from_table
from fedge.protocol.signing import DocType, _signed_message, key_id
from fedge.protocol.task import TaskSpec
from fedge.protocol.topics import FleetTopics

pytestmark = pytest.mark.adversarial

FLEET = "hx"
T = FleetTopics(FLEET)
DEVICES = {"watch-01": 1, "watch-02": 2, "watch-03": 3}
EXAMPLES = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- adversarial input ------------------------------------------------------------------------


def _frame_prefix(kind: int, header: bytes, body: bytes = b"") -> bytes:
    """A frame with any header bytes (encode_frame only writes valid headers)."""
    lengths = len(header).to_bytes(4, "big") + len(body).to_bytes(4, "big")
    return b"FEDG" + bytes([1, kind, 0, 0]) + lengths + header + body


#: Shapes arbitrary bytes rarely hit: deep nesting, huge numbers, invalid UTF-8, NaN, frames
#: whose header is one of those, frames declaring absurd lengths.
ADVERSARIAL: list[bytes] = [
    b"",
    b"[" * 100_000,
    b"[" * 60_000,
    b"{" * 60_000,
    b'{"a":' * 40 + b"1" + b"}" * 40,
    b'{"state": NaN}',
    b'{"state": Infinity}',
    b'{"state": 1e999}',
    b"9" * 5_000,
    b'{"state": "' + b"\\ud800" + b'"}',
    b"\xff\xfe{}",
    b'{"state": "\xc3\x28"}',
    b'"' + b'\\"' * 20_000,
    _frame_prefix(1, b"[" * 16_000),
    _frame_prefix(3, b'{"alg": NaN}'),
    _frame_prefix(3, b"\xff" * 10),
    b"FEDG" + bytes([1, 3, 0, 0]) + (2**32 - 1).to_bytes(4, "big") * 2,
]


def _json_values() -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=20,
    )


def _json_bytes() -> st.SearchStrategy[bytes]:
    """JSON documents, NaN and Infinity included (``allow_nan``), and status-like objects."""
    states = st.sampled_from(["online", "offline", "idle", "training"]) | _json_values()
    status_like = st.fixed_dictionaries({"state": states}, optional={"x": _json_values()})
    return (status_like | _json_values()).map(lambda v: json.dumps(v).encode())


def payloads() -> st.SearchStrategy[bytes]:
    return st.sampled_from(ADVERSARIAL) | st.binary(max_size=2048) | _json_bytes()


def message(topic: str, payload: bytes) -> mqtt.MQTTMessage:
    """What paho hands a callback."""
    msg = mqtt.MQTTMessage(topic=topic.encode())
    msg.payload = payload
    return msg


def delta(before: Counter[str], after: Counter[str]) -> Counter[str]:
    """What was counted in between; asserts nothing was un-counted."""
    assert not before - after, f"counts went down: {before - after}"
    return after - before


# --- a real fleet, never connected ----------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, har_model_dir: Path) -> FleetFiles:
    return create_fleet(
        tmp_path_factory.mktemp("handlers"),
        FLEET,
        har_model_dir,
        "mqtt://127.0.0.1:9",
        DEVICES,
        {"rounds": 3, "min_devices": 1, "wait_for_devices_s": 0.0},
        agent_overrides={"blob_timeout_s": 30.0},
    )


@pytest.fixture(scope="module")
def aggregator(fleet: FleetFiles) -> tuple[AggregatorService, Publication]:
    """The service with a round open (so update checks go past ``no_open_round``), and that
    round's publication: a genuine signed manifest and its blobs, for the agent tests."""
    service = AggregatorService(load_aggregator_config(fleet.aggregator_config, {}))
    return service, service.engine.open_round(time.time())


def har_provider(task: TaskSpec, subject: int) -> tuple[np.ndarray, np.ndarray]:
    from fedge.lab.har_watch import load_devices

    data = load_devices(task, [subject])[subject]
    return data.x, data.y


@pytest.fixture(scope="module")
def agent(fleet: FleetFiles) -> AgentService:
    config = load_agent_config(fleet.agent_configs["watch-01"], {})
    return AgentService(build_agent(config, ProvidedData(lambda task: har_provider(task, 1))))


# --- the aggregator ---------------------------------------------------------------------------


def aggregator_counts(service: AggregatorService) -> Counter[str]:
    return Counter(service.engine.state.rejected_total) + Counter(service.messages_dropped)


def engine_view(service: AggregatorService) -> dict[str, Any]:
    """Everything about the engine a message could change, but its rejection totals."""
    view = service.engine.status(0.0)
    del view["rejected_total"]
    state = service.engine.snapshot()
    view["weights"] = hashlib.sha256(state.weights.tobytes()).hexdigest()
    view["counters"] = dict(state.counters)
    view["normalisation"] = repr(state.normalisation)
    view["last_manifest"] = state.last_manifest_sha256
    return view


def deliver(service: AggregatorService, topic: str, payload: bytes) -> Counter[str]:
    """Through paho's callback and one turn of the loop; returns what was counted."""
    before = aggregator_counts(service)
    service._on_message(service.client, None, message(topic, payload))
    service._drain(0)
    assert service.inbox_status()["messages"] == 0 and service.inbox_status()["bytes"] == 0
    return delta(before, aggregator_counts(service))


@EXAMPLES
@given(device=st.sampled_from([*DEVICES, "intruder", "x" * 64]), payload=payloads())
def test_any_bytes_on_update_topics_are_rejected_counted_once_and_change_nothing(
    aggregator: tuple[AggregatorService, Publication], device: str, payload: bytes
) -> None:
    service, _ = aggregator
    view, online = engine_view(service), set(service.online)
    counted = deliver(service, T.update(device), payload)
    assert sum(counted.values()) == 1, counted
    assert set(counted) <= set(service.engine.state.rejected_total), "an engine rejection, not a drop"
    assert engine_view(service) == view and service.online == online


_STATUS_TOPICS = st.sampled_from([*DEVICES, "intruder"]).map(T.status)


@EXAMPLES
@given(topic=_STATUS_TOPICS, payload=payloads())
def test_any_status_is_tracked_or_counted_once_and_changes_nothing_else(
    aggregator: tuple[AggregatorService, Publication], topic: str, payload: bytes
) -> None:
    service, _ = aggregator
    device = T.device_of(topic, "status")
    view, rejected = engine_view(service), dict(service.engine.state.rejected_total)
    online = set(service.online)
    counted = deliver(service, topic, payload)
    assert engine_view(service) == view and service.engine.state.rejected_total == rejected
    if counted:  # refused: counted once by a status_* reason, nothing tracked
        assert sum(counted.values()) == 1 and next(iter(counted)).startswith("status_"), counted
        assert service.online == online
    else:  # an empty (cleared) status or a JSON object: tracked
        state = json.loads(payload).get("state") if payload else "offline"
        assert (device in service.online) == (state != "offline")
        assert service.online - {device} == online - {device}


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"[" * 100_000, "status_too_large"),  # dropped in paho's thread, never queued
        (b"[" * 60_000, "status_too_deep"),
        (b'{"state": ' * 33 + b"1" + b"}" * 33, "status_too_deep"),
        (b'{"state": NaN}', "status_not_finite"),
        (b'{"state": 1e999}', "status_not_finite"),
        (b"\xff", "status_bad_utf8"),
        (b'{"state": ', "status_bad_json"),
        (b"9" * 5_000, "status_bad_json"),
        (b'["online"]', "status_not_an_object"),
    ],
)
def test_a_bad_status_is_counted_by_its_reason(
    aggregator: tuple[AggregatorService, Publication], payload: bytes, reason: str
) -> None:
    service, _ = aggregator
    online = set(service.online)
    assert deliver(service, T.status("watch-03"), payload) == {reason: 1}
    assert service.online == online
    assert service.status()["messages_dropped"][reason] >= 1


@EXAMPLES
@given(
    topic=(
        st.sampled_from(
            [
                T.base + "/other",
                T.base + "/update/watch-01/extra",
                T.base + "/update/",
                "fedge/v1/other-fleet/update/watch-01",
                T.manifest,
                "x",
            ]
        )
        | st.text(st.characters(blacklist_characters="\x00+#", blacklist_categories=["Cs"]), min_size=1)
    ).filter(lambda t: not t.startswith(T.base + "/status/")),
    payload=payloads(),
)
def test_unexpected_topics_are_rejected_counted_once_and_change_nothing(
    aggregator: tuple[AggregatorService, Publication], topic: str, payload: bytes
) -> None:
    service, _ = aggregator
    view = engine_view(service)
    counted = deliver(service, topic, payload)
    assert sum(counted.values()) == 1, counted
    assert not any(r.startswith("handler_error") for r in counted)
    assert engine_view(service) == view


def test_an_exception_from_one_message_is_counted_and_the_loop_goes_on(
    aggregator: tuple[AggregatorService, Publication], monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """Fault injection: no input makes the engine raise (the property tests above), so a bug
    is simulated by an engine whose ``handle`` raises what a deep recursion would."""
    service, _ = aggregator

    def recursing(topic: str, payload: bytes, now: float) -> Any:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(service.engine, "handle", recursing)
    view = engine_view(service)
    assert deliver(service, T.update("watch-01"), b"junk") == {"handler_error:RecursionError": 1}
    assert deliver(service, T.update("watch-01"), b"junk") == {"handler_error:RecursionError": 1}
    assert engine_view(service) == view
    logged = [r for r in caplog.records if "handler_error:RecursionError" in r.getMessage()]
    assert len(logged) == 1  # once per reason, with its traceback
    assert logged[0].exc_info is not None
    monkeypatch.undo()
    assert deliver(service, T.update("watch-01"), b"junk") == {"frame_truncated": 1}  # back to normal
    assert service.status()["messages_dropped"]["handler_error:RecursionError"] >= 2


@pytest.mark.parametrize(
    "exc", [LeadershipLost(), KeyboardInterrupt(), SystemExit(3)], ids=lambda e: type(e).__name__
)
def test_leadership_loss_and_interrupts_still_end_the_loop(
    aggregator: tuple[AggregatorService, Publication], monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    """Fault injection as above: these must propagate, never be counted as a message's error."""
    service, _ = aggregator

    def raising(topic: str, payload: bytes, now: float) -> Any:
        raise exc

    monkeypatch.setattr(service.engine, "handle", raising)
    before = aggregator_counts(service)
    service._on_message(service.client, None, message(T.update("watch-01"), b"x"))
    with pytest.raises(type(exc)):
        service._drain(0)
    assert aggregator_counts(service) == before


def test_the_inbox_is_bounded_in_bytes_as_in_messages(fleet: FleetFiles) -> None:
    service = AggregatorService(
        load_aggregator_config(fleet.aggregator_config, {}), inbox_limit=3, inbox_max_bytes=100
    )
    topic = T.update("watch-01")
    for size in (40, 40, 30, 20, 0):  # 30 would pass 100 bytes; the 0-byte one a 4th message
        service._on_message(service.client, None, message(topic, b"x" * size))
    assert service.messages_dropped == {"inbox_full": 2}
    assert service.inbox_status() == {
        "messages": 3,
        "bytes": 100,
        "max_messages": 3,
        "max_bytes": 100,
        "deferred": 0,  # QoS 0 (these): dropped; QoS 1 would be left for the broker to send again
        "redeliveries": 0,
    }
    # A status over its bound never reaches the inbox, whatever room there is.
    oversized_status = b"{}" + b" " * MAX_STATUS_BYTES
    service._on_message(service.client, None, message(T.status("watch-01"), oversized_status))
    assert service.messages_dropped == {"inbox_full": 2, "status_too_large": 1}
    for _ in range(3):
        service._drain(0)
    assert service.inbox_status()["bytes"] == 0
    assert service.engine.state.rejected_total == {"frame_bad_magic": 3}  # nothing lost, none twice
    status = service.status()
    assert status["inbox_overflow"] == 2
    assert status["messages_dropped"] == {"inbox_full": 2, "status_too_large": 1}
    service._on_message(service.client, None, message(topic, b"x" * 100))  # room again
    assert service.inbox_status()["bytes"] == 100 and service.inbox_overflow == 2


# --- the agent ----------------------------------------------------------------------------------


def agent_counts(agent: AgentService) -> Counter[str]:
    return Counter(agent.rejected_manifests) + Counter(agent.status()["messages_dropped"])


def agent_view(agent: AgentService) -> tuple[Any, ...]:
    """Everything about the device a message could change, but its counters."""
    return (
        agent.state.load(),
        agent.outbox.stats(),
        sorted(agent.trust.trusted_keys()),
        agent.trust.rotation_sequence,
        agent.current,
        agent.model_sha256,
    )


def agent_deliver(agent: AgentService, topic: str, payload: bytes) -> Counter[str]:
    before = agent_counts(agent)
    agent._on_message(agent.client, None, message(topic, payload))
    agent._work_once()
    return delta(before, agent_counts(agent))


def signed(fleet: FleetFiles, doc_type: str, body: bytes) -> bytes:
    """A frame genuinely signed by the fleet's aggregator key around any document bytes."""
    key = fleet.signing_key
    kid = key_id(key.verify_key)
    signature = key.sign(_signed_message(doc_type, kid, body)).signature
    header = {"alg": "ed25519", "key_id": kid, "type": doc_type}
    return encode_frame(FrameKind.SIGNED, header, signature + body)


def signed_payloads(fleet: FleetFiles, doc_type: str) -> st.SearchStrategy[bytes]:
    documents = st.sampled_from(ADVERSARIAL) | _json_bytes()
    return payloads() | documents.map(lambda b: signed(fleet, doc_type, b))


@EXAMPLES
@given(data=st.data())
def test_any_manifest_bytes_are_refused_counted_once_and_change_nothing(
    agent: AgentService, fleet: FleetFiles, data: st.DataObject
) -> None:
    payload = data.draw(signed_payloads(fleet, DocType.ROUND_MANIFEST))
    view = agent_view(agent)
    counted = agent_deliver(agent, T.manifest, payload)
    assert sum(counted.values()) == (1 if payload else 0), counted  # empty: a cleared manifest
    assert not any(r.startswith("handler_error") for r in counted)
    assert agent_view(agent) == view


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"[" * 100_000, "bad_document"),
        (b'{"version": NaN}', "bad_document"),
        (b'{"version": 1e999}', "bad_document"),
        (b'{"a":' * 40 + b"1" + b"}" * 40, "bad_document"),
        (b'{"version": 2}', "bad_manifest"),
    ],
)
def test_a_genuinely_signed_bad_manifest_is_refused_by_its_reason(
    agent: AgentService, fleet: FleetFiles, body: bytes, reason: str
) -> None:
    view = agent_view(agent)
    assert agent_deliver(agent, T.manifest, signed(fleet, DocType.ROUND_MANIFEST, body)) == {reason: 1}
    assert agent_view(agent) == view


@EXAMPLES
@given(sequence=st.integers(1, 5), data=st.data())
def test_any_rotation_bytes_are_refused_counted_once_and_change_nothing(
    agent: AgentService, fleet: FleetFiles, sequence: int, data: st.DataObject
) -> None:
    payload = data.draw(signed_payloads(fleet, DocType.KEY_ROTATION))
    view = agent_view(agent)
    counted = agent_deliver(agent, T.rotation(sequence), payload)
    assert sum(counted.values()) == (1 if payload else 0), counted
    assert all(r.startswith("rotation_") for r in counted), counted
    assert agent_view(agent) == view


def test_an_oversized_rotation_is_dropped_unparsed(agent: AgentService) -> None:
    from fedge.agent.service import MAX_MANIFEST_FRAME_BYTES

    view = agent_view(agent)
    counted = agent_deliver(agent, T.rotation(1), b"[" * (MAX_MANIFEST_FRAME_BYTES + 1))
    assert counted == {"rotation_too_large": 1}
    assert agent_view(agent) == view


@EXAMPLES
@given(sha=st.sampled_from(["0" * 64, "ab" * 32]) | st.text("0123abcdef", min_size=1), payload=payloads())
def test_any_unrequested_blob_is_counted_once_and_changes_nothing(
    agent: AgentService, sha: str, payload: bytes
) -> None:
    view = agent_view(agent)
    counted = agent_deliver(agent, f"{T.base}/blob/{sha}", payload)
    assert counted == ({"blob_unwanted": 1} if payload else {})
    assert agent_view(agent) == view


def test_a_message_on_a_topic_the_agent_never_subscribed_is_counted(agent: AgentService) -> None:
    view = agent_view(agent)
    assert agent_deliver(agent, T.base + "/update/watch-02", b"x") == {"unexpected_topic": 1}
    assert agent_view(agent) == view


def _wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def test_a_tampered_blob_and_a_failing_data_source_are_counted_and_the_worker_goes_on(
    fleet: FleetFiles, aggregator: tuple[AggregatorService, Publication]
) -> None:
    """The real round flow: a genuine manifest, its blobs fetched (a tampered copy first),
    the real LiteRT model loaded; then the data source fails with an exception that is no
    fedge error (a bug: a provider reading a cache it never filled). The failure is counted,
    nothing is sealed, and the worker turns on."""
    _, pub = aggregator
    prepared: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # never filled

    def provider(task: TaskSpec) -> tuple[np.ndarray, np.ndarray]:
        return prepared[task.sha256()]

    agent = AgentService(
        build_agent(load_agent_config(fleet.agent_configs["watch-02"], {}), ProvidedData(provider))
    )
    agent._on_message(agent.client, None, message(T.manifest, pub.manifest_frame))
    worker = threading.Thread(target=agent._work_once)
    worker.start()
    wanted = {pub.manifest.model_sha256, pub.manifest.weights_sha256}
    _wait_until(lambda: agent._wanted_blobs == wanted, 30, "the worker to ask for the blobs")
    weights_topic = T.blob(pub.manifest.weights_sha256)
    tampered = bytearray(pub.blobs[weights_topic])
    tampered[0] ^= 1
    agent._on_message(agent.client, None, message(weights_topic, bytes(tampered)))
    for topic, blob in pub.blobs.items():
        agent._on_message(agent.client, None, message(topic, blob))
    worker.join(60)
    assert not worker.is_alive()
    assert agent.status()["messages_dropped"] == {"blob_hash_mismatch": 1, "handler_error:KeyError": 1}
    assert agent.rejected_manifests == {}
    state = agent.state.load()
    assert (state.manifest_version, state.update_counter) == (pub.manifest.version, 0)  # nothing sealed
    assert agent.outbox.stats().pending == 0
    assert "KeyError" in str(agent.last_error)
    agent._work_once()  # the worker goes on
    assert agent.status()["messages_dropped"] == {"blob_hash_mismatch": 1, "handler_error:KeyError": 1}


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(3)], ids=lambda e: type(e).__name__)
def test_interrupts_still_end_the_agent_worker(
    fleet: FleetFiles, aggregator: tuple[AggregatorService, Publication], exc: BaseException
) -> None:
    """An interrupt arriving while the worker asks its data source (it asks only once it has
    the blobs) ends the worker: it is not counted as the message's error."""
    _, pub = aggregator
    agent = AgentService(
        build_agent(load_agent_config(fleet.agent_configs["watch-03"], {}), ProvidedData(_raiser(exc)))
    )
    agent._on_message(agent.client, None, message(T.manifest, pub.manifest_frame))
    worker_error: list[BaseException] = []

    def turn() -> None:
        try:
            agent._work_once()
        except BaseException as caught:  # what the test is about
            worker_error.append(caught)

    worker = threading.Thread(target=turn)
    worker.start()
    _wait_until(lambda: bool(agent._wanted_blobs) or not worker.is_alive(), 30, "the blob request")
    for topic, blob in pub.blobs.items():
        agent._on_message(agent.client, None, message(topic, blob))
    worker.join(60)
    assert [type(e) for e in worker_error] == [type(exc)]
    assert agent.status()["messages_dropped"] == {}


def _raiser(exc: BaseException) -> Callable[[TaskSpec], tuple[np.ndarray, np.ndarray]]:
    def provider(task: TaskSpec) -> tuple[np.ndarray, np.ndarray]:
        raise exc

    return provider


# --- the EdgeX bus subscriber -----------------------------------------------------------------

EDGEX_TOPIC = "edgex/events/device/svc/wearable/watch-01/imu"


def _bus(on_events: Callable[[list[Event]], None]) -> EdgeXBusSubscriber:
    table = Table({"mqtt": {"broker": "mqtt://127.0.0.1:9"}}, "mqtt", set(MQTT_KEYS))
    return EdgeXBusSubscriber(mqtt_settings_from_table(table, "edgex-test"), "edgex", on_events)


def _event(device: str = "watch-01", value: float = 1.5) -> Event:
    origin = time.time_ns()
    reading = Reading(device, "accel_x", "wearable", "Float32", value, origin, id=str(uuid.uuid4()))
    return Event(str(uuid.uuid4()), device, "wearable", "imu", origin, (reading,))


@pytest.fixture(scope="module")
def bus_and_events() -> tuple[EdgeXBusSubscriber, list[Event]]:
    received: list[Event] = []
    return _bus(received.extend), received


@EXAMPLES
@given(payload=payloads() | st.just(encode_plain_event(_event())))
def test_any_bytes_on_the_edgex_bus_are_counted_or_delivered_never_raised(
    bus_and_events: tuple[EdgeXBusSubscriber, list[Event]], payload: bytes
) -> None:
    bus, received = bus_and_events
    before, events_before = bus.report(), len(received)
    bus._on_message(bus.client, None, message(EDGEX_TOPIC, payload))
    after = bus.report()
    malformed = delta(Counter(before["malformed"]), Counter(after["malformed"]))
    assert after["errors"] == before["errors"] == {}
    if after["messages"] == before["messages"]:  # the whole message refused: one reason
        assert sum(malformed.values()) == 1 and set(malformed) <= MESSAGE_REASONS, malformed
        assert len(received) == events_before
    else:  # decoded: its bad readings counted, its events delivered
        assert after["messages"] == before["messages"] + 1
        assert set(malformed) <= READING_REASONS


def test_a_failing_event_consumer_is_counted_and_the_feed_goes_on(
    tmp_path: Path, har_task: TaskSpec, caplog: Any
) -> None:
    """A consumer that stores synchronously into a sample store that failed (closed)."""
    store = SampleStore(tmp_path / "samples.sqlite", 100, 3600.0)
    store.close()
    builder = SampleBuilder(har_task, {}, device="watch-01")

    def store_now(events: list[Event]) -> None:
        store.add(builder.add([r for e in events for r in e.readings]), task_key(har_task), time.time())

    bus = _bus(store_now)
    for _ in range(3):
        bus._on_message(bus.client, None, message(EDGEX_TOPIC, encode_plain_event(_event())))
    report = bus.report()
    assert report["messages"] == 3 and report["malformed"] == {}
    assert report["errors"] == {"events_error:SampleStoreError": 3}
    assert sum("events_error:SampleStoreError" in r.getMessage() for r in caplog.records) == 1


# --- core-data responses ------------------------------------------------------------------------

CORE_DATA_REASONS = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    418: "unexpected_status",
    500: "server_error",
}


@EXAMPLES
@given(status=st.sampled_from(sorted(CORE_DATA_REASONS)), body=payloads())
def test_any_core_data_error_body_gives_the_status_error(status: int, body: bytes) -> None:
    error = _status_error(status, body, "/api/v3/ping")
    assert (error.reason, error.status) == (CORE_DATA_REASONS[status], status)


@EXAMPLES
@given(body=payloads())
def test_any_core_data_body_parses_or_is_bad_json(body: bytes) -> None:
    try:
        _parse_json(body, "/api/v3/ping", 1 << 20)
    except CoreDataError as exc:
        assert (exc.reason, exc.status) == ("bad_json", 200)


@pytest.fixture()
def core_data() -> Iterator[CoreDataServer]:
    with CoreDataServer() as server:
        yield server


@pytest.mark.parametrize("status", [200, 500, 503])
def test_a_deeply_nested_core_data_answer_is_a_failed_health_check(
    core_data: CoreDataServer, status: int
) -> None:
    client = CoreDataClient(core_data.url, retries=0)
    core_data.override_next(b"[" * 100_000, status=status)
    assert client.ping() is False
    core_data.override_next(b"[" * 100_000, status=status)
    with pytest.raises(CoreDataError) as caught:
        list(client.readings_for_device("watch-01", 0, 10, newest_first=True))
    assert caught.value.reason == ("bad_json" if status == 200 else "server_error")


# --- the demo's observer ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def observer(fleet: FleetFiles, har_model_dir: Path) -> FleetObserver:
    empty = np.empty((0, 48), np.float32)
    model = (har_model_dir / "model.tflite").read_bytes()
    return FleetObserver(FLEET, "127.0.0.1", 9, fleet.signing_key.verify_key, model, empty, np.empty(0))


@EXAMPLES
@given(
    topic=st.sampled_from([T.manifest, T.aggregator_status, T.status("watch-01"), T.blob("ab" * 32)]),
    payload=payloads(),
)
def test_the_observer_records_or_counts_any_message_never_raises(
    observer: FleetObserver, topic: str, payload: bytes
) -> None:
    before = Counter(observer.view.error_counts)
    observer._on_message(observer.client, None, message(topic, payload))
    counted = delta(before, Counter(observer.view.error_counts))
    assert sum(counted.values()) <= 1
    assert not any(r.startswith("handler_error") for r in counted), counted


def test_every_message_is_acknowledged_to_the_broker_once_handled_or_refused(
    fleet: FleetFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Manual acks: a QoS 1 message is PUBACKed only once the loop handled it, or at once when it
    is refused before the inbox; never twice, never left out (the broker's window of unacked
    messages would shrink for good), except one that finds the inbox full, which the broker must
    send again. The window is sized from the inbox: as many of the largest accepted message as
    its bytes and its message bound hold, at least 10."""
    service = AggregatorService(
        load_aggregator_config(fleet.aggregator_config, {}), inbox_limit=3, inbox_max_bytes=100
    )
    acked: list[tuple[int, int]] = []
    monkeypatch.setattr(service.client, "ack", lambda mid, qos: acked.append((mid, qos)))
    topic = T.update("watch-01")
    for mid, size in enumerate((40, 40, 30), start=1):
        msg = message(topic, b"x" * size)
        msg.mid, msg.qos = mid, 1
        service._on_message(service.client, None, msg)
    # The third finds the inbox full: left unacknowledged, for the broker to send again after a
    # reconnect (tests/e2e/test_inbox_redelivery.py has a real broker do it).
    assert acked == []
    assert service.inbox_status()["deferred"] == 1
    calls: list[str] = []
    for name in ("disconnect", "loop_stop", "connect_async", "loop_start"):
        monkeypatch.setattr(service.client, name, lambda *a, _n=name, **k: calls.append(_n))
    service._drain(0)
    assert acked == [(1, 1)]  # handled: acknowledged after
    service._drain(0)
    assert acked == [(1, 1), (2, 1)] and calls == []
    service._drain(0)  # the inbox is empty: reconnect, and the broker sends message 3 again
    assert calls == ["disconnect", "loop_stop", "connect_async", "loop_start"]
    assert acked == [(1, 1), (2, 1)]
    assert service.inbox_status()["redeliveries"] == 1
    service._drain(0)
    assert len(calls) == 4  # once per deferral, not on every idle turn
    service._on_message(service.client, None, message(topic, b"x" * 30))  # QoS 0: no resend
    service._on_message(service.client, None, message(topic, b"x" * 80))
    assert service.messages_dropped == {"inbox_full": 1} and acked == [(1, 1), (2, 1)]
    assert service.receive_maximum() == 10  # 100 bytes hold no whole update: the floor
    by_count = AggregatorService(load_aggregator_config(fleet.aggregator_config, {}), inbox_limit=50)
    assert by_count.receive_maximum() == 50
    default = AggregatorService(load_aggregator_config(fleet.aggregator_config, {}))
    assert default.receive_maximum() == (64 * 1024 * 1024) // default.engine.message_limit()
