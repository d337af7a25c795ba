"""EdgeX core-data REST client: a health check and a paged backfill of one device's readings.

The message bus only delivers what is published while an agent listens; after a restart or a
network outage the agent fills the gap from core-data's store over REST. This module does that
and nothing else, and trusts nothing it receives: every response is size-bounded, parsed,
checked for the fields fedge needs and converted into :class:`~agent.edgex.readings.Reading`
values, or refused with a :class:`CoreDataError` whose ``reason`` names what went wrong.

What core-data does (edgex-go ``internal/core/data``, go-mod-core-contracts, and the OpenAPI
specs of EdgeX 3.1.1 and 4.0.2, which share the ``/api/v3`` paths):

- ``GET /api/v3/reading/device/name/{name}/start/{start}/end/{end}?offset=&limit=`` returns a
  ``MultiReadingsResponse``: ``readings`` (one page) and ``totalCount`` (all readings in the
  window, not the page).
- Both bounds are inclusive: Postgres runs ``origin >= start AND origin <= end``, Redis
  ``ZREVRANGEBYSCORE key end start``. ``end < start`` is a 400.
- Readings come sorted by origin **descending** (newest first); the order of readings with the
  same origin is unspecified (Postgres has no tie-breaker).
- ``limit`` may not exceed the service's ``MaxResultCount`` (1024 by default; larger is a 400);
  ``offset > totalCount`` is a 416.
- An unknown device is not an error for core-data (it never asks core-metadata): the answer is
  a 200 with no readings. A 404 (from a gateway, or a stricter store) is reported as
  ``unknown_device``.
- In secure mode every endpoint but ``/ping`` wants ``Authorization: Bearer <JWT>``.

Paging: plain offset paging over a window that changes while we read returns some readings
twice (new ones arrive at the head, pushing the rest down) and skips others (purged old ones
pull the rest up). So this client pages by *keyset*: after each full page it narrows the
window's end to the oldest origin it has seen and starts again at offset 0; only when a whole
page shares one origin does it step through that tie group by offset. Readings at the boundary
origin are remembered (by id, or by resource and origin when the id is missing) so none is
yielded twice. Limits, by design: a reading that arrives mid-backfill with an origin newer than
the current window end is not returned (the bus delivers it), and a tie group larger than a page
relies on core-data keeping its order between requests (Redis does, Postgres does not promise).

Order: core-data only returns newest first, so the default oldest-first order holds the whole
range in memory (bounded by ``max_readings``); ``newest_first=True`` streams with one page.
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import quote

from fedge.agent.edgex.readings import OTHER_TYPES, VALUE_TYPES, Reading, ReadingError, Value, parse_value
from fedge.agent.edgex.wire import MAX_DOCUMENT_DEPTH
from fedge.protocol.bounded_json import BoundedJsonError, loads_bounded
from fedge.protocol.errors import FedgeError

if TYPE_CHECKING:  # requests (and urllib3 under it, ~5 MiB) loads on the first HTTP call only
    import requests

API_PREFIX = "/api/v3"
#: core-data's default ``MaxResultCount``: a larger ``limit`` is refused with a 400.
MAX_PAGE_LIMIT = 1024
#: A page of 1024 simple readings is ~300 KiB; binary readings can be far larger (core-data's
#: ``MaxEventSize`` is 25 MB), so the default leaves room while still refusing absurd bodies.
DEFAULT_MAX_RESPONSE_BYTES = 16 * 1024 * 1024
#: The oldest-first order needs the whole backfill in memory; refuse more than this.
DEFAULT_MAX_READINGS = 500_000
MAX_INT64 = 2**63 - 1
#: Statuses worth retrying: the service (or the gateway in front of it) is failing or restarting.
RETRY_STATUSES = frozenset({500, 502, 503, 504})
#: Readings in a row already yielded before we assume a server that never moves on (real
#: core-data cannot cause this: reading ids are primary keys).
MAX_STALLED_READINGS = 3 * MAX_PAGE_LIMIT

_READ_CHUNK = 64 * 1024
#: An error body is one small ErrorResponse object; only its ``message`` is quoted, and only
#: from a body this small.
MAX_ERROR_BODY_BYTES = 64 * 1024


def _retriable_exceptions() -> tuple[type[Exception], ...]:
    """Transport failures worth another attempt (a body cut short mid-stream included)."""
    import requests  # noqa: PLC0415 - an agent without core-data never loads it

    return (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


def new_session() -> requests.Session:
    """A ``requests`` session, imported here: an agent that makes no HTTP call (no core-data
    backfill, no core-command write-back) never loads requests and urllib3 (~5 MiB of RSS)."""
    import requests  # noqa: PLC0415

    return requests.Session()


class CoreDataError(FedgeError):
    """A core-data call failed or answered garbage; ``reason`` is a short stable code.

    Reasons: ``invalid_argument``, ``unreachable``, ``server_error``, ``unauthorized``,
    ``forbidden``, ``unknown_device``, ``not_found``, ``bad_request``, ``unexpected_status``,
    ``response_too_large``, ``bad_json``, ``bad_shape``, ``missing_field``, ``bad_reading``,
    ``out_of_range``, ``too_many_readings``, ``no_progress``. ``status`` is the HTTP status when
    there was one.
    """

    def __init__(self, reason: str, detail: str, *, status: int | None = None) -> None:
        super().__init__(f"core-data: {reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.status = status


class CoreDataClient:
    """Talks to one core-data service (directly, or through the API gateway in secure mode).

    ``base_url`` is everything before ``/api/v3``: ``http://localhost:59880`` or, behind the
    gateway, ``https://gateway:8443/core-data``. ``retries`` is how many times a failed request
    is repeated (so ``retries + 1`` attempts); waits grow as ``backoff_s * 2**n`` up to
    ``max_backoff_s``. Only connection failures, timeouts and 5xx answers are retried: a 4xx
    will not change by asking again.

    One client per thread: a ``requests`` session is not thread-safe.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        timeout_s: float = 5,
        retries: int = 3,
        backoff_s: float = 0.5,
        session: requests.Session | None = None,
        *,
        max_backoff_s: float = 30.0,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_readings: int = DEFAULT_MAX_READINGS,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise CoreDataError("invalid_argument", f"base_url must be http(s)://..., got {base_url!r}")
        if token is not None and (not token or any(c in token for c in "\r\n")):
            raise CoreDataError("invalid_argument", "token must be a non-empty single-line string")
        if timeout_s <= 0 or retries < 0 or backoff_s < 0 or max_backoff_s < 0:
            raise CoreDataError(
                "invalid_argument",
                f"need timeout_s > 0, retries >= 0, backoff_s >= 0 (got {timeout_s}, {retries}, {backoff_s})",
            )
        if max_response_bytes < 1 or max_readings < 1:
            raise CoreDataError("invalid_argument", "max_response_bytes and max_readings must be positive")
        self._base = base_url.rstrip("/")
        self._token = token
        self._timeout_s = timeout_s
        self._retries = retries
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._max_response_bytes = max_response_bytes
        self._max_readings = max_readings
        self._sleep = sleep
        self._own_session = session is None
        self._session = session  # made on the first request (see new_session)

    @property
    def base_url(self) -> str:
        return self._base

    def close(self) -> None:
        """Closes the HTTP session if this client created it (a passed-in one is the caller's)."""
        if self._own_session and self._session is not None:
            self._session.close()
            self._session = None

    def __enter__(self) -> CoreDataClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- public calls -------------------------------------------------------------------------

    def ping(self) -> bool:
        """True when core-data answers its health check with a ping response; never raises.

        One attempt, no retries: a health check should report the present, not wait it out.
        ``/ping`` needs no token in EdgeX, so a True here does not prove the token is good.
        """
        try:
            body = self._get_json(f"{API_PREFIX}/ping", None, retries=0)
        except CoreDataError:
            return False
        return isinstance(body, dict) and isinstance(body.get("apiVersion"), str)

    def readings_for_device(
        self,
        device_name: str,
        start_ns: int,
        end_ns: int,
        page_limit: int = MAX_PAGE_LIMIT,
        *,
        newest_first: bool = False,
    ) -> Iterator[Reading]:
        """Every reading of ``device_name`` with ``start_ns <= origin <= end_ns``, each once.

        Oldest first by default (what feature windows want), which means the whole backfill is
        fetched before the first reading is yielded (at most ``max_readings``).
        ``newest_first=True`` streams in core-data's own order with memory of one page.
        Arguments are checked now; the network is touched on the first ``next()``.
        """
        if not isinstance(device_name, str) or not device_name:
            raise CoreDataError("invalid_argument", "device_name must be a non-empty string")
        _check_int("start_ns", start_ns, 0, MAX_INT64)
        _check_int("end_ns", end_ns, 0, MAX_INT64)
        _check_int("page_limit", page_limit, 1, MAX_PAGE_LIMIT)
        if end_ns < start_ns:
            raise CoreDataError("invalid_argument", f"end_ns {end_ns} is before start_ns {start_ns}")
        newest = self._newest_first(device_name, start_ns, end_ns, page_limit)
        return newest if newest_first else self._oldest_first(newest)

    # -- paging -------------------------------------------------------------------------------

    def _oldest_first(self, newest: Iterator[Reading]) -> Iterator[Reading]:
        # Everything is in memory here anyway, so dedupe over the whole backfill, not just
        # at page boundaries: a store that returns one reading id at two origins still
        # yields it once.
        collected: dict[tuple[str, ...], Reading] = {}
        for reading in newest:
            if len(collected) >= self._max_readings:
                raise CoreDataError(
                    "too_many_readings",
                    f"more than {self._max_readings} readings in the range; backfill a shorter range",
                )
            collected.setdefault(_dedupe_key(reading), reading)
        ordered = list(collected.values())
        # Sorting on (origin, resource, id) makes ties deterministic whatever core-data did.
        ordered.sort(key=lambda r: (r.origin_ns, r.resource, r.id))
        yield from ordered

    def _newest_first(self, device: str, start: int, end: int, limit: int) -> Iterator[Reading]:
        window_end = end
        offset = 0
        # Keys of yielded readings whose origin is window_end: the only ones a later page (whose
        # window ends at window_end) can return again.
        boundary: set[tuple[str, ...]] = set()
        stalled = 0
        while True:
            page, total = self._fetch_page(device, start, window_end, offset, limit)
            # core-data sorts newest first already; sorting again costs little and keeps the
            # boundary logic right even if a store does not.
            page.sort(key=lambda r: r.origin_ns, reverse=True)
            page_keys: set[tuple[str, ...]] = set()
            for reading in page:
                key = _dedupe_key(reading)
                if key in boundary or key in page_keys:
                    continue
                page_keys.add(key)
                yield reading
            if len(page) < limit or offset + len(page) >= total:
                return
            oldest = page[-1].origin_ns
            if oldest < window_end:
                # Readings newer than `oldest` are outside the next window: forget them.
                window_end, offset = oldest, 0
                boundary = {_dedupe_key(r) for r in page if r.origin_ns == oldest}
            else:
                # A whole page at one origin: step through that tie group by offset.
                offset += len(page)
                boundary |= page_keys
            stalled = 0 if page_keys else stalled + len(page)
            if stalled >= MAX_STALLED_READINGS:
                raise CoreDataError(
                    "no_progress",
                    f"{stalled} readings in a row were repeats (window end {window_end}, offset {offset})",
                )

    def _fetch_page(
        self, device: str, start: int, end: int, offset: int, limit: int
    ) -> tuple[list[Reading], int]:
        path = f"{API_PREFIX}/reading/device/name/{quote(device, safe='')}/start/{start}/end/{end}"
        try:
            body = self._get_json(path, {"offset": offset, "limit": limit}, retries=self._retries)
        except CoreDataError as exc:
            if exc.status == 404:
                detail = f"core-data knows no device {device!r}"
                raise CoreDataError("unknown_device", detail, status=404) from None
            if exc.status == 416:
                # offset > totalCount: only possible inside a tie group (offset is 0 otherwise),
                # so readings at the window's newest origin were purged while we paged. Retention
                # purges oldest first, so nothing older is left either: the backfill is done.
                return [], 0
            raise
        where = f"GET {path}"
        if not isinstance(body, dict):
            _bad("bad_shape", f"{where}: expected a MultiReadingsResponse object, got {type(body).__name__}")
        if "readings" not in body:
            _bad("missing_field", f"{where}: response has no 'readings'")
        if "totalCount" not in body:
            _bad("missing_field", f"{where}: response has no 'totalCount'")
        raw = body["readings"]
        if raw is None:  # a Go nil slice encodes as null
            raw = []
        total = body["totalCount"]
        if not isinstance(raw, list):
            _bad("bad_shape", f"{where}: 'readings' is {type(raw).__name__}, not a list")
        if isinstance(total, bool) or not isinstance(total, int) or total < 0:
            _bad("bad_shape", f"{where}: 'totalCount' is {total!r}, not a count")
        if len(raw) > limit:
            _bad("bad_shape", f"{where}: {len(raw)} readings for limit {limit}")
        page = [_reading_from_dto(dto, device, f"{where}: readings[{i}]") for i, dto in enumerate(raw)]
        for i, reading in enumerate(page):
            if not start <= reading.origin_ns <= end:
                _bad(
                    "out_of_range",
                    f"{where}: readings[{i}] origin {reading.origin_ns} is outside [{start}, {end}]",
                )
        return page, total

    # -- HTTP ---------------------------------------------------------------------------------

    def _get_json(self, path: str, params: dict[str, int] | None, *, retries: int) -> Any:
        """One logical GET, retried on connection errors and 5xx, returning the parsed 200 body."""
        import requests  # noqa: PLC0415 - see new_session

        headers = edgex_headers(self._token)
        url = self._base + path
        if self._session is None:
            self._session = new_session()
        retriable = _retriable_exceptions()
        attempt = 0
        while True:
            try:
                with self._session.get(
                    url, params=params, headers=headers, timeout=self._timeout_s, stream=True
                ) as response:
                    status = response.status_code
                    data = self._read_bounded(response, path)
            except retriable as exc:
                failure = CoreDataError("unreachable", f"GET {path}: {type(exc).__name__}: {exc}")
            except requests.RequestException as exc:
                raise CoreDataError("unreachable", f"GET {path}: {type(exc).__name__}: {exc}") from None
            else:
                if status == 200:
                    return _parse_json(data, path, self._max_response_bytes)
                failure = _status_error(status, data, path)
                if status not in RETRY_STATUSES:
                    raise failure
            if attempt >= retries:
                raise CoreDataError(
                    failure.reason, f"{failure.detail} (after {attempt + 1} attempts)", status=failure.status
                )
            self._sleep(min(self._backoff_s * 2**attempt, self._max_backoff_s))
            attempt += 1

    def _read_bounded(self, response: requests.Response, path: str) -> bytes:
        """The body, refused once it passes ``max_response_bytes`` (declared or streamed)."""
        return read_bounded(response, self._max_response_bytes, f"GET {path}")


