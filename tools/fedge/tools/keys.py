"""Key management on the command line: ``fedge keys``, ``fedge enroll``, ``fedge revoke``,
``fedge registry list``.

- ``fedge keys aggregator --out DIR``: the aggregator's X25519 box key (devices seal updates
  to it) and Ed25519 signing key (it signs manifests), as ``aggregator.box`` and
  ``aggregator.sign``.
- ``fedge keys device --id ID --out DIR``: a device's X25519 key, ``ID.box``; prints its
  enrollment record (``"ID" = "public key"``, or JSON with ``--json``) for ``fedge enroll``.
  Run it on the device (or where it is provisioned): the private key never has to travel.
- ``fedge keys rotate --keys DIR --fleet FLEET``: a new signing key, vouched for by the old
  one in a rotation document (:mod:`fedge.protocol.key_rotation`) that devices accept.
- ``fedge enroll`` / ``fedge revoke`` / ``fedge registry list``: the device registry
  (:mod:`fedge.aggregator.registry`).

Private keys: files are base64 of the 32 raw bytes plus a newline (what the aggregator and
agent read), mode 0600, written atomically and never over an existing file without
``--force`` (overwriting a key silently cuts a device or the whole fleet off). Only public
keys and key ids are ever printed; errors about a key file name the file and the problem,
never its bytes. :func:`read_private_key_file` refuses files that group or others can access,
as ssh does: a key that others could read must be treated as leaked, and failing loudly is
the only way the mistake gets fixed.

Imports only the standard library at module level: ``fedge`` builds its whole parser on every
run (also ``fedge agent run`` on a small board), so NaCl and TOML (also through
:mod:`fedge.shell.files`) load only when a command of this module runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

from fedge.protocol.bounded_json import BoundedJsonError, loads_bounded
from fedge.protocol.errors import FedgeError
from fedge.protocol.keyfile import KeyFileError, KeyKind
from fedge.tools.standalone import run_alone

#: An enrollment record is one line (~70 characters); it comes from another principal.
MAX_RECORD_BYTES = 64 * 1024

if TYPE_CHECKING:
    from nacl.public import PrivateKey
    from nacl.signing import SigningKey


KEY_FILE_MODE = 0o600
KEY_DIR_MODE = 0o700
PUBLIC_FILE_MODE = 0o644
#: A key file is 45 bytes; anything much bigger is not a key file.
AGGREGATOR_BOX_FILE = "aggregator.box"
AGGREGATOR_SIGN_FILE = "aggregator.sign"
OLD_SIGN_FILE = "aggregator.sign.old"
#: Rotation documents are kept, one per sequence, so devices that missed one can catch up.
ROTATION_FILE_PREFIX = "aggregator.rotation."
EXIT_USAGE = 2

_KIND_NAMES: dict[str, str] = {"box": "X25519 private key", "signing": "Ed25519 signing key seed"}


# --- reading and writing private keys -------------------------------------------------------


@overload
def read_private_key_file(path: Path, kind: Literal["box"]) -> PrivateKey: ...
@overload
def read_private_key_file(path: Path, kind: Literal["signing"]) -> SigningKey: ...
def read_private_key_file(path: Path, kind: KeyKind) -> PrivateKey | SigningKey:
    """Reads a private key file, refusing group/world access, non-files and malformed keys.

    The mode is checked on the opened file (``fstat``), so a symlink (as Kubernetes mounts
    secrets) is judged by its target and the file cannot be swapped between check and read.
    """
    from nacl.public import PrivateKey  # noqa: PLC0415 - see the module docstring
    from nacl.signing import SigningKey  # noqa: PLC0415

    from fedge.shell.files import read_private_key  # noqa: PLC0415 - it loads TOML (config reader)

    if kind not in _KIND_NAMES:
        raise ValueError(f"kind must be 'box' or 'signing', not {kind!r}")
    seed = read_private_key(Path(path), kind, error=KeyFileError)
    return PrivateKey(seed) if kind == "box" else SigningKey(seed)


def write_private_key_file(path: Path, text: str, *, force: bool = False) -> None:
    """Writes a key file atomically with mode 0600 from the start; refuses to replace one
    unless ``force`` (a temp file is linked into place, which fails if the name exists)."""
    _write_file(Path(path), (text + "\n").encode("ascii"), KEY_FILE_MODE, replace=force)


def _write_file(path: Path, data: bytes, mode: int, *, replace: bool) -> None:
    """:func:`fedge.shell.files.atomic_write`: created 0600, then ``mode``; renamed over
    ``path``, or linked if not ``replace`` (which fails if ``path`` exists)."""
    from fedge.shell.files import atomic_write  # noqa: PLC0415 - see the module docstring

    try:
        atomic_write(path, data, mode, replace=replace)
    except FileExistsError:  # only the link of replace=False meets an existing name
        raise KeyFileError(f"{path} already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise KeyFileError(f"cannot write {path}: {exc.strerror}") from None


def _key_dir(out: Path) -> Path:
    """``out``, created 0700 if missing (an existing directory's mode is the owner's call)."""
    try:
        out.mkdir(parents=True, exist_ok=True, mode=KEY_DIR_MODE)
    except OSError as exc:
        raise KeyFileError(f"cannot create key directory {out}: {exc.strerror}") from None
    if not out.is_dir():
        raise KeyFileError(f"{out} is not a directory")
    return out


def _refuse_existing(paths: Sequence[Path], force: bool) -> None:
    """Checks every target first, so a refused run writes nothing (no half key pair)."""
    if force:
        return
    existing = [str(p) for p in paths if os.path.lexists(p)]
    if existing:
        raise KeyFileError(f"refusing to overwrite existing key file(s) {', '.join(existing)} (use --force)")


# --- creating keys ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AggregatorKeys:
    """What ``fedge keys aggregator`` made: file paths and PUBLIC keys only."""

    box_key_file: str
    signing_key_file: str
    public_key: str
    public_key_id: str
    verify_key: str
    verify_key_id: str


@dataclass(frozen=True)
class DeviceKey:
    """What ``fedge keys device`` made: the key file and the enrollment record (public)."""

    id: str
    public_key: str
    key_file: str


def create_aggregator_keys(out: Path, *, force: bool = False) -> AggregatorKeys:
    from nacl.public import PrivateKey  # noqa: PLC0415
    from nacl.signing import SigningKey  # noqa: PLC0415

    from fedge.protocol.sealing import key_to_text  # noqa: PLC0415
    from fedge.protocol.signing import key_id, signing_key_to_text  # noqa: PLC0415

    out = _key_dir(Path(out))
    box_path, sign_path = out / AGGREGATOR_BOX_FILE, out / AGGREGATOR_SIGN_FILE
    _refuse_existing([box_path, sign_path], force)
    box = PrivateKey.generate()
    signing = SigningKey.generate()
    write_private_key_file(box_path, key_to_text(box), force=force)
    write_private_key_file(sign_path, signing_key_to_text(signing), force=force)
    return AggregatorKeys(
        box_key_file=str(box_path),
        signing_key_file=str(sign_path),
        public_key=key_to_text(box.public_key),
        public_key_id=_fingerprint(bytes(box.public_key)),
        verify_key=signing_key_to_text(signing.verify_key),
        verify_key_id=key_id(signing.verify_key),
    )


def create_device_key(out: Path, device_id: str, *, force: bool = False) -> DeviceKey:
    from nacl.public import PrivateKey  # noqa: PLC0415

    from fedge.protocol.sealing import key_to_text  # noqa: PLC0415
    from fedge.protocol.topics import check_id  # noqa: PLC0415

    check_id(device_id)
    out = _key_dir(Path(out))
    path = out / f"{device_id}.box"
    _refuse_existing([path], force)
    key = PrivateKey.generate()
    write_private_key_file(path, key_to_text(key), force=force)
    return DeviceKey(id=device_id, public_key=key_to_text(key.public_key), key_file=str(path))


def _fingerprint(raw: bytes) -> str:
    """Same form as a signing key id (16 hex of SHA-256): lets people compare keys by eye."""
    import hashlib  # noqa: PLC0415

    return hashlib.sha256(raw).hexdigest()[:16]


# --- enrollment records ------------------------------------------------------------------------


def render_record_toml(device_id: str, public_key: str) -> str:
    """The registry line for a device, exactly as the registry writes it (ids are quoted: a
    ``.`` in a bare TOML key would make a dotted key)."""
    return f'"{device_id}" = "{public_key}"'


def parse_enrollment_record(text: str, source: str) -> tuple[str, str]:
    """``(device id, public key text)`` from a record printed by ``fedge keys device``:
    the TOML line (optionally under ``[devices]``) or the ``--json`` object."""
    from fedge.protocol.config_source import ConfigError, parse_toml  # noqa: PLC0415

    stripped = text.strip()
    entries: Any
    if stripped.startswith("{"):
        try:
            # A record is another principal's file: size and nesting are bounded before parsing.
            data = loads_bounded(stripped.encode("utf-8"), max_bytes=MAX_RECORD_BYTES)
        except BoundedJsonError:
            raise FedgeError(f"enrollment record {source} is not valid JSON") from None
        if not isinstance(data, dict) or set(data) != {"id", "public_key"}:
            raise FedgeError(f'enrollment record {source}: expected {{"id": ..., "public_key": ...}}')
        entries = {data["id"]: data["public_key"]}
    else:
        try:
            data = parse_toml(stripped, source)
        except ConfigError as exc:
            raise FedgeError(f"enrollment record {exc}") from None
        entries = data["devices"] if set(data) == {"devices"} else data
    if not isinstance(entries, dict) or len(entries) != 1:
        raise FedgeError(f'enrollment record {source}: expected exactly one "id" = "public key"')
    ((device_id, key),) = entries.items()
    if not isinstance(device_id, str) or not isinstance(key, str):
        raise FedgeError(f"enrollment record {source}: id and public key must be strings")
    return device_id, key


# --- rotation --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RotationResult:
    """What ``fedge keys rotate`` did: public facts only."""

    fleet: str
    sequence: int
    old_key_id: str
    new_verify_key: str
    new_key_id: str
    rotation_file: str
    signing_key_file: str
    old_key_file: str


def rotate_signing_key(
    keys_dir: Path, fleet: str, *, force: bool = False, now: float | None = None
) -> RotationResult:
    """Makes a new signing key, vouched for by the current one; keeps the old as ``.old``.

    Order (each step atomic), chosen so a crash never loses the key devices still trust:
    1. ``aggregator.sign.old`` = the current key (a copy);
    2. ``aggregator.rotation.<sequence>`` = the rotation document (never overwritten);
    3. ``aggregator.sign`` = the new key.
    A crash between 2 and 3 leaves a document vouching for a key that was never installed;
    the next run detects it (the newest document must name the current key) and says so.

    An existing ``aggregator.sign.old`` that is not the current key is the key of an earlier
    rotation; replacing it needs ``force`` (no private key is destroyed silently).
    """
    from nacl.signing import SigningKey  # noqa: PLC0415

    from fedge.protocol.key_rotation import sign_rotation  # noqa: PLC0415
    from fedge.protocol.signing import key_id, signing_key_to_text  # noqa: PLC0415
    from fedge.protocol.topics import check_id  # noqa: PLC0415

    check_id(fleet, "fleet id")
    keys_dir = Path(keys_dir)
    sign_path, old_path = keys_dir / AGGREGATOR_SIGN_FILE, keys_dir / OLD_SIGN_FILE
    current = read_private_key_file(sign_path, "signing")
    current_id = key_id(current.verify_key)
    sequence = _next_sequence(keys_dir, fleet, current_id)
    if os.path.lexists(old_path) and not force:
        previous = read_private_key_file(old_path, "signing")
        if bytes(previous) != bytes(current):  # equal: an interrupted run of this command
            raise KeyFileError(
                f"{old_path} holds the key retired by an earlier rotation; move it away "
                "(or pass --force to replace it) before rotating again"
            )
    new = SigningKey.generate()
    frame = sign_rotation(current, new.verify_key, fleet, sequence, time.time() if now is None else now)
    rotation_path = keys_dir / f"{ROTATION_FILE_PREFIX}{sequence:06d}"
    write_private_key_file(old_path, signing_key_to_text(current), force=True)
    _write_file(rotation_path, frame, PUBLIC_FILE_MODE, replace=False)
    write_private_key_file(sign_path, signing_key_to_text(new), force=True)
    return RotationResult(
        fleet=fleet,
        sequence=sequence,
        old_key_id=current_id,
        new_verify_key=signing_key_to_text(new.verify_key),
        new_key_id=key_id(new.verify_key),
        rotation_file=str(rotation_path),
        signing_key_file=str(sign_path),
        old_key_file=str(old_path),
    )


def rotation_files(keys_dir: Path) -> list[tuple[int, Path]]:
    """The rotation documents in ``keys_dir``, oldest first: the chain a lagging device needs."""
    found: list[tuple[int, Path]] = []
    for path in Path(keys_dir).iterdir():
        suffix = path.name[len(ROTATION_FILE_PREFIX) :]
        if path.name.startswith(ROTATION_FILE_PREFIX) and suffix.isdigit():
            found.append((int(suffix), path))
    return sorted(found)


def _next_sequence(keys_dir: Path, fleet: str, current_id: str) -> int:
    """1 + the newest rotation's sequence, after checking that it vouches for the current key."""
    from fedge.protocol.key_rotation import read_rotation_unverified  # noqa: PLC0415

    files = rotation_files(keys_dir)
    if not files:
        return 1
    sequence, path = files[-1]
    try:
        previous = read_rotation_unverified(path.read_bytes())
    except OSError as exc:
        raise KeyFileError(f"cannot read rotation document {path}: {exc.strerror}") from None
    except FedgeError as exc:
        raise KeyFileError(f"rotation document {path} is unreadable: {exc}") from None
    if previous.sequence != sequence:
        raise KeyFileError(f"rotation document {path} holds sequence {previous.sequence}")
    if previous.fleet != fleet:
        raise KeyFileError(f"rotation document {path} is for fleet {previous.fleet!r}, not {fleet!r}")
    if previous.new_key_id != current_id:
        raise KeyFileError(
            f"rotation document {path} vouches for key {previous.new_key_id}, but "
            f"{keys_dir / AGGREGATOR_SIGN_FILE} is key {current_id}: an earlier rotation did not "
            "finish. If that document was never published, delete it and rotate again"
        )
    return sequence + 1


