"""A small, TensorFlow-free world for :class:`fedge.aggregator.round_engine.RoundEngine` tests.

The engine never runs the model, so the model is a few fixed bytes and its manifest is built
directly from the HAR task with a single hidden layer of 4 units (48 -> 4 -> 7: 231 weights).
Keys are real NaCl keys; time is a plain float the tests pass in.

:class:`Device` builds its payloads with the device core's own functions
(``fedge.agent.core.update_payload`` / ``moments_payload``) and binds them as the core does
(``SealedHeader(fleet, device, manifest.round_id, counter, kind, manifest.version)``), with
knobs to deviate from the protocol on purpose (another header, key, codec or counter).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from nacl.public import Box, PrivateKey, PublicKey
from nacl.signing import SigningKey
from nacl.utils import random as nacl_random

from fedge.agent.core import moments_payload, update_payload
from fedge.aggregator.config import RoundSettings
from fedge.aggregator.round_engine import EngineState, RoundEngine
from fedge.protocol.codec import Codec
from fedge.protocol.framing import FRAME_VERSION, MAGIC, FrameKind, encode_frame
from fedge.protocol.messages import Evaluation
from fedge.protocol.model_manifest import ModelManifest, Normalisation
from fedge.protocol.round_manifest import RoundManifest
from fedge.protocol.sealing import SealedHeader, seal
from fedge.protocol.task import parse_task_spec, task_spec_from_dict
from fedge.protocol.topics import FleetTopics
from fedge.protocol.weights import weights_to_bytes

REPO = Path(__file__).resolve().parents[2]
FLEET = "fleet-1"
TOPICS = FleetTopics(FLEET)
T0 = 1_700_000_000.0


def _small_task() -> Any:
    data = parse_task_spec((REPO / "tasks" / "har-watch.toml").read_text()).to_dict()
    data["model"]["hidden"] = [4]
    return task_spec_from_dict(data)


TASK = _small_task()
MODEL_BYTES = b"not-a-real-tflite-model:" + bytes(range(256))
INITIAL_WEIGHTS = np.random.default_rng(1234).normal(0.0, 0.1, size=48 * 4 + 4 + 4 * 7 + 7).astype(np.float32)
MODEL_MANIFEST = ModelManifest(
    task=TASK,
    model_file="model.tflite",
    model_sha256=hashlib.sha256(MODEL_BYTES).hexdigest(),
    model_bytes=len(MODEL_BYTES),
    initial_weights_sha256=hashlib.sha256(weights_to_bytes(INITIAL_WEIGHTS)).hexdigest(),
    normalisation=None,
    tensorflow_version="none (test)",
)
P = MODEL_MANIFEST.parameter_count
N_FEATURES = TASK.input_dim
assert P == INITIAL_WEIGHTS.shape[0] == 231 and N_FEATURES == 48
LAYOUT = MODEL_MANIFEST.layout
#: A plausible normalisation, for engines that start in the train phase.
NORMALISATION = Normalisation(
    tuple(0.1 * i for i in range(N_FEATURES)), tuple(1.0 + 0.01 * i for i in range(N_FEATURES))
)

AGGREGATOR_KEY = PrivateKey.generate()
OTHER_AGGREGATOR_KEY = PrivateKey.generate()
SIGNING_KEY = SigningKey.generate()
DEVICE_IDS = ("dev-a", "dev-b", "dev-c", "dev-d", "dev-e")
DEVICE_KEYS: dict[str, PrivateKey] = {d: PrivateKey.generate() for d in DEVICE_IDS}


def settings(**changes: Any) -> RoundSettings:
    """The deployment defaults (``RoundSettings()``: what a fleet gets with an empty
    ``[rounds]`` table), with these tests' round count and selection seed, plus ``changes``.

    Tests of the mean's arithmetic ask for ``plain_fedavg()`` by name instead."""
    return replace(RoundSettings(rounds=3, selection_seed=7), **changes)


def plain_fedavg(**changes: Any) -> RoundSettings:
    """Plain FedAvg with no influence bounds (claimed-example weighting, no norm bound): the
    arithmetic the defaults bound, for tests of that arithmetic. Never a fleet's setting:
    one device could then take over the model (``tests/aggregator/test_influence_bounds.py``)."""
    return settings(
        weighting="examples",
        example_cap_ratio=1000.0,
        max_update_norm=0.0,
        update_norm_ratio=0.0,
        update_norm_adaptive=0.0,
        moments_aggregation="pooled",
        **changes,
    )


def initial_state(
    *,
    normalisation: Normalisation | None = NORMALISATION,
    weights: np.ndarray | None = None,
    claim_median: float | None = None,
) -> EngineState:
    """A fresh engine state as the aggregator service builds one (no checkpoint yet).

    ``claim_median``: as if an earlier round's median claimed example count were known (the
    reference of ``weighting = "examples"``; without one, every update counts once)."""
    return EngineState(
        version=0,
        last_manifest_sha256="",
        completed_rounds=0,
        weights=(INITIAL_WEIGHTS if weights is None else weights).astype(np.float32).copy(),
        normalisation=normalisation,
        counters={},
        claim_median=claim_median,
    )


def plain_fedavg_engine(**changes: Any) -> RoundEngine:
    """An engine doing plain example-weighted FedAvg from its first round: ``plain_fedavg()``
    settings and a claim history so large that no cap binds."""
    return make_engine(plain_fedavg(**changes), initial_state(claim_median=1e9))


def registry(devices: tuple[str, ...] = DEVICE_IDS[:3]) -> dict[str, PublicKey]:
    return {d: DEVICE_KEYS[d].public_key for d in devices}


