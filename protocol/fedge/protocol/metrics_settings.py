"""``[metrics]``: where a service serves Prometheus metrics and its health endpoints (parsing
only, no sockets; the server is :mod:`fedge.shell.http_endpoint`).

Both services read the same table. It is off by default, and when on it binds to the loopback
interface unless told otherwise: what a scraper or a probe may read about a building's fleet
(devices online, rounds, rejections by reason) is for the operator, not the building's network.
``port = 0`` asks the kernel for a free port (tests; the bound port is logged). docs/metrics.md
lists the endpoints and every metric.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from fedge.protocol.config_source import ConfigError, Table

#: ``[metrics] port`` of the agent and of the aggregator: two ports, so that both can be
#: enabled on one gateway (the demo, a small building) without a clash.
AGENT_METRICS_PORT = 9464
AGGREGATOR_METRICS_PORT = 9465
DEFAULT_BIND = "127.0.0.1"

METRICS_KEYS = {"enabled", "bind", "port"}


@dataclass(frozen=True)
class MetricsSettings:
    enabled: bool = False
    bind: str = DEFAULT_BIND
    port: int = AGENT_METRICS_PORT


#: A service constructed without a ``[metrics]`` table (tests, the demo): nothing served.
METRICS_OFF = MetricsSettings()


def metrics_settings_from_table(table: Table, default_port: int) -> MetricsSettings:
    """``[metrics]``, every key optional. ``bind`` is an IP address (``0.0.0.0`` or ``::`` for
    every interface, as in a Kubernetes pod whose kubelet probes the pod's IP)."""
    bind = table.text("bind", DEFAULT_BIND)
    try:
        ipaddress.ip_address(bind)
    except ValueError:
        raise ConfigError(
            f'[{table.name}] bind must be an IP address ("127.0.0.1", "0.0.0.0", "::1"), got {bind!r}'
        ) from None
    return MetricsSettings(
        enabled=table.flag("enabled", False),
        bind=bind,
        port=table.integer("port", default_port, 0, 65535),
    )
