"""The device's side of chunked transfers (``fedge.protocol.chunks``).

Out: a sealed update over ``[agent] chunk_bytes`` goes into the outbox as sealed pieces, one
outbox entry each (QoS 1, deleted on PUBACK), so a reconnect sends again only the pieces the
broker had not acknowledged, and no packet is larger than ``chunk_bytes`` plus headers.

In: a model or weights blob over the aggregator's ``chunk_bytes`` arrives as retained pieces on
``blob/{sha256}/{index}``. :class:`BlobPieces` puts the pieces of the blobs being fetched
together in a buffer of the declared length (checked against ``MAX_BLOB_BYTES`` before it is
allocated) and hands out the whole once its SHA-256 is the one in the topic, which the signed
manifest names; a forged piece fails that check and the blob is refused as an altered whole
one is.
"""

from __future__ import annotations

from fedge.agent.core import DeviceIdentity
from fedge.protocol.chunks import ChunkError, Reassembly, decode_blob_chunk, needs_chunks, seal_chunks


def outbox_frames(frame: bytes, chunk_bytes: int, identity: DeviceIdentity) -> list[bytes]:
    """What goes into the outbox for one sealed message: itself, or its sealed pieces."""
    if not needs_chunks(len(frame), chunk_bytes):
        return [frame]
    return seal_chunks(frame, chunk_bytes, identity.device_key, identity.aggregator_key)


class BlobPieces:
    """The pieces of the blobs being fetched, by SHA-256 (paho's thread, under the agent's lock)."""

    def __init__(self, max_blob_bytes: int) -> None:
        self.max_blob_bytes = max_blob_bytes
        self._open: dict[str, Reassembly] = {}

    def keep_only(self, wanted: frozenset[str]) -> None:
        """Forgets the pieces of blobs no longer fetched (their buffers go with them)."""
        self._open = {sha: r for sha, r in self._open.items() if sha in wanted}

    def offer(
        self, sha: str, index: int, payload: bytes, wanted: frozenset[str]
    ) -> bytes | tuple[str, str] | None:
        """The whole blob once its last piece is in and it verifies; ``(reason, detail)`` for a
        piece that is refused; None while pieces are missing (or for a duplicate)."""
        if sha not in wanted:
            return "blob_unwanted", "no manifest being fetched names it"
        try:
            info, body = decode_blob_chunk(payload)
        except ChunkError as exc:
            return "blob_bad_chunk", str(exc)
        if info.sha256 != sha or info.index != index:
            return (
                "blob_bad_chunk",
                f"piece {info.index} of {info.sha256[:16]} on the topic of piece {index} of {sha[:16]}",
            )
        reassembly = self._open.get(sha)
        if reassembly is None or not reassembly.info.same_whole(info):
            # First piece, or the blob published again in pieces of another size: start over.
            try:
                reassembly = self._open[sha] = Reassembly(info, self.max_blob_bytes)
            except ChunkError as exc:
                return "blob_too_large", exc.detail
        try:
            reassembly.add(info, body)
        except ChunkError as exc:
            return "blob_bad_chunk", str(exc)
        if not reassembly.complete:
            return None
        del self._open[sha]
        try:
            return reassembly.whole()
        except ChunkError as exc:
            return "blob_hash_mismatch", str(exc)
