"""JSON from untrusted bytes, bounded in size and nesting depth *before* it is parsed.

``json.loads`` recurses once per nesting level: 100 kB of ``[`` raises ``RecursionError`` (not
a ``ValueError``), which escapes ``except ValueError`` and ends whatever loop was parsing. A
device may write its own retained status, so one such message would end the aggregator on
every restart. Every parse of network input, and of files other principals write, goes through
:func:`loads_bounded`, which refuses, with one error type and a stable ``reason``:

- ``too_large``: more than ``max_bytes`` (checked first; costs nothing);
- ``bad_utf8``: not strict UTF-8 (``json.loads`` on bytes would also guess UTF-16/32);
- ``too_deep``: arrays and objects nested deeper than ``max_depth`` (checked before parsing,
  see :func:`nesting_depth_exceeds`);
- ``not_finite``: ``NaN``, ``Infinity`` or a number too large for a float (``1e999``): JSON has
  no such values and fedge never writes them;
- ``bad_json``: anything else ``json.loads`` refuses (syntax, integers over Python's digit
  limit).

Pure: no I/O.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final, NoReturn

from fedge.protocol.errors import ReasonError

#: Deep enough for every document fedge exchanges (a round manifest, with its model manifest
#: inside, nests 6 levels; EdgeX messages, whose object readings nest deeper, pass their own
#: 64), shallow enough for any recursion limit.
DEFAULT_MAX_DEPTH: Final = 32
#: Every ``reason`` a :class:`BoundedJsonError` can carry.
REASONS: Final = frozenset({"too_large", "bad_utf8", "too_deep", "not_finite", "bad_json"})

# Every byte but the four brackets, for bytes.translate(None, delete).
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_NOT_BRACKETS_OR_QUOTES = bytes(b for b in range(256) if b not in b'[]{}"')
_OPENERS = frozenset(b"[{")


class BoundedJsonError(ReasonError[str]):
    """Untrusted bytes are not acceptable JSON; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.detail = detail  # for callers that word the problem their own way


class _NotFinite(ValueError):
    """Raised from inside ``json.loads`` hooks; told apart from syntax errors."""


def loads_bounded(data: bytes, *, max_bytes: int, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """The JSON value in ``data`` (UTF-8), or :class:`BoundedJsonError`.

    Size, encoding and depth are checked before ``json.loads`` runs, so its recursion never
    goes deeper than ``max_depth``; refusing 100 kB of ``[`` costs a few passes of C over the
    bytes and ``max_depth + 1`` loop iterations.
    """
    if max_bytes < 0 or max_depth < 0:
        raise ValueError(f"max_bytes and max_depth must be >= 0, got {max_bytes} and {max_depth}")
    raw = bytes(data)
    if len(raw) > max_bytes:
        raise BoundedJsonError("too_large", f"{len(raw)} bytes > {max_bytes}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BoundedJsonError("bad_utf8", f"not UTF-8 at byte {exc.start}") from None
    if nesting_depth_exceeds(raw, max_depth):
        raise BoundedJsonError("too_deep", f"nested deeper than {max_depth} levels")
    try:
        if text.startswith("\ufeff"):  # what json.loads says; JSONDecoder.decode does not check
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        return _DECODER.decode(text)
    except _NotFinite as exc:
        raise BoundedJsonError("not_finite", str(exc)) from None
    except RecursionError:  # only with a recursion limit below max_depth: still refused
        raise BoundedJsonError("too_deep", f"nested too deeply to parse (limit {max_depth})") from None
    except ValueError as exc:  # JSONDecodeError, over-long integers
        raise BoundedJsonError("bad_json", str(exc)[:200]) from None


def _refuse_constant(name: str) -> NoReturn:
    raise _NotFinite(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise _NotFinite(f"number {text[:32]} is out of range")
    return number


#: One decoder for every call: ``json.loads`` with hooks builds a new ``JSONDecoder`` (and its
#: scanner) each time, a fifth of parsing a sealed message's small header. Stateless, so shared.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)


def nesting_depth_exceeds(data: bytes, max_depth: int) -> bool:
    """True if arrays and objects in ``data`` nest deeper than ``max_depth`` (a bare value is
    depth 0, ``[]`` depth 1). Brackets inside JSON strings do not count.

    Fast paths: there cannot be more levels than opening brackets; nor, once the empty
    innermost ``{}`` are removed, more than one plus the openers left (an EdgeX event
    of 350 readings, 350 openers, has 4 left). Otherwise strings are cut out and everything but
    brackets dropped (both in C), then one loop over the brackets stops as soon as the limit is
    passed (2 MB of ``[]`` takes about 0.1 s). On text that is not JSON (an unterminated string,
    stray closers) the answer may be either; ``json.loads`` refuses such text anyway, and never
    recurses past the point where it stops.
    """
    if data.count(b"[") + data.count(b"{") <= max_depth:
        return False
    brackets = b'"'
    if b"\\" not in data:
        # Brackets and quotes only; a string without brackets inside is then an adjacent pair of
        # quotes. If removing the pairs (left to right) leaves no quote, every pair removed was
        # one string (the first quote opens one, the next closes it), and nothing else was.
        brackets = data.translate(None, _NOT_BRACKETS_OR_QUOTES).replace(b'""', b"")
    if b'"' in brackets:
        brackets = _outside_strings(data).translate(None, _NOT_BRACKETS)
    # Without its empty objects (one pass: a pair that only forms once one is gone stays) the
    # nesting is one level shallower at most, and no deeper than its openers.
    inner = brackets.replace(b"{}", b"")
    if inner.count(b"[") + inner.count(b"{") + 1 <= max_depth:
        return False
    depth = 0
    for byte in brackets:
        if byte in _OPENERS:
            depth += 1
            if depth > max_depth:
                return True
        elif depth > 0:
            depth -= 1
    return False


def _outside_strings(data: bytes) -> bytes:
    """``data`` with every JSON string (quotes included) cut out, so brackets inside strings do
    not count. Linear whatever the data (no regex, no backtracking).

    Why not a regex substitution of the strings: an EdgeX event of 350 readings has some 2,500,
    and substituting them cost 2 us per reading, as much as parsing the event. Splitting on
    quotes is one pass of C: with escaped backslashes (``\\\\``) and then escaped quotes
    removed first, every remaining quote opens or closes a string, so the even pieces are the
    text outside strings; an unterminated string (an odd number of quotes) runs to the end, as
    json.loads reads it. Outside strings a backslash is not JSON (json.loads stops there, having
    read a prefix this cuts exactly as it should), so there the answer may be either.
    """
    if b"\\" in data:
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    return b"".join(data.split(b'"')[::2])


def loads_state_file(raw: bytes | str) -> Any:
    """JSON of a state file fedge wrote itself (device state, trust store): a duplicate key or
    a NaN/Infinity means the file was edited or damaged, so either is a :class:`ValueError`
    (the caller names the file). The caller bounds the size before reading."""
    return json.loads(raw, object_pairs_hook=_no_duplicate_keys, parse_constant=_constant_not_allowed)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _constant_not_allowed(name: str) -> NoReturn:
    raise ValueError(f"{name} is not allowed")
