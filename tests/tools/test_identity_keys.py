"""``fedge keys operator``, ``fedge keys identity`` and ``fedge certify``: real key files, the
real CLI, and a certificate that the protocol's verifier accepts for exactly that device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedge.protocol.errors import FedgeError
from fedge.protocol.identity import verify_certificate
from fedge.protocol.signing import key_id, verify_key_from_text
from fedge.tools.identity_keys import read_certificate_file, write_certificate

pytestmark = pytest.mark.tools


def fedge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedge.cli", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_operator_identity_and_certificate_from_the_command_line(tmp_path: Path) -> None:
    op = fedge("keys", "operator", "--out", str(tmp_path), "--json")
    assert op.returncode == 0, op.stderr
    operator = json.loads(op.stdout)
    assert (tmp_path / "operator.sign").stat().st_mode & 0o777 == 0o600
    ident = fedge("keys", "identity", "--id", "watch-01", "--out", str(tmp_path), "--json")
    assert ident.returncode == 0, ident.stderr
    identity_key = json.loads(ident.stdout)["identity_key"]
    assert (tmp_path / "watch-01.identity").stat().st_mode & 0o777 == 0o600
    cert_path = tmp_path / "watch-01.cert"
    args = ["certify", "--operator-key", str(tmp_path / "operator.sign"), "--fleet", "f1", "--id", "watch-01"]
    done = fedge(*args, "--identity-key", identity_key, "--out", str(cert_path))
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout.strip() == f"wrote {cert_path}: give it to watch-01 as [agent] identity_certificate_file"
    )
    assert cert_path.stat().st_mode & 0o777 == 0o644

    trusted_key = verify_key_from_text(operator["verify_key"])
    cert = verify_certificate(
        read_certificate_file(cert_path), {key_id(trusted_key): trusted_key}, "f1", "watch-01"
    )
    assert cert.identity_key == verify_key_from_text(identity_key)

    again = fedge(*args, "--identity-key", identity_key, "--out", str(cert_path))
    assert again.returncode != 0 and "Traceback" not in again.stderr
    assert f"refusing to overwrite existing key file(s) {cert_path} (use --force)" in again.stderr


def test_certify_refuses_bad_keys_and_files_with_one_line(tmp_path: Path) -> None:
    assert fedge("keys", "operator", "--out", str(tmp_path)).returncode == 0
    operator_file = tmp_path / "operator.sign"
    with pytest.raises(FedgeError, match=r"^--identity-key: "):
        write_certificate(operator_file, "f1", "watch-01", "not-base64!", tmp_path / "x.cert")
    own = operator_file.read_text().strip()
    from fedge.protocol.signing import signing_key_from_text, signing_key_to_text

    own_verify = signing_key_to_text(signing_key_from_text(own).verify_key)
    with pytest.raises(FedgeError, match="is the operator's own key"):
        write_certificate(operator_file, "f1", "watch-01", own_verify, tmp_path / "x.cert")
    assert not (tmp_path / "x.cert").exists()
    (tmp_path / "bad.cert").write_text("%%% not base64\n")
    with pytest.raises(FedgeError, match=r"is not base64 \(write it with fedge certify\)"):
        read_certificate_file(tmp_path / "bad.cert")
    with pytest.raises(FedgeError, match="cannot read identity certificate"):
        read_certificate_file(tmp_path / "missing.cert")
    os.chmod(operator_file, 0o644)
    with pytest.raises(FedgeError):
        write_certificate(operator_file, "f1", "watch-01", own_verify, tmp_path / "y.cert")
