"""EdgeX's OpenAPI specs for tests: find them, load them, validate traffic and values against them.

The specs live outside the product, in ``../shared/edgex/openapi/<version>/<service>.yaml``
(override the ``shared`` directory with ``FEDGE_SHARED_DIR``). Missing specs skip the test, or
fail it when ``CI`` is set, so CI never passes by silently validating nothing.

Use::

    spec = load_spec("v4.0.2")                       # core-metadata, errata applied
    validate_request(spec, "POST", url, body, headers)
    validate_response(spec, "POST", url, 207, body, headers)
    validate_schema("v4.0.2", "DeviceProfile", profile_dict)

Each raises :class:`SpecMismatch` (an ``AssertionError``) naming what did not match.

Errata. EdgeX's specs are not the whole truth; where a spec contradicts what EdgeX's DTOs
(go-mod-core-contracts) accept and send, :data:`ERRATA` patches the loaded spec, each patch with
its reason and the exact value it replaces (a patch that no longer finds that value fails loudly,
so a newer spec cannot be patched blindly). Pass ``errata=False`` to see the raw spec's verdict.
The specs also do not pass openapi-spec-validator (e.g. a ``required: [profileName]`` naming no
property, examples of the wrong type), so they are loaded without that check; traffic is still
validated against every schema.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import yaml
from openapi_core import Config, OpenAPI
from openapi_core.deserializing.media_types.util import data_form_loads
from openapi_core.testing import MockRequest, MockResponse
from openapi_schema_validator import OAS31Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_VERSIONS: tuple[str, ...] = ("v3.1.1", "v4.0.2")
SERVICES: tuple[str, ...] = ("core-metadata", "core-data", "core-command")

_MISSING = object()


class SpecMismatch(AssertionError):
    """A request, response or value does not match EdgeX's OpenAPI spec."""


@dataclass(frozen=True)
class Erratum:
    """One correction of a spec: at ``pointer``, ``expected`` (or absent) becomes ``value``."""

    pointer: tuple[str, ...]
    expected: Any
    value: Any
    reason: str


_UPLOAD = ("paths", "/deviceprofile/uploadfile")
_FORM = ("requestBody", "content", "multipart/form-data", "schema", "required")

#: (service, version) -> corrections applied by :func:`load_spec`.
ERRATA: dict[tuple[str, str], tuple[Erratum, ...]] = {}
for _version in SPEC_VERSIONS:
    ERRATA[("core-metadata", _version)] = (
        Erratum(
            ("components", "schemas", "AutoEvent", "required"),
            ["interval", "resource"],
            ["interval", "sourceName"],
            "dtos.AutoEvent requires Interval and SourceName; 'resource' is the field's EdgeX 2.0 "
            "name and appears nowhere else in the schema (every real device has sourceName).",
        ),
        Erratum(
            (*_UPLOAD, "post", *_FORM),
            _MISSING,
            ["file"],
            "core-metadata reads the YAML from the form field 'file' (r.FormFile(\"file\")) and "
            "answers 400 'missing yaml file' without it; the spec leaves the field optional.",
        ),
        Erratum(
            (*_UPLOAD, "put", *_FORM),
            _MISSING,
            ["file"],
            "Same form field for the update (PUT) as for the upload (POST).",
        ),
    )
ERRATA[("core-metadata", "v3.1.1")] += (
    Erratum(
        ("components", "schemas", "ProtocolProperties", "additionalProperties"),
        {"type": "object"},
        True,
        "models.ProtocolProperties is map[string]any since EdgeX 3.0: its values are strings and "
        "numbers (Address, Port), never objects; the v4.0.2 spec already says 'true'.",
    ),
)


def shared_dir() -> Path:
    """The shared reference directory (``FEDGE_SHARED_DIR`` or ``../shared`` next to the repo)."""
    override = os.environ.get("FEDGE_SHARED_DIR")
    return Path(override) if override else Path(__file__).resolve().parents[3] / "shared"


def spec_dir() -> Path:
    """``<shared>/edgex/openapi``; skips the test if missing (fails it when ``CI`` is set)."""
    path = shared_dir() / "edgex" / "openapi"
    if not path.is_dir():
        message = f"EdgeX OpenAPI specs not found at {path} (set FEDGE_SHARED_DIR)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def spec_path(version: str, service: str = "core-metadata") -> Path:
    path = spec_dir() / version / f"{service}.yaml"
    if not path.is_file():
        message = f"EdgeX OpenAPI spec not found: {path}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@functools.cache
def _spec_data(path: Path, service: str, version: str, errata: bool) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    if errata:
        for erratum in ERRATA.get((service, version), ()):
            _apply(data, erratum, path)
    return data


def spec_data(version: str, service: str = "core-metadata", *, errata: bool = True) -> dict[str, Any]:
    """The spec as a dict (a deep copy: callers may not change the cached one)."""
    return copy.deepcopy(_spec_data(spec_path(version, service), service, version, errata))


def _apply(data: dict[str, Any], erratum: Erratum, path: Path) -> None:
    node: Any = data
    for key in erratum.pointer[:-1]:
        if not isinstance(node, dict) or key not in node:
            raise RuntimeError(f"{path}: erratum target {'/'.join(erratum.pointer)} not found")
        node = node[key]
    last = erratum.pointer[-1]
    found = node.get(last, _MISSING)
    if found != erratum.expected:
        raise RuntimeError(
            f"{path}: erratum {'/'.join(erratum.pointer)} expected {erratum.expected!r}, found "
            f"{found!r}; the spec changed, review the erratum"
        )
    node[last] = copy.deepcopy(erratum.value)


