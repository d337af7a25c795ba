"""fedge's AsyncAPI document (``docs/asyncapi.yaml``) for tests: load it, find AsyncAPI's own
JSON Schema, map a topic to its channel, validate a payload against the channel's message.

AsyncAPI's schemas come from the npm package ``@asyncapi/specs``, which ``make install``
installs into ``.cache/asyncapi`` (override the schemas directory with
``FEDGE_ASYNCAPI_SCHEMAS``). Missing schemas skip the test, or fail it when ``CI`` is set, so CI
never passes by validating nothing.

Use::

    doc = load_document()
    channel = doc.channel_for("fedge/v1/demo/status/watch-01")   # Channel, or None
    channel.validate(payload_bytes)          # AssertionError naming what does not match
    channel.send_bindings                    # {(application, qos, retain)} of its send operations
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from support.mqtt_fixtures import in_ci

REPO = Path(__file__).resolve().parents[2]
DOCUMENT = REPO / "docs" / "asyncapi.yaml"
SPECS_DIR = REPO / ".cache" / "asyncapi" / "node_modules" / "@asyncapi" / "specs" / "schemas"
_URI = "urn:fedge:asyncapi"
FRAME_KINDS = {"sealed": 1, "payload": 2, "signed": 3}


def asyncapi_schema(version: str = "3.0.0") -> dict[str, Any]:
    """AsyncAPI's JSON Schema of ``version`` (the ``-without-$id`` variant: one file, draft-07)."""
    directory = Path(os.environ.get("FEDGE_ASYNCAPI_SCHEMAS", SPECS_DIR))
    path = directory / f"{version}-without-$id.json"
    if not path.is_file():
        message = f"AsyncAPI's JSON Schema {path} is missing: run make install (npm @asyncapi/specs)"
        if in_ci():
            pytest.fail(f"{message}; CI must validate docs/asyncapi.yaml", pytrace=False)
        pytest.skip(message)
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema


@dataclass(frozen=True)
class Channel:
    key: str
    address: str
    regex: re.Pattern[str]
    messages: tuple[dict[str, Any], ...]
    send_bindings: frozenset[tuple[str, int, bool]]
    validators: tuple[Draft7Validator | None, ...] = field(repr=False)

    @property
    def binary(self) -> bool:
        return all(m.get("contentType") == "application/octet-stream" for m in self.messages)

    @property
    def retained(self) -> bool:
        return any(retain for _, _, retain in self.send_bindings)

    def parameters(self, topic: str) -> dict[str, str]:
        match = self.regex.fullmatch(topic)
        assert match is not None, f"{topic} is not on channel {self.key}"
        return match.groupdict()

    def validate(self, topic: str, payload: bytes) -> None:
        """Raises AssertionError if ``payload`` matches none of the channel's messages. An empty
        payload on a retained channel is a cleared retained message, valid everywhere."""
        if not payload:
            assert self.retained, f"empty payload on {topic}, which is not a retained channel"
            return
        problems = [
            _problem(m, v, self, topic, payload) for m, v in zip(self.messages, self.validators, strict=True)
        ]
        if any(p is None for p in problems):
            return
        raise AssertionError(f"{topic} ({self.key}): " + "; ".join(str(p) for p in problems))


def _problem(
    message: dict[str, Any], validator: Draft7Validator | None, channel: Channel, topic: str, payload: bytes
) -> str | None:
    if message.get("contentType") == "application/octet-stream":
        frame = message.get("x-fedge-frame")
        if frame == "none":
            sha = channel.parameters(topic).get("sha256")
            if sha is not None and hashlib.sha256(payload).hexdigest() != sha:
                return "blob bytes do not hash to the topic's sha256"
            return None
        if payload[:4] != b"FEDG" or len(payload) < 16 or payload[4] != 1:
            return f"not a fedge frame (starts {payload[:8]!r})"
        if payload[5] != FRAME_KINDS[str(frame)]:
            return f"frame kind {payload[5]}, the channel says {frame}"
        return None
    try:
        document = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        return f"not JSON: {exc}"
    assert validator is not None
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    if errors:
        return "; ".join(
            f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors[:5]
        )
    return None


@dataclass(frozen=True)
class Document:
    raw: dict[str, Any]
    channels: dict[str, Channel]

    def channel_for(self, topic: str) -> Channel | None:
        found = [c for c in self.channels.values() if c.regex.fullmatch(topic)]
        assert len(found) <= 1, f"{topic} matches several channels: {[c.key for c in found]}"
        return found[0] if found else None

    def resolve(self, ref: str) -> Any:
        assert ref.startswith("#/"), ref
        node: Any = self.raw
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return node

    def payload_validator(self, schema_ref: str) -> Draft7Validator:
        registry: Registry = Registry().with_resource(_URI, Resource(contents=self.raw, specification=DRAFT7))
        return Draft7Validator({"$ref": f"{_URI}{schema_ref}"}, registry=registry)


@functools.cache
def load_document(path: Path = DOCUMENT) -> Document:
    raw: dict[str, Any] = yaml.safe_load(path.read_text())
    doc = Document(raw, {})
    sends: dict[str, set[tuple[str, int, bool]]] = {}
    for op in raw["operations"].values():
        key = op["channel"]["$ref"].rsplit("/", 1)[-1]
        if op["action"] == "send":
            mqtt = op.get("bindings", {}).get("mqtt", {})
            sends.setdefault(key, set()).add(
                (op["x-fedge-application"], mqtt.get("qos", 0), mqtt.get("retain", False))
            )
    for key, channel in raw["channels"].items():
        regex = _address_regex(doc, channel)
        messages = tuple(doc.resolve(m["$ref"]) for m in channel["messages"].values())
        validators = tuple(
            None
            if m.get("contentType") == "application/octet-stream"
            else doc.payload_validator(m["payload"]["$ref"])
            for m in messages
        )
        doc.channels[key] = Channel(
            key, channel["address"], regex, messages, frozenset(sends.get(key, ())), validators
        )
    return doc


def _address_regex(doc: Document, channel: dict[str, Any]) -> re.Pattern[str]:
    """The channel's address as a regex: each ``{name}`` is its parameter's ``x-pattern``."""
    params = {
        name: doc.resolve(p["$ref"]) if "$ref" in p else p
        for name, p in channel.get("parameters", {}).items()
    }
    out, pos = [], 0
    address = channel["address"]
    for match in re.finditer(r"\{([^}]+)\}", address):
        out.append(re.escape(address[pos : match.start()]))
        pattern = params[match.group(1)]["x-pattern"].removeprefix("^").removesuffix("$")
        out.append(f"(?P<{match.group(1)}>{pattern})")
        pos = match.end()
    out.append(re.escape(address[pos:]))
    return re.compile("".join(out))
