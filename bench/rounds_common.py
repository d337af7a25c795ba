"""Shared pieces of ``bench_rounds.py`` and ``rounds_worker.py``: a bare RoundEngine, and what a
light simulated device sends (a random delta of the model's size, encoded and sealed).

Nothing here trains: a simulated device's update is ``normal(0, 0.01)`` float32 noise of exactly
the model's parameter count, encoded with the round's codec and sealed with the device's own
key, so the aggregator does every check and all the crypto it does for a real one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from nacl.public import PrivateKey, PublicKey
from nacl.signing import SigningKey

from fedge.agent.core import DeviceIdentity, seal_contribution
from fedge.aggregator.config import RoundSettings
from fedge.aggregator.round_engine import EngineState, RoundEngine
from fedge.aggregator.service import LoadedModel, load_model
from fedge.protocol.codec import Codec
from fedge.protocol.messages import Evaluation, encode_moments, encode_update
from fedge.protocol.model_manifest import ModelManifest, Normalisation, TensorLayout

#: What a simulated device claims about its local data (any plausible values do).
EXAMPLES = 300
TRAIN_LOSS = 0.5
EVALUATION = Evaluation(examples=60, loss=0.6, accuracy=0.8, mse=None)
MOMENTS_COUNT = 50
DELTA_SCALE = 0.01


def device_ids(n: int) -> list[str]:
    width = max(3, len(str(n - 1)))
    return [f"dev-{i:0{width}d}" for i in range(n)]


def round_settings(n_devices: int, codec: Codec, rounds: int = 1_000) -> RoundSettings:
    """Every device selected, a quorum of all of them, a deadline that never bites; everything
    else (influence bounds, size limit) is the deployment default, so the bench pays for them."""
    return RoundSettings(
        rounds=rounds,
        min_devices=n_devices,
        round_timeout_s=600.0,
        codec=codec,
        manifest_ttl_s=3600.0,
        wait_for_devices_s=0.0,
    )


def unit_normalisation(manifest: ModelManifest) -> Normalisation:
    """A normalisation, so the engine starts with train rounds (no moments round)."""
    d = manifest.task.input_dim
    return Normalisation(tuple([0.0] * d), tuple([1.0] * d))


def make_engine(
    loaded: LoadedModel,
    codec: Codec,
    registry: dict[str, PublicKey],
    box_key: PrivateKey,
    signing_key: SigningKey,
    fleet: str = "bench",
) -> RoundEngine:
    """The pure engine as ``AggregatorService`` builds it, already past the moments phase."""
    state = EngineState(
        version=0,
        last_manifest_sha256="",
        completed_rounds=0,
        weights=loaded.initial_weights.copy(),
        normalisation=unit_normalisation(loaded.manifest),
        counters={},
    )
    settings = round_settings(len(registry), codec)
    return RoundEngine(fleet, settings, loaded.manifest, loaded.model, box_key, signing_key, registry, state)


def load(model_dir: Path) -> LoadedModel:
    return load_model(model_dir)


def random_delta(rng: np.random.Generator, parameter_count: int) -> np.ndarray:
    return rng.normal(0.0, DELTA_SCALE, parameter_count).astype(np.float32)


def sealed_update(
    *,
    fleet: str,
    device_id: str,
    round_id: str,
    version: int,
    counter: int,
    delta: np.ndarray,
    layout: Sequence[TensorLayout],
    codec: Codec,
    device_key: PrivateKey,
    aggregator_public: PublicKey,
) -> bytes:
    """What the device core seals for a train round (``fedge.agent.core``), minus training."""
    payload = encode_update(delta, layout, codec, EXAMPLES, TRAIN_LOSS, EVALUATION)
    identity = DeviceIdentity(fleet, device_id, device_key, aggregator_public)
    return seal_contribution(identity, round_id, version, counter, "update", payload)


def device_moments(rng: np.random.Generator, features: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Moments of some plausible local data (count, sums, sums of squares), as a device sends."""
    x = rng.normal(0.0, 1.0, (MOMENTS_COUNT, features))
    return MOMENTS_COUNT, x.sum(axis=0), (x * x).sum(axis=0)


def sealed_moments(
    *,
    fleet: str,
    device_id: str,
    round_id: str,
    version: int,
    counter: int,
    moments: tuple[int, np.ndarray, np.ndarray],
    device_key: PrivateKey,
    aggregator_public: PublicKey,
) -> bytes:
    identity = DeviceIdentity(fleet, device_id, device_key, aggregator_public)
    return seal_contribution(identity, round_id, version, counter, "moments", encode_moments(*moments))
