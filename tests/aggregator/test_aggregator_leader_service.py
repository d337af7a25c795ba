"""Two real aggregators (``fedge aggregator run`` processes) electing a leader through the
schema-validating Kubernetes API double, publishing through a real Mosquitto broker.

What is proven end to end: only the leader publishes; a SIGKILLed leader (Lease not released)
is replaced once its Lease lapses, and the new leader continues from the shared checkpoint
(versions keep rising, no round aggregated twice); a SIGTERMed leader releases the Lease and
the follower takes over at once; a leader whose Lease is taken exits with
``EXIT_LEADERSHIP_LOST`` and publishes nothing more; the status ConfigMap follows the leader.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

pytest.importorskip("kubernetes")
pytest.importorskip("kubernetes_validate")

from fedge.aggregator.checkpoint import load_checkpoint
from fedge.aggregator.leader import LEASE_NAME, STATUS_CONFIGMAP
from fedge.aggregator.leader_config import EXIT_LEADERSHIP_LOST
from fedge.lab.broker import MosquittoBroker
from fedge.protocol.round_manifest import RoundManifest, round_manifest_from_dict
from fedge.protocol.signing import DocType, key_id, verify_document
from support.fleet_harness import Fleet, latest_status, wait_device_online
from support.k8s_api_double import KubeApiDouble
from support.mqtt_fixtures import TrafficRecorder

pytest_plugins = ("support.mqtt_fixtures",)
pytestmark = pytest.mark.slow
NS = "fedge"


@pytest.fixture()
def recorder(mosquitto: MosquittoBroker) -> Iterator[TrafficRecorder]:
    with TrafficRecorder.for_broker(mosquitto) as rec:
        yield rec


@pytest.fixture()
def kube() -> Iterator[KubeApiDouble]:
    with KubeApiDouble() as api:
        # The ConfigMap k8s/base creates; the aggregator may only patch it.
        api.put_object("ConfigMap", NS, STATUS_CONFIGMAP, {"metadata": {}, "data": {}})
        yield api
        assert api.schema_errors == []


class Replicas:
    """Aggregator processes sharing one fleet directory (one checkpoint volume), each with its
    own identity and heartbeat file, like two pods of the Deployment."""

    def __init__(self, fleet: Fleet, api_url: str, lease_s: int, renew_deadline_s: float) -> None:
        self.fleet = fleet
        self.api_url = api_url
        self.lease_s = lease_s
        self.renew_deadline_s = renew_deadline_s
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str) -> subprocess.Popen[bytes]:
        env = dict(
            FEDGE_AGGREGATOR__AGGREGATOR__EXIT_WHEN_DONE="false",
            FEDGE_AGGREGATOR__AGGREGATOR__HEARTBEAT_FILE=f"heartbeat-{name}",
            FEDGE_AGGREGATOR__LEADER__MODE="on",
            FEDGE_AGGREGATOR__LEADER__API_URL=self.api_url,
            FEDGE_AGGREGATOR__LEADER__NAMESPACE=NS,
            FEDGE_AGGREGATOR__LEADER__IDENTITY=name,
            FEDGE_AGGREGATOR__LEADER__LEASE_DURATION_S=str(self.lease_s),
            FEDGE_AGGREGATOR__LEADER__RENEW_DEADLINE_S=str(self.renew_deadline_s),
            FEDGE_AGGREGATOR__LEADER__RETRY_PERIOD_S="0.2",
            FEDGE_AGGREGATOR__LEADER__STATUS_INTERVAL_S="0.2",
        )
        config = str(self.fleet.files.aggregator_config)
        proc = self.fleet.spawn(name, ["aggregator", "run", "--config", config], env)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.fleet.root / f"{name}.log").read_text(errors="replace")

    def heartbeat_age(self, name: str) -> float:
        return time.time() - (self.fleet.root / f"heartbeat-{name}").stat().st_mtime

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_until(predicate: Callable[[], object], timeout: float, what: str, logs: Callable[[], str]) -> float:
    """Polls every 20 ms; returns the time.monotonic() at which ``predicate`` first held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{logs()[-4000:]}")


def holder(kube: KubeApiDouble) -> str | None:
    lease = kube.get_object("Lease", NS, LEASE_NAME)
    return None if lease is None else lease["spec"].get("holderIdentity")


