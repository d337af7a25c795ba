"""What one device's flood costs the aggregator, with the size limit derived from the model
against the old fixed 16 MiB limit, in one run (issue 10, item 4).

A real ``fedge aggregator run`` process and a real Mosquitto broker; one enrolled device floods
its own ``update/{id}`` topic (what the broker ACL lets a compromised device do) while the
aggregator's CPU time is read from ``/proc/<pid>/stat`` before and after each flood, once every
message is counted in the aggregator's retained status. Floods, in this order (the last one
closes the round):

- ``garbage``: 1 MiB of random bytes per message (refused at the frame header, or as too large);
- ``forged``: 1 MiB sealed messages with the device's valid cleartext header but ciphertext
  that does not open (with a 16 MiB limit each costs a decryption attempt over 1 MiB);
- ``authentic``: messages sealed with the device's real key and content the engine refuses,
  at the largest size the limit allows; only the first is decrypted, the rest are duplicates;
- ``honest`` (the baseline): one valid fp32 update from each of the other devices.

Each variant (``derived``: ``max_update_bytes = 0``, the default; ``16MiB``: the old default)
gets a fresh aggregator; the table reports CPU microseconds per message and its ratio to one
honest update's cost. Usage: ``python bench/bench_flood.py [--out bench/results/flood.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from nacl.public import PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_training import machine_info  # noqa: E402
from fedge.agent.core import verify_manifest  # noqa: E402
from fedge.aggregator.model_export import build_model, write_model  # noqa: E402
from fedge.lab.broker import BrokerSettings, MosquittoBroker  # noqa: E402
from fedge.lab.provision import FleetFiles, create_fleet  # noqa: E402
from fedge.protocol.codec import Codec  # noqa: E402
from fedge.protocol.errors import FedgeError  # noqa: E402
from fedge.protocol.messages import encode_update, max_sealed_bytes  # noqa: E402
from fedge.protocol.model_manifest import Normalisation  # noqa: E402
from fedge.protocol.round_manifest import RoundManifest  # noqa: E402
from fedge.protocol.sealing import SealedHeader, seal  # noqa: E402
from fedge.protocol.signing import key_id  # noqa: E402
from fedge.protocol.task import parse_task_spec  # noqa: E402
from fedge.protocol.topics import FleetTopics  # noqa: E402

FLEET = "flood"
ATTACKER = "dev-attacker"
MIB = 1024 * 1024
DEFAULT_OUT = ROOT / "bench" / "results" / "flood.json"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
WAIT_S = 120.0


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (fields 14 and 15 of /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class Watcher:
    """Reads the retained manifest and aggregator status, as an operator's monitor would."""

    def __init__(self, port: int, files: FleetFiles, fleet: str) -> None:
        self.topics = FleetTopics(fleet)
        self.verify_key = files.signing_key.verify_key
        self.status: dict[str, Any] = {}
        self.manifest: RoundManifest | None = None
        self.changed = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, *_: c.subscribe(
            [(self.topics.manifest, 1), (self.topics.aggregator_status, 1)]
        )
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self.changed:
            try:
                if msg.topic == self.topics.aggregator_status and msg.payload:
                    self.status = json.loads(msg.payload)
                elif msg.topic == self.topics.manifest and msg.payload:
                    trusted = {key_id(self.verify_key): self.verify_key}
                    self.manifest = verify_manifest(
                        bytes(msg.payload), trusted, fleet=self.topics.fleet, now=None
                    )
            except (FedgeError, ValueError, RecursionError) as exc:  # never kill paho's thread
                print(f"bench_flood: ignoring {msg.topic}: {exc}", file=sys.stderr)
            self.changed.notify_all()

    def wait(self, predicate: Any, what: str) -> None:
        until = time.monotonic() + WAIT_S
        with self.changed:
            while not predicate():
                if time.monotonic() > until:
                    raise SystemExit(f"bench_flood: timed out waiting for {what}; status: {self.status}")
                self.changed.wait(0.5)

    def counted(self) -> int:
        """Messages the aggregator has dealt with: rejections, accepted reports and drops."""
        rejected = sum(int(v) for v in self.status.get("rejected_total", {}).values())
        dropped = sum(int(v) for v in (self.status.get("messages_dropped") or {}).values())
        history_reports = sum(int(r.get("reported", 0)) for r in self.status.get("history", []))
        return rejected + dropped + len(self.status.get("reported", [])) + history_reports

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def build(tmp: Path) -> Path:
    task = parse_task_spec((ROOT / "tasks" / "har-watch.toml").read_text())
    d = task.input_dim
    model_dir = tmp / "model"
    write_model(build_model(task, Normalisation(tuple([0.0] * d), tuple([1.0] * d))), model_dir)
    return model_dir


