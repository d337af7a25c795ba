"""EdgeX device profiles and device lists: loading, core-metadata's rules, the spec, task checks."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import fedge.agent.edgex.profile as profile_module
from fedge.agent.edgex.profile import (
    MAX_PROFILE_BYTES,
    MAX_YAML_DEPTH,
    DeviceProfile,
    ProfileError,
    TaskProfileMismatch,
    check_devices_against_profiles,
    check_task_against_profile,
    load_devices,
    load_profile,
    parse_go_duration,
)
from fedge.agent.edgex.readings import VALUE_TYPES
from fedge.protocol.task import TaskSpec
from fedge.tools.edgex_provision import device_dto
from support.openapi_specs import SPEC_VERSIONS, schema_errors, shared_dir
from support.tasks import task_variant

REPO = Path(__file__).resolve().parents[2]
PROFILE_DIR = REPO / "edgex_profiles"
FEDGE_PROFILES = sorted(p for p in PROFILE_DIR.glob("*.yaml") if not p.name.startswith("devices"))
IMU_CHANNELS = ("accel_x", "accel_y", "accel_z", "gyro_x", "gyro_y", "gyro_z")
HAR_CLASSES = ("PEN", "ABD", "FEL", "IR", "ER", "TRAP", "ROW")


def virtual_dir() -> Path:
    path = shared_dir() / "edgex" / "device-virtual-v4.0.2"
    if not path.is_dir():
        pytest.skip(f"device-virtual profiles not found at {path}")
    return path


def profiles_by_name() -> dict[str, DeviceProfile]:
    return {p.name: p for p in (load_profile(f) for f in FEDGE_PROFILES)}


# --- real EdgeX profiles --------------------------------------------------------------------------

VIRTUAL_PROFILES = ("binary", "bool", "float", "int", "object", "uint")


@pytest.mark.parametrize("kind", VIRTUAL_PROFILES)
def test_every_real_device_virtual_profile_loads(kind: str) -> None:
    path = virtual_dir() / f"device.virtual.{kind}.yaml"
    profile = load_profile(path)
    raw = yaml.safe_load(path.read_text())
    assert profile.name == raw["name"]
    assert profile.resource_names == tuple(r["name"] for r in raw["deviceResources"])
    assert len(profile.commands) == len(raw.get("deviceCommands") or [])
    assert profile.source == str(path)


def test_object_types_of_device_virtual_follow_edgex_not_the_spec() -> None:
    # The specs' valueType enum omits Object and ObjectArray; EdgeX itself ships them.
    profile = load_profile(virtual_dir() / "device.virtual.object.yaml")
    assert [r.value_type for r in profile.resources] == ["Object", "ObjectArray"]
    raw = yaml.safe_load((virtual_dir() / "device.virtual.object.yaml").read_text())
    for version in SPEC_VERSIONS:
        errors = list(schema_errors(version, "DeviceProfile", raw))
        assert errors and all("valueType" in e for e in errors)


def test_real_device_virtual_device_list_loads_and_matches_its_profiles() -> None:
    devices = load_devices(virtual_dir() / "devices.yaml")
    assert [d.name for d in devices][:2] == ["Random-Boolean-Device", "Random-Integer-Device"]
    assert devices[0].protocols == {"other": {"Address": "device-virtual-bool-01", "Port": 300}}
    assert devices[0].auto_events[0].interval_ns == 10 * 10**9
    assert devices[4].auto_events == ()  # the binary device's autoEvents are commented out
    profiles = {p.name: p for p in (load_profile(f) for f in virtual_dir().glob("device.virtual.*.yaml"))}
    check_devices_against_profiles(devices, profiles)


# --- fedge's profiles -----------------------------------------------------------------------------


def test_fedge_ships_the_four_building_profiles() -> None:
    names = sorted(profiles_by_name())
    assert names == ["Electrical-Power-Meter", "HVAC-Unit", "Room-Environment-Sensor", "Wearable-IMU"]


@pytest.mark.parametrize("version", SPEC_VERSIONS)
@pytest.mark.parametrize("path", FEDGE_PROFILES, ids=lambda p: p.stem)
def test_fedge_profiles_validate_against_the_specs_device_profile_schema(path: Path, version: str) -> None:
    load_profile(path)
    raw = yaml.safe_load(path.read_text())
    for schema in ("DeviceProfile", "CreateDeviceProfile"):
        assert list(schema_errors(version, schema, raw)) == []


def test_wearable_imu_profile_matches_the_demo_data() -> None:
    imu = load_profile(PROFILE_DIR / "wearable-imu.yaml")
    assert imu.resource_names == (*IMU_CHANNELS, "activity")
    for name in IMU_CHANNELS:
        r = imu.resource(name)
        assert r is not None and r.value_type == "Float32" and r.readable and not r.writable
        assert r.minimum is not None and r.maximum is not None and r.minimum == -r.maximum
    assert imu.resource("accel_x").units == "g"  # type: ignore[union-attr]
    assert imu.resource("gyro_z").units == "rad/s"  # type: ignore[union-attr]
    activity = imu.resource("activity")
    assert activity is not None and activity.value_type == "String"
    assert all(c in activity.description for c in HAR_CLASSES)
    command = imu.command("imu")
    assert command is not None and command.read_write == "R"
    assert command.resources == (*IMU_CHANNELS, "activity")


def test_hvac_setpoint_is_writable_and_readable() -> None:
    hvac = load_profile(PROFILE_DIR / "hvac-unit.yaml")
    setpoint = hvac.resource("setpoint")
    assert setpoint is not None and setpoint.read_write == "RW"
    assert (setpoint.minimum, setpoint.maximum, setpoint.units) == (16, 30, "degC")
    assert set(hvac.resource_names) >= {"supply_temperature", "return_temperature", "fan_speed", "mode"}
    control = hvac.command("control")
    assert control is not None and control.read_write == "RW"


def test_fedge_device_list_has_the_seven_demo_watches() -> None:
    devices = load_devices(PROFILE_DIR / "devices.yaml")
    watches = [d for d in devices if d.profile_name == "Wearable-IMU"]
    assert [d.name for d in watches] == [f"watch-{i:02d}" for i in range(1, 8)]
    for watch in watches:
        (event,) = watch.auto_events
        assert (event.source_name, event.interval, event.interval_ns, event.on_change) == (
            "imu", "20ms", 20_000_000, False)
        assert watch.protocols == {"other": {"Address": watch.name}}
    assert {d.profile_name for d in devices} == set(profiles_by_name())
    check_devices_against_profiles(devices, profiles_by_name())


@pytest.mark.parametrize("version", SPEC_VERSIONS)
def test_fedge_devices_as_sent_validate_against_the_specs(version: str) -> None:
    for device in load_devices(PROFILE_DIR / "devices.yaml"):
        assert list(schema_errors(version, "CreateDevice", device_dto(device, "device-virtual"))) == []
        update = device_dto(device, "device-virtual", update=True)
        assert list(schema_errors(version, "UpdateDevice", update)) == []


# --- malformed profiles: each with its exact error ------------------------------------------------

GOOD = """\
name: "Probe"
deviceResources:
  - name: "a"
    properties: {valueType: "Float32", readWrite: "R"}
  - name: "b"
    properties: {valueType: "Float32", readWrite: "RW"}
