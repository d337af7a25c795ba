"""Identity keys for secure aggregation on the command line: ``fedge keys operator``,
``fedge keys identity`` and ``fedge certify``.

Secure aggregation needs each device's round keys signed with a key the aggregator cannot
choose (``fedge.protocol.identity``). Three steps, three places:

- ``fedge keys operator --out DIR`` (once per fleet, on the operator's machine, **not** on the
  gateway the aggregator runs on): ``operator.sign``, the key that certifies devices. Prints
  ``operator_verify_keys = [...]`` for every device's ``[agent]`` table.
- ``fedge keys identity --id ID --out DIR`` (on the device, or where it is provisioned):
  ``ID.identity``, the device's Ed25519 identity key (mode 0600, it stays on the device).
  Prints the device's public identity key.
- ``fedge certify --operator-key operator.sign --fleet F --id ID --identity-key KEY --out
  ID.cert``: the certificate (base64 text, public) that goes to the device as
  ``[agent] identity_certificate_file``.

Only the standard library at module level, like :mod:`fedge.tools.keys`: ``fedge`` builds its
whole parser on every run.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from pathlib import Path
from typing import Any

from fedge.protocol.errors import FedgeError
from fedge.tools.keys import PUBLIC_FILE_MODE, _key_dir, _refuse_existing, _write_file, write_private_key_file

OPERATOR_SIGN_FILE = "operator.sign"
#: A certificate file: base64 of the signed frame (about 400 characters) and a newline.
MAX_CERTIFICATE_FILE_BYTES = 4096


def create_operator_key(out: Path, *, force: bool = False) -> tuple[Path, str, str]:
    """``(key file, verify key text, key id)``: the operator's Ed25519 signing key."""
    from nacl.signing import SigningKey  # noqa: PLC0415

    from fedge.protocol.signing import key_id, signing_key_to_text  # noqa: PLC0415

    path = _key_dir(Path(out)) / OPERATOR_SIGN_FILE
    _refuse_existing([path], force)
    key = SigningKey.generate()
    write_private_key_file(path, signing_key_to_text(key), force=force)
    return path, signing_key_to_text(key.verify_key), key_id(key.verify_key)


def create_identity_key(out: Path, device_id: str, *, force: bool = False) -> tuple[Path, str]:
    """``(key file, identity verify key text)``: a device's Ed25519 identity key."""
    from nacl.signing import SigningKey  # noqa: PLC0415

    from fedge.protocol.signing import signing_key_to_text  # noqa: PLC0415
    from fedge.protocol.topics import check_id  # noqa: PLC0415

    check_id(device_id)
    path = _key_dir(Path(out)) / f"{device_id}.identity"
    _refuse_existing([path], force)
    key = SigningKey.generate()
    write_private_key_file(path, signing_key_to_text(key), force=force)
    return path, signing_key_to_text(key.verify_key)


def write_certificate(
    operator_key_file: Path,
    fleet: str,
    device_id: str,
    identity_key: str,
    out: Path,
    *,
    force: bool = False,
    now: float | None = None,
) -> Path:
    """Signs the device's identity key with the operator key and writes the certificate."""
    from fedge.protocol.identity import certify  # noqa: PLC0415
    from fedge.protocol.signing import SignatureError, verify_key_from_text  # noqa: PLC0415
    from fedge.tools.keys import read_private_key_file  # noqa: PLC0415

    operator = read_private_key_file(operator_key_file, "signing")
    try:
        verify_key = verify_key_from_text(identity_key)
    except SignatureError as exc:
        raise FedgeError(f"--identity-key: {exc}") from None
    if bytes(verify_key) == bytes(operator.verify_key):
        raise FedgeError("--identity-key is the operator's own key: give the device's identity key")
    frame = certify(operator, fleet, device_id, verify_key, time.time() if now is None else now)
    _refuse_existing([out], force)
    _write_file(out, base64.b64encode(frame) + b"\n", PUBLIC_FILE_MODE, replace=force)
    return out


def read_certificate_file(path: Path) -> bytes:
    """The certificate frame from a file ``fedge certify`` wrote; one-line errors name the file."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CERTIFICATE_FILE_BYTES + 1)
    except OSError as exc:
        raise FedgeError(f"cannot read identity certificate {path}: {exc.strerror}") from None
    if len(raw) > MAX_CERTIFICATE_FILE_BYTES:
        raise FedgeError(f"identity certificate {path} is over {MAX_CERTIFICATE_FILE_BYTES} bytes: not one")
    try:
        return base64.b64decode(raw.strip(), validate=True)
    except ValueError:
        raise FedgeError(f"identity certificate {path} is not base64 (write it with fedge certify)") from None


# --- commands ------------------------------------------------------------------------------------


def cmd_keys_operator(args: argparse.Namespace) -> int:
    path, verify_key, kid = create_operator_key(args.out, force=args.force)
    print(
        f"wrote {path} (mode 0600): keep it off the aggregator's gateway; it certifies devices",
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps({"operator_key_file": str(path), "verify_key": verify_key, "key_id": kid}))
    else:
        print("# the operator's public key, for each device's [agent] config")
        print(f'operator_verify_keys = ["{verify_key}"]  # key id {kid}')
    return 0


def cmd_keys_identity(args: argparse.Namespace) -> int:
    path, verify_key = create_identity_key(args.out, args.id, force=args.force)
    print(f"wrote {path} (mode 0600): it stays on the device", file=sys.stderr)
    if args.json:
        print(json.dumps({"id": args.id, "identity_key": verify_key}))
    else:
        print(f"fedge certify --id {args.id} --identity-key {verify_key} ...")
    return 0


def cmd_certify(args: argparse.Namespace) -> int:
    out = args.out or Path(f"{args.id}.cert")
    write_certificate(args.operator_key, args.fleet, args.id, args.identity_key, out, force=args.force)
    print(f"wrote {out}: give it to {args.id} as [agent] identity_certificate_file")
    return 0


def add_identity_parsers(keys_sub: Any, sub: Any) -> None:
    """``fedge keys operator|identity`` (under ``keys_sub``) and ``fedge certify`` (under ``sub``)."""
    op = keys_sub.add_parser("operator", help="the operator's key that certifies device identity keys")
    op.add_argument("--out", type=Path, required=True, metavar="DIR", help="key directory")
    op.add_argument("--force", action="store_true", help="overwrite an existing key file")
    op.add_argument("--json", action="store_true", help="print the public key as JSON")
    op.set_defaults(func=cmd_keys_operator)

    ident = keys_sub.add_parser("identity", help="a device's identity key (secure aggregation)")
    ident.add_argument("--id", required=True, help="device id")
    ident.add_argument("--out", type=Path, required=True, metavar="DIR", help="key directory")
    ident.add_argument("--force", action="store_true", help="overwrite an existing key file")
    ident.add_argument("--json", action="store_true", help="print the public key as JSON")
    ident.set_defaults(func=cmd_keys_identity)

    cert = sub.add_parser("certify", help="certify a device's identity key with the operator key")
    cert.add_argument("--operator-key", type=Path, required=True, metavar="FILE", help="operator.sign")
    cert.add_argument("--fleet", required=True, help="fleet id")
    cert.add_argument("--id", required=True, help="device id")
    cert.add_argument(
        "--identity-key", required=True, metavar="KEY", help="the device's identity key (base64)"
    )
    cert.add_argument("--out", type=Path, metavar="FILE", help="certificate file (default: ID.cert)")
    cert.add_argument("--force", action="store_true", help="overwrite an existing certificate file")
    cert.set_defaults(func=cmd_certify)
