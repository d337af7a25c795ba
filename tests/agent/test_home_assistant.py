"""Home Assistant MQTT discovery of a device's prediction (``fedge.agent.home_assistant``,
``[insight] home_assistant``; docs/home-assistant.md).

The payload is held to Home Assistant's documented options (the lists below are copied from its
docs, URLs beside them) and its templates are evaluated on real ``fedge.insight/1`` payloads
(built by ``insight_payload`` from a manifest and a live window) and real device statuses.

How the templates are evaluated, honestly: jinja2 (Home Assistant's template engine) is not
installed in this environment, so :func:`render` evaluates the *three template shapes fedge
writes* (a dotted ``value_json`` path; ``'a' if value_json.path == 'b' else 'c'``; a dict literal of
paths piped to ``tojson``) with Python, as Jinja defines them, and refuses any other template;
it proves the paths exist in the payloads and yield the expected values, not that Home
Assistant's Jinja environment parses them. When jinja2 is importable, every template is *also*
rendered with it (with a ``tojson`` filter like Home Assistant's) and must agree.
"""

from __future__ import annotations

import importlib.util
import json
import re
from typing import Any

import numpy as np
import pytest

from fedge.agent.home_assistant import (
    AVAILABILITY,
    HomeAssistantDiscovery,
    discovery_config,
)
from fedge.agent.insight import Prediction, insight_payload
from fedge.agent.live import LiveWindow
from fedge.protocol.codec import Codec
from fedge.protocol.home_assistant import (
    HomeAssistantTopicError,
    check_prefix,
    discovery_topic,
    node_id,
)
from fedge.protocol.model_manifest import ModelManifest
from fedge.protocol.round_manifest import RoundManifest
from fedge.protocol.statuses import device_status, offline_will
from fedge.protocol.task import TaskSpec
from fedge.protocol.topics import FleetTopics
from support.tasks import task_variant

FLEET, DEVICE = "building-1", "room.2-01"
T = FleetTopics(FLEET)
INSIGHT_TOPIC, STATUS_TOPIC = T.insight(DEVICE), T.status(DEVICE)

# https://www.home-assistant.io/integrations/sensor.mqtt/ ("Configuration Variables"), the options
# an MQTT sensor accepts (platform: only in device-based discovery; object_id, replaced by
# default_entity_id in HA 2025.10, is listed for both versions).
HA_SENSOR_OPTIONS = {
    "availability", "availability_mode", "availability_template", "availability_topic", "device",
    "device_class", "default_entity_id", "enabled_by_default", "encoding", "entity_category",
    "entity_picture", "expire_after", "force_update", "icon", "json_attributes_template",
    "json_attributes_topic", "last_reset_value_template", "name", "object_id", "options",
    "payload_available", "payload_not_available", "platform", "suggested_display_precision", "qos",
    "state_class", "state_topic", "unique_id", "unit_of_measurement", "value_template",
}  # fmt: skip
# Same page, the keys of `device`.
HA_DEVICE_OPTIONS = {
    "configuration_url", "connections", "hw_version", "identifiers", "manufacturer", "model",
    "model_id", "name", "serial_number", "suggested_area", "sw_version", "via_device",
}  # fmt: skip
# https://www.home-assistant.io/integrations/mqtt/#adding-information-about-the-origin-of-a-discovery-message
# (HA 2023.9+): `origin` (`o`) in any discovery payload; `name` is required.
HA_ORIGIN_OPTIONS = {"name", "sw_version", "support_url"}
# https://www.home-assistant.io/integrations/mqtt/#discovery-topic:
# <discovery_prefix>/<component>/[<node_id>/]<object_id>/config, ids of [a-zA-Z0-9_-].
HA_DISCOVERY_TOPIC = re.compile(
    r"(?P<prefix>.+)/(?P<component>\w+)/(?:[a-zA-Z0-9_-]+/)?[a-zA-Z0-9_-]+/config"
)


def manifest(task: TaskSpec, version: int = 7, phase: str = "train") -> RoundManifest:
    model = ModelManifest(
        task=task,
        model_file="model.tflite",
        model_sha256="ab" * 32,
        model_bytes=1000,
        initial_weights_sha256="cd" * 32,
        normalisation=None,
        tensorflow_version="2.21.0",
    )
    return RoundManifest(
        fleet=FLEET,
        version=version,
        parent_sha256="ef" * 32,
        phase=phase,
        round_number=3,
        round_id="r-3",
        issued_at=1_700_000_000.0,
        deadline=1_700_000_060.0,
        expires_at=1_700_086_400.0,
        selected_devices=(DEVICE,),
        min_devices=1,
        codec=Codec.FP32,
        model_sha256="ab" * 32,
        model_bytes=1000,
        weights_sha256="12" * 32,
        weights_bytes=400,
        model_manifest=model,
        normalisation=None,
    )


