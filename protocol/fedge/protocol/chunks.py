"""Chunked transfers: a message or blob larger than ``chunk_bytes`` travels in pieces.

Why: a broker refuses (Mosquitto: disconnects the client for) a packet over its
``max_packet_size``, and a constrained link loses a whole multi-megabyte publish to one drop.
A larger model must not be limited by either, so a sealed update and a model or weights blob
over ``chunk_bytes`` are cut into pieces that each fit, sent as QoS 1 messages of their own
(an update's go through the device's outbox: after a reconnect only the unacknowledged ones
are sent again).

Every piece says where it belongs (:class:`ChunkInfo`): the transfer id, its index, the
number of pieces, the whole's length, the piece size and the whole's SHA-256. Piece ``i``
holds bytes ``i * chunk_bytes`` .. ``min((i + 1) * chunk_bytes, total)`` of the whole.

- **Updates** (device -> aggregator): each piece is sealed like an update
  (:func:`seal_chunks`): a ``SEALED`` frame of kind ``chunk`` on the device's
  ``update/{device_id}`` topic, with the whole message's round, counter and model version in
  its cleartext header and ``{"chunk": ChunkInfo}`` as its sealed payload header. The broker
  sees ciphertext only; a piece not sealed by the claimed device for this aggregator does not
  open (:func:`open_chunk`), and its place in the whole is inside the box. Reassembled, the
  whole is the original sealed update, which then passes every check a whole one does.
- **Blobs** (aggregator -> devices): each piece is a ``PAYLOAD`` frame with header
  ``{"chunk": ChunkInfo}`` (:func:`encode_blob_chunk`), retained on
  ``blob/{sha256}/{index:06d}``. A piece is not signed: the signed manifest pins the whole
  blob's SHA-256 and length, a device writes the pieces into a buffer of exactly that length
  (allocated only after the declared length is checked against its limit) and checks the
  whole's SHA-256 once every piece is in. A forged piece makes the whole fail that check, so
  it is refused, as an altered whole blob always was.

:class:`Reassembly` is the one place pieces are put together, on both sides: the declared
length is checked against the caller's limit before a byte is allocated, the piece count and
each piece's length must follow from it, a duplicate is ignored, and the whole is handed out
only once its SHA-256 matches.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Final

from nacl.public import Box, PrivateKey, PublicKey

from fedge.protocol.digests import is_sha256_hex
from fedge.protocol.errors import ReasonError
from fedge.protocol.framing import FrameError, FrameKind, decode_frame, encode_frame
from fedge.protocol.sealing import SealedHeader, open_sealed, read_header, seal
from fedge.protocol.topics import TopicError, check_id

#: The sealed kind of a piece of an update (``fedge.protocol.sealing.MESSAGE_KINDS``).
CHUNK_KIND: Final = "chunk"
#: Default piece size: under Mosquitto's default (no limit) and the 256 KiB-1 MiB packet limits
#: common brokers and managed services set, with room for the frame and sealing overhead.
DEFAULT_CHUNK_BYTES: Final = 256 * 1024
MIN_CHUNK_BYTES: Final = 1024
MAX_CHUNK_BYTES: Final = 64 * 1024 * 1024
#: At most this many pieces in one transfer (a 64 MiB blob in 1 KiB pieces).
MAX_CHUNK_COUNT: Final = 65_536
#: Frame headers and sealing around one piece's body: what a packet carries above ``chunk_bytes``.
CHUNK_OVERHEAD_BYTES: Final = 2048
_INFO_FIELDS: Final = frozenset({"transfer", "index", "count", "total", "chunk_bytes", "sha256"})


class ChunkError(ReasonError[str]):
    """A piece that cannot be used; ``reason`` is a short stable code.

    ``bad_chunk`` (not a piece: unreadable or malformed info), ``too_large`` (the declared
    whole is over the receiver's limit), ``wrong_count`` (the piece count does not follow from
    the length and piece size), ``wrong_length`` (a piece of another length than its place
    holds), ``mismatch`` (a piece of the same transfer declaring another whole), ``bad_index``,
    ``hash_mismatch`` (every piece in, and the whole is not the declared SHA-256)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.detail = detail


