"""``fedge edgex provision`` against a core-metadata double, every message checked against the spec.

Each test runs for both EdgeX API specs (v3.1.1 and v4.0.2): the double validates every request
fedge sends and every response it serves against the spec of the version under test, and the
``double`` fixture fails the test if any did not match.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openapi_core import OpenAPI

from fedge.tools.edgex_provision import (
    ProvisionError,
    ProvisionReport,
    add_edgex_parser,
    discover,
    provision,
    render_report,
)
from support.edgex_metadata_double import MetadataDouble, Recorded
from support.openapi_specs import SPEC_VERSIONS, SpecMismatch, load_spec, validate_request, validate_response

REPO = Path(__file__).resolve().parents[2]
PROFILE_DIR = REPO / "edgex_profiles"
IMU = PROFILE_DIR / "wearable-imu.yaml"
PROFILE_NAMES = ["Electrical-Power-Meter", "HVAC-Unit", "Room-Environment-Sensor", "Wearable-IMU"]
Files = tuple[list[Path], list[Path]]
TOKEN = "eyJhbGciOiJFUzM4NCJ9.eyJpc3MiOiJ0ZXN0In0.c2lnbmF0dXJl"


@pytest.fixture(params=SPEC_VERSIONS)
def spec(request: pytest.FixtureRequest) -> OpenAPI:
    return load_spec(request.param)


@pytest.fixture
def double(spec: OpenAPI) -> Iterator[MetadataDouble]:
    with MetadataDouble(spec) as d:
        yield d
    assert d.spec_errors == [], "\n\n".join(d.spec_errors)


@pytest.fixture
def files() -> Files:
    return discover(PROFILE_DIR)


def run(double: MetadataDouble, files: Files, **kwargs: object) -> ProvisionReport:
    return provision(double.url, files[0], files[1], timeout=5, **kwargs)  # type: ignore[arg-type]


def routes(double: MetadataDouble) -> list[str]:
    return [f"{r.method} {r.path}" for r in double.requests]


def test_discover_splits_profiles_from_device_lists(files: Files) -> None:
    profiles, devices = files
    assert [p.name for p in profiles] == [
        "hvac-unit.yaml",
        "power-meter.yaml",
        "room-environment-sensor.yaml",
        "wearable-imu.yaml",
    ]
    assert [p.name for p in devices] == ["devices.yaml"]


def test_first_run_creates_every_profile_and_device(double: MetadataDouble, files: Files) -> None:
    report = run(double, files)
    assert report.ok and report.count("created") == 15 and report.count("updated") == 0
    assert sorted(double.state.profiles) == PROFILE_NAMES
    assert len(double.state.devices) == 11
    assert routes(double) == ["POST /api/v3/deviceprofile/uploadfile"] * 4 + ["POST /api/v3/device"]
    for path in files[0]:  # the exact bytes of each file, in the form field 'file'
        name = next(n for n, text in double.state.profile_yaml.items() if text == path.read_text())
        item = next(i for i in report.items if i.name == name)
        assert item.id == double.state.profiles[name]["id"]
    watch = double.state.devices["watch-03"]
    assert watch["serviceName"] == "device-virtual" and watch["profileName"] == "Wearable-IMU"
    assert watch["adminState"] == "UNLOCKED" and watch["operatingState"] == "UP"
    assert watch["autoEvents"] == [{"interval": "20ms", "onChange": False, "sourceName": "imu"}]
    assert watch["protocols"] == {"other": {"Address": "watch-03"}}
    sent = json.loads(double.requests[-1].body)
    assert all(item["apiVersion"] == "v3" and len(item["requestId"]) == 36 for item in sent)


def test_second_run_updates_and_duplicates_nothing(double: MetadataDouble, files: Files) -> None:
    run(double, files)
    ids = {name: p["id"] for name, p in double.state.profiles.items()}
    double.requests.clear()
    report = run(double, files)
    assert report.ok and report.count("updated") == 15 and report.count("created") == 0
    assert [(i.kind, i.action, i.status_code) for i in report.items[:4]] == [("profile", "updated", 200)] * 4
    assert {(i.kind, i.action, i.status_code) for i in report.items[4:]} == {("device", "updated", 200)}
    assert len(double.state.profiles) == 4 and len(double.state.devices) == 11
    assert {name: p["id"] for name, p in double.state.profiles.items()} == ids
    assert routes(double) == [
        "POST /api/v3/deviceprofile/uploadfile",
        "PUT /api/v3/deviceprofile/uploadfile",
    ] * 4 + ["POST /api/v3/device", "PATCH /api/v3/device"]
    patch = json.loads(double.requests[-1].body)
    assert "adminState" not in patch[0]["device"]  # an operator's LOCK survives a re-provision


def test_changes_in_files_reach_core_metadata(double: MetadataDouble, tmp_path: Path) -> None:
    src = tmp_path / "profiles"
    shutil.copytree(PROFILE_DIR, src)
    provision(double.url, *discover(src), timeout=5)
    imu = src / "wearable-imu.yaml"
    imu.write_text(imu.read_text().replace("Wrist-worn 6-axis IMU", "Wrist-worn IMU, firmware 2"))
    devices = src / "devices.yaml"
    devices.write_text(devices.read_text().replace("interval: 20ms", "interval: 40ms"))
    report = provision(double.url, *discover(src), timeout=5)
    assert report.ok
    assert double.state.profiles["Wearable-IMU"]["description"].startswith("Wrist-worn IMU, firmware 2")
    assert double.state.devices["watch-01"]["autoEvents"][0]["interval"] == "40ms"


def test_a_207_with_failing_items_is_reported_per_item(double: MetadataDouble, tmp_path: Path) -> None:
    (tmp_path / "devices.yaml").write_text(
        "deviceList:\n"
        "  - {name: watch-01, profileName: Wearable-IMU, protocols: {other: {Address: w1}}}\n"
        "  - {name: ghost, profileName: No-Such-Profile, protocols: {other: {Address: g}}}\n"
        "  - {name: stray, profileName: Wearable-IMU, serviceName: device-rest,"
        " protocols: {other: {Address: s}}}\n"
        "  - {name: watch-02, profileName: Wearable-IMU, protocols: {other: {Address: w2}}}\n"
    )
    report = provision(double.url, [IMU], [tmp_path / "devices.yaml"], timeout=5)
    assert not report.ok
    assert [(i.name, i.action, i.status_code, i.message) for i in report.items] == [
        ("Wearable-IMU", "created", 201, ""),
        ("watch-01", "created", 201, ""),
        ("ghost", "failed", 404, "device profile 'No-Such-Profile' does not exists"),
        ("stray", "failed", 400, "device service 'device-rest' does not exists"),
        ("watch-02", "created", 201, ""),
    ]
    assert [i.name for i in report.failed] == ["ghost", "stray"]
    assert sorted(double.state.devices) == ["watch-01", "watch-02"]
    text = render_report(report)
    assert "device  ghost         failed  (404) device profile 'No-Such-Profile' does not exists" in text
    assert text.endswith("3 created, 0 updated, 2 failed")


def test_a_refused_batch_fails_each_device(double: MetadataDouble, files: Files) -> None:
    def refuse(rec: Recorded) -> tuple[int, Any] | None:
        if (rec.method, rec.path) == ("POST", "/api/v3/device"):
            return 400, {
                "apiVersion": "v3",
                "statusCode": 400,
                "message": "AddDeviceRequest.Device.AutoEvents[0].Interval field should follows "
                "the ISO 8601 Durations format",
            }
        return None

    double.intercept = refuse
    report = run(double, files)
    devices = [i for i in report.items if i.kind == "device"]
    assert len(devices) == 11 and {(i.action, i.status_code) for i in devices} == {("failed", 400)}
    assert devices[0].message.startswith("AddDeviceRequest.Device.AutoEvents[0].Interval")
    assert report.count("created") == 4  # the profiles


def test_token_is_sent_as_a_bearer_header(spec: OpenAPI, files: Files) -> None:
    with MetadataDouble(spec, token=TOKEN) as double:
        report = run(double, files, token=TOKEN)
        run(double, files, token=TOKEN)
    assert double.spec_errors == []
    assert report.ok
    assert len(double.requests) == 4 + 1 + 8 + 2
    assert {r.headers["Authorization"] for r in double.requests} == {f"Bearer {TOKEN}"}


def test_missing_or_wrong_token_is_a_clear_error(spec: OpenAPI, files: Files) -> None:
    with MetadataDouble(spec, token=TOKEN) as double:
        with pytest.raises(ProvisionError) as missing:
            run(double, files)
        with pytest.raises(ProvisionError) as wrong:
            run(double, files, token="not-the-token")
    assert str(missing.value) == (
        f"core-metadata at {double.url} answered 401 to POST /deviceprofile/uploadfile: "
        "EdgeX in secure mode needs a JWT (--token or $FEDGE_EDGEX_TOKEN)"
    )
    assert str(wrong.value).endswith("answered 401 to POST /deviceprofile/uploadfile: the token was refused")
    assert "Authorization" not in double.requests[0].headers
    assert double.requests[1].headers["Authorization"] == "Bearer not-the-token"
    assert double.spec_errors == []
    # The specs document no 401 at all: secure mode's answer cannot be validated.
    with pytest.raises(SpecMismatch, match="Unknown response http status: 401"):
        validate_response(
            spec,
            "POST",
            "http://localhost:59881/api/v3/device",
            401,
            b'{"apiVersion":"v3","statusCode":401}',
            {"Content-Type": "application/json"},
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_connection_refused_is_a_clear_error(files: Files) -> None:
    port = free_port()
    with pytest.raises(ProvisionError) as info:
        provision(f"http://127.0.0.1:{port}", *files, timeout=2)
    assert str(info.value) == (
        f"cannot connect to core-metadata at http://127.0.0.1:{port}: connection refused"
    )


def test_a_silent_server_times_out(files: Files) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)  # accepts connections (backlog) but never answers
        port = server.getsockname()[1]
        with pytest.raises(ProvisionError) as info:
            provision(f"http://127.0.0.1:{port}", *files, timeout=0.3)
    assert str(info.value) == (
        f"core-metadata at http://127.0.0.1:{port} did not answer POST /deviceprofile/uploadfile within 0.3s"
    )


def test_a_server_that_is_not_core_metadata_is_named(files: Files) -> None:
    # No spec: this test sends to a wrong path on purpose.
    with MetadataDouble() as double, pytest.raises(ProvisionError) as info:
        provision(f"{double.url}/core-data", *files, timeout=5)
    assert str(info.value) == (
        f"POST {double.url}/core-data/api/v3/deviceprofile/uploadfile answered 404: "
        f"is {double.url}/core-data core-metadata (EdgeX 3 or 4, default port 59881)?"
    )


def test_invalid_files_stop_before_any_request(double: MetadataDouble, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: Bad\ndeviceResources:\n  - {name: x, properties: {valueType: Float, readWrite: R}}\n"
    )
    expected = rf"^{bad}: deviceResources\[0\]\.properties\.valueType: unknown"
    with pytest.raises(ProvisionError, match=expected):
        provision(double.url, [IMU, bad], [], timeout=5)
    typo = tmp_path / "devices.yaml"
    typo.write_text(
        "deviceList:\n  - {name: w, profileName: Wearable-IMU, protocols: {other: {A: w}},"
        " autoEvents: [{interval: 20ms, sourceName: imu_all}]}\n"
    )
    with pytest.raises(ProvisionError) as info:
        provision(double.url, [IMU], [typo], timeout=5)
    assert str(info.value) == (
        "device 'w': autoEvents[0].sourceName: 'imu_all' is neither a resource nor a "
        "command of profile 'Wearable-IMU' (did you mean 'imu'?)"
    )
    dup = tmp_path / "copy.yaml"
    shutil.copy(PROFILE_DIR / "hvac-unit.yaml", dup)
    with pytest.raises(ProvisionError, match="profile 'HVAC-Unit' is also defined in"):
        provision(double.url, [PROFILE_DIR / "hvac-unit.yaml", dup], [], timeout=5)
    assert double.requests == []


def test_urls_and_arguments(double: MetadataDouble, files: Files) -> None:
    report = provision(f"{double.url}/api/v3/", *files, timeout=5)
    assert report.metadata_url == double.url and report.ok
    for url in ("localhost:59881", "ftp://host/", "http://"):
        with pytest.raises(ProvisionError, match="--metadata must be an http"):
            provision(url, *files)
    with pytest.raises(ProvisionError, match="timeout must be > 0"):
        provision(double.url, *files, timeout=0)


def test_service_name_and_bypass_validation(double: MetadataDouble, files: Files) -> None:
    double.state.services.add("device-rest")
    report = run(double, files, service_name="device-rest", bypass_validation=True)
    assert report.ok and report.service_name == "device-rest"
    assert {d["serviceName"] for d in double.state.devices.values()} == {"device-rest"}
    device_calls = [r for r in double.requests if r.path.endswith("/device")]
    assert device_calls and all(r.query == {"bypassValidation": "true"} for r in device_calls)


def test_many_devices_go_in_batches(double: MetadataDouble, tmp_path: Path) -> None:
    lines = ["deviceList:"] + [
        f"  - {{name: w{i:03d}, profileName: Wearable-IMU, protocols: {{other: {{Address: w{i}}}}}}}"
        for i in range(230)
    ]
    (tmp_path / "devices.yaml").write_text("\n".join(lines) + "\n")
    report = provision(double.url, [IMU], [tmp_path / "devices.yaml"], timeout=5)
    assert report.ok and report.count("created") == 231
    assert [len(json.loads(r.body)) for r in double.requests if r.path.endswith("/device")] == [100, 100, 30]


def test_cli_command(
    double: MetadataDouble, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    parser = argparse.ArgumentParser(prog="fedge")
    add_edgex_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["edgex", "provision", "--metadata", double.url, "--profiles", str(PROFILE_DIR), "--json"]
    )
    assert (args.service, args.timeout, args.token) == ("device-virtual", 10.0, None)
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["ok"], out["created"], out["updated"], out["failed"]) == (True, 15, 0, 0)
    monkeypatch.setenv("FEDGE_EDGEX_TOKEN", TOKEN)
    args = parser.parse_args(
        [
            "edgex",
            "provision",
            "--metadata",
            double.url,
            "--profiles",
            str(PROFILE_DIR),
            "--service",
            "device-onvif",
        ]
    )
    assert args.func(args) == 1  # unknown device service: every device fails, profiles update
    text = capsys.readouterr().out
    assert "device  watch-07" in text
    assert "failed  (400) device service 'device-onvif' does not exists" in text
    assert text.rstrip().endswith("0 created, 4 updated, 11 failed")
    assert double.requests[-1].headers["Authorization"] == f"Bearer {TOKEN}"


def test_concurrent_runs_do_not_duplicate(double: MetadataDouble, files: Files) -> None:
    reports: list[ProvisionReport] = []
    threads = [threading.Thread(target=lambda: reports.append(run(double, files))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(reports) == 3 and all(r.ok for r in reports)
    assert len(double.state.profiles) == 4 and len(double.state.devices) == 11


# --- the spec's own errors, which the helper corrects (see tests/support/openapi_specs.py) --------------


@pytest.mark.parametrize("version", SPEC_VERSIONS)
def test_raw_specs_reject_what_edgex_accepts(version: str) -> None:
    device = {
        "name": "d",
        "adminState": "UNLOCKED",
        "operatingState": "UP",
        "serviceName": "device-virtual",
        "profileName": "p",
        "protocols": {"other": {"Address": "d", "Port": 300}},
        "autoEvents": [{"interval": "20ms", "onChange": False, "sourceName": "imu"}],
    }
    body = json.dumps([{"apiVersion": "v3", "device": device}])
    url = "http://localhost:59881/api/v3/device"
    headers = {"Content-Type": "application/json"}
    with pytest.raises(SpecMismatch) as info:
        validate_request(load_spec(version, errata=False), "POST", url, body, headers)
    assert "'resource' is a required property" in str(info.value)
    if version == "v3.1.1":
        assert "'d' is not of type 'object'" in str(info.value)
    validate_request(load_spec(version), "POST", url, body, headers)