def payload(task: TaskSpec, prediction: Prediction, version: int = 7) -> dict[str, Any]:
    """A real insight document, as published (JSON round trip)."""
    window = LiveWindow(
        np.zeros(task.input_dim, np.float32),
        1_700_000_000 * 10**9,
        1_700_000_002 * 10**9,
        task.features,
        "watch-01",
    )
    doc = insight_payload(
        device_id=DEVICE,
        fleet=FLEET,
        window=window,
        published_at=1_700_000_003.0,
        manifest=manifest(task, version),
        prediction=prediction,
    )
    parsed: dict[str, Any] = json.loads(json.dumps(doc, allow_nan=False))
    return parsed


def classified(task: TaskSpec, name: str = "ABD") -> Prediction:
    classes = task.label.classes or ()
    return Prediction(
        label=name,
        class_index=classes.index(name),
        probabilities={c: (0.7 if c == name else 0.3 / (len(classes) - 1)) for c in classes},
    )


@pytest.fixture
def regression_task(har_task: TaskSpec) -> TaskSpec:
    return task_variant(har_task, {"label.classes": None, "model.kind": "regression"})


# --- the template check (see the module docstring) ------------------------------------------------

_PATH = r"value_json(?:\.\w+)+"
_EXPR = re.compile(rf"\{{\{{ ({_PATH}) \}}\}}")
_IF = re.compile(rf"\{{\{{ '([^']*)' if ({_PATH}) == '([^']*)' else '([^']*)' \}}\}}")
_DICT = re.compile(r"\{\{ \{(.*)\} \| tojson \}\}")
_ITEM = re.compile(rf"'(\w+)': ({_PATH})")


def _lookup(path: str, value_json: Any) -> Any:
    node = value_json
    for name in path.split(".")[1:]:
        assert isinstance(node, dict) and name in node, f"{path}: no {name!r} in the payload"
        node = node[name]
    return node


def _jinja_str(value: Any) -> str:
    """What ``{{ x }}`` prints (Jinja: ``str(x)``; None prints "None")."""
    return str(value)


def render(template: str, payload_text: str) -> str:
    """``template`` evaluated on the MQTT payload ``payload_text`` (as ``value_json``)."""
    value_json = json.loads(payload_text)
    python = _render_subset(template, value_json)
    if importlib.util.find_spec("jinja2") is not None:  # the real engine, when it is there
        import jinja2

        env = jinja2.Environment(undefined=jinja2.StrictUndefined)
        env.filters["tojson"] = json.dumps  # Home Assistant's tojson
        assert env.from_string(template).render(value_json=value_json) == python
    return python


def _render_subset(template: str, value_json: Any) -> str:
    if m := _EXPR.fullmatch(template):
        return _jinja_str(_lookup(m[1], value_json))
    if m := _IF.fullmatch(template):
        return m[1] if _lookup(m[2], value_json) == m[3] else m[4]
    if m := _DICT.fullmatch(template):
        items = [part.strip() for part in m[1].split(", '")]
        pairs = [_ITEM.fullmatch(item if item.startswith("'") else "'" + item) for item in items]
        assert all(pairs), f"{template}: a dict item this check does not understand"
        return json.dumps({p[1]: _lookup(p[2], value_json) for p in pairs if p})
    raise AssertionError(f"{template!r} is outside the template shapes this check evaluates")


def test_the_subset_renderer_refuses_what_it_cannot_evaluate() -> None:
    with pytest.raises(AssertionError, match="outside"):
        render("{{ value_json.a | float }}", '{"a": 1}')
    with pytest.raises(AssertionError, match="no 'b'"):
        render("{{ value_json.a.b }}", '{"a": {}}')
    assert render("{{ value_json.a.b }}", '{"a": {"b": 21.5}}') == "21.5"


# --- topic and payload ----------------------------------------------------------------------------


def test_the_discovery_topic_is_home_assistants_format_and_a_dot_becomes_an_underscore() -> None:
    topic = discovery_topic("homeassistant", FLEET, DEVICE)
    assert topic == "homeassistant/sensor/fedge_building-1_room_2-01/prediction/config"
    m = HA_DISCOVERY_TOPIC.fullmatch(topic)
    assert m and m["prefix"] == "homeassistant" and m["component"] == "sensor"
    assert node_id(FLEET, DEVICE) == "fedge_building-1_room_2-01"
    assert discovery_topic("site/ha", "f", "d") == "site/ha/sensor/fedge_f_d/prediction/config"


@pytest.mark.parametrize("prefix", ["", "home/#", "+", "a//b", "$SYS", "fedge/ha", "home assistant", "/ha"])
def test_a_prefix_that_is_no_plain_topic_outside_fedge_is_refused(prefix: str) -> None:
    with pytest.raises(HomeAssistantTopicError, match="discovery prefix"):
        check_prefix(prefix)


