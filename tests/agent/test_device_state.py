"""Device state: atomic, private, and the counter and the manifest version never go backwards."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fedge.agent.device_state import (
    DeviceState,
    DeviceStateError,
    DeviceStateStore,
    ManifestChainError,
    ManifestRollbackError,
)

REPO = Path(__file__).resolve().parents[2]
SHA_A = "a" * 64
SHA_B = "b" * 64
SHA_C = "c" * 64


def valid_dict(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "format": 1,
        "manifest_version": 3,
        "manifest_sha256": SHA_A,
        "update_counter": 7,
        "last_round_id": "round-3",
        "extra": {"site": "b1"},
    }
    data.update(changes)
    return data


def test_missing_file_loads_defaults_without_creating_it(tmp_path: Path) -> None:
    store = DeviceStateStore(tmp_path / "state.json")
    assert store.load() == DeviceState(None, None, 0, None, {})
    assert not store.path.exists()


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    store = DeviceStateStore(tmp_path / "state.json")
    state = DeviceState(4, SHA_A, 9, "round-4", {"note": ["x", 1, None], "nested": {"k": 1.5}})
    store.save(state)
    assert store.load() == state
    assert DeviceStateStore(store.path).load() == state
    assert json.loads(store.path.read_text()) == valid_dict(
        manifest_version=4, update_counter=9, last_round_id="round-4", extra=state.extra
    )


def test_file_is_private_whatever_the_umask_and_the_old_mode(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps(valid_dict()))
    path.chmod(0o644)
    old_umask = os.umask(0)
    try:
        DeviceStateStore(path).next_counter()
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert DeviceStateStore(path).load().update_counter == 8


def test_stray_temp_file_from_a_crash_leaves_the_old_state_valid(tmp_path: Path) -> None:
    store = DeviceStateStore(tmp_path / "state.json")
    store.save(DeviceState(update_counter=5))
    # What a crash after writing (part of) the temp file and before the rename leaves behind.
    stray = tmp_path / ".state.json.k3j2h1.tmp"
    stray.write_text('{"format": 1, "update_co')
    assert store.load() == DeviceState(update_counter=5)
    assert store.next_counter() == 6
    assert DeviceStateStore(store.path).load() == DeviceState(update_counter=6)
    assert stray.read_text() == '{"format": 1, "update_co'  # someone else's file: left alone


_KILLED_BEFORE_RENAME = """
import os, signal, sys
from pathlib import Path
from fedge.agent.device_state import DeviceStateStore

