"""``fedge edgex provision``: put fedge's device profiles and devices into EdgeX core-metadata.

Idempotent: a profile is uploaded (``POST /api/v3/deviceprofile/uploadfile``, the YAML in the
multipart form field ``file``) and, if core-metadata already has one of that name (409), replaced
(``PUT`` on the same path). Devices are added in batches (``POST /api/v3/device``, a JSON array of
``AddDeviceRequest``); core-metadata answers 207 with one status per device, and devices that
already exist (409) are updated with ``PATCH /api/v3/device``. Running it twice therefore
updates, never duplicates. Every profile and device is validated locally first (see
:mod:`fedge.agent.edgex.profile`), so nothing is sent unless all files are valid.

Both EdgeX 3.x and 4.x serve this API as v3. In secure mode core-metadata wants
``Authorization: Bearer <JWT>``.
"""

from __future__ import annotations

import argparse
import json
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from fedge.protocol.errors import FedgeError
from fedge.tools import bundled

if TYPE_CHECKING:
    import requests

    from fedge.agent.edgex.profile import AutoEvent, Device, DeviceProfile

API_PREFIX = "/api/v3"
#: The ``apiVersion`` of request DTOs; EdgeX 3.x and 4.x both speak API v3.
API_VERSION = "v3"
#: Device service that owns devices whose entry names none (EdgeX's simulator, device-virtual).
DEFAULT_SERVICE = "device-virtual"
DEFAULT_TIMEOUT_S = 10.0
#: Environment variable read when no ``--token`` is given (a JWT on a command line is visible
#: to every user of the machine through ``ps``).
TOKEN_ENV = "FEDGE_EDGEX_TOKEN"
#: Devices per POST/PATCH request.
DEVICE_BATCH = 100

Kind = Literal["profile", "device"]
Action = Literal["created", "updated", "failed"]


class ProvisionError(FedgeError):
    """Provisioning cannot go on: core-metadata unreachable, refusing us, or not core-metadata."""


@dataclass(frozen=True)
class ItemResult:
    """What happened to one profile or device: its final HTTP status and EdgeX's message."""

    kind: Kind
    name: str
    action: Action
    status_code: int
    message: str = ""
    id: str = ""

    @property
    def ok(self) -> bool:
        return self.action != "failed"


@dataclass(frozen=True)
class ProvisionReport:
    """Per-item results of one provisioning run, profiles first, in file order."""

    metadata_url: str
    service_name: str
    items: tuple[ItemResult, ...]

    @property
    def ok(self) -> bool:
        return all(item.ok for item in self.items)

    def count(self, action: Action) -> int:
        return sum(1 for item in self.items if item.action == action)

    @property
    def failed(self) -> tuple[ItemResult, ...]:
        return tuple(item for item in self.items if not item.ok)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metadata_url": self.metadata_url,
            "service_name": self.service_name,
            "ok": self.ok,
            "created": self.count("created"),
            "updated": self.count("updated"),
            "failed": self.count("failed"),
            "items": [asdict(item) for item in self.items],
        }


def discover(directory: Path) -> tuple[list[Path], list[Path]]:
    """The profile files and device-list files of a directory (``devices*.yaml`` are lists)."""
    if not directory.is_dir():
        raise ProvisionError(f"{directory} is not a directory")
    files = sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    devices = [p for p in files if p.name.startswith("devices")]
    profiles = [p for p in files if not p.name.startswith("devices")]
    if not files:
        raise ProvisionError(f"no .yaml files in {directory}")
    return profiles, devices


