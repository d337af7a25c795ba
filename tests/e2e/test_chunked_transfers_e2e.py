"""A model over 5 MB through a broker that refuses any packet over 1 MiB: real Mosquitto
(``max_packet_size``), the aggregator and two agents as processes, real LiteRT training.

Whole, neither the model nor the weights blob nor a device's update could cross this broker
(it disconnects a client that sends a larger packet, checked here too); in pieces of the
default ``chunk_bytes`` (256 KiB) the fleet completes its round, and every update counts once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fedge.lab.broker import BrokerSettings, MosquittoBroker
from fedge.protocol.chunks import (
    CHUNK_KIND,
    CHUNK_OVERHEAD_BYTES,
    DEFAULT_CHUNK_BYTES,
    decode_blob_chunk,
    join,
    open_chunk,
)
from fedge.protocol.messages import decode_update
from fedge.protocol.sealing import open_sealed, read_header
from fedge.protocol.task import TaskSpec, parse_task_spec
from support.fleet_harness import Fleet, latest_status
from support.mqtt_fixtures import TrafficRecorder, require_mosquitto

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MAX_PACKET = 1024 * 1024


def big_task() -> TaskSpec:
    """har-watch with a 48 -> 1280 -> 1024 -> 7 MLP: 1,381,639 parameters, 5.5 MB of weights;
    one local epoch keeps LiteRT's training of it to seconds."""
    text = (REPO / "tasks" / "har-watch.toml").read_text()
    text = text.replace("hidden = [64, 32]", "hidden = [1280, 1024]").replace(
        "local_epochs = 3", "local_epochs = 1"
    )
    return parse_task_spec(text)


@pytest.fixture()
def small_packet_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    settings = BrokerSettings(data_dir=tmp_path / "mosquitto", max_packet_size=MAX_PACKET)
    with MosquittoBroker(settings, executable=require_mosquitto()) as broker:
        yield broker


def _whole_is_refused(broker: MosquittoBroker, size: int) -> bool:
    """Whether this broker refuses a QoS 1 publish of ``size`` bytes: the client is disconnected
    (or refused by paho itself, which learns the limit from the CONNACK) instead of a PUBACK."""
    gone = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_disconnect = lambda *_: gone.set()
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        info = client.publish("probe/whole", bytes(size), qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return True
        while not gone.is_set() and not info.is_published():
            gone.wait(0.1)
        return gone.is_set() and not info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def test_a_5_mb_model_completes_a_round_through_a_1_mib_broker(
    tmp_path: Path,
    small_packet_broker: MosquittoBroker,
    build_model_dir: Callable[[TaskSpec], Path],
) -> None:
    model_dir = build_model_dir(big_task())
    assert _whole_is_refused(small_packet_broker, 2 * MAX_PACKET)
    with TrafficRecorder.for_broker(small_packet_broker) as recorder:
        fleet = Fleet(
            tmp_path / "fleet",
            small_packet_broker.url,
            model_dir,
            2,
            {"rounds": 1, "min_devices": 2, "round_timeout_s": 600.0},
        )
        try:
            for device in fleet.files.agent_configs:
                fleet.start_agent(device)
            fleet.start_aggregator()
            assert fleet.wait_exit("aggregator", 900) == 0, fleet.log("aggregator")[-3000:]
            for device in fleet.files.agent_configs:
                topic = fleet.topics.status(device)
                recorder.wait_for(
                    lambda ms, t=topic: latest_status(ms, t).get("model_version") == 3,
                    120,
                    f"{device} on the final model",
                )
                # The rollout gate's promoted weights (v2) came in pieces too, and predictions use them.
                recorder.wait_for(
                    lambda ms, t=topic: (
                        (latest_status(ms, t).get("rollout") or {}).get("predicting_version") == 2
                    ),
                    120,
                    f"{device} predicting with the promoted v2",
                )
        finally:
            fleet.stop_all()
        messages = recorder.messages

    manifests = fleet.manifests(recorder)
    assert [m.phase for m in manifests] == ["moments", "train", "final"]
    m = manifests[1]
    assert m.weights_bytes >= 5_000_000 and m.model_bytes > MAX_PACKET  # whole, neither could cross
    assert "Packet too large" not in fleet.log("aggregator")
    status = latest_status(messages, fleet.topics.aggregator_status)
    assert status["state"] == "done" and status["completed_rounds"] == 1, status
    assert status["rejected_total"] == {}
    assert not [r for r in status["messages_dropped"] if r.startswith("chunk_")], status["messages_dropped"]
    assert status["history"][-1]["reported"] == 2

    # Nothing the fleet published came near the broker's limit: every piece fits.
    largest = max(len(x.payload) for x in messages)
    assert largest <= DEFAULT_CHUNK_BYTES + CHUNK_OVERHEAD_BYTES < MAX_PACKET

    # The model and every weights blob went out as retained pieces that put together are the
    # blobs the signed manifests name.
    for sha, size in ((m.model_sha256, m.model_bytes), (m.weights_sha256, m.weights_bytes)):
        pieces = {
            x.topic: x.payload for x in recorder.matching(fleet.topics.blob_chunk_filter(sha)) if x.payload
        }
        assert len(pieces) == -(-size // DEFAULT_CHUNK_BYTES)
        assert len(join([decode_blob_chunk(p) for p in pieces.values()], size)) == size

    # Each device's train update crossed as sealed pieces; put together (with the aggregator's
    # key) it is one whole sealed update of the model's size.
    for device in fleet.files.agent_configs:
        sealed = [x.payload for x in recorder.matching(fleet.topics.update(device))]
        headers = [read_header(p)[0] for p in sealed]
        train = [(h, p) for h, p in zip(headers, sealed, strict=True) if h.round_id == m.round_id]
        assert train and all(h.kind == CHUNK_KIND for h, _ in train)
        device_public = fleet.files.device_keys[device].public_key
        opened = {}
        for h, p in train:
            info, body = open_chunk(h, read_header(p)[1], fleet.files.box_key, device_public)
            opened[info.index] = (info, body)
        whole = join(list(opened.values()), 64 * 1024 * 1024)
        header, ciphertext = read_header(whole)
        assert header.kind == "update" and header.device_id == device
        payload, body = open_sealed(header, ciphertext, fleet.files.box_key, device_public, len(whole))
        update = decode_update(payload, body, m.model_manifest.layout, m.codec)
        assert update.delta.size == m.model_manifest.parameter_count
