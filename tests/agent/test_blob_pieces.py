"""``fedge.agent.chunk_transfer.BlobPieces``: a blob published in pieces is handed out whole only
when every piece is in and its SHA-256 is the one the manifest names; anything else is refused
with the reason the device counts, and holds no memory."""

from __future__ import annotations

import hashlib
import os

from nacl.public import PrivateKey

from fedge.agent.chunk_transfer import BlobPieces, outbox_frames
from fedge.agent.core import DeviceIdentity
from fedge.protocol.chunks import ChunkInfo, blob_pieces, encode_blob_chunk, split
from fedge.protocol.sealing import SealedHeader, read_header, seal

BLOB = os.urandom(10_000)
SHA = hashlib.sha256(BLOB).hexdigest()
WANTED = frozenset({SHA})


def test_pieces_in_any_order_make_the_blob_once_all_are_in() -> None:
    pieces = BlobPieces(1 << 20)
    payloads = blob_pieces(BLOB, 1024)
    order = list(range(len(payloads)))[::-1]
    results = [pieces.offer(SHA, i, payloads[i], WANTED) for i in order]
    assert results[:-1] == [None] * (len(payloads) - 1)
    assert results[-1] == BLOB


def test_a_tampered_piece_fails_the_whole_and_the_device_can_start_again() -> None:
    pieces = BlobPieces(1 << 20)
    parts = split(BLOB, 4096)
    info, body = parts[1]
    payloads = [encode_blob_chunk(i, b) for i, b in parts]
    payloads[1] = encode_blob_chunk(info, bytes([body[0] ^ 1]) + body[1:])
    results = [pieces.offer(SHA, i, p, WANTED) for i, p in enumerate(payloads)]
    assert results[-1] == (
        "blob_hash_mismatch",
        "hash_mismatch: the pieces put together are not the declared SHA-256",
    )
    good = blob_pieces(BLOB, 4096)
    assert [pieces.offer(SHA, i, p, WANTED) for i, p in enumerate(good)][-1] == BLOB


def test_unwanted_misplaced_and_oversize_pieces_are_refused() -> None:
    pieces = BlobPieces(5_000)
    payloads = blob_pieces(BLOB, 1024)
    assert pieces.offer(SHA, 0, payloads[0], frozenset()) == (
        "blob_unwanted",
        "no manifest being fetched names it",
    )
    reason, detail = pieces.offer(SHA, 3, payloads[0], WANTED)  # type: ignore[misc]
    assert reason == "blob_bad_chunk" and "on the topic of piece 3" in detail
    assert pieces.offer(SHA, 0, payloads[0], WANTED) == (
        "blob_too_large",
        "declares a 10000-byte whole, over the limit of 5000",
    )
    assert pieces.offer(SHA, 0, b"garbage", WANTED)[0] == "blob_bad_chunk"  # type: ignore[index]


def test_a_blob_published_again_in_other_pieces_starts_over() -> None:
    pieces = BlobPieces(1 << 20)
    old = blob_pieces(BLOB, 1024)
    assert pieces.offer(SHA, 0, old[0], WANTED) is None
    new = blob_pieces(BLOB, 4096)
    results = [pieces.offer(SHA, i, p, WANTED) for i, p in enumerate(new)]
    assert results[-1] == BLOB


def test_keep_only_forgets_blobs_no_longer_fetched() -> None:
    pieces = BlobPieces(1 << 20)
    payloads = blob_pieces(BLOB, 1024)
    assert pieces.offer(SHA, 0, payloads[0], WANTED) is None
    pieces.keep_only(frozenset())
    # The rest alone no longer completes it: the first piece's place is empty again.
    assert [pieces.offer(SHA, i, p, WANTED) for i, p in enumerate(payloads) if i][-1] is None


def test_an_update_over_chunk_bytes_goes_to_the_outbox_as_sealed_pieces() -> None:
    device, aggregator = PrivateKey.generate(), PrivateKey.generate()
    identity = DeviceIdentity("f1", "dev-a", device, aggregator.public_key)
    whole = seal(
        SealedHeader("f1", "dev-a", "r1", 3, "update", 2), {}, os.urandom(5000), device, aggregator.public_key
    )
    assert outbox_frames(whole, len(whole), identity) == [whole]
    frames = outbox_frames(whole, 1024, identity)
    assert len(frames) == -(-len(whole) // 1024)
    assert {read_header(f)[0] for f in frames} == {SealedHeader("f1", "dev-a", "r1", 3, "chunk", 2)}
    assert max(len(f) for f in frames) < 1024 + 1024


def test_chunk_info_is_what_the_payload_says() -> None:
    info = split(BLOB, 1024)[0][0]
    assert ChunkInfo.from_dict(info.to_dict()) == info
