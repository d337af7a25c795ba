"""Cost of secure aggregation vs plain rounds at N = 10, 50, 100 devices, in one run.

Why this exists: fedge has a pure SecAgg+ core (``fedge.protocol.secagg``,
``docs/secure-aggregation.md``) that is not wired to MQTT yet. Before wiring it, this script
measures what it would cost a device and the aggregator per round, against what a plain round
costs today, for the default task's model (``tasks/har-watch.toml``: MLP 48-64-32-7, 5,447
parameters) and each fleet size N:

1. **bytes per device per round.** Plain: the sealed update frame (a real ``normal(0, 0.01)``
   float32 delta, encoded with the fp32 codec by ``fedge.protocol.messages.encode_update`` and
   sealed by ``fedge.protocol.sealing.seal`` with real X25519 keys, as ``fedge.agent.core``
   does). Secure: every message one device sends (advertisement, share message, masked input,
   unmask response) and receives (advertisement bundle, share delivery, unmask request), as the
   real encoded bytes of a real simulated round; and what the aggregator receives and sends in
   total. The round manifest (plain) and the round config inside it (secure) are the same for
   every device and not counted per device; the config's size is reported apart;
2. **CPU seconds per round**, one thread, ``time.perf_counter`` around every call, per phase and
   in total: each device's work (plain: encode + seal; secure: advertise, shares, quantise +
   mask, unmask answer, with every decode and encode of its messages) and the aggregator's
   (plain: read header + open + decode + average every update; secure: every ``on_*``,
   ``close_*``, decode and encode, and ``finish`` with the dequantised sum);
3. the same with 10 % of the devices dropping (a) after sending their shares and before their
   masked input -- the ones the protocol *recovers* (their mask keys rebuilt, their pairwise
   masks removed: the expensive case) -- and (b) after sending their masked input, before the
   unmask answer (still in the sum, their self-masks rebuilt from shares);
4. the parameters chosen per N (``choose_parameters``: k, t, bits and the bounds reached).

Round wall time over a network cannot be measured without the MQTT integration; the script
reports the **compute-bound** round time instead: per phase, the slowest device plus the
aggregator (devices in parallel, the aggregator serial, no network, no broker).

Validity checks (a failure exits 1): the unmasked secure sum must equal the plain modular sum
of the survivors' quantised updates exactly, its dequantised value must lie within the
quantiser's error bound of the sum of the clipped float updates, and the plain average must
equal the mean of the deltas sent.

Usage: ``python bench/bench_secagg.py [--ns 10,50,100] [--reps 3] [--out bench/results/secagg.json]``
(``make bench``). Exit codes: 0 ran and valid, 1 error or failed validity check, 2 bad options.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from fedge.protocol.codec_names import Codec
from fedge.protocol.messages import Evaluation, decode_update, encode_update
from fedge.protocol.model_manifest import mlp_tensor_layout
from fedge.protocol.sealing import SealedHeader, box_for, open_sealed, read_header, seal
from fedge.protocol.secagg import (
    Advertisement,
    AdvertisementBundle,
    AggregatorSession,
    Deadlines,
    DeviceSession,
    MaskedInput,
    RoundConfig,
    ShareDelivery,
    ShareMessage,
    UnmaskRequest,
    UnmaskResponse,
    choose_parameters,
    new_round_config,
)
from fedge.protocol.task import parse_task_spec

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "secagg.json"
DEFAULT_TASK = ROOT / "tasks" / "har-watch.toml"

FLEET = "bench"
ROUND_ID = "r-1"
#: What a simulated device claims about its local data (as bench/rounds_common.py).
EXAMPLES = 300
TRAIN_LOSS = 0.5
EVALUATION = Evaluation(examples=60, loss=0.6, accuracy=0.8, mse=None)
DELTA_SCALE = 0.01
#: L2 clip bound of the secure round; a 5,447-coordinate normal(0, 0.01) delta has norm ~0.74.
CLIP_NORM = 1.0
BITS = 32
START, PHASE_S = 1_000.0, 10.0
#: A time inside each phase (advertise, share, masked input, unmask) and after the last.
T_ADVERTISE, T_SHARE, T_INPUT, T_UNMASK = (START + PHASE_S * i + 1 for i in range(4))
T_FINISH = START + PHASE_S * 4 + 1

DEVICE_PHASES = ("advertise", "share", "masked_input", "unmask")
AGGREGATOR_PHASES = ("advertise", "share", "masked_input", "unmask", "finish")
SCENARIOS = ("no_dropout", "drop_recovered", "drop_after_input")
SCENARIO_NOTES = {
    "no_dropout": "every device completes every phase",
    "drop_recovered": "10% drop after sending shares, before the masked input: recovered "
    "(mask keys rebuilt from shares, pairwise masks removed)",
    "drop_after_input": "10% drop after sending the masked input, before the unmask answer: in "
    "the sum (self-masks rebuilt from neighbours' shares)",
}
WALL_TIME_NOTE = (
    "round wall time over a network cannot be measured: secure aggregation is not wired to MQTT "
    "yet. compute_bound_round_s = sum over phases of (slowest device + aggregator), devices in "
    "parallel, the aggregator serial, no network, no broker, no deadlines waited for"
)

T = TypeVar("T")


class BenchError(Exception):
    """A validity check failed: the numbers compare different things and must not be trusted."""


@dataclass(frozen=True)
class Config:
    task_path: Path
    out: Path
    ns: tuple[int, ...]
    reps: int
    drop_fraction: float
    seed: int


# --- timing and accounting -----------------------------------------------------------------------


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


@dataclass
class Party:
    """What one party sent, received and spent in one round."""

    sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    received: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    cpu: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def run(self, phase: str, fn: Callable[[], T]) -> T:
        value, seconds = timed(fn)
        self.cpu[phase] += seconds
        return value

    @property
    def bytes_sent(self) -> int:
        return sum(self.sent.values())

    @property
    def bytes_received(self) -> int:
        return sum(self.received.values())

    @property
    def cpu_total(self) -> float:
        return sum(self.cpu.values())


# --- the plain round --------------------------------------------------------------------------------


def plain_round(n: int, layer_sizes: Sequence[int], rng: np.random.Generator) -> dict[str, Any]:
    """Every device encodes and seals a real fp32 update; the aggregator opens and averages."""
    layout = mlp_tensor_layout(layer_sizes)
    count = sum(t.size for t in layout)
    ids = [f"dev-{i:03d}" for i in range(n)]
    aggregator_key = PrivateKey.generate()
    device_keys = {d: PrivateKey.generate() for d in ids}
    # The RoundEngine caches one Box per device across rounds; per round it only decrypts.
    boxes = {d: box_for(aggregator_key, device_keys[d].public_key) for d in ids}
    deltas = {d: rng.normal(0.0, DELTA_SCALE, count).astype(np.float32) for d in ids}
    devices = {d: Party() for d in ids}
    agg = Party()
    frames: dict[str, bytes] = {}
    for counter, d in enumerate(ids):

        def seal_update(d: str = d, counter: int = counter) -> bytes:
            header, body = encode_update(deltas[d], layout, Codec.FP32, EXAMPLES, TRAIN_LOSS, EVALUATION)
            bind = SealedHeader(FLEET, d, ROUND_ID, counter, "update", 0)
            return seal(bind, header, body, device_keys[d], aggregator_key.public_key)

        frames[d] = devices[d].run("update", seal_update)
        devices[d].sent["sealed_update"] = len(frames[d])
        agg.received["sealed_update"] += len(frames[d])

    total = np.zeros(count, dtype=np.float64)
    weight = 0

    def open_one(d: str) -> None:
        nonlocal weight
        header, ciphertext = read_header(frames[d])
        payload_header, body = open_sealed(
            header, ciphertext, aggregator_key, device_keys[d].public_key, box=boxes[d]
        )
        update = decode_update(payload_header, body, layout, Codec.FP32)
        total[:] += update.delta.astype(np.float64) * update.examples
        weight += update.examples

    for d in ids:
        agg.run("open_and_fold", lambda d=d: open_one(d))
    average = agg.run("average", lambda: total / weight)
    expected = np.mean(np.stack([deltas[d].astype(np.float64) for d in ids]), axis=0)
    error = float(np.max(np.abs(average - expected)))
    device_cpu = [p.cpu_total for p in devices.values()]
    frame_bytes = len(frames[ids[0]])
    return {
        "device_bytes_sent": frame_bytes,
        "device_bytes_received": 0,
        "device_bytes_total": frame_bytes,
        "tensor_bytes": 4 * count,
        "envelope_bytes": frame_bytes - 4 * count,
        "aggregator_bytes_received": agg.bytes_received,
        "aggregator_bytes_sent": 0,
        "device_cpu_s": {"update": statistics.fmean(device_cpu), "total": statistics.fmean(device_cpu)},
        "device_cpu_s_max": max(device_cpu),
        "aggregator_cpu_s": {**dict(agg.cpu), "total": agg.cpu_total},
        "compute_bound_round_s": max(device_cpu) + agg.cpu_total,
        "average_max_abs_error": error,
        "valid": error < 1e-6,
    }


# --- the secure round -------------------------------------------------------------------------------


def secure_round(
    n: int, vector_length: int, scenario: str, drop_fraction: float, rng: np.random.Generator
) -> dict[str, Any]:
    """One whole SecAgg+ round with real keys and randomness, every message encoded and decoded."""
    ids = [f"dev-{i:03d}" for i in range(n)]
    config = new_round_config(
        ROUND_ID,
        ids,
        vector_length=vector_length,
        clip_norm=CLIP_NORM,
        deadlines=Deadlines.every(START, PHASE_S),
        bits=BITS,
    )
    identity = {d: SigningKey.generate() for d in ids}
    verify_keys = {d: k.verify_key for d, k in identity.items()}
    sessions = {d: DeviceSession(config, d, identity[d], verify_keys) for d in ids}
    aggregator = AggregatorSession(config, verify_keys)
    updates = {d: rng.normal(0.0, DELTA_SCALE, vector_length).astype(np.float32) for d in ids}
    device_rngs = {d: np.random.default_rng(rng.integers(2**63)) for d in ids}
    dropped = drop_set(ids, scenario, drop_fraction, rng)
    quantiser = config.quantiser
    quantised: dict[str, np.ndarray] = {}
    devices = {d: Party() for d in ids}
    agg = Party()

    # 1. advertise
    for d in ids:
        data = devices[d].run("advertise", lambda d=d: sessions[d].advertise(T_ADVERTISE).encode())
        devices[d].sent["advertisement"] = len(data)
        agg.received["advertisement"] += len(data)
        agg.run(
            "advertise",
            lambda data=data: aggregator.on_advertisement(Advertisement.decode(data), T_ADVERTISE),
        )
    bundles = agg.run("advertise", lambda: encode_all(aggregator.close_advertising(T_SHARE)))

    # 2. shares
    for d, data in bundles.items():
        agg.sent["advertisement_bundle"] += len(data)
        devices[d].received["advertisement_bundle"] = len(data)

        def share(d: str = d, data: bytes = data) -> bytes:
            bundle = AdvertisementBundle.decode(data, config)
            return sessions[d].on_advertisements(bundle, T_SHARE).encode()

        out = devices[d].run("share", share)
        devices[d].sent["share_message"] = len(out)
        agg.received["share_message"] += len(out)
        agg.run("share", lambda out=out: aggregator.on_shares(ShareMessage.decode(out, config), T_SHARE))
    deliveries = agg.run("share", lambda: encode_all(aggregator.close_sharing(T_INPUT)))

    # 3. masked inputs
    for d, data in deliveries.items():
        agg.sent["share_delivery"] += len(data)
        devices[d].received["share_delivery"] = len(data)
        if d in dropped["before_input"]:
            continue  # received its delivery, then went away

        def mask(d: str = d, data: bytes = data) -> bytes:
            sessions[d].on_shares(ShareDelivery.decode(data, config), T_INPUT)
            quantised[d] = quantiser.quantise(updates[d], device_rngs[d])
            return sessions[d].mask(quantised[d], T_INPUT).encode(config.bits)

        out = devices[d].run("masked_input", mask)
        devices[d].sent["masked_input"] = len(out)
        agg.received["masked_input"] += len(out)
        agg.run(
            "masked_input",
            lambda out=out: aggregator.on_masked_input(MaskedInput.decode(out, config), T_INPUT),
        )
    requests = agg.run("masked_input", lambda: encode_all(aggregator.close_masked_input(T_UNMASK)))

    # 4. unmask
    for d, data in requests.items():
        agg.sent["unmask_request"] += len(data)
        devices[d].received["unmask_request"] = len(data)
        if d in dropped["after_input"]:
            continue

        def answer(d: str = d, data: bytes = data) -> bytes:
            request = UnmaskRequest.decode(data, config)
            return sessions[d].on_unmask_request(request, T_UNMASK).encode()

        out = devices[d].run("unmask", answer)
        devices[d].sent["unmask_response"] = len(out)
        agg.received["unmask_response"] += len(out)
        agg.run(
            "unmask",
            lambda out=out: aggregator.on_unmask_response(UnmaskResponse.decode(out, config), T_UNMASK),
        )

    def finish() -> tuple[Any, np.ndarray]:
        result = aggregator.finish(T_FINISH)
        return result, result.dequantised(config)

    result, float_sum = agg.run("finish", finish)
    return summarise_secure(config, scenario, dropped, devices, agg, result, float_sum, quantised, updates)


def drop_set(
    ids: Sequence[str], scenario: str, fraction: float, rng: np.random.Generator
) -> dict[str, frozenset[str]]:
    count = max(1, round(len(ids) * fraction))
    chosen = frozenset(str(d) for d in rng.choice(list(ids), size=count, replace=False))
    return {
        "before_input": chosen if scenario == "drop_recovered" else frozenset(),
        "after_input": chosen if scenario == "drop_after_input" else frozenset(),
    }


def encode_all(messages: dict[str, Any]) -> dict[str, bytes]:
    return {d: message.encode() for d, message in messages.items()}


def summarise_secure(
    config: RoundConfig,
    scenario: str,
    dropped: dict[str, frozenset[str]],
    devices: dict[str, Party],
    agg: Party,
    result: Any,
    float_sum: np.ndarray,
    quantised: dict[str, np.ndarray],
    updates: dict[str, np.ndarray],
) -> dict[str, Any]:
    gone = dropped["before_input"] | dropped["after_input"]
    full = [devices[d] for d in config.device_ids if d not in gone]  # did every phase
    # Validity: the unmasked sum equals the plain modular sum of the survivors' quantised updates.
    expected_survivors = sorted(set(config.device_ids) - dropped["before_input"])
    plain_sum = np.zeros(config.vector_length, dtype=np.uint64)
    for d in expected_survivors:
        plain_sum += quantised[d]
    plain_sum &= np.uint64((1 << config.bits) - 1)
    exact = bool(np.array_equal(result.total, plain_sum))
    clipped_sum = np.sum(
        [
            np.asarray(updates[d], np.float64) * min(1.0, CLIP_NORM / float(np.linalg.norm(updates[d])))
            for d in expected_survivors
        ],
        axis=0,
    )
    float_error = float(np.max(np.abs(float_sum - clipped_sum)))
    bound = config.quantiser.error_bound(len(expected_survivors))
    survivors_ok = sorted(result.survivors) == expected_survivors and sorted(result.recovered) == sorted(
        dropped["before_input"]
    )

    def per_phase(
        parties: Sequence[Party], phases: Sequence[str], how: Callable[[list[float]], float]
    ) -> dict[str, float]:
        out = {p: how([x.cpu.get(p, 0.0) for x in parties]) for p in phases}
        out["total"] = how([x.cpu_total for x in parties])
        return out

    device_sent = [p.bytes_sent for p in full]
    device_received = [p.bytes_received for p in full]
    slowest = per_phase(list(devices.values()), DEVICE_PHASES, max)
    compute_bound = sum(slowest[p] for p in DEVICE_PHASES) + agg.cpu_total
    kinds_sent = {k: statistics.fmean([p.sent.get(k, 0) for p in full]) for k in full[0].sent}
    kinds_received = {k: statistics.fmean([p.received.get(k, 0) for p in full]) for k in full[0].received}
    return {
        "scenario": scenario,
        "dropped": len(gone),
        "survivors": len(result.survivors),
        "recovered": len(result.recovered),
        "device_bytes_sent": statistics.fmean(device_sent),
        "device_bytes_received": statistics.fmean(device_received),
        "device_bytes_total": statistics.fmean(
            [s + r for s, r in zip(device_sent, device_received, strict=True)]
        ),
        "device_bytes_total_max": max(s + r for s, r in zip(device_sent, device_received, strict=True)),
        "device_bytes_sent_by_message": kinds_sent,
        "device_bytes_received_by_message": kinds_received,
        "aggregator_bytes_received": agg.bytes_received,
        "aggregator_bytes_sent": agg.bytes_sent,
        "aggregator_bytes_by_message": {**dict(agg.received), **dict(agg.sent)},
        "device_cpu_s": per_phase(full, DEVICE_PHASES, statistics.fmean),
        "device_cpu_s_max": slowest["total"],
        "aggregator_cpu_s": {**{p: agg.cpu.get(p, 0.0) for p in AGGREGATOR_PHASES}, "total": agg.cpu_total},
        "compute_bound_round_s": compute_bound,
        "sum_exact": exact,
        "survivor_sets_ok": survivors_ok,
        "dequantised_max_abs_error": float_error,
        "dequantised_error_bound": bound,
        "valid": exact and survivors_ok and float_error < bound,
    }


# --- driver ---------------------------------------------------------------------------------------------


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The first run's bytes and checks, every CPU figure the median over the runs."""
    out = dict(runs[0])
    for key in ("device_cpu_s", "aggregator_cpu_s"):
        out[key] = {p: statistics.median(r[key][p] for r in runs) for p in runs[0][key]}
    for key in ("device_cpu_s_max", "compute_bound_round_s"):
        out[key] = statistics.median(r[key] for r in runs)
    out["valid"] = all(r["valid"] for r in runs)
    out["bytes_constant_across_reps"] = all(
        r["device_bytes_total"] == runs[0]["device_bytes_total"]
        and r["aggregator_bytes_received"] == runs[0]["aggregator_bytes_received"]
        for r in runs
    )
    out["reps"] = len(runs)
    return out


