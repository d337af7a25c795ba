"""The device's trust store: a new signing key only when a trusted key vouches for it.

Real keys and real files. The vouching key is retired at once; replays and older rotations are
refused; everything survives a reopen; a corrupt file stops the device instead of resetting it.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from fedge.agent.trust import TRUST_FILE_MODE, TrustError, TrustStore
from fedge.protocol.key_rotation import RotationError, sign_rotation
from fedge.protocol.signing import DocType, SignatureError, key_id, sign_document, verify_document

K0, K1, K2, BACKUP, STRANGER = (SigningKey.generate() for _ in range(5))
NOW = 1_750_000_000.0


def kid(key: SigningKey) -> str:
    return key_id(key.verify_key)


def rotation(old: SigningKey, new: SigningKey, sequence: int, fleet: str = "demo") -> bytes:
    return sign_rotation(old, new.verify_key, fleet, sequence, NOW - 60)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "trust.json"


@pytest.fixture
def store(path: Path) -> TrustStore:
    return TrustStore.create(path, "demo", [K0.verify_key])


def refused(store: TrustStore, frame: bytes) -> str:
    """Asserts a refusal that changes nothing, on disk or in memory; returns the reason."""
    before_file = store.path.read_bytes()
    before_keys = store.trusted_keys()
    with pytest.raises(SignatureError) as exc:
        store.accept_rotation(frame, NOW)
    assert store.path.read_bytes() == before_file
    assert store.trusted_keys() == before_keys
    return exc.value.reason


def test_create_pins_the_provisioned_keys_mode_0600(store: TrustStore, path: Path) -> None:
    assert stat.S_IMODE(os.stat(path).st_mode) == TRUST_FILE_MODE == 0o600
    assert store.trusted_keys() == {kid(K0): K0.verify_key}
    assert store.rotation_sequence == 0
    assert store.retired_keys() == {}
    assert store.fleet == "demo"
    with pytest.raises(TrustError, match="already exists"):
        TrustStore.create(path, "demo", [K1.verify_key])
    assert TrustStore.open(path).trusted_keys() == {kid(K0): K0.verify_key}


def test_a_vouched_rotation_is_accepted_and_the_vouching_key_retired(store: TrustStore, path: Path) -> None:
    assert store.accept_rotation(rotation(K0, K1, 1), NOW) is True
    assert store.trusted_keys() == {kid(K1): K1.verify_key}
    assert store.rotation_sequence == 1
    retired = store.retired_keys()[kid(K0)]
    assert (bytes(retired.key), retired.retired_at, retired.sequence) == (bytes(K0.verify_key), NOW, 1)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    # Manifests: the new key verifies, the retired one no longer does.
    manifest = {"fleet": "demo", "version": 7}
    assert verify_document(
        sign_document(DocType.ROUND_MANIFEST, manifest, K1), DocType.ROUND_MANIFEST, store.trusted_keys()
    ) == (manifest, kid(K1))
    with pytest.raises(SignatureError) as exc:
        verify_document(
            sign_document(DocType.ROUND_MANIFEST, manifest, K0), DocType.ROUND_MANIFEST, store.trusted_keys()
        )
    assert exc.value.reason == "unknown_key"


def test_state_persists_across_reopen(store: TrustStore, path: Path) -> None:
    store.accept_rotation(rotation(K0, K1, 1), NOW)
    reopened = TrustStore.open(path)
    assert reopened.trusted_keys() == {kid(K1): K1.verify_key}
    assert reopened.rotation_sequence == 1
    assert set(reopened.retired_keys()) == {kid(K0)}
    # The reopened store continues the chain.
    assert reopened.accept_rotation(rotation(K1, K2, 2), NOW + 1) is True
    assert TrustStore.open(path).trusted_keys() == {kid(K2): K2.verify_key}
    assert set(TrustStore.open(path).retired_keys()) == {kid(K0), kid(K1)}


def test_signed_by_an_unknown_key_is_refused(store: TrustStore) -> None:
    assert refused(store, rotation(STRANGER, K1, 1)) == "unknown_key"
    # Signed by the trusted key, altered in transit (a byte of the document).
    frame = bytearray(rotation(K0, K1, 1))
    frame[-100] ^= 0x01
    assert refused(store, bytes(frame)) == "bad_signature"


def test_signed_by_a_retired_key_is_refused(store: TrustStore) -> None:
    store.accept_rotation(rotation(K0, K1, 1), NOW)
    # A thief with the old key K0 tries to move the device to a key of their own.
    assert refused(store, rotation(K0, STRANGER, 2)) == "retired_key"
    with pytest.raises(RotationError, match="retired by rotation 1"):
        store.accept_rotation(rotation(K0, STRANGER, 2), NOW)


def test_a_retired_key_is_never_trusted_again(store: TrustStore) -> None:
    store.accept_rotation(rotation(K0, K1, 1), NOW)
    assert refused(store, rotation(K1, K0, 2)) == "retired_key"


def test_replays_and_older_rotations_are_refused(store: TrustStore, path: Path) -> None:
    first = rotation(K0, K1, 1)
    assert store.accept_rotation(first, NOW) is True
    before = path.read_bytes()
    # The same rotation again (a retained message after a reconnect): nothing happens.
    assert store.accept_rotation(first, NOW + 5) is False
    assert path.read_bytes() == before
    assert TrustStore.open(path).accept_rotation(first, NOW + 5) is False
    # An older or equal sequence, even correctly signed by the trusted key, is stale.
    assert refused(store, rotation(K1, K2, 1)) == "stale_sequence"
    assert store.accept_rotation(rotation(K1, K2, 5), NOW) is True
    assert refused(store, rotation(K2, K1, 4)) == "stale_sequence"  # checked before the new key
    assert refused(store, rotation(K2, BACKUP, 3)) == "stale_sequence"
    assert refused(store, rotation(K2, BACKUP, 5)) == "stale_sequence"


def test_wrong_fleet_is_refused(store: TrustStore) -> None:
    assert refused(store, rotation(K0, K1, 1, fleet="other")) == "wrong_fleet"


def test_a_lagging_device_catches_up_in_order(store: TrustStore) -> None:
    first, second = rotation(K0, K1, 1), rotation(K1, K2, 2)
    assert refused(store, second) == "unknown_key"  # K1 is not trusted yet
    assert store.accept_rotation(first, NOW) and store.accept_rotation(second, NOW)
    assert store.trusted_keys() == {kid(K2): K2.verify_key}


def test_only_the_vouching_key_is_retired(path: Path) -> None:
    store = TrustStore.create(path, "demo", [K0.verify_key, BACKUP.verify_key])
    store.accept_rotation(rotation(K0, K1, 1), NOW)
    assert store.trusted_keys() == {kid(K1): K1.verify_key, kid(BACKUP): BACKUP.verify_key}


def test_a_second_store_object_sees_the_file_not_its_memory(store: TrustStore, path: Path) -> None:
    stale = TrustStore.open(path)
    store.accept_rotation(rotation(K0, K1, 1), NOW)
    # `stale` still remembers K0 in memory; a rotation signed by K0 must not pass through it.
    with pytest.raises(RotationError) as exc:
        stale.accept_rotation(rotation(K0, K2, 2), NOW)
    assert exc.value.reason == "retired_key"
    assert TrustStore.open(path).trusted_keys() == {kid(K1): K1.verify_key}


def test_open_or_create(path: Path) -> None:
    store = TrustStore.open_or_create(path, "demo", [K0.verify_key])
    store.accept_rotation(rotation(K0, K1, 1), NOW)
    # The config still pins K0 after the rotation: the file wins, K0 stays retired.
    again = TrustStore.open_or_create(path, "demo", [K0.verify_key])
    assert again.trusted_keys() == {kid(K1): K1.verify_key}
    with pytest.raises(TrustError, match="for fleet 'demo', the config says 'other'"):
        TrustStore.open_or_create(path, "demo".replace("demo", "other"), [K0.verify_key])
    with pytest.raises(TrustError, match="re-provisioned, remove the trust store"):
        TrustStore.open_or_create(path, "demo", [STRANGER.verify_key])


def test_create_validates_its_input(tmp_path: Path) -> None:
    with pytest.raises(TrustError, match="at least one pinned verify key"):
        TrustStore.create(tmp_path / "a.json", "demo", [])
    with pytest.raises(TrustError, match="invalid fleet id"):
        TrustStore.create(tmp_path / "b.json", "de/mo", [K0.verify_key])
    with pytest.raises(TrustError, match="does not exist"):
        TrustStore.open(tmp_path / "missing.json")
    with pytest.raises(TrustError, match="now must be finite"):
        TrustStore.create(tmp_path / "c.json", "demo", [K0.verify_key]).accept_rotation(
            rotation(K0, K1, 1), float("nan")
        )


def _rewrite(path: Path, change: dict[str, object]) -> None:
    data = json.loads(path.read_text())
    data.update(change)
    path.write_text(json.dumps(data))


def _retrust_retired(path: Path, forget_retired: bool) -> None:
    """Puts the retired key back among the trusted ones (optionally forgetting it was retired)."""
    data = json.loads(path.read_text())
    retired = {kid: entry["key"] for kid, entry in data["retired"].items()}
    _rewrite(path, {"trusted": {**data["trusted"], **retired}, **({"retired": {}} if forget_retired else {})})


def _mislabel(path: Path) -> None:
    data = json.loads(path.read_text())
    _rewrite(path, {"trusted": {"0123456789abcdef": next(iter(data["trusted"].values()))}})


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:-20]),
    "binary": lambda p: p.write_bytes(b"\xff\xfe garbage"),
    "array": lambda p: p.write_text("[]"),
    "format": lambda p: _rewrite(p, {"format": 2}),
    "no-trusted": lambda p: _rewrite(p, {"trusted": {}}),
    "bad-key": lambda p: _rewrite(p, {"trusted": {"0000000000000000": "AAAA"}}),
    "wrong-key-id": _mislabel,
    "negative-sequence": lambda p: _rewrite(p, {"rotation_sequence": -1}),
    "sequence-reset": lambda p: _rewrite(p, {"rotation_sequence": 0}),
    "no-last-hash": lambda p: _rewrite(p, {"last_rotation_sha256": None}),
    "retired-forgotten": lambda p: _retrust_retired(p, forget_retired=True),
    "retired-and-trusted": lambda p: _retrust_retired(p, forget_retired=False),
    "duplicate-key": lambda p: p.write_text(p.read_text().replace('"fleet"', '"fleet": "x", "fleet"', 1)),
    "nan": lambda p: p.write_text(p.read_text().replace('"retired_at": 1750000000.0', '"retired_at": NaN')),
    "unknown-field": lambda p: _rewrite(p, {"surprise": 1}),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupt_file_is_an_error_never_a_reset(store: TrustStore, path: Path, corruption: str) -> None:
    store.accept_rotation(rotation(K0, K1, 1), NOW)
    CORRUPTIONS[corruption](path)
    damaged = path.read_bytes()
    for attempt in (
        lambda: TrustStore.open(path),
        lambda: TrustStore.open_or_create(path, "demo", [K0.verify_key]),
        lambda: store.accept_rotation(rotation(K1, K2, 2), NOW),
    ):
        with pytest.raises(TrustError) as exc:
            attempt()
        assert f"trust store {path} is corrupt" in str(exc.value)
        assert "refusing to start" in str(exc.value)
        assert path.read_bytes() == damaged  # never rewritten, never reset
