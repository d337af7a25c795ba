"""``fedge.protocol.chunks``: split and join, a piece's place bound to the whole, tampering and
forgery refused, duplicates ignored, and a declared whole over the limit refused before any
buffer is allocated."""

from __future__ import annotations

import hashlib
import os
import random
import tracemalloc

import pytest
from nacl.public import PrivateKey

from fedge.protocol.chunks import (
    CHUNK_KIND,
    ChunkError,
    ChunkInfo,
    Reassembly,
    blob_pieces,
    decode_blob_chunk,
    join,
    open_chunk,
    seal_chunks,
    split,
)
from fedge.protocol.sealing import SealedHeader, SealError, open_sealed, read_header, seal

DEVICE = PrivateKey.generate()
AGGREGATOR = PrivateKey.generate()
DATA = os.urandom(10_000)


def test_split_and_join_in_any_order() -> None:
    pieces = split(DATA, 1024)
    assert len(pieces) == 10 and [i.index for i, _ in pieces] == list(range(10))
    assert [len(b) for _, b in pieces] == [1024] * 9 + [784]
    assert {i.total for i, _ in pieces} == {10_000} and {i.count for i, _ in pieces} == {10}
    assert pieces[0][0].sha256 == hashlib.sha256(DATA).hexdigest()
    assert pieces[0][0].transfer == pieces[0][0].sha256[:16]
    shuffled = list(pieces)
    random.Random(1).shuffle(shuffled)
    assert join(shuffled, 10_000) == DATA


def test_an_exact_multiple_has_no_empty_last_piece() -> None:
    pieces = split(bytes(4096), 1024)
    assert [len(b) for _, b in pieces] == [1024] * 4


def test_duplicates_are_ignored_and_the_whole_waits_for_every_piece() -> None:
    pieces = split(DATA, 1024)
    r = Reassembly(pieces[3][0], 10_000)
    assert r.add(*pieces[3]) is True
    assert r.add(*pieces[3]) is False
    assert r.received == 1 and not r.complete
    assert r.missing() == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    with pytest.raises(ChunkError, match=r"^incomplete: 1 of 10 pieces$"):
        r.whole()
    for p in pieces:
        r.add(*p)
    assert r.complete and r.whole() == DATA


def test_a_tampered_piece_fails_the_whole_hash() -> None:
    pieces = split(DATA, 1024)
    info, body = pieces[5]
    pieces[5] = (info, bytes([body[0] ^ 1]) + body[1:])
    with pytest.raises(
        ChunkError, match=r"^hash_mismatch: the pieces put together are not the declared SHA-256$"
    ):
        join(pieces, 10_000)


def test_a_piece_of_the_wrong_length_or_another_whole_is_refused() -> None:
    pieces = split(DATA, 1024)
    r = Reassembly(pieces[0][0], 10_000)
    with pytest.raises(ChunkError, match=r"^wrong_length: piece 1 has 1023 bytes, its place holds 1024$"):
        r.add(pieces[1][0], pieces[1][1][:-1])
    other = split(os.urandom(10_000), 1024)
    with pytest.raises(ChunkError, match=r"^mismatch: a piece of transfer .* declares another whole$"):
        r.add(*other[1])
    assert r.received == 0  # nothing of either was kept


def _info(**changes: object) -> dict[str, object]:
    base = split(DATA, 1024)[0][0].to_dict()
    return {**base, **changes}


@pytest.mark.parametrize(
    "changes,message",
    [
        (
            {"count": 11},
            "wrong_count: 11 pieces for 10000 bytes in pieces of 1024 (must be 10, at most 65536)",
        ),
        ({"count": 0}, "wrong_count: 0 pieces for 10000 bytes in pieces of 1024 (must be 10, at most 65536)"),
        (
            {"total": 20_000},
            "wrong_count: 10 pieces for 20000 bytes in pieces of 1024 (must be 20, at most 65536)",
        ),
        ({"index": 10}, "bad_index: piece 10 of 10"),
        ({"index": -1}, "bad_chunk: chunk index must be a non-negative integer, not -1"),
        ({"index": True}, "bad_chunk: chunk index must be a non-negative integer, not True"),
        ({"total": 0, "count": 1}, "bad_chunk: a chunked whole has at least 1 byte"),
        ({"chunk_bytes": 10}, "bad_chunk: chunk_bytes 10 is outside 1024..67108864"),
        ({"sha256": "AB" * 32}, "bad_chunk: chunk sha256 must be 64 lowercase hex digits"),
        (
            {"transfer": "a/b"},
            "bad_chunk: invalid transfer id 'a/b': use 1-64 letters, digits, '_', '.', '-'",
        ),
    ],
)
def test_malformed_info_is_refused_with_its_reason(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ChunkError) as caught:
        ChunkInfo.from_dict(_info(**changes))
    assert str(caught.value) == message


def test_missing_or_extra_fields_are_refused() -> None:
    data = _info()
    del data["sha256"]
    with pytest.raises(ChunkError, match=r"^bad_chunk: chunk info must have exactly"):
        ChunkInfo.from_dict(data)
    with pytest.raises(ChunkError, match=r"^bad_chunk: chunk info must have exactly"):
        ChunkInfo.from_dict({**_info(), "extra": 1})


