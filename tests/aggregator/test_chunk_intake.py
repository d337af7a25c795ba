"""``fedge.aggregator.chunk_intake`` with the real round engine and real NaCl: an update in
sealed pieces counts exactly as the whole would, once, and only when every piece is in; forged,
oversize, over-budget, surplus and stale pieces are refused and counted, and hold no memory."""

from __future__ import annotations

import hashlib
import os

import pytest
from nacl.public import PrivateKey

from fedge.aggregator.chunk_blobs import blob_messages, clear_topics, retained_messages
from fedge.aggregator.chunk_intake import ChunkIntake, is_chunk
from fedge.aggregator.round_engine import RoundEngine
from fedge.protocol.chunks import ChunkInfo, blob_pieces, decode_blob_chunk, join, open_chunk, seal_chunks
from fedge.protocol.round_manifest import RoundManifest
from fedge.protocol.sealing import SealedHeader, read_header, seal
from support.engine_helpers import AGGREGATOR_KEY, DEVICE_KEYS, T0, TOPICS, Device, devices, make_engine

PIECE = 1024


class Counted:
    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.details: list[str] = []

    def __call__(self, reason: str, topic: str, detail: str) -> None:
        self.reasons.append(reason)
        self.details.append(detail)


def _train_round() -> tuple[RoundEngine, RoundManifest, dict[str, Device]]:
    engine = make_engine()
    manifest = engine.open_round(T0).manifest
    assert manifest.phase == "train"
    return engine, manifest, devices()


def _pieces(device: Device, manifest: RoundManifest, key: PrivateKey | None = None) -> list[bytes]:
    whole = device.update(manifest)
    return seal_chunks(whole, PIECE, key or device.key, AGGREGATOR_KEY.public_key)


def _intake(counted: Counted, transfers: int = 2, budget: int = 10**6) -> ChunkIntake:
    return ChunkIntake(PIECE, transfers, budget, counted)


def test_an_update_in_pieces_counts_once_when_the_last_piece_is_in() -> None:
    engine, manifest, devs = _train_round()
    counted = Counted()
    intake = _intake(counted)
    pieces = _pieces(devs["dev-a"], manifest)
    assert len(pieces) >= 2 and all(is_chunk(p) for p in pieces)
    topic = devs["dev-a"].topic
    for piece in reversed(pieces[1:]):
        assert intake.take(engine, topic, piece, T0 + 1) is None
        assert intake.take(engine, topic, piece, T0 + 1) is None  # a duplicate: ignored
    assert engine.current is not None and not engine.current.reported  # nothing counted yet
    assert intake.status() == {"transfers": 1, "bytes": len(join_total(pieces)), "completed": 0}
    whole = intake.take(engine, topic, pieces[0], T0 + 1)
    assert whole is not None and not is_chunk(whole)
    outcome = engine.handle(topic, whole, T0 + 1)
    assert outcome.accepted, outcome
    assert counted.reasons == [] and intake.status() == {"transfers": 0, "bytes": 0, "completed": 1}
    # A resend of the same pieces after a reconnect: refused before any crypto, counted as routine.
    assert intake.take(engine, topic, pieces[0], T0 + 2) is None
    assert counted.reasons == ["chunk_duplicate"]
    assert engine.state.rejected_total == {}


def join_total(pieces: list[bytes]) -> bytes:
    """The whole the sealed pieces carry (opened with the aggregator's key, as the intake does)."""
    opened = []
    for p in pieces:
        header, ciphertext = read_header(p)
        opened.append(
            open_chunk(header, ciphertext, AGGREGATOR_KEY, DEVICE_KEYS[header.device_id].public_key)
        )
    return join(opened, 10**7)


def test_a_forged_piece_is_refused_and_holds_nothing() -> None:
    engine, manifest, devs = _train_round()
    counted = Counted()
    intake = _intake(counted)
    forged = _pieces(devs["dev-a"], manifest, key=PrivateKey.generate())
    assert intake.take(engine, devs["dev-a"].topic, forged[0], T0 + 1) is None
    assert counted.reasons == ["chunk_decrypt_failed"]
    assert intake.status()["transfers"] == 0
    # Another device's piece on dev-a's topic: refused before any crypto.
    other = _pieces(devs["dev-b"], manifest)[0]
    assert intake.take(engine, devs["dev-a"].topic, other, T0 + 1) is None
    assert counted.reasons[-1] == "chunk_bad_header"


def test_pieces_outside_the_open_round_are_refused_before_any_crypto() -> None:
    engine, manifest, devs = _train_round()
    counted = Counted()
    intake = _intake(counted)
    piece = _pieces(devs["dev-a"], manifest)[0]
    assert intake.take(engine, devs["dev-a"].topic, piece, manifest.deadline + 1) is None
    assert counted.reasons == ["chunk_late"]
    assert intake.take(engine, devs["dev-a"].topic, b"x" * (PIECE + 4096), T0 + 1) is None
    assert counted.reasons[-1] == "chunk_too_large"
    assert intake.status()["transfers"] == 0


def _sealed_piece(device: Device, manifest: RoundManifest, info: ChunkInfo, body: bytes) -> bytes:
    header = SealedHeader(TOPICS.fleet, device.device_id, manifest.round_id, 9, "chunk", manifest.version)
    return seal(header, {"chunk": info.to_dict()}, body, device.key, AGGREGATOR_KEY.public_key)