# -- shared by the agent's EdgeX REST clients (core-data here, core-command in core_command.py) --


def edgex_headers(token: str | None) -> dict[str, str]:
    """The headers of a request to an EdgeX service: JSON, a fresh ``X-Correlation-ID`` (a UUID,
    as the specs require) and, in secure mode, ``Authorization: Bearer <JWT>``."""
    headers = {"Accept": "application/json", "X-Correlation-ID": str(uuid.uuid4())}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def read_bounded(response: requests.Response, limit: int, where: str) -> bytes:
    """``response``'s body (a streamed request), refused with ``response_too_large`` once it
    passes ``limit`` bytes, declared or streamed; ``where`` ("GET /api/v3/...") names the call."""
    declared = response.headers.get("Content-Length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        detail = f"{where}: body of {declared} bytes exceeds {limit}"
        raise CoreDataError("response_too_large", detail, status=response.status_code)
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(_READ_CHUNK):
        size += len(chunk)
        if size > limit:
            detail = f"{where}: body exceeds {limit} bytes"
            raise CoreDataError("response_too_large", detail, status=response.status_code)
        chunks.append(chunk)
    return b"".join(chunks)


# -- parsing ----------------------------------------------------------------------------------


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CoreDataError("invalid_argument", f"{name} must be an int in [{low}, {high}], got {value!r}")


def _bad(reason: str, detail: str) -> NoReturn:
    raise CoreDataError(reason, detail, status=200)


def _parse_json(data: bytes, path: str, max_bytes: int) -> Any:
    """A 200 body: strict UTF-8 JSON, nesting bounded before parsing (an object reading nests
    no deeper than on the message bus), and no NaN/Infinity (Python extensions Go never
    writes): anything else is refused like any other garbage."""
    try:
        return loads_bounded(data, max_bytes=max_bytes, max_depth=MAX_DOCUMENT_DEPTH)
    except BoundedJsonError as exc:
        raise CoreDataError("bad_json", f"GET {path}: body is not JSON ({exc})", status=200) from None


def _status_error(status: int, data: bytes, path: str, method: str = "GET") -> CoreDataError:
    """The error for a non-200 answer, quoting EdgeX's ``message`` when the body has one.

    Never raises: whatever the body is (not JSON, nested 100,000 deep, huge), the answer is the
    error for the status, with or without a quoted message.
    """
    message = ""
    try:
        body = loads_bounded(data, max_bytes=MAX_ERROR_BODY_BYTES)
    except BoundedJsonError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        message = f": {body['message'][:200]}"
    reason = {
        400: "bad_request",
        401: "unauthorized",
        403: "forbidden",
        404: "not_found",
    }.get(status, "server_error" if status >= 500 else "unexpected_status")
    return CoreDataError(reason, f"{method} {path} answered {status}{message}", status=status)


def _dedupe_key(reading: Reading) -> tuple[str, ...]:
    if reading.id:
        return ("id", reading.id)
    return ("resource-origin", reading.resource, str(reading.origin_ns))


def _reading_from_dto(dto: Any, device: str, where: str) -> Reading:
    """One reading DTO (go-mod-core-contracts ``dtos.BaseReading``) as a typed :class:`Reading`.

    Required: ``resourceName``, ``valueType`` and ``origin`` (fedge cannot place a reading
    without a time). ``deviceName`` and ``profileName`` are optional because 4.x marshals them
    with ``omitempty``; a reading naming another device is refused.
    """
    if not isinstance(dto, dict):
        _bad("bad_shape", f"{where}: expected an object, got {type(dto).__name__}")

    def text(field: str, *, required: bool) -> str:
        value = dto.get(field)
        if value is None:
            if required:
                _bad("missing_field", f"{where}: no '{field}'")
            return ""
        if not isinstance(value, str):
            _bad("bad_shape", f"{where}: '{field}' is {type(value).__name__}, not a string")
        return value

    resource = text("resourceName", required=True)
    value_type = text("valueType", required=True)
    if not resource:
        _bad("missing_field", f"{where}: empty 'resourceName'")
    if value_type not in VALUE_TYPES:
        _bad("bad_reading", f"{where}: unknown valueType {value_type!r}")
    origin = dto.get("origin")
    if origin is None:
        _bad("missing_field", f"{where}: no 'origin'")
    if isinstance(origin, bool) or not isinstance(origin, int) or not 0 <= origin <= MAX_INT64:
        _bad("bad_shape", f"{where}: 'origin' is {origin!r}, not Unix nanoseconds")
    reading_device = text("deviceName", required=False) or device
    if reading_device != device:
        _bad("bad_shape", f"{where}: reading of device {reading_device!r} in a page for {device!r}")
    media_type = text("mediaType", required=False)
    try:
        value = _value_from_dto(dto, value_type)
    except ReadingError as exc:
        raise CoreDataError("bad_reading", f"{where} ({resource}): {exc}", status=200) from None
    return Reading(
        device=device,
        resource=resource,
        profile=text("profileName", required=False),
        value_type=value_type,
        value=value,
        origin_ns=origin,
        units=text("units", required=False),
        media_type=media_type,
        id=text("id", required=False),
    )


def _value_from_dto(dto: dict[str, Any], value_type: str) -> Value:
    if value_type == "Binary":
        raw = dto.get("binaryValue")
        if raw is None:
            return None  # a null reading (4.x)
        if not isinstance(raw, str):
            raise ReadingError("bad_value", "binaryValue must be a base64 string")
        try:
            return base64.b64decode(raw, validate=True)  # Go encodes []byte as standard base64
        except (binascii.Error, ValueError):
            raise ReadingError("bad_value", "binaryValue is not valid base64") from None
    if value_type in OTHER_TYPES:  # Object, ObjectArray
        # The specs type objectValue as a string, but EdgeX sends the JSON value itself.
        obj: Value = dto.get("objectValue")
        return obj
    raw = dto.get("value")
    if raw is None:
        return None  # 4.x null reading: "value": null
    if isinstance(raw, str):
        return parse_value(value_type, raw)
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        # 4.x with ?numeric=true sends numbers; check them against the type all the same.
        return parse_value(value_type, repr(raw))
    raise ReadingError("bad_value", f"value is {type(raw).__name__}, not a string")
