"""The JSON documents of the retained status topics, and their schema versions.

Every JSON payload fedge publishes for building-management systems (BMS) names its schema in
``"schema"`` (``docs/asyncapi.yaml`` describes each one): a consumer can tell which shape it
reads, and a changed shape gets a new version rather than silently new meanings.

A device's status has ONE shape whether the agent publishes it (``AgentService.status``) or the
broker publishes its Last Will: :func:`device_status` builds both. The will is set at connect, so
it cannot know the device's numbers; it carries every key with an empty value (``None``, ``{}``)
and ``"state": "offline"``. A key added to the status must be added to
:data:`DEVICE_STATUS_EMPTY` (the function refuses a key it does not list), so the two cannot
drift apart (``tests/agent/test_status_shape.py``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

DEVICE_STATUS_SCHEMA = "fedge.device-status/1"
AGGREGATOR_STATUS_SCHEMA = "fedge.aggregator-status/1"
FLEET_SUMMARY_SCHEMA = "fedge.fleet/1"
INSIGHT_SCHEMA = "fedge.insight/1"

#: Every key of a device's status after ``schema``, ``device_id`` and ``state``, with the value
#: the Last Will carries (nothing is known about an offline device but its id).
DEVICE_STATUS_EMPTY: dict[str, Any] = {
    "model_version": None,
    "round_id": None,
    "ready": None,
    "samples": None,
    "holdout_samples": None,
    "runtime": None,
    "outbox_pending": None,
    "outbox_dropped_total": None,
    "rejected_manifests": {},
    "messages_dropped": {},
    "last_error": None,
    "data": None,
    "insights": None,
    "personalisation": None,
    "rollout": None,
    "time": None,
}


def device_status(device_id: str, state: str, **values: Any) -> dict[str, Any]:
    """A device's status document: ``schema``, ``device_id``, ``state``, then every key of
    :data:`DEVICE_STATUS_EMPTY`, from ``values`` where given, else empty. A key the template
    does not list is a ``TypeError`` (add it there: the Last Will must carry it too)."""
    unknown = sorted(values.keys() - DEVICE_STATUS_EMPTY.keys())
    if unknown:
        raise TypeError(f"device status keys {unknown} are not in DEVICE_STATUS_EMPTY: add them there")
    document: dict[str, Any] = {"schema": DEVICE_STATUS_SCHEMA, "device_id": device_id, "state": state}
    for key, empty in DEVICE_STATUS_EMPTY.items():
        document[key] = values[key] if key in values else _fresh(empty)
    return document


def offline_will(device_id: str) -> bytes:
    """The payload of a device's MQTT Last Will: its status with every value empty, offline."""
    return json.dumps(device_status(device_id, "offline")).encode()


def _fresh(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else value


# --- reading a status -------------------------------------------------------------------------
# A status is JSON from another process (a device, an older release): what reads it for metrics
# or the dashboard takes a value only when it has the expected type, and never a bool for a number.


def status_number(value: object) -> float | None:
    """A status value as a float, or None if it is not an int or float (a bool is not a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def status_counts(value: object) -> dict[str, int]:
    """A status's counts by reason (``{"reason": n}``): only integer values, keys as text; {} if
    the value is no mapping."""
    if not isinstance(value, Mapping):
        return {}
    return {str(k): v for k, v in value.items() if isinstance(v, int) and not isinstance(v, bool)}
