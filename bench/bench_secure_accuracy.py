"""Held-out accuracy under secure aggregation, with and without dropouts, against plain FedAvg
on the default task, in one run (issue 14: "the default task with secure aggregation and 2
dropped devices per round keeps held-out accuracy within 1 point of plain FedAvg").

Everything but the network is the product: the real :class:`RoundEngine` (``secure=
SecureSettings(...)``, ``privacy=PrivacyConfig(...)``), sealed and signed messages with every
check, and honest devices training with the LiteRT interpreter on their own data exactly as the
agent does (subjects 1-7 as devices, seeded 80/20 split, local epochs from the task; one shared
interpreter reloaded with each device's starting weights, as in bench_dp). In a secure round
each selected device runs the agent's own round driver
(:class:`~fedge.agent.secure_round.DeviceSecureRound`: X25519 sealing, Ed25519 signatures,
Shamir shares, masks) and quantises its own delta as the agent does
(``fedge.agent.secure_agent._quantised``: clipped to the announced ``clip_norm``, stochastic
rounding, and with DP its share of the discrete Gaussian noise); an in-memory "broker" hands the
engine's signed documents to the devices they name and the devices' sealed frames to
:meth:`RoundEngine.handle`; time is a float that jumps to the next phase deadline when nothing
is left to deliver. Held-out accuracy (subjects 8-10) after every train round.

Runs, all with the demo's ``[rounds]`` for this task (``lab/fedge/lab/demo.py``: min_devices =
(7 + 1) // 2 = 4, server_learning_rate = 2.0, the other keys ``RoundSettings()``'s deployment
defaults, fp32):

1. ``plain``: plain FedAvg (equal weighting, the influence bounds: each update clipped to the
   smallest of 0.5 x the model norm and the previous round's median update norm);
2. ``secure``: secure aggregation (32-bit modulus), nobody drops;
3. ``secure-drop2``: secure aggregation with threshold 4 (n = 7: the graph is complete, degree
   6; threshold 4 tolerates 2 dropouts) and 2 of the 7 devices, drawn per round from a seeded
   generator, going silent right after sending their shares: their masked inputs never arrive,
   so the survivors must reveal their mask keys and the aggregator removes their pairwise
   masks (the expensive, "recovered" case). The mean is over the 5 survivors;
4. ``secure-dp-eps8``: secure aggregation (62-bit modulus, the threshold chosen by the
   protocol) with distributed differential privacy: each device adds its share of the discrete
   Gaussian noise before masking, epsilon 8 over the run at delta 1e-5, the noise multiplier
   derived for ``--rounds`` rounds, **fixed** clipping (adaptive clipping cannot run under
   secure aggregation) at the median L2 norm of the device updates in run 1's first train round
   (``--clip-bound`` overrides it). Nobody is made to drop, but a device whose training
   diverges (``FedgeError``: the noise can take the model there) sends nothing, as the agent
   does: the round counts it as dropped (it never advertised), and a round with too few
   advertisers aborts (``too_few_survivors``) and is retried, as in bench_dp.

Secure rounds clip to the static bound only (the adaptive bound needs the updates' norms, which
the aggregator no longer sees), so runs 2-3 clip to 0.5 x the model norm where run 1 clips to
the previous round's median norm: one of the two differences to run 1 besides the dropouts
(the other is the quantiser's unbiased stochastic rounding, ``fedge.protocol.secagg.quantise``).
The JSON keeps each round's bound and the median update norm, to see which bound bit.

Bytes per device per round: plain, the sealed update frame; secure, the four sealed frames a
surviving device sends (advertisement, shares, masked input, unmask answer). What a device
receives (the per-device documents; the round's config is shared and not counted) is in the
JSON too. Quantisation rounding and the DP noise come from seeded generators so runs repeat
(the agent draws them from the OS); the masks' randomness is the driver's own (secret: it
cancels in the sum).

Usage: ``python bench/bench_secure_accuracy.py [--rounds 30] [--out bench/results/secure_accuracy.json]
[--quick]``; the plot goes next to the JSON (``.png``). ``--quick``: 3 rounds, runs 1 and 3
only, written to ``secure_accuracy-quick.json``/``.png`` unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from nacl.public import PrivateKey
from nacl.signing import SigningKey, VerifyKey

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_training import machine_info  # type: ignore[import-not-found, unused-ignore]  # noqa: E402
from fedge.agent.core import DeviceIdentity, moments_payload, seal_contribution, update_payload  # noqa: E402
from fedge.agent.secure_round import DeviceSecureRound, open_round_config  # noqa: E402
from fedge.agent.service import LocalData, split_holdout  # noqa: E402
from fedge.agent.trainer import LiteRTTrainer  # noqa: E402
from fedge.aggregator.config import RoundSettings  # noqa: E402
from fedge.aggregator.model_export import build_model, write_model  # noqa: E402
from fedge.aggregator.privacy import PrivacyConfig  # noqa: E402
from fedge.aggregator.privacy_config import (  # noqa: E402
    PrivacySettings,
    SecureSettings,
    privacy_config,
    secure_settings,
)
from fedge.aggregator.round_engine import EngineState, Publication, RoundEngine, RoundRecord  # noqa: E402
from fedge.aggregator.service import load_model  # noqa: E402
from fedge.lab import har_watch  # noqa: E402
from fedge.protocol.errors import FedgeError  # noqa: E402
from fedge.protocol.privacy_announcement import PrivacyAnnouncement  # noqa: E402
from fedge.protocol.round_manifest import RoundManifest  # noqa: E402
from fedge.protocol.sealing import read_header  # noqa: E402
from fedge.protocol.secagg import RoundConfig  # noqa: E402
from fedge.protocol.secagg.quantise import clip_to_norm  # noqa: E402
from fedge.protocol.secagg.wire import Publication as WirePublication  # noqa: E402
from fedge.protocol.secure_dp import add_noise_share, noise_plan  # noqa: E402
from fedge.protocol.task import parse_task_spec  # noqa: E402
from fedge.protocol.topics import FleetTopics  # noqa: E402

FLEET = "secacc"
TOPICS = FleetTopics(FLEET)
DEFAULT_OUT = ROOT / "bench" / "results" / "secure_accuracy.json"
QUICK_OUT = ROOT / "bench" / "results" / "secure_accuracy-quick.json"
CHECKPOINTS = (10, 20, 30)
SERVER_LR = 2.0  # lab/fedge/lab/demo.py DemoOptions.server_learning_rate
DROP_SEED = 14  # which devices drop in each round
ROUNDING_SEED = 15  # the devices' stochastic rounding (the agent draws it from the OS)
NOISE_SEED = 16  # the devices' DP noise shares (the agent draws them from the OS)
DROPS = 2
THRESHOLD = 4  # n = 7: complete graph, degree 6; t = 4 tolerates 2 dropouts
BITS = 32  # [privacy] secure_aggregation_bits default
DP_BITS = 62  # what distributed DP requires
EPSILON = 8.0
TARGET_DELTA = 1e-5
SECURE_KINDS = ("secagg_advertise", "secagg_shares", "secagg_masked", "secagg_unmask")


@dataclass(frozen=True)
class RunSpec:
    name: str
    label: str
    secure: bool = False
    drops: int = 0
    threshold: int = 0
    dp: bool = False


RUNS = (
    RunSpec("plain", "plain FedAvg"),
    RunSpec("secure", "secure aggregation", secure=True),
    RunSpec(
        "secure-drop2",
        "secure, 2 of 7 drop each round (t = 4)",
        secure=True,
        drops=DROPS,
        threshold=THRESHOLD,
    ),
    RunSpec("secure-dp-eps8", "secure + distributed DP, ε = 8", secure=True, dp=True),
)
QUICK_RUNS = ("plain", "secure-drop2")


@dataclass(frozen=True)
class Device:
    device_id: str
    data: LocalData
    key: PrivateKey
    identity: SigningKey


class World:
    """The data, the model, the keys and the interpreter, shared by every run."""

    def __init__(self, model_dir: Path) -> None:
        task = parse_task_spec((ROOT / "tasks" / "har-watch.toml").read_text())
        devices = har_watch.load_devices(task, har_watch.SUBJECTS)
        self.x_test, self.y_test = har_watch.pooled([devices[s] for s in har_watch.TEST_SUBJECTS])
        local = {s: split_holdout(devices[s].x, devices[s].y, 0.2, 0) for s in har_watch.TRAIN_SUBJECTS}
        self.loaded = load_model(model_dir)
        self.trainer = LiteRTTrainer(self.loaded.model, self.loaded.manifest)
        self.box = PrivateKey.generate()
        self.signing = SigningKey.generate()
        self.devices = [
            Device(har_watch.device_id(s), local[s], PrivateKey.generate(), SigningKey.generate())
            for s in har_watch.TRAIN_SUBJECTS
        ]
        #: The identity keys the operator's registry distributes (never the aggregator's).
        self.identities: dict[str, VerifyKey] = {d.device_id: d.identity.verify_key for d in self.devices}


# --- one secure round, in memory ------------------------------------------------------------------


@dataclass
class SecureDevice:
    """One selected device in one secure round: its trained delta, its round driver, what it
    sent and received. ``stop_after``: the sealed kind after which it goes silent."""

    device: Device
    delta: npt.NDArray[np.float64]
    counter: itertools.count[int]
    rounding_rng: np.random.Generator
    noise_source: random.Random
    privacy: tuple[PrivacyAnnouncement, int] | None
    stop_after: str | None = None
    round: DeviceSecureRound | None = None
    gone: bool = False
    sent: list[str] = field(default_factory=list)
    sent_bytes: int = 0
    received_bytes: int = 0

    def quantised(self, config: RoundConfig) -> npt.NDArray[np.uint64]:
        """``fedge.agent.secure_agent._quantised`` with seeded randomness."""
        q = config.quantiser.quantise(clip_to_norm(self.delta, config.clip_norm), self.rounding_rng)
        if self.privacy is None:
            return q
        plan = noise_plan(self.privacy[0], config, self.privacy[1])
        return add_noise_share(q, plan, config.bits, self.noise_source)

    def join(self, world: World, topic: str, payload: bytes, now: float) -> list[WirePublication]:
        announcement = open_round_config(
            topic, payload, fleet=FLEET, aggregator_keys=world.signing.verify_key
        )
        self.round = DeviceSecureRound(
            announcement,
            device_id=self.device.device_id,
            box_key=self.device.key,
            aggregator_box_key=world.box.public_key,
            identity_key=self.device.identity,
            neighbour_keys=world.identities,
            aggregator_keys=world.signing.verify_key,
            quantised_update=self.quantised,
            next_counter=lambda: next(self.counter),
            persist_revealed=lambda _round_id, _record: None,  # in memory: nothing restarts
            revealed=None,
        )
        return self._sending(self.round.start(now))

    def receive(self, topic: str, payload: bytes, now: float) -> list[WirePublication]:
        if self.gone or self.round is None:
            return []
        self.received_bytes += len(payload)
        return self._sending(self.round.on_message(topic, payload, now))

    def _sending(self, frames: list[WirePublication]) -> list[WirePublication]:
        out = []
        for frame in frames:
            if self.gone:
                break
            kind = read_header(frame.payload)[0].kind
            self.sent.append(kind)
            self.sent_bytes += len(frame.payload)
            out.append(frame)
            if kind == self.stop_after:
                self.gone = True
        return out


def drive_secure_round(
    world: World,
    engine: RoundEngine,
    pub: Publication,
    devices: dict[str, SecureDevice],
    now: float,
    outcomes: Counter[str],
) -> tuple[RoundRecord, float]:
    """Delivers documents and frames until the round is due, then closes it; returns the record
    and the time it ended at."""

    def deliver(publications: list[WirePublication]) -> list[WirePublication]:
        frames: list[WirePublication] = []
        for p in publications:
            if not p.payload:
                continue  # a clear
            _round, what, device_id = TOPICS.secagg_parse(p.topic)
            if what == "config":
                for d in devices.values():
                    frames += d.join(world, p.topic, p.payload, now)
            elif device_id in devices:
                frames += devices[device_id].receive(p.topic, p.payload, now)
        return frames

    def next_deadline() -> float:
        driver = engine.current.secure if engine.current is not None else None
        times = [pub.manifest.deadline]
        if driver is not None:
            d = driver.config.deadlines
            times += [d.advertise, d.share, d.masked_input, d.unmask]
        later = [t for t in times if t > now]
        if not later:
            raise RuntimeError("the round is past every deadline but not due")
        return min(later)

    frames = deliver(list(pub.secagg))
    while True:
        for frame in frames:
            outcomes[str(engine.handle(frame.topic, frame.payload, now).reason)] += 1
        documents = engine.tick(now)
        frames = deliver(documents)
        if frames or documents:
            continue
        if engine.round_due(now):
            break
        now = next_deadline()
    record = engine.close_round()
    engine.tick(now)  # the clears
    return record, now


# --- a run ----------------------------------------------------------------------------------------


def run(
    world: World,
    spec: RunSpec,
    settings: RoundSettings,
    secure: SecureSettings | None,
    privacy: PrivacyConfig | None,
) -> dict[str, Any]:
    """One federated run of ``settings.rounds`` train rounds (aborted rounds are retried)."""
    started = time.perf_counter()
    by_id = {d.device_id: d for d in world.devices}
    state = EngineState(0, "", 0, world.loaded.initial_weights.copy(), None, {})
    engine = RoundEngine(
        FLEET,
        settings,
        world.loaded.manifest,
        world.loaded.model,
        world.box,
        world.signing,
        {d.device_id: d.key.public_key for d in world.devices},
        state,
        privacy=privacy,
        secure=secure,
    )
    now = 1_700_000_000.0
    outcomes: Counter[str] = Counter()

    def send_plain(device: Device, m: RoundManifest, kind: str, payload: tuple[dict[str, Any], bytes]) -> int:
        counter = engine.state.counters.get(device.device_id, 0) + 1
        identity = DeviceIdentity(FLEET, device.device_id, device.key, world.box.public_key)
        frame = seal_contribution(identity, m.round_id, m.version, counter, kind, payload)
        outcomes[str(engine.handle(TOPICS.update(device.device_id), frame, now).reason)] += 1
        return len(frame)

    trainer = world.trainer
    accuracies: list[float] = []
    dropped: list[int] = []
    clip_bounds: list[float | None] = []
    median_norms: list[float] = []
    epsilons: list[float | None] = []
    sent_bytes: list[int] = []  # per surviving device and train round
    sent_bytes_dropped: list[int] = []  # per dropping device and round (advertisement + shares)
    received_bytes: list[int] = []
    failures: Counter[str] = Counter()
    diverged = aborted = 0
    for _ in range(3 * settings.rounds + 3):
        pub = engine.open_round(now)
        m = pub.manifest
        if m.phase == "final":
            break
        w = engine.state.weights.copy()
        trainer.normalisation = m.normalisation
        if m.phase == "moments":
            for device_id in m.selected_devices:
                send_plain(by_id[device_id], m, "moments", moments_payload(by_id[device_id].data.x_train))
            engine.close_round()
            now += 100.0
            continue
        deltas: dict[str, tuple[npt.NDArray[np.float32], float, Any]] = {}
        norms: list[float] = []
        for device_id in m.selected_devices:
            data = by_id[device_id].data
            try:
                trainer.set_weights(w)
                ev = trainer.evaluate(data.x_holdout, data.y_holdout) if data.x_holdout.shape[0] > 0 else None
                losses = trainer.fit(data.x_train, data.y_train, rng=np.random.default_rng([0, m.version]))
                delta = trainer.get_weights() - w
            except FedgeError:  # the agent sends nothing
                diverged += 1
                continue
            norms.append(float(np.linalg.norm(delta.astype(np.float64))))
            deltas[device_id] = (delta, losses[-1], ev)
        if m.secure_aggregation is None and spec.secure:
            record = engine.close_round()  # could not open as a secure round: nobody was asked
        elif m.secure_aggregation is None:
            for device_id, (delta, loss, ev) in deltas.items():
                data = by_id[device_id].data
                sent_bytes.append(
                    send_plain(
                        by_id[device_id],
                        m,
                        "update",
                        update_payload(m, delta, int(data.x_train.shape[0]), loss, ev),
                    )
                )
            record = engine.close_round()
        else:
            selected = sorted(deltas)
            gone: set[str] = set()
            if spec.drops:
                pick = np.random.default_rng([DROP_SEED, m.round_number]).choice(
                    len(selected), spec.drops, replace=False
                )
                gone = {selected[int(i)] for i in pick}
            privacy_of = (m.privacy, m.min_devices) if m.privacy is not None else None
            devices = {
                d: SecureDevice(
                    by_id[d],
                    np.asarray(deltas[d][0], dtype=np.float64).reshape(-1),
                    itertools.count(engine.state.counters.get(d, 0) + 1),
                    np.random.default_rng([ROUNDING_SEED, m.round_number, i]),
                    random.Random(NOISE_SEED * 1_000_003 + m.round_number * 1009 + i),
                    privacy_of,
                    stop_after="secagg_shares" if d in gone else None,
                )
                for i, d in enumerate(selected)
            }
            record, now = drive_secure_round(world, engine, pub, devices, now + 1.0, outcomes)
            for d in devices.values():
                refusals = d.round.refusals if d.round is not None else Counter()
                for reason, count in refusals.items():
                    outcomes[f"device:{reason}"] += count
                if d.gone:
                    sent_bytes_dropped.append(d.sent_bytes)
                elif d.sent == list(SECURE_KINDS):
                    sent_bytes.append(d.sent_bytes)
                    received_bytes.append(d.received_bytes)
        if record.outcome == "aggregated":
            trainer.set_weights(engine.state.weights)
            trainer.normalisation = engine.state.normalisation
            acc = trainer.evaluate(world.x_test, world.y_test).accuracy
            accuracies.append(float(acc) if acc is not None and math.isfinite(acc) else 0.0)
            dropped.append(record.dropped)
            clip_bounds.append(record.norm_bound)
            median_norms.append(float(np.median(norms)) if norms else math.nan)
            epsilons.append(record.epsilon_spent)
        else:
            aborted += 1
            failures[str(record.failure)] += 1
        now += 100.0
    status = engine.status(now)
    p = status["privacy"]
    return {
        "run": spec.name,
        "label": spec.label,
        "secure_aggregation": spec.secure,
        "bits": None if secure is None else secure.bits,
        "threshold": None if secure is None else (secure.threshold or "chosen"),
        "drops_per_round": spec.drops,
        "epsilon_budget": None if privacy is None else privacy.epsilon_budget,
        "noise_multiplier": None if p is None else p["noise_multiplier"],
        "clip_bound_dp": None if privacy is None else privacy.clip_bound,
        "epsilon_spent": None if p is None else p["epsilon_spent"],
        "final_accuracy": round(accuracies[-1], 4) if accuracies else 0.0,
        "accuracy_at": {str(k): round(accuracies[k - 1], 4) for k in CHECKPOINTS if len(accuracies) >= k},
        "mean_accuracy_last_5": round(float(np.mean(accuracies[-5:])), 4) if accuracies else 0.0,
        "completed_rounds": engine.state.completed_rounds,
        "aborted_rounds": aborted,
        "abort_reasons": dict(failures),
        "dropped_per_round": dropped,
        "bytes_sent_per_device_round": round(float(np.mean(sent_bytes)), 1) if sent_bytes else None,
        "bytes_sent_per_dropping_device_round": (
            round(float(np.mean(sent_bytes_dropped)), 1) if sent_bytes_dropped else None
        ),
        "bytes_received_per_device_round": round(float(np.mean(received_bytes)), 1)
        if received_bytes
        else None,
        "accuracy_per_round": [round(a, 4) for a in accuracies],
        "clip_bound_per_round": [None if b is None else round(b, 5) for b in clip_bounds],
        "median_update_norm_per_round": [round(n, 5) for n in median_norms],
        "epsilon_per_round": epsilons,
        "message_outcomes": dict(outcomes),
        "diverged_trainings": diverged,
        "seconds": round(time.perf_counter() - started, 2),
    }


# --- report ---------------------------------------------------------------------------------------


def fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def points(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{100.0 * (a - b):+.1f}"


def table(rows: list[dict[str, Any]]) -> list[str]:
    plain = rows[0]
    lines = [
        "run | final acc | acc@10 | acc@20 | acc@30 | mean last 5 | final vs plain (points)"
        " | @10/@20/@30 vs plain | last 5 vs plain | dropped per round | aborted rounds | diverged trainings"
        " | bytes/device/round sent | seconds",
        "--- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | ---",
    ]
    for r in rows:
        at = [r["accuracy_at"].get(str(k)) for k in CHECKPOINTS]
        plain_at = [plain["accuracy_at"].get(str(k)) for k in CHECKPOINTS]
        drops = Counter(r["dropped_per_round"])
        dropped = ", ".join(f"{k} x{v}" for k, v in sorted(drops.items())) or "-"
        lines.append(
            f"{r['label']} | {r['final_accuracy']:.3f} | {' | '.join(fmt(a) for a in at)} | "
            f"{r['mean_accuracy_last_5']:.3f} | "
            f"{'-' if r is plain else points(r['final_accuracy'], plain['final_accuracy'])} | "
            f"{'-' if r is plain else '/'.join(points(a, b) for a, b in zip(at, plain_at, strict=True))} | "
            f"{'-' if r is plain else points(r['mean_accuracy_last_5'], plain['mean_accuracy_last_5'])} | "
            f"{dropped} | {r['aborted_rounds']} | {r['diverged_trainings']} | "
            f"{fmt(r['bytes_sent_per_device_round'], '.0f')} | {r['seconds']:.1f}"
        )
    return lines


def plot(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    """Held-out accuracy per round, one line per run (headless)."""
    import matplotlib  # optional, demo-only dependency (fedge[demo])

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {
        "plain": "tab:gray",
        "secure": "tab:blue",
        "secure-drop2": "tab:orange",
        "secure-dp-eps8": "tab:red",
    }
    styles = {"plain": "-", "secure": "--", "secure-drop2": "-", "secure-dp-eps8": ":"}
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for r in rows:
        acc = r["accuracy_per_round"]
        ax.plot(
            range(1, len(acc) + 1),
            acc,
            label=f"{r['label']} ({r['final_accuracy']:.3f})",
            color=colors.get(r["run"]),
            linestyle=styles.get(r["run"], "-"),
            marker=".",
        )
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy (subjects 8-10)")
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="center right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help=f"JSON (default {DEFAULT_OUT})")
    parser.add_argument("--rounds", type=int, default=None, help="train rounds (default 30; --quick 3)")
    parser.add_argument(
        "--clip-bound", type=float, default=None, help="run 4's clip bound (default: measured, see above)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: 3 rounds, runs 1 and 3")
    cfg = parser.parse_args(argv)
    rounds = cfg.rounds or (3 if cfg.quick else 30)
    specs = [s for s in RUNS if not cfg.quick or s.name in QUICK_RUNS]
    out: Path = cfg.out or (QUICK_OUT if cfg.quick else DEFAULT_OUT)
    # The demo's [rounds] for 7 devices: min_devices (7 + 1) // 2, server learning rate 2.0.
    settings = RoundSettings(
        rounds=rounds, min_devices=4, server_learning_rate=SERVER_LR, wait_for_devices_s=0.0
    )
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    clip: float | None = cfg.clip_bound
    measured: float | None = None
    with tempfile.TemporaryDirectory(prefix="fedge-secacc-") as tmp:
        task = parse_task_spec((ROOT / "tasks" / "har-watch.toml").read_text())
        write_model(build_model(task), Path(tmp))
        world = World(Path(tmp))
        for spec in specs:
            secure: SecureSettings | None = None
            privacy: PrivacyConfig | None = None
            if spec.dp:
                assert clip is not None, "the plain run measures the clip bound first"
                table_settings = PrivacySettings(
                    enabled=True,
                    noise="distributed_discrete_gaussian",
                    epsilon_budget=EPSILON,
                    target_delta=TARGET_DELTA,
                    clip_bound=clip,
                    adaptive_clipping=False,
                    secure_aggregation=True,
                    secure_aggregation_bits=DP_BITS,
                )
                privacy = privacy_config(table_settings, settings)
                secure = secure_settings(table_settings)
            elif spec.secure:
                secure = SecureSettings(bits=BITS, threshold=spec.threshold)
            row = run(world, spec, settings, secure, privacy)
            if spec.name == "plain" and clip is None and row["median_update_norm_per_round"]:
                clip = measured = float(f"{row['median_update_norm_per_round'][0]:.3g}")
            rows.append(row)
            print(
                f"{spec.label}: final {row['final_accuracy']:.3f} after {row['completed_rounds']} rounds "
                f"({row['seconds']:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
    lines = table(rows)
    print("\n".join(lines))
    seconds = round(time.perf_counter() - start, 1)
    plain = rows[0]
    doc = {
        "machine": machine_info(),
        "config": {
            "task": "har-watch",
            "devices": [har_watch.device_id(s) for s in har_watch.TRAIN_SUBJECTS],
            "test_subjects": list(har_watch.TEST_SUBJECTS),
            "rounds": rounds,
            "min_devices": settings.min_devices,
            "server_learning_rate": settings.server_learning_rate,
            "update_norm_ratio": settings.update_norm_ratio,
            "update_norm_adaptive": settings.update_norm_adaptive,
            "drops_per_round": DROPS,
            "drop_after": "secagg_shares",
            "threshold": THRESHOLD,
            "bits": BITS,
            "dp_bits": DP_BITS,
            "epsilon": EPSILON,
            "target_delta": TARGET_DELTA,
            "clip_bound": cfg.clip_bound,
            "clip_bound_measured": measured,
            "drop_seed": DROP_SEED,
            "rounding_seed": ROUNDING_SEED,
            "noise_seed": NOISE_SEED,
            "quick": cfg.quick,
        },
        "results": rows,
        "vs_plain_points": {
            r["run"]: {
                "final": round(100.0 * (r["final_accuracy"] - plain["final_accuracy"]), 2),
                "mean_last_5": round(100.0 * (r["mean_accuracy_last_5"] - plain["mean_accuracy_last_5"]), 2),
                **{
                    str(k): round(100.0 * (r["accuracy_at"][str(k)] - plain["accuracy_at"][str(k)]), 2)
                    for k in CHECKPOINTS
                    if str(k) in r["accuracy_at"] and str(k) in plain["accuracy_at"]
                },
            }
            for r in rows[1:]
        },
        "table": lines,
        "seconds": seconds,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    png = out.with_suffix(".png")
    plot(png, rows, f"har-watch, 7 devices: secure aggregation vs plain FedAvg ({rounds} rounds)")
    print(f"\nwrote {out} and {png} in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