# --- commands ------------------------------------------------------------------------------------


def cmd_keys_aggregator(args: argparse.Namespace) -> int:
    keys = create_aggregator_keys(args.out, force=args.force)
    print(
        f"wrote {keys.box_key_file} and {keys.signing_key_file} (mode 0600): keep them secret",
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps(asdict(keys)))
    else:
        print("# the aggregator's public keys, for each device's [agent] config")
        print(f'aggregator_public_key = "{keys.public_key}"  # fingerprint {keys.public_key_id}')
        print(f'aggregator_verify_keys = ["{keys.verify_key}"]  # key id {keys.verify_key_id}')
    return 0


def cmd_keys_device(args: argparse.Namespace) -> int:
    key = create_device_key(args.out, args.id, force=args.force)
    print(f"wrote {key.key_file} (mode 0600): it stays on the device", file=sys.stderr)
    # stdout is the record alone, so it can be redirected into a file for `fedge enroll --record`.
    if args.json:
        print(json.dumps({"id": key.id, "public_key": key.public_key}))
    else:
        print(render_record_toml(key.id, key.public_key))
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    result = rotate_signing_key(args.keys, args.fleet, force=args.force)
    if args.json:
        print(json.dumps(asdict(result)))
        return 0
    print(
        f"rotated the signing key of fleet {result.fleet}: {result.old_key_id} -> {result.new_key_id} "
        f"(sequence {result.sequence})\n"
        f"  new key:           {result.signing_key_file} (verify key {result.new_verify_key})\n"
        f"  old key:           {result.old_key_file}\n"
        f"  rotation document: {result.rotation_file}\n"
        "Publish the rotation document to the devices; a device that accepts it stops trusting "
        f"key {result.old_key_id}. Restart the aggregator to sign with the new key."
    )
    return 0


