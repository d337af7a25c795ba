"""EdgeX device profiles and device lists: safe loading, and core-metadata's rules checked by hand.

A device profile (YAML) says which resources a class of device has, their value types and
whether they can be read or written; a device list (the ``deviceList:`` file device services
read) names the devices of a building and what they report automatically. fedge checks both
before it uploads them and checks a task spec against a profile, so a typo in a resource name
fails at provisioning time with the offending path, not hours later as a device that never
produces a sample.

The rules are the ones core-metadata applies (go-mod-core-contracts ``dtos/deviceprofile.go``,
``dtos/deviceresource.go``, ``dtos/resourceproperties.go``, ``dtos/devicecommand.go``,
``dtos/device.go``, ``dtos/autoevent.go`` and the validators of ``common/validator.go``), written
out here: fedge does not ship EdgeX's OpenAPI spec (the tests compare against it). Where the spec
and running EdgeX disagree, fedge follows EdgeX and says so next to the rule.

YAML is parsed with ``yaml.safe_load`` only, after a bounded size check and one pass over the
parser's events that refuses anchors and aliases (no "billion laughs"), custom tags, duplicate
keys (which EdgeX's Go YAML decoder rejects but PyYAML silently overwrites) and deep nesting.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedge.agent.edgex.readings import INT_RANGES, NUMERIC_TYPES, VALUE_TYPES
from fedge.agent.edgex.samples import bool_class_indices
from fedge.protocol.errors import FedgeError
from fedge.protocol.task import TaskSpec

#: Largest profile file fedge reads (EdgeX's own profiles are a few KiB).
MAX_PROFILE_BYTES = 1 << 20
#: Largest device-list file fedge reads.
MAX_DEVICES_BYTES = 4 << 20
#: Deepest YAML nesting accepted (a profile needs 5 levels).
MAX_YAML_DEPTH = 32

#: ``readWrite`` values core-metadata accepts. The OpenAPI spec lists R, W and RW only; the DTOs
#: (``oneof='R' 'W' 'RW' 'WR'``) also take WR, and fedge follows the DTOs.
READ_WRITE = ("R", "W", "RW", "WR")
ADMIN_STATES = ("LOCKED", "UNLOCKED")
OPERATING_STATES = ("UP", "DOWN", "UNKNOWN")
#: Value types that can label a classification task: a class name, a flag or a class index.
CLASS_LABEL_TYPES: tuple[str, ...] = ("String", "Bool", *INT_RANGES)

# core-metadata matches value types case-insensitively and stores the canonical spelling
# (common.NormalizeValueType). VALUE_TYPES includes Object and ObjectArray: the OpenAPI specs'
# enum omits both, but EdgeX's own device-virtual profile (device.virtual.object.yaml) uses them
# and real services accept them (ObjectArray since EdgeX 4; 3.x knows Object only).
_CANONICAL_VALUE_TYPE = {t.lower(): t for t in VALUE_TYPES}

# Names become MQTT topic levels (edgex/events/device/{service}/{profile}/{device}/{source}), so
# fedge refuses the characters of EdgeX's ``edgex-dto-no-reserved-chars`` rule in every name.
_RESERVED_CHARS_RE = re.compile(r"[/#+$]")
# Device command names keep the ``edgex-dto-rfc3986-unreserved-chars`` rule of the DeviceCommand
# DTO; this is the set both EdgeX 3 and 4 accept.
_COMMAND_NAME_RE = re.compile(r"[A-Za-z0-9_~\-]+")

# Go's time.ParseDuration grammar, e.g. "20ms", "1h30m", "1.5s".
_DURATION_PART_RE = re.compile(r"(\d*\.?\d*)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "μs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
#: The smallest autoEvents interval core-metadata 4 accepts (``edgex-dto-duration=1ms``).
MIN_AUTO_EVENT_NS = 1_000_000

_PROFILE_KEYS = frozenset(
    {
        "id",
        "created",
        "modified",
        "name",
        "manufacturer",
        "description",
        "model",
        "labels",
        "deviceResources",
        "deviceCommands",
        "apiVersion",
    }
)
_RESOURCE_KEYS = frozenset({"name", "description", "isHidden", "properties", "attributes", "tags"})
_PROPERTY_KEYS = frozenset(
    {
        "valueType",
        "readWrite",
        "units",
        "minimum",
        "maximum",
        "defaultValue",
        "mask",
        "shift",
        "scale",
        "offset",
        "base",
        "assertion",
        "mediaType",
        "optional",
    }
)
_COMMAND_KEYS = frozenset({"name", "isHidden", "readWrite", "resourceOperations", "tags"})
_OPERATION_KEYS = frozenset({"deviceResource", "defaultValue", "mappings"})
_DEVICE_KEYS = frozenset(
    {
        "id",
        "created",
        "modified",
        "name",
        "description",
        "adminState",
        "operatingState",
        "labels",
        "location",
        "serviceName",
        "profileName",
        "autoEvents",
        "protocols",
        "tags",
        "properties",
        "parent",
    }
)
_AUTO_EVENT_KEYS = frozenset({"interval", "onChange", "onChangeThreshold", "sourceName", "retention"})
_RETENTION_KEYS = frozenset({"maxCap", "minCap", "duration"})
# Explicit YAML tags that still build plain JSON-like values; anything else (!!python/..., !!set,
# !!binary, local tags) is refused before construction.
_PLAIN_TAGS = frozenset(
    f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "map", "seq")
)


class ProfileError(FedgeError):
    """A profile or device list is invalid; the message names the file and the field path."""

    def __init__(self, path: str, problem: str, source: str = "") -> None:
        where = f"{source}: {path}" if source else path
        super().__init__(f"{where}: {problem}")
        self.path = path
        self.problem = problem
        self.source = source


class TaskProfileMismatch(FedgeError):
    """A task spec asks for a resource its device profile does not offer as needed."""

    def __init__(self, task: str, profile: str, field: str, resource: str, problem: str) -> None:
        super().__init__(f"task {task!r} vs profile {profile!r}: {field}: {problem}")
        self.field = field
        self.resource = resource
        self.problem = problem


@dataclass(frozen=True)
class DeviceResource:
    """One value a device can read or write, with its type and (optional) physical range."""

    name: str
    value_type: str
    read_write: str
    units: str = ""
    minimum: float | None = None
    maximum: float | None = None
    default_value: str = ""
    description: str = ""
    is_hidden: bool = False
    media_type: str = ""
    assertion: str = ""
    mask: int | None = None
    shift: int | None = None
    scale: float | None = None
    offset: float | None = None
    base: float | None = None
    attributes: Mapping[str, Any] = field(default_factory=dict)
    tags: Mapping[str, Any] = field(default_factory=dict)
    optional: Mapping[str, Any] = field(default_factory=dict)

    @property
    def readable(self) -> bool:
        return "R" in self.read_write

    @property
    def writable(self) -> bool:
        return "W" in self.read_write

    @property
    def numeric(self) -> bool:
        """Whether its values can be features or a regression label."""
        return self.value_type in NUMERIC_TYPES


@dataclass(frozen=True)
class ResourceOperation:
    """One resource a device command reads or writes, with an optional fixed value to write."""

    device_resource: str
    default_value: str = ""
    mappings: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DeviceCommand:
    """Several resources read or written together (one event per read)."""

    name: str
    read_write: str
    resource_operations: tuple[ResourceOperation, ...]
    is_hidden: bool = False
    tags: Mapping[str, Any] = field(default_factory=dict)

    @property
    def readable(self) -> bool:
        return "R" in self.read_write

    @property
    def resources(self) -> tuple[str, ...]:
        return tuple(op.device_resource for op in self.resource_operations)


@dataclass(frozen=True)
class DeviceProfile:
    """A whole, validated device profile."""

    name: str
    resources: tuple[DeviceResource, ...]
    commands: tuple[DeviceCommand, ...] = ()
    manufacturer: str = ""
    model: str = ""
    description: str = ""
    labels: tuple[str, ...] = ()
    source: str = ""

    def resource(self, name: str) -> DeviceResource | None:
        return next((r for r in self.resources if r.name == name), None)

    def command(self, name: str) -> DeviceCommand | None:
        return next((c for c in self.commands if c.name == name), None)

    @property
    def resource_names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.resources)


@dataclass(frozen=True)
class AutoEvent:
    """Something a device service reads on its own every ``interval`` (a resource or a command)."""

    interval: str
    source_name: str
    on_change: bool = False
    on_change_threshold: float | None = None
    retention: Mapping[str, Any] | None = None

    @property
    def interval_ns(self) -> int:
        return parse_go_duration(self.interval)


@dataclass(frozen=True)
class Device:
    """One device of a device list: which profile it follows, how to reach it, what it reports.

    ``service_name``, ``admin_state`` and ``operating_state`` are ``None`` when the file leaves
    them to the provisioning tool (device services fill them in the same way).
    """

    name: str
    profile_name: str
    protocols: Mapping[str, Mapping[str, Any]]
    auto_events: tuple[AutoEvent, ...] = ()
    description: str = ""
    labels: tuple[str, ...] = ()
    service_name: str | None = None
    admin_state: str | None = None
    operating_state: str | None = None
    location: Any = None
    tags: Mapping[str, Any] | None = None
    properties: Mapping[str, Any] | None = None
    parent: str | None = None


# --- loading -----------------------------------------------------------------------------------


def read_bounded(path: Path, max_bytes: int) -> bytes:
    """A file's bytes, refusing files over ``max_bytes`` before reading them whole."""
    try:
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise ProfileError("<file>", f"cannot read: {exc.strerror or exc}", str(path)) from None
    if len(data) > max_bytes:
        raise ProfileError("<file>", f"larger than the limit of {max_bytes} bytes", str(path))
    return data


