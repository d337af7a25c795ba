"""The round clock of ``bench_rounds.py``: a passive MQTT client in its own process.

Why a separate process: the benchmark process runs a paho thread per simulated device, and a
timestamp taken there can wait for the GIL behind a hundred callbacks. Here nothing else runs,
so ``time.monotonic()`` (CLOCK_MONOTONIC, the same clock in every process on Linux) is taken
as the packet is read.

Prints ``ready`` once subscribed, then -- when the final manifest arrived, or at ``--timeout``
(exit 3) -- one JSON line: every manifest seen (version, round id, phase, selected devices,
frame bytes, arrival time) and, per manifest version, the statuses and blobs the aggregator
published while it was current and when its status first showed every device reported.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

from fedge.protocol.signing import verify_key_from_text
from mqtt_sim import Observer, SimError

EXIT_TIMEOUT = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fleet", required=True)
    parser.add_argument("--verify-key", required=True, help="the aggregator's Ed25519 verify key (base64)")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    observer = Observer(args.host, args.port, args.fleet, verify_key_from_text(args.verify_key))
    try:
        observer.start()
    except SimError as exc:
        print(f"rounds_observer: {exc}", file=sys.stderr)
        return 1
    print("ready", flush=True)
    deadline = time.monotonic() + args.timeout
    try:
        while not observer.final_seen() and time.monotonic() < deadline and not observer.errors:
            time.sleep(0.02)
    finally:
        observer.stop()
    with observer.lock:
        result = {
            "manifests": [asdict(m) for m in observer.manifests],
            "traffic": {str(v): asdict(t) for v, t in observer.traffic.items()},
            "errors": observer.errors,
            "final_seen": any(m.phase == "final" for m in observer.manifests),
        }
    print(json.dumps(result), flush=True)
    return 0 if result["final_seen"] and not observer.errors else EXIT_TIMEOUT


if __name__ == "__main__":
    sys.exit(main())
