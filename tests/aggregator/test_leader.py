"""Lease-based leader election: the pure decision table, then real ``kubernetes`` clients
against a schema-validating API double (``tests/support/k8s_api_double.py``)."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

kubernetes = pytest.importorskip("kubernetes")
pytest.importorskip("kubernetes_validate")

from kubernetes.client import ApiClient, Configuration, CoordinationV1Api, CoreV1Api  # noqa: E402

from fedge.aggregator.leader import (  # noqa: E402
    LEASE_NAME,
    STATUS_CONFIGMAP,
    LeaseElector,
    LeaseRecord,
    decide,
    publish_status,
)
from support.k8s_api_double import KubeApiDouble  # noqa: E402

NS = "fedge"
T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
EPOCH0 = T0.timestamp()


# --- pure decision table -------------------------------------------------------------------------


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def held_by(holder: str, renewed: float, transitions: int = 3) -> LeaseRecord:
    return LeaseRecord(holder, at(-100), at(renewed), 15, transitions)


@pytest.mark.parametrize(
    ("record", "now", "action", "holder", "transitions", "acquired"),
    [
        (None, 0, "create", "a", 0, 0),
        (held_by("a", renewed=-5), 0, "renew", "a", 3, -100),
        (held_by("b", renewed=-5), 0, "wait", None, None, None),
        (held_by("b", renewed=-16), 0, "acquire", "a", 4, 0),
        (held_by("b", renewed=-15), 0, "wait", None, None, None),  # exactly at expiry: still valid
        (held_by("b", renewed=-15.000001), 0, "acquire", "a", 4, 0),  # one microsecond after
        (LeaseRecord(None, at(-3), at(-1), 1, 7), 0, "acquire", "a", 8, 0),  # released
        (held_by("a", renewed=-60), 0, "renew", "a", 3, -100),  # own, even if expired
    ],
    ids=[
        "no-lease",
        "own-renew",
        "foreign-valid",
        "foreign-expired",
        "at-expiry",
        "after-expiry",
        "released",
        "own-expired",
    ],
)
def test_decide_table(
    record: LeaseRecord | None,
    now: float,
    action: str,
    holder: str | None,
    transitions: int | None,
    acquired: float | None,
) -> None:
    d = decide(record, "a", at(now), 15)
    assert d.action == action
    if holder is None:
        assert d.new_record is None
        return
    assert d.new_record is not None
    assert d.new_record.holder == holder
    assert d.new_record.transitions == transitions
    assert d.new_record.renew_time == at(now)
    assert d.new_record.acquire_time == at(acquired if acquired is not None else now)
    assert d.new_record.duration_s == 15


# --- against the API double ------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = EPOCH0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def double() -> Iterator[KubeApiDouble]:
    with KubeApiDouble() as api:
        yield api


def _client(url: str) -> ApiClient:
    return ApiClient(Configuration(host=url))


@pytest.fixture
def pair(double: KubeApiDouble) -> Iterator[tuple[LeaseElector, LeaseElector, FakeClock]]:
    """Two replicas, each with its own ApiClient, sharing one (fake) wall clock."""
    clock = FakeClock()
    clients = [_client(double.url), _client(double.url)]
    a, b = (
        LeaseElector(CoordinationV1Api(c), NS, LEASE_NAME, ident, duration_s=15, renew_every_s=5, clock=clock)
        for c, ident in zip(clients, ("aggregator-0", "aggregator-1"), strict=True)
    )
    try:
        yield a, b, clock
    finally:
        for c in clients:
            c.close()
    assert double.schema_errors == []
    puts = [body for method, _, body in double.requests if method == "PUT"]
    assert all(body["metadata"].get("resourceVersion") for body in puts), "every update is conditional"


def _spec(double: KubeApiDouble) -> dict[str, object]:
    lease = double.get_object("Lease", NS, LEASE_NAME)
    assert lease is not None
    spec: dict[str, object] = lease["spec"]
    return spec


def test_only_one_leads(pair: tuple[LeaseElector, LeaseElector, FakeClock], double: KubeApiDouble) -> None:
    a, b, clock = pair
    assert a.try_acquire_or_renew() is True
    assert b.try_acquire_or_renew() is False
    assert (a.is_leader, b.is_leader) == (True, False)
    assert _spec(double)["holderIdentity"] == "aggregator-0"
    assert _spec(double)["leaseTransitions"] == 0
    for _ in range(6):  # a renews every 5 s for 30 s; b never gets in
        clock.t += 5
        assert a.try_acquire_or_renew() is True
        assert b.try_acquire_or_renew() is False
    assert _spec(double)["leaseTransitions"] == 0
    assert b.observed is not None and b.observed.holder == "aggregator-0"


def test_takeover_after_duration_never_before(
    pair: tuple[LeaseElector, LeaseElector, FakeClock], double: KubeApiDouble
) -> None:
    a, b, clock = pair
    assert a.try_acquire_or_renew() is True  # renewTime = t0; then a stalls
    for dt in (5, 10, 14.999, 15):  # 15: renewTime + leaseDurationSeconds == now, still valid
        clock.t = EPOCH0 + dt
        assert b.try_acquire_or_renew() is False, dt
    clock.t = EPOCH0 + 10
    assert a.is_leader is False, "a stalled leader steps down at its renew deadline (10 s)"
    clock.t = EPOCH0 + 15.5
    assert b.try_acquire_or_renew() is True
    assert _spec(double)["holderIdentity"] == "aggregator-1"
    assert _spec(double)["leaseTransitions"] == 1
    assert a.try_acquire_or_renew() is False  # a wakes up: b's lease is valid
    assert (a.is_leader, b.is_leader) == (False, True)


@pytest.mark.parametrize("existing", [False, True], ids=["create-race", "update-race"])
def test_concurrent_acquisition_exactly_one_wins(
    pair: tuple[LeaseElector, LeaseElector, FakeClock], double: KubeApiDouble, existing: bool
) -> None:
    a, b, clock = pair
    if existing:  # an expired lease of a third replica: both try to take it over
        c = LeaseElector(CoordinationV1Api(_client(double.url)), NS, LEASE_NAME, "aggregator-2", clock=clock)
        assert c.try_acquire_or_renew() is True
        c.api.api_client.close()  # type: ignore[attr-defined]
        clock.t += 60
    double.lease_read_barrier = threading.Barrier(2)  # both read before either writes
    results: dict[str, bool] = {}

    def run(e: LeaseElector) -> None:
        results[e.identity] = e.try_acquire_or_renew()

    threads = [threading.Thread(target=run, args=(e,)) for e in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    double.lease_read_barrier = None
    assert not any(t.is_alive() for t in threads)
    assert sorted(results.values()) == [False, True]
    winner = "aggregator-0" if results["aggregator-0"] else "aggregator-1"
    assert _spec(double)["holderIdentity"] == winner
    assert _spec(double)["leaseTransitions"] == (1 if existing else 0)
    assert [e.is_leader for e in (a, b)].count(True) == 1


def test_conflict_answer_is_a_409_status(double: KubeApiDouble) -> None:
    clock = FakeClock()
    with _client(double.url) as c:
        a = LeaseElector(CoordinationV1Api(c), NS, LEASE_NAME, "aggregator-0", clock=clock)
        assert a.try_acquire_or_renew() is True
        lease = CoordinationV1Api(c).read_namespaced_lease(LEASE_NAME, NS)
        assert lease.metadata is not None
        lease.metadata.resource_version = "999"
        with pytest.raises(kubernetes.client.ApiException) as caught:
            CoordinationV1Api(c).replace_namespaced_lease(LEASE_NAME, NS, lease)
    assert caught.value.status == 409
    status = json.loads(caught.value.body)
    assert (status["kind"], status["reason"], status["code"]) == ("Status", "Conflict", 409)
    assert double.schema_errors == []


def test_release_lets_the_other_acquire_at_once(
    pair: tuple[LeaseElector, LeaseElector, FakeClock], double: KubeApiDouble
) -> None:
    a, b, clock = pair
    assert a.try_acquire_or_renew() is True
    clock.t += 1
    assert b.try_acquire_or_renew() is False
    assert a.release() is True
    assert a.is_leader is False
    assert _spec(double).get("holderIdentity") is None
    assert b.try_acquire_or_renew() is True  # same instant: no waiting out the 15 s
    assert _spec(double)["leaseTransitions"] == 1
    assert a.release() is False  # not the holder any more: leaves b's lease alone
    assert _spec(double)["holderIdentity"] == "aggregator-1"


def test_status_configmap_patched(double: KubeApiDouble) -> None:
    double.put_object("ConfigMap", NS, STATUS_CONFIGMAP, {"metadata": {}, "data": {"note": "from k8s/base"}})
    with _client(double.url) as c:
        publish_status(CoreV1Api(c), NS, STATUS_CONFIGMAP, {"model_version": "7", "round": "r7"})
        publish_status(CoreV1Api(c), NS, STATUS_CONFIGMAP, {"round": "r8", "leader": "aggregator-0"})
    cm = double.get_object("ConfigMap", NS, STATUS_CONFIGMAP)
    assert cm is not None
    assert cm["data"] == {
        "note": "from k8s/base",
        "model_version": "7",
        "round": "r8",
        "leader": "aggregator-0",
    }
    patches = [(m, p) for m, p, _ in double.requests if m == "PATCH"]
    assert patches == [("PATCH", f"/api/v1/namespaces/{NS}/configmaps/{STATUS_CONFIGMAP}")] * 2
    assert double.schema_errors == []


def test_missing_status_configmap_is_an_error(double: KubeApiDouble) -> None:
    with _client(double.url) as c, pytest.raises(kubernetes.client.ApiException) as caught:
        publish_status(CoreV1Api(c), NS, STATUS_CONFIGMAP, {"round": "r1"})
    assert caught.value.status == 404
    assert double.schema_errors == []


def _raw(url: str, method: str, body: object, content_type: str = "application/json") -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_double_catches_invalid_bodies(double: KubeApiDouble) -> None:
    leases = f"{double.url}/apis/coordination.k8s.io/v1/namespaces/{NS}/leases"
    code, status = _raw(
        leases, "POST", {"metadata": {"name": LEASE_NAME}, "spec": {"leaseDurationSeconds": "fifteen"}}
    )
    assert code == 422 and isinstance(status, dict) and status["reason"] == "Invalid"
    assert any("leaseDurationSeconds" in e for e in double.schema_errors)
    double.schema_errors.clear()
    code, _ = _raw(
        leases, "POST", {"metadata": {"name": LEASE_NAME}, "spec": {"holder": "x"}}
    )  # unknown field
    assert code == 422 and any("holder" in e for e in double.schema_errors)
    double.schema_errors.clear()
    cm = f"{double.url}/api/v1/namespaces/{NS}/configmaps/{STATUS_CONFIGMAP}"
    code, _ = _raw(cm, "PATCH", {"data": {"round": 8}}, "application/merge-patch+json")
    assert code == 422 and any("round" in e for e in double.schema_errors)
    assert double.get_object("Lease", NS, LEASE_NAME) is None  # nothing invalid was stored


def test_the_double_catches_invalid_responses(double: KubeApiDouble) -> None:
    double.put_object("Lease", NS, LEASE_NAME, {"metadata": {}, "spec": {"renewTime": "yesterday"}})
    code, _ = _raw(
        f"{double.url}/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/{LEASE_NAME}", "GET", None
    )
    assert code == 200
    assert any(e.startswith("response Lease at /spec/renewTime") for e in double.schema_errors)


def test_unreachable_api_keeps_a_leader_only_until_its_renew_deadline() -> None:
    clock = FakeClock()
    with KubeApiDouble() as double, _client(double.url) as c:
        a = LeaseElector(CoordinationV1Api(c), NS, LEASE_NAME, "aggregator-0", clock=clock)
        assert a.try_acquire_or_renew() is True
        double.stop()
        clock.t += 5
        assert a.try_acquire_or_renew() is True  # transient: within the 10 s renew deadline
        clock.t += 5.5
        assert a.try_acquire_or_renew() is False
        assert a.is_leader is False


def test_elector_rejects_bad_settings() -> None:
    api = CoordinationV1Api(ApiClient(Configuration(host="http://127.0.0.1:9")))
    with pytest.raises(ValueError):
        LeaseElector(api, NS, LEASE_NAME, "", clock=FakeClock())
    with pytest.raises(ValueError):
        LeaseElector(api, NS, LEASE_NAME, "a", duration_s=5, renew_every_s=5)


def test_explicit_renew_deadline_is_when_a_stalled_leader_steps_down(double: KubeApiDouble) -> None:
    clock = FakeClock()
    with _client(double.url) as c:
        a = LeaseElector(
            CoordinationV1Api(c), NS, LEASE_NAME, "aggregator-0", 15, 2, clock, renew_deadline_s=12
        )
        assert a.renew_deadline_s == 12
        assert a.try_acquire_or_renew() is True
        clock.t += 11.9
        assert a.is_leader is True
        clock.t += 0.2
        assert a.is_leader is False  # 12.1 s: the default (15 - 2 = 13 s) would still lead
    api = CoordinationV1Api(ApiClient(Configuration(host="http://127.0.0.1:9")))
    with pytest.raises(ValueError, match="renew_every_s < renew_deadline_s < duration_s"):
        LeaseElector(api, NS, LEASE_NAME, "a", duration_s=15, renew_every_s=2, renew_deadline_s=15)