def test_an_oversize_declared_whole_is_refused_before_allocating() -> None:
    huge = ChunkInfo.from_dict(_info(total=4 * 1024**3, count=4 * 1024**2 // 1024, chunk_bytes=1024 * 1024))
    tracemalloc.start()
    try:
        with pytest.raises(ChunkError) as caught:
            Reassembly(huge, 10_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(caught.value) == "too_large: declares a 4294967296-byte whole, over the limit of 10000000"
    assert peak < 100_000  # no 4 GiB (nor 10 MB) buffer was made


def test_split_refuses_settings_that_cannot_work() -> None:
    with pytest.raises(ValueError, match=r"chunk_bytes must be in 1024..67108864, not 100"):
        split(DATA, 100)
    with pytest.raises(ValueError, match="nothing to split"):
        split(b"", 1024)


# --- sealed pieces of an update ------------------------------------------------------------------


def _sealed_update(size: int = 5000) -> bytes:
    header = SealedHeader("fleet-1", "dev-a", "r0001-v2", 7, "update", 2)
    return seal(header, {"codec": "fp32"}, os.urandom(size), DEVICE, AGGREGATOR.public_key)


def test_sealed_pieces_carry_the_whole_binding_and_reassemble_to_the_update() -> None:
    whole = _sealed_update()
    pieces = seal_chunks(whole, 1024, DEVICE, AGGREGATOR.public_key)
    assert len(pieces) == -(-len(whole) // 1024)
    opened = []
    for piece in pieces:
        header, ciphertext = read_header(piece)
        assert header == SealedHeader("fleet-1", "dev-a", "r0001-v2", 7, CHUNK_KIND, 2)
        opened.append(open_chunk(header, ciphertext, AGGREGATOR, DEVICE.public_key))
    random.Random(2).shuffle(opened)
    assert join(opened, len(whole)) == whole
    payload, body = open_sealed(*read_header(whole), AGGREGATOR, DEVICE.public_key)
    assert payload == {"codec": "fp32"} and len(body) == 5000


def test_a_forged_piece_does_not_open() -> None:
    whole = _sealed_update()
    piece = seal_chunks(whole, 1024, DEVICE, AGGREGATOR.public_key)[0]
    mallory = PrivateKey.generate()
    forged = seal_chunks(whole, 1024, mallory, AGGREGATOR.public_key)[0]
    header, ciphertext = read_header(forged)
    with pytest.raises(SealError, match=r"^decrypt_failed"):
        open_chunk(header, ciphertext, AGGREGATOR, DEVICE.public_key)
    altered = bytearray(piece)
    altered[-1] ^= 1
    with pytest.raises(SealError, match=r"^decrypt_failed"):
        open_chunk(*read_header(bytes(altered)), AGGREGATOR, DEVICE.public_key)


def test_a_piece_moved_to_another_counter_is_refused() -> None:
    piece = seal_chunks(_sealed_update(), 1024, DEVICE, AGGREGATOR.public_key)[0]
    header, ciphertext = read_header(piece)
    moved = SealedHeader(
        header.fleet, header.device_id, header.round_id, 8, header.kind, header.model_version
    )
    with pytest.raises(SealError, match=r"^binding_mismatch"):
        open_chunk(moved, ciphertext, AGGREGATOR, DEVICE.public_key)


def test_a_sealed_payload_without_chunk_info_is_not_a_piece() -> None:
    header = SealedHeader("fleet-1", "dev-a", "r0001-v2", 7, CHUNK_KIND, 2)
    frame = seal(header, {"codec": "fp32"}, b"x", DEVICE, AGGREGATOR.public_key)
    with pytest.raises(ChunkError, match=r"^bad_chunk: a sealed piece's payload header is exactly"):
        open_chunk(*read_header(frame), AGGREGATOR, DEVICE.public_key)


# --- blob pieces -------------------------------------------------------------------------------


def test_blob_pieces_decode_and_join() -> None:
    payloads = blob_pieces(DATA, 4096)
    assert len(payloads) == 3
    decoded = [decode_blob_chunk(p) for p in reversed(payloads)]
    assert join(decoded, 10_000) == DATA


def test_an_unreadable_blob_piece_is_bad_chunk() -> None:
    with pytest.raises(ChunkError, match=r"^bad_chunk: "):
        decode_blob_chunk(b"not a frame at all")


def test_blob_piece_topics_round_trip_and_refuse_strays() -> None:
    from fedge.protocol.topics import FleetTopics, TopicError

    topics = FleetTopics("f1")
    sha = hashlib.sha256(DATA).hexdigest()
    assert topics.blob_chunk(sha, 3) == f"fedge/v1/f1/blob/{sha}/000003"
    assert topics.blob_chunk_parse(topics.blob_chunk(sha, 3)) == (sha, 3)
    assert topics.blob_chunk_filter(sha) == f"fedge/v1/f1/blob/{sha}/+"
    for stray in (
        topics.blob(sha),
        f"{topics.blob(sha)}/3",
        f"{topics.blob(sha)}/00000x",
        "fedge/v1/f2/blob/x/000001",
    ):
        with pytest.raises(TopicError):
            topics.blob_chunk_parse(stray)
    with pytest.raises(TopicError, match="invalid blob piece index -1"):
        topics.blob_chunk(sha, -1)


def test_a_blob_piece_is_what_the_asyncapi_channel_documents() -> None:
    from fedge.protocol.topics import FleetTopics
    from support.asyncapi import load_document

    topics = FleetTopics("f1")
    payload = blob_pieces(DATA, 4096)[1]
    channel = load_document().channel_for(topics.blob_chunk(hashlib.sha256(DATA).hexdigest(), 1))
    assert channel is not None and channel.key == "blobChunk"
    channel.validate(topics.blob_chunk(hashlib.sha256(DATA).hexdigest(), 1), payload)
