"""A real agent (``AgentService``, from its config through ``build_agent``) in two sparse
(``topk-int8``) rounds through a real Mosquitto broker, then restarted.

The agent's trainer is stubbed (the model blob is a few bytes, no LiteRT): what is under test is
the service around the core's error feedback. The test thread is the aggregator (a real
:class:`~fedge.aggregator.round_engine.RoundEngine`, publishing its manifests and blobs
retained) and two more devices (their sparse updates handed to the engine directly). After each
sparse round ``<state_dir>/residual.bin`` holds the core's residual, the engine's decoded
updates plus that residual are the agent's deltas, and a restarted agent loads it back.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.agent.config import load_agent_config
from fedge.agent.core import Load, Phase, Train, sparse_update_payload
from fedge.agent.error_feedback import RESIDUAL_FILE, ResidualStore
from fedge.agent.service import AgentService
from fedge.agent.wiring import ProvidedData, build_agent
from fedge.lab.broker import MosquittoBroker
from fedge.protocol.codec import Codec
from fedge.protocol.messages import decode_update
from fedge.protocol.round_manifest import RoundManifest
from fedge.protocol.sealing import open_sealed, read_header
from support.agent_network import DEVICE, WAIT_S, Network, no_data, running, wait_for, write_agent_config
from support.engine_helpers import (
    AGGREGATOR_KEY,
    DEVICE_IDS,
    DEVICE_KEYS,
    LAYOUT,
    TOPICS,
    Device,
    P,
    make_engine,
    settings,
)

pytest_plugins = ("support.mqtt_fixtures",)

OTHERS = DEVICE_IDS[1:3]
#: The agent's "trained" delta per round number (float32, as a trained delta is).
DELTAS = {r: np.random.default_rng([7, r]).normal(0.0, 0.02, P).astype(np.float32) for r in (1, 2, 3)}


@pytest.fixture
def network(mosquitto: MosquittoBroker) -> Iterator[Network]:
    net = Network(mosquitto)
    yield net
    net.stop()


def stub_trainer(agent: AgentService, trained: list[int]) -> None:
    """No LiteRT: loading marks the model loaded, training hands the core the round's delta."""

    def load(action: Load) -> None:
        agent.core.model_loaded(action.manifest.model_sha256)

    def train(action: Train) -> list[Any]:
        trained.append(action.manifest.round_number)
        return agent.core.trained(DELTAS[action.manifest.round_number], 40, 0.5, None, agent.clock())

    agent._load = load  # type: ignore[method-assign]
    agent._train = train  # type: ignore[method-assign]


def decoded(payload: bytes, manifest: RoundManifest) -> np.ndarray:
    """The delta in the agent's sealed update, opened as the aggregator opens it."""
    header, ciphertext = read_header(payload)
    payload_header, body = open_sealed(
        header, ciphertext, AGGREGATOR_KEY, DEVICE_KEYS[DEVICE].public_key, 1 << 20
    )
    return decode_update(payload_header, body, LAYOUT, manifest.codec, manifest.topk_fraction).delta


def test_the_residual_of_sparse_rounds_is_kept_in_the_state_dir_and_survives_a_restart(
    tmp_path: Path, mosquitto: MosquittoBroker, network: Network
) -> None:
    config = load_agent_config(write_agent_config(tmp_path / "agent", mosquitto), {})
    residual_file = config.state_dir / RESIDUAL_FILE
    engine = make_engine(settings(codec=Codec.TOPK_INT8, rounds=5), devices=(DEVICE, *OTHERS))
    others = {d: Device(d) for d in OTHERS}
    agent = AgentService(build_agent(config, ProvidedData(no_data)))
    assert agent.core.residual is None and not residual_file.exists()
    trained: list[int] = []
    stub_trainer(agent, trained)

    sent = np.zeros(P, np.float64)
    with running(agent):
        for round_number in (1, 2):
            pub = engine.open_round(time.time())
            m = pub.manifest
            assert (m.round_number, m.codec, m.topk_fraction) == (round_number, Codec.TOPK_INT8, 0.1)
            for topic, blob in pub.blobs.items():
                network.publish(topic, blob)
            network.publish(TOPICS.manifest, pub.manifest_frame)
            for d, dev in others.items():
                payload, _ = sparse_update_payload(m, DELTAS[round_number] * 0.5, None, 40, 0.5, None)
                frame = dev.seal_payload(dev.header(m, "update"), *payload)
                assert engine.handle(dev.topic, frame, time.time()).accepted, d

            topic, frame = network.frames.get(timeout=WAIT_S)
            assert topic == TOPICS.update(DEVICE)
            outcome = engine.handle(topic, frame, time.time())
            assert outcome.accepted, outcome
            sent += decoded(frame, m)
            assert engine.round_due(time.time())
            assert engine.close_round().outcome == "aggregated"

            # Saved before the frame was queued: on disk by the time it arrived, and the core's.
            saved = ResidualStore(residual_file).load()
            assert saved is not None and agent.core.residual is not None
            assert saved == agent.core.residual  # the model and generation
            assert saved.values.tobytes() == agent.core.residual.values.tobytes()
            assert (saved.model_sha256, saved.generation) == (m.model_sha256, m.generation)
            # Error feedback: what the aggregator decoded plus what is owed is what was trained.
            expected = sum(DELTAS[r].astype(np.float64) for r in range(1, round_number + 1))
            np.testing.assert_allclose(sent + saved.values, expected, rtol=0, atol=2e-6)
            wait_for("the agent idle", lambda: agent.phase_state == "idle")
    assert trained == [1, 2]
    assert residual_file.stat().st_mode & 0o777 == 0o600
    on_disk = residual_file.read_bytes()
    last = agent.core.residual
    assert last is not None

    # A restart loads it back; the retained manifest of a round already answered changes nothing.
    restarted = AgentService(build_agent(config, ProvidedData(no_data)))
    assert restarted.core.residual == last
    assert restarted.core.residual is not None
    assert restarted.core.residual.values.tobytes() == last.values.tobytes()
    stub_trainer(restarted, trained)
    with running(restarted):
        wait_for("the retained manifest seen", lambda: restarted.core.current is not None)
        wait_for("the round loaded, not trained", lambda: restarted.core.phase is Phase.WAITING)
        time.sleep(0.3)
    assert trained == [1, 2]
    assert network.frames.empty()
    assert residual_file.read_bytes() == on_disk
