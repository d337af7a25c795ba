"""``fedge keys``: key files 0600, only public keys printed, careful reading, signing-key rotation.

The commands run through :func:`fedge.tools.keys.main` (``fedge``'s error handling, in process) so
stdout and stderr can be searched for private key material.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from fedge.agent.trust import TrustStore
from fedge.protocol.key_rotation import verify_rotation
from fedge.protocol.sealing import key_to_text
from fedge.protocol.signing import DocType, key_id, sign_document, signing_key_to_text, verify_document
from fedge.tools.keys import (
    KeyFileError,
    add_keys_parser,
    parse_enrollment_record,
    read_private_key_file,
    rotation_files,
    write_private_key_file,
)
from fedge.tools.keys import main as keys_main

REPO = Path(__file__).resolve().parents[2]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = keys_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def private_text(path: Path) -> str:
    return path.read_text().strip()


def assert_secret_absent(secret: str, *outputs: str) -> None:
    """Neither the base64 nor the hex of a private key appears anywhere in the outputs."""
    raw = base64.b64decode(secret)
    for text in outputs:
        assert secret not in text
        assert raw.hex() not in text
        assert secret[:16] not in text  # not even a prefix


# --- fedge keys aggregator / device --------------------------------------------------------------


def test_aggregator_keys(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_dir = tmp_path / "keys"
    code, out, err = run(capsys, "keys", "aggregator", "--out", str(out_dir))
    assert code == 0, err
    box_file, sign_file = out_dir / "aggregator.box", out_dir / "aggregator.sign"
    assert mode(box_file) == mode(sign_file) == 0o600
    assert mode(out_dir) == 0o700
    box = read_private_key_file(box_file, "box")
    signing = read_private_key_file(sign_file, "signing")
    # Only public keys and ids are printed, in the form an agent config takes.
    assert f'aggregator_public_key = "{key_to_text(box.public_key)}"' in out
    assert f'aggregator_verify_keys = ["{signing_key_to_text(signing.verify_key)}"]' in out
    assert f"key id {key_id(signing.verify_key)}" in out
    assert_secret_absent(private_text(box_file), out, err)
    assert_secret_absent(private_text(sign_file), out, err)
    assert str(box_file) in err and "mode 0600" in err


def test_aggregator_keys_json_and_no_overwrite(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = run(capsys, "keys", "aggregator", "--out", str(tmp_path), "--json")
    assert code == 0
    summary = json.loads(out)
    signing = read_private_key_file(tmp_path / "aggregator.sign", "signing")
    assert summary["verify_key_id"] == key_id(signing.verify_key)
    assert summary["verify_key"] == signing_key_to_text(signing.verify_key)
    assert set(summary) == {
        "box_key_file",
        "signing_key_file",
        "public_key",
        "public_key_id",
        "verify_key",
        "verify_key_id",
    }
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    code, out, err = run(capsys, "keys", "aggregator", "--out", str(tmp_path))
    assert code == 2 and out == ""
    assert err == (
        f"fedge: error: refusing to overwrite existing key file(s) {tmp_path / 'aggregator.box'}, "
        f"{tmp_path / 'aggregator.sign'} (use --force)\n"
    )
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # Only one of the pair present: still nothing is written (no half key pair).
    (tmp_path / "aggregator.box").unlink()
    assert run(capsys, "keys", "aggregator", "--out", str(tmp_path))[0] == 2
    assert not (tmp_path / "aggregator.box").exists()
    code, _, err = run(capsys, "keys", "aggregator", "--out", str(tmp_path), "--force")
    assert code == 0, err
    assert (tmp_path / "aggregator.sign").read_bytes() != before["aggregator.sign"]
    assert mode(tmp_path / "aggregator.sign") == mode(tmp_path / "aggregator.box") == 0o600


def test_device_key_and_record(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = run(capsys, "keys", "device", "--id", "watch.01", "--out", str(tmp_path))
    assert code == 0, err
    key_file = tmp_path / "watch.01.box"
    assert mode(key_file) == 0o600
    key = read_private_key_file(key_file, "box")
    # stdout is exactly the registry line (quoted id: "." would make a dotted TOML key).
    assert out == f'"watch.01" = "{key_to_text(key.public_key)}"\n'
    assert parse_enrollment_record(out, "rec") == ("watch.01", key_to_text(key.public_key))
    assert_secret_absent(private_text(key_file), out, err)
    code, out, err = run(capsys, "keys", "device", "--id", "watch-02", "--out", str(tmp_path), "--json")
    key2 = read_private_key_file(tmp_path / "watch-02.box", "box")
    assert json.loads(out) == {"id": "watch-02", "public_key": key_to_text(key2.public_key)}
    assert_secret_absent(private_text(tmp_path / "watch-02.box"), out, err)
    # No overwrite without --force; bad ids refused before anything is written.
    before = key_file.read_bytes()
    code, out, err = run(capsys, "keys", "device", "--id", "watch.01", "--out", str(tmp_path))
    assert code == 2 and "refusing to overwrite existing key file(s)" in err and out == ""
    assert key_file.read_bytes() == before
    code, _, err = run(capsys, "keys", "device", "--id", "../evil", "--out", str(tmp_path))
    assert code == 2 and "invalid device id" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["watch-02.box", "watch.01.box"]


# --- reading key files ---------------------------------------------------------------------------


def test_read_round_trip(tmp_path: Path) -> None:
    box, signing = PrivateKey.generate(), SigningKey.generate()
    write_private_key_file(tmp_path / "b", key_to_text(box))
    write_private_key_file(tmp_path / "s", signing_key_to_text(signing))
    assert mode(tmp_path / "b") == mode(tmp_path / "s") == 0o600
    assert bytes(read_private_key_file(tmp_path / "b", "box")) == bytes(box)
    assert bytes(read_private_key_file(tmp_path / "s", "signing")) == bytes(signing)
    with pytest.raises(KeyFileError, match="already exists"):
        write_private_key_file(tmp_path / "b", key_to_text(PrivateKey.generate()))
    # Stricter is fine; a symlink is judged by its target (how Kubernetes mounts secrets).
    os.chmod(tmp_path / "b", 0o400)
    os.symlink(tmp_path / "b", tmp_path / "link")
    assert bytes(read_private_key_file(tmp_path / "link", "box")) == bytes(box)


@pytest.mark.parametrize("file_mode", [0o644, 0o640, 0o604, 0o660, 0o610, 0o601, 0o666])
def test_group_or_world_access_is_refused(tmp_path: Path, file_mode: int) -> None:
    path = tmp_path / "aggregator.sign"
    write_private_key_file(path, signing_key_to_text(SigningKey.generate()))
    os.chmod(path, file_mode)
    with pytest.raises(KeyFileError) as exc:
        read_private_key_file(path, "signing")
    assert str(exc.value) == (
        f"private key file {path} is accessible by group or others (mode {file_mode:04o}); "
        f"fix it with: chmod 600 {path}"
    )
    assert_secret_absent(private_text(path), str(exc.value))


def test_cli_refuses_a_0644_key_with_the_exact_message(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert run(capsys, "keys", "aggregator", "--out", str(tmp_path))[0] == 0
    sign_file = tmp_path / "aggregator.sign"
    os.chmod(sign_file, 0o644)
    code, out, err = run(capsys, "keys", "rotate", "--keys", str(tmp_path), "--fleet", "demo")
    assert (code, out) == (2, "")
    assert err == (
        f"fedge: error: private key file {sign_file} is accessible by group or others (mode 0644); "
        f"fix it with: chmod 600 {sign_file}\n"
    )
    assert_secret_absent(private_text(sign_file), err)
    assert rotation_files(tmp_path) == []  # nothing happened


SECRET = key_to_text(PrivateKey.generate())


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "empty"),
        (b"\n\n", "empty"),
        (SECRET[:-4].encode() + b"\n", "decodes to 30 bytes"),
        (SECRET[:-1].encode(), "not base64"),
        (base64.b64encode(base64.b64decode(SECRET) + b"abc"), "decodes to 35 bytes"),
        (SECRET.encode().replace(b"=", b"\xff"), "not ASCII text"),
        ((SECRET + "\n").encode() * 30, "over 1024 bytes"),
        (b"-----BEGIN OPENSSH PRIVATE KEY-----\n" + SECRET.encode(), "not base64"),
        (base64.b64encode(bytes(64)), "decodes to 64 bytes"),
    ],
    ids=["empty", "blank-lines", "short", "bad-padding", "long", "binary", "huge", "pem-like", "64-bytes"],
)
def test_malformed_keys_are_refused_without_their_content(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    path = tmp_path / "device.box"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, content)
    os.close(fd)
    for kind, name in (("box", "X25519 private key"), ("signing", "Ed25519 signing key seed")):
        with pytest.raises(KeyFileError) as exc:
            read_private_key_file(path, kind)  # type: ignore[call-overload]
        assert str(exc.value) == (
            f"private key file {path} is malformed: {problem}; "
            f"expected one line with the base64 of a 32-byte {name}"
        )
        assert_secret_absent(SECRET, str(exc.value))
        assert "\\x" not in str(exc.value)  # no raw bytes either


def test_unreadable_key_files(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=f"cannot read private key file {tmp_path / 'none'}: No such file"):
        read_private_key_file(tmp_path / "none", "box")
    (tmp_path / "dir").mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="is not a regular file"):
        read_private_key_file(tmp_path / "dir", "box")
    with pytest.raises(ValueError, match="kind"):
        read_private_key_file(tmp_path / "none", "rsa")  # type: ignore[call-overload]


# --- rotation ------------------------------------------------------------------------------------


def test_rotate(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run(capsys, "keys", "aggregator", "--out", str(tmp_path))[0] == 0
    first = read_private_key_file(tmp_path / "aggregator.sign", "signing")
    first_text = private_text(tmp_path / "aggregator.sign")
    code, out, err = run(capsys, "keys", "rotate", "--keys", str(tmp_path), "--fleet", "demo")
    assert code == 0, err
    second = read_private_key_file(tmp_path / "aggregator.sign", "signing")
    old = tmp_path / "aggregator.sign.old"
    assert mode(old) == mode(tmp_path / "aggregator.sign") == 0o600
    assert bytes(read_private_key_file(old, "signing")) == bytes(first)
    assert bytes(second) != bytes(first)
    assert_secret_absent(first_text, out, err)
    assert_secret_absent(private_text(tmp_path / "aggregator.sign"), out, err)
    assert f"{key_id(first.verify_key)} -> {key_id(second.verify_key)} (sequence 1)" in out
    # The document: the old key vouches for the new one; public, so 0644.
    [(sequence, doc)] = rotation_files(tmp_path)
    assert (sequence, doc.name, mode(doc)) == (1, "aggregator.rotation.000001", 0o644)
    rotation = verify_rotation(doc.read_bytes(), {key_id(first.verify_key): first.verify_key}, "demo")
    assert bytes(rotation.new_key) == bytes(second.verify_key)
    # Rotating again: the earlier retired key is in the way unless --force.
    code, out, err = run(capsys, "keys", "rotate", "--keys", str(tmp_path), "--fleet", "demo")
    assert code == 2 and out == ""
    assert "aggregator.sign.old holds the key retired by an earlier rotation" in err
    code, out, err = run(
        capsys, "keys", "rotate", "--keys", str(tmp_path), "--fleet", "demo", "--force", "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    third = read_private_key_file(tmp_path / "aggregator.sign", "signing")
    assert (result["sequence"], result["old_key_id"], result["new_key_id"]) == (
        2,
        key_id(second.verify_key),
        key_id(third.verify_key),
    )
    assert_secret_absent(private_text(old), out, err)
    # A device provisioned with the first key follows the chain, in order.
    store = TrustStore.create(tmp_path / "trust.json", "demo", [first.verify_key])
    for _, path in rotation_files(tmp_path):
        assert store.accept_rotation(path.read_bytes(), 1.0) is True
    assert store.trusted_keys() == {key_id(third.verify_key): third.verify_key}
    manifest = sign_document(DocType.ROUND_MANIFEST, {"version": 1}, third)
    trusted = store.trusted_keys()
    assert verify_document(manifest, DocType.ROUND_MANIFEST, trusted)[1] == key_id(third.verify_key)


def test_rotate_recovers_and_detects_interrupted_runs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert run(capsys, "keys", "aggregator", "--out", str(tmp_path))[0] == 0
    # Interrupted after step 1 (.old written, nothing else): a plain rerun works.
    shutil.copy2(tmp_path / "aggregator.sign", tmp_path / "aggregator.sign.old")
    assert run(capsys, "keys", "rotate", "--keys", str(tmp_path), "--fleet", "demo")[0] == 0
    # Interrupted after step 2 (a document vouching for a key never installed): detected.
    current = read_private_key_file(tmp_path / "aggregator.sign", "signing")
    os.replace(tmp_path / "aggregator.sign.old", tmp_path / "aggregator.sign")  # as if step 3 never ran
    code, _, err = run(capsys, "keys", "rotate", "--keys", str(tmp_path), "--fleet", "demo", "--force")
    assert code == 2
    assert (
        f"aggregator.rotation.000001 vouches for key {key_id(current.verify_key)}, but "
        f"{tmp_path / 'aggregator.sign'} is key " in err
    )
    assert "an earlier rotation did not finish" in err
    # Another fleet's chain is not continued either.
    os.replace(tmp_path / "aggregator.sign", tmp_path / "keep")
    write_private_key_file(tmp_path / "aggregator.sign", signing_key_to_text(current))
    code, _, err = run(capsys, "keys", "rotate", "--keys", str(tmp_path), "--fleet", "other", "--force")
    assert code == 2 and "is for fleet 'demo', not 'other'" in err


def test_rotate_needs_a_signing_key(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = run(capsys, "keys", "rotate", "--keys", str(tmp_path), "--fleet", "demo")
    assert code == 2 and out == ""
    assert f"cannot read private key file {tmp_path / 'aggregator.sign'}" in err


# --- wiring --------------------------------------------------------------------------------------


def test_add_keys_parser_wires_every_command() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="fedge")
    add_keys_parser(parser.add_subparsers(dest="command", required=True))
    for argv in (
        ["keys", "aggregator", "--out", "d"],
        ["keys", "device", "--id", "x", "--out", "d"],
        ["keys", "rotate", "--keys", "d", "--fleet", "f"],
        ["enroll", "--registry", "r", "--id", "x", "--public-key", "k"],
        ["revoke", "--registry", "r", "--id", "x", "--reason", "why"],
        ["registry", "list", "--registry", "r"],
    ):
        assert callable(parser.parse_args(argv).func)


def test_module_runs_as_a_program_without_loading_nacl(tmp_path: Path) -> None:
    # `fedge` builds every subparser on each run: importing this module must stay cheap.
    probe = (
        "import sys, fedge.tools.keys; "
        "print(sorted(m for m in sys.modules if m.startswith(('nacl', 'tomllib'))))"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True)
    assert proc.stdout.strip() == "[]"
    proc = subprocess.run(
        [sys.executable, "-m", "fedge.tools.keys", "keys", "device", "--id", "d1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert_secret_absent(private_text(tmp_path / "d1.box"), proc.stdout, proc.stderr)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[" * 100_000, "is over 65536 characters: not a record"),
        ("{" + '"a":[' * 5000 + "]" * 5000 + "}", "is not valid JSON"),
    ],
    ids=["huge", "deep"],
)
def test_a_hostile_enrollment_record_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    """A record comes from another principal (the device's provisioning): bounded in size and
    nesting before it is parsed, so a crafted one is an error, never a traceback."""
    record = tmp_path / "rec.json"
    record.write_text(content)
    code, out, err = run(
        capsys, "enroll", "--registry", str(tmp_path / "devices.toml"), "--record", str(record)
    )
    assert code == 2 and out == ""
    assert err == f"fedge: error: enrollment record {record} {message}\n"
    assert not (tmp_path / "devices.toml").exists()