def cmd_enroll(args: argparse.Namespace) -> int:
    from fedge.aggregator.registry import enroll_device  # noqa: PLC0415

    if args.record is not None:
        if args.public_key is not None:
            raise FedgeError("give either --record or --public-key, not both")
        source = "<stdin>" if str(args.record) == "-" else str(args.record)
        try:
            if source == "<stdin>":
                text = sys.stdin.read(MAX_RECORD_BYTES + 1)
            else:
                with args.record.open(encoding="utf-8") as f:
                    text = f.read(MAX_RECORD_BYTES + 1)
        except (OSError, UnicodeDecodeError) as exc:
            raise FedgeError(f"cannot read enrollment record {source}: {exc}") from None
        if len(text) > MAX_RECORD_BYTES:
            raise FedgeError(
                f"enrollment record {source} is over {MAX_RECORD_BYTES} characters: not a record"
            )
        device_id, public_key = parse_enrollment_record(text, source)
        if args.id is not None and args.id != device_id:
            raise FedgeError(f"--id {args.id!r} differs from the record's id {device_id!r}")
    else:
        if args.public_key is None or args.id is None:
            raise FedgeError("give --id and --public-key, or --record")
        device_id, public_key = args.id, args.public_key
    changed = enroll_device(args.registry, device_id, public_key, force=args.force)
    if changed:
        print(f"enrolled {device_id} in {args.registry}")
    else:
        print(f"{device_id} is already enrolled with this key in {args.registry}; nothing changed")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    from fedge.aggregator.registry import load_registry_file, revoke_device  # noqa: PLC0415

    changed = revoke_device(args.registry, args.id, args.reason)
    revocation = load_registry_file(args.registry).revoked[args.id]
    when = revocation.revoked_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    if changed:
        # True without a restart: the aggregator re-reads the registry before every round.
        print(
            f"revoked {args.id} in {args.registry}; the aggregator refuses its updates from the next "
            "round on (no restart needed)"
        )
    else:
        print(f"{args.id} was already revoked ({when}); nothing changed")
    return 0