@dataclass(frozen=True)
class ChunkInfo:
    """Where one piece belongs in its whole."""

    transfer: str
    index: int
    count: int
    total: int
    chunk_bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "transfer": self.transfer,
            "index": self.index,
            "count": self.count,
            "total": self.total,
            "chunk_bytes": self.chunk_bytes,
            "sha256": self.sha256,
        }

    @staticmethod
    def from_dict(data: Any) -> ChunkInfo:
        """Strict: exactly the six fields, each in range, the count following from the length."""
        if not isinstance(data, dict) or set(data) != _INFO_FIELDS:
            raise ChunkError("bad_chunk", f"chunk info must have exactly {sorted(_INFO_FIELDS)}")
        for key in ("index", "count", "total", "chunk_bytes"):
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ChunkError("bad_chunk", f"chunk {key} must be a non-negative integer, not {value!r}")
        transfer, sha = data["transfer"], data["sha256"]
        try:
            check_id(transfer, "transfer id")
        except TopicError as exc:
            raise ChunkError("bad_chunk", str(exc)) from None
        if not isinstance(sha, str) or not is_sha256_hex(sha):
            raise ChunkError("bad_chunk", "chunk sha256 must be 64 lowercase hex digits")
        info = ChunkInfo(transfer, data["index"], data["count"], data["total"], data["chunk_bytes"], sha)
        if not MIN_CHUNK_BYTES <= info.chunk_bytes <= MAX_CHUNK_BYTES:
            raise ChunkError(
                "bad_chunk", f"chunk_bytes {info.chunk_bytes} is outside {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}"
            )
        if info.total < 1:
            raise ChunkError("bad_chunk", "a chunked whole has at least 1 byte")
        if not 1 <= info.count <= MAX_CHUNK_COUNT or info.count != chunk_count(info.total, info.chunk_bytes):
            raise ChunkError(
                "wrong_count",
                f"{info.count} pieces for {info.total} bytes in pieces of {info.chunk_bytes} "
                f"(must be {chunk_count(info.total, info.chunk_bytes)}, at most {MAX_CHUNK_COUNT})",
            )
        if info.index >= info.count:
            raise ChunkError("bad_index", f"piece {info.index} of {info.count}")
        return info

    def piece_length(self) -> int:
        """The length piece ``index`` must have: ``chunk_bytes``, less for the last."""
        return min(self.chunk_bytes, self.total - self.index * self.chunk_bytes)

    def same_whole(self, other: ChunkInfo) -> bool:
        return (self.transfer, self.count, self.total, self.chunk_bytes, self.sha256) == (
            other.transfer,
            other.count,
            other.total,
            other.chunk_bytes,
            other.sha256,
        )


def chunk_count(total: int, chunk_bytes: int) -> int:
    """How many pieces of ``chunk_bytes`` hold ``total`` bytes."""
    return max(1, math.ceil(total / chunk_bytes))


def needs_chunks(size: int, chunk_bytes: int) -> bool:
    """Whether a message of ``size`` bytes travels in pieces (only if larger than one piece)."""
    return size > chunk_bytes


def split(data: bytes, chunk_bytes: int, transfer: str | None = None) -> list[tuple[ChunkInfo, bytes]]:
    """``data`` as pieces of ``chunk_bytes`` (the last shorter), each with its :class:`ChunkInfo`.

    ``transfer`` defaults to the first 16 hex digits of the whole's SHA-256, so the same whole
    sent again (a resend after a reconnect) is the same transfer and its pieces duplicates."""
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be in {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}, not {chunk_bytes}")
    if not data:
        raise ValueError("nothing to split: an empty message is never chunked")
    count = chunk_count(len(data), chunk_bytes)
    if count > MAX_CHUNK_COUNT:
        raise ValueError(
            f"{len(data)} bytes in pieces of {chunk_bytes} is {count} pieces, over {MAX_CHUNK_COUNT}: "
            "raise chunk_bytes"
        )
    sha = hashlib.sha256(data).hexdigest()
    tid = check_id(transfer if transfer is not None else sha[:16], "transfer id")
    view = memoryview(data)
    return [
        (
            ChunkInfo(tid, i, count, len(data), chunk_bytes, sha),
            bytes(view[i * chunk_bytes : (i + 1) * chunk_bytes]),
        )
        for i in range(count)
    ]


