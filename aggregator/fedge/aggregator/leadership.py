"""The aggregator's side of leader election: a thread that keeps the Lease, and the status
ConfigMap it feeds while leading.

The election runs in its own thread, not in the round loop, for two reasons: an API call that
hangs (up to its request timeout) must not stall rounds, and a round loop busy with FedAvg
must not miss a renew. The loop only reads :attr:`Leadership.is_leader`, which is computed
from the clock (last successful renew + renew deadline), so a leader whose renew thread is
stuck still stops acting as leader in time.

Exit code :data:`EXIT_LEADERSHIP_LOST` (75, ``EX_TEMPFAIL``: "try again later") tells the
orchestrator that this replica lost the Lease; Kubernetes restarts it and it rejoins as a
follower with fresh state (it reloads the checkpoint only when it leads again).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from kubernetes.client import ApiClient, ApiException, Configuration, CoordinationV1Api, CoreV1Api
from kubernetes.config import ConfigException, load_incluster_config
from urllib3.exceptions import HTTPError

from fedge.aggregator.leader import ConfigMapApi, LeaseElector, publish_status
from fedge.aggregator.leader_config import LeaderSettings
from fedge.protocol.config_source import ConfigError

log = logging.getLogger("fedge.aggregator.leader")


def status_data(status: Mapping[str, Any], identity: str, now: float) -> dict[str, str]:
    """The status ConfigMap's ``data`` (strings only) from the engine's status document."""
    phase = status.get("phase")
    return {
        "leader": identity,
        "model_version": str(status.get("version", "")),
        "completed_rounds": str(status.get("completed_rounds", "")),
        "round": str(status.get("round_id") or ""),
        "round_status": f"{status.get('state', '')}/{phase}" if phase else str(status.get("state", "")),
        "updated_at": datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


class Leadership:
    """Campaigns for and renews the Lease every ``retry_period_s`` in a daemon thread; while
    leading, pushes the newest status to the ConfigMap at most every ``status_interval_s``."""

    def __init__(
        self,
        elector: LeaseElector,
        settings: LeaderSettings,
        core_api: ConfigMapApi | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.elector = elector
        self.settings = settings
        self.core_api = core_api if settings.status_configmap else None
        self.clock = clock
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pending: dict[str, str] | None = None
        self._sent_at = float("-inf")
        self._thread = threading.Thread(target=self._run, name="fedge-leader-election", daemon=True)

    @property
    def identity(self) -> str:
        return self.elector.identity

    @property
    def is_leader(self) -> bool:
        return self.elector.is_leader

    @property
    def holder(self) -> str | None:
        """Who holds the Lease as last read (None: nobody, or not read yet)."""
        observed = self.elector.observed
        return observed.holder if observed is not None else None

    def start(self) -> None:
        self._thread.start()

    def set_status(self, data: Mapping[str, str]) -> None:
        """Queues the newest status; only the last one queued is ever sent."""
        with self._lock:
            self._pending = dict(data)

    def report(self, status: Mapping[str, Any], now: float) -> None:
        """Queues the engine's status document as the status ConfigMap's data."""
        self.set_status(status_data(status, self.identity, now))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.elector.try_acquire_or_renew()
            if self.is_leader:
                self._flush_status(force=False)
            self._stop.wait(self.settings.retry_period_s)

    def _flush_status(self, force: bool) -> None:
        if self.core_api is None:
            return
        now = self.clock()
        with self._lock:
            data = self._pending
            if data is None or (not force and now - self._sent_at < self.settings.status_interval_s):
                return
            self._pending = None
            self._sent_at = now
        try:
            publish_status(
                self.core_api,
                self.settings.namespace,
                self.settings.status_configmap,
                data,
                self.elector.request_timeout_s,
            )
        except ApiException as exc:
            log.warning(
                "status ConfigMap %s: API error %s: %s",
                self.settings.status_configmap,
                exc.status,
                exc.reason,
            )
        except (HTTPError, OSError) as exc:
            log.warning("status ConfigMap %s: %s", self.settings.status_configmap, exc)

    def stop(self) -> None:
        """Stops campaigning; a leader sends its last status and releases the Lease, so a
        follower takes over within one retry period instead of a whole lease duration."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.elector.request_timeout_s * 3 + 1)
        if self.is_leader:
            self._flush_status(force=True)
        self.elector.release()


def api_client(settings: LeaderSettings) -> ApiClient:
    """In a pod: the service account (token refreshed by the client); with ``api_url``: that
    URL without credentials (``kubectl proxy``, the tests' API double)."""
    if settings.api_url is not None:
        return ApiClient(Configuration(host=settings.api_url))
    config = Configuration()
    try:
        load_incluster_config(client_configuration=config)  # type: ignore[no-untyped-call]
    except ConfigException as exc:
        raise ConfigError(f"[leader] cannot use the pod's service account: {exc}") from None
    return ApiClient(config)


def leadership_from_settings(settings: LeaderSettings) -> Leadership:
    client = api_client(settings)
    elector = LeaseElector(
        CoordinationV1Api(client),
        settings.namespace,
        settings.lease_name,
        settings.identity,
        duration_s=settings.lease_duration_s,
        renew_every_s=settings.retry_period_s,
        renew_deadline_s=settings.renew_deadline_s,
        request_timeout_s=min(5.0, settings.renew_deadline_s / 2),
    )
    return Leadership(elector, settings, CoreV1Api(client))
