"""Error feedback for sparse updates (``fedge.agent.error_feedback``, ``DeviceCore`` in a top-k
round): the residual file on real files, and the core against the real, pure round engine.

The promise under test is error feedback's invariant: over any number of sparse rounds, what
the aggregator decoded from the device's sealed updates plus the residual the device still
holds is the sum of the deltas it trained. The updates are opened as the aggregator opens them
(the device's sealed frame, decrypted with the aggregator's key), never read from the core.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.agent.core import (
    DeviceCore,
    DeviceIdentity,
    FetchBlobs,
    Note,
    Persist,
    SaveResidual,
    SecureUpdate,
    Send,
    StatusState,
)
from fedge.agent.device_state import MAX_COUNTER, DeviceState, DeviceStateError
from fedge.agent.error_feedback import (
    MAGIC,
    MAX_HEADER_BYTES,
    RESIDUAL_FILE,
    Residual,
    ResidualError,
    ResidualStore,
    from_bytes,
    to_bytes,
)
from fedge.aggregator.round_engine import Publication, RoundEngine
from fedge.protocol.codec import Codec, topk_counts
from fedge.protocol.messages import decode_update
from fedge.protocol.round_manifest import RoundManifest
from fedge.protocol.sealing import open_sealed, read_header
from fedge.protocol.secagg.announcement import SecureAggregationAnnouncement
from fedge.protocol.signing import DocType, key_id, sign_document
from fedge.shell import files
from support.engine_helpers import (
    AGGREGATOR_KEY,
    DEVICE_IDS,
    DEVICE_KEYS,
    FLEET,
    LAYOUT,
    MODEL_MANIFEST,
    SIGNING_KEY,
    T0,
    TOPICS,
    P,
    delta_for,
    devices,
    make_engine,
    settings,
)

DEVICE = DEVICE_IDS[0]
TRUSTED = {key_id(SIGNING_KEY.verify_key): SIGNING_KEY.verify_key}
SHA = MODEL_MANIFEST.model_sha256
SECURE = SecureAggregationAnnouncement(clip_norm=1.0, bits=32, degree=4, threshold=3)


def residual(values: np.ndarray | None = None, sha: str = SHA, generation: int = 1) -> Residual:
    v = np.random.default_rng(3).normal(0.0, 0.01, P).astype(np.float32) if values is None else values
    return Residual(sha, generation, v)


def same(a: Residual | None, b: Residual | None) -> bool:
    """Equal model, generation and values, bit for bit (``Residual.__eq__`` skips the values)."""
    if a is None or b is None:
        return a is b
    return a == b and a.values.dtype == b.values.dtype and a.values.tobytes() == b.values.tobytes()


# --- the residual file ----------------------------------------------------------------------------


def test_a_saved_residual_loads_back_bit_for_bit_and_the_file_is_private(tmp_path: Path) -> None:
    store = ResidualStore(tmp_path / RESIDUAL_FILE)
    assert store.load() is None  # no file: no residual, and nothing logged as a problem
    saved = residual()
    store.save(saved)
    assert (tmp_path / RESIDUAL_FILE).stat().st_mode & 0o777 == 0o600
    loaded = store.load()
    assert same(loaded, saved)
    assert loaded is not None and loaded.values.dtype == np.float32 and loaded.values.flags.writeable
    # Replaced, not appended: a second save is what loads.
    newer = residual(np.zeros(P, np.float32), generation=2)
    store.save(newer)
    assert same(store.load(), newer)
    assert sorted(p.name for p in tmp_path.iterdir()) == [RESIDUAL_FILE]  # no temp file left over


def test_saving_none_removes_the_file_and_is_idempotent(tmp_path: Path) -> None:
    store = ResidualStore(tmp_path / RESIDUAL_FILE)
    store.save(residual())
    store.save(None)
    assert not (tmp_path / RESIDUAL_FILE).exists()
    store.save(None)  # nothing to remove: fine
    assert store.load() is None


def _prefix(header_len: int, magic: bytes = MAGIC, fmt: int = 1) -> bytes:
    return struct.pack("<8sII", magic, fmt, header_len)


def _file(header: dict[str, Any] | bytes, body: bytes, **prefix: Any) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return _prefix(len(raw), **prefix) + raw + body


GOOD = {"model_sha256": SHA, "generation": 1, "count": 4}
FOUR = np.ones(4, "<f4").tobytes()

MALFORMED: dict[str, Callable[[], bytes]] = {
    "empty": lambda: b"",
    "short prefix": lambda: to_bytes(residual())[:10],
    "bad magic": lambda: _file(GOOD, FOUR, magic=b"NOTFEDGE"),
    "other format": lambda: _file(GOOD, FOUR, fmt=2),
    "header not JSON": lambda: _file(b"{not json", FOUR),
    "header not UTF-8": lambda: _file(b'{"a": "\xff"}', FOUR),
    "header a list": lambda: _file(b"[1, 2, 3]", FOUR),
    "header with an extra key": lambda: _file({**GOOD, "extra": 1}, FOUR),
    "header without count": lambda: _file({"model_sha256": SHA, "generation": 1}, FOUR),
    "sha not 64 digits": lambda: _file({**GOOD, "model_sha256": "ab"}, FOUR),
    "generation 0": lambda: _file({**GOOD, "generation": 0}, FOUR),
    "generation true": lambda: _file({**GOOD, "generation": True}, FOUR),
    "count a float": lambda: _file({**GOOD, "count": 4.0}, FOUR),
    "count 0": lambda: _file({**GOOD, "count": 0}, b""),
    "count above the limit": lambda: _file({**GOOD, "count": 16 * 1024 * 1024 + 1}, FOUR),
    "fewer values than count": lambda: _file(GOOD, FOUR[:-4]),
    "more values than count": lambda: _file(GOOD, FOUR + FOUR[:4]),
    "a byte too many": lambda: _file(GOOD, FOUR + b"\x00"),
    "truncated file": lambda: to_bytes(residual())[:-1],
    "NaN value": lambda: _file(GOOD, np.array([1, np.nan, 0, 0], "<f4").tobytes()),
    "infinite value": lambda: _file(GOOD, np.array([1, 0, -np.inf, 0], "<f4").tobytes()),
    "header too long": lambda: _file(
        json.dumps(GOOD).encode() + b" " * (MAX_HEADER_BYTES + 1 - len(json.dumps(GOOD))), FOUR
    ),
    "header length past the end": lambda: _prefix(200) + json.dumps(GOOD).encode(),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_residual_file_is_ignored_with_a_warning_naming_it(
    name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / RESIDUAL_FILE
    path.write_bytes(MALFORMED[name]())
    with pytest.raises(ResidualError):
        from_bytes(path.read_bytes())
    caplog.set_level(logging.WARNING, logger="fedge.agent")
    assert ResidualStore(path).load() is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "fedge.agent"]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert str(path) in warnings[0].getMessage()
    assert "starting from zero" in warnings[0].getMessage()
    assert path.exists()  # left for an operator to look at; the next save replaces it


def test_the_largest_header_allowed_is_read(tmp_path: Path) -> None:
    text = json.dumps(GOOD).encode()
    raw = _file(text + b" " * (MAX_HEADER_BYTES - len(text)), FOUR)
    got = from_bytes(raw)
    assert (got.model_sha256, got.generation, got.values.tolist()) == (SHA, 1, [1.0] * 4)


def test_a_residual_path_that_cannot_be_read_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / RESIDUAL_FILE
    path.mkdir()  # a directory where the file should be
    caplog.set_level(logging.WARNING, logger="fedge.agent")
    assert ResidualStore(path).load() is None
    assert any(str(path) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


@pytest.mark.parametrize("where", ["a file as the directory", "a missing directory", "a read-only directory"])
def test_a_residual_that_cannot_be_written_raises_naming_the_path(tmp_path: Path, where: str) -> None:
    if where == "a file as the directory":
        (tmp_path / "state").write_text("not a directory")
        path = tmp_path / "state" / RESIDUAL_FILE
    elif where == "a missing directory":
        path = tmp_path / "missing" / RESIDUAL_FILE
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o500)
        if os.access(tmp_path / "ro", os.W_OK):
            pytest.skip("running as root: a read-only directory is still writable")
        path = tmp_path / "ro" / RESIDUAL_FILE
    with pytest.raises(ResidualError) as caught:
        ResidualStore(path).save(residual())
    assert str(caught.value).startswith(f"cannot write error-feedback residual {path}: ")
    assert not path.exists()


def test_a_failed_write_removes_the_older_residual_so_a_restart_does_not_send_it_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / RESIDUAL_FILE
    store = ResidualStore(path)
    store.save(residual())  # the previous round's: this round's update already carried part of it

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files, "atomic_write", disk_full)  # what replace_or_remove writes with
    with pytest.raises(ResidualError, match="No space left on device"):
        store.save(residual(generation=2))
    assert not path.exists()
    assert store.load() is None  # a restart starts from zero instead


def test_removing_a_residual_that_cannot_be_removed_raises_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / RESIDUAL_FILE
    path.mkdir()  # unlink() of a directory fails whoever runs it
    with pytest.raises(ResidualError, match=f"^cannot write error-feedback residual {path}: "):
        ResidualStore(path).save(None)


def test_residual_fits_only_its_model_generation_and_size() -> None:
    r = residual()
    assert r.fits(SHA, 1, P)
    assert not r.fits("0" * 64, 1, P)
    assert not r.fits(SHA, 2, P)
    assert not r.fits(SHA, 1, P + 1)


# --- the core in sparse rounds, through the real engine ------------------------------------------


def core(state: DeviceState | None = None) -> DeviceCore:
    identity = DeviceIdentity(FLEET, DEVICE, DEVICE_KEYS[DEVICE], AGGREGATOR_KEY.public_key)
    return DeviceCore(identity, state or DeviceState())


def sparse_engine(codec: Codec = Codec.TOPK_INT8, **changes: Any) -> RoundEngine:
    return make_engine(settings(codec=codec, rounds=20, **changes))


def fetch_and_load(c: DeviceCore, pub: Publication, now: float) -> None:
    actions = c.manifest_arrived(pub.manifest_frame, TRUSTED, now)
    fetch = actions[-1]
    assert isinstance(fetch, FetchBlobs)
    c.blobs_arrived({sha: pub.blobs[TOPICS.blob(sha)] for sha in fetch.wanted}, now)
    c.model_loaded(pub.manifest.model_sha256)  # as the shell reports once it loaded the model


def opened(send: Send, manifest: RoundManifest) -> np.ndarray:
    """The delta the aggregator decodes from the device's sealed frame."""
    header, ciphertext = read_header(send.frame)
    payload_header, body = open_sealed(
        header, ciphertext, AGGREGATOR_KEY, DEVICE_KEYS[DEVICE].public_key, 1 << 20
    )
    update = decode_update(payload_header, body, LAYOUT, manifest.codec, manifest.topk_fraction)
    return update.delta