def manifests_in_order(fleet: Fleet, recorder: TrafficRecorder) -> list[RoundManifest]:
    """Every manifest publication (not deduplicated), verified, in arrival order."""
    trusted = {key_id(fleet.files.signing_key.verify_key): fleet.files.signing_key.verify_key}
    out: list[RoundManifest] = []
    for m in recorder.matching(fleet.topics.manifest):
        if m.payload:
            doc, _ = verify_document(m.payload, DocType.ROUND_MANIFEST, trusted)
            out.append(round_manifest_from_dict(doc))
    return out


def assert_one_publisher(pubs: list[RoundManifest]) -> None:
    """Two publishers would each count from the same checkpoint: a version published twice
    (different manifests) or a version going back."""
    versions = [m.version for m in pubs]
    assert versions == sorted(set(versions)), versions


def status_configmap(kube: KubeApiDouble) -> dict[str, str]:
    cm = kube.get_object("ConfigMap", NS, STATUS_CONFIGMAP)
    assert cm is not None
    data: dict[str, str] = cm.get("data") or {}
    return data


def test_sigkilled_leader_is_replaced_and_the_follower_continues_from_the_checkpoint(
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    recorder: TrafficRecorder,
    kube: KubeApiDouble,
    har_model_dir: Path,
) -> None:
    rounds = {"rounds": 100_000, "min_devices": 1, "round_timeout_s": 30.0, "wait_for_devices_s": 10.0}
    fleet = Fleet(tmp_path / "fleet", mosquitto.url, har_model_dir, 1, rounds)
    replicas = Replicas(fleet, kube.url, lease_s=4, renew_deadline_s=3)
    both = lambda: replicas.log("agg-a") + "\n----\n" + replicas.log("agg-b")  # noqa: E731
    checkpoint_path = fleet.root / "state" / "aggregator" / "checkpoint.bin"
    try:
        fleet.start_agent("watch-01")
        wait_device_online(recorder, fleet, "watch-01")
        replicas.start("agg-a")
        wait_until(lambda: holder(kube) == "agg-a", 30, "agg-a to lead", both)
        replicas.start("agg-b")
        wait_until(
            lambda: "agg-b follows; the lease is held by agg-a" in replicas.log("agg-b"),
            60,
            "b follows",
            both,
        )

        def completed() -> int:
            ck = load_checkpoint(checkpoint_path, 10**8)
            return 0 if ck is None else ck.round_number

        wait_until(lambda: completed() >= 2, 90, "two rounds under agg-a", both)
        assert replicas.heartbeat_age("agg-b") < 3, "a waiting follower keeps its heartbeat fresh"
        before = manifests_in_order(fleet, recorder)
        assert_one_publisher(before)
        rounds_before = completed()
        replicas.procs["agg-a"].kill()  # SIGKILL: the Lease is not released
        killed_at = time.monotonic()
        replicas.procs["agg-a"].wait(10)
        took_over_at = wait_until(lambda: holder(kube) == "agg-b", 15, "agg-b to take over", both)
        new_manifest_at = wait_until(
            lambda: len(manifests_in_order(fleet, recorder)) > len(before), 30, "agg-b's first manifest", both
        )
        wait_until(lambda: completed() >= rounds_before + 2, 90, "two more rounds under agg-b", both)
        wait_until(
            lambda: (
                status_configmap(kube).get("leader") == "agg-b"
                and status_configmap(kube).get("completed_rounds") == str(completed())
            ),
            10,
            "the status ConfigMap to show agg-b's rounds",
            both,
        )
    finally:
        replicas.stop_all()
        fleet.stop_all()
    takeover_s = took_over_at - killed_at
    print(
        f"SIGKILL takeover: lease after {takeover_s:.2f} s, "
        f"first manifest after {new_manifest_at - killed_at:.2f} s"
    )
    # Not before the 4 s Lease lapsed (a's last renew was at most 0.2 s before the kill).
    assert 3.5 < takeover_s < 9, takeover_s
    pubs = manifests_in_order(fleet, recorder)
    assert_one_publisher(pubs)
    assert pubs[len(before)].version > before[-1].version  # continues, no regression
    ck = load_checkpoint(checkpoint_path, 10**8)
    assert ck is not None
    aggregated = [h["round_id"] for h in dict(ck.metadata)["history"] if h["outcome"] == "aggregated"]
    assert len(aggregated) == len(set(aggregated)) >= rounds_before + 2, aggregated
    assert ck.round_number >= rounds_before + 2
    data = status_configmap(kube)
    assert data["model_version"] == str(ck.model_version)
    assert data["round_status"].startswith("running/")
    lease = kube.get_object("Lease", NS, LEASE_NAME)
    assert lease is not None and lease["spec"]["leaseTransitions"] == 1


