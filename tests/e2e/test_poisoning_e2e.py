"""Two compromised devices of seven cannot steer the model (issue 10, item 2), end to end.

A real Mosquitto broker, a real ``fedge aggregator run`` with the deployment defaults (only the
round count and timeout are set), five real agents training on their subjects' smartwatch data
with LiteRT, and two compromised devices (:mod:`poisoning_device`) using their real keys: in the
moments round they report feature values of 1e4 with an honest-looking count; in every train
round one sends ``-w`` at the documented norm bound and the other 10x over it, both claiming
1,000,000 examples. The same fleet with seven honest agents is the clean run.

What must hold: the attacked global model's held-out accuracy (subjects 8-10) stays within 3
points of the clean run's, and the feature normalisation stays inside the honest devices' range.
Under the old defaults (example-weighted FedAvg, claims capped at 1,000,000) the same attack
takes the model to 0.11 accuracy (``bench/bench_poisoning.py``, "plain").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fedge.agent.service import split_holdout
from fedge.agent.trainer import LiteRTTrainer
from fedge.aggregator.checkpoint import load_checkpoint
from fedge.aggregator.service import CHECKPOINT_FILE, MAX_CHECKPOINT_BYTES, load_model
from fedge.lab import har_watch
from fedge.lab.broker import BrokerSettings, MosquittoBroker
from fedge.protocol.model_manifest import Normalisation
from fedge.protocol.task import TaskSpec
from support.fleet_harness import Fleet
from support.mqtt_fixtures import require_mosquitto
from support.poisoning_device import Poisoner

pytestmark = [pytest.mark.slow, pytest.mark.adversarial]

ROUNDS = 20
DEVICES = 7
ATTACKERS = {"watch-06": 1.0, "watch-07": 10.0}  # device -> how far over the norm bound
HONEST_SUBJECTS = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class Outcome:
    accuracy: float
    normalisation: Normalisation
    history: list[dict[str, object]]
    poisoned_rounds: dict[str, list[str]]


def run_fleet(
    root: Path, model_dir: Path, attackers: dict[str, float], evaluate: Callable[..., float]
) -> Outcome:
    exe = require_mosquitto()
    with MosquittoBroker(BrokerSettings(data_dir=root / "broker"), executable=exe) as broker:
        fleet = Fleet(
            root / "fleet", broker.url, model_dir, DEVICES, {"rounds": ROUNDS, "round_timeout_s": 60.0}
        )
        poisoners = [
            Poisoner(
                fleet=fleet.topics.fleet,
                device_id=device,
                device_key=fleet.files.device_keys[device],
                aggregator_key=fleet.files.box_key.public_key,
                verify_key=fleet.files.signing_key.verify_key,
                host=broker.host,
                port=broker.port,
                norm_factor=factor,
            )
            for device, factor in attackers.items()
        ]
        try:
            for device in fleet.files.agent_configs:
                if device not in attackers:
                    fleet.start_agent(device)
            for p in poisoners:
                p.start()
            fleet.start_aggregator()
            code = fleet.wait_exit("aggregator", timeout=600)
            assert code == 0, fleet.log("aggregator")[-3000:]
        finally:
            for p in poisoners:
                p.stop()
            fleet.stop_all()
    ck = load_checkpoint(root / "fleet" / "state" / "aggregator" / CHECKPOINT_FILE, MAX_CHECKPOINT_BYTES)
    assert ck is not None and ck.normalisation is not None and ck.round_number == ROUNDS
    for p in poisoners:
        assert p.errors == []
    return Outcome(
        evaluate(ck.weights, ck.normalisation),
        ck.normalisation,
        list(ck.metadata["history"]),
        {p.device_id: list(p.sent) for p in poisoners},
    )


@pytest.fixture(scope="module")
def evaluate(har_model_dir: Path, har_task: TaskSpec) -> Callable[..., float]:
    loaded = load_model(har_model_dir)
    trainer = LiteRTTrainer(loaded.model, loaded.manifest)
    devices = har_watch.load_devices(har_task, har_watch.TEST_SUBJECTS)
    x, y = har_watch.pooled(devices.values())

    def accuracy(weights: np.ndarray, normalisation: Normalisation) -> float:
        trainer.normalisation = normalisation
        trainer.set_weights(np.asarray(weights, np.float32))
        return float(trainer.evaluate(x, y).accuracy or 0.0)

    return accuracy


@pytest.fixture(scope="module")
def clean(
    tmp_path_factory: pytest.TempPathFactory, har_model_dir: Path, evaluate: Callable[..., float]
) -> Outcome:
    return run_fleet(tmp_path_factory.mktemp("clean"), har_model_dir, {}, evaluate)


def test_two_compromised_devices_of_seven_cannot_steer_the_model(
    tmp_path: Path, har_model_dir: Path, har_task: TaskSpec, clean: Outcome, evaluate: Callable[..., float]
) -> None:
    attacked = run_fleet(tmp_path, har_model_dir, ATTACKERS, evaluate)
    # The attack happened: a poisoned payload in the moments round and in every train round.
    assert {d: len(sent) for d, sent in attacked.poisoned_rounds.items()} == dict.fromkeys(
        ATTACKERS, ROUNDS + 1
    )
    moments, *train = attacked.history
    assert moments["phase"] == "moments" and moments["outlier_devices"] == 2
    assert all(r["reported"] == DEVICES and r["outcome"] == "aggregated" for r in attacked.history)
    # Clipped: the 10x attacker in every round; from round 2 on, when the adaptive bound (the
    # median honest norm) applies, the one at the ratio bound too.
    assert int(train[0]["clipped"]) >= 1 and all(int(r["clipped"]) >= 2 for r in train[1:])
    assert clean.accuracy >= 0.75  # the clean run learned: the comparison means something
    print(f"held-out accuracy: clean {clean.accuracy:.3f}, attacked {attacked.accuracy:.3f}")
    assert attacked.accuracy >= clean.accuracy - 0.03, (attacked.accuracy, clean.accuracy)

    # The normalisation stays inside the honest devices' range, feature by feature.
    devices = har_watch.load_devices(har_task, HONEST_SUBJECTS)
    local = [split_holdout(d.x, d.y, 0.2, 0).x_train for d in devices.values()]
    means = np.stack([x.mean(axis=0) for x in local])
    stds = np.stack([x.std(axis=0) for x in local])
    pooled_std = np.concatenate(local).std(axis=0)
    mean, std = np.asarray(attacked.normalisation.mean), np.asarray(attacked.normalisation.std)
    assert np.all(mean >= means.min(axis=0)) and np.all(mean <= means.max(axis=0))
    assert np.all(std >= stds.min(axis=0)) and np.all(std <= 1.05 * pooled_std)
