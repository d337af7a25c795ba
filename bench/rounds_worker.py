"""One fresh process for ``bench_rounds.py``; prints one JSON line (its last stdout line).

Why a separate script: a process's peak RSS only means something if it loaded nothing else, so
the aggregator runs here, started through a small launcher (see ``bench_training.LAUNCHER``),
and reports its own ``ru_maxrss`` and ``VmHWM`` when it is done. The module level imports the
standard library only.

Modes:

``aggregator --config PATH``
    Exactly ``python -m fedge.cli aggregator run --config PATH`` (the real ``AggregatorService``
    over MQTT, logging to stderr), then report exit code, CPU time and peak RSS.
``engine --model-dir DIR --devices N --rounds R --codec C --state-dir DIR``
    The pure ``RoundEngine`` fed N sealed updates per round, each sealed just before it is
    handled and then dropped (so only the aggregator's own state can grow with N), a
    checkpoint after every round as the service writes; report peak RSS and the RSS before the
    first round.
``baseline``
    Python with numpy, PyNaCl, paho-mqtt and the aggregator's modules imported: the floor.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from typing import Any

from training_worker import emit, rss_fields, third_party_modules

MODES = ("aggregator", "engine", "baseline")


def current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


_BENCH_HELPERS = {"training_worker", "rounds_common"}


def modules_fields() -> dict[str, Any]:
    return {
        "tensorflow_in_sys_modules": "tensorflow" in sys.modules,
        "third_party_modules": [m for m in third_party_modules() if m not in _BENCH_HELPERS],
    }


def aggregator(config: Path) -> dict[str, Any]:
    from fedge.cli import main as fedge_main

    start = time.perf_counter()
    code = fedge_main(["aggregator", "run", "--config", str(config)])
    return {
        "mode": "aggregator",
        "exit_code": code,
        "wall_s": time.perf_counter() - start,
        "cpu_s": cpu_seconds(),
        **rss_fields(),
        **modules_fields(),
    }


def engine(model_dir: Path, devices: int, rounds: int, codec_name: str, state_dir: Path) -> dict[str, Any]:
    import numpy as np
    from nacl.public import PrivateKey
    from nacl.signing import SigningKey

    from fedge.aggregator.checkpoint import save_checkpoint
    from fedge.aggregator.service import checkpoint_from_state
    from fedge.protocol.codec import Codec
    from rounds_common import device_ids, load, make_engine, random_delta, sealed_update

    codec = Codec(codec_name)
    loaded = load(model_dir)
    ids = device_ids(devices)
    keys = {d: PrivateKey.generate() for d in ids}
    box_key, signing_key = PrivateKey.generate(), SigningKey.generate()
    eng = make_engine(loaded, codec, {d: k.public_key for d, k in keys.items()}, box_key, signing_key)
    rng = np.random.default_rng(devices)
    state_dir.mkdir(parents=True, exist_ok=True)
    rss_before_rounds = current_rss_bytes()
    accepted = 0
    rejected: dict[str, int] = {}
    update_bytes = 0
    start = time.perf_counter()
    for r in range(rounds):
        m = eng.open_round(time.time()).manifest
        for d in ids:
            frame = sealed_update(
                fleet=eng.fleet, device_id=d, round_id=m.round_id, version=m.version, counter=r,
                delta=random_delta(rng, loaded.manifest.parameter_count), layout=m.model_manifest.layout,
                codec=codec, device_key=keys[d], aggregator_public=box_key.public_key,
            )
            update_bytes = len(frame)
            outcome = eng.handle(eng.topics.update(d), frame, time.time())
            if outcome.accepted:
                accepted += 1
            else:
                rejected[outcome.reason] = rejected.get(outcome.reason, 0) + 1
            del frame
        eng.close_round()
        save_checkpoint(state_dir / "checkpoint.bin", checkpoint_from_state(eng.snapshot()))
    return {
        "mode": "engine",
        "devices": devices,
        "rounds": rounds,
        "codec": codec.value,
        "update_bytes": update_bytes,
        "accepted": accepted,
        "expected": devices * rounds,
        "rejected": rejected,
        "completed_rounds": eng.state.completed_rounds,
        "seconds": time.perf_counter() - start,
        "rss_before_rounds_bytes": rss_before_rounds,
        **rss_fields(),
        **modules_fields(),
    }


def baseline() -> dict[str, Any]:
    import fedge.aggregator.round_engine
    import fedge.aggregator.service  # noqa: F401 - the import is what is measured

    return {"mode": "baseline", **rss_fields(), **modules_fields()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--config", type=Path)
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--state-dir", type=Path)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--codec", default="fp32")
    args = parser.parse_args(argv)
    if args.mode == "aggregator":
        if args.config is None:
            parser.error("aggregator needs --config")
        result = aggregator(args.config)
    elif args.mode == "engine":
        if args.model_dir is None or args.state_dir is None:
            parser.error("engine needs --model-dir and --state-dir")
        result = engine(args.model_dir, args.devices, args.rounds, args.codec, args.state_dir)
    else:
        result = baseline()
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
