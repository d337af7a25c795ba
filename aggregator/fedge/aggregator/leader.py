"""Lease-based leader election between aggregator replicas (client-go ``leaderelection`` semantics).

Two layers:

* :func:`decide` is pure: given the Lease as read (or ``None``), who I am and the time, it says
  whether to ``create`` the Lease, ``renew`` my own, ``acquire`` an expired or released one, or
  ``wait``, and returns the record to write.
* :class:`LeaseElector` is the thin shell around the official ``kubernetes`` client
  (``CoordinationV1Api``): read, then create or replace with the ``resourceVersion`` that was read
  (optimistic concurrency). A ``409 Conflict`` means another replica wrote first: we lost.

Safety: a leader counts itself leader only until ``last successful renew + renew deadline``
(``duration_s - renew_every_s``), strictly before another replica may take the Lease over
(``renewTime + leaseDurationSeconds < now``), so a stalled or partitioned leader steps down on its
own, with ``renew_every_s`` of margin for clock skew between nodes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

from kubernetes.client import ApiException, V1Lease, V1LeaseSpec, V1ObjectMeta
from urllib3.exceptions import HTTPError

from fedge.aggregator.leader_config import LEASE_NAME as LEASE_NAME
from fedge.aggregator.leader_config import STATUS_CONFIGMAP as STATUS_CONFIGMAP

log = logging.getLogger("fedge.aggregator.leader")

RELEASED_DURATION_S = 1  # what client-go writes on release: the next candidate need not wait

Action = Literal["create", "renew", "acquire", "wait"]


@dataclass(frozen=True)
class LeaseRecord:
    """The fields of a ``coordination.k8s.io/v1`` Lease's spec that election uses."""

    holder: str | None
    acquire_time: datetime | None
    renew_time: datetime | None
    duration_s: int
    transitions: int


@dataclass(frozen=True)
class Decision:
    action: Action
    new_record: LeaseRecord | None  # None exactly when action == "wait"


def lease_expired(record: LeaseRecord, now: datetime) -> bool:
    """``renewTime + leaseDurationSeconds < now``; a Lease without holder or renewTime is free.

    Exactly at ``renewTime + leaseDurationSeconds`` the Lease is still valid (one tick more
    conservative than client-go, which compares with ``After``)."""
    if not record.holder or record.renew_time is None:
        return True
    return record.renew_time + timedelta(seconds=record.duration_s) < now


def decide(record: LeaseRecord | None, me: str, now: datetime, duration_s: int) -> Decision:
    """What a candidate ``me`` should do at ``now`` given the Lease it read (pure)."""
    if record is None:
        return Decision("create", LeaseRecord(me, now, now, duration_s, 0))
    if record.holder == me:
        acquired = record.acquire_time if record.acquire_time is not None else now
        return Decision("renew", LeaseRecord(me, acquired, now, duration_s, record.transitions))
    if not lease_expired(record, now):
        return Decision("wait", None)
    return Decision("acquire", LeaseRecord(me, now, now, duration_s, record.transitions + 1))


# --- conversion to and from the client's models --------------------------------------------


def _utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def record_from_lease(lease: V1Lease, default_duration_s: int) -> LeaseRecord:
    spec = lease.spec or V1LeaseSpec()
    return LeaseRecord(
        holder=spec.holder_identity or None,
        acquire_time=_utc(spec.acquire_time),
        renew_time=_utc(spec.renew_time),
        duration_s=spec.lease_duration_seconds or default_duration_s,
        transitions=spec.lease_transitions or 0,
    )


def lease_spec(record: LeaseRecord) -> V1LeaseSpec:
    return V1LeaseSpec(
        holder_identity=record.holder,
        acquire_time=record.acquire_time,
        renew_time=record.renew_time,
        lease_duration_seconds=record.duration_s,
        lease_transitions=record.transitions,
    )


# --- the shell ---------------------------------------------------------------------------------


class LeaseApi(Protocol):
    """The part of ``kubernetes.client.CoordinationV1Api`` the elector uses."""

    def read_namespaced_lease(
        self, name: str, namespace: str, *, _request_timeout: float | None = ...
    ) -> V1Lease: ...

    def create_namespaced_lease(
        self, namespace: str, body: V1Lease, *, _request_timeout: float | None = ...
    ) -> V1Lease: ...

    def replace_namespaced_lease(
        self, name: str, namespace: str, body: V1Lease, *, _request_timeout: float | None = ...
    ) -> V1Lease: ...


class ConfigMapApi(Protocol):
    """The part of ``kubernetes.client.CoreV1Api`` :func:`publish_status` uses."""

    def patch_namespaced_config_map(
        self, name: str, namespace: str, body: dict[str, Any], *, _request_timeout: float | None = ...
    ) -> Any: ...