def cmd_registry_list(args: argparse.Namespace) -> int:
    from fedge.aggregator.registry import load_registry_file, registry_to_rows  # noqa: PLC0415

    rows = registry_to_rows(load_registry_file(args.registry))
    if args.json:
        print(json.dumps({"registry": str(args.registry), "devices": rows}))
        return 0
    if not rows:
        print(f"no devices in {args.registry}")
        return 0
    width = max(len(r["id"]) for r in rows)
    print(f"{'device':<{width}}  {'status':<7}  {'public key':<44}  {'revoked at':<20}  reason")
    for r in rows:
        print(
            f"{r['id']:<{width}}  {r['status']:<7}  {r['public_key']:<44}  "
            f"{r['revoked_at'] or '-':<20}  {r['reason'] or '-'}"
        )
    return 0


def add_keys_parser(sub: Any) -> None:
    """Adds ``keys``, ``enroll``, ``revoke`` and ``registry`` to the subparsers of ``fedge``."""
    keys = sub.add_parser("keys", help="create aggregator and device keys; rotate the signing key")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="SUBCOMMAND", required=True)

    agg = keys_sub.add_parser("aggregator", help="the aggregator's box key and signing key (mode 0600)")
    agg.add_argument("--out", type=Path, required=True, metavar="DIR", help="key directory")
    agg.add_argument("--force", action="store_true", help="overwrite existing key files")
    agg.add_argument("--json", action="store_true", help="print the public keys as JSON")
    agg.set_defaults(func=cmd_keys_aggregator)

    dev = keys_sub.add_parser("device", help="a device's box key; prints its enrollment record")
    dev.add_argument("--id", required=True, help="device id")
    dev.add_argument("--out", type=Path, required=True, metavar="DIR", help="key directory")
    dev.add_argument("--force", action="store_true", help="overwrite an existing key file")
    dev.add_argument("--json", action="store_true", help="print the record as JSON")
    dev.set_defaults(func=cmd_keys_device)

    rot = keys_sub.add_parser("rotate", help="new signing key, vouched for by the current one")
    rot.add_argument("--keys", type=Path, required=True, metavar="DIR", help="the aggregator's key directory")
    rot.add_argument("--fleet", required=True, help="fleet id (the rotation is valid for this fleet only)")
    rot.add_argument("--force", action="store_true", help=f"replace an existing {OLD_SIGN_FILE}")
    rot.add_argument("--json", action="store_true", help="print the result as JSON")
    rot.set_defaults(func=cmd_keys_rotate)

    from fedge.tools.identity_keys import add_identity_parsers  # noqa: PLC0415 - imports this module

    add_identity_parsers(keys_sub, sub)  # fedge keys operator|identity, fedge certify

    enroll = sub.add_parser("enroll", help="enroll a device's public key in the registry")
    enroll.add_argument("--registry", type=Path, required=True, metavar="FILE", help="registry (TOML)")
    enroll.add_argument("--id", help="device id")
    enroll.add_argument("--public-key", metavar="KEY", help="the device's X25519 public key (base64)")
    enroll.add_argument(
        "--record", type=Path, metavar="FILE", help="a record printed by 'fedge keys device' ('-': stdin)"
    )
    enroll.add_argument("--force", action="store_true", help="enroll a revoked device id again")
    enroll.set_defaults(func=cmd_enroll)

    revoke = sub.add_parser("revoke", help="revoke a device (its key is never accepted again)")
    revoke.add_argument("--registry", type=Path, required=True, metavar="FILE", help="registry (TOML)")
    revoke.add_argument("--id", required=True, help="device id")
    revoke.add_argument("--reason", default="", help="why (one line, kept in the registry)")
    revoke.set_defaults(func=cmd_revoke)

    reg = sub.add_parser("registry", help="the device registry")
    reg_sub = reg.add_subparsers(dest="registry_command", metavar="SUBCOMMAND", required=True)
    lst = reg_sub.add_parser("list", help="active and revoked devices")
    lst.add_argument("--registry", type=Path, required=True, metavar="FILE", help="registry (TOML)")
    lst.add_argument("--json", action="store_true", help="print JSON")
    lst.set_defaults(func=cmd_registry_list)


def main(argv: Sequence[str] | None = None) -> int:
    """These commands on their own (``python -m fedge.tools.keys``), with ``fedge``'s error handling."""
    return run_alone(add_keys_parser, "fedge key and registry management", argv)


if __name__ == "__main__":
    sys.exit(main())
