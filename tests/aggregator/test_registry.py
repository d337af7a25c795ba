"""The device registry: enroll, revoke, list; revoked keys are never enrolled again.

Real keys, real files, real processes for the concurrency test. ``load_registry`` (what the
aggregator uses) must return only active devices.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import pytest
from nacl.public import PrivateKey

from fedge.aggregator.registry import (
    Registry,
    RegistryError,
    enroll_device,
    load_registry,
    load_registry_file,
    parse_registry,
    render_registry,
    render_registry_file,
    revoke_device,
)
from fedge.protocol.config_source import ConfigError
from fedge.protocol.sealing import key_to_text
from fedge.tools.keys import main

REPO = Path(__file__).resolve().parents[2]
#: An X25519 point of order 8: every shared secret with it is predictable.
LOW_ORDER = "4Ot6fDtBuK4WVuP68Z/EatoJjeucMrH9hmIFFl9JuAA="  # e0eb7a7c...49b800 in base64
T1 = datetime(2025, 1, 31, 9, 30, 15, 123456, tzinfo=UTC)
T2 = datetime(2025, 2, 1, 12, 0, 0, tzinfo=UTC)


def new_key() -> str:
    return key_to_text(PrivateKey.generate().public_key)


def refusal(reason: str, call: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(RegistryError) as exc:
        call(*args, **kwargs)  # type: ignore[operator]
    assert exc.value.reason == reason, str(exc.value)
    return str(exc.value)


@pytest.fixture
def reg(tmp_path: Path) -> Path:
    return tmp_path / "devices.toml"


def test_low_order_constant_is_the_order_8_point() -> None:
    import base64

    assert base64.b64decode(LOW_ORDER).hex() == (
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"
    )


def test_enroll_revoke_round_trip(reg: Path) -> None:
    a, b = new_key(), new_key()
    assert enroll_device(reg, "watch-01", a) is True
    assert enroll_device(reg, "watch.02", b) is True
    assert set(load_registry(reg)) == {"watch-01", "watch.02"}
    assert revoke_device(reg, "watch.02", "lost in the lobby", now=T1) is True
    active = load_registry(reg)
    assert list(active) == ["watch-01"]
    assert key_to_text(active["watch-01"]) == a
    full = load_registry_file(reg)
    assert full.status("watch-01") == "active"
    assert full.status("watch.02") == "revoked"
    assert full.status("nobody") == "unknown"
    revocation = full.revoked["watch.02"]
    assert key_to_text(revocation.public_key) == b
    assert revocation.reason == "lost in the lobby"
    assert revocation.revoked_at == T1.replace(microsecond=0)
    assert revocation.earlier_keys == ()
    # The file: [devices] exactly as before, plus [revoked] with inline tables.
    data = tomllib.loads(reg.read_text())
    assert data["devices"] == {"watch-01": a}
    assert data["revoked"] == {
        "watch.02": {"public_key": b, "revoked_at": T1.replace(microsecond=0), "reason": "lost in the lobby"}
    }
    assert '"watch.02" = { public_key = "' in reg.read_text()
    assert "revoked_at = 2025-01-31T09:30:15Z" in reg.read_text()
    # Parsing what was rendered gives the same registry.
    assert render_registry_file(parse_registry(reg.read_text(), "x")) == reg.read_text()


def test_file_is_0644_whatever_the_umask(reg: Path) -> None:
    old = os.umask(0o077)
    try:
        enroll_device(reg, "watch-01", new_key())
        assert stat.S_IMODE(os.stat(reg).st_mode) == 0o644
        revoke_device(reg, "watch-01")
        assert stat.S_IMODE(os.stat(reg).st_mode) == 0o644
    finally:
        os.umask(old)
    assert [p.name for p in reg.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_an_old_registry_file_still_loads_and_grows(reg: Path) -> None:
    a, b = new_key(), new_key()
    reg.write_text(render_registry({"watch-01": a}))  # what fedge.lab.provision writes
    assert {d: key_to_text(k) for d, k in load_registry(reg).items()} == {"watch-01": a}
    enroll_device(reg, "watch-02", b)
    assert {d: key_to_text(k) for d, k in load_registry(reg).items()} == {"watch-01": a, "watch-02": b}


def test_enroll_is_idempotent_for_the_same_key(reg: Path) -> None:
    key = new_key()
    enroll_device(reg, "watch-01", key)
    before = reg.read_bytes()
    assert enroll_device(reg, "watch-01", key) is False
    assert reg.read_bytes() == before


def test_revoked_device_cannot_be_re_enrolled_silently(reg: Path) -> None:
    old_key, new = new_key(), new_key()
    enroll_device(reg, "watch-01", old_key)
    revoke_device(reg, "watch-01", "stolen", now=T1)
    message = refusal("revoked_id", enroll_device, reg, "watch-01", new)
    assert message == (
        "device 'watch-01' was revoked 2025-01-31T09:30:15Z (stolen); "
        "pass --force to enroll it again with a new key"
    )
    # The revoked key is refused always, with --force too, and for any id.
    for device_id, force in (("watch-01", False), ("watch-01", True), ("watch-99", True)):
        message = refusal("key_revoked", enroll_device, reg, device_id, old_key, force=force)
        assert "a revoked key is never enrolled again" in message
    assert load_registry(reg) == {}
    # With --force and a new key the device is back, and its old key stays revoked.
    assert enroll_device(reg, "watch-01", new, force=True) is True
    full = load_registry_file(reg)
    assert key_to_text(full.devices["watch-01"]) == new
    assert key_to_text(full.revoked["watch-01"].public_key) == old_key
    refusal("key_revoked", enroll_device, reg, "watch-02", old_key)
    # Revoked a second time: both keys are kept.
    revoke_device(reg, "watch-01", "stolen again", now=T2)
    again = load_registry_file(reg).revoked["watch-01"]
    assert key_to_text(again.public_key) == new
    assert [key_to_text(k) for k in again.earlier_keys] == [old_key]
    assert again.reason == "stolen again"
    for key in (old_key, new):
        refusal("key_revoked", enroll_device, reg, "watch-01", key, force=True)


def test_a_public_key_enrolled_for_another_device_is_refused(reg: Path) -> None:
    key = new_key()
    enroll_device(reg, "watch-01", key)
    before = reg.read_bytes()
    message = refusal("key_in_use", enroll_device, reg, "watch-02", key)
    assert message == "this public key is already enrolled for device 'watch-01'"
    refusal("key_in_use", enroll_device, reg, "watch-02", key, force=True)
    assert reg.read_bytes() == before


def test_an_enrolled_id_keeps_its_key(reg: Path) -> None:
    enroll_device(reg, "watch-01", new_key())
    message = refusal("id_in_use", enroll_device, reg, "watch-01", new_key(), force=True)
    assert "revoke it first" in message


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        (LOW_ORDER, "low-order point"),
        ("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "all zeros"),
        ("not base64!", "not base64"),
        (key_to_text(PrivateKey.generate().public_key)[:-4], "must be 32 bytes"),
        ("", "must be 32 bytes"),
    ],
)
def test_bad_public_keys_are_refused_at_enrollment(reg: Path, key: str, problem: str) -> None:
    message = refusal("bad_key", enroll_device, reg, "watch-01", key)
    assert problem in message
    assert not reg.exists()
    enroll_device(reg, "watch-02", new_key())
    before = reg.read_bytes()
    refusal("bad_key", enroll_device, reg, "watch-01", key, force=True)
    assert reg.read_bytes() == before


def test_bad_ids_and_reasons(reg: Path) -> None:
    refusal("bad_id", enroll_device, reg, "a/b", new_key())
    refusal("bad_id", enroll_device, reg, "", new_key())
    enroll_device(reg, "watch-01", new_key())
    refusal("not_enrolled", revoke_device, reg, "watch-02")
    refusal("bad_reason", revoke_device, reg, "watch-01", "two\nlines")
    refusal("bad_reason", revoke_device, reg, "watch-01", "x" * 201)
    refusal("bad_reason", revoke_device, reg, "watch-01", "bidi \u202e trick")
    assert revoke_device(reg, "watch-01", 'a "quoted" \\ reason, ünïcode', now=T1) is True
    assert load_registry_file(reg).revoked["watch-01"].reason == 'a "quoted" \\ reason, ünïcode'
    before = reg.read_bytes()
    assert revoke_device(reg, "watch-01", "again", now=T2) is False
    assert reg.read_bytes() == before


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[devices]\nx = 1\n", "public key must be a string"),
        ("[other]\n", "expected a [devices] table"),
        ('[devices]\n"a" = "{k}"\n"b" = "{k}"\n', "share a public key"),
        (
            '[devices]\n"a" = "{k}"\n[revoked]\n'
            '"b" = {{ public_key = "{k}", revoked_at = 2025-01-01T00:00:00Z, reason = "" }}\n',
            "device 'a' and revoked device 'b' share a public key",
        ),
        (
            '[revoked]\n"b" = {{ public_key = "{k}", revoked_at = 2025-01-01T00:00:00, reason = "" }}\n',
            "revoked_at must be a date-time with offset",
        ),
        ('[revoked]\n"b" = {{ public_key = "{k}", reason = "" }}\n', "expected {public_key, revoked_at"),
        ('[devices]\n"a" = "' + LOW_ORDER + '"\n', "low-order point"),
        ("[devices\n", "not valid TOML"),
    ],
)
def test_malformed_registry_files(reg: Path, text: str, message: str) -> None:
    reg.write_text(text.format(k=new_key()))
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("{", r"\{")):
        load_registry(reg)
    with pytest.raises(RegistryError):
        enroll_device(reg, "c", new_key())  # an unreadable registry is never replaced by a new one


def test_missing_registry(reg: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read device registry"):
        load_registry(reg)
    refusal("not_enrolled", revoke_device, reg, "watch-01")
    assert not reg.exists()


def test_concurrent_enrolls_lose_nothing(reg: Path) -> None:
    """Two processes enrolling at the same time: every enrollment must end up in the file."""
    per_process = 25
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from nacl.public import PrivateKey
        from fedge.aggregator.registry import enroll_device
        from fedge.protocol.sealing import key_to_text
        keys = [key_to_text(PrivateKey.generate().public_key) for _ in range(int(sys.argv[3]))]
        sys.stdin.readline()  # start together
        for i, key in enumerate(keys):
            enroll_device(Path(sys.argv[1]), f"{sys.argv[2]}-{i}", key)
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(reg), name, str(per_process)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            text=True,
        )
        for name in ("a", "b")
    ]
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    enrolled = load_registry(reg)
    assert len(enrolled) == 2 * per_process
    assert set(enrolled) == {f"{n}-{i}" for n in ("a", "b") for i in range(per_process)}


# --- the CLI -----------------------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_enroll_revoke_list(capsys: pytest.CaptureFixture[str], tmp_path: Path, reg: Path) -> None:
    code, record, _ = run(capsys, "keys", "device", "--id", "watch-01", "--out", str(tmp_path / "k"))
    assert code == 0
    (tmp_path / "watch-01.rec").write_text(record)
    code, out, err = run(capsys, "enroll", "--registry", str(reg), "--record", str(tmp_path / "watch-01.rec"))
    assert (code, out, err) == (0, f"enrolled watch-01 in {reg}\n", "")
    code, out, _ = run(capsys, "enroll", "--registry", str(reg), "--record", str(tmp_path / "watch-01.rec"))
    assert (code, out) == (0, f"watch-01 is already enrolled with this key in {reg}; nothing changed\n")
    second = new_key()
    code, _, _ = run(capsys, "enroll", "--registry", str(reg), "--id", "watch-02", "--public-key", second)
    assert code == 0
    code, out, _ = run(capsys, "revoke", "--registry", str(reg), "--id", "watch-02", "--reason", "lost")
    assert (code, out) == (
        0,
        f"revoked watch-02 in {reg}; the aggregator refuses its updates from the next round on "
        "(no restart needed)\n",
    )
    code, out, _ = run(capsys, "registry", "list", "--registry", str(reg))
    lines = out.splitlines()
    assert lines[0].split() == ["device", "status", "public", "key", "revoked", "at", "reason"]
    assert lines[1].split()[:3] == ["watch-01", "active", record.split('"')[3]]
    assert lines[2].split()[:3] == ["watch-02", "revoked", second] and lines[2].endswith("lost")
    code, out, _ = run(capsys, "registry", "list", "--registry", str(reg), "--json")
    rows = json.loads(out)["devices"]
    assert [(r["id"], r["status"], r["reason"]) for r in rows] == [
        ("watch-01", "active", None),
        ("watch-02", "revoked", "lost"),
    ]
    # Refusals are one-line errors with exit code 2.
    code, out, err = run(
        capsys, "enroll", "--registry", str(reg), "--id", "watch-02", "--public-key", new_key()
    )
    assert code == 2 and out == ""
    assert err.startswith("fedge: error: device 'watch-02' was revoked ") and err.endswith(
        "(lost); pass --force to enroll it again with a new key\n"
    )
    code, _, err = run(
        capsys, "enroll", "--registry", str(reg), "--id", "watch-03", "--public-key", LOW_ORDER
    )
    assert code == 2 and "low-order point" in err
    code, _, _ = run(
        capsys, "enroll", "--registry", str(reg), "--id", "watch-02", "--public-key", new_key(), "--force"
    )
    assert code == 0
    assert set(load_registry(reg)) == {"watch-01", "watch-02"}


def test_cli_enroll_from_json_record_on_stdin(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, reg: Path
) -> None:
    import io

    code, record, _ = run(capsys, "keys", "device", "--id", "watch-01", "--out", str(tmp_path), "--json")
    assert code == 0 and set(json.loads(record)) == {"id", "public_key"}
    monkeypatch.setattr("sys.stdin", io.StringIO(record))
    code, out, _ = run(capsys, "enroll", "--registry", str(reg), "--record", "-")
    assert (code, out) == (0, f"enrolled watch-01 in {reg}\n")
    assert key_to_text(load_registry(reg)["watch-01"]) == json.loads(record)["public_key"]
    monkeypatch.setattr("sys.stdin", io.StringIO(record))
    code, _, err = run(capsys, "enroll", "--registry", str(reg), "--record", "-", "--id", "other")
    assert code == 2 and "differs from the record's id 'watch-01'" in err
    (tmp_path / "bad.rec").write_text('"a" = "x"\n"b" = "y"\n')
    code, _, err = run(capsys, "enroll", "--registry", str(reg), "--record", str(tmp_path / "bad.rec"))
    assert code == 2 and "expected exactly one" in err
    code, _, err = run(capsys, "enroll", "--registry", str(reg), "--id", "x")
    assert code == 2 and "give --id and --public-key, or --record" in err


def test_registry_dataclass_defaults() -> None:
    empty = Registry()
    assert empty.devices == {} and empty.revoked == {}
    assert render_registry_file(empty).endswith("[devices]\n")