def make_engine(
    round_settings: RoundSettings | None = None,
    state: EngineState | None = None,
    devices: tuple[str, ...] = DEVICE_IDS[:3],
) -> RoundEngine:
    return RoundEngine(
        FLEET,
        round_settings or settings(),
        MODEL_MANIFEST,
        MODEL_BYTES,
        AGGREGATOR_KEY,
        SIGNING_KEY,
        registry(devices),
        state or initial_state(),
    )


def delta_for(device_id: str, round_number: int = 1, scale: float = 0.01) -> np.ndarray:
    """A deterministic float32 delta for one device and round."""
    seed = [DEVICE_IDS.index(device_id) if device_id in DEVICE_IDS else 99, round_number]
    return (np.random.default_rng(seed).normal(0.0, scale, size=P)).astype(np.float32)


def data_for(device_id: str, n: int) -> np.ndarray:
    """A device's raw feature matrix (different mean and scale per device)."""
    i = DEVICE_IDS.index(device_id)
    rng = np.random.default_rng(100 + i)
    return rng.normal(loc=1.5 * i - 2.0, scale=0.5 + i, size=(n, N_FEATURES))


def fedavg_oracle(
    weights: np.ndarray, deltas: list[np.ndarray], examples: list[int], lr: float
) -> np.ndarray:
    """``global + lr * sum(n_i * d_i) / sum(n_i)`` computed independently in float64."""
    stacked = np.stack([d.astype(np.float64) for d in deltas])
    n = np.asarray(examples, dtype=np.float64)
    mean = (stacked * n[:, None]).sum(axis=0) / n.sum()
    return (weights.astype(np.float64) + lr * mean).astype(np.float32)


def raw_payload_frame(payload_header_json: bytes, body: bytes, bind: SealedHeader) -> bytes:
    """A PAYLOAD frame whose JSON header is written by hand (e.g. with ``NaN`` in it, which
    ``encode_frame`` refuses to produce but Python's ``json.loads`` would read)."""
    bind_json = json.dumps(bind.to_dict(), sort_keys=True, separators=(",", ":")).encode()
    raw = b'{"bind":' + bind_json + b',"payload":' + payload_header_json + b"}"
    return (
        struct.pack(">4sBBHII", MAGIC, FRAME_VERSION, int(FrameKind.PAYLOAD), 0, len(raw), len(body))
        + raw
        + body
    )


def seal_inner(header: SealedHeader, inner: bytes, device_key: PrivateKey, aggregator: PublicKey) -> bytes:
    """Seals an arbitrary inner frame the way ``fedge.protocol.sealing.seal`` does."""
    encrypted = Box(device_key, aggregator).encrypt(inner, nacl_random(Box.NONCE_SIZE))
    return encode_frame(FrameKind.SEALED, header.to_dict(), bytes(encrypted))


@dataclass
class Device:
    """One enrolled device; ``counter`` is its persisted update counter (1 first, like the agent)."""

    device_id: str
    key: PrivateKey = field(init=False)
    counter: int = 0

    def __post_init__(self) -> None:
        self.key = DEVICE_KEYS[self.device_id]

    @property
    def topic(self) -> str:
        return TOPICS.update(self.device_id)

    def next_counter(self) -> int:
        self.counter += 1
        return self.counter

    def header(
        self, manifest: RoundManifest, kind: str, counter: int | None = None, **changes: Any
    ) -> SealedHeader:
        h = SealedHeader(
            FLEET,
            self.device_id,
            manifest.round_id,
            self.next_counter() if counter is None else counter,
            kind,
            manifest.version,
        )
        return replace(h, **changes)

    def seal_payload(
        self,
        header: SealedHeader,
        payload_header: dict[str, Any],
        body: bytes,
        *,
        key: PrivateKey | None = None,
        aggregator: PublicKey | None = None,
    ) -> bytes:
        return seal(header, payload_header, body, key or self.key, aggregator or AGGREGATOR_KEY.public_key)

    def update_parts(
        self,
        manifest: RoundManifest,
        delta: np.ndarray | None = None,
        *,
        examples: int = 100,
        train_loss: float = 0.5,
        evaluation: Evaluation | None = None,
        codec: Codec | None = None,
    ) -> tuple[dict[str, Any], bytes]:
        d = delta_for(self.device_id, manifest.round_number) if delta is None else delta
        answered = manifest if codec is None else replace(manifest, codec=codec)
        return update_payload(answered, d, examples, train_loss, evaluation)

    def update(
        self,
        manifest: RoundManifest,
        delta: np.ndarray | None = None,
        *,
        examples: int = 100,
        train_loss: float = 0.5,
        evaluation: Evaluation | None = None,
        codec: Codec | None = None,
        counter: int | None = None,
        **header_changes: Any,
    ) -> bytes:
        """A sealed ``update`` as the agent would send it for ``manifest``."""
        payload_header, body = self.update_parts(
            manifest, delta, examples=examples, train_loss=train_loss, evaluation=evaluation, codec=codec
        )
        return self.seal_payload(
            self.header(manifest, "update", counter, **header_changes), payload_header, body
        )

    def moments(self, manifest: RoundManifest, x: np.ndarray, counter: int | None = None) -> bytes:
        """Sealed feature moments, computed as the agent computes them."""
        payload_header, body = moments_payload(x)
        return self.seal_payload(self.header(manifest, "moments", counter), payload_header, body)


def devices(ids: tuple[str, ...] = DEVICE_IDS[:3]) -> dict[str, Device]:
    return {d: Device(d) for d in ids}
