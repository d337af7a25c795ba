"""Federated rounds in one process, with the real :class:`RoundEngine` and devices that really
train: shared by ``bench_fine_tuning.py`` and ``bench_personalisation.py``.

Every device takes part in every round, as the agents of ``fedge demo`` do: each trains with the
agent's :class:`LiteRTTrainer` from the round's global weights on its own windows (the task's
local epochs, shuffled with ``[seed, version]``), sends what ``fedge.agent.core`` sends (a moments
payload in the moments round, an update otherwise) sealed with its own key, and the engine does
every check (the deployment's influence bounds, FedAvg weighted by examples, the given server
learning rate). No broker and no clock: the rounds are deterministic for the same data, seed and
model (only the keys are random, and they change no number).

Why one loop: the two benches measure different things around the same rounds (test accuracy
and update sizes; personal weights at checkpoints), and a difference between two copies of the
loop would be a difference in what they measure.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from fedge.agent.core import DeviceIdentity, moments_payload, seal_contribution, update_payload
from fedge.agent.trainer import LiteRTTrainer
from fedge.aggregator.config import RoundSettings
from fedge.aggregator.round_engine import EngineState, RoundEngine
from fedge.protocol.round_manifest import RoundManifest
from fedge.protocol.topics import FleetTopics

#: ``(x, y)``: a device's training windows and labels, or its held-out part.
Data = tuple[np.ndarray, np.ndarray]


@dataclass
class RoundsRun:
    """What the devices sent: each update's encoded size (header and body) and its sealed
    message's, in the order sent; the seconds spent in ``fit``."""

    settings: RoundSettings
    payload_bytes: list[int] = field(default_factory=list)
    sealed_bytes: list[int] = field(default_factory=list)
    train_seconds: float = 0.0


def run_rounds(
    loaded: Any,
    trainer: LiteRTTrainer,
    devices: Mapping[str, Data],
    rounds: int,
    *,
    fleet: str,
    server_learning_rate: float,
    seed: int,
    holdout: Mapping[str, Data] | None = None,
    closed: Callable[[RoundManifest, RoundEngine], None] | None = None,
    installed: Callable[[int, RoundManifest, np.ndarray], None] | None = None,
) -> RoundsRun:
    """``rounds`` train rounds of every device in ``devices``, after a moments round when the
    model has no normalisation yet (as the aggregator service starts: a built model's first round).

    - ``holdout``: each device's held-out part, evaluated from the global weights before it
      trains and reported in its update (as the agent does); without it the update carries no
      evaluation.
    - ``closed(manifest, engine)``: after each round closes (the moments round, or a train round
      the engine aggregated), with that round's manifest; the engine's state holds the new
      global weights and normalisation.
    - ``installed(k, manifest, weights)``: when a round opens after ``k`` >= 1 train rounds (the
      next train round, or the final one), with its manifest and the global weights it carries:
      what a device would install (and fine-tune).

    Raises :class:`SystemExit` naming the device and reason if the engine refuses a contribution,
    the round if a train round is not aggregated, and the count if the rounds end early.
    """
    topics = FleetTopics(fleet)
    box, signing = PrivateKey.generate(), SigningKey.generate()
    keys = {d: PrivateKey.generate() for d in devices}
    settings = RoundSettings(
        rounds=rounds,
        min_devices=len(devices),
        wait_for_devices_s=0.0,
        server_learning_rate=server_learning_rate,
    )
    # As AggregatorService starts: the manifest's normalisation (an imported model's identity),
    # or None for a built model without one, whose first round is the moments round.
    state = EngineState(0, "", 0, loaded.initial_weights.copy(), loaded.manifest.normalisation, {})
    engine = RoundEngine(
        fleet,
        settings,
        loaded.manifest,
        loaded.model,
        box,
        signing,
        {d: k.public_key for d, k in keys.items()},
        state,
    )
    run = RoundsRun(settings)
    counters = dict.fromkeys(devices, 0)
    now = 1_700_000_000.0
    completed = 0
    for _ in range(2 * rounds + 3):  # a moments round, the train rounds, the final one; a bound only
        manifest = engine.open_round(now).manifest
        if installed is not None and completed > 0 and manifest.phase != "moments":
            installed(completed, manifest, engine.state.weights.copy())
        if manifest.phase == "final":
            break
        w = engine.state.weights.copy()
        trainer.normalisation = manifest.normalisation
        for device_id in manifest.selected_devices:
            x, y = devices[device_id]
            if manifest.phase == "moments":
                payload, kind = moments_payload(x), "moments"
            else:
                trainer.set_weights(w)
                ev = None if holdout is None else trainer.evaluate(*holdout[device_id])
                t0 = time.perf_counter()
                losses = trainer.fit(x, y, rng=np.random.default_rng([seed, manifest.version]))
                run.train_seconds += time.perf_counter() - t0
                delta = trainer.get_weights() - w
                payload = update_payload(manifest, delta, int(x.shape[0]), losses[-1], ev)
                kind = "update"
                run.payload_bytes.append(len(json.dumps(payload[0]).encode()) + len(payload[1]))
            counters[device_id] += 1
            identity = DeviceIdentity(fleet, device_id, keys[device_id], box.public_key)
            frame = seal_contribution(
                identity, manifest.round_id, manifest.version, counters[device_id], kind, payload
            )
            if kind == "update":
                run.sealed_bytes.append(len(frame))
            reason = engine.handle(topics.update(device_id), frame, now).reason
            if reason != "accepted":
                raise SystemExit(f"{device_id}'s {kind} of {manifest.round_id} refused: {reason}")
        record = engine.close_round()
        if manifest.phase != "moments":
            if record.outcome != "aggregated":
                raise SystemExit(f"round {manifest.round_id}: {record.outcome}")
            completed += 1
        if closed is not None:
            closed(manifest, engine)
        now += 100.0
    if completed != rounds:
        raise SystemExit(f"expected {rounds} train rounds, ran {completed}")
    return run
