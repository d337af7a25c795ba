"""The aggregator's ``[leader]`` table: whether and how replicas elect one leader via a Lease.

Kept apart from :mod:`fedge.aggregator.config` because it resolves defaults from the pod's
environment (``KUBERNETES_SERVICE_HOST``, ``POD_NAME``, ``POD_NAMESPACE``, the service-account
namespace file), which the rest of the config never looks at. ``mode = "auto"`` (the default)
means on exactly inside a Kubernetes pod, so a config written for systemd, Docker or
``podman kube play`` (no API server there) keeps today's single-aggregator behaviour.

The timing relations are client-go's: ``retry_period_s < renew_deadline_s < lease_duration_s``.
A leader that could not renew for ``renew_deadline_s`` steps down on its own, strictly before
another replica may take the Lease (``lease_duration_s`` after the last renew).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fedge.protocol.config_source import ConfigError, Table

# The names k8s/base uses (rbac.yaml grants exactly these); aggregator.leader re-exports them.
LEASE_NAME = "fedge-aggregator-leader"
#: The exit code of a replica that lost the Lease (75, ``EX_TEMPFAIL``: "try again later"):
#: Kubernetes restarts it and it rejoins as a follower. Here, not in ``leadership``, so the
#: service can name it without importing the Kubernetes client (~48 MB) when it runs alone.
EXIT_LEADERSHIP_LOST = 75
STATUS_CONFIGMAP = "fedge-aggregator-status"
SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
LEADER_KEYS = {
    "mode",
    "lease_name",
    "namespace",
    "identity",
    "lease_duration_s",
    "renew_deadline_s",
    "retry_period_s",
    "status_configmap",
    "status_interval_s",
    "api_url",
}
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclass(frozen=True)
class LeaderSettings:
    enabled: bool
    lease_name: str = LEASE_NAME
    namespace: str = ""  # resolved when enabled
    identity: str = ""  # resolved when enabled
    lease_duration_s: int = 15
    renew_deadline_s: float = 10.0
    retry_period_s: float = 2.0
    status_configmap: str = STATUS_CONFIGMAP  # "" = publish no status ConfigMap
    status_interval_s: float = 10.0
    api_url: str | None = None  # None: the in-cluster service account; else e.g. kubectl proxy


LEADER_OFF = LeaderSettings(enabled=False)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def leader_settings_from_table(
    t: Table,
    env: Mapping[str, str],
    sa_namespace_file: Path = SA_NAMESPACE_FILE,
    hostname: Callable[[], str] = socket.gethostname,
) -> LeaderSettings:
    """Parses and validates ``[leader]``; every key is checked even when election is off, so a
    typo does not wait for the day the config first runs in a cluster."""
    mode = t.choice("mode", "auto", ("auto", "on", "off"))
    in_cluster = bool(env.get("KUBERNETES_SERVICE_HOST"))
    lease_name = t.text("lease_name", LEASE_NAME)
    if not _DNS_SUBDOMAIN.match(lease_name):
        raise ConfigError(f"[leader] lease_name {lease_name!r} is not a valid Kubernetes object name")
    status_configmap = t.opt_text("status_configmap")
    status_configmap = STATUS_CONFIGMAP if status_configmap is None else status_configmap
    if status_configmap and not _DNS_SUBDOMAIN.match(status_configmap):
        raise ConfigError(
            f"[leader] status_configmap {status_configmap!r} is not a valid Kubernetes object name "
            '(or "" for none)'
        )
    duration = t.integer("lease_duration_s", 15, 2, 3600)
    renew_deadline = t.number("renew_deadline_s", 10.0, 0.1, 3600.0)
    retry_period = t.number("retry_period_s", 2.0, 0.05, 3600.0)
    if not renew_deadline < duration:
        raise ConfigError(
            f"[leader] renew_deadline_s ({renew_deadline:g}) must be shorter than lease_duration_s "
            f"({duration}): a leader must step down before another replica may take the lease over"
        )
    if not retry_period < renew_deadline:
        raise ConfigError(
            f"[leader] retry_period_s ({retry_period:g}) must be shorter than renew_deadline_s "
            f"({renew_deadline:g}): a leader needs more than one renew attempt per deadline"
        )
    status_interval = t.number("status_interval_s", 10.0, 0.1, 24 * 3600.0)
    api_url = t.opt_text("api_url") or None
    if api_url is not None and not api_url.startswith(("http://", "https://")):
        raise ConfigError(f"[leader] api_url {api_url!r} must start with http:// or https://")
    namespace = t.opt_text("namespace") or None
    identity = t.opt_text("identity") or None
    enabled = mode == "on" or (mode == "auto" and in_cluster)
    if not enabled:
        return LEADER_OFF
    if api_url is None and not in_cluster:
        raise ConfigError(
            '[leader] mode = "on" outside a Kubernetes pod (KUBERNETES_SERVICE_HOST is not set) '
            "needs api_url, e.g. http://127.0.0.1:8001 from `kubectl proxy`"
        )
    namespace = namespace or env.get("POD_NAMESPACE") or _read_text(sa_namespace_file)
    if namespace is None:
        raise ConfigError(
            f"[leader] namespace is not set and neither POD_NAMESPACE nor {sa_namespace_file} gives one"
        )
    if not _DNS_LABEL.match(namespace):
        raise ConfigError(f"[leader] namespace {namespace!r} is not a valid Kubernetes namespace")
    identity = identity or env.get("POD_NAME") or hostname()
    if not identity:
        raise ConfigError("[leader] identity is not set and neither POD_NAME nor the hostname gives one")
    return LeaderSettings(
        enabled=True,
        lease_name=lease_name,
        namespace=namespace,
        identity=identity,
        lease_duration_s=duration,
        renew_deadline_s=renew_deadline,
        retry_period_s=retry_period,
        status_configmap=status_configmap,
        status_interval_s=status_interval,
        api_url=api_url,
    )
