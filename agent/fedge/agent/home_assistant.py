"""Home Assistant MQTT discovery for the device's prediction (``[insight] home_assistant``;
``docs/home-assistant.md``).

With it on, the agent publishes one discovery config, retained with QoS 1, on
``{prefix}/sensor/fedge_{fleet}_{device}/prediction/config`` (:mod:`fedge.protocol.home_assistant`),
and a stock Home Assistant with its MQTT integration shows the device's prediction as a sensor,
with no configuration of its own:

- its state is the insight payload's ``prediction.label`` (classification, an ``enum`` sensor whose
  options are the task's classes) or ``prediction.value`` (regression, a ``measurement`` with the
  label's units), read from the retained ``insight/{device_id}`` topic;
- its attributes are the class probabilities (or the units), the model's version and generation,
  the task and the window's end;
- it is *unavailable* while the device's retained status says ``"state": "offline"`` (the agent's
  Last Will says so when it drops off), available in any other state.

The config is built from a published insight payload (:func:`discovery_config`, pure), so it
always describes the model that made the prediction on the state topic; it is republished when
it changes (a model with another task, other classes or other units) and after each
(re)connection (:class:`HomeAssistantDiscovery`). Option names: Home Assistant's MQTT sensor
(https://www.home-assistant.io/integrations/sensor.mqtt/) and discovery
(https://www.home-assistant.io/integrations/mqtt/#discovery-messages) documentation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from fedge.protocol.home_assistant import OBJECT_ID, discovery_topic, node_id

log = logging.getLogger("fedge.agent.home_assistant")

#: The sensor's state: the predicted class, or the predicted value.
CLASSIFICATION_VALUE = "{{ value_json.prediction.label }}"
REGRESSION_VALUE = "{{ value_json.prediction.value }}"
#: The device's status says "offline" only in its Last Will (or when it stops cleanly); every
#: other state (online, idle, training, not_ready) is a running agent.
AVAILABILITY = "{{ 'offline' if value_json.state == 'offline' else 'online' }}"
PAYLOAD_AVAILABLE = "online"
PAYLOAD_NOT_AVAILABLE = "offline"
_COMMON_ATTRIBUTES = (
    "'model_version': value_json.model.version, 'model_generation': value_json.model.generation, "
    "'task': value_json.task.name, 'window_end': value_json.window.end"
)
CLASSIFICATION_ATTRIBUTES = (
    "{{ {'probabilities': value_json.prediction.probabilities, " + _COMMON_ATTRIBUTES + "} | tojson }}"
)
REGRESSION_ATTRIBUTES = "{{ {'units': value_json.prediction.units, " + _COMMON_ATTRIBUTES + "} | tojson }}"


def discovery_config(
    insight: Mapping[str, Any],
    *,
    insight_topic: str,
    status_topic: str,
    sw_version: str | None = None,
) -> dict[str, Any]:
    """The discovery payload for the device that published ``insight`` (an ``fedge.insight/1``
    document, :func:`fedge.agent.insight.insight_payload`) on ``insight_topic``, whose status is
    retained on ``status_topic``. Raises ``KeyError``/``TypeError`` for a payload of another shape.
    """
    fleet, device = str(insight["fleet"]), str(insight["device_id"])
    task, prediction = insight["task"], insight["prediction"]
    node = node_id(fleet, device)
    origin: dict[str, Any] = {"name": "fedge"}
    if sw_version:
        origin["sw_version"] = sw_version
    config: dict[str, Any] = {
        "name": "Prediction",
        "unique_id": f"{node}_{OBJECT_ID}",
        "state_topic": insight_topic,
        "qos": 1,
        "json_attributes_topic": insight_topic,
        "availability_topic": status_topic,
        "availability_template": AVAILABILITY,
        "payload_available": PAYLOAD_AVAILABLE,
        "payload_not_available": PAYLOAD_NOT_AVAILABLE,
        "device": {
            "identifiers": [node],
            "name": f"fedge {device}",
            "manufacturer": "fedge",
            "model": str(task["name"]),
        },
        "origin": origin,
    }
    if task["kind"] == "classification":
        config["value_template"] = CLASSIFICATION_VALUE
        config["json_attributes_template"] = CLASSIFICATION_ATTRIBUTES
        config["device_class"] = "enum"
        config["options"] = list(prediction["probabilities"])
    else:
        config["value_template"] = REGRESSION_VALUE
        config["json_attributes_template"] = REGRESSION_ATTRIBUTES
        config["state_class"] = "measurement"
        if prediction.get("units"):
            config["unit_of_measurement"] = str(prediction["units"])
    return config


#: Publishes ``(topic, payload)`` retained with QoS 1; False if it could not be handed over.
PublishFn = Callable[[str, bytes], bool]


class HomeAssistantDiscovery:
    """Keeps the device's discovery config published: after each published prediction whose
    config differs from the last one published, and once per connection (:meth:`ensure`, with
    the connection's number). Called from the agent's worker only; never raises."""

    def __init__(
        self,
        prefix: str,
        fleet: str,
        device_id: str,
        insight_topic: str,
        status_topic: str,
        publish: PublishFn,
        sw_version: str | None = None,
    ) -> None:
        self.topic = discovery_topic(prefix, fleet, device_id)
        self.insight_topic = insight_topic
        self.status_topic = status_topic
        self.publish = publish
        self.sw_version = sw_version
        self.published = 0
        self.failed = 0
        self._payload: bytes | None = None  # the config to publish (from the newest prediction)
        self._sent: tuple[int, bytes] | None = None  # (connection, payload) last handed over

    def prediction_published(self, insight: Mapping[str, Any], connection: int) -> None:
        """A prediction went out: its config is the one to publish (now, if it changed)."""
        try:
            config = discovery_config(
                insight,
                insight_topic=self.insight_topic,
                status_topic=self.status_topic,
                sw_version=self.sw_version,
            )
        except (KeyError, TypeError, ValueError) as exc:  # not an fedge.insight/1 payload: a bug
            log.error("home assistant: cannot build the discovery config: %r", exc)
            return
        self._payload = json.dumps(config, separators=(",", ":"), sort_keys=True).encode("utf-8")
        self.ensure(connection)

    def ensure(self, connection: int) -> None:
        """Publishes the config unless this connection already carried this very payload."""
        payload = self._payload
        if payload is None or self._sent == (connection, payload):
            return
        if not self.publish(self.topic, payload):
            self.failed += 1
            return
        if self.published == 0:
            log.info("home assistant: published the discovery config on %s", self.topic)
        self.published += 1
        self._sent = (connection, payload)

    def report(self) -> dict[str, Any]:
        """``insights.home_assistant`` in the device status."""
        return {"topic": self.topic, "published": self.published, "failed": self.failed}