def only(actions: list[Any], kind: type) -> Any:
    (found,) = [a for a in actions if isinstance(a, kind)]
    return found


@pytest.mark.parametrize("codec", [Codec.TOPK_INT8, Codec.TOPK_FP16])
def test_over_many_rounds_what_was_sent_plus_the_residual_is_the_sum_of_the_deltas(codec: Codec) -> None:
    engine = sparse_engine(codec)
    helpers = devices()
    c = core()
    sent_sum = np.zeros(P, np.float64)
    delta_sum = np.zeros(P, np.float64)
    now = T0
    for round_number in range(1, 7):
        pub = engine.open_round(now)
        m = pub.manifest
        assert m.codec is codec and m.topk_fraction == 0.1
        fetch_and_load(c, pub, now + 1)
        delta = delta_for(DEVICE, round_number, scale=0.02)
        actions = c.trained(delta, 50, 0.4, None, now + 2)
        send = only(actions, Send)
        assert engine.handle(send.topic, send.frame, now + 2).accepted
        other = helpers[DEVICE_IDS[1]]
        assert engine.handle(other.topic, other.update(m), now + 2).accepted
        engine.close_round()

        decoded = opened(send, m)
        # Sparse: only the round's k per tensor carried (at most: a kept value may quantise to 0).
        assert np.count_nonzero(decoded) <= sum(topk_counts(LAYOUT, 0.1))
        sent_sum += decoded
        delta_sum += delta
        saved = only(actions, SaveResidual).residual
        assert saved is c.residual and saved is not None
        assert (saved.model_sha256, saved.generation, saved.values.dtype.name) == (
            SHA,
            m.generation,
            "float32",
        )
        np.testing.assert_allclose(sent_sum + saved.values, delta_sum, rtol=0, atol=2e-6)
        now += 100
    # The residual is real work: without it the device would have lost most of its deltas.
    assert float(np.abs(c.residual.values).max()) > 0.01  # type: ignore[union-attr]
    assert float(np.abs(sent_sum - delta_sum).max()) > 0.01