def run_variant(
    name: str,
    max_update_bytes: int,
    tmp: Path,
    model_dir: Path,
    broker: MosquittoBroker,
    cfg: argparse.Namespace,
) -> dict[str, Any]:
    """One aggregator with ``max_update_bytes`` (0: derived), its own fleet on the shared broker."""
    fleet = f"{FLEET}-{name}"
    honest = [f"dev-{i:03d}" for i in range(cfg.honest)]
    files = create_fleet(
        tmp / name,
        fleet,
        model_dir,
        broker.url,
        {d: 1 for d in [*honest, ATTACKER]},
        {
            "rounds": 1000,
            "min_devices": 1,
            "round_timeout_s": 3600.0,
            "wait_for_devices_s": 0.0,
            "max_update_bytes": max_update_bytes,
        },
    )
    log = (tmp / f"{name}-aggregator.log").open("wb")
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedge.cli", "aggregator", "run", "--config", str(files.aggregator_config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    watcher = Watcher(broker.port, files, fleet)
    sender = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sender.max_queued_messages_set(0)
    sender.connect("127.0.0.1", broker.port, 30)
    sender.loop_start()
    topics = FleetTopics(fleet)
    rows: list[dict[str, Any]] = []
    try:
        watcher.wait(lambda: watcher.manifest is not None and bool(watcher.status), "the first manifest")
        m = watcher.manifest
        assert m is not None and m.phase == "train"
        layout = m.model_manifest.layout
        limit = max_update_bytes or max_sealed_bytes(layout, Codec.FP32, m.model_manifest.task.input_dim)
        rng = np.random.default_rng(0)
        attacker_key = files.device_keys[ATTACKER]
        aggregator_key = files.box_key.public_key
        counter = iter(range(1, 10**9))

        def header(device: str) -> SealedHeader:
            return SealedHeader(fleet, device, m.round_id, next(counter), "update", m.version)

        def flood(scenario: str, device_for: list[str], payloads: list[bytes]) -> None:
            before_count = watcher.counted()
            before_cpu = cpu_seconds(proc.pid)
            start = time.perf_counter()
            pairs = zip(device_for, payloads, strict=True)
            infos = [sender.publish(topics.update(d), p, qos=1) for d, p in pairs]
            for info in infos:
                info.wait_for_publish(WAIT_S)
            watcher.wait(lambda: watcher.counted() >= before_count + len(payloads), f"{scenario} counted")
            cpu = cpu_seconds(proc.pid) - before_cpu
            rows.append(
                {
                    "variant": name,
                    "scenario": scenario,
                    "messages": len(payloads),
                    "bytes_each": len(payloads[0]),
                    "aggregator_cpu_s": round(cpu, 4),
                    "cpu_us_per_message": round(1e6 * cpu / len(payloads), 1),
                    "wall_s": round(time.perf_counter() - start, 3),
                    "rejected_total": dict(watcher.status.get("rejected_total", {})),
                }
            )

        idle_cpu = cpu_seconds(proc.pid)
        time.sleep(cfg.idle_s)
        idle = (cpu_seconds(proc.pid) - idle_cpu) / cfg.idle_s
        n = cfg.messages
        # Warm-up, not reported: the first flood of a fresh process also pays for growing its
        # heap, which would be charged to whichever scenario came first.
        flood("warm-up", [ATTACKER] * n, [rng.bytes(MIB) for _ in range(n)])
        rows.clear()
        forged_body = {"codec": "fp32"}
        stranger = PrivateKey.generate()  # not the device's key: the box does not open
        forged = [seal(header(ATTACKER), forged_body, rng.bytes(MIB - 1024), stranger, aggregator_key)]
        size = min(limit, MIB) - 2048  # the largest the limit allows (at most 1 MiB)
        # Each flood several times (the table reports the median repetition). Every forged
        # flood comes before the first authentic one: once a message of the device has opened,
        # its slot in the round is spent and later ones are duplicates, refused before any crypto.
        for _ in range(cfg.repeats):
            flood("garbage", [ATTACKER] * n, [rng.bytes(MIB) for _ in range(n)])
        for _ in range(cfg.repeats):
            flood("forged", [ATTACKER] * n, forged * n)
        for _ in range(cfg.repeats):
            authentic = [
                seal(header(ATTACKER), forged_body, bytes(size), attacker_key, aggregator_key)
                for _ in range(n)
            ]
            flood("authentic", [ATTACKER] * n, authentic)
        updates = []
        for d in honest:
            delta = rng.normal(0.0, 0.001, m.model_manifest.parameter_count).astype(np.float32)
            body_header, body = encode_update(delta, layout, Codec.FP32, 300, 0.5, None)
            updates.append(seal(header(d), body_header, body, files.device_keys[d], aggregator_key))
        flood("honest", honest, updates)
    finally:
        sender.disconnect()
        sender.loop_stop()
        watcher.stop()
        proc.terminate()
        proc.wait(30)
        log.close()
    medians = []
    for scenario in ("garbage", "forged", "authentic", "honest"):
        reps = sorted((r for r in rows if r["scenario"] == scenario), key=lambda r: r["cpu_us_per_message"])
        median = dict(reps[len(reps) // 2])
        median["repetitions_us_per_message"] = [r["cpu_us_per_message"] for r in reps]
        medians.append(median)
    honest_us = medians[-1]["cpu_us_per_message"]
    for r in medians:
        r["x_honest_update"] = round(r["cpu_us_per_message"] / honest_us, 3) if honest_us else None
    return {"variant": name, "max_update_bytes": limit, "idle_cpu_fraction": round(idle, 4), "rows": medians}


def render(result: dict[str, Any]) -> str:
    head = ("variant", "limit B", "scenario", "msgs", "B each", "CPU s", "us/msg", "x honest", "refused as")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for v in result["variants"]:
        for r in v["rows"]:
            reasons = ", ".join(f"{k} {c}" for k, c in sorted(r["rejected_total"].items()))
            lines.append(
                " | ".join(
                    str(x)
                    for x in (
                        v["variant"],
                        v["max_update_bytes"],
                        r["scenario"],
                        r["messages"],
                        r["bytes_each"],
                        r["aggregator_cpu_s"],
                        r["cpu_us_per_message"],
                        r["x_honest_update"],
                        reasons,
                    )
                )
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--messages", type=int, default=200, help="messages per flood")
    parser.add_argument("--honest", type=int, default=200, help="honest devices (the baseline)")
    parser.add_argument("--idle-s", type=float, default=2.0, help="idle period measured first")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of each flood (median)")
    cfg = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedge-flood-") as t:
        tmp = Path(t)
        model_dir = build(tmp)
        broker = MosquittoBroker(BrokerSettings(data_dir=tmp / "broker", max_packet_size=32 * MIB)).start()
        try:
            variants = [
                run_variant("derived", 0, tmp, model_dir, broker, cfg),
                run_variant("16MiB", 16 * MIB, tmp, model_dir, broker, cfg),
            ]
        finally:
            broker.stop()
    result = {"machine": machine_info(), "config": vars(cfg) | {"out": str(cfg.out)}, "variants": variants}
    print(render(result))
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
