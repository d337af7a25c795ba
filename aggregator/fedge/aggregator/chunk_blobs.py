"""Model and weights blobs over ``chunk_bytes`` as retained pieces (``fedge.protocol.chunks``).

A blob that fits in one piece is published whole on ``blob/{sha256}``, exactly as before; a
larger one as pieces on ``blob/{sha256}/{index:06d}``, so no packet the aggregator publishes
is larger than ``chunk_bytes`` plus headers, whatever the model's size. Clearing a blob no
manifest names any more clears its pieces too, so the broker does not keep a stale model's
pieces for ever.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from fedge.protocol.chunks import blob_pieces, chunk_count, needs_chunks
from fedge.protocol.topics import FleetTopics


def blob_messages(
    topics: FleetTopics, blobs: Mapping[str, bytes], chunk_bytes: int
) -> list[tuple[str, bytes]]:
    """``(topic, payload)`` of every blob: whole, or its pieces in index order."""
    out: list[tuple[str, bytes]] = []
    for topic, blob in blobs.items():
        if not needs_chunks(len(blob), chunk_bytes):
            out.append((topic, blob))
            continue
        sha = topic.rsplit("/", 1)[-1]
        out.extend((topics.blob_chunk(sha, i), p) for i, p in enumerate(blob_pieces(blob, chunk_bytes)))
    return out


def clear_topics(topics: FleetTopics, topic: str, size: int, chunk_bytes: int) -> list[str]:
    """The topics to clear (empty retained payload) for the blob on ``topic``: the whole topic,
    and the pieces a blob of ``size`` bytes was published as (the weights of one model keep
    their size from round to round)."""
    if not needs_chunks(size, chunk_bytes):
        return [topic]
    sha = topic.rsplit("/", 1)[-1]
    return [topic, *(topics.blob_chunk(sha, i) for i in range(chunk_count(size, chunk_bytes)))]


def retained_messages(
    topics: FleetTopics, items: Iterable[tuple[str, bytes]], chunk_bytes: int, cleared_size: int
) -> list[tuple[str, bytes]]:
    """``items`` as published: a blob over ``chunk_bytes`` in pieces, a cleared blob with its
    pieces (as a blob of ``cleared_size`` bytes), any other topic as it is. For publishers that
    mix blobs with documents (the rollout gate's promoted weights and decisions)."""
    out: list[tuple[str, bytes]] = []
    for topic, payload in items:
        if not topic.startswith(f"{topics.base}/blob/"):
            out.append((topic, payload))
        elif payload:
            out.extend(blob_messages(topics, {topic: payload}, chunk_bytes))
        else:
            out.extend((t, b"") for t in clear_topics(topics, topic, cleared_size, chunk_bytes))
    return out