store = DeviceStateStore(Path(sys.argv[1]))
print(store.next_counter(), flush=True)
# Crash injection: die at the exact point between the fsynced temp file and the rename.
os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)
store.next_counter()
print("not reached", flush=True)
"""


def test_sigkill_between_temp_write_and_rename_keeps_the_old_state(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_BEFORE_RENAME, str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.split() == ["1"]
    [tmp] = [p for p in tmp_path.iterdir() if p != path]
    assert re.fullmatch(r"\.state\.json\..+\.tmp", tmp.name)
    assert json.loads(tmp.read_text())["update_counter"] == 2  # the new state was written...
    store = DeviceStateStore(path)
    assert store.load().update_counter == 1  # ...but never replaced the old one
    # Counter 2 was never handed out (next_counter did not return), so it is the next one.
    assert store.next_counter() == 2


def test_counter_is_monotonic_and_persisted_before_it_is_returned(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = DeviceStateStore(path)
    for expected in (1, 2, 3):
        assert store.next_counter() == expected
        assert DeviceStateStore(path).load().update_counter == expected
    assert DeviceStateStore(path).next_counter() == 4
    assert store.next_counter() == 5


def test_counter_from_two_threads_is_never_handed_out_twice(tmp_path: Path) -> None:
    store = DeviceStateStore(tmp_path / "state.json")
    got: list[int] = []

    def work() -> None:
        got.extend(store.next_counter() for _ in range(50))

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(got) == list(range(1, 101))
    assert store.load().update_counter == 100


def test_saving_a_stale_snapshot_cannot_reuse_a_counter(tmp_path: Path) -> None:
    store = DeviceStateStore(tmp_path / "state.json")
    stale = store.load()
    store.next_counter()
    store.next_counter()
    with pytest.raises(DeviceStateError, match=r"update counter would go back from 2 to 0"):
        store.save(replace(stale, last_round_id="round-9"))
    assert store.load() == DeviceState(update_counter=2)


def test_accept_manifest_moves_only_forward(tmp_path: Path) -> None:
    store = DeviceStateStore(tmp_path / "state.json")
    assert store.accept_manifest(3, SHA_A, parent_sha256=SHA_C) is True
    assert store.accept_manifest(3, SHA_A, parent_sha256=SHA_C) is False  # the same again: a no-op
    assert store.accept_manifest(5, SHA_B, parent_sha256=SHA_C) is True
    with pytest.raises(
        ManifestRollbackError, match=r"refusing global manifest version 4: version 5 is already accepted"
    ) as exc:
        store.accept_manifest(4, SHA_A, parent_sha256=SHA_B)
    assert (exc.value.stored_version, exc.value.offered_version) == (5, 4)
    assert DeviceStateStore(store.path).load() == DeviceState(5, SHA_B, 0, None, {})


def test_same_version_with_another_hash_is_refused(tmp_path: Path) -> None:
    store = DeviceStateStore(tmp_path / "state.json")
    store.accept_manifest(5, SHA_A, parent_sha256="")
    with pytest.raises(
        ManifestRollbackError,
        match=rf"refusing global manifest version 5 with SHA-256 {SHA_B}: that version was accepted "
        rf"with SHA-256 {SHA_A}",
    ):
        store.accept_manifest(5, SHA_B, parent_sha256="")
    assert store.load() == DeviceState(5, SHA_A)


def test_the_next_version_must_name_the_accepted_manifest_as_its_parent(tmp_path: Path) -> None:
    store = DeviceStateStore(tmp_path / "state.json")
    assert store.accept_manifest(1, SHA_A, parent_sha256="") is True  # the first: no history
    with pytest.raises(
        ManifestChainError,
        match=rf"refusing global manifest version 2: its parent is {SHA_C}, not version 1 \({SHA_A}\), "
        r"which this device accepted",
    ) as exc:
        store.accept_manifest(2, SHA_B, parent_sha256=SHA_C)
    assert (exc.value.stored_version, exc.value.offered_version) == (1, 2)
    with pytest.raises(ManifestChainError, match=r"its parent is none, not version 1"):
        store.accept_manifest(2, SHA_B, parent_sha256="")
    assert store.load() == DeviceState(1, SHA_A)  # nothing recorded: the device keeps its model
    assert store.accept_manifest(2, SHA_B, parent_sha256=SHA_A) is True  # the true successor
    assert store.load() == DeviceState(2, SHA_B)


def test_a_device_that_missed_versions_accepts_without_a_chain_check(tmp_path: Path) -> None:
    store = DeviceStateStore(tmp_path / "state.json")
    store.accept_manifest(1, SHA_A, parent_sha256="")
    # Offline while versions 2..4 were published: it never saw the parent of version 5.
    assert store.accept_manifest(5, SHA_B, parent_sha256=SHA_C) is True
    assert store.load() == DeviceState(5, SHA_B)
    # A rollback is still a rollback, whatever parent it names.
    with pytest.raises(ManifestRollbackError):
        store.accept_manifest(5, SHA_C, parent_sha256=SHA_A)


def test_save_cannot_roll_back_or_forget_the_manifest(tmp_path: Path) -> None:
    store = DeviceStateStore(tmp_path / "state.json")
    store.accept_manifest(5, SHA_A, parent_sha256="")
    with pytest.raises(ManifestRollbackError, match=r"refusing global manifest version 4"):
        store.save(DeviceState(4, SHA_A))
    with pytest.raises(DeviceStateError, match=r"cannot forget accepted manifest version 5"):
        store.save(DeviceState())
    assert store.load() == DeviceState(5, SHA_A)


@pytest.mark.parametrize(
    ("version", "sha", "parent", "error"),
    [
        (-1, SHA_A, "", r"manifest version must be an integer >= 0, got -1"),
        (True, SHA_A, "", r"manifest version must be an integer >= 0, got True"),
        ("3", SHA_A, "", r"manifest version must be an integer >= 0, got '3'"),
        (3, SHA_A.upper(), "", r"manifest sha256 must be 64 lowercase hex digits, got 'AAAA"),
        (3, "ab", "", r"manifest sha256 must be 64 lowercase hex digits, got 'ab'"),
        (3, SHA_A, "ab", r"manifest parent_sha256 must be empty or 64 lowercase hex digits, got 'ab'"),
        (3, SHA_A, None, r"manifest parent_sha256 must be empty or 64 lowercase hex digits, got None"),
    ],
)
def test_accept_manifest_validates_its_arguments(
    tmp_path: Path, version: Any, sha: Any, parent: Any, error: str
) -> None:
    store = DeviceStateStore(tmp_path / "state.json")
    with pytest.raises(DeviceStateError, match=error):
        store.accept_manifest(version, sha, parent_sha256=parent)
    assert not store.path.exists()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        '{"format": 1,',
        "\x00\x01garbage",
        '{"a": 1, "a": 2}',
        '{"extra": NaN}',
        "\xff\xfe{}",
        "[" * 100_000,  # a RecursionError inside json.loads: still "not valid JSON"
    ],
)
def test_corrupt_json_is_an_error_not_a_reset(tmp_path: Path, text: str) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(text.encode("latin-1"))
    store = DeviceStateStore(path)
    expected = rf"device state {re.escape(str(path))} is not valid JSON"
    with pytest.raises(DeviceStateError, match=expected):
        store.load()
    # Every operation refuses; none silently starts over (that would allow a rollback).
    with pytest.raises(DeviceStateError, match=expected):
        store.next_counter()
    with pytest.raises(DeviceStateError, match=expected):
        store.accept_manifest(1, SHA_A, parent_sha256="")
    with pytest.raises(DeviceStateError, match=expected):
        store.save(DeviceState())
    assert path.read_bytes() == text.encode("latin-1")


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ([1, 2], r"expected a JSON object, got list"),
        (valid_dict(update_counter="7"), r"update_counter must be an integer in 0\.\.\d+, got '7'"),
        (valid_dict(update_counter=True), r"update_counter must be an integer in 0\.\.\d+, got True"),
        (valid_dict(update_counter=7.0), r"update_counter must be an integer in 0\.\.\d+, got 7\.0"),
        (valid_dict(update_counter=-1), r"update_counter must be an integer in 0\.\.\d+, got -1"),
        (valid_dict(update_counter=2**63), rf"update_counter must be an integer in 0\.\.\d+, got {2**63}"),
        (valid_dict(manifest_version=1.5), r"manifest_version must be an integer >= 0 or null, got 1\.5"),
        (valid_dict(manifest_sha256="xyz"), r"manifest_sha256 must be 64 lowercase hex digits, got 'xyz'"),
        (valid_dict(manifest_sha256=None), r"manifest_version and manifest_sha256 must be set together"),
        (valid_dict(last_round_id=3), r"last_round_id must be a string or null, got 3"),
        (valid_dict(extra=[]), r"extra must be a JSON object with string keys"),
        (valid_dict(format=2), r"format 2 is not 1"),
        (valid_dict(format=1.0), r"format 1\.0 is not 1"),
        ({"format": 1}, r"missing keys \['extra', 'last_round_id', 'manifest_sha256', 'manifest_version', "),
        (valid_dict(counter=1), r"missing keys \[\], unknown keys \['counter'\]"),
    ],
)
def test_wrong_types_are_an_error(tmp_path: Path, data: Any, error: str) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DeviceStateError, match=rf"device state {re.escape(str(path))}: {error}"):
        DeviceStateStore(path).load()


def test_unserialisable_extra_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    store = DeviceStateStore(tmp_path / "state.json")
    store.save(DeviceState(update_counter=1))
    before = store.path.read_bytes()
    with pytest.raises(DeviceStateError, match=r"extra is not plain JSON: Object of type bytes"):
        store.save(DeviceState(update_counter=2, extra={"blob": b"x"}))
    with pytest.raises(DeviceStateError, match=r"extra is not plain JSON: Out of range float values"):
        store.save(DeviceState(update_counter=2, extra={"x": float("nan")}))
    assert store.path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temp file left


def test_unwritable_directory_is_a_clear_error(tmp_path: Path) -> None:
    store = DeviceStateStore(tmp_path / "missing" / "state.json")
    with pytest.raises(DeviceStateError, match=r"cannot write device state .*/missing/state.json: No such"):
        store.next_counter()