def test_residual_is_saved_after_the_counter_and_before_the_send() -> None:
    engine = sparse_engine()
    pub = engine.open_round(T0)
    c = core()
    fetch_and_load(c, pub, T0 + 1)
    actions = c.trained(delta_for(DEVICE), 50, 0.4, None, T0 + 2)
    assert [type(a) for a in actions] == [Persist, SaveResidual, Send, Persist, StatusState]
    # The counter is reserved first, the residual saved before the frame can leave.
    assert actions.index(only(actions, SaveResidual)) < actions.index(only(actions, Send))


@pytest.mark.parametrize("stale", ["other model", "other generation", "other size"])
def test_a_residual_for_another_model_is_dropped_with_a_note_not_added(stale: str) -> None:
    engine = sparse_engine()
    pub = engine.open_round(T0)
    m = pub.manifest
    big = np.full(P, 5.0, np.float32)  # added, it would dominate every tensor's top k
    c = core()
    c.residual = {
        "other model": Residual("0" * 64, m.generation, big),
        "other generation": Residual(SHA, m.generation + 1, big),
        "other size": Residual(SHA, m.generation, np.full(P + 1, 5.0, np.float32)),
    }[stale]
    fetch_and_load(c, pub, T0 + 1)
    delta = delta_for(DEVICE, scale=0.02)
    actions = c.trained(delta, 50, 0.4, None, T0 + 2)
    assert [type(a) for a in actions] == [Persist, Note, SaveResidual, Send, Persist, StatusState]
    note = only(actions, Note)
    assert "residual reset" in note.text and not note.problem
    # Started from zero: sent + new residual is this round's delta alone.
    decoded = opened(only(actions, Send), m)
    assert float(np.abs(decoded).max()) < 1.0
    new = only(actions, SaveResidual).residual
    assert new.fits(SHA, m.generation, P)
    np.testing.assert_allclose(decoded + new.values, delta, rtol=0, atol=1e-6)