def _multipart_as_text(value: bytes, **parameters: str) -> Mapping[str, Any]:
    # OpenAPI 3.1 validators treat `type: string, format: binary` (an OpenAPI 3.0 idiom the
    # EdgeX specs use for the uploaded YAML) as a JSON string, and openapi-core hands them the
    # part as bytes; decode the parts so the schema (field names, required) is what is checked.
    parts = data_form_loads(value, **parameters)
    return {k: v.decode("utf-8", "replace") if isinstance(v, bytes) else v for k, v in parts.items()}


@functools.cache
def _load(path: Path, service: str, version: str, errata: bool) -> OpenAPI:
    config = Config(
        spec_validator_cls=None,  # see the module docstring
        extra_media_type_deserializers={"multipart/form-data": _multipart_as_text},
    )
    return OpenAPI.from_dict(
        _spec_data(path, service, version, errata), config=config, base_uri=path.as_uri()
    )


def load_spec(version: str, service: str = "core-metadata", *, errata: bool = True) -> OpenAPI:
    """An openapi-core ``OpenAPI`` for one EdgeX service at one version (cached)."""
    return _load(spec_path(version, service), service, version, errata)


def _server_root(spec: OpenAPI) -> tuple[str, str]:
    """(scheme://host of the spec's first server, its base path such as ``/api/v3``)."""
    servers = spec.spec / "servers"
    url = str((servers / 0 / "url").read_value()) if len(list(servers)) else "http://localhost"
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}", parts.path.rstrip("/")


def _mock_request(
    spec: OpenAPI, method: str, url: str, body: bytes | str | None, headers: Mapping[str, str] | None
) -> MockRequest:
    # Requests go to a test server on a random port; validate them as if sent to the spec's
    # server, keeping the path (which must start with the spec's base path, e.g. /api/v3).
    host_url, base = _server_root(spec)
    parts = urlsplit(url)
    if base and not parts.path.startswith(base + "/"):
        raise SpecMismatch(f"{method} {url}: path is outside the spec's base path {base}")
    hdrs = dict(headers or {})
    content_type = next((v for k, v in hdrs.items() if k.lower() == "content-type"), "")
    data = body.encode("utf-8") if isinstance(body, str) else body
    return MockRequest(
        host_url,
        method.upper(),
        parts.path,
        headers=hdrs,
        args=dict(parse_qsl(parts.query)),
        data=data,
        content_type=content_type,
    )


def _explain(exc: Exception) -> str:
    lines = [f"{type(exc).__name__}: {exc}"]
    cause: BaseException | None = exc.__cause__
    while cause is not None:
        for err in getattr(cause, "schema_errors", ()) or ():
            where = "/".join(str(p) for p in getattr(err, "absolute_path", ()))
            lines.append(f"  - at {where or '<body>'}: {getattr(err, 'message', err)}")
        cause = cause.__cause__
    return "\n".join(lines)


def validate_request(
    spec: OpenAPI,
    method: str,
    url: str,
    body: bytes | str | None = None,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Raises :class:`SpecMismatch` unless the request matches an operation of ``spec``."""
    request = _mock_request(spec, method, url, body, headers)
    try:
        spec.validate_request(request)
    except Exception as exc:  # openapi-core raises many unrelated exception types
        raise SpecMismatch(f"request {method} {url} does not match the spec:\n{_explain(exc)}") from exc


def validate_response(
    spec: OpenAPI,
    method: str,
    url: str,
    status: int,
    body: bytes | str,
    headers: Mapping[str, str] | None = None,
    request_headers: Mapping[str, str] | None = None,
) -> None:
    """Raises :class:`SpecMismatch` unless the response is one the operation documents."""
    request = _mock_request(spec, method, url, None, request_headers)
    hdrs = dict(headers or {})
    content_type = next((v for k, v in hdrs.items() if k.lower() == "content-type"), "application/json")
    data = body.encode("utf-8") if isinstance(body, str) else body
    response = MockResponse(
        data, status_code=status, headers=hdrs, content_type=content_type.split(";")[0].strip()
    )
    try:
        spec.validate_response(request, response)
    except Exception as exc:
        raise SpecMismatch(
            f"response {status} to {method} {url} does not match the spec:\n{_explain(exc)}"
        ) from exc


@functools.cache
def _schema_validator(path: Path, service: str, version: str, errata: bool, name: str) -> OAS31Validator:
    data = _spec_data(path, service, version, errata)
    if name not in data["components"]["schemas"]:
        raise KeyError(f"{version} {service} has no schema {name!r}")
    # The whole spec as one resource, so the schema's $refs (#/components/...) resolve.
    resource: Resource[Any] = Resource.from_contents(data, default_specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource(path.as_uri(), resource)
    return OAS31Validator({"$ref": f"{path.as_uri()}#/components/schemas/{name}"}, registry=registry)


def schema_errors(
    version: str, schema: str, instance: Any, service: str = "core-metadata", *, errata: bool = True
) -> Iterator[str]:
    """Each way ``instance`` violates ``components/schemas/<schema>``, as readable lines."""
    validator = _schema_validator(spec_path(version, service), service, version, errata, schema)
    for err in sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(p) for p in err.absolute_path) or "<root>"
        yield f"{where}: {err.message}"


def validate_schema(
    version: str, schema: str, instance: Any, service: str = "core-metadata", *, errata: bool = True
) -> None:
    """Raises :class:`SpecMismatch` unless ``instance`` is valid ``components/schemas/<schema>``."""
    errors = list(schema_errors(version, schema, instance, service, errata=errata))
    if errors:
        shown = json.dumps(instance)[:200]
        raise SpecMismatch(f"{shown} is not a valid {version} {schema}:\n  " + "\n  ".join(errors))
