"""Where a device's Home Assistant MQTT discovery config lives (``docs/home-assistant.md``).

Shared by the agent, which publishes the config (``fedge.agent.home_assistant``), and by
``fedge broker config --home-assistant``, which lets each device write its own config topic and
nothing else: both must compute the very same topic, so it is computed here, once.

Home Assistant's discovery topic is ``<discovery_prefix>/<component>/[<node_id>/]<object_id>/config``
and the node and object ids may only hold ``[a-zA-Z0-9_-]``
(https://www.home-assistant.io/integrations/mqtt/#discovery-topic). A fedge id may also hold
``.``, so the node id replaces every other character by ``_``; two devices of one fleet whose ids
differ only there would share a topic, which ``fedge broker config --home-assistant`` refuses.
"""

from __future__ import annotations

import re

from fedge.protocol.errors import FedgeError
from fedge.protocol.topics import ROOT, check_id

#: Home Assistant's default discovery prefix.
DEFAULT_PREFIX = "homeassistant"
#: The one entity a device announces: its prediction, as a sensor.
COMPONENT = "sensor"
OBJECT_ID = "prediction"

_NOT_HA_ID = re.compile(r"[^A-Za-z0-9_-]")


class HomeAssistantTopicError(FedgeError):
    """A discovery prefix that is no plain topic, or lies inside fedge's own tree."""


def node_id(fleet: str, device_id: str) -> str:
    """``fedge_{fleet}_{device}`` with every character Home Assistant refuses in a node id
    (only ``.`` can occur in a fedge id) replaced by ``_``."""
    check_id(fleet, "fleet id")
    check_id(device_id)
    return _NOT_HA_ID.sub("_", f"fedge_{fleet}_{device_id}")


def check_prefix(prefix: str) -> str:
    """``prefix`` if it is plain topic levels (no wildcards, no empty levels, no ``$``, no
    spaces) outside fedge's tree: devices are granted ``write`` on a topic under it."""
    levels = prefix.split("/") if isinstance(prefix, str) else [""]
    if (
        not prefix
        or any(c in prefix for c in "+#\x00")
        or "" in levels
        or any(c.isspace() for c in prefix)
        or prefix.startswith("$")
    ):
        raise HomeAssistantTopicError(
            f"Home Assistant discovery prefix {prefix!r}: must be non-empty topic levels without "
            "'+', '#', '$', spaces or empty levels, e.g. 'homeassistant'"
        )
    if levels[0] == ROOT.split("/")[0]:
        raise HomeAssistantTopicError(
            f"Home Assistant discovery prefix {prefix!r} must not lie inside fedge's topic tree "
            f"{ROOT.split('/')[0]}/"
        )
    return prefix


def discovery_topic(prefix: str, fleet: str, device_id: str) -> str:
    """``{prefix}/sensor/fedge_{fleet}_{device}/prediction/config``: the device's one config."""
    return f"{check_prefix(prefix)}/{COMPONENT}/{node_id(fleet, device_id)}/{OBJECT_ID}/config"
