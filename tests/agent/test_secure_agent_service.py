"""A real agent (``AgentService``, from its config through ``build_agent``) in a secure-aggregation
round through a real Mosquitto broker.

The agent's trainer is stubbed (the model blob is a few bytes, no LiteRT): what is under test is
the service around the core: its identity certificate published and the fleet's verified, the
round's retained config checked against the signed manifest, the sealed frames through the
outbox with persisted counters, the record of what it revealed, and the round's end. The test
thread is the aggregator (``fedge.aggregator.secure_round.SecureRoundDriver``) and four more
devices (pure ``DeviceSecureRound`` objects, fed directly): the unmasked sum must be the sum of
the five clipped updates. Then, with ``require_secure_aggregation = true``, a plain round: the
agent installs the model and sends nothing.
"""

from __future__ import annotations

import itertools
import json
import queue
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from nacl.signing import SigningKey

from fedge.agent.config import load_agent_config
from fedge.agent.core import Load, Train
from fedge.agent.secure_agent import RECORD_PREFIX
from fedge.agent.secure_round import DeviceSecureRound, open_round_config
from fedge.agent.service import AgentService
from fedge.agent.wiring import ProvidedData, build_agent
from fedge.aggregator.secure_round import SecureRoundDriver
from fedge.lab.broker import MosquittoBroker
from fedge.protocol.identity import certify
from fedge.protocol.round_manifest import RoundManifest
from fedge.protocol.sealing import read_header
from fedge.protocol.secagg.announcement import SecureAggregationAnnouncement
from fedge.protocol.secagg.quantise import clip_to_norm
from fedge.protocol.secagg.wire import Publication as Doc
from fedge.protocol.secure_round_config import round_config_for
from fedge.protocol.signing import DocType, sign_document, signing_key_to_text
from fedge.shell.files import atomic_write
from support.agent_network import (
    DEVICE,
    Network,
    b64,
    no_data,
    running,
    wait_for,
    write_agent_config,
)
from support.engine_helpers import (
    AGGREGATOR_KEY,
    DEVICE_IDS,
    DEVICE_KEYS,
    FLEET,
    SIGNING_KEY,
    TOPICS,
    P,
    make_engine,
)

pytest_plugins = ("support.mqtt_fixtures",)

OTHERS = DEVICE_IDS[1:]
OPERATOR = SigningKey.generate()
IDENTITY = {d: SigningKey.generate() for d in DEVICE_IDS}
SECURE = SecureAggregationAnnouncement(clip_norm=1.0, bits=32, degree=4, threshold=3)
# float32, as a trained delta is: the agent quantises exactly what the test sums.
UPDATES = {
    d: np.random.default_rng(i).normal(0.0, 0.1, P).astype(np.float32) for i, d in enumerate(DEVICE_IDS)
}


def write_secure_agent_config(directory: Path, broker: MosquittoBroker) -> Path:
    """The agent's config, with its identity key and certificate and secure aggregation required."""
    path = write_agent_config(
        directory,
        broker,
        extra_agent_lines=(
            f'identity_key_file = "{DEVICE}.identity"\nidentity_certificate_file = "{DEVICE}.cert"\n'
            f'operator_verify_keys = ["{signing_key_to_text(OPERATOR.verify_key)}"]\n'
            "require_secure_aggregation = true\n"
        ),
    )
    atomic_write(directory / f"{DEVICE}.identity", (b64(bytes(IDENTITY[DEVICE])) + "\n").encode())
    cert = certify(OPERATOR, FLEET, DEVICE, IDENTITY[DEVICE].verify_key, time.time())
    atomic_write(directory / f"{DEVICE}.cert", (b64(cert) + "\n").encode(), 0o644)
    return path


@pytest.fixture
def network(mosquitto: MosquittoBroker) -> Iterator[Network]:
    net = Network(mosquitto)
    yield net
    net.stop()