def provision(
    metadata_url: str,
    profiles: Sequence[Path],
    devices: Sequence[Path],
    token: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    *,
    service_name: str = DEFAULT_SERVICE,
    bypass_validation: bool = False,
    session: requests.Session | None = None,
) -> ProvisionReport:
    """Uploads ``profiles`` then adds or updates the devices of the ``devices`` lists.

    Raises :class:`ProvisionError` (a :class:`FedgeError`) when a file is invalid (before any
    request), or core-metadata cannot be reached, refuses the token, or is not core-metadata.
    Per-item failures (e.g. a device whose profile core-metadata does not know) are reported in
    the result, not raised. ``bypass_validation`` skips core-metadata's call to the device
    service to validate new devices (``?bypassValidation=true``); without it, a device service
    that is not running makes each device fail with 503 on EdgeX 3.x.
    """
    from fedge.agent.edgex.profile import (  # noqa: PLC0415 - keeps `fedge --help` light
        MAX_PROFILE_BYTES,
        check_devices_against_profiles,
        load_devices,
        load_profile,
        read_bounded,
    )

    if timeout <= 0:
        raise ProvisionError("timeout must be > 0")
    base = _base_url(metadata_url)
    if not service_name.strip():
        raise ProvisionError("device service name must not be empty")

    uploads: list[tuple[Path, bytes, DeviceProfile]] = []
    by_name: dict[str, DeviceProfile] = {}
    device_list: list[Device] = []
    try:
        for path in profiles:
            data = read_bounded(path, MAX_PROFILE_BYTES)  # upload exactly the bytes validated
            profile = load_profile(data, name=str(path))
            if profile.name in by_name:
                raise ProvisionError(
                    f"{path}: profile {profile.name!r} is also defined in {by_name[profile.name].source}"
                )
            by_name[profile.name] = profile
            uploads.append((path, data, profile))
        seen: dict[str, Path] = {}
        for path in devices:
            for device in load_devices(path):
                if device.name in seen:
                    raise ProvisionError(
                        f"{path}: device {device.name!r} is also defined in {seen[device.name]}"
                    )
                seen[device.name] = path
                device_list.append(device)
        check_devices_against_profiles(device_list, by_name)
    except ProvisionError:
        raise
    except FedgeError as exc:
        raise ProvisionError(str(exc)) from None

    client = _Client(base, token, timeout, session)
    try:
        items = [client.upload_profile(path, data, profile) for path, data, profile in uploads]
        for batch in _batches(device_list, DEVICE_BATCH):
            items.extend(client.provision_devices(batch, service_name, bypass_validation))
    finally:
        client.close()
    return ProvisionReport(base, service_name, tuple(items))


def _base_url(url: str) -> str:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ProvisionError(f"--metadata must be an http(s) URL like http://localhost:59881, got {url!r}")
    path = parts.path.rstrip("/")
    if path.endswith(API_PREFIX):
        path = path[: -len(API_PREFIX)]
    return f"{parts.scheme}://{parts.netloc}{path}"


