"""The aggregator's side of chunked updates: sealed pieces in, the whole sealed update out.

A device sends an update over its ``chunk_bytes`` as sealed pieces of kind ``chunk`` on its
``update/{device_id}`` topic (``fedge.protocol.chunks``). :class:`ChunkIntake` takes them
before the round engine does and hands the engine the reassembled whole, which then passes
every check a whole update passes (size, binding, counter, slot, schema, norm...): nothing of a
transfer is counted until its whole arrives and verifies.

Memory is bounded: a piece over ``chunk_bytes`` (plus headers) is refused unread; the cheap
checks of a whole update (device, fleet, enrolment, open round, deadline, version, selection,
slot, counter) run before any crypto; a piece opens only with the claimed device's key; a new
transfer is allocated (a buffer of exactly its declared length) only after that length is
checked against the engine's message limit, the per-device transfer count and the total byte
budget. Transfers of a round that closed, or past its deadline, are dropped and counted
(``chunk_expired``). Every refusal is counted as ``chunk_<reason>`` through ``count`` (the
service's ``messages_dropped``).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass

from fedge.aggregator.round_engine import RoundEngine
from fedge.protocol.chunks import CHUNK_KIND, CHUNK_OVERHEAD_BYTES, ChunkError, Reassembly, open_chunk
from fedge.protocol.framing import MAX_HEADER_BYTES
from fedge.protocol.sealing import SealError, read_header
from fedge.protocol.topics import TopicError

log = logging.getLogger("fedge.aggregator.chunks")

#: ``(reason, topic, detail)``: how a refused piece or an expired transfer is counted.
Count = Callable[[str, str, str], None]
_CHUNK_MARK = b'"kind":"chunk"'


@dataclass
class _Transfer:
    device: str
    round_id: str
    topic: str
    reassembly: Reassembly


def is_chunk(payload: bytes) -> bool:
    """Whether a message on ``update/+`` claims to be a piece: a look at its cleartext header
    (canonical JSON) without parsing it, so a whole update pays nothing for chunking. A piece
    that does not say so here reaches the engine, which refuses kind ``chunk`` (``wrong_kind``)."""
    if len(payload) < 16 or payload[:4] != b"FEDG":
        return False
    (header_len,) = struct.unpack_from(">I", payload, 8)
    return _CHUNK_MARK in payload[16 : 16 + min(header_len, MAX_HEADER_BYTES)]


class ChunkIntake:
    def __init__(self, chunk_bytes: int, transfers_per_device: int, budget_bytes: int, count: Count) -> None:
        self.chunk_bytes = chunk_bytes
        self.transfers_per_device = transfers_per_device
        self.budget_bytes = budget_bytes
        self._count = count
        self._transfers: dict[tuple[str, int, str], _Transfer] = {}
        self.completed = 0

    @property
    def held_bytes(self) -> int:
        """Bytes allocated for transfers in progress (never above ``budget_bytes``)."""
        return sum(t.reassembly.total for t in self._transfers.values())

    def status(self) -> dict[str, int]:
        return {"transfers": len(self._transfers), "bytes": self.held_bytes, "completed": self.completed}

    def take(self, engine: RoundEngine, topic: str, payload: bytes, now: float) -> bytes | None:
        """One piece: None while its transfer is incomplete (or the piece was refused, counted),
        the whole sealed update once every piece is in and its SHA-256 matches."""
        self.expire(engine, now)
        refused = self._take(engine, topic, payload, now)
        if isinstance(refused, bytes) or refused is None:
            return refused
        reason, detail = refused
        self._count(f"chunk_{reason}", topic, detail)
        return None

    def _take(
        self, engine: RoundEngine, topic: str, payload: bytes, now: float
    ) -> bytes | tuple[str, str] | None:
        if len(payload) > self.chunk_bytes + CHUNK_OVERHEAD_BYTES:
            return "too_large", f"a {len(payload)}-byte piece > chunk_bytes {self.chunk_bytes} + headers"
        try:
            topic_device = engine.topics.device_of(topic, "update")
            header, ciphertext = read_header(payload, len(payload))
        except (TopicError, SealError) as exc:
            return "unreadable", str(exc)
        device = header.device_id
        if header.kind != CHUNK_KIND or device != topic_device or header.fleet != engine.fleet:
            return "bad_header", f"kind {header.kind!r}, device {device!r} on {topic}, fleet {header.fleet!r}"
        key = engine.registry.get(device)
        if key is None:
            return "unknown_device", f"{device} is not enrolled (or revoked)"
        r = engine.current
        if r is None or header.round_id != r.manifest.round_id or header.model_version != r.manifest.version:
            return "wrong_round", f"round {header.round_id} v{header.model_version} is not the open round"
        if now > r.manifest.deadline:
            return "late", f"round {header.round_id} passed its deadline"
        if not r.manifest.is_selected(device):
            return "not_selected", f"{device} is not selected in round {header.round_id}"
        if r.secure is None and r.done(device):
            return "duplicate", f"{device} already has its update of round {header.round_id} counted"
        if header.counter <= engine.state.counters.get(device, -1):
            return "replayed_counter", f"counter {header.counter} of {device} was used"
        try:
            info, body = open_chunk(header, ciphertext, engine.box_key, key, box=engine.boxes.get(key))
        except (SealError, ChunkError) as exc:
            return str(exc.reason), str(exc)
        tid = (device, header.counter, info.transfer)
        transfer = self._transfers.get(tid)
        if transfer is None:
            mine = sum(1 for t in self._transfers.values() if t.device == device)
            if mine >= self.transfers_per_device:
                return (
                    "too_many_transfers",
                    f"{device} has {mine} transfers in progress (chunk_transfers_per_device)",
                )
            if self.held_bytes + info.total > self.budget_bytes:
                held = self.held_bytes
                return (
                    "over_budget",
                    f"{held} bytes in transfers + {info.total} > chunk_budget_bytes {self.budget_bytes}",
                )
            try:
                reassembly = Reassembly(info, engine.message_limit())
            except ChunkError as exc:
                return exc.reason, exc.detail
            transfer = self._transfers[tid] = _Transfer(device, header.round_id, topic, reassembly)
        try:
            transfer.reassembly.add(info, body)
        except ChunkError as exc:
            return exc.reason, exc.detail
        if not transfer.reassembly.complete:
            return None
        del self._transfers[tid]
        try:
            whole = transfer.reassembly.whole()
        except ChunkError as exc:
            return exc.reason, exc.detail
        self.completed += 1
        log.info("update of %s for round %s reassembled from %d pieces", device, header.round_id, info.count)
        return whole

    def expire(self, engine: RoundEngine, now: float) -> None:
        """Drops (and counts, ``chunk_expired``) the transfers of rounds no longer open or past
        their deadline: what a device cut off mid-way left behind."""
        r = engine.current
        for tid, t in list(self._transfers.items()):
            if r is None or t.round_id != r.manifest.round_id or now > r.manifest.deadline:
                del self._transfers[tid]
                missing = t.reassembly.info.count - t.reassembly.received
                self._count(
                    "chunk_expired",
                    t.topic,
                    f"round {t.round_id} closed with {missing} of {t.reassembly.info.count} pieces missing",
                )