def signed(manifest: RoundManifest) -> bytes:
    return sign_document(DocType.ROUND_MANIFEST, manifest.to_dict(), SIGNING_KEY)


def stub_trainer(agent: AgentService, loaded: list[int]) -> None:
    """No LiteRT: loading records the version, training hands the core this device's update."""

    def load(action: Load) -> None:
        loaded.append(action.manifest.version)

    def train(action: Train) -> list[Any]:
        return agent.core.trained(UPDATES[DEVICE].astype(np.float32), 10, 0.5, None, agent.clock())

    agent._load = load  # type: ignore[method-assign]
    agent._train = train  # type: ignore[method-assign]


def simulated_device(
    device: str, config_doc: Doc, quantised: dict[str, npt.NDArray[np.uint64]]
) -> DeviceSecureRound:
    announcement = open_round_config(
        config_doc.topic, config_doc.payload, fleet=FLEET, aggregator_keys=SIGNING_KEY.verify_key
    )
    counter = itertools.count(1)

    def update(config: Any) -> npt.NDArray[np.uint64]:
        quantised[device] = config.quantiser.quantise(UPDATES[device], np.random.default_rng(7))
        return quantised[device]

    return DeviceSecureRound(
        announcement,
        device_id=device,
        box_key=DEVICE_KEYS[device],
        aggregator_box_key=AGGREGATOR_KEY.public_key,
        identity_key=IDENTITY[device],
        neighbour_keys={d: k.verify_key for d, k in IDENTITY.items()},
        aggregator_keys=SIGNING_KEY.verify_key,
        quantised_update=update,
        next_counter=lambda: next(counter),
        persist_revealed=lambda round_id, record: None,
        revealed=None,
    )