def test_a_dense_round_after_a_sparse_one_drops_the_residual() -> None:
    # A sparse round leaves a residual behind ...
    sparse = sparse_engine()
    pub = sparse.open_round(T0)
    c = core()
    fetch_and_load(c, pub, T0 + 1)
    c.trained(delta_for(DEVICE), 50, 0.4, None, T0 + 2)
    left = c.residual
    assert left is not None and np.any(left.values)
    # ... which a device carries (its residual.bin) into a fleet that went back to a dense codec.
    dense = make_engine(settings(codec=Codec.INT8))
    pub = dense.open_round(T0 + 100)
    assert pub.manifest.topk_fraction is None
    d = core()
    d.residual = left
    fetch_and_load(d, pub, T0 + 101)
    actions = d.trained(delta_for(DEVICE, 2), 50, 0.4, None, T0 + 102)
    assert [type(a) for a in actions] == [Persist, SaveResidual, Note, Send, Persist, StatusState]
    assert only(actions, SaveResidual) == SaveResidual(None)
    assert d.residual is None
    assert dense.handle(only(actions, Send).topic, only(actions, Send).frame, T0 + 102).accepted
    # A device without a residual has nothing to drop.
    fresh = core()
    fetch_and_load(fresh, pub, T0 + 101)
    plain = fresh.trained(delta_for(DEVICE, 2), 50, 0.4, None, T0 + 102)
    assert [type(a) for a in plain] == [Persist, Send, Persist, StatusState]


def test_a_secure_round_drops_the_residual_too() -> None:
    # Secure rounds are dense (a sparse codec is refused with them): the residual would be stale
    # by the time a sparse round came back, as after a plain dense round.
    pub = make_engine().open_round(T0)
    manifest = replace(pub.manifest, secure_aggregation=SECURE)
    frame = sign_document(DocType.ROUND_MANIFEST, manifest.to_dict(), SIGNING_KEY)
    secure_pub = replace(pub, manifest=manifest, manifest_frame=frame)
    identity = DeviceIdentity(FLEET, DEVICE, DEVICE_KEYS[DEVICE], AGGREGATOR_KEY.public_key)
    c = DeviceCore(identity, DeviceState(), secure_aggregation=True)
    c.residual = residual()
    fetch_and_load(c, secure_pub, T0 + 1)
    actions = c.trained(delta_for(DEVICE), 50, 0.4, None, T0 + 2)
    assert [type(a) for a in actions] == [Persist, SaveResidual, Note, SecureUpdate]
    assert only(actions, SaveResidual) == SaveResidual(None) and c.residual is None


def test_an_exhausted_counter_leaves_the_residual_as_it_was() -> None:
    pub = sparse_engine().open_round(T0)
    c = core(DeviceState(update_counter=MAX_COUNTER))
    before = residual()
    c.residual = before
    fetch_and_load(c, pub, T0 + 1)
    with pytest.raises(DeviceStateError, match="exhausted"):
        c.trained(delta_for(DEVICE), 50, 0.4, None, T0 + 2)
    assert c.residual is before  # nothing was sent, so nothing moved out of the residual