def test_a_classification_config_uses_only_documented_options(har_task: TaskSpec) -> None:
    config = discovery_config(
        payload(har_task, classified(har_task)),
        insight_topic=INSIGHT_TOPIC,
        status_topic=STATUS_TOPIC,
        sw_version="1.2.3",
    )
    assert set(config) - {"origin"} <= HA_SENSOR_OPTIONS
    assert set(config["device"]) <= HA_DEVICE_OPTIONS and set(config["origin"]) <= HA_ORIGIN_OPTIONS
    assert config["state_topic"] == INSIGHT_TOPIC == config["json_attributes_topic"]
    assert config["availability_topic"] == STATUS_TOPIC
    assert (config["payload_available"], config["payload_not_available"]) == ("online", "offline")
    assert config["unique_id"] == "fedge_building-1_room_2-01_prediction"
    assert config["device"] == {
        "identifiers": ["fedge_building-1_room_2-01"],
        "name": f"fedge {DEVICE}",
        "manufacturer": "fedge",
        "model": har_task.name,
    }
    assert config["origin"] == {"name": "fedge", "sw_version": "1.2.3"}
    # An enum sensor: its options are the task's classes; never with a unit or a state class.
    assert config["device_class"] == "enum" and config["options"] == list(har_task.label.classes or ())
    assert "unit_of_measurement" not in config and "state_class" not in config
    assert config["qos"] == 1


def test_a_regression_config_is_a_measurement_in_the_labels_units(regression_task: TaskSpec) -> None:
    doc = payload(regression_task, Prediction(value=612.5, units="ppm"))
    config = discovery_config(doc, insight_topic=INSIGHT_TOPIC, status_topic=STATUS_TOPIC)
    assert set(config) - {"origin"} <= HA_SENSOR_OPTIONS
    assert config["unit_of_measurement"] == "ppm" and config["state_class"] == "measurement"
    assert "options" not in config and "device_class" not in config
    assert config["origin"] == {"name": "fedge"}
    unitless = payload(regression_task, Prediction(value=0.25, units=None))
    assert "unit_of_measurement" not in discovery_config(
        unitless, insight_topic=INSIGHT_TOPIC, status_topic=STATUS_TOPIC
    )


def test_the_templates_give_the_prediction_and_its_attributes_on_real_payloads(
    har_task: TaskSpec, regression_task: TaskSpec
) -> None:
    doc = payload(har_task, classified(har_task, "ABD"), version=9)
    config = discovery_config(doc, insight_topic=INSIGHT_TOPIC, status_topic=STATUS_TOPIC)
    text = json.dumps(doc)
    assert render(config["value_template"], text) == "ABD"
    assert render(config["value_template"], text) in config["options"]
    attributes = json.loads(render(config["json_attributes_template"], text))
    assert attributes == {
        "probabilities": doc["prediction"]["probabilities"],
        "model_version": 9,
        "model_generation": 1,
        "task": har_task.name,
        "window_end": 1_700_000_002.0,
    }

    doc = payload(regression_task, Prediction(value=612.5, units="ppm"))
    config = discovery_config(doc, insight_topic=INSIGHT_TOPIC, status_topic=STATUS_TOPIC)
    text = json.dumps(doc)
    assert float(render(config["value_template"], text)) == 612.5
    assert json.loads(render(config["json_attributes_template"], text))["units"] == "ppm"


@pytest.mark.parametrize(
    ("state", "available"),
    [
        ("online", "online"),
        ("idle", "online"),
        ("training", "online"),
        ("not_ready", "online"),
        ("offline", "offline"),
    ],
)
def test_availability_follows_the_status_and_the_last_will_says_offline(state: str, available: str) -> None:
    assert render(AVAILABILITY, json.dumps(device_status(DEVICE, state))) == available
    assert render(AVAILABILITY, offline_will(DEVICE).decode()) == "offline"


# --- when it is published -------------------------------------------------------------------------


def test_the_config_goes_out_once_per_connection_and_when_the_task_changes(
    har_task: TaskSpec, regression_task: TaskSpec
) -> None:
    sent: list[tuple[str, bytes]] = []
    accept = [True]

    def publish(topic: str, data: bytes) -> bool:
        if accept[0]:
            sent.append((topic, data))
        return accept[0]

    ha = HomeAssistantDiscovery("homeassistant", FLEET, DEVICE, INSIGHT_TOPIC, STATUS_TOPIC, publish)
    ha.ensure(1)
    assert sent == []  # nothing to announce before the first prediction
    ha.prediction_published(payload(har_task, classified(har_task, "ABD")), 1)
    last_class = (har_task.label.classes or ())[-1]
    ha.prediction_published(payload(har_task, classified(har_task, last_class), version=8), 1)
    ha.ensure(1)
    assert [t for t, _ in sent] == [discovery_topic("homeassistant", FLEET, DEVICE)]  # same config
    ha.ensure(2)  # a new connection: once more
    assert len(sent) == 2 and sent[0][1] == sent[1][1]
    ha.prediction_published(payload(regression_task, Prediction(value=1.0, units="ppm")), 2)
    assert len(sent) == 3 and json.loads(sent[2][1])["state_class"] == "measurement"
    accept[0] = False
    ha.ensure(3)
    assert ha.report() == {"topic": sent[0][0], "published": 3, "failed": 1}
    accept[0] = True
    ha.ensure(3)  # refused once, handed over the next turn
    assert ha.report()["published"] == 4