def load_profile(
    source: str | bytes | Path, *, max_bytes: int = MAX_PROFILE_BYTES, name: str = ""
) -> DeviceProfile:
    """Parses and validates a device profile: YAML text (``str``/``bytes``) or a file (``Path``).

    ``name`` labels errors for text input (a ``Path`` labels them with itself).
    """
    data, where = _load_yaml(source, max_bytes, name)
    return profile_from_dict(data, source=where)


def load_devices(
    source: str | bytes | Path, *, max_bytes: int = MAX_DEVICES_BYTES, name: str = ""
) -> tuple[Device, ...]:
    """Parses and validates a device list (``deviceList: [...]``, as device services read it)."""
    data, where = _load_yaml(source, max_bytes, name)
    return devices_from_dict(data, source=where)


def _load_yaml(source: str | bytes | Path, max_bytes: int, where: str) -> tuple[Any, str]:
    if isinstance(source, Path):
        where = str(source)
        source = read_bounded(source, max_bytes)
    if isinstance(source, bytes):
        if len(source) > max_bytes:
            raise ProfileError("<file>", f"larger than the limit of {max_bytes} bytes", where)
        try:
            text = source.decode("utf-8")
        except UnicodeDecodeError:
            raise ProfileError("<file>", "not UTF-8 text", where) from None
    else:
        text = source
        if len(text) > max_bytes or len(text.encode("utf-8", "surrogatepass")) > max_bytes:
            raise ProfileError("<file>", f"larger than the limit of {max_bytes} bytes", where)
    import yaml  # noqa: PLC0415 - only while a profile is parsed (see _yaml)

    _check_yaml_events(text, where)
    try:
        return yaml.safe_load(text), where
    except yaml.YAMLError as exc:  # the event pass parsed it already; kept as a safety net
        raise ProfileError("<yaml>", f"not valid YAML: {exc}", where) from None


