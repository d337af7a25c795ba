"""A small in-memory Kubernetes API server on loopback for the leader-election tests.

Implements only what ``fedge.aggregator.leader`` uses: Leases (GET, POST, PUT with resourceVersion
preconditions -> 409 Conflict) and ConfigMap PATCH (strategic-merge / merge-patch). Every
request body and every response body is validated against Kubernetes' own JSON schema for its
kind (Lease, ConfigMap, Status) from kubernetes-validate's offline schemas (v1.30, strict:
unknown fields are errors); violations are recorded in ``schema_errors`` and an invalid request
is answered with 422 Invalid, like the API server.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from typing import Any

import jsonschema
from referencing import Registry, Resource

SCHEMA_VERSION = "v1.30.0-local-strict"
_SCHEMA_FILES = {
    "Lease": "lease-coordination-v1.json",
    "ConfigMap": "configmap-v1.json",
    "Status": "status-meta-v1.json",
}
_LEASES = re.compile(r"^/apis/coordination\.k8s\.io/v1/namespaces/([^/]+)/leases(?:/([^/]+))?$")
_CONFIGMAP = re.compile(r"^/api/v1/namespaces/([^/]+)/configmaps/([^/]+)$")
_MERGE_TYPES = ("application/strategic-merge-patch+json", "application/merge-patch+json")


def _load(name: str) -> Any:
    root = files("kubernetes_validate") / "kubernetes-json-schema" / SCHEMA_VERSION
    return json.loads((root / name).read_text())


def _validators() -> dict[str, jsonschema.protocols.Validator]:
    definitions = Resource.from_contents(_load("_definitions.json"))
    out: dict[str, jsonschema.protocols.Validator] = {}
    for kind, filename in _SCHEMA_FILES.items():
        schema = _load(filename)
        registry = definitions @ (Resource.from_contents(schema) @ Registry())
        out[kind] = jsonschema.Draft202012Validator(
            schema, registry=registry, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
        )
    return out


VALIDATORS = _validators()


def schema_errors_of(kind: str, obj: Any) -> list[str]:
    return [
        f"{kind} at /{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in VALIDATORS[kind].iter_errors(obj)
    ]


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (for the maps a ConfigMap has, strategic merge is the same)."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class KubeApiDouble:
    """``with KubeApiDouble() as api: Configuration(host=api.url)``."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.schema_errors: list[str] = []
        self.requests: list[tuple[str, str, Any]] = []  # (method, path, body)
        self.lease_read_barrier: threading.Barrier | None = None  # forces a read-read-write race
        self._lock = threading.Lock()
        self._versions = itertools.count(1)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="kube-api-double",
            daemon=True,
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> KubeApiDouble:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Idempotent; after it the port refuses connections."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()

    def __enter__(self) -> KubeApiDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- object store ------------------------------------------------------------------------

    def put_object(self, kind: str, namespace: str, name: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Stores ``obj`` as the server would (fills metadata), e.g. the ConfigMap the manifests
        create."""
        with self._lock:
            return self._store(kind, namespace, name, obj, existing=None)

    def get_object(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            obj = self.objects.get((kind, namespace, name))
            return json.loads(json.dumps(obj)) if obj is not None else None

    def _store(
        self, kind: str, ns: str, name: str, obj: dict[str, Any], existing: dict[str, Any] | None
    ) -> dict[str, Any]:
        stored: dict[str, Any] = json.loads(json.dumps(obj))
        stored["apiVersion"] = "coordination.k8s.io/v1" if kind == "Lease" else "v1"
        stored["kind"] = kind
        meta = stored.setdefault("metadata", {})
        meta.update(name=name, namespace=ns, resourceVersion=str(next(self._versions)))
        old_meta = existing["metadata"] if existing else {}
        meta["uid"] = old_meta.get("uid", str(uuid.uuid4()))
        meta["creationTimestamp"] = old_meta.get("creationTimestamp", _now())
        self.objects[(kind, ns, name)] = stored
        return stored

    # --- HTTP --------------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                double._dispatch(self, "GET")

            def do_POST(self) -> None:
                double._dispatch(self, "POST")

            def do_PUT(self) -> None:
                double._dispatch(self, "PUT")

            def do_PATCH(self) -> None:
                double._dispatch(self, "PATCH")

        return Handler

    def _reply(self, h: BaseHTTPRequestHandler, code: int, kind: str, obj: dict[str, Any]) -> None:
        errors = schema_errors_of(kind, obj)
        if errors:
            with self._lock:
                self.schema_errors.extend(f"response {e}" for e in errors)
        raw = json.dumps(obj).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(raw)))
        h.end_headers()
        h.wfile.write(raw)

    def _status(
        self, h: BaseHTTPRequestHandler, code: int, reason: str, message: str, kind: str = "", name: str = ""
    ) -> None:
        details: dict[str, Any] = {"name": name, "kind": kind} if kind else {}
        if kind == "leases":
            details["group"] = "coordination.k8s.io"
        status = {
            "apiVersion": "v1",
            "kind": "Status",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }
        if details:
            status["details"] = details
        self._reply(h, code, "Status", status)

    def _dispatch(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = h.path.split("?", 1)[0]
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            self._status(h, 400, "BadRequest", "body is not JSON")
            return
        with self._lock:
            self.requests.append((method, path, body))
        if (m := _LEASES.match(path)) is not None:
            ns, name = m.group(1), m.group(2)
            self._leases(h, method, ns, name, body)
        elif (m := _CONFIGMAP.match(path)) is not None and method == "PATCH":
            self._patch_configmap(h, m.group(1), m.group(2), body, h.headers.get("Content-Type", ""))
        else:
            self._status(h, 404, "NotFound", f"the double does not serve {method} {path}")

    def _invalid_body(self, h: BaseHTTPRequestHandler, kind: str, body: Any) -> bool:
        errors = schema_errors_of(kind, body) if isinstance(body, dict) else [f"{kind}: not an object"]
        if not errors:
            return False
        with self._lock:
            self.schema_errors.extend(f"request {e}" for e in errors)
        self._status(h, 422, "Invalid", "; ".join(errors))
        return True

    def _leases(self, h: BaseHTTPRequestHandler, method: str, ns: str, name: str | None, body: Any) -> None:
        if method == "GET" and name is not None:
            barrier = self.lease_read_barrier
            if barrier is not None:
                barrier.wait(timeout=5)
            obj = self.get_object("Lease", ns, name)
            if obj is None:
                self._status(
                    h, 404, "NotFound", f'leases.coordination.k8s.io "{name}" not found', "leases", name
                )
            else:
                self._reply(h, 200, "Lease", obj)
            return
        if method == "POST" and name is None:
            if self._invalid_body(h, "Lease", body):
                return
            new_name = (body.get("metadata") or {}).get("name") or ""
            if (body.get("metadata") or {}).get("resourceVersion"):
                self._status(
                    h, 400, "BadRequest", "resourceVersion should not be set on objects to be created"
                )
                return
            with self._lock:
                exists = ("Lease", ns, new_name) in self.objects
                stored = None if exists else self._store("Lease", ns, new_name, body, None)
            if stored is None:
                self._status(
                    h,
                    409,
                    "AlreadyExists",
                    f'leases.coordination.k8s.io "{new_name}" already exists',
                    "leases",
                    new_name,
                )
            else:
                self._reply(h, 201, "Lease", stored)
            return
        if method == "PUT" and name is not None:
            if self._invalid_body(h, "Lease", body):
                return
            meta = body.get("metadata") or {}
            if meta.get("name") != name:
                self._status(h, 400, "BadRequest", "the name of the object does not match the URL")
                return
            with self._lock:
                current = self.objects.get(("Lease", ns, name))
                wanted = meta.get("resourceVersion")
                if current is None:
                    outcome: tuple[int, dict[str, Any] | None] = (404, None)
                elif wanted and wanted != current["metadata"]["resourceVersion"]:
                    outcome = (409, None)
                else:  # Leases allow unconditional updates (no resourceVersion), like the server
                    outcome = (200, self._store("Lease", ns, name, body, current))
            code, stored = outcome
            if code == 404:
                self._status(
                    h, 404, "NotFound", f'leases.coordination.k8s.io "{name}" not found', "leases", name
                )
            elif code == 409:
                self._status(
                    h,
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on leases.coordination.k8s.io "{name}": the object has '
                    "been modified; please apply your changes to the latest version and try again",
                    "leases",
                    name,
                )
            else:
                assert stored is not None
                self._reply(h, 200, "Lease", stored)
            return
        self._status(h, 405, "MethodNotAllowed", f"{method} is not supported here")

    def _patch_configmap(
        self, h: BaseHTTPRequestHandler, ns: str, name: str, body: Any, content_type: str
    ) -> None:
        if content_type.split(";")[0].strip() not in _MERGE_TYPES:
            self._status(h, 415, "UnsupportedMediaType", f"the double does not apply {content_type} patches")
            return
        if self._invalid_body(h, "ConfigMap", body):
            return
        with self._lock:
            current = self.objects.get(("ConfigMap", ns, name))
            if current is None:
                patched = None
            else:
                merged = merge_patch(current, body)
                merged["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                patched = self._store("ConfigMap", ns, name, merged, current)
        if patched is None:
            self._status(h, 404, "NotFound", f'configmaps "{name}" not found', "configmaps", name)
        else:
            self._reply(h, 200, "ConfigMap", patched)