def test_an_agent_takes_part_in_a_secure_round_and_refuses_a_plain_one(
    tmp_path: Path, mosquitto: MosquittoBroker, network: Network
) -> None:
    # The fleet's certificates are on the broker before the agent connects; one is forged.
    for d in OTHERS:
        network.publish(TOPICS.identity(d), certify(OPERATOR, FLEET, d, IDENTITY[d].verify_key, time.time()))
    forger = SigningKey.generate()
    network.publish(TOPICS.identity("dev-x"), certify(forger, FLEET, "dev-x", forger.verify_key, time.time()))

    config = load_agent_config(write_secure_agent_config(tmp_path / "agent", mosquitto), {})
    agent = AgentService(build_agent(config, ProvidedData(no_data)))
    loaded: list[int] = []
    stub_trainer(agent, loaded)
    assert agent.secure is not None
    book = agent.secure.book

    now = time.time()
    base = make_engine(devices=DEVICE_IDS).open_round(now)
    manifest = replace(
        base.manifest,
        issued_at=now,
        deadline=now + 60,
        expires_at=now + 3600,
        selected_devices=tuple(DEVICE_IDS),
        secure_aggregation=SECURE,
    )
    round_config = round_config_for(manifest)
    driver = SecureRoundDriver(
        fleet=FLEET,
        config=round_config,
        model_version=manifest.version,
        signing_key=SIGNING_KEY,
        box_key=AGGREGATOR_KEY,
        registry={d: DEVICE_KEYS[d].public_key for d in DEVICE_IDS},
        identity_keys={d: k.verify_key for d, k in IDENTITY.items()},
    )
    quantised: dict[str, npt.NDArray[np.uint64]] = {}
    simulated: dict[str, DeviceSecureRound] = {}
    started = time.monotonic()

    def handle_all(docs: list[Doc]) -> None:
        for doc in docs:
            if doc.payload:  # the sims' frames go straight to the driver
                driver.handle(doc.topic, doc.payload, time.time())

    with running(agent):
        # Its own certificate comes back from the broker too; the forged one never counts.
        wait_for("the fleet's identity keys", lambda: len(book) == len(DEVICE_IDS))
        assert book.keys_for(DEVICE_IDS) == {d: k.verify_key for d, k in IDENTITY.items()}
        wait_for("the forged certificate counted", lambda: agent.dropped["identity_unknown_key"] == 1)

        for topic, blob in base.blobs.items():
            network.publish(topic, blob)
        network.publish(TOPICS.manifest, signed(manifest))
        for doc in driver.start(time.time()):  # the config, retained: the agent may still be training
            network.publish(doc.topic, doc.payload, doc.retain)
            for d in OTHERS:
                simulated[d] = simulated_device(d, doc, quantised)
                handle_all(simulated[d].start(time.time()))

        while not driver.done:
            assert time.monotonic() - started < 40, f"round stuck in {driver.phase}: {dict(driver.rejected)}"
            try:
                topic, payload = network.frames.get(timeout=0.05)
            except queue.Empty:
                pass
            else:
                network.seen.append((topic, payload))
                driver.handle(topic, payload, time.time())
            for doc in driver.tick(time.time()):
                network.publish(doc.topic, doc.payload, doc.retain)
                _round, _what, recipient = TOPICS.secagg_parse(doc.topic)
                if doc.payload and recipient in simulated:
                    handle_all(simulated[recipient].on_message(doc.topic, doc.payload, time.time()))
        for doc in driver.tick(time.time()):  # the clears
            network.publish(doc.topic, doc.payload, doc.retain)

        result = driver.result
        assert result is not None, driver.abort_reason
        assert list(result.survivors) == sorted(DEVICE_IDS) and result.excluded == ()
        assert driver.rejected == {}
        plain = sum(clip_to_norm(UPDATES[d], SECURE.clip_norm) for d in DEVICE_IDS)
        error = np.abs(result.dequantised(round_config) - plain)
        assert float(error.max()) < round_config.quantiser.error_bound(len(DEVICE_IDS))

        # The agent sent its four messages sealed, through the outbox, counters persisted first;
        # never a plain update.
        kinds = [read_header(p)[0] for t, p in network.seen if t == TOPICS.update(DEVICE)]
        assert [h.kind for h in kinds] == [
            "secagg_advertise",
            "secagg_shares",
            "secagg_masked",
            "secagg_unmask",
        ]
        assert [h.counter for h in kinds] == [1, 2, 3, 4]
        state = agent.state.load()
        assert (state.update_counter, state.last_round_id) == (4, manifest.round_id)
        wait_for("the outbox emptied", lambda: agent.outbox.stats().pending == 0)
        record_file = config.state_dir / f"{RECORD_PREFIX}{manifest.round_id}.json"
        record = json.loads(record_file.read_text())
        assert record == {
            "format": 1,
            "round_id": manifest.round_id,
            "revealed": {d: "self_mask" for d in OTHERS},
        }
        # The cleared config ends the round; the status said "training" until then.
        wait_for("the agent idle", lambda: agent.phase_state == "idle")
        assert loaded == [manifest.version]

        # A plain round: with require_secure_aggregation the model is installed, nothing sent.
        later = time.time()
        plain_manifest = replace(
            manifest,
            version=manifest.version + 1,
            parent_sha256=manifest.sha256(),
            round_id=f"{manifest.round_id}-next",
            round_number=manifest.round_number + 1,
            issued_at=later,
            deadline=later + 60,
            expires_at=later + 3600,
            secure_aggregation=None,
        )
        network.publish(TOPICS.manifest, signed(plain_manifest))
        wait_for("the plain round refused", lambda: agent.dropped["plain_round_refused"] == 1)
        assert loaded == [manifest.version, plain_manifest.version]
        assert not record_file.exists()  # the record of a round that is over is removed
        time.sleep(0.3)
        assert network.frames.empty()
        assert agent.state.load().update_counter == 4
        status = wait_for("a status with the counts", lambda: agent.status_now())
        dropped = {
            k: v for k, v in status["messages_dropped"].items() if k != "blob_unwanted"
        }  # re-deliveries
        assert dropped == {"identity_unknown_key": 1, "plain_round_refused": 1}
        assert status["state"] == "idle"