@dataclass
class _Frame:
    is_mapping: bool
    path: str
    keys: set[str] = field(default_factory=set)
    expect_key: bool = True
    index: int = 0
    current: str = ""


#: The event pass's parser; None: libyaml's when PyYAML has it (tests set the pure-Python one).
_FAST_LOADER: Any = None


def _check_yaml_events(text: str, where: str) -> None:
    """One pass over the parser's events, before anything is constructed.

    libyaml's parser (when PyYAML has it) makes the pass cheap; errors are re-parsed with the
    pure-Python parser so their wording does not depend on how PyYAML was built."""
    import yaml  # noqa: PLC0415 - PyYAML loads with the first profile parsed, not with the agent

    fast: Any = _FAST_LOADER if _FAST_LOADER is not None else getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    if fast is not yaml.SafeLoader:
        try:
            _scan_events(text, where, fast)
            return
        except ProfileError as exc:
            if exc.path != "<yaml>":
                raise
    _scan_events(text, where, yaml.SafeLoader)


def _scan_events(text: str, where: str, loader: Any) -> None:
    import yaml  # noqa: PLC0415

    stack: list[_Frame] = []
    documents = 0

    def child_path() -> str:
        if not stack:
            return "<root>"
        top = stack[-1]
        if top.is_mapping:
            return f"{top.path}.{top.current}" if top.path != "<root>" else top.current
        return f"{top.path}[{top.index}]" if top.path != "<root>" else f"[{top.index}]"

    def node_done() -> None:
        if not stack:
            return
        top = stack[-1]
        if top.is_mapping:
            top.expect_key = True
        else:
            top.index += 1

    try:
        for event in yaml.parse(text, Loader=loader):
            if isinstance(event, yaml.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    raise ProfileError("<yaml>", "expected one YAML document, found several", where)
                continue
            if not isinstance(event, (yaml.NodeEvent, yaml.CollectionEndEvent)):
                continue
            in_key = bool(stack) and stack[-1].is_mapping and stack[-1].expect_key
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                at = stack[-1].path if in_key else child_path()
                raise ProfileError(at, "YAML anchors and aliases (&x, *x) are not allowed", where)
            tag = getattr(event, "tag", None)
            if tag is not None and tag != "!" and tag not in _PLAIN_TAGS:
                at = stack[-1].path if in_key else child_path()
                raise ProfileError(at, f"YAML tag {tag!r} is not allowed", where)
            if isinstance(event, yaml.CollectionEndEvent):
                stack.pop()
                node_done()
                continue
            if in_key:
                top = stack[-1]
                if not isinstance(event, yaml.ScalarEvent):
                    raise ProfileError(top.path, "mapping keys must be plain strings", where)
                key = event.value
                if key in top.keys:
                    raise ProfileError(top.path, f"duplicate key {key!r}", where)
                top.keys.add(key)
                top.current = key
                top.expect_key = False
                continue
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                if len(stack) >= MAX_YAML_DEPTH:
                    raise ProfileError(child_path(), f"nested deeper than {MAX_YAML_DEPTH} levels", where)
                stack.append(_Frame(isinstance(event, yaml.MappingStartEvent), child_path()))
                continue
            node_done()  # a scalar value
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ProfileError("<yaml>", f"not valid YAML: {problem}{at}", where) from None


# --- profile validation -------------------------------------------------------------------------


def profile_from_dict(data: Any, source: str = "") -> DeviceProfile:
    """Validates a parsed profile as core-metadata would, and builds a :class:`DeviceProfile`."""
    v = _Validator(source)
    top = v.mapping(data, "<root>")
    v.only_keys(top, "", _PROFILE_KEYS)
    name = v.name(top, "name", "name")
    resources_raw = v.seq(top, "deviceResources", "deviceResources")
    resources: list[DeviceResource] = []
    seen: set[str] = set()
    for i, raw in enumerate(resources_raw):
        resource = _resource(v, raw, f"deviceResources[{i}]")
        if resource.name in seen:
            raise v.error(f"deviceResources[{i}].name", f"device resource {resource.name!r} is duplicated")
        seen.add(resource.name)
        resources.append(resource)
    by_name = {r.name: r for r in resources}
    commands: list[DeviceCommand] = []
    seen = set()
    for i, raw in enumerate(v.seq(top, "deviceCommands", "deviceCommands")):
        command = _command(v, raw, f"deviceCommands[{i}]", by_name)
        if command.name in seen:
            raise v.error(f"deviceCommands[{i}].name", f"device command {command.name!r} is duplicated")
        seen.add(command.name)
        commands.append(command)
    return DeviceProfile(
        name=name,
        resources=tuple(resources),
        commands=tuple(commands),
        manufacturer=v.string(top, "manufacturer", "manufacturer"),
        model=v.string(top, "model", "model"),
        description=v.string(top, "description", "description"),
        labels=v.strings(top, "labels", "labels"),
        source=source,
    )


def _resource(v: _Validator, raw: Any, path: str) -> DeviceResource:
    r = v.mapping(raw, path)
    v.only_keys(r, path, _RESOURCE_KEYS)
    name = v.name(r, "name", f"{path}.name")
    ppath = f"{path}.properties"
    if "properties" not in r:
        raise v.error(ppath, "missing (valueType and readWrite are required)")
    p = v.mapping(r["properties"], ppath)
    v.only_keys(p, ppath, _PROPERTY_KEYS)
    value_type = v.required_string(p, "valueType", f"{ppath}.valueType")
    canonical = _CANONICAL_VALUE_TYPE.get(value_type.lower())
    if canonical is None:
        raise v.error(
            f"{ppath}.valueType",
            f"unknown value type {value_type!r}; expected one of: {', '.join(VALUE_TYPES)}",
        )
    read_write = v.required_string(p, "readWrite", f"{ppath}.readWrite")
    if read_write not in READ_WRITE:
        raise v.error(f"{ppath}.readWrite", f"{read_write!r} is not one of R, W, RW, WR")
    # EdgeX refuses writes of Binary values (dtos.ValidateDeviceProfileDTO).
    if canonical == "Binary" and "W" in read_write:
        raise v.error(f"{ppath}.readWrite", "write permission is not supported for Binary values")
    minimum = v.number(p, "minimum", f"{ppath}.minimum")
    maximum = v.number(p, "maximum", f"{ppath}.maximum")
    if minimum is not None and maximum is not None and minimum > maximum:
        # Not checked by EdgeX; fedge uses the range to sanity-check readings.
        raise v.error(f"{ppath}.minimum", f"{minimum:g} is greater than maximum {maximum:g}")
    return DeviceResource(
        name=name,
        value_type=canonical,
        read_write=read_write,
        units=v.string(p, "units", f"{ppath}.units"),
        minimum=minimum,
        maximum=maximum,
        default_value=v.string(p, "defaultValue", f"{ppath}.defaultValue"),
        description=v.string(r, "description", f"{path}.description"),
        is_hidden=v.boolean(r, "isHidden", f"{path}.isHidden"),
        media_type=v.string(p, "mediaType", f"{ppath}.mediaType"),
        assertion=v.string(p, "assertion", f"{ppath}.assertion"),
        mask=v.integer(p, "mask", f"{ppath}.mask", 0, 2**64 - 1),
        shift=v.integer(p, "shift", f"{ppath}.shift", -(2**63), 2**63 - 1),
        scale=v.number(p, "scale", f"{ppath}.scale"),
        offset=v.number(p, "offset", f"{ppath}.offset"),
        base=v.number(p, "base", f"{ppath}.base"),
        attributes=v.optional_mapping(r, "attributes", f"{path}.attributes"),
        tags=v.optional_mapping(r, "tags", f"{path}.tags"),
        optional=v.optional_mapping(p, "optional", f"{ppath}.optional"),
    )


def _command(v: _Validator, raw: Any, path: str, resources: Mapping[str, DeviceResource]) -> DeviceCommand:
    c = v.mapping(raw, path)
    v.only_keys(c, path, _COMMAND_KEYS)
    name = v.name(c, "name", f"{path}.name")
    if not _COMMAND_NAME_RE.fullmatch(name):
        raise v.error(f"{path}.name", f"{name!r} may only contain letters, digits and - _ ~")
    read_write = v.required_string(c, "readWrite", f"{path}.readWrite")
    if read_write not in READ_WRITE:
        raise v.error(f"{path}.readWrite", f"{read_write!r} is not one of R, W, RW, WR")
    ops_raw = v.seq(c, "resourceOperations", f"{path}.resourceOperations")
    if not ops_raw:
        raise v.error(f"{path}.resourceOperations", "needs at least one resource operation")
    ops: list[ResourceOperation] = []
    for j, raw_op in enumerate(ops_raw):
        opath = f"{path}.resourceOperations[{j}]"
        o = v.mapping(raw_op, opath)
        v.only_keys(o, opath, _OPERATION_KEYS)
        target = v.required_string(o, "deviceResource", f"{opath}.deviceResource")
        resource = resources.get(target)
        if resource is None:
            raise v.error(
                f"{opath}.deviceResource",
                f"{target!r} does not match any device resource{_suggest(target, resources)}",
            )
        # EdgeX: a command's readWrite must be the resource's, unless the resource is RW/WR.
        if resource.read_write not in ("RW", "WR") and resource.read_write != read_write:
            raise v.error(
                f"{path}.readWrite",
                f"{read_write!r} does not align with resource {target!r}, which is {resource.read_write!r}",
            )
        mappings = v.optional_mapping(o, "mappings", f"{opath}.mappings")
        for key, value in mappings.items():
            if not isinstance(value, str):
                raise v.error(f"{opath}.mappings.{key}", "must be a string")
        ops.append(
            ResourceOperation(target, v.string(o, "defaultValue", f"{opath}.defaultValue"), dict(mappings))
        )
    return DeviceCommand(
        name,
        read_write,
        tuple(ops),
        v.boolean(c, "isHidden", f"{path}.isHidden"),
        v.optional_mapping(c, "tags", f"{path}.tags"),
    )


# --- device list validation ---------------------------------------------------------------------


def devices_from_dict(data: Any, source: str = "") -> tuple[Device, ...]:
    """Validates a parsed device list as core-metadata would validate each AddDeviceRequest."""
    v = _Validator(source)
    top = v.mapping(data, "<root>")
    v.only_keys(top, "", frozenset({"deviceList"}))
    if "deviceList" not in top:
        raise v.error("deviceList", "missing")
    devices: list[Device] = []
    seen: set[str] = set()
    for i, raw in enumerate(v.seq(top, "deviceList", "deviceList")):
        device = _device(v, raw, f"deviceList[{i}]")
        if device.name in seen:
            raise v.error(f"deviceList[{i}].name", f"device {device.name!r} is duplicated")
        seen.add(device.name)
        devices.append(device)
    return tuple(devices)


def _device(v: _Validator, raw: Any, path: str) -> Device:
    d = v.mapping(raw, path)
    v.only_keys(d, path, _DEVICE_KEYS)
    name = v.name(d, "name", f"{path}.name")
    profile_name = v.name(d, "profileName", f"{path}.profileName")
    service_name = v.name(d, "serviceName", f"{path}.serviceName") if d.get("serviceName") else None
    admin_state = _state(v, d, "adminState", f"{path}.adminState", ADMIN_STATES)
    operating_state = _state(v, d, "operatingState", f"{path}.operatingState", OPERATING_STATES)
    ppath = f"{path}.protocols"
    if "protocols" not in d:
        raise v.error(ppath, "missing (at least one protocol is required)")
    protocols_raw = v.mapping(d["protocols"], ppath)
    if not protocols_raw:
        raise v.error(ppath, "needs at least one protocol")
    protocols: dict[str, dict[str, Any]] = {}
    for proto, props in protocols_raw.items():
        props_map = v.mapping(props, f"{ppath}.{proto}")
        for key, value in props_map.items():
            # models.ProtocolProperties is map[string]any since EdgeX 3: strings and numbers.
            if isinstance(value, (Mapping, list)) or value is None:
                raise v.error(f"{ppath}.{proto}.{key}", "must be a string or a number")
        protocols[str(proto)] = dict(props_map)
    events: list[AutoEvent] = []
    for j, raw_event in enumerate(v.seq(d, "autoEvents", f"{path}.autoEvents")):
        events.append(_auto_event(v, raw_event, f"{path}.autoEvents[{j}]"))
    parent = v.name(d, "parent", f"{path}.parent") if d.get("parent") else None
    tags = v.optional_mapping(d, "tags", f"{path}.tags") if "tags" in d else None
    properties = v.optional_mapping(d, "properties", f"{path}.properties") if "properties" in d else None
    return Device(
        name=name,
        profile_name=profile_name,
        protocols=protocols,
        auto_events=tuple(events),
        description=v.string(d, "description", f"{path}.description"),
        labels=v.strings(d, "labels", f"{path}.labels"),
        service_name=service_name,
        admin_state=admin_state,
        operating_state=operating_state,
        location=d.get("location"),
        tags=tags,
        properties=properties,
        parent=parent,
    )


def _state(v: _Validator, d: Mapping[str, Any], key: str, path: str, allowed: tuple[str, ...]) -> str | None:
    if d.get(key) is None:
        return None
    value = v.string(d, key, path)
    if value not in allowed:
        raise v.error(path, f"{value!r} is not one of {', '.join(allowed)}")
    return value


def _auto_event(v: _Validator, raw: Any, path: str) -> AutoEvent:
    e = v.mapping(raw, path)
    v.only_keys(e, path, _AUTO_EVENT_KEYS)
    interval = v.required_string(e, "interval", f"{path}.interval")
    try:
        ns = parse_go_duration(interval)
    except ValueError:
        raise v.error(f"{path}.interval", f"{interval!r} is not a duration like 20ms, 10s or 1h30m") from None
    if ns < MIN_AUTO_EVENT_NS:
        raise v.error(f"{path}.interval", f"{interval!r} is shorter than EdgeX's minimum of 1ms")
    source_name = v.required_string(e, "sourceName", f"{path}.sourceName")
    threshold = v.number(e, "onChangeThreshold", f"{path}.onChangeThreshold")
    if threshold is not None and threshold < 0:
        raise v.error(f"{path}.onChangeThreshold", "must be >= 0")
    retention: dict[str, Any] | None = None
    if e.get("retention") is not None:
        rpath = f"{path}.retention"
        r = v.mapping(e["retention"], rpath)
        v.only_keys(r, rpath, _RETENTION_KEYS)
        retention = dict(r)
    return AutoEvent(
        interval, source_name, v.boolean(e, "onChange", f"{path}.onChange"), threshold, retention
    )


def parse_go_duration(text: str) -> int:
    """Nanoseconds of a Go duration string (``time.ParseDuration``); ``ValueError`` if invalid."""
    s = text
    sign = 1
    if s[:1] in ("+", "-"):
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    if s == "0":
        return 0
    if not s:
        raise ValueError(text)
    total = 0.0
    pos = 0
    while pos < len(s):
        m = _DURATION_PART_RE.match(s, pos)
        if m is None or m.group(1) in ("", "."):
            raise ValueError(text)
        total += float(m.group(1)) * _DURATION_NS[m.group(2)]
        pos = m.end()
    return sign * round(total)


def check_devices_against_profiles(devices: Sequence[Device], profiles: Mapping[str, DeviceProfile]) -> None:
    """Each device's autoEvents name a readable resource or command of its profile (when known).

    Devices whose profile is not in ``profiles`` are left to core-metadata (it may know it).
    """
    for device in devices:
        profile = profiles.get(device.profile_name)
        if profile is None:
            continue
        for j, event in enumerate(device.auto_events):
            path = f"device {device.name!r}: autoEvents[{j}].sourceName"
            resource = profile.resource(event.source_name)
            command = profile.command(event.source_name)
            if resource is None and command is None:
                names = {*profile.resource_names, *(c.name for c in profile.commands)}
                raise ProfileError(
                    path,
                    f"{event.source_name!r} is neither a resource nor a command "
                    f"of profile {profile.name!r}{_suggest(event.source_name, names)}",
                )
            readable = resource.readable if resource is not None else command is not None and command.readable
            if not readable:
                raise ProfileError(path, f"{event.source_name!r} cannot be read (readWrite is W)")


# --- task vs profile ----------------------------------------------------------------------------


def check_task_against_profile(task: TaskSpec, profile: DeviceProfile) -> None:
    """The profile offers what the task needs: readable numeric features and a fitting label."""

    def fail(field_path: str, resource: str, problem: str) -> TaskProfileMismatch:
        return TaskProfileMismatch(task.name, profile.name, field_path, resource, problem)

    def find(field_path: str, name: str) -> DeviceResource:
        resource = profile.resource(name)
        if resource is None:
            raise fail(
                field_path,
                name,
                f"resource {name!r} is not in the profile{_suggest(name, profile.resource_names)}",
            )
        if not resource.readable:
            raise fail(
                field_path, name, f"resource {name!r} cannot be read (readWrite is {resource.read_write!r})"
            )
        return resource

    for i, name in enumerate(task.features.resources):
        path = f"features.resources[{i}]"
        resource = find(path, name)
        if not resource.numeric:
            raise fail(
                path,
                name,
                f"resource {name!r} is {resource.value_type}, not a number; "
                f"features need one of {', '.join(NUMERIC_TYPES)}",
            )
    label = find("label.resource", task.label.resource)
    if task.label.classes is not None:
        if label.value_type not in CLASS_LABEL_TYPES:
            raise fail(
                "label.resource",
                label.name,
                f"resource {label.name!r} is {label.value_type}; "
                f"a class label must be one of {', '.join(CLASS_LABEL_TYPES)}",
            )
        if label.value_type == "Bool" and len(task.label.classes) != 2:
            raise fail(
                "label.classes",
                label.name,
                f"a Bool label has 2 classes, the task lists {len(task.label.classes)}",
            )
        if label.value_type == "Bool" and bool_class_indices(task.label.classes) is None:
            raise fail(
                "label.classes",
                label.name,
                "a Bool label's classes name both values ('false' and 'true', or '0' and '1', any "
                "case and order) or neither (then the first class is false, the second true); "
                f"the task lists {list(task.label.classes)}",
            )
    elif not label.numeric:
        raise fail(
            "label.resource",
            label.name,
            f"resource {label.name!r} is {label.value_type}; "
            f"a regression label needs one of {', '.join(NUMERIC_TYPES)}",
        )


def _suggest(name: str, candidates: Any) -> str:
    import difflib  # noqa: PLC0415 - only for an error message: not in every agent's memory

    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --- typed accessors raising ProfileError with the full path ------------------------------------


class _Validator:
    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, path: str, problem: str) -> ProfileError:
        return ProfileError(path, problem, self.source)

    def mapping(self, value: Any, path: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.error(path, f"must be a mapping, not {_kind(value)}")
        for key in value:
            if not isinstance(key, str):
                raise self.error(path, f"key {key!r} must be a string")
        return value

    def only_keys(self, value: Mapping[str, Any], path: str, allowed: frozenset[str]) -> None:
        for key in value:
            if key not in allowed:
                shown = f"{path}.{key}" if path else key
                raise self.error(shown, f"unknown key; expected one of: {', '.join(sorted(allowed))}")

    def seq(self, value: Mapping[str, Any], key: str, path: str) -> list[Any]:
        raw = value.get(key)
        if raw is None:
            return []
        if not isinstance(raw, list):
            raise self.error(path, f"must be a list, not {_kind(raw)}")
        return raw

    def string(self, value: Mapping[str, Any], key: str, path: str) -> str:
        raw = value.get(key)
        if raw is None:
            return ""
        if not isinstance(raw, str):
            raise self.error(path, f"must be a string, not {_kind(raw)} (quote it)")
        return raw

    def required_string(self, value: Mapping[str, Any], key: str, path: str) -> str:
        if value.get(key) is None:
            raise self.error(path, "missing")
        text = self.string(value, key, path)
        if not text.strip():
            raise self.error(path, "must not be empty")
        return text

    def name(self, value: Mapping[str, Any], key: str, path: str) -> str:
        text = self.required_string(value, key, path)
        bad = _RESERVED_CHARS_RE.search(text)
        if bad:
            raise self.error(path, f"{text!r} contains {bad.group()!r}; names may not contain / # + $")
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
            raise self.error(path, f"{text!r} contains a control character")
        return text

    def strings(self, value: Mapping[str, Any], key: str, path: str) -> tuple[str, ...]:
        items = self.seq(value, key, path)
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise self.error(f"{path}[{i}]", f"must be a string, not {_kind(item)}")
        return tuple(items)

    def boolean(self, value: Mapping[str, Any], key: str, path: str) -> bool:
        raw = value.get(key)
        if raw is None:
            return False
        if not isinstance(raw, bool):
            raise self.error(path, f"must be true or false, not {_kind(raw)}")
        return raw

    def number(self, value: Mapping[str, Any], key: str, path: str) -> float | None:
        raw = value.get(key)
        if raw is None:
            return None
        if isinstance(raw, str):
            # EdgeX 2 wrote these as strings; since 3.0 they are numbers (*float64 in the DTO),
            # and core-metadata refuses a quoted value.
            raise self.error(path, f"must be a number, not a string ({raw!r}); write it without quotes")
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise self.error(path, f"must be a number, not {_kind(raw)}")
        try:
            number = float(raw)
        except OverflowError:
            raise self.error(path, "must be finite") from None
        if not math.isfinite(number):
            raise self.error(path, "must be finite")
        return number

    def integer(self, value: Mapping[str, Any], key: str, path: str, lo: int, hi: int) -> int | None:
        raw = value.get(key)
        if raw is None:
            return None
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise self.error(path, f"must be an integer, not {_kind(raw)}")
        if not lo <= raw <= hi:
            raise self.error(path, f"must be in {lo}..{hi}")
        return raw

    def optional_mapping(self, value: Mapping[str, Any], key: str, path: str) -> dict[str, Any]:
        raw = value.get(key)
        if raw is None:
            return {}
        return dict(self.mapping(raw, path))


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return type(value).__name__