def _batches(items: Sequence[Device], size: int) -> Iterator[Sequence[Device]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def device_dto(device: Device, service_name: str, *, update: bool = False) -> dict[str, Any]:
    """A device as core-metadata's ``CreateDevice`` (or, with ``update``, ``UpdateDevice``) DTO.

    An update sends every field the file defines, so the stored device ends up as the file
    says; admin/operating state are only sent when the file sets them (never reset a device an
    operator locked).
    """
    dto: dict[str, Any] = {
        "name": device.name,
        "description": device.description,
        "serviceName": device.service_name or service_name,
        "profileName": device.profile_name,
        "labels": list(device.labels),
        "protocols": {name: dict(props) for name, props in device.protocols.items()},
        "autoEvents": [_auto_event_dto(e) for e in device.auto_events],
    }
    if update:
        if device.admin_state is not None:
            dto["adminState"] = device.admin_state
        if device.operating_state is not None:
            dto["operatingState"] = device.operating_state
    else:
        dto["adminState"] = device.admin_state or "UNLOCKED"
        dto["operatingState"] = device.operating_state or "UP"
    optional = {
        "location": device.location,
        "tags": device.tags,
        "properties": device.properties,
        "parent": device.parent,
    }
    dto.update({k: v for k, v in optional.items() if v is not None})
    return dto


def _auto_event_dto(event: AutoEvent) -> dict[str, Any]:
    dto: dict[str, Any] = {
        "interval": event.interval,
        "onChange": event.on_change,
        "sourceName": event.source_name,
    }
    if event.on_change_threshold is not None:  # EdgeX 4 only; EdgeX 3 ignores unknown fields
        dto["onChangeThreshold"] = event.on_change_threshold
    if event.retention is not None:
        dto["retention"] = dict(event.retention)
    return dto


class _Client:
    """core-metadata over HTTP: one session, one correlation ID per run, errors made clear."""

    def __init__(
        self, base: str, token: str | None, timeout: float, session: requests.Session | None
    ) -> None:
        import requests  # noqa: PLC0415

        self.base = base
        self.timeout = timeout
        self.token = token
        self._own_session = session is None
        self.session = session if session is not None else requests.Session()
        self.headers = {"X-Correlation-ID": str(uuid.uuid4())}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"

    def close(self) -> None:
        if self._own_session:
            self.session.close()

    def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        import requests  # noqa: PLC0415

        url = f"{self.base}{API_PREFIX}{path}"
        try:
            response = self.session.request(method, url, headers=self.headers, timeout=self.timeout, **kwargs)
        except requests.Timeout:
            raise ProvisionError(
                f"core-metadata at {self.base} did not answer {method} {path} within {self.timeout:g}s"
            ) from None
        except requests.ConnectionError as exc:
            raise ProvisionError(
                f"cannot connect to core-metadata at {self.base}: {_connection_reason(exc)}"
            ) from None
        except requests.RequestException as exc:
            raise ProvisionError(f"{method} {url} failed: {exc}") from None
        status = response.status_code
        if status in (401, 403):
            hint = (
                "the token was refused"
                if self.token
                else f"EdgeX in secure mode needs a JWT (--token or ${TOKEN_ENV})"
            )
            raise ProvisionError(f"core-metadata at {self.base} answered {status} to {method} {path}: {hint}")
        try:
            body = response.json()
        except ValueError:
            body = None
        if status in (404, 405) and not _is_edgex_body(body):
            raise ProvisionError(
                f"{method} {url} answered {status}: is {self.base} core-metadata "
                f"(EdgeX 3 or 4, default port 59881)?"
            )
        return status, body

    def upload_profile(self, path: Path, data: bytes, profile: DeviceProfile) -> ItemResult:
        files = {"file": (path.name, data, "application/x-yaml")}
        status, body = self.call("POST", "/deviceprofile/uploadfile", files=files)
        if status == 201:
            return ItemResult("profile", profile.name, "created", status, id=_field(body, "id"))
        if status == 409:  # a profile of that name exists: replace it
            status, body = self.call("PUT", "/deviceprofile/uploadfile", files=files)
            if status == 200:
                return ItemResult("profile", profile.name, "updated", status)
        return ItemResult("profile", profile.name, "failed", status, _message(status, body))

    def provision_devices(
        self, devices: Sequence[Device], service_name: str, bypass_validation: bool
    ) -> list[ItemResult]:
        params = {"bypassValidation": "true"} if bypass_validation else None
        requests_ = [_request(device_dto(d, service_name)) for d in devices]
        status, body = self.call("POST", "/device", json=requests_, params=params)
        results: dict[str, ItemResult] = {}
        conflicts: list[Device] = []
        for device, (code, item) in zip(devices, self._multi_status(status, body, requests_), strict=True):
            if code == 201:
                results[device.name] = ItemResult(
                    "device", device.name, "created", code, id=_field(item, "id")
                )
            elif code == 409:
                conflicts.append(device)
            else:
                results[device.name] = ItemResult("device", device.name, "failed", code, _message(code, item))
        if conflicts:  # existing devices: update them to what the file says
            requests_ = [_request(device_dto(d, service_name, update=True)) for d in conflicts]
            status, body = self.call("PATCH", "/device", json=requests_, params=params)
            for device, (code, item) in zip(
                conflicts, self._multi_status(status, body, requests_), strict=True
            ):
                action: Action = "updated" if code == 200 else "failed"
                results[device.name] = ItemResult(
                    "device", device.name, action, code, "" if code == 200 else _message(code, item)
                )
        return [results[d.name] for d in devices]

    def _multi_status(
        self, status: int, body: Any, sent: Sequence[Mapping[str, Any]]
    ) -> list[tuple[int, Any]]:
        """One (statusCode, item) per request sent, matched by requestId (else by position)."""
        if status != 207:
            # The whole batch was refused (e.g. 400: a DTO failed EdgeX's validation).
            return [(status, body)] * len(sent)
        if not isinstance(body, list) or len(body) != len(sent):
            got = len(body) if isinstance(body, list) else type(body).__name__
            raise ProvisionError(f"core-metadata answered 207 with {got} items for {len(sent)} requests")
        index = {req["requestId"]: i for i, req in enumerate(sent)}
        out: list[tuple[int, Any]] = [(0, None)] * len(sent)
        for position, item in enumerate(body):
            if not isinstance(item, Mapping) or not isinstance(item.get("statusCode"), int):
                raise ProvisionError(f"core-metadata's 207 item {position} has no statusCode: {item!r}")
            out[index.get(item.get("requestId", ""), position)] = (item["statusCode"], item)
        return out


def _request(device: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "requestId": str(uuid.uuid4()), "device": device}


def _is_edgex_body(body: Any) -> bool:
    return isinstance(body, Mapping) and "apiVersion" in body and "statusCode" in body


def _field(body: Any, key: str) -> str:
    value = body.get(key) if isinstance(body, Mapping) else None
    return value if isinstance(value, str) else ""


def _message(status: int, body: Any) -> str:
    message = _field(body, "message")
    return message or f"HTTP {status}"


def _connection_reason(exc: Exception) -> str:
    text = str(exc)
    for reason in (
        "Connection refused",
        "Name or service not known",
        "No route to host",
        "Network is unreachable",
        "Temporary failure in name resolution",
    ):
        if reason in text:
            return reason.lower()
    return text


def render_report(report: ProvisionReport) -> str:
    """A line per item and a summary, for people."""
    lines = []
    width = max((len(i.name) for i in report.items), default=0)
    for item in report.items:
        line = f"{item.kind:<7} {item.name:<{width}}  {item.action:<7} ({item.status_code})"
        if item.message:
            line += f" {item.message}"
        lines.append(line)
    lines.append(
        f"core-metadata {report.metadata_url}: {report.count('created')} created, "
        f"{report.count('updated')} updated, {report.count('failed')} failed"
    )
    return "\n".join(lines)


# --- command line -------------------------------------------------------------------------------


def add_edgex_parser(sub: Any) -> Any:
    """Adds ``fedge edgex provision`` to the subparsers ``sub`` of ``fedge``'s parser; returns the
    ``edgex`` subparsers so the other ``fedge edgex`` commands can join it."""
    edgex = sub.add_parser("edgex", help="EdgeX Foundry: device profiles and devices")
    edgex_sub = edgex.add_subparsers(dest="edgex_command", metavar="SUBCOMMAND", required=True)
    prov = edgex_sub.add_parser(
        "provision", help="upload device profiles and add devices to core-metadata (idempotent)"
    )
    prov.add_argument(
        "--metadata", required=True, metavar="URL", help="core-metadata base URL, e.g. http://localhost:59881"
    )
    prov.add_argument(
        "--token", metavar="JWT", help=f"bearer token for EdgeX in secure mode (default: ${TOKEN_ENV})"
    )
    prov.add_argument(
        "--profiles",
        type=Path,
        default=None,
        metavar="DIR",
        help="profile YAML files and devices*.yaml lists (default: the profiles shipped with fedge)",
    )
    prov.add_argument(
        "--service",
        default=DEFAULT_SERVICE,
        metavar="NAME",
        help=f"device service of devices that name none (default: {DEFAULT_SERVICE})",
    )
    prov.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"per-request timeout (default: {DEFAULT_TIMEOUT_S:g})",
    )
    prov.add_argument(
        "--bypass-validation",
        action="store_true",
        help="do not let core-metadata ask the device service to validate devices",
    )
    prov.add_argument("--json", action="store_true", help="print the report as JSON")
    prov.set_defaults(func=cmd_edgex_provision)
    return edgex_sub


def cmd_edgex_provision(args: argparse.Namespace) -> int:
    """``fedge edgex provision``: 0 if every item succeeded, 1 if some failed."""
    token = args.token or os.environ.get(TOKEN_ENV) or None
    profiles, devices = discover(args.profiles if args.profiles is not None else bundled.profiles_dir())
    report = provision(
        args.metadata,
        profiles,
        devices,
        token,
        args.timeout,
        service_name=args.service,
        bypass_validation=args.bypass_validation,
    )
    print(json.dumps(report.to_dict()) if args.json else render_report(report))
    return 0 if report.ok else 1
