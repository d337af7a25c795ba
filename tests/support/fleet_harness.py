"""A real fleet for end-to-end tests: Mosquitto, an aggregator process and agent processes.

Every part is the product itself (``python -m fedge.cli aggregator run`` / ``agent run``),
talking through a real broker with real keys; the harness only provisions, starts, stops,
kills and freezes processes, and reads what crosses the broker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from fedge.agent.core import verify_manifest
from fedge.lab.provision import FleetFiles, create_fleet
from fedge.protocol.round_manifest import RoundManifest
from fedge.protocol.signing import key_id
from fedge.protocol.topics import FleetTopics
from support.mqtt_fixtures import RecordedMessage, TrafficRecorder
from support.source_tree import PYTHONPATH as SOURCE_PYTHONPATH

REPO = Path(__file__).resolve().parents[2]
FLEET = "e2e"


def device_subjects(devices: int) -> dict[str, int]:
    """The ids :class:`Fleet` gives its ``devices`` devices (``watch-01`` ...), each mapped to
    its HAR subject; known before the fleet exists (e.g. to make broker principals for them)."""
    return {f"watch-{s:02d}": s for s in range(1, devices + 1)}


class Fleet:
    def __init__(
        self,
        root: Path,
        broker_url: str,
        model_dir: Path,
        devices: int,
        rounds: dict[str, object],
        mqtt_protocol: int = 5,
        mqtt_extra: dict[str, dict[str, object]] | None = None,
        replicas: bool = False,
    ) -> None:
        """``mqtt_extra``: per principal (device id or ``"aggregator"``), extra ``[mqtt]``
        settings such as username, password and ca_file (see ``create_fleet``)."""
        settings: dict[str, object] = {"wait_for_devices_s": 20.0, **rounds}
        self.files: FleetFiles = create_fleet(
            root,
            FLEET,
            model_dir,
            broker_url,
            device_subjects(devices),
            settings,
            mqtt_protocol=mqtt_protocol,
            mqtt_extra=mqtt_extra,
        )
        self.root = root
        self.topics = FleetTopics(FLEET)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        #: ``replicas``: the aggregator and its workers share the updates ([replicas] enabled).
        self.aggregator_env = {"FEDGE_AGGREGATOR__REPLICAS__ENABLED": "true"} if replicas else {}

    # --- processes -------------------------------------------------------------------------

    def spawn(
        self,
        name: str,
        args: list[str],
        env_overrides: dict[str, str] | None = None,
        prefix: list[str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """``fedge ARGS`` as process ``name``, logging to ``root/name.log``. Never as if in a
        pod: without KUBERNETES_SERVICE_HOST the aggregator's leader election stays off.
        ``prefix`` runs it through another command that execs it (``ip netns exec NS``)."""
        log = (self.root / f"{name}.log").open("ab")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KUBERNETES_SERVICE_HOST")}
        env.update(PYTHONPATH=SOURCE_PYTHONPATH, TF_CPP_MIN_LOG_LEVEL="2", **(env_overrides or {}))
        proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "fedge.cli", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def start_agent(
        self, device_id: str, env_overrides: dict[str, str] | None = None, prefix: list[str] | None = None
    ) -> subprocess.Popen[bytes]:
        args = ["agent", "run", "--config", str(self.files.agent_configs[device_id])]
        return self.spawn(device_id, args, env_overrides, prefix)

    def start_aggregator(self) -> subprocess.Popen[bytes]:
        """The aggregator (the leader, with ``replicas``)."""
        args = ["aggregator", "run", "--config", str(self.files.aggregator_config)]
        return self.spawn("aggregator", args, dict(self.aggregator_env))

    def start_worker(self, worker: str) -> subprocess.Popen[bytes]:
        """An aggregator worker ([replicas] role = "worker") named ``worker``."""
        env = {
            **self.aggregator_env,
            "FEDGE_AGGREGATOR__REPLICAS__ROLE": "worker",
            "FEDGE_AGGREGATOR__REPLICAS__WORKER_ID": worker,
        }
        return self.spawn(worker, ["aggregator", "run", "--config", str(self.files.aggregator_config)], env)

    def signal(self, name: str, sig: signal.Signals) -> None:
        self.procs[name].send_signal(sig)

    def kill(self, name: str) -> None:
        self.procs[name].kill()
        self.procs[name].wait(10)

    def wait_exit(self, name: str, timeout: float) -> int:
        try:
            return self.procs[name].wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{name} did not exit in {timeout}s; log:\n{self.log(name)[-3000:]}"
            ) from None

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # --- what crossed the broker ------------------------------------------------------------

    def manifests(self, recorder: TrafficRecorder) -> list[RoundManifest]:
        """Every distinct manifest published, verified with the aggregator's key, in order."""
        trusted = {key_id(self.files.signing_key.verify_key): self.files.signing_key.verify_key}
        seen: dict[int, RoundManifest] = {}
        for m in recorder.matching(self.topics.manifest):
            if m.payload:
                manifest = verify_manifest(m.payload, trusted, fleet=self.topics.fleet, now=None)
                seen.setdefault(manifest.version, manifest)
        return [seen[v] for v in sorted(seen)]


def latest_status(messages: list[RecordedMessage], topic: str) -> dict[str, Any]:
    for m in reversed(messages):
        if m.topic == topic and m.payload:
            status: dict[str, Any] = json.loads(m.payload)
            return status
    return {}


def wait_status(
    recorder: TrafficRecorder, fleet: Fleet, predicate: Any, timeout: float, what: str
) -> dict[str, Any]:
    topic = fleet.topics.aggregator_status
    recorder.wait_for(lambda ms: bool(predicate(latest_status(ms, topic))), timeout, what)
    return latest_status(recorder.messages, topic)


def wait_device_online(recorder: TrafficRecorder, fleet: Fleet, device_id: str, timeout: float = 60) -> None:
    topic = fleet.topics.status(device_id)
    recorder.wait_for(
        lambda ms: latest_status(ms, topic).get("state") not in (None, "offline"),
        timeout,
        f"{device_id} online",
    )