class Reassembly:
    """One transfer being put together, in a buffer of exactly the declared length.

    The declared length is checked against ``max_total`` before anything is allocated, so a
    piece claiming a 4 GiB whole costs nothing but its own bytes."""

    def __init__(self, first: ChunkInfo, max_total: int) -> None:
        if first.total > max_total:
            raise ChunkError(
                "too_large", f"declares a {first.total}-byte whole, over the limit of {max_total}"
            )
        self.info = first
        self._buffer = bytearray(first.total)
        self._have = bytearray(first.count)
        self.received = 0

    @property
    def total(self) -> int:
        return self.info.total

    @property
    def complete(self) -> bool:
        return self.received == self.info.count

    def add(self, info: ChunkInfo, body: bytes) -> bool:
        """Puts one piece in its place; False for a piece already in (ignored)."""
        if not info.same_whole(self.info):
            raise ChunkError("mismatch", f"a piece of transfer {info.transfer} declares another whole")
        if len(body) != info.piece_length():
            raise ChunkError(
                "wrong_length",
                f"piece {info.index} has {len(body)} bytes, its place holds {info.piece_length()}",
            )
        if self._have[info.index]:
            return False
        start = info.index * info.chunk_bytes
        self._buffer[start : start + len(body)] = body
        self._have[info.index] = 1
        self.received += 1
        return True

    def missing(self) -> list[int]:
        """The indices of the pieces not in yet."""
        return [i for i, have in enumerate(self._have) if not have]

    def whole(self) -> bytes:
        """The whole, once every piece is in and its SHA-256 is the declared one."""
        if not self.complete:
            raise ChunkError("incomplete", f"{self.received} of {self.info.count} pieces")
        if hashlib.sha256(self._buffer).hexdigest() != self.info.sha256:
            raise ChunkError("hash_mismatch", "the pieces put together are not the declared SHA-256")
        return bytes(self._buffer)


def join(pieces: list[tuple[ChunkInfo, bytes]], max_total: int) -> bytes:
    """Puts a whole list of pieces together in any order (tests, tools)."""
    if not pieces:
        raise ChunkError("bad_chunk", "no pieces")
    reassembly = Reassembly(pieces[0][0], max_total)
    for info, body in pieces:
        reassembly.add(info, body)
    return reassembly.whole()


# --- updates: each piece sealed like an update ---------------------------------------------------


def seal_chunks(
    frame: bytes, chunk_bytes: int, device_key: PrivateKey, aggregator_key: PublicKey
) -> list[bytes]:
    """A sealed message as sealed pieces, each bound to the whole's device, round, counter and
    model version (cleartext and sealed) and to its place in the whole (sealed)."""
    whole, _ = read_header(frame, len(frame))
    out = []
    for info, body in split(frame, chunk_bytes):
        header = SealedHeader(
            whole.fleet, whole.device_id, whole.round_id, whole.counter, CHUNK_KIND, whole.model_version
        )
        out.append(seal(header, {"chunk": info.to_dict()}, body, device_key, aggregator_key))
    return out


def open_chunk(
    header: SealedHeader,
    ciphertext: bytes,
    aggregator_key: PrivateKey,
    device_public: PublicKey,
    box: Box | None = None,
) -> tuple[ChunkInfo, bytes]:
    """Opens a sealed piece (:class:`~fedge.protocol.sealing.SealError` if it is not the
    claimed device's for this aggregator) and reads its place (:class:`ChunkError`)."""
    payload, body = open_sealed(header, ciphertext, aggregator_key, device_public, len(ciphertext), box=box)
    if set(payload) != {"chunk"}:
        raise ChunkError("bad_chunk", "a sealed piece's payload header is exactly {'chunk': ...}")
    return ChunkInfo.from_dict(payload["chunk"]), body


# --- blobs: pieces in payload frames, checked by the whole's pinned SHA-256 ----------------------


def encode_blob_chunk(info: ChunkInfo, body: bytes) -> bytes:
    return encode_frame(FrameKind.PAYLOAD, {"chunk": info.to_dict()}, body)


def decode_blob_chunk(data: bytes) -> tuple[ChunkInfo, bytes]:
    """A blob piece's place and bytes; :class:`ChunkError` (``bad_chunk``) if unreadable."""
    try:
        frame = decode_frame(data, FrameKind.PAYLOAD, MAX_CHUNK_BYTES)
    except FrameError as exc:
        raise ChunkError("bad_chunk", str(exc)) from None
    if set(frame.header) != {"chunk"}:
        raise ChunkError("bad_chunk", "a blob piece's header is exactly {'chunk': ...}")
    return ChunkInfo.from_dict(frame.header["chunk"]), frame.body


def blob_pieces(blob: bytes, chunk_bytes: int) -> list[bytes]:
    """A blob as the payloads of its retained pieces, in index order."""
    return [encode_blob_chunk(info, body) for info, body in split(blob, chunk_bytes)]