def repeat(reps: int, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    runs = []
    for _ in range(reps):
        gc.collect()
        gc.disable()
        try:
            runs.append(fn())
        finally:
            gc.enable()
    return median_run(runs)


def ratios(plain: dict[str, Any], secure: dict[str, Any]) -> dict[str, float]:
    return {
        "device_bytes": secure["device_bytes_total"] / plain["device_bytes_total"],
        "aggregator_bytes": (secure["aggregator_bytes_received"] + secure["aggregator_bytes_sent"])
        / plain["aggregator_bytes_received"],
        "device_cpu": secure["device_cpu_s"]["total"] / plain["device_cpu_s"]["total"],
        "aggregator_cpu": secure["aggregator_cpu_s"]["total"] / plain["aggregator_cpu_s"]["total"],
        "compute_bound_round": secure["compute_bound_round_s"] / plain["compute_bound_round_s"],
    }


def parameters(n: int, vector_length: int) -> dict[str, Any]:
    chosen = choose_parameters(n)
    probe = new_round_config(
        ROUND_ID,
        [f"dev-{i:03d}" for i in range(n)],
        vector_length=vector_length,
        clip_norm=CLIP_NORM,
        deadlines=Deadlines.every(START, PHASE_S),
        bits=BITS,
    )
    return {
        "k": chosen.degree,
        "t": chosen.threshold,
        "bits": BITS,
        "complete_graph": chosen.complete,
        "dropouts_tolerated_per_neighbourhood": chosen.degree - chosen.threshold,
        "security_log2": chosen.security_log2,
        "correctness_log2": chosen.correctness_log2,
        "meets_targets": chosen.meets_targets,
        "clip_norm": CLIP_NORM,
        "quantiser_scale": probe.quantiser.scale,
        "round_config_bytes": len(probe.encode()),
    }


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for package in ("numpy", "pynacl"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "versions": versions,
    }


def run(cfg: Config) -> dict[str, Any]:
    task = parse_task_spec(cfg.task_path.read_text(encoding="utf-8"))
    layer_sizes = task.layer_sizes
    count = sum(t.size for t in mlp_tensor_layout(layer_sizes))
    rng = np.random.default_rng(cfg.seed)
    results: dict[str, Any] = {}
    for n in cfg.ns:
        print(f"[N={n}] plain ...", flush=True)
        entry: dict[str, Any] = {"parameters": parameters(n, count)}
        entry["plain"] = repeat(cfg.reps, lambda n=n: plain_round(n, layer_sizes, rng))
        entry["secure"] = {}
        entry["ratios"] = {}
        for scenario in SCENARIOS:
            print(f"[N={n}] secure, {scenario} ...", flush=True)
            started = time.perf_counter()
            secure = repeat(
                cfg.reps,
                lambda n=n, scenario=scenario: secure_round(n, count, scenario, cfg.drop_fraction, rng),
            )
            secure["wall_s_all_reps"] = time.perf_counter() - started
            entry["secure"][scenario] = secure
            entry["ratios"][scenario] = ratios(entry["plain"], secure)
        results[str(n)] = entry
    return {
        "benchmark": "secagg",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "task": str(cfg.task_path.relative_to(ROOT) if cfg.task_path.is_relative_to(ROOT) else cfg.task_path),
        "layer_sizes": list(layer_sizes),
        "parameter_count": count,
        "codec_plain": Codec.FP32.value,
        "reps": cfg.reps,
        "drop_fraction": cfg.drop_fraction,
        "timing": "time.perf_counter around every call, one thread, gc off inside a round; "
        "CPU figures are medians over reps; device figures are means over the devices "
        "that did every phase (max = slowest device)",
        "scenarios": SCENARIO_NOTES,
        "wall_time_note": WALL_TIME_NOTE,
        "not_counted": "the round manifest (plain) / round config in it (secure, size in "
        "parameters.round_config_bytes); the transport envelope of the secure messages "
        "(they are not sealed or framed yet: the integration adds roughly the plain "
        "envelope_bytes to each of the 7 per-device messages)",
        "results": results,
    }


# --- output -----------------------------------------------------------------------------------------------


def kb(value: float) -> str:
    return f"{value / 1000:,.1f} kB"


def ms(value: float) -> str:
    return f"{value * 1000:,.1f}"


def print_tables(report: dict[str, Any]) -> None:
    print()
    print(f"model {'-'.join(map(str, report['layer_sizes']))}: {report['parameter_count']:,} parameters")
    print()
    header = (
        f"{'N':>4} {'k':>4} {'t':>4} {'bits':>4}  {'scenario':<17} {'dev bytes':>11} {'x':>6} "
        f"{'agg bytes':>11} {'x':>6} {'dev ms':>8} {'x':>6} {'agg ms':>9} {'x':>6} {'bound ms':>9} {'x':>6}"
    )
    print(header)
    print("-" * len(header))
    for n, entry in report["results"].items():
        p = entry["parameters"]
        plain = entry["plain"]
        prefix = f"{n:>4} {p['k']:>4} {p['t']:>4} {p['bits']:>4}"
        print(
            f"{prefix}  {'plain':<17} {kb(plain['device_bytes_total']):>11} {'':>6} "
            f"{kb(plain['aggregator_bytes_received']):>11} {'':>6} "
            f"{ms(plain['device_cpu_s']['total']):>8} {'':>6} "
            f"{ms(plain['aggregator_cpu_s']['total']):>9} {'':>6} "
            f"{ms(plain['compute_bound_round_s']):>9} {'':>6}"
        )
        for scenario, s in entry["secure"].items():
            r = entry["ratios"][scenario]
            agg_bytes = s["aggregator_bytes_received"] + s["aggregator_bytes_sent"]
            print(
                f"{'':>19}  {'secure ' + scenario.replace('drop_', ''):<17} "
                f"{kb(s['device_bytes_total']):>11} "
                f"{r['device_bytes']:>5.1f}x {kb(agg_bytes):>11} {r['aggregator_bytes']:>5.1f}x "
                f"{ms(s['device_cpu_s']['total']):>8} {r['device_cpu']:>5.0f}x "
                f"{ms(s['aggregator_cpu_s']['total']):>9} {r['aggregator_cpu']:>5.0f}x "
                f"{ms(s['compute_bound_round_s']):>9} {r['compute_bound_round']:>5.0f}x"
            )
    print()
    print("per phase, secure (ms, device mean / aggregator):")
    for n, entry in report["results"].items():
        for scenario, s in entry["secure"].items():
            d, a = s["device_cpu_s"], s["aggregator_cpu_s"]
            phases = " ".join(f"{p}={ms(d[p])}/{ms(a[p])}" for p in DEVICE_PHASES)
            print(f"  N={n:<4} {scenario:<17} {phases} finish=-/{ms(a['finish'])}")
    print()
    print(
        "dev bytes = sent + received by one device per round; agg bytes = sent + received by the aggregator"
    )
    print("dev ms / agg ms = CPU per round (one thread); bound ms = compute-bound round time")
    print(f"note: {WALL_TIME_NOTE}")


def check(report: dict[str, Any]) -> list[str]:
    failures = []
    for n, entry in report["results"].items():
        if not entry["plain"]["valid"]:
            failures.append(f"N={n} plain: the average differs from the mean of the deltas sent")
        for scenario, s in entry["secure"].items():
            if not s["valid"]:
                failures.append(
                    f"N={n} {scenario}: sum_exact={s['sum_exact']} survivor_sets_ok={s['survivor_sets_ok']} "
                    f"error={s['dequantised_max_abs_error']:.3g} bound={s['dequantised_error_bound']:.3g}"
                )
    return failures


def parse_ns(text: str) -> tuple[int, ...]:
    try:
        ns = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not ns or any(n < 3 or n > 1000 for n in ns):
        raise argparse.ArgumentTypeError("each N must be in 3..1000")
    return ns


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", type=Path, default=DEFAULT_TASK)
    parser.add_argument("--ns", type=parse_ns, default=(10, 50, 100), help="fleet sizes, e.g. 10,50,100")
    parser.add_argument("--reps", type=int, default=3, help="rounds per N and scenario (median)")
    parser.add_argument("--drop-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.reps < 1 or not 0.0 < args.drop_fraction < 0.5:
        parser.error("--reps must be >= 1 and --drop-fraction in (0, 0.5)")
    cfg = Config(args.task.resolve(), args.out, args.ns, args.reps, args.drop_fraction, args.seed)
    started = time.perf_counter()
    try:
        report = run(cfg)
    except Exception:  # any failure makes the numbers meaningless
        traceback.print_exc()
        return 1
    report["bench_wall_s"] = time.perf_counter() - started
    failures = check(report)
    report["validity_failures"] = failures
    report["passed"] = not failures
    print_tables(report)
    try:
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        cfg.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        print(f"cannot write {cfg.out}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {cfg.out} ({report['bench_wall_s']:.0f} s)")
    for failure in failures:
        print(f"VALIDITY FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