class LeaseElector:
    """One candidate's view of the election; call :meth:`try_acquire_or_renew` every
    ``renew_every_s`` and act only while :attr:`is_leader`."""

    def __init__(
        self,
        api: LeaseApi,
        namespace: str,
        name: str,
        identity: str,
        duration_s: int = 15,
        renew_every_s: float = 5,
        clock: Callable[[], float] = time.time,
        request_timeout_s: float = 5.0,
        renew_deadline_s: float | None = None,
    ) -> None:
        """``renew_deadline_s`` defaults to ``duration_s - renew_every_s``."""
        if not identity:
            raise ValueError("leader election needs a non-empty identity")
        deadline = duration_s - renew_every_s if renew_deadline_s is None else renew_deadline_s
        if not 0 < renew_every_s < deadline < duration_s:
            raise ValueError("need 0 < renew_every_s < renew_deadline_s < duration_s")
        self._renew_deadline_s = deadline
        self.api = api
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.duration_s = duration_s
        self.renew_every_s = renew_every_s
        self.clock = clock
        self.request_timeout_s = request_timeout_s
        self.observed: LeaseRecord | None = None
        self._leader_until: float | None = None  # clock() time until which we may act as leader

    @property
    def renew_deadline_s(self) -> float:
        return self._renew_deadline_s

    @property
    def is_leader(self) -> bool:
        return self._leader_until is not None and self.clock() < self._leader_until

    def _lose(self, why: str) -> bool:
        if self._leader_until is not None:
            log.warning(
                "%s lost leadership of lease %s/%s: %s", self.identity, self.namespace, self.name, why
            )
        self._leader_until = None
        return False

    def try_acquire_or_renew(self, now: float | None = None) -> bool:
        """One election step: True iff we hold the Lease (renewed or acquired now).

        ``now`` (epoch seconds) defaults to ``clock()``. A 409 (someone else wrote first) or a
        foreign valid Lease loses at once; other API errors keep a leader only until its renew
        deadline."""
        t = self.clock() if now is None else now
        at = datetime.fromtimestamp(t, UTC)
        timeout = self.request_timeout_s
        try:
            try:
                lease: V1Lease | None = self.api.read_namespaced_lease(
                    self.name, self.namespace, _request_timeout=timeout
                )
            except ApiException as exc:
                if exc.status != 404:
                    raise
                lease = None
            record = None if lease is None else record_from_lease(lease, self.duration_s)
            self.observed = record
            decision = decide(record, self.identity, at, self.duration_s)
            if decision.new_record is None:
                return self._lose(f"held by {record.holder if record else '?'}")
            body = self._lease_body(lease_spec(decision.new_record), lease)
            if lease is None:
                written = self.api.create_namespaced_lease(self.namespace, body, _request_timeout=timeout)
            else:
                written = self.api.replace_namespaced_lease(
                    self.name, self.namespace, body, _request_timeout=timeout
                )
        except ApiException as exc:
            if exc.status == 409:
                return self._lose("another replica updated the lease first (409 Conflict)")
            return self._error(t, f"API error {exc.status}: {exc.reason}")
        except (HTTPError, OSError) as exc:  # unreachable API server, timeouts
            return self._error(t, str(exc))
        self.observed = record_from_lease(written, self.duration_s)
        if decision.action != "renew":
            log.info(
                "%s became leader of lease %s/%s (%s, transitions=%d)",
                self.identity,
                self.namespace,
                self.name,
                decision.action,
                decision.new_record.transitions,
            )
        self._leader_until = t + self.renew_deadline_s
        return True

    def _lease_body(self, spec: V1LeaseSpec, current: V1Lease | None) -> V1Lease:
        """Our Lease object with ``spec``. Written over ``current``, it carries that Lease's
        ``resourceVersion``, so the API server refuses it (409) if another replica wrote first."""
        version = None if current is None else (current.metadata or V1ObjectMeta()).resource_version
        return V1Lease(
            api_version="coordination.k8s.io/v1",
            kind="Lease",
            metadata=V1ObjectMeta(name=self.name, namespace=self.namespace, resource_version=version),
            spec=spec,
        )

    def _error(self, t: float, why: str) -> bool:
        log.warning("lease %s/%s: %s", self.namespace, self.name, why)
        if self._leader_until is not None and t < self._leader_until:
            return True  # still inside the renew deadline of the last successful renew
        return self._lose(why)

    def release(self) -> bool:
        """Gracefully give the Lease up (empty holder, 1 s duration) so a follower takes over at
        once. True iff released; a Lease we do not hold is left alone."""
        was_leader = self._leader_until is not None
        self._leader_until = None  # stop acting as leader before anything else
        if not was_leader:
            return False
        at = datetime.fromtimestamp(self.clock(), UTC)
        try:
            lease = self.api.read_namespaced_lease(
                self.name, self.namespace, _request_timeout=self.request_timeout_s
            )
            record = record_from_lease(lease, self.duration_s)
            if record.holder != self.identity:
                return False
            released = replace(
                record, holder=None, acquire_time=at, renew_time=at, duration_s=RELEASED_DURATION_S
            )
            self.api.replace_namespaced_lease(
                self.name,
                self.namespace,
                self._lease_body(lease_spec(released), lease),
                _request_timeout=self.request_timeout_s,
            )
        except (ApiException, HTTPError, OSError) as exc:
            log.warning("could not release lease %s/%s: %s", self.namespace, self.name, exc)
            return False
        log.info("%s released lease %s/%s", self.identity, self.namespace, self.name)
        return True


def publish_status(
    core_api: ConfigMapApi,
    namespace: str,
    configmap: str,
    data: Mapping[str, str],
    request_timeout_s: float = 5.0,
) -> None:
    """Merges ``data`` into the status ConfigMap's ``data`` (strategic-merge patch; other keys
    stay). The ConfigMap itself comes with the manifests: RBAC grants get/update/patch only."""
    core_api.patch_namespaced_config_map(
        configmap, namespace, {"data": dict(data)}, _request_timeout=request_timeout_s
    )