deviceCommands:
  - name: "both"
    readWrite: "R"
    resourceOperations: [{deviceResource: "a"}, {deviceResource: "b"}]
"""


def resources(*lines: str) -> str:
    return "name: Probe\ndeviceResources:\n" + "".join(f"  {line}\n" for line in lines)


MALFORMED: list[tuple[str, str, str]] = [
    ("missing name", "deviceResources: []\n", "name: missing"),
    ("empty name", "name: '  '\n", "name: must not be empty"),
    ("name not a string", "name: 42\n", "name: must be a string, not a number (quote it)"),
    ("reserved char in name", "name: 'a/b'\n", "name: 'a/b' contains '/'; names may not contain / # + $"),
    ("resource without name", resources("- properties: {valueType: Bool, readWrite: R}"),
     "deviceResources[0].name: missing"),
    ("missing properties", resources("- name: x"),
     "deviceResources[0].properties: missing (valueType and readWrite are required)"),
    ("missing valueType", resources("- {name: x, properties: {readWrite: R}}"),
     "deviceResources[0].properties.valueType: missing"),
    ("unknown valueType", resources("- {name: a, properties: {valueType: Bool, readWrite: R}}",
                                    "- {name: b, properties: {valueType: Bool, readWrite: R}}",
                                    "- {name: c, properties: {valueType: Bool, readWrite: R}}",
                                    "- {name: d, properties: {valueType: Float, readWrite: R}}"),
     "deviceResources[3].properties.valueType: unknown value type 'Float'; expected one of: "
     + ", ".join(VALUE_TYPES)),
    ("bad readWrite", resources("- {name: x, properties: {valueType: Bool, readWrite: RX}}"),
     "deviceResources[0].properties.readWrite: 'RX' is not one of R, W, RW, WR"),
    ("lower-case readWrite", resources("- {name: x, properties: {valueType: Bool, readWrite: r}}"),
     "deviceResources[0].properties.readWrite: 'r' is not one of R, W, RW, WR"),
    ("writable Binary", resources("- {name: x, properties: {valueType: Binary, readWrite: RW}}"),
     "deviceResources[0].properties.readWrite: write permission is not supported for Binary values"),
    ("quoted minimum", resources("- {name: x, properties: {valueType: Int8, readWrite: R, minimum: '-5'}}"),
     "deviceResources[0].properties.minimum: must be a number, not a string ('-5'); write it without quotes"),
    ("boolean maximum", resources("- {name: x, properties: {valueType: Int8, readWrite: R, maximum: true}}"),
     "deviceResources[0].properties.maximum: must be a number, not a boolean"),
    ("infinite maximum",
     resources("- {name: x, properties: {valueType: Float64, readWrite: R, maximum: .inf}}"),
     "deviceResources[0].properties.maximum: must be finite"),
    ("minimum above maximum",
     resources("- {name: x, properties: {valueType: Float32, readWrite: R, minimum: 5, maximum: -5}}"),
     "deviceResources[0].properties.minimum: 5 is greater than maximum -5"),
    ("negative mask", resources("- {name: x, properties: {valueType: Uint8, readWrite: R, mask: -1}}"),
     f"deviceResources[0].properties.mask: must be in 0..{2**64 - 1}"),
    ("unquoted defaultValue",
     resources("- {name: x, properties: {valueType: Bool, readWrite: R, defaultValue: no}}"),
     "deviceResources[0].properties.defaultValue: must be a string, not a boolean (quote it)"),
    ("typo in a key", resources("- {name: x, properties: {valuetype: Bool, readWrite: R}}"),
     "deviceResources[0].properties.valuetype: unknown key; expected one of: assertion, base, "
     "defaultValue, mask, maximum, mediaType, minimum, offset, optional, readWrite, scale, shift, "
     "units, valueType"),
    ("unknown top-level key", "name: x\ndeviceCommand: []\n",
     "deviceCommand: unknown key; expected one of: apiVersion, created, description, deviceCommands, "
     "deviceResources, id, labels, manufacturer, model, modified, name"),
    ("duplicate resource", resources("- {name: x, properties: {valueType: Bool, readWrite: R}}",
                                     "- {name: x, properties: {valueType: Int8, readWrite: R}}"),
     "deviceResources[1].name: device resource 'x' is duplicated"),
    ("resources not a list", "name: x\ndeviceResources: {name: y}\n",
     "deviceResources: must be a list, not a mapping"),
    ("command references a missing resource",
     GOOD.replace('{deviceResource: "b"}', '{deviceResource: "zz"}'),
     "deviceCommands[0].resourceOperations[1].deviceResource: 'zz' does not match any device resource"),
    ("command references a near-miss",
     GOOD.replace('name: "a"', 'name: "accel_x"')
     .replace('{deviceResource: "a"}', '{deviceResource: "acel_x"}'),
     "deviceCommands[0].resourceOperations[0].deviceResource: 'acel_x' does not match any device "
     "resource (did you mean 'accel_x'?)"),
    ("duplicate command",
     GOOD + '  - {name: "both", readWrite: "R", resourceOperations: [{deviceResource: "a"}]}\n',
     "deviceCommands[1].name: device command 'both' is duplicated"),
    ("command without operations", GOOD + '  - {name: "none", readWrite: "R", resourceOperations: []}\n',
     "deviceCommands[1].resourceOperations: needs at least one resource operation"),
    ("command readWrite not aligned",
     GOOD.replace('readWrite: "R"\n    resourceOperations', 'readWrite: "W"\n    resourceOperations'),
     "deviceCommands[0].readWrite: 'W' does not align with resource 'a', which is 'R'"),
    ("command name with a dot", GOOD.replace('name: "both"', 'name: "read.both"'),
     "deviceCommands[0].name: 'read.both' may only contain letters, digits and - _ ~"),
    ("list at the root", "- name: x\n", "<root>: must be a mapping, not a list"),
    ("scalar at the root", "just text\n", "<root>: must be a mapping, not a string"),
    ("empty document", "", "<root>: must be a mapping, not null"),
    ("comment only", "# nothing here\n", "<root>: must be a mapping, not null"),
    ("several documents", "name: a\n---\nname: b\n", "<yaml>: expected one YAML document, found several"),
    ("syntax error", "name: [a, b\n",
     "<yaml>: not valid YAML: expected ',' or ']', but got '<stream end>' (line 2, column 1)"),
    ("duplicate key", "name: a\nname: b\n", "<root>: duplicate key 'name'"),
    ("duplicate nested key",
     resources("- {name: x, properties: {valueType: Bool, valueType: Int8, readWrite: R}}"),
     "deviceResources[0].properties: duplicate key 'valueType'"),
    ("alias", "name: &n probe\nmodel: *n\n", "name: YAML anchors and aliases (&x, *x) are not allowed"),
    ("python object tag", "name: !!python/object/apply:os.system ['true']\n",
     "name: YAML tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed"),
    ("local tag", "name: !secret x\n", "name: YAML tag '!secret' is not allowed"),
    ("set tag", "labels: !!set {a, b}\nname: x\n", "labels: YAML tag 'tag:yaml.org,2002:set' is not allowed"),
    ("complex key", "? [a, b]\n: c\n", "<root>: mapping keys must be plain strings"),
    ("labels not strings", "name: x\nlabels: [a, 1]\n", "labels[1]: must be a string, not a number"),
]


@pytest.mark.parametrize(("text", "expected"), [(t, e) for _, t, e in MALFORMED],
                         ids=[name for name, _, _ in MALFORMED])
def test_malformed_profile_is_refused_with_its_path(text: str, expected: str) -> None:
    with pytest.raises(ProfileError) as info:
        load_profile(text)
    assert str(info.value) == expected
    assert info.value.path == expected.split(": ", 1)[0]


def test_errors_do_not_depend_on_libyaml(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without libyaml, the event pass uses PyYAML's pure-Python parser: same verdicts, same words.
    monkeypatch.setattr(profile_module, "_FAST_LOADER", yaml.SafeLoader)
    for name, text, expected in MALFORMED:
        with pytest.raises(ProfileError) as info:
            load_profile(text)
        assert str(info.value) == expected, name
    assert load_profile(PROFILE_DIR / "wearable-imu.yaml").name == "Wearable-IMU"


def test_good_probe_profile_loads() -> None:
    profile = load_profile(GOOD)
    assert profile.resource_names == ("a", "b")
    assert profile.command("both").resources == ("a", "b")  # type: ignore[union-attr]


def test_billion_laughs_is_refused_before_expansion() -> None:
    lines = ['a0: &a0 "lol"']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    lines.append("name: *a9")
    with pytest.raises(ProfileError) as info:
        load_profile("\n".join(lines) + "\n")
    assert str(info.value) == "a0: YAML anchors and aliases (&x, *x) are not allowed"


def test_deep_nesting_is_refused_without_recursion() -> None:
    text = "name: x\nlabels: " + "[" * 100_000 + "]" * 100_000 + "\n"
    with pytest.raises(ProfileError) as info:
        load_profile(text)
    assert info.value.problem == f"nested deeper than {MAX_YAML_DEPTH} levels"
    assert info.value.path.startswith("labels[0][0]")


def test_huge_text_is_refused_before_parsing() -> None:
    text = "name: x\ndescription: '" + "x" * MAX_PROFILE_BYTES + "'\n"
    with pytest.raises(ProfileError) as info:
        load_profile(text)
    assert str(info.value) == f"<file>: larger than the limit of {MAX_PROFILE_BYTES} bytes"


def test_huge_file_is_refused_before_reading_it_whole(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    with path.open("wb") as f:
        f.truncate(64 * MAX_PROFILE_BYTES)  # sparse: 64 MiB that take no disk
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert str(info.value) == f"{path}: <file>: larger than the limit of {MAX_PROFILE_BYTES} bytes"
    assert load_profile(GOOD, max_bytes=len(GOOD)).name == "Probe"
    with pytest.raises(ProfileError, match="larger than the limit of 10 bytes"):
        load_profile(GOOD.encode(), max_bytes=10)


def test_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(resources("- {name: x, properties: {valueType: Nope, readWrite: R}}"))
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert str(info.value).startswith(
        f"{path}: deviceResources[0].properties.valueType: unknown value type 'Nope'")
    assert info.value.source == str(path)
    with pytest.raises(ProfileError, match=r"^\S+missing\.yaml: <file>: cannot read: No such file"):
        load_profile(tmp_path / "missing.yaml")


def test_non_utf8_bytes_are_refused() -> None:
    with pytest.raises(ProfileError) as info:
        load_profile(b"name: \xff\xfe\n", name="x.yaml")
    assert str(info.value) == "x.yaml: <file>: not UTF-8 text"


def test_edgex_leniencies_are_followed() -> None:
    profile = load_profile(resources(
        "- {name: t, properties: {valueType: float32, readWrite: WR, minimum: -1.5, maximum: 2}}",
        "- {name: o, properties: {valueType: objectarray, readWrite: R}}",
        "- {name: 'Temp Sensor 1', description: , properties: {valueType: STRING, readWrite: W, units: }}",
    ))
    t, o, s = profile.resources
    assert (t.value_type, t.read_write, t.minimum, t.maximum, t.readable, t.writable) == (
        "Float32", "WR", -1.5, 2.0, True, True)
    assert o.value_type == "ObjectArray"
    assert (s.name, s.value_type, s.description, s.units, s.readable) == (
        "Temp Sensor 1", "String", "", "", False)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_either_loads_or_fails_with_a_profile_error(text: str) -> None:
    with contextlib.suppress(ProfileError):
        load_profile(text)


@settings(max_examples=100, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["name", "deviceResources", "properties", "valueType", "readWrite",
                         "deviceCommands", "resourceOperations", "deviceResource", "minimum"]),
        children, max_size=4),
    max_leaves=20,
))
def test_arbitrary_structures_either_load_or_fail_with_a_profile_error(data: object) -> None:
    with contextlib.suppress(ProfileError):
        load_profile(yaml.safe_dump(data))


# --- device lists ---------------------------------------------------------------------------------


def devices(*entry_lines: str) -> str:
    head = "deviceList:\n  - name: d1\n    profileName: P\n"
    return head + "".join(f"    {line}\n" for line in entry_lines)


PROTOCOLS = "protocols: {other: {Address: d1}}"

MALFORMED_DEVICES: list[tuple[str, str, str]] = [
    ("no deviceList", "devices: []\n", "devices: unknown key; expected one of: deviceList"),
    ("empty mapping", "{}\n", "deviceList: missing"),
    ("missing protocols", devices(), "deviceList[0].protocols: missing (at least one protocol is required)"),
    ("empty protocols", devices("protocols: {}"), "deviceList[0].protocols: needs at least one protocol"),
    ("nested protocol value", devices("protocols: {other: {Address: {host: x}}}"),
     "deviceList[0].protocols.other.Address: must be a string or a number"),
    ("missing profileName", "deviceList:\n  - {name: d1, protocols: {other: {A: b}}}\n",
     "deviceList[0].profileName: missing"),
    ("bad adminState", devices(PROTOCOLS, "adminState: ENABLED"),
     "deviceList[0].adminState: 'ENABLED' is not one of LOCKED, UNLOCKED"),
    ("interval with a space", devices(PROTOCOLS, "autoEvents: [{interval: 20 ms, sourceName: imu}]"),
     "deviceList[0].autoEvents[0].interval: '20 ms' is not a duration like 20ms, 10s or 1h30m"),
    ("interval below 1ms", devices(PROTOCOLS, "autoEvents: [{interval: 500us, sourceName: imu}]"),
     "deviceList[0].autoEvents[0].interval: '500us' is shorter than EdgeX's minimum of 1ms"),
    ("interval as a number", devices(PROTOCOLS, "autoEvents: [{interval: 20, sourceName: imu}]"),
     "deviceList[0].autoEvents[0].interval: must be a string, not a number (quote it)"),
    ("autoEvent without source", devices(PROTOCOLS, "autoEvents: [{interval: 1s}]"),
     "deviceList[0].autoEvents[0].sourceName: missing"),
    ("v2 field name", devices(PROTOCOLS, "autoEvents: [{interval: 1s, resource: imu}]"),
     "deviceList[0].autoEvents[0].resource: unknown key; expected one of: interval, onChange, "
     "onChangeThreshold, retention, sourceName"),
    ("negative threshold",
     devices(PROTOCOLS, "autoEvents: [{interval: 1s, sourceName: imu, onChangeThreshold: -1}]"),
     "deviceList[0].autoEvents[0].onChangeThreshold: must be >= 0"),
    ("duplicate device", devices(PROTOCOLS) + "  - {name: d1, profileName: P, " + PROTOCOLS + "}\n",
     "deviceList[1].name: device 'd1' is duplicated"),
]


@pytest.mark.parametrize(("text", "expected"), [(t, e) for _, t, e in MALFORMED_DEVICES],
                         ids=[name for name, _, _ in MALFORMED_DEVICES])
def test_malformed_device_list_is_refused_with_its_path(text: str, expected: str) -> None:
    with pytest.raises(ProfileError) as info:
        load_devices(text)
    assert str(info.value) == expected


def test_auto_events_must_name_a_readable_source_of_the_profile() -> None:
    profile = load_profile(GOOD.replace('readWrite: "RW"}', 'readWrite: "W"}').replace(
        '{deviceResource: "b"}', '{deviceResource: "a"}'))
    listed = load_devices(devices(PROTOCOLS, "autoEvents: [{interval: 1s, sourceName: bth}]"))
    with pytest.raises(ProfileError) as info:
        check_devices_against_profiles(listed, {"P": profile})
    assert str(info.value) == ("device 'd1': autoEvents[0].sourceName: 'bth' is neither a resource nor a "
                               "command of profile 'Probe' (did you mean 'both'?)")
    listed = load_devices(devices(PROTOCOLS, "autoEvents: [{interval: 1s, sourceName: b}]"))
    with pytest.raises(ProfileError) as info:
        check_devices_against_profiles(listed, {"P": profile})
    assert str(info.value) == "device 'd1': autoEvents[0].sourceName: 'b' cannot be read (readWrite is W)"
    good = load_devices(devices(PROTOCOLS, "autoEvents: [{interval: 1s, sourceName: both}]"))
    check_devices_against_profiles(good, {"P": profile})
    check_devices_against_profiles(listed, {})  # unknown profile: left to core-metadata


@pytest.mark.parametrize(("text", "ns"), [
    ("20ms", 20_000_000), ("1h30m", 5_400_000_000_000), ("1.5s", 1_500_000_000), ("0", 0),
    ("300us", 300_000), ("2µs", 2_000), ("-1s", -1_000_000_000), (".5m", 30_000_000_000),
])
def test_go_durations_parse(text: str, ns: int) -> None:
    assert parse_go_duration(text) == ns


@pytest.mark.parametrize("text", ["", "20", "ms", "1d", "1.s.", "+", "1 s", "1sm", "."])
def test_invalid_go_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_go_duration(text)


# --- task vs profile ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imu_text() -> str:
    return (PROFILE_DIR / "wearable-imu.yaml").read_text()


def label_as(imu_text: str, value_type: str) -> DeviceProfile:
    """The IMU profile with its label resource ``activity`` of another value type."""
    return load_profile(imu_text.replace('valueType: "String"', f'valueType: "{value_type}"'))


def test_har_watch_task_fits_the_wearable_imu_profile(har_task: TaskSpec, imu_text: str) -> None:
    check_task_against_profile(har_task, load_profile(imu_text))


def test_other_profiles_do_not_fit_the_har_task(har_task: TaskSpec) -> None:
    with pytest.raises(TaskProfileMismatch) as info:
        check_task_against_profile(har_task, load_profile(PROFILE_DIR / "power-meter.yaml"))
    assert str(info.value) == ("task 'har-watch' vs profile 'Electrical-Power-Meter': features.resources[0]: "
                               "resource 'accel_x' is not in the profile")


def test_typo_in_a_feature_name_is_named(har_task: TaskSpec, imu_text: str) -> None:
    names = ["accel_x", "accel_y", "acel_z", "gyro_x", "gyro_y", "gyro_z"]
    task = task_variant(har_task, {"features.resources": names})
    with pytest.raises(TaskProfileMismatch) as info:
        check_task_against_profile(task, load_profile(imu_text))
    assert str(info.value) == ("task 'har-watch' vs profile 'Wearable-IMU': features.resources[2]: "
                               "resource 'acel_z' is not in the profile (did you mean 'accel_z'?)")
    assert (info.value.field, info.value.resource) == ("features.resources[2]", "acel_z")


def test_non_numeric_feature_is_refused(har_task: TaskSpec, imu_text: str) -> None:
    task = task_variant(har_task, {"features.resources": [*IMU_CHANNELS[:5], "activity"],
                                   "label.resource": "gyro_z"})
    with pytest.raises(TaskProfileMismatch) as info:
        check_task_against_profile(task, load_profile(imu_text))
    assert str(info.value).endswith("features.resources[5]: resource 'activity' is String, not a number; "
                                    "features need one of Bool, Int8, Int16, Int32, Int64, Uint8, "
                                    "Uint16, Uint32, Uint64, Float32, Float64")


def test_write_only_resources_cannot_feed_a_task(har_task: TaskSpec, imu_text: str) -> None:
    text = (imu_text.replace('readWrite: "R"\n      units: "g"', 'readWrite: "W"\n      units: "g"', 1)
            .replace('      - { deviceResource: "accel_x" }\n', ""))
    with pytest.raises(TaskProfileMismatch) as info:
        check_task_against_profile(har_task, load_profile(text))
    assert info.value.problem == "resource 'accel_x' cannot be read (readWrite is 'W')"


def test_missing_label_resource_is_named(har_task: TaskSpec, imu_text: str) -> None:
    task = task_variant(har_task, {"label.resource": "exercise"})
    with pytest.raises(TaskProfileMismatch) as info:
        check_task_against_profile(task, load_profile(imu_text))
    assert str(info.value) == ("task 'har-watch' vs profile 'Wearable-IMU': label.resource: "
                               "resource 'exercise' is not in the profile")


def test_float_label_cannot_name_classes(har_task: TaskSpec, imu_text: str) -> None:
    with pytest.raises(TaskProfileMismatch) as info:
        check_task_against_profile(har_task, label_as(imu_text, "Float32"))
    assert info.value.problem == ("resource 'activity' is Float32; a class label must be one of String, "
                                  "Bool, Int8, Int16, Int32, Int64, Uint8, Uint16, Uint32, Uint64")


def test_int_and_bool_class_labels(har_task: TaskSpec, imu_text: str) -> None:
    check_task_against_profile(har_task, label_as(imu_text, "Uint8"))
    with pytest.raises(TaskProfileMismatch) as info:
        check_task_against_profile(har_task, label_as(imu_text, "Bool"))
    assert info.value.problem == "a Bool label has 2 classes, the task lists 7"


@pytest.mark.parametrize("classes", [
    ["false", "true"], ["TRUE", "False"], ["0", "1"], ["vacant", "occupied"],
])
def test_bool_labels_with_two_fitting_classes(har_task: TaskSpec, imu_text: str, classes: list[str]) -> None:
    check_task_against_profile(task_variant(har_task, {"label.classes": classes}), label_as(imu_text, "Bool"))


@pytest.mark.parametrize("classes", [["true", "yes"], ["0", "true"], ["no", "1"]])
def test_bool_label_classes_naming_one_value_are_refused(
    har_task: TaskSpec, imu_text: str, classes: list[str]
) -> None:
    task = task_variant(har_task, {"label.classes": classes})
    with pytest.raises(TaskProfileMismatch) as info:
        check_task_against_profile(task, label_as(imu_text, "Bool"))
    assert (info.value.field, info.value.resource) == ("label.classes", "activity")
    assert info.value.problem == (
        "a Bool label's classes name both values ('false' and 'true', or '0' and '1', any case and "
        "order) or neither (then the first class is false, the second true); "
        f"the task lists {classes}"
    )


def test_regression_label_must_be_numeric(har_task: TaskSpec, imu_text: str) -> None:
    task = task_variant(har_task, {"model.kind": "regression", "label.classes": None})
    with pytest.raises(TaskProfileMismatch) as info:
        check_task_against_profile(task, load_profile(imu_text))
    assert info.value.problem.startswith(
        "resource 'activity' is String; a regression label needs one of Bool")
    check_task_against_profile(task, label_as(imu_text, "Float64"))


def test_building_profiles_have_sensible_ranges() -> None:
    for profile in profiles_by_name().values():
        for r in profile.resources:
            if r.numeric and r.value_type != "Bool":
                assert r.minimum is not None and r.maximum is not None, (profile, r.name)
                assert math.isfinite(r.minimum) and r.minimum < r.maximum