def test_sigterm_releases_the_lease_and_the_follower_takes_over_at_once(
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    recorder: TrafficRecorder,
    kube: KubeApiDouble,
    har_model_dir: Path,
) -> None:
    rounds = {"rounds": 5, "min_devices": 1, "round_timeout_s": 300.0, "wait_for_devices_s": 0.0}
    fleet = Fleet(tmp_path / "fleet", mosquitto.url, har_model_dir, 1, rounds)
    # A 30 s Lease: a takeover within a few seconds can only come from the release.
    replicas = Replicas(fleet, kube.url, lease_s=30, renew_deadline_s=20)
    both = lambda: replicas.log("agg-a") + "\n----\n" + replicas.log("agg-b")  # noqa: E731
    try:
        replicas.start("agg-a")
        wait_until(lambda: manifests_in_order(fleet, recorder), 30, "agg-a's first manifest", both)
        replicas.start("agg-b")
        wait_until(
            lambda: "agg-b follows; the lease is held by agg-a" in replicas.log("agg-b"),
            60,
            "b follows",
            both,
        )
        before = manifests_in_order(fleet, recorder)
        replicas.procs["agg-a"].send_signal(signal.SIGTERM)
        termed_at = time.monotonic()
        assert replicas.procs["agg-a"].wait(15) == 0
        took_over_at = wait_until(lambda: holder(kube) == "agg-b", 10, "agg-b to take over", both)
        wait_until(
            lambda: len(manifests_in_order(fleet, recorder)) > len(before), 30, "agg-b's manifest", both
        )
        manifest_at = time.monotonic()
    finally:
        replicas.stop_all()
    print(
        f"SIGTERM takeover: lease after {took_over_at - termed_at:.2f} s, "
        f"manifest after {manifest_at - termed_at:.2f} s"
    )
    assert took_over_at - termed_at < 5, "released: no waiting out the 30 s Lease"
    assert "released lease" in replicas.log("agg-a")
    pubs = manifests_in_order(fleet, recorder)
    assert_one_publisher(pubs)
    assert pubs[-1].version > before[-1].version


def test_a_leader_whose_lease_is_taken_exits_with_the_distinct_code_and_publishes_nothing_more(
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    recorder: TrafficRecorder,
    kube: KubeApiDouble,
    har_model_dir: Path,
) -> None:
    # Rounds of 1 s with nobody answering: a leader re-announces a manifest every second.
    rounds = {"rounds": 1000, "min_devices": 1, "round_timeout_s": 1.0, "wait_for_devices_s": 0.0}
    fleet = Fleet(tmp_path / "fleet", mosquitto.url, har_model_dir, 1, rounds)
    replicas = Replicas(fleet, kube.url, lease_s=10, renew_deadline_s=5)
    logs = lambda: replicas.log("agg-a")  # noqa: E731
    try:
        replicas.start("agg-a")
        wait_until(lambda: len(manifests_in_order(fleet, recorder)) >= 2, 30, "two manifests", logs)

        def settled() -> bool:
            """The last announcement's status and fleet summary are out too (they follow the
            manifest within the status rate limit): after them, nothing is due before the next
            1 s round, and the steal is detected within 0.2 s."""
            version = manifests_in_order(fleet, recorder)[-1].version
            status = latest_status(recorder.messages, fleet.topics.aggregator_status)
            summary = latest_status(recorder.messages, fleet.topics.fleet_summary)
            return status.get("version") == version and summary.get("model", {}).get("version") == version

        wait_until(settled, 30, "the announcement's status and fleet summary", logs)
        lease = kube.get_object("Lease", NS, LEASE_NAME)
        assert lease is not None
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        lease["spec"].update(holderIdentity="intruder", renewTime=now, leaseDurationSeconds=60)
        kube.put_object("Lease", NS, LEASE_NAME, lease)  # another replica wrote the Lease
        stolen = len(recorder.messages)
        code = replicas.procs["agg-a"].wait(10)
        after_exit = recorder.messages[stolen:]
    finally:
        replicas.stop_all()
    assert code == EXIT_LEADERSHIP_LOST, logs()
    assert "lost the lease" in logs()
    # Detected at the next renew (0.2 s), well before the next 1 s round could be announced.
    assert [m.topic for m in after_exit] == [], after_exit
    assert holder(kube) == "intruder"  # a Lease it does not hold is left alone
