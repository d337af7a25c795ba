"""EdgeX core-command REST client: one write (``SetCommand``) to a device's command.

What core-command takes (the OpenAPI specs of EdgeX 3.1.1 and 4.0.2, identical here):
``PUT /api/v3/device/name/{name}/{command}`` with a ``SettingRequest`` body, a JSON object of
resource name -> value *string*, and an optional ``X-Correlation-ID`` (a UUID). It answers 200
with a ``BaseResponse``, or 400, 404, 423 (the device is locked), 500 or 503 with an
``ErrorResponse``. In secure mode, behind the API gateway, it wants ``Authorization: Bearer <JWT>``.

The HTTP plumbing (headers, token, bounded bodies, the error of a status) is core-data's
(:mod:`fedge.agent.edgex.core_data`). Unlike a backfill, a write is never retried here: one
attempt, bounded by ``timeout_s``; whoever calls decides when to try again (the write-back rules
of :mod:`fedge.agent.writeback`, at most once per ``min_interval_s``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import quote

from fedge.agent.edgex.core_data import (
    API_PREFIX,
    MAX_ERROR_BODY_BYTES,
    CoreDataError,
    _status_error,
    edgex_headers,
    new_session,
    read_bounded,
)
from fedge.protocol.bounded_json import BoundedJsonError, loads_bounded
from fedge.protocol.errors import FedgeError

if TYPE_CHECKING:  # loaded by the first write only (see core_data.new_session)
    import requests

#: Default bound of one write: connect and read each (requests' timeout).
DEFAULT_TIMEOUT_S = 5.0
#: A BaseResponse or ErrorResponse is a few hundred bytes.
MAX_RESPONSE_BYTES = MAX_ERROR_BODY_BYTES


class CoreCommandError(FedgeError):
    """A write failed; ``reason`` is a short stable code (what the write-back counts).

    Reasons: ``invalid_argument``, ``timeout``, ``unreachable``, ``bad_request``,
    ``unauthorized``, ``forbidden``, ``not_found``, ``locked`` (423: the device's AdminState is
    LOCKED), ``server_error`` (5xx), ``unexpected_status``, ``response_too_large``, ``bad_json``.
    """

    def __init__(self, reason: str, detail: str, *, status: int | None = None) -> None:
        super().__init__(f"core-command: {reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.status = status


class CoreCommandClient:
    """Talks to one core-command service. ``base_url`` is everything before ``/api/v3``
    (``http://edgex-core-command:59882``, or ``https://gateway:8443/core-command``).
    One client per thread: a ``requests`` session is not thread-safe."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        session: requests.Session | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise CoreCommandError("invalid_argument", f"base_url must be http(s)://..., got {base_url!r}")
        if token is not None and (not token or any(c in token for c in "\r\n")):
            raise CoreCommandError("invalid_argument", "token must be a non-empty single-line string")
        if not timeout_s > 0:
            raise CoreCommandError("invalid_argument", f"timeout_s must be > 0, got {timeout_s}")
        self._base = base_url.rstrip("/")
        self._token = token
        self._timeout_s = timeout_s
        self._own_session = session is None
        self._session = session  # made by the first write: most agents never write back

    @property
    def base_url(self) -> str:
        return self._base

    def close(self) -> None:
        if self._own_session and self._session is not None:
            self._session.close()
            self._session = None

    def set_command(self, device: str, command: str, values: Mapping[str, str]) -> None:
        """``PUT /api/v3/device/name/{device}/{command}`` with ``values``; returns on a 200, else
        raises :class:`CoreCommandError`. One attempt, never retried."""
        if not device or not command:
            raise CoreCommandError("invalid_argument", "device and command must be non-empty")
        if not values or not all(isinstance(k, str) and isinstance(v, str) for k, v in values.items()):
            raise CoreCommandError("invalid_argument", "values must map resource names to strings")
        path = f"{API_PREFIX}/device/name/{quote(device, safe='')}/{quote(command, safe='')}"
        where = f"PUT {path}"
        import requests  # noqa: PLC0415 - see core_data.new_session

        headers = edgex_headers(self._token)
        if self._session is None:
            self._session = new_session()
        try:
            with self._session.put(
                self._base + path, json=dict(values), headers=headers, timeout=self._timeout_s, stream=True
            ) as response:
                status = response.status_code
                data = read_bounded(response, MAX_RESPONSE_BYTES, where)
        except requests.Timeout as exc:
            raise CoreCommandError(
                "timeout", f"{where}: no answer within {self._timeout_s:g} s ({exc})"
            ) from None
        except requests.RequestException as exc:
            raise CoreCommandError("unreachable", f"{where}: {type(exc).__name__}: {exc}") from None
        except CoreDataError as exc:  # read_bounded's response_too_large
            raise CoreCommandError(exc.reason, exc.detail, status=exc.status) from None
        if status == 200:
            try:
                loads_bounded(data, max_bytes=MAX_RESPONSE_BYTES)
            except BoundedJsonError as exc:
                raise CoreCommandError(
                    "bad_json", f"{where}: the 200 body is not JSON ({exc})", status=200
                ) from None
            return
        failure = _status_error(status, data, path, "PUT")
        reason = "locked" if status == 423 else failure.reason
        raise CoreCommandError(reason, failure.detail, status=status)