def test_a_declared_whole_over_the_message_limit_is_refused_before_allocating() -> None:
    engine, manifest, devs = _train_round()
    counted = Counted()
    intake = _intake(counted, budget=10**12)
    huge = ChunkInfo("t1", 0, 64, 64 * 64 * 1024 * 1024, 64 * 1024 * 1024, "ab" * 32)
    piece = _sealed_piece(devs["dev-a"], manifest, huge, b"x" * 100)
    intake.chunk_bytes = 64 * 1024 * 1024  # the piece itself is small; its declared whole is 4 GiB
    assert intake.take(engine, devs["dev-a"].topic, piece, T0 + 1) is None
    assert counted.reasons == ["chunk_too_large"]
    assert counted.details == [
        f"declares a {64 * 64 * 1024 * 1024}-byte whole, over the limit of {engine.message_limit()}"
    ]
    assert intake.status() == {"transfers": 0, "bytes": 0, "completed": 0}


def test_the_byte_budget_and_the_transfers_per_device_bound_memory() -> None:
    engine, manifest, devs = _train_round()
    counted = Counted()
    pieces = _pieces(devs["dev-a"], manifest)
    whole_bytes = len(join_total(pieces))
    intake = _intake(counted, transfers=1, budget=whole_bytes + 10)
    assert intake.take(engine, devs["dev-a"].topic, pieces[0], T0 + 1) is None
    assert counted.reasons == []
    # A second update of the same device (another counter) is a second transfer: over the bound.
    again = _pieces(devs["dev-a"], manifest)
    assert intake.take(engine, devs["dev-a"].topic, again[0], T0 + 1) is None
    assert counted.reasons == ["chunk_too_many_transfers"]
    # Another device's transfer would go over the byte budget.
    assert intake.take(engine, devs["dev-b"].topic, _pieces(devs["dev-b"], manifest)[0], T0 + 1) is None
    assert counted.reasons[-1] == "chunk_over_budget"
    assert intake.status()["transfers"] == 1 and intake.held_bytes == whole_bytes


def test_a_transfer_cut_off_mid_way_expires_with_its_round_counted() -> None:
    engine, manifest, devs = _train_round()
    counted = Counted()
    intake = _intake(counted)
    pieces = _pieces(devs["dev-a"], manifest)
    assert intake.take(engine, devs["dev-a"].topic, pieces[0], T0 + 1) is None
    engine.close_round()
    engine.open_round(T0 + 100)
    intake.expire(engine, T0 + 100)
    assert counted.reasons == ["chunk_expired"]
    assert counted.details == [
        f"round {manifest.round_id} closed with {len(pieces) - 1} of {len(pieces)} pieces missing"
    ]
    assert intake.status() == {"transfers": 0, "bytes": 0, "completed": 0}
    # The rest of the old round's pieces arriving late: refused, nothing allocated again.
    assert intake.take(engine, devs["dev-a"].topic, pieces[1], T0 + 101) is None
    assert counted.reasons[-1] == "chunk_wrong_round" and intake.held_bytes == 0


@pytest.mark.parametrize("size", [PIECE, PIECE + 1, 5 * PIECE + 3])
def test_blobs_are_published_whole_up_to_chunk_bytes_and_in_pieces_above(size: int) -> None:
    blob = os.urandom(size)
    sha = hashlib.sha256(blob).hexdigest()
    messages = blob_messages(TOPICS, {TOPICS.blob(sha): blob}, PIECE)
    if size <= PIECE:
        assert messages == [(TOPICS.blob(sha), blob)]
        assert clear_topics(TOPICS, TOPICS.blob(sha), size, PIECE) == [TOPICS.blob(sha)]
        return
    assert [t for t, _ in messages] == [TOPICS.blob_chunk(sha, i) for i in range(len(messages))]
    assert [p for _, p in messages] == blob_pieces(blob, PIECE)
    assert max(len(p) for _, p in messages) <= PIECE + 1024
    assert join([decode_blob_chunk(p) for _, p in messages], size) == blob
    assert clear_topics(TOPICS, TOPICS.blob(sha), size, PIECE) == [TOPICS.blob(sha)] + [
        t for t, _ in messages
    ]


def test_a_publication_mixing_blobs_and_documents_chunks_only_the_large_blobs() -> None:
    big, small = os.urandom(3 * PIECE), os.urandom(100)
    big_sha, small_sha, gone_sha = (
        hashlib.sha256(big).hexdigest(),
        hashlib.sha256(small).hexdigest(),
        "cd" * 32,
    )
    document = (TOPICS.aggregator_status, b"x" * (2 * PIECE))  # not a blob: never cut
    items = [
        (TOPICS.blob(big_sha), big),
        (TOPICS.blob(small_sha), small),
        document,
        (TOPICS.blob(gone_sha), b""),
    ]
    out = retained_messages(TOPICS, items, PIECE, 3 * PIECE)
    assert out == [
        *blob_messages(TOPICS, {TOPICS.blob(big_sha): big}, PIECE),
        (TOPICS.blob(small_sha), small),
        document,
        *((t, b"") for t in [TOPICS.blob(gone_sha), *(TOPICS.blob_chunk(gone_sha, i) for i in range(3))]),
    ]
