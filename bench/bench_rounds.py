"""The cost of fedge's federated rounds themselves: round overhead, aggregator throughput and
memory, and bytes per update -- with training taken out.

Why this exists: fedge claims its protocol (signed manifests, NaCl-sealed updates over MQTT,
streaming FedAvg) adds little to a round beyond the devices' training, that the aggregator's
memory does not grow with the number of devices, and that its codecs shrink updates. This
script measures those claims in one run, with the real har-watch model (5,447 parameters), a
real Mosquitto broker and real crypto:

1. round overhead for N = 10, 50, 100 devices: the real aggregator (``fedge aggregator run``
   in a fresh process) against N light simulated devices (``bench/mqtt_sim.py``: verify the
   manifest, random delta, encode, seal, publish QoS 1 -- no training), from one manifest's
   arrival to the next; its peak RSS and the broker's;
2. aggregator throughput: sealed updates per second through ``RoundEngine.handle`` (every
   check, decryption, decoding, streaming FedAvg), in-process with pre-sealed messages, with
   decryption alone as the floor, on the wall clock and in the thread's CPU time (the machine
   may be shared; target: 25,000 fp32 updates per CPU-second from N = 100 up); and the engine's
   peak RSS in fresh processes for up to thousands of devices (flat if aggregation streams);
3. bytes per update for the fp32, fp16 and int8 codecs, against the same delta written the
   naive way (``numpy.save``, pickle, JSON) as the in-run baseline.

A failed validity check (a round not aggregated from every device, a byte count that does not
match, an RSS reading that is someone else's) is a real error (exit 1); a missed target is
only reported (exit 0).

Usage: ``python bench/bench_rounds.py [--out bench/results/rounds.json]`` (``make bench``);
``bench/rounds_report.py`` turns the JSON into docs/benchmarks.md's tables.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import itertools
import json
import math
import os
import pickle
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench_training import LAUNCHER, _version, machine_info

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "rounds_worker.py"
OBSERVER = Path(__file__).resolve().parent / "rounds_observer.py"
DEFAULT_OUT = ROOT / "bench" / "results" / "rounds.json"
DEFAULT_TASK = ROOT / "tasks" / "har-watch.toml"

MODEL_BUILD_TIMEOUT_S = 240.0
WORKER_TIMEOUT_S = 180.0
#: The longest one N's federated run (all its rounds) may take before it counts as hung.
ROUNDS_TIMEOUT_S = 120.0
AGGREGATOR_EXIT_TIMEOUT_S = 30.0
OBSERVER_READY_TIMEOUT_S = 15.0
MB = 1_000_000
#: The streaming claim: from the smallest to the largest engine run, peak RSS grows by less than
#: this share of what keeping every fp32 delta until the round closes would add.
TARGET_RSS_GROWTH_SHARE = 0.10
#: The aggregator's throughput claim (issue 18): sealed fp32 updates of the default model handled
#: per second of one core's CPU time, at every N from this many devices up.
TARGET_UPDATES_PER_CORE_S = 25_000
TARGET_THROUGHPUT_MIN_DEVICES = 100


class BenchError(Exception):
    """Something went wrong that makes the numbers meaningless (not a missed target)."""


# --- configuration -------------------------------------------------------------------------


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


@dataclass(frozen=True)
class Config:
    task_path: Path
    out: Path
    devices: tuple[int, ...] = (10, 50, 100)
    rounds: int = 7
    codec: str = "fp32"
    engine_devices: tuple[int, ...] = (10, 100, 1000)
    rss_devices: tuple[int, ...] = (100, 1000, 5000)
    rss_rounds: int = 2
    messages_per_rep: int = 400
    reps: int = 5
    seed: int = 0


def parse_args(argv: Sequence[str] | None) -> Config:
    from fedge.protocol.codec import Codec

    parser = argparse.ArgumentParser(
        description="Benchmark fedge's rounds: overhead over Mosquitto, aggregator throughput and "
        "memory, bytes per update (see docs/benchmarks.md)."
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    parser.add_argument("--task", type=Path, default=DEFAULT_TASK, help="task spec (default har-watch)")
    parser.add_argument(
        "--devices",
        type=_int_list,
        default=(10, 50, 100),
        help="fleet sizes for the rounds over MQTT (default 10,50,100)",
    )
    parser.add_argument("--rounds", type=int, default=7, help="train rounds per fleet size (default 7)")
    parser.add_argument(
        "--codec",
        choices=[c.value for c in Codec],
        default=Codec.FP32.value,
        help="codec of the rounds over MQTT (default fp32)",
    )
    parser.add_argument(
        "--engine-devices",
        type=_int_list,
        default=(10, 100, 1000),
        help="devices per round for the in-process throughput (default 10,100,1000)",
    )
    parser.add_argument(
        "--rss-devices",
        type=_int_list,
        default=(100, 1000, 5000),
        help="devices for the fresh-process engine RSS runs (default 100,1000,5000)",
    )
    parser.add_argument(
        "--reps", type=int, default=5, help="timed repetitions per throughput cell (default 5)"
    )
    parser.add_argument(
        "--messages", type=int, default=400, help="sealed updates per throughput repetition (default 400)"
    )
    args = parser.parse_args(argv)
    for name in ("rounds", "reps", "messages"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    return Config(
        task_path=args.task,
        out=args.out,
        devices=args.devices,
        rounds=args.rounds,
        codec=args.codec,
        engine_devices=args.engine_devices,
        rss_devices=args.rss_devices,
        messages_per_rep=args.messages,
        reps=args.reps,
    )


# --- fresh processes -----------------------------------------------------------------------


def _kill_group(proc: subprocess.Popen[Any], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def start_worker(args: Sequence[str], stderr_path: Path) -> subprocess.Popen[str]:
    """``rounds_worker.py`` through the launcher (its ``ru_maxrss`` is then its own), own session."""
    cmd = [sys.executable, "-I", "-c", LAUNCHER, str(WORKER), *args]
    with stderr_path.open("ab") as err:
        return subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True
        )


def finish_worker(
    proc: subprocess.Popen[str], what: str, timeout: float, stderr_path: Path
) -> dict[str, Any]:
    """Waits (bounded) for a worker and returns its JSON; a hang is SIGTERMed, then SIGKILLed."""
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_worker(proc)
        raise BenchError(f"{what} took longer than {timeout:.0f}s; log tail:\n{_tail(stderr_path)}") from None
    if proc.returncode != 0:
        raise BenchError(f"{what} failed (exit {proc.returncode}); log tail:\n{_tail(stderr_path)}")
    lines = [line for line in stdout.splitlines() if line.strip()]
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise BenchError(f"{what} printed no JSON result; stdout was: {stdout[-500:]!r}") from None
    return result


def stop_worker(proc: subprocess.Popen[str]) -> None:
    """SIGTERM to the process's group (the aggregator stops cleanly on it), then SIGKILL.

    A process that already exited and was reaped is left alone: its group id may be reused.
    """
    if proc.poll() is not None:
        return
    _kill_group(proc, signal.SIGTERM)
    try:
        proc.communicate(timeout=10.0)
        return
    except subprocess.TimeoutExpired:
        pass
    if proc.returncode is None:
        _kill_group(proc, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=10.0)


def start_observer(
    broker: Any, fleet: str, verify_key_text: str, log: Path, timeout: float = ROUNDS_TIMEOUT_S
) -> subprocess.Popen[str]:
    """``rounds_observer.py`` in its own process; returns once it is subscribed (bounded).
    ``timeout``: how long it waits for the final manifest."""
    cmd = [
        sys.executable,
        str(OBSERVER),
        "--host",
        broker.host,
        "--port",
        str(broker.port),
        "--fleet",
        fleet,
        "--verify-key",
        verify_key_text,
        "--timeout",
        str(timeout),
    ]
    with log.open("ab") as err:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True
        )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], OBSERVER_READY_TIMEOUT_S)
    line = proc.stdout.readline().strip() if ready else ""
    if line != "ready":
        stop_worker(proc)
        raise BenchError(f"the round observer did not get ready ({line!r}); log tail:\n{_tail(log)}")
    return proc


def finish_observer(proc: subprocess.Popen[str], n: int, log: Path) -> dict[str, Any]:
    try:
        stdout, _ = proc.communicate(timeout=10.0)
    except subprocess.TimeoutExpired:
        stop_worker(proc)
        raise BenchError(f"N={n}: the round observer did not finish") from None
    lines = [line for line in stdout.splitlines() if line.strip()]
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise BenchError(f"N={n}: the round observer printed no JSON; log tail:\n{_tail(log)}") from None
    if proc.returncode != 0 or result["errors"]:
        raise BenchError(
            f"N={n}: the round observer failed (exit {proc.returncode}): "
            f"{result['errors'] or 'no final manifest'}"
        )
    return result


def run_worker(args: Sequence[str], what: str, log_dir: Path) -> dict[str, Any]:
    stderr_path = log_dir / f"{what.replace(' ', '-')}.log"
    proc = start_worker(args, stderr_path)
    try:
        return finish_worker(proc, what, WORKER_TIMEOUT_S, stderr_path)
    finally:
        stop_worker(proc)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def proc_status_bytes(pid: int | None, field_name: str) -> int | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def mosquitto_version(exe: Path) -> str | None:
    try:
        out = subprocess.run([str(exe), "-h"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = (out.stdout or out.stderr).strip().splitlines()
    return first[0].removeprefix("mosquitto version ").strip() if first else None


# --- 1. the model ----------------------------------------------------------------------------


def build_model_dir(task_path: Path, out: Path, log_dir: Path) -> dict[str, Any]:
    """``fedge model build`` in a subprocess, so TensorFlow never enters this process."""
    cmd = [
        sys.executable,
        "-m",
        "fedge.cli",
        "model",
        "build",
        "--task",
        str(task_path),
        "--out",
        str(out),
        "--json",
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    log = log_dir / "model-build.log"
    with log.open("ab") as err:
        try:
            done = subprocess.run(
                cmd,
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                timeout=MODEL_BUILD_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise BenchError(f"fedge model build took longer than {MODEL_BUILD_TIMEOUT_S:.0f}s") from None
    if done.returncode != 0:
        raise BenchError(f"fedge model build failed (exit {done.returncode}):\n{_tail(log)}")
    summary: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return summary


# --- 2. bytes per update ------------------------------------------------------------------------


def mqtt5_publish_bytes(topic: str, payload_bytes: int) -> int:
    """Size of an MQTT 5 QoS 1 PUBLISH without properties: what the update costs on the wire."""
    remaining = 2 + len(topic.encode()) + 2 + 1 + payload_bytes  # topic, packet id, properties length
    varint = 1 if remaining < 128 else 2 if remaining < 16_384 else 3 if remaining < 2_097_152 else 4
    return 1 + varint + remaining


def update_sizes(loaded: Any, seed: int) -> dict[str, Any]:
    import numpy as np
    from nacl.public import PrivateKey

    from fedge.protocol.codec import Codec, encode_tensors
    from fedge.protocol.topics import FleetTopics
    from rounds_common import EVALUATION, EXAMPLES, TRAIN_LOSS, random_delta, sealed_update

    m = loaded.manifest
    delta = random_delta(np.random.default_rng(seed), m.parameter_count)
    device, agg = PrivateKey.generate(), PrivateKey.generate()
    topic = FleetTopics("bench").update("dev-000")
    raw_fp32 = 4 * m.parameter_count
    codecs: dict[str, Any] = {}
    for codec in (Codec.FP32, Codec.FP16, Codec.INT8):  # the dense codecs (top-k: bench_codecs)
        body = encode_tensors(delta, m.layout, codec)
        sealed = sealed_update(
            fleet="bench",
            device_id="dev-000",
            round_id="r0001-v2",
            version=2,
            counter=1,
            delta=delta,
            layout=m.layout,
            codec=codec,
            device_key=device,
            aggregator_public=agg.public_key,
        )
        codecs[codec.value] = {
            "tensor_bytes": len(body),
            "sealed_bytes": len(sealed),
            "envelope_bytes": len(sealed) - len(body),
            "mqtt5_publish_bytes": mqtt5_publish_bytes(topic, len(sealed)),
        }
    # A device's own protocol work per round, one device alone (no simulator contention).
    for codec in (Codec.FP32, Codec.FP16, Codec.INT8):  # the dense codecs (top-k: bench_codecs)
        codecs[codec.value]["device_encode_seal_us"] = _median_us(
            lambda c=codec: sealed_update(
                fleet="bench",
                device_id="dev-000",
                round_id="r0001-v2",
                version=2,
                counter=1,
                delta=delta,
                layout=m.layout,
                codec=c,
                device_key=device,
                aggregator_public=agg.public_key,
            )
        )
    fp32_sealed = codecs["fp32"]["sealed_bytes"]
    for c in codecs.values():
        c["ratio_vs_fp32_sealed"] = c["sealed_bytes"] / fp32_sealed
        c["ratio_vs_raw_float32"] = c["sealed_bytes"] / raw_fp32
    # The naive baseline: the same delta as a quick implementation would ship it (no encryption,
    # no authentication). Only sizes -- nothing is ever unpickled.
    buf = io.BytesIO()
    np.save(buf, delta)
    evaluation = EVALUATION.to_dict()
    meta = {"examples": EXAMPLES, "train_loss": TRAIN_LOSS, "evaluation": evaluation}
    naive = {
        "numpy_save": len(buf.getvalue()),
        "pickle_ndarray": len(pickle.dumps(delta)),
        "pickle_dict_with_metadata": len(pickle.dumps({"delta": delta, **meta})),
        "json_float_list": len(json.dumps({"delta": delta.tolist(), **meta}).encode()),
    }
    return {
        "parameter_count": m.parameter_count,
        "tensors": len(m.layout),
        "device_manifest_us": manifest_costs(loaded),
        "raw_float32_bytes": raw_fp32,
        "ids": {"fleet": "bench", "device": "dev-000", "round": "r0001-v2", "topic": topic},
        "codecs": codecs,
        "naive": {
            name: {
                "bytes": size,
                "ratio_vs_fp32_sealed": size / fp32_sealed,
                "ratio_vs_int8_sealed": size / codecs["int8"]["sealed_bytes"],
            }
            for name, size in naive.items()
        },
        "pickle_protocol": pickle.DEFAULT_PROTOCOL,
    }


def _median_us(call: Any, calls: int = 200, reps: int = 5) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter_ns()
        for _ in range(calls):
            call()
        times.append((time.perf_counter_ns() - start) / calls / 1e3)
    return statistics.median(times)


def manifest_costs(loaded: Any, n_selected: int = 100) -> dict[str, Any]:
    """What a device spends on a signed manifest (N=100 selected): verify, then parse."""
    from nacl.public import PrivateKey
    from nacl.signing import SigningKey

    from fedge.protocol.codec import Codec
    from fedge.protocol.round_manifest import round_manifest_from_dict
    from fedge.protocol.signing import DocType, key_id, verify_document
    from rounds_common import device_ids, make_engine

    keys = {d: PrivateKey.generate().public_key for d in device_ids(n_selected)}
    signing = SigningKey.generate()
    eng = make_engine(loaded, Codec.FP32, keys, PrivateKey.generate(), signing)
    frame = eng.open_round(time.time()).manifest_frame
    trusted = {key_id(signing.verify_key): signing.verify_key}
    doc, _ = verify_document(frame, DocType.ROUND_MANIFEST, trusted)
    return {
        "selected_devices": n_selected,
        "frame_bytes": len(frame),
        "verify_us": _median_us(lambda: verify_document(frame, DocType.ROUND_MANIFEST, trusted)),
        "parse_us": _median_us(lambda: round_manifest_from_dict(doc)),
    }


# --- 3. engine throughput, in-process ------------------------------------------------------------


def engine_throughput(loaded: Any, n: int, codec_name: str, cfg: Config, state_dir: Path) -> dict[str, Any]:
    """Updates per second through ``RoundEngine.handle``, messages sealed before the clock starts."""
    import numpy as np
    from nacl.public import Box, PrivateKey
    from nacl.signing import SigningKey

    from fedge.aggregator.checkpoint import save_checkpoint
    from fedge.aggregator.service import checkpoint_from_state
    from fedge.protocol.codec import Codec
    from fedge.protocol.sealing import read_header
    from rounds_common import device_ids, make_engine, random_delta, sealed_update

    codec = Codec(codec_name)
    ids = device_ids(n)
    keys = {d: PrivateKey.generate() for d in ids}
    box_key, signing_key = PrivateKey.generate(), SigningKey.generate()
    eng = make_engine(loaded, codec, {d: k.public_key for d, k in keys.items()}, box_key, signing_key)
    rng = np.random.default_rng([cfg.seed, n])
    rounds_per_rep = math.ceil(cfg.messages_per_rep / n)
    state_dir.mkdir(parents=True, exist_ok=True)
    rep_us: list[float] = []
    rep_cpu_us: list[float] = []
    open_ms: list[float] = []
    close_ms: list[float] = []
    checkpoint_ms: list[float] = []
    rejected: dict[str, int] = {}
    msgs: list[tuple[str, bytes]] = []
    status_bytes = 0
    for _ in range(cfg.reps):
        elapsed_ns = 0
        cpu_ns = 0
        count = 0
        for _ in range(rounds_per_rep):
            t = time.perf_counter()
            m = eng.open_round(time.time()).manifest
            open_ms.append((time.perf_counter() - t) * 1e3)
            msgs = [
                (
                    eng.topics.update(d),
                    sealed_update(
                        fleet=eng.fleet,
                        device_id=d,
                        round_id=m.round_id,
                        version=m.version,
                        counter=m.version,
                        delta=random_delta(rng, loaded.manifest.parameter_count),
                        layout=m.model_manifest.layout,
                        codec=codec,
                        device_key=keys[d],
                        aggregator_public=box_key.public_key,
                    ),
                )
                for d in ids
            ]
            now = time.time()
            gc.collect()
            gc.disable()
            try:
                start, start_cpu = time.perf_counter_ns(), time.thread_time_ns()
                outcomes = [eng.handle(topic, frame, now) for topic, frame in msgs]
                cpu_ns += time.thread_time_ns() - start_cpu
                elapsed_ns += time.perf_counter_ns() - start
            finally:
                gc.enable()
            count += len(msgs)
            for o in outcomes:
                if not o.accepted:
                    rejected[o.reason] = rejected.get(o.reason, 0) + 1
            status_bytes = len(json.dumps(eng.status(now)).encode())
            t = time.perf_counter()
            eng.close_round()
            close_ms.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            save_checkpoint(state_dir / "checkpoint.bin", checkpoint_from_state(eng.snapshot()))
            checkpoint_ms.append((time.perf_counter() - t) * 1e3)
        rep_us.append(elapsed_ns / count / 1e3)
        rep_cpu_us.append(cpu_ns / count / 1e3)
    # The floor: decryption alone, with a Box made per message (what open_sealed does without a
    # cached Box) and with one Box per device made once (the X25519 shared key precomputed, as the
    # engine does), on the last repetition's ciphertexts. Timed on the wall clock and as this
    # thread's CPU time: on a shared machine the CPU time is what the work itself costs.
    ciphertexts = [(ids[i], read_header(frame)[1]) for i, (_, frame) in enumerate(msgs)]
    calls = max(cfg.messages_per_rep, len(ciphertexts))
    boxes = {d: Box(box_key, keys[d].public_key) for d in ids}

    def per_call_us(cached: bool) -> tuple[float, float]:
        gc.disable()
        try:
            start, start_cpu = time.perf_counter_ns(), time.thread_time_ns()
            for i in range(calls):
                d, ct = ciphertexts[i % len(ciphertexts)]
                (boxes[d] if cached else Box(box_key, keys[d].public_key)).decrypt(ct)
            cpu = time.thread_time_ns() - start_cpu
            return (time.perf_counter_ns() - start) / calls / 1e3, cpu / calls / 1e3
        finally:
            gc.enable()

    fresh = [per_call_us(False) for _ in range(cfg.reps)]
    cached = [per_call_us(True) for _ in range(cfg.reps)]
    decrypt_fresh = statistics.median(w for w, _ in fresh)
    decrypt_cached = statistics.median(w for w, _ in cached)
    handle_us = statistics.median(rep_us)
    handle_cpu_us = statistics.median(rep_cpu_us)
    cached_cpu_us = statistics.median(c for _, c in cached)
    return {
        "devices": n,
        "codec": codec.value,
        "sealed_bytes": len(msgs[0][1]),
        "handle_us": handle_us,
        "updates_per_s": 1e6 / handle_us,
        "reps_handle_us": rep_us,
        "handle_cpu_us": handle_cpu_us,
        "updates_per_cpu_s": 1e6 / handle_cpu_us,
        "reps_handle_cpu_us": rep_cpu_us,
        "messages_per_rep": rounds_per_rep * n,
        "decrypt_only_us_box_per_message": decrypt_fresh,
        "decrypt_only_us_box_cached": decrypt_cached,
        "decrypt_only_cpu_us_box_per_message": statistics.median(c for _, c in fresh),
        "decrypt_only_cpu_us_box_cached": cached_cpu_us,
        # What handling costs beyond decrypting with a cached Box (same run, same machine load).
        "handle_over_cached_decrypt_cpu": handle_cpu_us / cached_cpu_us,
        "open_round_ms": statistics.median(open_ms),
        "close_round_ms": statistics.median(close_ms),
        "checkpoint_ms": statistics.median(checkpoint_ms),
        "status_json_bytes_all_reported": status_bytes,
        "rejected": rejected,
    }


# --- 4. rounds over a real broker ------------------------------------------------------------------


def mqtt_rounds(
    n: int, cfg: Config, broker: Any, model_dir: Path, loaded: Any, work_dir: Path
) -> dict[str, Any]:
    """One fleet of N simulated devices and the real aggregator process, cfg.rounds train rounds."""
    from fedge.aggregator.checkpoint import load_checkpoint
    from fedge.aggregator.service import CHECKPOINT_FILE, MAX_CHECKPOINT_BYTES, state_from_checkpoint
    from fedge.lab.provision import create_fleet
    from fedge.protocol.signing import signing_key_to_text
    from mqtt_sim import ManifestSeen, RoundTraffic, SimFleet
    from rounds_common import device_ids

    fleet_id = f"bench-n{n}-{uuid.uuid4().hex[:6]}"  # retained topics of another run never match
    ids = device_ids(n)
    files = create_fleet(
        work_dir / f"fleet-n{n}",
        fleet_id,
        model_dir,
        broker.url,
        dict.fromkeys(ids, 1),
        rounds={
            "rounds": cfg.rounds,
            "min_devices": n,
            "round_timeout_s": 600.0,  # never the reason a round closes: every device reports
            "codec": cfg.codec,
            "server_learning_rate": 1.0,
            "wait_for_devices_s": 10.0,  # the simulated devices are online before it starts
        },
    )
    verify = files.signing_key.verify_key
    m = loaded.manifest
    sim = SimFleet(
        broker.host,
        broker.port,
        fleet_id,
        files.device_keys,
        files.box_key.public_key,
        verify,
        m.parameter_count,
        m.task.input_dim,
        seed=cfg.seed + n,
    )
    log = work_dir / f"aggregator-n{n}.log"
    obs_log = work_dir / f"observer-n{n}.log"
    proc: subprocess.Popen[str] | None = None
    obs: subprocess.Popen[str] | None = None
    started = time.perf_counter()
    try:
        obs = start_observer(broker, fleet_id, signing_key_to_text(verify), obs_log)
        sim.start()
        connected_s = time.perf_counter() - started
        proc = start_worker(["aggregator", "--config", str(files.aggregator_config)], log)
        deadline = time.monotonic() + ROUNDS_TIMEOUT_S + 5.0
        while obs.poll() is None:  # the observer exits once it saw the final manifest
            if proc.poll() is not None and proc.returncode != 0:
                raise BenchError(f"the aggregator (N={n}) failed; log tail:\n{_tail(log)}")
            if sim.errors:
                raise BenchError(f"N={n}: {sim.errors[0]}")
            if time.monotonic() >= deadline:
                raise BenchError(
                    f"N={n}: no final manifest after {ROUNDS_TIMEOUT_S:.0f}s; log tail:\n{_tail(log)}"
                )
            time.sleep(0.02)
        seen = finish_observer(obs, n, obs_log)
        agg = finish_worker(proc, f"aggregator N={n}", AGGREGATOR_EXIT_TIMEOUT_S, log)
        ack_deadline = time.monotonic() + 10.0
        while not sim.all_acknowledged() and time.monotonic() < ack_deadline:
            time.sleep(0.02)
        total_s = time.perf_counter() - started
    finally:
        if proc is not None:
            stop_worker(proc)
        if obs is not None:
            stop_worker(obs)
        sim.stop()
    if sim.errors:
        raise BenchError(f"N={n}: {sim.errors[0]}")
    observed = [ManifestSeen(**d) for d in seen["manifests"]]
    traffic_by_version = {int(v): RoundTraffic(**t) for v, t in seen["traffic"].items()}

    ck = load_checkpoint(files.root / "state" / "aggregator" / CHECKPOINT_FILE, MAX_CHECKPOINT_BYTES)
    if ck is None:
        raise BenchError(f"N={n}: the aggregator left no checkpoint")
    state = state_from_checkpoint(ck)
    history = {h["round_id"]: h for h in state.history}
    manifests = sorted(observed, key=lambda s: s.version)
    rounds: list[dict[str, Any]] = []
    for cur, nxt in itertools.pairwise(manifests):
        traffic = traffic_by_version.get(cur.version)
        work = sim.work.get(cur.version)
        rec = history.get(cur.round_id, {})
        all_reported = traffic.all_reported_at if traffic else None
        rounds.append(
            {
                "version": cur.version,
                "round_id": cur.round_id,
                "phase": cur.phase,
                "overhead_ms": (nxt.arrived - cur.arrived) * 1e3,
                "collect_ms": (all_reported - cur.arrived) * 1e3 if all_reported else None,
                "close_and_announce_ms": (nxt.arrived - all_reported) * 1e3 if all_reported else None,
                "devices_busy_ms": work.busy_s * 1e3 if work else None,
                "first_update_out_ms": _ms_since(cur.arrived, work.first_publish if work else None),
                "last_update_out_ms": _ms_since(cur.arrived, work.last_publish if work else None),
                # What is left after the last device published: its transport, the aggregator's
                # backlog, close_round, checkpoint, signing, blobs and manifest out, manifest in.
                "aggregator_tail_ms": _ms_since(work.last_publish if work else None, nxt.arrived),
                "device_work_ms": work.busy_s * 1e3 / work.updates if work and work.updates else None,
                "manifest_bytes": cur.frame_bytes,
                "status_messages": traffic.status_messages if traffic else 0,
                "status_bytes": traffic.status_bytes if traffic else 0,
                "blob_bytes_next_round": traffic.blob_bytes if traffic else 0,
                "devices": work.to_dict() if work else None,
                "aggregator_record": rec,
            }
        )
    train = [r for r in rounds if r["phase"] == "train"]

    def med(key: str, rows: list[dict[str, Any]] = train) -> float | None:
        values = [r[key] for r in rows if r[key] is not None]
        return statistics.median(values) if values else None

    # Validity: contiguous versions, every train round aggregated from all N devices, nothing
    # rejected, and the aggregator's byte count is exactly what the devices sealed.
    problems: list[str] = []
    versions = [s.version for s in manifests]
    if versions != list(range(1, len(versions) + 1)):
        problems.append(f"manifest versions seen {versions} are not 1..k")
    if len(train) != cfg.rounds:
        problems.append(f"{len(train)} train rounds observed, expected {cfg.rounds}")
    for r in rounds:
        rec, dev = r["aggregator_record"], r["devices"]
        if rec.get("outcome") != "aggregated" or rec.get("reported") != n:
            problems.append(f"round {r['round_id']}: {rec.get('outcome')} with {rec.get('reported')}/{n}")
        if dev is None or dev["updates"] != n or not dev["all_acknowledged"]:
            problems.append(f"round {r['round_id']}: devices sent {dev and dev['updates']}/{n} (or unacked)")
        elif rec.get("mean_update_bytes") != dev["mean_sealed_bytes"]:
            problems.append(
                f"round {r['round_id']}: aggregator counted {rec.get('mean_update_bytes')} bytes per update, "
                f"devices sealed {dev['mean_sealed_bytes']}"
            )
    if state.rejected_total:
        problems.append(f"rejected updates: {state.rejected_total}")
    if agg.get("exit_code") != 0:
        problems.append(f"aggregator exit code {agg.get('exit_code')}")

    overheads = [r["overhead_ms"] for r in train]
    return {
        "devices": n,
        "fleet": fleet_id,
        "codec": cfg.codec,
        "train_rounds": len(train),
        "overhead_ms_median": statistics.median(overheads) if overheads else None,
        "overhead_ms_min": min(overheads, default=None),
        "overhead_ms_max": max(overheads, default=None),
        "collect_ms_median": med("collect_ms"),
        "close_and_announce_ms_median": med("close_and_announce_ms"),
        "devices_busy_ms_median": med("devices_busy_ms"),
        "last_update_out_ms_median": med("last_update_out_ms"),
        "aggregator_tail_ms_median": med("aggregator_tail_ms"),
        "device_work_ms_median": med("device_work_ms"),
        "manifest_bytes": train[0]["manifest_bytes"] if train else None,
        "status_messages_per_round_median": med("status_messages"),
        "status_bytes_per_round_median": med("status_bytes"),
        "blob_bytes_per_round_median": med("blob_bytes_next_round"),
        "update_bytes": train[0]["devices"]["mean_sealed_bytes"] if train else None,
        "moments_round_overhead_ms": next(
            (r["overhead_ms"] for r in rounds if r["phase"] == "moments"), None
        ),
        "connect_s": connected_s,
        "total_s": total_s,
        "aggregator_process": agg,
        "aggregator_peak_rss_mb": agg["peak_rss_bytes"] / MB,
        "mosquitto_rss_mb_after": _mb(proc_status_bytes(broker.pid, "VmRSS")),
        "mosquitto_peak_rss_mb_so_far": _mb(proc_status_bytes(broker.pid, "VmHWM")),
        "rounds": rounds,
        "problems": problems,
    }


def _ms_since(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else (end - start) * 1e3


def _mb(value: int | None) -> float | None:
    return None if value is None else value / MB


# --- the benchmark ------------------------------------------------------------------------------


def run(cfg: Config) -> dict[str, Any]:
    started = time.perf_counter()
    from fedge.protocol.codec import Codec
    from fedge.protocol.task import parse_task_spec

    try:
        task = parse_task_spec(cfg.task_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BenchError(f"cannot read task spec {cfg.task_path}: {exc.strerror}") from None
    from fedge.lab.broker import BrokerSettings, MosquittoBroker, find_mosquitto
    from rounds_common import load

    exe = find_mosquitto()
    if exe is None:
        raise BenchError("mosquitto is not installed (apt-get install mosquitto, or scripts/system-deps.sh)")

    with tempfile.TemporaryDirectory(prefix="fedge-bench-rounds-") as tmp_s:
        tmp = Path(tmp_s)
        print(f"[1/5] building the {task.name} model (fedge model build, subprocess) ...", flush=True)
        model_dir = tmp / "model"
        build_summary = build_model_dir(cfg.task_path, model_dir, tmp)
        loaded = load(model_dir)
        sections = {"model_build": time.perf_counter() - started}
        mark = time.perf_counter()

        print("[2/5] bytes per update (fp32, fp16, int8 vs numpy.save / pickle / JSON) ...", flush=True)
        sizes = update_sizes(loaded, cfg.seed)
        sections["sizes"], mark = time.perf_counter() - mark, time.perf_counter()

        print(f"[3/5] aggregator throughput in-process, N = {list(cfg.engine_devices)} ...", flush=True)
        throughput: list[dict[str, Any]] = []
        for n in cfg.engine_devices:
            for codec in (Codec.FP32.value, Codec.FP16.value, Codec.INT8.value):
                throughput.append(engine_throughput(loaded, n, codec, cfg, tmp / f"tp-{n}-{codec}"))
        sections["throughput"], mark = time.perf_counter() - mark, time.perf_counter()

        print(f"[4/5] engine peak RSS in fresh processes, N = {list(cfg.rss_devices)} ...", flush=True)
        rss_base = run_worker(["baseline"], "baseline", tmp)
        engine_rss = [
            run_worker(
                [
                    "engine",
                    "--model-dir",
                    str(model_dir),
                    "--devices",
                    str(n),
                    "--rounds",
                    str(cfg.rss_rounds),
                    "--codec",
                    "fp32",
                    "--state-dir",
                    str(tmp / f"rss-{n}"),
                ],
                f"engine N={n}",
                tmp,
            )
            for n in cfg.rss_devices
        ]
        sections["engine_rss"], mark = time.perf_counter() - mark, time.perf_counter()

        print(
            f"[5/5] rounds over Mosquitto, N = {list(cfg.devices)}, {cfg.rounds} train rounds each ...",
            flush=True,
        )
        mqtt_results: list[dict[str, Any]] = []
        broker = MosquittoBroker(BrokerSettings(data_dir=tmp / "mosquitto"), executable=exe)
        old_interval = sys.getswitchinterval()
        # A paho thread per simulated device shares this process's GIL; a short switch interval
        # lets the worker thread's publishes out sooner (round timestamps come from the observer
        # process, which this does not affect).
        sys.setswitchinterval(0.001)
        try:
            broker.start()
            for n in cfg.devices:
                print(f"      N={n} ...", flush=True)
                mqtt_results.append(mqtt_rounds(n, cfg, broker, model_dir, loaded, tmp))
        finally:
            sys.setswitchinterval(old_interval)
            broker.stop()
        sections["mqtt_rounds"] = time.perf_counter() - mark

    result = assemble(
        cfg,
        task,
        build_summary,
        sizes,
        throughput,
        rss_base,
        engine_rss,
        mqtt_results,
        exe,
        time.perf_counter() - started,
    )
    result["sections_s"] = sections
    return result


def assemble(
    cfg: Config,
    task: Any,
    build_summary: dict[str, Any],
    sizes: dict[str, Any],
    throughput: list[dict[str, Any]],
    rss_base: dict[str, Any],
    engine_rss: list[dict[str, Any]],
    mqtt_results: list[dict[str, Any]],
    exe: Path,
    duration_s: float,
) -> dict[str, Any]:
    machine = machine_info()
    machine["versions"].update(
        {
            "paho-mqtt": _version("paho-mqtt"),
            "pynacl": _version("pynacl", "PyNaCl"),
            "mosquitto": mosquitto_version(exe),
        }
    )
    p = sizes["parameter_count"]
    # Round overhead vs N: the marginal cost of one more device, and N_max / N_min.
    marginal = None
    if len(mqtt_results) >= 2:
        lo, hi = mqtt_results[0], mqtt_results[-1]
        marginal = (hi["overhead_ms_median"] - lo["overhead_ms_median"]) / (hi["devices"] - lo["devices"])
    agg_rss = [r["aggregator_peak_rss_mb"] for r in mqtt_results]
    # The service's CPU per update message: the slope of its total CPU time over the number of
    # updates it handled (N per round, train rounds plus the moments round), start-up cancelling.
    cpu_per_update = None
    if len(mqtt_results) >= 2:
        lo, hi = mqtt_results[0], mqtt_results[-1]
        msgs = [r["devices"] * (r["train_rounds"] + 1) for r in (lo, hi)]
        cpu = [r["aggregator_process"]["cpu_s"] for r in (lo, hi)]
        cpu_per_update = (cpu[1] - cpu[0]) / (msgs[1] - msgs[0]) * 1e3
    eng_lo, eng_hi = (engine_rss[0], engine_rss[-1]) if engine_rss else (None, None)
    growth_mb = (eng_hi["peak_rss_bytes"] - eng_lo["peak_rss_bytes"]) / MB if eng_lo and eng_hi else None
    keep_all_mb = (eng_hi["devices"] - eng_lo["devices"]) * 4 * p / MB if eng_lo and eng_hi else None
    fp32_tp = [t for t in throughput if t["codec"] == "fp32"]
    scaling = {
        "round_overhead_marginal_ms_per_device": marginal,
        "aggregator_service_cpu_ms_per_update": cpu_per_update,
        "round_overhead_ratio_nmax_over_nmin": (
            mqtt_results[-1]["overhead_ms_median"] / mqtt_results[0]["overhead_ms_median"]
            if len(mqtt_results) >= 2
            else None
        ),
        "aggregator_peak_rss_ratio_nmax_over_nmin": agg_rss[-1] / agg_rss[0] if len(agg_rss) >= 2 else None,
        "engine_peak_rss_growth_mb": growth_mb,
        "keep_every_fp32_delta_would_add_mb": keep_all_mb,
        "engine_throughput_ratio_nmax_over_nmin_fp32": (
            fp32_tp[-1]["updates_per_s"] / fp32_tp[0]["updates_per_s"] if len(fp32_tp) >= 2 else None
        ),
    }

    # Validity checks: a failure means the numbers compare different things.
    workers = [r["aggregator_process"] for r in mqtt_results] + engine_rss + [rss_base]
    pairs = [(w["peak_rss_bytes"], w.get("peak_rss_vmhwm_bytes")) for w in workers]
    rss_ok = all(h is None or abs(a - h) <= 0.05 * h for a, h in pairs)
    mqtt_problems = [f"N={r['devices']}: {p}" for r in mqtt_results for p in r["problems"]]
    engine_problems = [
        f"engine N={r['devices']}: accepted {r['accepted']}/{r['expected']} {r['rejected']}"
        for r in engine_rss
        if r["accepted"] != r["expected"]
    ] + [
        f"throughput N={t['devices']} {t['codec']}: rejected {t['rejected']}"
        for t in throughput
        if t["rejected"]
    ]
    tf_loaded = any(w.get("tensorflow_in_sys_modules") for w in workers)
    checks = {
        "rounds_complete_and_bytes_match": {"problems": mqtt_problems, "passed": not mqtt_problems},
        "engine_accepted_every_update": {"problems": engine_problems, "passed": not engine_problems},
        "ru_maxrss_matches_vmhwm": {"pairs_bytes": pairs, "tolerance": 0.05, "passed": rss_ok},
        "aggregator_without_tensorflow": {
            "third_party_modules": mqtt_results[0]["aggregator_process"]["third_party_modules"]
            if mqtt_results
            else None,
            "passed": not tf_loaded,
        },
    }
    targets = []
    if growth_mb is not None and keep_all_mb:
        limit = TARGET_RSS_GROWTH_SHARE * keep_all_mb
        targets.append(
            {
                "name": "streaming_aggregation_memory",
                "description": (
                    f"engine peak RSS grows by < {TARGET_RSS_GROWTH_SHARE:.0%} of what keeping every fp32 "
                    f"delta would add, N={eng_lo['devices']}->{eng_hi['devices']} (limit {limit:.1f} MB)"
                ),
                "value": growth_mb,
                "unit": "MB",
                "threshold": limit,
                "passed": growth_mb < limit,
            }
        )
    big = [t for t in fp32_tp if t["devices"] >= TARGET_THROUGHPUT_MIN_DEVICES]
    if big:
        slowest = min(big, key=lambda t: t["updates_per_cpu_s"])
        targets.append(
            {
                "name": "aggregator_throughput_per_core",
                "description": (
                    f"RoundEngine.handle takes >= {TARGET_UPDATES_PER_CORE_S:,} sealed fp32 updates per "
                    f"second of one core's CPU time at N >= {TARGET_THROUGHPUT_MIN_DEVICES} (issue 18)"
                ),
                "value": slowest["updates_per_cpu_s"],
                "unit": "updates/s",
                "devices": slowest["devices"],
                "threshold": TARGET_UPDATES_PER_CORE_S,
                "passed": slowest["updates_per_cpu_s"] >= TARGET_UPDATES_PER_CORE_S,
            }
        )
    return {
        "benchmark": "fedge-rounds",
        "format": 1,
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "duration_s": duration_s,
        "machine": machine,
        "config": {
            "task": task.name,
            "task_file": str(cfg.task_path),
            "layers": list(task.layer_sizes),
            "parameter_count": p,
            "model_bytes": build_summary.get("model_bytes"),
            "mqtt_devices": list(cfg.devices),
            "mqtt_train_rounds": cfg.rounds,
            "mqtt_codec": cfg.codec,
            "mqtt_protocol": 5,
            "engine_devices": list(cfg.engine_devices),
            "rss_devices": list(cfg.rss_devices),
            "rss_rounds": cfg.rss_rounds,
            "throughput_messages_per_rep": cfg.messages_per_rep,
            "reps": cfg.reps,
            "simulated_device": "verify manifest (Ed25519) + parse, normal(0, 0.01) float32 delta, encode, "
            "seal (NaCl Box), publish QoS 1 on its own connection; no training, no blob "
            "download",
        },
        "sizes": sizes,
        "throughput": throughput,
        "engine_rss": {"baseline_imports": rss_base, "runs": engine_rss},
        "mqtt_rounds": mqtt_results,
        "scaling": scaling,
        "checks": checks,
        "checks_passed": all(c["passed"] for c in checks.values()),
        "targets": targets,
        "targets_passed": all(t["passed"] for t in targets),
    }


# --- output ----------------------------------------------------------------------------------


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(r: Sequence[str]) -> str:
        cells = (r[i].ljust(widths[i]) if i == 0 else r[i].rjust(widths[i]) for i in range(len(head)))
        return " | ".join(cells)

    sep = "-+-".join("-" * w for w in widths)
    return [line(head), sep, *(line(r) for r in rows)]


def _f(value: float | None, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def render_table(result: dict[str, Any]) -> str:
    out: list[str] = []
    cfg = result["config"]
    mq = result["mqtt_rounds"]
    if mq:
        out.append(
            f"1. Round overhead over Mosquitto, training excluded ({cfg['mqtt_codec']}, median of "
            f"{cfg['mqtt_train_rounds']} train rounds; manifest arrival -> next manifest)"
        )
        rows = [
            (
                f"N={r['devices']}",
                _f(r["overhead_ms_median"]),
                f"{_f(r['overhead_ms_min'])}-{_f(r['overhead_ms_max'])}",
                _f(r["last_update_out_ms_median"]),
                _f(r["device_work_ms_median"], ".2f"),
                _f(r["aggregator_tail_ms_median"]),
                _f(r["close_and_announce_ms_median"]),
                _f(r["aggregator_peak_rss_mb"]),
                _f(r["mosquitto_peak_rss_mb_so_far"]),
                _f(r["status_bytes_per_round_median"], ",.0f"),
            )
            for r in mq
        ]
        out += _table(
            (
                "devices",
                "overhead ms",
                "min-max",
                "= sim devices ms",
                "(per device ms)",
                "+ aggregator tail ms",
                "close+announce ms",
                "aggregator peak RSS MB",
                "mosquitto peak MB",
                "status B/round",
            ),
            rows,
        )
        out.append(
            "   sim devices = manifest in -> last update out (the simulator: one process, serial); "
            "aggregator tail = last update out -> next manifest in (transport, handling backlog, close, "
            "checkpoint, sign, publish)"
        )
        last = mq[-1]
        out.append(
            f"   per round the aggregator also publishes "
            f"{_f(last['blob_bytes_per_round_median'], ',.0f')} B of blobs (model + weights) and a "
            f"{last['manifest_bytes']:,} B manifest (N={last['devices']}); "
            f"an update is {_f(last['update_bytes'], ',.0f')} B"
        )
        sc = result["scaling"]
        if sc["round_overhead_marginal_ms_per_device"] is not None:
            out.append(
                f"   marginal cost {sc['round_overhead_marginal_ms_per_device']:.2f} ms per device; overhead "
                f"N={mq[-1]['devices']} / N={mq[0]['devices']} = "
                f"{sc['round_overhead_ratio_nmax_over_nmin']:.1f}x; "
                f"aggregator peak RSS ratio {sc['aggregator_peak_rss_ratio_nmax_over_nmin']:.2f}x; "
                f"aggregator process CPU {sc['aggregator_service_cpu_ms_per_update']:.2f} ms per update"
            )
        out.append("")

    out.append(f"2. Aggregator throughput, RoundEngine.handle in-process (median of {cfg['reps']} reps)")
    tp = result["throughput"]
    by_n: dict[int, dict[str, dict[str, Any]]] = {}
    for t in tp:
        by_n.setdefault(t["devices"], {})[t["codec"]] = t
    rows = []
    for n, cells in by_n.items():
        f32 = cells["fp32"]
        rows.append(
            (
                f"N={n}",
                *(f"{cells[c]['updates_per_s']:,.0f}" for c in ("fp32", "fp16", "int8")),
                f"{f32['handle_us']:.0f}",
                f"{f32['decrypt_only_us_box_per_message']:.0f} / {f32['decrypt_only_us_box_cached']:.0f}",
                f"{f32['close_round_ms']:.2f}",
                f"{f32['checkpoint_ms']:.2f}",
                f"{f32['open_round_ms']:.2f}",
            )
        )
    out += _table(
        (
            "devices",
            "fp32 upd/s",
            "fp16 upd/s",
            "int8 upd/s",
            "fp32 us/upd",
            "decrypt only us (Box new/cached)",
            "close ms",
            "checkpoint ms",
            "open+sign ms",
        ),
        rows,
    )
    er = result["engine_rss"]
    base_mb = er["baseline_imports"]["peak_rss_bytes"] / MB
    rss_rows = [
        (
            f"N={r['devices']}",
            f"{r['peak_rss_bytes'] / MB:.1f}",
            _f(r["rss_before_rounds_bytes"] / MB if r["rss_before_rounds_bytes"] else None),
            f"{r['devices'] * 4 * result['config']['parameter_count'] / MB:.1f}",
        )
        for r in er["runs"]
    ]
    out.append("")
    out.append(
        f"   engine peak RSS, fresh process per N ({cfg['rss_rounds']} fp32 rounds; imports alone "
        f"{base_mb:.1f} MB):"
    )
    out += [
        "   " + line
        for line in _table(
            ("devices", "peak RSS MB", "RSS before rounds MB", "all fp32 deltas would be MB"), rss_rows
        )
    ]
    out.append("")

    s = result["sizes"]
    out.append(
        f"3. Bytes per update, {result['config']['task']} ({s['parameter_count']:,} parameters, "
        f"raw float32 {s['raw_float32_bytes']:,} B)"
    )
    rows = [
        (
            f"fedge {c} (sealed)",
            f"{v['sealed_bytes']:,}",
            f"{v['mqtt5_publish_bytes']:,}",
            f"{v['ratio_vs_fp32_sealed']:.2f}x",
            f"{v['device_encode_seal_us']:.0f}",
            "Box-sealed, authenticated",
        )
        for c, v in s["codecs"].items()
    ]
    labels = {
        "numpy_save": "naive numpy.save",
        "pickle_ndarray": "naive pickle (ndarray)",
        "pickle_dict_with_metadata": "naive pickle (dict + metadata)",
        "json_float_list": "naive JSON float list",
    }
    rows += [
        (
            labels[k],
            f"{v['bytes']:,}",
            "-",
            f"{v['ratio_vs_fp32_sealed']:.2f}x",
            "-",
            "plaintext, unauthenticated",
        )
        for k, v in s["naive"].items()
    ]
    out += _table(
        ("encoding", "bytes", "MQTT5 PUBLISH B", "vs fedge fp32", "device encode+seal us", "security"), rows
    )
    dm = s["device_manifest_us"]
    out.append(
        f"   a device's manifest ({dm['frame_bytes']:,} B, {dm['selected_devices']} devices selected): "
        f"verify {dm['verify_us']:.0f} us, parse {dm['parse_us']:.0f} us"
    )
    out.append("")
    for t in result["targets"]:
        out.append(
            f"target {'PASS' if t['passed'] else 'MISS'}: {t['description']} "
            f"(measured {t['value']:,.1f} {t['unit']})"
        )
    for name, c in result["checks"].items():
        detail = ""
        if not c["passed"]:
            detail = f": {c.get('problems') or c.get('pairs_bytes') or ''}"
        out.append(f"check  {'ok  ' if c['passed'] else 'FAIL'}: {name}{detail}")
    mach = result["machine"]
    v = mach["versions"]
    out += [
        "",
        f"machine: {mach['platform']}, {mach['cpu_model']}, {mach['cpu_count']} CPUs, "
        f"Python {mach['python']}, "
        f"mosquitto {v['mosquitto']}, paho-mqtt {v['paho-mqtt']}, pynacl {v['pynacl']}, numpy {v['numpy']}.",
    ]
    return "\n".join(out)


def write_json(result: dict[str, Any], path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise BenchError(f"cannot write {path}: {exc.strerror}") from None


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    from fedge.protocol.errors import FedgeError

    try:
        result = run(cfg)
        write_json(result, cfg.out)
    except (BenchError, FedgeError) as exc:
        print(f"bench_rounds: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_rounds: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a library failed in a way nobody anticipated: keep the traceback
        traceback.print_exc()
        print(f"bench_rounds: error: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print()
    print(render_table(result))
    print(f"\nresults: {cfg.out}  (total {result['duration_s']:.1f}s)")
    if not result["checks_passed"]:
        print(
            "bench_rounds: error: a validity check failed (see 'check FAIL' above); the numbers are not "
            "trustworthy",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
